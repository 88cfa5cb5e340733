"""What the dense-weight peers (LoRA-Pre, LiMuon) share: matrix leaves, shapes, msign.

A dense-weight optimizer updates full matrices: every leaf with ``ndim >= 2`` (leading
axes are batch axes, the last two the matrix) goes to it and every other leaf to the
AdamW fallback (:func:`matrix_labels`, used by
:func:`lora_muon_jax.peers._adamw_routing.for_matrices`), like
:func:`optax.contrib.muon`. Trees holding LoRA factor pairs are rejected with a
message pointing to :func:`lora_muon_jax.lora_muon`. Also here: Muon's shape
scaling, the choice of orthogonalizer, per-leaf PRNG keys and the state dtype.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_muon_jax import _key_paths, _linalg, _pair_matching, _pair_tree, _pair_types, _validation

Orthogonalizer = Literal["newton_schulz", "polar_express", "svd"]
ORTHOGONALIZERS: tuple[str, ...] = ("newton_schulz", "polar_express", "svd")
ShapeScaling = Literal["none", "muon"]
SHAPE_SCALINGS: tuple[str, ...] = ("none", "muon")
MUON_NS_COEFFS = _linalg.MUON_NS_COEFFS

MATRIX_LABEL = "matrix"
_ADAM_LABEL = "adam"


def shown_list(names: Sequence[str]) -> str:
    """The first 8 of ``names``, comma-separated, and how many more there are."""
    return ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")


def reject_lora_pairs(fn: str, tree: Any, pairs: _pair_types.PairsLike) -> None:
    """Raises if ``tree`` holds LoRA factor pairs: dense peers update full matrices."""
    found = _pair_matching.find_lora_pairs(tree, pairs)
    if found:
        names = [f"({p.a_path}, {p.b_path})" for p in found]
        raise ValueError(
            f"{fn} is a dense-weight optimizer: it updates full weight matrices "
            "(pretraining or full fine-tuning), but these "
            f"leaves are LoRA factor pairs: {shown_list(names)}. Use `lora_muon` (or a "
            "LoRA-pair peer from `lora_muon_jax.peers`) for LoRA factors. If these "
            "leaves really are dense weights whose names only look like LoRA "
            "factors, pass `pairs=()` to turn pair detection off."
        )


def check_matrices(fn: str, tree: Any, alias: str, what: str = "params") -> None:
    """Raises if a leaf of a matrix-only building block has ``ndim < 2`` or is no float.

    Args:
      fn: the building block, named in the messages.
      tree: its params (in ``init``) or updates (in ``update``).
      alias: the alias that routes other leaves to AdamW, suggested in the message.
      what: ``"params"`` or ``"updates"``, for the message.

    Raises:
      ValueError: a leaf with ``ndim < 2``.
      TypeError: a complex, integer or boolean leaf (see
        :func:`lora_muon_jax._validation.check_float_leaves`).
    """
    paths, leaves, _ = _key_paths.flatten_with_paths(tree)
    bad = [
        f"{_key_paths.path_str(p)} (shape {tuple(x.shape)})"
        for p, x in zip(paths, leaves, strict=True)
        if len(getattr(x, "shape", ())) < 2
    ]
    if bad:
        raise ValueError(
            f"{fn} only updates matrices (leaves with ndim >= 2; leading axes are "
            f"batch axes), but these leaves are not: {shown_list(bad)}. Use the alias "
            f"`{alias}`, which sends them to AdamW, or wrap with `optax.partition`."
        )
    names = [_key_paths.path_str(p) for p in paths]
    _validation.check_float_leaves(fn, names, leaves, what)


def matrix_labels(fn: str, pairs: _pair_types.PairsLike) -> Callable[[Any], Any]:
    """Labels for :func:`optax.partition`: ``'matrix'`` for ndim >= 2, else ``'adam'``.

    Rejects trees with LoRA pairs first, so the error names the whole tree's pairs.
    Reads only paths and shapes, so it gives the same labels on params and updates.
    """

    def labels(tree: Any) -> Any:
        reject_lora_pairs(fn, tree, pairs)
        leaves, treedef = jax.tree.flatten(tree)
        out = [MATRIX_LABEL if len(x.shape) >= 2 else _ADAM_LABEL for x in leaves]
        return jax.tree.unflatten(treedef, out)

    return labels


def matrix_size(x: Any) -> tuple[tuple[int, ...], int, int]:
    """``(batch_shape, rows, cols)`` of a ``(*batch, rows, cols)`` leaf."""
    *batch, rows, cols = x.shape
    return tuple(batch), rows, cols


def shape_scale(shape: Sequence[int], scaling: str, consistent_rms: Any) -> Any:
    """Muon's per-matrix step multiplier for a ``(*batch, fan_in, fan_out)`` leaf."""
    fan_in, fan_out = shape[-2], shape[-1]
    if consistent_rms is not None:
        return math.sqrt(max(fan_in, fan_out)) * jnp.asarray(consistent_rms, jnp.float32)
    if scaling == "muon":
        return math.sqrt(max(1.0, fan_out / fan_in))
    return 1.0


def scale_by_matrix_shape(
    scaling: ShapeScaling = "muon", consistent_rms: jax.typing.ArrayLike | None = None
) -> optax.GradientTransformation:
    """Scales each ``(*batch, fan_in, fan_out)`` update like ``optax.contrib.muon``.

    ``"muon"``: ``sqrt(max(1, fan_out / fan_in))`` (Keller Jordan's width scaling,
    the default of :func:`optax.contrib.muon`, whose 2-D reduction axis is 0);
    ``"none"``: unchanged. A ``consistent_rms`` value ``c`` overrides both with
    ``c · sqrt(max(fan_in, fan_out))`` (Liu et al. 2025, arXiv 2502.16982).
    """

    def update_fn(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params

        def one(u: jax.Array) -> jax.Array:
            s = shape_scale(u.shape, scaling, consistent_rms)
            return (_pair_tree.f32(u) * s).astype(u.dtype)

        return jax.tree.map(one, updates), state

    return optax.GradientTransformation(optax.init_empty_state, update_fn)


def orthogonalize(
    x: jax.Array,
    method: str,
    *,
    ns_coeffs: Any = MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: jax.typing.ArrayLike = 1e-8,
) -> jax.Array:
    """``msign`` of a float32 ``(*batch, m, n)`` stack by the chosen method.

    ``"newton_schulz"``: Muon's quintic iteration (``ns_coeffs``, ``ns_steps``,
    ``eps``), approximate (singular values end in about [0.7, 1.2]);
    ``"polar_express"``: the 8-step Polar Express of :mod:`lora_muon_jax._linalg`;
    ``"svd"``: exact, by a thin SVD. A zero matrix maps to zero for all three.
    """
    if method == "newton_schulz":
        return _linalg.newton_schulz(x, ns_coeffs, ns_steps, eps=eps)
    if method == "polar_express":
        return _linalg.polar_express(x, tall=x.shape[-2] > x.shape[-1])
    return _linalg.msign_svd(x)


def check_orthogonalizer(fn: str, method: Any, ns_coeffs: Any, ns_steps: Any) -> None:
    """Raises for an unknown ``method`` or ``ns_coeffs``/``ns_steps`` that do not fit."""
    _validation.check_choice(fn, "orthogonalizer", method, ORTHOGONALIZERS)
    _validation.check_static_int(fn, "ns_steps", ns_steps)
    try:
        shape = np.shape(ns_coeffs)
    except (TypeError, ValueError) as err:  # ragged nested sequences
        raise ValueError(
            f"{fn}: `ns_coeffs` must have shape (3,) or (k, 3); got {ns_coeffs!r}."
        ) from err
    if len(shape) not in (1, 2) or shape[-1] != 3 or (len(shape) == 2 and shape[0] < ns_steps):
        raise ValueError(
            f"{fn}: `ns_coeffs` must have shape (3,) or (k, 3) with k >= ns_steps="
            f"{ns_steps}; got shape {shape}."
        )


def leaf_keys(seed: Any, leaves: Sequence[Any], parts: int) -> list[jax.Array]:
    """``parts`` independent PRNG keys per leaf, derived from ``seed``."""
    base = jax.random.key(seed)
    return [jax.random.split(jax.random.fold_in(base, i), parts) for i in range(len(leaves))]
