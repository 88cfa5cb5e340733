"""One process of a multi-host run (``tests/test_multihost.py`` starts two).

Each process owns the CPU devices given by ``XLA_FLAGS`` and joins JAX's own
multi-controller runtime (``jax.distributed.initialize``, gloo collectives over
TCP); from then on the code is the single-process code: one global mesh over every
device, params sharded FSDP-style (``a`` along ``m``, ``b`` along ``n``), the batch
sharded along its rows, one jitted train step. Process 0 writes the trajectory
(params after every step, gathered with ``process_allgather``) and the compiled
HLO of LoRA-Muon's update to ``--out``.

:func:`trajectories` is also the single-process reference (``mesh=None``).

    python tests/multihost_worker.py --process-id 0 --num-processes 2 --port 12345 --out DIR
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import multihost_utils
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

L, M, N, R, BATCH = 2, 16, 12, 4, 16  # M, N and BATCH divisible by 4 devices
STEPS = 4
AXIS = "fsdp"
SPECS = {
    "params": {
        "layer": {"lora_a": P(None, AXIS, None), "lora_b": P(None, None, AXIS)},
        "bias": P(),
    },
    "x": P(AXIS, None),
    "y": P(AXIS, None),
}


def optimizers() -> dict[str, optax.GradientTransformation]:
    import lora_muon_jax as lmj
    from lora_muon_jax import peers

    return {
        "lora_muon": lmj.lora_muon(0.05, beta=0.9, weight_decay=0.1),
        "spectron": peers.spectron(0.05, weight_decay=0.1),
        "lora_rite": peers.lora_rite(0.01, weight_decay=0.1),
        "riemannion": peers.riemannion(0.05, 0.9, weight_decay=0.1),
    }


def problem() -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Global float32 params and data of a stacked-LoRA regression (seeded)."""
    rng = np.random.default_rng(0)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    params = {
        "layer": {
            "lora_a": f32(rng.standard_normal((L, M, R)) / np.sqrt(M)),
            "lora_b": f32(rng.standard_normal((L, R, N)) / np.sqrt(R)),
        },
        "bias": f32(np.zeros(N)),
    }
    x = f32(rng.standard_normal((BATCH, M)))
    target = rng.standard_normal((L, M, R)) @ rng.standard_normal((L, R, N))
    y = f32(np.einsum("bm,lmn->bn", x, target) / np.sqrt(M * R))
    return params, x, y


def loss_fn(params: dict[str, Any], x: jax.Array, y: jax.Array) -> jax.Array:
    a, b = params["layer"]["lora_a"], params["layer"]["lora_b"]
    pred = jnp.einsum("bm,lmr,lrn->bn", x, a, b) + params["bias"]
    return jnp.mean(jnp.square(pred - y))


def train_step(tx: optax.GradientTransformation) -> Callable:
    @jax.jit
    def step(params, state, x, y):
        grads = jax.grad(loss_fn)(params, x, y)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return step


def _global(mesh: jax.sharding.Mesh | None, spec: P, value: np.ndarray) -> jax.Array:
    """A global array from the same host value on every process (no data is sent)."""
    if mesh is None:
        return jnp.asarray(value)
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])


def _batch(mesh: jax.sharding.Mesh | None, spec: P, value: np.ndarray) -> jax.Array:
    """The data-loader pattern: each process passes only its own rows."""
    if mesh is None:
        return jnp.asarray(value)
    rows = value.shape[0] // jax.process_count()
    local = value[jax.process_index() * rows : (jax.process_index() + 1) * rows]
    return jax.make_array_from_process_local_data(NamedSharding(mesh, spec), local)


def trajectories(mesh: jax.sharding.Mesh | None, steps: int = STEPS) -> dict[str, np.ndarray]:
    """``{"<optimizer>/<step>/<leaf>": params}`` after each step, on the host."""
    raw, x_np, y_np = problem()
    params = jax.tree.map(lambda s, v: _global(mesh, s, v), SPECS["params"], raw)
    x, y = _batch(mesh, SPECS["x"], x_np), _batch(mesh, SPECS["y"], y_np)
    out = {}
    for name, tx in optimizers().items():
        began = time.perf_counter()
        p, state, step = params, tx.init(params), train_step(tx)
        for t in range(steps):
            p, state = step(p, state, x, y)
            host = multihost_utils.process_allgather(p, tiled=True) if mesh else jax.device_get(p)
            for path, leaf in jax.tree_util.tree_flatten_with_path(host)[0]:
                out[f"{name}/{t}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
        print(f"{name}: {steps} steps in {time.perf_counter() - began:.1f} s", flush=True)
    return out


def update_hlo(mesh: jax.sharding.Mesh) -> str:
    """The compiled HLO of LoRA-Muon's ``update`` alone on the sharded tree."""
    tx = optimizers()["lora_muon"]
    raw, *_ = problem()
    params = jax.tree.map(lambda s, v: _global(mesh, s, v), SPECS["params"], raw)
    grads = jax.tree.map(lambda v: 0.1 * v + 0.01, params)
    return jax.jit(tx.update).lower(grads, tx.init(params), params).compile().as_text()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"localhost:{args.port}",
        num_processes=args.num_processes,
        process_id=args.process_id,
        initialization_timeout=60,
    )
    # Every device of every process, in one mesh; auto axes: jit's partitioner
    # places the collectives, so the step is the unsharded code.
    mesh = jax.make_mesh((jax.device_count(),), (AXIS,), axis_types=(AxisType.Auto,))
    print(
        f"process {jax.process_index()}/{jax.process_count()}: local devices "
        f"{[d.id for d in jax.local_devices()]} of {jax.device_count()}",
        flush=True,
    )
    result = trajectories(mesh)
    if jax.process_index() == 0:  # compiling alone needs no peer
        args.out.mkdir(parents=True, exist_ok=True)
        np.savez(args.out / "trajectories.npz", **result)
        (args.out / "lora_muon_update.hlo.txt").write_text(update_hlo(mesh))
    multihost_utils.sync_global_devices("done")  # nobody leaves while others gather
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
