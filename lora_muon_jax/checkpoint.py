"""Orbax checkpoints of params and optimizer state, with tree mismatches named by path.

Orbax restores a LoRA-Muon state as is: params, momenta (including bfloat16
``mu_dtype``), counters, and ``nnx.Optimizer`` state, so a resumed run is bit
for bit the uninterrupted one. Two orbax behaviours bite when the target tree is
not the saved one: a shape mismatch is reported without the leaf's path, and a
dtype mismatch is not reported at all (the stored array is cast, e.g. a
bfloat16 momentum silently becomes float32). :func:`restore_checkpoint` compares
the checkpoint's metadata with the target first and raises one error listing
every differing path.

Requires ``orbax-checkpoint`` (imported on first use).
"""

from __future__ import annotations

import os
from typing import Any

import jax

__all__ = ["check_checkpoint", "restore_checkpoint", "save_checkpoint"]

_LISTED = 10


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lora_muon_jax.checkpoint needs orbax-checkpoint: `pip install orbax-checkpoint`."
        ) from e
    return ocp


def _key(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _dotted(path: Any) -> str:
    # Orbax names stored arrays by their key path joined with dots.
    return ".".join(_key(k) for k in path)


def _is_array_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _stored(directory: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    ocp = _orbax()
    meta = ocp.StandardCheckpointer().metadata(os.fspath(directory))
    tree = getattr(meta, "item_metadata", meta)
    tree = getattr(tree, "tree", tree)
    flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_array_meta)
    return {_dotted(p): (tuple(x.shape), x.dtype) for p, x in flat if _is_array_meta(x)}


def _wanted(target: Any) -> dict[str, tuple[tuple[int, ...], Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(target)
    return {_dotted(p): (tuple(x.shape), x.dtype) for p, x in flat if _is_array_meta(x)}


def _listed(items: list[str]) -> str:
    more = f"\n    ... and {len(items) - _LISTED} more" if len(items) > _LISTED else ""
    return "".join(f"\n    {s}" for s in items[:_LISTED]) + more


def check_checkpoint(
    directory: str | os.PathLike, target: Any, *, allow_cast: bool = False
) -> None:
    """Raises if the checkpoint at ``directory`` does not have ``target``'s tree.

    Compares paths (orbax's dotted names, e.g. ``opt_state.inner_states.lora_muon.
    inner_state.0.mu.layer.lora_a``), shapes and, unless ``allow_cast``, dtypes.

    Args:
      directory: a checkpoint written by :func:`save_checkpoint` (or orbax's
        ``StandardCheckpointer``).
      target: a pytree of arrays or ``jax.ShapeDtypeStruct`` (e.g.
        ``jax.eval_shape`` of the init, or an ``nnx.State``).
      allow_cast: accept stored arrays of another dtype (orbax casts them).

    Raises:
      ValueError: listing every path missing from the checkpoint, present only in
        it, or stored with another shape or dtype.

    Examples:
      >>> import tempfile, os, jax.numpy as jnp
      >>> from lora_muon_jax.checkpoint import save_checkpoint, check_checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
      >>> save_checkpoint(path, {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))})
      >>> try:
      ...   check_checkpoint(path, {'lora_a': jnp.ones((4, 3)), 'lora_b': jnp.ones((3, 3))})
      ... except ValueError as e:
      ...   print(str(e).splitlines()[1:3])
      ['  shape differs:', '    lora_a: stored (4, 2), target (4, 3)']
    """
    stored, wanted = _stored(os.fspath(directory)), _wanted(target)
    missing = [f"{p}: {s} {d}" for p, (s, d) in wanted.items() if p not in stored]
    extra = [f"{p}: {s} {d}" for p, (s, d) in stored.items() if p not in wanted]
    shape = [
        f"{p}: stored {stored[p][0]}, target {s}"
        for p, (s, _) in wanted.items()
        if p in stored and stored[p][0] != s
    ]
    dtype = [
        f"{p}: stored {stored[p][1]}, target {d}"
        for p, (_, d) in wanted.items()
        if p in stored and str(stored[p][1]) != str(d) and not allow_cast
    ]
    parts = [
        (title, items)
        for title, items in (
            ("shape differs", shape),
            ("dtype differs (orbax would cast silently; pass allow_cast=True to accept)", dtype),
            ("missing from the checkpoint", missing),
            ("only in the checkpoint", extra),
        )
        if items
    ]
    if parts:
        raise ValueError(
            f"The checkpoint at {os.fspath(directory)} does not match the target tree:"
            + "".join(f"\n  {title}:{_listed(items)}" for title, items in parts)
            + "\nWas it written by a different model or optimizer (rank, layers, "
            "mu_dtype, wrapped transformations)?"
        )


def save_checkpoint(directory: str | os.PathLike, tree: Any, *, force: bool = False) -> None:
    """Writes ``tree`` (params, optimizer state, ``nnx.State``...) and waits for it.

    Args:
      directory: a path that does not exist yet (or ``force=True``).
      tree: any pytree of arrays.
      force: overwrite an existing checkpoint.
    """
    ocp = _orbax()
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(os.path.abspath(os.fspath(directory)), tree, force=force)
    checkpointer.wait_until_finished()


def restore_checkpoint(
    directory: str | os.PathLike, target: Any, *, allow_cast: bool = False
) -> Any:
    """Restores a checkpoint into ``target``'s tree after :func:`check_checkpoint`.

    Args:
      directory: the checkpoint.
      target: the tree to restore into (arrays or ``jax.ShapeDtypeStruct``;
        their shardings are used).
      allow_cast: accept stored arrays of another dtype.

    Returns:
      A tree like ``target`` holding the stored values.

    Raises:
      ValueError: see :func:`check_checkpoint`.

    Examples:
      >>> import tempfile, os, jax, jax.numpy as jnp
      >>> from lora_muon_jax import lora_muon
      >>> from lora_muon_jax.checkpoint import save_checkpoint, restore_checkpoint
      >>> params = {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.zeros((2, 3))}
      >>> tx = lora_muon(0.1, mu_dtype='bfloat16')
      >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
      >>> save_checkpoint(path, {'params': params, 'opt_state': tx.init(params)})
      >>> target = jax.eval_shape(lambda: {'params': params, 'opt_state': tx.init(params)})
      >>> restored = restore_checkpoint(path, target)
      >>> muon_state = restored['opt_state'].inner_states['lora_muon'].inner_state[0]
      >>> muon_state.mu['lora_a'].dtype
      dtype(bfloat16)
    """
    check_checkpoint(directory, target, allow_cast=allow_cast)
    ocp = _orbax()
    return ocp.StandardCheckpointer().restore(os.path.abspath(os.fspath(directory)), target)
