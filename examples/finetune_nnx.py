"""Fine-tuning with Flax NNX adapters: frozen base kernels, nnx.LoRA, lora_muon + AdamW.

    python examples/finetune_nnx.py            # ~30 s on two CPU cores
    python examples/finetune_nnx.py --pretrain-steps 20 --steps 20 --width 32

The usual LoRA setting, end to end:

1. "pretrain" a small dense character transformer (``rank=None``: plain
   ``nnx.Linear`` kernels) for a few hundred AdamW steps on TinyShakespeare;
2. wrap every attention/MLP kernel in ``nnx.LoRA(..., base_module=linear)``
   (Flax's default init: random ``lora_a``, zero ``lora_b``, so the model starts
   exactly at the base model);
3. train the adapters with ``lora_muon`` and the norm scales with AdamW, combined
   by ``optax.partition`` with labels from ``lora_param_labels``, through
   ``nnx.Optimizer(model, tx, wrt=trainable)``; the base kernels stay frozen.

With ``b = 0`` the gradient of ``a`` is zero at the first step; LoRA-Muon then
moves only ``b`` (no NaN), and both factors move from the second step on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from lora_muon_jax import lora_muon, lora_param_labels
from lora_muon_jax_examples.char_lm import CharTransformer, loss_fn
from lora_muon_jax_examples.tinyshakespeare import (
    CharTokenizer,
    load_tinyshakespeare_or_exit,
    sample_batch,
    split_train_val,
)

ADAPTED = (("attn", ("q", "k", "v", "o")), ("mlp", ("up", "down")))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pretrain-steps", type=int, default=200)
    p.add_argument("--steps", type=int, default=150, help="fine-tuning steps")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.05, help="lora_muon learning rate")
    p.add_argument("--adam-lr", type=float, default=3e-3, help="AdamW rate (pretraining, norms)")
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--data", type=Path, default=None, help="TinyShakespeare file or dir")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def add_adapters(model: CharTransformer, rank: int, rngs: nnx.Rngs) -> None:
    """Wraps each block's dense kernels in ``nnx.LoRA`` adapters, in place."""
    for block in model.blocks:
        for group, names in ADAPTED:
            parent = getattr(block, group)
            for name in names:
                base = getattr(parent, name)
                in_features, out_features = base.kernel.shape
                setattr(
                    parent,
                    name,
                    nnx.LoRA(in_features, rank, out_features, base_module=base, rngs=rngs),
                )


def is_norm_scale(path: tuple, value: object) -> bool:
    """NNX filter: the RMSNorm scales (``attn_norm``, ``mlp_norm``, ``norm``)."""
    return any(str(part).endswith("norm") for part in path)


def main(argv: list[str] | None = None) -> dict[str, float]:
    args = parse_args(argv)
    text = load_tinyshakespeare_or_exit(args.data, "finetune_nnx.py")
    tok = CharTokenizer.from_text(text)
    train_ids, val_ids = (jnp.asarray(x) for x in split_train_val(tok.encode(text), 0.1))
    batch_fn = jax.jit(sample_batch, static_argnums=(2, 3))
    val_batches = [
        batch_fn(k, val_ids, args.batch, args.seq_len)
        for k in jax.random.split(jax.random.key(1), 8)
    ]
    eval_loss = nnx.jit(loss_fn)

    def val_loss(model: CharTransformer) -> float:
        return float(np.mean([eval_loss(model, b) for b in val_batches]))

    # 1. A dense "pretrained" base model.
    model = CharTransformer(
        tok.vocab_size,
        width=args.width,
        depth=args.depth,
        heads=args.heads,
        rank=None,
        seq_len=args.seq_len,
        rngs=nnx.Rngs(args.seed),
    )
    pretrain = nnx.Optimizer(model, optax.adamw(args.adam_lr), wrt=nnx.Param)

    @nnx.jit
    def pretrain_step(model, optimizer, batch):
        loss, grads = nnx.value_and_grad(loss_fn)(model, batch)
        optimizer.update(model, grads)
        return loss

    key = jax.random.key(args.seed + 1)
    for _ in range(args.pretrain_steps):
        key, sub = jax.random.split(key)
        pretrain_step(model, pretrain, batch_fn(sub, train_ids, args.batch, args.seq_len))
    base_loss = val_loss(model)
    print(f"pretrained dense base: {args.pretrain_steps} AdamW steps, val loss {base_loss:.3f}")

    # 2. Adapters around the frozen kernels.
    add_adapters(model, args.rank, nnx.Rngs(args.seed + 2))
    trainable = nnx.Any(nnx.LoRAParam, is_norm_scale)
    frozen_filter = nnx.All(nnx.Param, nnx.Not(trainable))
    frozen = jax.tree.map(jnp.copy, nnx.to_pure_dict(nnx.state(model, frozen_filter)))
    start_loss = val_loss(model)
    print(f"with zero-init adapters:                val loss {start_loss:.3f} (unchanged)")

    # 3. LoRA factors -> lora_muon; norm scales -> AdamW. `lora_param_labels()` is a
    # callable (it reads only paths), which optax.partition needs under nnx.Optimizer.
    tx = optax.partition(
        {"lora": lora_muon(args.lr, beta=0.95), "other": optax.adamw(args.adam_lr)},
        lora_param_labels(lora_label="lora", other_label="other"),
    )
    optimizer = nnx.Optimizer(model, tx, wrt=trainable)
    n_lora = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.LoRAParam)))
    n_all = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    print(f"trainable: {n_lora:,} LoRA factor entries of {n_all:,} parameters")

    @nnx.jit
    def finetune_step(model, optimizer, batch):
        # DiffState: gradients only for the trainable leaves, none for frozen kernels.
        grad_fn = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, trainable))
        loss, grads = grad_fn(model, batch)
        optimizer.update(model, grads)
        return loss

    for step in range(1, args.steps + 1):
        key, sub = jax.random.split(key)
        loss = finetune_step(model, optimizer, batch_fn(sub, train_ids, args.batch, args.seq_len))
        if step % args.log_every == 0 or step == args.steps:
            print(f"step {step:4d}  train loss {float(loss):.3f}  val loss {val_loss(model):.3f}")

    final_loss = val_loss(model)
    still = nnx.to_pure_dict(nnx.state(model, frozen_filter))
    base_frozen = all(
        jax.tree.leaves(jax.tree.map(lambda a, b: bool((a == b).all()), frozen, still))
    )
    print(
        f"fine-tuned: val loss {start_loss:.3f} -> {final_loss:.3f}; "
        f"frozen base unchanged: {base_frozen}"
    )
    return {
        "base": base_loss,
        "start": start_loss,
        "final": final_loss,
        "base_frozen": base_frozen,
    }


if __name__ == "__main__":
    main()
