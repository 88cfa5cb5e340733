"""PEFT adapter files in and out, torch-free.

Names, shapes and config keys of real PEFT files come from
``tests/data/interop_layouts.json`` (PEFT 0.21.2 ``save_pretrained``, recorded by
``tests/data/generate_interop_layouts.py``, which also checked that
``PeftModel.from_pretrained`` loads what :func:`save_peft_adapter` writes and gives
the JAX-merged model's logits).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import lora_muon_jax as lmj
from lora_muon_jax.peft_io import peft_lora_scale

FIXTURE = json.loads((Path(__file__).parent / "data" / "interop_layouts.json").read_text())
PEFT = FIXTURE["peft"]
CONFIG = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}


def _adapter(dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    """Tensors named and shaped as PEFT 0.21.2 saved them (lora_* only)."""
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(s).astype(dtype)
        for k, s in PEFT["adapter_file_default"].items()
        if ".lora_" in k
    }


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, dtype):
    tensors = _adapter(dtype)
    config = {**CONFIG, "target_modules": ["q_proj", "v_proj", "embed_tokens"], "use_rslora": False}
    lmj.save_peft_adapter(tensors, tmp_path, config)
    back = lmj.load_peft_adapter(tmp_path)
    assert sorted(back.params) == sorted(tensors)
    for k, v in tensors.items():
        assert back.params[k].dtype == v.dtype and back.params[k].shape == v.shape
        assert back.params[k].tobytes() == v.tobytes(), k
    assert back.config == config
    assert back.lora_scale == 2.0
    with safetensors.safe_open(tmp_path / "adapter_model.safetensors", framework="numpy") as f:
        assert f.metadata() == {"format": "pt"}  # what PEFT's own files carry


def test_jax_and_nested_trees_write_the_same_file(tmp_path):
    tensors = _adapter()
    nested: dict = {}
    for key, value in tensors.items():
        *parents, last = key.split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = jnp.asarray(value)
    lmj.save_peft_adapter(tensors, tmp_path / "flat", CONFIG | {"target_modules": None})
    lmj.save_peft_adapter(nested, tmp_path / "nested", CONFIG | {"target_modules": None})
    a = (tmp_path / "flat" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "nested" / "adapter_model.safetensors").read_bytes()
    assert a == b


def test_loaded_adapter_pairs_like_peft(tmp_path):
    lmj.save_peft_adapter(_adapter(), tmp_path, CONFIG)
    adapter = lmj.load_peft_adapter(tmp_path)
    summary = sorted((p.m, p.n, p.rank) for p in lmj.find_lora_pairs(adapter.params, "peft"))
    # q_proj 16×16, v_proj 8×16 (torch's (out, in)), embed_tokens vocab 64 × dim 16.
    assert summary == [(8, 16, 4), (16, 16, 4), (64, 16, 4)]


def test_lora_scale_rules():
    tensors = _adapter()
    assert peft_lora_scale(CONFIG, tensors) == 2.0
    assert peft_lora_scale(CONFIG | {"use_rslora": True}, tensors) == 8 / math.sqrt(4)
    # alpha_pattern with PEFT's matching (suffix at a dot): same scale everywhere...
    assert peft_lora_scale(CONFIG | {"alpha_pattern": {"embed_tokens": 8}}, tensors) == 2.0
    # ...or not, which one lora_scale cannot express.
    with pytest.raises(ValueError, match="different LoRA scales"):
        peft_lora_scale(CONFIG | {"alpha_pattern": {"q_proj": 16}}, tensors)
    with pytest.raises(ValueError, match=r"rank 4, but the config gives module .* r=8"):
        peft_lora_scale(CONFIG | {"r": 8}, tensors)
    with pytest.raises(ValueError, match="needs a number `lora_alpha`"):
        peft_lora_scale({"r": 4}, tensors)


def test_bad_input_is_refused(tmp_path):
    tensors = _adapter()
    with pytest.raises(ValueError, match="only LoRA adapters"):
        lmj.save_peft_adapter(tensors, tmp_path, CONFIG | {"peft_type": "IA3"})
    in_memory = {
        k.replace(".lora_A.weight", ".lora_A.default.weight"): v for k, v in tensors.items()
    }
    with pytest.raises(ValueError, match="adapter name after the factor"):
        lmj.save_peft_adapter(in_memory, tmp_path, CONFIG)
    lone = {k: v for k, v in tensors.items() if "q_proj.lora_B" not in k}
    with pytest.raises(ValueError, match="Unpaired LoRA factor"):
        lmj.save_peft_adapter(lone, tmp_path, CONFIG)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        safetensors.numpy.save_file(tensors, tmp_path / "adapter_model.safetensors")
        lmj.load_peft_adapter(tmp_path)
    assert not (tmp_path / "adapter_config.json").exists()


def test_file_written_by_peft_reads_back(tmp_path):
    # PEFT's own file: its key set (factors plus the saved base embedding) and its
    # config keys, recorded from save_pretrained.
    rng = np.random.default_rng(1)
    tensors = {
        k: rng.standard_normal(s).astype(np.float32)
        for k, s in PEFT["adapter_file_default"].items()
    }
    safetensors.numpy.save_file(
        tensors, tmp_path / "adapter_model.safetensors", metadata={"format": "pt"}
    )
    config = {k: None for k in PEFT["saved_config_keys"]}
    config |= {
        "peft_type": "LORA",
        "r": 4,
        "lora_alpha": 8,
        "use_rslora": False,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    (tmp_path / "adapter_config.json").write_text(json.dumps(config))
    adapter = lmj.load_peft_adapter(tmp_path)
    assert adapter.lora_scale == PEFT["saved_lora_scale"]["peft"]
    assert len(lmj.find_lora_pairs(adapter.params, "peft")) == 3
    # The saved base embedding is no factor: lora_muon gives it AdamW.
    labels = lmj.lora_param_labels("peft")(adapter.params)
    assert labels["base_model.model.model.embed_tokens.base_layer.weight"] == "other"


def test_export_was_checked_against_peft():
    # Recorded once with torch 2.13 and PEFT 0.21.2: PeftModel.from_pretrained on
    # the adapter of examples/peft_export.py gives the logits of the base model
    # with the JAX-merged weights.
    export = PEFT["export"]
    assert export["logits_max_abs_err"] < 1e-5 and export["merged_weight_max_abs_err"] < 1e-5
    assert export["losses"][1] < 0.1 * export["losses"][0]
    assert jax.tree.leaves(PEFT["versions"])  # provenance recorded
