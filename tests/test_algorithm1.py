"""Algorithm 1 for one pair, and the batched engine against it.

``lora_muon_pair_step`` is the paper's Algorithm 1 written for one pair; it is checked
against the independent float64 NumPy reference (``tests/reference.py``). The
batched engine behind ``lora_muon`` (every pair of a tree at once, each factor in its
stored layout, r×r work stacked) must then give the same trajectory as running
Algorithm 1 on every pair separately, for every r×r solver.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import lora_muon_jax as lmj
from tests import reference
from tests.helpers import rel_err, well_conditioned

HP = dict(beta=0.9, weight_decay=0.2, lora_scale=1.5)


def _regression(rng, m, n):
    target = rng.standard_normal((m, n))

    def grads(a, b):
        g = 1.5 * a @ b - target
        return 1.5 * g @ b.T, 1.5 * a.T @ g

    return grads


@pytest.mark.parametrize("nesterov", [False, True])
def test_algorithm1_matches_float64_reference(nesterov):
    rng = np.random.default_rng(0)
    a, b = well_conditioned(rng, (20, 4), 3.0), well_conditioned(rng, (4, 15), 3.0)
    grads = _regression(rng, 20, 15)
    ref = reference.run(a, b, grads, steps=4, lr=0.05, nesterov=nesterov, **HP)
    ja, jb = jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32)
    state = lmj.PairState(jnp.zeros_like(ja), jnp.zeros_like(jb))
    for ra, rb in ref:
        ga, gb = (jnp.asarray(g, jnp.float32) for g in grads(np.asarray(ja), np.asarray(jb)))
        ja, jb, state = lmj.lora_muon_pair_step(
            ja, jb, ga, gb, state, learning_rate=0.05, nesterov=nesterov, **HP
        )
        assert rel_err(ja, ra) < 1e-5 and rel_err(jb, rb) < 1e-5


# Layouts as stored by real libraries: (a shape, b shape, PairRule or preset).
_SCANNED_MIDDLE = lmj.PairRule(
    "lora_a",
    "lora_b",
    a_axes=lmj.FactorAxes(rank_axis=-1, batch_axes=(1,)),
    b_axes=lmj.FactorAxes(rank_axis=0, batch_axes=(1,)),
)
LAYOUTS = {
    # flax: a (L, m, r), b (L, r, n)
    "flax_stacked": ({"lora_a": (3, 24, 4), "lora_b": (3, 4, 18)}, "flax"),
    # PEFT: lora_B (out, r) is the left factor, lora_A (r, in) the right one
    "peft": ({"lora_B": (24, 4), "lora_A": (4, 18)}, "peft"),
    # MaxText scanned: a (emb, L, r), b (r, L, heads, head_dim)
    "scanned_middle": ({"lora_a": (24, 2, 4), "lora_b": (4, 2, 3, 6)}, _SCANNED_MIDDLE),
}


def _tree(rng, shapes):
    return {k: jnp.asarray(well_conditioned(rng, s, 3.0), jnp.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("solver", ["cholesky", "newton_schulz", "eigh"])
@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_engine_equals_algorithm1_on_every_pair(layout, solver):
    shapes, pairs = LAYOUTS[layout]
    rng = np.random.default_rng(1)
    params = {"x": _tree(rng, shapes), "y": _tree(rng, shapes)}
    (pair_x, pair_y) = lmj.find_lora_pairs(params, pairs)
    targets = [
        jnp.asarray(rng.standard_normal((int(np.prod(p.batch_shape)), p.m, p.n)), jnp.float32)
        for p in (pair_x, pair_y)
    ]

    def canonical(tree):
        flat = jax.tree.leaves(tree)
        out = []
        for p in (pair_x, pair_y):
            a = p.canonical(flat[p.a_index], "a").reshape(-1, p.m, p.rank)
            b = p.canonical(flat[p.b_index], "b").reshape(-1, p.rank, p.n)
            out.append((a, b))
        return out

    def loss(tree):
        return sum(
            0.5 * jnp.sum((1.5 * a @ b - t) ** 2)
            for (a, b), t in zip(canonical(tree), targets, strict=False)
        )

    tx = lmj.lora_muon(0.05, pairs=pairs, solver=solver, **HP)

    @jax.jit
    def step(params, state):
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    expected = canonical(params)
    pair_states = [lmj.PairState(jnp.zeros_like(a), jnp.zeros_like(b)) for a, b in expected]
    for _ in range(3):
        params, state = step(params, state)
        for j, ((a, b), t) in enumerate(zip(expected, targets, strict=False)):
            g = 1.5 * a @ b - t
            ga, gb = 1.5 * g @ jnp.swapaxes(b, -1, -2), 1.5 * jnp.swapaxes(a, -1, -2) @ g
            one = jax.vmap(lambda *x: lmj.lora_muon_pair_step(*x, learning_rate=0.05, **HP))
            a, b, pair_states[j] = one(a, b, ga, gb, pair_states[j])
            expected[j] = (a, b)
        for (ga, gb), (ea, eb) in zip(canonical(params), expected, strict=False):
            assert rel_err(ga, ea) < 1e-5 and rel_err(gb, eb) < 1e-5


@pytest.mark.parametrize("route", ["cholesky", "newton_schulz", "eigh"])
def test_every_route_within_1e_5_of_float64_up_to_gram_condition_100(route):
    # Factors and momenta with condition number 10, so the r×r Grams have 100:
    # golden values are the float64 SVD/eigh directions of tests/reference.py.
    rng = np.random.default_rng(2)
    for _ in range(3):
        a, b = well_conditioned(rng, (64, 8), 10.0), well_conditioned(rng, (8, 48), 10.0)
        ga, gb = well_conditioned(rng, (64, 8), 10.0), well_conditioned(rng, (8, 48), 10.0)
        p = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
        g = {"lora_a": jnp.asarray(ga, jnp.float32), "lora_b": jnp.asarray(gb, jnp.float32)}
        tx = lmj.scale_by_lora_muon(beta=0.0, solver=route)
        u, _ = jax.jit(tx.update)(g, tx.init(p), p)
        da, db = reference.directions(a, b, ga, gb)
        assert rel_err(2 * u["lora_a"], da) < 1e-5
        assert rel_err(2 * u["lora_b"], db) < 1e-5


@pytest.mark.parametrize("route", ["auto", "eigh"])
def test_float64_factors_take_float64_r_by_r_work_under_x64(route):
    # Golden values: the float64 SVD/eigh directions of tests/reference.py. With
    # float32 Grams the error would be ~1e-7 (measured before the engine chose its
    # work dtype from the factors: 9e-8 to 2e-7); float64 work gives ~1e-14.
    rng = np.random.default_rng(3)
    a, b = well_conditioned(rng, (64, 8), 10.0), well_conditioned(rng, (8, 48), 10.0)
    ga, gb = well_conditioned(rng, (64, 8), 10.0), well_conditioned(rng, (8, 48), 10.0)
    with jax.enable_x64(True):
        p = {"lora_a": jnp.asarray(a, jnp.float64), "lora_b": jnp.asarray(b, jnp.float64)}
        g = {"lora_a": jnp.asarray(ga, jnp.float64), "lora_b": jnp.asarray(gb, jnp.float64)}
        tx = lmj.scale_by_lora_muon(beta=0.0, solver=route)
        u, state = jax.jit(tx.update)(g, tx.init(p), p)
        assert u["lora_a"].dtype == u["lora_b"].dtype == jnp.float64
        assert state.mu["lora_a"].dtype == jnp.float64
        da, db = reference.directions(a, b, ga, gb)
        assert rel_err(2 * u["lora_a"], da) < 1e-10
        assert rel_err(2 * u["lora_b"], db) < 1e-10
