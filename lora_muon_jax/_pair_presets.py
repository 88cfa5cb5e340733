"""The pair presets: each library's factor names and layouts, and ``"auto"``.

``PRESETS`` maps a library (``"flax"``, ``"peft"``, ``"gemma"``, ``"qwix"``,
``"maxtext"``, ``"maxtext_unscanned"``) to the :class:`PairRule` s that name its
factors; ``"auto"`` is every preset at once. :func:`peft_adapter` gives the PEFT
rules of one named adapter, and :func:`leading_batch_axes` reads qwix's and gemma's
layouts from the factor shapes.
"""

from __future__ import annotations

from collections.abc import Sequence

from lora_muon_jax._pair_types import AmbiguousLayoutError, FactorAxes, PairRule

__all__ = ["PRESETS", "leading_batch_axes", "peft_adapter"]


def leading_batch_axes(
    a_shape: Sequence[int], b_shape: Sequence[int]
) -> tuple[FactorAxes, FactorAxes]:
    """Layout of ``a: (*batch, *in, r)``, ``b: (*batch, r, *out)`` from the shapes.

    This is how qwix (``kernel_lora_a/b``) and gemma's ``peft`` modules store their
    factors: the rank is the last axis of ``a``; batch axes are the leading axes the
    two factors share, with the rank right after them in ``b``; every other axis
    is a matrix axis (an axis only one factor has is always a matrix axis). So an
    einsum adapter for ``BTNH,NHD->BTD`` with ``a: (N, H, r)``, ``b: (r, D)`` gives
    ``m = N·H``, ``n = D`` and a DenseGeneral adapter with batch dims,
    ``a: (B, D, r)``, ``b: (B, r, N, H)``, gives ``batch = (B,)``, ``n = N·H``.

    When several batch counts fit (a stacked axis whose size equals the rank),
    the most batch axes win. A layer axis in the middle (MaxText's scanned
    layers, ``a: (m, L, r)``, ``b: (r, L, n)``) is not a leading axis: that
    reading is refused as ambiguous rather than guessed; use the ``"maxtext"``
    preset or explicit :class:`FactorAxes` for it.

    Args:
      a_shape: shape of the left factor.
      b_shape: shape of the right factor.

    Returns:
      ``(a_axes, b_axes)`` with non-negative axes.

    Raises:
      ValueError: no axis of ``b`` after the shared leading axes has the rank of
        ``a``; :class:`AmbiguousLayoutError` (a ``ValueError``) for the
        layer-axis-in-the-middle ambiguity above.

    Examples:
      >>> from lora_muon_jax import leading_batch_axes
      >>> leading_batch_axes((4, 8, 2), (2, 16))      # einsum NHr,rD: no batch
      (FactorAxes(rank_axis=2, batch_axes=()), FactorAxes(rank_axis=0, batch_axes=()))
      >>> leading_batch_axes((3, 16, 2), (3, 2, 4, 8))  # DenseGeneral, batch dim 3
      (FactorAxes(rank_axis=2, batch_axes=(0,)), FactorAxes(rank_axis=1, batch_axes=(0,)))
    """
    a_shape, b_shape = tuple(a_shape), tuple(b_shape)
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise ValueError(f"factors need ndim >= 2; got shapes {a_shape} and {b_shape}.")
    rank = a_shape[-1]
    for k in range(min(len(a_shape), len(b_shape)) - 2, -1, -1):
        if a_shape[:k] == b_shape[:k] and b_shape[k] == rank:
            break
    else:
        raise ValueError(
            f"the rank {rank} (last axis of a, shape {a_shape}) is not the axis of b "
            f"(shape {b_shape}) right after the leading axes the factors share."
        )
    if k == 0 and len(a_shape) >= 3 and len(b_shape) >= 3 and a_shape[1] == b_shape[1]:
        raise AmbiguousLayoutError(
            f"ambiguous layout: a {a_shape} and b {b_shape} share axis 1 (size "
            f"{a_shape[1]}), as MaxText's scanned layers store their layer axis. Use "
            "pairs='maxtext' for that layout, or a PairRule with explicit FactorAxes "
            "if axis 1 is a matrix axis."
        )
    batch = tuple(range(k))
    return (
        FactorAxes(rank_axis=len(a_shape) - 1, batch_axes=batch),
        FactorAxes(rank_axis=k, batch_axes=batch),
    )


# MaxText scans layers with `param_scan_axis: 1`, so the layer axis sits in the
# middle, both for its PEFT-converted adapters (`lora_a.kernel`: a (emb, L, r),
# b (r, L, heads, head_dim)) and for its native qwix ones (`kernel_lora_a`:
# a (emb, L, r), b (r, L, heads·head_dim)).
_MAXTEXT_SCANNED = PairRule(
    "lora_a",
    "lora_b",
    a_axes=FactorAxes(rank_axis=-1, batch_axes=(1,)),
    b_axes=FactorAxes(rank_axis=0, batch_axes=(1,)),
)

# Hugging Face PEFT stores torch layouts: Linear and Conv lora_A (r, in, *kernel),
# lora_B (out, r, *1), ΔW = lora_B @ lora_A, so the left factor is lora_B;
# Embedding lora_embedding_A (r, vocab), lora_embedding_B (dim, r) with
# ΔW = (lora_embedding_B @ lora_embedding_A)ᵀ (vocab × dim), so the left factor
# is lora_embedding_A. The adapter name, if any, follows the factor name
# (`lora_A.default.weight` in a model's state dict, `lora_A.weight` in a file).
_PEFT_LINEAR_AXES = (
    FactorAxes(rank_axis=1, batch_axes=()),
    FactorAxes(rank_axis=0, batch_axes=()),
)
_PEFT_EMBEDDING_AXES = (
    FactorAxes(rank_axis=0, batch_axes=()),
    FactorAxes(rank_axis=1, batch_axes=()),
)


def peft_adapter(name: str | None = None) -> tuple[PairRule, ...]:
    """Rules for Hugging Face PEFT LoRA factors, optionally of one named adapter.

    A PEFT model's state dict names factors ``<module>.lora_A.<adapter>.weight``
    (``lora_B``, and ``lora_embedding_A.<adapter>`` for embeddings); an adapter
    file (``adapter_model.safetensors``) drops the adapter name. With ``name=None``
    (the ``"peft"`` preset) every adapter's factors are paired, each adapter its
    own pair; with a name only that adapter's factors are, and the other adapters'
    leaves are left to the fallback (freeze them, e.g. with
    :func:`optax.set_to_zero` in an :func:`optax.partition`).

    DoRA's ``lora_magnitude_vector`` is not a factor: pair optimizers send it to
    their AdamW fallback (and log a note).

    Args:
      name: the adapter name (PEFT's ``adapter_name``, ``"default"`` unless set).

    Returns:
      A tuple of :class:`PairRule` to pass as ``pairs=``.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax import find_lora_pairs, peft_adapter
      >>> S = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
      >>> q = 'base_model.model.layers.0.q_proj.'
      >>> sd = {q + 'lora_A.default.weight': S(4, 32), q + 'lora_B.default.weight': S(24, 4),
      ...       q + 'lora_A.other.weight': S(2, 32), q + 'lora_B.other.weight': S(24, 2)}
      >>> [(p.m, p.n, p.rank) for p in find_lora_pairs(sd, 'peft')]
      [(24, 32, 4), (24, 32, 2)]
      >>> [(p.m, p.n, p.rank) for p in find_lora_pairs(sd, peft_adapter('other'))]
      [(24, 32, 2)]
    """
    if name is not None and (not isinstance(name, str) or not name or any(c in name for c in "./")):
        raise ValueError(
            f"peft_adapter: `name` must be a non-empty adapter name without '.' or "
            f"'/'; got {name!r}."
        )
    suffix = "" if name is None else "." + name
    return (
        PairRule("lora_B" + suffix, "lora_A" + suffix, *_PEFT_LINEAR_AXES),
        PairRule("lora_embedding_A" + suffix, "lora_embedding_B" + suffix, *_PEFT_EMBEDDING_AXES),
    )


PRESETS: dict[str, tuple[PairRule, ...]] = {
    # flax.nnx LoRA / LoRALinear and linen modules: a (*batch, in, r),
    # b (*batch, r, out).
    "flax": (PairRule("lora_a", "lora_b"),),
    # Hugging Face PEFT, every adapter of a state dict or file; see peft_adapter.
    "peft": peft_adapter(),
    # gemma `peft` (LoRADense, LoRAEinsum, LoRADenseGeneral): a submodule `lora`
    # holding `a` (*batch, *in, r) and `b` (*batch, r, *out).
    "gemma": (PairRule("a", "b", scope="lora", axes_from_shapes=leading_batch_axes),),
    # qwix: `{weight}_lora_a` / `{weight}_lora_b` siblings; dot_general adapters
    # are (*batch, in, r) / (*batch, r, out), einsum ones (*in, r) / (r, *out).
    "qwix": (PairRule("lora_a", "lora_b", axes_from_shapes=leading_batch_axes),),
    # MaxText with scanned layers (layer axis at 1) and unscanned layers.
    "maxtext": (_MAXTEXT_SCANNED,),
    "maxtext_unscanned": (
        PairRule(
            "lora_a",
            "lora_b",
            a_axes=FactorAxes(rank_axis=-1, batch_axes=()),
            b_axes=FactorAxes(rank_axis=0, batch_axes=()),
        ),
    ),
}
# "auto" is every preset at once. PEFT's and gemma's names are their own; flax,
# qwix and MaxText all name their factors `lora_a`/`lora_b`, so each such pair is
# read by all three layouts and takes the reading that every layout that fits it
# agrees on (flax's and qwix's agree wherever both fit). Where two of them fit and
# read a pair differently (MaxText's layer axis at 1 vs a qwix einsum adapter) it
# raises, naming the presets and the leaves. ("maxtext_unscanned" reads what
# "qwix" reads with no batch axis, so it adds nothing here.)
PRESETS["auto"] = (
    PRESETS["flax"] + PRESETS["peft"] + PRESETS["gemma"] + PRESETS["qwix"] + PRESETS["maxtext"]
)
