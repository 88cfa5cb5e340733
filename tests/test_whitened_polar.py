"""Unit tests of :mod:`lora_muon_jax._whitened_polar` against a float64 eigh reference.

Golden values: ``T = R (R K R)^{+1/2} R`` with ``R = S^{+1/2}`` computed by NumPy in
float64 from the *same* float32 Grams the library receives, with
:func:`tests.reference.inv_sqrt_psd` (``eigh``, eigenvalues ``<= rtol·λ_max``
dropped) for both pseudo-inverse square roots. Independently, ``M T`` must equal
``msign(M R) R`` (:func:`tests.reference.msign`, an SVD).

Error model: the float32 solvers work on unit-trace Grams whose entries are
exact float32 numbers; ``T`` (relative, Frobenius) errs by ``c·eps_f32·√(κ(S)κ(K))``
for well-separated spectra. Tolerance: ``TOL_C = 50`` times that; measured (jax
0.10, x86 CPU) every solver stays below 1/40 of it (4e-7 at κ = 3, 2e-6 at
κ(S) = 100, κ(K) = 10), so any IEEE CPU passes, while a wrong formula (a missing
whitening, the wrong power, a transposed product) is off by O(1). Tests whose
inputs are singular or that exercise a fallback use ``1e-4``: ``rtol``-thresholded
spectra are compared, with eigenvalues kept at >= 0.1 of the largest.
:func:`inv_sqrt_newton_schulz` errs by about ``0.02·eps_f32·κ`` (measured
2.2e-4 at κ = 1e5): its tolerance is ``2·eps_f32·κ``, a 10x margin.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_muon_jax import _whitened_polar
from lora_muon_jax._whitened_polar import (
    inv_sqrt_newton_schulz,
    whitened_polar,
    whitened_polar_cholesky,
    whitened_polar_eigh,
    whitened_polar_newton_schulz,
)
from tests import reference
from tests.helpers import rel_err

EPS32 = float(np.finfo(np.float32).eps)
RTOL = 100 * EPS32  # the library's float32 thresholds (dtype_rtol / polar_rtol)
TOL_C = 50.0

SOLVERS = {
    "eigh": whitened_polar_eigh,
    "cholesky": whitened_polar_cholesky,
    "newton_schulz": whitened_polar_newton_schulz,
    "auto": lambda s, k, r, p: whitened_polar(s, k, r, p, "auto"),
}


def _psd(rng, r, eigs):
    """A float32 unit-trace PSD matrix with the given (relative) eigenvalues."""
    q, _ = np.linalg.qr(rng.standard_normal((r, r)))
    eigs = np.asarray(eigs, np.float64)
    s = (q * (eigs / eigs.sum())) @ q.T
    return (0.5 * (s + s.T)).astype(np.float32)


def reference_t(s, k, rtol=RTOL, polar_rtol=RTOL):
    """float64 ``R (R K R)^{+1/2} R`` with ``R = S^{+1/2}`` of one ``r×r`` pair."""
    s, k = np.asarray(s, np.float64), np.asarray(k, np.float64)
    r = reference.inv_sqrt_psd(s, rtol)
    return r @ reference.inv_sqrt_psd(r @ k @ r, polar_rtol) @ r


def _stack(rng, n, r, cond_s, cond_k):
    s = np.stack([_psd(rng, r, np.geomspace(1, 1 / cond_s, r)) for _ in range(n)])
    k = np.stack([_psd(rng, r, np.geomspace(1, 1 / cond_k, r)) for _ in range(n)])
    return s, k


def _run(name, s, k, rtol=RTOL, polar_rtol=RTOL):
    return np.asarray(jax.jit(SOLVERS[name])(jnp.asarray(s), jnp.asarray(k), rtol, polar_rtol))


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize(("cond_s", "cond_k"), [(3.0, 3.0), (100.0, 10.0)])
def test_solvers_match_float64_reference(solver, cond_s, cond_k):
    rng = np.random.default_rng(0)
    s, k = _stack(rng, 6, 4, cond_s, cond_k)
    got = _run(solver, s, k)
    assert got.dtype == np.float32 and np.all(np.isfinite(got))
    tol = TOL_C * EPS32 * np.sqrt(cond_s * cond_k)
    for i in range(len(s)):
        assert rel_err(got[i], reference_t(s[i], k[i])) < tol, i
        # T is symmetric (up to rounding)
        assert rel_err(got[i], got[i].T) < tol


def test_gram_shortcut_identity_against_svd():
    """``M T = msign(M R) R`` for ``K = MᵀM``: the reason ``T`` exists (docs §Gram shortcut)."""
    rng = np.random.default_rng(1)
    a, m = rng.standard_normal((4, 12)), rng.standard_normal((20, 4))  # partner b (r, n), momentum
    s, kk = a @ a.T, m.T @ m
    s32, k32 = (s / np.trace(s)).astype(np.float32), (kk / np.trace(kk)).astype(np.float32)
    for solver in SOLVERS:
        t = _run(solver, s32[None], k32[None])[0].astype(np.float64)
        # unit-trace Grams: T scales as 1/‖m‖ · ... so compare the normalized M T
        rb = reference.inv_sqrt_psd(s / np.trace(s))
        want = reference.msign(m @ rb) @ rb
        got = (m / np.sqrt(np.trace(kk))) @ t
        assert rel_err(got, want) < 1e-4, solver


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_rank_deficient_partner_is_a_pseudo_inverse(solver):
    """``S`` of rank 2 in ``r = 4``: ``T`` matches the reference and is zero on ``null(S)``."""
    rng = np.random.default_rng(2)
    b = rng.standard_normal((2, 16))
    basis, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    x = basis[:, :2] @ b  # (r, n) of rank 2
    s = x @ x.T
    s32 = (s / np.trace(s)).astype(np.float32)
    k32 = _psd(rng, 4, [1.0, 0.7, 0.4, 0.2])
    got = _run(solver, s32[None], k32[None])[0]
    assert np.all(np.isfinite(got))
    assert rel_err(got, reference_t(s32, k32)) < 1e-4
    null = basis[:, 2:]
    assert np.linalg.norm(got @ null) < 1e-4 * np.linalg.norm(got)


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_rank_deficient_momentum_is_a_pseudo_inverse(solver):
    """``K`` of rank 2: the polar factor keeps only the momentum's two directions."""
    rng = np.random.default_rng(3)
    s32 = _psd(rng, 4, [1.0, 0.6, 0.3, 0.2])
    m = rng.standard_normal((10, 2)) @ rng.standard_normal((2, 4))
    k = m.T @ m
    k32 = (k / np.trace(k)).astype(np.float32)
    got = _run(solver, s32[None], k32[None])[0]
    want = reference_t(s32, k32)
    assert np.all(np.isfinite(got))
    assert rel_err(got, want) < 1e-4
    assert np.linalg.matrix_rank(want, tol=1e-6 * np.abs(want).max()) == 2


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_ill_conditioned_partner_falls_back_to_eigh(solver):
    """``cond(S) = 1e8``, beyond Newton–Schulz's 1e6 and Cholesky's pivot check.

    The eigenvalue at 1e-8 is below ``rtol`` and must be dropped (not inverted): the
    iterative solvers' checks fail and they return the eigh answer.
    """
    rng = np.random.default_rng(4)
    s, k = _stack(rng, 3, 4, 3.0, 3.0)
    for i in range(3):
        lam, v = np.linalg.eigh(s[i].astype(np.float64))
        lam[0] = 1e-8 * lam[-1]
        s[i] = ((v * lam) @ v.T).astype(np.float32)
    got = _run(solver, s, k)
    for i in range(3):
        assert rel_err(got[i], reference_t(s[i], k[i])) < 1e-4


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_per_matrix_thresholds(solver):
    """``rtol`` given per matrix: a threshold above an eigenvalue drops it, only there."""
    rng = np.random.default_rng(5)
    s = np.stack([_psd(rng, 4, [1.0, 0.5, 0.2, 1e-3]) for _ in range(2)])
    k = np.stack([_psd(rng, 4, [1.0, 0.5, 0.3, 0.2]) for _ in range(2)])
    rtol = np.array([RTOL, 1e-2], np.float32)  # the second drops S's 1e-3 eigenvalue
    got = _run(solver, s, k, rtol, RTOL)
    for i in range(2):
        assert rel_err(got[i], reference_t(s[i], k[i], float(rtol[i]))) < 1e-4
    assert rel_err(reference_t(s[0], k[0], 1e-2), reference_t(s[0], k[0])) > 0.1


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_zero_grams_give_finite_output(solver):
    """Zero Grams (a zero factor or momentum) give a finite ``T``; eigh gives zero."""
    rng = np.random.default_rng(6)
    s, k = _stack(rng, 3, 4, 3.0, 3.0)
    s[1] = 0.0
    k[2] = 0.0
    got = _run(solver, s, k)
    assert np.all(np.isfinite(got))
    if solver == "eigh":
        np.testing.assert_array_equal(got[1:], 0.0)
    # the healthy matrix is unaffected by its neighbours (the fallback is per stack)
    assert rel_err(got[0], reference_t(s[0], k[0])) < 1e-4


def test_float64_auto_is_exact():
    """float64 Grams take the eigh route: as exact as float64 allows."""
    rng = np.random.default_rng(7)
    s, k = _stack(rng, 2, 5, 1e3, 10.0)
    s, k = s.astype(np.float64), k.astype(np.float64)
    with jax.enable_x64(True):
        got = np.asarray(whitened_polar(jnp.asarray(s), jnp.asarray(k), 1e-12, 1e-12))
    assert got.dtype == np.float64
    for i in range(2):
        assert rel_err(got[i], reference_t(s[i], k[i], 1e-12, 1e-12)) < 1e-10


@pytest.mark.parametrize("cond", [10.0, 1e3, 1e5])
def test_inv_sqrt_newton_schulz_accuracy(cond):
    """``C^{-1/2}`` within ``2·eps_f32·κ`` of float64 for ``κ`` up to 1e5 (its range: 1e6)."""
    rng = np.random.default_rng(8)
    c = np.stack([_psd(rng, 6, np.geomspace(1, 1 / cond, 6)) for _ in range(3)])
    got = np.asarray(jax.jit(inv_sqrt_newton_schulz)(jnp.asarray(c)))
    for i in range(3):
        want = reference.inv_sqrt_psd(c[i].astype(np.float64))
        assert rel_err(got[i], want) < 2 * EPS32 * cond, cond


def test_ns_scalings_reach_one():
    """The scaled iteration's lower bound ℓ_k reaches 1 in NS_STEPS steps from NS_LOWER."""
    alphas = _whitened_polar._ns_scalings(_whitened_polar.NS_STEPS, _whitened_polar.NS_LOWER)
    assert len(alphas) == _whitened_polar.NS_STEPS
    assert alphas[0] > 1.5 and abs(alphas[-1] - 1.0) < 1e-6
