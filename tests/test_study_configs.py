"""Study run keys, grids and planning: the committed results must still be found.

Golden keys were produced by the study before it was split into modules (commit
0863aa2, ``benchmarks/study/lr_transfer.py``) and are stored with those runs in
``benchmarks/study/results/lr_transfer.json``.
"""

from __future__ import annotations

import dataclasses
import json

import pytest

from benchmarks.study import configs, planning
from benchmarks.study.lr_transfer import DEFAULT_RESULTS

RC = configs.RunConfig
GOLDEN = [
    (RC("dense_muon", 0.0125, 0, None), "2d0bdc15cfcf8a13"),
    (RC("lora_muon", 0.05, 2, 2), "741868173aebe801"),
    (RC("spectron", 0.05, 1, 8, gauge=9.0), "0eef4914b0ac14fe"),
    (
        RC(
            "lora_rite",
            0.00078125,
            0,
            32,
            task="finetune",
            init="balanced",
            base_steps=400,
            base_lr=0.0125,
        ),
        "1f198afdf6c76612",
    ),
    (RC("lora_muon", 0.1, 0, 8, budget=configs.Budget(adam_lr=0.03)), "87f8f3f2d5f01130"),
    (
        RC(
            "lora_muon",
            0.025,
            1,
            2,
            task="finetune",
            init="zero",
            rebalance=10,
            base_steps=400,
            base_lr=0.0125,
        ),
        "1e5d2e6b316c639a",
    ),
]


@pytest.mark.parametrize("cfg, key", GOLDEN)
def test_keys_of_committed_runs_are_unchanged(cfg, key):
    assert cfg.key() == key
    runs = json.loads(DEFAULT_RESULTS.read_text())["runs"]
    assert runs[key]["config"] == json.loads(json.dumps(cfg.as_dict()))


def test_every_committed_record_is_found_under_its_own_key():
    data = json.loads(DEFAULT_RESULTS.read_text())
    for key, rec in data["runs"].items():
        assert RC.from_dict(rec["config"]).key() == key, rec["config"]
    # The short-budget headline sections are complete: their whole plan is on disk.
    index = planning.index_results(data["runs"])
    for section in ("lr", "rank", "gauge"):
        missing = [
            c
            for c in planning.plan_section(section, configs.FULL, index)
            if c.key() not in data["runs"]
        ]
        assert not missing, (section, [configs.describe(c) for c in missing[:3]])


def test_grid_round_trips_through_json_with_and_without_the_long_section():
    for grid in (configs.FULL, configs.QUICK):
        d = json.loads(json.dumps(dataclasses.asdict(grid)))
        assert configs.grid_from_dict(d) == grid
        d.pop("long")  # a file written before the long section existed
        assert configs.grid_from_dict(d).long == configs.LongGrid()


def _fake(cfg: RC, loss: float | None) -> tuple[str, dict]:
    return cfg.key(), {
        "config": cfg.as_dict(),
        "val_loss": loss,
        "status": "ok" if loss is not None else "diverged",
    }


def test_long_gauge_waits_for_the_whole_rank_curve_then_uses_its_best_rate():
    g = dataclasses.replace(
        configs.QUICK_LONG, seeds=(0, 1), extend=0, curves=(("lora_muon", 2, (0.05, 0.2)),)
    )
    grid = dataclasses.replace(configs.QUICK, long=g)
    base = dataclasses.replace(planning.long_base(grid), rank=2)
    losses = {(0.05, 0): 3.0, (0.05, 1): 3.2, (0.2, 0): 3.1}
    res = dict(_fake(dataclasses.replace(base, lr=lr, seed=s), v) for (lr, s), v in losses.items())
    plan = planning.plan_section("long", grid, planning.index_results(res))
    assert all(c.gauge == 1.0 and c.method == "lora_muon" for c in plan)  # seed 1 at 0.2 missing
    assert len(plan) == 4
    res.update([_fake(dataclasses.replace(base, lr=0.2, seed=1), 3.0)])  # 0.2 now wins: 3.05
    plan = planning.plan_section("long", grid, planning.index_results(res))
    gauge = [c for c in plan if c.method == "spectron" or c.gauge != 1.0]
    pairs = {("lora_muon", g.gauge), ("spectron", 1.0), ("spectron", g.gauge)}
    assert {(c.method, c.gauge, c.lr, c.seed) for c in gauge} == {
        (m, c, 0.2, s) for m, c in pairs for s in (0, 1)
    }
    # LoRA-Muon at gauge 1 and the best rate is a run of the sweep itself (listed once).
    keys = [c.key() for _, c in planning.plan(["long"], grid, res)]
    assert len(keys) == len(set(keys))
