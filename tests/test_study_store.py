"""The study's results file survives SIGKILL: no finished run is lost, the JSON stays valid.

Two kills: (1) a writer process hammering ``record_run`` with large records is
killed at random instants, many of them in the middle of a write; (2) a real
``--quick`` sweep is killed after some runs finished, then resumed to completion.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks.study import configs, planning, store
from benchmarks.study import lr_transfer as lt
from lora_muon_jax_examples import tinyshakespeare as data

REPO = Path(__file__).resolve().parents[1]

WRITER = """
import sys
from pathlib import Path
from benchmarks.study.store import record_run
path = Path(sys.argv[1])
pad = "x" * 200_000  # a ~1-2 MB file: each write takes a while, kills land mid-write
for i in range(int(sys.argv[2]), 10_000):
    record_run(path, f"run{i}", {"i": i, "pad": pad}, {"writer": "test"})
    print(i, flush=True)
"""


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


def test_sigkill_mid_write_loses_no_finished_run(tmp_path):
    path = tmp_path / "results.json"
    rng = random.Random(0)
    finished: set[str] = set()
    for kill in range(6):
        start = len(finished)
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(path), str(start)],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=REPO,
        )
        # Wait for a first finished write, then kill at a random instant.
        line = proc.stdout.readline()
        assert line, "the writer died before finishing a run"
        time.sleep(rng.uniform(0.0, 0.3))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate()
        assert proc.returncode == -signal.SIGKILL
        # Every run whose record_run returned before the kill.
        finished |= {f"run{int(x)}" for x in (line + out).split()}
        stored = json.loads(path.read_text())  # valid JSON, never a torn file
        assert finished <= set(stored["runs"]), (kill, sorted(finished - set(stored["runs"])))
        assert stored["meta"] == {"writer": "test"}
    # The next writer removes what a killed one left in flight.
    store.record_run(path, "last", {"i": -1}, {})
    assert not list(tmp_path.glob(".results.json.*.tmp"))
    assert set(store.load_results(path)["runs"]) >= finished | {"last"}


def _have_corpus() -> bool:
    try:
        data.load_tinyshakespeare(download=False)
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _have_corpus(), reason="TinyShakespeare not on disk")
def test_killed_sweep_keeps_its_runs_and_resumes(tmp_path):
    path = tmp_path / "results.json"
    args = ["--quick", "--only", "lr", "--results", str(path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.study.lr_transfer", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=_env(),
        cwd=REPO,
    )
    done: list[str] = []
    deadline = time.monotonic() + 120
    while len(done) < 2 and time.monotonic() < deadline:  # two runs finished and recorded
        line = proc.stdout.readline()
        assert line, "the sweep ended before two runs finished"
        if "  ok: " in line:
            done.append(line)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    runs = store.load_results(path)["runs"]
    assert len(runs) >= 2  # each finished run was on disk before the next started
    for key, rec in runs.items():
        assert configs.RunConfig.from_dict(rec["config"]).key() == key
        assert rec["status"] == "ok" and rec["machine"]["backend"] == "cpu"
    before = {k: r["val_loss"] for k, r in runs.items()}

    assert lt.main(args) == 0  # resumes in this process; only the missing runs train
    after = store.load_results(path)["runs"]
    planned = {c.key() for _, c in planning.plan(["lr"], configs.QUICK, after)}
    assert planned == set(after)
    assert {k: after[k]["val_loss"] for k in before} == before  # untouched by the resume


def test_concurrent_writers_lose_nothing(tmp_path):
    """Two processes adding runs to one file at once: the lock serializes them."""
    path = tmp_path / "results.json"
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                WRITER.replace("10_000", str(start + 15)),
                str(path),
                str(start),
            ],
            stdout=subprocess.PIPE,
            text=True,
            env=_env(),
            cwd=REPO,
        )
        for start in (0, 1000)
    ]
    for p in procs:
        p.communicate()
        assert p.returncode == 0
    runs = store.load_results(path)["runs"]
    assert set(runs) == {f"run{i}" for i in (*range(15), *range(1000, 1015))}
    assert oct(path.stat().st_mode & 0o777) == "0o644"
