"""LoRA-Muon against the float64 reference and the seven properties it must show.

The properties are listed in docs/algorithm.md §Tested properties.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_muon_jax as lmj
from tests import reference
from tests.helpers import (
    ROUTE_TOL,
    ROUTES,
    product,
    regression_loss,
    rel_err,
    spectral_norm,
    well_conditioned,
)

M, N, R = 48, 40, 4


def _trajectory(tx, params, loss, steps):
    """Runs ``steps`` jitted steps of ``tx`` on ``loss(params)``; returns all params."""

    @jax.jit
    def step(p, s):
        g = jax.grad(loss)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(params)
    return out


def _problem(seed=0, batch=(), lora_scale=1.0, m=M, n=N, r=R, cond=2.0):
    rng = np.random.default_rng(seed)
    a = well_conditioned(rng, (*batch, m, r), cond)
    b = well_conditioned(rng, (*batch, r, n), cond)
    target = rng.standard_normal((*batch, m, n))
    return a, b, target


# --------------------------------------------------------------------------------
# Property 1: agreement with the float64 reference, multi-step.


@pytest.mark.parametrize("batch", [(), (3,), (2, 2)], ids=["flat", "stacked", "2-batch-axes"])
@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("lora_scale", [1.0, 2.5])
def test_matches_float64_reference_multistep(batch, nesterov, lora_scale):
    a, b, target = _problem(seed=1, batch=batch, lora_scale=lora_scale)
    lr = optax.linear_schedule(0.05, 0.02, 5)
    hp = dict(beta=0.9, weight_decay=0.3, nesterov=nesterov, lora_scale=lora_scale)
    loss_j, np_grad = regression_loss(lora_scale, jnp.asarray(target, jnp.float32))
    tx = lmj.lora_muon(lr, **hp)
    params = {
        "layer": {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    }
    traj = _trajectory(tx, params, lambda p: loss_j(p["layer"]["lora_a"], p["layer"]["lora_b"]), 5)
    for idx in np.ndindex(*batch):
        _, grad_one = regression_loss(lora_scale, target[idx])
        ref = reference.run(a[idx], b[idx], grad_one, steps=5, lr=lambda t: float(lr(t)), **hp)
        for t, (ra, rb) in enumerate(ref):
            got = traj[t]["layer"]
            assert rel_err(got["lora_a"][idx], ra) < 1e-4, (idx, t)
            assert rel_err(got["lora_b"][idx], rb) < 1e-4, (idx, t)


def test_peft_orientation_matches_reference():
    # PEFT: lora_A (r, in), lora_B (out, r), ΔW = lora_B @ lora_A, so a = lora_B.
    a, b, target = _problem(seed=2)
    loss_j, np_grad = regression_loss(1.0, jnp.asarray(target, jnp.float32))
    params = {
        "q_proj": {"lora_A": jnp.asarray(b, jnp.float32), "lora_B": jnp.asarray(a, jnp.float32)}
    }
    traj = _trajectory(
        lmj.lora_muon(0.05, beta=0.8),
        params,
        lambda p: loss_j(p["q_proj"]["lora_B"], p["q_proj"]["lora_A"]),
        3,
    )
    ref = reference.run(a, b, np_grad, steps=3, lr=0.05, beta=0.8)
    for t, (ra, rb) in enumerate(ref):
        assert rel_err(traj[t]["q_proj"]["lora_B"], ra) < 1e-4
        assert rel_err(traj[t]["q_proj"]["lora_A"], rb) < 1e-4


@pytest.mark.parametrize("route", sorted(ROUTES))
def test_single_step_directions_vs_svd(route):
    # docs/algorithm.md §Routes and fallbacks: the paper route is accurate to ~1e-3
    # (Polar Express leaves singular values in [0.999, 1]); the default is exact to
    # float32 precision.
    rng = np.random.default_rng(3)
    a = well_conditioned(rng, (M, R), 3.0)
    b = well_conditioned(rng, (R, N), 3.0)
    ga = well_conditioned(rng, (M, R), 3.0)
    gb = well_conditioned(rng, (R, N), 3.0)
    tx = lmj.scale_by_lora_muon(beta=0.0, **ROUTES[route])
    p = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    g = {"lora_a": jnp.asarray(ga, jnp.float32), "lora_b": jnp.asarray(gb, jnp.float32)}
    u, _ = jax.jit(tx.update)(g, tx.init(p), p)
    da, db = reference.directions(a, b, ga, gb)
    tol = ROUTE_TOL[route]
    assert rel_err(u["lora_a"], 0.5 * da) < tol
    assert rel_err(u["lora_b"], 0.5 * db) < tol


# --------------------------------------------------------------------------------
# Property 2: the first-order product step is within the budget η, η/2 per term.


@pytest.mark.parametrize("lora_scale", [1.0, 4.0])
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_product_step_budget(lora_scale, route):
    a, b, target = _problem(seed=4, batch=(3,))
    loss_j, _ = regression_loss(lora_scale, jnp.asarray(target, jnp.float32))
    params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    eta = 0.07
    tx = lmj.lora_muon(eta, beta=0.0, lora_scale=lora_scale, **ROUTES[route])
    tol = ROUTE_TOL[route]
    g = jax.grad(lambda p: loss_j(p["lora_a"], p["lora_b"]))(params)
    u, _ = tx.update(g, tx.init(params), params)
    for i in range(3):
        term_a = lora_scale * np.asarray(u["lora_a"][i]) @ b[i]
        term_b = lora_scale * a[i] @ np.asarray(u["lora_b"][i])
        assert spectral_norm(term_a) == pytest.approx(eta / 2, rel=tol)
        assert spectral_norm(term_b) == pytest.approx(eta / 2, rel=tol)
        assert spectral_norm(term_a + term_b) <= eta * (1 + tol)


# --------------------------------------------------------------------------------
# Property 3: gauge invariance of the product trajectory.


def _gauge_trajectory(a, b, target, gauge_left, gauge_right, steps=4, wd=0.2):
    loss_j, _ = regression_loss(1.0, jnp.asarray(target, jnp.float32))
    params = {
        "lora_a": jnp.asarray(a @ gauge_left, jnp.float32),
        "lora_b": jnp.asarray(gauge_right @ b, jnp.float32),
    }
    traj = _trajectory(
        lmj.lora_muon(0.05, beta=0.9, weight_decay=wd),
        params,
        lambda p: loss_j(p["lora_a"], p["lora_b"]),
        steps,
    )
    return [product(p["lora_a"], p["lora_b"]) for p in traj]


@pytest.mark.parametrize("c", [1 / 27, 1 / 9, 1 / 3, 3.0, 9.0, 27.0])
def test_gauge_invariance_scalar(c):
    a, b, target = _problem(seed=5)
    eye = np.eye(R)
    base = _gauge_trajectory(a, b, target, eye, eye)
    scaled = _gauge_trajectory(a, b, target, c * eye, eye / c)
    for p0, p1 in zip(base, scaled, strict=False):
        assert rel_err(p1, p0) < 1e-4


def test_gauge_invariance_general_linear():
    a, b, target = _problem(seed=6)
    rng = np.random.default_rng(60)
    s = well_conditioned(rng, (R, R), 5.0) * 3.0
    base = _gauge_trajectory(a, b, target, np.eye(R), np.eye(R))
    moved = _gauge_trajectory(a, b, target, s, np.linalg.inv(s))
    for p0, p1 in zip(base, moved, strict=False):
        assert rel_err(p1, p0) < 1e-4


# --------------------------------------------------------------------------------
# Property 4 and 5: descent and the projector form at β = 0.


def test_descent_and_projector_form():
    a, b, target = _problem(seed=7)
    loss_j, np_grad = regression_loss(1.0, jnp.asarray(target, jnp.float32))
    params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    eta = 0.1
    tx = lmj.lora_muon(eta, beta=0.0)
    g = jax.grad(lambda p: loss_j(p["lora_a"], p["lora_b"]))(params)
    u, _ = tx.update(g, tx.init(params), params)
    step = np.asarray(u["lora_a"], np.float64) @ b + a @ np.asarray(u["lora_b"], np.float64)
    big_g = a @ b - target
    assert np.sum(big_g * step) < -0.1 * eta * np.linalg.norm(big_g, "nuc") / 2
    expected = -eta * reference.projector_form(a, b, big_g)
    assert rel_err(step, expected) < 1e-5


# --------------------------------------------------------------------------------
# Property 6: finite updates for degenerate factors, fp32 and bf16.


def _one_update(a, b, ga, gb, dtype, **kw):
    params = {"lora_a": jnp.asarray(a, dtype), "lora_b": jnp.asarray(b, dtype)}
    grads = {"lora_a": jnp.asarray(ga, dtype), "lora_b": jnp.asarray(gb, dtype)}
    tx = lmj.lora_muon(0.1, **kw)
    u, state = jax.jit(tx.update)(grads, tx.init(params), params)
    return params, u, state


_rng = np.random.default_rng(8)
_A = _rng.standard_normal((M, R))
_B = _rng.standard_normal((R, N))
_G = _rng.standard_normal((M, N))
_RANK1 = np.outer(_rng.standard_normal(M), _rng.standard_normal(R))
DEGENERATE = {
    "zero_b": (_A, np.zeros((R, N))),
    "zero_both": (np.zeros((M, R)), np.zeros((R, N))),
    "rank_deficient_a": (_RANK1, _B),
    "tiny": (_A * 1e-20, _B * 1e-20),
    "huge": (_A * 1e20, _B * 1e-20),
    "huge_both": (_A * 1e18, _B * 1e18),
    "tiny_a_huge_b": (_A * 1e-20, _B * 1e20),
}


# Each term's size in units of η/2: a zero factor's own term vanishes (its product
# with the update is zero) and so does its partner's update (no momentum); every
# other term has exactly half the budget.
EXPECTED_TERMS = {"zero_b": (0.0, 1.0), "zero_both": (0.0, 0.0)}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("case", sorted(DEGENERATE))
@pytest.mark.parametrize("route", sorted(ROUTES))
def test_finite_and_bounded_for_degenerate_factors(case, dtype, route):
    a, b = DEGENERATE[case]
    ga, gb = _G @ b.T, a.T @ _G
    params, u, _ = _one_update(a, b, ga, gb, dtype, **ROUTES[route])
    for k in u:
        assert u[k].dtype == dtype
        assert bool(jnp.all(jnp.isfinite(u[k].astype(jnp.float32)))), (case, k)
    # Both terms have their exact size, whatever the factor scale: η/2 each, or 0.
    pa, pb = (np.asarray(params[k], np.float64) for k in ("lora_a", "lora_b"))
    ua, ub = (np.asarray(u[k], np.float64) for k in ("lora_a", "lora_b"))
    tol = 0.1 if dtype == jnp.bfloat16 else ROUTE_TOL[route] * 10
    want_a, want_b = EXPECTED_TERMS.get(case, (1.0, 1.0))
    assert spectral_norm(ua @ pb) / 0.05 == pytest.approx(want_a, abs=tol), case
    assert spectral_norm(pa @ ub) / 0.05 == pytest.approx(want_b, abs=tol), case
    if case.startswith("zero"):  # the partner of a zero b gets no momentum, no step
        assert np.all(ua == 0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_zero_init_b_moves_only_b_first(dtype):
    # Flax's nnx.LoRA and PEFT start with b = 0: then g_a = G bᵀ = 0.
    params = {"lora_a": jnp.asarray(_A, dtype), "lora_b": jnp.zeros((R, N), dtype)}
    target = jnp.asarray(_G, jnp.float32)

    def loss(p):
        a, b = p["lora_a"].astype(jnp.float32), p["lora_b"].astype(jnp.float32)
        return 0.5 * jnp.sum((a @ b - target) ** 2)

    tx = lmj.lora_muon(0.1)
    state = tx.init(params)
    g = jax.grad(loss)(params)
    u, state = jax.jit(tx.update)(g, state, params)
    assert bool(jnp.all(u["lora_a"] == 0))
    assert bool(jnp.all(jnp.isfinite(u["lora_b"].astype(jnp.float32))))
    assert float(jnp.abs(u["lora_b"]).max()) > 0
    assert spectral_norm(_A @ np.asarray(u["lora_b"], np.float64)) == pytest.approx(0.05, rel=2e-2)
    params = optax.apply_updates(params, u)
    u2, _ = jax.jit(tx.update)(jax.grad(loss)(params), state, params)
    assert float(jnp.abs(u2["lora_a"]).max()) > 0


# --------------------------------------------------------------------------------
# Property 7: split weight decay decays the product by 1 - λη, factor-wise by (1-λη)².


def test_split_weight_decay_vs_factorwise():
    a, b, _ = _problem(seed=9)
    params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    zero = optax.tree.zeros_like(params)
    lam, eta = 0.5, 0.2
    split = lmj.lora_muon(eta, weight_decay=lam)
    u, _ = split.update(zero, split.init(params), params)
    new = optax.apply_updates(params, u)
    assert rel_err(product(new["lora_a"], new["lora_b"]), (1 - lam * eta) * product(a, b)) < 1e-6
    factorwise = optax.chain(
        lmj.scale_by_lora_muon(),
        optax.add_decayed_weights(lam),
        optax.scale_by_learning_rate(eta),
    )
    u, _ = factorwise.update(zero, factorwise.init(params), params)
    new = optax.apply_updates(params, u)
    assert (
        rel_err(product(new["lora_a"], new["lora_b"]), (1 - lam * eta) ** 2 * product(a, b)) < 1e-6
    )


def test_split_weight_decay_first_order_with_gradient():
    # With a step Δ, (s a + Δa/s)(s b + Δb/s) = (1-λη) ab + Δa b + a Δb + O(Δ²).
    a, b, target = _problem(seed=10)
    loss_j, _ = regression_loss(1.0, jnp.asarray(target, jnp.float32))
    params = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
    g = jax.grad(lambda p: loss_j(p["lora_a"], p["lora_b"]))(params)
    lam, eta = 0.4, 0.01
    plain = lmj.lora_muon(eta, beta=0.0)
    decayed = lmj.lora_muon(eta, beta=0.0, weight_decay=lam)
    u0, _ = plain.update(g, plain.init(params), params)
    u1, _ = decayed.update(g, decayed.init(params), params)
    p0 = optax.apply_updates(params, u0)
    p1 = optax.apply_updates(params, u1)
    first_order = product(p0["lora_a"], p0["lora_b"]) - lam * eta * product(a, b)
    assert rel_err(product(p1["lora_a"], p1["lora_b"]), first_order) < 1e-3 * eta


# --------------------------------------------------------------------------------
# dtypes and state.


def test_state_is_one_momentum_per_factor_and_mu_dtype():
    params = {
        "lora_a": jnp.ones((2, 8, 3), jnp.bfloat16),
        "lora_b": jnp.ones((2, 3, 5), jnp.bfloat16),
    }
    tx = lmj.scale_by_lora_muon(mu_dtype="bfloat16")
    state = tx.init(params)
    assert isinstance(state, lmj.LoRAMuonState)
    assert jax.tree.map(lambda x: (x.shape, x.dtype), state.mu) == jax.tree.map(
        lambda x: (x.shape, x.dtype), params
    )
    f32 = {k: v.astype(jnp.float32) for k, v in params.items()}
    state32 = lmj.scale_by_lora_muon(mu_dtype=jnp.bfloat16).init(f32)
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(state32.mu))
    u, state32 = lmj.scale_by_lora_muon(mu_dtype=jnp.bfloat16).update(f32, state32, f32)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(u))
    assert all(m.dtype == jnp.bfloat16 for m in jax.tree.leaves(state32.mu))
    n_state = sum(x.size for x in jax.tree.leaves(state32.mu))
    assert n_state == sum(x.size for x in jax.tree.leaves(params))


@functools.lru_cache
def _bf16_case():
    rng = np.random.default_rng(11)
    a, b = well_conditioned(rng, (M, R)), well_conditioned(rng, (R, N))
    g = rng.standard_normal((M, N))
    return a, b, g @ b.T, a.T @ g


def test_bf16_params_close_to_f32():
    a, b, ga, gb = _bf16_case()
    _, u16, _ = _one_update(a, b, ga, gb, jnp.bfloat16)
    _, u32, _ = _one_update(
        np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64),
        np.asarray(jnp.asarray(b, jnp.bfloat16), np.float64),
        np.asarray(jnp.asarray(ga, jnp.bfloat16), np.float64),
        np.asarray(jnp.asarray(gb, jnp.bfloat16), np.float64),
        jnp.float32,
    )
    for k in u16:
        assert u16[k].dtype == jnp.bfloat16
        assert rel_err(u16[k].astype(jnp.float32), u32[k]) < 1e-2


def test_many_adapters_equal_one_at_a_time():
    # Same-shape adapters are stacked internally; each must still get its own update.
    rng = np.random.default_rng(12)
    shapes = {"q": (16, 12), "k": (16, 12), "v": (16, 12), "up": (16, 20), "down": (20, 16)}
    params = {
        name: {
            "lora_a": jnp.asarray(rng.standard_normal((m, 3)), jnp.float32),
            "lora_b": jnp.asarray(rng.standard_normal((3, n)), jnp.float32),
        }
        for name, (m, n) in shapes.items()
    }
    params["k"]["lora_b"] = jnp.zeros((3, 12))  # one zero-init pair inside a stacked group
    grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    tx = lmj.lora_muon(0.1, beta=0.5)
    together, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for name in shapes:
        alone, _ = tx.update(grads[name], tx.init(params[name]), params[name])
        for k in ("lora_a", "lora_b"):
            np.testing.assert_allclose(together[name][k], alone[k], rtol=1e-5, atol=1e-7)


def test_adamw_fallback_updates_in_param_dtype_with_f32_momentum():
    params = {
        "lora_a": jnp.ones((6, 2), jnp.bfloat16),
        "lora_b": jnp.ones((2, 5), jnp.bfloat16),
        "bias": jnp.ones((5,), jnp.bfloat16),
    }
    tx = lmj.lora_muon(0.1, mu_dtype="float32")
    u, state = jax.jit(tx.update)(params, tx.init(params), params)
    assert {k: v.dtype for k, v in u.items()} == {k: jnp.bfloat16 for k in params}
    mu = state.inner_states["lora_muon"].inner_state[0].mu
    assert mu["lora_a"].dtype == mu["lora_b"].dtype == jnp.float32


@pytest.mark.parametrize("fn", ["lora_muon", "scale_by_lora_muon"])
@pytest.mark.parametrize(
    "kw,shown",
    [
        (dict(solver="eigh"), "solver='eigh'"),
        (dict(solver="cholesky"), "solver='cholesky'"),
        (dict(eps=1e-4), "eps=0.0001"),
        (dict(solver="newton_schulz", eps=0.0), "solver='newton_schulz', eps=0"),
    ],
)
def test_paper_method_rejects_the_gram_only_arguments(fn, kw, shown):
    factory = getattr(lmj, fn)
    args = (0.1,) if fn == "lora_muon" else ()
    with pytest.raises(ValueError, match=r"method=\"paper\" ignores `solver` and `eps`") as err:
        factory(*args, method="paper", **kw)
    assert f"got {shown}. " in str(err.value)
    assert err.value.args[0].startswith(f"{fn}:")


def test_paper_method_takes_the_defaults_and_inject_hyperparams():
    params = {"lora_a": jnp.ones((6, 2)).at[0, 1].set(2.0), "lora_b": jnp.ones((2, 5))}
    for tx in (
        lmj.lora_muon(0.1, method="paper"),
        lmj.lora_muon(0.1, method="paper", solver="auto", eps=1e-6),
        lmj.scale_by_lora_muon(method="paper", eps=np.float32(1e-6)),
        # eps becomes a float32 array in the state: still the default.
        optax.inject_hyperparams(lmj.lora_muon, static_args=("method",))(
            learning_rate=0.1, method="paper", eps=1e-6
        ),
    ):
        u, _ = jax.jit(tx.update)(params, tx.init(params), params)
        assert all(np.isfinite(x).all() for x in jax.tree.leaves(u))
    with pytest.raises(ValueError, match=r"got eps=0\.001\. "):
        inject = optax.inject_hyperparams(lmj.lora_muon, static_args=("method",))
        inject(learning_rate=0.1, method="paper", eps=1e-3).init(params)


def test_removed_eigh_method_name_is_rejected():
    with pytest.raises(ValueError, match=r"`method` must be one of \['gram', 'paper'\]"):
        lmj.lora_muon(0.1, method="eigh")  # type: ignore[arg-type]
