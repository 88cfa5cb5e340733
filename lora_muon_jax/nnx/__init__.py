"""Flax helpers for LoRA training with lora_muon_jax: merge, balanced init, checks.

The optimizers themselves need no Flax-specific code: ``lora_muon`` works as is
under ``nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)`` (or ``wrt=nnx.Param`` to
train base weights with AdamW too) and under linen's ``TrainState``. This
subpackage adds what users ask for around them:

* :func:`merge_lora`: fold ``W₀ + c · a @ b`` into the base weights (nnx models:
  ``nnx.LoRALinear`` becomes ``nnx.Linear``; pytrees: factor leaves removed);
* :func:`balance_lora_init`: non-zero factors of equal spectral norm without
  changing the model (the zero-init drift of LoRA-Muon, docs/algorithm.md §Zero
  factors and gauge drift);
* :func:`check_lora_model`: fail early when ``wrt`` selects no adapter.

Import it as ``import lora_muon_jax.nnx as lmx`` so that it does not shadow
``flax.nnx``. It is the one part of the library that needs flax, an optional
dependency: ``pip install "lora_muon_jax[flax]"``.
"""

try:
    import flax.nnx  # noqa: F401
except ModuleNotFoundError as err:
    if err.name is None or err.name.partition(".")[0] != "flax":
        raise  # flax is there but something it imports is not: show that error
    raise ModuleNotFoundError(
        "lora_muon_jax.nnx needs flax, an optional dependency of lora_muon_jax "
        '(the optimizers do not): pip install "lora_muon_jax[flax]"',
        name=err.name,
    ) from err

from lora_muon_jax.nnx._balanced_init import balance_lora_init as balance_lora_init
from lora_muon_jax.nnx._balanced_init import check_lora_model as check_lora_model
from lora_muon_jax.nnx._merge_lora import merge_lora as merge_lora

__all__ = ["balance_lora_init", "check_lora_model", "merge_lora"]
