"""Explicit-sharding helpers: keep every cross-device reduction r×r-sized.

Under ``jax.sharding`` explicit axes (the default of ``jax.make_mesh``), a Gram
``xᵀx`` that contracts a sharded ``m`` (or ``n``) axis is ambiguous unless the
output sharding is given. LoRA Grams are ``r×r``: they are declared replicated
over the matrix axes (batch axes keep their sharding), which lowers to an
all-reduce of ``r²`` numbers per matrix and never gathers a factor. Under auto
sharding (GSPMD) or on one device these helpers do nothing.
"""

from __future__ import annotations

from typing import Any

import jax
from jax.sharding import PartitionSpec


def explicit_spec(x: Any) -> PartitionSpec | None:
    """The explicit ``PartitionSpec`` of ``x``, or ``None`` if not explicitly sharded."""
    try:
        sharding = jax.typeof(x).sharding
    except (TypeError, AttributeError):
        return None
    mesh = getattr(sharding, "mesh", None)
    if mesh is None or getattr(mesh, "empty", True):
        return None
    explicit = jax.sharding.AxisType.Explicit
    if not any(t == explicit for t in getattr(mesh, "axis_types", ())):
        return None
    return sharding.spec


def _batch_entries(spec: PartitionSpec, ndim: int) -> tuple[Any, ...]:
    entries = tuple(spec) + (None,) * (ndim - len(tuple(spec)))
    return entries[: ndim - 2]


def small_out_sharding(x: Any, batch_axes: tuple[int, ...] | None = None) -> PartitionSpec | None:
    """Output sharding for an ``r×r`` result computed from ``x``.

    ``x`` is ``(*batch, p, q)`` by default; with ``batch_axes`` its batch axes are
    those axes, in that order (a factor stored in another layout).
    """
    spec = explicit_spec(x)
    if spec is None:
        return None
    if batch_axes is None:
        return PartitionSpec(*_batch_entries(spec, x.ndim), None, None)
    entries = tuple(spec) + (None,) * (x.ndim - len(tuple(spec)))
    return PartitionSpec(*(entries[i] for i in batch_axes), None, None)


def replicate(x: jax.Array) -> jax.Array:
    """Fully replicates a small array under explicit sharding (no-op otherwise)."""
    spec = explicit_spec(x)
    if spec is None or all(s is None for s in spec):
        return x
    return jax.sharding.reshard(x, PartitionSpec())


def like_batch(
    t: jax.Array, like: jax.Array, batch_axes: tuple[int, ...] | None = None
) -> jax.Array:
    """Gives a small ``(*batch, r, r)`` array the batch sharding of ``like``.

    ``batch_axes`` locate the batch axes in ``like`` (default: all but the last two).
    """
    target = small_out_sharding(like, batch_axes)
    if target is None or explicit_spec(t) is None:
        return t
    return jax.sharding.reshard(t, target)
