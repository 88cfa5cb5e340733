"""Writes tests/data/interop_layouts.json: LoRA names and shapes as real libraries write them.

Not part of the test suite (it needs torch, peft, transformers, gemma and qwix). Run
it in a separate virtual environment:

    python3 -m venv /tmp/venv_interop && . /tmp/venv_interop/bin/activate
    pip install -e . jax==0.10.2 jaxlib==0.10.2 qwix==0.1.8 torch==2.13.0 \
        peft==0.21.2 transformers==5.24.0
    pip install einops etils && pip install --no-deps gemma==3.3.0  # for gemma.peft
    python tests/data/generate_interop_layouts.py [--maxtext-src DIR]

``--maxtext-src`` is a MaxText source checkout (``maxtext`` on PyPI needs Python
3.12; its LoRA shape function is run from source). For every layout the script
records the parameter paths and shapes, and checks this library's reading of them
against the library itself: ``c · a @ b`` from :meth:`LoRAPair.canonical`, put
back into the weight's layout, must give the same output (or delta weight) as the
library's own LoRA code. The largest differences are recorded; the default suite
reads only the JSON.
"""

from __future__ import annotations

import argparse
import ast
import importlib.metadata as md
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import lora_muon_jax as lmj

ROOT = Path(__file__).resolve().parents[2]
OUT = Path(__file__).with_name("interop_layouts.json")


def _shapes(tree: dict) -> dict[str, list[int]]:
    return {k: list(np.shape(v)) for k, v in tree.items()}


def _pairs_summary(tree, pairs) -> list[dict]:
    return [
        dict(a=p.a_path, b=p.b_path, batch=list(p.batch_shape), m=p.m, n=p.n, rank=p.rank)
        for p in lmj.find_lora_pairs(tree, pairs)
    ]


def _products(tree, pairs, scale) -> dict[str, np.ndarray]:
    """``c · a @ b`` per pair (float64), keyed by the path of ``a``."""
    leaves = jax.tree.leaves(tree)
    out = {}
    for p in lmj.find_lora_pairs(tree, pairs):
        a = np.asarray(p.canonical(jnp.asarray(leaves[p.a_index]), "a"), np.float64)
        b = np.asarray(p.canonical(jnp.asarray(leaves[p.b_index]), "b"), np.float64)
        out[p.a_path] = scale * a @ b
    return out


# ------------------------------------------------------------------------------------
# Hugging Face PEFT


def _peft_section(work: Path) -> dict:
    import peft
    import torch
    from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
    )
    model = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"]),
    )
    model.add_adapter(
        "other", LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj"], use_dora=True)
    )
    with torch.no_grad():  # non-zero B factors, so the deltas below are non-trivial
        for name, p in model.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.copy_(torch.randn_like(p))
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items() if "lora" in k}

    # Orientation: c · a @ b from our pairing equals PEFT's own delta weight.
    errs = {}
    for adapter in ("default", "other"):
        prods = _products(sd, lmj.peft_adapter(adapter), 1.0)
        for mod_name, module in model.named_modules():
            scaling = getattr(module, "scaling", None)
            if not isinstance(scaling, dict) or adapter not in scaling:
                continue
            delta = module.get_delta_weight(adapter).detach().numpy().astype(np.float64)
            key = [k for k in prods if f"{mod_name}." in k]
            (key,) = key
            ours = module.scaling[adapter] * prods[key]
            errs[f"{mod_name}[{adapter}]"] = float(np.abs(ours - delta.reshape(ours.shape)).max())

    # Conv2d: lora_A (r, in, kh, kw), lora_B (out, r, 1, 1).
    conv_model = get_peft_model(
        torch.nn.Sequential(torch.nn.Conv2d(3, 6, 3)),
        LoraConfig(r=2, lora_alpha=4, target_modules=["0"]),
    )
    with torch.no_grad():
        conv_model.base_model.model[0].lora_B["default"].weight.normal_()
    conv_sd = {k: v.detach().numpy() for k, v in conv_model.state_dict().items() if "lora" in k}
    conv_layer = conv_model.base_model.model[0]
    (conv_prod,) = _products(conv_sd, "peft", conv_layer.scaling["default"]).values()
    conv_delta = conv_layer.get_delta_weight("default").detach().numpy()
    errs["conv2d[default]"] = float(np.abs(conv_prod - conv_delta.reshape(conv_prod.shape)).max())

    rs = get_peft_model(
        LlamaForCausalLM(cfg),
        LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_rslora=True),
    )
    rs_scaling = rs.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"]

    # Files: save_pretrained, then our reader.
    model.save_pretrained(work / "saved")
    saved = lmj.load_peft_adapter(work / "saved")
    file_config = json.loads((work / "saved" / "adapter_config.json").read_text())
    return dict(
        versions={m: md.version(m) for m in ("peft", "transformers", "torch", "safetensors")},
        tiny_llama=dict(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        ),
        state_dict=_shapes(sd),
        adapter_file_default=_shapes(get_peft_model_state_dict(model, adapter_name="default")),
        adapter_file_other=_shapes(get_peft_model_state_dict(model, adapter_name="other")),
        conv2d_state_dict=_shapes(conv_sd),
        pairs_state_dict_peft=_pairs_summary(sd, "peft"),
        pairs_default=_pairs_summary(sd, lmj.peft_adapter("default")),
        delta_weight_max_abs_err=errs,
        rslora_scaling=dict(
            r=4,
            lora_alpha=8,
            peft=rs_scaling,
            ours=lmj.peft_io.peft_lora_scale({"r": 4, "lora_alpha": 8, "use_rslora": True}, {}),
        ),
        saved_files=sorted(p.name for p in (work / "saved").iterdir()),
        saved_tensors=_shapes(saved.params | saved.frozen),
        saved_config_keys=sorted(file_config),
        saved_lora_scale=dict(
            ours=saved.lora_scale,
            peft=model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"],
        ),
        export=_peft_export_check(),
        peft_version=peft.__version__,
    )


def _peft_export_check() -> dict:
    """``peft.export``: copied from tests/data/peft_io.json, which
    tests/data/generate_peft_io.py writes (and which tests/test_peft_io.py recomputes)."""
    export = json.loads(OUT.with_name("peft_io.json").read_text())["export"]
    return dict(
        losses=[export["losses"][0], export["losses"][-1]],
        merged_weight_max_abs_err=export["merged_weight_max_abs_err"],
        logits_max_abs_err=export["logits_max_abs_err"],
        logits_max_abs=export["logits_max_abs"],
        recorded_by="tests/data/generate_peft_io.py (see peft_io.json's export)",
    )


# ------------------------------------------------------------------------------------
# gemma.peft (flax.linen)


def _einsum_letters(einsum_str: str) -> tuple[str, str, str]:
    """``(weights, a matrix letters, b matrix letters)``: contracted and batch weight
    axes go to ``a``, output-only ones to ``b``, each in weight order."""
    lhs, out = einsum_str.split("->")
    inputs, weights = lhs.split(",")
    a = "".join(c for c in weights if c in inputs)
    b = "".join(c for c in weights if c not in inputs)
    return weights, a, b


def _to_weight(prod: np.ndarray, pair, leaves, einsum_str: str | None) -> np.ndarray:
    """A pair's product ``(*batch, m, n)`` back in the wrapped op's weight layout."""
    a, b = np.shape(leaves[pair.a_index]), np.shape(leaves[pair.b_index])
    a_mat = [a[i] for i in pair.layout("a", len(a)).matrix_axes]
    b_mat = [b[i] for i in pair.layout("b", len(b)).matrix_axes]
    w = prod.reshape(*pair.batch_shape, *a_mat, *b_mat)
    if einsum_str is None:  # Dense/DenseGeneral kernels: (*batch, *in, *out)
        return w
    weights, la, lb = _einsum_letters(einsum_str)
    return np.einsum(f"{la}{lb}->{weights}", w)


def _gemma_section() -> dict:
    from flax import linen as nn
    from gemma import peft as gpeft

    cases = {
        "LoRADense": (lambda: gpeft.LoRADense(rank=2, wrapped=nn.Dense(12)), (1, 3, 8), None),
        "LoRAEinsum BTNH,NHD->BTD": (
            lambda: gpeft.LoRAEinsum(rank=2, wrapped=nn.Einsum((2, 4, 8), "BTNH,NHD->BTD")),
            (1, 3, 2, 4),
            "BTNH,NHD->BTD",
        ),
        "LoRAEinsum BTD,NDH->BTNH": (
            lambda: gpeft.LoRAEinsum(rank=2, wrapped=nn.Einsum((2, 8, 4), "BTD,NDH->BTNH")),
            (1, 3, 8),
            "BTD,NDH->BTNH",
        ),
        "LoRAEinsum BSD,CKDH->CBSKH": (
            lambda: gpeft.LoRAEinsum(rank=2, wrapped=nn.Einsum((2, 1, 8, 4), "BSD,CKDH->CBSKH")),
            (1, 3, 8),
            "BSD,CKDH->CBSKH",
        ),
        "LoRADenseGeneral D->(N,H)": (
            lambda: gpeft.LoRADenseGeneral(rank=2, wrapped=nn.DenseGeneral((2, 4), axis=-1)),
            (1, 3, 8),
            None,
        ),
        "LoRADenseGeneral (N,H)->D": (
            lambda: gpeft.LoRADenseGeneral(rank=2, wrapped=nn.DenseGeneral(8, axis=(-2, -1))),
            (1, 3, 2, 4),
            None,
        ),
        "LoRADenseGeneral batch_dims=(0,)": (
            lambda: gpeft.LoRADenseGeneral(
                rank=2, wrapped=nn.DenseGeneral((2, 4), axis=-1, batch_dims=(0,))
            ),
            (5, 3, 8),
            None,
        ),
    }
    out = {}
    for name, (make, x_shape, einsum_str) in cases.items():

        class Block(nn.Module):
            @nn.compact
            def __call__(self, x):
                return make()(x)  # noqa: B023 (called within this iteration)

        block = Block()
        x = jax.random.normal(jax.random.key(0), x_shape)
        params = block.init(jax.random.key(1), x)["params"]
        flat = {"/".join(k): v for k, v in _flatten(params).items()}
        # Random b (gemma initializes it to zero) so that the delta is non-trivial.
        params = jax.tree_util.tree_map_with_path(
            lambda p, v: jax.random.normal(jax.random.key(2), v.shape) if p[-1].key == "b" else v,
            params,
        )
        with_lora = block.apply({"params": params}, x)
        zero_b = jax.tree_util.tree_map_with_path(
            lambda p, v: v * 0 if p[-1].key == "b" else v, params
        )
        delta_lib = np.asarray(with_lora - block.apply({"params": zero_b}, x))
        (pair,) = lmj.find_lora_pairs(params, "gemma")
        leaves = jax.tree.leaves(params)
        (prod,) = _products(params, "gemma", 1.0).values()
        w = _to_weight(prod, pair, leaves, einsum_str)
        if einsum_str is not None:
            delta_ours = np.einsum(einsum_str, np.asarray(x, np.float64), w)
        else:
            (inner,) = params.values()  # the wrapper shares the wrapped module's scope
            bias = np.zeros_like(inner["bias"])
            delta_ours = np.asarray(
                make().wrapped.apply(
                    {"params": {"kernel": w, "bias": bias}}, np.asarray(x, np.float64)
                )
            )
        out[name] = dict(
            x_shape=list(x_shape),
            params={k: list(v.shape) for k, v in flat.items()},
            pairs=_pairs_summary(params, "gemma"),
            output_max_abs_err=float(np.abs(delta_ours - delta_lib).max()),
            output_max_abs=float(np.abs(delta_lib).max()),
        )
    return dict(version=md.version("gemma"), flax=md.version("flax"), cases=out)


def _flatten(tree, prefix=()):
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) or hasattr(v, "items"):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


# ------------------------------------------------------------------------------------
# qwix (flax.nnx)


def _qwix_section() -> dict:
    import qwix
    from flax import nnx

    class BatchedDot(nnx.Module):  # dot_general with a batch axis
        def __init__(self, rngs):
            self.kernel = nnx.Param(jax.random.normal(rngs.params(), (5, 8, 12)))

        def __call__(self, x):
            return jax.lax.dot_general(x, self.kernel[...], (((2,), (1,)), ((0,), (0,))))

    class MaxTextDenseGeneral(nnx.Module):  # MaxText's q/k/v projection: emb -> (heads, head_dim)
        def __init__(self, rngs):
            self.kernel = nnx.Param(jax.random.normal(rngs.params(), (8, 2, 4)))

        def __call__(self, x):
            return jax.lax.dot_general(x, self.kernel[...], (((2,), (0,)), ((), ())))

    rank, alpha = 2, 6.0
    cases = {
        "nnx.Linear": (lambda r: nnx.Linear(8, 12, rngs=r), (1, 3, 8), None, None),
        "nnx.Einsum BTNH,NHD->BTD": (
            lambda r: nnx.Einsum("BTNH,NHD->BTD", (2, 4, 8), rngs=r),
            (1, 3, 2, 4),
            "BTNH,NHD->BTD",
            None,
        ),
        "nnx.Einsum BTD,NDH->BTNH": (
            lambda r: nnx.Einsum("BTD,NDH->BTNH", (2, 8, 4), rngs=r),
            (1, 3, 8),
            "BTD,NDH->BTNH",
            None,
        ),
        "dot_general with a batch axis": (
            BatchedDot,
            (5, 3, 8),
            None,
            (((2,), (1,)), ((0,), (0,))),
        ),
        "dot_general emb->(heads,head_dim) (MaxText DenseGeneral)": (
            MaxTextDenseGeneral,
            (1, 3, 8),
            None,
            (((2,), (0,)), ((), ())),
        ),
        "nnx.Conv 3x3": (lambda r: nnx.Conv(3, 6, (3, 3), rngs=r), (1, 5, 5, 3), None, "conv"),
    }
    out = {}
    for name, (make, x_shape, einsum_str, dot) in cases.items():
        x = jax.random.normal(jax.random.key(0), x_shape)
        provider = qwix.LoraProvider(module_path=".*", rank=rank, alpha=alpha)
        model = qwix.apply_lora_to_model(make(nnx.Rngs(0)), provider, x, rngs=nnx.Rngs(1))
        lora_state = nnx.state(model, nnx.LoRAParam)
        pure = nnx.to_pure_dict(lora_state)
        b_key = next(k for k in pure if k.endswith("_lora_b"))
        pure[b_key] = jax.random.normal(jax.random.key(2), pure[b_key].shape)
        nnx.update(model, pure)
        with_lora = model(x)
        nnx.update(model, {**pure, b_key: pure[b_key] * 0})
        delta_lib = np.asarray(with_lora - model(x))
        (pair,) = lmj.find_lora_pairs(pure, "qwix")
        leaves = jax.tree.leaves(pure)
        (prod,) = _products(pure, "qwix", alpha / rank).values()
        w = _to_weight(prod, pair, leaves, einsum_str)
        x64 = np.asarray(x, np.float64)
        base_shape = (
            tuple(nnx.to_pure_dict(nnx.state(model, nnx.Param))["kernel"].shape)
            if "kernel" in nnx.to_pure_dict(nnx.state(model, nnx.Param))
            else None
        )
        if einsum_str is not None:
            delta_ours = np.einsum(einsum_str, x64, w)
        elif dot == "conv":
            w = w.reshape(base_shape)
            delta_ours = np.asarray(
                jax.lax.conv_general_dilated(
                    jnp.asarray(x64),
                    jnp.asarray(w),
                    (1, 1),
                    "SAME",
                    dimension_numbers=("NHWC", "HWIO", "NHWC"),
                )
            )
        elif dot is not None:
            delta_ours = np.asarray(
                jax.lax.dot_general(jnp.asarray(x64), jnp.asarray(w.reshape(base_shape)), dot)
            )
        else:
            delta_ours = x64 @ w
        out[name] = dict(
            x_shape=list(x_shape),
            base_kernel_shape=list(base_shape) if base_shape else None,
            params={k: list(v.shape) for k, v in pure.items()},
            pairs=_pairs_summary(pure, "qwix"),
            lora_scale=alpha / rank,
            output_max_abs_err=float(np.abs(delta_ours - delta_lib).max()),
            output_max_abs=float(np.abs(delta_lib).max()),
        )
    return dict(version=md.version("qwix"), rank=rank, alpha=alpha, cases=out)


# ------------------------------------------------------------------------------------
# MaxText (from source: the PyPI package needs Python >= 3.12)


def _maxtext_section(src: Path | None) -> dict:
    if src is None:
        return {"skipped": "no --maxtext-src given"}
    path = "src/maxtext/utils/lora_utils.py"
    commit = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    text = subprocess.run(
        ["git", "-C", str(src), "show", f"HEAD:{path}"], capture_output=True, text=True, check=True
    ).stdout
    tree = ast.parse(text)
    fn = next(
        n
        for n in tree.body
        if isinstance(n, ast.FunctionDef) and n.name == "get_lora_abstract_state"
    )
    from flax.training import train_state

    scope = {"jax": jax, "train_state": train_state}
    exec(compile(ast.Module(body=[fn], type_ignores=[]), path, "exec"), scope)
    emb, layers, heads, head_dim, r = 16, 3, 2, 4, 4
    S = jax.ShapeDtypeStruct
    config = {"r": r, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}

    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("x",))

    def attention(scan: bool):
        def k(*shape):
            spec = jax.sharding.PartitionSpec(*([None] * len(shape)))
            return {
                "kernel": S(shape, jnp.float32, sharding=jax.sharding.NamedSharding(mesh, spec))
            }

        ins = (emb, layers, heads, head_dim) if scan else (emb, heads, head_dim)
        out = (heads, layers, head_dim, emb) if scan else (heads, head_dim, emb)
        return {"query": k(*ins), "key": k(*ins), "value": k(*ins), "out": k(*out)}

    result = {}
    for label, base in (
        ("scanned", {"decoder": {"layers": {"self_attention": attention(True)}}}),
        ("unscanned", {"decoder": {"layers_0": {"self_attention": attention(False)}}}),
    ):
        state, _ = scope["get_lora_abstract_state"](base, config)
        flat = {"/".join(k): list(v.shape) for k, v in _flatten(state.params).items()}
        preset = "maxtext" if label == "scanned" else "maxtext_unscanned"
        result[label] = dict(params=flat, preset=preset, pairs=_pairs_summary(state.params, preset))
    # MaxText's native LoRA (qwix.apply_lora_to_model): `kernel_lora_a/b` beside each
    # kernel with qwix's dot_general shapes (a (emb, r), b (r, heads*head_dim) for
    # emb -> (heads, head_dim)); scanned layers get the layer axis at param_scan_axis
    # = 1 (nnx_decoders.py: jax.lax.scan stacks at 0, nnx_add_and_sync_scan_axis
    # moves each Param, LoRAParam included, to its `param_scan_axis`).
    result["native_qwix_scanned_derived"] = {
        "params": {
            "decoder/layers/self_attention/query/kernel_lora_a": [emb, layers, r],
            "decoder/layers/self_attention/query/kernel_lora_b": [r, layers, heads * head_dim],
            "decoder/layers/self_attention/out/kernel_lora_a": [heads * head_dim, layers, r],
            "decoder/layers/self_attention/out/kernel_lora_b": [r, layers, emb],
        },
        "preset": "maxtext",
        "source": "derived from qwix 0.1.8 dot_general LoRA shapes and maxtext "
        "nnx_decoders.py; not run",
    }
    return dict(
        commit=commit,
        file=path,
        function="get_lora_abstract_state",
        dims=dict(emb=emb, layers=layers, heads=heads, head_dim=head_dim, r=r),
        lora_config=config,
        **result,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--maxtext-src", type=Path, default=None)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as work:
        data = {
            "provenance": {
                "generator": "tests/data/generate_interop_layouts.py",
                "command": " ".join(
                    ["python", "tests/data/generate_interop_layouts.py", *sys.argv[1:]]
                ),
                "python": sys.version.split()[0],
                "jax": jax.__version__,
                "setup": "separate venv; see the generator's docstring for the pip lines",
                "peft_export_check": "peft.export: examples/peft_export.py's adapter, saved "
                "with save_peft_adapter, loaded by peft.PeftModel.from_pretrained on a "
                "randomly initialized tiny LlamaForCausalLM (built locally, no download); "
                "logits compared with the base model holding the JAX-merged weights. "
                "Copied from tests/data/peft_io.json (tests/data/generate_peft_io.py).",
                "note": "output_max_abs_err / delta_weight_max_abs_err: this library's "
                "pairing (c * canonical(a) @ canonical(b), back in the weight layout) vs "
                "the library's own LoRA output or delta weight.",
            },
            "peft": _peft_section(Path(work)),
            "gemma": _gemma_section(),
            "qwix": _qwix_section(),
            "maxtext": _maxtext_section(args.maxtext_src),
        }
    OUT.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
