"""Does a rank-r LoRA-Muon optimum tell dense Muon's? Rate rules tested on the curves.

Dense Muon's step has every singular value near η, so ``‖ΔW‖_F ≈ η √k`` with
``k = min(m, n)``; LoRA-Muon's product step ``Δa b + a Δb`` has rank at most ``2r``
and spectral norm at most η, so ``‖ΔW‖_F ≤ η √(2r)``. If the optimum were set by the
Frobenius size of the step, the dense optimum would be the rank-r optimum times
``√(2r / k)`` (the *Frobenius rule*): rank dependent. If it is set by the spectral
size, the two optima are equal (the paper's *identity rule*), or off by a constant
factor (the *constant rule*, its factor fitted to the data). Each optimum is
estimated off the grid by a parabola through the seed-mean losses at the argmin
and its two neighbours in ``log₂ η`` (at a grid edge: the edge itself), the rule
``proxy_lr_search`` uses for its ``dense_lr``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from benchmarks.study.aggregate import Curve, Point


def fitted_optimum(curve: Curve | None) -> float | None:
    """The curve's optimum fitted between grid rates, by the library's own rule.

    :func:`lora_muon_jax_examples.proxy_lr.log_parabola_optimum` (what ``proxy_lr_search``
    reports as ``dense_lr``) on the seed-mean final val loss of the rates with the
    most seeds, over the seeds that ran at every rate; ``None`` without a finite point.
    """
    from lora_muon_jax_examples.proxy_lr import log_parabola_optimum

    if curve is None or curve.best() is None:
        return None
    pts = curve.complete().points()
    n = max(len(p.losses) for p in pts)
    full: list[Point] = [p for p in pts if len(p.losses) == n]
    return log_parabola_optimum([p.lr for p in full], [p.mean for p in full])


class Pair(NamedTuple):
    """A rank-r LoRA-Muon curve and the dense Muon curve of the same model and budget."""

    budget: str  # a label: "short" or "long"
    rank: int
    k: int  # min(m, n) of the block matrices: the width
    lora: Curve
    dense: Curve

    @property
    def ratio(self) -> float | None:
        """``η*_dense / η*_r`` of the fitted optima."""
        d, r = fitted_optimum(self.dense), fitted_optimum(self.lora)
        return None if d is None or r is None else d / r


Rule = Callable[[Pair], float]


def identity_rule(p: Pair) -> float:
    return 1.0


def frobenius_rule(p: Pair) -> float:
    return math.sqrt(2 * p.rank / p.k)


def fit_constant(pairs: Sequence[Pair]) -> float:
    """The constant factor that fits the observed ratios best (geometric mean)."""
    logs = [math.log2(p.ratio) for p in pairs if p.ratio]
    return float(2.0 ** np.mean(logs)) if logs else math.nan


def rank_slope(pairs: Sequence[Pair]) -> tuple[float, float]:
    """Least-squares slope of ``log₂(ratio)`` against ``log₂ r`` and its standard error.

    The Frobenius rule predicts a slope of 1/2, the identity and constant rules 0.
    A budget's own offset is removed first (each budget's logs are centred), so the
    slope is what rank alone explains.
    """
    xs, ys = [], []
    for name in sorted({p.budget for p in pairs}):
        group = [
            (math.log2(p.rank), math.log2(p.ratio)) for p in pairs if p.budget == name and p.ratio
        ]
        if len(group) < 2:
            continue
        gx, gy = np.array(group).T
        xs += list(gx - gx.mean())
        ys += list(gy - gy.mean())
    if len(xs) < 3:
        return math.nan, math.nan
    x, y = np.array(xs), np.array(ys)
    slope = float(x @ y / (x @ x))
    resid = y - slope * x
    se = float(np.sqrt(resid @ resid / (len(x) - 1) / (x @ x)))
    return slope, se


def regret(p: Pair, factor: float) -> float | None:
    """Dense loss at the grid rate nearest ``factor · η*_r``, minus the dense best."""
    r = fitted_optimum(p.lora)
    best = p.dense.best()
    if r is None or best is None:
        return None
    dense = p.dense.complete().points()
    n = max(len(q.losses) for q in dense)
    pts = [q for q in dense if len(q.losses) == n]
    near = min(pts, key=lambda q: abs(math.log2(q.lr / (factor * r))))
    return near.mean - best.mean


class RuleScore(NamedTuple):
    name: str
    error: float  # mean |log₂(predicted / observed dense optimum)|: grid steps of ×2
    regret: float  # mean dense-loss cost of training at the predicted rate (nats)


def score(name: str, rule: Rule, pairs: Sequence[Pair]) -> RuleScore:
    errs, regs = [], []
    for p in pairs:
        if not p.ratio:
            continue
        errs.append(abs(math.log2(rule(p) / p.ratio)))
        g = regret(p, rule(p))
        if g is not None and math.isfinite(g):
            regs.append(g)
    return RuleScore(
        name, float(np.mean(errs)) if errs else math.nan, float(np.mean(regs)) if regs else math.nan
    )
