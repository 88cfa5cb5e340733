"""lora_muon and its building blocks honour the optax contract (see tests/contract.py)."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_muon_jax as lmj
from tests import contract

VARIANTS = {
    "eigh": dict(learning_rate=0.02),
    "paper": dict(learning_rate=0.02, method="paper"),
    "nesterov_wd": dict(learning_rate=0.02, nesterov=True, weight_decay=0.1, lora_scale=2.0),
    "rebalance": dict(learning_rate=0.02, rebalance=lmj.GaugeRebalance(every=2)),
}


@pytest.fixture(params=sorted(VARIANTS))
def variant(request):
    return VARIANTS[request.param]


def test_extra_args_and_no_recompile(variant):
    contract.check_extra_args_and_no_recompile(lmj.lora_muon(**variant))


def test_converges_on_optax_common_problems():
    # No LoRA pairs at all: everything goes to the AdamW fallback.
    contract.check_converges_on_common_problems(lmj.lora_muon(learning_rate=1e-2))


def test_lora_loss_decreases(variant):
    contract.check_lora_loss_decreases(lmj.lora_muon(**{**variant, "learning_rate": 0.05}))


def test_inject_hyperparams(variant):
    contract.check_inject_hyperparams(lmj.lora_muon, variant)


def test_inject_hyperparams_beta_and_weight_decay_schedules():
    tx = optax.inject_hyperparams(lmj.lora_muon)(
        learning_rate=optax.cosine_decay_schedule(0.05, 10),
        beta=0.9,
        weight_decay=0.1,
    )
    params, loss = contract.lora_problem()
    state = tx.init(params)
    step = jax.jit(contract._step(tx, loss))
    for _ in range(3):
        params, state = step(params, state)
    assert float(state.hyperparams["learning_rate"]) == pytest.approx(
        float(optax.cosine_decay_schedule(0.05, 10)(2)), rel=1e-6  # value used by step 3
    )


def test_preserves_dtype_and_multisteps(variant):
    contract.check_preserves_dtype_and_multisteps(lmj.lora_muon(**variant))


def test_state_type_stable(variant):
    contract.check_state_type_stable(lmj.lora_muon(**variant))


def test_schedule_equals_constant(variant):
    contract.check_schedule_equals_constant(lmj.lora_muon, variant)


def test_wrappers(variant):
    contract.check_wrappers(lmj.lora_muon(**variant))


def test_building_blocks_compose_like_the_alias():
    params, loss = contract.lora_problem()
    lora_only = {"layer": params["layer"]}
    grads = jax.grad(lambda p: loss({**p, "bias": params["bias"]}))(lora_only)
    alias = lmj.lora_muon(0.03, beta=0.9, weight_decay=0.2)
    manual = optax.chain(
        lmj.scale_by_lora_muon(0.9),
        optax.scale_by_learning_rate(0.03),
        lmj.split_weight_decay(0.2, 0.03),
    )
    u1, _ = alias.update(grads, alias.init(lora_only), lora_only)
    u2, _ = manual.update(grads, manual.init(lora_only), lora_only)
    chex.assert_trees_all_close(u1, u2, rtol=1e-6)


def test_map_params_on_leafless_placeholder():
    tx = lmj.lora_muon(0.1)
    params, _ = contract.lora_problem()
    state = tx.init(params)
    mapped = optax.tree.map_params(tx, lambda v: v, state)
    chex.assert_trees_all_equal_structs(mapped, state)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
@pytest.mark.parametrize("method", ["eigh", "paper"])
def test_sharded_state_keeps_param_shardings(axis_type, method):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
    rng = np.random.default_rng(0)
    shard = lambda x, spec: jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, spec))
    raw = {
        "lora_a": rng.standard_normal((2, 32, 4)),
        "lora_b": rng.standard_normal((2, 4, 24)),
        "w": rng.standard_normal((2, 8, 4)),
    }
    specs = {"lora_a": P(None, "x", None), "lora_b": P(None, None, "x"), "w": P(None, "x")}
    tx = lmj.lora_muon(0.1, method=method, weight_decay=0.1)
    with jax.set_mesh(mesh):
        params = {k: shard(v, specs[k]) for k, v in raw.items()}
        grads = {k: shard(v * 0.5 + 0.1, specs[k]) for k, v in raw.items()}
        state = tx.init(params)
        updates, new_state = jax.jit(tx.update)(grads, state, params)
        assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)
        assert jax.tree.map(jax.typeof, updates) == jax.tree.map(jax.typeof, params)
    # Same numbers as on one device.
    single = {k: jnp.asarray(v, jnp.float32) for k, v in raw.items()}
    g1 = {k: v * 0.5 + 0.1 for k, v in single.items()}
    expected, _ = jax.jit(tx.update)(g1, tx.init(single), single)
    chex.assert_trees_all_close(jax.device_get(updates), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("wrt", ["lora", "all"])
def test_nnx_optimizer_smoke(wrt):
    model = nnx.LoRALinear(8, 6, lora_rank=2, rngs=nnx.Rngs(0))
    filt = nnx.LoRAParam if wrt == "lora" else nnx.Param
    optimizer = nnx.Optimizer(model, lmj.lora_muon(0.05), wrt=filt)
    x = jax.random.normal(jax.random.key(1), (16, 8))
    y = jax.random.normal(jax.random.key(2), (16, 6))

    def loss(model):
        return jnp.mean((model(x) - y) ** 2)

    @nnx.jit
    def step(model, optimizer):
        value, grads = nnx.value_and_grad(loss, argnums=nnx.DiffState(0, filt))(model)
        optimizer.update(model, grads)
        return value

    losses = [float(step(model, optimizer)) for _ in range(25)]
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    # Flax's zero-initialised b moved; the LoRA factors are now both non-zero.
    assert float(jnp.abs(model.lora.lora_b[...]).max()) > 0
