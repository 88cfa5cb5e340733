"""Spectron's spectral-norm estimates: warm-started power iteration on each factor.

Each factor keeps a unit vector in its rank space (``r`` numbers); a power step
through the tall view ``T`` (``a`` or ``bᵀ``) gives a lower bound on ``σ_max`` that
converges as the step is repeated across updates (the paper's Alg. 3). The vectors
start at the exact top right singular vector (:func:`start_vectors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp

from lora_muon_jax import _grams, _linalg, _pair_types, _sharding

# Fixed seed of the start vectors of zero factors: the state is deterministic and
# needs no user key.
_POWER_SEED = 0


def _power_step(x: jax.Array, v: jax.Array, left: bool) -> tuple[jax.Array, jax.Array]:
    """One power iteration for ``σ_max`` of a factor, from a rank-space vector.

    ``x`` is ``a`` (``(*batch, m, r)``, ``left=True``) or ``b`` (``(*batch, r, n)``).
    With the tall view ``T`` (``a`` or ``bᵀ``): ``u = T v/‖T v‖``, ``z = Tᵀ u``,
    ``σ = ‖z‖ ≤ σ_max`` and the new ``v = z/‖z‖``. A zero ``T v`` (a zero factor)
    gives ``σ = 0`` and keeps ``v``.
    """
    hi = _linalg.HIGHEST
    if left:
        w = jnp.einsum("...mr,...r->...m", x, v, precision=hi)
    else:
        w = jnp.einsum("...rn,...r->...n", x, v, precision=hi)
    w_norm = jnp.linalg.norm(w, axis=-1, keepdims=True)
    u = w / jnp.where(w_norm > 0, w_norm, 1.0)
    # z contracts the long (possibly sharded) axis: only r numbers are reduced.
    small = _sharding.small_out_sharding(x)
    out = None if small is None else jax.sharding.PartitionSpec(*tuple(small)[:-1])
    if left:
        z = jnp.einsum("...mr,...m->...r", x, u, precision=hi, out_sharding=out)
    else:
        z = jnp.einsum("...rn,...n->...r", x, u, precision=hi, out_sharding=out)
    sigma = jnp.linalg.norm(z, axis=-1, keepdims=True)
    new_v = jnp.where(sigma > 0, z / jnp.where(sigma > 0, sigma, 1.0), v)
    return sigma[..., 0], new_v


def power_iteration(
    x: jax.Array, v: jax.Array, left: bool, iterations: int
) -> tuple[jax.Array, jax.Array]:
    """``iterations`` warm-started power steps on a factor (a rolled loop).

    Args:
      x: the factor, ``a`` (``(*batch, m, r)``, ``left=True``) or ``b``
        (``(*batch, r, n)``), float32.
      v: the unit rank-space vectors ``(*batch, r)`` of the previous update.
      left: whether ``x`` is the left factor ``a``.
      iterations: power steps (at least 1).

    Returns:
      ``(σ, v)``: the estimate ``σ ≤ σ_max(x)`` of shape ``batch`` (0 for a zero
      factor) and the new vectors.
    """

    def body(_: Any, carry: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        return _power_step(x, carry[1], left)

    sigma0 = jnp.zeros(v.shape[:-1], v.dtype)
    return jax.lax.fori_loop(0, iterations, body, (sigma0, v))


def start_vectors(pair: _pair_types.LoRAPair, k: int, leaves: Sequence[Any]) -> list[jax.Array]:
    """Unit start vectors for both factors of pair ``k``: the exact top right singular vector.

    It is the top eigenvector of the factor's r×r Gram (one small ``eigh``), so
    the first ``σ`` are exact whatever the spectral gap; a warm-up of a few power
    steps can leave them several percent low when the top two singular values are
    close. A zero factor gets a fixed-seed random unit vector instead.
    """
    key = jax.random.fold_in(jax.random.key(_POWER_SEED), k)
    out = []
    roles: tuple[tuple[Literal["a", "b"], int], ...] = (("a", 0), ("b", 1))
    for role, sub in roles:
        index = pair.a_index if role == "a" else pair.b_index
        x = pair.canonical(leaves[index], role).astype(jnp.float32)
        lam, vecs = jnp.linalg.eigh(_grams.gram(x, _grams.canonical_layout(x.ndim, role == "a")))
        v = jax.random.normal(jax.random.fold_in(key, sub), lam.shape, jnp.float32)
        v = v / jnp.linalg.norm(v, axis=-1, keepdims=True)
        out.append(jnp.where(lam[..., -1:] > 0, vecs[..., -1], v))
    return out
