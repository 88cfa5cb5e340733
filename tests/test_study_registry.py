"""benchmarks.registry: one name, one optimizer, for the benchmarks and the study."""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from benchmarks import registry


def _tree(rank: int | None) -> dict:
    """A block matrix (dense kernel or a LoRA pair), an embedding and a bias."""
    k = jax.random.split(jax.random.key(0), 3)
    block = (
        {"kernel": jax.random.normal(k[0], (12, 8)) / 4}
        if rank is None
        else {
            "lora_a": jax.random.normal(k[0], (12, rank)) / 4,
            "lora_b": jax.random.normal(k[1], (rank, 8)) / 4,
        }
    )
    return {"blocks": {"q": block}, "embed": jax.random.normal(k[2], (5, 12)), "bias": jnp.zeros(8)}


def _is_block(path, leaf) -> bool:
    return registry.is_2d_or_more(path, leaf) and "blocks" in jax.tree_util.keystr(path)


@pytest.mark.parametrize("name", [n for n in registry.names() if registry.available(n)])
def test_every_method_builds_and_steps_on_its_tree(name):
    method = registry.get(name)
    params = _tree(None if method.tree == "dense" else 2)
    tx = registry.make(
        name, method.default_lr, params, adam_learning_rate=1e-2, is_matrix=_is_block
    )
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1 + x, params)
    state = tx.init(params)
    extra = {"prev_grads": params} if "prev_grads" in method.extra_args else {}
    updates, _ = tx.update(grads, state, params, **extra)
    for leaf in jax.tree.leaves(updates):
        assert np.all(np.isfinite(np.asarray(leaf)))
    emb = np.abs(np.asarray(updates["embed"]))
    if method.tree == "dense" and name != "dense_adamw":
        # Only the selected block matrix gets the matrix rule: the embedding (2-D, not
        # selected) takes one AdamW step of size adam_learning_rate per entry (stock
        # optax muon's AdamW is Nesterov: 1 + b1 = 1.9 times the bias-corrected step
        # minus the plain one, here about 1.47 times).
        np.testing.assert_allclose(emb, emb.flat[0], rtol=1e-3)
        want = (1.4, 1.55) if name == "dense_muon_optax" else (0.999, 1.001)
        assert want[0] * 1e-2 <= emb.flat[0] <= want[1] * 1e-2
    assert np.any(np.asarray(updates["blocks"]["q"][next(iter(params["blocks"]["q"]))]))


def test_dense_muon_step_has_spectral_norm_eta_without_a_shape_factor():
    # A wide block (fan_out/fan_in = 4): stock optax Muon would scale its step by 2.
    params = {"blocks": {"up": {"kernel": jnp.zeros((8, 32))}}, "bias": jnp.zeros(32)}
    g = jax.tree.map(jnp.ones_like, params)
    steps = {}
    for name in ("dense_muon", "dense_muon_optax"):
        tx = registry.make(name, 0.1, params, is_matrix=_is_block)
        u, _ = tx.update(g, tx.init(params), params)
        steps[name] = np.linalg.svd(np.asarray(u["blocks"]["up"]["kernel"]), compute_uv=False)
    # A rank-1 gradient: Muon's step is rank 1 with spectral norm η times Newton–Schulz's
    # singular value (about 0.68-1.2 for optax's coefficients).
    s = steps["dense_muon"]
    assert 0.06 <= s[0] <= 0.12 and s[1] < 1e-3 * s[0]
    np.testing.assert_allclose(steps["dense_muon_optax"][0] / s[0], 2.0, rtol=0.25)


def test_metadata_and_errors():
    assert set(registry.names("lora")) >= {"lora_muon", "spectron", "adamw_lora"}
    assert set(registry.names("dense")) >= {"dense_muon", "dense_muon_optax", "limuon"}
    assert registry.get("limuon").extra_args == ("prev_grads",)
    assert {registry.get(n).rate for n in registry.names()} == {"spectral", "adam"}
    with pytest.raises(ValueError, match="unknown method 'nope'; choose from"):
        registry.make("nope", 0.1, _tree(2))


def test_options_reach_the_constructor():
    from lora_muon_jax import GaugeRebalance

    params = _tree(2)
    tx = registry.make("lora_muon", 0.1, params, rebalance=GaugeRebalance(every=1))
    a = params["blocks"]["q"]["lora_a"] * 10.0
    lopsided = {
        **params,
        "blocks": {"q": {"lora_a": a, "lora_b": params["blocks"]["q"]["lora_b"] / 10.0}},
    }
    u, _ = tx.update(jax.tree.map(jnp.ones_like, lopsided), tx.init(lopsided), lopsided)
    new = optax.apply_updates(lopsided, u)["blocks"]["q"]
    sa, sb = (np.linalg.norm(np.asarray(new[k]), 2) for k in ("lora_a", "lora_b"))
    assert abs(np.log(sa / sb)) < 1e-3  # rebalanced on step 0: the option was passed on


def test_docs_peers_table_is_the_catalogue():
    """docs/peer_optimizers.md's table is ``python -m benchmarks.registry --table``."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "peer_optimizers.md").read_text()
    marker = "<!-- generated: python -m benchmarks.registry --table"
    assert doc.count(marker) == 1
    after = doc.split(marker, 1)[1].split("\n", 1)[1]
    assert after.split("\n\n", 1)[0].strip() == registry.peers_table()


def test_catalogue_names_are_unique_and_peer_rank_is_one_value():
    # One name per optimizer: dense_muon (ours, no shape factor) vs dense_muon_optax.
    assert registry.get("dense_muon").factory != registry.get("dense_muon_optax").factory
    ranks = {m.rank for m in registry.METHODS.values() if m.rank is not None}
    assert ranks == {registry.PEER_RANK}
    assert {m.name for m in registry.METHODS.values() if m.ships} >= {
        "lora_muon",
        "spectron",
        "lora_rite",
        "riemannion",
        "lora_pre_adam",
        "lora_pre_muon",
        "limuon",
    }
