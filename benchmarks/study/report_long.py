"""Section (vii) of the report: the headline at a long budget, and the rate rule test."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.study import figures, report_rule, transfer
from benchmarks.study.aggregate import Curve, Results, fmt_lr, mean_std, paired_deltas
from benchmarks.study.configs import Budget, Grid
from benchmarks.study.labels import METHOD_LABELS, PAPER, label
from benchmarks.study.planning import long_pilot_configs
from benchmarks.study.report_intro import compute_line, legacy_machine

if TYPE_CHECKING:
    from benchmarks.study.report import Report

TARGET = 1.90  # the long budget must bring dense Muon's best val loss to at most this


def long_curve(
    res: Results, grid: Grid, method: str, rank: int | None, gauge: float = 1.0
) -> Curve | None:
    """Section (vii)'s curve on its own seeds (:meth:`~.aggregate.Curve.on_seeds`).

    The powered proxy test (section viii) runs the same configurations with more
    seeds and rates; those wait for section viii's own table.
    """
    g = grid.long
    c = res.find(
        budget=g.budget, method=method, rank=rank, width=g.width, depth=g.depth, gauge=gauge
    )
    own = next((lrs for m, r, lrs in g.curves if (m, r) == (method, rank)), ())
    c = c.on_seeds(g.seeds, own if gauge == 1.0 else ()) if c else None
    return c if c and c.runs else None


def long_label(method: str, rank: int | None) -> str:
    return label(method, rank)


def long_runs(res: Results, grid: Grid) -> list[dict[str, Any]]:
    """Records at the long budget and of its pilot."""
    budgets = {_key(grid.long.budget)} | {_key(c.budget) for c in long_pilot_configs(grid)}
    return [
        r
        for r in res.runs.values()
        if _key(Budget(**r["config"].get("budget", {}))) in budgets and "wall_s" in r
    ]


def _key(b: Budget) -> tuple:
    return dataclasses.astuple(b)


def _pilot_rows(rep: Report) -> list[str]:
    rows = [
        "| steps × batch × length | characters | width | depth | rate | dense Muon val "
        "loss | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for cfg in long_pilot_configs(rep.grid):
        rec = rep.res.runs.get(cfg.key())
        b = cfg.budget
        val = (
            "not run yet"
            if rec is None
            else ("diverged" if rec.get("val_loss") is None else f"{rec['val_loss']:.3f}")
        )
        wall = "" if rec is None else f"{rec.get('wall_s', 0):.0f}"
        rows.append(
            f"| {b.steps} × {b.batch} × {b.seq_len} | "
            f"{b.steps * b.batch * b.seq_len / 1e6:.2f}M | {cfg.width} | {cfg.depth} | "
            f"{fmt_lr(cfg.lr)} | {val} | {wall} |"
        )
    return rows


def headline_rows(res: Results, grid: Grid) -> list[str]:
    """Best rate and val loss ± std over seeds per long-budget method."""
    rows = [
        "| method | best LR | val loss at best LR | each seed's own best LR | diverged runs |",
        "|---|---|---|---|---|",
    ]
    for method, rank, _ in grid.long.curves:
        c = long_curve(res, grid, method, rank)
        if c is None:
            rows.append(f"| {long_label(method, rank)} | not run yet | | | |")
            continue
        best = c.best()
        seeds = ", ".join(fmt_lr(v) for v in c.per_seed_best().values())
        div = sum(p.diverged for p in c.points())
        total = sum(len(p.losses) for p in c.points())
        rows.append(
            f"| {long_label(method, rank)} | {fmt_lr(best and best.lr)} | "
            f"{mean_std(best)} | {seeds} | {div}/{total} |"
        )
    return rows


def rank2_verdict(db: Any, at: Any) -> str:
    """``Yes`` (same grid rate), ``Within seed noise`` (dense Muon at the rank-2 rate is
    no worse than its best by more than a seed standard deviation) or ``No``."""
    if math.isclose(at.lr if at else math.nan, db.lr):
        return "Yes"
    if at is not None and not at.diverged and at.mean - db.mean <= max(db.std, at.std):
        return "Not on the grid, but within seed noise"
    return "No"


def proxy_answer(res: Results, grid: Grid) -> list[str]:
    """The plain answer: does the rank-2 optimum equal dense Muon's at the long budget?"""
    dense = long_curve(res, grid, "dense_muon", None)
    r2 = long_curve(res, grid, "lora_muon", 2)
    db, b2 = (c.best() if c else None for c in (dense, r2))
    if db is None or b2 is None:
        return ["*Rank-2 proxy*: not enough runs yet."]
    at = dense.complete().at(b2.lr)
    cost = (
        "not run"
        if at is None
        else "diverged"
        if at.diverged
        else f"{at.mean - db.mean:+.3f} nats ({mean_std(at)}; its best {mean_std(db)})"
    )
    fit_d, fit_2 = transfer.fitted_optimum(dense), transfer.fitted_optimum(r2)
    return [
        f"**Does the rank-2 optimum equal dense Muon's at this budget? "
        f"{rank2_verdict(db, at)}.** Rank-2 LoRA-Muon's best grid rate is {fmt_lr(b2.lr)}, "
        f"dense Muon's {fmt_lr(db.lr)} (ratio {b2.lr / db.lr:.3g}; {len(b2.losses)} seeds "
        f"each); fitted between grid rates, {fmt_lr(fit_2)} and {fmt_lr(fit_d)} (dense/rank-2 "
        f"{(fit_d / fit_2) if fit_2 and fit_d else math.nan:.2f}). Dense Muon trained at the "
        f"rank-2 optimum: {cost}.",
    ]


def gauge_rows(res: Results, grid: Grid) -> list[str]:
    g = grid.long
    rows = [
        f"| method | rate | val loss, gauge 1 | val loss, gauge {g.gauge:g} | paired Δ, "
        "mean / max abs |",
        "|---|---|---|---|---|",
    ]
    for method in g.gauge_methods:
        c1 = long_curve(res, grid, method, g.gauge_rank)
        c9 = long_curve(res, grid, method, g.gauge_rank, g.gauge)
        ref = long_curve(res, grid, "lora_muon", g.gauge_rank)
        if c9 is None or c1 is None or ref is None:
            rows.append(f"| {METHOD_LABELS[method]} | not run yet | | | |")
            continue
        lr = next(iter(c9.runs))[0]
        d = paired_deltas(c1, c9, lr)
        delta = f"{np.mean(d):+.2e} / {np.max(np.abs(d)):.2e} (n={len(d)})" if d else "–"
        rows.append(
            f"| {METHOD_LABELS[method]} r={g.gauge_rank} | {fmt_lr(lr)} | "
            f"{mean_std(c1.at(lr))} | {mean_std(c9.at(lr))} | {delta} |"
        )
    return rows


def _figure(rep: Report) -> None:
    res, grid = rep.res, rep.grid
    spectral = [
        (long_label(m, r), long_curve(res, grid, m, r))
        for m, r, _ in grid.long.curves
        if m != "adamw_lora"
    ]
    adam = [
        (long_label(m, r), long_curve(res, grid, m, r))
        for m, r, _ in grid.long.curves
        if m == "adamw_lora"
    ]
    fig, axes = figures.plt().subplots(1, 2, figsize=(12, 4.2))
    figures.plot_curves(axes[0], spectral, title="long budget: spectral rates")
    figures.plot_curves(axes[1], adam, title="long budget: AdamW-LoRA")
    figures.save(fig, rep.plot_dir / "long.png")


def _target_line(res: Results, grid: Grid) -> str:
    dense = long_curve(res, grid, "dense_muon", None)
    best = dense.best() if dense else None
    if best is None:
        return "Dense Muon's best val loss at this budget: not run yet."
    verb = "meets" if best.mean <= TARGET else "misses"
    return (
        f"Dense Muon's best val loss here, {best.mean:.3f}, {verb} the target of at most "
        f"{TARGET:.2f} (the paper reports {PAPER['dense_val']})."
    )


def section_long(rep: Report) -> None:
    """The long budget: setup, pilot, headline table, the rank-2 answer, gauge, rules."""
    g = rep.grid.long
    b = g.budget
    legacy = legacy_machine(rep.res.data)
    _figure(rep)
    rep.add(
        "## (vii) Long budget: the headline at the paper's loss",
        "",
        f"Budget per run: {b.steps} steps, batch {b.batch} × {b.seq_len} characters "
        f"({b.steps * b.batch * b.seq_len / 1e6:.2f}M training characters), width {g.width}, "
        f"depth {g.depth}, the same schedule shape and fixed AdamW rate {b.adam_lr:g} as "
        f"above; final val loss on {b.eval_windows} fixed windows; seeds "
        f"{', '.join(map(str, g.seeds))}. The pilot below (dense Muon at its short-budget "
        "optimum, one seed) chose it: of the candidates at or below the target, the one "
        "nearest the paper's dense loss at the lowest cost, preferring a narrower model "
        f"with more data over a wider one. {_target_line(rep.res, rep.grid)} Compute (pilot "
        f"included): {compute_line(long_runs(rep.res, rep.grid), legacy)}.",
        "",
        *_pilot_rows(rep),
        "",
    )
    rep.image("long.png", "long budget: val loss vs learning rate")
    rep.add(*headline_rows(rep.res, rep.grid), "", *proxy_answer(rep.res, rep.grid), "")
    rep.add(
        f"Gauge ×{g.gauge:g} at rank {g.gauge_rank}, both methods at rank-{g.gauge_rank} "
        "LoRA-Muon's best rate, paired by seed:",
        "",
        *gauge_rows(rep.res, rep.grid),
        "",
    )
    lines = report_rule.rule_section(rep.res, rep.grid)
    rep.add(*lines[:2])
    ps = report_rule.pairs(rep.res, rep.grid)
    if ps:
        fig, ax = figures.plt().subplots(figsize=(6.5, 4.2))
        figures.plot_rate_ratios(ax, ps)
        figures.save(fig, rep.plot_dir / "rate_rule.png")
        rep.image("rate_rule.png", "dense-to-LoRA optimum ratio against rank")
    rep.add(*lines[2:], "")
