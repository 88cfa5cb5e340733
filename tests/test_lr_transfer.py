"""The learning-rate transfer study tool: caching, resuming, divergence, planning, report.

The full sweep is not run here (hours); ``--quick`` (every section and method on a
tiny model) is, through the CLI entry point, with a temporary results file.
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import registry
from benchmarks.study import (
    configs,
    params,
    planning,
    report,
    report_proxy,
    store,
    training,
    version,
)
from benchmarks.study import lr_transfer as lt
from benchmarks.study.aggregate import Results
from lora_muon_jax_examples import tinyshakespeare as data


def _have_corpus() -> bool:
    try:
        data.load_tinyshakespeare(download=False)
    except FileNotFoundError:
        return False
    return True


needs_corpus = pytest.mark.skipif(
    not _have_corpus(), reason=f"TinyShakespeare not on disk; set ${data.DATA_ENV_VAR}"
)


@needs_corpus
def test_quick_sweep_caches_resumes_diverges_and_reports(tmp_path, capsys):
    """``--quick`` end to end (every section, all methods), as CI runs it."""
    path = tmp_path / "results.json"
    quick = ["--quick", "--results", str(path)]
    assert lt.main([*quick, "--max-runs", "3"]) == 0
    assert len(store.load_results(path)["runs"]) == 3
    assert lt.main(quick) == 0  # resumes: only the missing runs
    first = store.load_results(path)
    sections = configs.SECTIONS + ("long_pilot", "long", *configs.LONG_STUDY_SECTIONS)
    planned = planning.plan(sections, configs.QUICK, first["runs"])
    assert {cfg.key() for _, cfg in planned} == set(first["runs"])
    # The quick long section shares the quick budget and model: every one of its runs
    # is also a run of an earlier section (planned once, under that section). The
    # sections after it add more seeds, a wider model and weight decay.
    owners = {s for s, _ in planned}
    assert owners - set(configs.SECTIONS) == {"proxy", "width128", "wd_long"}
    assert "grid" in first["meta"]
    index = planning.index_results(first["runs"])
    assert {c.key() for c in planning.plan_section("long", configs.QUICK, index)} <= set(
        first["runs"]
    )
    assert lt.main(quick) == 0  # nothing left to do
    assert store.load_results(path)["runs"] == first["runs"]
    assert "0 new runs" in capsys.readouterr().out

    steps = configs.QUICK.budget.steps
    methods = set()
    for key, rec in first["runs"].items():
        cfg = configs.RunConfig.from_dict(rec["config"])
        assert cfg.key() == key and cfg.budget.steps == steps
        assert rec["machine"]["backend"] == "cpu" and rec["machine"]["cores"] >= 1
        assert rec["code"] == version.code_version()  # every run names its code
        methods.add(cfg.method)
        assert rec["status"] == "ok", rec
        assert rec["diverged_step"] is None and rec["steps_run"] == steps
        # A few steps of training: finite, below the uniform prediction log(65) + margin.
        assert 1.5 < rec["val_loss"] < math.log(65) + 0.05
        assert len(rec["curve"]) == cfg.budget.chunks
        if cfg.method in ("lora_muon", "spectron") and cfg.task == "pretrain":
            # Native pairs start balanced; a gauge c moves log(σa/σb) by 2 log c.
            assert rec["log_norm_ratio"]["init_mean_abs"] == pytest.approx(
                2 * math.log(cfg.gauge), abs=1e-3
            )
        if cfg.task == "finetune":
            assert rec["base_task_val_loss"] > rec["base_val_loss"]  # the task is shifted
    expected = {
        "dense_muon",
        "lora_muon",
        "spectron",
        "adamw_lora",
        "dense_muon_optax",
        "lora_rite",
        "riemannion",
        "lora_pre_muon",
        "limuon",
    }
    expected |= {"psgd_kron"} if registry.available("psgd_kron") else set()
    assert methods == expected
    # The long section ran its gauge pair at rank 2's best rate: LoRA-Muon is gauge
    # invariant (float32 rounding only), Spectron is not.
    grid = configs.grid_from_dict(first["meta"]["grid"])
    assert grid == configs.QUICK
    lr = planning.gauge_lr(grid, planning.index_results(first["runs"]))
    long = {
        (c.method, c.gauge): first["runs"][c.key()]["val_loss"]
        for c in planning.plan_section("long", grid, planning.index_results(first["runs"]))
        if c.rank == 2 and c.lr == lr and c.method in ("lora_muon", "spectron")
    }
    assert long[("lora_muon", 9.0)] == pytest.approx(long[("lora_muon", 1.0)], abs=2e-3)
    assert long[("spectron", 9.0)] != long[("spectron", 1.0)]
    # Weight decay ran at each method's best proxy rate, and changed the run.
    index = planning.index_results(first["runs"])
    for method, rank in grid.long_study.decay_curves:
        lr = planning.decay_lr(grid, index, method, rank)
        decayed = [
            first["runs"][c.key()]["val_loss"]
            for c in planning.plan_section("wd_long", grid, index)
            if c.method == method and c.lr == lr
        ]
        assert len(decayed) == 1 + len(grid.long_study.decays) and len(set(decayed)) > 1
    # The proxy test's statistics, on its three paired seeds.
    found = report_proxy.tests(Results(first), grid)
    assert set(found) == {("lora_muon", 2)} and found[("lora_muon", 2)].n == 3

    # A run that blows up is a result, with its step, not an exception; the compiled
    # trainer is reused (the rate is traced).
    cfg = next(c for c in planning.plan_section("lr", grid, {}) if c.method == "lora_muon")
    rec = training.run_config(dataclasses.replace(cfg, lr=1e30))
    assert rec["status"] == "diverged" and rec["val_loss"] is None
    assert 0 < rec["diverged_step"] < steps and rec["train_loss"] is None
    chunk = steps // grid.budget.chunks
    # Stopped at the end of the chunk where it diverged; no new compilation.
    assert rec["steps_run"] == chunk * (rec["diverged_step"] // chunk + 1)
    assert rec["compile_s"] == 0
    store.record_run(path, cfg.key() + "x", {**rec, "config": cfg.as_dict() | {"lr": 1e30}}, {})
    assert (
        store.load_results(path)["runs"][cfg.key() + "x"]["diverged_step"] == rec["diverged_step"]
    )

    out = tmp_path / "docs" / "lr_transfer.md"
    assert report.main(["--results", str(path), "--out", str(out), "--no-discussion"]) == 0
    text = out.read_text()
    for n in ("i", "ii", "iii", "iv", "v", "vi", "vii", "viii", "ix", "x", "xi", "xii"):
        assert f"## ({n}) " in text

    assert "not run yet" not in text  # every quick curve is in its table
    assert "| LoRA-Muon r=2 |" in text
    # The diverged point is kept: 1 of the r=2 curve's runs (2 rates × the lr section's
    # seed and the proxy section's two more, and the diverged one).
    curve_of = lambda r: configs.RunConfig.from_dict(r["config"]).curve()  # noqa: E731
    same_curve = [r for r in first["runs"].values() if curve_of(r) == cfg.curve()]
    assert len(same_curve) == 6 and f"| 1/{len(same_curve) + 1} |" in text
    for png in ("lr_sweep", "rank", "gauge", "shape", "baselines", "finetune", "long"):
        assert (tmp_path / "docs" / "lr_transfer" / f"{png}.png").stat().st_size > 1000


def _fake(cfg: configs.RunConfig, loss: float | None) -> tuple[str, dict]:
    return cfg.key(), {
        "config": cfg.as_dict(),
        "val_loss": loss,
        "status": "ok" if loss is not None else "diverged",
    }


def test_plan_extends_a_winning_edge_once_per_round():
    grid = dataclasses.replace(
        configs.QUICK, seeds=(0,), spectral_lrs=(0.1, 0.2), headline_ranks=(), extend=2
    )

    def dense(lr):
        return configs.RunConfig(
            "dense_muon", lr, 0, None, width=grid.width, depth=grid.depth, budget=grid.budget
        )

    lrs = lambda res: [  # noqa: E731
        c.lr for c in planning.plan_section("lr", grid, planning.index_results(res))
    ]
    assert lrs({}) == [0.1, 0.2]
    res = dict([_fake(dense(0.1), 3.0), _fake(dense(0.2), 2.0)])
    assert lrs(res) == [0.1, 0.2, 0.4]  # best on the upper edge
    res.update([_fake(dense(0.4), 1.5)])
    assert lrs(res) == [0.1, 0.2, 0.4, 0.8]
    res.update([_fake(dense(0.8), 1.0)])
    assert lrs(res) == [0.1, 0.2, 0.4, 0.8]  # at most `extend` factors of 2 past the grid
    res = dict([_fake(dense(0.1), 2.0), _fake(dense(0.2), None)])
    assert lrs(res) == [0.05, 0.1, 0.2]  # a diverged point never wins
    res = dict([_fake(dense(0.1), 2.0)])
    assert lrs(res) == [0.1, 0.2]  # no extension before the grid is complete


def test_run_keys_cover_the_whole_configuration():
    cfg = configs.RunConfig("lora_muon", 0.05, 1, 8)
    assert configs.RunConfig.from_dict(json.loads(json.dumps(cfg.as_dict()))).key() == cfg.key()
    assert "base_lr" not in cfg.as_dict()  # unset fine-tuning fields stay out of the key
    variants = [
        dataclasses.replace(cfg, lr=0.1),
        dataclasses.replace(cfg, seed=2),
        dataclasses.replace(cfg, rank=None),
        dataclasses.replace(cfg, gauge=3.0),
        dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, steps=201)),
        dataclasses.replace(cfg, budget=dataclasses.replace(cfg.budget, adam_lr=0.02)),
        dataclasses.replace(cfg, task="finetune", base_lr=0.1),
    ]
    keys = {v.key() for v in variants} | {cfg.key()}
    assert len(keys) == len(variants) + 1
    assert cfg.curve() == dataclasses.replace(cfg, lr=0.2, seed=0).curve()
    assert cfg.curve() != dataclasses.replace(cfg, gauge=3.0).curve()


def test_atomic_save_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "r.json"
    store.save_results(path, {"meta": {}, "runs": {"a": {"val_loss": 1.0}}})
    with pytest.raises(ValueError):
        store.save_results(path, {"meta": {}, "runs": {"a": {"val_loss": float("nan")}}})
    assert store.load_results(path)["runs"] == {"a": {"val_loss": 1.0}}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind


def test_schedule_shape():
    b = configs.Budget(steps=100, warmup=0.05, cooldown=0.2)
    s = [float(training.lr_shape(t, b, 100)) for t in (0, 4, 5, 50, 79, 80, 90, 99)]
    np.testing.assert_allclose(s, [0.2, 1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.05], atol=1e-6)


def _tiny_dense(width: int = 16, hidden: int = 16) -> dict:
    """A dense CharTransformer-shaped pure dict (square MLP: one shape to compile)."""
    rng = np.random.default_rng(0)

    def w(m, n):
        return jnp.asarray(rng.normal(size=(m, n)) / np.sqrt(m), jnp.float32)

    block = {
        "attn": {k: {"kernel": w(width, width)} for k in "qkvo"},
        "attn_norm": {"scale": jnp.ones(width)},
        "mlp": {"up": {"kernel": w(width, hidden)}, "down": {"kernel": w(hidden, width)}},
        "mlp_norm": {"scale": jnp.ones(width)},
    }
    return {
        "blocks": {0: block},
        "embed": {"embedding": w(11, width)},
        "head": {"kernel": w(width, 11)},
        "norm": {"scale": jnp.ones(width)},
        "pos": w(8, width),
    }


def _at(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def test_finetune_inits_keep_the_base_function():
    base = _tiny_dense()
    kernels = params.block_kernels(base)
    assert len(kernels) == 6  # q, k, v, o, up, down
    cfg = configs.RunConfig("lora_muon", 0.1, 0, 3, width=16, depth=1, task="finetune", init="zero")
    frozen, adapters = params.finetune_start(cfg, base)
    merged = params.merge_adapters(frozen, adapters)
    for path, w in kernels.items():
        pair = _at(adapters, path)
        assert pair["lora_a"].shape == (w.shape[0], 3) and not np.any(pair["lora_b"])
        np.testing.assert_array_equal(_at(merged, path)["kernel"], w)
    assert "lora_a" not in merged["blocks"][0]["attn"]["q"]  # merged: a plain dense tree

    frozen, adapters = params.finetune_start(dataclasses.replace(cfg, init="balanced"), base)
    merged = params.merge_adapters(frozen, adapters)
    ratios = params.factor_log_ratios(adapters)
    assert ratios.shape == (6,) and np.max(np.abs(ratios)) < 1e-4  # balanced factors
    for path, w in kernels.items():
        pair = _at(adapters, path)
        assert np.all(np.linalg.norm(np.asarray(pair["lora_b"]), axis=1) > 0)  # b is not 0
        # W₀' + a b = W₀: the model is unchanged, the product sits in the base.
        np.testing.assert_allclose(_at(merged, path)["kernel"], w, atol=2e-6)
        assert not np.allclose(_at(frozen, path)["kernel"], w)


# A rank-2 LoRA-Muon run on the smallest model the study builds.
TINY_LORA_MUON = configs.RunConfig(
    "lora_muon",
    0.1,
    0,
    2,
    width=8,
    depth=1,
    budget=configs.Budget(seq_len=4, mlp_ratio=1, heads=2),
)


def test_gauge_rescales_factors_not_the_product():
    cfg = TINY_LORA_MUON
    _, p1 = params.build_params(cfg, 11)
    _, p9 = params.build_params(dataclasses.replace(cfg, gauge=9.0), 11)
    # float64 SVD reference of log σmax(a) − log σmax(b) for one pair.
    q1, q9 = p1["blocks"][0]["attn"]["q"], p9["blocks"][0]["attn"]["q"]
    ref = [
        np.log(np.linalg.norm(np.asarray(q["lora_a"], np.float64), 2))
        - np.log(np.linalg.norm(np.asarray(q["lora_b"], np.float64), 2))
        for q in (q1, q9)
    ]
    r1, r9 = params.factor_log_ratios(p1), params.factor_log_ratios(p9)
    assert r1.shape == (6,) and np.max(np.abs(r1)) < 1e-4  # native pairs start balanced
    np.testing.assert_allclose(r9 - r1, 2 * np.log(9.0), rtol=1e-5)
    np.testing.assert_allclose(ref[1] - ref[0], 2 * np.log(9.0), rtol=1e-6)
    np.testing.assert_allclose(q9["lora_a"] @ q9["lora_b"], q1["lora_a"] @ q1["lora_b"], atol=1e-6)


def test_dense_muon_labels_only_block_matrices():
    tree = _tiny_dense(hidden=64)
    cfg = configs.RunConfig("dense_muon", 0.1, 0, None)
    steps = 100  # shape(0) = 1/5: five warmup steps
    tx = training.make_optimizer(cfg, tree, jnp.float32(0.1), steps)
    grads = jax.tree.map(jnp.ones_like, tree)
    updates, _ = jax.jit(tx.update)(grads, tx.init(tree), tree)
    q = np.asarray(updates["blocks"][0]["attn"]["q"]["kernel"])
    emb = np.asarray(updates["embed"]["embedding"])
    # Muon (Newton–Schulz) on a rank-1 gradient: a rank-1 step of spectral norm ≈ η/5,
    # with no sqrt(fan_out/fan_in) factor (the MLP's up matrix is 16 × 64).
    np.testing.assert_allclose(np.linalg.norm(q, 2), 0.1 / 5, rtol=0.35)
    up = np.asarray(updates["blocks"][0]["mlp"]["up"]["kernel"])
    np.testing.assert_allclose(np.linalg.norm(up, 2), 0.1 / 5, rtol=0.35)
    # AdamW on the embedding, at the fixed rate: every entry moves by adam_lr / 5.
    np.testing.assert_allclose(np.abs(emb), cfg.budget.adam_lr / 5, rtol=1e-3)


def test_weight_decay_shrinks_the_matrices_by_one_minus_lambda_eta():
    tree = _tiny_dense()
    steps, lam, peak = 100, 0.5, 0.1
    cfg = configs.RunConfig("dense_muon", peak, 0, None, weight_decay=lam)
    tx = training.make_optimizer(cfg, tree, jnp.float32(peak), steps)
    zeros = jax.tree.map(jnp.zeros_like, tree)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(tree), tree)
    eta = peak / 5  # the first step of the schedule
    new = optax.apply_updates(tree, updates)
    q = tree["blocks"][0]["attn"]["q"]["kernel"]
    np.testing.assert_allclose(
        new["blocks"][0]["attn"]["q"]["kernel"], (1 - lam * eta) * q, rtol=1e-5
    )
    # The AdamW leaves are not decayed.
    np.testing.assert_array_equal(new["embed"]["embedding"], tree["embed"]["embedding"])
    with pytest.raises(ValueError, match="weight_decay"):
        training.make_optimizer(dataclasses.replace(cfg, method="spectron", rank=2), tree, 0.1, 10)


def test_lora_muon_weight_decay_is_the_split_decay_of_each_product():
    cfg = TINY_LORA_MUON
    _, p = params.build_params(cfg, 11)
    grads = jax.tree.map(lambda x: 0.01 * jnp.ones_like(x), p)
    new = {}
    for wd in (None, 0.5):
        c = dataclasses.replace(cfg, weight_decay=wd)
        tx = training.make_optimizer(c, p, jnp.float32(0.1), 100)
        u, _ = tx.update(grads, tx.init(p), p)
        new[wd] = optax.apply_updates(p, u)["blocks"][0]["attn"]["q"]
    q = p["blocks"][0]["attn"]["q"]
    prod = lambda f: np.asarray(f["lora_a"] @ f["lora_b"])  # noqa: E731
    # (s a + Δa/s)(s b + Δb/s) − (a + Δa)(b + Δb) = −λη a b + O(Δ²): λη = 0.5 · 0.1 / 5.
    np.testing.assert_allclose(prod(new[0.5]) - prod(new[None]), -0.01 * prod(q), atol=2e-4)


def test_a_seed_gives_the_twins_the_same_init_of_their_shared_leaves():
    """Paired seeds: the dense and LoRA twins of a seed start from the same embedding,
    positions and head (their batch stream, ``fold_in(key(seed), 7)``, depends on the
    seed alone)."""
    cfg = configs.RunConfig(
        "dense_muon",
        0.1,
        3,
        None,
        width=8,
        depth=1,
        budget=configs.Budget(seq_len=4, mlp_ratio=1, heads=2),
    )
    _, dense = params.build_params(cfg, 11)
    _, lora = params.build_params(dataclasses.replace(cfg, method="lora_muon", rank=2), 11)
    for path in (("embed", "embedding"), ("pos",), ("head", "kernel")):
        np.testing.assert_array_equal(_at(dense, path), _at(lora, path))
    _, other = params.build_params(dataclasses.replace(cfg, seed=4), 11)
    assert not np.array_equal(other["embed"]["embedding"], dense["embed"]["embedding"])


def test_only_all_plans_every_section():
    from benchmarks.study import lr_transfer
    from benchmarks.study.configs import ALL_SECTIONS

    args = lr_transfer.parse_args(["--only", "all"])
    assert lr_transfer._sections(args) == ALL_SECTIONS
