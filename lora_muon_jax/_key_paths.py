"""Key paths: reading a pytree's leaf paths as names, for matching and for messages.

A trailing Flax ``.value`` is dropped everywhere, so params, updates,
``jax.ShapeDtypeStruct`` trees and Flax ``nnx.State`` trees give the same paths.
Factor names are matched as tokens of the whole path joined with dots, so nested
dicts and flat dicts with dotted keys (a PEFT state dict such as
``…q_proj.lora_A.default.weight``) are read the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax

# Characters that may separate a factor name from the rest of a key, so that
# `kernel_lora_a` (qwix), `lora_a.kernel` (MaxText) and `q.lora_A.weight` (flat PEFT
# names) all contain the token `lora_a` / `lora_A`, while `lora_alpha` does not.
_SEPARATORS = "._-/:"


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


def joined_name(name: Sequence[str]) -> str:
    """A key path as one dotted string (``/`` read as ``.``), for token matching."""
    return ".".join(name).replace("/", ".")


def token_matches(key: str, token: str) -> list[tuple[str, str]]:
    """All ways of writing ``key`` as ``pre + token + post`` on token boundaries."""
    out = []
    start = key.find(token)
    while start >= 0:
        pre, post = key[:start], key[start + len(token) :]
        if (not pre or pre[-1] in _SEPARATORS) and (not post or post[0] in _SEPARATORS):
            out.append((pre, post))
        start = key.find(token, start + 1)
    return out
