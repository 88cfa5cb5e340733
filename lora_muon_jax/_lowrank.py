"""The LoRA-Muon direction of one or many factor pairs, computed on r×r matrices.

For a pair ``ΔW = a @ b`` with momenta ``m_a`` (like ``a``) and ``m_b`` (like ``b``)
the LoRA-Muon directions are

.. math::

  D_a = \\operatorname{msign}(m_a R_b) R_b, \\qquad
  D_b = R_a \\operatorname{msign}(R_a m_b), \\qquad
  R_a = (a^\\top a)^{-1/2},\\; R_b = (b b^\\top)^{-1/2},

so that ``‖D_a b‖₂ = ‖a D_b‖₂ = 1``. Both are thin products of the momentum with an
r×r matrix built from four Gram matrices (spec §3): no ``m × n`` matrix is formed
and, under sharding along ``m`` or ``n``, only r×r Grams are reduced across devices.

Scale is handled once, on the Grams: every Gram is divided by its trace, so the r×r
work sees matrices of unit trace whatever the scale of the factors, and the scale
comes back as a scalar applied after the thin product. Grams of very large
(≳1e19), very small (≲1e-19) or exactly zero matrices cannot be formed directly in
float32; when any Gram of the step is out of range, all of them are recomputed from
max-abs-normalized inputs inside a ``lax.cond``, so the common case pays nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _linalg, _sharding

Method = Literal["eigh", "paper"]
METHODS: tuple[str, ...] = ("eigh", "paper")

# Gram traces (squared Frobenius norms) inside this window are computed exactly
# enough in float32; outside it (or zero, which may be an underflow), the
# normalized path decides.
_TRACE_MIN = 1e-24
_TRACE_MAX = 1e30
# A matrix whose largest entry is below this is numerically zero: dividing by its
# norm would overflow float32 in the step that follows.
_ZERO_SCALE = 1e-30


class FactorJob(NamedTuple):
    """One factor's inputs in canonical layout.

    ``momentum`` is ``(*batch, m, r)`` for a left factor (``tall=True``) and
    ``(*batch, r, n)`` for a right factor; ``partner`` is the other factor of the
    pair in its own canonical layout.
    """

    momentum: jax.Array
    partner: jax.Array
    tall: bool


def _gram(x: jax.Array, tall: bool) -> jax.Array:
    """``xᵀx`` for a tall ``(..., m, r)`` or ``x xᵀ`` for a wide ``(..., r, n)``, in f32."""
    x = x.astype(jnp.float32)
    spec = "...mr,...ms->...rs" if tall else "...rn,...sn->...rs"
    return jnp.einsum(
        spec,
        x,
        x,
        precision=_linalg.HIGHEST,
        out_sharding=_sharding.small_out_sharding(x),
    )


def _trace(g: jax.Array) -> jax.Array:
    return jnp.trace(g, axis1=-2, axis2=-1)


class _Normalized(NamedTuple):
    grams: list[jax.Array]  # unit trace, or zero
    inv_norms: list[jax.Array]  # 1/‖x‖_F, or 0 for a numerically zero x


def _normalize_fast(grams: list[jax.Array]) -> _Normalized:
    traces = [_trace(g) for g in grams]
    return _Normalized(
        grams=[g / t[..., None, None] for g, t in zip(grams, traces)],
        inv_norms=[jax.lax.rsqrt(t) for t in traces],
    )


def _normalize_slow(mats: list[tuple[jax.Array, bool]]) -> _Normalized:
    grams, inv_norms = [], []
    for x, tall in mats:
        x = x.astype(jnp.float32)
        s = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
        nonzero = s > _ZERO_SCALE
        g = _gram(x / jnp.where(nonzero, s, 1.0), tall)
        t = _trace(g)[..., None, None]
        nonzero = nonzero & (t > 0)
        t = jnp.where(nonzero, t, 1.0)
        grams.append(jnp.where(nonzero, g / t, 0.0))
        inv = jax.lax.rsqrt(t) / jnp.where(nonzero, s, 1.0)
        inv_norms.append(jnp.where(nonzero, inv, 0.0)[..., 0, 0])
    return _Normalized(grams, inv_norms)


def normalized_grams(mats: Sequence[tuple[jax.Array, bool]]) -> _Normalized:
    """Unit-trace Grams of ``mats`` and their inverse Frobenius norms.

    Args:
      mats: ``(x, tall)`` pairs; see :func:`_gram`.

    Returns:
      Grams ``G/tr(G)`` (zero for a zero matrix) and ``1/‖x‖_F`` (zero likewise).
    """
    mats = list(mats)
    grams = [_gram(x, tall) for x, tall in mats]
    in_range = [
        jnp.all((_trace(g) > _TRACE_MIN) & (_trace(g) < _TRACE_MAX)) for g in grams
    ]
    ok = jnp.all(jnp.stack(in_range)) if in_range else jnp.array(True)
    return jax.lax.cond(
        ok,
        lambda: _normalize_fast(grams),
        lambda: _normalize_slow(mats),
    )


def _flat(x: jax.Array) -> jax.Array:
    # r×r stacks are tiny: replicate them (under explicit sharding) so stacks of
    # differently sharded pairs can be batched into one decomposition.
    return _sharding.replicate(x).reshape((-1,) + x.shape[-2:])


def _group_key(job: FactorJob) -> tuple:
    return (
        job.tall,
        job.momentum.shape,
        job.partner.shape,
        str(_sharding.explicit_spec(job.momentum)),
        str(_sharding.explicit_spec(job.partner)),
    )


def directions(
    jobs: Sequence[FactorJob], *, method: Method, rtol: jax.typing.ArrayLike
) -> list[jax.Array]:
    """LoRA-Muon directions for many factors at once, one per job, in float32.

    Jobs of identical shapes (the q, k, v, o adapters of every layer of an unscanned
    model, say) are stacked along a new leading axis first, so each Gram and thin
    product is one batched matmul per shape instead of one per adapter; see
    :func:`_directions_stacked` for the maths.
    """
    groups: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(_group_key(job), []).append(i)
    stacked = []
    for idx in groups.values():
        if len(idx) == 1:
            stacked.append(jobs[idx[0]])
        else:
            stacked.append(
                FactorJob(
                    momentum=jnp.stack([jobs[i].momentum for i in idx]),
                    partner=jnp.stack([jobs[i].partner for i in idx]),
                    tall=jobs[idx[0]].tall,
                )
            )
    results = _directions_stacked(stacked, method=method, rtol=rtol)
    out: list[jax.Array | None] = [None] * len(jobs)
    for idx, res in zip(groups.values(), results):
        if len(idx) == 1:
            out[idx[0]] = res
        else:
            for k, i in enumerate(idx):
                out[i] = res[k]
    return out  # type: ignore[return-value]


def _directions_stacked(
    jobs: Sequence[FactorJob], *, method: Method, rtol: jax.typing.ArrayLike
) -> list[jax.Array]:
    """LoRA-Muon directions for many factors at once, one per job, in float32.

    For a left factor (``tall``) the direction is ``msign(m R) R`` with
    ``R = (partnerᵀ-Gram)^{-1/2}``; for a right factor ``R msign(R m)``. Jobs with
    the same rank share one batched r×r computation, so a tree with many adapters
    pays for two batched ``eigh`` calls, not two per adapter.

    Args:
      jobs: the factors; a pair contributes two jobs.
      method: ``"eigh"`` (exact pseudo-inverse spectral functions) or ``"paper"``
        (damped Newton–Schulz inverse square root and 8-step Polar Express on the
        thin momentum, as in the LoRA-Muon paper).
      rtol: eigenvalues below ``rtol · λ_max`` count as zero (``eigh`` only).

    Returns:
      One float32 array per job, shaped like its momentum.
    """
    mats: list[tuple[jax.Array, bool]] = []
    for job in jobs:
        # The partner of a left factor a is b (wide, Gram b bᵀ) and vice versa.
        mats.append((job.momentum, job.tall))
        mats.append((job.partner, not job.tall))
    norm = normalized_grams(mats)
    k_grams, s_grams = norm.grams[0::2], norm.grams[1::2]
    inv_m, inv_s = norm.inv_norms[0::2], norm.inv_norms[1::2]

    # Group jobs by rank so the r×r work is one batched call per group.
    groups: dict[int, list[int]] = {}
    for i, job in enumerate(jobs):
        groups.setdefault(s_grams[i].shape[-1], []).append(i)
    whitened: list[jax.Array | None] = [None] * len(jobs)
    previous: tuple[jax.Array, ...] = ()
    for idx in groups.values():
        # One rank group's factorizations after another's (see _linalg.after).
        s_stack = _linalg.after(jnp.concatenate([_flat(s_grams[i]) for i in idx]), *previous)
        if method == "eigh":
            k_stack = jnp.concatenate([_flat(k_grams[i]) for i in idx])
            out = _linalg.whitened_polar(s_stack, k_stack, rtol)
        else:
            out = _linalg.inv_sqrt_newton_schulz(s_stack)
        previous = (out,) if method == "eigh" else ()  # the paper's route has no LAPACK
        sizes = [_flat(s_grams[i]).shape[0] for i in idx]
        for i, piece in zip(idx, jnp.split(out, _offsets(sizes))):
            piece = piece.reshape(s_grams[i].shape)
            whitened[i] = _sharding.like_batch(piece, jobs[i].momentum)

    out_dirs = []
    for i, job in enumerate(jobs):
        w = whitened[i]
        m = job.momentum.astype(jnp.float32)
        scale_m = inv_m[i][..., None, None]
        scale_s = inv_s[i][..., None, None]
        if method == "eigh":
            # D = m T / (‖m‖‖partner‖): fold 1/‖m‖ into the r×r matrix and apply
            # 1/‖partner‖ after the thin product, so no intermediate overflows.
            t = w * scale_m
            d = _linalg.mm(m, t) if job.tall else _linalg.mm(t, m)
        else:
            d = _paper_direction(m, w, k_grams[i], scale_m, job.tall)
        out_dirs.append(d * scale_s)
    return out_dirs


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


def _offsets(sizes: Sequence[int]) -> list[int]:
    out, total = [], 0
    for s in sizes[:-1]:
        total += s
        out.append(total)
    return out
