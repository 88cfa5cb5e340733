"""The optax contrib contract, re-expressed as plain functions any optimizer test can call.

Mirrors optax/contrib/_common_test.py: extra args without recompiling, convergence
on the common problems, inject_hyperparams equality, dtype preservation,
MultiSteps, state type stability under ``lax.cond`` and under sharding,
``optax.tree.map_params``, and schedule == constant learning rate. From
optax/_src/alias_test.py and optax/contrib/_muon_test.py: complex targets (refused
for the LoRA rules; followed exactly like :func:`optax.adamw` on a leaf the AdamW
fallback takes), explicit state dtypes, and state types from float16 to complex128.
Problems carry a LoRA pair next to ordinary leaves, so both routes of an alias are
exercised.
"""

from __future__ import annotations

import inspect
import typing
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


def real_dtype(dtype) -> jnp.dtype:
    """complex64 -> float32, complex128 -> float64; a real dtype is itself."""
    return jnp.dtype(jnp.finfo(dtype).dtype)


def needs_x64(dtype) -> bool:
    return jnp.finfo(dtype).bits == 64


def parabola_target(dtype=jnp.complex64):
    """optax's parabola, complex when ``dtype`` is: target ``[1, -1, 1] (1 + i)``."""
    init = jnp.array([-1.0, 10.0, 1.0], dtype)
    final = jnp.array([1.0, -1.0, 1.0], dtype)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        final = final * (1 + 1j)
    return init, final


def abs_sq_loss(final):
    """``sum |x - final|²``, real for complex ``x`` (optax's ``numerics.abs_sq``)."""
    return lambda x: jnp.sum(jnp.real((x - final) * jnp.conj(x - final)))


def with_adamw_leaf(dtype, factor_dtype=None):
    """lora_problem() (in ``factor_dtype``, default ``dtype``'s real part) plus a leaf ``z``.

    ``z`` (``dtype``, 1-D, in no pair) follows optax's parabola, so every alias sends
    it to its AdamW fallback; for a complex ``dtype`` it is optax's complex target.
    """
    params, lora_loss = lora_problem(factor_dtype or real_dtype(dtype))
    params["z"], final = parabola_target(dtype)
    z_loss = abs_sq_loss(final)
    return params, lambda p: lora_loss(p) + z_loss(p["z"])


# ------------------------------------------------------------------------ contract


def _grads(loss, params):
    """``jax.grad``, conjugated on complex leaves: optax's convention for descent."""
    grads = jax.grad(loss)(params)
    return jax.tree.map(lambda g: g.conj() if jnp.iscomplexobj(g) else g, grads)


def _step(opt, loss, extra=None):
    def step(params, state):
        grads = _grads(loss, params)
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


# optax's dtypes for state stability (alias_test.py's test_state_shape_dtype_shard_stability).
STABILITY_DTYPES = (
    jnp.float16,
    jnp.bfloat16,
    jnp.float32,
    jnp.float64,
    jnp.complex64,
    jnp.complex128,
)


def check_state_type_stable(
    opt: optax.GradientTransformation,
    dtypes=STABILITY_DTYPES,
    complex_factors: bool = False,
) -> None:
    """``jax.typeof`` of the state is the same after init and after updates in ``lax.cond``.

    On :func:`with_adamw_leaf` of each dtype (float64 and complex128 with x64 on),
    for two steps of one trace. Unless ``complex_factors``, a complex dtype puts its
    real part on the factors (complex factors are refused) and the complex dtype on
    the AdamW leaf ``z``. Params keep their dtypes.
    """
    for dtype in dtypes:
        with jax.enable_x64(needs_x64(dtype)):
            factor_dtype = dtype if complex_factors else real_dtype(dtype)
            params, loss = with_adamw_leaf(dtype, factor_dtype)
            _check_cond_step_type_stable(opt, params, loss, jnp.dtype(dtype).name)


def _check_cond_step_type_stable(opt, params, loss, label) -> None:
    def step(params, state):
        grads = _grads(loss, params)
        cond = jax.random.randint(jax.random.key(0), (), 0, 2) == 0
        updates, new_state = jax.lax.cond(
            cond, lambda: opt.update(grads, state, params), lambda: (params, state)
        )
        return optax.apply_updates(params, updates), new_state

    step = jax.jit(chex.assert_max_traces(step, n=1))  # a changed state type retraces
    state = opt.init(params)
    want = jax.tree.map(jax.typeof, state)
    new_params = params
    try:
        for _ in range(2):
            new_params, state = step(new_params, state)
            assert jax.tree.map(jax.typeof, state) == want, label
            chex.assert_trees_all_equal_shapes_and_dtypes(new_params, params)
    finally:
        chex.clear_trace_counter()


def schedule_arguments(factory: Factory) -> list[str]:
    """Arguments whose resolved annotation takes a schedule (optionally ``None``)."""
    takes = (optax.ScalarOrSchedule, optax.Schedule)
    hints = typing.get_type_hints(factory)  # resolves `from __future__ import annotations`
    return [n for n, t in hints.items() if t in takes or t in [x | None for x in takes]]


# A number for every argument annotated to take a schedule (optax's learning rate).
SCHEDULE_VALUES = {"learning_rate": 1e-3, "weight_decay": 0.1, "adam_learning_rate": 2e-3}


def check_schedule_equals_constant(factory: Factory, hparams: dict[str, Any]) -> None:
    """``learning_rate`` is annotated ``optax.ScalarOrSchedule`` (resolved, not a string),
    and with every argument so annotated a constant or ``optax.constant_schedule`` of
    it (``SCHEDULE_VALUES``) the runs agree.
    """
    hint = typing.get_type_hints(factory)["learning_rate"]
    assert hint in (optax.ScalarOrSchedule, optax.Schedule), hint
    names = schedule_arguments(factory)
    assert set(names) <= set(SCHEDULE_VALUES), f"no value in SCHEDULE_VALUES for {names}"
    params, loss = lora_problem()
    outs = []
    for wrap in (float, optax.constant_schedule):
        opt = factory(**{**hparams, **{n: wrap(SCHEDULE_VALUES[n]) for n in names}})
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


def check_refuses_complex_leaves(opt: optax.GradientTransformation, dtype=jnp.complex64) -> None:
    """Complex factors raise ``TypeError`` naming each leaf, its dtype and "complex".

    At ``init`` (complex params; the bias, which goes to AdamW, may stay complex and
    is not named) and in ``update`` (real params, complex gradients of the factors).
    ``dtype`` complex128 needs x64 on.
    """
    dtype = jnp.dtype(dtype)
    params, loss = lora_problem(dtype)
    with pytest.raises(TypeError, match="complex") as err:
        opt.init(params)
    message = str(err.value)
    for name in FACTOR_NAMES:
        assert f"leaf {name} is {dtype}" in message, message
    assert "`params`" in message and "bias" not in message, message

    params, loss = lora_problem(real_dtype(dtype))
    grads = jax.grad(loss)(params)
    grads["layer"] = {k: g * (1.0 + 1.0j) for k, g in grads["layer"].items()}
    assert {g.dtype for g in grads["layer"].values()} == {dtype}
    state = opt.init(params)
    with pytest.raises(TypeError, match="complex") as err:
        jax.jit(opt.update)(grads, state, params)
    message = str(err.value)
    for name in FACTOR_NAMES:
        assert f"leaf {name} is {dtype}" in message, message
    assert "`updates`" in message, message


def _scan_steps(opt, params, loss, steps, track=lambda p: p):
    """``steps`` jitted steps in one ``lax.scan``: final (params, state), ``track`` per step."""
    step = _step(opt, loss)

    def body(carry, _):
        carry = step(*carry)
        return carry, track(carry[0])

    return jax.jit(lambda c: jax.lax.scan(body, c, length=steps))((params, opt.init(params)))


# A complex leaf in no pair, through an alias, vs optax.adamw on that leaf alone: the
# same AdamW arithmetic on the same numbers, but compiled inside a different program
# (partition, the pair's rule beside it), so XLA may fuse or contract it differently;
# PROGRAM_RTOL (tests/helpers.py) bounds that. Measured (jax 0.10.2, CPU): equal to
# the bit. 3000 steps: optax.adamw at the table's rates (0.01, 0.02) is then within
# 9e-3 of the target, inside optax's 3e-2 (alias_test.py's test_optimization).
ADAMW_LEAF_STEPS = 3000


def _real_view(z):
    return jnp.stack([jnp.real(z), jnp.imag(z)], axis=-1)


def check_complex_leaf_like_adamw(
    opt: optax.GradientTransformation, adamw: optax.GradientTransformation
) -> None:
    """A complex leaf in no pair follows ``adamw`` on optax's complex parabola.

    ``adamw`` is :func:`optax.adamw` with the alias's fallback settings. After
    ``ADAMW_LEAF_STEPS`` steps the alias's ``z`` is complex64, its path (every step)
    equals ``adamw``'s within ``PROGRAM_RTOL`` (relative, Frobenius, real and
    imaginary parts side by side), and it has reached the complex target within
    optax's ``rtol=atol=3e-2``.
    Only ``z`` is checked: the pair trains beside it for as many steps at the table's
    rate, which some rules are not made for (LoRA-Pre-Adam at rank < min(p, q) can
    diverge, as its docstring warns); test_loss_decreases covers the pair.
    """
    params, loss = with_adamw_leaf(jnp.complex64)
    init, final = parabola_target(jnp.complex64)
    (got, _), got_path = _scan_steps(opt, params, loss, ADAMW_LEAF_STEPS, lambda p: p["z"])
    (want, _), want_path = _scan_steps(adamw, init, abs_sq_loss(final), ADAMW_LEAF_STEPS)
    assert got["z"].dtype == jnp.complex64, got["z"].dtype
    # The whole path (at the end both have converged, whatever their settings).
    assert_trees_rel_close(_real_view(got_path), _real_view(want_path))
    chex.assert_trees_all_close(got["z"], final, rtol=3e-2, atol=3e-2)


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
    arg = state_dtype_argument(factory)
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


def state_dtype_argument(factory: Factory) -> str:
    names = inspect.signature(factory).parameters
    arg = "mu_dtype" if "mu_dtype" in names else "state_dtype"
    assert arg in names, f"{factory.__name__} has no mu_dtype or state_dtype"
    return arg


# optax's test_explicit_dtype pairs (params dtype, state dtype), one narrowing, two widening.
EXPLICIT_DTYPES = (
    (jnp.float32, jnp.bfloat16),
    (jnp.float16, jnp.float32),
    (jnp.bfloat16, jnp.float32),
)


def _retyped(state, fields: tuple[str, ...], dtype) -> tuple[Any, set[str]]:
    """``jax.typeof`` of ``state`` with the leaves under attribute ``fields`` in ``dtype``."""
    found: set[str] = set()

    def retype(path, x):
        hit = {k.name for k in path if isinstance(k, jax.tree_util.GetAttrKey)} & set(fields)
        found.update(hit)
        return jax.typeof(x.astype(dtype) if hit else x)

    return jax.tree_util.tree_map_with_path(retype, state), found


def check_explicit_state_dtype(
    factory: Factory, hparams: dict[str, Any], fields: tuple[str, ...], pairs=EXPLICIT_DTYPES
) -> None:
    """An explicit ``mu_dtype`` (``state_dtype``) puts exactly the state ``fields`` in it.

    For each (params dtype, state dtype) pair, the state is the one built with
    ``None`` (the params' dtype) except that every leaf under an attribute named in
    ``fields`` has the explicit dtype; so at ``init`` and after a jitted update (same
    shapes, same weak types, nothing else changes dtype). Each field must exist.
    """
    arg = state_dtype_argument(factory)
    for params_dtype, dtype in pairs:
        params, loss = lora_problem(params_dtype)
        grads = jax.grad(loss)(params)
        base = factory(**{**hparams, arg: None}).init(params)
        want, found = _retyped(base, fields, dtype)
        assert found == set(fields), (fields, found)
        opt = factory(**{**hparams, arg: jnp.dtype(dtype).name})
        state = opt.init(params)
        assert jax.tree.map(jax.typeof, state) == want, (params_dtype, dtype)
        _, state = jax.jit(opt.update)(grads, state, params)
        assert jax.tree.map(jax.typeof, state) == want, (params_dtype, dtype)


def check_refuses_non_float_state_dtype(
    factory: Factory, hparams: dict[str, Any], dtypes=("int32", "complex64")
) -> None:
    """A ``mu_dtype`` (``state_dtype``) that is not a real float dtype is refused.

    At construction or ``init``, with ``ValueError`` or ``TypeError`` naming the
    argument and the dtype: an integer momentum would be truncated (to zero, for
    this problem's ``(1 - β) g``), and the real rules would cast a complex one back
    to real, which JAX deprecates. optax's test_explicit_dtype takes complex64 state
    for its complex-capable optimizers; ours are real-valued.
    """
    arg = state_dtype_argument(factory)
    params, _ = lora_problem()
    for dtype in dtypes:
        with pytest.raises((ValueError, TypeError)) as err:
            factory(**{**hparams, arg: dtype}).init(params)
        message = str(err.value)
        assert f"`{arg}`" in message and dtype in message, message
