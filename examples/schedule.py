"""Learning-rate schedules: warmup-cosine LoRA-Muon, logging the rate of every step.

    python examples/schedule.py                 # ~20 s on two CPU cores
    python examples/schedule.py --steps 20 --width 32

``optax.inject_hyperparams(lora_muon)`` turns every numeric hyperparameter into
optimizer state: schedules are evaluated on the optimizer's own step count, the
value used by each step is readable in ``opt_state.hyperparams`` (for logging), and
a rate can be changed between steps without recompiling.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from lora_muon_jax import lora_muon
from lora_muon_jax_examples.char_lm import CharTransformer, loss_fn
from lora_muon_jax_examples.tinyshakespeare import (
    CharTokenizer,
    load_tinyshakespeare_or_exit,
    sample_batch,
    split_train_val,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--warmup", type=int, default=None, help="default: 10%% of --steps")
    p.add_argument("--peak-lr", type=float, default=0.1, help="lora_muon peak rate")
    p.add_argument("--adam-peak-lr", type=float, default=1e-2, help="AdamW peak rate")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--data", type=Path, default=None, help="TinyShakespeare file or dir")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> list[tuple[int, float, float]]:
    args = parse_args(argv)
    warmup = args.warmup if args.warmup is not None else max(1, args.steps // 10)
    text = load_tinyshakespeare_or_exit(args.data, "schedule.py")
    tok = CharTokenizer.from_text(text)
    train_ids, _ = (jnp.asarray(x) for x in split_train_val(tok.encode(text), 0.1))

    def warmup_cosine(peak: float) -> optax.Schedule:
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0,
            peak_value=peak,
            warmup_steps=warmup,
            decay_steps=args.steps,
            end_value=0.05 * peak,
        )

    # Both rates are schedules; inject_hyperparams evaluates them at each step's count.
    tx = optax.inject_hyperparams(lora_muon)(
        learning_rate=warmup_cosine(args.peak_lr),
        adam_learning_rate=warmup_cosine(args.adam_peak_lr),
        beta=0.95,
    )
    model = CharTransformer(
        tok.vocab_size,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        rank=args.rank,
        seq_len=args.seq_len,
        rngs=nnx.Rngs(args.seed),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    @nnx.jit
    def train_step(model, optimizer, key):
        batch = sample_batch(key, train_ids, args.batch, args.seq_len)
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        # After the update, hyperparams hold the values this step used.
        hp = optimizer.opt_state.hyperparams
        return loss, hp["learning_rate"][...], hp["adam_learning_rate"][...]

    log = []
    key = jax.random.key(args.seed + 1)
    print(f"{'step':>5} {'lora_muon lr':>13} {'adamw lr':>10} {'loss':>7}")
    for step in range(args.steps):
        key, sub = jax.random.split(key)
        loss, lr, adam_lr = (float(x) for x in train_step(model, optimizer, sub))
        log.append((step, lr, loss))
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"{step:>5} {lr:>13.5f} {adam_lr:>10.6f} {loss:>7.3f}")
    return log


if __name__ == "__main__":
    main()
