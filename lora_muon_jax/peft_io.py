"""Hugging Face PEFT adapter files in and out, without torch.

A PEFT LoRA adapter is a directory with two files: ``adapter_model.safetensors``
(the factors, named ``base_model.model.<module>.lora_A.weight`` ``(r, in)`` and
``….lora_B.weight`` ``(out, r)``; ``lora_embedding_A`` ``(r, vocab)`` and
``lora_embedding_B`` ``(dim, r)`` for embeddings; DoRA's
``lora_magnitude_vector``) and ``adapter_config.json`` (``r``, ``lora_alpha``,
``use_rslora``, ``rank_pattern``, ``alpha_pattern``, …). PEFT adds
``c · lora_B @ lora_A`` to each weight, with ``c = lora_alpha / r`` (rsLoRA:
``lora_alpha / √r``).

:func:`load_peft_adapter` reads such a directory into a flat dict keyed by the
file's names, which ``pairs="peft"`` pairs as is, plus the ``lora_scale`` that
:func:`lora_muon_jax.lora_muon` needs for its learning rate to mean a spectral
step of the product ``c · ΔW``. :func:`save_peft_adapter` writes the same
format back, which ``peft.PeftModel.from_pretrained`` loads unchanged. Both use
``safetensors``' NumPy API; tensors keep their dtype (bfloat16 included) and bits.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import safetensors.numpy

from lora_muon_jax import _pair_discovery

__all__ = ["PeftAdapter", "load_peft_adapter", "peft_lora_scale", "save_peft_adapter"]

WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
# How each factor's key ends in an adapter file, and the axis holding its rank.
_FACTOR_SUFFIXES = {
    ".lora_A.weight": 0,
    ".lora_B.weight": 1,
    ".lora_embedding_A": 0,
    ".lora_embedding_B": 1,
}
# A factor name followed by anything but its file suffix: a model's state dict
# (`lora_A.default.weight`), whose adapter name PEFT's files do not carry.
_IN_MEMORY_NAME = re.compile(r"\.(lora_A|lora_B)\.(?!weight$)|\.(lora_embedding_[AB])\.")


class PeftAdapter(NamedTuple):
    """A PEFT LoRA adapter read from disk.

    Attributes:
      params: the tensors, a flat dict keyed by their names in the file.
      config: the parsed ``adapter_config.json``.
      lora_scale: ``c`` in ``ΔW = c · lora_B @ lora_A``: ``lora_alpha / r``, or
        ``lora_alpha / √r`` with ``use_rslora``; pass it as ``lora_scale=``.
    """

    params: dict[str, np.ndarray]
    config: dict[str, Any]
    lora_scale: float


def _module_of(key: str) -> tuple[str, int] | None:
    """``(module name, rank axis)`` of a factor key, ``None`` for other tensors."""
    for suffix, rank_axis in _FACTOR_SUFFIXES.items():
        if key.endswith(suffix):
            module = key[: -len(suffix)]
            return module.removeprefix(_PREFIX), rank_axis
    return None


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    # PEFT's rule: a pattern applies when the module name ends with it (a regex),
    # at a dot boundary; the first pattern that applies wins.
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _module_scales(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[float, list[str]]:
    """Every factor's module grouped by its scale; checks ranks against shapes."""
    for field in ("r", "lora_alpha"):
        value = config.get(field)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"PEFT adapter config needs a number `{field}`; got {value!r}.")
    rslora = bool(config.get("use_rslora", False))
    scales: dict[float, list[str]] = {}
    for key, x in params.items():
        found = _module_of(key)
        if found is None:
            continue
        module, rank_axis = found
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
        if np.shape(x)[rank_axis] != r:
            raise ValueError(
                f"PEFT adapter tensor {key!r} has shape {tuple(np.shape(x))}: rank "
                f"{np.shape(x)[rank_axis]}, but the config gives module {module!r} r={r}."
            )
        scales.setdefault(float(alpha / math.sqrt(r) if rslora else alpha / r), []).append(module)
    return scales


def peft_lora_scale(config: Mapping[str, Any], params: Mapping[str, Any]) -> float:
    r"""The LoRA scale ``c`` of a PEFT adapter, checked against its tensors.

    .. math::

      c = \frac{α}{r} \quad\text{or, with rsLoRA,}\quad c = \frac{α}{\sqrt r},

    with ``r`` and ``α`` of each adapted module (``rank_pattern`` and
    ``alpha_pattern`` override ``r`` and ``lora_alpha`` per module, as in PEFT).
    The ranks in the config must equal the factors' shapes.

    Args:
      config: the adapter config (``adapter_config.json`` as a dict).
      params: the adapter's tensors, keyed by their names in the file.

    Returns:
      The one scale shared by every module (from ``r`` and ``lora_alpha`` when
      ``params`` holds no factor).

    Raises:
      ValueError: a missing ``r`` or ``lora_alpha``, a rank that disagrees with a
        factor's shape, or modules with different scales (``lora_muon`` takes one
        ``lora_scale``: split the tree with :func:`optax.partition`).

    Examples:
      >>> import numpy as np
      >>> from lora_muon_jax.peft_io import peft_lora_scale
      >>> params = {'base_model.model.q.lora_A.weight': np.zeros((4, 8)),
      ...           'base_model.model.q.lora_B.weight': np.zeros((6, 4))}
      >>> peft_lora_scale({'r': 4, 'lora_alpha': 8}, params)
      2.0
      >>> peft_lora_scale({'r': 4, 'lora_alpha': 8, 'use_rslora': True}, params)
      4.0
    """
    scales = _module_scales(config, params)
    if not scales:
        r, alpha = config["r"], config["lora_alpha"]
        return float(alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)
    if len(scales) > 1:
        shown = {s: sorted(set(m))[:3] for s, m in scales.items()}
        raise ValueError(
            f"PEFT adapter modules have different LoRA scales {shown} (from "
            "rank_pattern/alpha_pattern), but lora_muon takes one `lora_scale`: "
            "split the tree with optax.partition and give each part its own."
        )
    return next(iter(scales))


def load_peft_adapter(directory: str | Path) -> PeftAdapter:
    """Reads a PEFT LoRA adapter directory (no torch needed).

    Args:
      directory: a directory with ``adapter_model.safetensors`` and
        ``adapter_config.json``, as ``PeftModel.save_pretrained`` writes it.

    Returns:
      A :class:`PeftAdapter`: ``params`` (a flat dict of NumPy arrays keyed by the
      file's names, ready for ``pairs="peft"``), ``config`` and ``lora_scale``.

    Raises:
      FileNotFoundError: a file is missing.
      ValueError: the config is not a LoRA config, or as :func:`peft_lora_scale`.

    Examples:
      >>> import tempfile, numpy as np
      >>> from lora_muon_jax.peft_io import load_peft_adapter, save_peft_adapter
      >>> params = {'base_model.model.q.lora_A.weight': np.ones((2, 8), np.float32),
      ...           'base_model.model.q.lora_B.weight': np.zeros((6, 2), np.float32)}
      >>> config = {'peft_type': 'LORA', 'r': 2, 'lora_alpha': 4, 'target_modules': ['q']}
      >>> with tempfile.TemporaryDirectory() as d:
      ...     _ = save_peft_adapter(params, d, config)
      ...     adapter = load_peft_adapter(d)
      >>> sorted(adapter.params), adapter.lora_scale
      (['base_model.model.q.lora_A.weight', 'base_model.model.q.lora_B.weight'], 2.0)

    References:
      Hugging Face PEFT, `LoRA <https://huggingface.co/docs/peft/package_reference/lora>`_.
    """
    directory = Path(directory)
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"load_peft_adapter: no {name} in {directory}.")
    config = json.loads((directory / CONFIG_NAME).read_text())
    _check_config("load_peft_adapter", config)
    params = safetensors.numpy.load_file(directory / WEIGHTS_NAME)
    return PeftAdapter(params, config, peft_lora_scale(config, params))


def _check_config(fn: str, config: Any) -> None:
    if not isinstance(config, Mapping):
        raise TypeError(f"{fn}: the adapter config must be a dict; got {type(config)}.")
    if config.get("peft_type") != "LORA":
        raise ValueError(
            f"{fn}: only LoRA adapters are supported (config `peft_type` 'LORA'); got "
            f"{config.get('peft_type')!r}."
        )


def _flat_tensors(fn: str, params: Any) -> dict[str, np.ndarray]:
    """A flat ``{file name: contiguous NumPy array}`` from a flat or nested tree."""
    paths, leaves, _ = _pair_discovery.flatten_with_paths(params)
    out = {}
    for path, leaf in zip(paths, leaves, strict=True):
        key = ".".join(_pair_discovery.path_names(path))
        if _IN_MEMORY_NAME.search(key):
            raise ValueError(
                f"{fn}: {key!r} is a model state-dict name with an adapter name after "
                "the factor; adapter files drop it (`….lora_A.weight`, "
                "`….lora_embedding_A`). Rename the keys (e.g. remove '.default')."
            )
        out[key] = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    return out


def save_peft_adapter(params: Any, directory: str | Path, config: Mapping[str, Any]) -> Path:
    """Writes a LoRA adapter in PEFT's format, for ``PeftModel.from_pretrained``.

    Args:
      params: the adapter tensors: a flat dict keyed by PEFT file names
        (``base_model.model.<module>.lora_A.weight``, ``…lora_B.weight``,
        ``…lora_embedding_A``/``B``, ``…lora_magnitude_vector``), or the same
        names as nested dicts split at the dots. JAX or NumPy arrays; each keeps
        its dtype and bits.
      directory: where to write ``adapter_model.safetensors`` and
        ``adapter_config.json`` (created if missing).
      config: the adapter config, written as JSON; at least ``peft_type``
        (``"LORA"``), ``r`` and ``lora_alpha``, usually ``target_modules`` too.

    Returns:
      ``directory`` as a :class:`pathlib.Path`.

    Raises:
      ValueError: a non-LoRA config, state-dict names with an adapter name, an
        unpaired factor, or ranks that disagree with the config.

    Examples:
      See :func:`load_peft_adapter`.
    """
    fn = "save_peft_adapter"
    _check_config(fn, config)
    tensors = _flat_tensors(fn, params)
    _pair_discovery.find_lora_pairs(tensors, "peft")  # raises on unpaired or mismatched factors
    _module_scales(config, tensors)  # raises on ranks that disagree with the config
    text = json.dumps(dict(config), indent=2, sort_keys=True)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    safetensors.numpy.save_file(tensors, directory / WEIGHTS_NAME, metadata={"format": "pt"})
    (directory / CONFIG_NAME).write_text(text + "\n")
    return directory
