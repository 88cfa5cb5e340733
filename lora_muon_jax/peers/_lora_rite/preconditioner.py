"""LoRA-RITE's maths for a stack of pairs: partner bases, unmagnified gradients, r×r preconditioner.

Each factor is seen as a tall ``(*batch, rows, r)`` matrix (``a``, or ``bᵀ``). Pass 1
(:func:`unmagnify`) takes the QR bases of both factors and rotates each gradient
into its partner's basis; after the global clip (:func:`clip_scale`), pass 2
(:func:`pair_step`) transports the moments to the new bases, updates them and
preconditions with the inverse square root of the r×r second moment. All r×r
matrices of both factors of a stack share one factorization call per kind.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _grams, _lapack_order, _linalg


class Factor(NamedTuple):
    """One factor seen as a tall ``(*batch, rows, r)`` matrix (``a``, or ``bᵀ``)."""

    param: jax.Array
    grad: jax.Array
    mu: jax.Array
    basis_old: jax.Array
    nu: jax.Array  # (*batch, r, r)
    escape: jax.Array  # (*batch,)


class Hyper(NamedTuple):
    """The step's hyperparameters in the compute dtype, decays bias-corrected."""

    d1: jax.Array
    d2: jax.Array
    eps: jax.Array
    cap: jax.Array

    @classmethod
    def make(cls, dtype: Any, count: jax.Array, b1: Any, b2: Any, eps: Any, cap: Any) -> Hyper:
        t = count.astype(dtype)
        return cls(
            d1=decay(jnp.asarray(b1, dtype), t),
            d2=decay(jnp.asarray(b2, dtype), t),
            eps=jnp.asarray(eps, dtype),
            cap=jnp.asarray(cap, dtype),
        )


class Unmagnified(NamedTuple):
    """Pass 1 of both factors: partner bases, ``R⁺`` and unmagnified gradients."""

    q_a: jax.Array  # QR basis of a
    q_b: jax.Array  # QR basis of bᵀ
    ri_a: jax.Array  # R⁺ of a, (*batch, r, r)
    ri_b: jax.Array  # R⁺ of bᵀ
    g_a: jax.Array  # G Q_b = g_a R_b⁺, after skipping
    g_b: jax.Array  # Gᵀ Q_a = g_bᵀ R_a⁺, after skipping


class PairStep(NamedTuple):
    """Both factors' results; ``nu`` and ``escape`` are stacked ``(2, *batch, ...)``."""

    update_a: jax.Array  # tall
    update_b: jax.Array  # tall (bᵀ)
    mu_a: jax.Array
    mu_b: jax.Array
    nu: jax.Array
    escape: jax.Array


def _cross_gram(x: jax.Array, y: jax.Array) -> jax.Array:
    """``xᵀ y`` for tall ``(*batch, rows, r)`` stacks, in their dtype (r×r, replicated)."""
    return _grams.gram(x, _grams.canonical_layout(x.ndim, True), other=y, dtype=x.dtype)


def rms(x: jax.Array) -> jax.Array:
    """Root mean square of each matrix of a stack, shape ``batch``."""
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=(-2, -1)))


def decay(beta: jax.Array, count: jax.Array) -> jax.Array:
    """Adafactor's bias-corrected decay ``β(1-βᵗ)/(1-βᵗ⁺¹)``, ``t`` 0-based (0 at ``t = 0``).

    At ``β = 1`` (e.g. 0.999 rounded by a bf16 ``inject_hyperparams``) it takes its
    limit ``t/(t+1)`` instead of 0/0.
    """
    den = 1.0 - beta ** (count + 1.0)
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, beta * (1.0 - beta**count) / safe, count / (count + 1.0))


def pinv(r: jax.Array) -> jax.Array:
    """Pseudo-inverse of a stack of r×r matrices by SVD; a zero ``R`` gives zero.

    Singular values up to ``eps · r · σ_max`` count as zero (torch.linalg.pinv's
    default, as in the reference).
    """
    u, sv, vt = jnp.linalg.svd(r, full_matrices=False)
    keep = sv > jnp.finfo(r.dtype).eps * r.shape[-1] * sv[..., :1]
    inv = jnp.where(keep, 1.0 / jnp.where(keep, sv, 1.0), 0.0)
    return _linalg.mm(jnp.swapaxes(vt, -1, -2) * inv[..., None, :], jnp.swapaxes(u, -1, -2))


def inv_sqrt(v: jax.Array, shift: jax.Array, eps: jax.Array) -> jax.Array:
    """``E diag(1/(√(λ+ρ) + ε)) Eᵀ`` for ``V = E diag(λ) Eᵀ``, with no NaN or inf.

    Rounding can make an eigenvalue of a rank-deficient ``V`` slightly negative: it
    is clamped at zero. A zero denominator (``ε = 0`` and ``λ + ρ = 0``) gives a zero
    gain: such directions carry no gradient (the null space of ``V`` lies in that of
    the gradient), so this is the pseudo-inverse.
    """
    lam, vecs = jnp.linalg.eigh(_linalg.sym(v))
    root = jnp.sqrt(jnp.maximum(lam + shift[..., None], 0.0)) + eps
    gain = jnp.where(root > 0, 1.0 / jnp.where(root > 0, root, 1.0), 0.0)
    return _linalg.sym(_linalg.mm(vecs * gain[..., None, :], jnp.swapaxes(vecs, -1, -2)))


def escaped_mass(v_old: jax.Array, v_new: jax.Array) -> jax.Array:
    """Second-moment mass lost by the basis transport (ascending eigenvalues compared)."""
    eigs = jnp.linalg.eigvalsh(_linalg.sym(jnp.stack([v_old, v_new])))  # one batched call
    eig_diff = jnp.max(eigs[0] - eigs[1], axis=-1)
    trace_diff = jnp.trace(v_old, axis1=-2, axis2=-1) - jnp.trace(v_new, axis1=-2, axis2=-1)
    return jnp.minimum(jnp.maximum(eig_diff, 0.0), jnp.maximum(trace_diff, 0.0))


def skip(g: jax.Array, threshold: jax.Array) -> jax.Array:
    """Zeroes each matrix of ``g`` whose RMS exceeds ``threshold`` (if positive)."""
    skipped = (threshold > 0) & (rms(g) > threshold)
    return jnp.where(skipped[..., None, None], 0.0, g)


def unmagnify(
    a: Factor, b: Factor, skip_threshold: jax.Array, previous: Sequence[Any]
) -> Unmagnified:
    """Pass 1: QR bases of both factors and each gradient in its partner's basis.

    ``g_a R_b⁺ = G Q_b`` and ``g_bᵀ R_a⁺ = Gᵀ Q_a`` are the "unmagnified" gradients:
    they do not change under a gauge change of the pair. The LAPACK calls run one
    after another, the first after ``previous`` (:func:`lora_muon_jax._lapack_order.after`).
    """
    q_a, r_a = _linalg.thin_qr(_lapack_order.after(a.param, *previous))
    q_b, r_b = _linalg.thin_qr(_lapack_order.after(b.param, q_a))
    # Both factors' r×r work at once.
    ri_a, ri_b = pinv(_lapack_order.after(jnp.stack([r_a, r_b]), q_b))
    g_a = skip(_linalg.mm(a.grad, ri_b), skip_threshold)
    g_b = skip(_linalg.mm(b.grad, ri_a), skip_threshold)
    return Unmagnified(q_a, q_b, ri_a, ri_b, g_a, g_b)


def clip_scale(gradients: Sequence[jax.Array], threshold: Any) -> jax.Array:
    """``min(1, τ/‖ḡ‖)`` over every unmagnified gradient (``1`` if ``τ = 0``)."""
    wide = jnp.result_type(jnp.float32, *(g.dtype for g in gradients))
    sq = [jnp.sum(jnp.square(g.astype(wide))) for g in gradients]
    norm = jnp.sqrt(sum(sq, jnp.zeros([], wide)))
    tau = jnp.asarray(threshold, wide)
    return jnp.where((tau > 0) & (norm > tau), tau / jnp.where(norm > 0, norm, 1.0), 1.0)


def pair_step(
    a: Factor, b: Factor, pass1: Unmagnified, clip: jax.Array, hp: Hyper, apply_escape: bool
) -> PairStep:
    """Pass 2: both factors' steps from their clipped unmagnified gradients.

    Each factor's moments are moved from its partner's old basis to the new one,
    the second moment is updated and its inverse square root preconditions the
    gradient; the first moment averages the preconditioned gradients, is capped
    and gets its magnitude back through ``R⁺ᵀ``. The r×r matrices of both factors
    share one ``eigh`` (and one ``eigvalsh`` for the escape).
    """
    factors = (a, b)
    grads = (pass1.g_a * clip, pass1.g_b * clip)
    # Per factor: its partner's new basis, old basis and R⁺.
    partners = ((pass1.q_b, b.basis_old, pass1.ri_b), (pass1.q_a, a.basis_old, pass1.ri_a))
    # Basis change of each factor's coordinates: its partner's new vs old basis
    # (zero at the first step, which starts the moments from zero).
    p = jnp.stack([_cross_gram(q_new, q_old) for q_new, q_old, _ in partners])
    pt = jnp.swapaxes(p, -1, -2)
    nu = jnp.stack([f.nu for f in factors])
    v_moved = _linalg.sym(_linalg.mm(_linalg.mm(p, nu), pt))
    if apply_escape:
        escape = hp.d2 * (jnp.stack([f.escape for f in factors]) + escaped_mass(nu, v_moved))
    else:
        escape = jnp.zeros(nu.shape[:-2], nu.dtype)
    # /rows, as the reference.
    grams = jnp.stack([_cross_gram(g, g) / g.shape[-2] for g in grads])
    v = _linalg.sym(hp.d2 * v_moved + (1.0 - hp.d2) * _linalg.sym(grams))
    v = _lapack_order.after(v, escape)  # the escape's eigvalsh before this eigh
    k = inv_sqrt(v, escape, hp.eps)
    updates, moments = [], []
    for i, (f, g, (_, _, ri)) in enumerate(zip(factors, grads, partners, strict=True)):
        s = _linalg.mm(g, k[i])
        mu = hp.d1 * _linalg.mm(f.mu, pt[i]) + (1.0 - hp.d1) * s
        scale = jnp.maximum(1.0, rms(mu) / jnp.where(hp.cap > 0, hp.cap, 1.0))
        capped = mu / jnp.where(hp.cap > 0, scale, 1.0)[..., None, None]
        updates.append(_linalg.mm(capped, jnp.swapaxes(ri, -1, -2)))  # magnitude back
        moments.append(mu)
    return PairStep(updates[0], updates[1], moments[0], moments[1], v, escape)
