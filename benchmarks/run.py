"""One entry point for every benchmark table and plot in the README.

Usage::

    python -m benchmarks.run [--quick] [--out benchmarks/results/cpu.json]
    python -m benchmarks.plots benchmarks/results/cpu.json   # PNGs + markdown tables

Sections (each measured side by side in one process, medians and quartiles over
``--repeats`` runs after warm-up, NaN runs refused):

* ``targets``: the core configurations (layers, m, n, r) of the issue tracker:
  LoRA-Muon (default and paper route) vs AdamW on the LoRA tree, AdamW and
  ``optax.contrib.muon`` on the equivalent dense tree, and every peer optimizer on
  the tree it is made for, with a roofline column;
* ``sweep_m``, ``sweep_r``, ``sweep_layers``, ``sweep_dtype``: one-at-a-time sweeps
  around (L, m, n, r) = (4, 1024, 1024, 16) to show how the cost grows;
* ``memory``: exact optimizer-state bytes per method (from the state tree) and the
  peak temporary bytes of the compiled step (XLA memory analysis);
* ``end_to_end``: a full training step (forward, backward, update) of the
  quickstart model with LoRA-Muon vs AdamW.

Results go to JSON with machine information.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common, registry, trees
from benchmarks.trees import CONFIGS, dense_tree, lora_tree, state_floats

# ----------------------------------------------------------------------------- methods
# Every optimizer comes from the one registry (benchmarks/registry.py), at its
# default benchmark rate; the keys are the tables' column names.

Factory = Callable[[Any], optax.GradientTransformation]

# The LoRA tree: AdamW (the tables' baseline, their first column, keyed "adamw"),
# then every LoRA method of the catalogue.
LORA_METHODS = {
    "adamw": "adamw_lora",
    **{n: n for n in registry.names("lora") if n != "adamw_lora"},
}
# The equivalent dense tree: dense AdamW, stock optax Muon, then every dense-matrix
# peer the package ships.
DENSE_METHODS = {
    n: n
    for n in ("dense_adamw", "dense_muon_optax")
    + tuple(n for n in registry.names("dense") if registry.get(n).ships)
}
# A deliberate override of registry.PEER_RANK (8, the study's): these tables time
# the dense-weight peers at momentum rank 16.
TABLE_PEER_RANK = 16


def _factory(name: str) -> Factory:
    method = registry.get(name)
    options: dict[str, Any] = {} if method.rank is None else {"rank": TABLE_PEER_RANK}
    return lambda params: registry.make(name, method.default_lr, params, **options)


def _lora_methods() -> dict[str, Factory]:
    return {key: _factory(name) for key, name in LORA_METHODS.items()}


def _dense_methods() -> dict[str, Factory]:
    return {key: _factory(name) for key, name in DENSE_METHODS.items()}


# ------------------------------------------------------------------------------ guards


def _available_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 40


def check_fits(layers: int, m: int, n: int, r: int, dtype, dense: bool) -> None:
    """Refuses a configuration whose arrays cannot fit in memory, with the numbers."""
    size = jnp.dtype(dtype).itemsize
    elems = layers * m * n if dense else layers * (m + n) * r
    # params, grads, up to two moments, update and new params, plus temporaries.
    need = 8 * elems * size
    have = _available_bytes()
    if need > 0.8 * have:
        kind = "dense" if dense else "LoRA"
        raise MemoryError(
            f"benchmark config (L={layers}, m={m}, n={n}, r={r}, {jnp.dtype(dtype).name}, {kind}) "
            f"needs about {need / 2**30:.1f} GiB but only {have / 2**30:.1f} GiB is available; "
            "choose smaller sizes."
        )


# ----------------------------------------------------------------------------- sections


def _time_methods(methods: dict[str, Factory], params, grads, repeats: int) -> dict[str, Any]:
    """Interleaved step times of every method, with what XLA says each step costs.

    Every step is jitted with update and ``apply_updates`` in one program and params
    and state donated, as training loops run it; the non-donated step is timed in the
    same rounds (``plain_ratio_to_first``). Per method: time quartiles, the median
    of per-round ratios to the first method (robust to machine drift), optimizer-state
    size, peak temporary bytes of the compiled donated step (XLA memory analysis),
    and the bytes it accesses and the flops it does (XLA cost analysis of the
    compiled step; a loop body counts once).
    """
    fns: dict[str, Callable[[], Any]] = {}
    states: dict[str, Any] = {}
    compiled: dict[str, Any] = {}
    for name, make in methods.items():
        tx = make(params)
        state = tx.init(params)
        step = common.optimizer_step(tx)
        donated = common.optimizer_step(tx, donate=True)
        out = step(params, state, grads)
        common.assert_finite(out[0], name)
        compiled[name] = donated.lower(params, state, grads).compile()
        states[name] = state
        fns[name] = common.DonatedCall(donated, params, state, grads)
        fns[f"{name}/plain"] = lambda step=step, state=state: step(params, state, grads)  # type: ignore[misc]
    times = common.interleaved_times(fns, repeats)
    first = next(iter(methods))
    base, base_plain = times[first], times[f"{first}/plain"]
    return {
        name: {
            **common.summarize(times[name]),
            "ratio_to_first": float(np.median(times[name] / base)),
            "plain_ratio_to_first": float(np.median(times[f"{name}/plain"] / base_plain)),
            "state_bytes": int(sum(np.asarray(x).nbytes for x in jax.tree.leaves(states[name]))),
            "state_floats": state_floats(states[name]),
            **common.compiled_costs(compiled[name]),
        }
        for name in methods
    }


def lora_row(
    cfg, repeats: int, dtype=jnp.float32, methods=None, with_dense: bool = True
) -> dict[str, Any]:
    layers, m, n, r = cfg
    check_fits(layers, m, n, r, dtype, dense=False)
    params, grads = lora_tree(layers, m, n, r, dtype)
    row: dict[str, Any] = {
        "config": {"layers": layers, "m": m, "n": n, "r": r, "dtype": jnp.dtype(dtype).name},
        "lora": _time_methods(methods or _lora_methods(), params, grads, repeats),
    }
    if with_dense:
        check_fits(layers, m, n, r, dtype, dense=True)
        dp, dg = dense_tree(layers, m, n, dtype)
        row["dense"] = _time_methods(_dense_methods(), dp, dg, max(3, repeats // 5))
    return row


def model_row(
    model: str, layers: int, r: int, repeats: int, dtype=jnp.float32, methods=None
) -> dict[str, Any]:
    """Every LoRA method on a model-shaped adapter tree (see ``benchmarks.trees``)."""
    params, grads = trees.model_tree(model, layers, r, dtype)
    elems = trees.adapter_elements(model, layers, r)
    check_fits(1, elems, 1, 1, dtype, dense=True)
    return {
        "config": {
            "model": model,
            "layers": layers,
            "r": r,
            "dtype": jnp.dtype(dtype).name,
            "elements": elems,
        },
        "lora": _time_methods(methods or _lora_methods(), params, grads, repeats),
    }


def end_to_end(
    repeats: int,
    *,
    width: int = 128,
    depth: int = 2,
    rank: int = 16,
    seq_len: int = 64,
    batch: int = 32,
) -> dict[str, Any] | None:
    """Forward + backward + update of the quickstart model: LoRA-Muon vs AdamW."""
    try:
        from flax import nnx

        from lora_muon_jax_examples import char_lm as models
    except ImportError:
        return None
    cfg = dict(vocab_size=65, width=width, depth=depth, heads=4, rank=rank, seq_len=seq_len)
    tokens = jax.random.randint(jax.random.key(0), (batch, seq_len + 1), 0, cfg["vocab_size"])
    batch_xy = (tokens[:, :-1], tokens[:, 1:])
    fns = {}
    for name, method, lr in (("adamw", "adamw_lora", 1e-3), ("lora_muon", "lora_muon", 0.05)):
        model = models.CharTransformer(**cfg, rngs=nnx.Rngs(0))
        tx = registry.make(method, lr, nnx.state(model, nnx.Param))
        opt = nnx.Optimizer(model, tx, wrt=nnx.Param)

        @nnx.jit
        def step(model, opt, batch):
            loss, grads = nnx.value_and_grad(models.loss_fn)(model, batch)
            opt.update(model, grads)
            return loss

        loss = step(model, opt, batch_xy)
        if not np.isfinite(float(loss)):
            raise FloatingPointError(f"end_to_end {name}: NaN loss; no timing reported")
        fns[name] = lambda step=step, model=model, opt=opt: step(model, opt, batch_xy)
    times = common.interleaved_times(fns, repeats)
    return {"config": cfg, "batch": batch, **{k: common.summarize(v) for k, v in times.items()}}


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="small sizes and few repeats (a smoke run)"
    )
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--sections",
        type=str,
        default="targets,models,sweep_m,sweep_r,sweep_layers,sweep_dtype,end_to_end",
    )
    ap.add_argument("--out", type=str, default="benchmarks/results/results.json")
    return ap


def _sweep_configs(
    base: tuple[int, int, int, int], quick: bool
) -> dict[str, list[tuple[int, int, int, int]]]:
    """The configurations of the ``sweep_m``, ``sweep_r`` and ``sweep_layers`` sections."""
    return {
        "sweep_m": [
            (base[0], s, s, base[3])
            for s in ((128, 256, 512) if quick else (512, 1024, 2048, 4096, 8192))
        ],
        "sweep_r": [
            (base[0], base[1], base[2], r)
            for r in ((1, 4, 16) if quick else (1, 2, 4, 8, 16, 32, 64, 128))
        ],
        "sweep_layers": [
            (L, base[1], base[2], base[3]) for L in ((1, 2, 4) if quick else (1, 2, 4, 8, 16, 32))
        ],
    }


def main(argv=None) -> dict[str, Any]:
    args = _parser().parse_args(argv)
    repeats = args.repeats or (5 if args.quick else 20)
    sections = set(args.sections.split(","))
    machine = {
        **common.machine_info(),
        "matmul_gflops": common.measure_matmul_gflops(repeats=3 if args.quick else 10),
        "bandwidth_gbs": common.measure_bandwidth(repeats=3 if args.quick else 20),
    }
    results: dict[str, Any] = {"machine": machine, "quick": args.quick, "repeats": repeats}
    base = (2, 256, 256, 8) if args.quick else (4, 1024, 1024, 16)

    def log(msg):
        print(msg, flush=True)

    def save() -> None:
        # After every section: a crash or an interrupt keeps what was measured.
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        common.write_json(args.out, results)

    if "targets" in sections:
        cfgs = ((2, 256, 256, 8), (1, 512, 512, 16)) if args.quick else CONFIGS
        results["targets"] = []
        for c in cfgs:
            log(f"targets {c}")
            row = lora_row(c, repeats, with_dense=args.quick or c[1] * c[2] <= 2048 * 2048)
            elems = c[0] * (c[1] + c[2]) * c[3]
            bw, gf = machine["bandwidth_gbs"], machine["matmul_gflops"]
            row["roofline_ms"] = {
                "adamw": common.roofline_ms(28 * elems, 10 * elems, bw, gf),
                "lora_muon": common.roofline_ms(20 * elems, (6 * c[3] + 10) * elems, bw, gf),
            }
            results["targets"].append(row)
        save()
    if "models" in sections:
        results["models"] = []
        specs = (
            [("llama7b", 1, 4)]
            if args.quick
            else [(model, 4, r) for model in trees.MODELS for r in (16, 64)]
        )
        for model, layers, r in specs:
            log(f"models {model} L={layers} r={r}")
            results["models"].append(model_row(model, layers, r, repeats))
            save()
    core = {"adamw": _lora_methods()["adamw"], "lora_muon": _lora_methods()["lora_muon"]}
    sweeps = _sweep_configs(base, args.quick)
    for name, sweep_cfgs in sweeps.items():
        if name in sections:
            results[name] = []
            for c in sweep_cfgs:
                log(f"{name} {c}")
                results[name].append(lora_row(c, repeats, methods=core, with_dense=False))
            save()
    if "sweep_dtype" in sections:
        results["sweep_dtype"] = []
        for dtype in (jnp.float32, jnp.bfloat16):
            log(f"sweep_dtype {jnp.dtype(dtype).name}")
            results["sweep_dtype"].append(
                lora_row(base, repeats, dtype=dtype, methods=core, with_dense=False)
            )
        save()
    if "end_to_end" in sections:
        log("end_to_end")
        small = dict(width=32, depth=1, rank=4, seq_len=16, batch=4) if args.quick else {}
        results["end_to_end"] = end_to_end(repeats, **small)
    save()
    log(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
