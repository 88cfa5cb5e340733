"""The types of LoRA pair discovery: factor axes, rules, found pairs, and the layout error.

An adapter writes a weight update as ``ΔW = c · a @ b`` with ``a: (..., m, r)`` and
``b: (..., r, n)``. :class:`FactorAxes` says where one factor's rank and batch axes
are, :class:`PairRule` names two sibling leaves as ``a`` and ``b``,
:class:`LoRAFactor` is what a user's ``pairs`` callable returns for one leaf, and
:class:`LoRAPair` is one adapter found in a tree, its layout resolved against the
leaf shapes (with the moves to and from ``(*batch, m, r)`` / ``(*batch, r, n)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal, NamedTuple, TypeAlias

import jax

__all__ = [
    "AmbiguousLayoutError",
    "FactorAxes",
    "FactorLayout",
    "LoRAFactor",
    "LoRAPair",
    "PairRule",
    "PairsLike",
]


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
