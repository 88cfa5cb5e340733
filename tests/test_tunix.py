"""Tunix's own models and trainer with qwix LoRA and ``lora_muon`` (needs google-tunix).

Skipped unless ``tunix`` and ``qwix`` import (``pip install -e ".[tunix]"``, in a
virtual environment of its own: tunix pins its own jax and flax). The default suite
checks the same layouts from tests/data/tunix_qwix_layouts.json
(tests/test_tunix_layouts.py); here they are built from the library:

* tiny Gemma, Gemma3, Llama3, Qwen2 and Qwen3 models from Tunix's model code with
  ``qwix.LoraProvider(module_path=".*")``: ``pairs="auto"`` finds exactly what
  ``pairs="qwix"`` finds, on the ``nnx.State`` Tunix's trainer optimizes and on
  its pure dict, and the shapes still match the fixture (all 25 configurations,
  about 15 s in all on a CPU);
* ``qwix_lora_scale`` on real ``qwix.LoraProvider`` objects;
* Tunix's ``PeftTrainer`` trains examples/tunix_qwix.py's tiny Gemma with
  ``lora_muon(lr, pairs="auto", lora_scale=qwix_lora_scale(provider))``: the loss
  goes down and only the LoRA params move.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("tunix", reason="google-tunix is not installed (pip install -e '.[tunix]')")
qwix = pytest.importorskip("qwix", reason="qwix is not installed (pip install -e '.[tunix]')")

from flax import nnx  # noqa: E402

import lora_muon_jax as lmj  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = json.loads((ROOT / "tests" / "data" / "tunix_qwix_layouts.json").read_text())

# Tunix, qwix and flax warn about their own deprecations on these code paths.
pytestmark = pytest.mark.filterwarnings(
    "ignore::DeprecationWarning", "ignore::FutureWarning", "ignore::UserWarning"
)


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


GEN = _load(ROOT / "tests" / "data" / "generate_tunix_layouts.py", "generate_tunix_layouts")


@pytest.mark.parametrize("cfg", GEN.CONFIGS, ids=[GEN.config_name(*c) for c in GEN.CONFIGS])
def test_auto_equals_qwix_on_real_tunix_models(cfg):
    lora_model, provider = GEN.lora_model(*cfg)
    state = nnx.state(lora_model, nnx.LoRAParam)
    pure = nnx.to_pure_dict(state)
    for tree in (state, pure):
        qwix_pairs = lmj.find_lora_pairs(tree, "qwix")
        assert qwix_pairs and lmj.find_lora_pairs(tree, "auto") == qwix_pairs
    assert GEN._shapes(pure) == FIXTURE["cases"][GEN.config_name(*cfg)]["params"]
    assert lmj.qwix_lora_scale(provider) == GEN.ALPHA / cfg[3]


def test_qwix_lora_scale_reads_real_providers():
    assert lmj.qwix_lora_scale(qwix.LoraProvider(module_path=".*", rank=4, alpha=8.0)) == 2.0
    rules = [
        qwix.QtRule(module_path=".*embed.*", weight_qtype="int8"),
        qwix.LoraRule(module_path=".*attn.*", rank=8, alpha=4.0),
        qwix.LoraRule(module_path=".*", rank=4, alpha=4.0),
    ]
    provider = qwix.LoraProvider(rules)
    assert lmj.qwix_lora_scale(provider, module_path="layers/0/attn/q_einsum") == 0.5
    assert lmj.qwix_lora_scale(provider, module_path="layers/0/mlp/up_proj") == 1.0
    with pytest.raises(ValueError, match="different scales"):
        lmj.qwix_lora_scale(provider)
    with pytest.raises(ValueError, match="adds no LoRA adapter"):
        lmj.qwix_lora_scale(provider, module_path="embedder")


def test_peft_trainer_with_lora_muon_trains_only_the_adapters():
    example = _load(ROOT / "examples" / "tunix_qwix.py", "tunix_qwix_example")
    lora_model, provider = example.apply_lora(example.tiny_gemma(), rank=4, alpha=8.0)
    start = time.perf_counter()
    out = example.train_lora(
        lora_model, provider, example.synthetic_batches(), steps=8, learning_rate=0.1
    )
    print(f"PeftTrainer + lora_muon: losses {out['losses']}, {time.perf_counter() - start:.1f} s")
    losses = np.asarray(out["losses"])
    assert len(losses) == 8 and np.isfinite(losses).all()
    assert losses[-3:].mean() < losses[0] - 0.1, losses
    assert out["lora_moved"] and not out["frozen_moved"]
