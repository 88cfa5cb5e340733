"""LoRA-Muon under ``nnx.Optimizer``: training, pure-pytree equivalence, bad models.

Every training test runs the same steps twice: through ``nnx.Optimizer`` on a Flax
model, and as a plain loop of ``lora_muon`` over a nested dict of the same initial
arrays with a hand-written forward pass. The two must agree step for step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_muon_jax as lmj
import lora_muon_jax.nnx as lmx
from lora_muon_jax._diagnostics import with_lora_diagnostics
from tests.helpers import assert_trees_rel_close

STEPS = 12
# The reference forward adds in Flax's order, so the two programs compute the same
# maths; measured with XLA CPU's default emitters: bit-identical params after every
# step. The tolerance leaves room for XLA fusing the two programs differently, as the
# suite's legacy emitters do (tests/conftest.py), and is per leaf in the Frobenius
# norm (tests/helpers.py: an entry far below its leaf's scale can lose its relative
# digits). Measured over 12 steps: 1.2e-6 with the legacy emitters, 0 with the default.
RTOL = 2e-5


class TwoAdapters(nnx.Module):
    """A LoRALinear and a LoRA(base_module=Linear): Flax's two adapter styles."""

    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.LoRALinear(8, 16, lora_rank=2, rngs=rngs)
        self.l2 = nnx.LoRA(16, 3, 4, base_module=nnx.Linear(16, 4, rngs=rngs), rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def two_adapters_forward(p, x, tanh=jnp.tanh):
    """The pure-dict forward of ``TwoAdapters`` (nnx.to_pure_dict layout)."""
    l1, l2 = p["l1"], p["l2"]
    h = x @ l1["kernel"] + l1["bias"] + x @ l1["lora"]["lora_a"] @ l1["lora"]["lora_b"]
    h = tanh(h)
    base = l2["base_module"]
    # nnx.LoRA adds its base module's output to x @ a @ b: same order here.
    return h @ l2["lora_a"] @ l2["lora_b"] + (h @ base["kernel"] + base["bias"])


def numpy_init(ctor, seed=0):
    """Builds an nnx model with NumPy-drawn values: kernels and ``lora_a`` Gaussian
    with variance ``1/fan_in``, biases and ``lora_b`` zero (Flax's LoRA default).

    Eager ``nnx.Rngs`` initialization compiles one program per parameter shape
    (seconds); ``nnx.eval_shape`` plus NumPy costs nothing to compile.
    """
    graphdef, state = nnx.split(nnx.eval_shape(ctor))
    rng = np.random.default_rng(seed)

    def fill(path, s):
        name = [getattr(k, "key", getattr(k, "name", None)) for k in path if k != "value"]
        name = [n for n in name if n != "value"][-1]
        if name in ("bias", "lora_b"):
            return jnp.zeros(s.shape, s.dtype)
        return jnp.asarray(rng.standard_normal(s.shape) / np.sqrt(s.shape[-2]), s.dtype)

    return nnx.merge(graphdef, jax.tree_util.tree_map_with_path(fill, state))


def _data(n_in, seed=1):
    # NumPy draws: each eager jax.random call of a new shape compiles a program.
    rng = np.random.default_rng(seed)
    return jnp.asarray(rng.standard_normal((64, n_in)), jnp.float32), rng


def _teacher_targets(init, numpy_forward, x, rng, scale=0.3):
    """Targets of the model with random adapters (reachable by training them),
    computed in NumPy: no program to compile."""

    def draw(path, v):
        lora = jax.tree_util.keystr(path).endswith(("['lora_a']", "['lora_b']"))
        return scale * rng.standard_normal(v.shape) if lora else np.asarray(v, np.float64)

    teacher = jax.tree_util.tree_map_with_path(draw, init)
    return jnp.asarray(numpy_forward(teacher, np.asarray(x, np.float64)), jnp.float32)


def _train_nnx(model, tx, x, y, wrt):
    optimizer = nnx.Optimizer(model, tx, wrt=wrt)

    @nnx.jit
    def step(model, optimizer):
        def loss_fn(m):
            return jnp.mean((m(x) - y) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt))(model)
        optimizer.update(model, grads)
        return loss

    losses, states = [], []
    for _ in range(STEPS):
        losses.append(float(step(model, optimizer)))
        states.append(nnx.to_pure_dict(nnx.state(model)))
    return losses, states, optimizer


def _overlay(base, top):
    """``base`` with the leaves of the (sub)tree ``top`` put in place."""
    if not isinstance(top, dict):
        return top
    return {k: _overlay(v, top[k]) if k in top else v for k, v in base.items()}


def _lora_only(tree):
    """The adapter factors of a pure nnx dict, as a nested dict."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            sub = _lora_only(v)
            if sub:
                out[k] = sub
        elif k in ("lora_a", "lora_b"):
            out[k] = v
    return out


def _train_dict(params, frozen, forward, tx, x, y):
    """Plain optax loop over a nested dict; the rest of ``frozen`` is held fixed."""

    # `frozen` is an argument, not a closure: XLA would constant-fold closed-over
    # arrays and round differently from the nnx program.
    @jax.jit
    def step(p, s, frozen):
        def loss_fn(q):
            return jnp.mean((forward(_overlay(frozen, q), x) - y) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return loss, optax.apply_updates(p, u), s

    state, out = tx.init(params), []
    for _ in range(STEPS):
        loss, params, state = step(params, state, frozen)
        out.append((float(loss), _overlay(frozen, params)))
    return out


def _assert_same_trajectory(nnx_states, nnx_losses, ref):
    for t, (state, loss, (ref_loss, ref_params)) in enumerate(
        zip(nnx_states, nnx_losses, ref, strict=False)
    ):
        assert loss == pytest.approx(ref_loss, rel=RTOL), t
        got, want = jax.tree.leaves(state), jax.tree.leaves(ref_params)
        assert_trees_rel_close(got, want, rtol=RTOL)


@pytest.mark.parametrize("wrt", ["lora", "param"])
def test_two_adapter_styles_train_and_match_pytree_path(wrt):
    model = numpy_init(lambda: TwoAdapters(nnx.Rngs(0)))
    init = nnx.to_pure_dict(nnx.state(model))
    x, rng = _data(8)
    y = _teacher_targets(init, lambda p, x: two_adapters_forward(p, x, np.tanh), x, rng)
    filt = nnx.LoRAParam if wrt == "lora" else nnx.Param  # Param also selects LoRAParam
    tx = lmj.lora_muon(0.05, beta=0.9, weight_decay=0.01, adam_learning_rate=1e-3)
    # The LoRA-only run also carries diagnostics (they leave the updates alone).
    nnx_tx = with_lora_diagnostics(tx) if wrt == "lora" else tx

    losses, states, optimizer = _train_nnx(model, nnx_tx, x, y, filt)
    # Loss falls by a stated margin: below 30% of the start in 12 steps (measured 17%).
    assert losses[-1] < 0.3 * losses[0], losses
    if wrt == "lora":
        diag = optax.tree.get(nnx.as_pure(optimizer.opt_state), "lora_diagnostics")
        assert sorted(diag) == ["l1/lora", "l2"]  # keyed by the module holding the pair
        for d in diag.values():
            # LoRA-Muon splits η = 0.05 evenly; the split weight decay (λη = 5e-4)
            # shifts each term a little.
            np.testing.assert_allclose([d.step_a, d.step_b], 0.025, rtol=0.02)
            assert float(d.product_step) <= 0.05 * 1.02
            # b is no longer zero (that reads ~88), but the zero-init drift shows:
            # σ_a/σ_b ≈ e^3.5 here (measured 3.4 and 3.8).
            assert 1.0 < float(d.log_norm_ratio) < 20.0

    trainable = _lora_only(init) if wrt == "lora" else init
    ref = _train_dict(trainable, init, two_adapters_forward, tx, x, y)
    _assert_same_trajectory(states, losses, ref)
    if wrt == "param":  # base weights moved (AdamW), not just the adapters
        assert not np.allclose(states[-1]["l1"]["kernel"], init["l1"]["kernel"])
    else:
        np.testing.assert_array_equal(states[-1]["l1"]["kernel"], init["l1"]["kernel"])


class Stack(nnx.Module):
    """``L`` LoRALinear layers made with ``split_rngs`` + ``vmap``, run with ``scan``."""

    def __init__(self, layers: int, width: int, rank: int, rngs: nnx.Rngs):
        @nnx.split_rngs(splits=layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(rngs):
            return nnx.LoRALinear(width, width, lora_rank=rank, rngs=rngs)

        self.layers = make(rngs)

    def __call__(self, x):
        @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
        def body(layer, h):
            return h + jnp.tanh(layer(h))

        return body(self.layers, x)


def stack_numpy(p, x):
    lay = p["layers"]
    for i in range(lay["kernel"].shape[0]):
        a, b = lay["lora"]["lora_a"][i], lay["lora"]["lora_b"][i]
        x = x + np.tanh(x @ lay["kernel"][i] + lay["bias"][i] + x @ a @ b)
    return x


def stack_forward(p, x):
    lay = p["layers"]

    def body(h, w):
        k, bias, a, b = w
        return h + jnp.tanh(h @ k + bias + h @ a @ b), None

    h, _ = jax.lax.scan(
        body, x, (lay["kernel"], lay["bias"], lay["lora"]["lora_a"], lay["lora"]["lora_b"])
    )
    return h


def test_scanned_stack_trains_and_matches_pytree_path():
    model = numpy_init(lambda: Stack(3, 8, 2, nnx.Rngs(0)))
    assert model.layers.lora.lora_a.shape == (3, 8, 2)
    assert model.layers.lora.lora_b.shape == (3, 2, 8)
    init = nnx.to_pure_dict(nnx.state(model))
    x, rng = _data(8, seed=2)
    y = _teacher_targets(init, stack_numpy, x, rng, scale=0.4)
    tx = lmj.lora_muon(0.05, beta=0.9)

    losses, states, optimizer = _train_nnx(model, tx, x, y, nnx.LoRAParam)
    # Below 50% of the start in 12 steps (measured 27%).
    assert losses[-1] < 0.5 * losses[0], losses
    # Each layer of the stack is its own pair: (L, m, r) momenta, one per layer.
    (muon_state,) = [
        s
        for s in jax.tree.leaves(
            nnx.as_pure(optimizer.opt_state), is_leaf=lambda s: isinstance(s, lmj.LoRAMuonState)
        )
        if isinstance(s, lmj.LoRAMuonState)
    ]
    mu = muon_state.mu
    assert mu["layers"]["lora"]["lora_a"].shape == (3, 8, 2)

    ref = _train_dict(_lora_only(init), init, stack_forward, tx, x, y)
    _assert_same_trajectory(states, losses, ref)


# -------------------------------------------------------------------- bad models


class NoLoRA(nnx.Module):
    def __init__(self, rngs):
        self.l = nnx.Linear(4, 3, rngs=rngs)

    def __call__(self, x):
        return self.l(x)


def test_model_without_lora_param_is_a_documented_no_op_and_check_raises():
    model = numpy_init(lambda: NoLoRA(nnx.Rngs(0)))
    before = nnx.to_pure_dict(nnx.state(model))
    # Like every optax transformation on an empty tree: no error, nothing moves.
    optimizer = nnx.Optimizer(model, lmj.lora_muon(0.1), wrt=nnx.LoRAParam)
    grads = nnx.grad(
        lambda m: jnp.sum(m(jnp.ones((2, 4)))), argnums=nnx.DiffState(0, nnx.LoRAParam)
    )(model)
    optimizer.update(model, grads)
    jax.tree.map(np.testing.assert_array_equal, nnx.to_pure_dict(nnx.state(model)), before)
    # The pre-flight check makes it an error.
    with pytest.raises(ValueError, match=r"no variable of the model matches wrt=.*LoRAParam"):
        lmx.check_lora_model(model)


class OddLoRA(nnx.Module):
    """LoRAParams Flax-style users might write by hand."""

    def __init__(self, a_shape, b_shape, extra=False):
        self.lora_a = nnx.LoRAParam(jnp.ones(a_shape))
        self.lora_b = nnx.LoRAParam(jnp.ones(b_shape))
        if extra:
            self.lora_scale = nnx.LoRAParam(jnp.ones(()))


def test_check_lora_model_returns_pairs_and_flags_lonely_lora_params():
    # Shapes are all the check reads: an abstract model will do.
    model = nnx.eval_shape(lambda: TwoAdapters(nnx.Rngs(0)))
    pairs = lmx.check_lora_model(model)
    assert [(p.a_path, p.m, p.n, p.rank) for p in pairs] == [
        ("['l1']['lora']['lora_a']", 8, 16, 2),
        ("['l2']['lora_a']", 16, 4, 3),
    ]
    with pytest.raises(ValueError, match=r"AdamW: \['lora_scale'\]"):
        lmx.check_lora_model(OddLoRA((5, 2), (2, 3), extra=True))
    # wrt=nnx.Param also selects base weights: they are expected to be unpaired.
    assert len(lmx.check_lora_model(model, wrt=nnx.Param)) == 2


@pytest.mark.parametrize(
    "a_shape, b_shape, match",
    [
        # a stored (r, in) as PEFT does, b (r, out): ranks disagree.
        ((2, 5), (2, 3), r"rank mismatch.*\['lora_a'\].*\(2, 5\).*\['lora_b'\]"),
        # a vector where a matrix is expected.
        ((5,), (2, 3), r"\['lora_a'\] must be an array with ndim >= 2"),
        # stacked factors with different layer counts.
        ((3, 5, 2), (4, 2, 3), r"batch axes mismatch.*\['lora_a'\]"),
    ],
)
def test_unexpected_factor_shapes_fail_at_optimizer_construction(a_shape, b_shape, match):
    model = OddLoRA(a_shape, b_shape)
    with pytest.raises(ValueError, match=match):
        nnx.Optimizer(model, lmj.lora_muon(0.1), wrt=nnx.LoRAParam)
    with pytest.raises(ValueError, match=match):
        lmx.check_lora_model(model)
