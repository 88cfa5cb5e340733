"""LoRA-Muon on adapters laid out as real libraries write them.

The names and shapes come from ``tests/data/interop_layouts.json``, recorded by
``tests/data/generate_interop_layouts.py`` from the libraries themselves: Hugging Face
PEFT 0.21.2 (a tiny Llama's state dict with two adapters, one DoRA, an embedding
adapter and a Conv2d; and the adapter file ``save_pretrained`` writes), gemma 3.3.0
``gemma.peft`` (LoRADense, LoRAEinsum, LoRADenseGeneral), qwix 0.1.8
(``apply_lora_to_model`` on nnx Linear, Einsum, batched dot_general and Conv) and
MaxText's own LoRA shape function, run from its source (scanned and unscanned),
plus its native qwix layout derived from source. The generator also checked this
library's reading of each layout against the library's own LoRA output; those
errors are asserted small here.

For every layout, one step of ``lora_muon`` must (1) split the budget exactly, each
tangent term of every product having spectral norm ``η/2``; (2) be gauge invariant;
(3) equal the float64 reference of ``tests/reference.py`` applied to the factors
reshaped to matrices with :meth:`LoRAPair.canonical`.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_muon_jax as lmj
from lora_muon_jax import testing
from tests import reference
from tests.helpers import rel_err

FIXTURE = json.loads((Path(__file__).parent / "data" / "interop_layouts.json").read_text())
LR = 0.1


def _nested(flat: dict[str, list[int]], sep: str) -> dict:
    out: dict = {}
    for key, shape in flat.items():
        *parents, leaf = key.split(sep)
        node = out
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = tuple(shape)
    return out


def _layouts() -> dict[str, tuple[dict, str, float, list]]:
    """``name -> (tree of shapes, pairs, lora_scale, expected pair summaries)``."""
    peft, gemma, qwix, mt = (FIXTURE[k] for k in ("peft", "gemma", "qwix", "maxtext"))
    out = {
        "peft state dict": (
            {k: tuple(v) for k, v in peft["state_dict"].items()},
            "peft",
            2.0,
            peft["pairs_state_dict_peft"],
        ),
        "peft state dict, nested": (
            _nested(peft["state_dict"], "."),
            "peft",
            2.0,
            None,
        ),
        "peft adapter file": (
            {k: tuple(v) for k, v in peft["adapter_file_default"].items()},
            "peft",
            2.0,
            None,
        ),
        "peft conv2d": (
            {k: tuple(v) for k, v in peft["conv2d_state_dict"].items()},
            "peft",
            2.0,
            None,
        ),
        "gemma": (
            {case: _nested(v["params"], "/") for case, v in gemma["cases"].items()},
            "gemma",
            1.0,
            [p for v in gemma["cases"].values() for p in v["pairs"]],
        ),
        "qwix": (
            {
                case: {k: tuple(s) for k, s in v["params"].items()}
                for case, v in qwix["cases"].items()
            },
            "qwix",
            qwix["alpha"] / qwix["rank"],
            [p for v in qwix["cases"].values() for p in v["pairs"]],
        ),
        "maxtext scanned": (
            {
                "pefted": _nested(mt["scanned"]["params"], "/"),
                "native": _nested(mt["native_qwix_scanned_derived"]["params"], "/"),
            },
            "maxtext",
            1.0,
            None,
        ),
        "maxtext unscanned": (
            _nested(mt["unscanned"]["params"], "/"),
            "maxtext_unscanned",
            1.0,
            None,
        ),
    }
    return out


LAYOUTS = _layouts()
# The optimizer checks run on one tree per library layout (the nested and file forms
# of PEFT names differ from the state dict only in their keys).
MATH = ["peft state dict", "peft conv2d", "gemma", "qwix", "maxtext scanned", "maxtext unscanned"]


def _params(shapes: dict, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(0.5 * rng.standard_normal(s), jnp.float32),
        shapes,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _loss(pairs, lora_scale: float, params: dict, seed: int = 1):
    """``Σ ½‖c·a@b − T‖²`` over pairs (in canonical form) + ``½‖x‖²`` for the rest."""
    found = lmj.find_lora_pairs(params, pairs)
    paired = {i for p in found for i in (p.a_index, p.b_index)}
    rng = np.random.default_rng(seed)
    targets = [
        jnp.asarray(rng.standard_normal((*p.batch_shape, p.m, p.n)), jnp.float32) for p in found
    ]

    def loss(tree):
        leaves = jax.tree.leaves(tree)
        total = sum(0.5 * jnp.sum(leaves[i] ** 2) for i in range(len(leaves)) if i not in paired)
        for p, t in zip(found, targets, strict=True):
            a, b = p.canonical(leaves[p.a_index], "a"), p.canonical(leaves[p.b_index], "b")
            total += 0.5 * jnp.sum((lora_scale * a @ b - t) ** 2)
        return total

    return loss


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_pairs_match_the_fixture(name):
    shapes, pairs, _, expected = LAYOUTS[name]
    found = lmj.find_lora_pairs(_params(shapes), pairs)
    assert found, name
    if expected is not None:  # as recorded when the library's own output was checked
        assert sorted((p.batch_shape, p.m, p.n, p.rank) for p in found) == sorted(
            (tuple(e["batch"]), e["m"], e["n"], e["rank"]) for e in expected
        )


def test_fixture_agrees_with_the_libraries():
    # Recorded by the generator: this library's c·a@b, put back in the weight
    # layout, against each library's own delta weight / LoRA output.
    peft = FIXTURE["peft"]
    assert max(peft["delta_weight_max_abs_err"].values()) < 1e-5
    assert peft["rslora_scaling"]["ours"] == peft["rslora_scaling"]["peft"] == 4.0
    assert peft["saved_lora_scale"]["ours"] == peft["saved_lora_scale"]["peft"]
    # examples/peft_export.py's adapter, loaded by PeftModel.from_pretrained.
    assert peft["export"]["logits_max_abs_err"] < 1e-5 * max(1.0, peft["export"]["logits_max_abs"])
    for lib in ("gemma", "qwix"):
        for case, v in FIXTURE[lib]["cases"].items():
            assert v["output_max_abs_err"] < 1e-5 * max(1.0, v["output_max_abs"]), (lib, case)


def test_layout_details():
    peft = LAYOUTS["peft state dict"][0]
    (emb,) = [p for p in lmj.find_lora_pairs(_params(peft), "peft") if "embed" in p.a_path]
    # Embedding: ΔW = (B A)ᵀ is (vocab, dim), so `a` is lora_embedding_A.
    assert "lora_embedding_A" in emb.a_path and (emb.m, emb.n) == (64, 16)
    (conv,) = lmj.find_lora_pairs(_params(LAYOUTS["peft conv2d"][0]), "peft")
    assert (conv.m, conv.n, conv.rank) == (6, 27, 2)  # out × (in·kh·kw)
    mt = lmj.find_lora_pairs(_params(LAYOUTS["maxtext scanned"][0]), "maxtext")
    assert {p.batch_shape for p in mt} == {(3,)}
    # The qwix preset refuses MaxText's scanned layout instead of misreading it.
    with pytest.raises(ValueError, match="ambiguous layout"):
        lmj.find_lora_pairs(_params(LAYOUTS["maxtext scanned"][0]["native"]), "qwix")


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_auto_reads_each_layout_as_its_library_preset(name):
    shapes, pairs, _, _ = LAYOUTS[name]
    params = _params(shapes)
    if name == "maxtext scanned":
        # MaxText's layer axis at 1 has the shapes of a qwix einsum adapter too:
        # "auto" names both readings instead of picking one.
        with pytest.raises(
            lmj.AmbiguousLayoutError, match=r"pairs='maxtext' reads batch \(3,\).*pairs='qwix'"
        ):
            lmj.find_lora_pairs(params, "auto")
        return
    assert lmj.find_lora_pairs(params, "auto") == lmj.find_lora_pairs(params, pairs)


@pytest.mark.parametrize("name", MATH)
def test_each_term_is_half_the_budget_and_matches_float64(name):
    shapes, pairs, c, _ = LAYOUTS[name]
    params = _params(shapes)
    loss = _loss(pairs, c, params)
    grads = jax.grad(loss)(params)
    tx = lmj.lora_muon(LR, beta=0.9, lora_scale=c, pairs=pairs, solver="eigh")
    tx = tx._replace(update=jax.jit(tx.update))  # one compile instead of eager dispatch
    updates = testing.assert_product_step_within_budget(
        tx, params, grads, LR, pairs=pairs, lora_scale=c, each_term=True, rtol=1e-4
    )
    # Step 1: the momentum is (1-β)g and msign ignores its scale, so the update is
    # -η/(2c) times the float64 directions of the canonical factors and gradients.
    leaves = [[np.asarray(x) for x in jax.tree.leaves(t)] for t in (params, grads, updates)]
    for pair in lmj.find_lora_pairs(params, pairs):
        (a, b), (ga, gb), (ua, ub) = (
            (pair.canonical(ls[pair.a_index], "a"), pair.canonical(ls[pair.b_index], "b"))
            for ls in leaves
        )
        for idx in np.ndindex(*pair.batch_shape):
            da, db = reference.directions(a[idx], b[idx], ga[idx], gb[idx])
            assert rel_err(ua[idx], -LR / (2 * c) * da) < 1e-4, (pair.a_path, idx)
            assert rel_err(ub[idx], -LR / (2 * c) * db) < 1e-4, (pair.b_path, idx)


@pytest.mark.parametrize("name", MATH)
def test_gauge_invariant(name):
    shapes, pairs, c, _ = LAYOUTS[name]
    params = _params(shapes)
    tx = lmj.lora_muon(0.05, beta=0.9, lora_scale=c, pairs=pairs, solver="eigh")
    testing.assert_gauge_invariant(
        tx, params, _loss(pairs, c, params), pairs=pairs, lora_scale=c, steps=2, rtol=1e-4
    )
