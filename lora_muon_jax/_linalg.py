"""Small dense linear algebra for LoRA updates: r×r inverse square roots and msign.

Every routine here works on stacks ``(..., r, r)`` (or thin ``(..., m, r)``
matrices for the paper's Polar Express) in float32, whatever the dtype of the
parameters, and maps a zero input to a zero output: directions with no mass get no
step (pseudo-inverse semantics), never inf or NaN.

Matrix polynomials (Newton–Schulz, Polar Express, with the coefficient tables of
the LoRA-Muon paper and of Muon), an exact SVD ``msign`` for references, and the
factorizations the peers share: thin QR, the randomized range finder and SVD, and
one batched call per matrix size for many small stacks
(:func:`apply_batched_by_size`). The ``r×r`` spectral functions of LoRA-Muon's
default route live in :mod:`lora_muon_jax._whitened_polar`. Coefficient tables are
plain Python tuples and become arrays only at trace time, so nothing is created
when an optimizer is constructed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

from lora_muon_jax import _lapack_order, _sharding

# Matmuls here are tiny (r×r) or reductions that decide the accuracy of the whole
# update, so they always run at full float32 precision (no TF32 / bf16 passes).
HIGHEST = jax.lax.Precision.HIGHEST

# Damped Newton–Schulz inverse square root, 7 steps (LoRA-Muon paper; docs/algorithm.md
# §Routes and fallbacks).
DAMPED_NS_INV_SQRT_COEFFS: tuple[tuple[float, float, float], ...] = (
    (7.424865680309214, -18.39581635618996, 12.896720413604342),
    (3.4877256051546017, -2.3300436563986993, 0.4404692168431095),
    (2.7766085124882527, -2.070643152532662, 0.46302261050004967),
    (1.9913142104341506, -1.373936700681269, 0.3875934979568538),
    (1.8754637749479246, -1.2505152090010534, 0.37505152463617264),
    (1.874999066623701, -1.2499981332141676, 0.37499906659046633),
    (1.875, -1.25, 0.375),
)
DAMPED_NS_GAMMA = 1.001
DAMPED_NS_SHIFT = 1e-5

# Muon's quintic Newton–Schulz coefficients (Jordan 2024; optax.contrib.muon's default).
MUON_NS_COEFFS: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)

# Polar Express msign, 8 steps (Amsel et al. 2025, as used by the LoRA-Muon paper).
POLAR_EXPRESS_COEFFS: tuple[tuple[float, float, float], ...] = (
    (7.2086, -15.5131, 9.0178),
    (3.9623, -2.5813, 0.4542),
    (3.9466, -2.5765, 0.4544),
    (3.8991, -2.5671, 0.4566),
    (3.7186, -2.5308, 0.4653),
    (3.1390, -2.3073, 0.4733),
    (2.1715, -1.5246, 0.3885),
    (1.8648, -1.2224, 0.3577),
)
# Polar Express is safe when the largest singular value is slightly below 1.
POLAR_EXPRESS_SAFETY = 1.01

_Tree = TypeVar("_Tree")


def sym(x: jax.Array) -> jax.Array:
    """Symmetric part ``(x + xᵀ)/2`` of a stack of square matrices."""
    return 0.5 * (x + jnp.swapaxes(x, -1, -2))


def mm(x: jax.Array, y: jax.Array) -> jax.Array:
    """Batched matmul at full float32 precision."""
    return jnp.matmul(x, y, precision=HIGHEST)


def eye_like(x: jax.Array) -> jax.Array:
    """Identity matrices shaped like the stack ``x``."""
    return jnp.broadcast_to(jnp.eye(x.shape[-1], dtype=x.dtype), x.shape)


def _scan_coeffs(body, carry, coeffs):
    # A rolled loop over the coefficient table: the table is made an array here, at
    # trace time, and XLA keeps one copy of the loop body (optax PR #1650).
    table = jnp.asarray(coeffs, dtype=jnp.float32)
    carry, _ = jax.lax.scan(lambda c, abc: (body(c, abc), None), carry, table)
    return carry


def inv_sqrt_damped_newton_schulz(s: jax.Array, shift: float = DAMPED_NS_SHIFT) -> jax.Array:
    """The paper's 7-step damped Newton–Schulz inverse square root of a PSD stack.

    ``P₀ = s/‖s‖_F + δ I`` (the paper's ``δ = 10⁻⁵`` by default), ``X₀ = I``; each step forms
    ``W = (a/γ) I + (b/γ³) P + (c/γ⁵) P²``, ``X ← X W``, ``P ← sym(P W²)``; the
    result is ``‖s‖_F^{-1/2} X``. Accuracy degrades with ``cond(s)`` (about 1e-2 at
    ``cond(s) = 1000``; docs/algorithm.md §Routes and fallbacks). A zero matrix maps
    to zero.
    """
    norm = jnp.sqrt(jnp.sum(jnp.square(s), axis=(-2, -1), keepdims=True))
    safe = jnp.where(norm > 0, norm, 1.0)
    eye = eye_like(s)
    p = s / safe + shift * eye
    g = DAMPED_NS_GAMMA

    def body(carry, abc):
        x, p = carry
        w = (abc[0] / g) * eye + (abc[1] / g**3) * p + (abc[2] / g**5) * mm(p, p)
        return mm(x, w), sym(mm(p, mm(w, w)))

    x, _ = _scan_coeffs(body, (eye, p), DAMPED_NS_INV_SQRT_COEFFS)
    return jnp.where(norm > 0, x * jax.lax.rsqrt(safe), 0.0)


def frobenius_normalize(x: jax.Array, safety: float = POLAR_EXPRESS_SAFETY) -> jax.Array:
    """``x / (safety · ‖x‖_F)`` per matrix of a stack, without overflow; zero stays zero."""
    x = x.astype(jnp.float32)
    big = jnp.max(jnp.abs(x), axis=(-2, -1), keepdims=True)
    x = x / jnp.where(big > 0, big, 1.0)  # entries now in [-1, 1]: squares can't overflow
    norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True))
    return x / jnp.where(norm > 0, safety * norm, 1.0)


def polar_express(x: jax.Array, *, tall: bool, normalize: bool = True) -> jax.Array:
    """The paper's 8-step Polar Express ``msign`` of a thin matrix stack.

    The iteration works on the short side: for a tall ``x`` (``tall=True``) it forms
    ``U = xᵀx`` and steps ``x ← a x + x (b U + c U²)``; for a wide one,
    ``U = x xᵀ`` and ``x ← a x + (b U + c U²) x``. The input must have spectral norm
    at most 1: with ``normalize=True`` it is first divided by ``1.01 ‖x‖_F``
    (:func:`frobenius_normalize`); pass ``False`` if the caller already did so. A
    zero matrix maps to zero. Singular values come out in about ``[0.999, 1]`` up to
    ``cond(x) = 1000`` (docs/algorithm.md §Routes and fallbacks).
    """
    if normalize:
        x = frobenius_normalize(x)

    # The short-side Gram contracts the long (possibly sharded) axis: declare it
    # replicated so explicit sharding reduces only r×r numbers.
    gram_sharding = _sharding.small_out_sharding(x)

    def body(x, abc):
        xt = jnp.swapaxes(x, -1, -2)
        pair = (xt, x) if tall else (x, xt)
        u = jnp.matmul(*pair, precision=HIGHEST, out_sharding=gram_sharding)
        poly = abc[1] * u + abc[2] * mm(u, u)
        return abc[0] * x + (mm(x, poly) if tall else mm(poly, x))

    return _scan_coeffs(body, x, POLAR_EXPRESS_COEFFS)


def newton_schulz(
    x: jax.Array,
    coeffs: Any = MUON_NS_COEFFS,
    steps: int = 5,
    *,
    eps: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Muon's Newton–Schulz ``msign`` of a matrix stack, in a rolled loop.

    The iteration runs on the short side (a tall stack is transposed and back) and
    steps ``x ← a x + (b A + c A²) x`` with ``A = x xᵀ``. ``coeffs`` is one
    ``(a, b, c)`` triple used every step, or a table of which the last ``steps``
    rows are used (optax's convention). The input is first scaled to unit
    Frobenius norm: with ``eps=None`` overflow-safely (:func:`frobenius_normalize`),
    otherwise as ``x / (‖x‖_F + eps)``, exactly like ``optax.contrib.muon``. A zero
    matrix maps to zero. The fixed quintic leaves singular values in about
    ``[0.7, 1.2]``, not at 1.
    """
    tall = x.shape[-2] > x.shape[-1]
    if tall:
        x = jnp.swapaxes(x, -1, -2)
    x = x.astype(jnp.float32)
    if eps is None:
        x = frobenius_normalize(x, safety=1.0)
    else:
        x = x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)) + eps)
    rows = (
        tuple(tuple(r) for r in coeffs)
        if isinstance(coeffs[0], (tuple, list))
        else (tuple(coeffs),)
    )
    table = rows * steps if len(rows) == 1 else rows[-steps:]
    gram_sharding = _sharding.small_out_sharding(x)

    def body(x: jax.Array, abc: jax.Array) -> jax.Array:
        a = jnp.matmul(x, jnp.swapaxes(x, -1, -2), precision=HIGHEST, out_sharding=gram_sharding)
        b = abc[1] * a + abc[2] * mm(a, a)
        return abc[0] * x + mm(b, x)

    x = _scan_coeffs(body, x, table)
    return jnp.swapaxes(x, -1, -2) if tall else x


def msign_svd(x: jax.Array) -> jax.Array:
    """Exact ``U Vᵀ`` of a stack by thin SVD; numerically zero singular values drop."""
    u, s, vt = jnp.linalg.svd(x.astype(jnp.float32), full_matrices=False)
    tol = max(x.shape[-2:]) * jnp.finfo(jnp.float32).eps * jnp.max(s, axis=-1, keepdims=True)
    return mm(u * (s > tol).astype(jnp.float32)[..., None, :], vt)


def _flat_batch(x: jax.Array, batch_ndim: int) -> jax.Array:
    """``x`` with its ``batch_ndim`` leading axes flattened into one, replicated.

    Under explicit sharding the (small) arrays are replicated so that arrays of
    differently sharded leaves can be joined into one batch.
    """
    x = _sharding.replicate(x)
    return x.reshape((-1,) + x.shape[batch_ndim:])


def apply_batched_by_size(
    fn: Callable[..., jax.Array],
    items: Sequence[tuple[jax.Array, ...]],
    *,
    deps: Sequence[Any] = (),
) -> list[jax.Array]:
    """``fn`` on many small stacks, in one call per matrix size instead of one per stack.

    Each item is a tuple of arrays (the arguments of ``fn`` for that item) whose
    first is a stack ``(*batch_i, p, q)``; the others share its leading ``batch_i``
    (per-matrix scalars ``(*batch_i,)``, other stacks). Items whose first stack has
    the same ``(p, q)`` are flattened to one batch axis, concatenated argument by
    argument and passed to ``fn`` in one call: one batched LAPACK call for a whole
    model instead of one per leaf (fewer kernels, a smaller program). ``fn``
    returns one array of shape ``(N, *tail)`` for the ``N`` matrices it was given;
    it is split back into ``(*batch_i, *tail)`` per item, in the order of
    ``items``. The calls for different sizes run one after another, and the first
    after ``deps`` (:func:`lora_muon_jax._lapack_order.after`): on CPU each may be a
    batched LAPACK call.

    Args:
      fn: a batched function of ``len(items[0])`` arrays with ``N`` leading.
      items: the arguments of every item.
      deps: arrays the first call must wait for.

    Returns:
      ``fn``'s result of each item.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax._linalg import apply_batched_by_size
      >>> items = [(jnp.eye(2)[None] * 3,), (jnp.eye(3),), (jnp.eye(2) * 5,)]
      >>> out = apply_batched_by_size(lambda x: jnp.linalg.eigvalsh(x)[:, -1], items)
      >>> [x.tolist() for x in out]  # two calls: the 2x2 stacks together, then the 3x3
      [[3.0], 1.0, 5.0]
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, item in enumerate(items):
        groups.setdefault(tuple(item[0].shape[-2:]), []).append(i)
    out: list[Any] = [None] * len(items)
    previous = tuple(deps)
    for idx in groups.values():
        flats = [[_flat_batch(x, items[i][0].ndim - 2) for x in items[i]] for i in idx]
        joined = [jnp.concatenate(parts) for parts in zip(*flats, strict=True)]
        result = fn(_lapack_order.after(joined[0], *previous), *joined[1:])
        previous = (result,)
        start = 0
        for i, flat in zip(idx, flats, strict=True):
            size = flat[0].shape[0]
            piece = result[start : start + size]
            out[i] = piece.reshape(items[i][0].shape[:-2] + piece.shape[1:])
            start += size
    return out


def thin_qr(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Thin QR ``x = Q R`` of a stack ``(*batch, p, k)``; ``Q`` keeps ``x``'s sharding.

    QR needs whole columns: under explicit sharding the matrix axes are gathered for
    it (``p × k`` numbers per matrix, batch axes stay sharded) and ``Q`` goes back to
    the sharding of ``x``.
    """
    spec = _sharding.explicit_spec(x)
    if spec is None:
        return jnp.linalg.qr(x)
    batch = tuple(_sharding.small_out_sharding(x) or ())[:-2]
    gathered = jax.sharding.reshard(x, jax.sharding.PartitionSpec(*batch, None, None))
    q, r = jnp.linalg.qr(gathered)
    return jax.sharding.reshard(q, spec), r


def randomized_range(
    apply: Callable[[_Tree], _Tree],
    apply_transpose: Callable[[_Tree], _Tree],
    sketch: _Tree,
    power_iters: int,
) -> _Tree:
    """Orthonormal bases ``Q`` of the ranges of linear maps known through products.

    The randomized range finder with power iterations (Halko, Martinsson, Tropp
    2011, Alg. 4.3-4.4): ``Q = orth(A Ω)``, then ``power_iters`` times
    ``Q ← orth(A orth(Aᵀ Q))``, where ``orth`` is the ``Q`` of a thin QR. The maps
    are given as functions on pytrees of stacks, so many matrices (or a model's
    gradient, read through backward passes) are sketched in the same calls.

    Args:
      apply: ``Ω ↦ A Ω`` for a tree of ``(*batch, n, k)`` stacks.
      apply_transpose: ``Q ↦ Aᵀ Q`` for a tree of ``(*batch, m, k)`` stacks.
      sketch: the random ``Ω`` (Gaussian, random signs, ...).
      power_iters: ``q``, the number of power iterations (a rolled loop).

    Returns:
      ``Q``: a tree of ``(*batch, m, k)`` stacks with orthonormal columns spanning
      about the top-``k`` range of each ``A`` (exactly its range if its rank is at
      most ``k``).
    """

    def orth(ys: _Tree) -> _Tree:
        return jax.tree.map(lambda y: thin_qr(y)[0], ys)

    def power_step(_: Any, qs: _Tree) -> _Tree:
        return orth(apply(orth(apply_transpose(qs))))

    qs = orth(apply(sketch))
    return jax.lax.fori_loop(0, power_iters, power_step, qs) if power_iters else qs


def randomized_svd(
    x: jax.Array, key: jax.Array, rank: int, oversampling: int
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Rank-``rank`` randomized SVD ``x ≈ U diag(S) Vᵀ`` of a ``(*batch, m, n)`` stack.

    ``Ω ~ N(0, 1)^{n×k}`` with ``k = min(rank + oversampling, m, n)``;
    ``Q = qr(x Ω)`` (:func:`randomized_range`); ``Ũ Σ Vᵀ = svd(Qᵀ x)``; ``U = Q Ũ``;
    the top ``min(rank, m, n)`` triplets are kept. Exact when ``rank(x) <= k``, in
    particular when ``k = min(m, n)``. A zero matrix gives zero singular values (no
    NaN). Float32 in, float32 out.

    Returns:
      ``(U, S, V)`` of shapes ``(*batch, m, r)``, ``(*batch, r)``, ``(*batch, n, r)``.
    """
    *batch, m, n = x.shape
    k = min(rank + oversampling, m, n)
    r = min(rank, m, n)
    omega = jax.random.normal(key, (*batch, n, k), jnp.float32)
    xt = jnp.swapaxes(x, -1, -2)
    q = randomized_range(lambda o: mm(x, o), lambda y: mm(xt, y), omega, 0)
    small = mm(jnp.swapaxes(q, -1, -2), x)  # (*batch, k, n)
    ub, s, vt = jnp.linalg.svd(small, full_matrices=False)
    return mm(q, ub[..., :r]), s[..., :r], jnp.swapaxes(vt[..., :r, :], -1, -2)
