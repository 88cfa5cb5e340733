"""LoRA-RITE: transformation-invariant adaptive preconditioning of LoRA factor pairs.

Sources (paper, the authors' code, reimplementations, with addresses) are listed in
:func:`lora_rite`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _linalg, _pairs, _pairwise, _sharding, _validation

_SCALE_FN = "scale_by_lora_rite"
_ALIAS_FN = "lora_rite"


class LoRARiteState(NamedTuple):
    """State of :func:`scale_by_lora_rite`: moments, previous bases, escaped mass.

    Every field but ``count`` is a tree with the structure of the params; a
    factor's ``nu`` and ``escape`` leaves have the shapes given below instead of
    the factor's own (``batch`` is the pair's batch shape).
    """

    count: jax.Array  # shape=(), dtype=int32.
    mu: optax.Updates  # first moments, like params; dtype=mu_dtype (default: param dtype).
    nu: optax.Updates  # r×r second moments per factor, shape (*batch, r, r), float32+.
    basis: optax.Updates  # previous QR bases, like params (b holds Qᵀ), float32+.
    escape: optax.Updates  # escaped mass ρ per factor, shape (*batch,), float32+.


def _compute_dtype(dtype: Any) -> Any:
    # float32 at least (bf16/f16 factors), float64 when the params are float64.
    return jnp.promote_types(dtype, jnp.float32)


def _gram(x: jax.Array, y: jax.Array) -> jax.Array:
    """``xᵀ y`` for thin ``(*batch, rows, r)`` stacks: an r×r result from a long contraction."""
    return jnp.matmul(
        jnp.swapaxes(x, -1, -2),
        y,
        precision=_linalg.HIGHEST,
        out_sharding=_sharding.small_out_sharding(x),
    )


def _rms(x: jax.Array) -> jax.Array:
    """Root mean square of each matrix of a stack, shape ``batch``."""
    return jnp.sqrt(jnp.mean(jnp.square(x), axis=(-2, -1)))


def _decay(beta: jax.Array, count: jax.Array) -> jax.Array:
    """Adafactor's bias-corrected decay ``β(1-βᵗ)/(1-βᵗ⁺¹)``, ``t`` 0-based (0 at ``t = 0``).

    At ``β = 1`` (e.g. 0.999 rounded by a bf16 ``inject_hyperparams``) it takes its
    limit ``t/(t+1)`` instead of 0/0.
    """
    den = 1.0 - beta ** (count + 1.0)
    safe = jnp.where(den > 0, den, 1.0)
    return jnp.where(den > 0, beta * (1.0 - beta**count) / safe, count / (count + 1.0))


def _qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Thin QR of a tall stack; under explicit sharding the factor is gathered for it.

    The thin factor (``rows × r``) is small next to the layer it adapts; ``Q`` goes
    back to the input's sharding so the stored basis keeps the params' layout.
    """
    spec = _sharding.explicit_spec(x)
    if spec is None:
        return jnp.linalg.qr(x)
    batch = tuple(_sharding.small_out_sharding(x))[:-2]
    q, r = jnp.linalg.qr(jax.sharding.reshard(x, jax.sharding.PartitionSpec(*batch, None, None)))
    return jax.sharding.reshard(q, spec), r


def _pinv(r: jax.Array) -> jax.Array:
    """Pseudo-inverse of a stack of r×r matrices by SVD; a zero ``R`` gives zero.

    Singular values up to ``eps · r · σ_max`` count as zero (torch.linalg.pinv's
    default, as in the reference).
    """
    u, sv, vt = jnp.linalg.svd(r, full_matrices=False)
    keep = sv > jnp.finfo(r.dtype).eps * r.shape[-1] * sv[..., :1]
    inv = jnp.where(keep, 1.0 / jnp.where(keep, sv, 1.0), 0.0)
    return _linalg.mm(jnp.swapaxes(vt, -1, -2) * inv[..., None, :], jnp.swapaxes(u, -1, -2))


def _inv_sqrt(v: jax.Array, shift: jax.Array, eps: jax.Array) -> jax.Array:
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


def _escaped_mass(v_old: jax.Array, v_new: jax.Array) -> jax.Array:
    """Second-moment mass lost by the basis transport (ascending eigenvalues compared)."""
    eigs = jnp.linalg.eigvalsh(_linalg.sym(jnp.stack([v_old, v_new])))  # one batched call
    eig_diff = jnp.max(eigs[0] - eigs[1], axis=-1)
    trace_diff = jnp.trace(v_old, axis1=-2, axis2=-1) - jnp.trace(v_new, axis1=-2, axis2=-1)
    return jnp.minimum(jnp.maximum(eig_diff, 0.0), jnp.maximum(trace_diff, 0.0))


class _Factor(NamedTuple):
    """One factor seen as a tall ``(*batch, rows, r)`` matrix (``a``, or ``bᵀ``)."""

    param: jax.Array
    grad: jax.Array
    mu: jax.Array
    basis_old: jax.Array
    nu: jax.Array
    escape: jax.Array


def _check_shapes(fn: str, pair: _pairs.LoRAPair) -> None:
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


def _gather(pair, role, dtype, tree, mu, basis, nu, escape) -> _Factor:
    """One factor's param, gradient and state, canonical and tall, in ``dtype``."""
    index = pair.a_index if role == "a" else pair.b_index

    def tall(leaves):
        return _tall(pair.canonical(leaves[index], role).astype(dtype), role)

    return _Factor(
        param=tall(tree.params),
        grad=tall(tree.grads),
        mu=tall(mu),
        basis_old=tall(basis),
        nu=nu[index].astype(dtype),
        escape=escape[index].astype(dtype),
    )


def _stack(factors: list[_Factor]) -> _Factor:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *factors)


def _skip(g: jax.Array, threshold: jax.Array) -> jax.Array:
    """Zeroes each matrix of ``g`` whose RMS exceeds ``threshold`` (if positive)."""
    skipped = (threshold > 0) & (_rms(g) > threshold)
    return jnp.where(skipped[..., None, None], 0.0, g)


def scale_by_lora_rite(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-6,
    *,
    clip_unmagnified_grad: jax.typing.ArrayLike = 1.0,
    update_skipping: jax.typing.ArrayLike = 1.0,
    update_capping: jax.typing.ArrayLike = 0.0,
    apply_escape: bool = False,
    pairs: _pairs.PairsLike = "auto",
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
    mu_dtype = None if mu_dtype is None else jnp.dtype(mu_dtype)

    def init_fn(params: Any) -> LoRARiteState:
        plan = _pairwise.check_init(_SCALE_FN, params, pairs)
        for pair in plan.pairs:
            _check_shapes(_SCALE_FN, pair)
        _, leaves, treedef = _pairs.flatten_with_paths(params)
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
        tree = _pairwise.flatten(_SCALE_FN, updates, params, pairs)
        for pair in tree.plan.pairs:
            _check_shapes(_SCALE_FN, pair)
        mu_leaves = tree.treedef.flatten_up_to(state.mu)
        basis_leaves = tree.treedef.flatten_up_to(state.basis)
        nu_leaves = tree.treedef.flatten_up_to(state.nu)
        esc_leaves = tree.treedef.flatten_up_to(state.escape)

        # Pairs of identical shapes (the adapters of an unscanned model) are stacked
        # on a new leading axis and computed as one: compile time and kernel count
        # grow with the number of distinct shapes, not of adapters.

        # Pass 1, every group: bases, unmagnified gradients, skipping. The clip
        # needs the norm over all pairs before any preconditioning.
        staged = []
        previous: tuple[Any, ...] = ()  # LAPACK calls one at a time: _linalg.after
        for members in _pairwise.same_shape_groups(tree):
            dtype = _compute_dtype(tree.params[members[0].a_index].dtype)
            fa, fb = (
                _stack(
                    [
                        _gather(pair, role, dtype, tree, mu_leaves, basis_leaves, nu_leaves,
                                esc_leaves)
                        for pair in members
                    ]
                )
                for role in ("a", "b")
            )
            q_a, r_a = _qr(_linalg.after(fa.param, *previous))
            q_b, r_b = _qr(_linalg.after(fb.param, q_a))
            # both factors' r×r work at once
            ri_a, ri_b = _pinv(_linalg.after(jnp.stack([r_a, r_b]), q_b))
            previous = (ri_a,)
            skip = jnp.asarray(update_skipping, dtype)
            g_a = _skip(_linalg.mm(fa.grad, ri_b), skip)  # = G Q_b
            g_b = _skip(_linalg.mm(fb.grad, ri_a), skip)  # = Gᵀ Q_a
            staged.append((members, fa, fb, q_a, q_b, ri_a, ri_b, g_a, g_b))

        wide = jnp.result_type(jnp.float32, *(s[1].param.dtype for s in staged))
        sq = [jnp.sum(jnp.square(g.astype(wide))) for s in staged for g in s[7:]]
        norm = jnp.sqrt(sum(sq, jnp.zeros([], wide)))
        tau = jnp.asarray(clip_unmagnified_grad, wide)
        clip = jnp.where((tau > 0) & (norm > tau), tau / jnp.where(norm > 0, norm, 1.0), 1.0)

        # Pass 2, every group: moments in the partner's moving basis, preconditioning.
        per_pair, new_mu, new_basis = [], [], []
        nu_out, esc_out = list(nu_leaves), list(esc_leaves)
        for members, fa, fb, q_a, q_b, ri_a, ri_b, g_a, g_b in staged:
            hp = _Hyper.make(fa.param.dtype, state.count, b1, b2, eps, update_capping)
            c = _linalg.after(clip.astype(fa.param.dtype), *previous)
            partners = ((q_b, fb.basis_old, ri_b), (q_a, fa.basis_old, ri_a))
            (u_a, u_b), (m_a, m_b), v, e = _pair_step(
                (fa, fb), (g_a * c, g_b * c), partners, hp, apply_escape
            )
            previous = (u_a,)
            for k, pair in enumerate(members):
                per_pair.append((u_a[k], _tall(u_b[k], "b")))
                new_mu.append((m_a[k], _tall(m_b[k], "b")))
                new_basis.append((q_a[k], _tall(q_b[k], "b")))
                nu_out[pair.a_index], nu_out[pair.b_index] = v[0, k], v[1, k]
                esc_out[pair.a_index], esc_out[pair.b_index] = e[0, k], e[1, k]
        ordered = [pair for members, *_ in staged for pair in members]
        tree = tree._replace(plan=tree.plan._replace(pairs=tuple(ordered)))

        new_state = LoRARiteState(
            count=optax.safe_increment(state.count),
            mu=_pairwise.scatter(tree, new_mu, like=mu_leaves),
            nu=_pairwise.unflatten(tree, nu_out),
            basis=_pairwise.scatter(tree, new_basis, like=basis_leaves),
            escape=_pairwise.unflatten(tree, esc_out),
        )
        return _pairwise.scatter(tree, per_pair), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class _Hyper(NamedTuple):
    d1: jax.Array
    d2: jax.Array
    eps: jax.Array
    cap: jax.Array

    @classmethod
    def make(cls, dtype, count, b1, b2, eps, cap) -> _Hyper:
        t = count.astype(dtype)
        return cls(
            d1=_decay(jnp.asarray(b1, dtype), t),
            d2=_decay(jnp.asarray(b2, dtype), t),
            eps=jnp.asarray(eps, dtype),
            cap=jnp.asarray(cap, dtype),
        )


def _pair_step(
    factors: tuple[_Factor, _Factor],
    grads: tuple[jax.Array, jax.Array],
    partners: tuple[tuple[jax.Array, jax.Array, jax.Array], ...],
    hp: _Hyper,
    apply_escape: bool,
) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array], jax.Array, jax.Array]:
    """Both factors' steps from their unmagnified gradients.

    ``partners`` holds, per factor, its partner's new basis ``Q``, old basis and
    ``R⁺``. Returns the two updates and first moments (tall), and the second
    moments and escaped masses stacked ``(2, *batch, ...)`` (``a`` first). The r×r
    matrices of both factors share one ``eigh`` (and one ``eigvalsh`` for the
    escape).
    """
    # Basis change of each factor's coordinates: its partner's new vs old basis
    # (zero at the first step, which starts the moments from zero).
    p = jnp.stack([_gram(q_new, q_old) for q_new, q_old, _ in partners])
    pt = jnp.swapaxes(p, -1, -2)
    nu = jnp.stack([f.nu for f in factors])
    v_moved = _linalg.sym(_linalg.mm(_linalg.mm(p, nu), pt))
    if apply_escape:
        escape = hp.d2 * (jnp.stack([f.escape for f in factors]) + _escaped_mass(nu, v_moved))
    else:
        escape = jnp.zeros(nu.shape[:-2], nu.dtype)
    grams = jnp.stack([_gram(g, g) / g.shape[-2] for g in grads])  # /rows, as the reference
    v = _linalg.sym(hp.d2 * v_moved + (1.0 - hp.d2) * _linalg.sym(grams))
    v = _linalg.after(v, escape)  # the escape's eigvalsh before this eigh
    k = _inv_sqrt(v, escape, hp.eps)
    updates, moments = [], []
    for i, (f, g, (_, _, ri)) in enumerate(zip(factors, grads, partners, strict=True)):
        s = _linalg.mm(g, k[i])
        mu = hp.d1 * _linalg.mm(f.mu, pt[i]) + (1.0 - hp.d1) * s
        scale = jnp.maximum(1.0, _rms(mu) / jnp.where(hp.cap > 0, hp.cap, 1.0))
        capped = mu / jnp.where(hp.cap > 0, scale, 1.0)[..., None, None]
        updates.append(_linalg.mm(capped, jnp.swapaxes(ri, -1, -2)))  # magnitude back
        moments.append(mu)
    return (updates[0], updates[1]), (moments[0], moments[1]), v, escape


def _check_hparams(fn, b1, b2, eps, clip, skip, cap) -> None:
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
    pairs: _pairs.PairsLike = "auto",
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
      adam_b1: AdamW :math:`β_1` for leaves in no pair.
      adam_b2: AdamW :math:`β_2` for leaves in no pair.
      adam_eps: AdamW :math:`ε` for leaves in no pair.
      adam_eps_root: AdamW :math:`ε_{root}` for leaves in no pair.
      adam_weight_decay: AdamW weight decay for leaves in no pair.
      adam_learning_rate: AdamW learning rate; ``None`` uses ``learning_rate``.
      allow_no_pairs: accept a tree without LoRA pairs (AdamW on every leaf); see
        :func:`lora_muon_jax.lora_muon`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params``.

    Raises:
      ValueError: as :func:`scale_by_lora_rite`, and a negative ``weight_decay``.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.peers import lora_rite
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> target = jax.random.normal(k1, (16, 8))
      >>> params = {'lora_a': jax.random.normal(k2, (16, 4)) * 0.3,
      ...           'lora_b': jax.random.normal(k3, (4, 8)) * 0.3, 'bias': jnp.zeros(8)}
      >>> loss = lambda p: jnp.mean((p['lora_a'] @ p['lora_b'] + p['bias'] - target) ** 2)
      >>> tx = lora_rite(learning_rate=0.05)
      >>> @jax.jit
      ... def step(params, state):
      ...   grads = jax.grad(loss)(params)
      ...   updates, state = tx.update(grads, state, params)
      ...   return optax.apply_updates(params, updates), state
      >>> state = tx.init(params)
      >>> print(f"{loss(params):.2f}")
      1.38
      >>> for _ in range(50):
      ...   params, state = step(params, state)
      >>> print(f"{loss(params):.2f}")
      0.22

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
    _check_hparams(
        _ALIAS_FN, b1, b2, eps, clip_unmagnified_grad, update_skipping, update_capping
    )
    _validation.check_scalar("weight_decay", weight_decay, low=0.0, fn=_ALIAS_FN)
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
    return _pairwise.with_adamw_fallback(
        lora_tx,
        pairs=pairs,
        learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_eps=adam_eps,
        adam_eps_root=adam_eps_root,
        adam_weight_decay=adam_weight_decay,
        mu_dtype=mu_dtype,
        label="lora_rite",
        allow_no_pairs=allow_no_pairs,
    )
