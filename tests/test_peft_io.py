"""PEFT adapter files in and out, torch-free.

Names, shapes and config keys of real PEFT files come from
``tests/data/interop_layouts.json`` (PEFT 0.21.2 ``save_pretrained``, recorded by
``tests/data/generate_interop_layouts.py``). The adapter directories under
``tests/data/peft_io/`` and ``tests/data/peft_io.json`` come from
``tests/data/generate_peft_io.py`` (peft 0.21.2, torch 2.13.0, transformers 5.24.0):
PEFT's own ``save_pretrained`` files for lora_bias, embedding/lm_head, modules_to_save,
trainable-token and 14-module adapters, and the record of ``PeftModel.from_pretrained``
loading what :func:`save_peft_adapter` wrote back (tensors bit-identical, logits). The
tests here recompute the JAX side of those records; the last test re-runs the
cross-check itself where torch and peft are installed.
"""

from __future__ import annotations

import enum
import importlib.util
import json
import math
import warnings
from pathlib import Path

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
import safetensors
import safetensors.numpy

import lora_muon_jax as lmj
from lora_muon_jax import peft_io
from lora_muon_jax.peft_io import peft_lora_scale
from tests.data.generate_peft_io import jax_train

DATA = Path(__file__).parent / "data"
FIXTURE = json.loads((DATA / "interop_layouts.json").read_text())
PEFT = FIXTURE["peft"]
RECORD = json.loads((DATA / "peft_io.json").read_text())
CASES = RECORD["cases"]
CONFIG = {
    "peft_type": "LORA",
    "r": 4,
    "lora_alpha": 8,
    "target_modules": ["q_proj", "v_proj", "embed_tokens"],
}
P = "base_model.model."
Q = P + "model.layers.0.self_attn.q_proj."


def _adapter(dtype=np.float32, seed: int = 0) -> dict[str, np.ndarray]:
    """Tensors named and shaped as PEFT 0.21.2 saved them (lora_* only)."""
    rng = np.random.default_rng(seed)
    return {
        k: rng.standard_normal(s).astype(dtype)
        for k, s in PEFT["adapter_file_default"].items()
        if ".lora_" in k
    }


def _train(params: dict, pairs, **options) -> dict[str, np.ndarray]:
    """The generator's 3 lora_muon steps on fixed random gradients, at scale 2."""
    return jax_train(params, pairs, 2.0, **options)


def _file(directory: Path) -> dict[str, np.ndarray]:
    return safetensors.numpy.load_file(directory / "adapter_model.safetensors")


# ------------------------------------------------------------------------------------
# The round trip


@pytest.mark.parametrize("dtype", [np.float32, np.float16, ml_dtypes.bfloat16])
def test_round_trip_is_bit_identical(tmp_path, dtype):
    tensors = _adapter(dtype)
    config = {**CONFIG, "use_rslora": False}
    lmj.save_peft_adapter(tensors, tmp_path, config)
    back = lmj.load_peft_adapter(tmp_path)
    assert sorted(back.params) == sorted(tensors) and back.frozen == {}
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
    lmj.save_peft_adapter(tensors, tmp_path / "flat", CONFIG)
    lmj.save_peft_adapter(nested, tmp_path / "nested", CONFIG)
    a = (tmp_path / "flat" / "adapter_model.safetensors").read_bytes()
    b = (tmp_path / "nested" / "adapter_model.safetensors").read_bytes()
    assert a == b


def test_loaded_adapter_pairs_like_peft(tmp_path):
    lmj.save_peft_adapter(_adapter(), tmp_path, CONFIG)
    adapter = lmj.load_peft_adapter(tmp_path)
    for pairs in ("peft", adapter.pairs):
        summary = sorted((p.m, p.n, p.rank) for p in lmj.find_lora_pairs(adapter.params, pairs))
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
    unprefixed = {k.removeprefix(P): v for k, v in tensors.items()}
    with pytest.raises(ValueError, match=r"'model\.embed_tokens\.lora_embedding_A' does not "):
        lmj.save_peft_adapter(unprefixed, tmp_path, CONFIG)
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
    assert len(lmj.find_lora_pairs(adapter.params, adapter.pairs)) == 3
    # The saved base embedding is a frozen copy: kept out of what is trained.
    base = P + "model.embed_tokens.base_layer.weight"
    assert list(adapter.frozen) == [base] and base not in adapter.params


# ------------------------------------------------------------------------------------
# 1. lora_bias=True


def test_lora_bias_is_a_trained_leaf_and_saves_under_peft_names(tmp_path):
    adapter = lmj.load_peft_adapter(DATA / "peft_io" / "lora_bias")
    record = CASES["lora_bias"]
    assert sorted(adapter.params) == record["params"] and adapter.frozen == {}
    bias = Q + "lora_B.bias"
    assert adapter.params[bias].shape == (16,)
    labels = lmj.lora_param_labels(adapter.pairs)(adapter.params)
    assert labels[bias] == "other" and labels[Q + "lora_B.weight"] == "lora"
    assert len(lmj.find_lora_pairs(adapter.params, adapter.pairs)) == 2
    trained = _train(adapter.params, adapter.pairs, weight_decay=0.1, adam_weight_decay=0.1)
    # AdamW's first steps move every coordinate by about the learning rate.
    assert 0.5 * 3 * 0.02 < np.abs(trained[bias] - adapter.params[bias]).max() < 2 * 3 * 0.02
    lmj.save_peft_adapter(trained, tmp_path, adapter.config, frozen=adapter.frozen)
    back = _file(tmp_path)
    assert sorted(back) == record["peft"]["file_tensors"]
    assert all(back[k].tobytes() == v.tobytes() for k, v in trained.items())
    # PEFT loaded the generator's such file: every tensor bit-identical, the logits
    # those of the base model with W + c·B@A and b + c·lora_B.bias merged in NumPy.
    assert record["peft"]["tensors_bit_identical"] and record["peft"]["peft_warnings"] == []
    assert record["peft"]["logits_max_abs_err"] < 1e-6
    assert record["peft"]["logits_max_abs_change_by_adapter"] > 0.1


def test_lora_bias_needs_its_config_field(tmp_path):
    adapter = lmj.load_peft_adapter(DATA / "peft_io" / "lora_bias")
    bias = Q + "lora_B.bias"
    with pytest.raises(ValueError, match=rf"'{bias}' is created by PEFT only with `lora_bias`"):
        lmj.save_peft_adapter(adapter.params, tmp_path, adapter.config | {"lora_bias": False})
    embedding_bias = {P + "model.embed_tokens.lora_B.bias": np.zeros(16, np.float32)}
    with pytest.raises(ValueError, match="is a lora_bias of an embedding; PEFT supports"):
        lmj.save_peft_adapter(_adapter() | embedding_bias, tmp_path, CONFIG | {"lora_bias": True})
    orphan = {k: v for k, v in adapter.params.items() if "q_proj.lora_" not in k or k == bias}
    with pytest.raises(ValueError, match=r"belongs to module '.*q_proj', which has no LoRA"):
        lmj.save_peft_adapter(orphan, tmp_path, adapter.config)


# ------------------------------------------------------------------------------------
# 2. target_modules against the tensors


def test_missing_target_modules_are_filled_with_every_adapted_module(tmp_path):
    adapter = lmj.load_peft_adapter(DATA / "peft_io" / "target_modules")
    record = CASES["target_modules"]
    config = {k: v for k, v in adapter.config.items() if k != "target_modules"}
    for given in (config, config | {"target_modules": None}):
        lmj.save_peft_adapter(adapter.params, tmp_path, given)
        written = json.loads((tmp_path / "adapter_config.json").read_text())
        assert written["target_modules"] == record["modules"] == record["written_target_modules"]
        assert len(written["target_modules"]) == 14
    # PEFT with that file: all 28 tensors in place; with `target_modules: null` (what
    # was written before) it fell back to Llama's q_proj/v_proj and dropped the other
    # 10 modules without a warning.
    filled, null = record["peft_filled"], record["peft_target_modules_null"]
    assert filled["tensors_bit_identical"] and filled["logits_max_abs_err"] < 1e-6
    assert len(null["peft_tensors_missing"]) == 20 and null["peft_warnings"] == []
    assert null["logits_max_abs_err"] > 0.1


def test_target_modules_that_miss_a_module_are_refused(tmp_path):
    adapter = lmj.load_peft_adapter(DATA / "peft_io" / "target_modules")
    config = adapter.config

    def refused(**fields) -> str:
        with pytest.raises(ValueError, match="so PeftModel.from_pretrained would drop") as err:
            lmj.save_peft_adapter(adapter.params, tmp_path, config | fields)
        return str(err.value)

    message = refused(target_modules=["q_proj", "v_proj"])
    assert "does not target 10 adapted module(s): 'model.layers.0.mlp.down_proj'," in message
    assert "and 2 more" in message
    assert "'model.layers.1.self_attn.o_proj' (target" in refused(
        target_modules=r"model\.layers\.\d+\.(mlp\.\w+|self_attn\.[qkv]_proj)"
    )
    message = refused(exclude_modules=["down_proj"])
    assert "2 adapted module(s): 'model.layers.0.mlp.down_proj', 'model.layers.1.mlp" in message
    message = refused(layers_to_transform=[0])
    assert "7 adapted module(s): 'model.layers.1.mlp.down_proj'" in message
    message = refused(modules_to_save=["up_proj"])  # PEFT never adapts those
    assert "2 adapted module(s): 'model.layers.0.mlp.up_proj'" in message
    assert not (tmp_path / "adapter_config.json").exists()
    # What PEFT accepts is accepted.
    for fields in (
        {"target_modules": r"model\.layers\.\d+\.(mlp|self_attn)\.\w+_proj"},
        {"target_modules": "all-linear"},
        {
            "target_modules": [
                "q_proj",
                "k_proj",
                "v_proj",
                "o_proj",
                "gate_proj",
                "up_proj",
                "down_proj",
            ]
        },
        {"layers_to_transform": [0, 1], "layers_pattern": "layers"},
    ):
        lmj.save_peft_adapter(adapter.params, tmp_path, config | fields)
    tensors = _adapter()  # an embedding is never Linear
    with pytest.raises(ValueError, match="1 adapted module.*'model.embed_tokens'"):
        lmj.save_peft_adapter(tensors, tmp_path, CONFIG | {"target_modules": "all-linear"})
    conv = {  # nor is a Conv2d
        P + "conv.lora_A.weight": np.ones((4, 3, 3, 3), np.float32),
        P + "conv.lora_B.weight": np.ones((6, 4, 1, 1), np.float32),
    }
    with pytest.raises(ValueError, match="1 adapted module.*'conv'"):
        lmj.save_peft_adapter(conv, tmp_path, CONFIG | {"target_modules": "all-linear"})
    lmj.save_peft_adapter(conv, tmp_path, CONFIG | {"target_modules": ["conv"]})


TARGETING = [
    ({"target_modules": ["q_proj"]}, "model.layers.0.self_attn.q_proj", True),
    ({"target_modules": ["self_attn.q_proj"]}, "model.layers.0.self_attn.q_proj", True),
    ({"target_modules": ["_proj"]}, "model.layers.0.self_attn.q_proj", False),
    (
        {"target_modules": ["model.layers.0.self_attn.q_proj"]},
        "model.layers.0.self_attn.q_proj",
        True,
    ),
    ({"target_modules": r".*q_proj"}, "model.layers.0.self_attn.q_proj", True),
    ({"target_modules": r"q_proj"}, "model.layers.0.self_attn.q_proj", False),
    (
        {"target_modules": ["q_proj"], "exclude_modules": r".*\.0\..*"},
        "model.layers.0.self_attn.q_proj",
        False,
    ),
    (
        {"target_modules": ["q_proj"], "layers_to_transform": 1},
        "model.layers.1.self_attn.q_proj",
        True,
    ),
    (
        {"target_modules": ["q_proj"], "layers_to_transform": 1},
        "model.layers.0.self_attn.q_proj",
        False,
    ),
    ({"target_modules": ["lm_head"], "modules_to_save": ["lm_head"]}, "lm_head", False),
    (
        {"target_modules": None, "target_parameters": ["mlp.experts.gate_up_proj"]},
        "model.layers.0.mlp.experts",
        True,
    ),
]


@pytest.mark.parametrize(("fields", "module", "targeted"), TARGETING)
def test_targeting_follows_peft(fields, module, targeted):
    # The same cases run against PEFT's own check_target_module_exists in
    # test_against_real_peft.
    assert peft_io._targeted(fields, module, linear=True) == targeted


# ------------------------------------------------------------------------------------
# 3. The config as written


def test_patterns_keep_the_order_given(tmp_path):
    # The generator saved PEFT's in-memory config (LoraConfig.to_dict(), which
    # holds target_modules as a set) with save_peft_adapter: specific pattern first.
    directory = DATA / "peft_io" / "patterns"
    record = CASES["patterns"]
    assert record["to_dict_set_fields"] == ["target_modules"]
    adapter = lmj.load_peft_adapter(directory)
    rank_pattern = {"layers.1.mlp.down_proj": 2, "down_proj": 8}
    alpha_pattern = {"layers.1.mlp.down_proj": 4, "down_proj": 16}
    assert list(adapter.config["rank_pattern"].items()) == list(rank_pattern.items())
    assert [list(x) for x in rank_pattern.items()] == record["written_rank_pattern"]
    assert adapter.config["target_modules"] == ["down_proj", "q_proj"]
    assert adapter.lora_scale == 2.0
    # Sorted (as json.dumps(sort_keys=True) wrote it, and as PEFT's own
    # save_pretrained still does), layer 1's down_proj reads r=8: refused here, a
    # size mismatch in PEFT (recorded).
    ranks = dict(sorted(rank_pattern.items()))
    with pytest.raises(ValueError, match=r"layers\.1\.mlp\.down_proj.*rank 2, but .* r=8"):
        peft_lora_scale(adapter.config | {"rank_pattern": ranks}, adapter.params)
    assert record["peft_save_pretrained_rank_pattern"] == [
        ["down_proj", 8],
        ["layers.1.mlp.down_proj", 2],
    ]
    assert "size mismatch" in record["peft_save_pretrained_round_trip"]
    assert record["peft"]["tensors_bit_identical"] and record["peft"]["logits_max_abs_err"] < 1e-6
    # Written again from dicts in that order: the order survives.
    config = adapter.config | {"rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern}
    lmj.save_peft_adapter(adapter.params, tmp_path, config)
    text = (tmp_path / "adapter_config.json").read_text()
    assert text.index('"layers.1.mlp.down_proj": 2') < text.index('"down_proj": 8')
    assert lmj.load_peft_adapter(tmp_path).config["rank_pattern"] == rank_pattern


class _PeftType(str, enum.Enum):  # noqa: UP042 (as peft.PeftType is)
    LORA = "LORA"


def test_in_memory_configs_with_sets_are_written_as_sorted_lists(tmp_path):
    config = {
        "peft_type": _PeftType.LORA,
        "r": np.int64(4),
        "lora_alpha": 8,
        "target_modules": {"v_proj", "q_proj", "embed_tokens"},
        "trainable_token_indices": None,
        "layers_pattern": ("layers",),
    }
    lmj.save_peft_adapter(_adapter(), tmp_path, config)
    text = (tmp_path / "adapter_config.json").read_text()
    written = json.loads(text)
    assert written == {
        "layers_pattern": ["layers"],
        "lora_alpha": 8,
        "peft_type": "LORA",
        "r": 4,
        "target_modules": ["embed_tokens", "q_proj", "v_proj"],
        "trainable_token_indices": None,
    }
    assert list(written) == sorted(written)  # top-level keys sorted, as PEFT writes them

    class LoraConfig:  # as peft.LoraConfig: a dataclass with to_dict()
        def to_dict(self) -> dict:
            return dict(config)

    lmj.save_peft_adapter(_adapter(), tmp_path / "object", LoraConfig())
    assert json.loads((tmp_path / "object" / "adapter_config.json").read_text()) == written
    with pytest.raises(TypeError, match=r"config field 'eva_config\.x' holds a object"):
        lmj.save_peft_adapter(_adapter(), tmp_path / "x", config | {"eva_config": {"x": object()}})


# ------------------------------------------------------------------------------------
# 4. Frozen base copies, modules_to_save, trainable tokens


def test_frozen_base_copies_are_not_trained_and_written_back_unchanged(tmp_path):
    directory = DATA / "peft_io" / "embed_lm_head"
    adapter = lmj.load_peft_adapter(directory)
    record = CASES["embed_lm_head"]
    assert (
        sorted(adapter.frozen)
        == record["frozen"]
        == [
            P + "lm_head.base_layer.weight",
            P + "model.embed_tokens.base_layer.weight",
        ]
    )
    assert sorted(adapter.params) == record["params"]  # the six factors only
    trained = _train(adapter.params, adapter.pairs, weight_decay=0.1, adam_weight_decay=0.1)
    lmj.save_peft_adapter(trained, tmp_path, adapter.config, frozen=adapter.frozen)
    before, after = _file(directory), _file(tmp_path)
    assert sorted(after) == sorted(before)
    for key in adapter.frozen:
        assert after[key].tobytes() == before[key].tobytes(), key
    assert all(np.abs(after[k] - before[k]).max() > 1e-3 for k in adapter.params)
    assert record["peft"]["tensors_bit_identical"] and record["peft"]["logits_max_abs_err"] < 1e-6
    # A base copy among the trained tensors (as load_peft_adapter returned it before)
    # is refused, naming it.
    with pytest.raises(ValueError, match=r"'.*lm_head.base_layer.weight' is a copy of a frozen"):
        lmj.save_peft_adapter(trained | adapter.frozen, tmp_path, adapter.config)
    with pytest.raises(ValueError, match="given both in `params` and in `frozen`"):
        lmj.save_peft_adapter(
            trained | adapter.frozen, tmp_path, adapter.config, frozen=adapter.frozen
        )
    no_lm_head = {k: v for k, v in trained.items() if ".lm_head." not in k}
    with pytest.raises(ValueError, match=r"base weight of module 'lm_head', which has no LoRA"):
        lmj.save_peft_adapter(no_lm_head, tmp_path, adapter.config, frozen=adapter.frozen)
    lm_head = {k: v for k, v in trained.items() if ".lm_head." in k}
    with pytest.raises(ValueError, match="is a LoRA tensor that PEFT trains; pass it in `params`"):
        lmj.save_peft_adapter(no_lm_head, tmp_path, adapter.config, frozen=lm_head)


def test_modules_to_save_and_token_deltas_are_trained(tmp_path):
    for case, key, field in (
        ("modules_to_save", P + "lm_head.weight", "modules_to_save"),
        (
            "trainable_tokens",
            P + "model.embed_tokens.token_adapter.trainable_tokens_delta",
            "trainable_token_indices",
        ),
    ):
        adapter = lmj.load_peft_adapter(DATA / "peft_io" / case)
        assert key in adapter.params and adapter.frozen == {}
        assert lmj.lora_param_labels(adapter.pairs)(adapter.params)[key] == "other"
        trained = _train(adapter.params, adapter.pairs)
        assert np.abs(trained[key] - adapter.params[key]).max() > 0.03
        lmj.save_peft_adapter(trained, tmp_path / case, adapter.config)
        assert _file(tmp_path / case)[key].tobytes() == trained[key].tobytes()
        assert CASES[case]["peft"]["tensors_bit_identical"]
        assert CASES[case]["peft"]["logits_max_abs_err"] < 1e-6
        with pytest.raises(ValueError, match=rf"'{key}' is"):
            lmj.save_peft_adapter(trained, tmp_path / "x", adapter.config | {field: None})


def test_dora_magnitudes_need_use_dora(tmp_path):
    tensors = _adapter() | {Q + "lora_magnitude_vector": np.ones(16, np.float32)}
    lmj.save_peft_adapter(tensors, tmp_path, CONFIG | {"use_dora": True})
    assert lmj.load_peft_adapter(tmp_path).params.keys() == tensors.keys()
    with pytest.raises(ValueError, match=r"lora_magnitude_vector' is created by PEFT only with"):
        lmj.save_peft_adapter(tensors, tmp_path, CONFIG)


def test_roles_follow_peft_bias_setting():
    role = peft_io._role
    base_bias, other_bias = Q + "base_layer.bias", P + "model.layers.0.mlp.up_proj.bias"
    assert role(base_bias, {}) == role(other_bias, {"bias": "lora_only"}) == "frozen"
    assert role(base_bias, {"bias": "lora_only"}) == role(other_bias, {"bias": "all"}) == "bias"
    assert role(Q + "base_layer.weight", {"bias": "all"}) == "frozen"
    assert role(Q + "lora_magnitude_vector", {}) == "dora"
    assert role(P + "score.weight", {"modules_to_save": ["score"]}) == "modules_to_save"


# ------------------------------------------------------------------------------------
# 5. examples/peft_export.py, checked against PEFT


def _example():
    spec = importlib.util.spec_from_file_location(
        "peft_export", Path(__file__).parents[1] / "examples" / "peft_export.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_figures_recompute_from_the_stored_adapter(tmp_path):
    """The JAX side of the recorded figures, from the adapter PEFT loaded."""
    example, export = _example(), RECORD["export"]
    base = {k: np.asarray(v, np.float32) for k, v in export["base_weights"].items()}
    adapter = lmj.load_peft_adapter(DATA / "peft_io" / "export")
    params = {k: jnp.asarray(v) for k, v in adapter.params.items()}
    scale = export["lora_alpha"] / export["rank"]
    assert adapter.lora_scale == scale
    # The final loss is the loss of the adapter in the file.
    task = example.make_task(base, export["rank"])
    loss = float(example.task_loss(params, base, task, scale))
    np.testing.assert_allclose(loss, export["losses"][-1], rtol=1e-5)
    # JAX's merged weights against PEFT's merge_and_unload, recorded.
    merged = example.merged(base, params, scale)
    err = max(
        float(np.abs(np.asarray(merged[n]) - np.asarray(w, np.float32)).max())
        for n, w in export["peft_merged_weights"].items()
    )
    assert err < 1e-6 and abs(err - export["merged_weight_max_abs_err"]) < 1.5e-7
    assert export["logits_max_abs_err"] < 1e-6 * max(1.0, export["logits_max_abs"])
    # save_peft_adapter writes that same file again.
    lmj.save_peft_adapter(adapter.params, tmp_path, example.peft_config(4, 8.0))
    assert (tmp_path / "adapter_model.safetensors").read_bytes() == (
        DATA / "peft_io" / "export" / "adapter_model.safetensors"
    ).read_bytes()
    # interop_layouts.json carries the same figures.
    assert PEFT["export"]["losses"] == [export["losses"][0], export["losses"][-1]]
    assert PEFT["export"]["logits_max_abs_err"] == export["logits_max_abs_err"]
    versions = RECORD["provenance"]["versions"]
    assert all(versions[m] for m in ("peft", "torch", "transformers", "jax"))


def test_export_training_recomputes_its_first_steps():
    # The trajectory at the example's learning rate is chaotic: the recorded run on
    # base weights scaled by 1 + 1e-7 ends at a different loss (recorded), and a
    # different CPU or XLA version rounds differently. The first steps are not.
    example, export = _example(), RECORD["export"]
    assert export["final_loss_base_times_1_plus_1e_7"] != export["losses"][-1]
    base = {k: np.asarray(v, np.float32) for k, v in export["base_weights"].items()}
    _, losses = example.fine_tune(base, rank=4, lora_alpha=8.0, steps=5)
    np.testing.assert_allclose(losses, export["losses"][:6], rtol=1e-4)
    assert losses[-1] < 0.1 * losses[0]


# ------------------------------------------------------------------------------------
# The cross-check itself (needs torch, peft and transformers; skipped otherwise)


def test_against_real_peft(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from peft.tuners.tuners_utils import check_target_module_exists

    spec = importlib.util.spec_from_file_location("generate_peft_io", DATA / "generate_peft_io.py")
    assert spec is not None and spec.loader is not None
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    (tmp_path / "out").mkdir()
    (tmp_path / "work").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's and transformers' own; PEFT's are recorded
        cases = generator.all_cases(tmp_path / "out", tmp_path / "work")
    for name, case in cases.items():
        checks = [case["peft"]] if "peft" in case else [case["peft_filled"]]
        for check in checks:
            assert check["tensors_bit_identical"], name
            assert check["peft_warnings"] == [], name
            assert check["logits_max_abs_err"] < 1e-6, name
        # PEFT wrote the same tensor names as the recorded fixture.
        if "peft" in case:
            assert case["peft"]["file_tensors"] == CASES[name]["peft"]["file_tensors"]
    for fields, module, targeted in TARGETING:
        if fields.get("target_parameters"):
            continue  # PEFT matches those apart, in BaseTuner._inject_parameters
        config = peft.LoraConfig(**fields)
        assert bool(check_target_module_exists(config, module)) == targeted, (fields, module)
