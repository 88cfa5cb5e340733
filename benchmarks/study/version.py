"""The code version a run ran: a hash of the source that shapes its result, and the commit.

:func:`code_version` is what :mod:`benchmarks.study.lr_transfer` stores in every new
run record (``record["code"]``); :func:`head_version` is the same hash of the files
as committed at ``HEAD``; :func:`classify` tells the report which runs were trained by
other code than ``HEAD``'s, and which predate these records ("unversioned").

The hash covers every ``*.py`` file of :data:`SOURCE_DIRS` and the
:data:`SOURCE_FILES`, less :data:`SOURCE_EXCLUDED`: the optimizers (the engine and
its peers: an optimizer change changes results), the example model, data and
schedule, the optimizer registry and the study's training code. Reports, plots, planning, the grids
(``configs.py``: a run's key already hashes its whole configuration) and the command
line are left out: they do not change what a run computes. Every file on disk
counts, untracked ones too (a sweep started in a tree with uncommitted changes is
flagged as such). It is the SHA-256 of the sorted lines
``<path> <sha256 of the file's bytes>`` (paths relative to the repository, ``/``
separated), so it depends on the files' contents alone, not on the checkout's
location, timestamps or ``__pycache__``.
"""

from __future__ import annotations

import functools
import hashlib
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("lora_muon_jax", "lora_muon_jax_examples")
SOURCE_FILES = (
    "benchmarks/registry.py",
    "benchmarks/study/params.py",
    "benchmarks/study/training.py",
)
# Files of those folders through which no training step computes: file formats and
# interop helpers (PEFT files, checkpoints, a library's LoRA scale) and test
# utilities. A change to them leaves every run's result as it was.
SOURCE_EXCLUDED = (
    "lora_muon_jax/peft_io.py",
    "lora_muon_jax/checkpoint.py",
    "lora_muon_jax/lora_scale.py",
    "lora_muon_jax/testing.py",
)
UNVERSIONED = "unversioned"
CURRENT = "current"
DIFFERENT = "differs"


def _is_source(path: str) -> bool:
    if path in SOURCE_FILES:
        return True
    if path in SOURCE_EXCLUDED:
        return False
    top, _, rest = path.partition("/")
    return top in SOURCE_DIRS and rest != "" and path.endswith(".py")


def source_hash(files: Iterable[tuple[str, bytes]]) -> str:
    """SHA-256 (hex, 16 characters) of ``(relative path, content)`` pairs, order-free."""
    lines = sorted(f"{path} {hashlib.sha256(data).hexdigest()}" for path, data in files)
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def _git(args: list[str], root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, check=True, timeout=30
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.decode()


def working_tree_files(root: Path = REPO) -> list[tuple[str, bytes]]:
    """The hashed files as they are on disk now."""
    paths = [root / f for f in SOURCE_FILES if (root / f).is_file()]
    for d in SOURCE_DIRS:
        paths += sorted((root / d).rglob("*.py"))
    return [
        (p.relative_to(root).as_posix(), p.read_bytes())
        for p in paths
        if _is_source(p.relative_to(root).as_posix()) and "__pycache__" not in p.parts
    ]


def head_files(root: Path = REPO) -> list[tuple[str, bytes]] | None:
    """The hashed files as committed at ``HEAD`` (``None`` without git or a commit)."""
    listing = _git(["ls-tree", "-r", "-z", "--full-tree", "HEAD"], root)
    if listing is None:
        return None
    blobs = []  # (path, object id)
    for entry in filter(None, listing.split("\0")):
        meta, path = entry.split("\t", 1)
        kind, oid = meta.split()[1:3]
        if kind == "blob" and _is_source(path):
            blobs.append((path, oid))
    try:
        out = subprocess.run(
            ["git", "cat-file", "--batch"],
            cwd=root,
            input="".join(f"{oid}\n" for _, oid in blobs).encode(),
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    files, pos = [], 0
    for path, _ in blobs:  # each answer: "<oid> blob <size>\n<content>\n"
        header_end = out.index(b"\n", pos)
        size = int(out[pos:header_end].split()[2])
        files.append((path, out[header_end + 1 : header_end + 1 + size]))
        pos = header_end + 1 + size + 1
    return files


def _commit(root: Path) -> str | None:
    out = _git(["rev-parse", "HEAD"], root)
    return out.strip() if out else None


@functools.lru_cache(maxsize=4)
def code_version(root: Path = REPO) -> dict[str, Any]:
    """``{"source": hash, "commit": HEAD or None, "dirty": bool or None}`` of the running code.

    ``dirty``: the hashed files on disk differ from ``HEAD``'s (``None`` without
    git). Computed once per process: a sweep records the code it started with.
    """
    source = source_hash(working_tree_files(root))
    head = head_files(root)
    return {
        "source": source,
        "commit": _commit(root),
        "dirty": None if head is None else source != source_hash(head),
    }


@functools.lru_cache(maxsize=4)
def head_version(root: Path = REPO) -> dict[str, Any]:
    """``{"source": hash, "commit": ...}`` of ``HEAD``; the working tree's without git."""
    head = head_files(root)
    files = working_tree_files(root) if head is None else head
    return {"source": source_hash(files), "commit": _commit(root)}


def classify(record: dict[str, Any], head: dict[str, Any]) -> str:
    """:data:`CURRENT`, :data:`DIFFERENT` (other source than ``head``) or :data:`UNVERSIONED`."""
    code = record.get("code")
    if not code or "source" not in code:
        return UNVERSIONED
    return CURRENT if code["source"] == head["source"] else DIFFERENT


def version_counts(records: Iterable[dict[str, Any]], head: dict[str, Any]) -> dict[str, int]:
    """How many ``records`` fall in each :func:`classify` class (classes with none left out)."""
    counts: dict[str, int] = {}
    for rec in records:
        k = classify(rec, head)
        counts[k] = counts.get(k, 0) + 1
    return counts
