"""Writes tests/data/tunix_qwix_layouts.json: qwix LoRA on Tunix's own model code.

Not part of the test suite (it takes minutes). It needs google-tunix and qwix, the
`tunix` extra (Python 3.11):

    pip install -e ".[dev,tunix]"
    python tests/data/generate_tunix_layouts.py

For every configuration in :data:`CONFIGS` (Tunix's Gemma, Gemma3, Llama3, Qwen2
and Qwen3 model classes with tiny ModelConfigs: vocab 64, embed 32, head_dim 8,
4 query heads, 1, 2 or 4 kv heads, 1-2 layers, LoRA ranks 2-8) it builds the model,
applies ``qwix.LoraProvider(module_path=".*", rank=r, alpha=α)`` with
``qwix.apply_lora_to_model`` as Tunix's qlora demo does, and takes the LoRA params
as Tunix's ``PeftTrainer`` does (``nnx.state(model, nnx.LoRAParam)``). It records
their paths and shapes, the pairs ``pairs="qwix"`` finds, and checks the reading
against qwix's own forward pass: with random factors, the model's logits must equal
those of the model whose weights hold ``c · a @ b`` (``c`` from
:func:`lora_muon_jax.qwix_lora_scale`, the product from
:meth:`LoRAPair.canonical`, put back in the weight's layout) and no adapter. The
default suite reads only the JSON (tests/test_tunix_layouts.py).
"""

from __future__ import annotations

import importlib.metadata as md
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lora_muon_jax as lmj

OUT = Path(__file__).with_name("tunix_qwix_layouts.json")
ALPHA = 6.0
# (model, layers, kv heads, rank), 4 query heads: MHA (kv 4), GQA (kv 2), MQA (kv 1);
# ranks equal to the head count (4), the kv head count (2) and head_dim (8) included.
CONFIGS = [
    (model, layers, kv, rank)
    for model, rows in {
        "gemma": [(1, 4, 4), (1, 1, 2), (2, 2, 8), (1, 2, 2), (2, 4, 3)],
        "gemma3": [(1, 4, 4), (1, 1, 2), (2, 2, 4), (1, 2, 6), (2, 1, 8)],
        "llama3": [(1, 4, 4), (1, 1, 2), (2, 2, 2), (1, 2, 5), (2, 4, 8)],
        "qwen2": [(1, 2, 4), (1, 1, 3), (2, 4, 2), (1, 2, 2), (2, 2, 7)],
        "qwen3": [(1, 2, 4), (1, 1, 2), (2, 4, 8), (1, 2, 2), (2, 2, 4)],
    }.items()
    for layers, kv, rank in rows
]


def config_name(model: str, layers: int, kv: int, rank: int) -> str:
    return f"{model} L{layers} heads4 kv{kv} r{rank}"


def build(model: str, layers: int, kv: int):
    """A tiny Tunix model (class, config) with random weights."""
    from flax import nnx

    common = dict(
        num_layers=layers, embed_dim=32, hidden_dim=64, num_heads=4, head_dim=8, num_kv_heads=kv
    )
    if model == "gemma":
        from tunix.models.gemma import model as lib

        cfg = lib.ModelConfig(
            num_embed=64,
            final_logit_softcap=None,
            use_post_attn_norm=False,
            use_post_ffw_norm=False,
            attention_types=[lib.AttentionType.GLOBAL] * layers,
            **common,
        )
        return lib.Gemma(cfg, rngs=nnx.Rngs(0))
    if model == "gemma3":
        from tunix.models.gemma3 import model as lib

        cfg = lib.ModelConfig(
            num_embed=64, sliding_window_size=4, param_dtype=jnp.float32, **common
        )
        return lib.Gemma3(cfg, rngs=nnx.Rngs(0))
    mod = {"llama3": "llama3", "qwen2": "qwen2", "qwen3": "qwen3"}[model]
    lib = __import__(f"tunix.models.{mod}.model", fromlist=["model"])
    cls = {"llama3": "Llama3", "qwen2": "Qwen2", "qwen3": "Qwen3"}[model]
    cfg = lib.ModelConfig(vocab_size=64, rope_theta=10_000, norm_eps=1e-6, **common)
    return getattr(lib, cls)(cfg, rngs=nnx.Rngs(0))


def lora_model(model: str, layers: int, kv: int, rank: int, alpha: float = ALPHA):
    """(model with qwix LoRA on every op, provider), as Tunix's qlora demo builds it."""
    import qwix
    from flax import nnx

    base = build(model, layers, kv)
    provider = qwix.LoraProvider(module_path=".*", rank=rank, alpha=alpha)
    return qwix.apply_lora_to_model(
        base, provider, rngs=nnx.Rngs(1), **base.get_model_input()
    ), provider


def _shapes(pure: dict) -> dict[str, list[int]]:
    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    return {"/".join(str(k.key) for k in p): list(np.shape(x)) for p, x in flat}


def _weight_delta(module, pair, a, b, scale):
    """``c · a @ b`` of one pair, back in the layout of the module's weight."""
    ca = np.asarray(pair.canonical(jnp.asarray(a), "a"), np.float64)
    cb = np.asarray(pair.canonical(jnp.asarray(b), "b"), np.float64)
    a_dims = [d for i, d in enumerate(a.shape) if i != pair.a_axes.rank_axis]
    b_dims = [d for i, d in enumerate(b.shape) if i != pair.b_axes.rank_axis]
    delta = (scale * ca @ cb).reshape(*a_dims, *b_dims)
    einsum_str = getattr(module, "einsum_str", None)
    if einsum_str is None:  # nnx.Linear: kernel (in, out) = a's dims, then b's
        return delta
    # qwix's einsum adapter: a holds the weight's axes the input shares (in the
    # weight's order), b the others; put them back in the weight's order.
    lhs, rhs = einsum_str.split("->")[0].split(",")
    order = [i for i, c in enumerate(rhs) if c in lhs] + [
        i for i, c in enumerate(rhs) if c not in lhs
    ]
    return delta.transpose(np.argsort(order))


def _logits(model, inputs):
    out = model(**inputs)
    return np.asarray(out[0] if isinstance(out, tuple) else out, np.float64)


def check_against_forward(lm, provider, pairs) -> tuple[float, float]:
    """Max |logits(LoRA) − logits(merged weights)| and max |logits|."""
    from flax import nnx

    pure = nnx.to_pure_dict(nnx.state(lm, nnx.LoRAParam))
    leaves, treedef = jax.tree.flatten(pure)
    rng = np.random.default_rng(0)
    leaves = [jnp.asarray(0.3 * rng.standard_normal(x.shape), x.dtype) for x in leaves]
    nnx.update(lm, jax.tree.unflatten(treedef, leaves))
    tokens = jnp.asarray(rng.integers(0, 64, (2, 5)), jnp.int32)
    inputs = dict(lm.get_model_input())
    key = "last_tokens" if "last_tokens" in inputs else "input_tokens"
    inputs.update(
        {
            key: tokens,
            "positions": jnp.broadcast_to(jnp.arange(5), (2, 5)),
            "attention_mask": jnp.tril(jnp.ones((5, 5), bool))[None].repeat(2, 0),
        }
    )
    with_lora = _logits(lm, inputs)
    for pair in pairs:
        path = [k for k in pair.a_path.strip("[]").split("][")]
        keys = [int(k) if k.isdigit() else k.strip("'") for k in path]
        module = lm
        for k in keys[:-1]:
            module = module[k] if isinstance(k, int) else getattr(module, k)
        weight = getattr(module, str(keys[-1]).removesuffix("_lora_a"))
        a, b = leaves[pair.a_index], leaves[pair.b_index]
        delta = _weight_delta(
            module, pair, np.asarray(a), np.asarray(b), lmj.qwix_lora_scale(provider)
        )
        weight.value = weight.value + jnp.asarray(delta, weight.value.dtype)
    nnx.update(lm, jax.tree.unflatten(treedef, [x * 0 for x in leaves]))
    merged = _logits(lm, inputs)
    return float(np.max(np.abs(with_lora - merged))), float(np.max(np.abs(with_lora)))


def one_config(model: str, layers: int, kv: int, rank: int) -> dict:
    from flax import nnx

    t0 = time.perf_counter()
    lm, provider = lora_model(model, layers, kv, rank)
    pure = nnx.to_pure_dict(nnx.state(lm, nnx.LoRAParam))
    pairs = lmj.find_lora_pairs(pure, "qwix")
    err, size = check_against_forward(lm, provider, pairs)
    return {
        "model": model,
        "num_layers": layers,
        "num_heads": 4,
        "num_kv_heads": kv,
        "head_dim": 8,
        "embed_dim": 32,
        "rank": rank,
        "alpha": ALPHA,
        "lora_scale": lmj.qwix_lora_scale(provider),
        "params": _shapes(pure),
        "pairs_qwix": [
            dict(a=p.a_path, b=p.b_path, batch=list(p.batch_shape), m=p.m, n=p.n, rank=p.rank)
            for p in pairs
        ],
        "logits_max_abs": size,
        "logits_max_abs_err": err,
        "seconds": round(time.perf_counter() - t0, 2),
    }


def main() -> None:
    cases = {}
    for cfg in CONFIGS:
        name = config_name(*cfg)
        cases[name] = one_config(*cfg)
        print(
            f"{name}: {len(cases[name]['pairs_qwix'])} pairs, logits err "
            f"{cases[name]['logits_max_abs_err']:.2e}, {cases[name]['seconds']} s",
            flush=True,
        )
    data = {
        "provenance": {
            "generator": "tests/data/generate_tunix_layouts.py",
            "command": "python tests/data/generate_tunix_layouts.py",
            "python": sys.version.split()[0],
            "versions": {pkg: md.version(pkg) for pkg in ("google-tunix", "qwix", "flax", "jax")},
            "setup": "separate venv; see the generator's docstring for the pip lines",
            "lora": "qwix.LoraProvider(module_path='.*', rank=r, alpha=6.0), "
            "qwix.apply_lora_to_model(model, provider, rngs=nnx.Rngs(1), "
            "**model.get_model_input()); params: nnx.state(model, nnx.LoRAParam)",
            "note": "logits_max_abs_err: the LoRA model's logits (random factors) vs the "
            "same model with c * canonical(a) @ canonical(b) added to each weight in its "
            "layout and the adapters zeroed; c = qwix_lora_scale(provider).",
        },
        "cases": cases,
    }
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
