"""Riemannion: Muon on the manifold of fixed-rank matrices, for LoRA factor pairs.

A LoRA adapter ``ΔW = c · a @ b`` (``a: (*batch, m, r)``, ``b: (*batch, r, n)``) is
treated as a point ``X = c a b`` of the smooth manifold ``M_r`` of ``m × n`` matrices of
rank ``r``. Each step takes the Riemannian gradient (the projection of the dense
gradient ``G`` onto the tangent space ``T_X M_r``), mixes it with a momentum that is
carried from the previous tangent space by projection, orthogonalizes the result
(exact ``msign`` of a rank-``2r`` matrix), projects it back onto ``T_X M_r`` and
retracts with a rank-``r`` truncated SVD. The optimizer writes new factors, so its
update is ``new − old``.

Sources. The full paper text could not be read when this was written: the arXiv
HTML pages of v1 and v2 were reachable only as far as the abstract and the
introduction, and the authors' repository ``Bogachevv/RiemanianFinetune`` was not
retrievable. What is implemented therefore rests on:

* primary, the abstract of arXiv:2507.12142 (v1 "RiemannLoRA", v2 "LoRA meets
  Riemannion"): the optimizer generalizes Muon to ``M_r``, the initialization is
  gradient-informed, and the geometric operations use autodiff products;
* the standard embedded geometry of ``M_r`` (tangent space, orthogonal projection,
  projection as vector transport, truncated-SVD retraction; Vandereycken 2013,
  Absil et al. 2008);
* secondary sources, which agree on the structure: the paper summaries at
  sciencestack.ai and alphaxiv.org (LOI formula ``ΔW₀ = α U[:, :r] V[:, r:2r]ᵀ`` and
  the names OrthoLR/ProjectLR), and two public third-party re-implementations that
  cite the paper's Algorithm 4. Both orthogonalize the transported momentum and
  then project it onto the tangent space. Both use heavy-ball momentum. One says
  the paper's decoupled weight decay acts inside the retraction (``(1 − λη) X − η D``)
  and that the paper returns the left-orthogonal gauge (``A_L = U``, ``B = Σ Vᵀ``).
  The two disagree on one point: whether the stored momentum is the raw transported
  momentum or the orthogonalized, projected direction. This module stores the raw
  momentum, as Muon does. None of these details could be checked against the PDF.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _linalg, _pairs, _pairwise, _sharding, _validation

__all__ = [
    "RiemannionState",
    "riemannion",
    "riemannion_loi_init",
    "scale_by_riemannion",
]

_SCALE_FN = "scale_by_riemannion"
_ALIAS_FN = "riemannion"
_LOI_FN = "riemannion_loi_init"

Gauge: TypeAlias = Literal["balanced", "left_orthogonal"]
_GAUGES = ("balanced", "left_orthogonal")


class RiemannionState(NamedTuple):
    """State of :func:`scale_by_riemannion`: a step count and one tangent momentum."""

    count: jax.Array  # shape=(), dtype=int32: step of the learning-rate schedule.
    # Like params; dtype=mu_dtype (default: the param's dtype). For a pair, the
    # momentum is the tangent vector `mu_a @ b + c·a @ mu_b` at the current params.
    mu: optax.Updates


# ----------------------------------------------------------------------------------
# Small helpers (batched over leading axes).


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _keep(s: jax.Array, eps: jax.Array) -> jax.Array:
    """Singular values above ``eps · σ_max`` (none of a zero matrix)."""
    return s > eps * jnp.max(s, axis=-1, keepdims=True)


def _pinv_diag(s: jax.Array, keep: jax.Array) -> jax.Array:
    return jnp.where(keep, 1.0 / jnp.where(keep, s, 1.0), 0.0)


def _qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    return jnp.linalg.qr(x, mode="reduced")


def _svd(x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    return jnp.linalg.svd(x, full_matrices=False)


def _value_at(x: Any, count: jax.Array) -> Any:
    return x(count) if callable(x) else x


def _qr_pair(
    x: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Thin QRs of a ``(…, p, k)`` and a ``(…, q, k)`` matrix, in one call when possible.

    Zero rows appended to the shorter matrix change neither its ``R`` nor its ``Q``
    (Householder reflectors never mix them in while ``k <= min(p, q)``), so both
    matrices share one decomposition call: fewer kernels and a faster compile.
    """
    p, q, k = x.shape[-2], y.shape[-2], x.shape[-1]
    if k > min(p, q):
        qx, rx = _qr(x)
        qy, ry = _qr(y)
        return qx, rx, qy, ry
    rows = max(p, q)

    def pad(z: jax.Array) -> jax.Array:
        return jnp.pad(z, [(0, 0)] * (z.ndim - 2) + [(0, rows - z.shape[-2]), (0, 0)])

    qs, rs = _qr(jnp.stack([pad(x), pad(y)], axis=-3))
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


class _PairOut(NamedTuple):
    a: jax.Array
    b: jax.Array
    mu_a: jax.Array
    mu_b: jax.Array


def _pair_step(
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
) -> _PairOut:
    """One Riemannion step of a canonical pair (compute dtype); returns the new factors."""
    r = a.shape[-1]
    # Work on X = a_x @ b with a_x = c·a; then ∂L/∂a_x = g_a / c and ∂L/∂b = a_xᵀ G.
    a_x = scale * a
    g_ax = g_a / scale

    # Rank-revealing bases of the column space of a and the row space of b: a thin
    # QR, then an SVD of the r×r triangle (as accurate as an SVD of the factor, no
    # Gram matrix). At a full-rank point they span the column and row spaces of X;
    # at a rank-deficient start (b = 0) the empty row space makes every step below
    # act in col(a) only.
    qa, ra, qb, rb = _qr_pair(a_x, _t(b))
    # LAPACK calls one at a time (_linalg.after): this SVD after both QRs.
    p, s, wt = _svd(_linalg.after(jnp.stack([ra, rb], axis=-3), qa, qb))
    keep = _keep(s, eps)
    s = jnp.where(keep, s, 0.0)
    s_inv = _pinv_diag(s, keep)
    u = _linalg.mm(qa, p[..., 0, :, :]) * keep[..., 0, None, :]
    v = _linalg.mm(qb, p[..., 1, :, :]) * keep[..., 1, None, :]
    wa_t, wb_t = wt[..., 0, :, :], wt[..., 1, :, :]
    # a_x = U diag(s_a) W_aᵀ and b = W_b diag(s_b) Vᵀ, so X = U C Vᵀ with C r×r.
    core = s[..., 0, :, None] * _linalg.mm(wa_t, _t(wb_t)) * s[..., 1, None, :]
    # Dense-gradient products from the factor gradients alone: g_b = a_xᵀ G gives
    # Uᵀ G, and g_a = G bᵀ gives G V; only diagonal (pseudo-)inverses appear.
    grad_b = s_inv[..., 0, :, None] * _linalg.mm(wa_t, g_b)
    g_v = _linalg.mm(g_ax, _t(wb_t)) * s_inv[..., 1, None, :]
    grad_a = g_v - _linalg.mm(u, _linalg.mm(_t(u), g_v))

    # Vector transport of the stored momentum mu_a b + a_x mu_b: projection onto
    # the current tangent space (the identity when params are the ones returned).
    t_a, t_b = _project(
        u, v, jnp.concatenate([mu_a, a_x], -1), jnp.concatenate([b, mu_b], -2)
    )
    m_a = beta * t_a + (1.0 - beta) * grad_a
    m_b = beta * t_b + (1.0 - beta) * grad_b
    if nesterov:
        d_a = beta * m_a + (1.0 - beta) * grad_a
        d_b = beta * m_b + (1.0 - beta) * grad_b
    else:
        d_a, d_b = m_a, m_b

    # OrthoLR: with [U, d_a] = Q_1 T_1 and [V, d_bᵀ] = Q_2 T_2, the tangent matrix
    # d_a Vᵀ + U d_b is Q_1 K Q_2ᵀ for a 2r×2r core K, and msign = Q_1 msign(K) Q_2ᵀ.
    # Singular values below eps·σ_max count as zero (exact zeros at a zero start).
    q1, t1, q2, t2 = _qr_pair(
        jnp.concatenate([u, d_a], -1), jnp.concatenate([v, _t(d_b)], -1)
    )
    t1_swapped = jnp.concatenate([t1[..., :, r:], t1[..., :, :r]], -1)
    pk, sk, wkt = _svd(_linalg.after(_linalg.mm(t1_swapped, _t(t2)), q1, q2))
    omega = _linalg.mm(pk * _keep(sk, eps)[..., None, :], wkt)
    # X and P_T(Q_1 Ω Q_2ᵀ) both live in span(Q_1) ⊗ span(Q_2) (col U ⊆ span Q_1),
    # so ProjectLR and the retraction run on 2r×2r coordinates. With A = Q_1ᵀ U and
    # B = Q_2ᵀ V, P_T acts as Ω ↦ A Aᵀ Ω + (I − A Aᵀ) Ω B Bᵀ.
    ca = _linalg.mm(_t(q1), u)
    cb = _linalg.mm(_t(q2), v)
    pa_omega = _linalg.mm(ca, _linalg.mm(_t(ca), omega))
    direction = pa_omega + _linalg.mm(omega - pa_omega, _linalg.mm(cb, _t(cb)))

    # Retraction: rank-r truncated SVD of (1 − λη) X − η D, all in those coordinates.
    x_coords = _linalg.mm(ca, _linalg.mm(core, _t(cb)))
    pn, s_all, qnt = _svd((1.0 - decay) * x_coords - eta * direction)
    s_new = s_all[..., :r]
    keep_new = _keep(s_new, eps)
    s_new = jnp.where(keep_new, s_new, 0.0)
    u_new = _linalg.mm(q1, pn[..., :, :r]) * keep_new[..., None, :]
    v_new = _linalg.mm(q2, _t(qnt[..., :r, :])) * keep_new[..., None, :]

    # The returned gauge: X = c·a b with a_x = U h_a, b = h_b Vᵀ.
    if gauge == "balanced":
        h_a = jnp.sqrt(s_new * scale)
        h_b = jnp.sqrt(s_new / scale)
    else:  # left_orthogonal: a = U, b = Σ Vᵀ / c.
        h_a = jnp.where(keep_new, scale, 0.0)
        h_b = s_new / scale
    new_a = u_new * (h_a / scale)[..., None, :]
    new_b = h_b[..., :, None] * _t(v_new)

    # Eager transport of the momentum to the new point, stored as factor velocities
    # (mu_a, mu_b) with tangent vector mu_a b_new + a_x,new mu_b: (m + n) r numbers.
    n_a, n_b = _project(
        u_new, v_new, jnp.concatenate([m_a, u], -1), jnp.concatenate([_t(v), m_b], -2)
    )
    new_mu_a = n_a * _pinv_diag(h_b, keep_new)[..., None, :]
    new_mu_b = _pinv_diag(h_a, keep_new)[..., :, None] * n_b
    return _PairOut(new_a, new_b, new_mu_a, new_mu_b)


# ----------------------------------------------------------------------------------
# Validation.


def _check_ranks(fn: str, plan: _pairs.PairPlan, *, factor: int = 1) -> None:
    for pair in plan.pairs:
        if factor * pair.rank > min(pair.m, pair.n):
            what, why = (
                ("rank", f"the manifold of rank-{pair.rank} matrices")
                if factor == 1
                else (f"{factor} × rank", "LOI, which needs the top 2r singular pairs")
            )
            raise ValueError(
                f"{fn}: the pair ({pair.a_path}, {pair.b_path}) has rank {pair.rank} "
                f"and ΔW of shape {pair.m} × {pair.n}; {what} must be at most "
                f"min(m, n) = {min(pair.m, pair.n)} for {why}."
            )


def _check_common(
    fn: str,
    learning_rate: Any,
    beta: Any,
    weight_decay: Any,
    lora_scale: Any,
    eps: Any,
    gauge: str,
) -> None:
    _validation.check_scalar("learning_rate", learning_rate, low=0.0, fn=fn)
    _validation.check_scalar("beta", beta, low=0.0, high=1.0, high_inclusive=False, fn=fn)
    _validation.check_scalar("weight_decay", weight_decay, low=0.0, fn=fn)
    _validation.check_scalar("lora_scale", lora_scale, low=0.0, low_inclusive=False, fn=fn)
    _validation.check_scalar("eps", eps, low=0.0, high=1.0, high_inclusive=False, fn=fn)
    lam, eta = (_validation.concrete_float(x) for x in (weight_decay, learning_rate))
    if lam is not None and eta is not None and lam * eta >= 1.0:
        raise ValueError(
            f"{fn}: weight_decay * learning_rate = {lam * eta:g} >= 1; the point would "
            "be scaled by a non-positive factor. Lower one of them."
        )
    if gauge not in _GAUGES:
        raise ValueError(f"{fn}: `gauge` must be one of {list(_GAUGES)}; got {gauge!r}.")


def _like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """``x`` with the explicit sharding of ``ref`` (a no-op without explicit sharding)."""
    spec = _sharding.explicit_spec(ref)
    return x if spec is None else jax.sharding.reshard(x, spec)


def _store(x: jax.Array, dtype: Any) -> jax.Array:
    # Factor velocities scale like 1/σ of the partner: saturate rather than overflow
    # in float16.
    big = jnp.finfo(dtype).max
    return jnp.clip(x, -big, big).astype(dtype)


# ----------------------------------------------------------------------------------
# The transformation.


def scale_by_riemannion(
    learning_rate: optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    nesterov: bool = False,
    lora_scale: jax.typing.ArrayLike = 1.0,
    pairs: _pairs.PairsLike = "auto",
    gauge: Gauge = "balanced",
    mu_dtype: Any = None,
    eps: jax.typing.ArrayLike = 1e-5,
) -> optax.GradientTransformationExtraArgs:
    r"""Riemannion step on every LoRA pair; returns the final update ``new − old``.

    Each pair is the point :math:`X = c\,a b` of the manifold :math:`\mathcal M_r` of
    rank-:math:`r` matrices. With :math:`P_U, P_V` the orthogonal projectors onto the
    column space of :math:`a` and the row space of :math:`b`, the tangent projection is
    :math:`P_T(Z) = P_U Z + (I - P_U) Z P_V`, and one step is

    .. math::

      g &= P_T(G), \qquad m \leftarrow β\, P_T(m) + (1-β)\, g, \\
      D &= P_T\big(\operatorname{msign}(m)\big), \qquad
      X \leftarrow \operatorname{SVD}_r\big((1 - λη) X - η D\big),

    where :math:`G = ∂L/∂ΔW` is never formed: :math:`P_U G` and :math:`G P_V` come
    from the factor gradients :math:`g_a = c\,G b^\top` and :math:`g_b = c\,a^\top G`.
    The momentum lives in the tangent space; after the retraction it is projected
    onto the new tangent space (eager transport) and stored as factor velocities
    ``(mu_a, mu_b)`` with the tangent vector ``c (mu_a b + a mu_b)``: ``(m + n) r``
    numbers per pair, the size of the params.

    Everything is exact and no ``m × n`` matrix is formed. ``msign`` of the rank-``2r``
    tangent matrix comes from thin QRs of :math:`[U, \dot A]` and
    :math:`[V, \dot B^\top]` and an SVD of the ``2r × 2r`` core. :math:`X` and
    :math:`D` lie in those same bases, so the retraction is one more ``2r × 2r``
    SVD. Per pair and step that is two thin QRs of each factor's size (batched in
    pairs), three small SVDs and :math:`O((m + n) r^2)` matmuls, all in float32
    (float64 for float64 params). Under explicit sharding the thin factors are
    gathered along ``m`` and ``n`` (QR needs whole columns); batch axes stay sharded.

    **Units.** :math:`\|\operatorname{msign}(m)\|_2 = 1`, so the product moves by about
    :math:`η` in spectral norm per step, like dense Muon and :func:`lora_muon`; the
    projection :math:`P_T` can lengthen it slightly (by at most a factor
    :math:`\sqrt 2` in spectral norm). The learning rate is applied inside, because the
    retraction is not linear in :math:`η`. Do not chain
    :func:`optax.scale_by_learning_rate` after this transformation; :func:`riemannion`
    is the alias to use.

    **Returned gauge.** ``"balanced"`` (default) writes
    :math:`a = U (Σ/c)^{1/2}`, :math:`b = (Σ/c)^{1/2} V^\top`; ``"left_orthogonal"``
    writes :math:`a = U`, :math:`b = Σ V^\top / c` (the paper's gauge according to
    secondary sources). The product trajectory does not depend on the gauge of the
    incoming factors (invariance to :math:`(a S, S^{-1} b)`), and the first update
    rewrites both factors into the chosen gauge.

    **Momentum.** The EMA form above gives the same directions as heavy-ball momentum
    :math:`m \leftarrow β P_T(m) + g` (reported for the paper) for a constant
    :math:`β`, because ``msign`` ignores scale. The state depends on the returned
    factors: if something else changes the factors between steps, the momentum is
    re-projected onto the new tangent space. Do not combine this transformation with
    :func:`with_gauge_rebalancing`; the balanced gauge makes it unnecessary.

    **Rank-deficient starts.** A pair with ``b = 0`` (Flax's and PEFT's LoRA init) is
    not on :math:`\mathcal M_r`. Singular values below ``eps · σ_max`` count as zero,
    so the first step moves the product to :math:`-η\, U_a \operatorname{msign}(U_a^\top
    G)`, where :math:`U_a` spans the columns of ``a``. Both factors are rewritten, the
    update is finite and the new point has rank :math:`r` when :math:`U_a^\top G` does.
    With both factors zero the update is zero. :func:`riemannion_loi_init` gives the
    paper's initialization instead.

    Args:
      learning_rate: :math:`η`, a float or a schedule (evaluated on this
        transformation's own step count): the spectral-norm size of each product's
        step.
      beta: momentum decay :math:`β` in ``[0, 1)``.
      weight_decay: :math:`λ`, a float or a schedule: the point is scaled by
        :math:`1 - λη` inside the retraction; needs :math:`λη < 1`.
      nesterov: use :math:`β m + (1-β) g` as the direction. Static.
      lora_scale: :math:`c` in ``ΔW = c · a @ b`` (PEFT's ``alpha / r``).
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static.
      gauge: ``"balanced"`` or ``"left_orthogonal"``, the gauge of the returned
        factors. Static.
      mu_dtype: dtype of the momentum; ``None`` keeps each param's dtype.
      eps: relative threshold below which singular values (of the factors, of the
        momentum and of the new point) count as zero.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params`` and returns ``new_params − params`` in the params' dtype.

    Raises:
      ValueError: out-of-range hyperparameters or an unknown ``gauge`` (at
        construction); an unpaired factor, a leaf in no pair, mismatched ranks,
        ``rank > min(m, n)`` or missing ``params`` (naming the leaf paths).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from lora_muon_jax.peers import scale_by_riemannion
      >>> rng = np.random.default_rng(0)
      >>> params = {'lora_a': jnp.asarray(rng.standard_normal((6, 2)), jnp.float32),
      ...           'lora_b': jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)}
      >>> loss = lambda p: jnp.sum((p['lora_a'] @ p['lora_b'] - 1.) ** 2)
      >>> tx = scale_by_riemannion(learning_rate=0.1)
      >>> updates, state = tx.update(jax.grad(loss)(params), tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)
      >>> step = new['lora_a'] @ new['lora_b'] - params['lora_a'] @ params['lora_b']
      >>> print(f"{np.linalg.norm(step, 2):.2f}")  # about the learning rate
      0.11
      >>> s = np.linalg.svd(new['lora_a'] @ new['lora_b'], compute_uv=False)
      >>> print(int(np.sum(s > 1e-4 * s[0])))  # still rank 2
      2

    References:
      Bogachev, Aletov, Molozhavenko, Bobkov, Soboleva, Alanov, Rakhuba, `LoRA meets
      Riemannion: Muon Optimizer for Parametrization-independent Low-Rank Adapters
      <https://arxiv.org/abs/2507.12142>`_, 2025

      Vandereycken, `Low-rank matrix completion by Riemannian optimization
      <https://doi.org/10.1137/110845768>`_, SIAM J. Optim., 2013

      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024
    """
    _check_common(_SCALE_FN, learning_rate, beta, weight_decay, lora_scale, eps, gauge)
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params: Any) -> RiemannionState:
        plan = _pairwise.check_init(_SCALE_FN, params, pairs)
        _check_ranks(_SCALE_FN, plan)
        return RiemannionState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        )

    def update_fn(
        updates: Any, state: RiemannionState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, RiemannionState]:
        del extra_args
        tree = _pairwise.flatten(_SCALE_FN, updates, params, pairs)
        _check_ranks(_SCALE_FN, tree.plan)
        mu_leaves = tree.treedef.flatten_up_to(state.mu)
        eta = _value_at(learning_rate, state.count)
        lam = _value_at(weight_decay, state.count)

        per_pair, mu_out = [], list(mu_leaves)
        previous: tuple[Any, ...] = ()
        for pair in tree.plan.pairs:
            a, b = _pairwise.canonical(pair, tree.params)
            # One pair's LAPACK calls after the previous pair's (_linalg.after).
            a = _linalg.after(a, *previous)
            dtype = jnp.promote_types(a.dtype, jnp.float32)

            def f(x: Any, dtype: Any = dtype) -> jax.Array:
                # QR needs whole columns: under explicit sharding the thin factors
                # are gathered along m and n (O((m + n) r) per pair, batch axes stay
                # sharded) and the results are resharded like the params below.
                x = jnp.asarray(x).astype(dtype)
                return _sharding.like_batch(x, x) if x.ndim >= 2 else x

            g_a, g_b = _pairwise.canonical(pair, tree.grads)
            m_a, m_b = _pairwise.canonical(pair, mu_leaves)
            out = _pair_step(
                f(a), f(b), f(g_a), f(g_b), f(m_a), f(m_b),
                eta=f(eta),
                decay=f(lam) * f(eta),
                beta=f(beta),
                scale=f(lora_scale),
                eps=f(eps),
                nesterov=nesterov,
                gauge=gauge,
            )
            previous = (out.a,)
            per_pair.append((_like(out.a - f(a), a), _like(out.b - f(b), b)))
            for role, index, x in (
                ("a", pair.a_index, _like(out.mu_a, m_a)),
                ("b", pair.b_index, _like(out.mu_b, m_b)),
            ):
                old = mu_leaves[index]
                mu_out[index] = _store(pair.restore(x, role, old.shape), old.dtype)
        return _pairwise.scatter(tree, per_pair), RiemannionState(
            count=optax.safe_increment(state.count),
            mu=_pairwise.unflatten(tree, mu_out),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def riemannion(
    learning_rate: optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    nesterov: bool = False,
    lora_scale: jax.typing.ArrayLike = 1.0,
    pairs: _pairs.PairsLike = "auto",
    gauge: Gauge = "balanced",
    mu_dtype: Any = None,
    eps: jax.typing.ArrayLike = 1e-5,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    adam_eps_root: jax.typing.ArrayLike = 0.0,
    adam_weight_decay: jax.typing.ArrayLike = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Riemannion: Muon on the fixed-rank manifold for LoRA pairs, AdamW elsewhere.

    Applies :func:`scale_by_riemannion` to every LoRA factor pair:

    .. math::

      X \leftarrow \operatorname{SVD}_r\big((1 - λη) X - η\,
      P_T(\operatorname{msign}(m))\big), \qquad
      m \leftarrow β P_T(m) + (1 - β) P_T(∇_X L),

    for :math:`X = c\,a b`. Each product moves by about :math:`η` in spectral norm per
    step and its trajectory does not depend on how it is factored. Leaves in no pair
    (biases, norms, embeddings) go to :func:`optax.adamw` with the ``adam_*``
    hyperparameters.

    Works inside :func:`optax.chain`, :func:`optax.partition`, :func:`optax.masked`,
    :class:`optax.MultiSteps`, :func:`optax.apply_if_finite` and under
    :func:`optax.inject_hyperparams` (list a callable ``pairs`` in ``static_args``).

    Args:
      learning_rate: :math:`η`, a float or a schedule.
      beta: momentum decay :math:`β`.
      weight_decay: :math:`λ`: the product decays by ``1 − λη`` per step.
      nesterov: Nesterov momentum. Static.
      lora_scale: :math:`c` in ``ΔW = c · a @ b``.
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static.
      gauge: gauge of the returned factors, ``"balanced"`` or ``"left_orthogonal"``.
        Static.
      mu_dtype: momentum dtype for every leaf (LoRA and AdamW); ``None`` keeps the
        param dtype.
      eps: relative singular-value threshold; see :func:`scale_by_riemannion`.
      adam_b1: AdamW :math:`β_1` for leaves in no pair.
      adam_b2: AdamW :math:`β_2` for leaves in no pair.
      adam_eps: AdamW :math:`ε` for leaves in no pair.
      adam_eps_root: AdamW :math:`ε_{root}` for leaves in no pair.
      adam_weight_decay: AdamW weight decay for leaves in no pair.
      adam_learning_rate: AdamW learning rate; ``None`` uses ``learning_rate``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params``.

    Raises:
      ValueError: as :func:`scale_by_riemannion`.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np, optax
      >>> from lora_muon_jax.peers import riemannion
      >>> rng = np.random.default_rng(0)
      >>> f32 = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
      >>> target = f32(16, 8)
      >>> params = {'lora_a': 0.3 * f32(16, 4), 'lora_b': 0.3 * f32(4, 8),
      ...           'bias': jnp.zeros(8)}
      >>> loss = lambda p: jnp.mean((p['lora_a'] @ p['lora_b'] + p['bias'] - target) ** 2)
      >>> tx = riemannion(learning_rate=optax.cosine_decay_schedule(0.5, 60), beta=0.9)
      >>> @jax.jit
      ... def step(params, state):
      ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...   return optax.apply_updates(params, updates), state
      >>> state = tx.init(params)
      >>> print(f"{loss(params):.2f}")
      0.90
      >>> for _ in range(60):
      ...   params, state = step(params, state)
      >>> print(f"{loss(params):.2f}")
      0.16

    References:
      See :func:`scale_by_riemannion`.
    """
    _check_common(_ALIAS_FN, learning_rate, beta, weight_decay, lora_scale, eps, gauge)
    return _pairwise.with_adamw_fallback(
        scale_by_riemannion(
            learning_rate,
            beta,
            weight_decay,
            nesterov=nesterov,
            lora_scale=lora_scale,
            pairs=pairs,
            gauge=gauge,
            mu_dtype=mu_dtype,
            eps=eps,
        ),
        pairs=pairs,
        learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_eps=adam_eps,
        adam_eps_root=adam_eps_root,
        adam_weight_decay=adam_weight_decay,
        mu_dtype=mu_dtype,
        label="riemannion",
    )


# ----------------------------------------------------------------------------------
# Locally optimal initialization (LOI).


def _with_pairs(
    leaves: list[Any],
    plan: _pairs.PairPlan,
    values: list[tuple[jax.Array, jax.Array]],
) -> list[Any]:
    """Leaves with every pair's factors replaced by canonical ``(a, b)`` values."""
    out = list(leaves)
    for pair, (a, b) in zip(plan.pairs, values):
        for role, index, x in (("a", pair.a_index, a), ("b", pair.b_index, b)):
            ref = leaves[index]
            out[index] = pair.restore(x, role, ref.shape).astype(ref.dtype)
    return out


def riemannion_loi_init(
    grad_fn: Callable[[Any], Any],
    params: Any,
    key: jax.Array,
    *,
    alpha: jax.typing.ArrayLike,
    pairs: _pairs.PairsLike = "auto",
    lora_scale: jax.typing.ArrayLike = 1.0,
    oversample: int = 8,
    power_iters: int = 1,
    gauge: Gauge = "balanced",
) -> Any:
    r"""Locally optimal initialization (LOI) of every LoRA pair from the first gradient.

    With :math:`G_0 = ∂L/∂ΔW` at :math:`ΔW = 0` and its top singular pairs
    :math:`G_0 ≈ \sum_i σ_i u_i v_i^\top`, each pair is set to

    .. math::

      c\, a b = α\, U_{[:, :r]} V_{[:, r:2r]}^\top .

    Every singular value of this point equals :math:`α`, and its tangent space
    :math:`\{U_{[:, :r]} K^\top + N V_{[:, r:2r]}^\top\}` contains the whole top-
    :math:`2r` part of :math:`G_0`. Hence :math:`\|P_T G_0\|_F^2 = \sum_{i \le 2r}
    σ_i^2`, the most any rank-:math:`r` point can capture, and the first Riemannion
    step uses all of it. :math:`⟨G_0, α U_{[:, :r]} V_{[:, r:2r]}^\top⟩ = 0`, so adding
    the adapter changes the loss only at second order in :math:`α`. The frozen
    weight :math:`W_0` is **not** shifted: this function sees only the tree it is
    given. To keep the model output exactly unchanged, subtract ``c · a @ b`` from
    the frozen weights yourself (PiSSA-style). Whether the paper shifts :math:`W_0`
    could not be checked.

    :math:`G_0` is never formed. A randomized SVD (Halko et al.) reads it only
    through backprop products: :math:`∂L/∂a` at :math:`a = 0, b = Ω^\top` is
    :math:`c\, G_0 Ω`, and :math:`∂L/∂b` at :math:`b = 0, a = Q` is
    :math:`c\, Q^\top G_0` (the paper's BackPropRSVD, per secondary sources). All
    pairs are sketched together, so every call of ``grad_fn`` sees every adapter at
    zero. The leaves keep their shapes, so sketches of width
    :math:`k = 2r + \text{oversample}` (random signs) are fed ``r`` columns per call.
    That is :math:`(2 + 2\,\text{power\_iters}) \lceil k / r \rceil` gradient
    evaluations, run one after another with :func:`jax.lax.map` (the memory of one
    backward pass). The whole computation is one jitted program.

    Args:
      grad_fn: ``params -> grads``, the gradient of the loss on a fixed batch for a
        tree shaped like ``params``, e.g. ``jax.grad(loss)``. It is traced (inside
        :func:`jax.lax.map`), so it must be a pure JAX function.
      params: the params tree; its LoRA pairs are replaced, other leaves are kept.
      key: PRNG key for the sketch.
      alpha: :math:`α > 0`, the spectral norm (and every singular value) of the
        initial product; about the learning rate is a reasonable scale.
      pairs: how to find factor pairs; see :func:`find_lora_pairs`.
      lora_scale: :math:`c` in ``ΔW = c · a @ b``.
      oversample: extra sketch columns beyond ``2r`` (capped at ``min(m, n)``).
      power_iters: power iterations of the randomized SVD.
      gauge: ``"balanced"`` (:math:`a = U_1 (α/c)^{1/2}`, :math:`b = (α/c)^{1/2}
        V_2^\top`) or ``"left_orthogonal"`` (:math:`a = U_1`, :math:`b = (α/c)
        V_2^\top`).

    Returns:
      A tree like ``params`` with every pair initialized, in the params' dtypes.

    Raises:
      ValueError: ``alpha <= 0``, bad ``oversample``/``power_iters``/``gauge``,
        ``2r > min(m, n)`` for a pair (naming it), or an unpaired factor.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from lora_muon_jax.peers import riemannion_loi_init
      >>> target = np.random.default_rng(0).standard_normal((12, 10))
      >>> params = {'lora_a': jnp.zeros((12, 2)), 'lora_b': jnp.zeros((2, 10))}
      >>> loss = lambda p: 0.5 * jnp.sum((p['lora_a'] @ p['lora_b'] - target) ** 2)
      >>> init = riemannion_loi_init(jax.grad(loss), params, jax.random.key(0),
      ...                            alpha=0.01, power_iters=2)
      >>> s = np.linalg.svd(init['lora_a'] @ init['lora_b'], compute_uv=False)
      >>> print(np.round(s[:3], 4))  # rank 2, both singular values alpha
      [0.01 0.01 0.  ]

    References:
      Bogachev et al., `LoRA meets Riemannion: Muon Optimizer for
      Parametrization-independent Low-Rank Adapters
      <https://arxiv.org/abs/2507.12142>`_, 2025

      Halko, Martinsson, Tropp, `Finding structure with randomness
      <https://arxiv.org/abs/0909.4061>`_, SIAM Review, 2011
    """
    _validation.check_scalar("alpha", alpha, low=0.0, low_inclusive=False, fn=_LOI_FN)
    _validation.check_scalar(
        "lora_scale", lora_scale, low=0.0, low_inclusive=False, fn=_LOI_FN
    )
    for name, value in (("oversample", oversample), ("power_iters", power_iters)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{_LOI_FN}: `{name}` must be an int >= 0; got {value!r}.")
    if gauge not in _GAUGES:
        raise ValueError(
            f"{_LOI_FN}: `gauge` must be one of {list(_GAUGES)}; got {gauge!r}."
        )

    paths, leaves, treedef = _pairs.flatten_with_paths(params)
    plan = _pairs.plan_pairs(paths, leaves, pairs)
    _check_ranks(_LOI_FN, plan, factor=2)
    if not plan.pairs:
        return params
    dims = [(p.batch_shape, p.m, p.n, p.rank) for p in plan.pairs]
    widths = [min(2 * r + oversample, m, n) for _, m, n, r in dims]
    chunks = max(math.ceil(k / r) for k, (_, _, _, r) in zip(widths, dims))

    def impl(
        leaves: list[Any], key: jax.Array, alpha: jax.Array, c: jax.Array
    ) -> list[Any]:
        def grads_at(values):
            values = _with_pairs(leaves, plan, values)
            tree = jax.tree_util.tree_unflatten(treedef, values)
            g_leaves = treedef.flatten_up_to(grad_fn(tree))
            return [
                tuple(x.astype(jnp.float32) / c for x in _pairwise.canonical(p, g_leaves))
                for p in plan.pairs
            ]

        def apply(sketches, transpose):
            # G Ω (or Gᵀ Q) for every pair at once, r sketch columns per gradient
            # call; lax.map runs the calls one after the other (one backward pass
            # of memory) and traces grad_fn once.
            padded = [
                jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, chunks * r - x.shape[-1])])
                for x, (_, _, _, r) in zip(sketches, dims)
            ]

            def one(j):
                values = []
                for x, (bs, m, n, r) in zip(padded, dims):
                    cols = jax.lax.dynamic_slice_in_dim(x, j * r, r, axis=-1)
                    if transpose:  # b = 0, a = Q: ∂L/∂b = c Qᵀ G
                        values.append((cols, jnp.zeros((*bs, r, n))))
                    else:  # a = 0, b = Ωᵀ: ∂L/∂a = c G Ω
                        values.append((jnp.zeros((*bs, m, r)), _t(cols)))
                return [_t(g_b) if transpose else g_a for g_a, g_b in grads_at(values)]

            stacked = jax.lax.map(one, jnp.arange(chunks))
            # (chunks, …, p, r) -> (…, p, chunks·r), then the sketch width.
            return [
                jnp.moveaxis(y, 0, -2).reshape(*y.shape[1:-1], -1)[..., : x.shape[-1]]
                for y, x in zip(stacked, sketches)
            ]

        orth = lambda ys: [_qr(y)[0] for y in ys]  # noqa: E731
        keys = jax.random.split(key, len(dims))
        # Random-sign (Rademacher) sketches: as good as Gaussian ones for a
        # randomized range finder, and much cheaper to compile.
        omegas = [
            jax.random.rademacher(k_i, (*bs, n, k), dtype=jnp.float32)
            for k_i, (bs, m, n, r), k in zip(keys, dims, widths)
        ]
        qs = orth(apply(omegas, False))
        qs = jax.lax.fori_loop(
            0, power_iters, lambda _, qs: orth(apply(orth(apply(qs, True)), False)), qs
        )
        values = []
        for q, bt, (_, _, _, r) in zip(qs, apply(qs, True), dims):
            # Gᵀ Q = V S Ŵᵀ, so G ≈ Q Qᵀ G = (Q Ŵ) S Vᵀ.
            v, _, wt = _svd(bt)
            u1 = _linalg.mm(q, _t(wt))[..., :, :r]
            v2 = v[..., :, r : 2 * r]
            if gauge == "balanced":
                h = jnp.sqrt(alpha / c)
                values.append((u1 * h, h * _t(v2)))
            else:
                values.append((u1, (alpha / c) * _t(v2)))
        return _with_pairs(leaves, plan, values)

    out = jax.jit(impl)(
        leaves, key, jnp.asarray(alpha, jnp.float32), jnp.asarray(lora_scale, jnp.float32)
    )
    return jax.tree_util.tree_unflatten(treedef, out)
