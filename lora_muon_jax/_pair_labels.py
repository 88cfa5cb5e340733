"""The no-silent-fallback rule and the LoRA-vs-rest labels for ``optax.partition``.

A pair optimizer never falls back to AdamW silently: a tree in which no pair is
found raises (:func:`require_pairs`) unless the caller opts into fallback-only
with ``allow_no_pairs=True``. :func:`lora_param_labels` labels every leaf as a
factor of a pair or not; DoRA's magnitude vectors are noted and left to the fallback.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from lora_muon_jax._key_paths import flatten_with_paths, joined_name, path_names, token_matches
from lora_muon_jax._pair_matching import fitting_presets, plan_pairs
from lora_muon_jax._pair_types import PairPlan, PairsLike

__all__ = ["lora_param_labels"]

_LOG = logging.getLogger("lora_muon_jax")

# A leaf whose path reads like a LoRA factor (`lora_a`, `lora_B`, `lora_A.default`,
# `lora_embedding_A`, `lora_up`/`lora_down`, `lora/a`, `kernel_lora_b`, …) but that
# no rule paired: evidence that `pairs` does not fit the tree.
_FACTOR_LIKE = re.compile(
    r"(?:^|[._\-/:])lora(?:_embedding)?[._\-/:]?(?:a|b|down|up)(?:$|[._\-/:])",
    re.IGNORECASE,
)
# DoRA's per-column magnitude (PEFT `lora_magnitude_vector`): a vector, trained by
# the AdamW fallback.
_DORA_MAGNITUDE = "lora_magnitude_vector"


def _detection_off(pairs: PairsLike) -> bool:
    """``pairs=()``: no rules at all, i.e. pair detection turned off."""
    return isinstance(pairs, Sequence) and not isinstance(pairs, str) and len(pairs) == 0


def _shown_list(names: Sequence[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _preset_hint(paths: Sequence[Any], leaves: Sequence[Any], pairs: PairsLike) -> str:
    """Which presets would find pairs in this tree, as a sentence (or "")."""
    fits = fitting_presets(paths, leaves, pairs)
    if fits:
        return " Presets that find pairs here: " + "; ".join(fits) + "."
    return (
        " For factors named, say, `my_a` (m×r) and `my_b` (r×n): "
        "`pairs=PairRule(a='my_a', b='my_b')`; another axis order takes "
        "`a_axes=FactorAxes(rank_axis=...)` and `b_axes=...` too."
    )


def require_pairs(
    owner: str,
    paths: Sequence[Any],
    leaves: Sequence[Any],
    plan: PairPlan,
    pairs: PairsLike,
    *,
    allow_no_pairs: bool = False,
) -> None:
    """The no-silent-fallback rule: raises when a tree with leaves has no LoRA pair.

    * Leaves whose names look like LoRA factors (``lora_a``, ``lora_B``,
      ``lora_A.default``, ``lora_embedding_A``, ``lora/a``, ``kernel_lora_b``,
      ``lora_up``/``lora_down``, …) but sit in no pair mean that ``pairs`` does not
      fit the tree: that always raises, naming them (with ``pairs="auto"`` or an
      explicit preset or rule alike), and says which presets would find pairs.
    * A tree with no such leaves and no pair raises unless ``allow_no_pairs``
      (fallback-only: every leaf goes to the fallback).
    * ``pairs=()`` turns pair detection off: only ``allow_no_pairs`` matters.

    An empty tree (a leafless placeholder) passes. Reads paths and shapes only.
    """
    if plan.pairs or not plan.paths:
        return
    names = [joined_name(path_names(p)) for p in paths]
    suspects = (
        []
        if _detection_off(pairs)
        else [
            shown
            for shown, name in zip(plan.paths, names, strict=True)
            if _FACTOR_LIKE.search(name)
        ]
    )
    which = "pairs='auto'" if isinstance(pairs, str) and pairs == "auto" else f"pairs={pairs!r}"
    if suspects:
        raise ValueError(
            f"{owner}: {which} found no LoRA factor pair, but these leaves look like "
            f"LoRA factors: {_shown_list(suspects)}. Every leaf would go to the "
            "fallback (AdamW in the optimizers). Pass `pairs=` the preset, PairRule "
            "or callable that names your factors." + _preset_hint(paths, leaves, pairs)
        )
    if not allow_no_pairs:
        raise ValueError(
            f"{owner}: {which} found no LoRA factor pair among the {len(plan.paths)} "
            f"leaves ({_shown_list(list(plan.paths), 4)}), so every leaf would go to "
            "the fallback (AdamW in the optimizers). Pass `allow_no_pairs=True` if "
            "that is what you want (fallback-only), or `pairs=` a preset, PairRule "
            "or callable that names your factors." + _preset_hint(paths, leaves, pairs)
        )


# The DoRA sets already reported: labels are computed at init, at every trace and
# in eager updates, and one note per set of leaves is enough.
_DORA_NOTED: set[tuple[str, ...]] = set()


def _note_dora(plan: PairPlan, paths: Sequence[Any]) -> None:
    dora = [
        plan.paths[i]
        for i in plan.unpaired
        if token_matches(joined_name(path_names(paths[i])), _DORA_MAGNITUDE)
    ]
    if dora and tuple(dora) not in _DORA_NOTED:
        _DORA_NOTED.add(tuple(dora))
        _LOG.info(
            "DoRA magnitude vector(s) %s are not LoRA factors: they get the AdamW "
            "fallback (or `other_label`).",
            _shown_list(dora),
        )


def pair_labels(
    pairs: PairsLike,
    lora_label: str,
    other_label: str,
    *,
    owner: str,
    allow_no_pairs: bool = False,
) -> Callable[[Any], Any]:
    """:func:`lora_param_labels` with ``owner`` naming the caller in its errors."""

    def labels(tree: Any) -> Any:
        paths, leaves, treedef = flatten_with_paths(tree)
        plan = plan_pairs(paths, leaves, pairs)
        require_pairs(owner, paths, leaves, plan, pairs, allow_no_pairs=allow_no_pairs)
        _note_dora(plan, paths)
        out = [lora_label] * len(leaves)
        for i in plan.unpaired:
            out[i] = other_label
        return jax.tree_util.tree_unflatten(treedef, out)

    return labels


def lora_param_labels(
    pairs: PairsLike = "auto",
    lora_label: str = "lora",
    other_label: str = "other",
    *,
    allow_no_pairs: bool = False,
) -> Callable[[Any], Any]:
    """A labelling function for :func:`optax.partition`: LoRA factors vs the rest.

    Nothing falls through silently: a tree in which ``pairs`` finds no pair raises
    (naming the leaves that look like LoRA factors), unless ``allow_no_pairs`` and
    no leaf looks like one; see :func:`require_pairs`. DoRA's magnitude vectors
    get ``other_label``, with a note on the ``lora_muon_jax`` logger.

    Args:
      pairs: how to find pairs; see :func:`find_lora_pairs`.
      lora_label: label of every leaf that is a factor of a pair.
      other_label: label of every other leaf.
      allow_no_pairs: accept a tree without pairs (every leaf gets ``other_label``)
        when no leaf looks like a LoRA factor.

    Returns:
      A callable ``tree -> tree of labels`` that gives the same labels on params and
      on updates (it reads only paths), as :func:`optax.partition` requires.

    Raises:
      ValueError: as :func:`find_lora_pairs`, and when no pair is found (above).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from lora_muon_jax import lora_param_labels
      >>> params = {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3)),
      ...           'head': jnp.ones(3)}
      >>> lora_param_labels()(params)
      {'head': 'other', 'lora_a': 'lora', 'lora_b': 'lora'}
      >>> lora_param_labels('peft')(params)  # doctest: +ELLIPSIS
      Traceback (most recent call last):
      ...
      ValueError: lora_param_labels: pairs='peft' found no LoRA factor pair, ...
    """
    return pair_labels(
        pairs,
        lora_label,
        other_label,
        owner="lora_param_labels",
        allow_no_pairs=allow_no_pairs,
    )
