"""Quickstart: LoRA-Muon vs AdamW on a native low-rank transformer, TinyShakespeare.

    pip install -e ".[examples]" && python examples/quickstart.py

Trains the same character-level transformer (every attention/MLP matrix a rank-8
``lora_a @ lora_b`` pair, no dense base) twice from the same initialization: once
with ``lora_muon`` (LoRA factors; embeddings, norms and head go to its built-in
AdamW) and once with ``optax.adamw`` on everything. It prints a table of final
train/validation loss and step time, writes the loss curves to ``OUT/loss.png`` and
samples some text from each model. The defaults take about a minute on two CPU
cores; ``--steps 20 --width 32`` runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax
from flax import nnx
from tqdm.auto import tqdm

from lora_muon_jax import lora_muon
from lora_muon_jax_examples.char_lm import CharTransformer, generate, loss_fn
from lora_muon_jax_examples.tinyshakespeare import (
    CharTokenizer,
    load_tinyshakespeare_or_exit,
    sample_batch,
    split_train_val,
)

matplotlib.use("Agg")  # files only: no display needed (CI, SSH, containers)
import matplotlib.pyplot as plt  # noqa: E402

# Learning rates: each is the best of a sweep at the defaults below (300 steps, width
# 128, depth 2, rank 8, batch 16 x 64 characters, seed 0; val loss on 32 batches):
#   lora_muon  learning_rate   0.025  0.05   0.1    (0.2: 2.57, 0.4: 2.68)
#              val loss        2.280  2.270  2.323                     -> 0.05
#   adamw      learning_rate   3e-3   1e-2   2e-2   4e-2
#              val loss        2.356  2.302  2.479  3.181              -> 1e-2
# LoRA-Muon's rate is a spectral-norm budget per step for each product a @ b; the
# leaves in no pair (embeddings, norms, head) use its built-in AdamW with the AdamW
# baseline's rate and betas (0.9, 0.99), so only the rule for the factors differs.
LR_LORA_MUON = 0.05
LR_ADAMW = 1e-2


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps per optimizer")
    p.add_argument("--batch", type=int, default=16, help="sequences per batch")
    p.add_argument("--seq-len", type=int, default=64, help="characters per sequence")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--lr-lora-muon", type=float, default=LR_LORA_MUON)
    p.add_argument("--lr-adamw", type=float, default=LR_ADAMW)
    p.add_argument("--eval-batches", type=int, default=8, help="batches per loss estimate")
    p.add_argument("--sample-chars", type=int, default=200, help="characters to generate")
    p.add_argument("--out", type=Path, default=Path("outputs"), help="output directory")
    p.add_argument("--data", type=Path, default=None, help="TinyShakespeare file or dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    args = p.parse_args(argv)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return args


def make_optimizers(
    args: argparse.Namespace, steps: int
) -> dict[str, optax.GradientTransformation]:
    # Same short warmup and cosine decay for both, so only the update rule differs.
    def schedule(peak: float) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            0.0,
            peak,
            warmup_steps=max(1, steps // 20),
            decay_steps=steps,
            end_value=0.1 * peak,
        )

    return {
        "lora_muon": lora_muon(
            schedule(args.lr_lora_muon),
            beta=0.95,
            adam_learning_rate=schedule(args.lr_adamw),
            adam_b2=0.99,
        ),
        "adamw": optax.adamw(schedule(args.lr_adamw), b1=0.9, b2=0.99, weight_decay=0.0),
    }


def largest_divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, cap) + 1) if n % d == 0)


def train(
    name: str,
    tx: optax.GradientTransformation,
    args: argparse.Namespace,
    graphdef: nnx.GraphDef,
    params: nnx.State,
    train_ids: jax.Array,
    evaluate: Callable[[Any], tuple[float, float]],
) -> dict:
    """Trains ``params`` with ``tx``; returns loss curves, final losses, step time."""
    began = time.perf_counter()
    opt_state = tx.init(params)

    def loss_of(p, batch):
        return loss_fn(nnx.merge(graphdef, p), batch)

    # Several steps per compiled call (a scan) so that Python dispatch does not
    # dominate small steps; the progress bar moves once per chunk.
    chunk = largest_divisor_at_most(args.steps, min(25, args.steps // 10))

    @jax.jit
    def run_chunk(params, opt_state, key, ids):
        # `ids` is an argument, not a closure: a 4 MB constant slows compilation.
        def one(carry, key):
            params, opt_state = carry
            batch = sample_batch(key, ids, args.batch, args.seq_len)
            loss, grads = jax.value_and_grad(loss_of)(params, batch)
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(
            one, (params, opt_state), jax.random.split(key, chunk)
        )
        return params, opt_state, losses

    key = jax.random.key(args.seed + 1)  # the same batches for both optimizers
    n_chunks = args.steps // chunk
    losses, val_curve, times = [], [], []
    with tqdm(total=args.steps, desc=f"{name:>9}", unit="step", disable=args.no_progress) as bar:
        for i in range(n_chunks):
            key, sub = jax.random.split(key)
            start = time.perf_counter()
            params, opt_state, chunk_losses = run_chunk(params, opt_state, sub, train_ids)
            chunk_losses = np.asarray(chunk_losses)  # waits for the result
            times.append(time.perf_counter() - start)
            losses.extend(chunk_losses.tolist())
            if (i + 1) % max(1, n_chunks // 10) == 0 or i == n_chunks - 1:
                val_curve.append((len(losses), evaluate(params)[1]))
            bar.set_postfix(loss=f"{chunk_losses.mean():.3f}")
            bar.update(chunk)
    train_loss, val_loss = evaluate(params)
    # The first chunk includes compilation; time the rest.
    steady = times[1:] or times
    return {
        "losses": np.asarray(losses),
        "val_curve": val_curve,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "step_ms": 1e3 * float(np.median(steady)) / chunk,
        "seconds": time.perf_counter() - began,  # compilation and evaluation included
        "model": nnx.merge(graphdef, params),
    }


def _smooth(losses: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """A moving average over 1/50 of the run, with the step each value ends at."""
    window = max(1, len(losses) // 50)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    return np.arange(window, len(losses) + 1), smooth


def plot(results: dict[str, dict], path: Path) -> None:
    """Loss curves (left) and the train-loss gap to the first optimizer (right).

    The curves overlap once both have learned the easy statistics, so the right panel
    shows the difference the table reports: ``other - first``, smoothed.
    """
    fig, (ax, gap) = plt.subplots(1, 2, figsize=(11, 4))
    curves = {}
    for (name, r), color in zip(results.items(), ("C0", "C1"), strict=True):
        steps, smooth = _smooth(r["losses"])
        curves[name] = smooth
        ax.plot(steps, smooth, color=color, alpha=0.8, label=f"{name} train")
        val_steps, vals = zip(*r["val_curve"], strict=True)
        ax.plot(val_steps, vals, "o--", color=color, label=f"{name} val")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/char)", title="TinyShakespeare")
    ax.legend()
    ax.grid(alpha=0.3)
    (first, base), (other, smooth) = list(curves.items())[:2]
    n = min(len(base), len(smooth))
    gap.plot(steps[:n], smooth[:n] - base[:n], color="C1")
    gap.axhline(0.0, color="k", lw=0.8)
    gap.set(xlabel="step", ylabel="nats/char", title=f"train loss: {other} − {first}")
    gap.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict[str, dict]:
    args = parse_args(argv)
    text = load_tinyshakespeare_or_exit(args.data, "quickstart.py")
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = (jnp.asarray(x) for x in split_train_val(tok.encode(text), 0.1))
    print(f"TinyShakespeare: {len(text):,} chars, vocab {tok.vocab_size}; devices: {jax.devices()}")

    # One initialization, shared by both runs.
    model = CharTransformer(
        tok.vocab_size,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        rank=args.rank,
        seq_len=args.seq_len,
        rngs=nnx.Rngs(args.seed),
    )
    graphdef, params = nnx.split(model)
    params = nnx.as_pure(params)
    eval_keys = jax.random.split(jax.random.key(args.seed + 2), args.eval_batches)

    @jax.jit
    def mean_losses(params, train_ids, val_ids):
        def mean_loss(ids):
            return jax.vmap(
                lambda k: loss_fn(
                    nnx.merge(graphdef, params),
                    sample_batch(k, ids, args.batch, args.seq_len),
                )
            )(eval_keys).mean()

        return mean_loss(train_ids), mean_loss(val_ids)

    def evaluate(params: Any) -> tuple[float, float]:
        """Mean losses on the same random train and validation batches every time."""
        train_loss, val_loss = mean_losses(params, train_ids, val_ids)
        return float(train_loss), float(val_loss)

    results = {}
    for name, tx in make_optimizers(args, args.steps).items():
        results[name] = train(name, tx, args, graphdef, params, train_ids, evaluate)

    print(f"\n{'optimizer':<10} {'train loss':>10} {'val loss':>9} {'step ms':>8} {'run s':>6}")
    for name, r in results.items():
        print(
            f"{name:<10} {r['train_loss']:>10.3f} {r['val_loss']:>9.3f} "
            f"{r['step_ms']:>8.2f} "
            f"{r['seconds']:>6.1f}"
        )

    args.out.mkdir(parents=True, exist_ok=True)
    png = args.out / "loss.png"
    plot(results, png)
    summary = {
        name: {k: r[k] for k in ("train_loss", "val_loss", "step_ms", "seconds")}
        | {"first_loss": float(r["losses"][0])}
        for name, r in results.items()
    }
    (args.out / "results.json").write_text(
        json.dumps(
            {"config": {k: str(v) for k, v in vars(args).items()}, "results": summary},
            indent=2,
        )
    )
    print(f"\nLoss curves: {png}; numbers: {args.out / 'results.json'}")

    if args.sample_chars > 0:
        prompt = jnp.asarray(tok.encode("ROMEO:\n"))
        for i, (name, r) in enumerate(results.items()):
            ids = generate(
                r["model"],
                prompt,
                args.sample_chars,
                jax.random.key(i),
                temperature=0.8,
            )
            print(f"\n--- {name} sample ---\n{tok.decode(ids)}")
    return results


if __name__ == "__main__":
    main()
