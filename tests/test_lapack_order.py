"""_lapack_order.after: what keeps jaxlib's CPU LAPACK calls from deadlocking."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from lora_muon_jax import _lapack_order


def test_after_returns_x_unchanged_in_its_dtype():
    x = {"a": jnp.arange(6.0).reshape(2, 3), "b": jnp.ones((2,), jnp.bfloat16)}
    deps = (jnp.full((3, 3), -7.5), jnp.asarray(1e30))
    out = jax.jit(_lapack_order.after)(x, *deps)
    for k in x:
        assert out[k].dtype == x[k].dtype
        np.testing.assert_array_equal(np.asarray(out[k], np.float32), np.asarray(x[k], np.float32))
    assert _lapack_order.after(x) is x  # no dependency: nothing added


def test_after_is_a_real_data_dependency():
    # XLA's CPU runtime orders thunks by buffers, so the dependency must survive
    # compilation as arithmetic on x (an optimization barrier would not order anything).
    compiled = jax.jit(_lapack_order.after).lower(jnp.ones((4, 4)), jnp.ones((2, 2))).compile()
    text = compiled.as_text()
    assert "minimum" in text and "abs" in text
    # A non-finite dependency shows (it never hides a broken predecessor).
    out = _lapack_order.after(jnp.ones(3), jnp.asarray([jnp.nan, 1.0]))
    assert np.all(np.isnan(np.asarray(out)))
