"""lora_muon beyond the contract table (tests/test_optimizer_contract.py): its building
blocks, schedules of beta and weight decay, map_params, nnx.Optimizer."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_muon_jax as lmj
from tests import contract
from tests.helpers import assert_trees_rel_close


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
        float(optax.cosine_decay_schedule(0.05, 10)(2)),
        rel=1e-6,  # value used by step 3
    )


def test_converges_on_optax_common_problems():
    # No LoRA pairs at all: everything goes to the AdamW fallback (opted into).
    contract.check_converges_on_common_problems(
        lmj.lora_muon(learning_rate=1e-2, allow_no_pairs=True)
    )


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
    assert_trees_rel_close(u1, u2)


def test_map_params_on_leafless_placeholder():
    tx = lmj.lora_muon(0.1)
    params, _ = contract.lora_problem()
    state = tx.init(params)
    mapped = optax.tree.map_params(tx, lambda v: v, state)
    chex.assert_trees_all_equal_structs(mapped, state)


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
