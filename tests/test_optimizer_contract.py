"""One contract table × every optimizer of the package, in the style of optax's common tests.

optax's ``contrib/_common_test.py`` drives every optimizer through the same checks
from one table; this file does the same for LoRA-Muon (each route and option that
changes the program) and every peer. The checks come from ``tests/contract.py``
(jit with extra args, ``inject_hyperparams``, dtypes, ``MultiSteps``, wrappers,
state types under ``lax.cond``, schedules) plus what users of sharded and
low-precision training rely on: bfloat16 params with bfloat16 moments, 8-device
sharding equal to one device, ``apply_if_finite`` skipping a NaN step, and no
recompilation across steps or hyperparameter changes (backend compilations counted
through ``jax.monitoring``). From optax's ``_src/alias_test.py`` and
``contrib/_muon_test.py``: complex targets (a complex leaf the AdamW fallback takes
follows :func:`optax.adamw`; complex factors are refused), explicit state dtypes,
and state types from float16 to complex128. A check that does not apply to an
optimizer is skipped with the reason the table gives.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import lora_muon_jax as lmj
from benchmarks import registry
from tests import contract
from tests.helpers import rel_err

DENSE = {"pairs": ()}  # dense-weight methods see the factors as stacked matrices

# Checks a row may mark not applicable, with the reason the test skips with.
NOT_APPLICABLE_CHECKS = ("complex_target",)
# optax's test_optimization / test_complex_mixed_target on complex params, for the
# leaves the optimizer's own rule takes.
COMPLEX_PAIRS = {
    "complex_target": "complex: refused (TypeError naming the leaf; the LoRA pair rule "
    "is real-valued; test_complex_leaves_refused_naming_the_leaf). Complex leaves in "
    "no pair go to AdamW: test_complex_leaf_in_no_pair_follows_optax_adamw"
}
COMPLEX_MATRICES = {
    "complex_target": "complex: refused (TypeError naming the leaf; the dense matrix "
    "rule is real-valued; test_complex_leaves_refused_naming_the_leaf). Complex leaves "
    "with ndim < 2 go to AdamW: test_complex_leaf_in_no_pair_follows_optax_adamw"
}


@dataclasses.dataclass(frozen=True)
class Case:
    """An optimizer factory, its hyperparameters, and what the contract must know.

    ``state_dtype_fields``: the state attributes an explicit ``mu_dtype`` (or
    ``state_dtype``) sets, as documented; the rest of the state keeps its dtype.
    ``not_applicable``: check name -> why it does not apply (the test skips so).
    """

    factory: Callable[..., optax.GradientTransformation]
    hparams: dict[str, Any]
    static_args: tuple[str, ...] = ()
    train_hparams: dict[str, Any] = dataclasses.field(default_factory=dict)  # for descent
    state_dtype_fields: tuple[str, ...] = ("mu",)  # mu_dtype: LoRA and AdamW moments
    not_applicable: dict[str, str] = dataclasses.field(default_factory=dict)


# Per-case specifics of the contract, keyed by catalogue name: the set of optimizers,
# their factories, variants, static args and state-dtype fields come from the
# catalogue (benchmarks/registry.py).
CONTRACT_HPARAMS: dict[str, dict[str, Any]] = {
    "lora_rite": dict(learning_rate=0.01),
}
# LoRA-RITE's update skipping stalls this tiny problem's first steps.
TRAIN_HPARAMS: dict[str, dict[str, Any]] = {"lora_rite": dict(update_skipping=0.0)}
DENSE_RANK = 2  # momentum rank of the dense-weight peers on the contract's small problem


def _case(m: registry.Method) -> Case:
    hparams: dict[str, Any] = dict(learning_rate=0.02, **m.variant)
    if m.tree == "dense":
        hparams |= DENSE
        if m.rank is not None:
            hparams["rank"] = DENSE_RANK
    return Case(
        registry.load_factory(m),
        {**hparams, **CONTRACT_HPARAMS.get(m.name, {})},
        static_args=m.static_args,
        train_hparams=TRAIN_HPARAMS.get(m.name, {}),
        state_dtype_fields=m.state_dtype_fields,
        not_applicable=COMPLEX_PAIRS if m.tree == "lora" else COMPLEX_MATRICES,
    )


SHIPPED = {name: m for name, m in registry.METHODS.items() if m.ships}
CASES = {name: _case(m) for name, m in SHIPPED.items()}
# Options of LoRA-Muon that change the program, beside the catalogue's entries.
CASES["lora_muon_options"] = dataclasses.replace(
    CASES["lora_muon"],
    hparams=dict(
        learning_rate=0.02,
        nesterov=True,
        weight_decay=0.1,
        lora_scale=2.0,
        rebalance=lmj.GaugeRebalance(every=2),
    ),
)


def test_every_shipped_catalogue_entry_is_in_the_table():
    assert set(SHIPPED) <= set(CASES)
    # The catalogue's capabilities are the factories' own arguments.
    for name, m in SHIPPED.items():
        params = inspect.signature(registry.load_factory(m)).parameters
        assert set(m.static_args) <= set(params), name
        assert set(m.variant) <= set(params), name
        assert m.state_dtype_fields, name
        assert {"mu_dtype", "state_dtype"} & set(params), name
        assert m.unpaired_to_adamw and "adam_learning_rate" in params, name
        assert ("prev_grads" in m.extra_args) == (name == "limuon"), name


@pytest.fixture(params=sorted(CASES))
def case(request) -> Case:
    return CASES[request.param]


def _skip_if_not_applicable(case: Case, check: str) -> None:
    if check in case.not_applicable:
        pytest.skip(case.not_applicable[check])


class CompileCounter:
    """Counts backend compilations (``jax.monitoring`` events) while active."""

    _active: list[CompileCounter] = []
    _registered = False

    def __init__(self) -> None:
        self.count = 0
        if not CompileCounter._registered:
            jax.monitoring.register_event_duration_secs_listener(CompileCounter._on_event)
            CompileCounter._registered = True

    @staticmethod
    def _on_event(name: str, secs: float, **kwargs: Any) -> None:
        if name == "/jax/core/compile/backend_compile_duration":
            for counter in CompileCounter._active:
                counter.count += 1

    def __enter__(self) -> CompileCounter:
        CompileCounter._active.append(self)
        return self

    def __exit__(self, *exc: Any) -> None:
        CompileCounter._active.remove(self)


def _train(opt, params, loss, steps, step=None):
    step = step or jax.jit(contract._step(opt, loss))
    state = opt.init(params)
    for _ in range(steps):
        params, state = step(params, state)
    return params, state, step


def test_extra_args_and_no_recompile(case):
    contract.check_extra_args_and_no_recompile(case.factory(**case.hparams))


def test_no_compilation_after_the_first_step(case):
    params, loss = contract.lora_problem()
    _, _, step = _train(case.factory(**case.hparams), params, loss, 1)
    with CompileCounter() as counter:
        _train(case.factory(**case.hparams), params, loss, 3, step=step)
    assert counter.count == 0


def test_inject_hyperparams_without_recompiling(case):
    contract.check_inject_hyperparams(case.factory, case.hparams, case.static_args)
    opt = optax.inject_hyperparams(case.factory, static_args=case.static_args)(**case.hparams)
    params, loss = contract.lora_problem()
    grads = jax.grad(loss)(params)
    update = jax.jit(lambda s: opt.update(grads, s, params))
    state = opt.init(params)
    _, state = update(state)
    # Same dtype and weak type, only the value changes (made before counting: an
    # eager multiply compiles too).
    rates = [state.hyperparams["learning_rate"] * s for s in (0.5, 0.25)]
    with CompileCounter() as counter:
        for rate in rates:
            state.hyperparams["learning_rate"] = rate
            _, state = update(state)
    assert counter.count == 0


def test_bfloat16_params_with_bfloat16_moments(case):
    kwargs = dict(case.hparams)
    if "mu_dtype" in inspect.signature(case.factory).parameters:
        kwargs["mu_dtype"] = "bfloat16"
    opt = case.factory(**kwargs)
    params, loss = contract.lora_problem(jnp.bfloat16)
    start = float(loss(params))
    new, state, _ = _train(opt, params, loss, 20)
    chex.assert_trees_all_equal_dtypes(new, params)
    chex.assert_tree_all_finite(new)
    floats = [x for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype in (jnp.bfloat16, jnp.float32) for x in floats)
    if "mu_dtype" in kwargs:  # the momenta follow mu_dtype
        assert any(x.dtype == jnp.bfloat16 and x.ndim >= 2 for x in floats)
    assert float(loss(new)) < start


def test_preserves_dtype_and_multisteps(case):
    contract.check_preserves_dtype_and_multisteps(case.factory(**case.hparams))


def test_apply_if_finite_skips_a_nan_step(case):
    opt = optax.apply_if_finite(case.factory(**case.hparams), max_consecutive_errors=3)
    params, loss = contract.lora_problem()
    state = opt.init(params)
    bad = jax.tree.map(lambda x: jnp.full_like(x, jnp.nan), jax.grad(loss)(params))
    u, state = jax.jit(opt.update)(bad, state, params)
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    assert int(state.notfinite_count) == 1 and not bool(state.last_finite)
    chex.assert_tree_all_finite(state.inner_state)
    u, state = jax.jit(opt.update)(jax.grad(loss)(params), state, params)
    assert int(state.notfinite_count) == 0
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(u)) > 0


def test_state_type_stable_from_float16_to_complex128(case):
    # Where complex factors are refused, complex dtypes go to the AdamW leaf only.
    complex_factors = "complex_target" not in case.not_applicable
    contract.check_state_type_stable(case.factory(**case.hparams), complex_factors=complex_factors)


def test_schedule_equals_constant(case):
    contract.check_schedule_equals_constant(case.factory, case.hparams)


def test_wrappers(case):
    contract.check_wrappers(case.factory(**case.hparams))


def test_not_applicable_entries_name_checks_and_reasons(case):
    for check, reason in case.not_applicable.items():
        assert check in NOT_APPLICABLE_CHECKS and reason.strip(), (check, reason)


@pytest.mark.parametrize("dtype", ["complex64", "complex128"])
def test_complex_leaves_refused_naming_the_leaf(case, dtype):
    # What the table's "complex: refused" says (the reason of test_complex_target_like_optax).
    assert "complex: refused" in case.not_applicable.get("complex_target", "")
    with jax.enable_x64(contract.needs_x64(dtype)):
        contract.check_refuses_complex_leaves(case.factory(**case.hparams), dtype)


def test_complex_target_like_optax(case):
    # optax's test_optimization (complex64) and _muon_test's test_complex_mixed_target
    # on the leaves the optimizer's own rule takes.
    _skip_if_not_applicable(case, "complex_target")
    pytest.fail("takes complex factors: port optax's complex-target check for it here")


def test_complex_leaf_in_no_pair_follows_optax_adamw(case):
    # The aliases' AdamW defaults: b1=0.9, b2=0.999, eps=1e-8, eps_root=0, no decay.
    adamw = optax.adamw(case.hparams["learning_rate"], weight_decay=0.0)
    contract.check_complex_leaf_like_adamw(case.factory(**case.hparams), adamw)


def test_explicit_state_dtype(case):
    contract.check_explicit_state_dtype(case.factory, case.hparams, case.state_dtype_fields)


def test_non_float_state_dtype_refused(case):
    contract.check_refuses_non_float_state_dtype(case.factory, case.hparams)


def test_integer_and_boolean_leaves_refused_naming_the_leaf(case):
    contract.check_refuses_integer_leaves(case.factory(**case.hparams))


def test_state_dtype_none_is_the_params_dtype(case):
    contract.check_none_state_dtype_is_params_dtype(case.factory, case.hparams)


def test_loss_decreases(case):
    hparams = {**case.hparams, **case.train_hparams, "learning_rate": 0.05}
    contract.check_lora_loss_decreases(case.factory(**hparams))


def _sharding_problem():
    rng = np.random.default_rng(3)
    params = {
        "layer": {
            "lora_a": jnp.asarray(rng.standard_normal((2, 16, 4)) / 4, jnp.float32),
            "lora_b": jnp.asarray(rng.standard_normal((2, 4, 24)) / 2, jnp.float32),
        },
        "bias": jnp.zeros((24,), jnp.float32),
    }
    target = jnp.asarray(rng.standard_normal((2, 16, 24)) / 16, jnp.float32)

    def loss(p):
        pred = p["layer"]["lora_a"] @ p["layer"]["lora_b"] + p["bias"]
        return jnp.sum((pred - target) ** 2)

    return params, loss


def test_sharded_over_8_devices_equals_one_device(case):
    # FSDP-style: a sharded along m, b along n, over all 8 host devices.
    params, loss = _sharding_problem()
    opt = case.factory(**case.hparams)
    expected, _, _ = _train(opt, params, loss, 3)
    mesh = jax.make_mesh((8,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    specs = {"layer": {"lora_a": P(None, "x", None), "lora_b": P(None, None, "x")}, "bias": P()}
    sharded = jax.tree.map(lambda x, s: jax.device_put(x, NamedSharding(mesh, s)), params, specs)
    got, state, _ = _train(opt, sharded, loss, 3)
    # Equal within 1e-5 relative per leaf (Frobenius). Sharding changes the order of
    # the reductions, so single entries near zero may differ by more than 1e-5 of
    # themselves: Riemannion's thin QRs move one entry of 0.02 by 9e-5 of itself, its
    # leaves by 2.2e-6 (jax 0.10.2, CPU).
    errs = jax.tree.map(rel_err, got, expected)
    assert max(jax.tree.leaves(errs)) <= 1e-5, errs
    for name in ("lora_a", "lora_b"):  # the params keep their FSDP sharding
        want = NamedSharding(mesh, specs["layer"][name])
        assert got["layer"][name].sharding.is_equivalent_to(want, 3), name
