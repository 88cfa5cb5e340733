"""Step time of LoRA-Muon vs optax.adamw (same LoRA tree) and optax.contrib.muon (dense).

Usage::

    python -m benchmarks.step_time [--repeats 20] [--dense-repeats 3] [--full] [--out FILE]

For each (layers, m, n, r) it times, side by side in one process, a jitted
``update + apply_updates`` of

* ``optax.adamw`` on the LoRA tree ``a: (L, m, r)``, ``b: (L, r, n)``;
* ``lora_muon`` with the default method and with ``method="paper"``, same tree;
* ``optax.contrib.muon`` on the equivalent dense tree ``W: (L, m, n)`` (slow on a
  CPU: fewer repeats, and the largest configuration only with ``--full``).

and prints medians, ratios and a roofline column: the time the step would take at
this machine's measured streaming bandwidth and matmul rate if it moved only the
bytes it must (AdamW: read p, g, m, v and write p, m, v, 28 B per float32 element;
LoRA-Muon: read p, g, m and write p, m, 20 B) and did only the flops it must
(LoRA-Muon: four Grams and two thin products, about 6r flops per element).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_muon_jax as lmj
from benchmarks import common

CONFIGS = ((4, 1024, 1024, 16), (4, 2048, 2048, 16), (2, 4096, 4096, 64), (8, 1024, 4096, 8))
# Dense Muon on CPU: 5 Newton–Schulz steps of three m×m×n matmuls per layer.
_DENSE_FULL_ONLY = 2 * 4096 * 4096


def lora_tree(layers: int, m: int, n: int, r: int, dtype=jnp.float32, seed: int = 0):
    """Random LoRA params and gradients with both factors non-zero."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "lora_a": (jax.random.normal(k[0], (layers, m, r)) / np.sqrt(m)).astype(dtype),
        "lora_b": (jax.random.normal(k[1], (layers, r, n)) / np.sqrt(r)).astype(dtype),
    }
    grads = {
        "lora_a": (jax.random.normal(k[2], (layers, m, r)) * 1e-2).astype(dtype),
        "lora_b": (jax.random.normal(k[3], (layers, r, n)) * 1e-2).astype(dtype),
    }
    return params, grads


def dense_tree(layers: int, m: int, n: int, dtype=jnp.float32, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 2)
    params = {"w": (jax.random.normal(k[0], (layers, m, n)) / np.sqrt(m)).astype(dtype)}
    grads = {"w": (jax.random.normal(k[1], (layers, m, n)) * 1e-2).astype(dtype)}
    return params, grads


def dense_muon(learning_rate: float) -> optax.GradientTransformation:
    # Stacked (L, m, n) weights: layer axis 0 is a batch axis of the orthogonalization.
    dims = optax.contrib.MuonDimensionNumbers(reduction_axis=1, output_axis=2)
    return optax.contrib.muon(learning_rate, muon_weight_dimension_numbers={"w": dims})


def state_floats(state: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0))


def timed(fns: dict[str, tuple[Any, ...]], repeats: int) -> dict[str, dict[str, float]]:
    """``fns``: name -> (step, params, state, grads). Checks finiteness first."""
    calls = {}
    for name, (step, p, s, g) in fns.items():
        out = step(p, s, g)
        common.assert_finite(out[0], name)
        calls[name] = lambda step=step, p=p, s=s, g=g: step(p, s, g)
    times = common.interleaved_times(calls, repeats)
    return {k: common.summarize(v) for k, v in times.items()}


def run_config(cfg, *, repeats: int, dense_repeats: int, full: bool, machine) -> dict[str, Any]:
    layers, m, n, r = cfg
    params, grads = lora_tree(layers, m, n, r)
    contenders = {
        "adamw": optax.adamw(1e-3),
        "lora_muon": lmj.lora_muon(0.02),
        "lora_muon_paper": lmj.lora_muon(0.02, method="paper"),
    }
    fns = {}
    states = {}
    for name, tx in contenders.items():
        states[name] = tx.init(params)
        fns[name] = (common.optimizer_step(tx), params, states[name], grads)
    res = timed(fns, repeats)
    row: dict[str, Any] = {"config": dict(layers=layers, m=m, n=n, r=r), "times": res}
    elems = layers * (m + n) * r
    row["state_floats"] = {k: state_floats(v) for k, v in states.items()}
    row["lora_elements"] = elems
    bw, gf = machine["bandwidth_gbs"], machine["matmul_gflops"]
    row["roofline_ms"] = {
        "adamw": common.roofline_ms(28 * elems, 10 * elems, bw, gf),
        "lora_muon": common.roofline_ms(20 * elems, (6 * r + 10) * elems, bw, gf),
    }
    if full or layers * m * n < _DENSE_FULL_ONLY:
        dp, dg = dense_tree(layers, m, n)
        tx = dense_muon(0.02)
        dense = timed({"dense_muon": (common.optimizer_step(tx), dp, tx.init(dp), dg)}, dense_repeats)
        row["times"].update(dense)
    return row


def table(rows, machine) -> str:
    lines = [
        f"Machine: {machine['cpu']} ({machine['cores']} cores, {machine['backend']}), "
        f"jax {machine['jax']}, optax {machine['optax']}; float32 matmul "
        f"{machine['matmul_gflops']:.0f} GFLOP/s, best streaming bandwidth "
        f"{machine['bandwidth_gbs']:.1f} GB/s.",
        "",
        "| L, m, n, r | AdamW ms | LoRA-Muon ms (×AdamW) | paper route ms (×AdamW) "
        "| dense Muon ms (÷LoRA-Muon) | roofline AdamW / LoRA-Muon ms |",
        "|---|---|---|---|---|---|",
    ]
    for row in rows:
        c, t = row["config"], row["times"]
        ad = t["adamw"]["median_ms"]
        lm = t["lora_muon"]["median_ms"]
        pa = t["lora_muon_paper"]["median_ms"]
        dm = t.get("dense_muon", {}).get("median_ms")
        dense = f"{dm:.0f} (÷{dm / lm:.0f})" if dm else "— (--full)"
        rf = row["roofline_ms"]
        lines.append(
            f"| {c['layers']}, {c['m']}, {c['n']}, {c['r']} | {ad:.2f} | {lm:.2f} ({lm / ad:.2f}×) "
            f"| {pa:.2f} ({pa / ad:.2f}×) | {dense} | {rf['adamw']:.3f} / {rf['lora_muon']:.3f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--dense-repeats", type=int, default=3)
    ap.add_argument("--full", action="store_true", help="also time dense Muon at 4096²")
    ap.add_argument("--configs", type=str, default=None, help="e.g. '4,1024,1024,16;2,512,512,8'")
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args(argv)
    configs = CONFIGS
    if args.configs:
        configs = tuple(tuple(int(v) for v in c.split(",")) for c in args.configs.split(";"))
    machine = {
        **common.machine_info(),
        "matmul_gflops": common.measure_matmul_gflops(),
        "bandwidth_gbs": common.measure_bandwidth(),
    }
    rows = [
        run_config(c, repeats=args.repeats, dense_repeats=args.dense_repeats, full=args.full, machine=machine)
        for c in configs
    ]
    print(table(rows, machine))
    for row in rows:
        s = row["state_floats"]
        assert s["lora_muon"] == row["lora_elements"], "LoRA-Muon state is not one momentum per factor"
    print("\nOptimizer state: LoRA-Muon keeps exactly one momentum per factor "
          "(state floats == LoRA params); AdamW keeps two.")
    if args.out:
        common.write_json(args.out, {"machine": machine, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
