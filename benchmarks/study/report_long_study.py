"""Sections (ix)–(xii) of the report: width 128, shapes, peers and weight decay at the
long budget (the grid's :class:`~benchmarks.study.configs.LongStudy`).

Each says how far the sweep got ("not yet run (n runs of N)") until it has runs.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.study import transfer
from benchmarks.study.aggregate import (
    Curve,
    Point,
    Results,
    curve_table,
    fmt_lr,
    mean_std,
    paired_deltas,
)
from benchmarks.study.configs import SECTION_TITLES, Grid
from benchmarks.study.labels import label
from benchmarks.study.planning import decay_lr, index_results, long_base, peer_gauge_lr, progress

if TYPE_CHECKING:
    from benchmarks.study.report import Report


def study_curve(
    res: Results, grid: Grid, method: str, rank: int | None, **fields: Any
) -> Curve | None:
    """The long-budget curve of ``method``/``rank`` with ``fields`` changed (width, gauge, ...)."""
    ref = dataclasses.replace(long_base(grid), method=method, rank=rank, **fields)
    return res.curves.get(ref.curve())


def at_seeds(curve: Curve | None, lr: float, seeds: tuple[int, ...]) -> Point | None:
    """``curve``'s point at ``lr`` over ``seeds`` only (a curve may have more seeds)."""
    if curve is None:
        return None
    return Curve(curve.cfg, {k: v for k, v in curve.runs.items() if k[1] in seeds}).at(lr)


def _head(rep: Report, section: str, text: str, waits: str = "") -> bool:
    """The section's title, its text and progress; ``False`` if none of its runs exist.

    ``waits``: what the section's runs wait for, said while none is planned.
    """
    done, planned = progress(section, rep.grid, rep.res.runs)
    number, _, title = SECTION_TITLES[section].partition(" ")
    rep.add(f"## {number} {title[:1].upper()}{title[1:]}", "", text, "")
    if planned == 0 and waits:
        rep.add(f"Not yet run (0 runs of 0 planned so far: {waits}).", "")
        return False
    if done == 0:
        rep.add(f"Not yet run ({done} runs of {planned}).", "")
        return False
    if done < planned:
        rep.add(f"Partial: {done} of {planned} runs.", "")
    return True


def _ratio_line(dense: Curve | None, lora: Curve | None, name: str) -> str:
    d, r = transfer.fitted_optimum(dense), transfer.fitted_optimum(lora)
    if d is None or r is None:
        return f"{name}: –"
    return f"{name}: {fmt_lr(r)} vs dense {fmt_lr(d)} (dense/LoRA {d / r:.2f})"


def section_width128(rep: Report) -> None:
    """Dense Muon and LoRA-Muon at width 128: their curves and fitted optima."""
    s = rep.grid.long_study
    text = (
        f"Section (vii)'s budget at width {s.wide} (depth {rep.grid.long.depth}): does the "
        "proxy's optimum still equal dense Muon's when the dense model is twice as wide?"
    )
    if not _head(rep, "width128", text):
        return
    curves = [
        (label(m, r), study_curve(rep.res, rep.grid, m, r, width=s.wide))
        for m, r, _ in s.wide_curves
    ]
    dense = study_curve(rep.res, rep.grid, "dense_muon", None, width=s.wide)
    lora = [
        (n, c) for (m, _, _), (n, c) in zip(s.wide_curves, curves, strict=True) if m != "dense_muon"
    ]
    ref_name, ref = lora[0] if lora else ("", None)
    rep.add(*curve_table(curves, ref, ref_name), "")
    lines = [_ratio_line(dense, c, name) for name, c in lora]
    rep.add("Fitted optima: " + "; ".join(lines) + ".", "")


def section_shape_long(rep: Report) -> None:
    """Best and fitted rates per (width, depth), section (vii)'s shape included."""
    s, g = rep.grid.long_study, rep.grid.long
    text = (
        "Dense Muon and LoRA-Muon at other widths and depths, section (vii)'s budget: does "
        "each optimum move with the shape, and does the LoRA/dense ratio stay put?"
    )
    if not _head(rep, "shape_long", text):
        return
    head = "| width | depth | " + " | ".join(
        f"{label(m, r)}: best LR, fitted, val loss" for m, r, _ in s.shape_curves
    )
    rows = [head + " |", "|---|---" + "|---" * len(s.shape_curves) + "|"]
    fitted: dict[str, list[float]] = {label(m, r): [] for m, r, _ in s.shape_curves}
    for w, d in dict.fromkeys(((g.width, g.depth), *s.shapes)):
        cells = []
        for m, r, _ in s.shape_curves:
            c = study_curve(rep.res, rep.grid, m, r, width=w, depth=d)
            best = c.best() if c else None
            fit = transfer.fitted_optimum(c)
            if fit is not None:
                fitted[label(m, r)].append(fit)
            cells.append(f"{fmt_lr(best and best.lr)}, {fmt_lr(fit)}, {mean_std(best)}")
        rows.append(f"| {w} | {d} | " + " | ".join(cells) + " |")
    moves = [
        f"{name}'s fitted optimum spans ×{max(v) / min(v):.2f} over {len(v)} shapes "
        f"({fmt_lr(min(v))} to {fmt_lr(max(v))})"
        for name, v in fitted.items()
        if len(v) >= 2
    ]
    rep.add(*rows, "")
    if moves:
        rep.add(
            "Does the optimum move? "
            + "; ".join(moves)
            + " (a factor-2 grid: a span within ×2 is one grid step). The claim table's "
            "row 6 judges LoRA-Muon's transfer against the seed spread.",
            "",
        )


def _gauge_rows(rep: Report) -> list[str]:
    s = rep.grid.long_study
    lr = peer_gauge_lr(rep.grid, index_results(rep.res.runs))
    if lr is None:
        return [f"Gauge study: waits for {label(s.gauge_method, s.gauge_rank)}'s curve."]
    rows = [
        f"Gauge ×{s.gauge:g} at {label(s.gauge_method, s.gauge_rank)}'s best rate "
        f"{fmt_lr(lr)}, paired by seed:",
        "",
        f"| method | val loss, gauge 1 | val loss, gauge {s.gauge:g} | paired Δ, mean / max abs |",
        "|---|---|---|---|",
    ]
    for m in (s.gauge_method, *s.gauge_controls):
        c1 = study_curve(rep.res, rep.grid, m, s.gauge_rank)
        c9 = study_curve(rep.res, rep.grid, m, s.gauge_rank, gauge=s.gauge)
        d = paired_deltas(c1, c9, lr)
        delta = f"{np.mean(d):+.2e} / {np.max(np.abs(d)):.2e} (n={len(d)})" if d else "–"
        at1, at9 = (at_seeds(c, lr, rep.grid.long.seeds) for c in (c1, c9))
        rows.append(f"| {label(m, s.gauge_rank)} | {mean_std(at1)} | {mean_std(at9)} | {delta} |")
    return rows


def section_peers_long(rep: Report) -> None:
    """The peers' curves beside LoRA-Muon and dense Muon, and Spectron's gauge study."""
    s = rep.grid.long_study
    text = (
        "The library's peers at section (vii)'s budget (LoRA peers at rank "
        f"{s.gauge_rank}), each on its own grid, beside LoRA-Muon at that rank and dense "
        "Muon from section (vii)."
    )
    if not _head(rep, "peers_long", text):
        return
    curves = [(label(m, r), study_curve(rep.res, rep.grid, m, r)) for m, r, _ in s.peer_curves]
    curves += [
        (
            label("lora_muon", s.gauge_rank),
            study_curve(rep.res, rep.grid, "lora_muon", s.gauge_rank),
        ),
        (label("dense_muon"), study_curve(rep.res, rep.grid, "dense_muon", None)),
    ]
    rep.add(*curve_table(curves), "", *_gauge_rows(rep), "")


def section_wd_long(rep: Report) -> None:
    """Each decay's loss at the method's best proxy rate, paired against no decay."""
    s = rep.grid.long_study
    text = (
        "Decoupled weight decay of the matrices at each method's best `proxy` rate "
        "(dense Muon `W ← (1 − λη)W`, LoRA-Muon its split decay of each product; "
        "the AdamW leaves have none); λ = 0 is the `proxy` run itself."
    )
    if not _head(rep, "wd_long", text, "the runs wait for the `proxy` curves' best rates"):
        return
    index = index_results(rep.res.runs)
    rows = ["| method | rate | λ | val loss | paired Δ vs λ = 0 |", "|---|---|---|---|---|"]
    for m, r in s.decay_curves:
        lr = decay_lr(rep.grid, index, m, r)
        if lr is None:
            rows.append(f"| {label(m, r)} | waits for its `proxy` curve | | | |")
            continue
        base = study_curve(rep.res, rep.grid, m, r)
        for wd in (0.0, *s.decays):
            c = study_curve(rep.res, rep.grid, m, r, weight_decay=wd)
            d = paired_deltas(base, c, lr) if wd else []
            delta = f"{np.mean(d):+.4f} (n={len(d)})" if d else "–"
            at = at_seeds(c, lr, rep.grid.long.seeds)
            rows.append(f"| {label(m, r)} | {fmt_lr(lr)} | {wd:g} | {mean_std(at)} | {delta} |")
    rep.add(*rows, "")


def sections(rep: Report) -> None:
    """Sections (ix)–(xii), in the sweep's priority order."""
    section_width128(rep)
    section_shape_long(rep)
    section_peers_long(rep)
    section_wd_long(rep)
