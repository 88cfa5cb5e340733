"""Plumbing shared by every optimizer that updates LoRA factor pairs.

A pair optimizer's ``update`` does the same four things: flatten updates and params
with their paths, find the pairs (same rules and errors everywhere), view each
pair's factors in canonical layout ``a: (*batch, m, r)``, ``b: (*batch, r, n)``, and
put the per-pair results back into the leaves' own layout and dtype. This module
does those four things once; optimizers only write the per-pair maths. It also
refuses, at ``init`` and in ``update``, pair factors (params or updates) that are
complex, integer or boolean (:func:`check_pair_dtypes`); leaves in no pair are not
checked here, since the AdamW fallback takes them as they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import (
    _key_paths,
    _pair_labels,
    _pair_matching,
    _pair_types,
    _sharding,
    _validation,
)


class PairTree(NamedTuple):
    """A flattened ``updates`` tree with its params and pairs resolved."""

    plan: _pair_types.PairPlan
    treedef: Any
    grads: list[Any]
    params: list[Any]


def flatten(
    fn: str,
    updates: Any,
    params: Any,
    pairs: _pair_types.PairsLike,
    *,
    require_all_paired: bool = True,
) -> PairTree:
    """Flattens ``updates``/``params`` and finds the pairs (raises with leaf paths)."""
    paths, grads, treedef = _key_paths.flatten_with_paths(updates)
    p_leaves = _validation.params_leaves(fn, paths, params)
    plan = _pair_matching.plan_pairs(paths, p_leaves, pairs)
    if require_all_paired:
        _pair_labels.require_pairs(fn, paths, p_leaves, plan, pairs)
        _validation.require_all_paired(fn, plan)
    check_pair_dtypes(fn, plan, p_leaves, "params")
    check_pair_dtypes(fn, plan, grads, "updates")
    return PairTree(plan, treedef, list(grads), list(p_leaves))


def check_init(fn: str, params: Any, pairs: _pair_types.PairsLike) -> _pair_types.PairPlan:
    """Validates pairs at ``init`` (also on a leafless ``optax.tree.map_params`` placeholder)."""
    paths, leaves, _ = _key_paths.flatten_with_paths(params)
    plan = _pair_matching.plan_pairs(paths, leaves, pairs)
    _pair_labels.require_pairs(fn, paths, leaves, plan, pairs)
    _validation.require_all_paired(fn, plan)
    check_pair_dtypes(fn, plan, leaves, "params")
    return plan


def check_pair_dtypes(
    fn: str, plan: _pair_types.PairPlan, leaves: Sequence[Any], tree: str = "params"
) -> None:
    """Raises ``TypeError`` if a factor of a pair is complex, integer or boolean.

    Args:
      fn: the transformation, named in the message.
      plan: the pairs of the flattened tree.
      leaves: the flattened params or updates, in the plan's leaf order.
      tree: ``"params"`` or ``"updates"``, for the message.

    Raises:
      TypeError: see :func:`lora_muon_jax._validation.check_float_leaves`; the
        message names the leaf paths (and says "complex" for complex leaves).
    """
    index = sorted(i for pair in plan.pairs for i in (pair.a_index, pair.b_index))
    names = [plan.paths[i] for i in index]
    _validation.check_float_leaves(fn, names, [leaves[i] for i in index], tree)


def canonical(pair: _pair_types.LoRAPair, leaves: Sequence[Any]) -> tuple[jax.Array, jax.Array]:
    """``(a, b)`` of one pair from a leaf list, in canonical layout."""
    return pair.canonical(leaves[pair.a_index], "a"), pair.canonical(leaves[pair.b_index], "b")


def scatter(
    tree: PairTree,
    per_pair: Sequence[tuple[jax.Array, jax.Array]],
    *,
    like: Sequence[Any] | None = None,
) -> Any:
    """Puts canonical per-pair ``(u_a, u_b)`` back into a tree shaped like the params.

    Each result is restored to its leaf's layout and cast to the dtype of ``like``
    (default: the params, so updates come back in the param dtype). Leaves in no
    pair keep their incoming update.
    """
    like = tree.params if like is None else like
    out = list(tree.grads)
    for pair, (ua, ub) in zip(tree.plan.pairs, per_pair, strict=True):
        roles: tuple[tuple[Literal["a", "b"], int, jax.Array], ...] = (
            ("a", pair.a_index, ua),
            ("b", pair.b_index, ub),
        )
        for role, index, u in roles:
            ref = like[index]
            out[index] = pair.restore(u, role, ref.shape).astype(ref.dtype)
    return jax.tree_util.tree_unflatten(tree.treedef, out)


def same_shape_groups(tree: PairTree) -> list[list[_pair_types.LoRAPair]]:
    """The pairs grouped by layout (shapes, dtype, sharding), in first-seen order.

    Pairs of one group can be stacked along a new leading axis so that each step
    is one batched computation per group instead of one per adapter (the q, k, v, o
    adapters of every layer of an unscanned model, say).
    """
    groups: dict[tuple, list[_pair_types.LoRAPair]] = {}
    for pair in tree.plan.pairs:
        a, b = tree.params[pair.a_index], tree.params[pair.b_index]
        key = (
            pair.batch_shape,
            pair.m,
            pair.n,
            pair.rank,
            str(a.dtype),
            str(_sharding.explicit_spec(a)),
            str(_sharding.explicit_spec(b)),
        )
        groups.setdefault(key, []).append(pair)
    return list(groups.values())


def unflatten(tree: PairTree, leaves: Sequence[Any]) -> Any:
    return jax.tree_util.tree_unflatten(tree.treedef, list(leaves))


def f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)
