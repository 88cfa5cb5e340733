"""Multi-host: two processes of 2 CPU devices each train exactly like one process.

The test starts two copies of ``tests/multihost_worker.py``, each with its own 2
host devices (``XLA_FLAGS``; this suite's 8 are not inherited), joined by JAX's
multi-controller runtime (``jax.distributed.initialize`` on a local coordinator,
gloo collectives over TCP). They build one mesh over the 4 devices, shard the LoRA
factors FSDP-style (``a`` along ``m``, ``b`` along ``n``) and the batch along its
rows, and take ``STEPS`` train steps with LoRA-Muon and each LoRA peer. The
trajectories must equal this process's unsharded run (the same functions on one
device) within 1e-5. Nothing of this library is multi-host specific: that is the
point. A hang (a lost peer, a collective that never completes) fails the test
after ``TIMEOUT_S`` instead of blocking the suite.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests import multihost_worker as worker
from tests.test_sharding import _collectives

ROOT = Path(__file__).resolve().parents[1]
PROCESSES, LOCAL_DEVICES = 2, 2
TIMEOUT_S = 180.0  # the whole run takes 15-60 s, depending on the load


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child_env() -> dict[str, str]:
    flags = re.sub(
        r"--xla_force_host_platform_device_count=\S+", "", os.environ.get("XLA_FLAGS", "")
    )
    return {
        **os.environ,
        "XLA_FLAGS": f"{flags} --xla_force_host_platform_device_count={LOCAL_DEVICES}".strip(),
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }


def _launch(out: Path) -> list[subprocess.Popen]:
    """The processes, their output to ``out/process<i>.log`` (files: no pipe fills up)."""
    port, env = _free_port(), _child_env()
    out.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(PROCESSES):
        with open(out / f"process{i}.log", "w") as log:  # the child keeps its own copy
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        str(ROOT / "tests" / "multihost_worker.py"),
                        f"--process-id={i}",
                        f"--num-processes={PROCESSES}",
                        f"--port={port}",
                        f"--out={out}",
                    ],
                    cwd=ROOT,
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def _wait(procs: list[subprocess.Popen], out: Path, deadline: float) -> list[str]:
    """Every process's output; kills them all and fails if one is still running."""
    hung = None
    for i, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            hung = i
            for p in procs:
                p.kill()
                p.wait()
            break
    outputs = [(out / f"process{i}.log").read_text() for i in range(len(procs))]
    if hung is not None:
        raise AssertionError(
            f"process {hung} still running after {TIMEOUT_S:.0f} s (hung?):\n"
            + "\n---\n".join(text[-3000:] for text in outputs)
        )
    for i, (proc, text) in enumerate(zip(procs, outputs, strict=False)):
        assert proc.returncode == 0, f"process {i} failed ({proc.returncode}):\n{text[-6000:]}"
    return outputs


def test_two_processes_with_two_devices_each_match_one_process(tmp_path):
    began = time.monotonic()
    procs = _launch(tmp_path)
    try:
        want = worker.trajectories(None)  # meanwhile: the single-process reference
    finally:
        outputs = _wait(procs, tmp_path, began + TIMEOUT_S)
    for i, text in enumerate(outputs):
        assert (
            f"process {i}/{PROCESSES}: local devices" in text
            and f"of {PROCESSES * LOCAL_DEVICES}" in text
        ), text

    with np.load(tmp_path / "trajectories.npz") as f:
        got = dict(f)
    assert got.keys() == want.keys()
    for key in sorted(want):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
    worst = max(
        float(np.abs(got[k] - want[k]).max() / max(np.abs(want[k]).max(), 1e-30)) for k in want
    )
    # Not a trivial agreement: every optimizer moved every factor, step after step.
    raw, *_ = worker.problem()
    for name in worker.optimizers():
        for leaf, start in (
            ("['layer']['lora_a']", raw["layer"]["lora_a"]),
            ("['layer']['lora_b']", raw["layer"]["lora_b"]),
        ):
            moved = [np.abs(want[f"{name}/{t}/{leaf}"] - start).max() for t in range(worker.STEPS)]
            assert all(m > 1e-3 for m in moved) and moved[-1] > moved[0], (name, leaf, moved)

    # LoRA-Muon's update sends only r×r Grams between the processes: one all-reduce
    # of the 4 Grams (a, b and both momenta), each L·r² floats, on the hot path; the
    # overflow-rescue branch (taken only for non-finite Grams) has its own.
    hlo = (tmp_path / "lora_muon_update.hlo.txt").read_text()
    # Tuples of 6+ operands carry /*index=5*/ comments that the parser would trip on.
    colls = _collectives(re.sub(r"/\*index=\d+\*/", "", hlo))
    gram = worker.L * worker.R * worker.R
    assert max(s for _, sizes in colls for s in sizes) <= gram, colls
    assert ("all-reduce", [gram] * 4) in colls, colls
    print(
        f"{PROCESSES} processes x {LOCAL_DEVICES} devices: {len(want)} arrays within "
        f"{worst:.1e} (relative to max) of one process; {time.monotonic() - began:.1f} s"
    )
