"""LoRA-Pre (Adam and Muon variants): equations, state size, dense limit, contract."""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from optax.contrib import MuonDimensionNumbers

from lora_muon_jax.peers import _lora_pre as lp
from tests import contract
from tests.helpers import rel_err

# The LoRA problem of the contract, with pair detection off: its factors are then
# just two stacked dense matrices next to a bias.
DENSE = {"pairs": ()}
ADAM_VARIANTS = {
    "adam": dict(learning_rate=0.02, rank=2, **DENSE),
    "adam_wd": dict(learning_rate=0.02, rank=3, weight_decay=0.1, b2=0.99, **DENSE),
}
MUON_VARIANTS = {
    "muon": dict(learning_rate=0.02, rank=2, **DENSE),
    "muon_nesterov_svd": dict(
        learning_rate=0.02, rank=3, nesterov=True, orthogonalizer="svd", **DENSE
    ),
}
ALL = [(lp.lora_pre_adam, v) for v in ADAM_VARIANTS.values()] + [
    (lp.lora_pre_muon, v) for v in MUON_VARIANTS.values()
]
IDS = list(ADAM_VARIANTS) + list(MUON_VARIANTS)


# ---------------------------------------------------------------- float64 reference


def _np_newton(t, b, a, gamma, delta, order):
    eye = np.eye(a.shape[0])
    new_b = (1 - gamma) * b + gamma * t @ a.T @ np.linalg.inv(a @ a.T + delta * eye)
    b = new_b if order == "gauss_seidel" else b
    new_a = (1 - gamma) * a + gamma * np.linalg.inv(b.T @ b + delta * eye) @ b.T @ t
    return new_b, new_a


def _np_msign(x):
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    return (u * (s > 1e-12 * s.max())) @ vt


def _reference(
    kind, grads, factors, *, b1=0.9, b2=0.999, eps=1e-8, delta=1e-6, nesterov=False, order
):
    """LoRA-Pre from the equations (docs/peers.md §LoRA-Pre), float64, one 2-D matrix."""
    f = [np.asarray(x, np.float64) for x in factors]
    out = []
    for t, g in enumerate(np.asarray(grads, np.float64), start=1):
        if kind == "adam":
            mb, ma, vb, va = f
            m = b1 * mb @ ma + (1 - b1) * g
            v = b2 * (vb @ va) ** 2 + (1 - b2) * g**2
            f = [
                *_np_newton(g, mb, ma, 1 - np.sqrt(b1), delta, order),
                *_np_newton(np.abs(g), vb, va, 1 - b2**0.25, delta, order),
            ]
            out.append((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps))
        else:
            mb, ma = f
            m = b1 * mb @ ma + (1 - b1) * g
            f = list(_np_newton(g, mb, ma, 1 - np.sqrt(b1), delta, order))
            d = b1 * m / (1 - b1 ** (t + 1)) + (1 - b1) * g / (1 - b1**t) if nesterov else m
            out.append(_np_msign(d))
    return np.stack(out), f


@pytest.mark.parametrize(
    "kind,order,nesterov",
    [("adam", "jacobi", False), ("muon", "gauss_seidel", False), ("muon", "jacobi", True)],
)
def test_matches_float64_reference_on_stacked_leaf(kind, order, nesterov):
    rng = np.random.default_rng(0)
    steps, layers, p, q, r = 6, 2, 7, 5, 3
    grads = rng.standard_normal((steps, layers, p, q)) + 2.0 * rng.standard_normal((layers, p, 1))
    if kind == "adam":
        tx = lp.scale_by_lora_pre_adam(
            0.8, 0.95, 1e-6, rank=r, damping=1e-4, seed=3, factor_update=order
        )
        ref_kw = dict(b1=0.8, b2=0.95, eps=1e-6, delta=1e-4, order=order)
    else:
        tx = lp.scale_by_lora_pre_muon(
            0.8,
            rank=r,
            orthogonalizer="svd",
            damping=1e-4,
            seed=3,
            factor_update=order,
            nesterov=nesterov,
        )
        ref_kw = dict(b1=0.8, delta=1e-4, order=order, nesterov=nesterov)
    state = tx.init({"w": jnp.zeros((layers, p, q))})
    init = [np.asarray(x["w"]) for x in state[1:]]
    got = []
    for g in grads:
        u, state = jax.jit(tx.update)({"w": jnp.asarray(g, jnp.float32)}, state)
        got.append(np.asarray(u["w"]))
    got = np.stack(got, axis=1)
    for i in range(layers):
        want, final = _reference(kind, grads[:, i], [x[i] for x in init], **ref_kw)
        np.testing.assert_allclose(got[i], want, rtol=2e-4, atol=2e-5, err_msg=f"{kind} layer {i}")
        for x, y in zip(state[1:], final, strict=False):
            np.testing.assert_allclose(np.asarray(x["w"][i]), y, rtol=2e-4, atol=1e-5)


def test_muon_default_has_no_nesterov_term():
    # The sources of the paper's Algorithm 2 orthogonalize the plain momentum. With
    # m_B = 0 the first direction is g either way; from step 2 Nesterov's differs.
    for fn in (lp.scale_by_lora_pre_muon, lp.lora_pre_muon):
        assert inspect.signature(fn).parameters["nesterov"].default is False
    rng = np.random.default_rng(2)
    grads = rng.standard_normal((3, 6, 5))
    outs = {}
    for nesterov in (False, True):
        tx = lp.scale_by_lora_pre_muon(0.9, rank=5, orthogonalizer="svd", nesterov=nesterov, seed=1)
        state, us = tx.init({"w": jnp.zeros((6, 5))}), []
        for g in grads:
            u, state = tx.update({"w": jnp.asarray(g, jnp.float32)}, state)
            us.append(np.asarray(u["w"]))
        outs[nesterov] = us
    default = lp.scale_by_lora_pre_muon(0.9, rank=5, orthogonalizer="svd", seed=1)
    state = default.init({"w": jnp.zeros((6, 5))})
    for g, want in zip(grads, outs[False], strict=False):
        u, state = default.update({"w": jnp.asarray(g, jnp.float32)}, state)
        np.testing.assert_allclose(np.asarray(u["w"]), want, atol=1e-6)
    np.testing.assert_allclose(outs[True][0], outs[False][0], atol=1e-5)
    assert np.abs(outs[True][2] - outs[False][2]).max() > 1e-2


def test_newton_step_products_at_full_square_rank():
    # Square invertible factors, no damping: Gauss–Seidel's product is exactly the
    # EMA (1-γ)² M + (1-(1-γ)²) T; Jacobi's adds γ² (T M⁻¹ T - T), which grows like
    # ‖T‖²/‖M‖ as the product M shrinks next to the target T.
    rng = np.random.default_rng(1)
    b, a, t = (rng.standard_normal((4, 4)) + 3 * np.eye(4) for _ in range(3))
    gamma = 0.1
    args = [jnp.asarray(x, jnp.float32) for x in (t, b, a)] + [jnp.float32(gamma), jnp.float32(0.0)]
    m = b @ a
    ema = (1 - gamma) ** 2 * m + (1 - (1 - gamma) ** 2) * t
    nb, na = lp.newton_step(*args, "gauss_seidel")
    np.testing.assert_allclose(np.asarray(nb @ na), ema, rtol=1e-4, atol=1e-4)
    nb, na = lp.newton_step(*args, "jacobi")
    jacobi = ema + gamma**2 * (t @ np.linalg.inv(m) @ t - t)
    np.testing.assert_allclose(np.asarray(nb @ na), jacobi, rtol=1e-4, atol=1e-4)


def test_damped_inverse_falls_back_when_cholesky_fails():
    # A Gram that rounding made slightly indefinite: Cholesky of gram + δI fails.
    q, _ = np.linalg.qr(np.random.default_rng(2).standard_normal((3, 3)))
    gram = (q * np.array([1e4, 1.0, -1e-3])) @ q.T
    rhs = np.arange(6.0).reshape(3, 2)
    gram32 = jnp.asarray(gram, jnp.float32)
    assert not np.isfinite(np.asarray(jnp.linalg.cholesky(gram32 + 1e-6 * jnp.eye(3)))).all()
    # Batched with a healthy Gram of the same size: the whole batch takes the fallback.
    inv, healthy = lp._damped_inverses([gram32, jnp.eye(3)[None]], jnp.float32(1e-6))
    np.testing.assert_allclose(np.asarray(healthy), np.eye(3)[None] / (1 + 1e-6), rtol=1e-5)
    got = inv @ jnp.asarray(rhs, jnp.float32)
    # Negative eigenvalues are clipped to zero before the damping is added.
    want = (q / (np.maximum([1e4, 1.0, -1e-3], 0) + 1e-6)) @ q.T @ rhs
    np.testing.assert_allclose(np.asarray(got), want, rtol=2e-2)


# ------------------------------------------------------------------ Adam / Muon limit


def _first_update(tx, g):
    return jax.jit(lambda g: tx.update(g, tx.init(g), g)[0])(g)


@pytest.mark.parametrize("rank", [1])
def test_first_step_is_exactly_adams_and_muons(rank):
    # m_B = 0 at init, so step 1 uses only the fresh gradient, whatever the rank.
    g = {"w": jax.random.normal(jax.random.key(0), (9, 6))}
    u = _first_update(lp.scale_by_lora_pre_adam(rank=rank), g)
    # optax rounds 1 - b2 and its bias correction differently (~1e-5 relative).
    chex.assert_trees_all_close(u, _first_update(optax.scale_by_adam(), g), rtol=5e-5)
    u = _first_update(lp.lora_pre_muon(0.1, rank=rank), g)
    # Newton–Schulz in two programs: fusion-dependent float32 rounding, amplified
    # (measured 1.2e-6 relative with XLA's default emitters, 1.2e-5 with the suite's).
    assert rel_err(u["w"], _first_update(optax.contrib.muon(0.1), g)["w"]) < 1e-4


def _gaps(make, reference, grads, moment_of):
    """Relative gaps (update, moment) to the dense optimizer, averaged over the last half."""

    def run(tx):
        def body(s, g):
            u, s = tx.update({"w": g}, s)
            return s, (u["w"], moment_of(s))

        return jax.lax.scan(body, tx.init({"w": grads[0]}), grads)[1]

    def rel(x, y):
        return jnp.linalg.norm(x - y, axis=(1, 2)) / jnp.linalg.norm(y, axis=(1, 2))

    u_ref, m_ref = jax.jit(lambda: run(reference))()
    out = {}
    for r in RANKS:
        u, m = jax.jit(lambda r=r: run(make(r)))()
        half = grads.shape[0] // 2
        out[r] = (float(rel(u, u_ref)[half:].mean()), float(rel(m, m_ref)[half:].mean()))
    return out


RANKS = (1, 4, 8)  # 8 = min(p, q): full rank


@pytest.fixture(scope="module")
def gradient_stream():
    # A fixed, signal-dominated gradient stream of a 12×8 matrix: a mean with singular
    # values 3·0.7^k plus noise 0.01; both optimizers see the same gradients.
    rng = np.random.default_rng(0)
    u, _ = np.linalg.qr(rng.standard_normal((12, 8)))
    v, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    mean = (u * 3 * 0.7 ** np.arange(8)) @ v.T
    return jnp.asarray(mean + 0.01 * rng.standard_normal((120, 12, 8)), jnp.float32)


def test_adam_variant_approaches_adam_as_rank_grows(gradient_stream):
    b2 = 0.9  # a short second-moment transient; see the warning in the docstring
    gaps = _gaps(
        lambda r: lp.scale_by_lora_pre_adam(b2=b2, rank=r),
        optax.scale_by_adam(b2=b2),
        gradient_stream,
        lambda s: s.m_b["w"] @ s.m_a["w"] if hasattr(s, "m_b") else s.mu["w"],
    )
    updates = [gaps[r][0] for r in RANKS]
    moments = [gaps[r][1] for r in RANKS]
    # The stored first moment is a rank-r estimate of Adam's: its error falls with r.
    assert all(x > y for x, y in zip(moments, moments[1:], strict=False)), moments
    assert moments[-1] < 0.01, moments
    # The update (a ratio of two low-rank estimates) need not improve monotonically
    # below full rank, but at full rank it is close to Adam's and far better than any
    # lower rank.
    assert updates[-1] < 0.1, updates
    assert updates[-1] < 0.2 * min(updates[:-1]), updates


def test_muon_variant_approaches_muon_as_rank_grows(gradient_stream):
    dims = {"w": MuonDimensionNumbers()}
    gaps = _gaps(
        lambda r: lp.scale_by_lora_pre_muon(rank=r),
        optax.contrib.scale_by_muon(weight_dimension_numbers=dims),
        gradient_stream,
        lambda s: s.m_b["w"] @ s.m_a["w"] if hasattr(s, "m_b") else s.mu["w"],
    )
    updates = [gaps[r][0] for r in RANKS]
    moments = [gaps[r][1] for r in RANKS]
    assert all(x > y for x, y in zip(moments, moments[1:], strict=False)), moments
    assert moments[-1] < 0.01, moments
    assert updates[-1] < 0.02, updates
    assert updates[-1] < 0.1 * min(updates[:-1]), updates


# --------------------------------------------------------------------- state, errors


def _state_floats(state) -> int:
    return sum(x.size for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.floating))


@pytest.mark.parametrize("factory,per_matrix", [(lp.lora_pre_adam, 2), (lp.lora_pre_muon, 1)])
def test_state_size_is_exactly_factor_size(factory, per_matrix):
    params = {"w": jnp.zeros((3, 20, 12)), "v": jnp.zeros((10, 30)), "tiny": jnp.zeros((2, 4))}
    rank = 5
    matrix_only = jax.eval_shape(factory(0.1, rank=rank).init, params)
    want = per_matrix * (3 * (20 + 12) * 5 + (10 + 30) * 5 + (2 + 4) * 2)  # r capped at 2
    assert _state_floats(matrix_only) == want
    counts = [x for x in jax.tree.leaves(matrix_only) if jnp.issubdtype(x.dtype, jnp.integer)]
    assert all(x.size == 1 for x in counts)  # step counters only (ours and AdamW's)
    # A bias costs AdamW's 2 floats per element on top.
    with_bias = jax.eval_shape(factory(0.1, rank=rank).init, {**params, "b": jnp.zeros(7)})
    assert _state_floats(with_bias) == want + 2 * 7


def test_rejects_lora_pairs_with_a_clear_message():
    params, _ = contract.lora_problem()
    for make in (
        lambda: lp.lora_pre_adam(0.1, rank=2),
        lambda: lp.lora_pre_muon(0.1, rank=2),
        lambda: lp.scale_by_lora_pre_adam(rank=2),
    ):
        with pytest.raises(ValueError, match="dense-weight") as err:
            make().init(params)
        msg = str(err.value)
        assert "['layer']['lora_a']" in msg and "['layer']['lora_b']" in msg
        assert "lora_muon" in msg and "pairs=()" in msg
    # The building block checks in `update` too (e.g. after a custom init).
    state = jax.eval_shape(lp.scale_by_lora_pre_muon(rank=2, pairs=()).init, params["layer"])
    with pytest.raises(ValueError, match="LoRA factor pairs"):
        lp.scale_by_lora_pre_muon(rank=2).update(params["layer"], state)


def test_building_blocks_reject_vectors_and_bad_hyperparameters():
    with pytest.raises(ValueError, match=r"\['b'\].*lora_pre_adam"):
        lp.scale_by_lora_pre_adam(rank=2).init({"w": jnp.zeros((3, 3)), "b": jnp.zeros(3)})
    with pytest.raises(TypeError, match="static_args"):
        lp.lora_pre_adam(0.1, rank=2.0)
    with pytest.raises(ValueError, match="rank"):
        lp.lora_pre_muon(0.1, rank=0)
    with pytest.raises(ValueError, match="b2"):
        lp.lora_pre_adam(0.1, b2=1.0, rank=2)
    with pytest.raises(ValueError, match="orthogonalizer"):
        lp.lora_pre_muon(0.1, rank=2, orthogonalizer="qr")
    with pytest.raises(ValueError, match="ns_coeffs"):
        lp.lora_pre_muon(0.1, rank=2, ns_coeffs=(1.0, 2.0))
    with pytest.raises(ValueError, match="damping"):
        lp.lora_pre_adam(0.1, rank=2, damping=0.0)


def test_rank_must_be_static_under_inject_hyperparams():
    params = {"w": jnp.zeros((4, 3))}
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(lp.lora_pre_adam)(learning_rate=0.1, rank=2).init(params)
    tx = optax.inject_hyperparams(lp.lora_pre_adam, static_args=("rank",))(
        learning_rate=0.1, rank=2
    )
    jax.jit(tx.update)(params, jax.jit(tx.init)(params), params)


@pytest.mark.parametrize("factory", [lp.lora_pre_adam, lp.lora_pre_muon])
def test_bf16_zero_gradients_type_stable_and_multisteps(factory):
    params = {"w": jnp.zeros((2, 6, 4), jnp.bfloat16), "b": jnp.zeros(4, jnp.bfloat16)}
    zeros = jax.tree.map(jnp.zeros_like, params)
    tx = factory(0.1, rank=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    u, new_state = update(zeros, state, params)
    u, new_state = update(zeros, new_state, params)
    chex.assert_tree_all_finite((u, new_state))
    chex.assert_trees_all_equal(u, zeros)  # no NaN from m_B = 0, no motion from g = 0
    chex.assert_trees_all_equal_dtypes(u, params)
    assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)
    if factory is lp.lora_pre_adam:  # the MultiSteps plumbing is the same for both
        multi = optax.MultiSteps(tx, every_k_schedule=2)
        u, _ = jax.jit(multi.update)(zeros, multi.init(params), params)
        chex.assert_trees_all_equal(u, zeros)


@pytest.mark.parametrize("factory", [lp.scale_by_lora_pre_adam, lp.scale_by_lora_pre_muon])
def test_state_dtype_none_keeps_each_params_dtype(factory, recwarn):
    # None once meant jnp.dtype(None) = float64: float32 with a truncation warning
    # without x64, float64 with it. Now it is each leaf's own dtype.
    params = {"h": jnp.zeros((6, 4), jnp.float16), "b": jnp.zeros((2, 5, 3), jnp.bfloat16)}
    tx = factory(rank=2, state_dtype=None)
    state = tx.init(params)
    moments = [getattr(state, f) for f in type(state)._fields if f != "count"]
    assert moments and all(
        m["h"].dtype == jnp.float16 and m["b"].dtype == jnp.bfloat16 for m in moments
    )
    grads = jax.tree.map(lambda x: jnp.ones_like(x) * 0.1, params)
    u, new_state = jax.jit(tx.update)(grads, state)
    assert jax.tree.map(jax.typeof, new_state) == jax.tree.map(jax.typeof, state)
    chex.assert_trees_all_equal_dtypes(u, params)
    assert not [w for w in recwarn if "float64" in str(w.message)]


def test_seed_sets_the_random_factors():
    params = {"w": jnp.zeros((5, 4))}
    a0 = lp.lora_pre_adam(0.1, rank=2, seed=0).init(params)
    a1 = lp.lora_pre_adam(0.1, rank=2, seed=1).init(params)

    def inner(state):
        return state.inner_states["matrix"].inner_state[0]

    assert not np.allclose(inner(a0).m_a["w"], inner(a1).m_a["w"])
    assert not np.allclose(inner(a0).m_a["w"], inner(a0).v_a["w"])  # independent draws
    assert float(jnp.std(inner(a0).m_a["w"])) == pytest.approx(0.02, rel=0.6)


# -------------------------------------------------------------------------- contract
# The contract's LoRA problem with `pairs=()`: two stacked dense matrices and a bias.

STATIC = {lp.lora_pre_adam: ("rank",), lp.lora_pre_muon: ("rank", "ns_steps")}


@pytest.mark.parametrize("factory,lr", [(lp.lora_pre_adam, 1e-2), (lp.lora_pre_muon, 1e-2)])
def test_converges_on_optax_common_problems(factory, lr):
    contract.check_converges_on_common_problems(factory(learning_rate=lr, rank=1))


def test_jacobi_muon_variant_diverges_where_gauss_seidel_converges():
    # Why Gauss–Seidel is the default: near the optimum of a quadratic Muon's momentum
    # averages out, and Jacobi's second-order term then dominates the buffer.
    init, final, loss = contract.matrix_parabola()
    results = {}
    for order in ("gauss_seidel", "jacobi"):
        tx = lp.lora_pre_muon(1e-2, rank=2, factor_update=order)
        step = contract._step(tx, loss)

        def body(carry, _, step=step):
            return step(*carry), None

        (p, _), _ = jax.lax.scan(body, (init, tx.init(init)), length=3000)
        results[order] = float(loss(p))
    assert results["gauss_seidel"] < 1e-3 and results["jacobi"] > 1.0, results


def test_nnx_optimizer_on_a_dense_mlp():
    model = nnx.Sequential(
        nnx.Linear(6, 16, rngs=nnx.Rngs(0)), nnx.relu, nnx.Linear(16, 3, rngs=nnx.Rngs(1))
    )
    optimizer = nnx.Optimizer(model, lp.lora_pre_muon(0.02, rank=4), wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(2), (32, 6))
    y = jax.random.normal(jax.random.key(3), (32, 3))

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - y) ** 2))(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer)) for _ in range(30)]
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0]
