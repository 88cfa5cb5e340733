"""Assertions for users' own tests of LoRA optimizers on their own models.

Each helper runs the optimizer on the user's params and checks a property that the
maths guarantees, so a wrong pairing rule, a wrong ``lora_scale`` or a broken
optimizer shows up as a failing test with a message naming the pair:

* :func:`assert_product_step_within_budget`: the first-order change of every
  adapter product has spectral norm at most the learning rate;
* :func:`assert_gauge_invariant`: rescaling ``(a, b) → (c a, b / c)`` leaves the
  product trajectory unchanged;
* :func:`assert_finite_at_zero_init`: with every ``b`` zeroed (the Flax/PEFT
  default) the first update is finite and moves only ``b``;
* :func:`assert_finite_updates`: no NaN or inf anywhere in an update.

All comparisons are made in float64 NumPy after the optimizer ran in its own
dtype; they form ``m × n`` products, so use test-sized models.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_muon_jax import _key_paths, _pair_matching, _pair_types

__all__ = [
    "assert_finite_at_zero_init",
    "assert_finite_updates",
    "assert_gauge_invariant",
    "assert_product_step_within_budget",
    "pair_products",
    "pair_steps",
]


def _leaves(tree: Any) -> list[Any]:
    return _key_paths.flatten_with_paths(tree)[1]


def _f64(x: Any) -> np.ndarray:
    return np.asarray(jnp.asarray(x).astype(jnp.float32), np.float64)


def pair_products(
    params: Any, pairs: _pair_types.PairsLike = "auto", lora_scale: float = 1.0
) -> dict[str, np.ndarray]:
    """``c · a @ b`` of every pair, float64, keyed by the path of ``a``.

    Returns arrays of shape ``(*batch, m, n)``.
    """
    leaves = _leaves(params)
    out = {}
    for pair in _pair_matching.find_lora_pairs(params, pairs):
        a = _f64(pair.canonical(jnp.asarray(leaves[pair.a_index]), "a"))
        b = _f64(pair.canonical(jnp.asarray(leaves[pair.b_index]), "b"))
        out[pair.a_path] = lora_scale * a @ b
    return out


def pair_steps(
    params: Any, updates: Any, pairs: _pair_types.PairsLike = "auto", lora_scale: float = 1.0
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The two first-order terms ``(c Δa b, c a Δb)`` of every pair, float64."""
    p_leaves, u_leaves = _leaves(params), _leaves(updates)
    out = {}
    for pair in _pair_matching.find_lora_pairs(params, pairs):
        a = _f64(pair.canonical(jnp.asarray(p_leaves[pair.a_index]), "a"))
        b = _f64(pair.canonical(jnp.asarray(p_leaves[pair.b_index]), "b"))
        da = _f64(pair.canonical(jnp.asarray(u_leaves[pair.a_index]), "a"))
        db = _f64(pair.canonical(jnp.asarray(u_leaves[pair.b_index]), "b"))
        out[pair.a_path] = (lora_scale * da @ b, lora_scale * a @ db)
    return out


def _spectral(x: np.ndarray) -> np.ndarray:
    """Spectral norms of a stack ``(*batch, m, n)``, shape ``batch``."""
    return np.linalg.norm(x, ord=2, axis=(-2, -1))


def assert_finite_updates(updates: Any) -> None:
    """Raises ``AssertionError`` naming every leaf of ``updates`` with NaN or inf."""
    paths, leaves, _ = _key_paths.flatten_with_paths(updates)
    bad = [
        _key_paths.path_str(p)
        for p, x in zip(paths, leaves, strict=True)
        if not bool(jnp.all(jnp.isfinite(jnp.asarray(x).astype(jnp.float32))))
    ]
    assert not bad, f"Non-finite updates at {bad}."


def assert_product_step_within_budget(
    tx: optax.GradientTransformation,
    params: Any,
    grads: Any,
    learning_rate: float,
    *,
    state: Any = None,
    pairs: _pair_types.PairsLike = "auto",
    lora_scale: float = 1.0,
    rtol: float = 1e-4,
    each_term: bool = False,
) -> Any:
    """Asserts ``‖c (Δa b + a Δb)‖₂ ≤ η (1 + rtol)`` for every pair after one update.

    Use it with weight decay off: decay moves the product by ``λη·ab`` on top of
    the budget.

    Args:
      tx: the optimizer.
      params: the params (any pytree with LoRA pairs).
      grads: gradients like ``params``.
      learning_rate: the step's learning rate ``η``.
      state: optimizer state; ``None`` means ``tx.init(params)``.
      pairs: how to find pairs.
      lora_scale: ``c`` in ``ΔW = c · a @ b``.
      rtol: relative slack.
      each_term: also assert each term has norm ``η/2`` (LoRA-Muon's even split,
        when both momenta are non-zero and both factors have full rank).

    Returns:
      The updates, for further checks.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax import lora_muon, testing
      >>> p = {'lora_a': jnp.eye(4, 2), 'lora_b': jnp.eye(2, 3)}
      >>> g = {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}
      >>> _ = testing.assert_product_step_within_budget(lora_muon(0.1), p, g, 0.1)
    """
    state = tx.init(params) if state is None else state
    updates, _ = tx.update(grads, state, params)
    assert_finite_updates(updates)
    for path, (ta, tb) in pair_steps(params, updates, pairs, lora_scale).items():
        total = _spectral(ta + tb)
        assert np.all(total <= learning_rate * (1 + rtol)), (
            f"Pair at {path}: product step spectral norm {total.max():.6g} exceeds "
            f"the budget {learning_rate:g}."
        )
        if each_term:
            for name, term in (("Δa b", ta), ("a Δb", tb)):
                norms = _spectral(term)
                np.testing.assert_allclose(
                    norms,
                    learning_rate / 2,
                    rtol=rtol,
                    err_msg=f"Pair at {path}: ‖{name}‖₂ is not η/2.",
                )
    return updates


def _rescale_pairs(params: Any, c: float, pairs: _pair_types.PairsLike) -> Any:
    paths, leaves, treedef = _key_paths.flatten_with_paths(params)
    leaves = list(leaves)
    for pair in _pair_matching.find_lora_pairs(params, pairs):
        a, b = leaves[pair.a_index], leaves[pair.b_index]
        leaves[pair.a_index] = (a * c).astype(a.dtype)
        leaves[pair.b_index] = (b / c).astype(b.dtype)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _product_trajectory(tx, params, loss_fn, steps, pairs, lora_scale):
    @jax.jit
    def step(p, s):
        g = jax.grad(loss_fn)(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    state = tx.init(params)
    out = []
    for _ in range(steps):
        params, state = step(params, state)
        out.append(pair_products(params, pairs, lora_scale))
    return out


def assert_gauge_invariant(
    tx: optax.GradientTransformation,
    params: Any,
    loss_fn: Callable[[Any], jax.Array],
    *,
    scale: float = 9.0,
    steps: int = 3,
    pairs: _pair_types.PairsLike = "auto",
    lora_scale: float = 1.0,
    rtol: float = 1e-4,
) -> None:
    """Asserts that ``(a, b) → (c a, b / c)`` leaves the product trajectory unchanged.

    Runs ``steps`` steps of ``tx`` on ``loss_fn`` from ``params`` and from the
    rescaled params, and compares every pair's product after every step (relative
    Frobenius error ``≤ rtol``). Gauge-invariant optimizers (LoRA-Muon, LoRA-RITE,
    Riemannion) pass; Spectron and AdamW do not.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax import lora_muon, testing
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> p = {'lora_a': jax.random.normal(k1, (6, 2)), 'lora_b': jax.random.normal(k2, (2, 5))}
      >>> loss = lambda p: jnp.sum((p['lora_a'] @ p['lora_b'] - 1.) ** 2)
      >>> testing.assert_gauge_invariant(lora_muon(0.05), p, loss)
    """
    base = _product_trajectory(tx, params, loss_fn, steps, pairs, lora_scale)
    moved = _product_trajectory(
        tx, _rescale_pairs(params, scale, pairs), loss_fn, steps, pairs, lora_scale
    )
    for t, (p0, p1) in enumerate(zip(base, moved, strict=True)):
        for path in p0:
            err = np.linalg.norm(p1[path] - p0[path]) / max(float(np.linalg.norm(p0[path])), 1e-30)
            assert err <= rtol, (
                f"Pair at {path}: after step {t + 1} the product differs by {err:.3g} "
                f"(relative) when the factors are rescaled by {scale:g}; rtol={rtol:g}."
            )


def assert_finite_at_zero_init(
    tx: optax.GradientTransformation,
    params: Any,
    loss_fn: Callable[[Any], jax.Array],
    *,
    pairs: _pair_types.PairsLike = "auto",
) -> Any:
    """Zeroes every ``b``, takes one step, and asserts it is finite and moves only ``b``.

    Returns:
      The updates of that step.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax import lora_muon, testing
      >>> p = {'lora_a': jnp.eye(4, 2), 'lora_b': jnp.ones((2, 3))}
      >>> loss = lambda p: jnp.sum((p['lora_a'] @ p['lora_b'] - 1.) ** 2)
      >>> _ = testing.assert_finite_at_zero_init(lora_muon(0.1), p, loss)
    """
    paths, leaves, treedef = _key_paths.flatten_with_paths(params)
    leaves = list(leaves)
    found = _pair_matching.find_lora_pairs(params, pairs)
    for pair in found:
        leaves[pair.b_index] = jnp.zeros_like(leaves[pair.b_index])
    params = jax.tree_util.tree_unflatten(treedef, leaves)
    grads = jax.grad(loss_fn)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert_finite_updates(updates)
    u_leaves = _leaves(updates)
    for pair in found:
        assert bool(jnp.all(u_leaves[pair.a_index] == 0)), (
            f"Pair at {pair.a_path}: `a` moved although `b` is zero (its gradient is 0)."
        )
        assert bool(jnp.any(u_leaves[pair.b_index] != 0)), (
            f"Pair at {pair.b_path}: `b` did not move on the first step."
        )
    return updates
