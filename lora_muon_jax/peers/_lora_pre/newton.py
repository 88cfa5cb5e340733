"""LoRA-Pre's solver: one damped Newton step of each factor of ``b a ≈ target``.

LoRA-Pre keeps each moment as a product ``m_B m_A`` of thin factors and refreshes
it with one closed-form damped Newton step of each factor on ``½‖b a - T‖²``
(Theorem 3.1 of the paper). The r×r damped inverses of every leaf are computed in
one batched call per rank (:func:`_damped_inverses`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from lora_muon_jax import _grams, _linalg

FactorUpdate = Literal["gauss_seidel", "jacobi"]
FACTOR_UPDATES: tuple[str, ...] = ("gauss_seidel", "jacobi")


def _damped_inverse(flat: jax.Array, damping: jax.Array) -> jax.Array:
    """``(S + δ I)⁻¹`` of a ``(N, r, r)`` batch of symmetric PSD ``S``, never NaN.

    By Cholesky; if rounding made a damped Gram indefinite (a tiny ``δ`` next to
    large eigenvalues), the batch takes an ``eigh`` route instead, with eigenvalues
    clipped at zero before ``δ`` is added.
    """
    eye = jnp.eye(flat.shape[-1], dtype=flat.dtype)
    chol = jnp.linalg.cholesky(flat + damping * eye)
    ok = jnp.all(jnp.isfinite(chol))

    def by_cholesky() -> jax.Array:
        return jax.scipy.linalg.cho_solve((chol, True), jnp.broadcast_to(eye, chol.shape))

    def by_eigh() -> jax.Array:
        lam, vecs = jnp.linalg.eigh(flat)
        inv = 1.0 / (jnp.maximum(lam, 0.0) + damping)
        return _linalg.mm(vecs * inv[..., None, :], jnp.swapaxes(vecs, -1, -2))

    return jax.lax.cond(ok, by_cholesky, by_eigh)


def _damped_inverses(grams: Sequence[jax.Array], damping: jax.Array) -> list[jax.Array]:
    """``(S + δ I)⁻¹`` of every PSD float32 stack ``S`` in ``grams``, never NaN.

    Stacks with the same ``r`` are concatenated and factored in one batched call
    (one Cholesky per step for a whole model, not one per leaf:
    :func:`lora_muon_jax._linalg.apply_batched_by_size`); a batch in which rounding
    made a damped Gram indefinite takes the ``eigh`` route (:func:`_damped_inverse`).
    """
    return _linalg.apply_batched_by_size(
        lambda flat: _damped_inverse(flat, damping), [(_linalg.sym(g),) for g in grams]
    )


class NewtonJob(NamedTuple):
    """One factor pair ``b (*batch, p, r)``, ``a (*batch, r, q)`` fitted to ``target``."""

    target: jax.Array
    b: jax.Array
    a: jax.Array
    gamma: jax.Array


def _gram(x: jax.Array, x_first: bool) -> jax.Array:
    """``xᵀx`` (``x_first``: ``x`` is a tall ``b``) or ``x xᵀ`` (a wide ``a``): r×r."""
    return _grams.gram(x, _grams.canonical_layout(x.ndim, x_first))


def newton_steps(
    jobs: Sequence[NewtonJob], damping: jax.Array, order: str = "gauss_seidel"
) -> list[tuple[jax.Array, jax.Array]]:
    r"""One damped Newton step of each factor on ``½‖b a - target‖²``, for many pairs.

    .. math::

      b' = (1-γ) b + γ\, T a^\top (a a^\top + δ I)^{-1}, \qquad
      a' = (1-γ) a + γ\, (\tilde b^\top \tilde b + δ I)^{-1} \tilde b^\top T,

    with :math:`\tilde b = b'` (``order="gauss_seidel"``: block-coordinate Newton,
    the second factor sees the first one's step) or :math:`\tilde b = b`
    (``"jacobi"``: both from the old factors). For square invertible factors and
    :math:`δ = 0`, Gauss–Seidel gives exactly the EMA
    :math:`b'a' = (1-γ)^2 ba + (1-(1-γ)^2) T`, and in general
    :math:`b'a' = (1-γ)^2 ba + γ(1-γ) T Π_a + γ Π_{b'} T` with projectors
    :math:`Π`, bounded by the inputs. Jacobi adds
    :math:`γ^2 T a^+ b^+ T`, which grows like :math:`\|T\|^2 / \|ba\|` when the
    product is small next to the target (e.g. a momentum that averages out near an
    optimum).

    Float32 in and out. All r×r inverses of one phase are computed in one batched
    call (:func:`_damped_inverses`).
    """
    inv_a = _damped_inverses([_gram(j.a, x_first=False) for j in jobs], damping)
    new_bs = []
    for j, ia in zip(jobs, inv_a, strict=True):
        t_at = jnp.matmul(j.target, jnp.swapaxes(j.a, -1, -2))  # (*batch, p, r)
        new_bs.append((1.0 - j.gamma) * j.b + j.gamma * _linalg.mm(t_at, ia))
    partners = new_bs if order == "gauss_seidel" else [j.b for j in jobs]
    inv_b = _damped_inverses([_gram(b, x_first=True) for b in partners], damping)
    out = []
    for j, b, nb, ib in zip(jobs, partners, new_bs, inv_b, strict=True):
        bt_t = jnp.matmul(jnp.swapaxes(b, -1, -2), j.target)  # (*batch, r, q)
        out.append((nb, (1.0 - j.gamma) * j.a + j.gamma * _linalg.mm(ib, bt_t)))
    return out


def newton_step(
    target: jax.Array,
    b: jax.Array,
    a: jax.Array,
    gamma: jax.Array,
    damping: jax.Array,
    order: str = "gauss_seidel",
) -> tuple[jax.Array, jax.Array]:
    """:func:`newton_steps` for one pair."""
    return newton_steps([NewtonJob(target, b, a, gamma)], damping, order)[0]
