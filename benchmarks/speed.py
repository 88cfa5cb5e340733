"""The headline speed and memory table: LoRA-Muon vs AdamW as training loops run them.

    python -m benchmarks.speed --runs 2                  # measure: 2 fresh processes
    python -m benchmarks.speed --render                  # README block + docs page

A training loop jits ``(params, state, grads) -> (params, state)`` with update and
:func:`optax.apply_updates` in one program and donates params and optimizer state
(``donate_argnums=(0, 1)``), so the step updates in place. That **donated** step is
what this module times; the non-donated step (fresh output buffers) is reported
beside it. LoRA-Muon and :func:`optax.adamw` run on the same tree in one process,
interleaved repeat by repeat; a figure is the median of the per-round ratios.

Per method it also records, from XLA on the compiled donated step: bytes accessed
and flops per adapter element (XLA's cost analysis, which also counts branches of a
``lax.cond`` that do not run, here the rescaled Grams that only extreme scales
take), and optimizer memory: state bytes plus the step's temporaries, over the
adapter bytes.

``--runs N`` measures every case in N fresh processes and stores every run in
``benchmarks/results/speed_cpu.json`` (appending to the runs already there), so
the table reports the spread across runs, never a single one. ``--render``
regenerates the README's speed block and ``docs/benchmarks/speed.md`` from that
file; ``tests/test_benchmarks.py`` fails if the README differs from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

import lora_muon_jax as lmj
from benchmarks import common, trees
from lora_muon_jax import _directions, _grams, _pair_tree

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "speed_cpu.json"
DOC = REPO / "docs" / "benchmarks" / "speed.md"
README = REPO / "README.md"
BEGIN, END = "<!-- speed-table:begin -->", "<!-- speed-table:end -->"
COMMAND = "python -m benchmarks.speed --runs 2 && python -m benchmarks.speed --render"


class Case(NamedTuple):
    """One benchmark tree and the issue tracker's target for LoRA-Muon's donated step."""

    name: str
    build: Callable[[], tuple[Any, Any]]
    elements: int
    target: float  # ×AdamW, donated


def _model(model: str, r: int, target: float) -> Case:
    return Case(
        f"{model} L=4, r={r}",
        lambda: trees.model_tree(model, 4, r),
        trees.adapter_elements(model, 4, r),
        target,
    )


def _stack(layers: int, m: int, n: int, r: int, target: float) -> Case:
    return Case(
        f"L={layers}, {m}×{n}, r={r}",
        lambda: trees.lora_tree(layers, m, n, r),
        layers * (m + n) * r,
        target,
    )


CASES = (
    _model("llama7b", 16, 1.3),
    _model("llama7b", 64, 2.5),
    _model("qwen7b", 16, 1.3),
    _model("qwen7b", 64, 2.5),
    _stack(4, 1024, 1024, 16, 1.8),
    _stack(4, 2048, 2048, 16, 1.8),
    _stack(8, 1024, 4096, 8, 1.8),
    _stack(2, 4096, 4096, 64, 4.0),
)
METHODS: dict[str, Callable[[], optax.GradientTransformation]] = {
    "adamw": lambda: optax.adamw(1e-3),
    "lora_muon": lambda: lmj.lora_muon(0.02),
}


def _costs(step: Any, params: Any, state: Any, grads: Any, elements: int) -> dict[str, float]:
    costs = common.compiled_costs(step.lower(params, state, grads).compile())
    adapter = 4 * elements  # float32 trees
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return {
        "bytes_per_element": costs["bytes_accessed"] / elements,
        "flops_per_element": costs["flops"] / elements,
        "state_over_adapter": state_bytes / adapter,
        "temps_over_adapter": (costs["peak_temp_bytes"] or 0) / adapter,
    }


def contractions_alone(params: Any, grads: Any) -> Callable[[], Any]:
    """A call of a program computing only the LoRA-Muon step's contractions (a floor).

    Per pair, the four ``r×r`` Grams the step forms (each factor's momentum, here the
    gradient, and its partner) and the two thin products ``m T`` (the momentum's Gram
    standing in for ``T``), with the library's own :func:`_grams.gram` and
    :func:`_directions.thin_product` on the leaves as stored: every flop of the step
    that scales with the adapter, with XLA's kernels, and no moment or parameter
    pass. Its time is a floor under any step that computes them this way.
    """
    tree = _pair_tree.flatten("contractions_alone", grads, params, "auto")
    factors = _directions.factors_of(tree.plan.pairs, tree.params, 1e-6)

    def contractions(g: list[jax.Array], p: list[jax.Array]) -> list[jax.Array]:
        out = []
        for f in factors:
            k = _grams.gram(g[f.index], f.layout)
            out += [k, _grams.gram(p[f.partner], f.partner_layout)]
            out.append(_directions.thin_product(g[f.index], k, f.layout))
        return out

    fn = jax.jit(contractions)
    return lambda: fn(tree.grads, tree.params)


def measure_case(case: Case, repeats: int) -> dict[str, Any]:
    """Donated and non-donated steps of every method on one tree, interleaved.

    The step's contractions alone (:func:`contractions_alone`) are timed in the same
    rounds and reported as ``floor_ratio`` (×AdamW's donated step) under ``lora_muon``.
    """
    params, grads = case.build()
    fns: dict[str, Callable[[], Any]] = {"floor": contractions_alone(params, grads)}
    out: dict[str, Any] = {}
    for name, make in METHODS.items():
        tx = make()
        state = tx.init(params)
        donated = common.optimizer_step(tx, donate=True)
        plain = common.optimizer_step(tx)
        common.assert_finite(plain(params, state, grads)[0], name)
        out[name] = _costs(donated, params, state, grads, case.elements)
        fns[f"{name}/donated"] = common.DonatedCall(donated, params, state, grads)
        fns[f"{name}/plain"] = lambda plain=plain, state=state: plain(params, state, grads)  # type: ignore[misc]
    times = common.interleaved_times(fns, repeats)
    for name in METHODS:
        for kind in ("donated", "plain"):
            t = times[f"{name}/{kind}"]
            out[name][f"{kind}_ms"] = float(np.median(t)) * 1e3
            out[name][f"{kind}_ratio"] = float(np.median(t / times[f"adamw/{kind}"]))
    out["lora_muon"]["floor_ratio"] = float(np.median(times["floor"] / times["adamw/donated"]))
    return out


def measure(repeats: int, only: str | None = None) -> dict[str, Any]:
    """One run: every case (or those whose name contains ``only``)."""
    cases = [c for c in CASES if only is None or only in c.name]
    rows = {}
    for case in cases:
        print(f"speed: {case.name}", file=sys.stderr, flush=True)
        rows[case.name] = measure_case(case, repeats)
    if only is None:
        print("speed: end to end", file=sys.stderr, flush=True)
        rows["end_to_end"] = end_to_end(repeats)
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": common.machine_info(),
        "repeats": repeats,
        "cases": rows,
    }


def end_to_end(
    repeats: int, *, width: int = 512, depth: int = 2, rank: int = 16, batch: int = 16
) -> dict[str, Any]:
    """The optimizer's share of a whole donated training step, LoRA-Muon vs AdamW.

    The quickstart's character transformer at ``width`` (every attention and MLP
    projection a LoRA pair) trains on random tokens: forward, backward, update and
    apply in one jitted program with params and state donated. The optimizer's
    donated step alone (update and apply on the model's gradients) and forward and
    backward alone are timed in the same rounds; the optimizer's share is the
    median of ``t(optimizer step) / t(training step)`` over the rounds.
    """
    from flax import nnx

    from lora_muon_jax_examples import char_lm

    seq = 64
    model = char_lm.CharTransformer(
        65, width=width, depth=depth, heads=8, rank=rank, seq_len=seq, rngs=nnx.Rngs(0)
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)  # type: ignore[misc]
    tokens = jax.random.randint(jax.random.key(0), (batch, seq + 1), 0, 65)
    data = (tokens[:, :-1], tokens[:, 1:])

    def loss(p: Any) -> jax.Array:
        return char_lm.loss_fn(nnx.merge(graphdef, p, rest), data)

    grad = jax.jit(jax.grad(loss))
    grads = grad(params)
    fns: dict[str, Callable[[], Any]] = {"grad": lambda: grad(params)}
    for name, make in METHODS.items():
        tx = make()
        opt = common.optimizer_step(tx, donate=True)
        fns[f"{name}/optimizer"] = common.DonatedCall(opt, params, tx.init(params), grads)

        def train(p: Any, s: Any, _: Any, tx: optax.GradientTransformation = tx) -> Any:
            updates, s = tx.update(jax.grad(loss)(p), s, p)
            return optax.apply_updates(p, updates), s

        step = jax.jit(train, donate_argnums=(0, 1))
        fns[name] = common.DonatedCall(step, params, tx.init(params), None)
    times = common.interleaved_times(fns, repeats)
    t_grad = float(np.median(times["grad"]))
    out: dict[str, Any] = {
        "config": dict(width=width, depth=depth, rank=rank, batch=batch, seq_len=seq),
        "grad_ms": t_grad * 1e3,
    }
    for name in METHODS:
        t = float(np.median(times[name]))
        share = float(np.median(times[f"{name}/optimizer"] / times[name]))
        out[name] = {"step_ms": t * 1e3, "optimizer_share": share}
    out["step_ratio"] = float(np.median(times["lora_muon"] / times["adamw"]))
    return out


def _run_fresh(repeats: int, only: str | None) -> dict[str, Any]:
    """One :func:`measure` in a fresh Python process (its own compile caches and heap)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "run.json")
        cmd = [sys.executable, "-m", "benchmarks.speed", "--one", path, "--repeats", str(repeats)]
        subprocess.run(cmd + (["--only", only] if only else []), check=True, cwd=REPO)
        with open(path) as f:
            return json.load(f)


# ---------------------------------------------------------------------------- tables


def _spread(values: list[float], fmt: str = "{:.2f}") -> str:
    med = fmt.format(float(np.median(values)))
    if len(values) < 2:
        return med
    return f"{med} ({fmt.format(min(values))}–{fmt.format(max(values))})"


def _share(e2e: list[dict[str, Any]], method: str) -> str:
    return _spread([100 * e[method]["optimizer_share"] for e in e2e], "{:.0f}")


def render_table(results: dict[str, Any]) -> str:
    """The speed table: medians across runs, with the range across runs in brackets."""
    runs = results["runs"]
    lines = [
        f"{len(runs)} runs ({', '.join(r['date'][:10] for r in runs)}), fresh processes, "
        f"{runs[0]['repeats']} interleaved repeats each; `{COMMAND}`. "
        f"Machine: {runs[0]['machine']['cpu']}, {runs[0]['machine']['cores']} cores, "
        f"jax {runs[0]['machine']['jax']}, optax {runs[0]['machine']['optax']}.",
        "",
        "| tree | donated step ×AdamW | target | met | its contractions alone ×AdamW "
        "| not donated ×AdamW | bytes / element (AdamW) | flops / element ÷ r "
        "| optimizer memory ÷ adapter (AdamW) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    floor_over: list[str] = []
    for case in CASES:
        rows = [r["cases"][case.name] for r in runs if case.name in r["cases"]]
        if not rows:
            continue
        r = int(case.name.rsplit("r=", 1)[1])
        ours = [x["lora_muon"] for x in rows]
        if min(x["floor_ratio"] for x in ours) > case.target:
            floor_over.append(case.name)
        donated = [x["donated_ratio"] for x in ours]
        last, adam = rows[-1]["lora_muon"], rows[-1]["adamw"]
        mem = last["state_over_adapter"] + last["temps_over_adapter"]
        adam_mem = adam["state_over_adapter"] + adam["temps_over_adapter"]
        met = (
            "yes"
            if max(donated) <= case.target
            else ("no" if min(donated) > case.target else "in some runs")
        )
        lines.append(
            f"| {case.name} | {_spread(donated)} | ≤ {case.target} | {met} "
            f"| {_spread([x['floor_ratio'] for x in ours])} "
            f"| {_spread([x['plain_ratio'] for x in ours])} "
            f"| {last['bytes_per_element']:.0f} ({adam['bytes_per_element']:.0f}) "
            f"| {last['flops_per_element'] / r:.1f} "
            f"| {mem:.2f} ({adam_mem:.2f}) |"
        )
    lines += [
        "",
        "The contractions column times a program that computes only the step's four "
        "r×r Grams and two thin products per pair, with XLA's kernels: every flop that "
        "scales with the adapter, without the moment and parameter passes (it writes "
        "the thin products, which the step fuses into the parameter update for tall "
        "factors at r ≤ 32, so at r = 64 it is exact, and below it overstates the "
        "floor by that write). "
        + (
            f"On {len(floor_over)} tree(s) ({'; '.join(floor_over)}) that floor alone, "
            "in every run, exceeds the target."
            if floor_over
            else "In no tree does that floor alone exceed the target."
        ),
    ]
    e2e = [r["cases"]["end_to_end"] for r in runs if "end_to_end" in r["cases"]]
    if e2e:
        c = e2e[-1]["config"]
        lines += [
            "",
            f"Whole training step (forward, backward, donated update) of the quickstart's "
            f"transformer at width {c['width']}, depth {c['depth']}, every projection a "
            f"rank-{c['rank']} pair, batch {c['batch']}×{c['seq_len']}: LoRA-Muon's step "
            f"{_spread([e['step_ratio'] for e in e2e])}× AdamW's; the optimizer's share "
            f"of the step {_share(e2e, 'lora_muon')}% for LoRA-Muon, "
            f"{_share(e2e, 'adamw')}% for AdamW.",
        ]
    return "\n".join(lines)


def replace_block(text: str, block: str) -> str:
    """``text`` with what stands between the speed-table markers replaced by ``block``."""
    start, end = text.index(BEGIN) + len(BEGIN), text.index(END)
    return text[:start] + "\n" + block + "\n" + text[end:]


def render(results_path: Path = RESULTS) -> None:
    with open(results_path) as f:
        results = json.load(f)
    table = render_table(results)
    README.write_text(replace_block(README.read_text(), table))
    DOC.write_text(
        "# Speed and memory of the donated step\n\n"
        "Generated by `python -m benchmarks.speed --render` from "
        "`benchmarks/results/speed_cpu.json`; see `benchmarks/speed.py` for what is "
        "measured.\n\n" + table + "\n"
    )


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=0, help="fresh-process runs to add")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--only", type=str, default=None, help="cases whose name contains this")
    ap.add_argument("--one", type=str, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--render", action="store_true")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    if args.one:
        common.write_json(args.one, measure(args.repeats, args.only))
        return
    if args.runs:
        results: dict[str, Any] = {"runs": []}
        if args.results.exists():
            results = json.loads(args.results.read_text())
        for _ in range(args.runs):
            results["runs"].append(_run_fresh(args.repeats, args.only))
            common.write_json(str(args.results), results)
    if args.render:
        render(args.results)


if __name__ == "__main__":
    main()
