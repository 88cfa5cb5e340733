"""Riemannion's locally optimal initialization (LOI) of LoRA pairs.

LOI (§5 and Alg. 3 of Bogachev et al., arXiv 2507.12142v2) starts every adapter at
the rank-``r`` point whose tangent space holds the best rank-``2r`` approximation of
the full fine-tuning gradient ``G₀``, and (Alg. 5 line 3) shifts the frozen weight
by the same product so that the model is unchanged. ``G₀`` is never formed: a
randomized SVD reads it through backward passes of the model with special adapter
values (BackPropRSVD, Alg. 3, built on the single-backward trick of Eq. 18).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TypeAlias

import jax
import jax.numpy as jnp

from lora_muon_jax import _key_paths, _linalg, _pair_matching, _pair_tree, _pair_types, _validation
from lora_muon_jax.peers._riemannion.optimizer import GAUGES, Gauge, check_ranks

if TYPE_CHECKING:
    from lora_muon_jax.nnx._merge_lora import BasePath

__all__ = ["default_alpha", "riemannion_loi_init"]

_LOI_FN = "riemannion_loi_init"

Sketch: TypeAlias = Literal["auto", "wide", "chunked"]
_SKETCHES = ("auto", "wide", "chunked")
# App. F of the paper (LLM fine-tuning): oversampling 16, one power step.
DEFAULT_OVERSAMPLE = 16
DEFAULT_POWER_ITERS = 1


def default_alpha(rank: int) -> float:
    """The paper's LOI scale for LLM fine-tuning, ``α = −0.01 / √r`` (App. F).

    Args:
      rank: the LoRA rank ``r``.

    Returns:
      ``α``, the (signed) value of every singular value of the LOI point.

    Examples:
      >>> from lora_muon_jax.peers._riemannion.loi import default_alpha
      >>> default_alpha(16)
      -0.0025
    """
    return -0.01 / math.sqrt(rank)


def _t(x: jax.Array) -> jax.Array:
    return jnp.swapaxes(x, -1, -2)


def _base_weights() -> ModuleType:
    """:mod:`lora_muon_jax.nnx._merge_lora` (base-weight lookup and fold), on first use.

    Its helpers need no flax, but the module imports it; importing it lazily keeps
    ``import lora_muon_jax.peers`` free of flax.
    """
    from lora_muon_jax.nnx import _merge_lora as _merge

    return _merge


class _Config(NamedTuple):
    """Everything static about one LOI run, closed over by the jitted program."""

    grad_fn: Callable[[Any], Any]
    treedef: Any
    pairs: tuple[_pair_types.LoRAPair, ...]  # as found, rank r
    probes: tuple[_pair_types.LoRAPair, ...]  # the same with rank = columns per call
    widths: tuple[int, ...]  # sketch width k = min(2r + p, m, n) per pair
    calls: int  # gradient calls per product with G₀ (or G₀ᵀ)
    bases: tuple[int | None, ...]  # leaf index of each pair's base weight
    gauge: str
    power_iters: int


# ------------------------------------------------------------------------ checks


def _check_args(
    alpha: Any,
    lora_scale: Any,
    oversample: Any,
    power_iters: Any,
    gauge: Any,
    sketch: Any,
) -> None:
    if alpha is not None:
        value = _validation.concrete_float(alpha)
        if value is not None and (not math.isfinite(value) or value == 0.0):
            raise ValueError(
                f"{_LOI_FN}: `alpha` must be a finite non-zero number (the paper uses "
                f"α = −0.01/√r for LLMs, the default `alpha=None`); got {alpha!r}."
            )
    _validation.check_scalar("lora_scale", lora_scale, low=0.0, low_inclusive=False, fn=_LOI_FN)
    _validation.check_static_int(_LOI_FN, "oversample", oversample, 0)
    _validation.check_static_int(_LOI_FN, "power_iters", power_iters, 0)
    _validation.check_choice(_LOI_FN, "gauge", gauge, GAUGES)
    _validation.check_choice(_LOI_FN, "sketch", sketch, _SKETCHES)


def _find_bases(
    paths: Sequence[Any],
    leaves: Sequence[Any],
    plan: _pair_types.PairPlan,
    base_path: BasePath | None,
) -> tuple[int, ...]:
    """Leaf index of each pair's base weight, checked to be laid out like ``a @ b``."""
    _merge = _base_weights()
    names = [_key_paths.path_names(p) for p in paths]
    bases = _merge.find_bases(_LOI_FN, names, plan, base_path)
    for pair, base in zip(plan.pairs, bases, strict=True):
        if base is None:
            tried = ", ".join("/".join(c) for c in _merge.base_candidates(names[pair.a_index]))
            raise ValueError(
                f"{_LOI_FN}: no base weight for the LoRA pair at {pair.a_path} (tried "
                f"{tried}), so the LOI product cannot be subtracted from it and the "
                "model would change. Pass `base_path=` (a callable from a's path to "
                "the weight's path), or `shift_base=False` to leave base weights alone."
            )
        _merge.product_shape(
            _LOI_FN,
            pair,
            tuple(leaves[base].shape),
            plan.paths[base],
            tuple(leaves[pair.a_index].shape),
            tuple(leaves[pair.b_index].shape),
        )
    return tuple(bases)


# ------------------------------------------------------------- leaves and probes


def _with_rank(pair: _pair_types.LoRAPair, role: str, shape: Sequence[int]) -> tuple[int, ...]:
    """The stored shape of a factor of ``pair`` (of ``pair.rank``), like ``shape``."""
    axis = (pair.a_axes if role == "a" else pair.b_axes).rank_axis
    return tuple(pair.rank if i == axis else d for i, d in enumerate(shape))


def _put_pairs(
    cfg: _Config,
    leaves: Sequence[Any],
    pairs: Sequence[_pair_types.LoRAPair],
    values: Sequence[tuple[jax.Array, jax.Array]],
) -> Any:
    """The tree with each pair's factors set to canonical ``(a, b)`` of ``pair.rank``.

    ``pair.rank`` may differ from the rank of the leaves (the wide probes): the
    factors are restored to that rank, in the leaves' dtypes.
    """
    like = list(leaves)
    for pair in pairs:
        for role, index in (("a", pair.a_index), ("b", pair.b_index)):
            ref = leaves[index]
            like[index] = jax.ShapeDtypeStruct(_with_rank(pair, role, ref.shape), ref.dtype)
    plan = _pair_types.PairPlan(pairs=tuple(pairs), unpaired=(), paths=())
    tree = _pair_tree.PairTree(plan, cfg.treedef, grads=list(leaves), params=like)
    return _pair_tree.scatter(tree, values)


def _accepts_wide(
    grad_fn: Callable[[Any], Any],
    treedef: Any,
    leaves: Sequence[Any],
    wide: Sequence[_pair_types.LoRAPair],
) -> Exception | None:
    """``None`` if ``grad_fn`` traces with factors of the sketch width, else why not."""
    specs = list(leaves)
    for pair in wide:
        for role, index in (("a", pair.a_index), ("b", pair.b_index)):
            ref = leaves[index]
            specs[index] = jax.ShapeDtypeStruct(_with_rank(pair, role, ref.shape), ref.dtype)
    try:
        out = jax.eval_shape(lambda ls: grad_fn(jax.tree.unflatten(treedef, ls)), specs)
        out_leaves = treedef.flatten_up_to(out)
    except Exception as err:  # any failure to trace means "not at this width"
        return err
    for pair in wide:
        for index in (pair.a_index, pair.b_index):
            if tuple(out_leaves[index].shape) != tuple(specs[index].shape):
                where = pair.a_path if index == pair.a_index else pair.b_path
                return ValueError(
                    f"the gradient of {where} has shape "
                    f"{tuple(out_leaves[index].shape)}, not {tuple(specs[index].shape)}"
                )
    return None


def _choose_probes(
    grad_fn: Callable[[Any], Any],
    treedef: Any,
    leaves: Sequence[Any],
    plan: _pair_types.PairPlan,
    widths: Sequence[int],
    sketch: str,
) -> tuple[tuple[_pair_types.LoRAPair, ...], int]:
    """Factors fed to ``grad_fn`` per call and the number of calls per product.

    ``"wide"``: the whole sketch of width ``k`` in one call (factors of rank ``k``);
    ``"chunked"``: ``r`` columns per call at the leaves' own shapes; ``"auto"``: wide
    when ``grad_fn`` traces at the sketch width, else chunked.
    """
    wide = tuple(dataclasses.replace(p, rank=k) for p, k in zip(plan.pairs, widths, strict=True))
    if sketch != "chunked":
        err = _accepts_wide(grad_fn, treedef, leaves, wide)
        if err is None:
            return wide, 1
        if sketch == "wide":
            raise ValueError(
                f"{_LOI_FN}: sketch='wide' needs a `grad_fn` that accepts LoRA factors "
                f"of another rank (here {sorted(set(widths))}), but tracing it failed: "
                f"{err}. "
                "Use sketch='chunked' or 'auto'."
            ) from err
    calls = max(math.ceil(k / p.rank) for k, p in zip(widths, plan.pairs, strict=True))
    return plan.pairs, calls


# ------------------------------------------------------------ BackPropRSVD (Alg. 3)


def _grads_at(
    cfg: _Config, leaves: Sequence[Any], values: Sequence[Any], c: jax.Array
) -> list[tuple[jax.Array, jax.Array]]:
    """Canonical float32 ``(∂L/∂a, ∂L/∂b) / c`` of each pair at factors ``values``."""
    tree = _put_pairs(cfg, leaves, cfg.probes, values)
    g_leaves = cfg.treedef.flatten_up_to(cfg.grad_fn(tree))
    return [
        (
            p.canonical(g_leaves[p.a_index], "a").astype(jnp.float32) / c,
            p.canonical(g_leaves[p.b_index], "b").astype(jnp.float32) / c,
        )
        for p in cfg.probes
    ]


def _products(
    cfg: _Config,
    leaves: Sequence[Any],
    c: jax.Array,
    sketches: Sequence[jax.Array],
    transpose: bool,
) -> list[jax.Array]:
    """``G₀ Ω`` (or ``G₀ᵀ Q``) of every pair at once, one backward pass per call.

    With ``a = 0, b = Ωᵀ`` the product is zero and ``∂L/∂a = c G₀ Ω``; with
    ``a = Q, b = 0``, ``∂L/∂b = c Qᵀ G₀``. Each call feeds ``w = probe.rank``
    columns; :func:`jax.lax.map` runs the ``cfg.calls`` calls one after another
    (the memory of one backward pass) and traces ``grad_fn`` once.
    """
    ws = [p.rank for p in cfg.probes]
    padded = [
        jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, cfg.calls * w - x.shape[-1])])
        for x, w in zip(sketches, ws, strict=True)
    ]

    def one(j: jax.Array) -> list[jax.Array]:
        values = []
        for x, p, w in zip(padded, cfg.probes, ws, strict=True):
            cols = jax.lax.dynamic_slice_in_dim(x, j * w, w, axis=-1)
            if transpose:
                values.append((cols, jnp.zeros((*p.batch_shape, w, p.n))))
            else:
                values.append((jnp.zeros((*p.batch_shape, p.m, w)), _t(cols)))
        grads = _grads_at(cfg, leaves, values, c)
        return [_t(g_b) if transpose else g_a for g_a, g_b in grads]

    if cfg.calls == 1:
        return [y[..., : x.shape[-1]] for y, x in zip(one(jnp.int32(0)), sketches, strict=True)]
    stacked = jax.lax.map(one, jnp.arange(cfg.calls))
    # (calls, …, p, w) -> (…, p, calls·w), then the sketch width.
    return [
        jnp.moveaxis(y, 0, -2).reshape(*y.shape[1:-1], -1)[..., : x.shape[-1]]
        for y, x in zip(stacked, sketches, strict=True)
    ]


def _backprop_rsvd(
    cfg: _Config, leaves: Sequence[Any], key: jax.Array, c: jax.Array
) -> list[tuple[jax.Array, jax.Array]]:
    """Alg. 3, 2(q+1) products: per pair ``G₀ᵀ Q`` and orthonormal ``Q ≈ range(G₀)``."""
    apply = functools.partial(_products, cfg, leaves, c)
    keys = jax.random.split(key, len(cfg.pairs))
    # Random-sign (Rademacher) sketches instead of the paper's Gaussian ones: as
    # good for a randomized range finder, and much cheaper to compile.
    omegas = [
        jax.random.rademacher(k_i, (*p.batch_shape, p.n, k), dtype=jnp.float32)
        for k_i, p, k in zip(keys, cfg.pairs, cfg.widths, strict=True)
    ]
    qs = _linalg.randomized_range(
        lambda x: apply(x, False), lambda x: apply(x, True), omegas, cfg.power_iters
    )
    return list(zip(qs, apply(qs, True), strict=True))


# ------------------------------------------------------- the point and the shift


def _loi_factors(
    q: jax.Array, gt_q: jax.Array, r: int, alpha: jax.Array, c: jax.Array, gauge: str
) -> tuple[jax.Array, jax.Array]:
    """``c · a b = α U[:, :r] V[:, r:2r]ᵀ`` (Theorem 5.1 with ``S = diag(α I, I)``).

    ``G₀ᵀ Q = V S Ŵᵀ`` gives ``G₀ ≈ Q Qᵀ G₀ = (Q Ŵ) S Vᵀ``. ``"balanced"``:
    ``a = U₁ (|α|/c)^{1/2}``, ``b = sign(α) (|α|/c)^{1/2} V₂ᵀ``; ``"left_orthogonal"``
    (Alg. 5 line 2): ``a = U₁``, ``b = (α/c) V₂ᵀ``.
    """
    v, _, wt = jnp.linalg.svd(gt_q, full_matrices=False)
    u1 = jnp.matmul(q, _t(wt)[..., :, :r], precision=jax.lax.Precision.HIGHEST)
    v2 = v[..., :, r : 2 * r]
    if gauge == "balanced":
        h = jnp.sqrt(jnp.abs(alpha) / c)
        return u1 * h, (jnp.sign(alpha) * h) * _t(v2)
    return u1, (alpha / c) * _t(v2)


def _shift_bases(
    cfg: _Config,
    leaves: Sequence[Any],
    new: Sequence[Any],
    c: jax.Array,
) -> list[Any]:
    """Alg. 5 line 3: ``W' = W + c a₀ b₀ − c a b`` from the factors as stored.

    One float32 fold per base (one rounding to its dtype): the incoming adapter,
    zero for Flax's and PEFT's init, is folded in as well, so ``W' + c a b`` equals
    the model's effective weight before LOI.
    """
    fold = _base_weights().fold_canonical
    out = list(new)
    for pair, base in zip(cfg.pairs, cfg.bases, strict=True):
        if base is None:
            continue
        kernel = leaves[base]
        old_a = pair.canonical(leaves[pair.a_index], "a").astype(jnp.float32)
        old_b = pair.canonical(leaves[pair.b_index], "b").astype(jnp.float32)
        new_a = pair.canonical(new[pair.a_index], "a").astype(jnp.float32)
        new_b = pair.canonical(new[pair.b_index], "b").astype(jnp.float32)
        folded = fold(
            kernel.reshape((*pair.batch_shape, pair.m, pair.n)),
            jnp.concatenate([old_a, new_a], -1),
            jnp.concatenate([old_b, -new_b], -2),
            c,
        )
        out[base] = folded.reshape(kernel.shape)
    return out


def _fold_incoming(cfg: _Config, leaves: Sequence[Any], c: jax.Array) -> list[Any]:
    """The leaves with ``W + c a₀ b₀`` as base weights: where the gradient is taken."""
    fold = _base_weights().fold_canonical
    out = list(leaves)
    for pair, base in zip(cfg.pairs, cfg.bases, strict=True):
        if base is not None:
            kernel = leaves[base]
            out[base] = fold(
                kernel.reshape((*pair.batch_shape, pair.m, pair.n)),
                pair.canonical(leaves[pair.a_index], "a"),
                pair.canonical(leaves[pair.b_index], "b"),
                c,
            ).reshape(kernel.shape)
    return out


def _loi(
    cfg: _Config, leaves: list[Any], key: jax.Array, alphas: jax.Array, c: jax.Array
) -> list[Any]:
    """The whole initialization as one program (jitted by the caller)."""
    sketched = _backprop_rsvd(cfg, _fold_incoming(cfg, leaves, c), key, c)
    values = [
        _loi_factors(q, gt_q, p.rank, alphas[i], c, cfg.gauge)
        for i, ((q, gt_q), p) in enumerate(zip(sketched, cfg.pairs, strict=True))
    ]
    new = cfg.treedef.flatten_up_to(_put_pairs(cfg, leaves, cfg.pairs, values))
    return _shift_bases(cfg, leaves, new, c)


# ------------------------------------------------------------------- public API


def riemannion_loi_init(
    grad_fn: Callable[[Any], Any],
    params: Any,
    key: jax.Array,
    *,
    alpha: jax.typing.ArrayLike | None = None,
    pairs: _pair_types.PairsLike = "auto",
    lora_scale: jax.typing.ArrayLike = 1.0,
    oversample: int = DEFAULT_OVERSAMPLE,
    power_iters: int = DEFAULT_POWER_ITERS,
    gauge: Gauge = "balanced",
    shift_base: bool = True,
    base_path: BasePath | None = None,
    sketch: Sketch = "auto",
) -> Any:
    r"""Locally optimal initialization (LOI) of every LoRA pair, model unchanged.

    With :math:`G_0 = ∂L/∂ΔW` at the current weights and its top singular pairs
    :math:`G_0 ≈ \sum_i σ_i u_i v_i^\top`, each pair is set to (Theorem 5.1 with
    :math:`S = \operatorname{diag}(α I_r, I_r)`)

    .. math::

      c\, a b = α\, U_{[:, :r]} V_{[:, r:2r]}^\top, \qquad
      W' = W + c\, a_0 b_0 - c\, a b ,

    and its base weight :math:`W` (the leaf beside the pair, see ``base_path``) is
    shifted by the same product (Alg. 5 line 3, Eq. 15), so ``W' + c · a @ b`` is the
    effective weight before the call and the model output does not change. Every
    singular value of the point equals :math:`|α|`, and its tangent space
    :math:`\{U_{[:, :r]} K^\top + N V_{[:, r:2r]}^\top\}` holds the whole top-
    :math:`2r` part of :math:`G_0`: :math:`\|P_T G_0\|_F^2 = \sum_{i \le 2r}
    σ_i^2`, the most any rank-:math:`r` point can capture (problem 16), so the first
    Riemannion step uses all of it. The default :math:`α = -0.01/\sqrt r` and
    ``oversample=16``, ``power_iters=1`` are the paper's LLM settings (App. F; it
    used :math:`q = 15`, :math:`p = r`, :math:`α = -1/\sqrt r` for diffusion). Any
    non-zero :math:`α` is accepted; Alg. 5 line 2 as printed omits :math:`α` (it is
    :math:`1` there). The sign of :math:`α` is kept for parity with the paper but
    does not select a different family of points: :math:`U_{[:, :r]}` and
    :math:`V_{[:, r:2r]}` come from different singular pairs, so each column's sign
    is a free choice of the SVD, and :math:`±α` give equally optimal points.

    **BackPropRSVD.** :math:`G_0` is never formed. A randomized SVD (Halko et al.)
    reads it through backward passes: with :math:`a = 0, b = Ω^\top`,
    :math:`∂L/∂a = c\, G_0 Ω`, and with :math:`b = 0, a = Q`,
    :math:`∂L/∂b = c\, Q^\top G_0` (the products are zero, so every call sees the
    weights :math:`W + c\,a_0 b_0` as they are). All pairs are sketched in the same
    calls, with sketches of width :math:`k = \min(2r + \text{oversample}, m, n)`
    (random signs; the paper draws Gaussians).

    **Backward passes.** The paper's count, :math:`2(q + 1)` for
    ``power_iters`` :math:`= q`, needs factors of width :math:`k`. ``sketch="wide"``
    feeds the whole sketch in one call with factor leaves of rank :math:`k`, which
    reaches :math:`2(q + 1)`; it needs a ``grad_fn`` that accepts another rank, as
    plain functions and ``nnx.merge`` of an ``nnx.split`` state do (a scale computed
    from the leaf's rank, like PEFT's ``α/r``, is harmless: the sketch ignores
    scale). Flax linen modules check parameter shapes and do not.
    ``sketch="chunked"`` keeps the leaves' shapes and feeds :math:`r` columns per
    call: :math:`2(q + 1)\max_i \lceil k_i / r_i \rceil` calls (with the defaults
    3 calls per product for :math:`r \ge 16`, 10 for :math:`r = 2`), run one after
    another with :func:`jax.lax.map` (the memory of one backward pass).
    ``sketch="auto"`` (default) traces ``grad_fn`` once at the wide shapes with
    :func:`jax.eval_shape` and uses ``"wide"`` when that works, else ``"chunked"``;
    the two give the same result up to rounding. The whole computation is one
    jitted program.

    Args:
      grad_fn: ``params -> grads``, the gradient of the loss on a fixed batch for a
        tree shaped like ``params``, e.g. ``jax.grad(loss)``. It is traced, so it
        must be a pure JAX function.
      params: the params tree: LoRA pairs are replaced, base weights shifted, other
        leaves kept.
      key: PRNG key for the sketch.
      alpha: :math:`α \ne 0`; ``None`` uses the paper's :math:`-0.01/\sqrt r`
        per pair (``default_alpha`` in this module).
      pairs: how to find factor pairs; see :func:`find_lora_pairs`.
      lora_scale: :math:`c` in ``ΔW = c · a @ b``.
      oversample: extra sketch columns beyond ``2r`` (capped at ``min(m, n)``).
      power_iters: power iterations :math:`q` of the randomized SVD.
      gauge: ``"balanced"`` (:math:`a = U_1 (|α|/c)^{1/2}`, :math:`b =
        \operatorname{sign}(α)(|α|/c)^{1/2} V_2^\top`) or ``"left_orthogonal"``
        (:math:`a = U_1`, :math:`b = (α/c) V_2^\top`, Alg. 5 line 2).
      shift_base: subtract the LOI product from each pair's base weight (and fold
        the incoming product in), keeping the model. ``False`` leaves base weights
        alone: the model output then changes by :math:`c\,(a b - a_0 b_0)`, and the
        gradient is taken at :math:`W` with the adapters at zero.
      base_path: a callable from the path of ``a`` (a tuple of key names) to the
        path of its base weight, which must be laid out like ``a @ b``; default:
        a sibling ``kernel``, ``base_module/kernel``, or the ``kernel`` beside a
        ``lora`` submodule (Flax linen and NNX), as :func:`merge_lora`.
      sketch: ``"auto"``, ``"wide"`` or ``"chunked"``; see above.

    Returns:
      A tree like ``params`` with every pair initialized and every base weight
      shifted, in the params' dtypes (one rounding of the base weight to its dtype).

    Raises:
      ValueError: ``alpha == 0``; a bad ``oversample``, ``power_iters``, ``gauge``
        or ``sketch``; ``2r > min(m, n)`` for a pair; an unpaired factor; with
        ``shift_base``, a pair without base weight or with a base weight whose
        shape is not that of ``a @ b``; ``sketch="wide"`` with a ``grad_fn`` that
        rejects other ranks. Messages name the pair's path.
      TypeError: a non-integer ``oversample`` or ``power_iters``; a complex,
        integer or boolean factor of a pair (naming its path).

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from lora_muon_jax.peers import riemannion_loi_init
      >>> rng = np.random.default_rng(0)
      >>> x, y = rng.standard_normal((32, 12)), rng.standard_normal((32, 10))
      >>> params = {'kernel': jnp.asarray(rng.standard_normal((12, 10)), jnp.float32),
      ...           'lora_a': jnp.zeros((12, 2)), 'lora_b': jnp.zeros((2, 10))}
      >>> def loss(p):
      ...   w = p['kernel'] + p['lora_a'] @ p['lora_b']
      ...   return 0.5 * jnp.mean((x @ w - y) ** 2)
      >>> init = riemannion_loi_init(jax.grad(loss), params, jax.random.key(0),
      ...                            oversample=4, power_iters=2)
      >>> s = np.linalg.svd(init['lora_a'] @ init['lora_b'], compute_uv=False)
      >>> print(np.round(s[:3], 5))  # rank 2, both singular values |α| = 0.01/√2
      [0.00707 0.00707 0.     ]
      >>> w = lambda p: p['kernel'] + p['lora_a'] @ p['lora_b']
      >>> print(float(jnp.max(jnp.abs(w(init) - w(params)))) < 1e-6)  # model unchanged
      True

    References:
      Bogachev et al., `LoRA meets Riemannion: Muon Optimizer for
      Parametrization-independent Low-Rank Adapters
      <https://arxiv.org/abs/2507.12142>`_, 2025 (v2: §5-6, Alg. 3 and 5, App. F)

      Halko, Martinsson, Tropp, `Finding structure with randomness
      <https://arxiv.org/abs/0909.4061>`_, SIAM Review, 2011

    Sources:
      As :func:`riemannion`; the LOI parts of the paper read are §5 (Eq. 15-17,
      Theorem 5.1), §6 (Eq. 18, Alg. 3), App. B (Alg. 5 lines 1-3) and App. F.
    """
    _check_args(alpha, lora_scale, oversample, power_iters, gauge, sketch)
    paths, leaves, treedef = _key_paths.flatten_with_paths(params)
    plan = _pair_matching.plan_pairs(paths, leaves, pairs)
    _pair_tree.check_pair_dtypes(_LOI_FN, plan, leaves)
    check_ranks(_LOI_FN, plan, factor=2)
    if not plan.pairs:
        return params
    no_bases: tuple[int | None, ...] = (None,) * len(plan.pairs)
    bases = _find_bases(paths, leaves, plan, base_path) if shift_base else no_bases
    widths = tuple(min(2 * p.rank + oversample, p.m, p.n) for p in plan.pairs)
    probes, calls = _choose_probes(grad_fn, treedef, leaves, plan, widths, sketch)
    cfg = _Config(grad_fn, treedef, plan.pairs, probes, widths, calls, bases, gauge, power_iters)
    alphas = jnp.asarray(
        [default_alpha(p.rank) for p in plan.pairs]
        if alpha is None
        else jnp.broadcast_to(jnp.asarray(alpha, jnp.float32), (len(plan.pairs),)),
        jnp.float32,
    )
    out = jax.jit(functools.partial(_loi, cfg))(
        list(leaves), key, alphas, jnp.asarray(lora_scale, jnp.float32)
    )
    return jax.tree.unflatten(treedef, out)
