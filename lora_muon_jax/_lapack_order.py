"""Orders batched LAPACK calls on CPU one after another: a guard against a deadlock.

On CPU, jaxlib runs a batched LAPACK call (``potrf``, ``trsm``, ``syevd``,
``geqrf``/``orgqr``, ``gesdd``) by fanning the batch out over XLA's intra-op thread
pool and blocking the calling pool thread until its pieces finish. Two such calls
that XLA schedules at the same time can hold every pool thread while their pieces
wait in the queue, and the step deadlocks (seen with LoRA-RITE on a 2-core machine).
Every transformation here that makes more than one batched LAPACK call per step
feeds each call's input through its predecessor's output with :func:`after`.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import jax
import jax.numpy as jnp

from lora_muon_jax import _sharding


def after(x: Any, *deps: Any) -> Any:
    """``x`` unchanged, but computed only once every array of ``deps`` is.

    Orders LAPACK calls one after another. On CPU, jaxlib runs a batched LAPACK call
    (``potrf``, ``syevd``, ``geqrf``/``orgqr``, ``gesdd``) by fanning the batch out
    over XLA's intra-op thread pool and blocking the calling pool thread until its
    pieces finish. Two such calls that XLA schedules concurrently can then hold
    every pool thread while their pieces wait in the queue, and the step deadlocks
    (seen with LoRA-RITE on a 2-core machine within a few hundred steps). Feeding a
    factorization's input through its predecessor's output removes the concurrency.

    XLA's CPU runtime orders work by buffers, not by HLO edges, so an
    ``optimization_barrier`` does not serialize anything there: ``x`` really is
    recomputed from a scalar of each dependency, ``min(|d|, 0)``, which is ``0`` for
    finite ``d`` (and NaN only if ``d`` already is). The cost is one elementwise pass
    over ``x``, a thin factor or an r×r stack.
    """
    leaves = jax.tree.leaves(deps)
    if not leaves:
        return x
    zero = functools.reduce(
        operator.add,
        (_zero_from(d) for d in leaves),
    )
    return jax.tree.map(lambda a: a + zero.astype(a.dtype), x)


def _zero_from(d: jax.Array) -> jax.Array:
    """``0`` computed from ``d`` (NaN if ``d`` is): one entry, or all under explicit sharding.

    An explicitly sharded array cannot be indexed down to one entry of a sharded
    axis, so it is reduced instead (a pass over ``d``, replicated result).
    """
    if _sharding.explicit_spec(d) is not None:
        return jnp.minimum(jnp.min(jnp.abs(d.astype(jnp.float32))), 0.0)
    return jnp.minimum(jnp.abs(d[(0,) * d.ndim].astype(jnp.float32)), 0.0)
