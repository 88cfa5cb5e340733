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

from benchmarks.study import configs, discussion, report, report_long, transfer
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
