"""LiMuon in a Flax NNX training loop: the STORM correction needs a second gradient.

LiMuon's momentum ``M_t = g_t + (1 - β)(M̂_{t-1} - g̃_t)`` uses, besides the usual
gradient ``g_t`` at the current parameters, the gradient ``g̃_t`` of the *same*
batch at the *previous* parameters. The loop below keeps the previous parameters,
computes both gradients on each batch and hands ``g̃_t`` to ``nnx.Optimizer.update``
as the keyword ``prev_grads``, which nnx forwards to ``tx.update``.

A small dense MLP fits a synthetic teacher; runs in a few seconds on a CPU::

    python examples/limuon_flax.py [--steps 300] [--batch 64]
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from lora_muon_jax.peers import limuon


class MLP(nnx.Module):
    def __init__(self, din: int, hidden: int, dout: int, *, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(din, hidden, rngs=rngs)
        self.l2 = nnx.Linear(hidden, hidden, rngs=rngs)
        self.l3 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.l3(nnx.gelu(self.l2(nnx.gelu(self.l1(x)))))


def make_data(key: jax.Array, n: int = 4096, din: int = 16, dout: int = 4):
    """Inputs and the outputs of a random teacher network, plus label noise."""
    kx, kt, kn = jax.random.split(key, 3)
    x = jax.random.normal(kx, (n, din))
    teacher = MLP(din, 32, dout, rngs=nnx.Rngs(kt))
    y = teacher(x) + 0.05 * jax.random.normal(kn, (n, dout))
    return x, y


def main(steps: int = 300, batch: int = 64) -> list[float]:
    x, y = make_data(jax.random.key(0))
    model = MLP(16, 64, 4, rngs=nnx.Rngs(1))
    # Kernels (2-D) get LiMuon with a rank-8 carried momentum (Option #2); biases go
    # to AdamW. The learning rate is the spectral-norm size of each kernel step.
    tx = limuon(learning_rate=0.02, beta=0.1, rank=8, shape_scaling="muon")
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)

    graphdef, _ = nnx.split(model)

    def loss_at(params: nnx.State, xb: jax.Array, yb: jax.Array) -> jax.Array:
        return jnp.mean((nnx.merge(graphdef, params)(xb) - yb) ** 2)

    @nnx.jit
    def train_step(model, optimizer, prev_params, xb, yb):
        params = nnx.state(model, nnx.Param)
        loss, grads = jax.value_and_grad(loss_at)(params, xb, yb)  # g_t = ∇f(W_t; ξ_t)
        prev_grads = jax.grad(loss_at)(prev_params, xb, yb)  # g̃_t = ∇f(W_{t-1}; ξ_t)
        optimizer.update(model, grads, prev_grads=prev_grads)
        return loss, params  # W_t becomes the previous point of the next step

    prev_params = nnx.state(model, nnx.Param)  # step 0: LiMuon ignores prev_grads
    losses = []
    for step in range(steps):
        start = (step * batch) % x.shape[0]
        xb, yb = x[start : start + batch], y[start : start + batch]
        loss, prev_params = train_step(model, optimizer, prev_params, xb, yb)
        losses.append(float(loss))
        if step % 50 == 0 or step == steps - 1:
            full = float(jnp.mean((model(x) - y) ** 2))
            print(f"step {step:4d}  batch loss {losses[-1]:.4f}  full-data loss {full:.4f}")
    return losses


if __name__ == "__main__":
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    args = ap.parse_args()
    main(steps=args.steps, batch=args.batch)
