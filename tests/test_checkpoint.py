"""Orbax checkpoints mid-run: a run resumed in a new process is bit-identical.

The parent process trains ``STEPS`` steps, saving params and optimizer state
after ``SAVE_AT``; one subprocess (a fresh JAX) restores each checkpoint,
finishes the run and saves the result, which must equal the parent's
uninterrupted run bit for bit. Covered: a pytree run with bfloat16 momenta and an
``nnx.Optimizer`` run with float32 momenta (each compile costs seconds, so each
dtype is covered once).

Damaged checkpoints are made by cutting real orbax files short or deleting them on
disk (as an interrupted copy would); every restore must raise one error naming the
checkpoint and the leaf or file at fault.
"""

from __future__ import annotations

import gc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_muon_jax as lmj
from lora_muon_jax.checkpoint import (
    CheckpointError,
    _dotted,  # orbax's names for stored leaves
    check_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)
from tests import contract
from tests.test_nnx import TwoAdapters, numpy_init

ROOT = Path(__file__).resolve().parents[1]
STEPS, SAVE_AT = 6, 3
MU_DTYPES = {"bf16": "bfloat16"}  # the nnx run covers float32 momenta


def _pytree_run(mu_dtype, rank=3):
    params, loss = contract.lora_problem(r=rank)
    tx = lmj.lora_muon(0.1, beta=0.9, weight_decay=0.05, mu_dtype=mu_dtype)

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    return {"params": params, "opt_state": tx.init(params)}, step


def _nnx_run():
    model = numpy_init(lambda: TwoAdapters(nnx.Rngs(0)))
    optimizer = nnx.Optimizer(
        model, lmj.lora_muon(0.05, beta=0.9, weight_decay=0.05), wrt=nnx.LoRAParam
    )
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((16, 8)), jnp.float32)
    y = jnp.asarray(rng.standard_normal((16, 4)), jnp.float32)

    @nnx.jit
    def step(model, optimizer):
        loss_fn = lambda m: jnp.mean((m(x) - y) ** 2)  # noqa: E731
        grads = nnx.grad(loss_fn, argnums=nnx.DiffState(0, nnx.LoRAParam))(model)
        optimizer.update(model, grads)

    return model, optimizer, step


def _nnx_tree(model, optimizer):
    return {"model": nnx.state(model), "optimizer": nnx.state(optimizer)}


def resume(directory: str) -> None:
    """Subprocess side: restore every mid-run checkpoint, finish the run, save it."""
    directory = Path(directory)
    for name, mu_dtype in MU_DTYPES.items():
        tree, step = _pytree_run(mu_dtype)
        tree = restore_checkpoint(directory / name / "mid", jax.eval_shape(lambda t: t, tree))
        p, s = tree["params"], tree["opt_state"]
        for _ in range(STEPS - SAVE_AT):
            p, s = step(p, s)
        save_checkpoint(directory / name / "end", {"params": p, "opt_state": s})
    model, optimizer, step = _nnx_run()
    restored = restore_checkpoint(directory / "nnx" / "mid", _nnx_tree(model, optimizer))
    nnx.update(model, restored["model"])
    nnx.update(optimizer, restored["optimizer"])
    for _ in range(STEPS - SAVE_AT):
        step(model, optimizer)
    save_checkpoint(directory / "nnx" / "end", _nnx_tree(model, optimizer))


def _assert_bitwise_equal(got, want):
    paths, leaves, _ = lmj._key_paths.flatten_with_paths(want)
    for path, a, b in zip(paths, jax.tree.leaves(got), leaves, strict=False):
        assert a.dtype == b.dtype, path
        np.testing.assert_array_equal(
            np.asarray(a).reshape(-1).view(np.uint8),
            np.asarray(b).reshape(-1).view(np.uint8),
            err_msg=jax.tree_util.keystr(path),
        )


def test_resume_in_a_new_process_is_bit_identical(tmp_path):
    finals = {}
    for name, mu_dtype in MU_DTYPES.items():
        tree, step = _pytree_run(mu_dtype)
        p, s = tree["params"], tree["opt_state"]
        for t in range(STEPS):
            if t == SAVE_AT:
                save_checkpoint(tmp_path / name / "mid", {"params": p, "opt_state": s})
            p, s = step(p, s)
        finals[name] = {"params": p, "opt_state": s}
    model, optimizer, step = _nnx_run()
    for t in range(STEPS):
        if t == SAVE_AT:
            save_checkpoint(tmp_path / "nnx" / "mid", _nnx_tree(model, optimizer))
        step(model, optimizer)
    finals["nnx"] = _nnx_tree(model, optimizer)

    code = f"from tests.test_checkpoint import resume; resume({str(tmp_path)!r})"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    for name, want in finals.items():
        got = restore_checkpoint(tmp_path / name / "end", want)
        _assert_bitwise_equal(got, want)
    # The bf16 momenta stayed bf16 through save, restore and resume.
    mu = finals["bf16"]["opt_state"].inner_states["lora_muon"].inner_state[0].mu
    assert mu["layer"]["lora_a"].dtype == jnp.bfloat16
    assert int(finals["nnx"]["optimizer"]["step"][...]) == STEPS
    nnx_mu = finals["nnx"]["optimizer"]["opt_state"]["inner_states"]["lora_muon"]
    assert nnx_mu["inner_state"][0]["mu"]["l1"]["lora"]["lora_a"][...].dtype == jnp.float32


def test_checkpoint_from_a_different_tree_names_the_paths(tmp_path):
    tree, _ = _pytree_run(None)
    save_checkpoint(tmp_path / "ckpt", tree)
    mu = "opt_state.inner_states.lora_muon.inner_state.0.mu.layer"

    # Another rank: shapes differ, orbax itself would not say where.
    other_rank, _ = _pytree_run(None, rank=4)
    with pytest.raises(ValueError, match="does not match the target tree") as e:
        restore_checkpoint(tmp_path / "ckpt", jax.eval_shape(lambda: other_rank))
    msg = str(e.value)
    assert "shape differs:\n" in msg
    assert "params.layer.lora_a: stored (2, 12, 3), target (2, 12, 4)" in msg
    assert f"{mu}.lora_b: stored (2, 3, 10), target (2, 4, 10)" in msg

    # bf16 momenta expected, float32 stored: orbax would cast silently.
    bf16, _ = _pytree_run("bfloat16")
    with pytest.raises(ValueError, match="dtype differs") as e:
        check_checkpoint(tmp_path / "ckpt", jax.eval_shape(lambda: bf16))
    assert f"\n    {mu}.lora_a: stored float32, target bfloat16" in str(e.value)
    check_checkpoint(tmp_path / "ckpt", jax.eval_shape(lambda: bf16), allow_cast=True)

    # A tree with one more adapter, and one without the bias.
    params = {**tree["params"], "extra": {"lora_a": jnp.zeros((4, 2)), "lora_b": jnp.zeros((2, 4))}}
    del params["bias"]
    other = {"params": params, "opt_state": lmj.lora_muon(0.1).init(params)}
    with pytest.raises(ValueError) as e:
        restore_checkpoint(tmp_path / "ckpt", jax.eval_shape(lambda: other))
    msg = str(e.value)
    missing, only = msg.split("missing from the checkpoint:")[1].split("only in the checkpoint:")
    assert "\n    params.extra.lora_a: (4, 2) float32" in missing
    assert "\n    opt_state.inner_states.lora_muon.inner_state.0.mu.extra.lora_b: (2, 4)" in missing
    assert "\n    params.bias: (10,) float32" in only


# ------------------------------------------------------------------ damaged files


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A LoRA-Muon checkpoint whose arrays are big enough to get their own data files.

    OCDBT inlines values under 1 KiB into its index; random (incompressible) float32
    factors of 2 x 256 x 8 are 16 KiB each, so they live in ``ocdbt.process_0/d/``.
    """
    rng = np.random.default_rng(0)
    params = {
        "layer": {
            "lora_a": jnp.asarray(rng.standard_normal((2, 256, 8)), jnp.float32),
            "lora_b": jnp.asarray(rng.standard_normal((2, 8, 128)), jnp.float32),
        },
        "bias": jnp.zeros((128,), jnp.float32),
    }
    tree = {"params": params, "opt_state": lmj.lora_muon(0.1).init(params)}
    path = tmp_path_factory.mktemp("saved") / "ckpt"
    save_checkpoint(path, tree)
    return path, tree


def _biggest_data_file(path: Path) -> Path:
    return max(
        (p for p in (path / "ocdbt.process_0" / "d").iterdir()), key=lambda p: p.stat().st_size
    )


def _cut(file: Path, keep: float = 0.5) -> None:
    with open(file, "r+b") as f:
        f.truncate(int(file.stat().st_size * keep))


# damage -> (what the message must contain besides the checkpoint path, a leaf named?)
DAMAGE = {
    "array_file_cut_short": (
        lambda p: _cut(_biggest_data_file(p)),
        ["OUT_OF_RANGE", "not valid for value of size"],
        True,
    ),
    "array_file_missing": (lambda p: _biggest_data_file(p).unlink(), ["FAILED_PRECONDITION"], True),
    "tree_metadata_cut_short": (
        lambda p: _cut(p / "_METADATA"),
        ["tree metadata", "JSONDecodeError"],
        False,
    ),
    "tree_metadata_missing": (
        lambda p: (p / "_METADATA").unlink(),
        ["tree metadata", "_METADATA", "does not exist"],
        False,
    ),
    "every_array_file_cut_short": (
        lambda p: [_cut(f) for f in (p / "ocdbt.process_0" / "d").iterdir()],
        ["the stored arrays"],
        True,
    ),
    "manifest_cut_short": (
        lambda p: _cut(p / "manifest.ocdbt"),
        ["array index", "DATA_LOSS", "manifest.ocdbt"],
        False,
    ),
    "manifest_missing": (
        lambda p: (p / "manifest.ocdbt").unlink(),
        ["array index", "manifest.ocdbt is missing"],
        False,
    ),
    "index_node_cut_short": (
        lambda p: [_cut(f) for f in (p / "d").iterdir()],
        ["array index", "OUT_OF_RANGE"],
        False,
    ),
    "empty_directory": (
        lambda p: [shutil.rmtree(p), p.mkdir()],
        ["_METADATA", "does not exist"],
        False,
    ),
}


def _restore_damaged(copy, target):
    """The error of restoring a damaged copy, with orbax's abandoned reads drained.

    When one array read fails, orbax drops the reads still in flight; they end as
    "Exception ignored in <coroutine ...>" or "Event loop is closed" reports when
    garbage-collected, which pytest would pin on whichever test runs then. Collect
    them here, inside this test (whose marker ignores them).
    """
    try:
        with pytest.raises(CheckpointError) as e:
            restore_checkpoint(copy, target)
    finally:
        time.sleep(0.2)
        gc.collect()
    return e.value


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_damaged_checkpoint_names_the_leaf_or_file(saved, tmp_path, damage):
    path, tree = saved
    target = jax.eval_shape(lambda: tree)
    copy = tmp_path / "ckpt"
    shutil.copytree(path, copy)
    make, parts, names_leaf = DAMAGE[damage]
    make(copy)
    error = _restore_damaged(copy, target)
    msg = str(error)
    assert isinstance(error, ValueError)  # callers catching ValueError still do
    assert msg.startswith(f"The checkpoint at {copy} is damaged or incomplete"), msg
    assert "[tensorstore_spec=" not in msg and len(msg) < 1500, msg  # no JSON dump
    for part in parts:
        assert part in msg, (part, msg)
    leaves = {_dotted(p) for p, _ in jax.tree_util.tree_flatten_with_path(target)[0]}
    named = [leaf for leaf in leaves if f"(leaf {leaf}" in msg]
    assert bool(named) == names_leaf, msg
    # The undamaged original still restores, equal to what was saved.
    _assert_bitwise_equal(restore_checkpoint(path, target), tree)


def test_missing_checkpoint_names_an_unfinished_save(tmp_path):
    # Orbax saves into "<name>.orbax-checkpoint-tmp-<n>" and renames it when done; a
    # process killed mid-save leaves only that.
    unfinished = tmp_path / "ckpt.orbax-checkpoint-tmp-1234"
    unfinished.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        restore_checkpoint(tmp_path / "ckpt", {"w": jnp.zeros(3)})
    assert f"No checkpoint at {tmp_path / 'ckpt'}" in str(e.value)
    assert str(unfinished) in str(e.value) and "unfinished save" in str(e.value)
