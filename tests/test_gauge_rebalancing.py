"""Gauge rebalancing changes factor scales, never the product or the product step."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_muon_jax as lmj
from tests.helpers import product, rel_err, spectral_norm, well_conditioned


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_rebalance_pair_keeps_product(alpha):
    rng = np.random.default_rng(0)
    a = jnp.asarray(well_conditioned(rng, (3, 10, 4)) * 50.0, jnp.float32)
    b = jnp.asarray(well_conditioned(rng, (3, 4, 7)) * 0.02, jnp.float32)
    a2, b2 = lmj.rebalance_pair(a, b, alpha)
    assert rel_err(product(a2, b2), product(a, b)) < 1e-6
    for i in range(3):
        ratio_before = spectral_norm(a[i]) / spectral_norm(b[i])
        ratio_after = spectral_norm(a2[i]) / spectral_norm(b2[i])
        assert ratio_after == pytest.approx(ratio_before ** (1 - alpha), rel=1e-4)


def test_rebalance_pair_zero_factor_is_identity():
    a, b = jnp.ones((5, 2)), jnp.zeros((2, 3))
    a2, b2 = lmj.rebalance_pair(a, b)
    np.testing.assert_array_equal(a2, a)
    np.testing.assert_array_equal(b2, b)


def _run(tx, params, loss, steps):
    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    state, out = tx.init(params), []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out


def test_rebalancing_leaves_product_trajectory_and_balances_factors():
    rng = np.random.default_rng(1)
    a = well_conditioned(rng, (24, 3)) * 27.0
    b = well_conditioned(rng, (3, 20)) / 27.0
    target = jnp.asarray(rng.standard_normal((24, 20)) * 0.1, jnp.float32)
    params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}

    def loss(p):
        return jnp.sum((p["lora_a"] @ p["lora_b"] - target) ** 2)

    plain = _run(lmj.lora_muon(0.05, beta=0.9, weight_decay=0.1), params, loss, 6)
    balanced = _run(
        lmj.lora_muon(0.05, beta=0.9, weight_decay=0.1, rebalance=lmj.GaugeRebalance(every=2)),
        params,
        loss,
        6,
    )
    for p0, p1 in zip(plain, balanced, strict=False):
        assert (
            rel_err(product(p1["lora_a"], p1["lora_b"]), product(p0["lora_a"], p0["lora_b"])) < 1e-5
        )
    # Rebalanced on steps 0, 2, 4: right after step 5 (index 4) the factors are equal.
    p = balanced[4]
    assert spectral_norm(p["lora_a"]) == pytest.approx(spectral_norm(p["lora_b"]), rel=1e-3)
    p = plain[4]
    assert spectral_norm(p["lora_a"]) > 100 * spectral_norm(p["lora_b"])


def test_rebalancing_rescales_momentum_consistently():
    # After one rebalancing step the *next* product step equals the unbalanced one.
    rng = np.random.default_rng(2)
    params = {
        "lora_a": jnp.asarray(well_conditioned(rng, (16, 2)) * 9.0, jnp.float32),
        "lora_b": jnp.asarray(well_conditioned(rng, (2, 12)) / 9.0, jnp.float32),
    }
    grads = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    inner = optax.chain(lmj.scale_by_lora_muon(beta=0.9), optax.scale(-0.01))
    wrapped = lmj.with_gauge_rebalancing(inner, lmj.GaugeRebalance(every=2))
    s_plain, s_wrap = inner.init(params), wrapped.init(params)
    u_plain, s_plain = inner.update(grads, s_plain, params)
    u_wrap, s_wrap = wrapped.update(grads, s_wrap, params)
    p_plain = optax.apply_updates(params, u_plain)
    p_wrap = optax.apply_updates(params, u_wrap)
    assert (
        rel_err(
            product(p_wrap["lora_a"], p_wrap["lora_b"]),
            product(p_plain["lora_a"], p_plain["lora_b"]),
        )
        < 1e-6
    )
    # Next step with gradients that transform covariantly under the gauge.
    c = float(jnp.linalg.norm(p_wrap["lora_a"]) / jnp.linalg.norm(p_plain["lora_a"]))
    g2 = {k: jnp.asarray(rng.standard_normal(v.shape), jnp.float32) for k, v in params.items()}
    g2_wrap = {"lora_a": g2["lora_a"] / c, "lora_b": g2["lora_b"] * c}
    u2_plain, _ = inner.update(g2, s_plain, p_plain)
    u2_wrap, _ = wrapped.update(g2_wrap, s_wrap, p_wrap)  # step 1: no rebalancing
    step_plain = np.asarray(u2_plain["lora_a"]) @ np.asarray(p_plain["lora_b"]) + np.asarray(
        p_plain["lora_a"]
    ) @ np.asarray(u2_plain["lora_b"])
    step_wrap = np.asarray(u2_wrap["lora_a"]) @ np.asarray(p_wrap["lora_b"]) + np.asarray(
        p_wrap["lora_a"]
    ) @ np.asarray(u2_wrap["lora_b"])
    assert rel_err(step_wrap, step_plain) < 1e-4


def test_rebalancing_with_zero_init_b_is_finite():
    params = {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.zeros((2, 4))}

    def loss(p):
        return jnp.sum((p["lora_a"] @ p["lora_b"] - 1.0) ** 2)

    traj = _run(lmj.lora_muon(0.1, rebalance=lmj.GaugeRebalance(every=1)), params, loss, 3)
    for p in traj:
        assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(p))
