"""Bad input fails at construction or trace time with a message naming the problem."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_muon_jax as lmj

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
