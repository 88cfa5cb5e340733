"""Riemannion: Muon on the manifold of fixed-rank matrices, for LoRA factor pairs.

A LoRA adapter ``ΔW = c · a @ b`` (``a: (*batch, m, r)``, ``b: (*batch, r, n)``) is
treated as a point ``X = c a b`` of the smooth manifold ``M_r`` of ``m × n`` matrices of
rank ``r``. Each step takes the Riemannian gradient (the projection of the dense
gradient ``G`` onto the tangent space ``T_X M_r``), mixes it with a momentum that is
carried from the previous tangent space by projection, orthogonalizes the result
(exact ``msign`` of a rank-``2r`` matrix), projects it back onto ``T_X M_r`` and
retracts with a rank-``r`` truncated SVD. The optimizer writes new factors, so its
update is ``new − old``.

What is implemented follows the full v2 text of the paper (arXiv 2507.12142v2):
Eq. 6-12, Alg. 1 (OrthoLR), Alg. 2 (ProjectLR), Alg. 4/5 (one step), with the
paper's two momentum readings available as ``stored_momentum`` (see
:func:`scale_by_riemannion`). The locally optimal initialization (§5, Alg. 3,
Alg. 5 lines 1-3) lives in :mod:`lora_muon_jax.peers._riemannion.loi` and one
pair's step on the manifold in :mod:`lora_muon_jax.peers._riemannion.fixed_rank`.
Sources and the points where the paper is ambiguous are listed in
:func:`riemannion`.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import (
    _lapack_order,
    _pair_tree,
    _pair_types,
    _sharding,
    _validation,
)
from lora_muon_jax.peers import _adamw_routing
from lora_muon_jax.peers._riemannion.fixed_rank import pair_step

__all__ = [
    "RiemannionState",
    "riemannion",
    "scale_by_riemannion",
]

_SCALE_FN = "scale_by_riemannion"
_ALIAS_FN = "riemannion"

Gauge: TypeAlias = Literal["balanced", "left_orthogonal"]
GAUGES = ("balanced", "left_orthogonal")
StoredMomentum: TypeAlias = Literal["buffer", "direction"]
_STORED_MOMENTA = ("buffer", "direction")


class RiemannionState(NamedTuple):
    """State of :func:`scale_by_riemannion`: a step count and one tangent momentum."""

    # shape=(), dtype=int32: step of the learning-rate schedule. The field shadows
    # tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]
    # Like params; dtype=mu_dtype (default: the param's dtype). For a pair, the
    # momentum is the tangent vector `mu_a @ b + c·a @ mu_b` at the current params.
    mu: optax.Updates


# ----------------------------------------------------------------------------------
# Validation.


def check_ranks(fn: str, plan: _pair_types.PairPlan, *, factor: int = 1) -> None:
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
    stored_momentum: str,
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
    _validation.check_choice(fn, "gauge", gauge, GAUGES)
    _validation.check_choice(fn, "stored_momentum", stored_momentum, _STORED_MOMENTA)


def _value_at(x: Any, count: jax.Array) -> Any:
    return x(count) if callable(x) else x


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
    pairs: _pair_types.PairsLike = "auto",
    gauge: Gauge = "balanced",
    stored_momentum: StoredMomentum = "buffer",
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
    writes :math:`a = U`, :math:`b = Σ V^\top / c`, the paper's
    :math:`(A_L, B) = (U, ΣV^\top)` (Alg. 4 line 7). The product trajectory does not
    depend on the gauge of the incoming factors (invariance to
    :math:`(a S, S^{-1} b)`), and the first update rewrites both factors into the
    chosen gauge.

    **Momentum: what is stored.** The paper describes its momentum in two ways that
    do not agree, and both are offered:

    * ``stored_momentum="buffer"`` (default), Eq. 10-12: the heavy-ball buffer
      :math:`M_t = β\,\mathcal T(M_{t-1}) + P_T(G_t)` is stored and only the step
      :math:`P_T(\operatorname{Ortho}_r(M_t))` is orthogonalized. It is written
      above in EMA form, which gives the same directions for a constant
      :math:`β` because ``msign`` ignores scale; this is Muon's rule carried to
      :math:`\mathcal M_r`.
    * ``stored_momentum="direction"``, Alg. 4 (lines 3, 6) and Alg. 5 (lines 10,
      13): the projected orthogonalized direction
      :math:`D_t = P_T(\operatorname{Ortho}_r(M_t))` is stored, and
      :math:`M_t = β\,\mathcal T(D_{t-1}) + P_T(G_t)` with no :math:`(1 - β)`.
      :math:`D` has spectral norm about 1 while :math:`G` has the loss's scale, so
      here the balance of memory and gradient depends on the scale of the loss,
      unlike the buffer form.

    Both are exactly invariant to the factorization. The prose of §6 describes
    Alg. 4 line 6 the same way as the algorithms; only Eq. 10-11 store the buffer.
    With ``nesterov=True`` the direction is :math:`β M_t + w\,P_T(G_t)`, with
    :math:`w = 1 - β` (buffer) or :math:`1` (direction); the paper has no Nesterov
    variant. The state depends on the
    returned factors: if something else changes the factors between steps, the
    momentum is re-projected onto the new tangent space. Do not combine this
    transformation with :func:`with_gauge_rebalancing`; the balanced gauge makes it
    unnecessary.

    **Retraction.** Alg. 4 line 5 (Alg. 5 line 12) as printed retracts
    :math:`[-η\dot A, A_L][B_R, -η(\dot B + γ B_R)]^\top`, which omits the current
    point; we retract :math:`(1 - λη) X - η D` (the point carried forward, as in
    Alg. 6 line 14), so :math:`λ` here is the paper's :math:`γ`.

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
      nesterov: use :math:`β m + w g` as the direction (see above). Static.
      lora_scale: :math:`c` in ``ΔW = c · a @ b`` (PEFT's ``alpha / r``).
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static.
      gauge: ``"balanced"`` or ``"left_orthogonal"``, the gauge of the returned
        factors. Static.
      stored_momentum: ``"buffer"`` (Eq. 10-12, default) or ``"direction"``
        (Alg. 4/5); see above. Static.
      mu_dtype: dtype of the momentum; ``None`` keeps each param's dtype.
      eps: relative threshold below which singular values (of the factors, of the
        momentum and of the new point) count as zero.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params`` and returns ``new_params − params`` in the params' dtype.

    Raises:
      ValueError: out-of-range hyperparameters or an unknown ``gauge`` or
        ``stored_momentum`` (at construction); an unpaired factor, a leaf in no
        pair, mismatched ranks, ``rank > min(m, n)`` or missing ``params`` (naming
        the leaf paths).
      TypeError: a complex, integer or boolean factor of a pair, in the params
        (at ``init``) or the updates (naming the leaf paths).

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
    _check_common(
        _SCALE_FN, learning_rate, beta, weight_decay, lora_scale, eps, gauge, stored_momentum
    )
    mu_dtype = _validation.float_dtype(_SCALE_FN, "mu_dtype", mu_dtype)

    def init_fn(params: Any) -> RiemannionState:
        plan = _pair_tree.check_init(_SCALE_FN, params, pairs)
        check_ranks(_SCALE_FN, plan)
        return RiemannionState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        )

    def update_fn(
        updates: Any, state: RiemannionState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, RiemannionState]:
        del extra_args
        tree = _pair_tree.flatten(_SCALE_FN, updates, params, pairs)
        check_ranks(_SCALE_FN, tree.plan)
        mu_leaves = tree.treedef.flatten_up_to(state.mu)
        eta = _value_at(learning_rate, state.count)
        lam = _value_at(weight_decay, state.count)

        per_pair, mu_out = [], []
        previous: tuple[Any, ...] = ()
        for pair in tree.plan.pairs:
            a, b = _pair_tree.canonical(pair, tree.params)
            # One pair's LAPACK calls after the previous pair's (_lapack_order.after).
            a = _lapack_order.after(a, *previous)
            dtype = jnp.promote_types(a.dtype, jnp.float32)

            def f(x: Any, dtype: Any = dtype) -> jax.Array:
                # QR needs whole columns: under explicit sharding the thin factors
                # are gathered along m and n (O((m + n) r) per pair, batch axes stay
                # sharded) and the results are resharded like the params below.
                x = jnp.asarray(x).astype(dtype)
                return _sharding.like_batch(x, x) if x.ndim >= 2 else x

            g_a, g_b = _pair_tree.canonical(pair, tree.grads)
            m_a, m_b = _pair_tree.canonical(pair, mu_leaves)
            out = pair_step(
                f(a),
                f(b),
                f(g_a),
                f(g_b),
                f(m_a),
                f(m_b),
                eta=f(eta),
                decay=f(lam) * f(eta),
                beta=f(beta),
                scale=f(lora_scale),
                eps=f(eps),
                nesterov=nesterov,
                gauge=gauge,
                stored_momentum=stored_momentum,
            )
            previous = (out.a,)
            per_pair.append((_like(out.a - f(a), a), _like(out.b - f(b), b)))
            mu_out.append(
                (
                    _store(_like(out.mu_a, m_a), mu_leaves[pair.a_index].dtype),
                    _store(_like(out.mu_b, m_b), mu_leaves[pair.b_index].dtype),
                )
            )
        return _pair_tree.scatter(tree, per_pair), RiemannionState(
            count=optax.safe_increment(state.count),
            mu=_pair_tree.scatter(tree, mu_out, like=mu_leaves),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def riemannion(
    learning_rate: optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    nesterov: bool = False,
    lora_scale: jax.typing.ArrayLike = 1.0,
    pairs: _pair_types.PairsLike = "auto",
    gauge: Gauge = "balanced",
    stored_momentum: StoredMomentum = "buffer",
    mu_dtype: Any = None,
    eps: jax.typing.ArrayLike = 1e-5,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    adam_eps_root: jax.typing.ArrayLike = 0.0,
    adam_weight_decay: jax.typing.ArrayLike = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    allow_no_pairs: bool = False,
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
    The momentum lives in the tangent space of the current point and is transported
    to the next one, so the updates must be applied: calling ``update`` again and
    again on unchanged params transports it onto the same point every time and it
    grows without bound (NaN after a few hundred calls).

    Args:
      learning_rate: :math:`η`, a float or a schedule.
      beta: momentum decay :math:`β`.
      weight_decay: :math:`λ`: the product decays by ``1 − λη`` per step.
      nesterov: Nesterov momentum. Static.
      lora_scale: :math:`c` in ``ΔW = c · a @ b``.
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static.
      gauge: gauge of the returned factors, ``"balanced"`` or ``"left_orthogonal"``.
        Static.
      stored_momentum: ``"buffer"`` (Eq. 10-12, default) or ``"direction"`` (the
        paper's Alg. 4/5); see :func:`scale_by_riemannion`. Static.
      mu_dtype: momentum dtype for every leaf (LoRA and AdamW); ``None`` keeps the
        param dtype.
      eps: relative singular-value threshold; see :func:`scale_by_riemannion`.
      adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay, adam_learning_rate:
        the :func:`optax.adamw` setting of that name for leaves in no pair
        (``adam_learning_rate=None``: ``learning_rate``).
      allow_no_pairs: accept a tree without LoRA pairs (AdamW on every leaf); see
        :func:`lora_muon_jax.lora_muon`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params``.

    Raises:
      ValueError: as :func:`scale_by_riemannion`.
      TypeError: as :func:`scale_by_riemannion` (leaves in no pair go to AdamW
        and are not checked; they may be complex).

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

    Sources:
      Primary, read in full: the paper's v2 text, Bogachev et al., arXiv
      2507.12142v2 (https://arxiv.org/abs/2507.12142v2; HTML
      https://arxiv.org/html/2507.12142v2), §3-6, Eq. 6-18, Alg. 1-5, App. A-B, F;
      OpenReview https://openreview.net/forum?id=WtbXgc9GVA. The authors' code,
      https://github.com/Bogachevv/RiemanianFinetune (named by the papernotes
      summary), could not be retrieved, so nothing here was checked against it.
      Secondary: lucmonl/mlopt, ``optimizer/riemannion.py``
      (https://github.com/lucmonl/mlopt), a federated re-implementation of Alg. 5
      that reads the stored momentum as the direction (Alg. 5 line 13), shifts
      the base weight (line 3) and notes the retraction typo of line 12;
      PyVent/OneTrainer, ``modules/util/optimizer/riemannion.py``
      (https://github.com/PyVent/OneTrainer), a port that stores the heavy-ball
      buffer and uses LOI with ``α = −0.01/√r``; the summaries at
      https://en.papernotes.org/ICLR2026/optimization/lora_meets_riemannion_muon_optimizer_for_parametrization-independent_low-rank_ad/,
      https://www.alphaxiv.org/overview/2507.12142v2 and
      https://www.sciencestack.ai/paper/2507.12142.
    """
    _check_common(
        _ALIAS_FN, learning_rate, beta, weight_decay, lora_scale, eps, gauge, stored_momentum
    )
    adamw = _adamw_routing.AdamWSettings(
        adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay
    )
    lora_tx = scale_by_riemannion(
        learning_rate,
        beta,
        weight_decay,
        nesterov=nesterov,
        lora_scale=lora_scale,
        pairs=pairs,
        gauge=gauge,
        stored_momentum=stored_momentum,
        mu_dtype=mu_dtype,
        eps=eps,
    )
    return _adamw_routing.for_lora_pairs(
        lora_tx, adamw, learning_rate, _ALIAS_FN, pairs, allow_no_pairs, mu_dtype
    )
