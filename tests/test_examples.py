"""The examples and the Colab notebook run end to end, on tiny settings.

They need TinyShakespeare on disk (CI sets ``$LORA_MUON_JAX_DATA``); without it these
tests skip rather than reach for the network.
"""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import optax
import pytest

from lora_muon_jax_examples import tinyshakespeare as data

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
NOTEBOOK = ROOT / "notebooks" / "quickstart.ipynb"
# Tiny runs are dominated by XLA compile time; LLVM optimisation buys nothing there
# (the same flags as tests/conftest.py, without its 8 host devices).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
TINY = [
    "--width",
    "32",
    "--depth",
    "1",
    "--heads",
    "2",
    "--batch",
    "8",
    "--seq-len",
    "32",
]
LOG_VOCAB = math.log(65)  # the loss of a uniform prediction


@pytest.fixture(scope="module")
def corpus_env():
    """Environment for subprocesses: the corpus location, one plain CPU device."""
    try:
        data.load_tinyshakespeare(download=False)
    except FileNotFoundError:
        pytest.skip(f"TinyShakespeare not on disk; set ${data.DATA_ENV_VAR}")
    # One CPU device, as a user would run them (not the suite's 8 fake devices).
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    if data.DATA_ENV_VAR not in env:  # found in the user cache: pass it on explicitly
        env[data.DATA_ENV_VAR] = str(data.default_cache_dir())
    return env


def _run(script: str, args: list[str], env: dict) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def test_quickstart(tmp_path, corpus_env):
    out = tmp_path / "out"
    proc = _run(
        "quickstart.py",
        [
            "--steps",
            "30",
            "--rank",
            "4",
            "--eval-batches",
            "2",
            "--sample-chars",
            "40",
            "--out",
            str(out),
            *TINY,
        ],
        corpus_env,
    )
    rows = dict(
        re.findall(
            r"^(lora_muon|adamw)\s+([\d.]+\s+[\d.]+\s+[\d.]+\s+[\d.]+)$",
            proc.stdout,
            flags=re.M,
        )
    )
    assert "train loss" in proc.stdout and set(rows) == {"lora_muon", "adamw"}, proc.stdout
    results = json.loads((out / "results.json").read_text())["results"]
    for name, r in results.items():
        table = [float(v) for v in rows[name].split()]
        assert table[:2] == pytest.approx([r["train_loss"], r["val_loss"]], abs=6e-4)
        # Both runs learn: from the uniform-prediction loss to well below it.
        assert r["first_loss"] == pytest.approx(LOG_VOCAB, abs=1e-3)
        assert r["val_loss"] < LOG_VOCAB - 0.5, (name, r)
        assert r["step_ms"] > 0
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "loss.png").stat().st_size > 10_000
    for name in results:
        assert f"--- {name} sample ---\nROMEO:\n" in proc.stdout
    assert "lora_muon" in proc.stderr and "step" in proc.stderr  # the tqdm bar


def test_finetune_nnx(corpus_env):
    proc = _run(
        "finetune_nnx.py",
        [
            "--pretrain-steps",
            "15",
            "--steps",
            "15",
            "--rank",
            "2",
            "--log-every",
            "5",
            *TINY,
        ],
        corpus_env,
    )
    base = float(re.search(r"pretrained dense base: .* val loss ([\d.]+)", proc.stdout)[1])
    start = float(re.search(r"zero-init adapters: +val loss ([\d.]+)", proc.stdout)[1])
    final = re.search(
        r"fine-tuned: val loss ([\d.]+) -> ([\d.]+); frozen base unchanged: (\w+)",
        proc.stdout,
    )
    assert final is not None, proc.stdout
    assert start == base  # b = 0: adapters start as the identity change
    assert float(final[2]) < start - 0.02, proc.stdout
    assert final[3] == "True"
    assert len(re.findall(r"^step +\d+ +train loss", proc.stdout, flags=re.M)) == 3


def test_schedule_logs_the_rate_each_step_used(corpus_env):
    steps, warmup, peak = 12, 3, 0.1
    proc = _run(
        "schedule.py",
        [
            "--steps",
            str(steps),
            "--warmup",
            str(warmup),
            "--peak-lr",
            str(peak),
            "--rank",
            "2",
            "--log-every",
            "1",
            *TINY,
        ],
        corpus_env,
    )
    rows = [
        tuple(float(v) for v in m)
        for m in re.findall(r"^ +(\d+) +([\d.]+) +([\d.]+) +([\d.]+)$", proc.stdout, flags=re.M)
    ]
    assert [int(r[0]) for r in rows] == list(range(steps)), proc.stdout
    schedule = optax.warmup_cosine_decay_schedule(0.0, peak, warmup, steps, 0.05 * peak)
    for step, lr, adam_lr, _ in rows:
        assert lr == pytest.approx(float(schedule(int(step))), abs=1e-5)
        assert adam_lr == pytest.approx(lr / 10, abs=1e-6)  # peaks 0.1 and 1e-2
    assert rows[-1][3] < rows[0][3] - 0.3


def _kernel_spec_dir(tmp_path: Path) -> Path:
    """A kernelspec that runs ipykernel on this very interpreter (venv-proof)."""
    spec = tmp_path / "jupyter" / "kernels" / "lora-muon-jax-test"
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(
        json.dumps(
            {
                "argv": [
                    sys.executable,
                    "-m",
                    "ipykernel_launcher",
                    "-f",
                    "{connection_file}",
                ],
                "display_name": "lora_muon_jax tests",
                "language": "python",
            }
        )
    )
    return tmp_path / "jupyter"


def test_notebook_has_badge_guarded_install_and_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert "colab.research.google.com/assets/colab-badge.svg" in nb.cells[0].source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert 'find_spec("lora_muon_jax") is None' in code[0].source
    assert "pip install" in code[0].source


# Jupyter's client libraries emit deprecation warnings of their own; not our concern.
@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PendingDeprecationWarning")
def test_notebook_runs_sharded_on_8_cpu_devices(tmp_path, corpus_env, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    settings = {
        "STEPS": "12",
        "WIDTH": "32",
        "DEPTH": "1",
        "RANK": "4",
        "SEQ_LEN": "32",
        "BATCH": "16",
    }
    for name, value in settings.items():
        monkeypatch.setenv(f"LORA_MUON_JAX_NB_{name}", value)
    monkeypatch.setenv(data.DATA_ENV_VAR, corpus_env[data.DATA_ENV_VAR])
    monkeypatch.setenv("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {FAST_COMPILE}")
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("JUPYTER_PLATFORM_DIRS", "1")  # silences a jupyter_core deprecation
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec_dir(tmp_path)))
    monkeypatch.setenv("PYDEVD_DISABLE_FILE_VALIDATION", "1")

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        nb,
        timeout=300,
        kernel_name="lora-muon-jax-test",
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()
    text = "".join(
        o.get("text", "")
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
        if o.output_type == "stream"
    )
    summary = json.loads(re.search(r"^SUMMARY (.*)$", text, flags=re.M)[1])
    assert summary["backend"] == "cpu" and summary["devices"] == 8
    assert summary["batch_spec"] == ["data"], summary  # the batch is split over devices,
    assert summary["param_spec"] == [], summary  # the parameters replicated
    for name in ("lora_muon", "adamw"):
        assert summary[name]["last"] < summary[name]["first"] - 0.3, summary
        assert summary[name]["val"] < LOG_VOCAB, summary
    assert any(
        o.output_type == "display_data" and "image/png" in o.get("data", {})
        for c in nb.cells
        if c.cell_type == "code"
        for o in c.outputs
    )  # inline plot


def test_peft_export(tmp_path):
    """Fine-tunes a PEFT-named adapter with lora_muon and writes PEFT's two files."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=FAST_COMPILE)
    out = tmp_path / "adapter"
    proc = _run("peft_export.py", ["--out", str(out), "--steps", "30"], env)
    first, last = map(float, re.search(r"loss ([\d.]+) -> ([\d.]+)", proc.stdout).groups())
    assert last < 0.2 * first, proc.stdout
    assert "read back bit-identical: True" in proc.stdout
    files = sorted(p.name for p in out.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 4, 8.0)
