"""The report's test of rank-aware rate rules (``benchmarks.study.transfer``) on the data."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.study import transfer
from benchmarks.study.aggregate import Results, fmt_lr
from benchmarks.study.configs import Grid


def _covers(c: transfer.Curve | None, lrs: tuple[float, ...]) -> bool:
    """The curve ran at every rate of its grid (a partial curve's argmin means little)."""
    return c is not None and c.best() is not None and set(lrs) <= {lr for lr, _ in c.runs}


def _find(
    res: Results, seeds: tuple[int, ...] | None, lrs: tuple[float, ...], **fields: Any
) -> transfer.Curve | None:
    """A curve, on ``seeds`` and its grid ``lrs`` when given (section vii's own curves)."""
    c = res.find(**fields)
    return c.on_seeds(seeds, lrs) if c is not None and seeds is not None else c


def pairs(res: Results, grid: Grid) -> list[transfer.Pair]:
    """Every (budget, rank) whose LoRA-Muon and dense Muon curves covered their grids."""
    out = []
    g = grid.long
    spec = {(m, r): lrs for m, r, lrs in g.curves}
    short = dict(budget=grid.budget, width=grid.width, depth=grid.depth)
    long = dict(budget=g.budget, width=g.width, depth=g.depth)
    budgets = (
        ("short", short, {r: grid.spectral_lrs for r in grid.ranks}, grid.spectral_lrs, None),
        (
            "long",
            long,
            {r: lrs for (m, r), lrs in spec.items() if m == "lora_muon"},
            spec.get(("dense_muon", None), ()),
            g.seeds,
        ),
    )
    for name, fields, ranks, dense_lrs, seeds in budgets:
        dense = _find(res, seeds, dense_lrs, method="dense_muon", **fields)
        for r, lrs in sorted(ranks.items()):
            lora = _find(res, seeds, lrs, method="lora_muon", rank=r, **fields)
            if _covers(dense, dense_lrs) and _covers(lora, lrs):
                out.append(transfer.Pair(name, r, fields["width"], lora, dense))
    return out


def _pair_rows(ps: list[transfer.Pair], const: dict[str, float]) -> list[str]:
    rows = [
        "| budget | rank r | k = width | fitted η*_r | fitted η*_dense | observed "
        "η*_dense/η*_r | Frobenius rule √(2r/k) | budget's constant |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for p in ps:
        ratio = p.ratio
        rows.append(
            f"| {p.budget} | {p.rank} | {p.k} | "
            f"{fmt_lr(transfer.fitted_optimum(p.lora))} | "
            f"{fmt_lr(transfer.fitted_optimum(p.dense))} | "
            f"{'–' if ratio is None else f'{ratio:.3f}'} | "
            f"{transfer.frobenius_rule(p):.3f} | {const[p.budget]:.3f} |"
        )
    return rows


def verdict(slope: float, se: float) -> str:
    """Which rule the rank slope supports, two standard errors either way."""
    if not math.isfinite(slope):
        return "too few ranks to tell"
    frob = abs(slope - 0.5) <= 2 * se
    flat = abs(slope) <= 2 * se
    if flat and not frob:
        return "the optimum ratio does not depend on rank: the Frobenius rule is rejected"
    if frob and not flat:
        return "the ratio grows with rank as the Frobenius rule predicts"
    if frob and flat:
        return "the data cannot tell the two rules apart"
    return "neither a rank-independent factor nor the Frobenius rule fits the rank trend"


def advice(ps: list[transfer.Pair]) -> str:
    """What a user should do, from the fitted ratios of each budget."""
    const = {
        b: transfer.fit_constant([p for p in ps if p.budget == b])
        for b in dict.fromkeys(p.budget for p in ps)
    }
    cost = {
        b: transfer.score("", transfer.identity_rule, [p for p in ps if p.budget == b]).regret
        for b in const
    }
    parts = [
        f"at the {b} budget dense Muon's optimum is {v:.2f}× the LoRA-Muon one on "
        f"average, and training dense Muon at the LoRA optimum itself costs "
        f"{cost[b]:+.3f} nats"
        for b, v in const.items()
    ]
    return (
        "**What to do.** No rank-aware correction: " + "; ".join(parts) + ". Train the "
        "proxy with the dense run's own steps, batch and schedule and use "
        "`proxy_lr_search(...).dense_lr`, the proxy's optimum fitted between grid rates "
        "as in section (vii), for dense Muon (its `dense_lr_factor` defaults to 1); for "
        "a run as short as the short budget here, pass `dense_lr_factor` near the "
        "short budget's ratio."
    )


def rule_section(res: Results, grid: Grid) -> list[str]:
    """Fitted optima per rank, each rule's error and cost, the rank slope, the advice."""
    ps = pairs(res, grid)
    if not ps:
        return ["### Rank-aware rate rules", "", "Not enough runs yet."]
    const = {
        b: transfer.fit_constant([p for p in ps if p.budget == b])
        for b in dict.fromkeys(p.budget for p in ps)
    }
    slope, se = transfer.rank_slope(ps)
    rules = [
        (
            "identity (the paper; `proxy_lr_search`'s `dense_lr` by default): η_dense = η_r",
            transfer.identity_rule,
        ),
        ("Frobenius: η_dense = η_r · √(2r/k)", transfer.frobenius_rule),
        (
            "constant per budget (fitted): η_dense = "
            + ", ".join(f"{v:.2f} · η_r ({k})" for k, v in const.items()),
            lambda p: const[p.budget],
        ),
    ]
    budgets = list(const)
    rows = [
        "| rule | "
        + " | ".join(f"error, {b} (factors of 2)" for b in budgets)
        + " | "
        + " | ".join(f"dense-loss cost, {b} (nats)" for b in budgets)
        + " |",
        "|---" * (1 + 2 * len(budgets)) + "|",
    ]
    for name, rule in rules:
        sc = [transfer.score(name, rule, [p for p in ps if p.budget == b]) for b in budgets]
        rows.append(
            f"| {name} | "
            + " | ".join(f"{x.error:.2f}" for x in sc)
            + " | "
            + " | ".join(f"{x.regret:+.3f}" for x in sc)
            + " |"
        )
    return [
        "### Rank-aware rate rules: the Frobenius hypothesis tested",
        "",
        "At the same spectral norm η, a dense Muon step moves every singular direction "
        "(`‖ΔW‖_F ≈ η √k`, k = min(m, n)), a rank-r LoRA-Muon product step at most 2r of "
        "them (`‖ΔW‖_F ≤ η √(2r)`). If the optimum followed the Frobenius size, "
        "η*_dense / η*_r would be √(2r/k): rank dependent, slope 1/2 in log₂ r. Optima are "
        "fitted off the grid (a parabola in log₂ η through the best rate and its "
        "neighbours), both budgets of this page:",
        "",
        *_pair_rows(ps, const),
        "",
        f"Slope of log₂(η*_dense/η*_r) against log₂ r, each budget centred: "
        f"**{slope:.2f} ± {se:.2f}** (Frobenius rule: 0.5; identity and constant rules: 0): "
        f"{verdict(slope, se)}.",
        "",
        *rows,
        "",
        advice(ps),
        "",
    ]
