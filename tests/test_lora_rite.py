"""LoRA-RITE against the first author's public reference, its invariance, and the optax contract.

Golden values (``tests/data/lora_rite_golden.json``) were produced once, outside this
repository, by running the public PyTorch reimplementation itself:
``gkevinyen5418/LoRA-RITE``, file ``lora_rite.py`` at commit ``c9bb451`` (class
``LoRARite``), under torch 2.13.0 (CPU wheel) with
``torch.set_default_dtype(torch.float64)``. Neither that code nor the generator
is part of this repository. The procedure:

* Three adapters in PEFT layout, ``(m, n, r) = (10, 8, 3)``, ``(6, 12, 2)`` and
  ``(10, 8, 3)`` (the first and last share a shape, so the library stacks them):
  ``pair{k}/lora_A`` of shape ``(r, n)`` (our ``b``) and ``pair{k}/lora_B`` of
  shape ``(m, r)`` (our ``a``), passed to ``LoRARite`` as the positional list
  ``[pair0.lora_A, pair0.lora_B, pair1.lora_A, pair1.lora_B, pair2.lora_A,
  pair2.lora_B]``.
* Inputs from ``numpy.random.default_rng(20250101 + i)`` for config ``i`` (in the
  order ``defaults``, ``all_options``, ``zero_factor``), drawn in the order above:
  each factor ``N(0, 1) · 0.5``, then for each of 5 steps each gradient
  ``N(0, 1) · s_t`` with ``s = (0.05, 0.6, 0.1, 0.3, 0.05)`` (``zero_factor``:
  ``(0.05, 0.2, 0.1, 0.3, 0.05)``), all rounded to 4 decimals (exact in the JSON).
  ``zero_factor`` sets ``pair0/lora_B`` (our ``a``) to zero, like PEFT's init;
  ``defaults`` multiplies ``pair1/lora_B``'s step-2 gradient by 40. The inputs are
  stored in the JSON, so nothing depends on NumPy's generator.
* Each step sets every ``p.grad`` to the stored gradient and calls
  ``optimizer.step()``; the parameters after every step are stored.
* Configs (``LoRARite`` keyword arguments; the rest are the reference defaults
  ``eps=1e-6, clip_unmagnified_grad=1.0, update_skipping=1.0``):
  ``defaults``: ``betas=(0.9, 0.999), lr=0.05`` (the global clip fires at steps
  1-3, the skip at step 2 for ``pair1/lora_B``); ``all_options``:
  ``betas=(0.8, 0.95), lr=0.05, eps=1e-4, clip_unmagnified_grad=0.5,
  update_skipping=0, update_capping=0.3, weight_decay=0.1, apply_escape=True``
  (clip and cap fire at every step); ``zero_factor``: ``betas=(0.9, 0.99),
  lr=0.05`` (``pair0/lora_A``'s gradient is skipped at steps 1 and 3, once its
  zero partner has moved a little).

In float64 (``jax.enable_x64``) the library reproduces every step to about
``1e-15`` relative; the test allows ``1e-11``. In float32 it agrees to about
``4e-6``: QR, the r×r pseudo-inverse and the inverse square root of ``V`` each lose
a few ulps times the condition numbers of ``R`` and ``V`` (about 10 and 100 here),
so ``5e-5`` is a tight but safe bound.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import lora_muon_jax as lmj
from lora_muon_jax import testing
from lora_muon_jax.peers._lora_rite import LoRARiteState, lora_rite, scale_by_lora_rite
from tests import contract
from tests.helpers import assert_trees_rel_close, product, rel_err, well_conditioned

_GOLDEN = json.loads((Path(__file__).parent / "data" / "lora_rite_golden.json").read_text())
_NAMES = ("lora_A", "lora_B")


def _nest(flat: dict, dtype) -> dict:
    """``{"pair0/lora_A": ...}`` -> ``{"pair0": {"lora_A": ...}}`` arrays of ``dtype``."""
    out: dict = {}
    for key, value in flat.items():
        pair, name = key.split("/")
        out.setdefault(pair, {})[name] = jnp.asarray(np.asarray(value), dtype)
    return out


@functools.partial(jax.jit, static_argnames=("apply_escape",))
def _golden_trajectory(params, grads, hp, apply_escape):
    # Hyperparameters are traced, so configs with the same `apply_escape` share a
    # compilation.
    tx = lora_rite(
        hp["lr"],
        hp["b1"],
        hp["b2"],
        hp["eps"],
        hp["weight_decay"],
        clip_unmagnified_grad=hp["clip"],
        update_skipping=hp["skip"],
        update_capping=hp["cap"],
        apply_escape=apply_escape,
        pairs="peft",
    )

    def body(carry, g):
        p, s = carry
        u, s = tx.update(g, s, p)
        p = optax.apply_updates(p, u)
        return (p, s), p

    _, traj = jax.lax.scan(body, (params, tx.init(params)), grads)
    return traj


def _golden_errors(cfg: dict, dtype) -> list[float]:
    kw = cfg["hparams"]
    hp = {
        "lr": kw["lr"],
        "b1": kw["betas"][0],
        "b2": kw["betas"][1],
        "eps": kw.get("eps", 1e-6),
        "weight_decay": kw.get("weight_decay", 0.0),
        "clip": kw.get("clip_unmagnified_grad", 1.0),
        "skip": kw.get("update_skipping", 1.0),
        "cap": kw.get("update_capping", 0.0),
    }
    hp = {k: jnp.asarray(v, dtype) for k, v in hp.items()}
    params = _nest(cfg["init"], dtype)
    grads = jax.tree.map(lambda *xs: jnp.stack(xs), *[_nest(g, dtype) for g in cfg["grads"]])
    traj = _golden_trajectory(params, grads, hp, bool(kw.get("apply_escape", False)))
    errors = []
    for t, ref in enumerate(cfg["params"]):
        got, want = [], []
        for key in sorted(ref):
            pair, name = key.split("/")
            start = np.asarray(params[pair][name], np.float64)
            got.append((np.asarray(traj[pair][name][t], np.float64) - start).ravel())
            want.append((np.asarray(ref[key]) - np.asarray(cfg["init"][key])).ravel())
        got, want = np.concatenate(got), np.concatenate(want)
        errors.append(float(np.linalg.norm(got - want) / np.linalg.norm(want)))
    return errors


@pytest.mark.parametrize(
    "dtype,tol",
    [("float64", 1e-11), ("float32", 5e-5)],
)
def test_matches_public_reference_golden_values(dtype, tol):
    # Relative error of the parameter change since the start, every step, all leaves.
    with jax.enable_x64(dtype == "float64"):
        for name, cfg in _GOLDEN["configs"].items():
            errors = _golden_errors(cfg, jnp.dtype(dtype))
            assert max(errors) < tol, (name, errors)


# --------------------------------------------------------------------------------
# Invariance and the relation to LoRA-Muon.


_INJECTED = optax.inject_hyperparams(lora_rite)


@functools.cache
def _gauge_step(loss):
    # One compilation for every variant: the hyperparameters live in the state.
    template = _INJECTED(0.02, 0.9, 0.999, clip_unmagnified_grad=1.0, update_skipping=1.0)

    @jax.jit
    def step(p, s):
        u, s = template.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    return step


def _run(tx, params, loss, steps):
    step = _gauge_step(loss)
    out = []
    for p in params:  # same shapes: one compilation for every start
        state, traj = tx.init(p), []
        for _ in range(steps):
            p, state = step(p, state)
            traj.append({k: product(v["lora_a"], v["lora_b"]) for k, v in p.items()})
        out.append(traj)
    return out


def _two_pair_problem(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"p": (16, 12, 3), "q": (10, 14, 2)}
    params = {
        k: {
            "lora_a": well_conditioned(rng, (m, r), 3.0),
            "lora_b": well_conditioned(rng, (r, n), 3.0),
        }
        for k, (m, n, r) in shapes.items()
    }
    # Pair p: unmagnified gradients of RMS ~0.3, global norm > 1 (the clip fires).
    # Pair q: a target u vᵀ with u in the column space of a and v orthogonal to the
    # row space of b, so ḡ_b = Gᵀ Q_a has RMS > 1 (skipped) and ḡ_a = G Q_b does not.
    u = params["q"]["lora_a"][:, 0] / np.linalg.norm(params["q"]["lora_a"][:, 0])
    v = np.linalg.svd(params["q"]["lora_b"])[2][-1]
    targets = {"p": 0.3 * rng.standard_normal((16, 12)), "q": 20.0 * np.outer(u, v)}

    def loss(p):
        return sum(0.5 * jnp.sum((p[k]["lora_a"] @ p[k]["lora_b"] - targets[k]) ** 2) for k in p)

    return params, loss, rng


_LOSS = _two_pair_problem()[1]


@pytest.mark.parametrize("clip_and_skip", [False, True], ids=["plain", "clip_skip"])
def test_product_trajectory_is_gauge_invariant(clip_and_skip):
    # (a, b) -> (a S, S⁻¹ b): for S = 9 I and a random S ∈ GL(r). The unmagnified
    # gradient only rotates, so its RMS and norm (skip, clip) are invariant too.
    params, _, rng = _two_pair_problem()
    starts = [params]
    for gauge in ("scalar", "general"):
        moved = {}
        for k, v in params.items():
            r = v["lora_a"].shape[1]
            s = 9.0 * np.eye(r) if gauge == "scalar" else well_conditioned(rng, (r, r), 4.0) * 3
            moved[k] = {"lora_a": v["lora_a"] @ s, "lora_b": np.linalg.solve(s, v["lora_b"])}
        starts.append(moved)
    starts = [jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), p) for p in starts]
    tau = 1.0 if clip_and_skip else 0.0  # 0 turns clip and skip off
    tx = _INJECTED(0.02, 0.9, 0.999, clip_unmagnified_grad=tau, update_skipping=tau)
    base, *others = _run(tx, starts, _LOSS, steps=4)
    for traj in others:
        for t, (p0, p1) in enumerate(zip(base, traj, strict=True)):
            for k in p0:
                # float32 rounding through QR of gauge-moved factors (cond(S) = 4)
                # reaches 2.1e-4 on some CPUs after 4 steps; a non-invariant
                # method (Spectron) differs by ~1 here.
                assert rel_err(p1[k], p0[k]) < 5e-4, (k, t)
    for k, v in params.items():  # every product did move
        assert rel_err(base[-1][k], product(v["lora_a"], v["lora_b"])) > 1e-3, k


def test_memoryless_core_is_lora_muon_direction_times_two_sqrt_rows():
    # β1 = β2 = 0, no clip, skip or ε: S_X = ḡ (ḡᵀḡ/rows)^{-1/2} = √rows msign(ḡ) and
    # u_X = √rows msign(g_X S_Y^{-1/2}) S_Y^{-1/2}. scale_by_lora_muon returns half of
    # msign(...)S^{-1/2} (η/2 per term), so the measured factor is 2√rows: 2√m for
    # `a`, 2√n for `b`. Product steps are parallel only when m = n (factor 2√m).
    rng = np.random.default_rng(1)
    shapes = {"rect": (20, 14, 3), "square": (16, 16, 3)}
    params, grads = {}, {}
    for k, (m, n, r) in shapes.items():
        params[k] = {
            "lora_a": well_conditioned(rng, (m, r), 4.0),
            "lora_b": well_conditioned(rng, (r, n), 4.0),
        }
        grads[k] = {"lora_a": rng.standard_normal((m, r)), "lora_b": rng.standard_normal((r, n))}
    params, grads = (
        jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), t) for t in (params, grads)
    )
    rite = scale_by_lora_rite(0.0, 0.0, 0.0, clip_unmagnified_grad=0.0, update_skipping=0.0)
    muon = lmj.scale_by_lora_muon(beta=0.0)
    u_rite, _ = jax.jit(rite.update)(grads, rite.init(params), params)
    u_muon, _ = jax.jit(muon.update)(grads, muon.init(params), params)
    for k, (m, n, _) in shapes.items():
        for role, rows in (("lora_a", m), ("lora_b", n)):
            x, y = np.asarray(u_rite[k][role], np.float64), np.asarray(u_muon[k][role], np.float64)
            factor = float(np.sum(x * y) / np.sum(y * y))
            assert factor == pytest.approx(2 * np.sqrt(rows), rel=1e-5), (k, role)
            assert rel_err(x, factor * y) < 1e-5, (k, role)
    steps = {
        name: testing.pair_steps(params, u)["['square']['lora_a']"]
        for name, u in (("rite", u_rite), ("muon", u_muon))
    }
    p_rite, p_muon = (sum(steps[name]) for name in ("rite", "muon"))
    factor = float(np.sum(p_rite * p_muon) / np.sum(p_muon * p_muon))
    assert factor == pytest.approx(2 * np.sqrt(16), rel=1e-5)  # measured: 8.0000
    assert rel_err(p_rite, factor * p_muon) < 1e-5


# --------------------------------------------------------------------------------
# Reference behaviours: global clip, skipping, zero factors, shapes.


def test_clip_is_global_and_skip_zeroes_one_factor():
    params, _, rng = _two_pair_problem(seed=2)
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
    grads = jax.tree.map(
        lambda x: jnp.asarray(rng.standard_normal(x.shape) * 0.1, jnp.float32), params
    )

    @jax.jit
    def update(grads, clip, skip):
        # A large ε makes the first step depend on the gradient's scale.
        tx = scale_by_lora_rite(eps=0.3, clip_unmagnified_grad=clip, update_skipping=skip)
        return tx.update(grads, tx.init(params), params)

    louder = {**grads, "q": {**grads["q"], "lora_a": 100 * grads["q"]["lora_a"]}}
    for clip, coupled in ((1.0, True), (0.0, False)):
        u0, _ = update(grads, clip, 0.0)
        u1, _ = update(louder, clip, 0.0)
        diff = rel_err(u1["p"]["lora_a"], u0["p"]["lora_a"])
        assert (diff > 1e-2) if coupled else (diff < 1e-6), (clip, diff)

    # Skipping: q's `a` has unmagnified RMS > 1 (its partner's < 1): zero update for
    # it alone, and the state advances.
    u, state = update(louder, 0.0, 1.0)
    assert bool(jnp.all(u["q"]["lora_a"] == 0))
    assert float(jnp.abs(u["q"]["lora_b"]).max()) > 0
    assert float(jnp.abs(u["p"]["lora_a"]).max()) > 0
    assert int(state.count) == 1


def test_zero_init_factor_is_finite_and_moves_only_its_partner_first():
    params, loss = contract.lora_problem()
    tx = lora_rite(0.05)
    jitted = optax.GradientTransformationExtraArgs(tx.init, jax.jit(tx.update))
    updates = testing.assert_finite_at_zero_init(jitted, params, loss)
    assert float(jnp.abs(updates["layer"]["lora_b"]).max()) > 0


def test_state_layout_and_dtypes():
    params = {
        "lora_a": jnp.ones((2, 8, 3), jnp.bfloat16),
        "lora_b": jnp.ones((2, 3, 5), jnp.bfloat16),
    }
    state = scale_by_lora_rite(mu_dtype="float32").init(params)
    assert isinstance(state, LoRARiteState)
    assert state.nu["lora_a"].shape == state.nu["lora_b"].shape == (2, 3, 3)
    assert state.escape["lora_a"].shape == (2,)
    assert state.basis["lora_b"].shape == (2, 3, 5)
    assert {x.dtype for x in jax.tree.leaves((state.nu, state.basis, state.escape))} == {
        jnp.dtype(jnp.float32)
    }
    assert {x.dtype for x in jax.tree.leaves(state.mu)} == {jnp.dtype(jnp.float32)}


def test_factor_smaller_than_rank_raises():
    params = {"q": {"lora_a": jnp.ones((2, 3)), "lora_b": jnp.ones((3, 5))}}
    with pytest.raises(ValueError, match=r"m=2.*m >= r"):
        scale_by_lora_rite().init(params)


def test_bad_hyperparameters_and_unpaired_leaves_raise():
    with pytest.raises(ValueError, match="b2"):
        lora_rite(0.1, b2=1.0)
    with pytest.raises(ValueError, match="update_skipping"):
        scale_by_lora_rite(update_skipping=-1.0)
    with pytest.raises(ValueError, match=r"\['bias'\]"):
        scale_by_lora_rite().init(
            {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3)), "bias": jnp.ones(3)}
        )


# --------------------------------------------------------------------------------
# The optax contract (tests/contract.py).

VARIANTS = {
    "defaults": dict(learning_rate=0.05),
    "all_options": dict(
        learning_rate=0.05,
        b1=0.8,
        b2=0.95,
        weight_decay=0.1,
        update_capping=0.5,
        clip_unmagnified_grad=0.5,
        apply_escape=True,
    ),
}


def test_map_params_on_leafless_placeholder():
    tx = lora_rite(0.1)
    params, _ = contract.lora_problem()
    state = tx.init(params)
    chex.assert_trees_all_equal_structs(optax.tree.map_params(tx, lambda v: v, state), state)


def _sharded_matches_single_device(tx, axis_type):
    mesh = jax.make_mesh((8,), ("x",), axis_types=(axis_type,))
    rng = np.random.default_rng(0)
    raw = {
        "lora_a": rng.standard_normal((2, 32, 4)),
        "lora_b": rng.standard_normal((2, 4, 24)),
        "w": rng.standard_normal((2, 8, 4)),
    }
    specs = {"lora_a": P(None, "x", None), "lora_b": P(None, None, "x"), "w": P(None, "x")}

    def shard(x, spec):
        return jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, spec))

    with jax.set_mesh(mesh):
        params = {k: shard(v, specs[k]) for k, v in raw.items()}
        grads = {k: shard(0.05 * v + 0.01, specs[k]) for k, v in raw.items()}
        state = tx.init(params)
        update = jax.jit(tx.update)
        _, state1 = update(grads, state, params)
        updates, _ = update(grads, state1, params)
        assert jax.tree.map(jax.typeof, state1) == jax.tree.map(jax.typeof, state)
        assert jax.tree.map(jax.typeof, updates) == jax.tree.map(jax.typeof, params)
    single = {k: jnp.asarray(v, jnp.float32) for k, v in raw.items()}
    g1 = {k: 0.05 * v + 0.01 for k, v in single.items()}
    update = jax.jit(tx.update)
    _, s1 = update(g1, tx.init(single), single)
    expected, _ = update(g1, s1, single)
    assert_trees_rel_close(jax.device_get(updates), expected)


@pytest.mark.parametrize("axis_type", [AxisType.Explicit, AxisType.Auto], ids=["explicit", "auto"])
def test_sharded_state_keeps_param_shardings(axis_type):
    _sharded_matches_single_device(lora_rite(0.1, weight_decay=0.1, apply_escape=True), axis_type)
