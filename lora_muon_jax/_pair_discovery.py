"""LoRA pair discovery: which leaves of a pytree are the two factors of an adapter.

An adapter writes a weight update as ``ΔW = c · a @ b`` with ``a: (..., m, r)`` and
``b: (..., r, n)``. Optimizers that act on the pair (LoRA-Muon and its peers) need to
know, for every leaf, whether it is the left factor ``a``, the right factor ``b`` or
neither, and where its rank, matrix and batch axes are. Everything here is static: it
reads only paths, shapes and dtypes, so it runs at trace time on params, updates,
``jax.ShapeDtypeStruct`` trees and Flax ``nnx.State`` trees alike.

Factor names are matched on the whole key path, so nested dicts and flat dicts with
dotted keys (a PEFT state dict such as ``…q_proj.lora_A.default.weight``) are read
the same way. ``pairs="auto"`` tries every preset's layout on every pair and takes
the reading that all the layouts that fit agree on; where two fit and disagree it
raises :class:`AmbiguousLayoutError` rather than guess.

A pair optimizer never falls back to AdamW silently: a tree in which no pair is
found raises (:func:`require_pairs`) unless the caller opts into fallback-only
with ``allow_no_pairs=True``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

import jax

__all__ = [
    "PRESETS",
    "AmbiguousLayoutError",
    "FactorAxes",
    "FactorLayout",
    "LoRAFactor",
    "LoRAPair",
    "PairRule",
    "PairsLike",
    "find_lora_pairs",
    "leading_batch_axes",
    "lora_param_labels",
    "peft_adapter",
]

_LOG = logging.getLogger("lora_muon_jax")

# Characters that may separate a factor name from the rest of a key, so that
# `kernel_lora_a` (qwix), `lora_a.kernel` (MaxText) and `q.lora_A.weight` (flat PEFT
# names) all contain the token `lora_a` / `lora_A`, while `lora_alpha` does not.
_SEPARATORS = "._-/:"

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


class FactorAxes(NamedTuple):
    """Where the rank axis and the batch axes of one LoRA factor are.

    Every axis that is neither the rank axis nor a batch axis is a matrix axis; matrix
    axes are flattened, in order, into the factor's ``m`` (for ``a``) or ``n`` (for
    ``b``) dimension. Batch axes (scanned layers, experts, heads) are kept: the update
    is computed independently for every batch index.

    Attributes:
      rank_axis: the axis of size ``r``. Negative values count from the end.
      batch_axes: the batch axes, or ``None`` for "every axis before the last two",
        which fits factors laid out as ``(*batch, m, r)`` / ``(*batch, r, n)``.
    """

    rank_axis: int
    batch_axes: tuple[int, ...] | None = None


class FactorLayout(NamedTuple):
    """Resolved axes of one stored factor: its rank axis, batch axes and matrix axes.

    All are non-negative axis numbers of the leaf as stored; ``batch_axes`` keep the
    order in which the pair's ``batch_shape`` lists them. Matrix axes are every other
    axis, in order.
    """

    rank_axis: int
    batch_axes: tuple[int, ...]
    matrix_axes: tuple[int, ...]


A_AXES = FactorAxes(rank_axis=-1)  # a: (*batch, m, r)
B_AXES = FactorAxes(rank_axis=-2)  # b: (*batch, r, n)


AxesFn: TypeAlias = Callable[[tuple[int, ...], tuple[int, ...]], tuple[FactorAxes, FactorAxes]]


class AmbiguousLayoutError(ValueError):
    """Two layouts fit the same factor shapes and read them differently.

    Raised by :func:`leading_batch_axes` for a layer axis in the middle, and by
    ``pairs="auto"`` (or overlapping rules) when two presets that name the same
    leaves read them differently. It is a ``ValueError``.
    """


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


class PairRule(NamedTuple):
    """Names two sibling leaves as the factors ``a`` (left) and ``b`` (right).

    A leaf matches ``a`` when its last path key (a trailing Flax ``.value`` is
    ignored) contains ``a`` as a token: the whole key, or a part delimited by one of
    ``._-/:``. Its partner is the sibling whose key has ``b`` in the same place: with
    ``PairRule("lora_a", "lora_b")``, ``kernel_lora_a`` pairs with ``kernel_lora_b``
    and ``lora_a.kernel`` with ``lora_b.kernel``.

    Attributes:
      a: token naming the left factor ``a`` of ``ΔW = a @ b`` (the one with ``m``).
      b: token naming the right factor ``b`` (the one with ``n``).
      a_axes: axes of ``a``; the default is ``(*batch, m, r)``.
      b_axes: axes of ``b``; the default is ``(*batch, r, n)``.
      scope: if given, the parent key both factors must sit under (e.g. ``"lora"``
        for gemma's ``lora/a``, ``lora/b``); keys must then equal ``a`` and ``b``
        exactly, so that short names cannot match unrelated leaves.
      axes_from_shapes: if given, a function ``(a_shape, b_shape) -> (a_axes,
        b_axes)`` that reads the layout from the two shapes (it replaces ``a_axes``
        and ``b_axes``), for libraries whose factor layout depends on the wrapped
        op, e.g. :func:`leading_batch_axes` for qwix and gemma. It raises
        ``ValueError`` when the shapes fit no layout.

    The token may sit in any key of the path, not only the last: PEFT's
    ``q_proj.lora_A.default.weight`` matches ``"lora_A"`` both as one dotted key
    and as nested dicts, and a token may span keys (``"lora_A.default"``; ``/``
    and ``.`` are interchangeable there).
    """

    a: str
    b: str
    a_axes: FactorAxes = A_AXES
    b_axes: FactorAxes = B_AXES
    scope: str | None = None
    axes_from_shapes: AxesFn | None = None


class LoRAFactor(NamedTuple):
    """Role of one leaf, as returned by a user's ``pairs`` callable.

    Attributes:
      pair: any hashable naming the adapter; the two leaves with the same ``pair``
        form one adapter.
      role: ``"a"`` for the left factor (``m × r``), ``"b"`` for the right one.
      axes: the factor's axes; ``None`` means the default layout for its role.
    """

    pair: Hashable
    role: Literal["a", "b"]
    axes: FactorAxes | None = None


PairFn: TypeAlias = Callable[[tuple[str, ...], Any], LoRAFactor | None]
PairsLike: TypeAlias = str | PairRule | Sequence[PairRule] | PairFn

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


@dataclasses.dataclass(frozen=True)
class LoRAPair:
    """One adapter found in a pytree, with its layout resolved against leaf shapes.

    Attributes:
      a_path, b_path: readable paths of the two factors (``jax.tree_util.keystr``
        style, trailing ``.value`` removed).
      a_index, b_index: positions of the factors among the tree's leaves.
      a_axes, b_axes: resolved axes: non-negative rank axis and batch axes.
      batch_shape: the common shape of the batch axes.
      m, n, rank: sizes of ``ΔW`` (``m × n``) and of the rank.
    """

    a_path: str
    b_path: str
    a_index: int
    b_index: int
    a_axes: FactorAxes
    b_axes: FactorAxes
    batch_shape: tuple[int, ...]
    m: int
    n: int
    rank: int

    def _matrix_axes(self, role: str, ndim: int) -> tuple[int, ...]:
        axes = self.a_axes if role == "a" else self.b_axes
        used = {axes.rank_axis, *(axes.batch_axes or ())}
        return tuple(i for i in range(ndim) if i not in used)

    def layout(self, role: Literal["a", "b"], ndim: int) -> FactorLayout:
        """The stored layout of factor ``role`` (a leaf with ``ndim`` axes)."""
        axes = self.a_axes if role == "a" else self.b_axes
        return FactorLayout(
            axes.rank_axis, tuple(axes.batch_axes or ()), self._matrix_axes(role, ndim)
        )

    def _perm(self, role: str, ndim: int) -> tuple[int, ...]:
        axes = self.a_axes if role == "a" else self.b_axes
        matrix = self._matrix_axes(role, ndim)
        batch = tuple(axes.batch_axes or ())
        if role == "a":
            return batch + matrix + (axes.rank_axis,)
        return batch + (axes.rank_axis,) + matrix

    def canonical(self, x: jax.Array, role: Literal["a", "b"]) -> jax.Array:
        """Moves ``x`` to ``(*batch, m, r)`` (role ``a``) or ``(*batch, r, n)`` (``b``)."""
        perm = self._perm(role, x.ndim)
        if perm != tuple(range(x.ndim)):
            x = x.transpose(perm)
        shape = (
            (*self.batch_shape, self.m, self.rank)
            if role == "a"
            else (*self.batch_shape, self.rank, self.n)
        )
        return x.reshape(shape) if x.shape != shape else x

    def restore(self, x: jax.Array, role: Literal["a", "b"], shape: tuple[int, ...]) -> jax.Array:
        """Inverse of :meth:`canonical`: back to the leaf's own ``shape``."""
        perm = self._perm(role, len(shape))
        moved = tuple(shape[i] for i in perm)
        if x.shape != moved:
            x = x.reshape(moved)
        if perm != tuple(range(len(shape))):
            x = x.transpose(tuple(sorted(range(len(shape)), key=perm.__getitem__)))
        return x


class PairPlan(NamedTuple):
    """Internal: the pairs of a flattened tree and the leaves in no pair."""

    pairs: tuple[LoRAPair, ...]
    unpaired: tuple[int, ...]
    paths: tuple[str, ...]


# ----------------------------------------------------------------------------------
# Paths


def _key_name(key: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(key, attr):
            return str(getattr(key, attr))
    return str(key)


def _is_value_key(key: Any) -> bool:
    # Flax NNX Variables flatten with a trailing GetAttrKey('value') in `init`, while
    # `update` sees pure arrays: both must resolve to the same path.
    return isinstance(key, jax.tree_util.GetAttrKey) and key.name == "value"


def normalized_path(path: Sequence[Any]) -> tuple[Any, ...]:
    """The key path without a trailing Flax ``.value``."""
    path = tuple(path)
    while path and _is_value_key(path[-1]):
        path = path[:-1]
    return path


def path_names(path: Sequence[Any]) -> tuple[str, ...]:
    """Key path as plain strings (dict keys, attribute names, indices)."""
    return tuple(_key_name(k) for k in normalized_path(path))


def path_str(path: Sequence[Any]) -> str:
    """Readable path for messages, e.g. ``['layer0']['lora']['lora_a']``."""
    path = normalized_path(path)
    return jax.tree_util.keystr(path) if path else "<root>"


def flatten_with_paths(tree: Any) -> tuple[list[tuple[Any, ...]], list[Any], Any]:
    """Leaves of ``tree`` with their key paths and the treedef."""
    with_path, treedef = jax.tree_util.tree_flatten_with_path(tree)
    paths = [p for p, _ in with_path]
    leaves = [x for _, x in with_path]
    return paths, leaves, treedef


# ----------------------------------------------------------------------------------
# Matching


def _token_matches(key: str, token: str) -> list[tuple[str, str]]:
    """All ways of writing ``key`` as ``pre + token + post`` on token boundaries."""
    out = []
    start = key.find(token)
    while start >= 0:
        pre, post = key[:start], key[start + len(token) :]
        if (not pre or pre[-1] in _SEPARATORS) and (not post or post[0] in _SEPARATORS):
            out.append((pre, post))
        start = key.find(token, start + 1)
    return out


def _resolve_rules(pairs: PairsLike) -> tuple[PairRule, ...] | PairFn:
    if isinstance(pairs, str):
        if pairs not in PRESETS:
            raise ValueError(
                f"`pairs` got unknown preset {pairs!r}; valid presets are "
                f"{sorted(PRESETS)}, or pass a PairRule, a sequence of PairRules or a "
                "callable (path, leaf) -> LoRAFactor | None."
            )
        return PRESETS[pairs]
    if isinstance(pairs, PairRule):
        return (pairs,)
    if callable(pairs):
        return pairs
    if isinstance(pairs, Sequence) and all(isinstance(p, PairRule) for p in pairs):
        return tuple(p for p in pairs if isinstance(p, PairRule))
    raise TypeError(
        "`pairs` must be a preset name, a PairRule, a sequence of PairRules or a "
        f"callable (path, leaf) -> LoRAFactor | None; got {pairs!r}."
    )


class _Reading(NamedTuple):
    """One layout a rule gives a pair: fixed axes, or a function of the shapes."""

    a_axes: FactorAxes
    b_axes: FactorAxes
    axes_from_shapes: AxesFn | None = None
    rule: PairRule | None = None  # the rule that named the pair (None: a callable)


class _Match(NamedTuple):
    """Two leaves named as factors ``a`` and ``b``, with every layout that names them."""

    a: int
    b: int
    readings: tuple[_Reading, ...]


def joined_name(name: Sequence[str]) -> str:
    """A key path as one dotted string (``/`` read as ``.``), for token matching."""
    return ".".join(name).replace("/", ".")


class _Index(NamedTuple):
    exact: dict[tuple[str, ...], int]
    joined: dict[str, list[int]]


def _partners(
    name: tuple[str, ...], rule: PairRule, own: str, other: str, index: _Index
) -> tuple[list[str], list[list[int]]]:
    """The partner names ``name`` asks for as factor ``own``, and the leaves found."""
    if rule.scope is not None:
        # Scoped rules name short keys (`a`, `b`): the last key, exactly, under `scope`.
        if len(name) < 2 or name[-2] != rule.scope or name[-1] != own:
            return [], []
        partner = name[:-1] + (other,)
        shown = jax.tree_util.keystr(tuple(jax.tree_util.DictKey(k) for k in partner))
        return [shown], [[index.exact[partner]] if partner in index.exact else []]
    keys = [pre + other + post for pre, post in _token_matches(joined_name(name), own)]
    return keys, [index.joined.get(k, []) for k in keys]


def _match_by_rules(
    names: list[tuple[str, ...]], rules: tuple[PairRule, ...], shown: list[str]
) -> list[_Match]:
    index = _Index({n: i for i, n in enumerate(names)}, {})
    for i, n in enumerate(names):
        index.joined.setdefault(joined_name(n), []).append(i)
    found_pairs: dict[tuple[int, int], list[_Reading]] = {}
    orphans: dict[int, str] = {}
    for rule in rules:
        for role, own, other in (("a", rule.a, rule.b), ("b", rule.b, rule.a)):
            for i, name in enumerate(names):
                keys, found = _partners(name, rule, own, other, index)
                for key, js in zip(keys, found, strict=True):
                    if len(js) > 1:
                        raise ValueError(
                            f"{shown[i]} looks like LoRA factor `{role}`, but its partner "
                            f"name {key!r} fits several leaves: "
                            f"{', '.join(shown[j] for j in js)}."
                        )
                if keys and not any(found) and i not in orphans:
                    orphans[i] = (
                        f"{shown[i]} looks like LoRA factor `{role}` ({own!r} of "
                        f"{_rule_str(rule)}) but its partner {keys[0]} is missing"
                    )
                if role == "a":
                    reading = _Reading(rule.a_axes, rule.b_axes, rule.axes_from_shapes, rule)
                    for (j,) in filter(None, found):
                        readings = found_pairs.setdefault((i, j), [])
                        if reading not in readings:  # the same rule twice
                            readings.append(reading)
    if orphans:
        raise ValueError(
            "Unpaired LoRA factor(s): " + "; ".join(orphans[i] for i in sorted(orphans)) + ". "
            "Every adapter needs both factors in the same tree; pass `pairs=` a PairRule "
            "or callable if your names differ."
        )
    return [_Match(a, b, tuple(rs)) for (a, b), rs in found_pairs.items()]


def _rule_str(rule: PairRule) -> str:
    parts = [f"{rule.a!r}", f"{rule.b!r}"]
    if rule.scope is not None:
        parts.append(f"scope={rule.scope!r}")
    return f"PairRule({', '.join(parts)})"


def _match_by_fn(
    names: list[tuple[str, ...]], leaves: list[Any], fn: PairFn, shown: list[str]
) -> list[_Match]:
    groups: dict[Hashable, dict[str, tuple[int, FactorAxes]]] = {}
    for i, (name, leaf) in enumerate(zip(names, leaves, strict=True)):
        role = fn(name, leaf)
        if role is None:
            continue
        if not isinstance(role, LoRAFactor) or role.role not in ("a", "b"):
            raise TypeError(
                f"The `pairs` callable returned {role!r} for {shown[i]}; expected "
                "LoRAFactor(pair=..., role='a'|'b') or None."
            )
        slot = groups.setdefault(role.pair, {})
        if role.role in slot:
            raise ValueError(
                f"LoRA pair {role.pair!r} has two `{role.role}` factors: "
                f"{shown[slot[role.role][0]]} and {shown[i]}."
            )
        default = A_AXES if role.role == "a" else B_AXES
        slot[role.role] = (i, role.axes or default)
    matches = []
    for pair, slot in groups.items():
        if len(slot) != 2:
            (present,) = slot
            raise ValueError(
                f"Unpaired LoRA factor: {shown[slot[present][0]]} is factor "
                f"`{present}` of pair {pair!r}, but no leaf was given the other role."
            )
        (ia, axa), (ib, axb) = slot["a"], slot["b"]
        matches.append(_Match(ia, ib, (_Reading(axa, axb),)))
    return matches


def _resolve_axes(axes: FactorAxes, ndim: int, where: str) -> FactorAxes:
    def norm(ax: int) -> int:
        if not -ndim <= ax < ndim:
            raise ValueError(f"{where}: axis {ax} is out of range for ndim={ndim}.")
        return ax % ndim

    rank = norm(axes.rank_axis)
    if axes.batch_axes is None:
        batch = tuple(range(ndim - 2))
    else:
        batch = tuple(norm(ax) for ax in axes.batch_axes)
    if rank in batch or len(set(batch)) != len(batch):
        raise ValueError(f"{where}: rank axis {rank} and batch axes {batch} must be distinct.")
    if ndim - 1 - len(batch) < 1:
        raise ValueError(
            f"{where}: a factor of ndim={ndim} with batch axes {batch} has no matrix axis left."
        )
    return FactorAxes(rank_axis=rank, batch_axes=batch)


class _LayoutMismatch(ValueError):
    """Internal: a layout does not fit the factors' shapes (rank, batch, axes)."""


def _check_factors(m: _Match, leaves: list[Any], shown: list[str]) -> str:
    """Checks what every layout needs (arrays, ndim >= 2, one dtype); names the pair."""
    xa, xb = leaves[m.a], leaves[m.b]
    for x, where in ((xa, shown[m.a]), (xb, shown[m.b])):
        if not hasattr(x, "shape") or len(x.shape) < 2:
            raise ValueError(
                f"LoRA factor {where} must be an array with ndim >= 2; got "
                f"{getattr(x, 'shape', type(x))}."
            )
    what = (
        f"a at {shown[m.a]} (shape {tuple(xa.shape)}) and "
        f"b at {shown[m.b]} (shape {tuple(xb.shape)})"
    )
    if xa.dtype != xb.dtype:
        raise ValueError(f"LoRA dtype mismatch: {what} have dtypes {xa.dtype} and {xb.dtype}.")
    return what


def _read_pair(
    m: _Match, reading: _Reading, leaves: list[Any], shown: list[str], what: str
) -> LoRAPair:
    """The pair as ``reading`` lays it out; raises ``_LayoutMismatch`` where it does not fit."""
    xa, xb = leaves[m.a], leaves[m.b]
    a_ax, b_ax = reading.a_axes, reading.b_axes
    if reading.axes_from_shapes is not None:
        try:
            a_ax, b_ax = reading.axes_from_shapes(tuple(xa.shape), tuple(xb.shape))
        except AmbiguousLayoutError as err:
            raise AmbiguousLayoutError(f"LoRA layout of {what}: {err}") from None
        except ValueError as err:
            raise _LayoutMismatch(f"LoRA layout of {what}: {err}") from None
    try:
        a_axes = _resolve_axes(a_ax, len(xa.shape), f"LoRA factor a at {shown[m.a]}")
        b_axes = _resolve_axes(b_ax, len(xb.shape), f"LoRA factor b at {shown[m.b]}")
    except ValueError as err:
        raise _LayoutMismatch(str(err)) from None
    ra, rb = xa.shape[a_axes.rank_axis], xb.shape[b_axes.rank_axis]
    if ra != rb:
        raise _LayoutMismatch(
            f"LoRA rank mismatch: {what} have ranks {ra} (axis {a_axes.rank_axis} of a) "
            f"and {rb} (axis {b_axes.rank_axis} of b)."
        )
    batch_a = tuple(xa.shape[i] for i in a_axes.batch_axes or ())
    batch_b = tuple(xb.shape[i] for i in b_axes.batch_axes or ())
    if batch_a != batch_b:
        raise _LayoutMismatch(
            f"LoRA batch axes mismatch: {what} have batch shapes {batch_a} (axes "
            f"{a_axes.batch_axes}) and {batch_b} (axes {b_axes.batch_axes})."
        )
    pair = LoRAPair(shown[m.a], shown[m.b], m.a, m.b, a_axes, b_axes, batch_a, 0, 0, ra)
    m_size = math.prod(xa.shape[i] for i in pair._matrix_axes("a", len(xa.shape)))
    n_size = math.prod(xb.shape[i] for i in pair._matrix_axes("b", len(xb.shape)))
    return dataclasses.replace(pair, m=m_size, n=n_size)


def _layout_name(reading: _Reading) -> str:
    """``pairs='<preset>'`` for a preset's rule, else the rule itself."""
    if reading.rule is None:
        return "the `pairs` callable"
    for name, rules in PRESETS.items():
        if name != "auto" and reading.rule in rules:
            return f"pairs={name!r}"
    return _rule_str(reading.rule)


def _reading_str(pair: LoRAPair) -> str:
    a, b = pair.a_axes, pair.b_axes
    return (
        f"batch {pair.batch_shape} (axes {a.batch_axes} of a, {b.batch_axes} of b), "
        f"m={pair.m}, n={pair.n}, rank {pair.rank} (axis {a.rank_axis} of a, "
        f"{b.rank_axis} of b)"
    )


def _build_pair(m: _Match, leaves: list[Any], shown: list[str]) -> LoRAPair:
    """The pair's layout: the one reading every layout that fits it agrees on."""
    what = _check_factors(m, leaves, shown)
    if len(m.readings) == 1:
        return _read_pair(m, m.readings[0], leaves, shown, what)
    fits: dict[LoRAPair, list[str]] = {}
    ambiguous: list[tuple[str, AmbiguousLayoutError]] = []
    misfits: list[tuple[_Reading, ValueError]] = []
    for reading in m.readings:
        try:
            fits.setdefault(_read_pair(m, reading, leaves, shown, what), []).append(
                _layout_name(reading)
            )
        except AmbiguousLayoutError as err:
            ambiguous.append((_layout_name(reading), err))
        except _LayoutMismatch as err:
            misfits.append((reading, err))
    if len(fits) == 1 and not ambiguous:
        return next(iter(fits))
    if len(fits) + len(ambiguous) > 1:
        readings = [
            f"{' and '.join(names)} read{'s' if len(names) == 1 else ''} {_reading_str(p)}"
            for p, names in fits.items()
        ]
        readings += [
            f"{name} fits them two ways "
            f"({str(err).removeprefix(f'LoRA layout of {what}: ').split('. ')[0]})"
            for name, err in ambiguous
        ]
        raise AmbiguousLayoutError(
            f"Ambiguous LoRA layout: {what} fit several layouts that read them "
            f"differently: {'; '.join(readings)}. Pass `pairs=` the preset of the "
            "library that wrote them, or a PairRule with explicit FactorAxes."
        )
    if ambiguous:
        raise ambiguous[0][1]
    first, others = misfits[0][1], misfits[1:]
    short = [f"{_layout_name(r)}: {str(e).replace(what, 'they')}" for r, e in others]
    raise _LayoutMismatch(
        f"{first} No layout that names these leaves fits them ({_layout_name(misfits[0][0])} "
        f"above; {'; '.join(short)})."
    )


def _plan(paths: Sequence[Any], leaves: Sequence[Any], pairs: PairsLike) -> PairPlan:
    names = [path_names(p) for p in paths]
    shown = [path_str(p) for p in paths]
    leaves = list(leaves)
    rules = _resolve_rules(pairs)
    if callable(rules):
        matches = _match_by_fn(names, leaves, rules, shown)
    else:
        matches = _match_by_rules(names, rules, shown)
    owner: dict[int, int] = {}
    built = []
    for k, m in enumerate(matches):
        for i in (m.a, m.b):
            if i in owner:
                other = matches[owner[i]]
                raise ValueError(
                    f"{shown[i]} belongs to two LoRA pairs: ({shown[other.a]}, "
                    f"{shown[other.b]}) and ({shown[m.a]}, {shown[m.b]}). Make the "
                    "`pairs` rules unambiguous."
                )
            owner[i] = k
        built.append(_build_pair(m, leaves, shown))
    unpaired = tuple(i for i in range(len(leaves)) if i not in owner)
    return PairPlan(pairs=tuple(built), unpaired=unpaired, paths=tuple(shown))


def plan_pairs(paths: Sequence[Any], leaves: Sequence[Any], pairs: PairsLike) -> PairPlan:
    """Finds and validates the pairs among already-flattened leaves.

    A layout that does not fit (ranks, batch axes, an ambiguous layout) raises a
    ``ValueError`` that names the leaves and the presets that read the whole tree.
    """
    try:
        return _plan(paths, leaves, pairs)
    except (_LayoutMismatch, AmbiguousLayoutError) as err:
        fits = _fitting_presets(paths, leaves, pairs)
        hint = (
            " Presets that read the whole tree: " + "; ".join(fits) + "."
            if fits
            else " No preset reads the whole tree: describe its layout with a PairRule "
            "(FactorAxes or axes_from_shapes) or a callable."
        )
        cls = AmbiguousLayoutError if isinstance(err, AmbiguousLayoutError) else ValueError
        raise cls(str(err) + hint) from None


def find_lora_pairs(tree: Any, pairs: PairsLike = "auto") -> list[LoRAPair]:
    """Lists the LoRA factor pairs of a pytree.

    Pairs are found from key paths alone (a trailing Flax ``.value`` is ignored), so
    the same call works on params, gradients, ``jax.ShapeDtypeStruct`` trees and
    ``nnx.State``. Shapes and dtypes are then checked: both factors must have the same
    rank, batch shape and dtype.

    Args:
      tree: any pytree of arrays.
      pairs: ``"auto"`` (every preset: each pair gets the one reading that all the
        layouts that name it and fit its shapes agree on, so it finds what the
        library's own preset finds), a preset name from :data:`PRESETS`
        (``"flax"``, ``"peft"``, ``"gemma"``, ``"qwix"``, ``"maxtext"``,
        ``"maxtext_unscanned"``), :func:`peft_adapter` of one named adapter, a
        :class:`PairRule`, a sequence of them (a pair that several rules name
        gets their common reading, as under ``"auto"``), or a callable
        ``(path: tuple[str, ...], leaf) -> LoRAFactor | None``.

    Returns:
      One :class:`LoRAPair` per adapter, in leaf order.

    Raises:
      ValueError: a factor without its partner, a leaf in two pairs, or factors whose
        rank, batch shape or dtype disagree. The message names the leaf paths and
        the presets that read the whole tree. Finding no pair is an answer here
        (an empty list); the optimizers and :func:`lora_param_labels` raise on it
        instead.
      AmbiguousLayoutError: (a ``ValueError``) two layouts fit a pair's shapes and
        read them differently, e.g. MaxText's layer axis at 1 and a qwix einsum
        adapter; the message names both presets and the pair's leaves.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax import find_lora_pairs
      >>> params = {'q': {'lora_a': jnp.zeros((8, 2)), 'lora_b': jnp.zeros((2, 4))},
      ...           'bias': jnp.zeros(4)}
      >>> [(p.a_path, p.b_path, p.m, p.n, p.rank) for p in find_lora_pairs(params)]
      [("['q']['lora_a']", "['q']['lora_b']", 8, 4, 2)]
      >>> S = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)
      >>> tunix_o_proj = {'w_lora_a': S(4, 8, 2), 'w_lora_b': S(2, 32)}  # BTNH,NHD->BTD
      >>> [(p.m, p.n, p.rank) for p in find_lora_pairs(tunix_o_proj)]  # read as qwix's
      [(32, 32, 2)]
    """
    paths, leaves, _ = flatten_with_paths(tree)
    return list(plan_pairs(paths, leaves, pairs).pairs)


def _detection_off(pairs: PairsLike) -> bool:
    """``pairs=()``: no rules at all, i.e. pair detection turned off."""
    return isinstance(pairs, Sequence) and not isinstance(pairs, str) and len(pairs) == 0


def _shown_list(names: Sequence[str], limit: int = 8) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _fitting_presets(paths: Sequence[Any], leaves: Sequence[Any], pairs: PairsLike) -> list[str]:
    """The presets that read the whole tree and find pairs, those that read it alike
    grouped (``"pairs='qwix' finds 7 (pairs='maxtext_unscanned' reads it the same)"``)."""
    readings: dict[tuple[LoRAPair, ...], list[str]] = {}
    for preset in PRESETS:
        if preset == "auto" or (isinstance(pairs, str) and preset == pairs):
            continue
        try:
            found = _plan(paths, leaves, preset).pairs
        except ValueError:
            continue
        if found:
            readings.setdefault(found, []).append(f"pairs={preset!r}")
    out = []
    for found, names in readings.items():
        verb = "reads" if len(names) == 2 else "read"
        same = f" ({', '.join(names[1:])} {verb} it the same)" if len(names) > 1 else ""
        out.append(f"{names[0]} finds {len(found)}{same}")
    return out


def _preset_hint(paths: Sequence[Any], leaves: Sequence[Any], pairs: PairsLike) -> str:
    """Which presets would find pairs in this tree, as a sentence (or "")."""
    fits = _fitting_presets(paths, leaves, pairs)
    return (" Presets that find pairs here: " + "; ".join(fits) + ".") if fits else ""


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
        if _token_matches(joined_name(path_names(paths[i])), _DORA_MAGNITUDE)
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
