"""LoRA-RITE: transformation-invariant adaptive preconditioning of LoRA factor pairs.

The transformation and its alias; the per-step maths of a stack of pairs lives in
:mod:`lora_muon_jax.peers._lora_rite.preconditioner`. Sources (paper, the authors'
code, reimplementations, with addresses) are listed in :func:`lora_rite`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _key_paths, _lapack_order, _pair_tree, _pair_types, _validation
from lora_muon_jax.peers import _adamw_routing
from lora_muon_jax.peers._lora_rite import preconditioner as pc

_SCALE_FN = "scale_by_lora_rite"
_ALIAS_FN = "lora_rite"


class LoRARiteState(NamedTuple):
    """State of :func:`scale_by_lora_rite`: moments, previous bases, escaped mass.

    Every field but ``count`` is a tree with the structure of the params; a
    factor's ``nu`` and ``escape`` leaves have the shapes given below instead of
    the factor's own (``batch`` is the pair's batch shape).
    """

    # shape=(), dtype=int32. The field shadows tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]
    mu: optax.Updates  # first moments, like params; dtype=mu_dtype (default: param dtype).
    nu: optax.Updates  # r×r second moments per factor, shape (*batch, r, r), float32+.
    basis: optax.Updates  # previous QR bases, like params (b holds Qᵀ), float32+.
    escape: optax.Updates  # escaped mass ρ per factor, shape (*batch,), float32+.


class _StateLeaves(NamedTuple):
    """The state's trees as leaf lists, in the order of the updates' leaves."""

    mu: list[Any]
    nu: list[Any]
    basis: list[Any]
    escape: list[Any]


class _Group(NamedTuple):
    """Same-shaped pairs stacked on a new leading axis, after pass 1."""

    members: list[_pair_types.LoRAPair]
    a: pc.Factor  # a, tall
    b: pc.Factor  # bᵀ, tall
    pass1: pc.Unmagnified


def _compute_dtype(dtype: Any) -> Any:
    # float32 at least (bf16/f16 factors), float64 when the params are float64.
    return jnp.promote_types(dtype, jnp.float32)


def _check_shapes(fn: str, pair: _pair_types.LoRAPair) -> None:
    # Thin QR gives an r×r R only when both matrix sizes are at least the rank; the
    # reference fails later with a shape error otherwise.
    if pair.m < pair.rank or pair.n < pair.rank:
        raise ValueError(
            f"{fn}: the pair ({pair.a_path}, {pair.b_path}) has m={pair.m}, n={pair.n} "
            f"and rank r={pair.rank}; LoRA-RITE needs m >= r and n >= r (its r×r "
            "bases come from thin QR of each factor)."
        )


def _tall(x: jax.Array, role: str) -> jax.Array:
    return x if role == "a" else jnp.swapaxes(x, -1, -2)


def _stacked_factor(
    members: Sequence[_pair_types.LoRAPair],
    role: Literal["a", "b"],
    dtype: Any,
    tree: _pair_tree.PairTree,
    state: _StateLeaves,
) -> pc.Factor:
    """One factor of every pair of a group, canonical and tall, stacked, in ``dtype``."""

    def one(pair: _pair_types.LoRAPair) -> pc.Factor:
        index = pair.a_index if role == "a" else pair.b_index

        def tall(leaves: Sequence[Any]) -> jax.Array:
            return _tall(pair.canonical(leaves[index], role).astype(dtype), role)

        return pc.Factor(
            param=tall(tree.params),
            grad=tall(tree.grads),
            mu=tall(state.mu),
            basis_old=tall(state.basis),
            nu=state.nu[index].astype(dtype),
            escape=state.escape[index].astype(dtype),
        )

    return jax.tree.map(lambda *xs: jnp.stack(xs), *(one(pair) for pair in members))


def _pass1(tree: _pair_tree.PairTree, state: _StateLeaves, update_skipping: Any) -> list[_Group]:
    """Every group's bases and unmagnified gradients (the clip needs all of them first).

    Pairs of identical shapes (the adapters of an unscanned model) are stacked on a
    new leading axis and computed as one: compile time and kernel count grow with
    the number of distinct shapes, not of adapters.
    """
    groups: list[_Group] = []
    previous: tuple[Any, ...] = ()  # LAPACK calls one at a time: _lapack_order.after
    for members in _pair_tree.same_shape_groups(tree):
        dtype = _compute_dtype(tree.params[members[0].a_index].dtype)
        fa, fb = (_stacked_factor(members, role, dtype, tree, state) for role in ("a", "b"))
        pass1 = pc.unmagnify(fa, fb, jnp.asarray(update_skipping, dtype), previous)
        previous = (pass1.ri_a,)
        groups.append(_Group(members, fa, fb, pass1))
    return groups


def scale_by_lora_rite(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    *,
    clip_unmagnified_grad: jax.typing.ArrayLike = 1.0,
    update_skipping: jax.typing.ArrayLike = 1.0,
    update_capping: jax.typing.ArrayLike = 0.0,
    apply_escape: bool = False,
    pairs: _pair_types.PairsLike = "auto",
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales LoRA factor gradients with LoRA-RITE's invariant r×r preconditioner.

    Each factor is treated as a tall matrix ``X`` (``a`` of shape ``(m, r)``, or
    ``bᵀ`` of shape ``(n, r)``) with partner ``Y`` (``bᵀ`` or ``a``). Per step, with
    :math:`t` the 0-based count and :math:`d(β) = β(1-β^t)/(1-β^{t+1})`:

    .. math::

      Q_Y R_Y &= \operatorname{qr}(Y), \qquad \bar g_X = g_X R_Y^{+}
          \quad (= G Q_Y \text{: the "unmagnified" gradient}) \\
      \bar g_X &\leftarrow 0 \text{ if } \operatorname{rms}(\bar g_X) > τ_{skip};
          \qquad \bar g \leftarrow \bar g\, τ_{clip}/c \text{ if }
          c = \|\bar g\|_{\text{all pairs}} > τ_{clip} \\
      P_X &= Q_Y^\top Q_Y^{old}, \qquad
          V_X \leftarrow d(β_2) \operatorname{sym}(P_X V_X P_X^\top)
          + (1-d(β_2))\, \bar g_X^\top \bar g_X / \mathrm{rows}_X \\
      S_X &= \bar g_X\, E \operatorname{diag}\big(1/(\sqrt{λ + ρ_X} + ε)\big) E^\top
          \quad (V_X = E \operatorname{diag}(λ) E^\top) \\
      M_X &\leftarrow d(β_1)\, M_X P_X^\top + (1-d(β_1))\, S_X, \qquad
          u_X = \operatorname{cap}(M_X)\, R_Y^{+\top},

    where :math:`ρ_X` is the escaped mass (0 unless ``apply_escape``), and ``Q_Y``
    becomes the next step's ``Q_Y^{old}`` (zero at the first step, so the moments
    start from zero). The preconditioner lives in the partner's column
    basis and is transported when that basis moves, so the product step is
    invariant to every gauge change :math:`(a, b) → (a S, S^{-1} b)`; the RMS-based
    skip, cap and the global clip are invariant too, since ``ḡ`` only rotates.
    With :math:`β_1 = β_2 = 0` and no clip, skip or :math:`ε`,
    :math:`u_X = \sqrt{\mathrm{rows}_X}\, \operatorname{msign}(g_X S_Y^{-1/2})
    S_Y^{-1/2}`: ``2 √rows`` times :func:`scale_by_lora_muon`'s direction.

    This follows the first author's public PyTorch reimplementation (class
    ``LoRARite``, ``gkevinyen5418/LoRA-RITE`` commit ``c9bb451``), read and run
    against this code: the same defaults (``eps`` outside the square root,
    ``clip_unmagnified_grad=1.0`` as a *global* norm over every pair the
    transformation sees, ``update_skipping=1.0`` on, no capping, no escape), the
    ``/rows`` normalization, the bias-corrected decays with no other bias
    correction, the second moment updated before use, the first moment averaging
    the preconditioned update, and the escape rule. Its ``lora_A`` (r, n) is our
    ``b`` and its ``lora_B`` (m, r) is our ``a``. Where it differs:

    * Eigenvalues of ``V`` are clamped at zero. The reference leaves them signed,
      so a rank-deficient gradient can give ``√(negative) = NaN``, which its
      ``nan_to_num`` turns into a zero update for that whole factor. Finite inputs
      give finite updates here, and the result is the reference's in exact
      arithmetic. Its other ``nan_to_num`` calls (non-finite gradients) are not
      copied: use :func:`optax.apply_if_finite`.
    * Batch axes (scanned layers, experts) are independent matrices: QR, skip and
      cap act per matrix; the reference flattens a factor into one matrix. The
      global clip still spans everything.
    * ``relative_epsilon`` (which crashes the reference) and ``balance_param``
      are not offered; weight decay is :func:`lora_rite`'s job.
    * Factors may be bf16: all of the above runs in float32 (float64 for float64
      params), and the bases are stored in that precision.
    * Under explicit sharding each thin factor is gathered for its QR (``rows × r``
      numbers); everything else reduces only r×r matrices or scalars.

    The default skip is easy to trip: a factor is skipped whenever the RMS of
    ``G Q`` exceeds 1, so with a *summed* loss (or large gradients) every step can
    be skipped and nothing trains. Use mean-reduced losses, as the reference's
    experiments do, or ``update_skipping=0``.

    Every leaf of the tree must belong to a pair; :func:`lora_rite` routes other
    leaves to AdamW. The clip couples all pairs seen by one ``update`` (pairs split
    across separate transformations, e.g. by :func:`optax.partition`, are clipped
    separately).

    Args:
      b1: first-moment decay :math:`β_1` in ``[0, 1)``.
      b2: second-moment decay :math:`β_2` in ``[0, 1)``.
      eps: :math:`ε` added to the square roots of the eigenvalues.
      clip_unmagnified_grad: :math:`τ_{clip}`: the unmagnified gradients of all
        pairs are scaled to global L2 norm at most this; ``0`` turns it off.
      update_skipping: :math:`τ_{skip}`: a factor's unmagnified gradient is zeroed
        for the step if its RMS exceeds this (its moments still decay); ``0``
        turns it off. On by default, like the reference.
      update_capping: :math:`τ_{cap}`: the first moment is scaled to RMS at most
        this before the magnitude is restored; ``0`` (default) turns it off.
      apply_escape: add the second-moment mass lost by each basis transport,
        decayed like ``V``, to the eigenvalues. Costs four r×r ``eigvalsh`` per
        pair. Static.
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static.
      mu_dtype: dtype of the first moments; ``None`` keeps each param's dtype.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params``.

    Raises:
      ValueError: out-of-range or non-finite hyperparameters (at construction); an
        unpaired factor, mismatched ranks, batch axes or dtypes, a factor with fewer
        rows than the rank, a leaf in no pair, or missing ``params`` (at trace
        time, naming the leaf paths).
      TypeError: a complex, integer or boolean factor of a pair, in the params
        (at ``init``) or the updates (naming the leaf paths).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.peers import scale_by_lora_rite
      >>> k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
      >>> params = {'lora_a': jax.random.normal(k1, (4, 2)),
      ...           'lora_b': jax.random.normal(k2, (2, 3))}
      >>> grads = {'lora_a': jax.random.normal(k3, (4, 2)),
      ...          'lora_b': jax.random.normal(k1, (2, 3))}
      >>> tx = scale_by_lora_rite(b1=0.0, b2=0.0, eps=0.0, clip_unmagnified_grad=0.0,
      ...                         update_skipping=0.0)
      >>> u, _ = tx.update(grads, tx.init(params), params)
      >>> # Whitened: every singular value of u_a b is √m = 2, of a u_b is √n = √3.
      >>> sv = lambda x: jnp.linalg.svd(x, compute_uv=False)[:2].tolist()
      >>> print([f"{s:.3f}" for s in sv(u['lora_a'] @ params['lora_b'])
      ...                          + sv(params['lora_a'] @ u['lora_b'])])
      ['2.000', '2.000', '1.732', '1.732']

    References:
      Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh, Kumar, `LoRA Done RITE: Robust
      Invariant Transformation Equilibration for LoRA Optimization
      <https://arxiv.org/abs/2410.20625>`_, ICLR 2025

      `gkevinyen5418/LoRA-RITE <https://github.com/gkevinyen5418/LoRA-RITE>`_, the
      first author's PyTorch reimplementation (``lora_rite.py``)

      Shazeer and Stern, `Adafactor: Adaptive Learning Rates with Sublinear Memory
      Cost <https://arxiv.org/abs/1804.04235>`_, 2018 (bias-corrected decay, §7.1)
    """
    _check_hparams(_SCALE_FN, b1, b2, eps, clip_unmagnified_grad, update_skipping, update_capping)
    mu_dtype = _validation.float_dtype(_SCALE_FN, "mu_dtype", mu_dtype)

    def init_fn(params: Any) -> LoRARiteState:
        plan = _pair_tree.check_init(_SCALE_FN, params, pairs)
        for pair in plan.pairs:
            _check_shapes(_SCALE_FN, pair)
        _, leaves, treedef = _key_paths.flatten_with_paths(params)
        nu, escape = list(leaves), list(leaves)
        for pair in plan.pairs:
            dtype = _compute_dtype(leaves[pair.a_index].dtype)
            for index in (pair.a_index, pair.b_index):
                nu[index] = jnp.zeros((*pair.batch_shape, pair.rank, pair.rank), dtype)
                escape[index] = jnp.zeros(pair.batch_shape, dtype)
        return LoRARiteState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            nu=jax.tree_util.tree_unflatten(treedef, nu),
            basis=jax.tree.map(lambda p: jnp.zeros_like(p, _compute_dtype(p.dtype)), params),
            escape=jax.tree_util.tree_unflatten(treedef, escape),
        )

    def update_fn(
        updates: Any, state: LoRARiteState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LoRARiteState]:
        del extra_args
        tree = _pair_tree.flatten(_SCALE_FN, updates, params, pairs)
        for pair in tree.plan.pairs:
            _check_shapes(_SCALE_FN, pair)
        old = _StateLeaves(
            *(
                tree.treedef.flatten_up_to(t)
                for t in (state.mu, state.nu, state.basis, state.escape)
            )
        )
        groups = _pass1(tree, old, update_skipping)
        clip = pc.clip_scale(
            [g for group in groups for g in (group.pass1.g_a, group.pass1.g_b)],
            clip_unmagnified_grad,
        )
        # Pass 2, every group: moments in the partner's moving basis, preconditioning.
        per_pair, new_mu, new_basis = [], [], []
        nu_out, esc_out = list(old.nu), list(old.escape)
        previous: tuple[Any, ...] = (groups[-1].pass1.ri_a,) if groups else ()
        for group in groups:
            dtype = group.a.param.dtype
            hp = pc.Hyper.make(dtype, state.count, b1, b2, eps, update_capping)
            c = _lapack_order.after(clip.astype(dtype), *previous)
            step = pc.pair_step(group.a, group.b, group.pass1, c, hp, apply_escape)
            previous = (step.update_a,)
            q_a, q_b = group.pass1.q_a, group.pass1.q_b
            for k, pair in enumerate(group.members):
                per_pair.append((step.update_a[k], _tall(step.update_b[k], "b")))
                new_mu.append((step.mu_a[k], _tall(step.mu_b[k], "b")))
                new_basis.append((q_a[k], _tall(q_b[k], "b")))
                nu_out[pair.a_index], nu_out[pair.b_index] = step.nu[0, k], step.nu[1, k]
                esc_out[pair.a_index], esc_out[pair.b_index] = step.escape[0, k], step.escape[1, k]
        ordered = tuple(pair for group in groups for pair in group.members)
        tree = tree._replace(plan=tree.plan._replace(pairs=ordered))
        return _pair_tree.scatter(tree, per_pair), LoRARiteState(
            count=optax.safe_increment(state.count),
            mu=_pair_tree.scatter(tree, new_mu, like=old.mu),
            nu=_pair_tree.unflatten(tree, nu_out),
            basis=_pair_tree.scatter(tree, new_basis, like=old.basis),
            escape=_pair_tree.unflatten(tree, esc_out),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _check_hparams(fn: str, b1: Any, b2: Any, eps: Any, clip: Any, skip: Any, cap: Any) -> None:
    _validation.check_scalar("b1", b1, low=0.0, high=1.0, high_inclusive=False, fn=fn)
    _validation.check_scalar("b2", b2, low=0.0, high=1.0, high_inclusive=False, fn=fn)
    _validation.check_scalar("eps", eps, low=0.0, fn=fn)
    _validation.check_scalar("clip_unmagnified_grad", clip, low=0.0, fn=fn)
    _validation.check_scalar("update_skipping", skip, low=0.0, fn=fn)
    _validation.check_scalar("update_capping", cap, low=0.0, fn=fn)


def lora_rite(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    clip_unmagnified_grad: jax.typing.ArrayLike = 1.0,
    update_skipping: jax.typing.ArrayLike = 1.0,
    update_capping: jax.typing.ArrayLike = 0.0,
    apply_escape: bool = False,
    pairs: _pair_types.PairsLike = "auto",
    mu_dtype: Any = None,
    weight_decay_mask: Any = None,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    adam_eps_root: jax.typing.ArrayLike = 0.0,
    adam_weight_decay: jax.typing.ArrayLike = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    allow_no_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-RITE: invariant adaptive preconditioning for LoRA adapters.

    For each factor pair (found by ``pairs``) it chains :func:`scale_by_lora_rite`,
    :func:`optax.add_decayed_weights` and :func:`optax.scale_by_learning_rate`:

    .. math::

      θ \leftarrow θ - η\, (u_θ + λ θ),

    which is the reference's ``p ← p - lr·(update + wd·p)``. That weight decay acts
    on each factor, so it shrinks the product by about :math:`(1-λη)^2` and, unlike
    the rest of the step, is not gauge invariant. Every other leaf (biases, norms,
    embeddings) goes to :func:`optax.adamw` with the ``adam_*`` hyperparameters.

    The step is Adam-like in size (RMS about 1 per factor before the learning
    rate), not a spectral budget: compared with :func:`lora_muon` at the same
    learning rate it is about ``2 √rows`` times larger. The reference's
    experiments use ``b1=0.9, b2=0.999`` and a learning rate of ``3e-4`` with no
    outer gradient clipping (the unmagnified-gradient clip replaces it).

    Works inside :func:`optax.chain`, :func:`optax.partition`, :func:`optax.masked`,
    :class:`optax.MultiSteps`, :func:`optax.apply_if_finite` and under
    :func:`optax.inject_hyperparams` (list ``apply_escape`` and a callable
    ``pairs`` as static).

    Args:
      learning_rate: :math:`η`, a float or an optax schedule.
      b1: first-moment decay :math:`β_1`.
      b2: second-moment decay :math:`β_2`.
      eps: :math:`ε` added outside the square root of the preconditioner.
      weight_decay: :math:`λ`, factor-wise decoupled decay as in the reference.
      clip_unmagnified_grad: global norm clip of the unmagnified gradients of all
        pairs; ``0`` turns it off.
      update_skipping: skip a factor's gradient whose unmagnified RMS exceeds
        this; ``0`` turns it off.
      update_capping: cap the first moment's RMS; ``0`` (default) turns it off.
      apply_escape: the escaped-mass correction; see :func:`scale_by_lora_rite`.
        Static.
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static.
      mu_dtype: first-moment dtype for every leaf (LoRA and AdamW); ``None`` keeps
        the param dtype.
      weight_decay_mask: optional mask (tree or callable) for the weight decay of
        LoRA leaves.
      adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay, adam_learning_rate:
        the :func:`optax.adamw` setting of that name for leaves in no pair
        (``adam_learning_rate=None``: ``learning_rate``).
      allow_no_pairs: accept a tree without LoRA pairs (AdamW on every leaf); see
        :func:`lora_muon_jax.lora_muon`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params``.

    Raises:
      ValueError: as :func:`scale_by_lora_rite`, and a negative ``weight_decay``.
      TypeError: as :func:`scale_by_lora_rite` (leaves in no pair go to AdamW
        and are not checked; they may be complex).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax import testing
      >>> from lora_muon_jax.peers import lora_rite
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> params = {'lora_a': jax.random.normal(k1, (6, 2)),
      ...           'lora_b': jax.random.normal(k2, (2, 5))}
      >>> loss = lambda p: jnp.mean((p['lora_a'] @ p['lora_b'] - 1.) ** 2)
      >>> # Factors rescaled to (9 a, b / 9): the same products after every step.
      >>> testing.assert_gauge_invariant(lora_rite(learning_rate=0.05), params, loss)

    References:
      See :func:`scale_by_lora_rite`.

    Sources:
      Primary: Yen, Si, Meng, Yu, Duvvuri, Dhillon, Hsieh, Kumar, *LoRA Done
      RITE*, arXiv 2410.20625 (https://arxiv.org/abs/2410.20625), ICLR 2025.
      Authors' code: https://github.com/gkevinyen5418/LoRA-RITE (``lora_rite.py``),
      by its README the first author's PyTorch reimplementation of the original
      JAX code; the JAX code itself: not found. :func:`scale_by_lora_rite`
      follows that PyTorch file (commit ``c9bb451``) and lists where it differs.
      Secondary: kozistr/pytorch_optimizer,
      ``pytorch_optimizer/optimizer/lora_rite.py``
      (https://github.com/kozistr/pytorch_optimizer); Cesista, Crowson, Simal,
      Biderman, *LoRA-Muon* (https://arxiv.org/abs/2606.12921), which relates
      LoRA-RITE's QR-coordinate core to the spectral update.
    """
    _check_hparams(_ALIAS_FN, b1, b2, eps, clip_unmagnified_grad, update_skipping, update_capping)
    _validation.check_scalar("weight_decay", weight_decay, low=0.0, fn=_ALIAS_FN)
    adamw = _adamw_routing.AdamWSettings(
        adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay
    )
    lora_tx = optax.chain(
        scale_by_lora_rite(
            b1,
            b2,
            eps,
            clip_unmagnified_grad=clip_unmagnified_grad,
            update_skipping=update_skipping,
            update_capping=update_capping,
            apply_escape=apply_escape,
            pairs=pairs,
            mu_dtype=mu_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _adamw_routing.for_lora_pairs(
        lora_tx, adamw, learning_rate, _ALIAS_FN, pairs, allow_no_pairs, mu_dtype
    )
