"""``pairs="auto"`` on qwix LoRA as Tunix's own models carry it, without Tunix installed.

The names and shapes come from ``tests/data/tunix_qwix_layouts.json``, written by
``tests/data/generate_tunix_layouts.py`` from google-tunix 0.1.7 and qwix 0.1.8: the
LoRA params (``nnx.state(model, nnx.LoRAParam)``, as Tunix's ``PeftTrainer``
trains them) of tiny Gemma, Gemma3, Llama3, Qwen2 and Qwen3 models with
``qwix.LoraProvider(module_path=".*", rank=r, alpha=6)``: ranks 2-8, 4 query heads
with 1, 2 or 4 kv heads (MQA, GQA, MHA), 1-2 layers; ``nnx.Linear`` adapters
(``kernel_lora_a/b``) and Tunix ``Einsum`` ones (``w_lora_a/b``). The generator
also checked the qwix reading against qwix's own forward pass (the logits of the
LoRA model equal those of the model holding ``c · a @ b`` in its weights).

tests/test_tunix.py builds the same models from the real library when it is
installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import lora_muon_jax as lmj

FIXTURE = json.loads((Path(__file__).parent / "data" / "tunix_qwix_layouts.json").read_text())
CASES = FIXTURE["cases"]


def lora_tree(flat: dict[str, list[int]]) -> dict:
    """The LoRA params as ``nnx.to_pure_dict`` gives them (layer indices as ints)."""
    out: dict = {}
    for key, shape in flat.items():
        *parents, leaf = key.split("/")
        node = out
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[leaf] = jax.ShapeDtypeStruct(tuple(shape), jnp.float32)
    return out


def test_fixture_covers_every_model_and_head_layout():
    seen = {(c["model"], c["num_kv_heads"]) for c in CASES.values()}
    models = {"gemma", "gemma3", "llama3", "qwen2", "qwen3"}
    assert {m for m, _ in seen} == models
    assert {kv for _, kv in seen} == {1, 2, 4}  # MQA, GQA, MHA (4 query heads)
    assert len(CASES) >= 20
    ranks = {c["rank"] for c in CASES.values()}
    assert ranks >= {2, 4, 8} and min(ranks) >= 2 and max(ranks) <= 8
    # Einsum adapters (w_lora_a) and nnx.Linear ones (kernel_lora_a) both occur.
    keys = {k.rsplit("/", 1)[-1] for c in CASES.values() for k in c["params"]}
    assert keys == {"w_lora_a", "w_lora_b", "kernel_lora_a", "kernel_lora_b"}


@pytest.mark.parametrize("name", list(CASES))
def test_auto_finds_what_the_qwix_preset_finds(name):
    case = CASES[name]
    tree = lora_tree(case["params"])
    qwix = lmj.find_lora_pairs(tree, "qwix")
    assert lmj.find_lora_pairs(tree, "auto") == qwix
    # Every LoRA param is in a pair, read as recorded when the generator checked it
    # against qwix's forward pass.
    assert 2 * len(qwix) == len(case["params"])
    assert [
        dict(a=p.a_path, b=p.b_path, batch=list(p.batch_shape), m=p.m, n=p.n, rank=p.rank)
        for p in qwix
    ] == case["pairs_qwix"]
    assert case["logits_max_abs_err"] < 1e-4 * max(1.0, case["logits_max_abs"]), name
    assert case["lora_scale"] == case["alpha"] / case["rank"]


def test_auto_trains_a_tunix_tree():
    # One lora_muon step with pairs="auto" on a Tunix tree (GQA Llama3, einsum and
    # Linear adapters) runs and moves every factor.
    case = CASES["llama3 L1 heads4 kv2 r5"]
    rng = np.random.default_rng(0)
    params = jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s.shape), jnp.float32), lora_tree(case["params"])
    )
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), params)
    tx = lmj.lora_muon(0.01, pairs="auto", lora_scale=case["lora_scale"])
    updates, _ = tx.update(grads, tx.init(params), params)
    assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree.leaves(updates))


def test_an_explicit_preset_that_misreads_names_the_one_that_fits():
    tree = lora_tree(CASES["gemma L1 heads4 kv1 r2"]["params"])
    n = len(lmj.find_lora_pairs(tree, "qwix"))
    with pytest.raises(
        ValueError,
        match=r"LoRA batch axes mismatch: a at \['layers'\]\[0\]\['attn'\]\['attn_vec_einsum'\]"
        rf".*Presets that read the whole tree: pairs='qwix' finds {n} "
        r"\(pairs='maxtext_unscanned' reads it the same\)\.$",
    ):
        lmj.find_lora_pairs(tree, "flax")
