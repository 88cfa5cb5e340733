"""Every optimizer step that calls LAPACK on CPU survives 500 runs on a 2-thread pool.

On CPU, jaxlib runs a batched LAPACK call (``potrf``, ``trsm``, ``syevd``,
``geqrf``/``orgqr``, ``gesdd``) on XLA's intra-op thread pool; two such calls
scheduled at once can hold every thread of a small pool and deadlock the step
(``lora_muon_jax._lapack_order.after`` orders them). A text check of the HLO cannot
prove that no hang is left, so this test runs the steps.

A child process pinned to 2 CPUs (XLA sizes its intra-op pool to the CPUs it may
use; the child checks that the pool has 2 threads), with one host device, exports
every optimizer's jitted step for ``"cpu"``, finds its ``lapack_*`` custom calls, and
runs each step that has any 500 times (``block_until_ready`` every time) on stacks
of 2 pairs, so every LAPACK call is batched. LoRA-Muon also runs on a rank-deficient
factor, which sends it to its ``eigh`` fallback branch (checked once with a counting
callback). The child prints a marker line per optimizer and every 100 steps; the
parent fails naming the optimizer whose step made no progress for ``STALL_S``
seconds.

``test_unordered_qr_probe`` (marked slow) runs two or four independent batched
``jnp.linalg.qr`` in one jit, with nothing ordering them, to see whether this
machine can produce the hang at all; it reports and does not assert (jaxlib 0.10.2
on the project's 2-core machine: 5,000 runs each, no hang).
"""

from __future__ import annotations

import os
import re
import selectors
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RUNS = 500
STALL_S = 90.0  # no marker for this long: the step is stuck (compiles take < 10 s)
THREADS = 2
# Every optimizer of the package comes from the catalogue (benchmarks/registry.py),
# which says whether its CPU step calls LAPACK; beside them, variants that reach
# other LAPACK calls: name -> (catalogue entry, its extra arguments).
VARIANTS = {
    "lora_muon_eigh_fallback": ("lora_muon", {"beta": 0.9}),  # on a rank-deficient factor
    "lora_muon_eigh": ("lora_muon", {"solver": "eigh"}),
    "lora_rite_escape": ("lora_rite", {"learning_rate": 0.01, "apply_escape": True}),
    "limuon_svd": ("limuon", {"orthogonalizer": "svd"}),
}
# Per-entry arguments of this test (rate 0.05, dense momentum rank 4 otherwise).
HPARAMS = {
    "lora_muon": {"beta": 0.9},
    "lora_rite": {"learning_rate": 0.01},
    "lora_pre_adam": {"learning_rate": 0.01},
}
DENSE_RANK = 4


def _catalogue() -> dict:
    """name -> Method: the catalogue's entries that ship in ``lora_muon_jax``."""
    from benchmarks import registry

    return {name: m for name, m in registry.METHODS.items() if m.ships}


def _expected() -> tuple[set[str], set[str]]:
    """(the steps that must be found calling LAPACK, those that must have none)."""
    shipped = _catalogue()
    with_lapack = {name for name, m in shipped.items() if m.lapack_on_cpu} | set(VARIANTS)
    return with_lapack, set(shipped) - with_lapack


# ------------------------------------------------------------------- child side


def _configs() -> dict:
    """name -> (transformation, params, loss): stacks of 2, so LAPACK calls batch."""
    import jax.numpy as jnp
    import numpy as np

    from tests import contract

    lora, loss = contract.lora_problem(batch=(2,))
    # Rank-deficient for good: the first adapter's a has a zero column and b the
    # matching zero row, so their gradients (and LoRA-Muon's pseudo-inverse step)
    # stay zero there; the Grams stay singular, Cholesky whitening fails its pivot
    # check, and the eigh fallback runs at every step.
    a, b = (np.asarray(lora["layer"][k]).copy() for k in ("lora_a", "lora_b"))
    a[0, :, -1], b[0, -1, :] = 0.0, 0.0
    deficient = {**lora, "layer": {"lora_a": jnp.asarray(a), "lora_b": jnp.asarray(b)}}
    rng = np.random.default_rng(0)
    target = jnp.asarray(rng.standard_normal((2, 24, 16)), jnp.float32)
    dense = {"w": jnp.zeros((2, 24, 16), jnp.float32), "bias": jnp.zeros((16,), jnp.float32)}

    def dense_loss(p):
        return jnp.sum((p["w"] - target) ** 2) + jnp.sum((p["bias"] - 1.0) ** 2)

    from benchmarks import registry

    def build(m, extra: dict) -> tuple:
        kwargs = {"learning_rate": 0.05, **m.variant}
        if m.tree == "dense" and m.rank is not None:
            kwargs["rank"] = DENSE_RANK
        tx = registry.load_factory(m)(**{**kwargs, **extra})
        return (tx, lora, loss) if m.tree == "lora" else (tx, dense, dense_loss)

    shipped = _catalogue()
    configs = {name: build(m, HPARAMS.get(name, {})) for name, m in shipped.items()}
    for name, (base, extra) in VARIANTS.items():
        configs[name] = build(shipped[base], extra)
    tx, _, _ = configs["lora_muon_eigh_fallback"]
    configs["lora_muon_eigh_fallback"] = (tx, deficient, loss)
    return configs


def _train_step(tx, loss):
    import jax
    import optax

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    return step


def _eigh_fallback_runs(tx, params, loss) -> bool:
    """Whether LoRA-Muon's eigh fallback branch executes (a counting callback in it)."""
    import jax

    from lora_muon_jax import _whitened_polar

    calls = []
    real = _whitened_polar.whitened_polar_eigh

    def counted(*args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return real(*args, **kwargs)

    # Traces of lax.cond branches are cached by function: clear them on both sides
    # of the swap so that neither program sees the other's branch.
    jax.clear_caches()
    _whitened_polar.whitened_polar_eigh = counted
    try:
        jax.block_until_ready(_train_step(tx, loss)(params, tx.init(params)))
    finally:
        _whitened_polar.whitened_polar_eigh = real
        jax.clear_caches()
    return bool(calls)


def _pool_threads() -> int:
    """Threads of XLA's intra-op pool (Eigen, named ``tf_XLAEigen``) in this process."""
    names = [Path(f"/proc/self/task/{t}/comm").read_text() for t in os.listdir("/proc/self/task")]
    return sum(name.startswith("tf_XLAEigen") for name in names)


def child(runs: int) -> None:
    """Subprocess side: find each step's LAPACK calls and run the step ``runs`` times."""
    import jax
    import jax.numpy as jnp

    from tests.test_export import solver_calls

    say = lambda *a: print(*a, flush=True)  # noqa: E731
    jax.block_until_ready(jax.jit(jnp.sin)(1.0))  # starts the CPU client's thread pool
    say(
        f"threads {len(os.sched_getaffinity(0))} devices {jax.device_count()} "
        f"pool {_pool_threads()}"
    )
    for name, (tx, params, loss) in _configs().items():
        step, state = _train_step(tx, loss), tx.init(params)
        exported = jax.export.export(step, platforms=["cpu"])(params, state)
        hot, anywhere = solver_calls(exported.mlir_module())
        lapack = sorted(c for c in anywhere if c.startswith("lapack_"))
        say(f"lapack {name} {','.join(lapack) or '-'} hot={','.join(sorted(hot)) or '-'}")
        if not lapack:
            continue
        if name == "lora_muon_eigh_fallback" and not _eigh_fallback_runs(tx, params, loss):
            raise AssertionError("the rank-deficient factor did not reach the eigh fallback")
        say(f"start {name}")
        start = float(loss(params))
        for i in range(runs):
            params, state = jax.block_until_ready(step(params, state))
            if (i + 1) % 100 == 0:
                say(f"progress {name} {i + 1}")
        finite = all(bool(jnp.isfinite(x).all()) for x in jax.tree.leaves((params, state)))
        say(f"done {name} finite={finite} loss {start:.3g} -> {float(loss(params)):.3g}")
    say("all done")


def probe(runs: int, batch: int, calls: int) -> None:
    """Subprocess side: ``calls`` independent batched QRs in one jit, nothing ordering them."""
    import jax
    import jax.numpy as jnp

    xs = [jax.random.normal(jax.random.key(i), (batch, 32, 32)) for i in range(calls)]
    together = jax.jit(lambda xs: [jnp.linalg.qr(x)[0] for x in xs])
    print("start unordered_qr", flush=True)
    for i in range(runs):
        jax.block_until_ready(together(xs))
        if (i + 1) % 100 == 0:
            print(f"progress unordered_qr {i + 1}", flush=True)
    print("done unordered_qr\nall done", flush=True)


# ------------------------------------------------------------------ parent side


def _run_child(code: str, total_s: float) -> tuple[list[str], str | None, str, float]:
    """Runs ``code`` pinned to ``THREADS`` CPUs; returns (lines, stalled-at, stderr, s).

    ``stalled-at`` is the name of the last ``start``-ed optimizer when no line came
    for ``STALL_S`` seconds (or ``total_s`` passed); the child then gets SIGUSR1
    (faulthandler prints every thread's Python stack) and is killed.
    """
    cpus = sorted(os.sched_getaffinity(0))[:THREADS]
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=1 --xla_backend_optimization_level=0",
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    # Pinned by the child itself, before JAX starts (a preexec_fn would run JAX's
    # at-fork hook in this process).
    boot = (
        f"import faulthandler, os, signal; os.sched_setaffinity(0, {cpus!r}); "
        "faulthandler.register(signal.SIGUSR1, all_threads=True); "
    )
    began = time.monotonic()
    errors = tempfile.TemporaryFile("w+")  # a file, not a pipe: a full pipe would stall
    proc = subprocess.Popen(
        [sys.executable, "-c", boot + code],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=errors,
        text=True,
    )
    lines: list[str] = []
    current, stalled = "startup", None
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        last = time.monotonic()
        while True:
            now = time.monotonic()
            if now - last > STALL_S or now - began > total_s:
                stalled = current
                break
            if not sel.select(timeout=1.0):
                continue
            line = proc.stdout.readline()
            if not line:  # the child exited
                break
            lines.append(line.strip())
            last = time.monotonic()
            if m := re.match(r"start (\S+)", line):
                current = m.group(1)
    if stalled is not None:
        proc.send_signal(signal.SIGUSR1)
        time.sleep(2.0)
        proc.kill()
    proc.wait()
    proc.stdout.close()
    with errors:
        errors.seek(0)
        stderr = errors.read()
    if stalled is None and proc.returncode != 0:
        raise AssertionError(
            f"child failed ({proc.returncode}):\n" + "\n".join(lines) + stderr[-4000:]
        )
    return lines, stalled, stderr, time.monotonic() - began


def test_every_lapack_step_survives_500_runs_on_two_threads():
    lines, stalled, stderr, seconds = _run_child(
        f"from tests.test_lapack_hangs import child; child({RUNS})", total_s=600.0
    )
    assert stalled is None, (
        f"{stalled}: its CPU step stalled (no progress for {STALL_S:.0f} s) on a "
        f"{THREADS}-thread pool: a LAPACK deadlock?\n"
        + "\n".join(lines[-5:])
        + "\n"
        + stderr[-6000:]
    )
    # Pinned to THREADS CPUs, XLA's intra-op pool has THREADS threads.
    threads = min(THREADS, len(os.sched_getaffinity(0)))
    assert lines[0] == f"threads {threads} devices 1 pool {threads}", lines[0]
    found = {
        m.group(1): m.group(2) for m in map(re.compile(r"lapack (\S+) (\S+)").match, lines) if m
    }
    with_lapack, no_lapack = _expected()
    calling = {name for name, calls in found.items() if calls != "-"}
    assert calling == with_lapack, found
    assert {name for name, calls in found.items() if calls == "-"} == no_lapack, found
    done = [line.split(" loss ")[0] for line in lines if line.startswith("done ")]
    assert done == [f"done {name} finite=True" for name in found if name in with_lapack], lines
    assert lines[-1] == "all done"
    print(f"{len(done)} LAPACK steps x {RUNS} runs in {seconds:.1f} s")


def test_a_stalled_child_is_named_killed_and_dumped(monkeypatch):
    # The watchdog itself, on a child that stops making progress (no JAX: fast).
    monkeypatch.setattr(sys.modules[__name__], "STALL_S", 2.0)
    code = "import time; print('start stuck_optimizer', flush=True); time.sleep(60)"
    lines, stalled, stderr, seconds = _run_child(code, total_s=30.0)
    assert stalled == "stuck_optimizer" and lines == ["start stuck_optimizer"]
    assert "most recent call first" in stderr, stderr  # faulthandler dumped the stacks
    assert seconds < 15.0


@pytest.mark.slow
@pytest.mark.parametrize("batch,calls", [(2, 2), (16, 2), (16, 4)])
def test_unordered_qr_probe(batch, calls, record_property):
    # Reports whether unordered batched LAPACK calls hang here; if they never do,
    # the test above cannot tell "ordered" from "lucky" on this machine. Not
    # asserted: the outcome depends on the machine and on jaxlib.
    runs = 5000
    lines, stalled, _, seconds = _run_child(
        f"from tests.test_lapack_hangs import probe; probe({runs}, {batch}, {calls})", total_s=300.0
    )
    progress = [line for line in lines if line.startswith("progress")]
    outcome = (
        f"{calls} unordered batched QRs (batch {batch}) on {THREADS} threads: "
        + (
            f"HUNG after {progress[-1].split()[-1] if progress else 0} runs"
            if stalled
            else f"{runs} runs, no hang"
        )
        + f" ({seconds:.1f} s)"
    )
    record_property("lapack_probe", outcome)
    print(outcome)
