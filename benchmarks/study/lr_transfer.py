"""TinyShakespeare learning-rate transfer study: dense Muon, LoRA-Muon and peers.

    python -m benchmarks.study.lr_transfer                 # the short-budget sweep (resumable)
    python -m benchmarks.study.lr_transfer --only long     # the long-budget section (hours)
    python -m benchmarks.study.lr_transfer --only proxy,width128,shape_long,peers_long,wd_long
    python -m benchmarks.study.lr_transfer --quick         # a tiny slice, < 3 min
    python -m benchmarks.study.lr_transfer --only lr --max-runs 20
    python -m benchmarks.study.lr_transfer --list          # what is planned, what is done

Char-level transformers (:class:`lora_muon_jax_examples.char_lm.CharTransformer`) are trained
for a fixed budget at every learning rate of a log grid, per method and model shape,
and the final losses are cached, one run per configuration, in a JSON file
(``benchmarks/study/results/lr_transfer.json``). Every run is keyed by a hash of its
whole configuration (with ``STUDY_VERSION``) and added to the file atomically as
soon as it finishes (:mod:`benchmarks.study.store`), so an interrupted or killed
sweep resumes where it stopped and a changed configuration never reuses a stale
result. A run whose loss becomes NaN/inf or exceeds ``Budget.diverge_above`` is
stopped and recorded as diverged, with the step. Each record names the machine
that produced it and the code version it ran (``record["code"]``: a hash of the
source that shapes a result and the git commit, :mod:`benchmarks.study.version`);
the report flags runs whose code differs from ``HEAD``'s, and "unversioned" ones
(recorded before code versions were).

The long-budget sections after (vii), in priority order (``--only`` runs the
sections named, in the order named, each resumable): ``proxy`` (the powered proxy
test: dense Muon and LoRA-Muon ranks 2 and 32 on a √2 grid, 10 paired seeds),
``width128``, ``shape_long``, ``peers_long`` (with Spectron's gauge study at its own
best rate once its curve is complete) and ``wd_long`` (split weight decay at each
method's best ``proxy`` rate, once that curve is complete).

Modules: :mod:`~benchmarks.study.configs` (what a run is, the grids),
:mod:`~benchmarks.study.planning` (which runs a section needs),
:mod:`~benchmarks.study.store` (the results file), :mod:`~benchmarks.study.params`
and :mod:`~benchmarks.study.training` (one run), :mod:`~benchmarks.study.report`
(the markdown page); methods come from :mod:`benchmarks.registry`.

Methods (``RunConfig.method``); every optimizer sends the leaves that are not adapter
or block matrices (embeddings, positions, head, norm scales) to AdamW with the fixed
rate ``Budget.adam_lr`` (same warmup/cooldown shape), so only the matrix rule and its
learning rate vary: ``lora_muon``, ``spectron``, ``riemannion``, ``lora_rite`` and
``adamw_lora`` on native low-rank models (both factors random, balanced);
``dense_muon`` (no shape factor: ``‖ΔW‖₂ ≈ η`` as LoRA-Muon's product step),
``dense_muon_optax`` (stock ``optax.contrib.muon``), ``psgd_kron``, ``lora_pre_muon``
and ``limuon`` on the dense twin's block matrices.

Fine-tuning (``task="finetune"``): a dense base is pretrained with dense Muon (kept
in memory and in a temporary checkpoint, never committed), frozen, and adapters on
every block matrix are trained on an upper-cased copy of the corpus, from Flax's zero
init (``a`` He-uniform, ``b = 0``) or :func:`lora_muon_jax.nnx.balance_lora_init`,
with or without gauge rebalancing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.study.configs import (
    ALL_SECTIONS,
    FULL,
    LONG_STUDY_SECTIONS,
    QUICK,
    SECTIONS,
    Grid,
    RunConfig,
    describe,
)
from benchmarks.study.planning import plan
from benchmarks.study.store import load_results, machine, machine_meta, record_run
from benchmarks.study.version import classify, code_version, head_version

REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "benchmarks" / "study" / "results" / "lr_transfer.json"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.study.lr_transfer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a tiny slice of every section (< 3 min)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results JSON (cache)")
    p.add_argument(
        "--only",
        type=str,
        default=None,
        help=f"comma-separated sections of {ALL_SECTIONS}, or all (default: {SECTIONS})",
    )
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    p.add_argument(
        "--list", action="store_true", help="print the plan and what is done, run nothing"
    )
    p.add_argument("--retry-errors", action="store_true", help="re-run runs recorded as errors")
    # Overrides of the preset budget/grid of the short sections (tests, small machines).
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds")
    return p.parse_args(argv)


def grid_from_args(args: argparse.Namespace) -> Grid:
    """The preset with the command line's overrides (short sections only)."""
    grid = QUICK if args.quick else FULL
    budget = dataclasses.replace(
        grid.budget,
        **{
            k: v
            for k, v in (
                ("steps", args.steps),
                ("batch", args.batch),
                ("seq_len", args.seq_len),
                ("chunks", args.chunks),
                ("eval_windows", args.eval_windows),
            )
            if v is not None
        },
    )
    changes: dict[str, Any] = {"budget": budget}
    if args.width is not None:
        changes["width"] = args.width
        changes["widths"] = (args.width,) if args.quick else (args.width // 2, args.width)
    if args.depth is not None:
        changes["depth"] = args.depth
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    return dataclasses.replace(grid, **changes)


def _sections(args: argparse.Namespace) -> tuple[str, ...]:
    sections = tuple(s.strip() for s in args.only.split(",")) if args.only else SECTIONS
    if sections == ("all",):
        sections = ALL_SECTIONS
    if args.quick and not args.only:
        # The quick slice of every result section.
        sections = SECTIONS + ("long_pilot", "long", *LONG_STUDY_SECTIONS)
    for s in sections:
        if s not in ALL_SECTIONS:
            raise SystemExit(f"--only: unknown section {s!r}; choose from {ALL_SECTIONS}")
    return sections


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _run_one(cfg: RunConfig, failed: set[str]) -> dict[str, Any]:
    """Trains ``cfg``; an exception becomes an error record (one broken method must
    not stop a sweep)."""
    from benchmarks.study.training import run_config

    try:
        rec = run_config(cfg, _log)
    except Exception as e:
        traceback.print_exc()
        rec = {
            "config": cfg.as_dict(),
            "status": "error",
            "val_loss": None,
            "error": f"{type(e).__name__}: {e}"[:500],
        }
        failed.add(cfg.key())
    rec["machine"] = machine()
    rec["code"] = code_version()
    return rec


def sweep(
    path: Path,
    sections: Sequence[str],
    grid: Grid,
    meta: dict[str, Any],
    max_runs: int | None = None,
    retry_errors: bool = False,
) -> int:
    """Runs the planned runs not yet in ``path``, one at a time; returns how many ran.

    The plan is recomputed from the file before each run (other writers, edge
    extensions, the long section's gauge rate).
    """
    done = 0
    failed: set[str] = set()
    while max_runs is None or done < max_runs:
        runs = load_results(path)["runs"]
        todo = [
            (s, c)
            for s, c in plan(sections, grid, runs)
            if c.key() not in failed
            and (c.key() not in runs or (retry_errors and runs[c.key()]["status"] == "error"))
        ]
        if not todo:
            break
        section, cfg = todo[0]
        _log(f"{section}: {describe(cfg)} ({len(todo)} left in plan)")
        rec = _run_one(cfg, failed)
        record_run(path, cfg.key(), rec, meta)
        done += 1
        if rec["status"] == "error":
            _log(f"  error: {rec['error']}")
        else:
            _log(
                f"  {rec['status']}: val {rec['val_loss']} train {rec['train_loss']} "
                f"step {rec['diverged_step']} ({rec['wall_s']} s + compile {rec['compile_s']} s)"
            )
    return done


def list_plan(path: Path, sections: Sequence[str], grid: Grid) -> None:
    """Prints every planned run (section, status, code version, key) and a count per section.

    The code column says whether a done run's code is ``HEAD``'s ("current"),
    another ("differs") or unrecorded ("unversioned"). A run several sections need
    is listed under the first; ``wd_long`` and the peers' gauge runs are planned
    only once the curves they wait for are complete.
    """
    runs = load_results(path)["runs"]
    head = head_version()
    counts: dict[str, list[int]] = {s: [0, 0] for s in sections}
    for section, cfg in plan(sections, grid, runs):
        rec = runs.get(cfg.key())
        status = rec.get("status", "-") if rec else "-"
        code = classify(rec, head) if rec else "-"
        print(f"{section:10s} {status:9s} {code:11s} {cfg.key()} {describe(cfg)}")
        counts[section][0] += 1
        counts[section][1] += rec is not None
    for section, (n, done) in counts.items():
        # A run several sections need counts under the first; some runs wait for others.
        print(f"# {section}: {done} of {n} planned runs done")


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    grid = grid_from_args(args)
    sections = _sections(args)
    path = args.results
    if args.list:
        list_plan(path, sections, grid)
        return 0
    code_version()  # the code this sweep starts with, recorded in each of its runs
    # The grid of the latest writer (the long section's is its `long` field); the
    # report reads it back.
    meta = {**machine_meta(), "grid": dataclasses.asdict(grid)}
    old = load_results(path)["meta"]
    if "legacy_machine" not in old and "machine" in old:
        # Runs from before per-run machine records keep the machine that wrote them.
        meta["legacy_machine"] = old["machine"]
    done = sweep(path, sections, grid, meta, args.max_runs, args.retry_errors)
    _log(f"{done} new runs; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
