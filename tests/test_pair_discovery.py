"""Pair discovery: presets, layouts, Flax trees, callables and clear errors."""

from __future__ import annotations

import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_muon_jax as lmj
from lora_muon_jax import FactorAxes, LoRAFactor, PairRule, _pair_labels


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _summary(tree, pairs="auto"):
    return [
        (p.a_path, p.b_path, p.batch_shape, p.m, p.n, p.rank)
        for p in lmj.find_lora_pairs(tree, pairs)
    ]


def test_flax_names_nested_and_stacked():
    tree = {
        "blocks": {"attn": {"lora_a": _sds(4, 16, 2), "lora_b": _sds(4, 2, 8)}},
        "head": {"kernel": _sds(8, 3)},
    }
    assert _summary(tree) == [
        ("['blocks']['attn']['lora_a']", "['blocks']['attn']['lora_b']", (4,), 16, 8, 2)
    ]


def test_peft_orientation_left_factor_is_lora_B():
    tree = {"model.layers.0.q_proj": {"lora_A.weight": _sds(4, 32), "lora_B.weight": _sds(24, 4)}}
    (pair,) = lmj.find_lora_pairs(tree)
    assert pair.a_path.endswith("['lora_B.weight']")
    assert (pair.m, pair.n, pair.rank) == (24, 32, 4)


def test_qwix_and_maxtext_token_names():
    tree = {
        "q": {"kernel": _sds(16, 8), "kernel_lora_a": _sds(16, 2), "kernel_lora_b": _sds(2, 8)},
    }
    assert _summary(tree, "qwix")[0][3:] == (16, 8, 2)
    # MaxText scanned layers: layer axis in the middle.
    mt = {"query": {"lora_a.kernel": _sds(32, 6, 4), "lora_b.kernel": _sds(4, 6, 2, 8)}}
    (pair,) = lmj.find_lora_pairs(mt, "maxtext")
    assert (pair.batch_shape, pair.m, pair.n, pair.rank) == ((6,), 32, 16, 4)
    # ... and "auto" refuses the layout loudly rather than misreading it: a qwix
    # einsum adapter could have the same shapes. The error names both readings.
    with pytest.raises(
        lmj.AmbiguousLayoutError,
        match=r"Ambiguous LoRA layout: a at \['query'\]\['lora_a.kernel'\].*"
        r"pairs='maxtext' reads batch \(6,\).*pairs='qwix' fits them two ways",
    ):
        lmj.find_lora_pairs(mt)


def test_maxtext_canonical_round_trip():
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.standard_normal((32, 6, 4)), jnp.float32)
    b = jnp.asarray(rng.standard_normal((4, 6, 2, 8)), jnp.float32)
    (pair,) = lmj.find_lora_pairs({"lora_a.kernel": a, "lora_b.kernel": b}, "maxtext")
    ca, cb = pair.canonical(a, "a"), pair.canonical(b, "b")
    assert ca.shape == (6, 32, 4) and cb.shape == (6, 4, 16)
    np.testing.assert_array_equal(ca[2], a[:, 2, :])
    np.testing.assert_array_equal(cb[2], b[:, 2].reshape(4, 16))
    np.testing.assert_array_equal(pair.restore(ca, "a", a.shape), a)
    np.testing.assert_array_equal(pair.restore(cb, "b", b.shape), b)


def test_gemma_scope_is_required():
    tree = {
        "attn": {"lora": {"a": _sds(8, 2), "b": _sds(2, 4)}},
        "other": {"a": _sds(3), "b": _sds(3)},
    }
    assert _summary(tree) == [("['attn']['lora']['a']", "['attn']['lora']['b']", (), 8, 4, 2)]


def test_nnx_state_with_value_keys_and_pure_match():
    model = nnx.LoRALinear(6, 5, lora_rank=3, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.LoRAParam)
    with_value = _summary(state)
    pure = _summary(
        nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict()
    )
    assert with_value == pure == [("['lora']['lora_a']", "['lora']['lora_b']", (), 6, 5, 3)]


def test_callable_and_explicit_rules():
    tree = {"w_up_left": _sds(12, 3), "w_up_right": _sds(3, 7), "bias": _sds(7)}

    def roles(path, leaf):
        name = path[-1]
        if name.startswith("w_up_"):
            return LoRAFactor(pair="w_up", role="a" if name.endswith("left") else "b")
        return None

    assert _summary(tree, roles)[0][3:] == (12, 7, 3)
    rule = PairRule("left", "right")
    assert _summary(tree, rule)[0][3:] == (12, 7, 3)
    # Transposed storage handled by axes: a stored as (r, m).
    t2 = {"up": {"A": _sds(2, 3, 12), "B": _sds(2, 3, 7)}}
    rule = PairRule("A", "B", a_axes=FactorAxes(rank_axis=1), b_axes=FactorAxes(rank_axis=1))
    assert _summary(t2, rule)[0][2:] == ((2,), 12, 7, 3)


def test_lora_param_labels_same_on_params_and_updates():
    model = nnx.LoRALinear(6, 5, lora_rank=3, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    labels = lmj.lora_param_labels()
    with_vars = jax.tree.leaves(labels(state))
    pure = jax.tree.leaves(labels(nnx.to_pure_dict(state)))
    assert sorted(with_vars) == sorted(pure) == ["lora", "lora", "other", "other"]


# --------------------------------------------------------------------------------
# Errors name the paths and say what is wrong.


@pytest.mark.parametrize(
    "tree,match",
    [
        ({"x": {"lora_a": _sds(4, 2)}}, r"Unpaired.*\['x'\]\['lora_a'\].*partner"),
        ({"x": {"lora_b": _sds(2, 4)}}, r"Unpaired.*\['x'\]\['lora_b'\]"),
        (
            {"lora_a": _sds(4, 2), "lora_b": _sds(3, 5)},
            r"rank mismatch.*\['lora_a'\].*\['lora_b'\]",
        ),
        (
            {"lora_a": _sds(2, 4, 2), "lora_b": _sds(3, 2, 5)},
            r"batch axes mismatch.*\(2,\).*\(3,\)",
        ),
        (
            {"lora_a": _sds(4, 2), "lora_b": _sds(2, 5, dtype=jnp.bfloat16)},
            r"dtype mismatch.*float32.*bfloat16",
        ),
        (
            {"lora_a": _sds(4), "lora_b": _sds(2, 5)},
            r"\['lora_a'\] must be an array with ndim >= 2",
        ),
    ],
    ids=["lone-a", "lone-b", "rank", "batch", "dtype", "ndim"],
)
def test_errors_name_paths(tree, match):
    with pytest.raises(ValueError, match=match):
        lmj.find_lora_pairs(tree)


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(ValueError, match=r"unknown preset 'pef'.*'peft'"):
        lmj.find_lora_pairs({}, "pef")


def test_ambiguous_rules_are_rejected():
    tree = {"lora_a": _sds(4, 2), "lora_b": _sds(2, 5), "lora_c": _sds(2, 5)}
    with pytest.raises(ValueError, match=r"\['lora_a'\] belongs to two LoRA pairs"):
        lmj.find_lora_pairs(tree, [PairRule("lora_a", "lora_b"), PairRule("lora_a", "lora_c")])
    # The same pair found by two rules is one pair.
    assert len(lmj.find_lora_pairs(tree, [PairRule("lora_a", "lora_b")] * 2)) == 1


def test_callable_with_missing_role():
    with pytest.raises(ValueError, match=r"Unpaired LoRA factor: \['w'\] is factor `a`"):
        lmj.find_lora_pairs({"w": _sds(4, 2)}, lambda path, leaf: LoRAFactor("p", "a"))


# --------------------------------------------------------------------------------
# Names as libraries write them: PEFT nesting with adapter names, multi-axis layouts.


def test_peft_state_dict_flat_and_nested_give_the_same_pairs():
    # Names and shapes as PEFT 0.21.2 writes a model's state dict (tests/data).
    q = "base_model.model.model.layers.0.self_attn.q_proj."
    flat = {
        q + "lora_A.default.weight": _sds(4, 16),
        q + "lora_B.default.weight": _sds(24, 4),
        q + "lora_A.other.weight": _sds(2, 16),
        q + "lora_B.other.weight": _sds(24, 2),
        q + "lora_magnitude_vector.other.weight": _sds(24),
        "base_model.model.model.embed_tokens.lora_embedding_A.default": _sds(4, 64),
        "base_model.model.model.embed_tokens.lora_embedding_B.default": _sds(16, 4),
    }
    nested: dict = {}
    for key, leaf in flat.items():
        *parents, last = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = leaf
    for pairs in ("peft", "auto"):
        got_flat = [(p.m, p.n, p.rank) for p in lmj.find_lora_pairs(flat, pairs)]
        got_nested = [(p.m, p.n, p.rank) for p in lmj.find_lora_pairs(nested, pairs)]
        assert sorted(got_flat) == sorted(got_nested) == [(24, 16, 2), (24, 16, 4), (64, 16, 4)]
    # One adapter by name; the other adapter's leaves are left alone.
    other = lmj.find_lora_pairs(nested, lmj.peft_adapter("other"))
    assert [(p.m, p.rank) for p in other] == [(24, 2)]
    (emb, _) = sorted(lmj.find_lora_pairs(flat, lmj.peft_adapter("default")), key=lambda p: -p.m)
    assert "lora_embedding_A" in emb.a_path  # ΔW = (B A)ᵀ: vocab × dim
    with pytest.raises(ValueError, match="adapter name"):
        lmj.peft_adapter("a.b")


@pytest.mark.parametrize(
    "a_shape,b_shape,expected",
    [
        ((8, 2), (2, 12), ((), 8, 12)),  # Dense
        ((2, 4, 2), (2, 8), ((), 8, 8)),  # Einsum BTNH,NHD->BTD: N, H are matrix axes
        ((8, 2), (2, 2, 1, 4), ((), 8, 8)),  # Einsum BSD,CKDH->CBSKH
        ((5, 8, 2), (5, 2, 2, 4), ((5,), 8, 8)),  # DenseGeneral with a batch dim
        ((4, 16, 4), (4, 4, 8), ((4,), 16, 8)),  # stacked layers, L == r: most batch axes
    ],
)
def test_gemma_and_qwix_layouts_from_shapes(a_shape, b_shape, expected):
    gemma = {"blk": {"lora": {"a": _sds(*a_shape), "b": _sds(*b_shape)}}}
    qwix = {"blk": {"kernel_lora_a": _sds(*a_shape), "kernel_lora_b": _sds(*b_shape)}}
    for tree, pairs in ((gemma, "gemma"), (qwix, "qwix"), (gemma, "auto"), (qwix, "auto")):
        (pair,) = lmj.find_lora_pairs(tree, pairs)
        assert (pair.batch_shape, pair.m, pair.n) == expected
    assert lmj.find_lora_pairs(qwix, "auto") == lmj.find_lora_pairs(qwix, "qwix")


def test_auto_takes_the_one_layout_that_fits():
    # Tunix's einsum adapters (qwix): ranks equal to a head count included. Only
    # the qwix layout fits each; "auto" reads them as "qwix" does.
    tree = {
        "q_einsum": {"w_lora_a": _sds(32, 4), "w_lora_b": _sds(4, 4, 8)},  # BTD,NDH->BTNH
        "kv_einsum": {"w_lora_a": _sds(32, 2), "w_lora_b": _sds(2, 2, 2, 8)},  # BSD,CKDH->CBSKH
        "attn_vec_einsum": {"w_lora_a": _sds(4, 8, 4), "w_lora_b": _sds(4, 32)},  # BTNH,NHD->BTD
        "up_proj": {"kernel_lora_a": _sds(32, 4), "kernel_lora_b": _sds(4, 64)},  # nnx.Linear
    }
    auto = lmj.find_lora_pairs(tree, "auto")
    assert auto == lmj.find_lora_pairs(tree, "qwix")
    assert sorted((p.a_path.split("]")[0], p.m, p.n, p.rank) for p in auto) == [
        ("['attn_vec_einsum'", 32, 32, 4),
        ("['kv_einsum'", 32, 32, 2),
        ("['q_einsum'", 32, 32, 4),
        ("['up_proj'", 32, 64, 4),
    ]


def test_auto_names_both_presets_and_the_leaves_where_two_fit():
    # Stacked flax factors whose layer count and input size equal the rank: the
    # MaxText layout (layer axis 1) fits these shapes too, and reads them otherwise.
    tree = {"blk": {"lora_a": _sds(2, 2, 2), "lora_b": _sds(2, 2, 3)}}
    with pytest.raises(
        lmj.AmbiguousLayoutError,
        match=r"Ambiguous LoRA layout: a at \['blk'\]\['lora_a'\] \(shape \(2, 2, 2\)\) and "
        r"b at \['blk'\]\['lora_b'\].*pairs='flax' and pairs='qwix' read batch \(2,\) "
        r"\(axes \(0,\) of a.*; pairs='maxtext' reads batch \(2,\) \(axes \(1,\) of a",
    ):
        lmj.find_lora_pairs(tree)
    # The error is a ValueError too, and the explicit presets read the tree.
    with pytest.raises(ValueError, match="Ambiguous"):
        lmj.lora_param_labels()(tree)
    assert lmj.find_lora_pairs(tree, "flax")[0].batch_shape == (2,)


def test_auto_error_when_no_layout_fits_lists_each_reason():
    tree = {"lora_a": _sds(4, 2), "lora_b": _sds(3, 5)}
    with pytest.raises(
        ValueError,
        match=r"^LoRA rank mismatch: a at \['lora_a'\].*No layout that names these leaves "
        r"fits them \(pairs='flax' above; pairs='qwix': .*; pairs='maxtext': .*\)\. "
        r"No preset reads the whole tree",
    ):
        lmj.find_lora_pairs(tree)


def test_layer_axis_in_the_middle_is_not_guessed():
    tree = {"q": {"kernel_lora_a": _sds(16, 3, 4), "kernel_lora_b": _sds(4, 3, 8)}}
    with pytest.raises(ValueError, match=r"ambiguous layout.*maxtext"):
        lmj.find_lora_pairs(tree, "qwix")
    (pair,) = lmj.find_lora_pairs(tree, "maxtext")
    assert (pair.batch_shape, pair.m, pair.n) == ((3,), 16, 8)
    with pytest.raises(ValueError, match="not the axis of b"):
        lmj.find_lora_pairs({"lora": {"a": _sds(8, 2), "b": _sds(3, 5)}}, "gemma")


# --------------------------------------------------------------------------------
# No silent fallback.

_PEFT_TREE = {
    "q.lora_A.default.weight": jnp.ones((2, 6)),
    "q.lora_B.default.weight": jnp.ones((5, 2)),
    "norm": jnp.ones(5),
}
_DENSE_TREE = {"w": jnp.ones((4, 3)), "bias": jnp.zeros(3)}


def _pair_optimizers():
    from lora_muon_jax import peers

    return {
        "lora_muon": lambda **kw: lmj.lora_muon(0.1, **kw),
        "lora_rite": lambda **kw: peers.lora_rite(0.1, **kw),
        "spectron": lambda **kw: peers.spectron(0.1, **kw),
        "riemannion": lambda **kw: peers.riemannion(0.1, **kw),
    }


@pytest.mark.parametrize("name", ["lora_muon", "lora_rite", "spectron", "riemannion"])
def test_explicit_preset_that_finds_nothing_raises_at_init(name):
    tx = _pair_optimizers()[name](pairs="flax")
    with pytest.raises(
        ValueError,
        match=rf"{name}: pairs='flax' found no LoRA factor pair.*\['q.lora_A.default.weight'\]"
        r".*pairs='peft' finds 1",
    ):
        jax.eval_shape(tx.init, _PEFT_TREE)  # shapes only: at trace time
    # The right preset trains.
    state = _pair_optimizers()[name](pairs="peft").init(_PEFT_TREE)
    assert state is not None


@pytest.mark.parametrize("name", ["lora_muon", "lora_rite", "spectron", "riemannion"])
def test_no_pairs_needs_the_opt_in(name):
    make = _pair_optimizers()[name]
    match = rf"{name}: pairs='auto' found no LoRA factor pair.*allow_no_pairs=True"
    with pytest.raises(ValueError, match=match):
        make().init(_DENSE_TREE)
    tx = make(allow_no_pairs=True)
    grads = jax.tree.map(jnp.ones_like, _DENSE_TREE)
    updates, _ = tx.update(grads, tx.init(_DENSE_TREE), _DENSE_TREE)
    adam = optax.adamw(0.1, weight_decay=0.0)
    expected, _ = adam.update(grads, adam.init(_DENSE_TREE), _DENSE_TREE)
    chex.assert_trees_all_close(updates, expected)  # fallback-only: plain AdamW


def test_auto_with_factor_like_names_raises_even_with_opt_in():
    kohya = {"up": {"lora_up.weight": jnp.ones((5, 2)), "lora_down.weight": jnp.ones((2, 6))}}
    for allow in (False, True):
        with pytest.raises(ValueError, match=r"pairs='auto'.*look like LoRA factors.*lora_up"):
            lmj.lora_muon(0.1, allow_no_pairs=allow).init(kohya)
    # pairs=() turns detection off: fallback-only on purpose.
    lmj.lora_muon(0.1, pairs=(), allow_no_pairs=True).init(kohya)
    # A rule for these names pairs them (ΔW = up @ down).
    rule = PairRule("lora_up", "lora_down", b_axes=FactorAxes(rank_axis=0))
    assert len(lmj.find_lora_pairs(kohya, rule)) == 1


def test_labels_and_building_blocks_raise_too():
    with pytest.raises(ValueError, match=r"lora_param_labels: pairs='flax' found no LoRA"):
        lmj.lora_param_labels("flax")(_PEFT_TREE)
    assert jax.tree.leaves(lmj.lora_param_labels(allow_no_pairs=True)(_DENSE_TREE)) == ["other"] * 2
    with pytest.raises(ValueError, match=r"scale_by_lora_muon: pairs='flax' found no LoRA"):
        lmj.scale_by_lora_muon(pairs="flax").init(_PEFT_TREE)
    # find_lora_pairs answers the question without raising.
    assert lmj.find_lora_pairs(_DENSE_TREE) == []
    # A leafless tree (optax.tree.map_params placeholder) is fine.
    assert lmj.lora_param_labels()({}) == {}


def test_dora_magnitude_goes_to_adamw_with_a_note(caplog):
    tree = {
        **_PEFT_TREE,
        "q.lora_magnitude_vector.default.weight": jnp.ones(5),
    }
    _pair_labels._DORA_NOTED.clear()  # another test may have noted this set
    with caplog.at_level(logging.INFO, logger="lora_muon_jax"):
        labels = lmj.lora_param_labels("peft")(tree)
    assert labels["q.lora_magnitude_vector.default.weight"] == "other"
    assert "DoRA magnitude" in caplog.text and "lora_magnitude_vector" in caplog.text
    # Once per set of leaves: labels are computed again at every trace.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lora_muon_jax"):
        lmj.lora_param_labels("peft")(tree)
    assert "DoRA magnitude" not in caplog.text


@pytest.mark.parametrize("pairs", ["auto", PairRule("lora_a", "lora_b")])
def test_transposed_factors_get_the_rule_that_reads_them(pairs):
    # torch's layout under flax's names: a (r, m), b (n, r). The error must print a
    # rule, and that rule, evaluated, must read the pair with the right r, m and n.
    params = {"lora_a": jnp.ones((4, 16)), "lora_b": jnp.ones((8, 4))}
    with pytest.raises(ValueError, match="transposed layout") as err:
        lmj.find_lora_pairs(params, pairs)
    hint = str(err.value).split("`pairs=")[1].split("`")[0]
    (pair,) = lmj.find_lora_pairs(
        params, eval(hint, {"PairRule": PairRule, "FactorAxes": FactorAxes})
    )
    assert (pair.rank, pair.m, pair.n) == (4, 16, 8)
    # A shape that no transposition fits gets no such hint.
    params["lora_b"] = jnp.ones((8, 5))
    with pytest.raises(ValueError) as err:
        lmj.find_lora_pairs(params, pairs)
    assert "transposed" not in str(err.value)
