"""Writes tests/data/peft_io.json and the adapter directories under tests/data/peft_io/.

Cross-checks :mod:`lora_muon_jax.peft_io` against the real Hugging Face PEFT. Not
part of the test suite (it needs torch, peft and transformers); run it in a
separate virtual environment:

    python3 -m venv /tmp/venv-peft && . /tmp/venv-peft/bin/activate
    pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu
    pip install peft==0.21.2 transformers==5.24.0 safetensors numpy
    pip install -e . pytest pytest-xdist hypothesis
    python tests/data/generate_peft_io.py

(Recorded with Python 3.11.7, torch 2.13.0+cpu, peft 0.21.2, transformers 5.24.0,
jax 0.10.2; every version and the commit go into the JSON.) In that environment
``pytest tests/test_peft_io.py`` also runs ``test_against_real_peft``, which repeats
every case below in a temporary directory.

Every case builds a tiny randomly initialized ``LlamaForCausalLM`` (no download),
adds a PEFT LoRA adapter with non-zero factors and saves it with
``save_pretrained`` into ``tests/data/peft_io/<case>/`` (the README PEFT writes is
dropped). Then the JAX side reads it with ``load_peft_adapter``, takes three
``lora_muon`` steps (weight decay on, fixed random gradients) on ``params`` only,
and writes it back with ``save_peft_adapter(..., frozen=adapter.frozen)``; PEFT loads
that with ``PeftModel.from_pretrained``. Recorded per case: whether every tensor PEFT
holds afterwards (``get_peft_model_state_dict``) is bit-identical to the file's, the
warnings PEFT gave, and the largest logit difference between the PEFT model and the
base model holding weights merged in NumPy from the file (``W + c · B @ A``, lora
biases times ``c`` added, ``modules_to_save`` copies and trainable token rows put in
place), with the adapter's own effect on the logits beside it. ``target_modules``
also records what PEFT did with the same file and ``target_modules: null`` (what
``save_peft_adapter`` wrote before it filled the field); ``patterns`` saves PEFT's
in-memory ``LoraConfig.to_dict()`` (sets and all) and records what PEFT's own
``save_pretrained`` does with the same overlapping ``rank_pattern``.

``export`` re-runs ``examples/peft_export.py`` (40 steps) on the tiny Llama's
``q_proj``/``v_proj`` and checks PEFT's logits and ``merge_and_unload`` weights; it
stores the base weights, PEFT's merged weights and the whole loss curve so that
tests/test_peft_io.py can recompute the JAX side without torch. The same figures
go to ``peft.export`` of tests/data/interop_layouts.json. JAX runs with the XLA
flags of tests/conftest.py, so that the tests recompute the same numbers on the
same CPU; the training trajectory itself is chaotic at this learning rate (a
relative change of 1e-7 in the base weights moves the final loss by 1-6%; one such
run is recorded), so only its first steps are compared across machines.
"""

from __future__ import annotations

import os

# tests/conftest.py's flags (the device count does not change any number here),
# unless XLA_FLAGS is set already (as it is under pytest).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import importlib.metadata as md  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
import safetensors.numpy  # noqa: E402

import lora_muon_jax as lmj  # noqa: E402
from lora_muon_jax import peft_io  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
DATA = Path(__file__).resolve().parent
OUT_JSON = DATA / "peft_io.json"
OUT_DIR = DATA / "peft_io"
INTEROP = DATA / "interop_layouts.json"
PREFIX = "base_model.model."
TINY_LLAMA = dict(
    vocab_size=64,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
)
LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _code() -> dict[str, Any]:
    """The commit, and the library/example files that differed from it when run."""

    def git(*args: str) -> str:
        run = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
        return run.stdout.rstrip()

    return dict(
        commit=git("rev-parse", "HEAD"),
        modified=git("status", "--porcelain", "--", "lora_muon_jax", "examples").splitlines(),
    )


def _versions() -> dict[str, str]:
    names = ("peft", "torch", "transformers", "safetensors", "jax", "jaxlib", "numpy", "optax")
    return {m: md.version(m) for m in names}


def _llama(seed: int, **overrides: Any):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**(TINY_LLAMA | overrides))).eval()


def jax_train(
    params: dict[str, np.ndarray], pairs: Any, lora_scale: float, steps: int = 3, **options: Any
) -> dict[str, np.ndarray]:
    """``steps`` lora_muon steps (rate 0.02, ``options`` for it) on fixed random gradients."""
    tx = lmj.lora_muon(0.02, lora_scale=lora_scale, pairs=pairs, **options)
    tree = {k: jnp.asarray(v) for k, v in params.items()}
    keys = jax.random.split(jax.random.key(0), len(tree))
    grads = {
        k: jax.random.normal(key, v.shape, v.dtype)
        for key, (k, v) in zip(keys, sorted(tree.items()), strict=True)
    }
    state = tx.init(tree)
    for _ in range(steps):
        updates, state = tx.update(grads, state, tree)
        tree = optax.apply_updates(tree, updates)
    return {k: np.asarray(v) for k, v in tree.items()}


def merge_from_file(
    state: dict[str, np.ndarray], tensors: dict[str, np.ndarray], config: dict, scale: float
) -> dict[str, np.ndarray]:
    """The base model's state dict with the file's adapter applied, in NumPy."""
    out = {k: v.astype(np.float64) for k, v in state.items()}
    for key, t in tensors.items():  # whole weights first: base copies, modules_to_save
        name = key.removeprefix(PREFIX)
        if name.endswith(".base_layer.weight"):
            out[name.replace(".base_layer.", ".")] = t.astype(np.float64)
        elif peft_io._role(key, config) == "modules_to_save":
            out[name] = t.astype(np.float64)
    for key, t in tensors.items():
        name = key.removeprefix(PREFIX)
        t = t.astype(np.float64)
        if name.endswith(".lora_B.weight"):
            module = name.removesuffix(".lora_B.weight")
            a = tensors[f"{PREFIX}{module}.lora_A.weight"].astype(np.float64)
            out[f"{module}.weight"] += scale * t @ a
        elif name.endswith(".lora_embedding_B"):
            module = name.removesuffix(".lora_embedding_B")
            a = tensors[f"{PREFIX}{module}.lora_embedding_A"].astype(np.float64)
            out[f"{module}.weight"] += scale * (t @ a).T
        elif name.endswith(".lora_B.bias"):
            out[name.removesuffix(".lora_B.bias") + ".bias"] += scale * t  # PEFT scales it too
        elif name.endswith(".token_adapter.trainable_tokens_delta"):
            module = name.removesuffix(".token_adapter.trainable_tokens_delta")
            out[f"{module}.weight"][config["trainable_token_indices"]] = t
    return {k: v.astype(np.float32) for k, v in out.items()}


def peft_check(
    model_fn: Callable[[], Any], directory: Path, scale: float, ids_shape=(2, 6)
) -> dict[str, Any]:
    """PeftModel.from_pretrained on ``directory``: tensors, warnings and logits."""
    import torch
    from peft import PeftModel, get_peft_model_state_dict

    tensors = safetensors.numpy.load_file(directory / peft_io.WEIGHTS_NAME)
    config = json.loads((directory / peft_io.CONFIG_NAME).read_text())
    base = model_fn()
    state = {k: v.numpy().copy() for k, v in base.state_dict().items()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peft_model = PeftModel.from_pretrained(base, directory).eval()
    peft_warnings = sorted(
        {str(w.message) for w in caught if not issubclass(w.category, FutureWarning)}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        held = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    vocab = TINY_LLAMA["vocab_size"]
    ids = torch.arange(int(np.prod(ids_shape))).reshape(ids_shape) % vocab
    reference = model_fn()
    reference.load_state_dict(
        {k: torch.from_numpy(v) for k, v in merge_from_file(state, tensors, config, scale).items()}
    )
    with torch.no_grad():
        ref_logits = reference(ids).logits.numpy()
        peft_logits = peft_model(ids).logits.numpy()
        base_logits = model_fn()(ids).logits.numpy()
    return dict(
        file_tensors=sorted(tensors),
        peft_tensors_missing=sorted(set(tensors) - set(held)),
        peft_tensors_extra=sorted(set(held) - set(tensors)),
        tensors_bit_identical=all(
            k in held and held[k].tobytes() == v.tobytes() for k, v in tensors.items()
        ),
        peft_warnings=peft_warnings,
        logits_max_abs_err=float(np.abs(peft_logits - ref_logits).max()),
        logits_max_abs=float(np.abs(ref_logits).max()),
        logits_max_abs_change_by_adapter=float(np.abs(peft_logits - base_logits).max()),
    )


def _randomize(peft_model, seed: int) -> None:
    """Non-zero B factors, lora biases and token deltas, so every delta shows."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if p.requires_grad and ("lora_B" in name or "lora_embedding_B" in name):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif p.requires_grad and "trainable_tokens_delta" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))


def _save_case(
    name: str, model_fn: Callable[[], Any], lora_config, seed: int, out_dir: Path
) -> Path:
    from peft import get_peft_model

    peft_model = get_peft_model(model_fn(), lora_config)
    _randomize(peft_model, seed)
    out = out_dir / name
    if out.exists():
        shutil.rmtree(out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Setting `save_embedding_layers` to `True`"
        peft_model.save_pretrained(out)
    (out / "README.md").unlink(missing_ok=True)
    return out


def round_trip_case(
    name: str, model_fn: Callable[[], Any], lora_config, out_dir: Path, work: Path
) -> dict:
    """PEFT saves into ``out_dir``; JAX loads, trains ``params`` and saves into
    ``work``; PEFT loads that."""
    saved = _save_case(name, model_fn, lora_config, 1, out_dir)
    adapter = lmj.load_peft_adapter(saved)
    trained = jax_train(
        adapter.params, adapter.pairs, adapter.lora_scale, weight_decay=0.1, adam_weight_decay=0.1
    )
    ours = work / name
    lmj.save_peft_adapter(trained, ours, adapter.config, frozen=adapter.frozen)
    moved = {k: float(np.abs(trained[k] - adapter.params[k]).max()) for k in trained}
    return dict(
        params=sorted(adapter.params),
        frozen=sorted(adapter.frozen),
        lora_scale=adapter.lora_scale,
        jax_steps_max_abs_move=moved,
        peft=peft_check(model_fn, ours, adapter.lora_scale),
    )


def target_modules_case(out_dir: Path, work: Path) -> dict:
    """14 adapted modules; the config without target_modules, as given to save."""
    from peft import LoraConfig

    def model_fn():
        return _llama(3, num_hidden_layers=2)

    saved = _save_case(
        "target_modules", model_fn, LoraConfig(r=4, lora_alpha=8, target_modules=LINEAR), 2, out_dir
    )
    adapter = lmj.load_peft_adapter(saved)
    config = {k: v for k, v in adapter.config.items() if k != "target_modules"}
    filled = work / "filled"
    lmj.save_peft_adapter(adapter.params, filled, config)
    # What the earlier save_peft_adapter wrote for such a config: target_modules null.
    unfilled = work / "unfilled"
    shutil.copytree(saved, unfilled)
    (unfilled / peft_io.CONFIG_NAME).write_text(json.dumps(config | {"target_modules": None}))
    modules = sorted({k.removeprefix(PREFIX).rsplit(".lora_", 1)[0] for k in adapter.params})
    return dict(
        modules=modules,
        written_target_modules=json.loads((filled / peft_io.CONFIG_NAME).read_text())[
            "target_modules"
        ],
        peft_filled=peft_check(model_fn, filled, adapter.lora_scale),
        peft_target_modules_null=peft_check(model_fn, unfilled, adapter.lora_scale),
    )


def patterns_case(out_dir: Path, work: Path) -> dict:
    """Overlapping rank/alpha patterns, most specific first; PEFT's to_dict() config."""
    from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict

    def model_fn():
        return _llama(4, num_hidden_layers=2)

    lora_config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "down_proj"],
        rank_pattern={"layers.1.mlp.down_proj": 2, "down_proj": 8},
        alpha_pattern={"layers.1.mlp.down_proj": 4, "down_proj": 16},
    )
    peft_model = get_peft_model(model_fn(), lora_config)
    _randomize(peft_model, 3)
    config = peft_model.peft_config["default"].to_dict()
    set_fields = sorted(k for k, v in config.items() if isinstance(v, set))
    tensors = {k: v.detach().numpy() for k, v in get_peft_model_state_dict(peft_model).items()}
    out = out_dir / "patterns"
    if out.exists():
        shutil.rmtree(out)
    lmj.save_peft_adapter(tensors, out, config)  # the in-memory config, sets and all
    # PEFT's own save_pretrained writes json.dumps(sort_keys=True): its file puts
    # "down_proj" first, and from_pretrained then builds layer 1's down_proj with r=8.
    peft_model.save_pretrained(work / "peft_own")
    own_config = json.loads((work / "peft_own" / peft_io.CONFIG_NAME).read_text())
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            PeftModel.from_pretrained(model_fn(), work / "peft_own")
        own = "loads"
    except Exception as err:  # noqa: BLE001 (recorded, whatever it is)
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        own = f"{type(err).__name__}: " + " ".join(lines[:2])
    written = json.loads((out / peft_io.CONFIG_NAME).read_text())
    return dict(
        to_dict_set_fields=set_fields,
        written_rank_pattern=list(written["rank_pattern"].items()),
        written_alpha_pattern=list(written["alpha_pattern"].items()),
        written_target_modules=written["target_modules"],
        peft_save_pretrained_rank_pattern=list(own_config["rank_pattern"].items()),
        peft_save_pretrained_round_trip=own,
        peft=peft_check(model_fn, out, 2.0),
    )


def export_check(out_dir: Path) -> dict:
    """examples/peft_export.py's adapter, trained on a tiny Llama, loaded by PEFT."""
    import torch
    from peft import PeftModel

    sys.path.insert(0, str(ROOT / "examples"))
    import peft_export

    steps = 40
    base_model = _llama(1)
    state = base_model.state_dict()
    base = {name: state[name + ".weight"].numpy().copy() for name in peft_export.MODULES}
    adapter, losses = peft_export.fine_tune(base, rank=4, lora_alpha=8.0, steps=steps)
    out = out_dir / "export"
    if out.exists():
        shutil.rmtree(out)
    lmj.save_peft_adapter(adapter, out, peft_export.peft_config(4, 8.0))
    merged = {k: np.asarray(v) for k, v in peft_export.merged(base, adapter, 2.0).items()}

    ids = torch.arange(12).reshape(2, 6) % TINY_LLAMA["vocab_size"]
    reference = _llama(1)
    with torch.no_grad():
        for name, w in merged.items():
            reference.get_submodule(name).weight.copy_(torch.from_numpy(w))
        ref_logits = reference(ids).logits.numpy()
        peft_model = PeftModel.from_pretrained(base_model, out).eval()
        peft_logits = peft_model(ids).logits.numpy()
        merged_back = peft_model.merge_and_unload()
        peft_merged = {n: merged_back.get_submodule(n).weight.numpy().copy() for n in merged}
    # The trajectory is chaotic: the same run on base weights scaled by 1 + 1e-7.
    _, nudged = peft_export.fine_tune(
        {k: v * np.float32(1 + 1e-7) for k, v in base.items()}, rank=4, lora_alpha=8.0, steps=steps
    )
    return dict(
        steps=steps,
        rank=4,
        final_loss_base_times_1_plus_1e_7=nudged[-1],
        lora_alpha=8.0,
        learning_rate=0.1,
        losses=[float(x) for x in losses],
        base_weights={k: v.tolist() for k, v in base.items()},
        peft_merged_weights={k: v.tolist() for k, v in peft_merged.items()},
        merged_weight_max_abs_err=max(
            float(np.abs(peft_merged[n] - w).max()) for n, w in merged.items()
        ),
        logits_max_abs_err=float(np.abs(peft_logits - ref_logits).max()),
        logits_max_abs=float(np.abs(ref_logits).max()),
    )


def all_cases(out_dir: Path, work: Path) -> dict[str, dict]:
    """Every cross-check but ``export``; PEFT's files go to ``out_dir/<case>``."""
    from peft import LoraConfig

    def llama():
        return _llama(0)

    return {
        "lora_bias": round_trip_case(
            "lora_bias",
            lambda: _llama(0, attention_bias=True),
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_bias=True),
            out_dir,
            work,
        ),
        "embed_lm_head": round_trip_case(
            "embed_lm_head",
            llama,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens", "lm_head"]),
            out_dir,
            work,
        ),
        "modules_to_save": round_trip_case(
            "modules_to_save",
            llama,
            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"]),
            out_dir,
            work,
        ),
        "trainable_tokens": round_trip_case(
            "trainable_tokens",
            llama,
            LoraConfig(
                r=4, lora_alpha=8, target_modules=["q_proj"], trainable_token_indices=[1, 5]
            ),
            out_dir,
            work,
        ),
        "target_modules": target_modules_case(out_dir, work),
        "patterns": patterns_case(out_dir, work),
    }


def main() -> None:
    OUT_DIR.mkdir(exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        cases = all_cases(OUT_DIR, Path(tmp))
    export = export_check(OUT_DIR)
    data = dict(
        provenance=dict(
            generator="tests/data/generate_peft_io.py",
            command="python tests/data/generate_peft_io.py",
            python=sys.version.split()[0],
            versions=_versions(),
            code=_code(),
            xla_flags=os.environ["XLA_FLAGS"],
            machine=platform.machine(),
            tiny_llama=TINY_LLAMA,
        ),
        cases=cases,
        export=export,
    )
    OUT_JSON.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    print(f"wrote {OUT_JSON} and {OUT_DIR}/")
    interop = json.loads(INTEROP.read_text())
    interop["peft"]["export"] = dict(
        losses=[export["losses"][0], export["losses"][-1]],
        merged_weight_max_abs_err=export["merged_weight_max_abs_err"],
        logits_max_abs_err=export["logits_max_abs_err"],
        logits_max_abs=export["logits_max_abs"],
        recorded_by="tests/data/generate_peft_io.py (see peft_io.json's export)",
    )
    interop["provenance"]["peft_export_check"] = (
        "peft.export: examples/peft_export.py's adapter, saved with save_peft_adapter, "
        "loaded by peft.PeftModel.from_pretrained on a randomly initialized tiny "
        "LlamaForCausalLM (built locally, no download); logits compared with the base "
        "model holding the JAX-merged weights. Copied from tests/data/peft_io.json "
        "(tests/data/generate_peft_io.py)."
    )
    INTEROP.write_text(json.dumps(interop, indent=1, sort_keys=True) + "\n")
    print(f"updated peft.export in {INTEROP}")


if __name__ == "__main__":
    main()
