"""Per-adapter health metrics computed inside the jitted update, on r×r matrices.

Two numbers say most about a LoRA run under a spectral optimizer: how far the two
factors of each adapter have drifted apart in scale (the gauge drift of
docs/algorithm.md §Zero factors and gauge drift, which zero-initialized ``b``
starts), and how far each update moves the adapter product ``c · a @ b`` in spectral
norm (LoRA-Muon's budget is the learning rate).
Both are read here from Gram matrices of size ``r×r`` and ``2r×2r``; no ``m × n``
matrix is formed, no host callback runs, and the metrics live in the optimizer
state.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_muon_jax import (
    _grams,
    _key_paths,
    _linalg,
    _pair_matching,
    _pair_tree,
    _pair_types,
    _validation,
)

_FN = "with_lora_diagnostics"
_PAIR_FN = "lora_pair_diagnostics"

# log(σ) of a zero factor: the smallest normal float32, so that the log ratio of a
# zero-initialized pair is large but finite (logging and plotting stay usable).
_LOG_TINY = math.log(float(np.finfo(np.float32).tiny))


class LoRAPairDiagnostics(NamedTuple):
    """Health metrics of one adapter ``ΔW = c · a @ b``; each has the pair's batch shape.

    Attributes:
      sigma_a: :math:`σ_{max}(a)`.
      sigma_b: :math:`σ_{max}(b)`.
      log_norm_ratio: :math:`\\log σ_{max}(a) - \\log σ_{max}(b)`; ``0`` when the
        factors are balanced. A zero factor counts as the smallest normal float32,
        so a zero-initialized ``b`` gives a large finite value (about ``87``).
      step_a: :math:`\\|c\\, Δa\\, b\\|_2`, the product step of the ``a`` update.
      step_b: :math:`\\|c\\, a\\, Δb\\|_2`, the product step of the ``b`` update.
      product_step: :math:`\\|c\\,(Δa\\, b + a\\, Δb)\\|_2`, the first-order change of
        the product (at most the learning rate under LoRA-Muon without decay).
    """

    sigma_a: jax.Array  # dtype=float32.
    sigma_b: jax.Array
    log_norm_ratio: jax.Array
    step_a: jax.Array
    step_b: jax.Array
    product_step: jax.Array


class LoRADiagnosticsState(NamedTuple):
    """State of :func:`with_lora_diagnostics`."""

    # shape=(), dtype=int32. The field shadows tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]
    inner_state: optax.OptState
    lora_diagnostics: dict[str, LoRAPairDiagnostics]


# ----------------------------------------------------------------------------- maths


def _unit(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``x / ‖x‖_F`` and ``log ‖x‖_F`` per batch index, in float32, robust to scale.

    A zero matrix gives ``(0, -inf)``. Scaling by the largest entry first keeps
    huge and tiny inputs away from float32 overflow and underflow.
    """
    x = x.astype(jnp.float32)
    s = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    nonzero = s > 0
    y = x / jnp.where(nonzero, s, 1.0)
    n = jnp.sqrt(jnp.sum(jnp.square(y), axis=(-2, -1), keepdims=True))
    y = y / jnp.where(nonzero, n, 1.0)
    log_norm = jnp.where(
        nonzero,
        jnp.log(jnp.where(nonzero, s, 1.0)) + jnp.log(jnp.where(nonzero, n, 1.0)),
        -jnp.inf,
    )
    return y, log_norm[..., 0, 0]


def _gram(x: jax.Array, tall: bool) -> jax.Array:
    return _grams.gram(x, _grams.canonical_layout(x.ndim, tall))


def _lam_max_of_products(xs: jax.Array, ys: jax.Array) -> jax.Array:
    """``λ_max(X Y)`` for stacks of PSD ``X, Y`` as ``λ_max(W Y Wᵀ)`` with ``X = WᵀW``."""
    lam, vecs = jnp.linalg.eigh(_linalg.sym(xs))
    w = jnp.sqrt(jnp.maximum(lam, 0.0))[..., :, None] * jnp.swapaxes(vecs, -1, -2)
    core = _linalg.mm(w, _linalg.mm(ys, jnp.swapaxes(w, -1, -2)))
    return jnp.maximum(jnp.linalg.eigvalsh(_linalg.sym(core))[..., -1], 0.0)


class _Problem(NamedTuple):
    """The Grams of one pair: ``[Δâ, â]ᵀ[Δâ, â]`` and ``[b̂; Δb̂][b̂; Δb̂]ᵀ``."""

    g_left: jax.Array  # (*batch, 2r, 2r)
    g_right: jax.Array  # (*batch, 2r, 2r)
    log_norms: tuple[jax.Array, jax.Array, jax.Array, jax.Array]  # a, b, Δa, Δb
    factors: tuple[jax.Array, jax.Array]  # a, b: their σ_max come from _grams


def _problem(a: jax.Array, b: jax.Array, da: jax.Array, db: jax.Array) -> _Problem:
    (ua, la), (ub, lb), (uda, lda), (udb, ldb) = (_unit(x) for x in (a, b, da, db))
    left = jnp.concatenate([uda, ua], axis=-1)  # L = [Δa, a]   (*batch, m, 2r)
    right = jnp.concatenate([ub, udb], axis=-2)  # R = [b; Δb]  (*batch, 2r, n)
    return _Problem(_gram(left, True), _gram(right, False), (la, lb, lda, ldb), (a, b))


def _solve(problems: Sequence[_Problem], deps: Sequence[Any]) -> list[tuple[jax.Array, ...]]:
    """λ_max of the three small eigenproblems of every pair, batched by size.

    The batched calls run one after another and after ``deps``
    (:func:`lora_muon_jax._lapack_order.after`): on CPU they are LAPACK calls.
    """
    # Per pair: ‖Δâ b̂‖², ‖â Δb̂‖² (r×r) and the weighted 2r×2r product.
    small: list[tuple[jax.Array, jax.Array]] = []
    big: list[tuple[jax.Array, jax.Array]] = []
    weights = []
    for p in problems:
        r = p.g_left.shape[-1] // 2
        la, lb, lda, ldb = p.log_norms
        g_da, g_a = p.g_left[..., :r, :r], p.g_left[..., r:, r:]
        g_b, g_db = p.g_right[..., :r, :r], p.g_right[..., r:, r:]
        small.append((jnp.stack([g_da, g_a]), jnp.stack([g_b, g_db])))
        # L R = ‖Δa‖‖b‖ Δâ b̂ + ‖a‖‖Δb‖ â Δb̂: weight the blocks by the two norms
        # relative to the larger one (log domain: no overflow, zeros give 0).
        log_p, log_q = lda + lb, la + ldb
        log_top = jnp.maximum(log_p, log_q)
        finite = jnp.isfinite(log_top)
        top = jnp.where(finite, log_top, 0.0)
        wp = jnp.where(finite, jnp.exp(log_p - top), 0.0)
        wq = jnp.where(finite, jnp.exp(log_q - top), 0.0)
        # The same diagonal weight diag(√wp·I, √wq·I) scales L's columns and R's rows.
        d = jnp.concatenate(
            [
                jnp.repeat(jnp.sqrt(wp)[..., None], r, -1),
                jnp.repeat(jnp.sqrt(wq)[..., None], r, -1),
            ],
            axis=-1,
        )
        outer = d[..., :, None] * d[..., None, :]
        big.append((p.g_left * outer, p.g_right * outer))
        weights.append((top, finite))

    # One eigh call per matrix size for the whole tree (small: compile once).
    small_lam = _linalg.apply_batched_by_size(_lam_max_of_products, small, deps=deps)
    big_lam = _linalg.apply_batched_by_size(_lam_max_of_products, big, deps=small_lam)
    return [
        (s[0], s[1], b, top, finite)
        for s, b, (top, finite) in zip(small_lam, big_lam, weights, strict=True)
    ]


def _norm_from_log(c: jax.Array, log_norm: jax.Array, lam: jax.Array) -> jax.Array:
    """``c · exp(log_norm) · sqrt(λ)``; zero when a factor (``-inf``) or ``λ`` is zero."""
    ok = jnp.isfinite(log_norm) & (lam > 0)
    log_val = jnp.where(ok, log_norm, 0.0) + 0.5 * jnp.log(jnp.where(ok, lam, 1.0))
    return jnp.where(ok, c * jnp.exp(log_val), 0.0)


def _metrics(
    problems: Sequence[_Problem], lora_scale: jax.typing.ArrayLike
) -> list[LoRAPairDiagnostics]:
    c = jnp.abs(jnp.asarray(lora_scale, jnp.float32))
    log_sigmas = _grams.log_spectral_norms(
        [
            (x, _grams.canonical_layout(x.ndim, tall))
            for p in problems
            for x, tall in zip(p.factors, (True, False), strict=True)
        ]
    )
    out = []
    for k, (p, (lam_ta, lam_tb, lam_ab, top, finite)) in enumerate(
        zip(problems, _solve(problems, deps=log_sigmas), strict=True)
    ):
        la, lb, lda, ldb = p.log_norms
        log_sa, log_sb = log_sigmas[2 * k], log_sigmas[2 * k + 1]
        out.append(
            LoRAPairDiagnostics(
                sigma_a=jnp.where(jnp.isfinite(log_sa), jnp.exp(log_sa), 0.0),
                sigma_b=jnp.where(jnp.isfinite(log_sb), jnp.exp(log_sb), 0.0),
                # A zero factor's log σ counts as the float32 tiny: finite ratios.
                log_norm_ratio=_log_or_tiny(log_sa) - _log_or_tiny(log_sb),
                step_a=_norm_from_log(c, lda + lb, lam_ta),
                step_b=_norm_from_log(c, la + ldb, lam_tb),
                product_step=_norm_from_log(c, jnp.where(finite, top, -jnp.inf), lam_ab),
            )
        )
    return out


def _log_or_tiny(log_sigma: jax.Array) -> jax.Array:
    return jnp.where(jnp.isfinite(log_sigma), log_sigma, _LOG_TINY)


def lora_pair_diagnostics(
    a: jax.Array,
    b: jax.Array,
    delta_a: jax.Array,
    delta_b: jax.Array,
    lora_scale: jax.typing.ArrayLike = 1.0,
) -> LoRAPairDiagnostics:
    r"""Health metrics of one adapter and one update of it, without forming ``m × n``.

    With ``L = [Δa, a]`` (``m × 2r``) and ``R = [b; Δb]`` (``2r × n``) the first-order
    product step is ``L R = Δa b + a Δb``, and

    .. math::

      \|L R\|_2^2 = λ_{max}(R^\top L^\top L R) = λ_{max}(G_L G_R)
                  = λ_{max}(W G_R W^\top), \quad G_L = L^\top L = W^\top W,\;
                  G_R = R R^\top,

    a ``2r × 2r`` eigenvalue problem; the two single terms are ``r × r`` problems on
    blocks of the same Grams, and the factor norms ``r × r`` problems on the
    factors' own unit-trace Grams (:func:`lora_muon_jax._grams.log_spectral_norms`).
    Each factor is first scaled to unit Frobenius norm (norms are carried as
    logarithms), so huge, tiny and zero factors give finite metrics. All work runs
    in float32: norms and single terms are accurate to about 1e-6 relative, and so
    is ``product_step`` unless the two terms cancel; it is found from its square,
    so its absolute error is at worst about :math:`\sqrt{ε_{f32}} ≈ 3·10^{-4}` of
    ``step_a + step_b``.

    Args:
      a: ``(*batch, m, r)`` left factor (canonical layout).
      b: ``(*batch, r, n)`` right factor.
      delta_a: update of ``a`` (shape of ``a``), e.g. what ``optax.apply_updates``
        adds.
      delta_b: update of ``b`` (shape of ``b``).
      lora_scale: :math:`c` in ``ΔW = c · a @ b``.

    Returns:
      A :class:`LoRAPairDiagnostics` of float32 arrays with shape ``batch``.

    Raises:
      ValueError: shapes that do not form a pair.
      TypeError: a complex, integer or boolean argument (named in the message).

    Examples:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax import lora_pair_diagnostics
      >>> a, b = jnp.eye(4, 2) * 3.0, jnp.eye(2, 5)
      >>> d = lora_pair_diagnostics(a, b, 0.1 * jnp.eye(4, 2), jnp.zeros((2, 5)))
      >>> print(f"{d.sigma_a:.1f} {d.sigma_b:.1f} {d.log_norm_ratio:.3f} {d.product_step:.3f}")
      3.0 1.0 1.099 0.100

    References:
      Cesista, Crowson, Simal, Biderman, `LoRA-Muon: Spectral Steepest Descent on
      the Low-Rank Manifold <https://arxiv.org/abs/2606.12921>`_, 2026
    """
    shapes = [tuple(jnp.shape(x)) for x in (a, b, delta_a, delta_b)]
    sa, sb, sda, sdb = shapes
    if (
        len(sa) < 2
        or len(sb) != len(sa)
        or sa[:-2] != sb[:-2]
        or sa[-1] != sb[-2]
        or sda != sa
        or sdb != sb
    ):
        raise ValueError(
            f"{_PAIR_FN}: expected a (*batch, m, r), b (*batch, r, n) and updates of the "
            f"same shapes; got a {sa}, b {sb}, delta_a {sda}, delta_b {sdb}."
        )
    _validation.check_scalar("lora_scale", lora_scale, low=0.0, low_inclusive=False, fn=_PAIR_FN)
    names = ("a", "b", "delta_a", "delta_b")
    _validation.check_float_leaves(_PAIR_FN, names, (a, b, delta_a, delta_b), None)
    a, b, delta_a, delta_b = (jnp.asarray(x) for x in (a, b, delta_a, delta_b))
    return _metrics([_problem(a, b, delta_a, delta_b)], lora_scale)[0]


# ------------------------------------------------------------------------ transform


def _pair_names(plan: _pair_types.PairPlan, paths: Sequence[Any]) -> list[str]:
    """A readable, unique, ``"/"``-joined key per pair: the factors' common parent.

    Flax (``layer/lora``) and linen (``Dense_0``) adapters are named by the module
    holding both factors; pairs that share a parent (qwix's ``kernel_lora_a`` next
    to ``bias_lora_a``) or sit at the root are named by the path of ``a``.
    """
    names = []
    for pair in plan.pairs:
        pa = _key_paths.path_names(paths[pair.a_index])
        pb = _key_paths.path_names(paths[pair.b_index])
        parent = pa[:-1] if pa[:-1] == pb[:-1] else ()
        names.append((parent, pa))
    parents = [p for p, _ in names]
    return [
        "/".join(parent) if parent and parents.count(parent) == 1 else "/".join(full)
        for parent, full in names
    ]


def _zeros(pair: _pair_types.LoRAPair) -> LoRAPairDiagnostics:
    return LoRAPairDiagnostics(
        *(jnp.zeros(pair.batch_shape, jnp.float32) for _ in LoRAPairDiagnostics._fields)
    )


def with_lora_diagnostics(
    inner: optax.GradientTransformation,
    *,
    pairs: _pair_types.PairsLike = "auto",
    lora_scale: jax.typing.ArrayLike = 1.0,
    every: int = 1,
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps an optimizer so its state carries per-adapter metrics of every update.

    The updates are those of ``inner``, unchanged. After each update (every
    ``every`` steps; in between the last values are kept) and for every LoRA pair
    :math:`ΔW = c\, a b` it stores, computed inside the jitted update from the
    current params and the returned updates :math:`(Δa, Δb)`:

    * :math:`σ_{max}(a)`, :math:`σ_{max}(b)` and their log ratio: gauge drift;
    * :math:`\|c\,Δa\,b\|_2`, :math:`\|c\,a\,Δb\|_2` and the first-order product
      step :math:`\|c\,(Δa\, b + a\, Δb)\|_2`, which LoRA-Muon keeps at or below the
      learning rate (weight decay adds to it).

    See :func:`lora_pair_diagnostics` for the ``2r × 2r`` Gram computation; the
    cost is a few Gram products per pair, about that of one LoRA-Muon step.
    Read the metrics with ``optax.tree.get(state, "lora_diagnostics")``: a dict
    keyed by the pair's module path (``"layer/lora"``; see below) of
    :class:`LoRAPairDiagnostics`. Leaves in no pair are ignored.

    Args:
      inner: the optimizer to wrap (e.g. :func:`lora_muon`).
      pairs: how to find pairs; see :func:`find_lora_pairs`. Static.
      lora_scale: :math:`c` in ``ΔW = c · a @ b``.
      every: compute the metrics on steps ``0, every, 2·every, ...``. Static.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose state is a
      :class:`LoRADiagnosticsState` and whose ``update`` requires ``params``.
      Pair keys are the ``"/"``-joined path of the module holding both factors,
      or of factor ``a`` where that is not unique.

    Raises:
      ValueError: bad ``every`` or ``lora_scale``; an unpaired factor or missing
        ``params`` (at trace time, naming the leaf paths).
      TypeError: a complex, integer or boolean pair factor (in ``init`` and
        ``update``, naming the leaf paths).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax import lora_muon, with_lora_diagnostics
      >>> params = {'q': {'lora_a': jnp.eye(6, 2), 'lora_b': jnp.zeros((2, 4))}}
      >>> tx = with_lora_diagnostics(lora_muon(learning_rate=0.1))
      >>> state = tx.init(params)
      >>> grads = {'q': {'lora_a': jnp.zeros((6, 2)), 'lora_b': jnp.ones((2, 4))}}
      >>> updates, state = jax.jit(tx.update)(grads, state, params)
      >>> diag = optax.tree.get(state, 'lora_diagnostics')['q']
      >>> print(f"{diag.product_step:.3f} {diag.sigma_b:.1f}")
      0.050 0.0

    References:
      Cesista, Crowson, Simal, Biderman, `LoRA-Muon: Spectral Steepest Descent on
      the Low-Rank Manifold <https://arxiv.org/abs/2606.12921>`_, 2026
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ValueError(f"{_FN}: `every` must be an int >= 1; got {every!r}.")
    _validation.check_scalar("lora_scale", lora_scale, low=0.0, low_inclusive=False, fn=_FN)

    def init_fn(params: Any) -> LoRADiagnosticsState:
        paths, leaves, _ = _key_paths.flatten_with_paths(params)
        plan = _pair_matching.plan_pairs(paths, leaves, pairs)
        _pair_tree.check_pair_dtypes(_FN, plan, leaves)
        names = _pair_names(plan, paths)
        return LoRADiagnosticsState(
            count=jnp.zeros([], jnp.int32),
            inner_state=inner.init(params),
            lora_diagnostics={n: _zeros(p) for n, p in zip(names, plan.pairs, strict=True)},
        )

    def update_fn(
        updates: Any, state: LoRADiagnosticsState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LoRADiagnosticsState]:
        if params is None:
            raise ValueError(_validation.NEEDS_PARAMS.format(name=_FN))
        new_updates, inner_state = optax.with_extra_args_support(inner).update(
            updates, state.inner_state, params, **extra_args
        )
        paths, _, _ = _key_paths.flatten_with_paths(new_updates)
        tree = _pair_tree.flatten(_FN, new_updates, params, pairs, require_all_paired=False)
        names = _pair_names(tree.plan, paths)

        def compute() -> dict[str, LoRAPairDiagnostics]:
            problems = [
                _problem(
                    *_pair_tree.canonical(pair, tree.params),
                    *_pair_tree.canonical(pair, tree.grads),
                )
                for pair in tree.plan.pairs
            ]
            return dict(zip(names, _metrics(problems, lora_scale), strict=True))

        if every == 1:
            diagnostics = compute()
        else:
            diagnostics = jax.lax.cond(
                state.count % every == 0, compute, lambda: state.lora_diagnostics
            )
        return new_updates, LoRADiagnosticsState(
            count=optax.safe_increment(state.count),
            inner_state=inner_state,
            lora_diagnostics=diagnostics,
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
