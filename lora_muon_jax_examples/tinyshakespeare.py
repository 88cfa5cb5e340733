"""TinyShakespeare for the examples: a checksummed loader and a character tokenizer.

The corpus (about 1.1 MB of plain text, the ``input.txt`` of Karpathy's char-rnn) is
never shipped with the package. :func:`load_tinyshakespeare` finds it on disk or
downloads it once into a per-user cache, checking its SHA-256 every time it is read.
:class:`CharTokenizer`, :func:`split_train_val` and :func:`sample_batch` turn it into
next-character prediction batches, deterministically from a PRNG key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "DATA_ENV_VAR",
    "DataUnavailableError",
    "TINYSHAKESPEARE_SHA256",
    "TINYSHAKESPEARE_URL",
    "CharTokenizer",
    "default_cache_dir",
    "load_tinyshakespeare",
    "load_tinyshakespeare_or_exit",
    "sample_batch",
    "split_train_val",
]

TINYSHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
DATA_ENV_VAR = "LORA_MUON_JAX_DATA"
# Names tried inside a data directory: ours (also the cache's), then char-rnn's.
_FILENAMES = ("tinyshakespeare.txt", "input.txt")
_CACHE_NAME = _FILENAMES[0]
_TIMEOUT_S = 60.0
# What a download that never reached the file raises: no network, DNS, refused or
# reset connections, HTTP errors (URLError covers HTTPError) and timeouts.
_NETWORK_ERRORS = (urllib.error.URLError, ConnectionError, TimeoutError)


class DataUnavailableError(FileNotFoundError):
    """The corpus is nowhere on disk and could not be downloaded.

    The message says every way to provide it: ``--data`` (the examples' flag) or
    ``path=``, ``$LORA_MUON_JAX_DATA``, and the cache file that a download would
    have written. A :class:`FileNotFoundError`, so code that treats a missing corpus
    as "skip" keeps working offline.

    Examples:
      >>> import tempfile
      >>> from lora_muon_jax_examples.tinyshakespeare import (
      ...     DataUnavailableError, load_tinyshakespeare)
      >>> try:
      ...     load_tinyshakespeare(tempfile.mkdtemp())  # an empty directory
      ... except DataUnavailableError as e:
      ...     print(isinstance(e, FileNotFoundError), "`--data`" in str(e))
      True True
    """


def _how_to_provide(cached: Path, sha256: str | None) -> str:
    digest = f" (sha256 {sha256})" if sha256 is not None else ""
    return (
        f"Get it from {TINYSHAKESPEARE_URL}{digest} on a machine with network "
        "access, then either pass its file or directory with `--data` (the "
        f"examples) or `path=` (Python), or set ${DATA_ENV_VAR} to it, or copy it "
        f"to the cache, {str(cached)!r}."
    )


def default_cache_dir() -> Path:
    """The download cache, ``$XDG_CACHE_HOME/lora_muon_jax`` or ``~/.cache/...``."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "lora_muon_jax"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _read_verified(path: Path, sha256: str | None, origin: str) -> str:
    if sha256 is not None:
        got = _sha256(path)
        if got != sha256:
            raise ValueError(
                f"TinyShakespeare at {str(path)!r} (from {origin}) is corrupt or a "
                f"different file: its sha256 is {got}, expected {sha256}. Replace or "
                "delete it (a deleted cache file is downloaded again from "
                f"{TINYSHAKESPEARE_URL})."
            )
    return path.read_text(encoding="utf-8")


def _in_dir_or_file(location: Path) -> tuple[Path | None, list[str]]:
    """The corpus at ``location`` (a file, or a directory holding one) and the tries."""
    if location.is_dir():
        tried = [str(location / name) for name in _FILENAMES]
        for name in _FILENAMES:
            if (location / name).is_file():
                return location / name, tried
        return None, tried
    return (location if location.is_file() else None), [str(location)]


def _fetch(url: str, out: IO[bytes]) -> None:
    """Streams ``url`` into ``out``. Tests replace this function; it is the only I/O."""
    with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
        for chunk in iter(lambda: response.read(1 << 16), b""):
            out.write(chunk)


def _download(cache_dir: Path, sha256: str | None) -> Path:
    """Downloads into ``cache_dir`` atomically: a verified temp file, then a rename.

    A network failure becomes one :class:`DataUnavailableError` saying how to
    provide the file by hand; nothing is left in the cache either way.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / _CACHE_NAME
    fd, tmp_name = tempfile.mkstemp(dir=cache_dir, prefix=f".{_CACHE_NAME}.", suffix=".part")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as f:
            try:
                _fetch(TINYSHAKESPEARE_URL, f)
            except _NETWORK_ERRORS as e:
                reason = getattr(e, "reason", None) or e
                raise DataUnavailableError(
                    "TinyShakespeare is not on disk and downloading it failed "
                    f"({type(e).__name__}: {reason}). " + _how_to_provide(target, sha256)
                ) from e
            f.flush()
            os.fsync(f.fileno())
        got = _sha256(tmp)
        if sha256 is not None and got != sha256:
            raise ValueError(
                f"Downloaded TinyShakespeare from {TINYSHAKESPEARE_URL} has sha256 "
                f"{got}, expected {sha256}; nothing was written to {str(cache_dir)!r}. "
                "Download "
                f"it by hand and pass `path=` or set ${DATA_ENV_VAR}."
            )
        # os.replace is atomic on POSIX and Windows: readers see the old file or the
        # complete new one, never a partial download.
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def load_tinyshakespeare(
    path: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
    sha256: str | None = TINYSHAKESPEARE_SHA256,
) -> str:
    """Returns the TinyShakespeare corpus as one string, checking its SHA-256.

    The corpus is looked for, in order:

    1. ``path``, a file or a directory holding ``tinyshakespeare.txt`` or
       ``input.txt``;
    2. ``$LORA_MUON_JAX_DATA``, the same (CI points it at a shared copy);
    3. the cache, ``cache_dir`` or :func:`default_cache_dir`;
    4. otherwise it is downloaded from :data:`TINYSHAKESPEARE_URL` into the cache
       (when ``download``), written to a temporary file, verified and renamed into
       place, so no partial or corrupt download is ever left in the cache.

    An explicit ``path`` or environment variable that finds nothing is an error (no
    silent fallback to the network).

    Args:
      path: where the corpus is, if you have it.
      cache_dir: the download cache; defaults to ``$XDG_CACHE_HOME/lora_muon_jax`` or
        ``~/.cache/lora_muon_jax``.
      download: fetch the corpus when it is nowhere on disk.
      sha256: the expected hex digest; ``None`` skips the check (for your own text).

    Returns:
      The corpus text (1,115,394 characters, 65 distinct).

    Raises:
      DataUnavailableError: (a :class:`FileNotFoundError`) nothing at ``path`` or
        ``$LORA_MUON_JAX_DATA``; or nowhere on disk with ``download=False``; or the
        download failed for want of a network (no route, DNS, refused, reset,
        timeout, HTTP error). The message lists the places looked and how to
        provide the file: ``--data``/``path=``, ``$LORA_MUON_JAX_DATA``, the cache
        path. Nothing is left in the cache.
      ValueError: a file (or download) whose SHA-256 is not ``sha256``.
      OSError: writing the cache failed.

    Examples:
      >>> import pathlib, tempfile
      >>> from lora_muon_jax_examples.tinyshakespeare import load_tinyshakespeare
      >>> folder = pathlib.Path(tempfile.mkdtemp())
      >>> _ = (folder / "input.txt").write_text("First Citizen:")
      >>> load_tinyshakespeare(folder, sha256=None)  # your own copy, unchecked
      'First Citizen:'
    """
    if path is not None:
        found, tried = _in_dir_or_file(Path(path))
        if found is None:
            raise DataUnavailableError(
                f"TinyShakespeare not found at `path`={str(path)!r} (looked for "
                f"{tried}). Pass the file or the directory holding it (`--data` in "
                "the examples)."
            )
        return _read_verified(found, sha256, "`path`")

    env = os.environ.get(DATA_ENV_VAR)
    if env:
        found, tried = _in_dir_or_file(Path(env))
        if found is None:
            raise DataUnavailableError(
                f"TinyShakespeare not found at ${DATA_ENV_VAR}={env!r} (looked for "
                f"{tried}). Point it at the file or its directory, or unset it to use "
                "the download cache."
            )
        return _read_verified(found, sha256, f"${DATA_ENV_VAR}")

    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cached = cache / _CACHE_NAME
    if cached.is_file():
        return _read_verified(cached, sha256, "the cache")
    if not download:
        raise DataUnavailableError(
            f"TinyShakespeare not found: no `path`, ${DATA_ENV_VAR} unset, and no "
            f"{str(cached)!r} in the cache; `download=False`. " + _how_to_provide(cached, sha256)
        )
    return _read_verified(_download(cache, sha256), sha256, "the download")


def load_tinyshakespeare_or_exit(path: str | os.PathLike[str] | None, program: str) -> str:
    """:func:`load_tinyshakespeare` for command-line programs: a clear exit, no traceback.

    Args:
      path: as for :func:`load_tinyshakespeare`.
      program: the program's name, to prefix the message.

    Returns:
      The corpus text.

    Raises:
      SystemExit: with the :class:`DataUnavailableError` message (which names
        ``--data``, ``$LORA_MUON_JAX_DATA`` and the cache path) when the corpus is
        neither on disk nor downloadable.
    """
    try:
        return load_tinyshakespeare(path)
    except DataUnavailableError as e:
        raise SystemExit(f"{program}: {e}") from None


@dataclasses.dataclass(frozen=True)
class CharTokenizer:
    """A character-level tokenizer: one id per distinct character, in sorted order.

    Attributes:
      chars: the vocabulary; id ``i`` is ``chars[i]``.

    Examples:
      >>> from lora_muon_jax_examples.tinyshakespeare import CharTokenizer
      >>> tok = CharTokenizer.from_text("hello world")
      >>> tok.vocab_size, tok.encode("hello").tolist()
      (8, [3, 2, 4, 4, 5])
      >>> tok.decode(tok.encode("low row"))
      'low row'
    """

    chars: str

    def __post_init__(self) -> None:
        if len(set(self.chars)) != len(self.chars) or not self.chars:
            raise ValueError(
                f"`chars` must be a non-empty string of distinct characters; got {self.chars!r}."
            )

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """The tokenizer whose vocabulary is the distinct characters of ``text``."""
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def _index(self) -> dict[str, int]:
        return {c: i for i, c in enumerate(self.chars)}

    def encode(self, text: str) -> np.ndarray:
        """Ids of ``text`` as an int32 NumPy array."""
        index = self._index
        unknown = sorted(set(text) - index.keys())
        if unknown:
            raise ValueError(
                f"Characters {unknown!r} are not in the tokenizer's vocabulary "
                f"{self.chars!r}; build it from text that contains them."
            )
        return np.fromiter((index[c] for c in text), dtype=np.int32, count=len(text))

    def decode(self, ids: Sequence[int] | np.ndarray | jax.Array) -> str:
        """The text of a 1-D sequence of ids."""
        ids = np.asarray(ids)
        if ids.ndim != 1:
            raise ValueError(f"`ids` must be 1-D; got shape {ids.shape}.")
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"`ids` must lie in [0, {self.vocab_size}); got min {ids.min()}, max {ids.max()}."
            )
        return "".join(self.chars[i] for i in ids.tolist())


def split_train_val(ids: np.ndarray, val_fraction: float = 0.1) -> tuple[np.ndarray, np.ndarray]:
    """Splits a token stream into a leading train part and a trailing validation part.

    A contiguous split (not a shuffle) keeps validation text unseen as context too.

    Args:
      ids: 1-D token ids.
      val_fraction: share of the stream, in ``(0, 1)``, kept for validation.

    Returns:
      ``(train, val)``, views of ``ids``.

    Raises:
      ValueError: ``val_fraction`` outside ``(0, 1)``.

    Examples:
      >>> import numpy as np
      >>> from lora_muon_jax_examples.tinyshakespeare import split_train_val
      >>> train, val = split_train_val(np.arange(10), 0.2)
      >>> train.tolist(), val.tolist()
      ([0, 1, 2, 3, 4, 5, 6, 7], [8, 9])
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in (0, 1); got {val_fraction!r}.")
    cut = int(round(len(ids) * (1.0 - val_fraction)))
    return ids[:cut], ids[cut:]


def sample_batch(
    key: jax.Array | np.random.Generator, ids: Any, batch_size: int, seq_len: int
) -> tuple[Any, Any]:
    r"""Random windows of a token stream for next-token prediction.

    Window :math:`i` starts at a uniform :math:`s_i \in [0, N - T - 1]`; the inputs are
    ``ids[s_i : s_i + T]`` and the targets the same window shifted by one.

    Args:
      key: a JAX PRNG key (traceable: the sampler can live inside a jitted step) or
        a ``numpy.random.Generator`` (then NumPy arrays are returned).
      ids: 1-D token ids (NumPy or JAX array).
      batch_size: number of windows ``B``. Static.
      seq_len: window length ``T``. Static.

    Returns:
      ``(x, y)``, two int32 arrays of shape ``(B, T)`` with ``y[:, :-1] == x[:, 1:]``.

    Raises:
      ValueError: ``ids`` is not 1-D or is shorter than ``T + 1``.

    Examples:
      >>> import jax, numpy as np
      >>> from lora_muon_jax_examples.tinyshakespeare import sample_batch
      >>> x, y = sample_batch(jax.random.key(0), np.arange(100), 2, seq_len=4)
      >>> x.shape, bool((x[:, 1:] == y[:, :-1]).all()), bool((y - x == 1).all())
      ((2, 4), True, True)
    """
    shape = np.shape(ids)
    if len(shape) != 1 or shape[0] < seq_len + 1:
        raise ValueError(
            f"`ids` must be 1-D with at least seq_len + 1 = {seq_len + 1} tokens; got "
            f"shape {shape}."
        )
    high = shape[0] - seq_len  # exclusive bound: the last target is ids[N - 1]
    if isinstance(key, np.random.Generator):
        starts = key.integers(0, high, size=batch_size)
        windows = np.asarray(ids)[starts[:, None] + np.arange(seq_len + 1)]
        return windows[:, :-1].astype(np.int32), windows[:, 1:].astype(np.int32)
    starts_j = jax.random.randint(key, (batch_size,), 0, high)
    ids_j = jnp.asarray(ids, jnp.int32)
    windows = jax.vmap(lambda s: jax.lax.dynamic_slice_in_dim(ids_j, s, seq_len + 1))(starts_j)
    return windows[:, :-1], windows[:, 1:]
