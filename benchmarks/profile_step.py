"""Where the donated LoRA-Muon step spends its time, fusion by fusion.

    python -m benchmarks.profile_step                 # Llama tree, L = 4, r = 16
    python -m benchmarks.profile_step --rank 64 --out docs/benchmarks/profile_r64.md

Runs the donated step (update and ``optax.apply_updates`` in one program, params and
state donated) of :func:`lora_muon_jax.lora_muon` and of :func:`optax.adamw` on the
same tree under :func:`jax.profiler.trace`, reads the trace back with
:class:`jax.profiler.ProfileData`, and sums each HLO op's time over all threads and
steps. The bytes of an op are its operands' and its result's sizes in the optimized
HLO (what it must at least read and write). Ops are grouped by what they compute,
from their names and shapes, and the table lists the largest ones with one line of
explanation per group.
"""

from __future__ import annotations

import argparse
import collections
import glob
import re
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_muon_jax as lmj
from benchmarks import common, trees

_SHAPE = re.compile(r"(f32|bf16|f16|s32|pred|u32)\[([0-9,]*)\]")
_BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1}
_INSTR = re.compile(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*?) ([\w\-]+)\((.*?)\)(?:,|$)")


def _nbytes(text: str) -> int:
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        total += _BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def hlo_ops(hlo: str) -> dict[str, dict[str, Any]]:
    """Per instruction of the entry computation: result shape text, bytes touched, kind."""
    entry = hlo[hlo.index("\nENTRY") :]
    entry = entry[: entry.index("\n}")]
    shapes: dict[str, str] = {}
    ops: dict[str, dict[str, Any]] = {}
    for line in entry.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, kind, args = m.groups()
        shapes[name] = shape
        operands = re.findall(r"%([\w.\-]+)", args)
        touched = _nbytes(shape) + sum(_nbytes(shapes.get(o, "")) for o in operands)
        ops[name] = {"shape": shape, "kind": kind, "bytes": touched, "line": line}
    return ops


MOMENTS = "moment update: read g and the state, write the state"
UPDATE = "parameter update: read p (and the state), write p"
GRAMS = "Grams (r×r) of a factor or momentum"
THIN = "thin product μ T as a matmul (wide factors; every factor at r > 32)"
SMALL = "r×r work and scalars"

EXPLAIN = {
    ("adamw", MOMENTS): "One loop per leaf updates both moments in place (reads g, m, v; "
    "writes m, v: 20 bytes per element at float32), at memory speed.",
    ("adamw", UPDATE): "One loop per leaf reads both moments and the param and writes the "
    "param in place (16 bytes per element).",
    ("lora_muon", MOMENTS): "`μ ← β μ + (1-β) g` in place (12 bytes per element). It cannot "
    "be fused with the parameter update: that needs `T`, which needs the Gram of the new "
    "`μ`, which needs all of `μ`.",
    ("lora_muon", GRAMS): "Four r×r Grams per pair (`μᵀμ` and the partner's `pᵀp` for each "
    "factor), each reading a factor once and doing 2r flops per element. They are the "
    "largest cost: XLA has no symmetric rank-k kernel, so each symmetric Gram costs a full "
    "thin matmul, and these thin shapes run far below the machine's matmul peak.",
    ("lora_muon", THIN): "`T μ` for wide (r×n) factors as a matmul, into a buffer the "
    "update then reads; the products run one after another, so one buffer serves them all.",
    ("lora_muon", UPDATE): "`p ← s·p − η·μ T` in place, with the thin product fused in for "
    "tall (m×r) factors (reads μ and p, writes p: 12 bytes per element).",
    ("lora_muon", SMALL): "The batched r×r work (scale checks, Cholesky whitening, "
    "Newton–Schulz polar, residual checks, `lax.cond` guards) and scalar bookkeeping: a "
    "fixed cost per step, whatever the adapter sizes.",
}


def _group(op: dict[str, Any], adapter_leaf_bytes: int) -> str:
    """What an op computes, from the step's argument names and the sizes it touches.

    The step's arguments are ``params``, ``state`` and ``grads``, so the HLO names
    its parameters ``params__…``, ``state…`` and ``grads__…``.
    """
    line, out = op["line"], _nbytes(op["shape"])
    big_out = out >= adapter_leaf_bytes
    reads_big = op["bytes"] - out >= adapter_leaf_bytes
    if big_out and "%state" in line and "%grads__" in line:
        return MOMENTS
    if big_out and "%params__" in line:
        return UPDATE
    if big_out:
        return THIN
    if reads_big:
        return GRAMS
    return SMALL


def profile(tx: optax.GradientTransformation, params: Any, grads: Any, steps: int) -> Any:
    """``(seconds per step per op, optimized HLO text)`` of the donated step."""
    step = common.optimizer_step(tx, donate=True)
    hlo = step.lower(params, tx.init(params), grads).compile().as_text()
    p, s = jax.tree.map(jnp.copy, params), tx.init(params)
    for _ in range(3):
        p, s = step(p, s, grads)
    jax.block_until_ready(p)
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            for _ in range(steps):
                p, s = step(p, s, grads)
            jax.block_until_ready(p)
        path = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
        data = jax.profiler.ProfileData.from_file(path)
    times: collections.Counter[str] = collections.Counter()
    for plane in data.planes:
        for line in plane.lines:
            if not line.name.startswith("tf_XLA"):
                continue
            for ev in line.events:
                times[ev.name] += ev.duration_ns / 1e9 / steps
    return times, hlo


def report(rank: int, layers: int, steps: int) -> str:
    params, grads = trees.model_tree("llama7b", layers, rank)
    elems = trees.adapter_elements("llama7b", layers, rank)
    out = [
        f"# Profile of the donated step: Llama-7B adapter tree, L = {layers}, r = {rank}",
        "",
        f"Generated by `python -m benchmarks.profile_step --rank {rank}` "
        f"({steps} steps under `jax.profiler.trace`; op times summed over XLA's threads, "
        f"so they add up to CPU time, not wall time). Machine: {common.machine_info()['cpu']}.",
        "",
    ]
    smallest = min(x.nbytes for x in jax.tree.leaves(params))  # the smallest factor
    for label, tx in (("optax.adamw", optax.adamw(1e-3)), ("lora_muon", lmj.lora_muon(0.02))):
        times, hlo = profile(tx, params, grads, steps)
        ops = hlo_ops(hlo)
        groups: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0])
        for name, sec in times.items():
            if name not in ops:
                continue
            g = groups[_group(ops[name], smallest)]
            g[0] += sec
            g[1] += ops[name]["bytes"]
            g[2] += 1
        total = sum(g[0] for g in groups.values())
        out += [
            f"## {label}: {total * 1e3:.2f} ms of CPU time per step",
            "",
            "| group | ms / step | share | bytes / adapter element | ops | GB/s |",
            "|---|---|---|---|---|---|",
        ]
        for name, (sec, nbytes, n) in sorted(groups.items(), key=lambda kv: -kv[1][0]):
            out.append(
                f"| {name} | {sec * 1e3:.3f} | {sec / total:.0%} | {nbytes / elems:.1f} "
                f"| {int(n)} | {nbytes / max(sec, 1e-12) / 1e9:.1f} |"
            )
        out.append("")
        key = "adamw" if label == "optax.adamw" else "lora_muon"
        out += [f"* **{g}**: {EXPLAIN[key, g]}" for g in groups if (key, g) in EXPLAIN]
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args(argv)
    text = report(args.rank, args.layers, args.steps)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
