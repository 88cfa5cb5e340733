"""Algorithm 1 of the LoRA-Muon paper, for one adapter, written as the paper writes it.

This is the definition the rest of the package implements: one pair ``W = W0 +
c · a @ b`` with ``a: m×r`` and ``b: r×n``, exact SVD and eigendecompositions, no
batching, no scale handling. :func:`lora_muon_jax.lora_muon` computes the same step
for every adapter of a tree at once (``lora_muon_jax._directions``) and is tested
against this function.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _validation


def msign(x: jax.Array) -> jax.Array:
    """``U Vᵀ`` for ``x = U Σ Vᵀ``: the polar factor, zero on numerically null directions."""
    u, s, vt = jnp.linalg.svd(x, full_matrices=False)
    keep = s > max(x.shape) * jnp.finfo(x.dtype).eps * jnp.max(s)
    return (u * keep) @ vt


def inv_sqrt(s: jax.Array, rtol: float = 1e-6) -> jax.Array:
    """``S^{-1/2}`` of a symmetric PSD matrix, as a pseudo-inverse (``λ <= rtol λ_max`` drop)."""
    lam, v = jnp.linalg.eigh(s)
    keep = lam > rtol * jnp.max(lam)
    return (v * jnp.where(keep, jax.lax.rsqrt(jnp.where(keep, lam, 1.0)), 0.0)) @ v.T


class PairState(NamedTuple):
    """One momentum per factor."""

    m_a: jax.Array
    m_b: jax.Array


def lora_muon_pair_step(
    a: jax.Array,
    b: jax.Array,
    g_a: jax.Array,
    g_b: jax.Array,
    state: PairState,
    *,
    learning_rate: float,
    beta: float = 0.95,
    weight_decay: float = 0.0,
    lora_scale: float = 1.0,
    nesterov: bool = False,
) -> tuple[jax.Array, jax.Array, PairState]:
    r"""One LoRA-Muon step of one pair (Algorithm 1).

    .. math::

      m_a &\leftarrow β m_a + (1-β) g_a, \qquad m_b \leftarrow β m_b + (1-β) g_b \\
      R_a &= (a^\top a)^{-1/2}, \qquad R_b = (b b^\top)^{-1/2} \\
      a &\leftarrow s\,a - \tfrac{η}{2 c s} \operatorname{msign}(m_a R_b) R_b, \qquad
      b \leftarrow s\,b - \tfrac{η}{2 c s} R_a \operatorname{msign}(R_a m_b),
      \qquad s = \sqrt{1 - λη}

    Each tangent term moves ``c · a @ b`` by ``η/2`` in spectral norm and the product
    decays by ``1 - λη`` (split weight decay).

    Args:
      a: ``(m, r)`` left factor.
      b: ``(r, n)`` right factor.
      g_a: gradient of the loss with respect to ``a``.
      g_b: gradient with respect to ``b``.
      state: the momenta, shaped like ``a`` and ``b``.
      learning_rate: :math:`η`.
      beta: momentum decay :math:`β`.
      weight_decay: :math:`λ`.
      lora_scale: :math:`c`.
      nesterov: use ``β m + (1-β) g`` in place of ``m``.

    Returns:
      The new ``a``, ``b`` and momenta.

    Raises:
      TypeError: a complex, integer or boolean argument (named in the message).

    Examples:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax import PairState, lora_muon_pair_step
      >>> a, b = jnp.eye(3, 2), jnp.eye(2, 4)
      >>> state = PairState(jnp.zeros_like(a), jnp.zeros_like(b))
      >>> a2, b2, state = lora_muon_pair_step(
      ...     a, b, jnp.ones_like(a), jnp.ones_like(b), state, learning_rate=0.1)
      >>> step = (a2 - a) @ b
      >>> print(f"{jnp.linalg.norm(step, ord=2):.3f}")
      0.050

    References:
      Cesista, Crowson, Simal, Biderman, `LoRA-Muon: Spectral Steepest Descent on
      the Low-Rank Manifold <https://arxiv.org/abs/2606.12921>`_, 2026
    """
    _validation.check_float_leaves(
        "lora_muon_pair_step",
        ("a", "b", "g_a", "g_b", "state.m_a", "state.m_b"),
        (a, b, g_a, g_b, state.m_a, state.m_b),
        None,
    )
    m_a = beta * state.m_a + (1 - beta) * g_a
    m_b = beta * state.m_b + (1 - beta) * g_b
    src_a, src_b = (
        (beta * m_a + (1 - beta) * g_a, beta * m_b + (1 - beta) * g_b) if nesterov else (m_a, m_b)
    )
    r_a, r_b = inv_sqrt(a.T @ a), inv_sqrt(b @ b.T)
    d_a = msign(src_a @ r_b) @ r_b
    d_b = r_a @ msign(r_a @ src_b)
    s = jnp.sqrt(1.0 - weight_decay * learning_rate)
    step = learning_rate / (2.0 * lora_scale * s)
    return s * a - step * d_a, s * b - step * d_b, PairState(m_a, m_b)
