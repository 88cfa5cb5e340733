"""Fine-tune a LoRA adapter in JAX with ``lora_muon`` and export it for PEFT.

    python examples/peft_export.py --out /tmp/my_adapter

The adapter lives in a flat dict with Hugging Face PEFT's own names
(``base_model.model.<module>.lora_A.weight`` ``(r, in)``, ``….lora_B.weight``
``(out, r)``), so ``pairs="peft"`` finds its pairs and ``save_peft_adapter`` writes
files that ``peft.PeftModel.from_pretrained(model, OUT)`` loads unchanged, without
torch on the JAX side. The frozen base weights are in torch layout ``(out, in)``
and PEFT's scale ``c = lora_alpha / r`` is passed as ``lora_scale``, so the
learning rate is the spectral-norm step of each ``c · lora_B @ lora_A``.

The task is a toy: each adapted projection of a tiny Llama-shaped attention layer
should learn a rank-``r`` change of its weight from input/output samples. Here
the base weights are random; pass your model's weights (a dict ``module name ->
(out, in) array``, e.g. from its safetensors file) to :func:`fine_tune` instead.
Runs in a few seconds on a CPU.

To go on training an adapter that PEFT saved, ``adapter = load_peft_adapter(DIR)``
gives the tensors PEFT trains in ``adapter.params`` (train them with
``pairs=adapter.pairs``) and the copies of frozen base weights the file may carry
(a targeted ``embed_tokens``/``lm_head``) in ``adapter.frozen``; write both back with
``save_peft_adapter(params, OUT, adapter.config, frozen=adapter.frozen)``.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_muon_jax import load_peft_adapter, lora_muon, save_peft_adapter

PREFIX = "base_model.model."
# A tiny Llama-shaped layer: hidden 16, 2 query heads and 1 key/value head of 8.
MODULES = {
    "model.layers.0.self_attn.q_proj": (16, 16),
    "model.layers.0.self_attn.v_proj": (8, 16),
}


def random_base(seed: int = 0) -> dict[str, np.ndarray]:
    """Random frozen base weights ``module -> (out, in)`` (torch layout)."""
    rng = np.random.default_rng(seed)
    return {
        name: (rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32)
        for name, shape in MODULES.items()
    }


def init_adapter(base: dict[str, np.ndarray], rank: int, seed: int) -> dict[str, jax.Array]:
    """PEFT's initialization: ``lora_A`` Kaiming-uniform, ``lora_B`` zero."""
    keys = jax.random.split(jax.random.key(seed), len(base))
    adapter = {}
    for key, (name, w) in zip(keys, base.items(), strict=True):
        bound = 1.0 / np.sqrt(w.shape[1])
        adapter[f"{PREFIX}{name}.lora_A.weight"] = jax.random.uniform(
            key, (rank, w.shape[1]), jnp.float32, -bound, bound
        )
        adapter[f"{PREFIX}{name}.lora_B.weight"] = jnp.zeros((w.shape[0], rank), jnp.float32)
    return adapter


def merged(base: dict[str, np.ndarray], adapter: dict, lora_scale: float) -> dict[str, jax.Array]:
    """``W + c · lora_B @ lora_A`` for every adapted module, as PEFT merges it."""
    return {
        name: w
        + lora_scale
        * adapter[f"{PREFIX}{name}.lora_B.weight"]
        @ adapter[f"{PREFIX}{name}.lora_A.weight"]
        for name, w in base.items()
    }


class Task(NamedTuple):
    """The toy regression: inputs and target weights per module."""

    xs: dict[str, np.ndarray]
    targets: dict[str, np.ndarray]


def make_task(base: dict[str, np.ndarray], rank: int = 4, seed: int = 0) -> Task:
    """Each module's target: ``W`` plus a random rank-``rank`` change of spectral size ~0.5.

    Args:
      base: the frozen base weights ``module -> (out, in)``.
      rank: the rank of each target change.
      seed: the task draws from ``np.random.default_rng(seed + 1)`` (``seed`` itself
        initializes the adapter in :func:`fine_tune`).

    Returns:
      A :class:`Task` with 256 input samples per module.
    """
    rng = np.random.default_rng(seed + 1)
    targets = {
        name: w
        + 0.5
        * (rng.standard_normal((w.shape[0], rank)) / np.sqrt(w.shape[0]))
        @ (rng.standard_normal((rank, w.shape[1])) / np.sqrt(w.shape[1]))
        for name, w in base.items()
    }
    xs = {
        name: rng.standard_normal((256, w.shape[1])).astype(np.float32) for name, w in base.items()
    }
    return Task(xs, targets)


def task_loss(
    adapter: dict, base: dict[str, np.ndarray], task: Task, lora_scale: float
) -> jax.Array:
    """Sum over modules of the mean squared error of ``x @ merged.T`` against the target.

    Args:
      adapter: the adapter (flat dict with PEFT names).
      base: the frozen base weights.
      task: from :func:`make_task`.
      lora_scale: PEFT's ``c = lora_alpha / r``.

    Returns:
      The loss, a scalar.
    """
    weights = merged(base, adapter, lora_scale)
    errors = [
        jnp.mean((task.xs[n] @ weights[n].T - task.xs[n] @ task.targets[n].T) ** 2) for n in base
    ]
    return sum(errors[1:], errors[0])


def fine_tune(
    base: dict[str, np.ndarray],
    *,
    rank: int = 4,
    lora_alpha: float = 8.0,
    steps: int = 60,
    learning_rate: float = 0.1,
    seed: int = 0,
) -> tuple[dict[str, jax.Array], list[float]]:
    """Trains a rank-``rank`` adapter so each module matches a rank-``rank`` target.

    Args:
      base: the frozen base weights ``module -> (out, in)``.
      rank: PEFT's ``r``.
      lora_alpha: PEFT's ``lora_alpha``.
      steps: optimizer steps.
      learning_rate: ``lora_muon``'s spectral step of ``c · lora_B @ lora_A``.
      seed: seeds the adapter's initialization and the task.

    Returns:
      The adapter (flat dict with PEFT names) and the loss before every step and
      after the last one (``steps + 1`` values).
    """
    lora_scale = lora_alpha / rank
    task = make_task(base, rank, seed)

    def loss_fn(adapter: dict) -> jax.Array:
        return task_loss(adapter, base, task, lora_scale)

    tx = lora_muon(learning_rate, beta=0.9, lora_scale=lora_scale, pairs="peft")

    @jax.jit
    def step(adapter, state):
        loss, grads = jax.value_and_grad(loss_fn)(adapter)
        updates, state = tx.update(grads, state, adapter)
        return optax.apply_updates(adapter, updates), state, loss

    adapter = init_adapter(base, rank, seed)
    state = tx.init(adapter)
    losses = []
    for _ in range(steps):
        adapter, state, loss = step(adapter, state)
        losses.append(float(loss))
    losses.append(float(loss_fn(adapter)))
    return adapter, losses


def peft_config(rank: int, lora_alpha: float) -> dict:
    """The ``adapter_config.json`` PEFT needs to rebuild this adapter."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": lora_alpha,
        "lora_dropout": 0.0,
        "target_modules": sorted({name.rsplit(".", 1)[1] for name in MODULES}),
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "inference_mode": True,
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("peft_adapter"), help="output directory")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lora-alpha", type=float, default=8.0)
    p.add_argument("--learning-rate", type=float, default=0.1)
    args = p.parse_args(argv)

    base = random_base()
    adapter, losses = fine_tune(
        base,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        steps=args.steps,
        learning_rate=args.learning_rate,
    )
    save_peft_adapter(adapter, args.out, peft_config(args.rank, args.lora_alpha))
    back = load_peft_adapter(args.out)
    same = all(np.array_equal(back.params[k], np.asarray(v)) for k, v in adapter.items())
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {args.steps} steps")
    print(
        f"wrote {args.out}/adapter_model.safetensors ({len(back.params)} tensors) and "
        f"adapter_config.json; lora_scale {back.lora_scale:g}; read back bit-identical: {same}"
    )


if __name__ == "__main__":
    main()
