"""Pair discovery: presets, layouts, Flax trees, callables and clear errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import lora_muon_jax as lmj
from lora_muon_jax import FactorAxes, LoRAFactor, PairRule


def _sds(*shape, dtype=jnp.float32):
    return jax.ShapeDtypeStruct(shape, dtype)


def _summary(tree, pairs="auto"):
    return [(p.a_path, p.b_path, p.batch_shape, p.m, p.n, p.rank) for p in lmj.find_lora_pairs(tree, pairs)]


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
    # ... and "auto" refuses the layout loudly rather than misreading it.
    with pytest.raises(ValueError, match="rank mismatch"):
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
    tree = {"attn": {"lora": {"a": _sds(8, 2), "b": _sds(2, 4)}}, "other": {"a": _sds(3), "b": _sds(3)}}
    assert _summary(tree) == [("['attn']['lora']['a']", "['attn']['lora']['b']", (), 8, 4, 2)]


def test_nnx_state_with_value_keys_and_pure_match():
    model = nnx.LoRALinear(6, 5, lora_rank=3, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.LoRAParam)
    with_value = _summary(state)
    pure = _summary(nnx.to_pure_dict(state) if hasattr(nnx, "to_pure_dict") else state.to_pure_dict())
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
        ({"lora_a": _sds(4, 2), "lora_b": _sds(3, 5)}, r"rank mismatch.*\['lora_a'\].*\['lora_b'\]"),
        ({"lora_a": _sds(2, 4, 2), "lora_b": _sds(3, 2, 5)}, r"batch axes mismatch.*\(2,\).*\(3,\)"),
        ({"lora_a": _sds(4, 2), "lora_b": _sds(2, 5, dtype=jnp.bfloat16)}, r"dtype mismatch.*float32.*bfloat16"),
        ({"lora_a": _sds(4), "lora_b": _sds(2, 5)}, r"\['lora_a'\] must be an array with ndim >= 2"),
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
