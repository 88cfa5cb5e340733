"""LoRA-Muon in a Flax linen ``TrainState``, with plain and ``nn.scan``-stacked layers.

Linen has no LoRA layer; users write one like ``LoRADense`` below (params
``lora_a`` (in, r), ``lora_b`` (r, out) next to the frozen ``kernel``). The run
through ``TrainState.apply_gradients`` must equal, step for step, a plain optax
loop over the same dict with a hand-written forward pass.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax.training import train_state

import lora_muon_jax as lmj

STEPS = 12
LAYERS, WIDTH, RANK = 3, 8, 2


class LoRADense(nn.Module):
    """``y = x @ (kernel + a @ b) + bias``, with ``b`` zero-initialized (as in PEFT)."""

    features: int
    rank: int

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        bias = self.param("bias", nn.initializers.zeros, (self.features,))
        a = self.param("lora_a", nn.initializers.he_uniform(), (x.shape[-1], self.rank))
        b = self.param("lora_b", nn.initializers.zeros, (self.rank, self.features))
        return x @ kernel + bias + (x @ a) @ b


class Block(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return h + jnp.tanh(LoRADense(WIDTH, RANK)(h)), None


class Model(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(LoRADense(WIDTH, RANK)(x))
        blocks = nn.scan(
            Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=LAYERS
        )
        h, _ = blocks(name="blocks")(h, None)
        return h


def forward(p, x):
    """Pure-dict forward of ``Model``."""

    def dense(q, h):
        return h @ q["kernel"] + q["bias"] + h @ q["lora_a"] @ q["lora_b"]

    h = jnp.tanh(dense(p["LoRADense_0"], x))

    def body(h, q):
        return h + jnp.tanh(dense(q, h)), None

    h, _ = jax.lax.scan(body, h, p["blocks"]["LoRADense_0"])
    return h


@functools.cache
def _problem():
    model = Model()
    # NumPy draws: each eager jax.random call of a new shape compiles a program.
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((64, 6)), jnp.float32)
    # Shapes from linen, values from NumPy: a real init would compile a program
    # (seconds) for nothing. Kernels and lora_a ~ N(0, 1/fan_in); lora_b zero.
    shapes = jax.eval_shape(model.init, jax.random.key(0), x)["params"]
    params = jax.tree_util.tree_map_with_path(
        lambda p, s: (
            jnp.zeros(s.shape, s.dtype)
            if p[-1].key in ("bias", "lora_b")
            else jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[-2]), s.dtype)
        ),
        shapes,
    )
    # A reachable target: the same model with random adapters.
    teacher = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            jnp.asarray(0.4 * rng.standard_normal(v.shape), v.dtype)
            if str(p[-1].key).startswith("lora")
            else v
        ),
        params,
    )
    y = jax.jit(model.apply)({"params": teacher}, x)
    return model, params, x, y


def _tx():
    # LoRA-only fine-tuning: factors get LoRA-Muon, base weights stay frozen.
    return optax.partition(
        {"lora": lmj.lora_muon(0.05, beta=0.9, weight_decay=0.01), "frozen": optax.set_to_zero()},
        lmj.lora_param_labels(other_label="frozen"),
    )


def test_train_state_with_scanned_layers_trains_and_matches_pytree_path():
    model, params, x, y = _problem()
    blocks = params["blocks"]["LoRADense_0"]
    assert blocks["lora_a"].shape == (LAYERS, WIDTH, RANK)
    assert blocks["lora_b"].shape == (LAYERS, RANK, WIDTH)
    assert len(lmj.find_lora_pairs(params)) == 2  # one plain, one stacked (3 layers)

    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=_tx())

    @jax.jit
    def ts_step(state):
        def loss_fn(p):
            return jnp.mean((state.apply_fn({"params": p}, x) - y) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        return loss, state.apply_gradients(grads=grads)

    tx = _tx()

    @jax.jit
    def dict_step(p, s):
        loss, g = jax.value_and_grad(lambda q: jnp.mean((forward(q, x) - y) ** 2))(p)
        u, s = tx.update(g, s, p)
        return loss, optax.apply_updates(p, u), s

    p_ref, s_ref = params, tx.init(params)
    losses = []
    for t in range(STEPS):
        loss, state = ts_step(state)
        loss_ref, p_ref, s_ref = dict_step(p_ref, s_ref)
        losses.append(float(loss))
        assert float(loss) == pytest.approx(float(loss_ref), rel=1e-6), t
        jax.tree.map(
            lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
            state.params,
            p_ref,
        )
    # Loss falls by a stated margin: below 50% of the start in 12 steps (measured 23%).
    assert losses[-1] < 0.5 * losses[0], losses
    # Frozen base weights did not move; every layer's adapter did.
    np.testing.assert_array_equal(state.params["blocks"]["LoRADense_0"]["kernel"], blocks["kernel"])
    moved = jnp.abs(state.params["blocks"]["LoRADense_0"]["lora_b"]).max(axis=(1, 2))
    assert bool(jnp.all(moved > 0))
    assert int(state.step) == STEPS


def test_train_state_reports_bad_factor_shapes_by_path():
    model, params, x, _ = _problem()
    # A user module that stored lora_b transposed: (out, r) instead of (r, out).
    bad = {**params, "LoRADense_0": {**params["LoRADense_0"], "lora_b": jnp.zeros((WIDTH, RANK))}}
    with pytest.raises(ValueError, match=r"rank mismatch.*\['LoRADense_0'\]\['lora_a'\]"):
        train_state.TrainState.create(apply_fn=model.apply, params=bad, tx=_tx())
