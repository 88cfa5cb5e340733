"""Study run keys, grids and planning: the committed results must still be found.

Golden keys were produced by the study before it was split into modules (commit
0863aa2, ``benchmarks/study/lr_transfer.py``) and are stored with those runs in
``benchmarks/study/results/lr_transfer.json``.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
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
        d.pop("long_study")  # a file written before the sections after (vii) existed
        assert configs.grid_from_dict(d).long_study == configs.LongStudy()
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


def test_weight_decay_field_keeps_every_existing_key():
    cfg = RC("lora_muon", 0.05, 2, 2)
    assert "weight_decay" not in cfg.as_dict()  # None: left out of the key
    assert dataclasses.replace(cfg, weight_decay=0.0) == cfg  # 0 is stored as None
    assert dataclasses.replace(cfg, weight_decay=0.0).key() == "741868173aebe801"
    wd = dataclasses.replace(cfg, weight_decay=0.1)
    assert wd.key() != cfg.key() and wd.curve() != cfg.curve()
    assert RC.from_dict(json.loads(json.dumps(wd.as_dict()))) == wd
    assert configs.describe(wd).endswith("wd=0.1")


def test_sqrt2_grid_shares_the_x2_grid_rates_bit_for_bit():
    half = configs.lr_grid_sqrt2(-4, 4)
    assert len(half) == 9 and half[0] == 0.003125 and half[-1] == 0.05
    assert half[::2] == configs.lr_grid(-2, 2)  # the runs of section (vii) are reused
    np.testing.assert_allclose(np.diff(np.log2(half)), 0.5)


def _runs(cfgs, loss) -> dict:
    return dict(_fake(c, loss(c)) for c in cfgs)


def test_proxy_section_plans_paired_seeds_first_and_reuses_section_vii():
    s = configs.FULL.long_study
    plan = planning.plan_section("proxy", configs.FULL, {})
    assert len(plan) == len(s.proxy_curves) * 9 * len(s.proxy_seeds) == 270
    assert [c.seed for c in plan] == sorted(c.seed for c in plan)  # seed-major
    assert {(c.method, c.rank) for c in plan} == {
        ("dense_muon", None),
        ("lora_muon", 2),
        ("lora_muon", 32),
    }
    assert all(c.budget == configs.LongGrid().budget and c.width == 64 for c in plan)
    # Section (vii)'s runs at the even √2 rates are this section's runs (seeds 0-2):
    # the same configurations, so the same keys (independent of what has run).
    long_keys = {c.key() for c in planning.plan_section("long", configs.FULL, {})}
    assert len({c.key() for c in plan} & long_keys) == 3 * 3 * 5  # the 5 rates both grids hold


def test_proxy_edges_extend_by_sqrt2():
    g = dataclasses.replace(
        configs.QUICK_LONG_STUDY,
        proxy_seeds=(0,),
        proxy_curves=(("dense_muon", None, (0.1, 0.1 * 2**0.5)),),
        extend=1,
    )
    grid = dataclasses.replace(configs.QUICK, long_study=g)
    first = planning.plan_section("proxy", grid, {})
    res = _runs(first, lambda c: 3.0 - c.lr)  # the upper edge wins
    lrs = [c.lr for c in planning.plan_section("proxy", grid, planning.index_results(res))]
    assert lrs == pytest.approx([0.1, 0.1 * 2**0.5, 0.2])


def _long_study_grid(**changes) -> configs.Grid:
    g = dataclasses.replace(configs.QUICK_LONG_STUDY, **changes)
    return dataclasses.replace(
        configs.QUICK, long=dataclasses.replace(configs.QUICK_LONG, seeds=(0, 1)), long_study=g
    )


def test_weight_decay_waits_for_the_proxy_curve_then_runs_at_its_best_rate():
    grid = _long_study_grid(
        proxy_seeds=(0, 1),
        proxy_curves=(("lora_muon", 2, (0.05, 0.2)),),
        decay_curves=(("lora_muon", 2),),
        decays=(0.1, 1.0),
    )
    proxy = planning.plan_section("proxy", grid, {})
    res = _runs(proxy[:-1], lambda c: 3.0 if c.lr == 0.05 else 2.0)
    assert planning.plan_section("wd_long", grid, planning.index_results(res)) == []
    res.update(_runs(proxy[-1:], lambda c: 2.0))  # complete: 0.2 wins
    plan = planning.plan_section("wd_long", grid, planning.index_results(res))
    assert {(c.lr, c.weight_decay, c.seed) for c in plan} == {
        (0.2, wd, s) for wd in (None, 0.1, 1.0) for s in (0, 1)
    }
    zero = [c for c in plan if c.weight_decay is None]
    assert {c.key() for c in zero} <= set(res)  # λ = 0 is the proxy run itself


def test_peers_gauge_study_runs_at_the_gauge_methods_own_best_rate():
    grid = _long_study_grid(peer_curves=(("spectron", 2, (0.05, 0.2)), ("riemannion", 2, (0.1,))))
    s = grid.long_study
    curves = planning.plan_section("peers_long", grid, {})
    assert len(curves) == 3 * 2 and planning.peer_gauge_lr(grid, {}) is None
    res = _runs(curves, lambda c: 2.0 if c.lr == 0.05 else 3.0)
    plan = planning.plan_section("peers_long", grid, planning.index_results(res))
    gauge = [c for c in plan if c.key() not in res]
    assert {(c.method, c.gauge, c.lr, c.rank) for c in gauge} == {
        ("spectron", s.gauge, 0.05, 2),
        ("lora_muon", 1.0, 0.05, 2),
        ("lora_muon", s.gauge, 0.05, 2),
    }
    assert len(gauge) == 3 * 2  # every seed


def test_sections_after_vii_are_listed_and_ordered():
    assert configs.LONG_STUDY_SECTIONS[0] == "proxy"
    assert set(configs.LONG_STUDY_SECTIONS) <= set(configs.ALL_SECTIONS)
    assert set(configs.LONG_STUDY_SECTIONS).isdisjoint(configs.SECTIONS)  # only with --only
    for name in configs.LONG_STUDY_SECTIONS:
        assert name in configs.SECTION_TITLES
