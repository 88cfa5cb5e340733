"""One Riemannion step of a LoRA pair on the manifold of fixed-rank matrices.

A pair is the point ``X = c a b`` of the manifold of rank-``r`` matrices, handled
only through thin factors and ``r×r`` / ``2r×2r`` cores: rank-revealing bases of the
point (:func:`_frame`), the Riemannian gradient (the projection of the dense
gradient onto the tangent space), the paper's OrthoLR and ProjectLR (Alg. 1, 2:
:func:`_projected_msign`), the retraction by a rank-``r`` truncated SVD
(:func:`_retract`) and the momentum's vector transport (:func:`_transport`).
:func:`pair_step` chains them; :mod:`lora_muon_jax.peers._riemannion.optimizer`
runs it on every pair.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _lapack_order, _linalg

# ----------------------------------------------------------------------------------
# Small helpers (batched over leading axes).


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _keep(s: jax.Array, eps: jax.Array) -> jax.Array:
    """Singular values above ``eps · σ_max`` (none of a zero matrix)."""
    return s > eps * jnp.max(s, axis=-1, keepdims=True)


def _pinv_diag(s: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)


def _svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    return u, s, vt


def _qr_pair(x: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Thin QRs of a ``(…, p, k)`` and a ``(…, q, k)`` matrix, in one call when possible.

    Zero rows appended to the shorter matrix change neither its ``R`` nor its ``Q``
    (Householder reflectors never mix them in while ``k <= min(p, q)``), so both
    matrices share one decomposition call: fewer kernels and a faster compile.
    """
    p, q, k = x.shape[-2], y.shape[-2], x.shape[-1]
    if k > min(p, q):
        qx, rx = _linalg.thin_qr(x)
        qy, ry = _linalg.thin_qr(y)
        return qx, rx, qy, ry
    rows = max(p, q)

    def pad(z: jax.Array) -> jax.Array:
        return jnp.pad(z, [(0, 0)] * (z.ndim - 2) + [(0, rows - z.shape[-2]), (0, 0)])

    qs, rs = _linalg.thin_qr(jnp.stack([pad(x), pad(y)], axis=-3))
    return qs[..., 0, :p, :], rs[..., 0, :, :], qs[..., 1, :q, :], rs[..., 1, :, :]


def _project(
    u: jax.Array, v: jax.Array, y: jax.Array, kt: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """ProjectLR: the tangent coordinates of ``P_T(Z)`` for ``Z = y @ kt``.

    ``P_T(Z) = U Uᵀ Z + (I − U Uᵀ) Z V Vᵀ = dA Vᵀ + U dB`` with ``Uᵀ dA = 0``. Returns
    ``(dA, dB)`` of shapes ``(…, m, r)`` and ``(…, r, n)``; ``Z`` is never formed.
    """
    uty = _linalg.mm(_t(u), y)  # (…, r, p)
    d_b = _linalg.mm(uty, kt)
    d_a = _linalg.mm(y - _linalg.mm(u, uty), _linalg.mm(kt, v))
    return d_a, d_b


# ----------------------------------------------------------------------------------
# One pair.


class _Frame(NamedTuple):
    """A point ``X = a_x b`` in orthonormal bases: ``X = U C Vᵀ``.

    ``u``/``v`` span the column space of ``a_x`` and the row space of ``b`` (columns
    whose singular value is below ``eps · σ_max`` are zeroed), ``core`` is ``C``,
    and ``s_inv``, ``wa_t``, ``wb_t`` turn factor gradients into products with the
    dense gradient (see :func:`_riemannian_gradient`).
    """

    u: jax.Array  # (…, m, r)
    v: jax.Array  # (…, n, r)
    core: jax.Array  # (…, r, r)
    s_inv: jax.Array  # (…, 2, r): pseudo-inverse singular values of a_x and b
    wa_t: jax.Array  # (…, r, r): a_x = U diag(s_a) W_aᵀ
    wb_t: jax.Array  # (…, r, r): b = W_b diag(s_b) Vᵀ


def _frame(a_x: jax.Array, b: jax.Array, eps: jax.Array) -> _Frame:
    """Rank-revealing bases of ``col(a_x)`` and ``row(b)``: thin QRs, then r×r SVDs.

    As accurate as an SVD of each factor, with no Gram matrix. At a rank-deficient
    start (``b = 0``) the row space is empty, so every later product acts in
    ``col(a)`` only.
    """
    qa, ra, qb, rb = _qr_pair(a_x, _t(b))
    # LAPACK calls one at a time (_lapack_order.after): this SVD after both QRs.
    p, s, wt = _svd(_lapack_order.after(jnp.stack([ra, rb], axis=-3), qa, qb))
    keep = _keep(s, eps)
    s = jnp.where(keep, s, 0.0)
    u = _linalg.mm(qa, p[..., 0, :, :]) * keep[..., 0, None, :]
    v = _linalg.mm(qb, p[..., 1, :, :]) * keep[..., 1, None, :]
    wa_t, wb_t = wt[..., 0, :, :], wt[..., 1, :, :]
    core = s[..., 0, :, None] * _linalg.mm(wa_t, _t(wb_t)) * s[..., 1, None, :]
    return _Frame(u, v, core, _pinv_diag(s, keep), wa_t, wb_t)


def _riemannian_gradient(
    frame: _Frame, g_ax: jax.Array, g_b: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Tangent coordinates ``(Ġ_A, Ġ_B)`` of ``P_T(G)`` from the factor gradients.

    ``g_b = a_xᵀ G`` gives ``Uᵀ G`` and ``g_ax = G bᵀ`` gives ``G V``; only diagonal
    (pseudo-)inverses appear. ``P_T(G) = Ġ_A Vᵀ + U Ġ_B`` with ``Uᵀ Ġ_A = 0``.
    """
    grad_b = frame.s_inv[..., 0, :, None] * _linalg.mm(frame.wa_t, g_b)
    g_v = _linalg.mm(g_ax, _t(frame.wb_t)) * frame.s_inv[..., 1, None, :]
    grad_a = g_v - _linalg.mm(frame.u, _linalg.mm(_t(frame.u), g_v))
    return grad_a, grad_b


class _Direction(NamedTuple):
    """``D = P_T(msign(d))`` as ``Q_1 K Q_2ᵀ``; ``ca = Q_1ᵀ U``, ``cb = Q_2ᵀ V``."""

    q1: jax.Array  # (…, m, 2r)
    q2: jax.Array  # (…, n, 2r)
    k: jax.Array  # (…, 2r, 2r)
    ca: jax.Array  # (…, 2r, r)
    cb: jax.Array  # (…, 2r, r)


def _projected_msign(
    u: jax.Array, v: jax.Array, d_a: jax.Array, d_b: jax.Array, eps: jax.Array
) -> _Direction:
    """OrthoLR then ProjectLR (Alg. 1, 2) of the tangent vector ``d_a Vᵀ + U d_b``.

    With ``[U, d_a] = Q_1 T_1`` and ``[V, d_bᵀ] = Q_2 T_2`` the tangent matrix is
    ``Q_1 K₀ Q_2ᵀ`` for a 2r×2r ``K₀``, and ``msign = Q_1 msign(K₀) Q_2ᵀ``; singular
    values below ``eps · σ_max`` count as zero (exact zeros at a zero start). The
    projection runs on the same 2r×2r coordinates: with ``A = Q_1ᵀ U``,
    ``B = Q_2ᵀ V``, ``P_T`` acts as ``Ω ↦ A Aᵀ Ω + (I − A Aᵀ) Ω B Bᵀ``.
    """
    r = u.shape[-1]
    q1, t1, q2, t2 = _qr_pair(jnp.concatenate([u, d_a], -1), jnp.concatenate([v, _t(d_b)], -1))
    t1_swapped = jnp.concatenate([t1[..., :, r:], t1[..., :, :r]], -1)
    pk, sk, wkt = _svd(_lapack_order.after(_linalg.mm(t1_swapped, _t(t2)), q1, q2))
    omega = _linalg.mm(pk * _keep(sk, eps)[..., None, :], wkt)
    ca = _linalg.mm(_t(q1), u)
    cb = _linalg.mm(_t(q2), v)
    pa_omega = _linalg.mm(ca, _linalg.mm(_t(ca), omega))
    k = pa_omega + _linalg.mm(omega - pa_omega, _linalg.mm(cb, _t(cb)))
    return _Direction(q1, q2, k, ca, cb)


class _NewPoint(NamedTuple):
    a: jax.Array  # new factor a (compute dtype)
    b: jax.Array  # new factor b
    u: jax.Array  # (…, m, r) orthonormal basis of the new point
    v: jax.Array  # (…, n, r)
    h_a: jax.Array  # (…, r): a_x,new = U h_a
    h_b: jax.Array  # (…, r): b_new = h_b Vᵀ
    keep: jax.Array  # (…, r): kept singular values of the new point


def _retract(
    frame: _Frame,
    direction: _Direction,
    *,
    eta: jax.Array,
    decay: jax.Array,
    scale: jax.Array,
    eps: jax.Array,
    gauge: str,
) -> _NewPoint:
    """Rank-r truncated SVD of ``(1 − λη) X − η D`` in 2r×2r coordinates, in ``gauge``.

    ``X`` and ``D`` both lie in ``span(Q_1) ⊗ span(Q_2)`` (``col U ⊆ span Q_1``).
    The returned factors satisfy ``c · a b = U diag(s) Vᵀ``: ``"balanced"`` gives
    ``a = U (s/c)^{1/2}``, ``b = (s/c)^{1/2} Vᵀ``; ``"left_orthogonal"`` ``a = U``.
    """
    r = frame.u.shape[-1]
    x_coords = _linalg.mm(direction.ca, _linalg.mm(frame.core, _t(direction.cb)))
    pn, s_all, qnt = _svd((1.0 - decay) * x_coords - eta * direction.k)
    s_new = s_all[..., :r]
    keep = _keep(s_new, eps)
    s_new = jnp.where(keep, s_new, 0.0)
    u_new = _linalg.mm(direction.q1, pn[..., :, :r]) * keep[..., None, :]
    v_new = _linalg.mm(direction.q2, _t(qnt[..., :r, :])) * keep[..., None, :]
    if gauge == "balanced":
        h_a = jnp.sqrt(s_new * scale)
        h_b = jnp.sqrt(s_new / scale)
    else:  # left_orthogonal: a = U, b = Σ Vᵀ / c.
        h_a = jnp.where(keep, scale, 0.0)
        h_b = s_new / scale
    new_a = u_new * (h_a / scale)[..., None, :]
    new_b = h_b[..., :, None] * _t(v_new)
    return _NewPoint(new_a, new_b, u_new, v_new, h_a, h_b, keep)


def _transport(point: _NewPoint, y: jax.Array, kt: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The tangent vector ``y @ kt`` projected onto the new tangent space (eager
    transport), stored as factor velocities ``(mu_a, mu_b)`` with tangent vector
    ``mu_a b_new + a_x,new mu_b``: ``(m + n) r`` numbers."""
    n_a, n_b = _project(point.u, point.v, y, kt)
    mu_a = n_a * _pinv_diag(point.h_b, point.keep)[..., None, :]
    mu_b = _pinv_diag(point.h_a, point.keep)[..., :, None] * n_b
    return mu_a, mu_b


class PairOut(NamedTuple):
    a: jax.Array
    b: jax.Array
    mu_a: jax.Array
    mu_b: jax.Array


def pair_step(
    a: jax.Array,
    b: jax.Array,
    g_a: jax.Array,
    g_b: jax.Array,
    mu_a: jax.Array,
    mu_b: jax.Array,
    *,
    eta: jax.Array,
    decay: jax.Array,
    beta: jax.Array,
    scale: jax.Array,
    eps: jax.Array,
    nesterov: bool,
    gauge: str,
    stored_momentum: str,
) -> PairOut:
    """One Riemannion step of a canonical pair (compute dtype); returns the new factors.

    Works on ``X = a_x b`` with ``a_x = c·a``, so ``∂L/∂a_x = g_a / c``.
    """
    a_x = scale * a
    frame = _frame(a_x, b, eps)
    grad_a, grad_b = _riemannian_gradient(frame, g_a / scale, g_b)
    # Vector transport of the stored tangent vector mu_a b + a_x mu_b: projection
    # onto the current tangent space (the identity when params are the ones returned).
    t_a, t_b = _project(
        frame.u, frame.v, jnp.concatenate([mu_a, a_x], -1), jnp.concatenate([b, mu_b], -2)
    )
    # Eq. 10 (EMA form) keeps the buffer M; Alg. 4/5 (heavy ball) keep the direction D.
    w = 1.0 - beta if stored_momentum == "buffer" else jnp.ones_like(beta)
    m_a, m_b = beta * t_a + w * grad_a, beta * t_b + w * grad_b
    d_a, d_b = (beta * m_a + w * grad_a, beta * m_b + w * grad_b) if nesterov else (m_a, m_b)
    direction = _projected_msign(frame.u, frame.v, d_a, d_b, eps)
    point = _retract(frame, direction, eta=eta, decay=decay, scale=scale, eps=eps, gauge=gauge)
    if stored_momentum == "buffer":  # M = m_a Vᵀ + U m_b
        y = jnp.concatenate([m_a, frame.u], -1)
        kt = jnp.concatenate([_t(frame.v), m_b], -2)
    else:  # D = Q_1 K Q_2ᵀ
        y, kt = _linalg.mm(direction.q1, direction.k), _t(direction.q2)
    new_mu_a, new_mu_b = _transport(point, y, kt)
    return PairOut(point.a, point.b, new_mu_a, new_mu_b)
