"""What the accelerator program contains: the step exported for CUDA and TPU.

``jax.export`` lowers a jitted step for a platform without its device, so these
tests read the StableHLO a GPU or TPU would run. Small batched solver calls
(cuSOLVER, LAPACK, TPU ``Eigh``/``Qr``) are slow there, so the default step must keep
them off its hot path: any solver call may only sit inside a conditional branch (the
``lax.cond`` fallback that a residual check selects), directly or through functions
called only from such branches.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import optax
import pytest
from jax import export
from jax.interpreters import mlir
from jaxlib.mlir import ir

import lora_muon_jax as lmj

SOLVER_CALL = re.compile(r"cusolver|cublas|lapack|eigh|qr|svd|lu|potrf|syevd|geqrf", re.I)
CONDITIONALS = ("stablehlo.case", "stablehlo.if")


def _is_conditional(op: ir.Operation) -> bool:
    # `jax.lax.platform_dependent` lowers to a one-branch `case` that always runs:
    # only an op with several branches makes what is inside it conditional.
    return op.name in CONDITIONALS and len(op.regions) > 1


def _walk(op: ir.Operation, guarded: bool) -> Iterator[tuple[ir.Operation, bool]]:
    """Every operation under ``op``, with whether a conditional branch encloses it."""
    for region in op.regions:
        for block in region.blocks:
            for child in block.operations:
                child = child.operation
                yield child, guarded
                yield from _walk(child, guarded or _is_conditional(child))


def _attr(op: ir.Operation, name: str) -> str:
    return str(op.attributes[name]).strip('"@') if name in op.attributes else ""


def solver_calls(mlir_text: str) -> tuple[set[str], set[str]]:
    """Solver custom calls of a module: ``(on the hot path, anywhere)``.

    The hot path is every operation reachable from ``main`` outside conditional
    branches, following ``func.call`` into called functions.
    """
    module = ir.Module.parse(mlir_text, context=mlir.make_ir_context())
    funcs = {_attr(op.operation, "sym_name"): op.operation for op in module.body.operations}
    anywhere = {
        _attr(op, "call_target_name")
        for func in funcs.values()
        for op, _ in _walk(func, False)
        if op.name == "stablehlo.custom_call"
    }
    hot: set[str] = set()
    pending, seen = ["main"], set()
    while pending:  # functions reachable from main through unguarded calls
        name = pending.pop()
        if name in seen or name not in funcs:
            continue
        seen.add(name)
        for op, guarded in _walk(funcs[name], False):
            if op.name == "stablehlo.custom_call" and not guarded:
                hot.add(_attr(op, "call_target_name"))
            elif op.name == "func.call" and not guarded:
                pending.append(_attr(op, "callee"))
    solver = {c for c in anywhere if SOLVER_CALL.search(c)}
    return hot & solver, solver


def _exported_step(tx: optax.GradientTransformation, platform: str) -> str:
    params = {
        "q": {"lora_a": jnp.ones((2, 32, 4)), "lora_b": jnp.ones((2, 4, 24))},
        "k": {"lora_a": jnp.ones((16, 8)), "lora_b": jnp.ones((8, 16))},
        "bias": jnp.ones((24,)),
    }
    state = tx.init(params)

    def step(params, state, grads):
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    exported = export.export(jax.jit(step), platforms=[platform])(params, state, params)
    return exported.mlir_module()


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize(
    "kwargs",
    [dict(), dict(solver="newton_schulz"), dict(method="paper")],
    ids=["default", "newton_schulz", "paper"],
)
def test_accelerator_step_has_no_solver_call_on_its_hot_path(platform, kwargs):
    hot, anywhere = solver_calls(_exported_step(lmj.lora_muon(0.1, **kwargs), platform))
    assert hot == set()
    # The Gram routes keep their eigh fallback, inside a conditional branch; the
    # paper's route is matrix products only.
    assert bool(anywhere) == (kwargs.get("method") != "paper"), anywhere


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
def test_the_check_finds_a_solver_call_on_the_hot_path(platform):
    # The exact eigendecomposition solver calls eigh unconditionally: the check must
    # see it (otherwise the test above could not fail).
    hot, _ = solver_calls(_exported_step(lmj.lora_muon(0.1, solver="eigh"), platform))
    assert hot


def test_cpu_route_is_chosen_per_platform():
    # "auto" picks Cholesky whitening on CPU (two small LAPACK calls) and
    # Newton–Schulz elsewhere: the CUDA program has no Cholesky at all.
    tx = lmj.lora_muon(0.1)
    cpu_hot, _ = solver_calls(_exported_step(tx, "cpu"))
    _, cuda_all = solver_calls(_exported_step(tx, "cuda"))
    assert any("potrf" in c for c in cpu_hot), cpu_hot
    assert not any("potrf" in c for c in cuda_all), cuda_all
