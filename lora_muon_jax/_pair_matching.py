"""Pair matching: which leaves of a pytree are the two factors of an adapter.

Optimizers that act on the pair (LoRA-Muon and its peers) need to know, for every
leaf, whether it is the left factor ``a``, the right factor ``b`` or neither, and
where its rank, matrix and batch axes are. Everything here is static: it reads only
paths, shapes and dtypes, so it runs at trace time on params, updates,
``jax.ShapeDtypeStruct`` trees and Flax ``nnx.State`` trees alike.

``pairs="auto"`` tries every preset's layout on every pair and takes the reading
that all the layouts that fit agree on; where two fit and disagree it raises
:class:`AmbiguousLayoutError` rather than guess.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Hashable, Sequence
from typing import Any, NamedTuple

import jax

from lora_muon_jax._key_paths import (
    flatten_with_paths,
    joined_name,
    path_names,
    path_str,
    token_matches,
)
from lora_muon_jax._pair_presets import PRESETS
from lora_muon_jax._pair_types import (
    A_AXES,
    B_AXES,
    AmbiguousLayoutError,
    AxesFn,
    FactorAxes,
    LoRAFactor,
    LoRAPair,
    PairFn,
    PairPlan,
    PairRule,
    PairsLike,
)

__all__ = ["find_lora_pairs"]


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
    keys = [pre + other + post for pre, post in token_matches(joined_name(name), own)]
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
        try:
            return _read_pair(m, m.readings[0], leaves, shown, what)
        except _LayoutMismatch as err:
            raise _LayoutMismatch(f"{err}{_transposed_hint(m, leaves)}") from None
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
    short = [
        f"{_layout_name(r)}: "
        + str(e).removeprefix(f"LoRA layout of {what}: ").replace(what, "the factors").rstrip(".")
        for r, e in others
    ]
    raise _LayoutMismatch(
        f"{first} No layout that names these leaves fits them ({_layout_name(misfits[0][0])} "
        f"above; {'; '.join(short)}).{_transposed_hint(m, leaves)}"
    )


def _transposed_hint(m: _Match, leaves: list[Any]) -> str:
    """The PairRule for factors stored transposed (``a: r×m``, ``b: n×r``), if they are."""
    xa, xb = leaves[m.a].shape, leaves[m.b].shape
    rule = next((r.rule for r in m.readings if isinstance(r.rule, PairRule)), None)
    fits = len(xa) >= 2 and len(xb) >= 2 and xa[:-2] == xb[:-2] and xa[-2] == xb[-1]
    if rule is None or not fits:
        return ""
    return (
        f" They fit the transposed layout (a: r×m, b: n×r, as torch stores LoRA "
        f"weights), read by `pairs=PairRule(a={rule.a!r}, b={rule.b!r}, "
        "a_axes=FactorAxes(rank_axis=-2), b_axes=FactorAxes(rank_axis=-1))`."
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
        fits = fitting_presets(paths, leaves, pairs)
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


def fitting_presets(paths: Sequence[Any], leaves: Sequence[Any], pairs: PairsLike) -> list[str]:
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
