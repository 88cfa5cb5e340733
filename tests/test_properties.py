"""Property-based tests over shapes, ranks, scales and gauges (hypothesis)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import lora_muon_jax as lmj
from lora_muon_jax import testing
from tests.helpers import ROUTES, rel_err, well_conditioned

# Few distinct sizes, so that examples reuse compiled kernels; they still cover
# r > m, r > n (rank-deficient pairs), r = 1 and batch axes.
shapes = st.tuples(
    st.sampled_from([(), (2,)]),  # batch
    st.sampled_from([1, 3, 8, 12]),  # m
    st.sampled_from([2, 7, 12]),  # n
    st.sampled_from([1, 2, 5]),  # r
)


def _pair(seed, batch, m, n, r, scale, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((*batch, m, r)) * scale
    b = rng.standard_normal((*batch, r, n)) / scale
    g = rng.standard_normal((*batch, m, n))
    params = {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}
    grads = {
        "lora_a": jnp.asarray(g @ np.swapaxes(b, -1, -2), dtype),
        "lora_b": jnp.asarray(np.swapaxes(a, -1, -2) @ g, dtype),
    }
    return params, grads


@settings(max_examples=12)
@given(shape=shapes, log_scale=st.floats(-3, 3), seed=st.integers(0, 2**16))
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_budget_and_finiteness_any_shape_and_scale(route, shape, log_scale, seed):
    batch, m, n, r = shape
    params, grads = _pair(seed, batch, m, n, r, 10.0**log_scale)
    eta = 0.1
    # Rank-deficient pairs (r > m or r > n) included: each term still has exactly
    # half the budget (pseudo-inverse on the factors' column and row spaces). The
    # float32 Gram route errs by about eps·cond² of the factors (random 2×2 factors
    # reach cond ~100): the tolerance follows that error model.
    cond = max(_condition(np.asarray(params[k], np.float64)) for k in params)
    base = 2e-3 if route == "paper" else 2e-4
    testing.assert_product_step_within_budget(
        lmj.lora_muon(eta, beta=0.0, **ROUTES[route]),
        params,
        grads,
        eta,
        rtol=base + 10 * np.finfo(np.float32).eps * cond**2,
        each_term=True,
    )


def _condition(x: np.ndarray) -> float:
    """Largest ratio of the extreme non-zero singular values over a stack."""
    s = np.linalg.svd(x, compute_uv=False)
    s = np.where(s > 1e-10 * s.max(axis=-1, keepdims=True), s, np.nan)
    return float(np.nanmax(np.nanmax(s, axis=-1) / np.nanmin(s, axis=-1)))


# One jitted update shared by every example: shapes repeat, so they reuse its compiles.
_GAUGE_TX = lmj.lora_muon(0.1, beta=0.0)
_GAUGE_UPDATE = jax.jit(_GAUGE_TX.update)


@settings(max_examples=12)
@given(
    shape=st.tuples(st.sampled_from([4, 9]), st.sampled_from([5, 12]), st.sampled_from([1, 3])),
    log_c=st.floats(-1.5, 1.5),
    seed=st.integers(0, 2**16),
)
def test_single_step_gauge_invariance_under_random_gl_r(shape, log_c, seed):
    m, n, r = shape
    rng = np.random.default_rng(seed)
    a = well_conditioned(rng, (m, r), 3.0)
    b = well_conditioned(rng, (r, n), 3.0)
    s = well_conditioned(rng, (r, r), 4.0) * 10.0**log_c
    g = rng.standard_normal((m, n))

    def step(a, b):
        p = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
        gr = {
            "lora_a": jnp.asarray(g @ b.T, jnp.float32),
            "lora_b": jnp.asarray(a.T @ g, jnp.float32),
        }
        u, _ = _GAUGE_UPDATE(gr, _GAUGE_TX.init(p), p)
        ua, ub = (np.asarray(u[k], np.float64) for k in ("lora_a", "lora_b"))
        return ua @ b + a @ ub

    assert rel_err(step(a @ s, np.linalg.inv(s) @ b), step(a, b)) < 1e-4


@settings(max_examples=10)
@given(shape=shapes, seed=st.integers(0, 2**16), dtype=st.sampled_from(["float32", "bfloat16"]))
def test_zero_init_any_shape(shape, seed, dtype):
    batch, m, n, r = shape
    params, _ = _pair(seed, batch, m, n, r, 1.0, jnp.dtype(dtype))
    target = jnp.asarray(np.random.default_rng(seed).standard_normal((*batch, m, n)), jnp.float32)

    def loss(p):
        a, b = (p[k].astype(jnp.float32) for k in ("lora_a", "lora_b"))
        return jnp.sum((a @ b - target) ** 2)

    testing.assert_finite_at_zero_init(lmj.lora_muon(0.1), params, loss)
