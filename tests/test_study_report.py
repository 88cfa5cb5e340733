"""The study report: rate-rule maths, and prose numbers that come from the results."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest

from benchmarks.study import (
    configs,
    discussion,
    planning,
    proxy_stats,
    report,
    report_long,
    transfer,
)
from benchmarks.study.aggregate import Curve, Results
from benchmarks.study.lr_transfer import DEFAULT_RESULTS

RC = configs.RunConfig


def _curve(losses: dict[float, list[float]], method: str = "lora_muon", rank=2) -> Curve:
    runs = {}
    for lr, vals in losses.items():
        for seed, v in enumerate(vals):
            runs[(lr, seed)] = {"val_loss": v}
    return Curve(RC(method, 0.0, 0, rank), runs)


def test_fitted_optimum_is_the_parabola_vertex_in_log_rate():
    # loss = (log2 lr - log2 0.03)^2 + 2, sampled on the study's grid: vertex at 0.03.
    lrs = [0.0125 * 2.0**k for k in range(-2, 4)]
    c = _curve({lr: [(math.log2(lr / 0.03)) ** 2 + 2] * 3 for lr in lrs})
    assert transfer.fitted_optimum(c) == pytest.approx(0.03, rel=1e-9)
    # Best rate on an edge: the edge itself, not an extrapolation.
    edge = _curve({lr: [1.0 / lr] for lr in lrs})
    assert transfer.fitted_optimum(edge) == max(lrs)


def _pairs_from(rule, ranks=(1, 2, 4, 8, 16, 32), k=128, jitter=0.0) -> list[transfer.Pair]:
    lrs = [0.0125 * 2.0**j for j in range(-6, 6)]
    rng = np.random.default_rng(0)
    out = []
    for r in ranks:
        opt_r = 0.03 * 2.0 ** rng.normal(0, jitter)
        opt_d = opt_r * rule(r, k)
        lora = _curve({lr: [math.log2(lr / opt_r) ** 2] for lr in lrs})
        dense = _curve({lr: [math.log2(lr / opt_d) ** 2] for lr in lrs}, "dense_muon", None)
        out.append(transfer.Pair("short", r, k, lora, dense))
    return out


def test_rank_slope_tells_the_frobenius_rule_from_a_constant_factor():
    frob = _pairs_from(lambda r, k: math.sqrt(2 * r / k))
    slope, se = transfer.rank_slope(frob)
    assert slope == pytest.approx(0.5, abs=1e-6) and se < 1e-6
    assert transfer.score("f", transfer.frobenius_rule, frob).error == pytest.approx(0, abs=1e-6)
    const = _pairs_from(lambda r, k: 0.4, jitter=0.1)
    slope, se = transfer.rank_slope(const)
    assert abs(slope) < 3 * se + 0.05
    assert transfer.fit_constant(const) == pytest.approx(0.4, rel=1e-6)
    assert "Frobenius rule is rejected" in report_rule_verdict(0.02, 0.05)
    assert "Frobenius rule predicts" in report_rule_verdict(0.5, 0.05)


def report_rule_verdict(slope: float, se: float) -> str:
    from benchmarks.study.report_rule import verdict

    return verdict(slope, se)


def test_discussion_module_writes_no_number_by_hand():
    """Every decimal in the Discussion is formatted from the results, none typed in."""
    tree = ast.parse(Path(discussion.__file__).read_text())
    literals = [
        n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
    ]
    typed = [s for s in literals if re.search(r"\d\.\d|\d+e-\d|\b\d{2,}\b", s)]
    assert not typed, typed


def _committed() -> dict:
    return json.loads(DEFAULT_RESULTS.read_text())


def test_discussion_numbers_follow_the_results():
    data = _committed()
    grid = report.grid_of(data)
    text = "\n".join(discussion.discussion(Results(data), grid))
    assert "not enough runs" not in text.split("**Long budget**")[0]
    dense = Results(data).find(method="dense_muon", width=grid.width, depth=grid.depth)
    best = dense.best()
    assert f"{best.mean:.3f}" in text  # the short-budget dense optimum's loss
    # Shift every short-budget dense Muon loss by +0.1: the numbers move with it.
    shifted = copy.deepcopy(data)
    for rec in shifted["runs"].values():
        cfg = RC.from_dict(rec["config"])
        if cfg.method == "dense_muon" and cfg.budget == grid.budget and rec["val_loss"]:
            rec["val_loss"] += 0.1
    text2 = "\n".join(discussion.discussion(Results(shifted), grid))
    assert f"{best.mean + 0.1:.3f}" in text2 and text2 != text


def test_long_section_answers_the_rank_2_question_from_the_data():
    g = dataclasses.replace(configs.QUICK_LONG, seeds=(0, 1))
    grid = dataclasses.replace(configs.QUICK, long=g)
    base = RC("dense_muon", 0.0, 0, None, width=g.width, depth=g.depth, budget=g.budget)
    runs = {}
    for method, rank, best in (("dense_muon", None, 0.02), ("lora_muon", 2, 0.04)):
        for lr in (0.01, 0.02, 0.04, 0.08):
            for seed in g.seeds:
                cfg = dataclasses.replace(base, method=method, rank=rank, lr=lr, seed=seed)
                loss = 2.0 + math.log2(lr / best) ** 2 / 10 + seed * 1e-3
                runs[cfg.key()] = {"config": cfg.as_dict(), "val_loss": loss, "status": "ok"}
    res = Results({"runs": runs})
    answer = " ".join(report_long.proxy_answer(res, grid))
    assert answer.startswith("**Does the rank-2 optimum equal dense Muon's at this budget? No.**")
    assert "ratio 2;" in answer and "+0.100 nats" in answer
    assert "(dense/rank-2 0.50)" in answer  # the fitted optima: exact parabolas
    rows = report_long.headline_rows(res, grid)
    assert any(
        r.startswith("| dense Muon | 0.02 | 2.000 ± 0.001 (n=2) | 0.02, 0.02 |") for r in rows
    ), rows


def test_proxy_docstring_claims_hold_on_the_committed_results():
    """What ``proxy_lr_search``'s docstring says the study found, checked on the data."""
    from benchmarks.study.report_rule import pairs

    data = _committed()
    grid = report.grid_of(data)
    ps = pairs(Results(data), grid)
    long2 = [p.ratio for p in ps if p.budget == "long" and p.rank == 2]
    short = {p.rank: p.ratio for p in ps if p.budget == "short"}
    # "equal within seed noise" at the long budget: within half a grid step (√2).
    assert long2 and 2**-0.5 <= long2[0] <= 2**0.5, long2
    # "roughly half at every rank" at 200 steps, and no rank trend.
    assert set(short) == set(grid.ranks) and all(0.25 <= r <= 0.6 for r in short.values())
    slope, se = transfer.rank_slope(ps)
    assert abs(slope) <= 2 * se + 0.1 and abs(slope - 0.5) > 4 * se, (slope, se)


def test_rank2_verdict_separates_equal_noise_and_offset():
    from benchmarks.study.aggregate import Point

    best = Point(0.025, (1.76, 1.77, 1.78), (0, 1, 2))  # std 0.01
    assert report_long.rank2_verdict(best, best) == "Yes"
    near = Point(0.0125, (1.765, 1.775, 1.785), (0, 1, 2))  # +0.005 < std
    assert report_long.rank2_verdict(best, near) == "Not on the grid, but within seed noise"
    far = Point(0.0125, (1.80, 1.81, 1.82), (0, 1, 2))  # +0.04 > std
    assert report_long.rank2_verdict(best, far) == "No"


# ----------------------------------------------------------------------------- proxy test

RATES = configs.lr_grid_sqrt2(-4, 4)


def _seed_curves(optima, rates=RATES, noise=0.0, seed=0) -> proxy_stats.SeedCurves:
    """Exact parabolas in log₂ η with their vertex at each seed's optimum (+ noise)."""
    rng = np.random.default_rng(seed)
    runs = {}
    for s, opt in enumerate(optima):
        for r in rates:
            runs[(r, s)] = 2.0 + 0.1 * math.log2(r / opt) ** 2 + rng.normal(0, noise)
    return proxy_stats.seed_curves(runs, rates, range(len(optima)))


def test_proxy_stats_recover_per_seed_optima_and_pair_the_bootstrap():
    rng = np.random.default_rng(1)
    shared = 2.0 ** rng.normal(0, 0.4, size=10)  # a seed effect both methods share
    dense = _seed_curves(0.025 * shared)
    proxy = _seed_curves(0.0125 * shared * 2.0 ** rng.normal(0, 0.05, size=10))
    np.testing.assert_allclose(proxy_stats.per_seed_optima(dense), 0.025 * shared, rtol=1e-9)
    t = proxy_stats.proxy_test(proxy, dense)
    assert t.n == 10 and t.ratio.lo < 0.5 < t.ratio.hi
    # Paired: the shared seed effect cancels in the ratio, not in each optimum.
    width = lambda iv: math.log2(iv.hi / iv.lo)  # noqa: E731
    assert width(t.ratio) < 0.3 * width(t.dense_opt)
    assert t.verdict == "refuted" and t.ratio.hi < 2**-0.5  # a factor 2 off
    # Dense Muon at half its optimum: 0.1 nats on exact parabolas, minus the grid's
    # shift of each seed's own minimum; the cost is positive.
    assert 0.0 < t.cost.lo <= t.cost.value <= t.cost.hi < 0.2


def test_proxy_verdict_shown_refuted_or_inconclusive():
    rng = np.random.default_rng(2)
    seeds = 2.0 ** rng.normal(0, 0.2, size=10)
    dense = _seed_curves(0.02 * seeds)
    same = proxy_stats.proxy_test(_seed_curves(0.02 * seeds * 2.0 ** rng.normal(0, 0.1, 10)), dense)
    assert same.verdict == "shown" and same.tost_p < 0.05
    assert 2**-0.5 < same.ratio.lo <= same.ratio.value <= same.ratio.hi < 2**0.5
    assert same.cost.value < 0.01
    # Three noisy seeds around the truth: neither shown nor refuted.
    few = _seed_curves(0.02 * seeds[:3] * 2.0 ** np.array([0.6, -0.5, 0.3]))
    t = proxy_stats.proxy_test(few, _seed_curves(0.02 * seeds[:3]))
    assert t.verdict == "inconclusive at this power" and t.tost_p >= 0.05
    far = proxy_stats.proxy_test(_seed_curves(0.08 * seeds), dense)
    assert far.verdict == "refuted" and far.ratio.lo > 2**0.5


def test_tost_and_cost_by_hand():
    from scipy import stats

    d = np.array([0.1, -0.2, 0.05, 0.3, 0.0, -0.1])
    m, se, df = d.mean(), d.std(ddof=1) / math.sqrt(d.size), d.size - 1
    want = max(stats.t.sf((m + 0.5) / se, df), stats.t.cdf((m - 0.5) / se, df))
    assert proxy_stats.tost_p(d) == pytest.approx(want)
    assert proxy_stats.tost_p(-d) == pytest.approx(want)  # symmetric margins
    assert proxy_stats.tost_p(d + 1.0) > 0.5  # outside the margin
    assert proxy_stats.tost_p([0.1]) == 1.0
    rates, curve = [0.01, 0.02, 0.04], np.array([2.3, 2.0, 2.1])
    assert proxy_stats.dense_cost(rates, curve, 0.02) == pytest.approx(0.0)
    assert proxy_stats.dense_cost(rates, curve, 0.02 * 2**0.5) == pytest.approx(0.05)  # halfway
    assert proxy_stats.dense_cost(rates, curve, 1.0) == pytest.approx(0.1)  # clamped


def _proxy_grid(seeds=(0, 1, 2, 3)) -> configs.Grid:
    s = dataclasses.replace(
        configs.QUICK_LONG_STUDY,
        proxy_seeds=seeds,
        proxy_curves=(("dense_muon", None, RATES[2:7]), ("lora_muon", 2, RATES[2:7])),
    )
    return dataclasses.replace(configs.QUICK, long_study=s)


def _proxy_results(grid: configs.Grid, optimum: dict[str, float], seeds) -> dict:
    runs = {}
    for cfg in planning.plan_section("proxy", grid, {}):
        if cfg.seed in seeds:
            loss = 2.0 + 0.1 * math.log2(cfg.lr / optimum[cfg.method]) ** 2 + cfg.seed * 1e-3
            runs[cfg.key()] = {"config": cfg.as_dict(), "val_loss": loss, "status": "ok"}
    return {"runs": runs}


def test_report_shows_the_proxy_test_once_the_data_exists(tmp_path):
    from benchmarks.study import report_proxy

    grid = _proxy_grid()
    head = {"source": "x", "commit": None}

    def section(data) -> str:
        rep = report.Report(Results(data), tmp_path / "p.md", tmp_path / "p", grid, head=head)
        report_proxy.section_proxy(rep)
        return "\n".join(rep.lines)

    assert "Not yet run (0 runs of 40)." in section({"runs": {}})
    optimum = {"dense_muon": 0.0125, "lora_muon": 0.0125}
    two = section(_proxy_results(grid, optimum, seeds=(0, 1)))
    assert "Not yet run (20 runs of 40)." in two  # below three paired seeds
    text = section(_proxy_results(grid, optimum, seeds=(0, 1, 2)))
    assert "| LoRA-Muon r=2 | 3 | 0.0125 [0.0125, 0.0125] |" in text
    assert "**shown**" in text and "(partial: 30 runs of 40)" in text
    assert (tmp_path / "p" / "proxy.png").stat().st_size > 1000


def test_study_modules_import_no_cycle():
    """The study's modules form no import cycle (function-level imports included)."""
    import ast

    folder = Path(report.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in folder.glob("*.py"):
        tree = ast.parse(path.read_text())
        skip = {
            id(n)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)
        }
        deps = set()
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.ImportFrom | ast.Import):
                continue
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            if isinstance(node, ast.ImportFrom) and node.module == "benchmarks.study":
                names = [f"benchmarks.study.{a.name}" for a in node.names]
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            deps |= {n.rsplit(".", 1)[-1] for n in names if n.startswith("benchmarks.study.")}
        graph[path.stem] = deps

    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for d in sorted(graph.get(m, ())):
            assert state.get(d) != 1, " -> ".join([*stack, m, d])
            if d not in state:
                visit(d, [*stack, m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


# ----------------------------------------------------------------------------- claim table

CLAIM_LRS = (0.0125, 0.025, 0.05, 0.1)
SEED_SHIFT = (0.0, 0.01, -0.01)  # each seed's offset: a seed spread of 0.01


def _claims_grid() -> configs.Grid:
    curves = tuple(
        (m, r, CLAIM_LRS) for m, r in (("dense_muon", None), ("lora_muon", 2), ("lora_muon", 4))
    )
    budget = dataclasses.replace(configs.QUICK_LONG.budget, steps=40)  # not QUICK's budget
    long = dataclasses.replace(configs.QUICK_LONG, budget=budget, seeds=(0, 1, 2), curves=curves)
    return dataclasses.replace(
        configs.QUICK, seeds=(0, 1, 2), headline_ranks=(2, 4), ranks=(2, 4), long=long
    )


def _claim_runs(base: RC, curves: dict, seeds=(0, 1, 2)) -> dict:
    """Parabolas in log₂ η: ``curves`` maps (method, rank) to (optimum, lowest loss)."""
    runs = {}
    for (method, rank), (opt, floor) in curves.items():
        for lr in CLAIM_LRS:
            for seed in seeds:
                cfg = dataclasses.replace(base, method=method, rank=rank, lr=lr, seed=seed)
                loss = floor + 0.1 * math.log2(lr / opt) ** 2 + SEED_SHIFT[seed]
                runs[cfg.key()] = {"config": cfg.as_dict(), "val_loss": loss, "status": "ok"}
    return runs


def _short_base(grid: configs.Grid) -> RC:
    return RC("dense_muon", 0.0, 0, None, width=grid.width, depth=grid.depth, budget=grid.budget)


def _claims(runs: dict, grid: configs.Grid) -> dict:
    from benchmarks.study import report_claims

    rows = report_claims.claims(Results({"runs": runs}), grid)
    return {r.claim.split(" (")[0]: r for r in rows}


def test_claim_rows_follow_the_data_and_wait_for_missing_sections():
    grid = _claims_grid()
    short = {("dense_muon", None): (0.025, 2.0), ("lora_muon", 2): (0.025, 2.2)}
    # Rank 4 (the grid's largest headline rank) ahead of dense Muon by 0.05 on every seed.
    runs = _claim_runs(_short_base(grid), {**short, ("lora_muon", 4): (0.025, 1.95)})
    rows = _claims(runs, grid)
    top = rows["Rank 4 beats dense Muon"]
    assert top.short.verdict == "reproduced", top
    assert "-0.050 (1.950 vs 2.000; per seed -0.050, -0.050, -0.050" in top.short.ours
    # No long-budget run yet: every long cell says how far its section got.
    assert "section (vii): pending: section (vii), 0 of 36 runs" in top.long.ours
    assert "section (ix): pending: section (ix), 0 of" in top.long.ours
    assert top.long.verdict == "(vii) pending; (ix) pending"
    shape = rows["LoRA-Muon's best rate transfers across width and depth"]
    assert shape.long.verdict == "pending" and "pending: section (x), 0 of" in shape.long.ours
    spectron = rows["Spectron is not gauge invariant"]
    assert "(xi), at Spectron's own best rate: pending: section (xi), 0 of" in spectron.long.ours
    assert rows["LoRA-Muon's best rate transfers across rank"].short.verdict == "reproduced"
    assert rows["The rank-2 proxy's best rate is dense Muon's"].short.verdict == "reproduced"

    # The same row flips when the data contradict the claim: rank 4 behind by 0.05 ...
    runs = _claim_runs(_short_base(grid), {**short, ("lora_muon", 4): (0.025, 2.05)})
    assert _claims(runs, grid)["Rank 4 beats dense Muon"].short.verdict == "not reproduced"
    # ... and cannot tell within the seed spread (0.01).
    runs = _claim_runs(_short_base(grid), {**short, ("lora_muon", 4): (0.025, 1.995)})
    assert _claims(runs, grid)["Rank 4 beats dense Muon"].short.verdict == (
        "inconclusive at this power"
    )


def test_long_budget_claims_are_judged_on_section_vii_own_seeds():
    grid = _claims_grid()
    short = {("dense_muon", None): (0.025, 2.0), ("lora_muon", 2): (0.025, 2.2)}
    runs = _claim_runs(_short_base(grid), {**short, ("lora_muon", 4): (0.025, 1.95)})
    # Long budget: rank 4 loses by 0.05 on every seed; rank 2's optimum is 8× below
    # rank 4's and half dense Muon's.
    long = {
        ("dense_muon", None): (0.025, 1.7),
        ("lora_muon", 2): (0.0125, 2.1),
        ("lora_muon", 4): (0.1, 1.75),
    }
    base = planning.long_base(grid)
    runs.update(_claim_runs(base, long))
    # A later section's extra seed at an extra rate must not shrink section (vii) to it.
    extra = dataclasses.replace(base, method="dense_muon", lr=0.0125 * 2**0.5, seed=3)
    runs[extra.key()] = {"config": extra.as_dict(), "val_loss": 1.0, "status": "ok"}
    rows = _claims(runs, grid)
    top = rows["Rank 4 beats dense Muon"]
    assert top.short.verdict == "reproduced"
    assert top.long.verdict == "(vii) not reproduced; (ix) pending"
    assert "+0.050 (1.750 vs 1.700; per seed +0.050, +0.050, +0.050; spread 0.010; n=3)" in (
        top.long.ours
    )
    assert rows["LoRA-Muon's best rate transfers across rank"].long.verdict == "not reproduced"
    proxy = rows["The rank-2 proxy's best rate is dense Muon's"]
    # Dense Muon at the rank-2 optimum costs 0.1 nats, ten seed spreads.
    assert proxy.long.verdict == "(vii) not reproduced; (viii) pending"
    assert "dense Muon at rank 2's rate +0.100 nats (spread 0.010); n=3" in proxy.long.ours


def test_decay_claim_costs_dense_muon_rank_2s_best_decay():
    from benchmarks.study import report_claims
    from benchmarks.study.aggregate import Point

    def pts(losses_by_wd):
        return {
            wd: Point(0.05, (v - 0.01, v, v + 0.01), (0, 1, 2)) for wd, v in losses_by_wd.items()
        }

    # Golden values by hand: the spread is the sample std of (v-0.01, v, v+0.01) = 0.01.
    dense = pts({0.0: 2.00, 0.1: 1.95, 0.3: 1.99})
    same = report_claims.decay_cell(dense, pts({0.0: 2.3, 0.1: 2.2, 0.3: 2.25}))
    assert same == (
        "best λ: dense Muon 0.1, rank 2 0.1; dense Muon at rank 2's λ +0.000 "
        "nats (spread 0.010); n=3",
        "reproduced",
    )
    far = report_claims.decay_cell(dense, pts({0.0: 2.3, 0.1: 2.25, 0.3: 2.2}))
    assert far.verdict == "not reproduced" and "+0.040 nats" in far.ours
    near = report_claims.decay_cell(
        pts({0.0: 2.0, 0.1: 1.985, 0.3: 1.97}), pts({0.1: 2.2, 0.3: 2.3})
    )
    assert near.verdict == "inconclusive at this power" and "+0.015 nats" in near.ours


def test_gauge_claims_compare_the_paired_change_with_the_seed_spread():
    from benchmarks.study import report_claims

    base = _curve({0.05: [2.0, 2.01, 1.99]})
    same = _curve({0.05: [2.0 + 1e-5, 2.01, 1.99 - 1e-5]})
    moved = _curve({0.05: [2.02, 2.03, 2.0]})
    cell = report_claims.gauge_cell(base, same, 0.05, True, "at")
    assert cell.verdict == "reproduced" and cell.ours.startswith("+0.0e+00 (max abs 1.0e-05")
    assert report_claims.gauge_cell(base, moved, 0.05, True, "at").verdict == "not reproduced"
    cell = report_claims.gauge_cell(base, moved, 0.05, False, "at", paper=-0.02)
    assert cell.verdict == "reproduced" and "the opposite sign to the paper's" in cell.ours
    assert report_claims.gauge_cell(base, same, 0.05, False, "at").verdict == "not reproduced"
    one = _curve({0.05: [2.0]})
    assert report_claims.gauge_cell(one, _curve({0.05: [2.1]}), 0.05, False, "at") is None


def test_claim_section_states_its_rules_and_what_runs_are_matched_on(tmp_path):
    from benchmarks.study import report_claims

    grid = _claims_grid()
    rep = report.Report(
        Results({"runs": {}}), tmp_path / "c.md", tmp_path / "c", grid, head={"source": "x"}
    )
    report_claims.section_claims(rep)
    text = "\n".join(rep.lines)
    assert text.count("\n| ") == 1 + 7  # the header and one row per claim
    assert "secondary source" in text and "step- and token-matched" in text
    assert "not compute-matched" in text


def test_on_seeds_keeps_a_section_s_seeds_while_another_section_adds_rates():
    runs = {(lr, s): {"val_loss": 2.0 + s} for lr in (0.01, 0.02) for s in (0, 1, 2)}
    runs[(0.014, 0)] = runs[(0.014, 1)] = runs[(0.014, 5)] = {"val_loss": 1.0}
    c = Curve(RC("dense_muon", 0.0, 0, None), runs)
    assert c.best().seeds == (0, 1)  # complete(): the seeds that ran everywhere
    mine = c.on_seeds((0, 1, 2), (0.01, 0.02))
    assert mine.best().seeds == (0, 1, 2) and {lr for lr, _ in mine.runs} == {0.01, 0.02}
    # A section that has not run its own grid yet: the seeds that ran every rate.
    partial = {k: v for k, v in runs.items() if k != (0.02, 2)}
    assert Curve(c.cfg, partial).on_seeds((0, 1, 2), (0.01, 0.02)).seeds() == 2


def test_discussion_puts_a_contradicted_rank_claim_under_disagrees():
    grid = _claims_grid()
    short = {("dense_muon", None): (0.025, 2.0), ("lora_muon", 2): (0.025, 2.2)}
    # A tie at the short budget, and rank 4 behind by 0.05 at the long one.
    runs = _claim_runs(_short_base(grid), {**short, ("lora_muon", 4): (0.025, 2.0)})
    long = {**short, ("lora_muon", 4): (0.025, 2.05)}
    runs.update(_claim_runs(planning.long_base(grid), long))
    text = "\n".join(discussion.discussion(Results({"runs": runs}), grid))
    agrees, disagrees = text.split("**Disagrees with the paper.**")
    assert "*Rank 4 vs dense Muon*" not in agrees
    bullet = next(line for line in disagrees.splitlines() if "*Rank 4 vs dense Muon*" in line)
    assert "rank 4 ties dense Muon" in bullet and "inconclusive at this power" in bullet
    assert "rank 4 trails dense Muon by 0.050" in bullet and "+0.050, +0.050, +0.050" in bullet
    assert "seed by seed: +0.050, +0.050, +0.050: **not reproduced**." in bullet
    assert "(section ix): pending: section (ix), 0 of" in bullet
    assert bullet.endswith("runs: **pending**.")


def test_setup_names_the_rebuild_command_and_the_recorded_hours(tmp_path):
    from benchmarks.study import report_intro

    cfg = RC("dense_muon", 0.01, 0, None).as_dict()
    runs = {
        str(i): {"config": cfg, "status": "ok", "val_loss": 2.0, "wall_s": 1800.0, "compile_s": 0}
        for i in range(3)
    }
    rep = report.Report(
        Results({"runs": runs}), tmp_path / "c.md", tmp_path / "c", _claims_grid(), head={}
    )
    assert report_intro._recorded_hours(rep) == pytest.approx(1.5)
    assert "--only all --results new.json" in report_intro.REBUILD


def test_readme_study_block_is_the_committed_results():
    """The README's claim table is exactly what ``benchmarks.study.report`` renders."""
    from benchmarks.study import report_claims

    data = _committed()
    res = Results(data)
    block = report_claims.readme_block(
        report_claims.claims(res, report.grid_of(data)), len(data["runs"])
    )
    readme = report.README.read_text()
    begin, end = report_claims.README_BEGIN, report_claims.README_END
    got = readme[readme.index(begin) : readme.index(end) + len(end)]
    assert got == report_claims.replace_readme_block(f"{begin}{end}", block), (
        "README's study block differs from the committed results: "
        "run python -m benchmarks.study.report"
    )
