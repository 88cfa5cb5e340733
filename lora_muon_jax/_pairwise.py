"""Plumbing shared by every optimizer that updates LoRA factor pairs.

A pair optimizer's ``update`` does the same four things: flatten updates and params
with their paths, find the pairs (same rules and errors everywhere), view each
pair's factors in canonical layout ``a: (*batch, m, r)``, ``b: (*batch, r, n)``, and
put the per-pair results back into the leaves' own layout and dtype. This module
does those four things once; optimizers only write the per-pair maths. It also
builds the AdamW fallback alias for leaves in no pair.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _pairs, _sharding, _validation


class PairTree(NamedTuple):
    """A flattened ``updates`` tree with its params and pairs resolved."""

    plan: _pairs.PairPlan
    treedef: Any
    grads: list[Any]
    params: list[Any]


def flatten(
    fn: str,
    updates: Any,
    params: Any,
    pairs: _pairs.PairsLike,
    *,
    require_all_paired: bool = True,
) -> PairTree:
    """Flattens ``updates``/``params`` and finds the pairs (raises with leaf paths)."""
    paths, grads, treedef = _pairs.flatten_with_paths(updates)
    p_leaves = _validation.params_leaves(fn, paths, params)
    plan = _pairs.plan_pairs(paths, p_leaves, pairs)
    if require_all_paired:
        _pairs.require_pairs(fn, paths, p_leaves, plan, pairs)
        _validation.require_all_paired(fn, plan)
    return PairTree(plan, treedef, list(grads), list(p_leaves))


def check_init(fn: str, params: Any, pairs: _pairs.PairsLike) -> _pairs.PairPlan:
    """Validates pairs at ``init`` (also on a leafless ``optax.tree.map_params`` placeholder)."""
    paths, leaves, _ = _pairs.flatten_with_paths(params)
    plan = _pairs.plan_pairs(paths, leaves, pairs)
    _pairs.require_pairs(fn, paths, leaves, plan, pairs)
    _validation.require_all_paired(fn, plan)
    return plan


def canonical(pair: _pairs.LoRAPair, leaves: Sequence[Any]) -> tuple[jax.Array, jax.Array]:
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
    for pair, (ua, ub) in zip(tree.plan.pairs, per_pair):
        for role, index, u in (("a", pair.a_index, ua), ("b", pair.b_index, ub)):
            ref = like[index]
            out[index] = pair.restore(u, role, ref.shape).astype(ref.dtype)
    return jax.tree_util.tree_unflatten(tree.treedef, out)


def same_shape_groups(tree: PairTree) -> list[list[_pairs.LoRAPair]]:
    """The pairs grouped by layout (shapes, dtype, sharding), in first-seen order.

    Pairs of one group can be stacked along a new leading axis so that each step
    is one batched computation per group instead of one per adapter (the q, k, v, o
    adapters of every layer of an unscanned model, say).
    """
    groups: dict[tuple, list[_pairs.LoRAPair]] = {}
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


def with_adamw_fallback(
    main_tx: optax.GradientTransformation,
    *,
    learning_rate: optax.ScalarOrSchedule,
    adam_b1: jax.typing.ArrayLike,
    adam_b2: jax.typing.ArrayLike,
    adam_eps: jax.typing.ArrayLike,
    adam_eps_root: jax.typing.ArrayLike,
    adam_weight_decay: jax.typing.ArrayLike,
    mu_dtype: Any = None,
    pairs: _pairs.PairsLike = "auto",
    label: str = "lora",
    labels: Callable[[Any], Any] | None = None,
    mask_compatible_extra_args: bool = False,
    allow_no_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    """``main_tx`` on the leaves labelled ``label``, :func:`optax.adamw` on the rest.

    By default the labels come from :func:`lora_param_labels` (paths only: LoRA
    factors vs everything else), so they agree between ``init`` (params, possibly
    Flax Variables) and ``update`` (updates), and nothing falls back silently: a
    tree with no pair raises at ``init`` and at trace time (errors name ``label``
    as the optimizer), unless ``allow_no_pairs`` and no leaf looks like a LoRA
    factor (see :func:`lora_muon_jax._pairs.require_pairs`). Dense-weight
    optimizers pass their own ``labels`` (``label`` for matrices, ``"adam"``
    otherwise). The AdamW updates are cast to the param dtype.
    """
    adam = optax.adamw(
        learning_rate=learning_rate,
        b1=adam_b1,
        b2=adam_b2,
        eps=adam_eps,
        eps_root=adam_eps_root,
        weight_decay=adam_weight_decay,
        mu_dtype=mu_dtype,
    )
    if labels is None:
        labels = _pairs.pair_labels(
            pairs, label, "adam", owner=label, allow_no_pairs=allow_no_pairs
        )
    return optax.partition(
        {label: main_tx, "adam": optax.chain(adam, cast_updates_like_params())},
        labels,
        mask_compatible_extra_args=mask_compatible_extra_args,
    )


def cast_updates_like_params() -> optax.GradientTransformationExtraArgs:
    """Casts every update to its param's dtype (stateless).

    ``optax.adamw(mu_dtype="float32")`` returns float32 updates for bfloat16 params;
    Optax's convention, and ours, is updates in the param dtype.
    """

    def update_fn(updates: Any, state: Any, params: Any = None, **extra_args: Any):
        del extra_args
        if params is None:
            return updates, state
        return optax.tree.cast_like(updates, params), state

    return optax.GradientTransformationExtraArgs(optax.init_empty_state, update_fn)


def f32(x: jax.Array) -> jax.Array:
    return x.astype(jnp.float32)
