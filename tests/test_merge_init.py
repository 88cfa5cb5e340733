"""merge_lora and balance_lora_init: the model function is kept, bad input is named."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lora_muon_jax as lmj
import lora_muon_jax.nnx as lmx
from lora_muon_jax._diagnostics import with_lora_diagnostics
from tests.test_nnx import Stack, TwoAdapters, numpy_init

EPS32 = float(np.finfo(np.float32).eps)


def _with_nonzero_b(model, seed=3):
    """The model with every lora_b drawn (trained adapters)."""
    rng = np.random.default_rng(seed)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    lora = jax.tree_util.tree_map_with_path(
        lambda p, v: (
            jnp.asarray(0.5 * rng.standard_normal(v.shape), v.dtype)
            if "lora_b" in jax.tree_util.keystr(p)
            else v
        ),
        lora,
    )
    return nnx.merge(graphdef, lora, rest)


def _x(n_in, seed=0):
    return jnp.asarray(np.random.default_rng(seed).standard_normal((16, n_in)), jnp.float32)


# --------------------------------------------------------------------- merge: nnx


def test_merge_nnx_two_adapter_styles_keeps_outputs():
    model = _with_nonzero_b(numpy_init(lambda: TwoAdapters(nnx.Rngs(0))))
    merged = lmx.merge_lora(model)
    assert type(merged.l1) is nnx.Linear and type(merged.l2) is nnx.Linear
    assert not jax.tree.leaves(nnx.state(merged, nnx.LoRAParam))
    # The input model is untouched.
    assert isinstance(model.l1, nnx.LoRALinear) and isinstance(model.l2, nnx.LoRA)
    x = _x(8)
    ref, out = model(x), merged(x)
    # One float32 fold per layer vs two matmuls: agreement to 1e-5 of the output
    # scale (measured ~1e-6).
    np.testing.assert_allclose(out, ref, atol=1e-5 * float(jnp.abs(ref).max()))
    # The kernel is exactly W0 + a @ b folded in float32.
    want = np.asarray(model.l1.kernel[...], np.float64) + np.asarray(
        model.l1.lora.lora_a[...], np.float64
    ) @ np.asarray(model.l1.lora.lora_b[...], np.float64)
    np.testing.assert_allclose(
        merged.l1.kernel[...], want, rtol=0, atol=4 * EPS32 * np.abs(want).max()
    )


def test_merge_nnx_scanned_stack_keeps_outputs():
    model = _with_nonzero_b(numpy_init(lambda: Stack(3, 8, 2, nnx.Rngs(0))))
    merged = lmx.merge_lora(model)
    assert type(merged.layers) is nnx.Linear
    assert merged.layers.kernel.shape == (3, 8, 8)
    x = _x(8)
    ref, out = model(x), merged(x)  # Stack.__call__ scans over the merged Linear too
    np.testing.assert_allclose(out, ref, atol=1e-5 * float(jnp.abs(ref).max()))


class Containers(nnx.Module):
    """Adapters inside an nnx.List and an nnx.Dict, one kernel with metadata."""

    def __init__(self, rngs):
        self.layers = nnx.List(
            [
                nnx.LoRALinear(4, 4, lora_rank=1, kernel_metadata={"tag": "k"}, rngs=rngs)
                for _ in range(2)
            ]
        )
        base = nnx.Linear(4, 4, use_bias=False, rngs=rngs)
        self.heads = nnx.Dict(out=nnx.LoRA(4, 1, 4, base_module=base, rngs=rngs))

    def __call__(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.heads["out"](x)


def test_merge_nnx_inside_list_and_dict_keeps_metadata():
    model = _with_nonzero_b(numpy_init(lambda: Containers(nnx.Rngs(0))))
    merged = lmx.merge_lora(model)
    assert [type(m).__name__ for m in merged.layers] == ["Linear", "Linear"]
    assert type(merged.heads["out"]) is nnx.Linear and merged.heads["out"].bias is None
    assert merged.layers[0].kernel.get_metadata()["tag"] == "k"
    x = _x(4)
    ref = model(x)
    np.testing.assert_allclose(merged(x), ref, atol=1e-5 * float(jnp.abs(ref).max()))


def test_merge_nnx_errors_name_the_module():
    standalone = nnx.eval_shape(lambda: nnx.LoRA(4, 2, 3, rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="LoRA at <root> has no base_module"):
        lmx.merge_lora(standalone)

    class Holder(nnx.Module):
        def __init__(self):
            base = nnx.LinearGeneral(4, 3, rngs=nnx.Rngs(0))
            self.inner = nnx.LoRA(4, 2, 3, base_module=base, rngs=nnx.Rngs(1))

    # These errors come before any arithmetic: abstract models will do.
    with pytest.raises(ValueError, match="LoRA at inner wraps a LinearGeneral; only nnx.Linear"):
        lmx.merge_lora(nnx.eval_shape(Holder))

    class Custom(nnx.Module):
        def __init__(self):
            self.lin = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0))
            self.lora_a = nnx.LoRAParam(jnp.ones((4, 2)))
            self.lora_b = nnx.LoRAParam(jnp.ones((2, 3)))

    with pytest.raises(
        ValueError, match=r"outside nnx.LoRALinear / nnx.LoRA modules remain at \['lora_a'\]"
    ):
        lmx.merge_lora(numpy_init(Custom))

    class ScaledLoRA(nnx.LoRA):  # a custom forward merge_lora cannot know
        def __call__(self, x):
            return 2.0 * super().__call__(x)

    scaled = nnx.eval_shape(
        lambda: ScaledLoRA(
            4, 2, 3, base_module=nnx.Linear(4, 3, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0)
        )
    )
    with pytest.raises(ValueError, match="at <root> is a ScaledLoRA, a subclass"):
        lmx.merge_lora(scaled)
    with pytest.raises(ValueError, match="nothing to merge"):
        lmx.merge_lora(nnx.eval_shape(lambda: nnx.Linear(2, 2, rngs=nnx.Rngs(0))))


# ------------------------------------------------------------------- merge: pytrees


def _linen_like(rng, batch=(), m=6, n=5, r=2, dtype=jnp.float32):
    return {
        "Dense_0": {
            "kernel": jnp.asarray(rng.standard_normal((*batch, m, n)), dtype),
            "bias": jnp.zeros((n,), dtype),
            "lora_a": jnp.asarray(rng.standard_normal((*batch, m, r)), dtype),
            "lora_b": jnp.asarray(rng.standard_normal((*batch, r, n)), dtype),
        }
    }


@pytest.mark.parametrize("batch", [(), (3,)])
def test_merge_pytree_linen_layout_and_stacked(batch):
    rng = np.random.default_rng(0)
    p = _linen_like(rng, batch)
    merged = jax.jit(lambda t: lmx.merge_lora(t, lora_scale=0.5))(p)
    assert set(merged["Dense_0"]) == {"kernel", "bias"}
    d = {k: np.asarray(v, np.float64) for k, v in p["Dense_0"].items()}
    want = d["kernel"] + 0.5 * d["lora_a"] @ d["lora_b"]
    np.testing.assert_allclose(
        merged["Dense_0"]["kernel"], want, rtol=0, atol=8 * EPS32 * np.abs(want).max()
    )


def test_merge_pytree_bf16_kernel_is_one_rounding_of_the_f32_fold():
    rng = np.random.default_rng(1)
    p = _linen_like(rng, dtype=jnp.bfloat16)
    merged = lmx.merge_lora(p)["Dense_0"]["kernel"]
    assert merged.dtype == jnp.bfloat16
    d = {k: np.asarray(v.astype(jnp.float32), np.float64) for k, v in p["Dense_0"].items()}
    exact = d["kernel"] + d["lora_a"] @ d["lora_b"]
    # Folded in float32, rounded once to bfloat16: within half a bf16 ulp (at most
    # 2^-8 relative) plus float32 noise.
    err = np.abs(np.asarray(merged.astype(jnp.float32), np.float64) - exact)
    assert np.all(err <= 2.0**-8 * np.abs(exact) + 1e-6 * np.abs(exact).max())


def test_merge_nnx_state_pytree_drops_emptied_lora_dict():
    model = _with_nonzero_b(numpy_init(lambda: TwoAdapters(nnx.Rngs(0))))
    pure = nnx.to_pure_dict(nnx.state(model))
    merged = lmx.merge_lora(pure)
    assert set(merged["l1"]) == {"kernel", "bias"}  # the `lora` dict is gone
    assert set(merged["l2"]) == {"base_module"}
    ref = lmx.merge_lora(model)
    np.testing.assert_allclose(merged["l1"]["kernel"], ref.l1.kernel[...], rtol=0, atol=0)
    np.testing.assert_allclose(
        merged["l2"]["base_module"]["kernel"], ref.l2.kernel[...], rtol=0, atol=0
    )


def test_merge_pytree_errors_name_paths():
    rng = np.random.default_rng(0)
    p = _linen_like(rng)
    bad = {"Dense_0": {**p["Dense_0"], "kernel": jnp.zeros((5, 6))}}
    with pytest.raises(
        ValueError, match=r"base weight at \['Dense_0'\]\['kernel'\] has shape \(5, 6\).*\(6, 5\)"
    ):
        lmx.merge_lora(bad)
    orphan = {"q": {"lora_a": jnp.ones((4, 2)), "lora_b": jnp.ones((2, 3))}}
    with pytest.raises(
        ValueError, match=r"no base weight for the LoRA pair at \['q'\]\['lora_a'\]; tried q/kernel"
    ):
        lmx.merge_lora(orphan)
    with pytest.raises(ValueError, match="found no LoRA pair"):
        lmx.merge_lora({"kernel": jnp.ones((2, 2))})
    # A custom base location.
    custom = {"w": jnp.zeros((4, 3)), "q": orphan["q"]}
    out = lmx.merge_lora(custom, base_path=lambda a_path: ("w",))
    np.testing.assert_allclose(out["w"], np.full((4, 3), 2.0))
    assert set(out) == {"w"}
    with pytest.raises(TypeError, match=r"cannot remove LoRA factors from a tuple at \['t'\]"):
        lmx.merge_lora(
            {"t": (p["Dense_0"],), "kernel": jnp.zeros((6, 5))}, base_path=lambda _: ("kernel",)
        )


# ------------------------------------------------------------------- balanced init


def _effective(p, c=1.0):
    d = {k: np.asarray(jnp.asarray(v, jnp.float32), np.float64) for k, v in p.items()}
    return d["kernel"] + c * d["lora_a"] @ d["lora_b"]


def _sigma(x):
    return np.linalg.norm(np.asarray(x, np.float64), 2, axis=(-2, -1))


@pytest.mark.parametrize("product_scale", [0.1, None, 4.0])
def test_balance_zero_b_keeps_effective_weight_and_equalizes_norms(product_scale):
    rng = np.random.default_rng(0)
    p = _linen_like(rng, batch=(3,), m=12, n=9, r=3)
    p["Dense_0"]["lora_b"] = jnp.zeros_like(p["Dense_0"]["lora_b"])
    c = 0.5
    out = lmx.balance_lora_init(p, jax.random.key(0), lora_scale=c, product_scale=product_scale)
    d0, d1 = p["Dense_0"], out["Dense_0"]
    w0, w1 = _effective(d0, c), _effective(d1, c)
    absorbed = np.abs(
        c * np.asarray(d1["lora_a"], np.float64) @ np.asarray(d1["lora_b"], np.float64)
    )
    # W0' = fl(W0 - c·a@b) with the product formed in float32 from the stored
    # factors: per entry at most one float32 rounding of max(|W0|, |c·a@b|) plus
    # the matmul's r·eps; bound 4 ulps of that magnitude.
    bound = 4 * EPS32 * np.maximum(np.abs(w0), absorbed.max())
    assert np.all(np.abs(w1 - w0) <= bound), np.max(np.abs(w1 - w0) / bound)
    sa, sb = _sigma(d1["lora_a"]), _sigma(d1["lora_b"])
    np.testing.assert_allclose(sa, sb, rtol=1e-5)
    want = np.sqrt(product_scale / c) if product_scale is not None else _sigma(d0["lora_a"])
    np.testing.assert_allclose(sa, want, rtol=1e-5)
    assert np.all(_sigma(d1["lora_b"]) > 0)
    assert not np.allclose(d1["kernel"], d0["kernel"])  # the product was absorbed
    np.testing.assert_array_equal(d1["bias"], d0["bias"])


def test_balance_nonzero_pairs_is_a_pure_gauge_move():
    rng = np.random.default_rng(2)
    p = _linen_like(rng, batch=(2,))
    p["Dense_0"]["lora_a"] = p["Dense_0"]["lora_a"] * 30.0  # badly imbalanced
    out = lmx.balance_lora_init(p, None)
    d0, d1 = p["Dense_0"], out["Dense_0"]
    np.testing.assert_array_equal(d1["kernel"], d0["kernel"])
    prod0 = np.asarray(d0["lora_a"], np.float64) @ np.asarray(d0["lora_b"], np.float64)
    prod1 = np.asarray(d1["lora_a"], np.float64) @ np.asarray(d1["lora_b"], np.float64)
    np.testing.assert_allclose(prod1, prod0, rtol=0, atol=4 * EPS32 * np.abs(prod0).max())
    np.testing.assert_allclose(_sigma(d1["lora_a"]), _sigma(d1["lora_b"]), rtol=1e-5)


def test_balance_nnx_model_keeps_outputs():
    # Stacked layers are the batch axes of the pytree tests above; nnx state is a
    # pytree of the same layout.
    model = numpy_init(lambda: TwoAdapters(nnx.Rngs(0)))
    new = lmx.balance_lora_init(model, jax.random.key(1))
    x = _x(8)
    ref = model(x)
    np.testing.assert_allclose(new(x), ref, atol=1e-5 * float(jnp.abs(ref).max()))
    for a, b in ((new.l1.lora.lora_a, new.l1.lora.lora_b), (new.l2.lora_a, new.l2.lora_b)):
        np.testing.assert_allclose(_sigma(a[...]), _sigma(b[...]), rtol=1e-5)
        np.testing.assert_allclose(_sigma(a[...]), np.sqrt(0.1), rtol=1e-5)
    # The base weights absorbed the products; the input model is untouched.
    assert not np.allclose(new.l1.kernel[...], model.l1.kernel[...])
    assert not np.allclose(new.l2.base_module.kernel[...], model.l2.base_module.kernel[...])
    assert not np.any(np.asarray(model.l1.lora.lora_b[...]))


def test_balance_peft_layout_draws_the_zero_left_factor():
    # PEFT: lora_B (out, r) starts at zero and is the left factor of ΔW = B @ A.
    rng = np.random.default_rng(4)
    p = {
        "weight": jnp.asarray(rng.standard_normal((5, 7)), jnp.float32),
        "lora_A": jnp.asarray(rng.standard_normal((2, 7)), jnp.float32),
        "lora_B": jnp.zeros((5, 2), jnp.float32),
    }
    out = lmx.balance_lora_init(p, jax.random.key(0), pairs="peft", base_path=lambda _: ("weight",))
    assert np.any(np.asarray(out["lora_B"]))
    np.testing.assert_allclose(_sigma(out["lora_B"]), _sigma(out["lora_A"]), rtol=1e-5)
    eff0 = np.asarray(p["weight"], np.float64)
    eff1 = np.asarray(out["weight"], np.float64) + np.asarray(
        out["lora_B"], np.float64
    ) @ np.asarray(out["lora_A"], np.float64)
    np.testing.assert_allclose(eff1, eff0, rtol=0, atol=4 * EPS32 * np.abs(eff0).max())


def test_balance_errors_name_paths():
    rng = np.random.default_rng(0)
    p = _linen_like(rng)
    both = {"Dense_0": {**p["Dense_0"], "lora_a": jnp.zeros((6, 2)), "lora_b": jnp.zeros((2, 5))}}
    with pytest.raises(
        ValueError, match=r"both factors of the LoRA pair at \['Dense_0'\]\['lora_a'\] are zero"
    ):
        lmx.balance_lora_init(both, jax.random.key(0), product_scale=None)
    out = lmx.balance_lora_init(both, jax.random.key(0), product_scale=0.25)
    np.testing.assert_allclose(_sigma(out["Dense_0"]["lora_a"]), 0.5, rtol=1e-5)
    zero_b = {"Dense_0": {**p["Dense_0"], "lora_b": jnp.zeros((2, 5))}}
    with pytest.raises(ValueError, match=r"pass a\s+PRNG `key`"):
        lmx.balance_lora_init(zero_b, None)
    standalone = nnx.eval_shape(lambda: nnx.LoRA(4, 2, 3, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(standalone)
    state = jax.tree.map(
        lambda s: jnp.zeros(s.shape, s.dtype) if s.shape == (2, 3) else jnp.ones(s.shape, s.dtype),
        state,
    )
    with pytest.raises(
        ValueError, match=r"LoRA pair at \['lora_a'\] has a zero factor and no base weight"
    ):
        lmx.balance_lora_init(nnx.merge(graphdef, state), jax.random.key(0))
    with pytest.raises(ValueError, match="`product_scale` must satisfy"):
        lmx.balance_lora_init(p, None, product_scale=-1.0)


def test_balanced_init_removes_drift_and_trains_like_zero_init():
    """Zero-init b drifts to σ_a/σ_b ~ e^4; balanced stays ~1.

    docs/algorithm.md §Zero factors and gauge drift, measured.
    """
    rng = np.random.default_rng(0)
    m, n, r = 32, 24, 4
    w0 = rng.standard_normal((m, n)) / np.sqrt(m)
    target = w0 + rng.standard_normal((m, r)) @ rng.standard_normal((r, n)) * 0.5 / np.sqrt(m)
    x = rng.standard_normal((128, m))
    y, x = jnp.asarray(x @ target, jnp.float32), jnp.asarray(x, jnp.float32)
    zero = {
        "kernel": jnp.asarray(w0, jnp.float32),
        "lora_a": jnp.asarray(rng.standard_normal((m, r)) / np.sqrt(m), jnp.float32),
        "lora_b": jnp.zeros((r, n), jnp.float32),
    }
    balanced = lmx.balance_lora_init(zero, jax.random.key(0))
    tx = with_lora_diagnostics(lmj.lora_muon(0.05, beta=0.9))

    @jax.jit
    def step(lora, s, kernel):
        def loss_fn(q):
            return jnp.mean((x @ kernel + x @ q["lora_a"] @ q["lora_b"] - y) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(lora)
        u, s = tx.update(g, s, lora)
        return loss, optax.apply_updates(lora, u), s

    results = {}
    for name, p in (("zero", zero), ("balanced", balanced)):
        lora = {"lora_a": p["lora_a"], "lora_b": p["lora_b"]}
        s, ratios, losses = tx.init(lora), [], []
        for _ in range(60):
            loss, lora, s = step(lora, s, p["kernel"])
            losses.append(float(loss))
            ratios.append(float(optax.tree.get(s, "lora_diagnostics")["lora_a"].log_norm_ratio))
        results[name] = (losses, max(abs(v) for v in ratios[1:]))
    assert results["zero"][0][0] == pytest.approx(results["balanced"][0][0], rel=1e-5)
    assert results["zero"][1] > 3.0  # σ_a/σ_b > 20 after the first step
    assert results["balanced"][1] < 0.5
    # Measured at step 60: zero 0.04, balanced 0.05 (ρ = 0.1); allow 2x.
    assert results["balanced"][0][-1] < 2.0 * results["zero"][0][-1] + 1e-3, results
