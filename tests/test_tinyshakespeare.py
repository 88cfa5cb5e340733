"""TinyShakespeare loader (lookup order, checksums, atomic cache) and char batching."""

import hashlib
import os
import socket
import subprocess
import sys
import urllib.error
from pathlib import Path

import jax
import numpy as np
import pytest

from lora_muon_jax_examples import tinyshakespeare as data


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    """No env var, a private XDG cache, and a network that fails the test if used."""
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))

    def no_network(url, out):
        raise AssertionError(f"unexpected download of {url}")

    monkeypatch.setattr(data, "_fetch", no_network)
    return tmp_path


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_lookup_order_path_then_env_then_cache(isolated, monkeypatch):
    explicit = _write(isolated / "explicit" / "input.txt", "from path")
    env_dir = isolated / "env"
    _write(env_dir / "tinyshakespeare.txt", "from env")
    _write(isolated / "xdg" / "lora_muon_jax" / "tinyshakespeare.txt", "from xdg cache")
    _write(isolated / "mine" / "tinyshakespeare.txt", "from cache_dir")
    monkeypatch.setenv(data.DATA_ENV_VAR, str(env_dir))

    load = lambda *a, **k: data.load_tinyshakespeare(*a, sha256=None, **k)  # noqa: E731
    assert load(explicit) == "from path"
    assert load(explicit.parent) == "from path"  # a directory works too
    assert load() == "from env"
    monkeypatch.setenv(data.DATA_ENV_VAR, str(env_dir / "tinyshakespeare.txt"))  # a file
    assert load() == "from env"
    monkeypatch.delenv(data.DATA_ENV_VAR)
    assert load() == "from xdg cache"
    assert load(cache_dir=isolated / "mine") == "from cache_dir"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(isolated / "home"))
    assert data.default_cache_dir() == isolated / "home" / ".cache" / "lora_muon_jax"


def test_directory_prefers_our_name_over_char_rnn_name(isolated):
    _write(isolated / "d" / "input.txt", "char-rnn")
    assert data.load_tinyshakespeare(isolated / "d", sha256=None) == "char-rnn"
    _write(isolated / "d" / "tinyshakespeare.txt", "ours")
    assert data.load_tinyshakespeare(isolated / "d", sha256=None) == "ours"


def test_explicit_locations_that_find_nothing_are_errors(isolated, monkeypatch):
    # Even with a valid cache, a wrong explicit location must not fall back silently.
    _write(isolated / "xdg" / "lora_muon_jax" / "tinyshakespeare.txt", "cached")
    missing = isolated / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_tinyshakespeare(missing, sha256=None)
    monkeypatch.setenv(data.DATA_ENV_VAR, str(missing))
    with pytest.raises(FileNotFoundError, match=data.DATA_ENV_VAR):
        data.load_tinyshakespeare(sha256=None)


def test_missing_without_download_says_where_and_what(isolated):
    with pytest.raises(FileNotFoundError) as err:
        data.load_tinyshakespeare(download=False)
    msg = str(err.value)
    expected_cache = isolated / "xdg" / "lora_muon_jax" / "tinyshakespeare.txt"
    for part in (
        str(expected_cache),
        data.TINYSHAKESPEARE_SHA256,
        data.TINYSHAKESPEARE_URL,
        data.DATA_ENV_VAR,
    ):
        assert part in msg, (part, msg)


@pytest.mark.parametrize("where", ["path", "env", "cache"])
def test_checksum_mismatch_is_a_clear_error(isolated, monkeypatch, where):
    corrupt = "First Citizen:\nthis is not the real file\n"
    if where == "path":
        f = _write(isolated / "c" / "input.txt", corrupt)
        call = lambda: data.load_tinyshakespeare(f)  # noqa: E731
    elif where == "env":
        f = _write(isolated / "c" / "input.txt", corrupt)
        monkeypatch.setenv(data.DATA_ENV_VAR, str(f))
        call = data.load_tinyshakespeare
    else:
        f = _write(isolated / "xdg" / "lora_muon_jax" / "tinyshakespeare.txt", corrupt)
        call = data.load_tinyshakespeare
    with pytest.raises(ValueError) as err:
        call()
    msg = str(err.value)
    for part in (str(f), data.TINYSHAKESPEARE_SHA256, _digest(corrupt)):
        assert part in msg, (part, msg)
    assert f.read_text() == corrupt  # reported, never deleted or overwritten


def test_download_is_verified_cached_and_not_repeated(isolated, monkeypatch):
    content = "To be, or not to be\n" * 50
    calls = []

    def fake_fetch(url, out):
        calls.append(url)
        out.write(content.encode())

    monkeypatch.setattr(data, "_fetch", fake_fetch)
    cache = isolated / "cache"
    assert data.load_tinyshakespeare(cache_dir=cache, sha256=_digest(content)) == content
    assert data.load_tinyshakespeare(cache_dir=cache, sha256=_digest(content)) == content
    assert calls == [data.TINYSHAKESPEARE_URL]
    assert sorted(p.name for p in cache.iterdir()) == ["tinyshakespeare.txt"]


def test_failed_download_leaves_nothing_in_the_cache(isolated, monkeypatch):
    def half_then_fail(url, out):
        out.write(b"First Citizen:\nBefore we proceed")  # a partial body...
        raise ConnectionResetError("connection dropped")  # ...then the network fails

    monkeypatch.setattr(data, "_fetch", half_then_fail)
    cache = isolated / "cache"
    with pytest.raises(data.DataUnavailableError) as err:
        data.load_tinyshakespeare(cache_dir=cache)
    assert isinstance(err.value.__cause__, ConnectionResetError)
    assert list(cache.iterdir()) == []  # no partial file, no temp file
    # The next attempt downloads again instead of trusting a half-written file.
    monkeypatch.setattr(data, "_fetch", lambda url, out: out.write(b"complete"))
    assert data.load_tinyshakespeare(cache_dir=cache, sha256=_digest("complete")) == "complete"


_OFFLINE = {
    "no_route": urllib.error.URLError(OSError(101, "Network is unreachable")),
    "dns": urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution")),
    "refused": ConnectionRefusedError(111, "Connection refused"),
    "timeout": TimeoutError("timed out"),
    "http_403": urllib.error.HTTPError(data.TINYSHAKESPEARE_URL, 403, "Forbidden", None, None),
}


@pytest.mark.parametrize("failure", sorted(_OFFLINE))
def test_offline_is_one_error_saying_how_to_provide_the_file(isolated, monkeypatch, failure):
    def offline(url, out):
        raise _OFFLINE[failure]

    monkeypatch.setattr(data, "_fetch", offline)
    with pytest.raises(data.DataUnavailableError) as err:
        data.load_tinyshakespeare()
    msg = str(err.value)
    cache_file = data.default_cache_dir() / "tinyshakespeare.txt"
    assert cache_file == isolated / "xdg" / "lora_muon_jax" / "tinyshakespeare.txt"
    for part in ("`--data`", f"${data.DATA_ENV_VAR}", str(cache_file), data.TINYSHAKESPEARE_URL):
        assert part in msg, (part, msg)
    assert err.value.__cause__ is _OFFLINE[failure]  # the network error stays attached
    assert isinstance(err.value, FileNotFoundError)  # "no corpus" handlers still apply
    assert list(cache_file.parent.iterdir()) == []  # no partial or temp file left


def test_quickstart_offline_exits_with_the_message_and_no_traceback(tmp_path):
    # A real offline run: no corpus anywhere, and every HTTPS request goes to a
    # proxy port that refuses connections (a freshly freed local port).
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {
        k: v
        for k, v in os.environ.items()
        if k.lower() not in {"no_proxy", data.DATA_ENV_VAR.lower()}
    }
    env.update(
        XDG_CACHE_HOME=str(tmp_path / "xdg"),
        https_proxy=f"http://127.0.0.1:{port}",
        HTTPS_PROXY=f"http://127.0.0.1:{port}",
        JAX_PLATFORMS="cpu",
    )
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "examples" / "quickstart.py"), "--steps", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    cache_file = tmp_path / "xdg" / "lora_muon_jax" / "tinyshakespeare.txt"
    for part in ("`--data`", f"${data.DATA_ENV_VAR}", str(cache_file), "URLError"):
        assert part in proc.stderr, (part, proc.stderr)
    assert not (tmp_path / "outputs").exists()  # it stopped before training


def test_corrupt_download_is_rejected_and_not_cached(isolated, monkeypatch):
    monkeypatch.setattr(data, "_fetch", lambda url, out: out.write(b"<html>rate limited</html>"))
    cache = isolated / "cache"
    with pytest.raises(ValueError, match=data.TINYSHAKESPEARE_SHA256):
        data.load_tinyshakespeare(cache_dir=cache)
    assert list(cache.iterdir()) == []


def test_real_corpus_when_available(monkeypatch):
    try:
        text = data.load_tinyshakespeare(download=False)
    except FileNotFoundError:
        pytest.skip(f"TinyShakespeare not on disk (set ${data.DATA_ENV_VAR})")
    assert len(text) == 1_115_394
    assert text.startswith("First Citizen:")
    tok = data.CharTokenizer.from_text(text)
    assert tok.vocab_size == 65
    assert tok.decode(tok.encode(text[:5000])) == text[:5000]


def test_tokenizer_round_trip_and_errors():
    text = "Hark! Who goes there?\nA friend, I trust.\n"
    tok = data.CharTokenizer.from_text(text)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and ids.shape == (len(text),)
    assert tok.decode(ids) == text
    assert list(tok.chars) == sorted(set(text))  # ids follow sorted characters
    assert tok.decode(jax.numpy.asarray(ids)) == text
    with pytest.raises(ValueError, match="'Z'"):
        tok.encode("Zounds")
    with pytest.raises(ValueError, match=r"\[0, "):
        tok.decode([0, tok.vocab_size])
    with pytest.raises(ValueError, match="distinct"):
        data.CharTokenizer("aab")


def test_split_train_val_is_contiguous():
    ids = np.arange(1000)
    train, val = data.split_train_val(ids, 0.1)
    assert len(train) == 900 and len(val) == 100
    np.testing.assert_array_equal(np.concatenate([train, val]), ids)
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ValueError, match="val_fraction"):
            data.split_train_val(ids, bad)


@pytest.mark.parametrize("backend", ["jax", "numpy"])
def test_sample_batch_windows_are_deterministic_and_shifted(backend):
    n, batch, seq = 500, 64, 16
    ids = np.arange(n, dtype=np.int32)  # a window's content reveals its start
    key = (lambda s: jax.random.key(s)) if backend == "jax" else np.random.default_rng
    x, y = data.sample_batch(key(0), ids, batch, seq)
    x2, _ = data.sample_batch(key(0), ids, batch, seq)
    x3, _ = data.sample_batch(key(1), ids, batch, seq)
    x, y, x2, x3 = map(np.asarray, (x, y, x2, x3))
    assert x.shape == y.shape == (batch, seq) and x.dtype == np.int32
    np.testing.assert_array_equal(x, x2)
    assert not np.array_equal(x, x3)
    np.testing.assert_array_equal(x - x[:, :1], np.broadcast_to(np.arange(seq), x.shape))
    np.testing.assert_array_equal(y, x + 1)
    assert x.min() >= 0 and y.max() <= n - 1
    with pytest.raises(ValueError, match="at least"):
        data.sample_batch(key(0), ids[:seq], batch, seq)


def test_sample_batch_covers_both_ends_and_jits():
    ids = np.arange(40, dtype=np.int32)
    fn = jax.jit(data.sample_batch, static_argnums=(2, 3))
    x, y = fn(jax.random.key(0), ids, 4000, 8)
    starts = np.asarray(x[:, 0])
    # Every legal start, 0 .. N - T - 1, is drawn; none beyond.
    assert set(starts.tolist()) == set(range(40 - 8))
    assert int(np.asarray(y).max()) == 39


def test_no_copy_of_the_corpus_in_the_project():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "outputs"]
        for name in filenames:
            path = os.path.join(dirpath, name)
            if os.path.getsize(path) == 1_115_394:
                with open(path, "rb") as f:
                    assert hashlib.sha256(f.read()).hexdigest() != data.TINYSHAKESPEARE_SHA256, path


def test_no_excerpt_of_the_corpus_in_the_tracked_files():
    """Not even part of it: no tracked file holds the corpus's opening 500 characters."""
    try:
        opening = data.load_tinyshakespeare(download=False)[:500].encode()
    except FileNotFoundError:
        pytest.skip(f"TinyShakespeare not on disk (set ${data.DATA_ENV_VAR})")
    root = Path(__file__).resolve().parents[1]
    listed = subprocess.run(
        ["git", "ls-files", "-z"], cwd=root, capture_output=True, check=False
    ).stdout.split(b"\0")
    if not any(listed):
        pytest.skip("not a git checkout: no tracked files to read")
    holders = [p.decode() for p in listed if p and opening in (root / p.decode()).read_bytes()]
    assert not holders, holders
