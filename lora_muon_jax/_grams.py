"""Gram matrices of LoRA factors, read in the factors' stored layout, in float32.

(float64 for float64 factors under ``jax_enable_x64``: :func:`work_dtype`.)

The LoRA-Muon step needs, per factor, the ``r×r`` Gram of its momentum and of its
partner: ``aᵀa`` for a left factor ``a`` and ``b bᵀ`` for a right factor ``b``. Both
are "contract every matrix axis, keep the batch axes and the rank axis", so one
``dot_general`` computes them on the leaf as stored (``(*batch, m, r)``, PEFT's
``(r, in)``, MaxText's ``(emb, layers, r)``, gemma's ``(heads, head_dim, r)``...)
with no transpose or copy of the factor.

Scale is handled once, on the Grams: every Gram is divided by its trace, so the
``r×r`` work sees matrices of unit trace whatever the scale of the factors, and
``1/‖x‖_F`` comes back as a scalar to apply later. Grams of very large (≳1e19),
very small (≲1e-19) or exactly zero matrices cannot be formed directly in float32;
when any Gram of the step is out of range, all of them are recomputed from
max-abs-normalized inputs inside a ``lax.cond``, so the common case pays nothing.

The spectral norm ``σ_max`` of a factor is read from the same unit-trace Grams
(:func:`spectral_norms`, :func:`log_spectral_norms`): this is where the gauge
rebalancing, the diagnostics and the balanced initialization get it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _lapack_order, _linalg, _sharding
from lora_muon_jax._pair_types import FactorLayout

HIGHEST = jax.lax.Precision.HIGHEST

# Gram traces (squared Frobenius norms) inside this window are computed exactly
# enough in float32; outside it (or zero, which may be an underflow), the
# normalized path decides.
_TRACE_MIN = 1e-24
_TRACE_MAX = 1e30
# A matrix whose largest entry is below this is numerically zero: dividing by its
# norm would overflow float32 in the step that follows.
_ZERO_SCALE = 1e-30


def work_dtype(dtype: Any) -> jnp.dtype:
    """The dtype of the Grams and ``r×r`` work for factors of ``dtype``.

    float64 for float64 factors (under ``jax_enable_x64``), float32 for every other
    dtype (float32, bfloat16, float16).
    """
    f64 = jnp.dtype(dtype) == jnp.dtype("float64")
    return jnp.dtype("float64") if f64 else jnp.dtype("float32")


def canonical_layout(ndim: int, tall: bool) -> FactorLayout:
    """Layout of ``(*batch, m, r)`` (``tall``) or ``(*batch, r, n)``."""
    batch = tuple(range(ndim - 2))
    return (
        FactorLayout(ndim - 1, batch, (ndim - 2,))
        if tall
        else FactorLayout(ndim - 2, batch, (ndim - 1,))
    )


def gram(
    x: jax.Array,
    layout: FactorLayout,
    *,
    other: jax.Array | None = None,
    dtype: Any = jnp.float32,
) -> jax.Array:
    """``xᵀx`` over the matrix axes of a stored factor: ``(*batch, r, r)``, float32.

    Args:
      x: a factor (or its momentum) in its stored layout, any float dtype.
      layout: where its rank, batch and matrix axes are.
      other: a second factor ``y`` stored like ``x`` (same layout and matrix
        sizes; its rank may differ): the result is then ``xᵀy``,
        ``(*batch, r_x, r_y)``.
      dtype: the accumulation and result dtype (float32 by default; the float64
        references pass float64).

    Returns:
      The Gram of every batch index, accumulated in ``dtype`` at full precision.
      Under explicit sharding it is replicated over the matrix axes: only ``r×r``
      numbers are reduced across devices.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax._grams import canonical_layout, gram
      >>> b = jnp.arange(6.0).reshape(2, 3)  # a right factor (r, n): its Gram is b bᵀ
      >>> gram(b, canonical_layout(b.ndim, tall=False)).tolist()
      [[5.0, 14.0], [14.0, 50.0]]
    """
    dims = ((layout.matrix_axes, layout.matrix_axes), (layout.batch_axes, layout.batch_axes))
    return jax.lax.dot_general(
        x,
        x if other is None else other,
        dims,
        precision=HIGHEST,
        preferred_element_type=dtype,
        out_sharding=_sharding.small_out_sharding(x, layout.batch_axes),
    )


def _trace(g: jax.Array) -> jax.Array:
    return jnp.trace(g, axis1=-2, axis2=-1)


class NormalizedGrams(NamedTuple):
    """Unit-trace Grams (zero for a zero matrix) and ``1/‖x‖_F`` (zero likewise)."""

    grams: list[jax.Array]
    inv_norms: list[jax.Array]


def _normalize_fast(grams: list[jax.Array]) -> NormalizedGrams:
    traces = [_trace(g) for g in grams]
    return NormalizedGrams(
        grams=[g / t[..., None, None] for g, t in zip(grams, traces, strict=True)],
        inv_norms=[jax.lax.rsqrt(t) for t in traces],
    )


def _max_abs(x: jax.Array, layout: FactorLayout) -> jax.Array:
    """Largest ``|x|`` per batch index, kept broadcastable against ``x``."""
    reduce = tuple(i for i in range(x.ndim) if i not in layout.batch_axes)
    return jnp.max(jnp.abs(x.astype(work_dtype(x.dtype))), axis=reduce, keepdims=True)


def _batch_values(s: jax.Array, layout: FactorLayout) -> jax.Array:
    """A keepdims per-batch array as ``(*batch)`` in ``layout.batch_axes`` order."""
    kept = sorted(layout.batch_axes)
    flat = s.reshape(tuple(s.shape[i] for i in kept))
    return flat.transpose(tuple(kept.index(i) for i in layout.batch_axes))


def _normalize_slow(items: list[tuple[jax.Array, FactorLayout]]) -> NormalizedGrams:
    grams: list[jax.Array] = []
    inv_norms: list[jax.Array] = []
    for x, layout in items:
        # ``x / s`` is a factor-sized temporary. Computing each one only after the
        # previous Gram lets XLA reuse one buffer for all of them, so this branch
        # (which the buffer assignment reserves memory for on every step) costs the
        # largest factor, not the whole tree.
        s = _lapack_order.after(_max_abs(x, layout), grams[-1:])
        nonzero = s > _ZERO_SCALE
        w = work_dtype(x.dtype)
        g = gram(x.astype(w) / jnp.where(nonzero, s, 1.0), layout, dtype=w)
        s = _batch_values(s, layout)[..., None, None]
        t = _trace(g)[..., None, None]
        nonzero = _batch_values(nonzero, layout)[..., None, None] & (t > 0)
        t = jnp.where(nonzero, t, 1.0)
        grams.append(jnp.where(nonzero, g / t, 0.0))
        inv = jax.lax.rsqrt(t) / jnp.where(nonzero, s, 1.0)
        inv_norms.append(jnp.where(nonzero, inv, 0.0)[..., 0, 0])
    return NormalizedGrams(grams, inv_norms)


def normalized_grams(items: Sequence[tuple[jax.Array, FactorLayout]]) -> NormalizedGrams:
    """Unit-trace Grams of stored factors and their inverse Frobenius norms.

    Args:
      items: ``(x, layout)`` pairs; see :func:`gram`.

    Returns:
      ``G/tr(G)`` of every batch index (zero for a numerically zero ``x``) and
      ``1/‖x‖_F`` (zero likewise), both in :func:`work_dtype`, batch axes first.
    """
    items = list(items)
    grams = [gram(x, layout, dtype=work_dtype(x.dtype)) for x, layout in items]
    in_range = [jnp.all((_trace(g) > _TRACE_MIN) & (_trace(g) < _TRACE_MAX)) for g in grams]
    ok = jnp.all(jnp.stack(in_range)) if in_range else jnp.array(True)
    return jax.lax.cond(
        ok,
        lambda: _normalize_fast(grams),
        lambda: _normalize_slow(items),
    )


def _top_eigenvalues(
    items: Sequence[tuple[jax.Array, FactorLayout]],
) -> tuple[list[jax.Array], list[jax.Array]]:
    """``λ_max`` of each unit-trace Gram and ``1/‖x‖_F``: one ``eigvalsh`` per rank."""
    norm = normalized_grams(items)
    lam = _linalg.apply_batched_by_size(
        lambda g: jnp.linalg.eigvalsh(_linalg.sym(g))[..., -1], [(g,) for g in norm.grams]
    )
    return lam, norm.inv_norms


def spectral_norms(items: Sequence[tuple[jax.Array, FactorLayout]]) -> list[jax.Array]:
    """``σ_max`` of stored factors, per batch index, float32 (``0`` for a zero factor).

    ``σ_max(x)² = λ_max(xᵀx) = λ_max(Ĝ) ‖x‖_F²`` with the unit-trace Gram ``Ĝ`` of
    :func:`normalized_grams`: only ``r×r`` eigenvalues are computed (one batched
    ``eigvalsh`` per rank for all ``items``), and huge or tiny factors take the
    normalized path, so no step overflows. Use :func:`log_spectral_norms` for ratios
    of factors far apart in scale.

    Args:
      items: ``(x, layout)`` pairs; see :func:`gram`.

    Returns:
      ``σ_max`` of every batch index of every ``x``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax._grams import canonical_layout, spectral_norms
      >>> a = jnp.diag(jnp.array([3.0, 1.0]))
      >>> b = jnp.zeros((2, 4))
      >>> norms = spectral_norms([(a, canonical_layout(2, True)), (b, canonical_layout(2, False))])
      >>> [f"{s:.4f}" for s in norms]
      ['3.0000', '0.0000']
    """
    lams, inv_norms = _top_eigenvalues(items)
    out = []
    for lam, inv in zip(lams, inv_norms, strict=True):
        ok = inv > 0
        out.append(jnp.where(ok, jnp.sqrt(jnp.maximum(lam, 0.0)) / jnp.where(ok, inv, 1.0), 0.0))
    return out


def log_spectral_norms(items: Sequence[tuple[jax.Array, FactorLayout]]) -> list[jax.Array]:
    """``log σ_max`` of stored factors, per batch index, float32 (``-inf`` for zero).

    As :func:`spectral_norms`, as ``½ log λ_max(Ĝ) - log(1/‖x‖_F)``: finite for any
    non-zero factor, so differences of logs give ratios of spectral norms that
    would overflow or underflow as quotients.

    Args:
      items: ``(x, layout)`` pairs; see :func:`gram`.

    Returns:
      ``log σ_max`` of every batch index of every ``x``.
    """
    lams, inv_norms = _top_eigenvalues(items)
    out = []
    for lam, inv in zip(lams, inv_norms, strict=True):
        ok = (inv > 0) & (lam > 0)
        log_sigma = 0.5 * jnp.log(jnp.where(ok, lam, 1.0)) - jnp.log(jnp.where(ok, inv, 1.0))
        out.append(jnp.where(ok, log_sigma, -jnp.inf))
    return out
