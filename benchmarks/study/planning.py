"""Which runs a section needs, given the results so far.

Planning is a pure function of the grid and the results: every resumed sweep
recomputes the same plan, so extending a grid past a winning edge, or running the
gauge comparison (or the weight-decay section) at a curve's best rate, is stable
across interruptions. A run that several sections need is planned once, under the
first section that lists it (its key is its configuration).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from benchmarks.study.configs import ALL_SECTIONS, CurveSpec, Grid, RunConfig

# {curve: {lr: [final val loss of each run]}}
Index = dict[tuple, dict[float, list[float]]]
Curves = list[tuple[RunConfig, Sequence[float]]]


def index_results(results: dict[str, Any]) -> Index:
    """``{curve: {lr: [final val loss per seed run]}}``; a diverged run counts as inf."""
    index: Index = {}
    for rec in results.values():
        if rec.get("status") == "error":
            continue
        cfg = RunConfig.from_dict(rec["config"])
        loss = rec.get("val_loss")
        index.setdefault(cfg.curve(), {}).setdefault(cfg.lr, []).append(
            math.inf if loss is None else loss
        )
    return index


def best_lr(by_lr: dict[float, list[float]], runs: int) -> float | None:
    """The rate with the lowest mean loss among rates with ``runs`` runs (finite only)."""
    means = {lr: float(np.mean(v)) for lr, v in by_lr.items() if len(v) >= runs}
    finite = {lr: m for lr, m in means.items() if math.isfinite(m)}
    if not finite:
        return None
    return min(finite, key=lambda lr: (finite[lr], lr))


def curve_lrs(
    grid_lrs: Sequence[float],
    curve: tuple,
    index: Index,
    extend: int,
    union: bool = True,
    step: float = 2.0,
) -> list[float]:
    """The grid, every LR this curve already ran at, and one LR past a winning edge.

    The winner is the LR with the lowest seed-mean final val loss among those run
    (a diverged seed makes the mean infinite); the next LR is ``step`` times (or one
    ``step``-th of) the edge, at most ``extend`` steps past the grid. Planning from
    the results keeps extensions stable across resumes: once any seed ran an LR,
    every seed gets it.
    """
    by_lr = index.get(curve, {})
    if not union:
        return sorted(grid_lrs)
    lrs = sorted(set(grid_lrs) | set(by_lr))
    if extend <= 0 or not all(lr in by_lr for lr in grid_lrs):
        return lrs
    means = {lr: float(np.mean(v)) for lr, v in by_lr.items()}
    best = min(means, key=lambda lr: (means[lr], lr))
    if not math.isfinite(means[best]):
        return lrs
    lo_limit, hi_limit = min(grid_lrs) / step**extend, max(grid_lrs) * step**extend
    if best == max(lrs) and best * step <= hi_limit * (1 + 1e-9):
        lrs.append(best * step)
    elif best == min(lrs) and best / step >= lo_limit * (1 - 1e-9):
        lrs.insert(0, best / step)
    return lrs


def complete_best_lr(
    ref: RunConfig,
    grid_lrs: Sequence[float],
    index: Index,
    seeds: Sequence[int],
    extend: int,
    step: float = 2.0,
) -> float | None:
    """The best rate of ``ref``'s curve once it is complete, else ``None``.

    Complete: every seed ran at every rate the curve plans (its edge extensions
    included), so the answer no longer changes as the sweep goes on.
    """
    by_lr = index.get(ref.curve(), {})
    lrs = curve_lrs(grid_lrs, ref.curve(), index, extend, step=step)
    if not lrs or any(len(by_lr.get(lr, ())) < len(seeds) for lr in lrs):
        return None
    return best_lr(by_lr, len(seeds))


# ----------------------------------------------------------------------------- sections


def _pilot(base: RunConfig, grid: Grid, index: Index) -> Curves:
    out: Curves = []
    for method, rank in (("dense_muon", None), ("lora_muon", grid.shape_rank)):
        for adam_lr in grid.pilot_adam_lrs:
            budget = dataclasses.replace(grid.budget, adam_lr=adam_lr)
            out.append((dataclasses.replace(base, method=method, rank=rank, budget=budget), (0.1,)))
    return out


def _lr(base: RunConfig, grid: Grid, index: Index) -> Curves:
    out: Curves = [(dataclasses.replace(base, method="dense_muon"), grid.spectral_lrs)]
    for r in grid.headline_ranks:
        out.append((dataclasses.replace(base, rank=r), grid.spectral_lrs))
    return out


def _rank(base: RunConfig, grid: Grid, index: Index) -> Curves:
    return [(dataclasses.replace(base, rank=r), grid.spectral_lrs) for r in grid.ranks]


def _gauge(base: RunConfig, grid: Grid, index: Index) -> Curves:
    out: Curves = []
    for c in grid.gauges:
        lrs = grid.spectral_lrs if c == 1.0 else grid.gauge_muon_lrs
        out.append((dataclasses.replace(base, rank=grid.gauge_rank, gauge=c), lrs))
        out.append(
            (
                dataclasses.replace(base, method="spectron", rank=grid.gauge_rank, gauge=c),
                grid.spectral_lrs,
            )
        )
    return out


def _shape(base: RunConfig, grid: Grid, index: Index) -> Curves:
    shapes = [(w, grid.depth) for w in grid.widths] + [(grid.width, d) for d in grid.depths]
    out: Curves = []
    for w, d in dict.fromkeys(shapes):
        for method, rank in (("dense_muon", None), ("lora_muon", grid.shape_rank)):
            out.append(
                (
                    dataclasses.replace(base, method=method, rank=rank, width=w, depth=d),
                    grid.shape_lrs,
                )
            )
    return out


def _baselines(base: RunConfig, grid: Grid, index: Index) -> Curves:
    from benchmarks import registry

    out: Curves = [
        (dataclasses.replace(base, method="adamw_lora", rank=r), grid.adam_lrs)
        for r in grid.baseline_ranks
    ]
    out.append((dataclasses.replace(base, method="dense_muon_optax"), grid.spectral_lrs))
    if registry.available("psgd_kron"):
        out.append((dataclasses.replace(base, method="psgd_kron"), grid.adam_lrs))
    # The library's other peers on the same footing (spectral rates).
    for r in grid.baseline_ranks:
        out.append((dataclasses.replace(base, method="riemannion", rank=r), grid.spectral_lrs))
    for method in ("lora_pre_muon", "limuon"):
        out.append((dataclasses.replace(base, method=method), grid.spectral_lrs))
    return out


def _finetune(base: RunConfig, grid: Grid, index: Index) -> Curves:
    ft = dataclasses.replace(
        base,
        task="finetune",
        base_steps=grid.budget.steps * grid.ft_base_steps_factor,
        base_lr=grid.ft_base_lr,
    )
    out: Curves = []
    for r in grid.ft_ranks:
        for method, init, reb in grid.ft_variants:
            lrs = grid.ft_spectral_lrs if method == "lora_muon" else grid.ft_adam_lrs
            out.append(
                (dataclasses.replace(ft, method=method, rank=r, init=init, rebalance=reb), lrs)
            )
    return out


def long_base(grid: Grid) -> RunConfig:
    """The configuration every long-budget run shares (method, rank, lr, seed aside)."""
    g = grid.long
    return RunConfig(
        method="lora_muon", lr=0.0, seed=0, rank=None, width=g.width, depth=g.depth, budget=g.budget
    )


def gauge_lr(grid: Grid, index: Index) -> float | None:
    """The long section's gauge rate: the rank-``gauge_rank`` LoRA-Muon curve's best.

    ``None`` until every seed of that curve ran at every rate it plans.
    """
    g = grid.long
    ref = dataclasses.replace(long_base(grid), rank=g.gauge_rank)
    spec = next((lrs for m, r, lrs in g.curves if m == "lora_muon" and r == g.gauge_rank), ())
    return complete_best_lr(ref, spec, index, g.seeds, g.extend)


def _long(base: RunConfig, grid: Grid, index: Index) -> Curves:
    g = grid.long
    base = long_base(grid)
    return [(dataclasses.replace(base, method=m, rank=r), lrs) for m, r, lrs in g.curves]


def _long_gauge(grid: Grid, index: Index) -> Curves:
    """Gauge 1 and ``gauge`` of each gauge method at :func:`gauge_lr` (none before)."""
    g = grid.long
    lr = gauge_lr(grid, index)
    if lr is None:
        return []
    return [
        (dataclasses.replace(long_base(grid), method=m, rank=g.gauge_rank, gauge=c), (lr,))
        for m in g.gauge_methods
        for c in (1.0, g.gauge)
    ]


def long_pilot_configs(grid: Grid) -> list[RunConfig]:
    """Dense Muon, seed 0, at every pilot budget and rate of the long section."""
    g = grid.long
    out = []
    for steps, batch, seq_len, width, depth in g.pilot:
        base = long_base(
            dataclasses.replace(grid, long=g.with_budget(steps, batch, seq_len, width, depth))
        )
        out += [dataclasses.replace(base, method="dense_muon", lr=lr) for lr in g.pilot_lrs]
    return out


# ----------------------------------------------------------------------------- after (vii)


def _specs(base: RunConfig, specs: Sequence[CurveSpec]) -> Curves:
    return [(dataclasses.replace(base, method=m, rank=r), lrs) for m, r, lrs in specs]


def _proxy(grid: Grid, index: Index) -> list[RunConfig]:
    """The powered proxy test: every proxy curve over the proxy seeds (×√2 extensions)."""
    s = grid.long_study
    curves = _specs(long_base(grid), s.proxy_curves)
    return _expand(curves, s.proxy_seeds, index, s.extend, step=s.proxy_step)


def _width128(grid: Grid, index: Index) -> list[RunConfig]:
    s = grid.long_study
    base = dataclasses.replace(long_base(grid), width=s.wide)
    return _expand(_specs(base, s.wide_curves), grid.long.seeds, index, s.extend)


def _shape_long(grid: Grid, index: Index) -> list[RunConfig]:
    s = grid.long_study
    curves: Curves = []
    for w, d in s.shapes:
        curves += _specs(dataclasses.replace(long_base(grid), width=w, depth=d), s.shape_curves)
    return _expand(curves, grid.long.seeds, index, s.extend)


def peer_gauge_lr(grid: Grid, index: Index) -> float | None:
    """The rate of the peers' gauge study: ``gauge_method``'s best, once its curve is done."""
    s = grid.long_study
    spec = next((lrs for m, _, lrs in s.peer_curves if m == s.gauge_method), None)
    if spec is None:
        return None
    ref = dataclasses.replace(long_base(grid), method=s.gauge_method, rank=s.gauge_rank)
    return complete_best_lr(ref, spec, index, grid.long.seeds, s.extend)


def _peers_long(grid: Grid, index: Index) -> list[RunConfig]:
    """The peers' curves, then the gauge study at :func:`peer_gauge_lr` (none before)."""
    s = grid.long_study
    base = long_base(grid)
    runs = _expand(_specs(base, s.peer_curves), grid.long.seeds, index, s.extend)
    lr = peer_gauge_lr(grid, index)
    if lr is None:
        return runs
    pairs = [(s.gauge_method, s.gauge)] + [(m, c) for m in s.gauge_controls for c in (1.0, s.gauge)]
    gauge: Curves = [
        (dataclasses.replace(base, method=m, rank=s.gauge_rank, gauge=c), (lr,)) for m, c in pairs
    ]
    return runs + _expand(gauge, grid.long.seeds, index, 0, union=False)


def decay_lr(grid: Grid, index: Index, method: str, rank: int | None) -> float | None:
    """The weight-decay section's rate of one method: its ``proxy`` curve's best, once done."""
    s = grid.long_study
    spec = next((lrs for m, r, lrs in s.proxy_curves if (m, r) == (method, rank)), None)
    if spec is None:
        return None
    ref = dataclasses.replace(long_base(grid), method=method, rank=rank)
    return complete_best_lr(ref, spec, index, s.proxy_seeds, s.extend, s.proxy_step)


def _wd_long(grid: Grid, index: Index) -> list[RunConfig]:
    """Each decay (and 0: a ``proxy`` run) at the method's best proxy rate (none before)."""
    s = grid.long_study
    curves: Curves = []
    for method, rank in s.decay_curves:
        lr = decay_lr(grid, index, method, rank)
        if lr is None:
            continue
        ref = dataclasses.replace(long_base(grid), method=method, rank=rank)
        curves += [(dataclasses.replace(ref, weight_decay=wd), (lr,)) for wd in (0.0, *s.decays)]
    return _expand(curves, grid.long.seeds, index, 0, union=False)


_LONG_STUDY: dict[str, Callable[[Grid, Index], list[RunConfig]]] = {
    "proxy": _proxy,
    "width128": _width128,
    "shape_long": _shape_long,
    "peers_long": _peers_long,
    "wd_long": _wd_long,
}

_SECTIONS: dict[str, Callable[[RunConfig, Grid, Index], Curves]] = {
    "pilot": _pilot,
    "lr": _lr,
    "rank": _rank,
    "gauge": _gauge,
    "shape": _shape,
    "baselines": _baselines,
    "finetune": _finetune,
    "long": _long,
}


def _expand(
    curves: Curves,
    seeds: Sequence[int],
    index: Index,
    extend: int,
    union: bool = True,
    step: float = 2.0,
) -> list[RunConfig]:
    """Every curve's runs at every seed, seed-major (all curves' seed 0 first)."""
    out: list[RunConfig] = []
    for seed in seeds:
        for cfg, lrs in curves:
            cfg = dataclasses.replace(cfg, seed=seed)
            out += [
                dataclasses.replace(cfg, lr=lr)
                for lr in curve_lrs(lrs, cfg.curve(), index, extend, union, step)
            ]
    return out


def plan_section(section: str, grid: Grid, index: Index) -> list[RunConfig]:
    """All runs of one section, seed-major (every curve's seed 0 first).

    ``index`` is :func:`index_results` of the results so far (for edge extensions
    and the rates the long sections' gauge and weight-decay runs wait for).
    """
    if section == "long_pilot":
        return long_pilot_configs(grid)
    if section in _LONG_STUDY:
        return _LONG_STUDY[section](grid, index)
    if section not in _SECTIONS:
        raise ValueError(f"unknown section {section!r}; choose from {ALL_SECTIONS}")
    base = RunConfig(
        method="lora_muon",
        lr=0.0,
        seed=0,
        rank=None,
        width=grid.width,
        depth=grid.depth,
        budget=grid.budget,
    )
    curves = _SECTIONS[section](base, grid, index)
    if section == "pilot":
        return _expand(curves, grid.seeds[:1], index, 0, union=False)
    if section == "long":
        g = grid.long
        # The gauge pairs run at one rate each: never extended.
        return _expand(curves, g.seeds, index, g.extend) + _expand(
            _long_gauge(grid, index), g.seeds, index, 0
        )
    return _expand(curves, grid.seeds, index, grid.extend)


def plan(
    sections: Iterable[str], grid: Grid, results: dict[str, Any]
) -> list[tuple[str, RunConfig]]:
    """Every planned run, in priority order, with its section; duplicates kept once."""
    seen, out = set(), []
    index = index_results(results)
    for s in sections:
        for cfg in plan_section(s, grid, index):
            k = cfg.key()
            if k not in seen:
                seen.add(k)
                out.append((s, cfg))
    return out


def progress(section: str, grid: Grid, runs: dict[str, Any]) -> tuple[int, int]:
    """``(recorded, planned)`` runs of one section, given the results' ``runs``."""
    keys = [c.key() for c in plan_section(section, grid, index_results(runs))]
    return sum(k in runs for k in keys), len(keys)
