"""Riemannion and LOI: float64 dense reference, manifold properties, optax contract."""

from __future__ import annotations

import functools
import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

from lora_muon_jax.peers import _riemannion as riem
from lora_muon_jax.peers import riemannion_loi_init
from lora_muon_jax.peers._riemannion import loi
from tests.helpers import assert_trees_rel_close, well_conditioned

M, N, R = 14, 11, 3


# ----------------------------------------------------------------------- reference
# Dense float64 Riemannion, written from the equations with m×n matrices: tangent
# projection from the SVD of X, msign by SVD, retraction by a truncated SVD, and
# momentum transport by projecting the old momentum matrix onto the new tangent space.
# stored="buffer" is Eq. 10-12 (EMA form), stored="direction" Alg. 4/5 lines 3 and 6
# (heavy ball on the stored projected direction).


def _msign(x, rtol=1e-10):
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return (u * (s > rtol * s.max())) @ vt


def _tangent_projector(x, r):
    u, _, vt = np.linalg.svd(x)
    pu, pv = u[:, :r] @ u[:, :r].T, vt[:r].T @ vt[:r]
    return lambda z: pu @ z + z @ pv - pu @ z @ pv


def _truncate(y, r):
    u, s, vt = np.linalg.svd(y)
    return (u[:, :r] * s[:r]) @ vt[:r]


def _reference(
    x, grad_fn, r, *, steps, lr, beta, weight_decay=0.0, nesterov=False, stored="buffer"
):
    mom, out = np.zeros_like(x), []
    w = 1 - beta if stored == "buffer" else 1.0
    for t in range(steps):
        eta = lr(t) if callable(lr) else lr
        proj = _tangent_projector(x, r)
        g = proj(grad_fn(x))
        m = beta * proj(mom) + w * g
        d = beta * m + w * g if nesterov else m
        step = proj(_msign(d))
        x = _truncate((1 - weight_decay * eta) * x - eta * step, r)
        mom = m if stored == "buffer" else step
        out.append(x)
    return out


# ------------------------------------------------------------------------ helpers
# Compiling an update takes seconds on CPU, so the property tests share a few jitted
# engines: inject_hyperparams makes every number state (set per test, no
# recompile) and the regression target is an argument.


def _f64(x):
    return np.asarray(jnp.asarray(x, jnp.float32), np.float64)


def _pair(seed=0, batch=(), m=M, n=N, r=R, cond=3.0):
    rng = np.random.default_rng(seed)
    a = well_conditioned(rng, (*batch, m, r), cond)
    b = well_conditioned(rng, (*batch, r, n), cond)
    return a, b, rng.standard_normal((*batch, m, n))


def _params(a, b, dtype=jnp.float32):
    return {"layer": {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}}


def _products(params, c=1.0):
    return c * _f64(params["layer"]["lora_a"]) @ _f64(params["layer"]["lora_b"])


@functools.cache
def _engine(nesterov=False, gauge="balanced", stored="buffer"):
    tx = optax.inject_hyperparams(riem.scale_by_riemannion)(
        learning_rate=0.1,
        beta=0.9,
        weight_decay=0.0,
        lora_scale=1.0,
        nesterov=nesterov,
        gauge=gauge,
        stored_momentum=stored,
    )

    @jax.jit
    def step(params, state, target):
        c = state.hyperparams["lora_scale"]

        def loss(p):
            a = p["layer"]["lora_a"].astype(jnp.float32)
            b = p["layer"]["lora_b"].astype(jnp.float32)
            return 0.5 * jnp.sum((c * a @ b - target) ** 2)

        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state, updates

    return tx, step


def _run(params, target, steps, *, nesterov=False, gauge="balanced", stored="buffer", lr=0.1, **hp):
    """Runs the shared engine; ``lr`` may be a schedule. Returns products and params."""
    tx, step = _engine(nesterov, gauge, stored)
    state = tx.init(params)
    out = []
    for t in range(steps):
        for name, value in {**hp, "learning_rate": lr(t) if callable(lr) else lr}.items():
            state.hyperparams[name] = jnp.asarray(value, jnp.float32)
        params, state, _ = step(params, state, jnp.asarray(target, jnp.float32))
        out.append(_products(params, hp.get("lora_scale", 1.0)))
    return out, params, state


def _rel(x, y):
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def _check_gauge(params, gauge, c=1.0):
    a, b = _f64(params["layer"]["lora_a"]), _f64(params["layer"]["lora_b"])
    for idx in np.ndindex(*a.shape[:-2]):
        fa, fb = a[idx], b[idx]
        sx = np.linalg.svd(c * fa @ fb, compute_uv=False)[:R]
        if gauge == "balanced":  # a = U (Σ/c)^{1/2}, b = (Σ/c)^{1/2} Vᵀ
            np.testing.assert_allclose(fa.T @ fa, np.diag(sx / c), atol=1e-4 * sx[0] / c)
            np.testing.assert_allclose(fb @ fb.T, np.diag(sx / c), atol=1e-4 * sx[0] / c)
        else:  # a = U
            np.testing.assert_allclose(fa.T @ fa, np.eye(R), atol=1e-5)


# ------------------------------------------------------------- dense reference


@pytest.mark.parametrize(
    "batch,hp",
    [
        ((), dict(beta=0.9)),
        (
            (2,),
            dict(
                beta=0.8, lora_scale=2.5, weight_decay=0.3, nesterov=True, gauge="left_orthogonal"
            ),
        ),
        ((), dict(beta=0.9, stored="direction")),
        ((2,), dict(beta=0.8, lora_scale=2.5, weight_decay=0.3, nesterov=True, stored="direction")),
    ],
    ids=["plain", "stacked-nesterov-wd-left", "direction", "stacked-direction-nesterov-wd"],
)
def test_matches_dense_float64_reference_and_stays_rank_r(batch, hp):
    a, b, target = _pair(seed=1, batch=batch)
    c = hp.get("lora_scale", 1.0)
    lr = optax.linear_schedule(0.2, 0.05, 5)
    traj, params, _ = _run(_params(a, b), target, 6, lr=lr, **hp)
    ref_hp = {k: v for k, v in hp.items() if k in ("beta", "weight_decay", "nesterov", "stored")}
    for idx in np.ndindex(*batch):
        x0, y = c * a[idx] @ b[idx], target[idx]
        want = _reference(x0, lambda x, y=y: x - y, R, steps=6, lr=lr, **ref_hp)
        errs = [_rel(got[idx], w) for got, w in zip(traj, want, strict=False)]
        assert max(errs) < 2e-5, errs
        for x in traj:  # on M_r: exactly rank r, far from rank r − 1
            s = np.linalg.svd(x[idx], compute_uv=False)
            assert s[R - 1] > 1e-2 * s[0] and s[R] < 1e-6 * s[0], s
    _check_gauge(params, hp.get("gauge", "balanced"), c)


def test_schedule_is_evaluated_on_own_count_and_peft_layout():
    # scale_by_riemannion itself (no inject_hyperparams) with a schedule, on PEFT
    # names and layout (lora_B: (m, r), lora_A: (r, n)), against the reference.
    a, b, target = _pair(seed=2)
    lr = optax.cosine_decay_schedule(0.3, 4)
    tx = riem.scale_by_riemannion(lr, 0.5, nesterov=True)
    loss = lambda p: 0.5 * jnp.sum((p["lora_B"] @ p["lora_A"] - target) ** 2)  # noqa: E731

    @jax.jit
    def step(p, s):
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return optax.apply_updates(p, u), s

    params = {"lora_B": jnp.asarray(a, jnp.float32), "lora_A": jnp.asarray(b, jnp.float32)}
    state = tx.init(params)
    want = _reference(a @ b, lambda x: x - target, R, steps=4, lr=lr, beta=0.5, nesterov=True)
    for w in want:
        params, state = step(params, state)
        assert _rel(_f64(params["lora_B"]) @ _f64(params["lora_A"]), w) < 2e-5
    assert int(state.count) == 4


# ------------------------------------------------------------- manifold properties


def test_first_step_is_projected_msign_and_tangent_to_first_order():
    # One step from X: (X⁺ − X)/η = −P_T(msign(P_T G)) + O(η), and the part of it
    # normal to T_X M_r is O(η): it shrinks linearly as η → 0.
    a, b, target = _pair(seed=4, cond=2.0)
    x = a @ b
    proj = _tangent_projector(x, R)
    want = -proj(_msign(proj(x - target)))
    normal, tangent_err = [], []
    for eta in (0.1, 0.01):
        traj, _, _ = _run(_params(a, b), target, 1, lr=eta, beta=0.5)
        delta = (traj[0] - x) / eta
        normal.append(np.linalg.norm(delta - proj(delta)) / np.linalg.norm(want))
        tangent_err.append(np.linalg.norm(proj(delta) - want) / np.linalg.norm(want))
    assert tangent_err[1] < 2e-2 and tangent_err[1] < 0.3 * tangent_err[0], tangent_err
    assert normal[1] < 3e-2 and 5 < normal[0] / normal[1] < 20, normal


def test_descends_and_step_size_is_about_eta():
    a, b, target = _pair(seed=5)
    traj, _, _ = _run(_params(a, b), target, 1, lr=0.05)
    step = traj[0] - a @ b
    assert np.sum((a @ b - target) * step) < 0
    # ‖P_T(msign)‖₂ ∈ [1, √2] up to second-order terms.
    assert 0.05 * 0.99 < np.linalg.norm(step, 2) < 0.05 * np.sqrt(2) * 1.01


@pytest.mark.parametrize("stored", ["buffer", "direction"])
@pytest.mark.parametrize("change", ["matrix", "1/9", "9"])
def test_product_trajectory_is_gauge_invariant(change, stored):
    a, b, target = _pair(seed=6)
    if change == "matrix":
        s = well_conditioned(np.random.default_rng(7), (R, R), cond=5.0) * 3.0
        a2, b2 = a @ s, np.linalg.solve(s, b)
    else:
        c = 1 / 9 if change == "1/9" else 9.0
        a2, b2 = a * c, b / c
    base, _, _ = _run(_params(a, b), target, 4, stored=stored)
    moved, _, _ = _run(_params(a2, b2), target, 4, stored=stored)
    for p0, p1 in zip(base, moved, strict=False):
        assert _rel(p1, p0) < 1e-4


def test_momentum_variants_share_the_first_step_then_differ():
    # Step 1 has no memory: both variants take −η P_T(msign(P_T G)). From step 2 the
    # stored tangent vectors differ (buffer ≈ (1−β) G_1 vs unit-size direction D_1),
    # and so do the products; the float64 reference agrees on the size of the gap.
    a, b, target = _pair(seed=12)
    buf, _, _ = _run(_params(a, b), target, 4, stored="buffer")
    direc, _, _ = _run(_params(a, b), target, 4, stored="direction")
    assert _rel(direc[0], buf[0]) < 1e-5
    gaps = [_rel(d, p) for d, p in zip(direc[1:], buf[1:], strict=False)]
    refs = [
        _reference(a @ b, lambda x: x - target, R, steps=4, lr=0.1, beta=0.9, stored=s)
        for s in ("buffer", "direction")
    ]
    want = [_rel(d, p) for d, p in zip(refs[1][1:], refs[0][1:], strict=False)]
    assert min(gaps) > 1e-3, gaps
    np.testing.assert_allclose(gaps, want, rtol=1e-2)


# ------------------------------------------------------------------ zero init


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_zero_init_b_is_a_finite_rank_revealing_step(dtype):
    # X = 0 is not on M_r: the first step is −η U_a msign(U_aᵀ G) (U_a spans col(a)),
    # which has rank r; later steps are ordinary Riemannion steps.
    a, _, target = _pair(seed=8)
    params = _params(a, np.zeros((R, N)), dtype)
    tx, step = _engine()
    state = tx.init(params)
    losses = []
    for t in range(6):
        params, state, u = step(params, state, jnp.asarray(target, jnp.float32))
        chex.assert_tree_all_finite((u, state))
        x = _products(params)
        losses.append(0.5 * np.sum((x - target) ** 2))
        if t == 0:
            ua = np.linalg.qr(a)[0]
            want = -0.1 * ua @ _msign(ua.T @ -target)
            assert _rel(x, want) < (1e-5 if dtype == jnp.float32 else 3e-2)
            assert np.linalg.matrix_rank(x, tol=1e-3 * np.abs(want).max()) == R
    assert losses[-1] < losses[0]


def test_both_factors_zero_gives_zero_update():
    tx, step = _engine()
    params = _params(np.zeros((M, R)), np.zeros((R, N)))
    _, state, u = step(params, tx.init(params), jnp.ones((M, N)))
    chex.assert_trees_all_equal(u, jax.tree.map(jnp.zeros_like, params))
    chex.assert_tree_all_finite(state)


# ------------------------------------------------------------------------- LOI
# Golden values: the captured gradient energy Σ_{i≤2r} σ_i(G₀)² and the singular
# values of G₀ come from numpy's float64 SVD of the dense G₀, which the loss makes
# explicit (½‖W + c ΔW‖² has G₀ = W + c ΔW₀ at the start).


def _loi_tree(rng, c):
    """Two stacked pairs (flax layout, Flax's zero b) and a PEFT-layout pair with
    both factors non-zero, each beside its base ``kernel``; and a bias."""
    decay = np.diag(1.5 ** -np.arange(10))
    w_q = rng.standard_normal((2, M, 10)) @ decay @ rng.standard_normal((10, N))
    w_v = rng.standard_normal((N, 10)) @ decay @ rng.standard_normal((10, M))
    f32 = lambda x: jnp.asarray(x, jnp.float32)  # noqa: E731
    return {
        "q": {
            "kernel": f32(w_q),
            "lora_a": f32(0.1 * rng.standard_normal((2, M, R))),
            "lora_b": jnp.zeros((2, R, N)),
        },
        "v": {
            "kernel": f32(w_v),
            "lora_B": f32(0.1 * rng.standard_normal((N, 2))),
            "lora_A": f32(0.1 * rng.standard_normal((2, M))),
        },
        "bias": jnp.ones(3),
    }


def _effective(p, c):
    """Effective weights W + c·ΔW of the tree above, float64."""
    q, v = p["q"], p["v"]
    return (
        _f64(q["kernel"]) + c * _f64(q["lora_a"]) @ _f64(q["lora_b"]),
        _f64(v["kernel"]) + c * _f64(v["lora_B"]) @ _f64(v["lora_A"]),
    )


def _loi_loss(c):
    def loss(p):
        wq = p["q"]["kernel"] + c * p["q"]["lora_a"] @ p["q"]["lora_b"]
        wv = p["v"]["kernel"] + c * p["v"]["lora_B"] @ p["v"]["lora_A"]
        return 0.5 * (jnp.sum(wq**2) + jnp.sum(wv**2)) + jnp.sum(p["bias"])

    return loss


@pytest.mark.parametrize("sketch", ["wide", "chunked"])
def test_loi_keeps_the_model_and_captures_top_2r_gradient_energy(sketch):
    rng = np.random.default_rng(9)
    c = 2.0
    params = _loi_tree(rng, c)
    g0 = _effective(params, c)  # G₀ of ½‖W + cΔW‖² at the start
    init = riemannion_loi_init(
        jax.grad(_loi_loss(c)),
        params,
        jax.random.key(0),
        alpha=0.05,
        lora_scale=c,
        oversample=4,
        power_iters=2,
        sketch=sketch,
    )
    chex.assert_trees_all_equal(init["bias"], params["bias"])
    # Alg. 5 line 3: kernel + c·a@b is unchanged (one float32 rounding of the kernel).
    for before, after in zip(g0, _effective(init, c), strict=False):
        assert np.linalg.norm(after - before) < 1e-6 * np.linalg.norm(before)
    cases = [
        (g0[0][i], c * _f64(init["q"]["lora_a"][i]) @ _f64(init["q"]["lora_b"][i]), R)
        for i in range(2)
    ]
    cases.append((g0[1], c * _f64(init["v"]["lora_B"]) @ _f64(init["v"]["lora_A"]), 2))
    for g, x0, r in cases:
        s_g = np.linalg.svd(g, compute_uv=False)
        s_x = np.linalg.svd(x0, compute_uv=False)
        np.testing.assert_allclose(s_x[:r], 0.05, rtol=1e-4)  # every σ equals |α|
        assert s_x[r] < 1e-6
        captured = np.linalg.norm(_tangent_projector(x0, r)(g)) ** 2
        np.testing.assert_allclose(captured, np.sum(s_g[: 2 * r] ** 2), rtol=1e-3)
        assert abs(np.sum(g * x0)) < 1e-4 * np.linalg.norm(g) * np.linalg.norm(x0)
        # A random rank-r point captures far less.
        m, n = g.shape
        rand_x = well_conditioned(rng, (m, r)) @ well_conditioned(rng, (r, n))
        captured_rand = np.linalg.norm(_tangent_projector(rand_x, r)(g)) ** 2
        assert captured_rand < 0.9 * np.sum(s_g[: 2 * r] ** 2)


def test_loi_defaults_are_the_papers_and_alpha_sign_is_applied():
    # App. F (LLMs): oversampling 16, q = 1, α = −0.01/√r.
    sig = inspect.signature(riemannion_loi_init).parameters
    assert sig["oversample"].default == 16 and sig["power_iters"].default == 1
    assert sig["alpha"].default is None and sig["shift_base"].default is True
    assert loi.default_alpha(16) == -0.0025 and loi.default_alpha(4) == -0.005
    rng = np.random.default_rng(13)
    kernel = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    params = {"kernel": kernel, "lora_a": jnp.zeros((M, R)), "lora_b": jnp.zeros((R, N))}
    grad = jax.grad(lambda p: 0.5 * jnp.sum((p["kernel"] + p["lora_a"] @ p["lora_b"]) ** 2))
    run = functools.partial(
        riemannion_loi_init, grad, params, jax.random.key(3), gauge="left_orthogonal", oversample=4
    )
    default, pos, neg = run(), run(alpha=0.02), run(alpha=-0.02)
    s = np.linalg.svd(_f64(default["lora_a"]) @ _f64(default["lora_b"]), compute_uv=False)
    np.testing.assert_allclose(s[:R], 0.01 / np.sqrt(R), rtol=1e-4)
    # Same sketch, opposite α: a = U₁ both times, b (and the product) flips sign.
    chex.assert_trees_all_close(pos["lora_a"], neg["lora_a"], atol=1e-6)
    chex.assert_trees_all_close(pos["lora_b"], -neg["lora_b"], atol=1e-6)
    np.testing.assert_allclose(_f64(pos["lora_a"]).T @ _f64(pos["lora_a"]), np.eye(R), atol=1e-5)


def test_loi_without_base_weight_names_the_pair():
    params = {"blk": {"lora_a": jnp.zeros((M, R)), "lora_b": jnp.zeros((R, N))}}
    grad = jax.grad(lambda p: jnp.sum(p["blk"]["lora_a"] @ p["blk"]["lora_b"]))
    with pytest.raises(
        ValueError,
        match=r"no base weight for the LoRA pair at \['blk'\]\['lora_a'\]"
        r".*blk/kernel.*shift_base=False",
    ):
        riemannion_loi_init(grad, params, jax.random.key(0))
    bad = {"blk": {**params["blk"], "kernel": jnp.zeros((N, M))}}  # transposed
    with pytest.raises(ValueError, match=r"\['blk'\]\['kernel'\] has shape \(11, 14\)"):
        riemannion_loi_init(grad, bad, jax.random.key(0))
    out = riemannion_loi_init(grad, params, jax.random.key(0), shift_base=False, oversample=2)
    assert np.linalg.matrix_rank(_f64(out["blk"]["lora_a"]) @ _f64(out["blk"]["lora_b"])) == R


def test_loi_refuses_complex_factors_naming_the_leaf():
    params = {"blk": {"lora_a": jnp.ones((M, R)), "lora_b": jnp.ones((R, N), jnp.complex64)}}
    params["blk"]["lora_a"] = params["blk"]["lora_a"].astype(jnp.complex64)
    grad = jax.grad(lambda p: jnp.sum(jnp.abs(p["blk"]["lora_a"] @ p["blk"]["lora_b"])))
    with pytest.raises(
        TypeError, match=r"^riemannion_loi_init: complex.*leaf \['blk'\]\['lora_a'\] is complex64"
    ):
        riemannion_loi_init(grad, params, jax.random.key(0), shift_base=False)


def test_loi_base_path_points_at_the_base_weight():
    rng = np.random.default_rng(14)
    w = jnp.asarray(rng.standard_normal((M, N)), jnp.float32)
    params = {"w": w, "adapter": {"lora_a": jnp.zeros((M, R)), "lora_b": jnp.zeros((R, N))}}
    grad = jax.grad(
        lambda p: 0.5 * jnp.sum((p["w"] + p["adapter"]["lora_a"] @ p["adapter"]["lora_b"]) ** 2)
    )
    out = riemannion_loi_init(
        grad, params, jax.random.key(0), oversample=2, base_path=lambda path: ("w",)
    )
    eff = _f64(out["w"]) + _f64(out["adapter"]["lora_a"]) @ _f64(out["adapter"]["lora_b"])
    assert np.linalg.norm(eff - _f64(w)) < 1e-6 * np.linalg.norm(_f64(w))
    assert np.abs(_f64(out["w"]) - _f64(w)).max() > 1e-4  # the base really moved


def _counting(grad_fn, calls, check_rank=None):
    """``grad_fn`` that records each run-time call; optionally rejects other ranks."""

    def wrapped(p):
        if check_rank is not None:
            assert p["lora_a"].shape[-1] == check_rank, "rank is fixed"
        jax.debug.callback(lambda: calls.append(1))
        return grad_fn(p)

    return wrapped


@pytest.mark.parametrize("q", [1, 2])
def test_loi_backward_passes_reach_2_q_plus_1_where_the_tree_allows(q):
    # k = 2r + oversample = 10 columns with r = 3: 2(q+1) calls when the factors may
    # be k wide, 2(q+1)·⌈10/3⌉ = 8(q+1) when grad_fn insists on rank r. Same result.
    rng = np.random.default_rng(15)
    params = {
        "kernel": jnp.asarray(rng.standard_normal((M, N)), jnp.float32),
        "lora_a": jnp.zeros((M, R)),
        "lora_b": jnp.zeros((R, N)),
    }
    grad = jax.grad(lambda p: 0.5 * jnp.sum((p["kernel"] + p["lora_a"] @ p["lora_b"]) ** 2))
    outs, counts = {}, {}
    for name, check in (("wide", None), ("chunked", R)):
        calls = []
        outs[name] = riemannion_loi_init(
            _counting(grad, calls, check),
            params,
            jax.random.key(4),
            oversample=4,
            power_iters=q,
        )
        jax.effects_barrier()
        counts[name] = len(calls)
    assert counts == {"wide": 2 * (q + 1), "chunked": 2 * (q + 1) * 4}
    prods = [_f64(o["lora_a"]) @ _f64(o["lora_b"]) for o in outs.values()]
    assert _rel(prods[0], prods[1]) < 1e-4
    with pytest.raises(ValueError, match="sketch='wide'.*rank is fixed"):
        riemannion_loi_init(_counting(grad, [], R), params, jax.random.key(4), sketch="wide")


def test_loi_on_flax_nnx_model_keeps_its_output():
    # nnx.LoRALinear: the kernel sits beside the `lora` submodule; nnx.merge accepts
    # factors of the sketch width, so "auto" takes the 2(q+1) route.
    from flax import nnx

    model = nnx.LoRALinear(M, N, lora_rank=R, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jnp.asarray(np.random.default_rng(16).standard_normal((8, M)), jnp.float32)
    y = jnp.asarray(np.random.default_rng(17).standard_normal((8, N)), jnp.float32)

    def loss(s):
        return jnp.mean((nnx.merge(graphdef, s)(x) - y) ** 2)

    calls = []
    new = riemannion_loi_init(
        _counting(jax.grad(loss), calls), state, jax.random.key(5), oversample=4
    )
    jax.effects_barrier()
    assert len(calls) == 4
    before, after = model(x), nnx.merge(graphdef, new)(x)
    assert float(jnp.max(jnp.abs(after - before))) < 1e-5 * float(jnp.max(jnp.abs(before)))
    s = np.linalg.svd(
        _f64(new["lora"]["lora_a"][...]) @ _f64(new["lora"]["lora_b"][...]), compute_uv=False
    )
    np.testing.assert_allclose(s[:R], 0.01 / np.sqrt(R), rtol=1e-4)


def test_loi_left_gauge_then_riemannion_descends():
    target = np.random.default_rng(10).standard_normal((M, N))
    params = _params(np.zeros((M, R)), np.zeros((R, N)))

    def loss(p):
        return 0.5 * jnp.sum((p["layer"]["lora_a"] @ p["layer"]["lora_b"] - target) ** 2)

    init = riemannion_loi_init(
        jax.grad(loss),
        params,
        jax.random.key(1),
        alpha=0.01,
        gauge="left_orthogonal",
        shift_base=False,
    )
    _check_gauge(init, "left_orthogonal")
    traj, _, _ = _run(init, target, 20, lr=0.2)
    assert 0.5 * np.sum((traj[-1] - target) ** 2) < 0.8 * float(loss(init))


# ------------------------------------------------------------ state and validation


def test_state_mirrors_params_and_mu_dtype():
    a, b, _ = _pair(seed=11)
    params = {**_params(a, b, jnp.bfloat16), "bias": jnp.zeros(N, jnp.bfloat16)}
    tx = riem.riemannion(0.1, mu_dtype="float32")
    state = tx.init(params)
    inner = state.inner_states["riemannion"].inner_state
    assert isinstance(inner, riem.RiemannionState)
    chex.assert_trees_all_equal_structs(inner.mu["layer"], params["layer"])
    assert inner.mu["layer"]["lora_a"].dtype == jnp.float32
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.1), params)
    u, state = jax.jit(tx.update)(grads, state, params)
    mu = state.inner_states["riemannion"].inner_state.mu
    assert mu["layer"]["lora_b"].dtype == jnp.float32
    chex.assert_trees_all_equal_dtypes(u["layer"], params["layer"])
    chex.assert_tree_all_finite(state)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(learning_rate=-0.1), "learning_rate"),
        (dict(learning_rate=0.1, beta=1.0), "beta"),
        (dict(learning_rate=0.1, lora_scale=0.0), "lora_scale"),
        (dict(learning_rate=0.1, eps=1.0), "eps"),
        (dict(learning_rate=0.5, weight_decay=2.0), "weight_decay \\* learning_rate"),
        (dict(learning_rate=0.1, gauge="right"), "gauge"),
    ],
)
def test_bad_hyperparameters_raise(kwargs, match):
    for fn in (riem.scale_by_riemannion, riem.riemannion):
        with pytest.raises(ValueError, match=match):
            fn(**kwargs)


def test_rank_above_min_dim_names_the_pair():
    params = {"blk": {"lora_a": jnp.ones((3, 5)), "lora_b": jnp.ones((5, 8))}}
    with pytest.raises(ValueError, match=r"\['blk'\]\['lora_a'\].*min\(m, n\) = 3"):
        riem.riemannion(0.1).init(params)
    ok = {"blk": {"lora_a": jnp.ones((6, 4)), "lora_b": jnp.ones((4, 8))}}
    with pytest.raises(ValueError, match=r"\['blk'\]\['lora_b'\].*2 × rank"):
        riemannion_loi_init(lambda p: p, ok, jax.random.key(0), alpha=0.1)


def test_pair_only_transformation_rejects_other_leaves_and_needs_params():
    params = {**_params(*_pair()[:2]), "bias": jnp.zeros(3)}
    with pytest.raises(ValueError, match=r"\['bias'\]"):
        riem.scale_by_riemannion(0.1).init(params)
    lora = _params(*_pair()[:2])
    tx = riem.scale_by_riemannion(0.1)
    with pytest.raises(ValueError, match="needs the current parameters"):
        tx.update(lora, tx.init(lora))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(alpha=0.0), ValueError, "alpha"),
        (dict(alpha=float("nan")), ValueError, "alpha"),
        (dict(power_iters=-1), ValueError, "power_iters"),
        (dict(oversample=1.5), TypeError, "oversample"),
        (dict(gauge="x"), ValueError, "gauge"),
        (dict(sketch="x"), ValueError, "sketch"),
    ],
)
def test_loi_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        riemannion_loi_init(lambda p: p, _params(*_pair()[:2]), jax.random.key(0), **kwargs)


def test_stored_momentum_is_checked():
    for fn in (riem.scale_by_riemannion, riem.riemannion):
        with pytest.raises(ValueError, match="stored_momentum.*'buffer', 'direction'"):
            fn(0.1, stored_momentum="projected")


# ------------------------------------------------------------------ optax contract
# Each check compiles the alias a few times, so each runs on one of two variants.

DEFAULT = dict(learning_rate=0.02)
OTHER = dict(
    learning_rate=0.02,
    beta=0.8,
    nesterov=True,
    weight_decay=0.1,
    lora_scale=2.0,
    gauge="left_orthogonal",
    stored_momentum="direction",
)


def test_explicit_sharding_keeps_param_shardings():
    # QR needs whole columns: factors are gathered along m and n, the results go
    # back to the params' shardings, and the numbers match one device.
    mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Explicit,))
    rng = np.random.default_rng(0)
    raw = {
        "lora_a": rng.standard_normal((2, 32, 4)),
        "lora_b": rng.standard_normal((2, 4, 24)),
        "w": rng.standard_normal((2, 8, 4)),
    }
    specs = {"lora_a": P(None, "x", None), "lora_b": P(None, None, "x"), "w": P(None, "x")}
    tx = riem.riemannion(0.1, 0.9)
    with jax.set_mesh(mesh):
        put = lambda x, spec: jax.device_put(jnp.asarray(x, jnp.float32), NamedSharding(mesh, spec))  # noqa: E731
        params = {k: put(v, specs[k]) for k, v in raw.items()}
        grads = {k: put(v * 0.5 + 0.1, specs[k]) for k, v in raw.items()}
        state = tx.init(params)
        updates, new_state = jax.jit(tx.update)(grads, state, params)
        assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)
        assert jax.tree.map(jax.typeof, updates) == jax.tree.map(jax.typeof, params)
    single = {k: jnp.asarray(v, jnp.float32) for k, v in raw.items()}
    g1 = {k: v * 0.5 + 0.1 for k, v in single.items()}
    expected, _ = jax.jit(tx.update)(g1, tx.init(single), single)
    assert_trees_rel_close(jax.device_get(updates), expected)
