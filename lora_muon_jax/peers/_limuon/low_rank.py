"""LiMuon's Option #2: the momentum carried between steps as a randomized rank-r̂ SVD.

The factorization itself, the randomized SVD, lives in
:func:`lora_muon_jax._linalg.randomized_svd` (shared with Riemannion's LOI through
:func:`lora_muon_jax._linalg.randomized_range`); here it is kept as three trees.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _linalg, _pair_tree
from lora_muon_jax.peers import _dense_weights


class LowRankMomentum(NamedTuple):
    """Carried momenta ``M̂ = U diag(S) Vᵀ``: three trees like the params.

    For one ``(*batch, m, n)`` matrix the leaves have shapes ``u: (*batch, m, r̂)``,
    ``s: (*batch, r̂)``, ``v: (*batch, n, r̂)`` (:func:`randomized_svd` returns
    them as arrays). Keeping three trees, rather than a tuple per leaf, keeps the
    state a tree of arrays under Flax's ``nnx.Optimizer``.
    """

    u: optax.Updates
    s: optax.Updates
    v: optax.Updates


def randomized_svd(x: jax.Array, key: jax.Array, rank: int, oversampling: int) -> LowRankMomentum:
    """Rank-``rank`` randomized SVD of a float32 ``(*batch, m, n)`` stack (Halko et al.).

    ``Ω ~ N(0, 1)^{n×k}`` with ``k = min(rank + oversampling, m, n)``;
    ``Q = qr(x Ω)``; ``Ũ Σ Vᵀ = svd(Qᵀ x)``; ``U = Q Ũ``; the top ``min(rank, m, n)``
    triplets are kept. Exact when ``rank(x) <= k``, in particular when
    ``k = min(m, n)``. A zero matrix gives zero singular values (no NaN).
    """
    return LowRankMomentum(*_linalg.randomized_svd(x, key, rank, oversampling))


def reconstruct(mu: LowRankMomentum) -> jax.Array:
    """``U diag(S) Vᵀ`` in float32."""
    u = _pair_tree.f32(mu.u) * _pair_tree.f32(mu.s)[..., None, :]
    return _linalg.mm(u, jnp.swapaxes(_pair_tree.f32(mu.v), -1, -2))


def zero_momentum(params: Any, rank: int, mu_dtype: Any) -> LowRankMomentum:
    """A zero carried momentum of rank ``min(rank, m, n)`` for every matrix leaf."""
    leaves, treedef = jax.tree.flatten(params)
    us, ss, vs = [], [], []
    for x in leaves:
        batch, m, n = _dense_weights.matrix_size(x)
        r = min(rank, m, n)
        dt = x.dtype if mu_dtype is None else mu_dtype
        us.append(jnp.zeros((*batch, m, r), dt))
        ss.append(jnp.zeros((*batch, r), dt))
        vs.append(jnp.zeros((*batch, n, r), dt))
    return LowRankMomentum(*(jax.tree.unflatten(treedef, x) for x in (us, ss, vs)))
