"""Code versions of study runs: a stable source hash, ``HEAD``'s, and the report's flags."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from benchmarks.study import aggregate, configs, report, version
from benchmarks.study import lr_transfer as lt

REPO = Path(__file__).resolve().parents[1]


def _copy_sources(dst: Path) -> None:
    for path, data in version.working_tree_files(REPO):
        (dst / path).parent.mkdir(parents=True, exist_ok=True)
        (dst / path).write_bytes(data)


def test_source_hash_depends_on_contents_only(tmp_path):
    files = version.working_tree_files(REPO)
    paths = {p for p, _ in files}
    assert "lora_muon_jax/_lora_muon.py" in paths  # the engine is in
    assert "benchmarks/study/training.py" in paths and "benchmarks/registry.py" in paths
    assert "benchmarks/study/report.py" not in paths  # reports change no result
    assert "benchmarks/study/configs.py" not in paths  # the run's key hashes its config
    h = version.source_hash(files)
    assert version.source_hash(files[::-1]) == h  # order-free
    # Another location, with a stale __pycache__ and a non-Python file: the same hash.
    _copy_sources(tmp_path)
    (tmp_path / "lora_muon_jax" / "__pycache__").mkdir()
    (tmp_path / "lora_muon_jax" / "__pycache__" / "x.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "lora_muon_jax" / "notes.txt").write_text("not source")
    assert version.source_hash(version.working_tree_files(tmp_path)) == h
    engine = tmp_path / "lora_muon_jax" / "_lora_muon.py"
    engine.write_text(engine.read_text() + "\n# changed\n")
    assert version.source_hash(version.working_tree_files(tmp_path)) != h


@pytest.mark.skipif(shutil.which("git") is None, reason="no git")
def test_head_version_and_dirty_flag_from_a_git_checkout(tmp_path):
    _copy_sources(tmp_path)
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    assert version.head_files(tmp_path) is None  # not a repository yet
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "x"], cwd=tmp_path, check=True)
    clean = version.code_version.__wrapped__(tmp_path)
    head = version.head_version.__wrapped__(tmp_path)
    assert clean["dirty"] is False and clean["source"] == head["source"]
    assert len(clean["commit"]) == 40 and clean["commit"] == head["commit"]
    (tmp_path / "benchmarks" / "study" / "training.py").write_text("# edited\n")
    dirty = version.code_version.__wrapped__(tmp_path)
    assert dirty["dirty"] is True and dirty["source"] != head["source"]
    assert version.head_version.__wrapped__(tmp_path) == head  # HEAD is the commit's files


def test_classify_and_the_report_flags():
    head = {"source": "aaaa", "commit": "c" * 40}
    cfg = configs.RunConfig("lora_muon", 0.1, 0, 2).as_dict()
    codes = {
        "a": {"code": {"source": "aaaa", "commit": "c" * 40}},
        "b": {"code": {"source": "bbbb", "commit": "d" * 40, "dirty": True}},
        "c": {},
    }
    runs = {k: {"config": cfg, "status": "ok", "val_loss": 2.0, **v} for k, v in codes.items()}
    assert [version.classify(r, head) for r in runs.values()] == [
        version.CURRENT,
        version.DIFFERENT,
        version.UNVERSIONED,
    ]
    assert version.version_counts(runs.values(), head) == {
        version.CURRENT: 1,
        version.DIFFERENT: 1,
        version.UNVERSIONED: 1,
    }
    rep = report.Report(
        aggregate.Results({"runs": runs}), Path("x.md"), Path("x"), configs.QUICK, head=head
    )
    text = "\n".join(rep.code_versions())
    assert "`aaaa`" in text
    assert "⚠ 1 runs by other code than `HEAD`'s: source `bbbb` (commit dddddddddd" in text
    assert "uncommitted changes" in text and "1 runs unversioned" in text


def test_every_new_run_record_stores_the_code_version(monkeypatch):
    from benchmarks.study import training

    cfg = configs.RunConfig("lora_muon", 0.1, 0, 2)
    monkeypatch.setattr(training, "run_config", lambda c, log: {"config": c.as_dict()})
    rec = lt._run_one(cfg, set())
    assert rec["code"] == version.code_version() and set(rec["code"]) == {
        "source",
        "commit",
        "dirty",
    }

    def broken(c, log):
        raise RuntimeError("boom")

    monkeypatch.setattr(training, "run_config", broken)
    rec = lt._run_one(cfg, set())  # an error record names its code too
    assert rec["status"] == "error" and rec["code"] == version.code_version()
