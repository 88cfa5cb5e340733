"""The r×r heart of LoRA-Muon: ``T = R (R K R)^{-1/2} R`` with ``R = S^{-1/2}``.

For a factor with momentum ``M`` (Gram ``K``) whose partner has Gram ``S``, the
LoRA-Muon direction ``msign(M R) R`` equals ``M T`` (docs/algorithm.md §Gram
shortcut): everything that is not a thin product happens on these ``r×r`` matrices,
batched over every adapter of the tree. ``T`` is symmetric, so a right factor's
direction ``R msign(R M)`` is ``T M``.

Inverses are pseudo-inverses: eigenvalues below ``rtol · λ_max`` count as zero, so
directions with no mass get no step and a zero input gives a finite output (its
callers scale it by zero). Three solvers compute ``T``:

* ``"eigh"``: two symmetric eigendecompositions, the exact pseudo-inverse route.
  Every other solver falls back to it.
* ``"cholesky"``: Cholesky whitening ``S = L Lᵀ``, ``W = L⁻¹`` (two small LAPACK
  calls on CPU), then a Newton–Schulz inverse square root of ``W K Wᵀ``. The
  fastest on CPU, where a batched ``eigh`` costs more than the iterations.
* ``"newton_schulz"``: two scaled coupled Newton–Schulz inverse square roots, matrix
  products only, with the iteration count fixed at trace time. No solver call sits on
  the hot path: GPUs and TPUs run batched small decompositions slowly.

The iterative solvers check their own result (Cholesky pivots, whitening residuals,
and a bound on the condition number from ``rtol``) and fall back, inside a
``lax.cond``, to :func:`whitened_polar_eigh`, so every solver has the same
pseudo-inverse semantics. ``"auto"`` picks Cholesky on CPU and Newton–Schulz
elsewhere (``jax.lax.platform_dependent``).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from lora_muon_jax._linalg import eye_like, mm, sym

Solver = Literal["auto", "cholesky", "newton_schulz", "eigh"]
SOLVERS: tuple[str, ...] = ("auto", "cholesky", "newton_schulz", "eigh")

# Newton–Schulz: the iteration converges for eigenvalues down to NS_LOWER² of the
# largest (condition numbers up to 1e6) in NS_STEPS steps; a result whose
# whitening residual ‖R S R − I‖_F exceeds NS_RESIDUAL goes to the fallback.
NS_STEPS = 12
NS_LOWER = 1e-3
NS_RESIDUAL = 1e-4
# Cholesky whitening is used while its pivots say cond(S) < 1/CHOLESKY_RCOND.
CHOLESKY_RCOND = 1e-5


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _per_matrix(rtol: jax.typing.ArrayLike, s: jax.Array) -> jax.Array:
    """``rtol`` (a scalar or one value per matrix) shaped ``(..., 1)`` against ``s``."""
    rtol = jnp.asarray(rtol, s.dtype)
    if rtol.ndim == s.ndim - 1:  # already per matrix
        return rtol
    return jnp.broadcast_to(rtol, s.shape[:-2])[..., None]


def eigh_psd(s: jax.Array, rtol: jax.typing.ArrayLike) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Eigendecomposition of a PSD stack with a relative zero threshold.

    Args:
      s: ``(..., r, r)`` symmetric positive semi-definite matrices.
      rtol: eigenvalues ``λ <= rtol · λ_max`` count as zero; a scalar or one value
        per matrix.

    Returns:
      ``(lam, vecs, keep)``: eigenvalues clipped at zero, eigenvectors (columns) and
      a boolean mask of the eigenvalues kept. A zero matrix keeps nothing.
    """
    lam, vecs = jnp.linalg.eigh(sym(s))
    lam_max = jnp.max(lam, axis=-1, keepdims=True)
    keep = lam > _per_matrix(rtol, s) * lam_max
    return jnp.where(keep, lam, 0.0), vecs, keep


def _pinv_power(lam: jax.Array, keep: jax.Array, power: float) -> jax.Array:
    """``lam**power`` on kept eigenvalues and 0 elsewhere, with no inf/NaN."""
    return jnp.where(keep, jnp.where(keep, lam, 1.0) ** power, 0.0)


def _whiten_and_polar(wt: jax.Array, k: jax.Array, polar_rtol: jax.typing.ArrayLike) -> jax.Array:
    """``T = Wᵀ (W K Wᵀ)^{+1/2} W`` for a whitening given as ``Wᵀ``, by one ``eigh``."""
    c = mm(_t(wt), mm(k, wt))
    mu, u, keep = eigh_psd(c, polar_rtol)
    z = mm(wt, u * _pinv_power(mu, keep, -0.25)[..., None, :])
    return mm(z, _t(z))


def whitened_polar_eigh(
    s: jax.Array, k: jax.Array, rtol: jax.typing.ArrayLike, polar_rtol: jax.typing.ArrayLike
) -> jax.Array:
    """``T`` by two eigendecompositions: the exact pseudo-inverse route.

    The whitening is ``W = Λ^{-1/2} Vᵀ`` for ``S = V Λ Vᵀ`` (dropped eigenvalues give
    zero rows): any ``W`` with ``W S Wᵀ = Π`` gives the same ``T``.
    """
    lam, vecs, keep = eigh_psd(s, rtol)
    return _whiten_and_polar(vecs * _pinv_power(lam, keep, -0.5)[..., None, :], k, polar_rtol)


def _condition_ok(s: jax.Array, s_inv: jax.Array, rtol: jax.Array) -> jax.Array:
    """Whether ``λ_min > rtol · λ_max`` is certain, per matrix.

    ``‖S‖_F >= λ_max`` and ``‖S⁻¹‖_F >= 1/λ_min``, so ``‖S‖_F ‖S⁻¹‖_F · rtol < 1``
    implies it: no eigenvalue that the threshold would cut gets inverted.
    """
    return jnp.sqrt(_frob2(s) * _frob2(s_inv)) * rtol[..., 0] < 1.0


def _frob2(x: jax.Array) -> jax.Array:
    return jnp.sum(jnp.square(x), axis=(-2, -1))


def _unit_or_identity(x: jax.Array) -> jax.Array:
    """Zero matrices replaced by the identity (their callers scale the result by 0)."""
    zero = jnp.trace(x, axis1=-2, axis2=-1)[..., None, None] <= 0
    return jnp.where(zero, eye_like(x), sym(x))


def _cholesky_whitening(s: jax.Array, rtol: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``W = L⁻¹`` for ``S = L Lᵀ``, and whether it is usable for every matrix.

    Usable means finite, pivots above :data:`CHOLESKY_RCOND` of the largest, and a
    condition number the threshold ``rtol`` would not cut. Zero matrices are
    whitened by the identity (their callers scale the result by zero).
    """
    chol = jnp.linalg.cholesky(_unit_or_identity(s))
    w = jax.lax.linalg.triangular_solve(chol, eye_like(s), left_side=True, lower=True)
    piv = jnp.square(jnp.diagonal(chol, axis1=-2, axis2=-1))
    ok = (
        jnp.all(jnp.isfinite(w))
        & jnp.all(jnp.min(piv, axis=-1) > CHOLESKY_RCOND * jnp.max(piv, axis=-1))
        & jnp.all(_condition_ok(s, mm(_t(w), w), rtol))
    )
    return w, ok


def _polar_newton_schulz(
    w: jax.Array, k: jax.Array, polar_rtol: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """``T = Wᵀ (W K Wᵀ)^{-1/2} W`` by Newton–Schulz, and whether it converged."""
    c = sym(mm(w, mm(_unit_or_identity(k), _t(w))))
    z = inv_sqrt_newton_schulz(c)
    ok = jnp.all((_whitening_residual(z, c) < NS_RESIDUAL) & _condition_ok(c, mm(z, z), polar_rtol))
    return mm(_t(w), mm(z, w)), ok


def whitened_polar_cholesky(
    s: jax.Array, k: jax.Array, rtol: jax.typing.ArrayLike, polar_rtol: jax.typing.ArrayLike
) -> jax.Array:
    """``T`` by Cholesky whitening and a Newton–Schulz polar; the fastest on CPU.

    ``S = L Lᵀ`` gives the whitening ``W = L⁻¹`` (exact, two small LAPACK calls),
    and :func:`inv_sqrt_newton_schulz` gives ``(W K Wᵀ)^{-1/2}`` with matrix
    products. When a check fails (singular or too ill-conditioned ``S`` or
    whitened momentum), the whole stack takes :func:`whitened_polar_eigh` inside a
    ``lax.cond``.
    """
    rtol_m, polar_m = _per_matrix(rtol, s), _per_matrix(polar_rtol, s)
    w, ok_w = _cholesky_whitening(s, rtol_m)
    t, ok_t = _polar_newton_schulz(w, k, polar_m)
    return jax.lax.cond(ok_w & ok_t, lambda: t, lambda: whitened_polar_eigh(s, k, rtol_m, polar_m))


def _ns_scalings(steps: int, lower: float) -> tuple[float, ...]:
    """Per-step scalings ``α_k`` of the scaled Newton–Schulz iteration (trace time)."""
    out, ell = [], lower
    for _ in range(steps):
        alpha = math.sqrt(3.0 / (1.0 + ell + ell * ell))
        out.append(alpha)
        ell = 0.5 * alpha * ell * (3.0 - alpha * alpha * ell * ell)
    return tuple(out)


def inv_sqrt_newton_schulz(
    c: jax.Array, steps: int = NS_STEPS, lower: float = NS_LOWER
) -> jax.Array:
    """``C^{-1/2}`` of an SPD stack by the scaled coupled Newton–Schulz iteration.

    With ``Y₀ = C/‖C‖_F`` and ``Z₀ = I``, each step forms
    ``Q = (α_k/2)(3I − α_k² Z Y)``, ``Y ← Y Q``, ``Z ← Q Z``; then ``Y → Ĉ^{1/2}`` and
    ``Z → Ĉ^{-1/2}``, and ``C^{-1/2} = Z ‖C‖_F^{-1/2}``. The scalings
    ``α_k = √(3/(1+ℓ_k+ℓ_k²))`` follow the lower bound ``ℓ_k`` on the iterate's
    singular values (``ℓ₀ = lower``), so eigenvalues down to ``lower²`` of the
    largest converge in ``steps`` steps. Matrix products only. The caller checks the
    result (the iteration does not converge for singular ``C``).
    """
    norm = jnp.sqrt(_frob2(c))[..., None, None]
    eye = eye_like(c)
    table = jnp.asarray(_ns_scalings(steps, lower), jnp.float32)

    def body(carry: tuple[jax.Array, jax.Array], alpha: jax.Array):
        y, z = carry
        q = (0.5 * alpha) * (3.0 * eye - (alpha * alpha) * mm(z, y))
        return (mm(y, q), mm(q, z)), None

    (_, z), _ = jax.lax.scan(body, (c / norm, eye), table)
    return sym(z) * jax.lax.rsqrt(norm)


def _whitening_residual(r: jax.Array, s: jax.Array) -> jax.Array:
    """``‖R S R − I‖_F`` per matrix."""
    return jnp.sqrt(_frob2(mm(r, mm(s, r)) - eye_like(s)))


def whitened_polar_newton_schulz(
    s: jax.Array, k: jax.Array, rtol: jax.typing.ArrayLike, polar_rtol: jax.typing.ArrayLike
) -> jax.Array:
    """``T`` with matrix products only; :func:`whitened_polar_eigh` as the fallback.

    ``R = S^{-1/2}`` and ``(R K R)^{-1/2}`` come from :func:`inv_sqrt_newton_schulz`.
    The stack is accepted when both whitening residuals are below
    :data:`NS_RESIDUAL` and neither matrix is more ill-conditioned than ``rtol``
    allows; otherwise (rank-deficient factors or momenta, say) the whole stack takes
    the eigendecomposition route inside a ``lax.cond``.
    """
    rtol_m, polar_m = _per_matrix(rtol, s), _per_matrix(polar_rtol, s)
    s1 = _unit_or_identity(s)
    r = inv_sqrt_newton_schulz(s1)
    ok_r = jnp.all((_whitening_residual(r, s1) < NS_RESIDUAL) & _condition_ok(s1, mm(r, r), rtol_m))
    t, ok_t = _polar_newton_schulz(r, k, polar_m)
    return jax.lax.cond(ok_r & ok_t, lambda: t, lambda: whitened_polar_eigh(s, k, rtol_m, polar_m))


def whitened_polar(
    s: jax.Array,
    k: jax.Array,
    rtol: jax.typing.ArrayLike,
    polar_rtol: jax.typing.ArrayLike,
    solver: Solver = "auto",
) -> jax.Array:
    """``T = R (R K R)^{+1/2} R`` with ``R = S^{+1/2}`` for stacks of ``r×r`` Grams.

    Args:
      s: ``(N, r, r)`` partner Grams (PSD, float32 or float64; unit trace or zero).
      k: ``(N, r, r)`` momentum Grams (PSD, same dtype; unit trace or zero).
      rtol: relative eigenvalue threshold of the partner Grams' pseudo-inverse
        square root (whitening), a scalar or ``(N,)``.
      polar_rtol: relative threshold of the whitened momentum Gram's pseudo-inverse
        square root (the polar factor), a scalar or ``(N,)``.
      solver: ``"cholesky"``, ``"newton_schulz"``, ``"eigh"`` or ``"auto"`` (the
        first on CPU, the second on GPU and TPU; ``"eigh"`` for float64 Grams).

    Returns:
      ``(N, r, r)`` symmetric ``T`` in the Grams' dtype, finite for finite inputs.
    """
    if solver == "auto" and s.dtype == jnp.dtype("float64"):
        # float64 Grams (float64 factors under jax_enable_x64): the exact route, so
        # the result is as accurate as its inputs.
        return whitened_polar_eigh(s, k, rtol, polar_rtol)
    if solver == "auto":
        rtol, polar_rtol = (jnp.asarray(x, s.dtype) for x in (rtol, polar_rtol))
        return jax.lax.platform_dependent(
            s,
            k,
            rtol,
            polar_rtol,
            cpu=whitened_polar_cholesky,
            default=whitened_polar_newton_schulz,
        )
    return {
        "cholesky": whitened_polar_cholesky,
        "newton_schulz": whitened_polar_newton_schulz,
        "eigh": whitened_polar_eigh,
    }[solver](s, k, rtol, polar_rtol)
