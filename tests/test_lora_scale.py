"""The LoRA scale read from a library's own objects: qwix providers, PEFT configs.

qwix's objects are stood in for by namespaces with the attributes qwix 0.1.8 gives
them (``LoraProvider._rules``, ``LoraRule.module_path/rank/alpha``; ``QtRule`` has
no ``rank``); tests/test_tunix.py reads a real provider. PEFT's values: the rsLoRA
scale PEFT 0.21.2 itself applied (recorded in tests/data/interop_layouts.json).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import lora_muon_jax as lmj
from lora_muon_jax.peft_io import peft_lora_scale

INTEROP = json.loads((Path(__file__).parent / "data" / "interop_layouts.json").read_text())


def lora_rule(module_path=".*", rank=4, alpha=8.0):
    return SimpleNamespace(module_path=module_path, rank=rank, alpha=alpha, dropout=0.0)


def qt_rule(module_path=".*"):
    return SimpleNamespace(module_path=module_path, weight_qtype="int8")


def provider(*rules):
    return SimpleNamespace(_rules=list(rules), disable_jit=False)


def test_qwix_provider_rule_and_rule_list():
    # qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0) holds one LoraRule.
    assert lmj.qwix_lora_scale(provider(lora_rule())) == 2.0
    assert lmj.qwix_lora_scale(lora_rule(rank=8, alpha=6.0)) == 0.75
    assert lmj.qwix_lora_scale([lora_rule(rank=3, alpha=1.0)]) == pytest.approx(1 / 3)
    # Rules that quantize only add no adapter; they don't count.
    assert lmj.qwix_lora_scale(provider(qt_rule(".*mlp.*"), lora_rule())) == 2.0


def test_qwix_rules_with_different_scales():
    p = provider(lora_rule(".*attn.*", rank=4, alpha=2.0), lora_rule(".*", rank=8, alpha=8.0))
    with pytest.raises(ValueError, match=r"different scales.*'\.\*attn\.\*': 0\.5.*module_path="):
        lmj.qwix_lora_scale(p)
    # qwix applies the first rule whose module_path fully matches the module's path.
    assert lmj.qwix_lora_scale(p, module_path="layers/0/attn/q_einsum") == 0.5
    assert lmj.qwix_lora_scale(p, module_path="layers/0/mlp/up_proj") == 1.0


def test_qwix_errors():
    with pytest.raises(ValueError, match="no LoRA rule"):
        lmj.qwix_lora_scale(provider(qt_rule()))
    with pytest.raises(ValueError, match=r"'layers/0/mlp' matches rule '\.\*mlp' first"):
        lmj.qwix_lora_scale(provider(qt_rule(".*mlp"), lora_rule()), module_path="layers/0/mlp")
    with pytest.raises(ValueError, match="no rule matches module 'embedder'"):
        lmj.qwix_lora_scale(provider(lora_rule("layers/.*")), module_path="embedder")
    with pytest.raises(ValueError, match="rank 0"):
        lmj.qwix_lora_scale(lora_rule(rank=0))
    with pytest.raises(TypeError, match="qwix.LoraProvider"):
        lmj.qwix_lora_scale(3.0)


def test_peft_config_scale_matches_what_peft_applied():
    rs = INTEROP["peft"]["rslora_scaling"]  # PEFT 0.21.2's own `scaling` for this config
    config = {"r": rs["r"], "lora_alpha": rs["lora_alpha"], "use_rslora": True}
    assert lmj.peft_config_lora_scale(config) == rs["peft"] == 4.0
    # The first adapter of the interop fixture: LoraConfig(r=4, lora_alpha=8).
    applied = INTEROP["peft"]["saved_lora_scale"]["peft"]
    assert lmj.peft_config_lora_scale({"r": 4, "lora_alpha": 8}) == applied == 2.0


class _LoraConfigLike:
    """Stands in for ``peft.LoraConfig``: read through ``to_dict()``."""

    def to_dict(self):
        return {"r": 16, "lora_alpha": 32, "use_rslora": False, "rank_pattern": {}}


def test_peft_config_object_and_patterns():
    assert lmj.peft_config_lora_scale(_LoraConfigLike()) == 2.0
    config = {
        "r": 8,
        "lora_alpha": 16,
        "rank_pattern": {"v_proj": 4},
        "alpha_pattern": {"layers.0.self_attn.q_proj": 32},
    }
    q, v, k = (f"base_model.model.model.layers.0.self_attn.{m}_proj" for m in "qvk")
    assert lmj.peft_config_lora_scale(config, q) == 4.0  # alpha 32 / r 8
    assert lmj.peft_config_lora_scale(config, v) == 4.0  # alpha 16 / r 4
    assert lmj.peft_config_lora_scale(config, k) == 2.0  # no pattern
    assert lmj.peft_config_lora_scale(config, "model.layers.0.self_attn.kv_proj") == 2.0
    # The same rules as peft_io's tensor-checked scale.
    for module, r in ((q, 8), (v, 4), (k, 8)):
        params = {f"{module}.lora_A.weight": np.zeros((r, 16))}
        assert peft_lora_scale(config, params) == lmj.peft_config_lora_scale(config, module)
    with pytest.raises(ValueError, match=r"different LoRA scales.*'v_proj': 4\.0.*module="):
        lmj.peft_config_lora_scale(config)
    # Patterns that keep the scale are fine without a module.
    same = {"r": 8, "lora_alpha": 16, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 8}}
    assert lmj.peft_config_lora_scale(same) == 2.0
    rs = {"r": 16, "lora_alpha": 8, "use_rslora": True, "rank_pattern": {"v_proj": 4}}
    assert lmj.peft_config_lora_scale(rs, "model.v_proj") == 4.0  # 8 / √4


def test_peft_config_errors():
    with pytest.raises(ValueError, match="number `lora_alpha`"):
        lmj.peft_config_lora_scale({"r": 4})
    with pytest.raises(ValueError, match="rank 0"):
        lmj.peft_config_lora_scale({"r": 0, "lora_alpha": 4})
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        lmj.peft_config_lora_scale([("r", 4)])
