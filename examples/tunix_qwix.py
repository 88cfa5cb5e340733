"""Train a Tunix model's qwix LoRA adapters with ``lora_muon``, in Tunix's own trainer.

    pip install -e ".[tunix]"        # google-tunix 0.1.7, qwix 0.1.8
    python examples/tunix_qwix.py --steps 20

Tunix fine-tunes with LoRA the way its qlora demo does: build the model, wrap it with
``qwix.apply_lora_to_model(model, qwix.LoraProvider(module_path=..., rank=r,
alpha=α), **model.get_model_input())`` and hand it to ``PeftTrainer``, which
trains only the ``nnx.LoRAParam`` leaves (``kernel_lora_a``/``_b`` of the
``nnx.Linear`` layers, ``w_lora_a``/``_b`` of the attention ``Einsum`` layers)
with the optax optimizer it is given. Here that optimizer is

    lora_muon(lr, pairs="auto", lora_scale=qwix_lora_scale(provider))

``pairs="auto"`` reads qwix's factor layouts (einsum adapters such as
``(heads, head_dim, r)``/``(r, embed)`` included) and ``qwix_lora_scale`` reads the
provider's ``alpha / rank``, the scale qwix applies, so that ``lr`` is the
spectral-norm step of each ``c · a @ b``.

The model is a tiny Gemma built from Tunix's own model code (random weights, no
download) and the data is synthetic: token sequences in which each token is
followed by a fixed permutation of it, a pattern the adapters can learn. Pass
your own model and dataset to :func:`train_lora` instead. Takes about half a minute
on a CPU, most of it compiling.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx
from tunix.models.dummy_model_creator import create_dummy_model
from tunix.models.gemma import model as gemma_lib
from tunix.sft import peft_trainer
from tunix.sft import utils as sft_utils

from lora_muon_jax import lora_muon, qwix_lora_scale

VOCAB = 64
# The projections Tunix's qlora demo adapts: attention einsums and MLP linears.
# (With module_path=".*" qwix also matches the tied embedding's decode,
# `x @ embedding.T`, and under the trainer's jit tries to create an adapter for it
# there, which fails: restrict the pattern to the projections, as the demo does.)
GEMMA_PROJECTIONS = ".*q_einsum|.*kv_einsum|.*qkv_einsum|.*attn_vec_einsum|.*_proj"


def tiny_gemma(num_layers: int = 1, num_kv_heads: int = 1, seed: int = 0) -> gemma_lib.Gemma:
    """A tiny Gemma from Tunix's model code: embed 32, 4 heads of 8, random weights.

    Tunix initializes the MLP kernels to zero (they are meant to be loaded from a
    checkpoint), a point where adapters with ``lora_b = 0`` get no gradient; Tunix's
    ``create_dummy_model`` draws every weight at random instead, as a stand-in for
    a pretrained model.
    """
    config = gemma_lib.ModelConfig(
        num_layers=num_layers,
        num_embed=VOCAB,
        embed_dim=32,
        hidden_dim=64,
        num_heads=4,
        head_dim=8,
        num_kv_heads=num_kv_heads,
        final_logit_softcap=None,
        use_post_attn_norm=False,
        use_post_ffw_norm=False,
        attention_types=[gemma_lib.AttentionType.GLOBAL] * num_layers,
    )
    return create_dummy_model(
        gemma_lib.Gemma, config, dtype=jnp.float32, random_seed=seed, scale=0.1
    )


def apply_lora(
    model: Any, rank: int = 4, alpha: float = 8.0, module_path: str = GEMMA_PROJECTIONS
) -> tuple[nnx.Module, qwix.LoraProvider]:
    """qwix LoRA on every matching op, as Tunix's qlora demo applies it.

    Args:
      model: a Tunix model (it has ``get_model_input()``, the dummy inputs qwix
        traces the model with).
      rank: LoRA rank ``r``.
      alpha: LoRA ``alpha``; qwix adds ``(alpha / r) · x @ a @ b``.
      module_path: regex of the module paths to adapt.

    Returns:
      ``(lora_model, provider)``.
    """
    provider = qwix.LoraProvider(module_path=module_path, rank=rank, alpha=alpha)
    lora_model = qwix.apply_lora_to_model(
        model, provider, rngs=nnx.Rngs(1), **model.get_model_input()
    )
    return lora_model, provider


def synthetic_batches(
    batch: int = 8, seq_len: int = 16, seed: int = 0
) -> Iterator[peft_trainer.TrainingInput]:
    """Endless batches of sequences ``t, perm[t], perm[perm[t]], ...`` (no padding)."""
    rng = np.random.default_rng(seed)
    perm = rng.permutation(VOCAB)
    while True:
        tokens = np.empty((batch, seq_len), np.int32)
        tokens[:, 0] = rng.integers(0, VOCAB, batch)
        for t in range(1, seq_len):
            tokens[:, t] = perm[tokens[:, t - 1]]
        yield peft_trainer.TrainingInput(
            input_tokens=jnp.asarray(tokens), input_mask=jnp.ones_like(tokens, dtype=bool)
        )


def gen_model_input_fn(x: peft_trainer.TrainingInput) -> dict[str, Any]:
    """Tunix's model inputs from a batch: positions and a causal attention mask."""
    positions = sft_utils.build_positions_from_mask(x.input_mask)
    return {
        "input_tokens": x.input_tokens,
        "input_mask": x.input_mask,
        "positions": positions,
        "attention_mask": sft_utils.make_causal_attn_mask(x.input_mask),
    }


def _snapshot(model: nnx.Module) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(LoRA leaves, every other Param leaf) as NumPy copies."""
    lora = nnx.state(model, nnx.LoRAParam)
    frozen = nnx.state(model, nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam)))
    return (
        [np.array(x) for x in jax.tree.leaves(lora)],
        [np.array(x) for x in jax.tree.leaves(frozen)],
    )


def train_lora(
    lora_model: nnx.Module,
    provider: qwix.LoraProvider,
    data: Iterator[Any],
    steps: int = 20,
    learning_rate: float = 0.1,
) -> dict[str, Any]:
    """Trains ``lora_model``'s adapters with Tunix's ``PeftTrainer`` and ``lora_muon``.

    Args:
      lora_model: a model wrapped by ``qwix.apply_lora_to_model``.
      provider: the ``qwix.LoraProvider`` that wrapped it (its ``alpha / rank`` is
        the ``lora_scale``).
      data: an iterator of ``peft_trainer.TrainingInput`` batches.
      steps: training steps.
      learning_rate: ``lora_muon``'s spectral step of each ``c · a @ b``.

    Returns:
      ``{"losses": per-step training losses, "lora_moved": bool, "frozen_moved":
      bool, "seconds": wall time of training}``.
    """
    optimizer = lora_muon(learning_rate, pairs="auto", lora_scale=qwix_lora_scale(provider))
    config = peft_trainer.TrainingConfig(eval_every_n_steps=steps + 1, max_steps=steps)
    trainer = peft_trainer.PeftTrainer(lora_model, optimizer, config)
    trainer = trainer.with_gen_model_input_fn(gen_model_input_fn)
    lora_before, frozen_before = _snapshot(lora_model)
    start = time.perf_counter()
    trainer.train(data)
    seconds = time.perf_counter() - start
    losses = trainer.metrics_logger.get_metric_history(trainer.metrics_prefix, "loss", "train")
    lora_after, frozen_after = _snapshot(lora_model)
    moved = [not np.array_equal(x, y) for x, y in zip(lora_before, lora_after, strict=True)]
    return {
        "losses": [float(x) for x in np.asarray(losses)],
        "lora_moved": all(moved),
        "frozen_moved": any(
            not np.array_equal(x, y) for x, y in zip(frozen_before, frozen_after, strict=True)
        ),
        "seconds": seconds,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--layers", type=int, default=1)
    args = parser.parse_args()
    model, provider = apply_lora(tiny_gemma(args.layers), args.rank, args.alpha)
    out = train_lora(model, provider, synthetic_batches(), args.steps, args.lr)
    print("losses:", " ".join(f"{x:.3f}" for x in out["losses"]))
    print(
        f"lora_scale {qwix_lora_scale(provider)}; adapters moved: {out['lora_moved']}; "
        f"base weights moved: {out['frozen_moved']}; {out['seconds']:.1f} s"
    )


if __name__ == "__main__":
    main()
