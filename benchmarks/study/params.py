"""The parameters a run starts from: the char model, its gauge, fine-tuning adapters.

Pairs, paths, gauge moves, merges and factor norms come from the library
(:func:`lora_muon_jax.find_lora_pairs`, :func:`lora_muon_jax._key_paths.path_names`,
:func:`lora_muon_jax.testing` 's pair rescaling, :func:`lora_muon_jax.nnx.merge_lora`,
:func:`lora_muon_jax.nnx.balance_lora_init`);
the study only says which leaves are block matrices and how adapters start.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from benchmarks.study.configs import RunConfig
from lora_muon_jax import _key_paths, _pair_matching

FACTORS = ("lora_a", "lora_b")


def is_block_matrix(path: tuple, leaf: Any = None) -> bool:
    """A kernel inside a transformer block (attention and MLP matrices)."""
    names = _key_paths.path_names(path)
    return names[0] == "blocks" and names[-1] == "kernel"


def build_params(cfg: RunConfig, vocab: int) -> tuple[Any, Any]:
    """``(graphdef, params)`` of the run's model; gauge ``(c a, b / c)`` applied."""
    from flax import nnx

    from lora_muon_jax.testing import _rescale_pairs
    from lora_muon_jax_examples.char_lm import CharTransformer

    b = cfg.budget
    rank = cfg.rank if cfg.task == "pretrain" else None
    model = CharTransformer(
        vocab,
        width=cfg.width,
        depth=cfg.depth,
        heads=b.heads,
        rank=rank,
        seq_len=b.seq_len,
        mlp_ratio=b.mlp_ratio,
        rngs=nnx.Rngs(cfg.seed),
    )
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    if cfg.gauge != 1.0:
        params = _rescale_pairs(params, cfg.gauge, "auto")
    return graphdef, params


def factor_log_ratios(params: Any) -> np.ndarray:
    """``log σ_max(a) − log σ_max(b)`` of every adapter pair (host float64 SVDs).

    On the host on purpose: a jitted :func:`lora_muon_jax.lora_pair_diagnostics` per
    pair puts several batched ``eigh`` calls side by side in one XLA program, and on
    a 2-core CPU jaxlib's LAPACK fan-out then deadlocks (seen at rank 32). A zero
    factor counts as ``σ = 1e-30``.
    """
    _, leaves, _ = _key_paths.flatten_with_paths(params)
    out = []
    for pair in _pair_matching.find_lora_pairs(params):
        a, b = (
            np.asarray(pair.canonical(leaves[i], role), np.float64)
            for i, role in ((pair.a_index, "a"), (pair.b_index, "b"))
        )
        sa, sb = (np.linalg.norm(x, 2, axis=(-2, -1)) for x in (a, b))
        out.append(np.ravel(np.log(np.maximum(sa, 1e-30)) - np.log(np.maximum(sb, 1e-30))))
    return np.concatenate(out) if out else np.zeros((0,))


# ----------------------------------------------------------------------------- fine-tuning


def block_kernels(tree: Any) -> dict[tuple, Any]:
    """``{path of the layer (raw keys): kernel}`` for every block matrix of a dense dict."""
    return {
        path[:-1]: w
        for path, w in traverse_util.flatten_dict(tree).items()
        if path[0] == "blocks" and path[-1] == "kernel"
    }


def _raw(tree: dict) -> dict[tuple, Any]:
    """Flat ``{key tuple: leaf}`` with the tree's own keys (ints stay ints)."""
    return traverse_util.flatten_dict(tree)


def adapters_for(base: Any, rank: int, key: jax.Array) -> dict:
    """Flax's LoRA init for every block matrix: ``a`` He-uniform ``(in, r)``, ``b = 0``.

    Layer ``i`` (in jax's leaf order of ``base``) draws ``a`` from ``fold_in(key, i)``.
    """
    init = jax.nn.initializers.he_uniform()
    flat = {}
    for i, (path, w) in enumerate(jax.tree_util.tree_flatten_with_path(base)[0]):
        if not is_block_matrix(path):
            continue
        layer = tuple(getattr(k, "key", getattr(k, "idx", k)) for k in path[:-1])
        m, n = w.shape
        flat[layer + ("lora_a",)] = init(jax.random.fold_in(key, i), (m, rank), jnp.float32)
        flat[layer + ("lora_b",)] = jnp.zeros((rank, n), jnp.float32)
    return traverse_util.unflatten_dict(flat)


def joint_tree(base: dict, adapters: dict) -> dict:
    """The dense tree with each adapter's factors beside its ``kernel``."""
    return traverse_util.unflatten_dict({**_raw(base), **_raw(adapters)})


def split_joint(joint: dict) -> tuple[dict, dict]:
    """The inverse of :func:`joint_tree`: ``(base, adapters)``."""
    flat = _raw(joint)
    base = {k: v for k, v in flat.items() if k[-1] not in FACTORS}
    adapters = {k: v for k, v in flat.items() if k[-1] in FACTORS}
    return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def merge_adapters(base: dict, adapters: dict) -> dict:
    """The dense pure dict with every adapted kernel replaced by ``W₀ + a @ b``."""
    from lora_muon_jax.nnx import merge_lora

    return merge_lora(joint_tree(base, adapters))


def finetune_start(cfg: RunConfig, base: dict) -> tuple[dict, dict]:
    """``(frozen base, adapters)`` of a fine-tuning run: zero or balanced init."""
    adapters = adapters_for(base, cfg.rank, jax.random.key(1000 + cfg.seed))
    if cfg.init == "zero":
        return base, adapters
    if cfg.init != "balanced":
        raise ValueError(f"finetune init must be 'zero' or 'balanced'; got {cfg.init!r}")
    from lora_muon_jax.nnx import balance_lora_init

    joint = balance_lora_init(joint_tree(base, adapters), jax.random.key(2000 + cfg.seed))
    return split_joint(joint)
