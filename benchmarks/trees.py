"""Adapter trees shaped like real models, for benchmarks.

A scanned transformer keeps one adapter pair per projection, stacked over its
layers: ``lora_a: (L, m, r)``, ``lora_b: (L, r, n)`` with ``ΔW = a @ b`` mapping ``m``
inputs to ``n`` outputs. The shapes are the projections of the named models (public
configs); only the adapters exist here, no base weights.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# name -> projection -> (m, n): inputs and outputs of the adapted weight.
MODELS: dict[str, dict[str, tuple[int, int]]] = {
    # Llama-2-7B: d_model 4096, 32 heads of 128 (MHA), SwiGLU MLP of 11008.
    "llama7b": {
        "q": (4096, 4096),
        "k": (4096, 4096),
        "v": (4096, 4096),
        "o": (4096, 4096),
        "gate": (4096, 11008),
        "up": (4096, 11008),
        "down": (11008, 4096),
    },
    # Qwen2.5-7B: d_model 3584, 28 query heads and 4 key/value heads of 128 (GQA),
    # SwiGLU MLP of 18944.
    "qwen7b": {
        "q": (3584, 3584),
        "k": (3584, 512),
        "v": (3584, 512),
        "o": (3584, 3584),
        "gate": (3584, 18944),
        "up": (3584, 18944),
        "down": (18944, 3584),
    },
}


def model_tree(
    model: str, layers: int, rank: int, dtype: Any = jnp.float32, seed: int = 0
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Random adapter params and gradients of ``model``, both factors non-zero."""
    params: dict[str, Any] = {}
    grads: dict[str, Any] = {}
    key = jax.random.key(seed)
    for name, (m, n) in MODELS[model].items():
        key, *k = jax.random.split(key, 5)
        a = jax.random.normal(k[0], (layers, m, rank)) / np.sqrt(m)
        b = jax.random.normal(k[1], (layers, rank, n)) / np.sqrt(rank)
        params[name] = {"lora_a": a.astype(dtype), "lora_b": b.astype(dtype)}
        grads[name] = {
            "lora_a": (jax.random.normal(k[2], a.shape) * 1e-2).astype(dtype),
            "lora_b": (jax.random.normal(k[3], b.shape) * 1e-2).astype(dtype),
        }
    return params, grads


def adapter_elements(model: str, layers: int, rank: int) -> int:
    """Number of adapter parameters of :func:`model_tree`."""
    return layers * rank * sum(m + n for m, n in MODELS[model].values())


# The configurations (layers, m, n, r) of the original targets: square and
# rectangular stacks of one adapter shape.
CONFIGS = ((4, 1024, 1024, 16), (4, 2048, 2048, 16), (2, 4096, 4096, 64), (8, 1024, 4096, 8))


def lora_tree(layers: int, m: int, n: int, r: int, dtype=jnp.float32, seed: int = 0):
    """Random LoRA params and gradients with both factors non-zero."""
    k = jax.random.split(jax.random.key(seed), 4)
    params = {
        "lora_a": (jax.random.normal(k[0], (layers, m, r)) / np.sqrt(m)).astype(dtype),
        "lora_b": (jax.random.normal(k[1], (layers, r, n)) / np.sqrt(r)).astype(dtype),
    }
    grads = {
        "lora_a": (jax.random.normal(k[2], (layers, m, r)) * 1e-2).astype(dtype),
        "lora_b": (jax.random.normal(k[3], (layers, r, n)) * 1e-2).astype(dtype),
    }
    return params, grads


def dense_tree(layers: int, m: int, n: int, dtype=jnp.float32, seed: int = 0):
    k = jax.random.split(jax.random.key(seed), 2)
    params = {"w": (jax.random.normal(k[0], (layers, m, n)) / np.sqrt(m)).astype(dtype)}
    grads = {"w": (jax.random.normal(k[1], (layers, m, n)) * 1e-2).astype(dtype)}
    return params, grads


def state_floats(state: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(state) if np.ndim(x) > 0))
