"""The one AdamW fallback: leaves an optimizer's own rule does not take go to AdamW.

Every pair optimizer (:func:`lora_muon_jax.lora_muon` and the LoRA peers) sends the
leaves in no LoRA pair (biases, norms, embeddings, heads) to :func:`optax.adamw`, and
the dense-weight peers send the leaves with fewer than two axes. This module builds
that partition once: labels from the pair rules (or the caller's), AdamW with the
``adam_*`` settings, updates cast back to the param dtype.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from lora_muon_jax import _pair_labels, _pair_types


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
    pairs: _pair_types.PairsLike = "auto",
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
    factor (see :func:`lora_muon_jax._pair_labels.require_pairs`). Dense-weight
    optimizers pass their own ``labels`` (``label`` for matrices, ``"adam"``
    otherwise). The AdamW updates are cast to the param dtype.

    Only ``main_tx`` refuses complex, integer and boolean leaves (its pair or
    matrix leaves; see :func:`lora_muon_jax._validation.check_float_leaves`):
    the leaves sent to AdamW are not checked, since :func:`optax.adamw` handles
    complex leaves correctly.
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
        labels = _pair_labels.pair_labels(
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
