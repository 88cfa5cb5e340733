"""Section (viii) of the report: the powered proxy test (:mod:`~benchmarks.study.proxy_stats`)."""

from __future__ import annotations

import dataclasses
import math
from typing import TYPE_CHECKING

from benchmarks.study import figures, proxy_stats
from benchmarks.study.aggregate import Curve, Results, fmt_lr
from benchmarks.study.configs import Grid
from benchmarks.study.labels import label
from benchmarks.study.planning import index_results, long_base, plan_section, progress

if TYPE_CHECKING:
    from benchmarks.study.report import Report

MIN_SEEDS = 3  # paired seeds complete on the whole grid before the statistics are shown
DENSE = ("dense_muon", None)


def proxy_curve(res: Results, grid: Grid, method: str, rank: int | None) -> Curve | None:
    """The ``proxy`` section's curve of ``method`` at ``rank`` (long budget and model)."""
    ref = dataclasses.replace(long_base(grid), method=method, rank=rank)
    return res.curves.get(ref.curve())


def seed_curves(res: Results, grid: Grid) -> dict[tuple[str, int | None], proxy_stats.SeedCurves]:
    """Each proxy-section curve as a seed × rate matrix over its complete seeds.

    The rates are the ones the section plans for the curve (its grid, its edge
    extensions, and rates other sections ran it at: every seed gets those too).
    """
    planned: dict[tuple, set[float]] = {}
    for cfg in plan_section("proxy", grid, index_results(res.runs)):
        planned.setdefault(cfg.curve(), set()).add(cfg.lr)
    out = {}
    for method, rank, _ in grid.long_study.proxy_curves:
        ref = dataclasses.replace(long_base(grid), method=method, rank=rank)
        curve = res.curves.get(ref.curve())
        runs = {} if curve is None else {k: r.get("val_loss") for k, r in curve.runs.items()}
        rates = planned.get(ref.curve(), set())
        out[(method, rank)] = proxy_stats.seed_curves(runs, rates, grid.long_study.proxy_seeds)
    return out


def tests(res: Results, grid: Grid) -> dict[tuple[str, int | None], proxy_stats.ProxyTest]:
    """:func:`proxy_stats.proxy_test` of every LoRA curve against dense Muon (enough seeds)."""
    curves = seed_curves(res, grid)
    dense = curves.get(DENSE)
    out = {}
    for key, c in curves.items():
        if key == DENSE or dense is None:
            continue
        common = set(c.seeds) & set(dense.seeds)
        if len(common) >= MIN_SEEDS:
            t = proxy_stats.proxy_test(c, dense)
            if t is not None:
                out[key] = t
    return out


def _ci(iv: proxy_stats.Interval, f: str = "lr") -> str:
    if f == "lr":
        return f"{fmt_lr(iv.value)} [{fmt_lr(iv.lo)}, {fmt_lr(iv.hi)}]"
    if not all(math.isfinite(x) for x in iv):
        return "diverged"
    return f"{iv.value:{f}} [{iv.lo:{f}}, {iv.hi:{f}}]"


def rows(found: dict[tuple[str, int | None], proxy_stats.ProxyTest]) -> list[str]:
    """One table row per proxy: optima, ratio, TOST, cost, verdict."""
    out = [
        "| proxy | paired seeds | proxy optimum [95% CI] | dense optimum [95% CI] | "
        "ratio proxy/dense [95% CI] | TOST p (×√2) | dense cost at proxy's rate, nats "
        "[95% CI] | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for (method, rank), t in found.items():
        out.append(
            f"| {label(method, rank)} | {t.n} | {_ci(t.proxy_opt)} | {_ci(t.dense_opt)} | "
            f"{_ci(t.ratio, '.3f')} | {t.tost_p:.3f} | {_ci(t.cost, '+.4f')} | "
            f"**{t.verdict}** |"
        )
    return out


def section_proxy(rep: Report) -> None:
    """Setup, figure, the statistics table (or how far the sweep got) and how to read it."""
    g, s = rep.grid.long, rep.grid.long_study
    done, planned = progress("proxy", rep.grid, rep.res.runs)
    rates = sorted({lr for _, _, lrs in s.proxy_curves for lr in lrs})
    rep.add(
        "## (viii) Powered proxy test: is the LoRA-Muon optimum dense Muon's?",
        "",
        f"Section (vii)'s budget and model (width {g.width}, depth {g.depth}, "
        f"{g.budget.steps} steps of {g.budget.batch} × {g.budget.seq_len}), "
        + ", ".join(label(m, r) for m, r, _ in s.proxy_curves)
        + f", rates {fmt_lr(rates[0])}–{fmt_lr(rates[-1])} spaced ×√2 ({len(rates)} rates), "
        f"{len(s.proxy_seeds)} paired seeds (a seed fixes the batch order and the "
        "embedding, position and head init of both models).",
        "",
    )
    found = tests(rep.res, rep.grid)
    if not found:
        rep.add(f"Not yet run ({done} runs of {planned}).", "")
        return
    curves = [(label(m, r), proxy_curve(rep.res, rep.grid, m, r)) for m, r, _ in s.proxy_curves]
    fig, ax = figures.plt().subplots(figsize=(6.5, 4.2))
    figures.plot_curves(ax, curves, title="proxy test: val loss vs rate")
    figures.save(fig, rep.plot_dir / "proxy.png")
    rep.image("proxy.png", "proxy test: val loss vs learning rate")
    partial = "" if done == planned else f" (partial: {done} runs of {planned})"
    rep.add(
        *rows(found),
        "",
        f"Per seed, each curve's optimum is fitted between grid rates "
        "(`log_parabola_optimum`, as `proxy_lr_search`'s `dense_lr`); optima are geometric "
        "means over seeds, intervals a paired bootstrap over seeds (5000 resamples). "
        "TOST: two one-sided t-tests of the mean per-seed log₂ ratio against ±½ "
        "(equivalence within ×√2). Cost: dense Muon's seed-mean curve, linear in log₂ η, "
        "at the proxy's optimum, minus its lowest point. Verdict: *shown* if TOST rejects "
        "at 5%, *refuted* if the ratio's interval lies outside [0.707, 1.414], else "
        f"*inconclusive at this power*{partial}.",
        "",
    )
