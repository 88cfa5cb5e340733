"""Bad input fails at construction or trace time with a message naming the problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_muon_jax as lmj
from lora_muon_jax import _validation

PARAMS = {"attn": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}, "bias": jnp.zeros(5)}


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(learning_rate=float("nan")), "`learning_rate` must be finite"),
        (dict(learning_rate=0.1, beta=1.0), r"`beta` must satisfy 0.0 <= beta < 1.0"),
        (dict(learning_rate=0.1, beta=float("inf")), "`beta` must be finite"),
        (dict(learning_rate=0.1, lora_scale=0.0), "`lora_scale` must satisfy 0.0 < lora_scale"),
        (
            dict(learning_rate=0.1, weight_decay=-1.0),
            "`weight_decay` must satisfy 0.0 <= weight_decay",
        ),
        (dict(learning_rate=0.5, weight_decay=2.0), r"weight_decay \* learning_rate = 1 >= 1"),
        (dict(learning_rate=0.1, method="svd"), r"`method` must be one of \['gram', 'paper'\]"),
        (dict(learning_rate=0.1, eps=float("nan")), "`eps` must be finite"),
    ],
)
def test_bad_hyperparameters_raise_at_construction(kwargs, match):
    with pytest.raises(ValueError, match=match):
        lmj.lora_muon(**kwargs)


def test_bad_rebalance_settings():
    with pytest.raises(ValueError, match="`rebalance.every` must be an int >= 1"):
        lmj.lora_muon(0.1, rebalance=lmj.GaugeRebalance(every=0))


def test_weight_decay_times_schedule_value_checked_when_known():
    tx = lmj.lora_muon(optax.constant_schedule(0.5), weight_decay=2.0)
    state = tx.init(PARAMS)
    with pytest.raises(ValueError, match=r"weight_decay \* learning_rate = 1 >= 1 at this step"):
        jax.jit(tx.update)(PARAMS, state, PARAMS)


def test_weight_decay_too_large_at_run_time_gives_nan_not_garbage():
    # Injected values are traced: the check can only show in the numbers.
    tx = optax.inject_hyperparams(lmj.lora_muon)(learning_rate=0.1, weight_decay=1.0)
    state = tx.init(PARAMS)
    state.hyperparams["weight_decay"] = jnp.asarray(20.0)
    u, _ = jax.jit(tx.update)(PARAMS, state, PARAMS)
    assert bool(jnp.all(jnp.isnan(u["attn"]["lora_a"])))
    assert bool(jnp.all(jnp.isfinite(u["bias"])))


@pytest.mark.parametrize(
    "tx",
    [lmj.lora_muon(0.1), lmj.scale_by_lora_muon(), lmj.split_weight_decay(0.1, 0.1)],
    ids=["lora_muon", "scale_by_lora_muon", "split_weight_decay"],
)
def test_missing_params_in_update(tx):
    lora = {"attn": PARAMS["attn"]}
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(lora, tx.init(lora))


def test_unpaired_factor_names_the_path():
    bad = {
        "attn": {"lora_a": jnp.ones((6, 2))},
        "mlp": {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 4))},
    }
    with pytest.raises(ValueError, match=r"\['attn'\]\['lora_a'\] looks like LoRA factor `a`"):
        lmj.lora_muon(0.1).init(bad)


def test_rank_mismatch_in_update_names_both_paths():
    good = {"lora_a": jnp.ones((6, 2)), "lora_b": jnp.ones((2, 5))}
    tx = lmj.scale_by_lora_muon()
    state = tx.init(good)
    bad = {"lora_a": jnp.ones((6, 3)), "lora_b": jnp.ones((2, 5))}
    with pytest.raises(ValueError, match=r"rank mismatch: a at \['lora_a'\].*b at \['lora_b'\]"):
        tx.update(bad, state, bad)


def test_scale_by_lora_muon_rejects_leaves_in_no_pair():
    with pytest.raises(ValueError, match=r"in no pair: \['bias'\].*lora_muon"):
        lmj.scale_by_lora_muon().init(PARAMS)


def test_params_tree_must_match_updates():
    tx = lmj.scale_by_lora_muon()
    lora = {"attn": PARAMS["attn"]}
    with pytest.raises(
        ValueError, match=r"different trees. Missing in params: \[\"\['attn'\]\['lora_b'\]\"\]"
    ):
        tx.update(lora, tx.init(lora), {"attn": {"lora_a": jnp.ones((6, 2))}})


def test_pairs_callable_needs_static_args_under_inject():
    def rule(path, leaf):  # names the flax factors, so a pair is found
        roles = {"lora_a": "a", "lora_b": "b"}
        return lmj.LoRAFactor(path[:-1], roles[path[-1]]) if path[-1] in roles else None

    # inject_hyperparams takes a callable hyperparameter for a schedule and calls it
    # with the step count: the rule must be listed in static_args.
    with pytest.raises(TypeError, match="missing 1 required positional argument"):
        optax.inject_hyperparams(lmj.lora_muon)(learning_rate=0.1, pairs=rule).init(PARAMS)
    tx = optax.inject_hyperparams(lmj.lora_muon, static_args=("pairs",))(
        learning_rate=0.1, pairs=rule
    )
    u, _ = tx.update(PARAMS, tx.init(PARAMS), PARAMS)
    assert np.isfinite(np.asarray(u["bias"])).all()


# ----------------------------------------------------------------- leaf dtypes


def test_check_float_leaves_names_each_leaf_with_its_dtype():
    names = [f"['l{i}']" for i in range(10)]
    with pytest.raises(TypeError) as err:
        _validation.check_float_leaves("fn", names, [jnp.ones(2, jnp.complex64)] * 10, "updates")
    message = str(err.value)
    assert message.startswith("fn: complex adapters are not supported (in `updates`): ")
    assert "leaf ['l0'] is complex64, leaf ['l1'] is complex64" in message
    assert "leaf ['l7'] is complex64 and 2 more." in message and "['l8']" not in message
    # Complex first when both kinds occur; then integer, boolean and float0 leaves.
    mixed = [jnp.ones(2, jnp.int32), np.ones(2, np.complex128)]
    with pytest.raises(TypeError, match=r"complex adapters.*: leaf b is complex128\. The"):
        _validation.check_float_leaves("fn", ["a", "b"], mixed, None)
    odd = [jnp.ones(2, jnp.int8), jnp.ones(2, bool), np.zeros(2, jax.dtypes.float0), 3]
    with pytest.raises(TypeError) as err:
        _validation.check_float_leaves("fn", ["i", "b", "z", "p"], odd)
    message = str(err.value)
    assert "must be floating point (float16, bfloat16, float32 or float64), but in `params`, " in (
        message
    )
    assert "leaf i is int8, leaf b is bool, leaf z is [('float0', 'V')], leaf p is int64" in message
    assert "complex" not in message


def test_check_float_leaves_accepts_every_real_float():
    leaves = [
        jnp.ones(2, jnp.float16),
        jnp.ones(2, jnp.bfloat16),
        jnp.ones(2, jnp.float32),
        np.ones(2, np.float64),
        jax.ShapeDtypeStruct((2,), jnp.float8_e4m3fn),
        1.5,
    ]
    _validation.check_float_leaves("fn", list("abcdef"), leaves)


def test_split_weight_decay_refuses_complex_and_integer_leaves():
    tx = lmj.split_weight_decay(0.1, 0.1)
    complex_params = {"w": jnp.ones((2, 2), jnp.complex64)}
    with pytest.raises(TypeError, match=r"^split_weight_decay: complex.*leaf \['w'\] is complex64"):
        tx.init(complex_params)
    params = {"w": jnp.ones((2, 2))}
    with pytest.raises(TypeError, match=r"in `updates`, leaf \['w'\] is int32"):
        tx.update({"w": jnp.ones((2, 2), jnp.int32)}, tx.init(params), params)
    # The masked-out leaves are not its business.
    masked = lmj.split_weight_decay(0.1, 0.1, mask={"w": True, "z": False})
    tree = {"w": jnp.ones((2, 2)), "z": jnp.ones(2, jnp.complex64)}
    u, _ = masked.update(tree, masked.init(tree), tree)
    assert u["z"].dtype == jnp.complex64


def test_pair_functions_refuse_complex_and_integer_arguments():
    a, b = jnp.eye(3, 2, dtype=jnp.complex64), jnp.eye(2, 4, dtype=jnp.complex64)
    state = lmj.PairState(jnp.zeros((3, 2)), jnp.zeros((2, 4)))
    with pytest.raises(TypeError, match=r"^lora_muon_pair_step: complex.*leaf a is complex64"):
        lmj.lora_muon_pair_step(a, b, a, b, state, learning_rate=0.1)
    with pytest.raises(TypeError, match=r"^rebalance_pair: complex.*leaf b is complex64"):
        lmj.rebalance_pair(a.real, b)
    with pytest.raises(TypeError, match=r"^lora_pair_diagnostics: .* leaf delta_b is int32"):
        lmj.lora_pair_diagnostics(a.real, b.real, a.real, jnp.ones((2, 4), jnp.int32))


def test_wrappers_refuse_complex_pairs_naming_the_leaf():
    complex_params = jax.tree.map(lambda x: x.astype(jnp.complex64), PARAMS)
    tx = lmj.with_lora_diagnostics(optax.sgd(0.1))
    with pytest.raises(TypeError, match=r"^with_lora_diagnostics: complex.*\['attn'\]\['lora_a'\]"):
        tx.init(complex_params)
    tx = lmj.with_gauge_rebalancing(optax.sgd(0.1), lmj.GaugeRebalance(every=1))
    grads = {"attn": {k: v * 1j for k, v in PARAMS["attn"].items()}, "bias": PARAMS["bias"]}
    with pytest.raises(TypeError, match=r"^with_gauge_rebalancing: complex.*in `updates`"):
        tx.update(grads, tx.init(PARAMS), PARAMS)


def test_lora_muon_sends_complex_leaves_in_no_pair_to_adamw():
    # The documented choice: only pair factors are refused; AdamW takes the rest
    # as optax does, imaginary part included.
    params = {**PARAMS, "bias": jnp.full(5, 0.5 - 0.25j, jnp.complex64)}
    grads = {**PARAMS, "bias": jnp.linspace(-1.0, 1.0, 5) * (1.0 + 2.0j)}
    tx = lmj.lora_muon(0.1)
    u, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    adam = optax.adamw(0.1, weight_decay=0.0)
    want, _ = adam.update(grads["bias"], adam.init(params["bias"]), params["bias"])
    assert u["bias"].dtype == jnp.complex64
    np.testing.assert_allclose(u["bias"], want, rtol=1e-6)
    assert float(jnp.abs(u["bias"].imag).max()) > 0.05
