"""Unit tests of :mod:`lora_muon_jax._grams` against float64 NumPy.

Golden values: every reference is computed by NumPy in float64 (``np.einsum``,
``np.linalg.norm(x, 2)``) from the *same* float32 numbers the library receives, so
the only error measured is the library's own float32 arithmetic.

Error model (holds on any IEEE CPU whatever the summation order): a float32 dot
product of length ``n`` errs by at most ``γ_n |x|ᵀ|y|`` with ``γ_n ≈ n·u``,
``u = eps_f32/2`` (Higham, Thm 3.5), plus ``u`` for the rounding of the result.
The tolerances below are ``(n + 2)·eps_f32`` times those magnitudes: twice the
worst-case bound, so never flaky, and still ~1e5 times smaller than the errors of a
wrong contraction, a missing transpose or a wrong scale.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lora_muon_jax import _grams
from lora_muon_jax._grams import canonical_layout, gram
from lora_muon_jax._pair_types import FactorLayout

EPS32 = float(np.finfo(np.float32).eps)

# (name, stored shape, layout, einsum of xᵀy in that layout). The last axis letter
# of each operand pattern is the rank; the output is (*batch, r, r).
LAYOUTS = [
    ("tall (*batch, m, r)", (3, 24, 4), canonical_layout(3, True), "bmr,bms->brs"),
    ("wide (r, n)", (4, 20), canonical_layout(2, False), "rn,sn->rs"),
    ("stacked wide (*batch, r, n)", (2, 5, 16), canonical_layout(3, False), "brn,bsn->brs"),
    ("PEFT lora_A (r, in)", (6, 32), FactorLayout(0, (), (1,)), "ri,si->rs"),
    ("PEFT lora_B (out, r)", (28, 6), FactorLayout(1, (), (0,)), "or,os->rs"),
    # MaxText's (emb, layers, r): the batch axis sits between matrix and rank axes.
    (
        "batch in the middle (emb, layers, r)",
        (16, 3, 4),
        FactorLayout(2, (1,), (0,)),
        "elr,els->lrs",
    ),
    # gemma's (heads, head_dim, r): two matrix axes contracted together.
    ("two matrix axes (heads, head_dim, r)", (2, 8, 5), FactorLayout(2, (), (0, 1)), "hdr,hds->rs"),
    # batch axes listed out of storage order: result is (*batch) in layout order.
    (
        "batch axes (2, 0) of (L, r, H, n)",
        (2, 3, 4, 6),
        FactorLayout(1, (2, 0), (3,)),
        "lrhn,lshn->hlrs",
    ),
]


def _rand(rng, shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def _jit(fn, layouts):
    """``fn`` jitted on the arrays only: layouts are static (NamedTuples would be traced)."""
    return jax.jit(lambda *xs: fn(list(zip(xs, layouts, strict=True))))


def _contracted_length(shape, layout):
    return int(np.prod([shape[i] for i in layout.matrix_axes]))


@pytest.mark.parametrize(("name", "shape", "layout", "spec"), LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_gram_matches_float64_einsum(name, shape, layout, spec):
    rng = np.random.default_rng(0)
    x = _rand(rng, shape)
    got = np.asarray(jax.jit(lambda x: gram(x, layout))(x))
    x64 = x.astype(np.float64)
    want = np.einsum(spec, x64, x64)
    bound = np.einsum(spec, np.abs(x64), np.abs(x64))  # |x|ᵀ|x|
    n = _contracted_length(shape, layout)
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_less(np.abs(got - want), (n + 2) * EPS32 * bound + 1e-30)
    # symmetric PSD, as a Gram must be
    np.testing.assert_allclose(got, np.swapaxes(got, -1, -2), atol=(n + 2) * EPS32 * bound.max())


def test_gram_other_with_a_different_rank():
    """``other=y`` gives ``xᵀy`` of shape ``(*batch, r_x, r_y)``."""
    rng = np.random.default_rng(1)
    x, y = _rand(rng, (2, 16, 3)), _rand(rng, (2, 16, 5))
    got = np.asarray(gram(x, canonical_layout(3, True), other=y))
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    want = np.einsum("bmr,bms->brs", x64, y64)
    bound = np.einsum("bmr,bms->brs", np.abs(x64), np.abs(y64))
    assert got.shape == (2, 3, 5)
    np.testing.assert_array_less(np.abs(got - want), 18 * EPS32 * bound)


def test_gram_bfloat16_factor_accumulates_in_float32():
    """A bfloat16 factor's Gram is the float32 Gram of its (exact) bfloat16 values."""
    rng = np.random.default_rng(2)
    x = jnp.asarray(_rand(rng, (40, 4)), jnp.bfloat16)
    got = np.asarray(gram(x, canonical_layout(2, True)))
    x64 = np.asarray(x.astype(jnp.float32), np.float64)
    assert got.dtype == np.float32
    np.testing.assert_array_less(
        np.abs(got - x64.T @ x64), 42 * EPS32 * (np.abs(x64).T @ np.abs(x64))
    )


def test_gram_float64_under_x64():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((30, 4))
    with jax.enable_x64(True):
        got = np.asarray(gram(jnp.asarray(x), canonical_layout(2, True), dtype=jnp.float64))
    assert got.dtype == np.float64
    np.testing.assert_allclose(got, x.T @ x, rtol=0, atol=32 * np.finfo(np.float64).eps * 30 * 4)


def _reference_normalized(x64, spec):
    g = np.einsum(spec, x64, x64)
    tr = np.trace(g, axis1=-2, axis2=-1)
    return g / tr[..., None, None], 1 / np.sqrt(tr)


@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-25, 1e30, 1e-30], ids=lambda s: f"scale={s:g}")
@pytest.mark.parametrize(
    ("name", "shape", "layout", "spec"), LAYOUTS[:1] + LAYOUTS[5:6], ids=["tall", "middle-batch"]
)
def test_normalized_grams_unit_trace_and_inverse_norm(name, shape, layout, spec, scale):
    """Unit trace and ``1/‖x‖_F``; at 1e±25 and 1e±30 ``xᵀx`` leaves float32 (slow path)."""
    rng = np.random.default_rng(4)
    x0 = _rand(rng, shape)
    x = (x0.astype(np.float64) * scale).astype(np.float32)
    assert np.all(np.isfinite(x)) and np.all(x != 0)
    norm = _jit(_grams.normalized_grams, [layout])(x)
    g, inv = np.asarray(norm.grams[0]), np.asarray(norm.inv_norms[0])
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(inv))
    want_g, want_inv = _reference_normalized(x.astype(np.float64), spec)
    n = _contracted_length(shape, layout)
    # entries of |x|ᵀ|x| / tr are at most 1: absolute error (n + 8)·eps_f32 (the
    # max-abs rescale of the slow path and the division add a few roundings).
    np.testing.assert_array_less(np.abs(g - want_g), (n + 8) * EPS32)
    np.testing.assert_allclose(np.trace(g, axis1=-2, axis2=-1), 1.0, rtol=(shape[-1] + 8) * EPS32)
    np.testing.assert_allclose(inv, want_inv, rtol=(n * shape[-1] + 8) * EPS32)


def test_normalized_grams_zero_factor_and_zero_batch_slice():
    """A zero matrix gets a zero Gram and ``1/‖x‖_F = 0``; its neighbours stay exact."""
    rng = np.random.default_rng(5)
    x = _rand(rng, (3, 12, 4))
    x[1] = 0.0  # one zero batch slice
    z = np.zeros((4, 10), np.float32)
    layout_t, layout_w = canonical_layout(3, True), canonical_layout(2, False)
    norm = _jit(_grams.normalized_grams, [layout_t, layout_w])(x, z)
    g, inv = np.asarray(norm.grams[0]), np.asarray(norm.inv_norms[0])
    assert np.all(np.isfinite(g)) and np.all(np.isfinite(inv))
    np.testing.assert_array_equal(g[1], 0.0)
    assert inv[1] == 0.0
    want_g, want_inv = _reference_normalized(x[[0, 2]].astype(np.float64), "bmr,bms->brs")
    np.testing.assert_array_less(np.abs(g[[0, 2]] - want_g), 20 * EPS32)
    np.testing.assert_allclose(inv[[0, 2]], want_inv, rtol=60 * EPS32)
    np.testing.assert_array_equal(np.asarray(norm.grams[1]), 0.0)
    assert float(norm.inv_norms[1]) == 0.0


def test_normalized_grams_mixed_scales_in_one_call():
    """One huge item sends every item down the slow path: all stay correct."""
    rng = np.random.default_rng(6)
    a = _rand(rng, (16, 4))
    b = (_rand(rng, (4, 16)).astype(np.float64) * 1e-25).astype(np.float32)
    norm = _grams.normalized_grams(
        [(a, canonical_layout(2, True)), (b, canonical_layout(2, False))]
    )
    for x, spec, g, inv in [
        (a, "mr,ms->rs", norm.grams[0], norm.inv_norms[0]),
        (b, "rn,sn->rs", norm.grams[1], norm.inv_norms[1]),
    ]:
        want_g, want_inv = _reference_normalized(x.astype(np.float64), spec)
        np.testing.assert_array_less(np.abs(np.asarray(g) - want_g), 24 * EPS32)
        np.testing.assert_allclose(float(inv), want_inv, rtol=80 * EPS32)


@pytest.mark.parametrize("scale", [1.0, 1e25, 1e-25], ids=lambda s: f"scale={s:g}")
def test_spectral_norms_match_numpy_2_norm(scale):
    """``σ_max`` per batch index vs ``np.linalg.norm(x, 2)`` in float64.

    Error model: ``|Δλ_max(Ĝ)| ≤ ‖ΔĜ‖₂ ≤ r (m + 8) eps_f32`` and ``λ_max(Ĝ) ≥ 1/r``,
    so ``σ_max`` errs by at most ``r² (m + 8) eps_f32 / 2`` relative (with the float32
    ``eigvalsh`` adding a few eps).
    """
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((2, 20, 4)) * scale).astype(np.float32)
    b = (rng.standard_normal((16, 3, 4)) * scale).astype(np.float32)  # (emb, layers, r)
    layouts = [canonical_layout(3, True), FactorLayout(2, (1,), (0,))]
    got = _jit(_grams.spectral_norms, layouts)(a, b)
    logs = _jit(_grams.log_spectral_norms, layouts)(a, b)
    want = [
        np.array([np.linalg.norm(a[i].astype(np.float64), 2) for i in range(2)]),
        np.array([np.linalg.norm(b[:, i].astype(np.float64), 2) for i in range(3)]),
    ]
    tol = 4 * 4 * (20 + 8) * EPS32
    for g, lg, w in zip(got, logs, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), w, rtol=tol)
        np.testing.assert_allclose(np.asarray(lg), np.log(w), rtol=0, atol=tol)


def test_log_spectral_norms_ratios_beyond_float32_range():
    """``log σ`` of factors 1e-30 and 1e30 apart: their difference is finite and exact."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((12, 3))
    small, big = (x * 1e-30).astype(np.float32), (x * 1e30).astype(np.float32)
    zero = np.zeros((12, 3), np.float32)
    lay = canonical_layout(2, True)
    ls, lb, lz = _grams.log_spectral_norms([(small, lay), (big, lay), (zero, lay)])
    np.testing.assert_allclose(
        float(ls), np.log(np.linalg.norm(small.astype(np.float64), 2)), atol=1e-5
    )
    np.testing.assert_allclose(float(lb) - float(ls), np.log(1e60), rtol=1e-6)
    assert float(lz) == -np.inf
    assert float(_grams.spectral_norms([(zero, lay)])[0]) == 0.0


@pytest.mark.parametrize(
    ("dtype", "want"),
    [
        ("float32", "float32"),
        ("bfloat16", "float32"),
        ("float16", "float32"),
        ("float64", "float64"),
    ],
)
def test_work_dtype(dtype, want):
    assert _grams.work_dtype(jnp.dtype(dtype)) == jnp.dtype(want)


def test_canonical_layout():
    assert canonical_layout(4, True) == FactorLayout(3, (0, 1), (2,))
    assert canonical_layout(2, False) == FactorLayout(0, (), (1,))
