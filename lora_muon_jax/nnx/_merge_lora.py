"""Folding LoRA adapters into their base weights, for Flax NNX models and pytrees.

After fine-tuning, ``W = W₀ + c · a @ b`` is usually exported as one dense weight:
the adapters cost a second matmul per layer at inference, and serving stacks
expect plain checkpoints. The fold is done in float32 (then cast to the kernel's
dtype), so a bfloat16 model loses one rounding, not a bfloat16 matmul's worth.

The helpers here also locate the base weight of each adapter; the balanced
initialization of :mod:`lora_muon_jax.nnx._balanced_init` uses them.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from lora_muon_jax import _key_paths, _linalg, _pair_matching, _pair_types, _validation

# Maps the path of factor `a` (key names) to the path of its base weight, or None.
BasePath = Callable[[tuple[str, ...]], "tuple[str, ...] | None"]

_MERGE_FN = "merge_lora"


# ------------------------------------------------------------------------ base weights


def base_candidates(a_path: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Where the base weight of the adapter whose ``a`` sits at ``a_path`` may be.

    In order: a sibling ``kernel`` (linen modules, qwix ``kernel_lora_a``), the
    ``kernel`` of a sibling ``base_module`` (``nnx.LoRA(base_module=nnx.Linear)``),
    and, for factors inside a ``lora`` submodule, the ``kernel`` next to that
    submodule (``nnx.LoRALinear``, gemma ``peft``).
    """
    parent = a_path[:-1]
    out = [parent + ("kernel",), parent + ("base_module", "kernel")]
    if parent and parent[-1] == "lora":
        out.append(parent[:-1] + ("kernel",))
    return out


def find_bases(
    fn: str,
    names: Sequence[tuple[str, ...]],
    plan: _pair_types.PairPlan,
    base_path: BasePath | None,
) -> list[int | None]:
    """Index of each pair's base weight among the leaves, or ``None`` if it has none."""
    index = {n: i for i, n in enumerate(names)}
    out: list[int | None] = []
    for pair in plan.pairs:
        a_names = names[pair.a_index]
        if base_path is not None:
            want = base_path(a_names)
            if want is None:
                out.append(None)
                continue
            want = tuple(want)
            if want not in index:
                raise ValueError(
                    f"{fn}: `base_path` maps the LoRA pair at {pair.a_path} to "
                    f"{'/'.join(want)!r}, which is not a leaf of the tree."
                )
            out.append(index[want])
            continue
        out.append(next((index[c] for c in base_candidates(a_names) if c in index), None))
    return out


def _matrix_shape(pair: _pair_types.LoRAPair, role: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(shape[i] for i in pair._matrix_axes(role, len(shape)))


def product_shape(
    fn: str,
    pair: _pair_types.LoRAPair,
    kernel_shape: tuple[int, ...],
    kernel_where: str,
    a_shape: tuple[int, ...],
    b_shape: tuple[int, ...],
) -> tuple[int, ...]:
    """Checks that a base weight has the layout of ``a @ b``; returns that shape.

    The layout is ``(*batch, *a's matrix axes, *b's matrix axes)``, which is
    ``(*batch, m, n)`` for the usual ``(*batch, m, r)``, ``(*batch, r, n)`` factors.
    """
    want = (
        tuple(pair.batch_shape)
        + _matrix_shape(pair, "a", a_shape)
        + _matrix_shape(pair, "b", b_shape)
    )
    if tuple(kernel_shape) != want:
        raise ValueError(
            f"{fn}: the base weight at {kernel_where} has shape {tuple(kernel_shape)}, but "
            f"the LoRA pair a at {pair.a_path} (shape {a_shape}), b at {pair.b_path} "
            f"(shape {b_shape}) makes a product of shape {want} (batch axes, then a's and "
            "b's non-rank axes). Pass `base_path=` to point at the right weight, or check "
            "the factors' layout (`pairs=`)."
        )
    return want


@jax.jit
def fold_canonical(kernel: jax.Array, a: jax.Array, b: jax.Array, scale: jax.Array) -> jax.Array:
    """``kernel + scale · a @ b`` for ``(*batch, m, n)``, ``(*batch, m, r)``, ``(*batch, r, n)``.

    In float32 at full matmul precision, cast back to the kernel's dtype. Jitted:
    eagerly each op would compile on its own, once per layer shape.
    """
    delta = _linalg.mm(a.astype(jnp.float32), b.astype(jnp.float32))
    delta = delta * jnp.asarray(scale, jnp.float32)
    return (kernel.astype(jnp.float32) + delta).astype(kernel.dtype)


def fold(
    fn: str,
    pair: _pair_types.LoRAPair,
    kernel: jax.Array,
    kernel_where: str,
    a: jax.Array,
    b: jax.Array,
    scale: jax.typing.ArrayLike,
) -> jax.Array:
    """``kernel + scale · a @ b`` in float32, in the kernel's layout and dtype."""
    a, b, kernel = jnp.asarray(a), jnp.asarray(b), jnp.asarray(kernel)
    product_shape(fn, pair, kernel.shape, kernel_where, tuple(a.shape), tuple(b.shape))
    canon = (*pair.batch_shape, pair.m, pair.n)
    merged = fold_canonical(
        kernel.reshape(canon), pair.canonical(a, "a"), pair.canonical(b, "b"), scale
    )
    return merged.reshape(kernel.shape)


# ----------------------------------------------------------------------- pure trees


def _raw_key(key: Any) -> Any:
    if isinstance(key, jax.tree_util.DictKey):
        return key.key
    if isinstance(key, jax.tree_util.SequenceKey):
        return key.idx
    if isinstance(key, jax.tree_util.GetAttrKey):
        return key.name
    return key


def remove_leaves(fn: str, tree: Any, paths: Sequence[tuple[Any, ...]]) -> Any:
    """``tree`` without the leaves at ``paths`` (key paths), dropping emptied dicts.

    Only mappings (dict, ``FrozenDict``, ``nnx.State``) can lose entries; the
    containers are rebuilt with their own type and key order.
    """
    raw = [tuple(_raw_key(k) for k in _key_paths.normalized_path(p)) for p in paths]

    def go(node: Any, todo: list[tuple[Any, ...]], where: tuple[Any, ...]) -> Any:
        if not isinstance(node, Mapping):
            shown = "".join(f"[{k!r}]" for k in where) or "<root>"
            raise TypeError(
                f"{fn}: cannot remove LoRA factors from a {type(node).__name__} at {shown}; "
                "only nested dicts (dict, FrozenDict, nnx.State) can lose entries."
            )
        drop = {p[0] for p in todo if len(p) == 1}
        deeper: dict[Any, list[tuple[Any, ...]]] = {}
        for p in todo:
            if len(p) > 1:
                deeper.setdefault(p[0], []).append(p[1:])
        items = {}
        for k, v in node.items():
            if k in drop:
                continue
            if k in deeper:
                v = go(v, deeper[k], where + (k,))
                if isinstance(v, Mapping) and not v:  # e.g. nnx's emptied `lora` module
                    continue
            items[k] = v
        return type(node)(items)  # type: ignore[call-arg]  # a concrete Mapping subclass

    return go(tree, raw, ())


class PairsWithBases(NamedTuple):
    """A tree's leaves, its LoRA pairs and each pair's base weight (or ``None``)."""

    paths: list[Any]
    leaves: list[Any]
    treedef: Any
    plan: _pair_types.PairPlan
    names: list[tuple[str, ...]]
    bases: list[int | None]

    def tried(self, pair: _pair_types.LoRAPair) -> str:
        """The base paths looked for, for an error message."""
        return ", ".join("/".join(c) for c in base_candidates(self.names[pair.a_index]))


def pairs_with_bases(
    fn: str, tree: Any, pairs: _pair_types.PairsLike, base_path: BasePath | None
) -> PairsWithBases:
    """Flattens ``tree``, finds its pairs (at least one, or raises) and their bases."""
    paths, leaves, treedef = _key_paths.flatten_with_paths(tree)
    plan = _pair_matching.plan_pairs(paths, leaves, pairs)
    if not plan.pairs:
        raise ValueError(
            f"{fn}: found no LoRA pair in the tree (leaves: "
            f"{', '.join(plan.paths[:6]) or 'none'}{' ...' if len(plan.paths) > 6 else ''}). "
            "Pass `pairs=` if the factors have other names."
        )
    names = [_key_paths.path_names(p) for p in paths]
    bases = find_bases(fn, names, plan, base_path)
    return PairsWithBases(list(paths), list(leaves), treedef, plan, names, bases)


def _merge_tree(
    tree: Any, pairs: _pair_types.PairsLike, lora_scale: Any, base_path: BasePath | None
) -> Any:
    found = pairs_with_bases(_MERGE_FN, tree, pairs, base_path)
    paths, leaves, treedef, plan = found.paths, found.leaves, found.treedef, found.plan
    for pair, base in zip(plan.pairs, found.bases, strict=True):
        if base is None:
            raise ValueError(
                f"{_MERGE_FN}: no base weight for the LoRA pair at {pair.a_path}; tried "
                f"{found.tried(pair)}. Pass `base_path=` (a callable from a's path to the "
                "weight's path)."
            )
        leaves[base] = fold(
            _MERGE_FN,
            pair,
            leaves[base],
            plan.paths[base],
            leaves[pair.a_index],
            leaves[pair.b_index],
            lora_scale,
        )
    merged = jax.tree_util.tree_unflatten(treedef, leaves)
    drop = [paths[i] for pair in plan.pairs for i in (pair.a_index, pair.b_index)]
    return remove_leaves(_MERGE_FN, merged, drop)


# ------------------------------------------------------------------------ nnx models


def _child(node: Any, key: Any) -> Any:
    if isinstance(key, str) and hasattr(node, key) and not isinstance(node, Mapping):
        return getattr(node, key)
    return node[key]


def _set_child(node: Any, key: Any, value: Any) -> None:
    if isinstance(key, str) and isinstance(node, nnx.Module) and hasattr(node, key):
        setattr(node, key, value)
    else:
        node[key] = value


def _shown(path: tuple[Any, ...]) -> str:
    return "/".join(map(str, path)) or "<root>"


def _linear_like(mod: nnx.Linear) -> nnx.Linear:
    """An ``nnx.Linear`` with ``mod``'s settings and no arrays allocated."""
    accepted = inspect.signature(nnx.Linear.__init__).parameters
    skip = {"self", "in_features", "out_features", "rngs"}
    kwargs = {k: v for k, v in vars(mod).items() if k in accepted and k not in skip}
    return nnx.eval_shape(
        lambda: nnx.Linear(mod.in_features, mod.out_features, rngs=nnx.Rngs(0), **kwargs)
    )


def _fold_module(
    path: tuple[Any, ...], kernel: nnx.Variable, a: nnx.Variable, b: nnx.Variable, scale: Any
) -> None:
    """Folds ``c · a @ b`` into the ``kernel`` Variable in place (keeps its metadata)."""
    a_val, b_val, k_val = a.get_value(), b.get_value(), kernel.get_value()
    where = _shown(path)
    for x, name in ((a_val, "lora_a"), (b_val, "lora_b")):
        if x.ndim < 2:
            raise ValueError(f"{_MERGE_FN}: {name} of the adapter at {where} has shape {x.shape}.")
    pair = _pair_matching.find_lora_pairs({"lora_a": a_val, "lora_b": b_val}, "flax")[0]
    pair = dataclasses.replace(pair, a_path=f"{where}/lora_a", b_path=f"{where}/lora_b")
    kernel.set_value(fold(_MERGE_FN, pair, k_val, f"{where}/kernel", a_val, b_val, scale))


def _merge_model(model: nnx.Module, lora_scale: Any) -> nnx.Module:
    model = nnx.clone(model)
    modules = dict(nnx.iter_modules(model))
    replace: list[tuple[tuple[Any, ...], nnx.Module]] = []
    for path, mod in modules.items():
        if isinstance(mod, (nnx.LoRALinear, nnx.LoRA)) and type(mod) not in (
            nnx.LoRALinear,
            nnx.LoRA,
        ):
            raise ValueError(
                f"{_MERGE_FN}: the module at {_shown(path)} is a {type(mod).__name__}, a "
                "subclass of nnx.LoRALinear / nnx.LoRA whose forward pass merge_lora cannot "
                "know; fold its state with merge_lora(nnx.to_pure_dict(nnx.state(model))) "
                "and rebuild the module yourself."
            )
        if isinstance(mod, nnx.LoRALinear):
            _fold_module(path, mod.kernel, mod.lora.lora_a, mod.lora.lora_b, lora_scale)
            new = _linear_like(mod)
            new.kernel = mod.kernel
            new.bias = mod.bias
            replace.append((path, new))
        elif isinstance(mod, nnx.LoRA):
            parent = modules.get(path[:-1]) if path else None
            if isinstance(parent, nnx.LoRALinear) and path[-1] == "lora":
                continue  # folded with its LoRALinear
            base = mod.base_module
            if base is None:
                raise ValueError(
                    f"{_MERGE_FN}: the nnx.LoRA at {_shown(path)} has no base_module, so "
                    "there is no weight to fold its product into."
                )
            if not isinstance(base, nnx.Linear) or isinstance(base, nnx.LoRALinear):
                raise ValueError(
                    f"{_MERGE_FN}: the nnx.LoRA at {_shown(path)} wraps a "
                    f"{type(base).__name__}; only nnx.Linear bases can be merged (its output "
                    "is x @ kernel, so x @ a @ b folds into the kernel)."
                )
            _fold_module(path, base.kernel, mod.lora_a, mod.lora_b, lora_scale)
            replace.append((path, base))
    if not replace:
        raise ValueError(
            f"{_MERGE_FN}: the model has no nnx.LoRALinear and no nnx.LoRA with a base_module; "
            "nothing to merge."
        )
    root: nnx.Module = model
    for path, module in replace:
        if not path:
            root = module
            continue
        parent = model
        for key in path[:-1]:
            parent = _child(parent, key)
        _set_child(parent, path[-1], module)
    left = [
        _key_paths.path_str(p)
        for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(root, nnx.LoRAParam))[0]
    ]
    if left:
        raise ValueError(
            f"{_MERGE_FN}: LoRA parameters outside nnx.LoRALinear / nnx.LoRA modules remain "
            f"at {', '.join(left)}; merge them with merge_lora(nnx.state(model), ...) and your "
            "own module surgery."
        )
    return root


# ----------------------------------------------------------------------- public API


def merge_lora(
    model_or_params: Any,
    *,
    pairs: _pair_types.PairsLike = "auto",
    lora_scale: jax.typing.ArrayLike = 1.0,
    base_path: BasePath | None = None,
) -> Any:
    r"""Folds every LoRA adapter into its base weight and removes the adapters.

    .. math::

      W \leftarrow \operatorname{cast}_{W}\big(W_{f32} + c \cdot a_{f32}\, b_{f32}\big)

    computed in float32 at full matmul precision and cast back to the kernel's
    dtype. The input is not modified.

    * **Flax NNX model**: every ``nnx.LoRALinear`` becomes an ``nnx.Linear`` with
      the same settings, bias and kernel metadata; every
      ``nnx.LoRA(base_module=nnx.Linear(...))`` is replaced by its (merged) base
      module. Stacked layers (``nnx.vmap``) merge layer by layer. Flax's LoRA has
      no scale, so keep ``lora_scale=1``.
    * **Pytree** (linen params, ``nnx.State``, plain dicts): each pair's base weight
      is found next to it (a sibling ``kernel``; ``base_module/kernel``; the
      ``kernel`` beside a ``lora`` submodule) or by ``base_path``; it must be laid
      out ``(*batch, m, n)`` like ``a @ b``. Factor leaves are removed, and
      dicts left empty (nnx's ``lora``) too, so the result fits the plain layer.

    Args:
      model_or_params: an ``nnx.Module`` or a pytree of nested dicts.
      pairs: how to find pairs in a pytree; see :func:`find_lora_pairs`.
      lora_scale: :math:`c` in ``W = W₀ + c · a @ b`` (PEFT's ``alpha / r``).
      base_path: pytrees only: a callable from the path of ``a`` (a tuple of key
        names) to the path of its base weight.

    Returns:
      The merged model (a new object) or pytree.

    Raises:
      ValueError: no adapter found; a pair without base weight; a base weight
        whose shape is not that of ``a @ b``; an ``nnx.LoRA`` without a linear
        base; subclasses of ``nnx.LoRALinear`` / ``nnx.LoRA`` (their forward pass
        is unknown); LoRA parameters in modules it cannot rewrite. Messages name
        paths.
      TypeError: factors held in a container that is not a mapping.

    Examples:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> from lora_muon_jax.nnx import merge_lora
      >>> layer = nnx.LoRALinear(3, 2, lora_rank=1, rngs=nnx.Rngs(0))
      >>> layer.lora.lora_b[...] = jnp.ones((1, 2))
      >>> merged = merge_lora(layer)
      >>> type(merged).__name__
      'Linear'
      >>> x = jnp.ones((4, 3))
      >>> print(float(jnp.max(jnp.abs(merged(x) - layer(x)))) < 1e-5)
      True
      >>> params = {'kernel': jnp.zeros((3, 2)), 'lora_a': jnp.ones((3, 1)),
      ...           'lora_b': jnp.ones((1, 2))}
      >>> merge_lora(params, lora_scale=0.5)
      {'kernel': Array([[0.5, 0.5],
             [0.5, 0.5],
             [0.5, 0.5]], dtype=float32)}

    References:
      Hu et al., `LoRA: Low-Rank Adaptation of Large Language Models
      <https://arxiv.org/abs/2106.09685>`_, 2021
    """
    _validation.check_scalar("lora_scale", lora_scale, fn=_MERGE_FN)
    if isinstance(model_or_params, nnx.Module):
        if pairs != "auto" or base_path is not None:
            raise ValueError(
                f"{_MERGE_FN}: `pairs` and `base_path` apply to pytrees; an nnx model is "
                "merged by module type (nnx.LoRALinear, nnx.LoRA with a base_module)."
            )
        return _merge_model(model_or_params, lora_scale)
    return _merge_tree(model_or_params, pairs, lora_scale, base_path)
