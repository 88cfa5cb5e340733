"""The results file: one JSON object ``{"meta": ..., "runs": {key: record}}``.

Every finished run is added on its own (:func:`record_run`) under an exclusive
lock: the file on disk is read, the run added, and the whole file rewritten to a
temporary file in the same folder, flushed and ``fsync``-ed, then renamed over
the old one (``os.replace`` is atomic on POSIX) and the folder ``fsync``-ed. A
sweep killed at any instant, even with ``SIGKILL`` mid-write, therefore leaves
either the old or the new file, never a torn one, and loses at most the run it
was training. Temporary files of a killed writer are removed by the next one.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks.study.configs import STUDY_VERSION


def load_results(path: Path) -> dict[str, Any]:
    """The results at ``path``, or an empty file's content if there is none."""
    if not path.exists():
        return {"meta": {}, "runs": {}}
    with open(path) as f:
        data = json.load(f)
    data.setdefault("meta", {})
    data.setdefault("runs", {})
    return data


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_results(path: Path, data: dict[str, Any]) -> None:
    """Writes ``data`` atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o644)  # mkstemp's 0600 would stick to the results
            json.dump(data, f, indent=1, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def lock_path(path: Path) -> Path:
    """The lock file of ``path``: in the temp folder (nothing to commit by mistake)."""
    digest = hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / "lora_muon_jax_study" / f"results_{digest}.lock"


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on :func:`lock_path` (released on exit, or by the kernel
    when the holder dies)."""
    lock = lock_path(path)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_stale_temporaries(path: Path) -> None:
    # Only called under the lock: no live writer owns one of these.
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        tmp.unlink(missing_ok=True)


def record_run(path: Path, key: str, record: dict[str, Any], meta: dict[str, Any]) -> None:
    """Adds one run to the file, merging with what is on disk now (under the lock)."""
    with locked(path):
        _remove_stale_temporaries(path)
        data = load_results(path)
        data["runs"][key] = record
        data["meta"].update(meta)
        save_results(path, data)


def finite(x: Any, digits: int = 5) -> float | None:
    """``x`` rounded to ``digits``, or ``None`` if it is NaN or infinite (JSON-safe)."""
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


def machine() -> dict[str, Any]:
    """What produced a run: CPU or accelerator, core count, backend, library versions."""
    import jax
    import optax

    try:
        from benchmarks.common import machine_info

        info = machine_info()
    except Exception:  # the study must not depend on the benchmark harness
        info = {"jax": jax.__version__, "optax": optax.__version__}
    keep = ("cpu", "cores", "backend", "device", "device_count", "jax", "optax")
    return {k: info[k] for k in keep if k in info}


def machine_meta() -> dict[str, Any]:
    """The file's ``meta``: the machine of the latest writer and the study version."""
    return {"machine": machine(), "study_version": STUDY_VERSION}


def machine_label(info: dict[str, Any] | None) -> str:
    """``"AMD EPYC, 2 cores (cpu)"``-style label of a run's machine record."""
    if not info:
        return "unrecorded"
    if info.get("backend", "cpu") != "cpu":
        return f"{info.get('device', '?')} ({info.get('backend')})"
    return f"{info.get('cpu', '?')}, {info.get('cores', '?')} cores (cpu)"
