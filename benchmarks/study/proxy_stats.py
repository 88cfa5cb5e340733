"""Statistics of the powered proxy test: is a LoRA-Muon proxy's optimum dense Muon's?

Every method ran the same rates with the same seeds, and a seed fixes the data order
and the initialization of the leaves both models share (paired seeds). Per seed, each
method's optimum is fitted off the grid by
:func:`lora_muon_jax_examples.proxy_lr.log_parabola_optimum` (the rule
``proxy_lr_search`` uses for ``dense_lr``). Then:

* a method's optimum is the geometric mean of its per-seed optima, and the proxy's
  ratio the geometric mean of the per-seed ratios ``η*_proxy / η*_dense``;
* their 95% intervals come from a paired bootstrap: seeds are resampled with
  replacement, the same resample for both methods;
* equivalence, "the proxy's optimum is dense Muon's within ×√2", is a two one-sided
  t-tests procedure (TOST) on the per-seed ``log₂`` ratios against the margins ±½;
* the cost of training dense Muon at the proxy's rate is dense Muon's seed-mean
  loss curve, interpolated linearly in ``log₂ η``, at the proxy's optimum minus the
  curve's lowest point (≥ 0), with a bootstrap interval from the same resamples.

The verdict: ``"shown"`` when TOST rejects non-equivalence at 5%, ``"refuted"`` when
the ratio's 95% interval lies wholly outside ``[1/√2, √2]``, and ``"inconclusive at
this power"`` otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import NamedTuple

import numpy as np

MARGIN = 0.5  # log₂ √2: equivalence within a factor √2 either way
ALPHA = 0.05
SHOWN, REFUTED, INCONCLUSIVE = "shown", "refuted", "inconclusive at this power"


class SeedCurves(NamedTuple):
    """Final losses of one method: ``losses[i, j]`` for ``seeds[i]`` at ``rates[j]``."""

    rates: tuple[float, ...]  # increasing
    seeds: tuple[int, ...]
    losses: np.ndarray  # (seeds, rates); inf where a run diverged


class Interval(NamedTuple):
    """A point estimate and its 95% bootstrap interval."""

    value: float
    lo: float
    hi: float


class ProxyTest(NamedTuple):
    """What :func:`proxy_test` found for one proxy against dense Muon."""

    n: int  # paired seeds
    proxy_opt: Interval  # geometric mean of the per-seed optima
    dense_opt: Interval
    ratio: Interval  # proxy / dense
    tost_p: float  # TOST p-value of "ratio within ×√2"
    cost: Interval  # dense Muon's loss at the proxy's rate minus its best (nats)
    proxy_seed_opts: tuple[float, ...]
    dense_seed_opts: tuple[float, ...]

    @property
    def verdict(self) -> str:
        return verdict(self.tost_p, self.ratio)


def _loss(v: float | None) -> float:
    return math.inf if v is None else float(v)


def seed_curves(
    runs: dict[tuple[float, int], float | None], rates: Iterable[float], seeds: Iterable[int]
) -> SeedCurves:
    """The seeds of ``seeds`` that ran at every rate of ``rates``, as a matrix.

    ``runs`` maps ``(rate, seed)`` to the final loss (``None``: diverged, kept as inf).
    """
    lrs = tuple(sorted(rates))
    keep = tuple(s for s in seeds if all((r, s) in runs for r in lrs))
    rows = [[_loss(runs[(r, s)]) for r in lrs] for s in keep]
    losses = np.asarray(rows, dtype=np.float64).reshape(len(keep), len(lrs))
    return SeedCurves(lrs, keep, losses)


def paired(a: SeedCurves, b: SeedCurves) -> tuple[SeedCurves, SeedCurves]:
    """Both restricted to the seeds they share (in ``a``'s order)."""
    common = [s for s in a.seeds if s in b.seeds]

    def take(c: SeedCurves) -> SeedCurves:
        rows = [c.seeds.index(s) for s in common]
        return SeedCurves(c.rates, tuple(common), c.losses[rows].reshape(len(common), -1))

    return take(a), take(b)


def per_seed_optima(c: SeedCurves) -> np.ndarray:
    """Each seed's optimum by :func:`log_parabola_optimum` (NaN if it diverged everywhere)."""
    from lora_muon_jax_examples.proxy_lr import log_parabola_optimum

    out = []
    for row in c.losses:
        out.append(log_parabola_optimum(c.rates, row) if np.isfinite(row).any() else math.nan)
    return np.array(out, float)


def tost_p(log_ratios: Sequence[float], margin: float = MARGIN) -> float:
    """TOST p-value that the mean of ``log_ratios`` lies in ``(−margin, margin)``.

    The larger p-value of the two one-sided t-tests ``H₀: μ ≤ −margin`` and
    ``H₀: μ ≥ margin`` (``n − 1`` degrees of freedom); equivalence is shown at level
    α when it is below α. Fewer than two values: 1.
    """
    from scipy import stats  # a dependency of jax

    d = np.asarray(log_ratios, float)
    n = d.size
    if n < 2:
        return 1.0
    m, se = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(n)
    if se == 0.0:
        return 0.0 if abs(m) < margin else 1.0
    p_low = float(stats.t.sf((m + margin) / se, n - 1))
    p_high = float(stats.t.cdf((m - margin) / se, n - 1))
    return max(p_low, p_high)


def dense_cost(rates: Sequence[float], mean_losses: np.ndarray, rate: float) -> float:
    """The seed-mean curve at ``rate`` (linear in ``log₂ η``, clamped) minus its lowest point."""
    curve = np.asarray(mean_losses, float)
    x = np.log2(np.asarray(rates, float))
    at = float(np.interp(math.log2(rate), x, curve))
    return at - float(np.min(curve))


def _interval(value: float, samples: np.ndarray) -> Interval:
    lo, hi = np.quantile(samples, [0.025, 0.975])
    return Interval(value, float(lo), float(hi))


def proxy_test(
    proxy: SeedCurves, dense: SeedCurves, reps: int = 5000, seed: int = 0
) -> ProxyTest | None:
    """The proxy-vs-dense statistics on their shared seeds (``None`` below two seeds)."""
    proxy, dense = paired(proxy, dense)
    lp, ld = np.log2(per_seed_optima(proxy)), np.log2(per_seed_optima(dense))
    ok = np.isfinite(lp) & np.isfinite(ld)
    lp, ld, dl = lp[ok], ld[ok], dense.losses[ok]
    n = int(ok.sum())
    if n < 2:
        return None
    idx = np.random.default_rng(seed).integers(0, n, size=(reps, n))
    bp, bd = lp[idx].mean(1), ld[idx].mean(1)
    mean_curves = dl[idx].mean(1)  # (reps, rates)
    pairs = zip(mean_curves, bp, strict=True)
    costs = np.array([dense_cost(dense.rates, c, 2.0**p) for c, p in pairs])
    return ProxyTest(
        n=n,
        proxy_opt=_interval(2.0 ** lp.mean(), 2.0**bp),
        dense_opt=_interval(2.0 ** ld.mean(), 2.0**bd),
        ratio=_interval(2.0 ** (lp - ld).mean(), 2.0 ** (bp - bd)),
        tost_p=tost_p(lp - ld),
        cost=_interval(dense_cost(dense.rates, dl.mean(0), 2.0 ** lp.mean()), costs),
        proxy_seed_opts=tuple(float(x) for x in 2.0**lp),
        dense_seed_opts=tuple(float(x) for x in 2.0**ld),
    )


def verdict(p: float, ratio: Interval, alpha: float = ALPHA, margin: float = MARGIN) -> str:
    """``"shown"``, ``"refuted"`` or ``"inconclusive at this power"`` (see the module)."""
    if p < alpha:
        return SHOWN
    lo, hi = 2.0**-margin, 2.0**margin
    if ratio.lo > hi or ratio.hi < lo:
        return REFUTED
    return INCONCLUSIVE
