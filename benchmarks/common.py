"""Shared benchmark machinery: side-by-side timing, machine probes and rooflines.

Timings on shared machines are noisy, so every comparison is made inside one
process, interleaving the contenders repeat by repeat, and reported as medians
with their spread; conclusions are drawn from ratios, never absolute times.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def machine_info() -> dict[str, Any]:
    """CPU/GPU model, core count and library versions, for the results JSON."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    devices = jax.devices()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "backend": jax.default_backend(),
        "device": devices[0].device_kind,
        "device_count": len(devices),
        "jax": jax.__version__,
        "optax": optax.__version__,
        "python": platform.python_version(),
    }


def block(x: Any) -> Any:
    return jax.block_until_ready(x)


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 2
) -> dict[str, np.ndarray]:
    """Seconds per call of each zero-argument function, measured round-robin.

    Each function is called ``warmup`` times first (compilation), then the
    functions take turns ``repeats`` times so that machine noise hits all alike.
    """
    for fn in fns.values():
        for _ in range(warmup):
            block(fn())
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            block(fn())
            times[name].append(time.perf_counter() - start)
    return {k: np.asarray(v) for k, v in times.items()}


def summarize(seconds: np.ndarray) -> dict[str, float]:
    """Median and interquartile range in milliseconds."""
    q1, med, q3 = np.percentile(seconds, [25, 50, 75]) * 1e3
    return {"median_ms": float(med), "q1_ms": float(q1), "q3_ms": float(q3), "n": int(seconds.size)}


def optimizer_step(tx: optax.GradientTransformation, donate: bool = False) -> Any:
    """A jitted ``(params, state, grads) -> (params, state)`` step: update and apply.

    With ``donate`` the params and state buffers are donated, as training loops do:
    the step then updates them in place, and the caller must not reuse its inputs.
    """

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1) if donate else ())


class DonatedCall:
    """A zero-argument call of a donated step on buffers it owns (for the timers).

    Each call donates the params and state it holds and keeps the step's outputs
    for the next call, as a training loop does; ``grads`` stay fixed.
    """

    def __init__(self, step: Callable[..., Any], params: Any, state: Any, grads: Any) -> None:
        self.step, self.grads = step, grads
        self.params, self.state = jax.tree.map(jnp.copy, params), jax.tree.map(jnp.copy, state)

    def __call__(self) -> Any:
        self.params, self.state = self.step(self.params, self.state, self.grads)
        return self.params


def assert_finite(tree: Any, what: str) -> None:
    """Refuses to report a number from a run that produced NaN or inf."""
    bad = [
        x for x in jax.tree.leaves(tree) if not bool(jnp.all(jnp.isfinite(x.astype(jnp.float32))))
    ]
    if bad:
        raise FloatingPointError(f"{what}: the step produced NaN/inf; no timing reported.")


def measure_bandwidth(repeats: int = 20) -> float:
    """Best streaming bandwidth (GB/s) of a jitted ``y = 2x + 1`` over 1–64 MiB.

    The best size is taken (small arrays stream from cache) so that rooflines built
    on it are lower bounds for any working set.
    """
    best = 0.0
    for mib in (1, 4, 16, 64):
        x = jnp.ones((mib * 1024 * 1024 // 4,), jnp.float32)
        fn = jax.jit(lambda v: v * 2.0 + 1.0)
        t = interleaved_times({"bw": lambda fn=fn, x=x: fn(x)}, repeats)["bw"]  # type: ignore[misc]
        best = max(best, 2 * x.nbytes / float(np.median(t)) / 1e9)
    return best


def measure_matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    """Float32 matmul rate (GFLOP/s) of a jitted ``size²`` matmul."""
    a = jnp.ones((size, size), jnp.float32)
    fn = jax.jit(lambda u: u @ u)
    t = interleaved_times({"mm": lambda: fn(a)}, repeats)["mm"]
    return float(2 * size**3 / np.median(t) / 1e9)


def compiled_costs(compiled: Any) -> dict[str, Any]:
    """Peak temporaries, bytes accessed and flops of a compiled step, from XLA.

    The bytes and flops are XLA's cost analysis of the optimized program (a loop body
    counts once); they say what the program moves and computes, not what it must.
    """
    mem = compiled.memory_analysis()
    costs = compiled.cost_analysis() or {}
    if isinstance(costs, list):  # older jax: one dict per program
        costs = costs[0] if costs else {}
    return {
        "peak_temp_bytes": int(getattr(mem, "temp_size_in_bytes", 0)) if mem is not None else None,
        "bytes_accessed": float(costs.get("bytes accessed", 0.0)),
        "flops": float(costs.get("flops", 0.0)),
    }


def roofline_ms(bytes_moved: float, flops: float, bandwidth_gbs: float, gflops: float) -> float:
    """Lower bound on a step's time: the larger of memory time and compute time."""
    return max(bytes_moved / (bandwidth_gbs * 1e9), flops / (gflops * 1e9)) * 1e3


def write_json(path: str, payload: Any) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1, sort_keys=True)
        f.write("\n")
