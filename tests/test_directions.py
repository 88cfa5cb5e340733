"""Unit tests of :mod:`lora_muon_jax._directions` against float64 NumPy.

Golden values: ``thin_product`` against ``np.einsum`` in float64 of the same
float32 inputs; ``gram_directions`` against :func:`tests.reference.directions`
(float64 SVD ``msign`` and eigh inverse square roots, written from the equations);
the thresholds against their closed forms from ``np.finfo``.

Error model: a float32 product over the rank axis errs by at most
``(r + 2)·eps_f32 · (|x||T|)`` entrywise (the bound is order-independent, so it holds
on any CPU and for both the elementwise and the dot path). ``gram_directions`` of
well-conditioned factors (``cond = 2``) is exact to float32 rounding times small
condition numbers: ``1e-5`` (as ``tests.helpers.ROUTE_TOL``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_muon_jax import _directions
from lora_muon_jax._directions import (
    Factor,
    dtype_rtol,
    gram_rtol,
    per_batch,
    polar_rtol,
    thin_product,
)
from lora_muon_jax._grams import canonical_layout
from lora_muon_jax._pair_types import FactorLayout
from tests import reference
from tests.helpers import rel_err, well_conditioned

EPS32 = float(np.finfo(np.float32).eps)


def _sym(rng, batch, r):
    t = rng.standard_normal((*batch, r, r))
    return (0.5 * (t + np.swapaxes(t, -1, -2))).astype(np.float32)


# (name, x shape, layout, T batch shape, einsum of x T over the rank axis)
CASES = [
    ("tall r=4 (elementwise on CPU)", (3, 20, 4), canonical_layout(3, True), (3,), "bmi,bij->bmj"),
    ("tall r=32 (elementwise on CPU)", (2, 8, 32), canonical_layout(3, True), (2,), "bmi,bij->bmj"),
    ("tall r=64 (dot)", (2, 8, 64), canonical_layout(3, True), (2,), "bmi,bij->bmj"),
    ("tall 2-D (m, r)", (16, 4), canonical_layout(2, True), (), "mi,ij->mj"),
    ("wide (r, n)", (4, 16), canonical_layout(2, False), (), "in,ji->jn"),
    (
        "stacked wide (*batch, r, n)",
        (2, 3, 5, 12),
        canonical_layout(4, False),
        (2, 3),
        "abin,abji->abjn",
    ),
    (
        "batch in the middle (emb, layers, r)",
        (12, 3, 4),
        FactorLayout(2, (1,), (0,)),
        (3,),
        "eli,lij->elj",
    ),
    (
        "batch axes (2, 0) of (L, r, H, n)",
        (2, 4, 3, 6),
        FactorLayout(1, (2, 0), (3,)),
        (3, 2),
        "lihn,hlji->ljhn",
    ),
]


@pytest.mark.parametrize(
    ("name", "shape", "layout", "tbatch", "spec"), CASES, ids=[c[0] for c in CASES]
)
def test_thin_product_matches_float64_einsum(name, shape, layout, tbatch, spec):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype(np.float32)
    r = shape[layout.rank_axis]
    t = _sym(rng, tbatch, r)
    got = np.asarray(jax.jit(lambda x, t: thin_product(x, t, layout))(x, t))
    x64, t64 = x.astype(np.float64), t.astype(np.float64)
    want = np.einsum(spec, x64, t64)
    bound = np.einsum(spec, np.abs(x64), np.abs(t64))
    assert got.shape == x.shape and got.dtype == np.float32
    np.testing.assert_array_less(np.abs(got - want), (r + 2) * EPS32 * bound + 1e-30)


def test_thin_product_bfloat16_factor_in_float32():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((10, 4)), jnp.bfloat16)
    t = _sym(rng, (), 4)
    got = np.asarray(thin_product(x, jnp.asarray(t), canonical_layout(2, True)))
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    assert got.dtype == np.float32
    np.testing.assert_array_less(np.abs(got - x64 @ t), 6 * EPS32 * (np.abs(x64) @ np.abs(t)))


def test_threshold_values_per_dtype():
    """``max(eps, 100 eps_gram, (2 eps_dtype)²)`` and ``max(eps, 100 eps_gram)``."""
    f32 = 100 * float(np.finfo(np.float32).eps)  # 1.19e-5
    bf16 = (2 * float(jnp.finfo(jnp.bfloat16).eps)) ** 2  # (2·2⁻⁷)² = 2.44e-4
    assert f32 == pytest.approx(1.1920929e-5) and bf16 == pytest.approx(2.44140625e-4)
    assert float(dtype_rtol(jnp.float32, 0.0)) == pytest.approx(f32, rel=1e-6)
    assert float(dtype_rtol(jnp.float16, 0.0)) == pytest.approx(f32, rel=1e-6)  # (2·2⁻¹⁰)² < f32
    assert float(dtype_rtol(jnp.bfloat16, 0.0)) == pytest.approx(bf16, rel=1e-6)
    assert float(dtype_rtol(jnp.float32, 1e-3)) == pytest.approx(1e-3, rel=1e-6)  # eps wins
    for dtype in (jnp.float32, jnp.bfloat16, jnp.float16):
        assert gram_rtol(dtype) == pytest.approx(f32, rel=1e-12)
        assert float(polar_rtol(0.0, dtype)) == pytest.approx(f32, rel=1e-6)
        assert float(polar_rtol(1e-2, dtype)) == pytest.approx(1e-2, rel=1e-6)
    eps64 = float(np.finfo(np.float64).eps)
    assert gram_rtol(jnp.float64) == pytest.approx(100 * eps64, rel=1e-12)
    with jax.enable_x64(True):
        assert dtype_rtol(jnp.float64, 1e-9).dtype == jnp.float64
        assert float(dtype_rtol(jnp.float64, 1e-9)) == 1e-9  # float64: eps itself
        assert float(polar_rtol(1e-9, jnp.float64)) == 1e-9
        assert float(dtype_rtol(jnp.float64, 0.0)) == pytest.approx(100 * eps64, rel=1e-12)


def _factors(dtype, eps):
    la, lb = canonical_layout(2, True), canonical_layout(2, False)
    rtol, polar = dtype_rtol(dtype, eps), polar_rtol(eps, dtype)
    big = float(jnp.finfo(dtype).max)
    return [
        Factor(0, la, 1, lb, True, rtol, polar, big),
        Factor(1, lb, 0, la, False, rtol, polar, big),
    ]


@pytest.mark.parametrize("solver", ["eigh", "cholesky", "newton_schulz", "auto"])
def test_gram_directions_match_reference(solver):
    """One pair: ``scale·(msign(m_a R_b) R_b, R_a msign(R_a m_b))`` to 1e-5."""
    rng = np.random.default_rng(2)
    a = well_conditioned(rng, (24, 4)).astype(np.float32)
    b = well_conditioned(rng, (4, 16)).astype(np.float32)
    ma = well_conditioned(rng, (24, 4)).astype(np.float32)
    mb = well_conditioned(rng, (4, 16)).astype(np.float32)
    scale = 0.5
    factors = _factors(jnp.float32, 1e-6)
    fn = jax.jit(lambda p, s, c: _directions.gram_directions(factors, p, s, c, solver))
    da, db = fn([a, b], [ma, mb], jnp.float32(scale))
    want_a, want_b = reference.directions(a, b, ma, mb)
    assert rel_err(da, scale * want_a) < 1e-5
    assert rel_err(db, scale * want_b) < 1e-5
    # the defining property: ‖D_a b‖₂ = ‖a D_b‖₂ = 1 (per unit scale)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert np.linalg.norm(np.asarray(da, np.float64) @ b64 / scale, 2) == pytest.approx(1, rel=1e-5)
    assert np.linalg.norm(a64 @ np.asarray(db, np.float64) / scale, 2) == pytest.approx(1, rel=1e-5)


def test_gram_directions_zero_momentum_gives_zero():
    rng = np.random.default_rng(3)
    a = well_conditioned(rng, (12, 3)).astype(np.float32)
    b = well_conditioned(rng, (3, 10)).astype(np.float32)
    out = _directions.gram_directions(
        _factors(jnp.float32, 1e-6),
        [a, b],
        [np.zeros_like(a), np.zeros_like(b)],
        jnp.float32(1.0),
        "auto",
    )
    for d in out:
        np.testing.assert_array_equal(np.asarray(d), 0.0)


def test_per_batch_broadcasting():
    """A ``(*batch)`` value in layout order lands on the stored batch axes."""
    rng = np.random.default_rng(4)
    layout = FactorLayout(1, (2, 0), (3,))  # leaf (L=2, r, H=3, n)
    v = rng.standard_normal((3, 2))  # (H, L): batch-axes order
    got = np.asarray(per_batch(jnp.asarray(v), layout, 4))
    assert got.shape == (2, 1, 3, 1)
    for l_ in range(2):
        for h in range(3):
            assert got[l_, 0, h, 0] == np.float32(v[h, l_])
    mid = np.asarray(per_batch(jnp.arange(3.0), FactorLayout(2, (1,), (0,)), 3))
    assert mid.shape == (1, 3, 1)
    np.testing.assert_array_equal(mid.ravel(), [0.0, 1.0, 2.0])
    assert per_batch(jnp.asarray(2.0), canonical_layout(2, True), 2).shape == (1, 1)
