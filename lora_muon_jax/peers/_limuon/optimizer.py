"""LiMuon: Muon with a STORM variance-reduced momentum, optionally kept at low rank.

LiMuon (Huang, Luo, Chen, 2025) replaces Muon's heavy-ball momentum by the STORM
estimator, which needs the gradient at the previous point on the current batch,
and (Option #2) carries that momentum between steps as a randomized rank-``r̂``
SVD. It is a *dense-weight* optimizer: trees with LoRA factor pairs are rejected.

Sources. No public code ("TBD"). Primary: the abstract (arXiv 2509.14562 v1-v3:
STORM-style variance reduction plus randomized SVD, lower memory, ``O(ε^{-3})``
sample complexity, a Newton–Schulz variant). Secondary, and in agreement: the
project's notes (``docs/peers.md`` §LiMuon), built from the papernotes page of the
ICML 2026 version, the themoonlight review and the zij summary: Algorithm 1
(``M_0 = ∇f(W_0; ξ_0)``, ``O_t = U_t V_tᵀ``, ``M_{t+1} = g + (1-β)(M_t - g̃)``,
Option #2 with ``M̂_t = RSVD_r̂(M_t)``) and Algorithm 2 (Gaussian sketch with
oversampling ``s ≥ 2``, QR, small SVD). Re-read for this implementation: the
themoonlight review and the zij page state the same recursion and the same
``g̃ = ∇f(W_t; ξ_{t+1})``. Addresses: see :func:`limuon`.

The carried low-rank momentum (Option #2) lives in
:mod:`lora_muon_jax.peers._limuon.low_rank`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _key_paths, _lapack_order, _pair_tree, _pair_types, _validation
from lora_muon_jax.peers import _adamw_routing, _dense_weights
from lora_muon_jax.peers._limuon.low_rank import (
    LowRankMomentum,
    randomized_svd,
    reconstruct,
    zero_momentum,
)

_SCALE_FN = "scale_by_limuon"
_ALIAS_FN = "limuon"
PREV_GRADS = "prev_grads"


class LiMuonState(NamedTuple):
    """State of :func:`scale_by_limuon`."""

    # shape=(), dtype=int32. The field shadows tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]
    key: jax.Array  # raw PRNG key data (jax.random.key_data), dtype=uint32.
    # Option #1: the full momenta, like the params. Option #2: a LowRankMomentum.
    mu: optax.Updates | LowRankMomentum


def _prev_leaves(fn: str, updates: Any, prev: Any) -> list[Any]:
    """Leaves of ``prev_grads`` in the order of the updates' leaves, matched by path.

    Matching by path (a trailing Flax ``.value`` ignored) accepts a ``prev_grads``
    that is masked like the updates (``optax.partition(...,
    mask_compatible_extra_args=True)``) as well as the full, unmasked tree.
    """
    u_paths, u_leaves, _ = _key_paths.flatten_with_paths(updates)
    p_paths, p_leaves, _ = _key_paths.flatten_with_paths(prev)
    by_path = {_key_paths.normalized_path(p): x for p, x in zip(p_paths, p_leaves, strict=True)}
    out = []
    missing = []
    for path, g in zip(u_paths, u_leaves, strict=True):
        x = by_path.get(_key_paths.normalized_path(path))
        if x is None:
            missing.append(_key_paths.path_str(path))
        elif tuple(x.shape) != tuple(g.shape):
            raise ValueError(
                f"{fn}: `{PREV_GRADS}` at {_key_paths.path_str(path)} has shape "
                f"{tuple(x.shape)}, but the gradient has shape {tuple(g.shape)}."
            )
        out.append(x)
    if missing:
        raise ValueError(
            f"{fn}: `{PREV_GRADS}` must be a gradient tree like `updates`; it has no "
            f"leaf at {_dense_weights.shown_list(missing)}."
        )
    return out


def _storm_steps(
    grads: Sequence[jax.Array],
    momenta: Sequence[Any],
    prev_grads: Sequence[Any],
    carry: jax.Array,
    orthogonalize: Callable[[jax.Array], jax.Array],
    *,
    lapack_msign: bool,
    low_rank: tuple[jax.Array, int, int] | None,
) -> tuple[list[jax.Array], list[Any]]:
    """Every leaf's ``M_t = g_t + carry (M̂_{t-1} - g̃_t)``, its ``msign`` and ``M̂_t``.

    ``momenta`` are the carried ``M̂_{t-1}`` (arrays, or :class:`LowRankMomentum`
    with ``low_rank = (key, rank, oversampling)``). LAPACK calls (an SVD
    orthogonalizer, the randomized SVD) run one after another
    (:func:`lora_muon_jax._lapack_order.after`).
    """
    us: list[jax.Array] = []
    carried_out: list[Any] = []
    previous: tuple[jax.Array, ...] = ()
    for i, (g, mu, gt) in enumerate(zip(grads, momenta, prev_grads, strict=True)):
        g32 = _pair_tree.f32(g)
        carried = reconstruct(mu) if low_rank is not None else _pair_tree.f32(mu)
        correction = carried - (g32 if gt is None else _pair_tree.f32(gt))
        big_m = g32 + carry * correction
        if low_rank is not None or lapack_msign:
            big_m = _lapack_order.after(big_m, *previous)
        o = orthogonalize(big_m)
        us.append(o.astype(g.dtype))
        previous = (o,) if lapack_msign else ()  # Newton–Schulz: no LAPACK
        if low_rank is not None:
            key, rank, oversampling = low_rank
            low = randomized_svd(
                _lapack_order.after(big_m, *previous),
                jax.random.fold_in(key, i),
                rank,
                oversampling,
            )
            previous = (low.u,)
            carried_out.append([new.astype(old.dtype) for new, old in zip(low, mu, strict=True)])
        else:
            carried_out.append(big_m.astype(mu.dtype))
    return us, carried_out


def scale_by_limuon(
    beta: jax.typing.ArrayLike = 0.05,
    *,
    rank: int | None = None,
    oversampling: int = 2,
    orthogonalizer: _dense_weights.Orthogonalizer = "newton_schulz",
    ns_coeffs: Any = _dense_weights.MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: jax.typing.ArrayLike = 1e-8,
    seed: int = 0,
    mu_dtype: Any = None,
    pairs: _pair_types.PairsLike = "auto",
) -> optax.GradientTransformationExtraArgs:
    r"""Orthogonalizes a STORM variance-reduced momentum (LiMuon, Options #1 and #2).

    ``update(updates, state, params, prev_grads=g̃)`` takes the gradient
    :math:`g_t = ∇f(W_t; ξ_t)` at the current parameters on the current batch and,
    as the extra argument ``prev_grads``, :math:`\tilde g_t = ∇f(W_{t-1}; ξ_t)`:
    the gradient at the *previous* parameters on the *same* batch. With the
    carried momentum :math:`\hat M_{t-1}`:

    .. math::

      M_t &= g_t + (1-β)\,(\hat M_{t-1} - \tilde g_t), \qquad
      u_t = \operatorname{msign}(M_t) = U_t V_t^\top \quad (M_t = U_t Σ_t V_t^\top) \\
      \hat M_t &= M_t \ \text{(Option \#1)} \quad \text{or} \quad
      \operatorname{RSVD}_{\hat r}(M_t) \ \text{(Option \#2, ``rank=r̂``)}

    This is the paper's Algorithm 1 with its indices shifted by one (there
    :math:`M_{t+1}` is formed after the step :math:`W_{t+1} = W_t - η O_t`): the
    returned update is the step away from the current parameters. The full-rank
    :math:`M_t`, which holds the fresh gradient, is orthogonalized; only the
    carried state is compressed. :math:`β` follows STORM: a *small* β means long
    memory (``β = 1``: no memory, plain ``msign(g)``).

    * First step (``count == 0``): :math:`M_0 = g_0`, the paper's initialization;
      ``prev_grads`` is ignored (there is no previous point).
    * ``prev_grads`` absent on a later step: :math:`\tilde g_t := g_t`, so
      :math:`M_t = β g_t + (1-β) \hat M_{t-1}`: Muon's heavy-ball momentum with
      decay :math:`1-β` and no variance reduction. This is also what every
      wrapper that does not forward extra arguments gets.

    Step order in a training loop (the paper's needs two gradients per step on
    the same batch):

    1. draw batch :math:`ξ_t`; 2. :math:`g_t = ∇f(W_t; ξ_t)`;
    3. :math:`\tilde g_t = ∇f(W_{t-1}; ξ_t)`, with :math:`W_{t-1}` kept by the
    loop from the previous step; 4. ``update(g_t, state, W_t, prev_grads=g̃_t)``;
    5. apply, and keep :math:`W_t` as the next previous point.

    The loop can avoid keeping :math:`W_{t-1}` by delaying the application of
    each update instead (``docs/peers.md`` §LiMuon): compute :math:`\tilde g` at the
    current point on the next batch *before* applying the pending update, apply it,
    then compute :math:`g` at the new point. Both orders give identical iterates and
    both hold one extra params-sized array between steps (previous params or the
    pending update): Option #2 shrinks the optimizer state, not that buffer.

    Args:
      beta: STORM weight :math:`β` in ``(0, 1]``; the carried momentum is
        multiplied by :math:`1-β`. The default 0.05 makes the no-``prev_grads``
        fallback Muon's usual momentum 0.95.
      rank: ``None`` (default): Option #1, the full ``m×n`` momentum is carried.
        An int ``r̂``: Option #2, carry ``U (m×r̂), S (r̂), V (n×r̂)`` from a
        randomized SVD, ``(m+n) r̂ + r̂`` floats per matrix (``r̂`` capped at
        ``min(m, n)``). Static.
      oversampling: extra sketch columns ``s`` of the randomized SVD (paper:
        ``s >= 2``). Static.
      orthogonalizer: ``"newton_schulz"`` (Muon's quintic iteration, default; the
        paper's Algorithm 3 variant), ``"polar_express"`` or ``"svd"`` (exact
        ``U Vᵀ``, the paper's Algorithm 1). Static.
      ns_coeffs: Newton–Schulz coefficients, shape ``(3,)`` or ``(k, 3)``.
      ns_steps: Newton–Schulz steps. Static.
      eps: added to the Frobenius norm before Newton–Schulz.
      seed: integer seed of the sketch's PRNG key; the key is stored in the state
        and split every step.
      mu_dtype: dtype of the carried momentum; ``None`` keeps the param dtype.
        Pass a string under ``inject_hyperparams``.
      pairs: LoRA pair rules; a tree with LoRA pairs is rejected, ``pairs=()``
        turns the detection off.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` reading the extra
      argument ``prev_grads`` (a tree like ``updates``, or a masked version).

    Raises:
      ValueError: out-of-range hyperparameters; a leaf with ``ndim < 2``; LoRA
        pairs in the tree; a ``prev_grads`` that misses a leaf or has a wrong
        shape.
      TypeError: a ``rank``, ``oversampling`` or ``ns_steps`` that is not an int;
        a complex, integer or boolean matrix leaf in the params (at ``init``) or
        the updates (naming the leaf paths).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.peers import scale_by_limuon
      >>> tx = scale_by_limuon(beta=0.1, rank=2, orthogonalizer="svd")
      >>> params = {'w': jnp.zeros((6, 5))}
      >>> state = tx.init(params)
      >>> [x['w'].shape for x in state.mu]  # U, S, V: (6 + 5) * 2 + 2 floats
      [(6, 2), (2,), (5, 2)]
      >>> g = {'w': jnp.arange(30.0).reshape(6, 5) / 30}
      >>> u, state = tx.update(g, state, params)
      >>> g2, g2_prev = {'w': jnp.ones((6, 5))}, {'w': jnp.eye(6, 5)}
      >>> u, state = tx.update(g2, state, params, prev_grads=g2_prev)
      >>> print(jnp.round(jnp.linalg.svd(u['w'], compute_uv=False), 3))
      [1. 1. 1. 1. 1.]

    References:
      Huang, Luo, Chen, `LiMuon: Light and Fast Muon Optimizer for Large Models
      <https://arxiv.org/abs/2509.14562>`_, 2025

      Cutkosky, Orabona, `Momentum-Based Variance Reduction in Non-Convex SGD
      <https://arxiv.org/abs/1905.10018>`_, 2019

      Halko, Martinsson, Tropp, `Finding Structure with Randomness
      <https://arxiv.org/abs/0909.4061>`_, 2011
    """
    _check(_SCALE_FN, beta, rank, oversampling, orthogonalizer, ns_coeffs, ns_steps, eps)
    mu_dtype = _validation.float_dtype(_SCALE_FN, "mu_dtype", mu_dtype)

    def orthogonalize(x: jax.Array) -> jax.Array:
        return _dense_weights.orthogonalize(
            x, orthogonalizer, ns_coeffs=ns_coeffs, ns_steps=ns_steps, eps=eps
        )

    def init_fn(params: Any) -> LiMuonState:
        _dense_weights.reject_lora_pairs(_SCALE_FN, params, pairs)
        _dense_weights.check_matrices(_SCALE_FN, params, _ALIAS_FN)
        if rank is None:
            mu = optax.tree.zeros_like(params, dtype=mu_dtype)
        else:
            mu = zero_momentum(params, rank, mu_dtype)
        key = jax.random.key_data(jax.random.key(seed))
        return LiMuonState(count=jnp.zeros([], jnp.int32), key=key, mu=mu)

    def update_fn(
        updates: Any, state: LiMuonState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LiMuonState]:
        del params
        _dense_weights.reject_lora_pairs(_SCALE_FN, updates, pairs)
        _dense_weights.check_matrices(_SCALE_FN, updates, _ALIAS_FN, "updates")
        treedef: Any  # a jax.tree_util.PyTreeDef
        grads, treedef = jax.tree.flatten(updates)
        prev = extra_args.get(PREV_GRADS)
        prev_leaves = (
            [None] * len(grads) if prev is None else _prev_leaves(_SCALE_FN, updates, prev)
        )
        key, step_key = jax.random.split(jax.random.wrap_key_data(state.key))
        # No carried momentum on the first step: M_0 = g_0 (Algorithm 1).
        carry = jnp.where(state.count > 0, 1.0 - jnp.asarray(beta, jnp.float32), 0.0)
        if rank is None:
            momenta: list[Any] = treedef.flatten_up_to(state.mu)
        else:
            trees = (treedef.flatten_up_to(t) for t in state.mu)
            momenta = [LowRankMomentum(*x) for x in zip(*trees, strict=True)]
        us, carried = _storm_steps(
            grads,
            momenta,
            prev_leaves,
            carry,
            orthogonalize,
            lapack_msign=orthogonalizer == "svd",
            low_rank=None if rank is None else (step_key, rank, oversampling),
        )
        if rank is None:
            new_mu: Any = jax.tree.unflatten(treedef, carried)
        else:
            fields = [[leaf[k] for leaf in carried] for k in range(3)]
            new_mu = LowRankMomentum(*(jax.tree.unflatten(treedef, f) for f in fields))
        new_state = LiMuonState(
            count=optax.safe_increment(state.count), key=jax.random.key_data(key), mu=new_mu
        )
        return jax.tree.unflatten(treedef, us), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check(
    fn: str,
    beta: Any,
    rank: Any,
    oversampling: Any,
    orthogonalizer: Any,
    ns_coeffs: Any,
    ns_steps: Any,
    eps: Any,
) -> None:
    _validation.check_scalar("beta", beta, low=0.0, high=1.0, low_inclusive=False, fn=fn)
    _validation.check_scalar("eps", eps, low=0.0, fn=fn)
    if rank is not None:
        _validation.check_static_int(fn, "rank", rank)
    _validation.check_static_int(fn, "oversampling", oversampling, low=0)
    _dense_weights.check_orthogonalizer(fn, orthogonalizer, ns_coeffs, ns_steps)


def limuon(
    learning_rate: optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike = 0.05,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    rank: int | None = None,
    oversampling: int = 2,
    orthogonalizer: _dense_weights.Orthogonalizer = "newton_schulz",
    ns_coeffs: Any = _dense_weights.MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: jax.typing.ArrayLike = 1e-8,
    seed: int = 0,
    mu_dtype: Any = None,
    shape_scaling: _dense_weights.ShapeScaling = "none",
    consistent_rms: jax.typing.ArrayLike | None = None,
    weight_decay_mask: Any = None,
    pairs: _pair_types.PairsLike = "auto",
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    adam_eps_root: jax.typing.ArrayLike = 0.0,
    adam_weight_decay: jax.typing.ArrayLike = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LiMuon: variance-reduced, optionally low-memory Muon for dense matrices.

    Matrix leaves (``ndim >= 2``; leading axes are batch axes) follow
    :func:`scale_by_limuon`, then an optional shape scaling, decoupled weight
    decay and the learning rate: :math:`W \leftarrow W - η\,(s\, U V^\top + λ W)`.
    Other leaves go to :func:`optax.adamw` with the ``adam_*`` arguments (they
    ignore ``prev_grads``). Pass ``prev_grads=`` to ``update`` (or to
    ``nnx.Optimizer.update``, which forwards keyword arguments); see
    :func:`scale_by_limuon` for its meaning, the step order and what happens
    without it. Trees with LoRA factor pairs are rejected.

    Scaling: ``shape_scaling="none"`` (default) is the paper's step,
    :math:`s = 1`. ``"muon"`` multiplies by :math:`\sqrt{\max(1, n/m)}` for a
    ``(*batch, m, n)`` leaf, as :func:`optax.contrib.muon` does by default;
    ``consistent_rms=c`` uses :math:`c\sqrt{\max(m, n)}` instead.

    Under :func:`optax.inject_hyperparams` pass
    ``static_args=('rank', 'oversampling', 'ns_steps')``.

    Args:
      learning_rate: :math:`η`, a float or an optax schedule.
      beta: STORM weight (small = long memory).
      weight_decay: decoupled weight decay :math:`λ` of matrix leaves.
      rank: ``None`` for Option #1, or ``r̂`` for Option #2. Static.
      oversampling: randomized-SVD oversampling. Static.
      orthogonalizer: ``"newton_schulz"``, ``"polar_express"`` or ``"svd"``.
      ns_coeffs: Newton–Schulz coefficients.
      ns_steps: Newton–Schulz steps. Static.
      eps: Newton–Schulz normalization epsilon.
      seed: seed of the sketch PRNG key (stored in the state).
      mu_dtype: dtype of the carried momentum (and of AdamW's first moment).
      shape_scaling: ``"none"`` (paper) or ``"muon"``.
      consistent_rms: overrides ``shape_scaling`` with ``c · sqrt(max(m, n))``.
      weight_decay_mask: optional mask for ``weight_decay``.
      pairs: LoRA pair rules; ``pairs=()`` turns the rejection off.
      adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay, adam_learning_rate:
        the :func:`optax.adamw` setting of that name for leaves with ``ndim < 2``
        (``adam_learning_rate=None``: ``learning_rate``).

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` reads the
      extra argument ``prev_grads``.

    Raises:
      ValueError, TypeError: as :func:`scale_by_limuon`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.peers import limuon
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> xs = jax.random.normal(k1, (64, 8))
      >>> w_true = jax.random.normal(k2, (8, 4))
      >>> def loss(p, x):
      ...   return jnp.mean((x @ p['w'] - x @ w_true) ** 2)
      >>> tx = limuon(learning_rate=0.1, beta=0.2, rank=2)
      >>> params = prev = {'w': jnp.zeros((8, 4))}
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, prev, state, x):
      ...   g = jax.grad(loss)(params, x)
      ...   g_prev = jax.grad(loss)(prev, x)  # previous params, same batch
      ...   updates, state = tx.update(g, state, params, prev_grads=g_prev)
      ...   return optax.apply_updates(params, updates), params, state
      >>> start = loss(params, xs)
      >>> for t in range(60):
      ...   params, prev, state = step(params, prev, state, xs[t % 8::8])
      >>> bool(loss(params, xs) < 0.05 * start)  # 20x lower (0.02-0.03 here)
      True

    References:
      See :func:`scale_by_limuon`.

    Sources:
      Primary: Huang, Luo, Chen, *LiMuon: Light and Fast Muon Optimizer for Large
      Models*, arXiv 2509.14562 (https://arxiv.org/abs/2509.14562), read as
      its abstract (v1-v3). Authors' code: not found (the papernotes page lists
      it as "TBD").
      Secondary: the papernotes summary of the ICML 2026 version,
      https://en.papernotes.org/ICML2026/optimization/limuon_light_and_fast_muon_optimizer_for_large_models/;
      the zij page, https://junaidaliop.github.io/zij/math/limuon/ (the STORM
      recursion with ``g̃ = ∇f(W_t; ξ_{t+1})``); the alphaXiv overview,
      https://www.alphaxiv.org/overview/2509.14562; the themoonlight review
      (address not found). Third-party PyTorch ``LiMuon`` classes citing
      Algorithms 1 and 2 exist in public code; their repository: not found.
    """
    _check(_ALIAS_FN, beta, rank, oversampling, orthogonalizer, ns_coeffs, ns_steps, eps)
    _validation.check_choice(
        _ALIAS_FN, "shape_scaling", shape_scaling, _dense_weights.SHAPE_SCALINGS
    )
    adamw = _adamw_routing.AdamWSettings(
        adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay
    )
    matrix_tx = optax.chain(
        scale_by_limuon(
            beta,
            rank=rank,
            oversampling=oversampling,
            orthogonalizer=orthogonalizer,
            ns_coeffs=ns_coeffs,
            ns_steps=ns_steps,
            eps=eps,
            seed=seed,
            mu_dtype=mu_dtype,
            pairs=pairs,
        ),
        _dense_weights.scale_by_matrix_shape(shape_scaling, consistent_rms),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _adamw_routing.for_matrices(matrix_tx, adamw, learning_rate, _ALIAS_FN, pairs, mu_dtype)
