"""The optax contrib contract, re-expressed as plain functions any optimizer test can call.

Mirrors optax/contrib/_common_test.py: extra args without recompiling, convergence
on the common problems, inject_hyperparams equality, dtype preservation,
MultiSteps, state type stability under ``lax.cond`` and under sharding,
``optax.tree.map_params``, and schedule == constant learning rate. Problems carry a
LoRA pair next to ordinary leaves, so both routes of an alias are exercised.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.helpers import STATE_RTOL, assert_trees_rel_close

Factory = Callable[..., optax.GradientTransformation]


# ------------------------------------------------------------------------- problems


def parabola(dtype=jnp.float32):
    init = jnp.array([-1.0, 10.0, 1.0], dtype)
    final = jnp.array([1.0, -1.0, 1.0], dtype)
    return init, final, lambda p: jnp.sum((p - final) ** 2)


def rosenbrock(dtype=jnp.float32):
    init = jnp.array([0.0, 0.0], dtype)
    final = jnp.array([1.0, 1.0], dtype)
    return init, final, lambda p: (1.0 - p[0]) ** 2 + 100.0 * (p[1] - p[0] ** 2) ** 2


def matrix_parabola(dtype=jnp.float32):
    init = jnp.zeros((2, 2), dtype)
    final = jnp.array([[3.0, -2.0], [1.0, 4.0]], dtype)
    return init, final, lambda p: jnp.sum((p - final) ** 2)


def mixed_tensors(dtype=jnp.float32):
    init = (jnp.zeros((3,), dtype), jnp.zeros((2, 2), dtype))
    final = (jnp.array([1.0, -1.0, 2.0], dtype), jnp.array([[1.0, 0.0], [-1.0, 1.0]], dtype))
    return init, final, lambda p: jnp.sum((p[0] - final[0]) ** 2) + jnp.sum((p[1] - final[1]) ** 2)


COMMON_PROBLEMS = (parabola, rosenbrock, matrix_parabola, mixed_tensors)


def lora_problem(dtype=jnp.float32, m=12, n=10, r=3, batch=(2,)):
    """A stacked LoRA pair plus a bias, fitting a random low-rank target."""
    rng = np.random.default_rng(0)
    target = rng.standard_normal((*batch, m, r)) @ rng.standard_normal((*batch, r, n))
    target = jnp.asarray(target / np.sqrt(m * n), jnp.float32)  # spectral norm ~ 1
    params = {
        "layer": {
            "lora_a": jnp.asarray(rng.standard_normal((*batch, m, r)) / np.sqrt(m), dtype),
            "lora_b": jnp.asarray(rng.standard_normal((*batch, r, n)) / np.sqrt(r), dtype),
        },
        "bias": jnp.zeros((n,), dtype),
    }

    def loss(p):
        a = p["layer"]["lora_a"].astype(jnp.float32)
        b = p["layer"]["lora_b"].astype(jnp.float32)
        pred = a @ b + p["bias"].astype(jnp.float32)
        return jnp.sum((pred - target) ** 2)

    return params, loss


# ------------------------------------------------------------------------ contract


def _step(opt, loss, extra=None):
    def step(params, state):
        grads = jax.grad(loss)(params)
        updates, state = opt.update(grads, state, params, **(extra or {}))
        return optax.apply_updates(params, updates), state

    return step


def check_extra_args_and_no_recompile(opt: optax.GradientTransformation) -> None:
    params, loss = lora_problem()
    extra = {"unexpected_extra_args_your_optimizer_doesnt_expect": 1}
    step = jax.jit(chex.assert_max_traces(_step(opt, loss, extra), n=1))
    state = opt.init(params)
    for _ in range(3):  # a second trace would fail chex.assert_max_traces
        params, state = step(params, state)
    chex.clear_trace_counter()


def check_converges_on_common_problems(
    opt: optax.GradientTransformation, steps: int = 3000
) -> None:
    for problem in COMMON_PROBLEMS:
        init, final, obj = problem()
        state = opt.init(init)
        state = optax.tree.map_params(opt, lambda v: v, state)
        step = _step(opt, obj)
        (params, _), _ = jax.lax.scan(
            lambda c, _, step=step: (step(*c), None), (init, state), length=steps
        )
        chex.assert_trees_all_close(params, final, rtol=3e-2, atol=3e-2)


def check_lora_loss_decreases(
    opt: optax.GradientTransformation, steps: int = 60, factor: float = 0.25
) -> None:
    params, loss = lora_problem()
    start = float(loss(params))
    state = opt.init(params)
    step = jax.jit(_step(opt, loss))
    for _ in range(steps):
        params, state = step(params, state)
    end = float(loss(params))
    assert np.isfinite(end) and end < factor * start, (start, end)


def check_inject_hyperparams(factory: Factory, hparams: dict[str, Any], static_args=()) -> None:
    opt = factory(**hparams)
    opt_inject = optax.inject_hyperparams(factory, static_args=static_args)(**hparams)
    params, loss = lora_problem()
    grads = jax.grad(loss)(params)
    u, s = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
    u_i, s_i = jax.jit(opt_inject.update)(grads, jax.jit(opt_inject.init)(params), params)
    assert_trees_rel_close(u_i, u)
    assert_trees_rel_close(s_i.inner_state, s, rtol=STATE_RTOL)
    # Changing an injected number must not recompile.
    step = jax.jit(chex.assert_max_traces(lambda st: opt_inject.update(grads, st, params), n=1))
    st = opt_inject.init(params)
    _, st = step(st)
    st.hyperparams["learning_rate"] = jnp.asarray(st.hyperparams["learning_rate"] * 0.5)
    step(st)
    chex.clear_trace_counter()


def check_preserves_dtype_and_multisteps(opt: optax.GradientTransformation) -> None:
    for dtype in (jnp.bfloat16, jnp.float32):
        params, loss = lora_problem(dtype)
        grads = jax.grad(loss)(params)
        u, _ = jax.jit(opt.update)(grads, jax.jit(opt.init)(params), params)
        chex.assert_trees_all_equal_dtypes(u, params)
        multi = optax.MultiSteps(opt, every_k_schedule=4)
        u, _ = jax.jit(multi.update)(grads, jax.jit(multi.init)(params), params)
        chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, grads))


def check_state_type_stable(
    opt: optax.GradientTransformation, dtypes=(jnp.float16, jnp.bfloat16, jnp.float32)
) -> None:
    """``jax.typeof`` of the state is the same after init and after an update in ``lax.cond``."""
    for dtype in dtypes:
        params, loss = lora_problem(dtype)
        state = opt.init(params)

        @jax.jit
        def step(params, state, loss=loss):
            grads = jax.grad(loss)(params)
            cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
            updates, new_state = jax.lax.cond(
                cond, lambda: opt.update(grads, state, params), lambda: (params, state)
            )
            return optax.apply_updates(params, updates), new_state

        new_params, new_state = step(params, state)
        assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state), dtype
        chex.assert_trees_all_equal_dtypes(new_params, params)


def check_schedule_equals_constant(factory: Factory, hparams: dict[str, Any]) -> None:
    annotation = inspect.signature(factory).parameters["learning_rate"].annotation
    assert annotation in (optax.ScalarOrSchedule, "optax.ScalarOrSchedule"), annotation
    params, loss = lora_problem()
    outs = []
    for lr in (1e-3, optax.constant_schedule(1e-3)):
        opt = factory(**{**hparams, "learning_rate": lr})
        p, s = params, opt.init(params)
        step = jax.jit(_step(opt, loss))
        for _ in range(5):
            p, s = step(p, s)
        outs.append(p)
    assert_trees_rel_close(outs[0], outs[1])


def check_wrappers(opt: optax.GradientTransformation) -> None:
    """Works inside chain, masked, partition and apply_if_finite."""
    params, loss = lora_problem()
    grads = jax.grad(loss)(params)
    wrapped = [
        optax.chain(optax.clip_by_global_norm(1.0), opt),
        optax.masked(opt, {"layer": {"lora_a": True, "lora_b": True}, "bias": False}),
        optax.partition(
            {"opt": opt, "sgd": optax.sgd(0.1)},
            {"layer": {"lora_a": "opt", "lora_b": "opt"}, "bias": "sgd"},
        ),
        optax.apply_if_finite(opt, max_consecutive_errors=2),
    ]
    for w in wrapped:
        u, s = jax.jit(w.update)(grads, w.init(params), params)
        chex.assert_tree_all_finite(u)
        chex.assert_trees_all_equal_shapes_and_dtypes(u, params)


# The leaves of lora_problem() that every optimizer's own rule takes (a pair, or
# stacked matrices for the dense peers); "bias" goes to the AdamW fallback.
FACTOR_NAMES = ("['layer']['lora_a']", "['layer']['lora_b']")


def check_refuses_complex_leaves(opt: optax.GradientTransformation) -> None:
    """Complex factors raise ``TypeError`` naming each leaf, its dtype and "complex".

    At ``init`` (complex params; the bias, which goes to AdamW, may stay complex and
    is not named) and in ``update`` (real params, complex gradients of the factors).
    """
    params, loss = lora_problem(jnp.complex64)
    with pytest.raises(TypeError, match="complex") as err:
        opt.init(params)
    message = str(err.value)
    for name in FACTOR_NAMES:
        assert f"leaf {name} is complex64" in message, message
    assert "`params`" in message and "bias" not in message, message

    params, loss = lora_problem()
    grads = jax.grad(loss)(params)
    grads["layer"] = {k: g * (1.0 + 1.0j) for k, g in grads["layer"].items()}
    state = opt.init(params)
    with pytest.raises(TypeError, match="complex") as err:
        jax.jit(opt.update)(grads, state, params)
    message = str(err.value)
    for name in FACTOR_NAMES:
        assert f"leaf {name} is complex64" in message, message
    assert "`updates`" in message, message


def check_refuses_integer_leaves(opt: optax.GradientTransformation) -> None:
    """Integer and boolean factors raise ``TypeError`` naming each leaf and its dtype."""
    for dtype in (jnp.int32, jnp.bool_):
        params, _ = lora_problem()
        params["layer"] = {k: v.astype(dtype) for k, v in params["layer"].items()}
        with pytest.raises(TypeError, match="must be floating point") as err:
            opt.init(params)
        message = str(err.value)
        for name in FACTOR_NAMES:
            assert f"leaf {name} is {jnp.dtype(dtype)}" in message, message
        assert "bias" not in message, message


def check_none_state_dtype_is_params_dtype(
    factory: Factory,
    hparams: dict[str, Any],
    dtypes=(jnp.float16, jnp.bfloat16, jnp.float32),
) -> None:
    """``mu_dtype=None`` (``state_dtype=None``) gives the state of the params' own dtype.

    For each params dtype the state built with ``None`` has exactly the types of the
    state built with that dtype named explicitly, at ``init`` and after a jitted
    update (type stable); and some state matrix has the params' dtype.
    """
    names = inspect.signature(factory).parameters
    arg = "mu_dtype" if "mu_dtype" in names else "state_dtype"
    assert arg in names, f"{factory.__name__} has no mu_dtype or state_dtype"
    for dtype in dtypes:
        params, loss = lora_problem(dtype)
        grads = jax.grad(loss)(params)
        implicit = factory(**{**hparams, arg: None})
        explicit = factory(**{**hparams, arg: jnp.dtype(dtype).name})
        state = implicit.init(params)
        want = jax.tree.map(jax.typeof, explicit.init(params))
        assert jax.tree.map(jax.typeof, state) == want, dtype
        _, new_state = jax.jit(implicit.update)(grads, state, params)
        assert jax.tree.map(jax.typeof, new_state) == want, dtype
        matrices = [x for x in jax.tree.leaves(state) if x.ndim >= 2]
        assert any(x.dtype == dtype for x in matrices), (dtype, [x.dtype for x in matrices])
