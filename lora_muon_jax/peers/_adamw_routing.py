"""How the peers' aliases route the leaves their optimizer does not take to AdamW.

There is one AdamW fallback, :func:`lora_muon_jax._adamw_fallback.with_adamw_fallback`.
The aliases bundle its settings (their ``adam_*`` arguments) in one
:class:`AdamWSettings` and call it through :func:`for_lora_pairs` (leaves in no
LoRA pair go to AdamW) or :func:`for_matrices` (leaves with ``ndim < 2`` go to
AdamW, as in :func:`optax.contrib.muon`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import optax

from lora_muon_jax import _adamw_fallback, _pair_types
from lora_muon_jax.peers import _dense_weights


class AdamWSettings(NamedTuple):
    """AdamW's hyperparameters for the leaves an alias's optimizer does not take.

    Attributes:
      learning_rate: AdamW's learning rate; ``None`` uses the alias's.
      b1: :math:`β_1`.
      b2: :math:`β_2`.
      eps: :math:`ε`.
      eps_root: :math:`ε_{root}`.
      weight_decay: decoupled weight decay.
    """

    learning_rate: optax.ScalarOrSchedule | None
    b1: jax.typing.ArrayLike
    b2: jax.typing.ArrayLike
    eps: jax.typing.ArrayLike
    eps_root: jax.typing.ArrayLike
    weight_decay: jax.typing.ArrayLike


def _fallback(
    tx: optax.GradientTransformation,
    adamw: AdamWSettings,
    learning_rate: optax.ScalarOrSchedule,
    mu_dtype: Any,
    **routing: Any,
) -> optax.GradientTransformationExtraArgs:
    return _adamw_fallback.with_adamw_fallback(
        tx,
        learning_rate=learning_rate if adamw.learning_rate is None else adamw.learning_rate,
        adam_b1=adamw.b1,
        adam_b2=adamw.b2,
        adam_eps=adamw.eps,
        adam_eps_root=adamw.eps_root,
        adam_weight_decay=adamw.weight_decay,
        mu_dtype=mu_dtype,
        **routing,
    )


def for_lora_pairs(
    lora_tx: optax.GradientTransformation,
    adamw: AdamWSettings,
    learning_rate: optax.ScalarOrSchedule,
    label: str,
    pairs: _pair_types.PairsLike,
    allow_no_pairs: bool,
    mu_dtype: Any,
) -> optax.GradientTransformationExtraArgs:
    """``lora_tx`` on LoRA factor pairs, AdamW on every other leaf.

    Labels come from the pair rules (paths only), so they agree between ``init``
    and ``update``; a tree without pairs raises unless ``allow_no_pairs`` (see
    :func:`lora_muon_jax._adamw_fallback.with_adamw_fallback`). ``label`` names the
    optimizer in those errors and in the state of :func:`optax.partition`.
    """
    return _fallback(
        lora_tx,
        adamw,
        learning_rate,
        mu_dtype,
        pairs=pairs,
        label=label,
        allow_no_pairs=allow_no_pairs,
    )


def for_matrices(
    matrix_tx: optax.GradientTransformation,
    adamw: AdamWSettings,
    learning_rate: optax.ScalarOrSchedule,
    fn: str,
    pairs: _pair_types.PairsLike,
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """``matrix_tx`` on leaves with ``ndim >= 2``, AdamW on the rest.

    Labels come from :func:`lora_muon_jax.peers._dense_weights.matrix_labels`
    (shapes only), which first rejects trees holding LoRA factor pairs, naming
    ``fn``. Extra arguments shaped like the params (LiMuon's ``prev_grads``) are
    masked like the updates.
    """
    return _fallback(
        matrix_tx,
        adamw,
        learning_rate,
        mu_dtype,
        label=_dense_weights.MATRIX_LABEL,
        labels=_dense_weights.matrix_labels(fn, pairs),
        mask_compatible_extra_args=True,
    )
