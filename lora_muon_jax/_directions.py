"""The batched LoRA-Muon engine: directions of every adapter of a tree at once.

For a pair ``ΔW = a @ b`` with momenta ``m_a`` (like ``a``) and ``m_b`` (like ``b``)
the LoRA-Muon directions are

.. math::

  D_a = \\operatorname{msign}(m_a R_b) R_b = m_a T_a, \\qquad
  D_b = R_a \\operatorname{msign}(R_a m_b) = T_b m_b,

with ``R_a = (aᵀa)^{-1/2}``, ``R_b = (b bᵀ)^{-1/2}`` and the symmetric ``r×r``
matrices ``T`` of :mod:`lora_muon_jax._whitened_polar` (docs/algorithm.md §Gram
shortcut), so that
``‖D_a b‖₂ = ‖a D_b‖₂ = 1``. :mod:`lora_muon_jax._algorithm1` writes the same
maths for one pair, as the paper does; this module is how it runs on a whole tree:

* every Gram and every thin product is one ``dot_general`` on the leaf **as stored**
  (any rank, batch and matrix axes): no factor-sized buffer is transposed, stacked
  or copied;
* only the ``r×r`` Grams are stacked, one batch per rank for the whole tree, so the
  ``r×r`` work is a handful of calls whatever the number of adapters;
* scale is taken out on the Grams (:mod:`lora_muon_jax._grams`) and put back as
  scalars: ``1/‖m‖`` and the caller's ``scale`` are folded into ``T``, and
  ``1/‖partner‖`` multiplies the thin product (fused into the caller's elementwise
  update), so no intermediate overflows for any finite input;
* under explicit sharding only ``r×r`` matrices cross devices.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _grams, _lapack_order, _linalg, _sharding, _whitened_polar
from lora_muon_jax._pair_types import FactorLayout, LoRAPair

Method = Literal["gram", "paper"]
METHODS: tuple[str, ...] = ("gram", "paper")


# Relative eigenvalue thresholds of the r×r pseudo-inverses, by source of error.
# Grams accumulated in float32 carry errors of about GRAM_ERROR · λ_max, so an
# eigenvalue must be well above that to be whitened to 1% (the budget): below
# ~100 eps_f32 · λ_max a partner direction counts as zero.
GRAM_RTOL = 100 * float(jnp.finfo(jnp.float32).eps)
# An update rounded to the param dtype errs by eps_dtype per entry, and a partner
# direction with singular value σ_i multiplies that by σ_max/σ_i in the product
# step: directions with σ_i/σ_max < ROUNDING_MARGIN · eps_dtype count as zero.
ROUNDING_MARGIN = 2.0
# Updates of partner directions so small that the update would exceed
# finfo(dtype).max / OVERFLOW_MARGIN (float16: 65504) count as zero too.
OVERFLOW_MARGIN = 16.0


def rounding_rtol(dtype: jax.typing.DTypeLike) -> float:
    """``(2 eps_dtype)²``: partner Gram eigenvalues (relative) that ``dtype`` cannot resolve."""
    return (ROUNDING_MARGIN * float(jnp.finfo(dtype).eps)) ** 2


def gram_rtol(dtype: jax.typing.DTypeLike) -> float:
    """``100 eps`` of the Grams' dtype: :data:`GRAM_RTOL`, or float64's for float64 factors."""
    return 100 * float(jnp.finfo(_grams.work_dtype(dtype)).eps)


def dtype_rtol(dtype: jax.typing.DTypeLike, eps: jax.typing.ArrayLike) -> jax.Array:
    """The partner-whitening threshold for factors of ``dtype``: ``max(eps, ...)``.

    ``max(eps, 100 eps_gram, (2 eps_dtype)²)`` with the Grams in float32 (float64
    for float64 factors): about 1.2e-5 for float32 and float16 factors, 2.4e-4 for
    bfloat16 (singular-value ratios 3.5e-3 and 1.6e-2), ``eps`` for float64.
    """
    w = _grams.work_dtype(dtype)
    return jnp.maximum(jnp.asarray(eps, w), max(gram_rtol(dtype), rounding_rtol(dtype)))


def polar_rtol(eps: jax.typing.ArrayLike, dtype: jax.typing.DTypeLike) -> jax.Array:
    """The polar factor's threshold: ``max(eps, 100 eps_gram)`` (about 1.2e-5; ``eps`` for float64).

    The whitened momentum Gram is accumulated in float32 with errors of about
    :data:`GRAM_RTOL` ``· λ_max``, like the partner's. An eigenvalue below that is
    noise, and ``msign`` would still give its direction a full unit step: momentum
    directions whose singular value is below ``√GRAM_RTOL ≈ 3.5e-3`` of the largest
    get no step (measured: momenta of condition number up to 1e7 at extreme scales
    took a term of 1.106 η/2 with the threshold at ``eps = 1e-6``, 1.005 η/2 with it).
    """
    return jnp.maximum(jnp.asarray(eps, _grams.work_dtype(dtype)), gram_rtol(dtype))


class Factor(NamedTuple):
    """One factor of one pair: its leaf, its partner's leaf, their layouts."""

    # The leaf's position in the flattened tree; the field shadows tuple.index.
    index: int  # type: ignore[assignment]
    layout: FactorLayout
    partner: int
    partner_layout: FactorLayout
    tall: bool  # the left factor ``a`` (``m×r``)
    rtol: jax.Array  # partner-whitening threshold for the pair's dtype (dtype_rtol)
    polar_rtol: jax.Array  # threshold of the polar factor's pseudo-inverse (polar_rtol)
    dtype_max: float  # the largest finite value of the factor's dtype


def factors_of(
    pairs: Sequence[LoRAPair], leaves: Sequence[jax.Array], eps: jax.typing.ArrayLike
) -> list[Factor]:
    """The two factors of every pair, ``a`` then ``b``, with their thresholds."""
    out = []
    for pair in pairs:
        dtype = leaves[pair.a_index].dtype
        rtol, big = dtype_rtol(dtype, eps), float(jnp.finfo(dtype).max)
        polar = polar_rtol(eps, dtype)
        la = pair.layout("a", leaves[pair.a_index].ndim)
        lb = pair.layout("b", leaves[pair.b_index].ndim)
        out.append(Factor(pair.a_index, la, pair.b_index, lb, True, rtol, polar, big))
        out.append(Factor(pair.b_index, lb, pair.a_index, la, False, rtol, polar, big))
    return out


def thresholds(f: Factor, inv_s: jax.Array, rank: int, scale: jax.Array) -> jax.Array:
    """Per-matrix ``rtol``: the dtype threshold, raised where the update would overflow.

    The update has entries up to ``scale / σ_min(partner)``; keeping it below
    ``dtype_max / OVERFLOW_MARGIN`` needs ``σ_i ≥ OVERFLOW_MARGIN · scale / dtype_max``,
    i.e. ``λ_i(Ŝ) ≥ floor = (OVERFLOW_MARGIN · scale · inv_s / dtype_max)²`` for the
    unit-trace partner Gram ``Ŝ``. Since ``λ_max(Ŝ) ≥ 1/r``, a relative threshold of
    ``r · floor`` guarantees it.
    """
    floor = jnp.square(OVERFLOW_MARGIN * scale * inv_s / f.dtype_max)
    return jnp.maximum(f.rtol, rank * floor)


def _flat(x: jax.Array) -> jax.Array:
    # r×r stacks are tiny: replicate them (under explicit sharding) so stacks of
    # differently sharded pairs can be batched into one solve.
    return _sharding.replicate(x).reshape((-1,) + x.shape[-2:])


def solve_rxr(
    factors: Sequence[Factor],
    s_grams: Sequence[jax.Array],
    k_grams: Sequence[jax.Array],
    rtols: Sequence[jax.Array],
    leaves: Sequence[jax.Array],
    solver: _whitened_polar.Solver,
) -> list[jax.Array]:
    """``T`` of every factor, each ``(*batch, r, r)``: one batched solve per rank.

    ``rtols`` hold each factor's per-matrix thresholds (its batch shape). Solves of
    different ranks run one after another (:func:`_lapack_order.after`): on CPU they may
    be LAPACK calls, and jaxlib's batched LAPACK kernels can deadlock XLA's thread
    pool when two run at once. ``leaves`` give each ``T`` the batch sharding of its
    factor.
    """
    groups: dict[tuple[int, jnp.dtype], list[int]] = {}
    for i, g in enumerate(s_grams):
        groups.setdefault((g.shape[-1], g.dtype), []).append(i)
    out: list[jax.Array] = list(s_grams)
    previous: tuple[jax.Array, ...] = ()
    for idx in groups.values():
        flats = [_flat(s_grams[i]) for i in idx]
        s = _lapack_order.after(jnp.concatenate(flats), *previous)
        k = jnp.concatenate([_flat(k_grams[i]) for i in idx])
        rtol = jnp.concatenate([_sharding.replicate(rtols[i]).reshape(-1) for i in idx])
        polar = jnp.concatenate(
            [
                jnp.full((f.shape[0],), factors[i].polar_rtol, f.dtype)
                for i, f in zip(idx, flats, strict=True)
            ]
        )
        t = _whitened_polar.whitened_polar(s, k, rtol, polar, solver)
        previous = (t,)
        start = 0
        for i, f in zip(idx, flats, strict=True):
            piece = t[start : start + f.shape[0]].reshape(s_grams[i].shape)
            fac = factors[i]
            out[i] = _sharding.like_batch(piece, leaves[fac.index], fac.layout.batch_axes)
            start += f.shape[0]
    return out


# A factor whose rank axis is its last axis, with rank at most this, is multiplied
# by T as a sum of r broadcast products on CPU: XLA fuses it with the elementwise
# update that follows, so the step reads the momentum and the param once and writes
# no factor-sized temporary. (For a wide ``r×n`` factor the matmul is faster, 4-5%
# on the Llama tree at r = 16; its output buffer is reused across factors, see
# :func:`gram_directions`.)
_ELEMENTWISE_MAX_RANK = 32


def _thin_product_elementwise(x: jax.Array, t: jax.Array, layout: FactorLayout) -> jax.Array:
    """``x T`` for ``x: (*batch, *matrix, r)`` as ``Σ_i x[..., i] T[i, :]``."""
    x = x.astype(t.dtype)
    t = t.reshape(t.shape[:-2] + (1,) * len(layout.matrix_axes) + t.shape[-2:])
    out = x[..., 0:1] * t[..., 0, :]
    for i in range(1, x.shape[-1]):
        out = out + x[..., i : i + 1] * t[..., i, :]
    return out


def _standard_tall(layout: FactorLayout, ndim: int) -> bool:
    n = len(layout.batch_axes)
    return layout.batch_axes == tuple(range(n)) and layout.rank_axis == ndim - 1


def thin_product(x: jax.Array, t: jax.Array, layout: FactorLayout) -> jax.Array:
    """``x T`` over the rank axis of a stored factor, in ``t``'s dtype, in ``x``'s layout.

    ``t`` is ``(*batch, r, r)`` (batch axes in ``layout.batch_axes`` order) and
    symmetric, so ``T m`` of a right factor is the same contraction. The operand
    order puts the rank axis where the leaf has it (after or before its matrix
    axes), so standard layouts need no transpose. On CPU a ``(*batch, m, r)`` factor
    of small rank is multiplied elementwise (see :data:`_ELEMENTWISE_MAX_RANK`).
    """
    if _standard_tall(layout, x.ndim) and x.shape[-1] <= _ELEMENTWISE_MAX_RANK:
        return jax.lax.platform_dependent(
            x,
            t,
            cpu=lambda x, t: _thin_product_elementwise(x, t, layout),
            default=lambda x, t: _thin_product_dot(x, t, layout),
        )
    return _thin_product_dot(x, t, layout)


def _thin_product_dot(x: jax.Array, t: jax.Array, layout: FactorLayout) -> jax.Array:
    batch, nb = layout.batch_axes, len(layout.batch_axes)
    tb = tuple(range(nb))
    if layout.rank_axis > max(layout.matrix_axes):
        out = jax.lax.dot_general(
            x.astype(t.dtype),
            t,
            (((layout.rank_axis,), (nb,)), (batch, tb)),
            precision=_linalg.HIGHEST,
        )
        order = batch + layout.matrix_axes + (layout.rank_axis,)
    else:
        out = jax.lax.dot_general(
            t,
            x.astype(t.dtype),
            (((nb + 1,), (layout.rank_axis,)), (tb, batch)),
            precision=_linalg.HIGHEST,
        )
        order = batch + (layout.rank_axis,) + layout.matrix_axes
    perm = tuple(order.index(axis) for axis in range(x.ndim))
    return out if perm == tuple(range(x.ndim)) else out.transpose(perm)


def per_batch(v: jax.Array, layout: FactorLayout, ndim: int) -> jax.Array:
    """A ``(*batch)`` value (batch-axes order) broadcastable against the stored leaf."""
    order = sorted(range(len(layout.batch_axes)), key=lambda i: layout.batch_axes[i])
    v = v.transpose(order) if order != list(range(len(order))) else v
    shape = [1] * ndim
    for axis, size in zip(sorted(layout.batch_axes), v.shape, strict=True):
        shape[axis] = size
    return v.reshape(shape)


def gram_directions(
    factors: Sequence[Factor],
    params: Sequence[jax.Array],
    sources: Sequence[jax.Array],
    scale: jax.Array,
    solver: _whitened_polar.Solver,
) -> list[jax.Array]:
    """``scale · D`` of every factor in its stored layout (default route).

    In float32, or float64 for float64 factors (:func:`_grams.work_dtype`).

    Four Grams per pair (both momenta, both factors), one batched ``r×r`` solve per
    rank, one thin product per factor.
    """
    items = []
    for f in factors:
        items += [(sources[f.index], f.layout), (params[f.partner], f.partner_layout)]
    norm = _grams.normalized_grams(items)
    k_grams, s_grams = norm.grams[0::2], norm.grams[1::2]
    inv_m, inv_s = norm.inv_norms[0::2], norm.inv_norms[1::2]
    rtols = [
        jnp.broadcast_to(thresholds(f, is_, g.shape[-1], scale), g.shape[:-2])
        for f, is_, g in zip(factors, inv_s, s_grams, strict=True)
    ]
    ts = solve_rxr(factors, s_grams, k_grams, rtols, sources, solver)
    out: list[jax.Array] = []
    for f, t, im, is_ in zip(factors, ts, inv_m, inv_s, strict=True):
        src = sources[f.index]
        # Each thin product starts once the previous one is done: a product that
        # is not fused into the update (a matmul) is a factor-sized buffer, and in
        # this order XLA reuses one buffer for all of them instead of holding every
        # factor's at once. Only an r×r matrix waits; no factor is copied.
        t = _lapack_order.after(t * (im * scale)[..., None, None], out[-1:])
        d = thin_product(src, t, f.layout)
        out.append(d * per_batch(is_, f.layout, src.ndim))
    return out


def _paper_direction(
    m: jax.Array, r_hat: jax.Array, k_hat: jax.Array, inv_m: jax.Array, tall: bool
) -> jax.Array:
    """``msign(m R̂) R̂`` (tall) or ``R̂ msign(R̂ m)`` with Polar Express on the thin side."""
    # ‖m R̂‖_F² = tr(R̂ K R̂) with K = ‖m‖²·K̂: normalize through the r×r Grams so the
    # thin matrix is never squared in float32.
    frob2 = jnp.sum(r_hat * _linalg.mm(k_hat, r_hat), axis=(-2, -1), keepdims=True)
    ok = frob2 > 0
    pre = jnp.where(ok, jax.lax.rsqrt(jnp.where(ok, frob2, 1.0)), 0.0)
    pre = pre * inv_m / _linalg.POLAR_EXPRESS_SAFETY
    x = _linalg.mm(m, r_hat * pre) if tall else _linalg.mm(r_hat * pre, m)
    x = _linalg.polar_express(x, tall=tall, normalize=False)
    return _linalg.mm(x, r_hat) if tall else _linalg.mm(r_hat, x)


def paper_directions(
    jobs: Sequence[tuple[jax.Array, jax.Array, bool]], scale: jax.Array
) -> list[jax.Array]:
    """``scale · D`` by the paper's route, per canonical ``(momentum, partner, tall)``.

    A 7-step damped Newton–Schulz inverse square root of each partner Gram and an
    8-step Polar Express on the thin whitened momentum: matrix products only, at
    the paper's accuracy (about 1e-3). Kept to reproduce the paper. The damping is
    the paper's ``10⁻⁵``, raised to ``(2 eps_dtype)²`` for partners whose dtype cannot
    resolve that (bfloat16): the same rounding bound as :func:`dtype_rtol`.
    """
    items = []
    for m, partner, tall in jobs:
        items += [
            (m, _grams.canonical_layout(m.ndim, tall)),
            (partner, _grams.canonical_layout(partner.ndim, not tall)),
        ]
    norm = _grams.normalized_grams(items)
    out = []
    for j, (m, partner, tall) in enumerate(jobs):
        k_hat, s_hat = norm.grams[2 * j], norm.grams[2 * j + 1]
        shift = max(_linalg.DAMPED_NS_SHIFT, rounding_rtol(partner.dtype))
        r_hat = _linalg.inv_sqrt_damped_newton_schulz(_flat(s_hat), shift).reshape(s_hat.shape)
        r_hat = _sharding.like_batch(r_hat, m)
        inv_m = norm.inv_norms[2 * j][..., None, None]
        d = _paper_direction(m.astype(jnp.float32), r_hat, k_hat, inv_m, tall)
        out.append(d * (norm.inv_norms[2 * j + 1] * scale)[..., None, None])
    return out


def paper_route(
    pairs: Sequence[LoRAPair],
    params: Sequence[jax.Array],
    sources: Sequence[jax.Array],
    scale: jax.Array,
) -> dict[int, jax.Array]:
    """``scale · D`` of every factor by the paper's route, by leaf index, as stored.

    :func:`paper_directions` works on canonical ``(*batch, m, r)`` / ``(*batch, r, n)``
    matrices: each pair's factors and momenta are read in that layout and every
    direction is put back in its leaf's stored layout.
    """
    jobs: list[tuple[jax.Array, jax.Array, bool]] = []
    restore: list[tuple[LoRAPair, Literal["a", "b"], int]] = []
    for pair in pairs:
        a, b = pair.canonical(params[pair.a_index], "a"), pair.canonical(params[pair.b_index], "b")
        m_a = pair.canonical(sources[pair.a_index], "a")
        m_b = pair.canonical(sources[pair.b_index], "b")
        jobs += [(m_a, b, True), (m_b, a, False)]
        restore += [(pair, "a", pair.a_index), (pair, "b", pair.b_index)]
    dirs = paper_directions(jobs, scale)
    return {
        i: pair.restore(d, role, params[i].shape)
        for (pair, role, i), d in zip(restore, dirs, strict=True)
    }
