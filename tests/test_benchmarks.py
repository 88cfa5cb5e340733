"""Smoke tests of the benchmark harness, so the README's tables stay reproducible."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from benchmarks import common, plots, run, speed, trees


def test_lora_row_times_every_method_and_counts_state():
    row = run.lora_row((1, 16, 12, 2), repeats=1, methods=None, with_dense=True)
    lora = row["lora"]
    assert {"adamw", "lora_muon", "lora_muon_paper"} <= set(lora)
    # LoRA-Muon keeps one momentum per factor; AdamW two moments.
    assert lora["lora_muon"]["state_floats"] == 1 * (16 + 12) * 2
    assert lora["adamw"]["state_floats"] == 2 * (16 + 12) * 2
    assert all(v["median_ms"] > 0 for v in lora.values())
    results = {
        "machine": {
            "cpu": "x",
            "cores": 2,
            "backend": "cpu",
            "device": "cpu",
            "jax": "0",
            "optax": "0",
            "matmul_gflops": 1.0,
            "bandwidth_gbs": 1.0,
        },
        "repeats": 2,
        "targets": [row],
        "sweep_r": [row],
    }
    text = plots.targets_table(results)
    assert "lora_muon" in text and "(÷" in text
    assert "state floats" in plots.memory_table(results)


def test_refuses_configs_that_cannot_fit():
    with pytest.raises(MemoryError, match="needs about .* GiB but only"):
        run.check_fits(64, 1 << 20, 1 << 20, 16, jnp.float32, dense=True)


def test_refuses_nan_runs():
    with pytest.raises(FloatingPointError, match="no timing reported"):
        common.assert_finite({"w": jnp.array([1.0, jnp.nan])}, "demo")


def test_end_to_end_times_a_training_step_of_both_optimizers():
    e = run.end_to_end(2, width=16, depth=1, rank=2, seq_len=8, batch=2)
    assert e["config"]["width"] == 16 and e["batch"] == 2
    assert e["adamw"]["median_ms"] > 0 and e["lora_muon"]["median_ms"] > 0
    assert "LoRA-Muon step ms" in plots.e2e_table({"end_to_end": e})


def test_readme_speed_table_is_the_committed_results():
    """The README's speed block is exactly what the results file renders to."""
    results = json.loads(speed.RESULTS.read_text())
    assert len(results["runs"]) >= 2, "the table must rest on at least two runs"
    readme = speed.README.read_text()
    block = readme[readme.index(speed.BEGIN) : readme.index(speed.END) + len(speed.END)]
    want = speed.replace_block(f"{speed.BEGIN}{speed.END}", speed.render_table(results))
    assert block == want, "README speed table differs from benchmarks/results/speed_cpu.json"


def test_speed_case_measures_donated_and_plain_steps():
    # Large enough that the step counters (a few int32 scalars) are under 1% of the state.
    case = speed.Case("L=1, 64×48, r=4", lambda: trees.lora_tree(1, 64, 48, 4), 448, 2.0)
    row = speed.measure_case(case, repeats=2)
    for name in ("adamw", "lora_muon"):
        assert row[name]["donated_ms"] > 0 and row[name]["plain_ms"] > 0
    assert row["adamw"]["donated_ratio"] == 1.0
    # One momentum per factor against AdamW's two moments.
    assert row["lora_muon"]["state_over_adapter"] == pytest.approx(1.0, abs=0.02)
    assert row["adamw"]["state_over_adapter"] == pytest.approx(2.0, abs=0.02)
    assert row["lora_muon"]["floor_ratio"] > 0


def test_contractions_alone_are_the_steps_grams_and_thin_products():
    # Golden values: numpy float64 Grams and thin products of the same leaves.
    params, grads = trees.lora_tree(1, 64, 48, 4)
    got = speed.contractions_alone(params, grads)()
    a, b = (np.asarray(params[k], np.float64)[0] for k in ("lora_a", "lora_b"))
    ga, gb = (np.asarray(grads[k], np.float64)[0] for k in ("lora_a", "lora_b"))
    ka, kb = ga.T @ ga, gb @ gb.T
    want = [ka, b @ b.T, ga @ ka, kb, a.T @ a, kb @ gb]
    assert len(got) == 6
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g)[0], w, rtol=1e-5, atol=1e-6 * np.abs(w).max())
