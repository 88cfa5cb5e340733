"""LoRA-Pre's moment factors: their rank, their initialization, the shared checks.

Each moment of a ``(*batch, p, q)`` matrix is kept as ``b (*batch, p, r)`` times
``a (*batch, r, q)`` with ``r = min(rank, p, q)``; ``b = 0`` and
``a ~ N(0, init_scale²)`` at init, as in the paper's sources. Used by both
variants (:mod:`.adam`, :mod:`.muon`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from lora_muon_jax import _validation
from lora_muon_jax.peers import _dense_weights
from lora_muon_jax.peers._lora_pre.newton import FACTOR_UPDATES


def factor_rank(rank: int, x: Any) -> int:
    """The rank used for a ``(*batch, p, q)`` leaf: ``min(rank, p, q)``."""
    _, p, q = _dense_weights.matrix_size(x)
    return min(rank, p, q)


def check_hyperparams(
    fn: str, rank: Any, damping: Any, init_scale: Any, state_dtype: Any, factor_update: Any
) -> jnp.dtype | None:
    """Checks what both variants share; returns ``state_dtype`` as a dtype (or ``None``)."""
    _validation.check_static_int(fn, "rank", rank)
    _validation.check_choice(fn, "factor_update", factor_update, FACTOR_UPDATES)
    _validation.check_scalar("damping", damping, low=0.0, low_inclusive=False, fn=fn)
    _validation.check_scalar("init_scale", init_scale, low=0.0, low_inclusive=False, fn=fn)
    return _validation.float_dtype(fn, "state_dtype", state_dtype)


def init_factor_trees(
    params: Any, rank: int, seed: Any, init_scale: Any, dtype: jnp.dtype | None, moments: int
) -> list[tuple[Any, Any]]:
    """``moments`` trees of ``(b, a)`` factors: ``b = 0``, ``a ~ N(0, init_scale²)``.

    Args:
      params: the matrix leaves, ``(*batch, p, q)`` each.
      rank: the requested rank (capped per leaf by :func:`factor_rank`).
      seed: integer seed of the random ``a``.
      init_scale: standard deviation of ``a``.
      dtype: dtype of the factors; ``None`` gives each leaf's own dtype.
      moments: how many ``(b, a)`` trees (1 for Muon, 2 for Adam).

    Returns:
      ``moments`` pairs of trees ``(b, a)``, shaped like ``params`` at the top.
    """
    leaves, treedef = jax.tree.flatten(params)
    keys = _dense_weights.leaf_keys(seed, leaves, moments)
    out = []
    for k in range(moments):
        bs, as_ = [], []
        for x, kx in zip(leaves, keys, strict=True):
            batch, p, q = _dense_weights.matrix_size(x)
            r = factor_rank(rank, x)
            dt = x.dtype if dtype is None else dtype
            bs.append(jnp.zeros((*batch, p, r), dt))
            noise = jax.random.normal(kx[k], (*batch, r, q), jnp.float32)
            as_.append((init_scale * noise).astype(dt))
        out.append((jax.tree.unflatten(treedef, bs), jax.tree.unflatten(treedef, as_)))
    return out
