"""A seeded fuzz of LoRA-Muon's product step over scales, ranks, conditioning and dtypes.

Each family draws a batch of independent pairs ``a: (m, r)``, ``b: (r, n)`` with
gradients, stacked along a leading axis so that one compiled step (β = 0, the
direction is the gradient's) handles the whole batch. The product step's two terms,
``c · Δa @ b`` and ``c · a @ Δb``, are then measured in float64 from the updates and
factors exactly as the model holds them (in the param dtype).

Families: well-conditioned factors and gradients at independent scales from 1e-30
to 1e30 (clipped to the dtype's range); factors of condition number up to 1e7;
rank-deficient factors; zero factors or zero gradients; gradients (momenta) of
condition number up to 1e7 with factors and gradients at independent extreme scales.

``python -m tests.fuzz`` prints the figures per dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

import lora_muon_jax as lmj

ETA = 0.1
LORA_SCALE = 2.0
SHAPES = ((12, 4, 10), (24, 8, 16), (9, 3, 30), (16, 16, 20))
FAMILIES = ("scales", "ill_conditioned", "rank_deficient", "zeros", "ill_conditioned_momentum")
# log10 scale ranges whose values are finite in each dtype (fp16 tops out at 65504
# and is subnormal below 6e-5; its tiny draws become zero factors, which is fine).
LOG_SCALES = {"float32": (-30, 30), "bfloat16": (-30, 30), "float16": (-6, 3)}


class FuzzResult(NamedTuple):
    """Per pair: the two terms' spectral norms over ``η/2``, finiteness, and kind."""

    term_a: np.ndarray
    term_b: np.ndarray
    finite: np.ndarray
    defined: np.ndarray  # both factors full rank, every input non-zero and in range
    partner_of_zero: np.ndarray  # the update of a zero factor's partner is zero (or no zero)


def _matrices(rng, count, rows, cols, family, log_lo, log_hi):
    k = min(rows, cols)
    u = np.linalg.qr(rng.standard_normal((count, rows, k)))[0]
    v = np.linalg.qr(rng.standard_normal((count, cols, k)))[0]
    if family == "ill_conditioned":
        log_cond = rng.uniform(0, 7, (count, 1))
        s = 10.0 ** (-log_cond * np.linspace(0, 1, k))
    else:
        s = rng.uniform(0.3, 1.0, (count, k))
    full = np.ones(count, bool)
    if family == "rank_deficient" and k > 1:
        rank = rng.integers(1, k, count)
        s = np.where(np.arange(k) < rank[:, None], s, 0.0)
        full[:] = False
    scale = 10.0 ** rng.uniform(log_lo, log_hi, (count, 1, 1))
    return (u * s[:, None, :]) @ np.swapaxes(v, -1, -2) * scale, full


def _family(rng, count, shape, family, dtype):
    m, r, n = shape
    lo, hi = LOG_SCALES[dtype]
    if family not in ("scales", "ill_conditioned_momentum"):
        lo, hi = max(lo, -3), min(hi, 3)  # factors at moderate scale
    # ill_conditioned_momentum: factors and gradients (the momentum, at β = 0) at
    # independent extreme scales, gradients of condition number up to 1e7.
    momentum = "ill_conditioned" if family == "ill_conditioned_momentum" else "scales"
    factors = "scales" if family == "ill_conditioned_momentum" else family
    a, full_a = _matrices(rng, count, m, r, factors, lo, hi)
    b, full_b = _matrices(rng, count, r, n, factors, lo, hi)
    ga, _ = _matrices(rng, count, m, r, momentum, lo, hi)
    gb, _ = _matrices(rng, count, r, n, momentum, lo, hi)
    nonzero = np.ones(count, bool)
    if family == "zeros":
        which = rng.integers(0, 3, count)  # zero a, zero b, or zero gradients
        a[which == 0], b[which == 1] = 0.0, 0.0
        ga[which == 2], gb[which == 2] = 0.0, 0.0
        nonzero = which == 3  # never: every pair has a zero
    full = (m >= r) & (n >= r) & full_a & full_b & nonzero
    return a, b, ga, gb, full


def run_fuzz(
    pairs_per_group: int = 210, seed: int = 0, solver: str = "auto"
) -> dict[str, FuzzResult]:
    """Runs every family × shape × dtype; returns the terms per dtype."""
    rng = np.random.default_rng(seed)
    tx = lmj.lora_muon(ETA, beta=0.0, lora_scale=LORA_SCALE, solver=solver)
    step = jax.jit(tx.update)
    out: dict[str, FuzzResult] = {}
    for dtype in LOG_SCALES:
        parts = []
        for shape in SHAPES:
            draws = [_family(rng, pairs_per_group, shape, f, dtype) for f in FAMILIES]
            a, b, ga, gb, defined = (np.concatenate(x) for x in zip(*draws, strict=False))
            p = {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}
            g = {"lora_a": jnp.asarray(ga, dtype), "lora_b": jnp.asarray(gb, dtype)}
            u, _ = step(g, tx.init(p), p)
            ua, ub = (np.asarray(u[k], np.float64) for k in ("lora_a", "lora_b"))
            pa, pb = (np.asarray(p[k], np.float64) for k in ("lora_a", "lora_b"))
            finite = np.isfinite(ua).all(axis=(1, 2)) & np.isfinite(ub).all(axis=(1, 2))
            # In range: every input's largest entry at least 1e-29 (the engine counts
            # a matrix whose largest entry is below 1e-30 as zero).
            biggest = [
                np.abs(np.asarray(x[k], np.float64)).max(axis=(1, 2)) for x in (p, g) for k in x
            ]
            defined = defined & np.all(np.stack(biggest) >= 1e-29, axis=0)
            half = ETA / 2
            with np.errstate(over="ignore", invalid="ignore"):  # reported via `finite`
                ta = np.linalg.norm(np.nan_to_num(LORA_SCALE * ua @ pb), 2, axis=(1, 2)) / half
                tb = np.linalg.norm(np.nan_to_num(LORA_SCALE * pa @ ub), 2, axis=(1, 2)) / half
            zero_a, zero_b = (np.all(x == 0, axis=(1, 2)) for x in (pa, pb))
            partner_ok = ~zero_a | np.all(ub == 0, axis=(1, 2))
            partner_ok &= ~zero_b | np.all(ua == 0, axis=(1, 2))
            parts.append(FuzzResult(ta, tb, finite, defined, partner_ok))
        out[dtype] = FuzzResult(*(np.concatenate(x) for x in zip(*parts, strict=False)))
    return out


def summary(results: dict[str, FuzzResult]) -> str:
    lines = [
        "| dtype | pairs | non-finite | largest term / (η/2) | defined pairs "
        "| worst |term/(η/2) − 1| where defined |",
        "|---|---|---|---|---|---|",
    ]
    for dtype, r in results.items():
        terms = np.concatenate([r.term_a, r.term_b])
        defined = np.concatenate([r.defined, r.defined])
        dev = np.abs(terms[defined] - 1).max() if defined.any() else float("nan")
        lines.append(
            f"| {dtype} | {r.finite.size} | {int((~r.finite).sum())} | {terms.max():.4f} "
            f"| {int(r.defined.sum())} | {dev:.2e} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(run_fuzz()))
