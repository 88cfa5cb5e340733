"""Argument checks and error messages shared by every transformation."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lora_muon_jax import _key_paths, _pair_types

NEEDS_PARAMS = (
    "{name} needs the current parameters: call `update(updates, state, params)`. "
    "LoRA updates depend on both factors of each pair (optax.apply_updates alone "
    "cannot supply them); `nnx.Optimizer` and `TrainState.apply_gradients` pass "
    "params automatically."
)


def concrete_float(value: Any) -> float | None:
    """``float(value)`` if it is known at trace time, else ``None`` (traced)."""
    if callable(value):
        return None
    try:
        arr = np.asarray(value)
    except (TypeError, jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None
    if arr.ndim != 0:
        return None
    try:
        return float(arr)
    except (TypeError, ValueError):
        return None


def check_scalar(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
    fn: str,
) -> None:
    """Raises ``ValueError`` if a concrete hyperparameter is non-finite or out of range.

    Traced values (under ``jit`` or ``inject_hyperparams``) and schedules are not
    checked here; they cannot be read at trace time.
    """
    v = concrete_float(value)
    if v is None:
        return
    if not math.isfinite(v):
        raise ValueError(f"{fn}: `{name}` must be finite; got {value!r}.")
    bad_low = low is not None and (v < low if low_inclusive else v <= low)
    bad_high = high is not None and (v > high if high_inclusive else v >= high)
    if bad_low or bad_high:
        lo = "" if low is None else f"{low} {'<=' if low_inclusive else '<'} "
        hi = "" if high is None else f" {'<=' if high_inclusive else '<'} {high}"
        raise ValueError(f"{fn}: `{name}` must satisfy {lo}{name}{hi}; got {value!r}.")


def params_leaves(fn: str, updates_paths: list[Any], params: Any) -> list[Any]:
    """Leaves of ``params`` in the order of the updates' leaves, checked by path.

    Paths are compared with a trailing Flax ``.value`` removed, so Variable-wrapped
    params match pure updates.
    """
    if params is None:
        raise ValueError(NEEDS_PARAMS.format(name=fn))
    p_paths, p_leaves, _ = _key_paths.flatten_with_paths(params)
    want = [_key_paths.normalized_path(p) for p in updates_paths]
    have = [_key_paths.normalized_path(p) for p in p_paths]
    if want != have:
        missing = sorted(set(map(_key_paths.path_str, want)) - set(map(_key_paths.path_str, have)))
        extra = sorted(set(map(_key_paths.path_str, have)) - set(map(_key_paths.path_str, want)))
        raise ValueError(
            f"{fn}: `params` and `updates` have different trees. Missing in params: "
            f"{missing or 'none'}; only in params: {extra or 'none'}."
            + ("" if missing or extra else " (same paths in a different order)")
        )
    return p_leaves


def require_all_paired(fn: str, plan: _pair_types.PairPlan) -> None:
    """Raises if a leaf handed to a pair-only transformation is in no pair."""
    if plan.unpaired:
        names = shown([plan.paths[i] for i in plan.unpaired])
        raise ValueError(
            f"{fn} only updates LoRA factor pairs, but these leaves are in no pair: "
            f"{names}. Use the alias (e.g. `lora_muon`), which sends other leaves to "
            "AdamW, or wrap with `optax.partition(..., lora_param_labels())`."
        )


def leaf_dtype(x: Any) -> np.dtype:
    """The dtype of an array, tracer, ``jax.ShapeDtypeStruct`` or Python scalar leaf."""
    dtype = getattr(x, "dtype", None)
    return np.dtype(dtype) if dtype is not None else np.asarray(x).dtype


def check_float_leaves(
    fn: str, names: Sequence[str], leaves: Sequence[Any], tree: str | None = "params"
) -> None:
    """Raises ``TypeError`` naming every leaf that is complex or not floating point.

    The LoRA and matrix rules of this package are real-valued: a complex leaf would
    silently lose its imaginary part (in the first ``astype(float32)``), and an
    integer or boolean leaf has no meaningful step. Every transformation calls this
    on the leaves its own rule takes (pair factors, or matrices for the dense
    peers), in ``init`` and in ``update``; leaves routed to the AdamW fallback are
    not checked (:func:`optax.adamw` handles complex leaves). Reads dtypes only.

    Args:
      fn: the transformation, named first in the message.
      names: readable paths of ``leaves``, e.g. ``"['layer']['lora_a']"``.
      leaves: the leaves to check (arrays, tracers or ``jax.ShapeDtypeStruct``).
      tree: which tree they come from (``"params"`` or ``"updates"``), or ``None``
        for plain array arguments.

    Raises:
      TypeError: a complex leaf (the message says "complex"), else an integer,
        boolean or other non-floating-point leaf; each is named with its dtype.
    """
    complex_: list[str] = []
    other: list[str] = []
    for name, x in zip(names, leaves, strict=True):
        dtype = leaf_dtype(x)
        if jnp.issubdtype(dtype, jnp.complexfloating):
            complex_.append(f"leaf {name} is {dtype}")
        elif not jnp.issubdtype(dtype, jnp.floating):
            other.append(f"leaf {name} is {dtype}")
    if complex_:
        where = "" if tree is None else f" (in `{tree}`)"
        raise TypeError(
            f"{fn}: complex adapters are not supported{where}: {shown(complex_)}. "
            "The LoRA and matrix rules here are real-valued and would silently drop the "
            "imaginary part; keep real and imaginary parts as separate real leaves, or "
            "send these leaves to another transformation with `optax.partition`."
        )
    if other:
        where = "" if tree is None else f" in `{tree}`,"
        raise TypeError(
            f"{fn}: LoRA factors and optimized matrices must be floating point "
            f"(float16, bfloat16, float32 or float64), but{where} {shown(other)}. "
            "Integer and boolean leaves cannot be optimized: cast them to a float "
            "dtype, or keep them out with `optax.partition` (e.g. to "
            "`optax.set_to_zero()`) or `optax.masked`."
        )


def shown(items: Sequence[str]) -> str:
    """The first 8 of ``items``, comma-separated, and how many more there are."""
    return ", ".join(items[:8]) + (f" and {len(items) - 8} more" if len(items) > 8 else "")


def float_dtype(fn: str, name: str, dtype: Any) -> np.dtype | None:
    """A state-dtype argument as a real float dtype; ``None`` stays ``None`` (each param's).

    Args:
      fn: the transformation, named in the errors.
      name: the argument (``"mu_dtype"``, ``"state_dtype"``).
      dtype: a dtype, its name, or ``None``.

    Returns:
      The dtype, or ``None`` (``jnp.dtype(None)`` would be float64).

    Raises:
      TypeError: ``dtype`` names no dtype.
      ValueError: ``dtype`` is not a real floating-point dtype (an integer state
        would round the moments away; a complex one would be cast back to real).
    """
    if dtype is None:
        return None
    try:
        out = jnp.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"{fn}: `{name}` must name a dtype; got {dtype!r}.") from err
    if not jnp.issubdtype(out, jnp.floating):
        raise ValueError(f"{fn}: `{name}` must be a real float dtype; got {dtype!r}.")
    return out


def check_static_int(fn: str, name: str, value: Any, low: int = 1) -> int:
    """``value`` as a Python int ``>= low``: it sets shapes or loop lengths, so it is static."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(
            f"{fn}: `{name}` must be a Python int (it sets array shapes or loop "
            f"lengths); got {value!r}. Under `optax.inject_hyperparams` list it in "
            f"`static_args=('{name}',)`."
        )
    if value < low:
        raise ValueError(f"{fn}: `{name}` must be >= {low}; got {value!r}.")
    return value


def check_choice(fn: str, name: str, value: Any, choices: Sequence[str]) -> None:
    """Raises ``ValueError`` listing the valid options when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{fn}: `{name}` must be one of {list(choices)}; got {value!r}.")
