"""LoRA diagnostics: r×r Gram metrics against float64 NumPy products, and the wrapper."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_muon_jax as lmj
from lora_muon_jax._diagnostics import (
    LoRADiagnosticsState,
    LoRAPairDiagnostics,
    lora_pair_diagnostics,
    with_lora_diagnostics,
)
from tests import contract

_pair_jit = jax.jit(lora_pair_diagnostics)


def reference(a, b, da, db, c=1.0):
    """The metrics from explicit m×n products (float64)."""
    a, b, da, db = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (a, b, da, db))

    def norm(x):
        return np.linalg.norm(x, 2, axis=(-2, -1))

    with np.errstate(divide="ignore"):  # log 0 for a zero factor; unused then
        return {
            "sigma_a": norm(a),
            "sigma_b": norm(b),
            "log_norm_ratio": np.log(norm(a)) - np.log(norm(b)),
            "step_a": c * norm(da @ b),
            "step_b": c * norm(a @ db),
            "product_step": c * norm(da @ b + a @ db),
        }


def _assert_metrics(got: LoRAPairDiagnostics, want: dict, rtol: float):
    for name, value in want.items():
        np.testing.assert_allclose(
            np.asarray(getattr(got, name)), value, rtol=rtol, atol=0, err_msg=name
        )


def test_pair_metrics_match_float64_products_across_scales():
    rng = np.random.default_rng(0)
    shape_a, shape_b = (3, 20, 4), (3, 4, 12)
    # (factor gauge, update scale): balanced, far off balance, huge and tiny factors.
    for gauge, upd in ((1.0, 1e-2), (30.0, 1e-3), (1e15, 1e-2), (1e-20, 1.0)):
        a = rng.standard_normal(shape_a) * gauge
        b = rng.standard_normal(shape_b)
        da = rng.standard_normal(shape_a) * upd * gauge
        db = rng.standard_normal(shape_b) * upd / gauge
        args = [jnp.asarray(x, jnp.float32) for x in (a, b, da, db)]
        got = _pair_jit(*args, 2.0)
        # float32 Grams: measured worst 3.3e-6 relative over these cases.
        _assert_metrics(got, reference(*args, c=2.0), rtol=2e-5)


def test_pair_metrics_unbatched_and_cancellation_bound():
    rng = np.random.default_rng(1)
    a, b = rng.standard_normal((16, 3)), rng.standard_normal((3, 10))
    s = rng.standard_normal((3, 3)) * 1e-2
    # Δa b ≈ -a Δb: the product step is 1e-4 of each term.
    da, db = a @ s, -s @ b + 1e-6 * rng.standard_normal((3, 10))
    args = [jnp.asarray(x, jnp.float32) for x in (a, b, da, db)]
    got, want = _pair_jit(*args, 1.0), reference(*args)
    _assert_metrics(got._replace(product_step=want["product_step"]), want, rtol=2e-5)
    # Documented bound: absolute error at most ~sqrt(eps32) of step_a + step_b.
    err = abs(float(got.product_step) - want["product_step"])
    assert err <= 1e-3 * (want["step_a"] + want["step_b"]), err


def test_pair_metrics_zero_factors_are_finite_and_exact():
    a, b = jnp.ones((5, 2)), jnp.zeros((2, 3))
    got = _pair_jit(a, b, jnp.zeros((5, 2)), jnp.ones((2, 3)), 1.0)
    assert float(got.sigma_a) == pytest.approx(np.sqrt(10.0), rel=1e-6)
    assert float(got.sigma_b) == 0.0
    # A zero factor counts as float32's smallest normal: large and finite.
    tiny = np.log(np.finfo(np.float32).tiny)
    assert float(got.log_norm_ratio) == pytest.approx(np.log(np.sqrt(10.0)) - tiny, rel=1e-6)
    assert float(got.step_a) == 0.0
    want = np.linalg.norm(np.ones((5, 2)) @ np.ones((2, 3)), 2)
    assert float(got.step_b) == pytest.approx(want, rel=1e-6)
    assert float(got.product_step) == pytest.approx(want, rel=1e-6)
    zero = _pair_jit(jnp.zeros((5, 2)), b, jnp.zeros((5, 2)), b, 1.0)
    for name in LoRAPairDiagnostics._fields:
        assert float(getattr(zero, name)) == 0.0, name
    with pytest.raises(ValueError, match=r"got a \(5, 2\), b \(3, 3\)"):
        lora_pair_diagnostics(a, jnp.zeros((3, 3)), a, jnp.zeros((3, 3)))


def test_wrapper_keeps_updates_reports_its_step_and_holds_between_every_k():
    params, loss = contract.lora_problem()  # stacked pair (2, 12, 3)/(2, 3, 10), a bias
    plain = lmj.lora_muon(0.1, beta=0.9)
    tx = with_lora_diagnostics(lmj.lora_muon(0.1, beta=0.9))
    every2 = with_lora_diagnostics(lmj.lora_muon(0.1, beta=0.9), every=2)

    # One program for the three optimizers (compiling is the expensive part).
    def step(p, states):
        g = jax.grad(loss)(p)
        out = [
            opt.update(g, s, p, an_extra_arg_nobody_expects=1)
            for opt, s in zip((plain, tx, every2), states, strict=False)
        ]
        return [u for u, _ in out], [s for _, s in out]

    step = jax.jit(chex.assert_max_traces(step, n=1))  # a retrace would fail
    states = [opt.init(params) for opt in (plain, tx, every2)]
    assert isinstance(states[1], LoRADiagnosticsState)
    types = jax.tree.map(jax.typeof, states)
    held = []
    for t in range(4):
        (u_plain, updates, u_every2), states = step(params, states)
        # The same types after an update as at init (what lax.cond and scan need).
        assert jax.tree.map(jax.typeof, states) == types
        # The wrapped optimizer's updates, bit for bit.
        jax.tree.map(np.testing.assert_array_equal, updates, u_plain)
        jax.tree.map(np.testing.assert_array_equal, u_every2, u_plain)
        diag = optax.tree.get(states[1], "lora_diagnostics")
        assert set(diag) == {"layer"}
        layer = params["layer"]
        want = reference(
            layer["lora_a"], layer["lora_b"], updates["layer"]["lora_a"], updates["layer"]["lora_b"]
        )
        _assert_metrics(diag["layer"], want, rtol=2e-5)
        # LoRA-Muon: each term η/2, the product step at most η (no weight decay).
        np.testing.assert_allclose(diag["layer"].step_a, 0.05, rtol=1e-4)
        np.testing.assert_allclose(diag["layer"].step_b, 0.05, rtol=1e-4)
        assert np.all(np.asarray(diag["layer"].product_step) <= 0.1 * (1 + 1e-4))
        # every=2: computed on steps 0 and 2, held (not recomputed) on 1 and 3.
        held.append(np.asarray(states[2].lora_diagnostics["layer"].sigma_a))
        if t % 2 == 0:
            np.testing.assert_array_equal(held[-1], diag["layer"].sigma_a)
        else:
            np.testing.assert_array_equal(held[-1], held[-2])
        params = optax.apply_updates(params, updates)
    chex.clear_trace_counter()
    assert not np.array_equal(held[1], held[2])
    assert int(states[1].count) == 4


def test_wrapper_pair_names_and_errors():
    z = jnp.zeros
    tree = {
        "lora_a": z((4, 2)),
        "lora_b": z((2, 3)),  # root pair: named by a's path
        "attn": {
            "q_lora_a": z((4, 1)),
            "q_lora_b": z((1, 4)),  # qwix siblings
            "k_lora_a": z((4, 1)),
            "k_lora_b": z((1, 4)),
        },
        "mlp": {"lora": {"lora_a": z((4, 2)), "lora_b": z((2, 5))}, "kernel": z((4, 5))},
    }
    state = with_lora_diagnostics(optax.sgd(0.1)).init(tree)
    assert sorted(state.lora_diagnostics) == [
        "attn/k_lora_a",
        "attn/q_lora_a",
        "lora_a",
        "mlp/lora",
    ]
    with pytest.raises(ValueError, match="needs the current parameters"):
        with_lora_diagnostics(optax.sgd(0.1)).update(tree, state)
    with pytest.raises(ValueError, match="`every` must be an int >= 1; got 0"):
        with_lora_diagnostics(optax.sgd(0.1), every=0)
    with pytest.raises(ValueError, match=r"Unpaired LoRA factor.*\['x'\]\['lora_a'\]"):
        with_lora_diagnostics(optax.sgd(0.1)).init({"x": {"lora_a": z((4, 2))}})


def test_wrapper_under_explicit_sharding_moves_only_small_grams():
    # 8 host devices (tests/conftest.py); a sharded along m, b along n.
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from tests.test_sharding import _collectives

    layers, m, n, r = 2, 64, 48, 4
    rng = np.random.default_rng(0)
    raw = {
        "lora_a": rng.standard_normal((layers, m, r)),
        "lora_b": rng.standard_normal((layers, r, n)),
    }
    raw_grads = {k: rng.standard_normal(v.shape) for k, v in raw.items()}
    tx = with_lora_diagnostics(lmj.lora_muon(0.1, beta=0.9))
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    specs = {"lora_a": P(None, "x", None), "lora_b": P(None, None, "x")}

    def put(tree):
        return {
            k: jax.device_put(jnp.asarray(v, jnp.float32), NamedSharding(mesh, specs[k]))
            for k, v in tree.items()
        }

    with jax.set_mesh(mesh):
        params, grads = put(raw), put(raw_grads)
        state = tx.init(params)
        step = jax.jit(tx.update)
        updates, new_state = step(grads, state, params)
        hlo = step.lower(grads, state, params).compile().as_text()
        assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)
    # No factor crosses devices: the largest collective is a stack of 2r×2r Grams.
    largest = max((s for _, sizes in _collectives(hlo) for s in sizes), default=0)
    assert largest <= layers * (2 * r) ** 2, largest
    u = jax.device_get(updates)
    want = reference(raw["lora_a"], raw["lora_b"], u["lora_a"], u["lora_b"])
    _assert_metrics(jax.device_get(new_state.lora_diagnostics["lora_a"]), want, rtol=2e-5)
