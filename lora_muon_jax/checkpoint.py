"""Orbax checkpoints of params and optimizer state, with tree mismatches named by path.

Orbax restores a LoRA-Muon state as is: params, momenta (including bfloat16
``mu_dtype``), counters, and ``nnx.Optimizer`` state, so a resumed run is bit
for bit the uninterrupted one. Two orbax behaviours bite when the target tree is
not the saved one: a shape mismatch is reported without the leaf's path, and a
dtype mismatch is not reported at all (the stored array is cast, e.g. a
bfloat16 momentum silently becomes float32). :func:`restore_checkpoint` compares
the checkpoint's metadata with the target first and raises one error listing
every differing path.

A damaged checkpoint (a save or copy cut short: a missing or truncated file)
makes orbax fail deep inside TensorStore, with the JSON spec of the store and
without the leaf's name, or, for the tree metadata, not at all (it logs a
warning and reports an empty tree). Here both raise one :class:`CheckpointError`
naming the checkpoint, the leaf or index file being read and what TensorStore
found wrong. The OCDBT index (``manifest.ocdbt`` and its B-tree) is listed once
before orbax reads anything, so a damaged index is one error, not a burst of
failed concurrent reads.

Requires ``orbax-checkpoint`` (imported on first use).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import jax

__all__ = [
    "CheckpointError",
    "check_checkpoint",
    "restore_checkpoint",
    "save_checkpoint",
]

_LISTED = 10
# TensorStore's status codes for data that is not there or not whole.
_DAMAGE = re.compile(r"\b(DATA_LOSS|OUT_OF_RANGE|NOT_FOUND|FAILED_PRECONDITION): ")
# The stored key TensorStore was reading: "<leaf>/.zarray" or "<leaf>/<chunk>".
_KEY = re.compile(r'(?:Error reading|Metadata at) "([^"]+?)/(?:\.z\w+|[\d.]+)"')
_SPEC = re.compile(r"\s*\[tensorstore_spec=.*", re.S)


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored into the target: damaged or another tree.

    The message names the checkpoint directory and every leaf path concerned:
    stored vs target shape and dtype, paths on one side only, or the leaf whose
    bytes are missing or cut short (and TensorStore's account of it).

    Examples:
      >>> import tempfile, os, jax.numpy as jnp
      >>> from lora_muon_jax.checkpoint import CheckpointError, save_checkpoint, check_checkpoint
      >>> path = os.path.join(tempfile.mkdtemp(), 'ckpt')
      >>> save_checkpoint(path, {'w': jnp.ones(3)})
      >>> os.remove(os.path.join(path, '_METADATA'))  # a copy that lost a file
      >>> try:
      ...   check_checkpoint(path, {'w': jnp.ones(3)})
      ... except CheckpointError as e:
      ...   print(str(e).splitlines()[0].split(': ')[1])
      reading its tree metadata failed.
    """


def _orbax() -> Any:
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "lora_muon_jax.checkpoint needs orbax-checkpoint: `pip install orbax-checkpoint`."
        ) from e
    return ocp


def _dotted(path: Any) -> str:
    # Orbax names stored arrays by their key path joined with dots.
    return jax.tree_util.keystr(path, simple=True, separator=".")


def _is_array_meta(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def _chain(error: BaseException) -> list[BaseException]:
    out: list[BaseException] = []
    e: BaseException | None = error
    while e is not None and e not in out:
        out.append(e)
        e = e.__cause__ or e.__context__
    return out


def _is_damage(error: BaseException) -> bool:
    """Whether TensorStore said, somewhere in the chain, that stored bytes are bad."""
    return any(_DAMAGE.search(str(e)) for e in _chain(error))


def _damage(directory: str, what: str, error: BaseException) -> CheckpointError:
    """One readable error for a checkpoint whose files are missing or cut short."""
    found = [str(e) for e in _chain(error) if _DAMAGE.search(str(e))]
    detail = _SPEC.sub("", found[-1] if found else f"{type(error).__name__}: {error}")
    keys = sorted({k for text in found for k in _KEY.findall(text)})
    leaf = f" (leaf {', '.join(keys)})" if keys else ""
    return CheckpointError(
        f"The checkpoint at {directory} is damaged or incomplete: reading {what} "
        f"failed{leaf}.\n  {detail[:600]}\nA file in it is missing or shorter than "
        "its index says: a save or a copy that did not finish? Restore an earlier "
        "checkpoint, or copy this one again."
    )


def _unfinished_saves(directory: Path) -> list[str]:
    # Orbax writes into "<name>.orbax-checkpoint-tmp..." and renames when done.
    parent = directory.parent
    if not parent.is_dir():
        return []
    return sorted(str(p) for p in parent.glob(f"{directory.name}.orbax-checkpoint-tmp*"))


def _check_index(directory: str) -> None:
    """Reads the OCDBT index (orbax's default layout) in one synchronous listing.

    Orbax reads every leaf's metadata concurrently; when the index itself is damaged
    they all fail, and the reads still in flight print "Event loop is closed"
    tracebacks after the first error. One listing finds the same damage first.
    """
    root = Path(directory)
    if not (root / "manifest.ocdbt").exists():
        if any(root.glob("ocdbt.process_*")):  # OCDBT data without its root manifest
            raise CheckpointError(
                f"The checkpoint at {directory} is damaged or incomplete: reading its "
                f"array index failed.\n  {root / 'manifest.ocdbt'} is missing.\n"
                "Restore an earlier checkpoint, or copy this one again."
            )
        return  # not OCDBT: orbax reads it file by file
    import tensorstore as ts  # an orbax dependency

    base = {"driver": "file", "path": os.path.abspath(directory) + os.sep}
    try:
        keys = ts.KvStore.open({"driver": "ocdbt", "base": base}).result().list().result()
    except ValueError as e:
        raise _damage(directory, "its array index", e) from e
    if not keys:
        raise CheckpointError(
            f"The checkpoint at {directory} is damaged or incomplete: its array index "
            f"({root / 'manifest.ocdbt'}) lists no arrays.\nRestore an earlier "
            "checkpoint, or copy this one again."
        )


def _stored(directory: str) -> dict[str, tuple[tuple[int, ...], Any]]:
    if not os.path.isdir(directory):
        partial = _unfinished_saves(Path(directory).absolute())
        hint = (
            f" Only an unfinished save is there: {partial} (the saving process "
            "stopped before it completed)."
            if partial
            else ""
        )
        raise FileNotFoundError(f"No checkpoint at {directory}: not a directory.{hint}")
    ocp = _orbax()
    from etils import epath  # an orbax dependency

    _check_index(directory)
    handler = ocp.StandardCheckpointHandler()
    try:
        # The handler, not StandardCheckpointer.metadata, which turns an unreadable
        # tree into a logged warning and an empty tree ("every leaf missing").
        meta = handler.metadata(epath.Path(os.path.abspath(directory)))
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise _damage(directory, "its tree metadata", e) from e
    finally:
        handler.close()
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
      CheckpointError: (a :class:`ValueError`) listing every path missing from the
        checkpoint, present only in it, or stored with another shape or dtype; or
        naming the file or leaf of a damaged checkpoint whose tree metadata cannot
        be read.
      FileNotFoundError: no directory at ``directory`` (an unfinished save next to
        it is named).

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
        raise CheckpointError(
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
      CheckpointError: the tree differs (see :func:`check_checkpoint`), or the
        checkpoint is damaged: an array file missing or cut short. The message
        names the leaf and what TensorStore found (e.g. a byte range past the end
        of a truncated file).
      FileNotFoundError: no checkpoint at ``directory``.

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
    try:
        return ocp.StandardCheckpointer().restore(os.path.abspath(os.fspath(directory)), target)
    except Exception as e:  # TensorStore read errors arrive as a bare Exception
        if not _is_damage(e):
            raise
        raise _damage(os.fspath(directory), "the stored arrays", e) from e
