"""Results indexed by LR curve, with seed statistics and the tables built on them.

Seed statistics are means with the sample standard deviation over the seeds that
ran; a diverged run makes its point's mean infinite (never dropped).
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, NamedTuple

import numpy as np

from benchmarks.study.configs import FULL, Budget, RunConfig


class Point(NamedTuple):
    lr: float
    losses: tuple[float, ...]  # per seed, inf when diverged
    seeds: tuple[int, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.losses)) if self.losses else math.nan

    @property
    def std(self) -> float:
        finite = [x for x in self.losses if math.isfinite(x)]
        return float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0

    @property
    def diverged(self) -> int:
        return sum(not math.isfinite(x) for x in self.losses)


@dataclasses.dataclass
class Curve:
    """All runs sharing a configuration but for the learning rate and the seed."""

    cfg: RunConfig  # the configuration of one of its runs (lr/seed arbitrary)
    runs: dict[tuple[float, int], dict[str, Any]]

    def points(self, field: str = "val_loss") -> list[Point]:
        by_lr: dict[float, list[tuple[int, float]]] = defaultdict(list)
        for (lr, seed), rec in self.runs.items():
            v = rec.get(field)
            by_lr[lr].append((seed, math.inf if v is None else float(v)))
        out = []
        for lr in sorted(by_lr):
            pairs = sorted(by_lr[lr])
            out.append(Point(lr, tuple(v for _, v in pairs), tuple(s for s, _ in pairs)))
        return out

    def complete(self) -> Curve:
        """The curve restricted to the seeds that ran at every rate (itself if none did).

        A sweep stopped part-way through a seed leaves that seed at a few rates only;
        comparing rates on unequal seed sets would pick the argmin among those few.
        """
        lrs = {lr for lr, _ in self.runs}
        by_seed: dict[int, set[float]] = defaultdict(set)
        for lr, seed in self.runs:
            by_seed[seed].add(lr)
        full = {s for s, have in by_seed.items() if have == lrs}
        if not full or len(full) == len(by_seed):
            return self
        return Curve(self.cfg, {k: v for k, v in self.runs.items() if k[1] in full})

    def on_seeds(self, seeds: Sequence[int], rates: Sequence[float] = ()) -> Curve:
        """The runs of ``seeds`` only: a section's own curve inside a shared one.

        Another section may run the same configurations at more seeds and rates (the
        powered proxy test extends section vii's curves with more seeds and the √2
        rates between them). Over ``seeds``, and without the rates halfway (×√2)
        between those of ``rates`` (the section's own factor-2 grid), the curve
        keeps the rates every seed ran when those include all of ``rates``, so that
        the section is judged as it was designed while the other section fills in;
        otherwise, the seeds that ran every rate (:meth:`complete`).
        """

        def own(key: tuple[float, int]) -> bool:
            if key[1] not in seeds:
                return False
            if not rates:
                return True
            steps = math.log2(key[0] / rates[0])
            return abs(steps - math.floor(steps) - 0.5) > 1e-6  # not halfway: no √2 rate

        mine = Curve(self.cfg, {k: v for k, v in self.runs.items() if own(k)})
        by_seed: dict[int, set[float]] = defaultdict(set)
        for lr, seed in mine.runs:
            by_seed[seed].add(lr)
        shared = set.intersection(*by_seed.values()) if by_seed else set()
        if not shared or not set(rates) <= shared:
            return mine.complete()
        return Curve(self.cfg, {k: v for k, v in mine.runs.items() if k[0] in shared})

    def best(self) -> Point | None:
        """The LR with the lowest seed-mean loss, over the seeds that ran at every LR."""
        pts = self.complete().points()
        if not pts:
            return None
        n = max(len(p.losses) for p in pts)
        full = [p for p in pts if len(p.losses) == n and math.isfinite(p.mean)]
        if not full:
            return None
        return min(full, key=lambda p: (p.mean, p.lr))

    def at(self, lr: float) -> Point | None:
        for p in self.points():
            if math.isclose(p.lr, lr, rel_tol=1e-9):
                return p
        return None

    def seeds(self) -> int:
        return len({s for _, s in self.runs})

    def records_at(self, lr: float) -> list[dict[str, Any]]:
        return [r for (x, _), r in sorted(self.runs.items()) if math.isclose(x, lr, rel_tol=1e-9)]

    def per_seed_best(self) -> dict[int, float]:
        """Each seed's own argmin rate (finite runs; ties: the smaller rate)."""
        by_seed: dict[int, list[tuple[float, float]]] = defaultdict(list)
        for (lr, seed), rec in self.runs.items():
            v = rec.get("val_loss")
            if v is not None:
                by_seed[seed].append((float(v), lr))
        return {s: min(v)[1] for s, v in sorted(by_seed.items())}


class Results:
    """The results file, indexed by curve."""

    def __init__(self, data: dict[str, Any]) -> None:
        self.data = data
        self.runs = data.get("runs", {})
        self.curves: dict[tuple, Curve] = {}
        self.errors = [r for r in self.runs.values() if r.get("status") == "error"]
        for rec in self.runs.values():
            if rec.get("status") == "error":
                continue
            cfg = RunConfig.from_dict(rec["config"])
            c = self.curves.setdefault(cfg.curve(), Curve(cfg, {}))
            c.runs[(cfg.lr, cfg.seed)] = rec

    def find(self, budget: Budget | None = None, **fields: Any) -> Curve | None:
        """The curve whose config has these field values (default budget unless given)."""
        budget = budget or FULL.budget
        base = RunConfig(
            method=fields.pop("method"),
            lr=0.0,
            seed=0,
            rank=fields.pop("rank", None),
            budget=budget,
        )
        cfg = dataclasses.replace(base, **fields)
        return self.curves.get(cfg.curve())


def fmt(x: float | None, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    if isinstance(x, float) and math.isinf(x):
        return "diverged"
    return f"{x:.{digits}f}"


def fmt_lr(x: float | None) -> str:
    return "–" if x is None else f"{x:.4g}"


def mean_std(p: Point | None, digits: int = 3) -> str:
    if p is None:
        return "–"
    if p.diverged:
        return f"diverged ({p.diverged}/{len(p.losses)} seeds)"
    return f"{p.mean:.{digits}f} ± {p.std:.{digits}f} (n={len(p.losses)})"


def paired_deltas(base: Curve | None, moved: Curve | None, lr: float) -> list[float]:
    """``moved − base`` val loss at ``lr``, seed by seed (both finite)."""
    if base is None or moved is None:
        return []
    out = []
    for (rate, s), rec in moved.runs.items():
        if math.isclose(rate, lr, rel_tol=1e-9) and (rate, s) in base.runs:
            a, b = rec.get("val_loss"), base.runs[(rate, s)].get("val_loss")
            if a is not None and b is not None:
                out.append(a - b)
    return out


def curve_table(
    curves: Sequence[tuple[str, Curve | None]], ref: Curve | None = None, ref_name: str = ""
) -> list[str]:
    """Best rate, val and train loss there, and diverged runs of each curve."""
    head = "| curve | best LR | val loss at best LR | train loss at best LR | diverged runs |"
    sep = "|---|---|---|---|---|"
    if ref is not None:
        head += f" loss at {ref_name}'s best LR |"
        sep += "---|"
    rows = [head, sep]
    rb = ref.best() if ref else None
    for label, c in curves:
        if c is None:
            rows.append(f"| {label} | not run yet | | | |" + (" |" if ref else ""))
            continue
        best = c.best()
        tr = {p.lr: p for p in c.points("train_loss")}.get(best.lr) if best else None
        div = sum(p.diverged for p in c.points())
        total = sum(len(p.losses) for p in c.points())
        row = (
            f"| {label} | {fmt_lr(best and best.lr)} | {mean_std(best)} | "
            f"{mean_std(tr)} | {div}/{total} |"
        )
        if ref is not None:
            row += f" {mean_std(c.at(rb.lr)) if rb else '–'} |"
        rows.append(row)
    return rows
