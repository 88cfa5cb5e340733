"""LoRA-Pre: Adam and Muon with a low-rank momentum for dense weight matrices.

LoRA-Pre (Wang et al., 2026) reads the EMA ``m ← β m + (1-β) g`` as one gradient
step of size ``1-β`` on ``½‖m - g‖²`` and keeps ``m`` as a product ``m_B m_A`` of
two thin factors, refreshed each step by a closed-form damped Newton step on each
factor. The optimizer state of a ``p × q`` matrix shrinks from ``pq`` (Muon) or
``2pq`` (Adam) to ``(p+q) r`` or ``2(p+q) r`` floats.

These are *dense-weight* optimizers (pretraining or full fine-tuning): they update
full matrices and reject trees that contain LoRA factor pairs, which belong to
:func:`lora_muon_jax.lora_muon` and the LoRA-pair peers.

Sources. The paper's full text and code were not readable when this was written
(the official repository, ``github.com/mrflogs/LoRA-Pre``, still holds only a
README at 29c53c6; re-checked). Primary: the abstract and introduction (arXiv
2602.24283v1: EMA as online regression, low-rank factorization of the momentum,
Adam and Muon, Llama 60M-1B). Secondary: the project's earlier notes
(``peers.md`` §4, not in this repository; from a third-party implementation of
Algorithm 1, Eq. 11-12, App. B.1, App. C.1), papernotes (ICLR 2026), the zij
summary, a third-party PyTorch ``LowRankAdam`` that cites Algorithm 1 and a
third-party ``LoRAPreMuon`` that cites Algorithm 2. They agree on the Newton step
of each factor (Theorem 3.1), ``γ1 = 1-√β1``, ``γ2 = 1-β2^{1/4}``, the ``|g|``
factors squared on reconstruction, ``m_B = 0``, ``m_A ~ N(0, 0.02²)`` at init and
``δ = 1e-6``. They disagree on (i) whether the second factor's step sees the first
one's (Gauss–Seidel: the PyTorch code; Jacobi: ``peers.md``, zij) and (ii) which
product forms the moment used in the step. Our choices, with the reasons, are in
:func:`newton_steps` and :func:`scale_by_lora_pre_adam`; both orders are
available. The Muon variant's rule is our inference (``peers.md`` §4 [I]); its
momentum has no Nesterov term by default, as in the one source for Algorithm 2.
Addresses: see :func:`lora_pre_adam` and :func:`lora_pre_muon`.

Helpers shared with LiMuon (LoRA-pair rejection, matrix labels, the AdamW fallback,
Muon's shape scaling, the orthogonalizers) live in :mod:`lora_muon_jax.peers._dense`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _linalg, _pairs, _pairwise, _sharding, _validation
from lora_muon_jax.peers import _dense

# ----------------------------------------------------------------------------------
# LoRA-Pre.

_ADAM_SCALE_FN = "scale_by_lora_pre_adam"
_ADAM_ALIAS_FN = "lora_pre_adam"
_MUON_SCALE_FN = "scale_by_lora_pre_muon"
_MUON_ALIAS_FN = "lora_pre_muon"


class LoRAPreAdamState(NamedTuple):
    """State of :func:`scale_by_lora_pre_adam`: two factor pairs per matrix."""

    count: jax.Array  # shape=(), dtype=int32.
    m_b: optax.Updates  # per leaf (*batch, p, r), dtype=state_dtype; first moment.
    m_a: optax.Updates  # per leaf (*batch, r, q), dtype=state_dtype.
    v_b: optax.Updates  # per leaf (*batch, p, r), dtype=state_dtype; tracks |g|.
    v_a: optax.Updates  # per leaf (*batch, r, q), dtype=state_dtype.


class LoRAPreMuonState(NamedTuple):
    """State of :func:`scale_by_lora_pre_muon`: one factor pair per matrix."""

    count: jax.Array  # shape=(), dtype=int32.
    m_b: optax.Updates  # per leaf (*batch, p, r), dtype=state_dtype.
    m_a: optax.Updates  # per leaf (*batch, r, q), dtype=state_dtype.


def factor_rank(rank: int, x: Any) -> int:
    """The rank used for a ``(*batch, p, q)`` leaf: ``min(rank, p, q)``."""
    _, p, q = _dense.matrix_size(x)
    return min(rank, p, q)


def _damped_inverses(grams: Sequence[jax.Array], damping: jax.Array) -> list[jax.Array]:
    """``(S + δ I)⁻¹`` of every PSD float32 stack ``S`` in ``grams``, never NaN.

    Stacks with the same ``r`` are concatenated and factored in one batched call
    (one Cholesky per step for a whole model, not one per leaf: fewer kernels and a
    smaller program). If rounding made a damped Gram indefinite (a tiny ``δ`` next
    to large eigenvalues), that batch takes an ``eigh`` route instead, with
    eigenvalues clipped at zero before ``δ`` is added.
    """
    out: list[Any] = [None] * len(grams)
    by_rank: dict[int, list[int]] = {}
    for i, g in enumerate(grams):
        by_rank.setdefault(g.shape[-1], []).append(i)
    previous: tuple[jax.Array, ...] = ()
    for r, idx in by_rank.items():
        flat = jnp.concatenate([_linalg.sym(grams[i]).reshape(-1, r, r) for i in idx])
        flat = _linalg.after(flat, *previous)  # one batched LAPACK call at a time
        eye = jnp.eye(r, dtype=flat.dtype)
        chol = jnp.linalg.cholesky(flat + damping * eye)
        ok = jnp.all(jnp.isfinite(chol))

        def by_cholesky(chol=chol, eye=eye) -> jax.Array:
            return jax.scipy.linalg.cho_solve((chol, True), jnp.broadcast_to(eye, chol.shape))

        def by_eigh(flat=flat) -> jax.Array:
            lam, vecs = jnp.linalg.eigh(flat)
            inv = 1.0 / (jnp.maximum(lam, 0.0) + damping)
            return _linalg.mm(vecs * inv[..., None, :], jnp.swapaxes(vecs, -1, -2))

        inv = jax.lax.cond(ok, by_cholesky, by_eigh)
        previous = (inv,)
        start = 0
        for i in idx:
            size = grams[i].size // (r * r)
            out[i] = inv[start : start + size].reshape(grams[i].shape)
            start += size
    return out


class NewtonJob(NamedTuple):
    """One factor pair ``b (*batch, p, r)``, ``a (*batch, r, q)`` fitted to ``target``."""

    target: jax.Array
    b: jax.Array
    a: jax.Array
    gamma: jax.Array


def _gram(x: jax.Array, x_first: bool) -> jax.Array:
    """``xᵀx`` (``x_first``) or ``x xᵀ``: r×r, full precision, replicated under sharding."""
    xt = jnp.swapaxes(x, -1, -2)
    pair = (xt, x) if x_first else (x, xt)
    return jnp.matmul(
        *pair, precision=_linalg.HIGHEST, out_sharding=_sharding.small_out_sharding(x)
    )


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
    for j, ia in zip(jobs, inv_a):
        t_at = jnp.matmul(j.target, jnp.swapaxes(j.a, -1, -2))  # (*batch, p, r)
        new_bs.append((1.0 - j.gamma) * j.b + j.gamma * _linalg.mm(t_at, ia))
    partners = new_bs if order == "gauss_seidel" else [j.b for j in jobs]
    inv_b = _damped_inverses([_gram(b, x_first=True) for b in partners], damping)
    out = []
    for j, b, nb, ib in zip(jobs, partners, new_bs, inv_b):
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


FactorUpdate = Literal["gauss_seidel", "jacobi"]
FACTOR_UPDATES: tuple[str, ...] = ("gauss_seidel", "jacobi")


def _check_lora_pre(
    fn: str, rank: Any, damping: Any, init_scale: Any, state_dtype: Any, factor_update: Any
) -> jnp.dtype:
    _validation.check_static_int(fn, "rank", rank)
    _validation.check_choice(fn, "factor_update", factor_update, FACTOR_UPDATES)
    _validation.check_scalar("damping", damping, low=0.0, low_inclusive=False, fn=fn)
    _validation.check_scalar("init_scale", init_scale, low=0.0, low_inclusive=False, fn=fn)
    return _dense.state_dtype_of(fn, state_dtype)


def _init_factor_trees(
    params: Any, rank: int, seed: Any, init_scale: Any, dtype: jnp.dtype, moments: int
) -> list[tuple[Any, Any]]:
    """``moments`` trees of ``(b, a)`` factors: ``b = 0``, ``a ~ N(0, init_scale²)``."""
    leaves, treedef = jax.tree.flatten(params)
    keys = _dense.leaf_keys(seed, leaves, moments)
    out = []
    for k in range(moments):
        bs, as_ = [], []
        for x, kx in zip(leaves, keys):
            batch, p, q = _dense.matrix_size(x)
            r = factor_rank(rank, x)
            bs.append(jnp.zeros((*batch, p, r), dtype))
            noise = jax.random.normal(kx[k], (*batch, r, q), jnp.float32)
            as_.append((init_scale * noise).astype(dtype))
        out.append((jax.tree.unflatten(treedef, bs), jax.tree.unflatten(treedef, as_)))
    return out


def _leaves_like(treedef: Any, tree: Any) -> list[Any]:
    return treedef.flatten_up_to(tree)


def scale_by_lora_pre_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    rank: int,
    damping: jax.typing.ArrayLike = 1e-6,
    factor_update: FactorUpdate = "gauss_seidel",
    init_scale: jax.typing.ArrayLike = 0.02,
    seed: int = 0,
    state_dtype: Any = "float32",
    pairs: _pairs.PairsLike = "auto",
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales matrix gradients like Adam, with both moments kept as rank-r products.

    For each matrix leaf ``g`` of shape ``(*batch, p, q)`` the state holds
    ``m_B (p×r)``, ``m_A (r×q)`` for the first moment and ``v_B``, ``v_A`` for the
    second (which track ``|g|`` and are squared on reconstruction, so ``v ≥ 0``).
    With :math:`γ_1 = 1-\sqrt{β_1}` and :math:`γ_2 = 1-β_2^{1/4}` (the product of
    two factors decays at :math:`β_1`, its square at :math:`β_2`):

    .. math::

      m_t &= β_1\, m_B m_A + (1-β_1)\, g, \qquad
      v_t = β_2\, (v_B v_A)^{\circ 2} + (1-β_2)\, g^{\circ 2} \\
      (m_B, m_A) &\leftarrow \mathrm{Newton}_{γ_1}(g;\, m_B, m_A), \qquad
      (v_B, v_A) \leftarrow \mathrm{Newton}_{γ_2}(|g|;\, v_B, v_A) \\
      u &= \frac{m_t / (1-β_1^t)}{\sqrt{v_t / (1-β_2^t)} + ε}

    where :math:`\mathrm{Newton}_γ(T; B, A)` is one damped Newton step of each
    factor on :math:`½\|BA - T\|_F^2` (:func:`newton_steps`):
    :math:`B' = (1-γ)B + γ\, T A^\top (AA^\top + δI)^{-1}`, then
    :math:`A' = (1-γ)A + γ\, (\tilde B^\top \tilde B + δI)^{-1} \tilde B^\top T` with
    :math:`\tilde B = B'` (``factor_update="gauss_seidel"``, default) or
    :math:`\tilde B = B` (``"jacobi"``). Gauss–Seidel is the default because its
    product is a projected EMA, exactly the EMA for square full-rank factors, while
    Jacobi's carries a second-order term that grows like :math:`\|g\|^2/\|m\|`:
    with Muon it diverges on a 2×2 quadratic once the momentum averages out near
    the optimum (``tests/test_lora_pre.py``). The moments used in the step are the
    stored (old) product decayed once plus the fresh full-rank gradient, which is
    Adam's recursion with the previous moment replaced by its low-rank estimate:
    the first step is exactly Adam's, and ``v_t ≥ (1-β_2) g²`` keeps ``v̂ > 0``
    wherever ``g ≠ 0``. Initialization: ``m_B = v_B = 0``,
    ``m_A, v_A ~ N(0, init_scale²)`` from ``seed`` (drawn in ``init``).

    State: ``2 (p+q) r`` floats per matrix (``r = min(rank, p, q)``) plus a count.
    Per step: six ``p×q×r`` products and, for the whole tree, two batched r×r
    damped Cholesky inverses, all in float32; the update is returned in the
    gradient's dtype.

    Every leaf must be a matrix (``ndim >= 2``; leading axes are batch axes, e.g.
    stacked layers). :func:`lora_pre_adam` sends other leaves to AdamW.

    Args:
      b1: :math:`β_1`, decay of the first moment, in ``(0, 1)``.
      b2: :math:`β_2`, decay of the second moment, in ``(0, 1)``.
      eps: :math:`ε` added to :math:`\sqrt{\hat v}`.
      rank: ``r``, the rank of the moment factors (capped at ``min(p, q)`` per
        leaf). Static: under :func:`optax.inject_hyperparams` pass
        ``static_args=('rank',)``.
      damping: :math:`δ`, absolute damping of the r×r Gram solves (App. C.1 [S]:
        ``1e-6``). It matters while a factor is small, e.g. ``m_B = 0`` at step 1.
      factor_update: ``"gauss_seidel"`` (default) or ``"jacobi"``; see above.
        Static.
      init_scale: standard deviation of the random ``m_A``, ``v_A`` (0.02 [S]).
      seed: integer seed of that initialization, used only in ``init``.
      state_dtype: dtype of the factors; float32 by default because the r×r
        solves amplify rounding. A string (e.g. ``"bfloat16"``) so it passes
        through ``inject_hyperparams``.
      pairs: LoRA pair rules (see :func:`lora_muon_jax.find_lora_pairs`). A tree
        with LoRA pairs is rejected; pass ``pairs=()`` to turn detection off.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` (``params`` not needed).

    Raises:
      ValueError: out-of-range hyperparameters; a leaf with ``ndim < 2``; LoRA
        factor pairs in the tree (naming their paths).
      TypeError: a ``rank`` that is not a Python int.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.peers import scale_by_lora_pre_adam
      >>> tx = scale_by_lora_pre_adam(rank=2)
      >>> params = {'w': jnp.ones((8, 6))}
      >>> state = tx.init(params)
      >>> [x.shape for x in (state.m_b['w'], state.m_a['w'])]
      [(8, 2), (2, 6)]
      >>> grads = {'w': jnp.full((8, 6), 0.5)}
      >>> updates, state = tx.update(grads, state)
      >>> print(f"{float(updates['w'][0, 0]):.4f}")  # step 1 is Adam's: sign(g)
      1.0000

    References:
      Wang, Liang, He, Wang, Tan, `Taming Momentum: Rethinking Optimizer States
      Through Low-Rank Approximation <https://arxiv.org/abs/2602.24283>`_, ICLR 2026

      Kingma, Ba, `Adam: A Method for Stochastic Optimization
      <https://arxiv.org/abs/1412.6980>`_, 2015

    .. note::
      The secondary sources disagree on the moment used in the step: ``peers.md``
      uses the old product plus the fresh gradient, as here; the zij summary mixes
      the fresh gradient into the *new* product; the PyTorch code uses the new
      product alone. With Gauss–Seidel and square full-rank factors the new product
      equals the first choice exactly; only the first choice reduces to Adam's
      first step and keeps ``v̂`` away from zero where ``g ≠ 0``. Check against the
      paper's Algorithm 1 before quoting results.

    .. warning::
      The ``|g|`` product fills at rate :math:`\sqrt{β_2}` per step but is bias
      corrected with :math:`1-β_2^t`, so :math:`\hat v` starts small and the first
      ~:math:`1/(1-β_2)` steps are several times larger than Adam's ([S]: use a
      learning-rate warmup). At ranks below ``min(p, q)`` the step is a ratio of two
      low-rank estimates and can exceed Adam's by a large factor where the
      estimate of :math:`|g|` is too small; the stored first moment, in contrast,
      came closer to Adam's with every rank increase in our measurements.
    """
    sdt = _check_lora_pre(_ADAM_SCALE_FN, rank, damping, init_scale, state_dtype, factor_update)
    _validation.check_scalar(
        "b1", b1, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, fn=_ADAM_SCALE_FN
    )
    _validation.check_scalar(
        "b2", b2, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, fn=_ADAM_SCALE_FN
    )
    _validation.check_scalar("eps", eps, low=0.0, fn=_ADAM_SCALE_FN)

    def init_fn(params: Any) -> LoRAPreAdamState:
        _dense.reject_lora_pairs(_ADAM_SCALE_FN, params, pairs)
        _dense.check_matrices(_ADAM_SCALE_FN, params, _ADAM_ALIAS_FN)
        (m_b, m_a), (v_b, v_a) = _init_factor_trees(params, rank, seed, init_scale, sdt, 2)
        return LoRAPreAdamState(jnp.zeros([], jnp.int32), m_b, m_a, v_b, v_a)

    def update_fn(
        updates: Any, state: LoRAPreAdamState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LoRAPreAdamState]:
        del params, extra_args
        _dense.reject_lora_pairs(_ADAM_SCALE_FN, updates, pairs)
        _dense.check_matrices(_ADAM_SCALE_FN, updates, _ADAM_ALIAS_FN)
        grads, treedef = jax.tree.flatten(updates)
        count = optax.safe_increment(state.count)
        beta1, beta2 = jnp.asarray(b1, jnp.float32), jnp.asarray(b2, jnp.float32)
        gamma1, gamma2 = 1.0 - jnp.sqrt(beta1), 1.0 - beta2**0.25
        bc1 = 1.0 - beta1 ** count.astype(jnp.float32)
        bc2 = 1.0 - beta2 ** count.astype(jnp.float32)
        delta = jnp.asarray(damping, jnp.float32)
        eps32 = jnp.asarray(eps, jnp.float32)

        olds = [_leaves_like(treedef, t) for t in (state.m_b, state.m_a, state.v_b, state.v_a)]
        us, jobs = [], []
        for g, mb, ma, vb, va in zip(grads, *olds):
            g32 = _pairwise.f32(g)
            mb32, ma32, vb32, va32 = _pairwise.f32(mb), _pairwise.f32(ma), _pairwise.f32(vb), _pairwise.f32(va)
            # The moments of this step: the stored (old) product decayed once plus the
            # fresh full-rank gradient, i.e. Adam's recursion on the low-rank estimate.
            m = beta1 * jnp.matmul(mb32, ma32) + (1.0 - beta1) * g32
            v = beta2 * jnp.square(jnp.matmul(vb32, va32)) + (1.0 - beta2) * jnp.square(g32)
            us.append(((m / bc1) / (jnp.sqrt(v / bc2) + eps32)).astype(g.dtype))
            jobs += [
                NewtonJob(g32, mb32, ma32, gamma1),
                NewtonJob(jnp.abs(g32), vb32, va32, gamma2),
            ]
        new = newton_steps(jobs, delta, factor_update)
        cols: list[list[Any]] = [us, [], [], [], []]  # u, m_b, m_a, v_b, v_a
        for k, old in enumerate(zip(*olds)):
            for col, x, o in zip(cols[1:], (*new[2 * k], *new[2 * k + 1]), old):
                col.append(x.astype(o.dtype))
        trees = [jax.tree.unflatten(treedef, col) for col in cols]
        return trees[0], LoRAPreAdamState(count, *trees[1:])

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lora_pre_adam(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    rank: int,
    damping: jax.typing.ArrayLike = 1e-6,
    factor_update: FactorUpdate = "gauss_seidel",
    init_scale: jax.typing.ArrayLike = 0.02,
    seed: int = 0,
    state_dtype: Any = "float32",
    weight_decay_mask: Any = None,
    pairs: _pairs.PairsLike = "auto",
    adam_eps_root: jax.typing.ArrayLike = 0.0,
    adam_weight_decay: jax.typing.ArrayLike = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Pre (Adam): AdamW for dense matrices with rank-r moment factors.

    Matrix leaves (``ndim >= 2``) follow :func:`scale_by_lora_pre_adam`, then
    decoupled weight decay and the learning rate, as in AdamW:
    :math:`θ \leftarrow θ - η\,(u + λθ)`. Other leaves (biases, norms) go to
    :func:`optax.adamw` with the same ``b1``, ``b2``, ``eps`` and the ``adam_*``
    arguments. Trees with LoRA factor pairs are rejected (use
    :func:`lora_muon_jax.lora_muon`).

    Under :func:`optax.inject_hyperparams` pass ``static_args=('rank',)``; the
    other numbers become state and change without recompiling.

    Args:
      learning_rate: :math:`η`, a float or an optax schedule.
      b1: :math:`β_1`.
      b2: :math:`β_2`.
      eps: :math:`ε`.
      weight_decay: :math:`λ` for matrix leaves (multiplied by :math:`η`).
      rank: rank of the moment factors. Static.
      damping: :math:`δ` of the r×r solves.
      factor_update: ``"gauss_seidel"`` (default) or ``"jacobi"``. Static.
      init_scale: standard deviation of the random initial ``m_A``, ``v_A``.
      seed: integer seed of that initialization (used in ``init`` only).
      state_dtype: dtype of the factors (default float32).
      weight_decay_mask: optional mask (tree or callable) for ``weight_decay``.
      pairs: LoRA pair rules; ``pairs=()`` turns the rejection off.
      adam_eps_root: AdamW :math:`ε_{root}` for non-matrix leaves.
      adam_weight_decay: AdamW weight decay for non-matrix leaves.
      adam_learning_rate: AdamW learning rate; ``None`` uses ``learning_rate``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`; ``update`` needs
      ``params`` only for weight decay.

    Raises:
      ValueError, TypeError: as :func:`scale_by_lora_pre_adam`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.peers import lora_pre_adam
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> target = jax.random.normal(k1, (16, 12))
      >>> params = {'w': jnp.zeros((16, 12)), 'b': jnp.zeros(12)}
      >>> loss = lambda p: jnp.mean((p['w'] + p['b'] - target) ** 2)
      >>> tx = lora_pre_adam(learning_rate=0.05, rank=4)
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...   grads = jax.grad(loss)(params)
      ...   updates, state = tx.update(grads, state, params)
      ...   return optax.apply_updates(params, updates), state
      >>> print(f"{loss(params):.2f}")
      1.26
      >>> for _ in range(100):
      ...   params, state = step(params, state)
      >>> print(f"{loss(params):.3f}")
      0.000

    References:
      See :func:`scale_by_lora_pre_adam`.

    Sources:
      Primary: Wang, Liang, He, Wang, Tan, *Taming Momentum: Rethinking Optimizer
      States Through Low-Rank Approximation*, arXiv 2602.24283
      (https://arxiv.org/abs/2602.24283), ICLR 2026
      (https://openreview.net/forum?id=9Q0dNBYeEY); only its abstract and
      introduction could be read. Authors' code: https://github.com/mrflogs/LoRA-Pre,
      which holds a README and a license only (commit 29c53c6).
      Secondary: the papernotes summary,
      https://en.papernotes.org/ICLR2026/model_compression/taming_momentum_rethinking_optimizer_states_through_low-rank_approximation/;
      the zij page with Algorithm 1's equations,
      https://junaidaliop.github.io/zij/math/lorapre/; a third-party PyTorch
      ``LowRankAdam`` citing Algorithm 1 (repository: not found).
    """
    _check_lora_pre(_ADAM_ALIAS_FN, rank, damping, init_scale, state_dtype, factor_update)
    matrix_tx = optax.chain(
        scale_by_lora_pre_adam(
            b1,
            b2,
            eps,
            rank=rank,
            damping=damping,
            factor_update=factor_update,
            init_scale=init_scale,
            seed=seed,
            state_dtype=state_dtype,
            pairs=pairs,
        ),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _dense.with_adamw_fallback(
        matrix_tx,
        fn=_ADAM_ALIAS_FN,
        pairs=pairs,
        learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1=b1,
        b2=b2,
        eps=eps,
        eps_root=adam_eps_root,
        weight_decay=adam_weight_decay,
    )


def scale_by_lora_pre_muon(
    beta: jax.typing.ArrayLike = 0.95,
    *,
    rank: int,
    nesterov: bool = False,
    orthogonalizer: _dense.Orthogonalizer = "newton_schulz",
    ns_coeffs: Any = _dense.MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: jax.typing.ArrayLike = 1e-8,
    damping: jax.typing.ArrayLike = 1e-6,
    factor_update: FactorUpdate = "gauss_seidel",
    init_scale: jax.typing.ArrayLike = 0.02,
    seed: int = 0,
    state_dtype: Any = "float32",
    pairs: _pairs.PairsLike = "auto",
) -> optax.GradientTransformationExtraArgs:
    r"""Muon's orthogonalized momentum, with the momentum kept as a rank-r product.

    Muon's buffer :math:`m` of each ``(*batch, p, q)`` matrix is stored as
    ``m_B (p×r) m_A (r×q)`` and refreshed like LoRA-Pre's first moment, with
    :math:`γ = 1-\sqrt{β}` so that the product decays at :math:`β`:

    .. math::

      m_t &= β\, m_B m_A + (1-β)\, g, \qquad
      (m_B, m_A) \leftarrow \mathrm{Newton}_γ(g;\, m_B, m_A) \\
      d_t &= \begin{cases}
        β\, m_t / (1-β^{t+1}) + (1-β)\, g / (1-β^t) & \text{Nesterov} \\
        m_t & \text{otherwise}\end{cases}, \qquad u = \operatorname{msign}(d_t),

    the same direction as :func:`optax.contrib.scale_by_muon` (its bias
    corrections included, ``nesterov`` alike) when ``m_B m_A`` equals Muon's
    buffer. The paper reports "LoRA-Pre Muon" but its rule could not be read;
    this one is our inference (the project's earlier notes, ``peers.md`` §4 [I]).
    Nesterov is off by default: the one source found for the paper's Algorithm 2
    (see :func:`lora_pre_muon`) orthogonalizes the plain heavy-ball momentum, and
    none has a Nesterov term; ``nesterov=True`` gives optax's default instead.
    State: ``(p+q) r`` floats per matrix plus a count.

    Args:
      beta: Muon's momentum decay :math:`β` in ``(0, 1)``.
      rank: rank of the momentum factors (capped at ``min(p, q)``). Static.
      nesterov: Nesterov momentum, as :func:`optax.contrib.muon`; off by default,
        as in the sources of the paper's Algorithm 2.
      orthogonalizer: ``"newton_schulz"`` (Muon's, default), ``"polar_express"``
        or ``"svd"`` (exact). Static.
      ns_coeffs: Newton–Schulz coefficients, shape ``(3,)`` or ``(k, 3)``.
      ns_steps: Newton–Schulz steps. Static.
      eps: added to the Frobenius norm before Newton–Schulz.
      damping: :math:`δ` of the r×r solves.
      factor_update: ``"gauss_seidel"`` (default) or ``"jacobi"``; see
        :func:`scale_by_lora_pre_adam`. Static.
      init_scale: standard deviation of the random initial ``m_A``.
      seed: integer seed of that initialization (used in ``init`` only).
      state_dtype: dtype of the factors (default float32).
      pairs: LoRA pair rules; ``pairs=()`` turns the rejection off.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` (``params`` not needed).

    Raises:
      ValueError, TypeError: as :func:`scale_by_lora_pre_adam`, and for a bad
        ``orthogonalizer``, ``ns_coeffs`` or ``ns_steps``.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax.peers import scale_by_lora_pre_muon
      >>> tx = scale_by_lora_pre_muon(rank=2, orthogonalizer="svd")
      >>> params = {'w': jnp.zeros((6, 4))}
      >>> state = tx.init(params)
      >>> grads = {'w': jnp.arange(24.0).reshape(6, 4) / 24}
      >>> updates, state = tx.update(grads, state)
      >>> print(jnp.round(jnp.linalg.svd(updates['w'], compute_uv=False), 3))
      [1. 1. 0. 0.]

    References:
      Wang et al., `Taming Momentum <https://arxiv.org/abs/2602.24283>`_, 2026

      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024
    """
    fn = _MUON_SCALE_FN
    sdt = _check_lora_pre(fn, rank, damping, init_scale, state_dtype, factor_update)
    _validation.check_scalar(
        "beta", beta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, fn=fn
    )
    _validation.check_scalar("eps", eps, low=0.0, fn=fn)
    _dense.check_orthogonalizer(fn, orthogonalizer, ns_coeffs, ns_steps)

    def init_fn(params: Any) -> LoRAPreMuonState:
        _dense.reject_lora_pairs(fn, params, pairs)
        _dense.check_matrices(fn, params, _MUON_ALIAS_FN)
        ((m_b, m_a),) = _init_factor_trees(params, rank, seed, init_scale, sdt, 1)
        return LoRAPreMuonState(jnp.zeros([], jnp.int32), m_b, m_a)

    def update_fn(
        updates: Any, state: LoRAPreMuonState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LoRAPreMuonState]:
        del params, extra_args
        _dense.reject_lora_pairs(fn, updates, pairs)
        _dense.check_matrices(fn, updates, _MUON_ALIAS_FN)
        grads, treedef = jax.tree.flatten(updates)
        count = optax.safe_increment(state.count)
        b = jnp.asarray(beta, jnp.float32)
        gamma = 1.0 - jnp.sqrt(b)
        t = count.astype(jnp.float32)
        delta = jnp.asarray(damping, jnp.float32)

        leaves = list(
            zip(grads, _leaves_like(treedef, state.m_b), _leaves_like(treedef, state.m_a))
        )
        us, jobs = [], []
        for g, mb, ma in leaves:
            g32 = _pairwise.f32(g)
            m = b * jnp.matmul(_pairwise.f32(mb), _pairwise.f32(ma)) + (1.0 - b) * g32
            jobs.append(NewtonJob(g32, _pairwise.f32(mb), _pairwise.f32(ma), gamma))
            if nesterov:
                d = b * m / (1.0 - b ** (t + 1.0)) + (1.0 - b) * g32 / (1.0 - b**t)
            else:
                d = m
            o = _dense.orthogonalize(d, orthogonalizer, ns_coeffs=ns_coeffs, ns_steps=ns_steps, eps=eps)
            us.append(o.astype(g.dtype))
        new = newton_steps(jobs, delta, factor_update)
        bs = [nb.astype(mb.dtype) for (nb, _), (_, mb, _) in zip(new, leaves)]
        as_ = [na.astype(ma.dtype) for (_, na), (_, _, ma) in zip(new, leaves)]

        def tree(leaves: list[Any]) -> Any:
            return jax.tree.unflatten(treedef, leaves)

        return tree(us), LoRAPreMuonState(count, tree(bs), tree(as_))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lora_pre_muon(
    learning_rate: optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike = 0.95,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    rank: int,
    nesterov: bool = False,
    orthogonalizer: _dense.Orthogonalizer = "newton_schulz",
    ns_coeffs: Any = _dense.MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: jax.typing.ArrayLike = 1e-8,
    damping: jax.typing.ArrayLike = 1e-6,
    factor_update: FactorUpdate = "gauss_seidel",
    init_scale: jax.typing.ArrayLike = 0.02,
    seed: int = 0,
    state_dtype: Any = "float32",
    shape_scaling: _dense.ShapeScaling = "muon",
    consistent_rms: jax.typing.ArrayLike | None = None,
    weight_decay_mask: Any = None,
    pairs: _pairs.PairsLike = "auto",
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    adam_eps_root: jax.typing.ArrayLike = 0.0,
    adam_weight_decay: jax.typing.ArrayLike = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Pre (Muon): Muon for dense matrices with a rank-r momentum buffer.

    Built like :func:`optax.contrib.muon`: on matrix leaves
    :func:`scale_by_lora_pre_muon`, Muon's shape scaling (``shape_scaling="muon"``:
    :math:`\sqrt{\max(1, q/p)}` for a ``(*batch, p, q)`` leaf, as optax with its
    default dimension numbers), decoupled weight decay and the learning rate;
    :func:`optax.adamw` with the ``adam_*`` arguments elsewhere. With
    ``rank >= min(p, q)`` this is Muon up to the Newton-step approximation of the
    buffer. Trees with LoRA factor pairs are rejected.

    Under :func:`optax.inject_hyperparams` pass
    ``static_args=('rank', 'ns_steps')``.

    Args:
      learning_rate: :math:`η`, a float or an optax schedule.
      beta: momentum decay.
      weight_decay: decoupled weight decay of matrix leaves (times :math:`η`).
      rank: rank of the momentum factors. Static.
      nesterov: Nesterov momentum as optax's (default off: the sources of the
        paper's Algorithm 2 have none).
      orthogonalizer: ``"newton_schulz"``, ``"polar_express"`` or ``"svd"``.
      ns_coeffs: Newton–Schulz coefficients.
      ns_steps: Newton–Schulz steps. Static.
      eps: Newton–Schulz normalization epsilon.
      damping: :math:`δ` of the r×r solves.
      factor_update: ``"gauss_seidel"`` (default) or ``"jacobi"``; see
        :func:`scale_by_lora_pre_adam`. Static.
      init_scale: standard deviation of the random initial ``m_A``.
      seed: integer seed of that initialization.
      state_dtype: dtype of the factors (default float32).
      shape_scaling: ``"muon"`` (default) or ``"none"``.
      consistent_rms: if given, scale by ``consistent_rms · sqrt(max(p, q))``
        instead (0.2 matches AdamW's update RMS).
      weight_decay_mask: optional mask for ``weight_decay``.
      pairs: LoRA pair rules; ``pairs=()`` turns the rejection off.
      adam_b1: AdamW :math:`β_1` for non-matrix leaves.
      adam_b2: AdamW :math:`β_2` for non-matrix leaves.
      adam_eps: AdamW :math:`ε` for non-matrix leaves.
      adam_eps_root: AdamW :math:`ε_{root}` for non-matrix leaves.
      adam_weight_decay: AdamW weight decay for non-matrix leaves.
      adam_learning_rate: AdamW learning rate; ``None`` uses ``learning_rate``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError, TypeError: as :func:`scale_by_lora_pre_muon`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.peers import lora_pre_muon
      >>> target = jax.random.normal(jax.random.key(0), (16, 12))
      >>> params = {'w': jnp.zeros((16, 12))}
      >>> loss = lambda p: jnp.mean((p['w'] - target) ** 2)
      >>> tx = lora_pre_muon(learning_rate=0.2, rank=4)
      >>> state = tx.init(params)
      >>> @jax.jit
      ... def step(params, state):
      ...   updates, state = tx.update(jax.grad(loss)(params), state, params)
      ...   return optax.apply_updates(params, updates), state
      >>> for _ in range(40):
      ...   params, state = step(params, state)
      >>> print(f"{loss(params):.2f}")
      0.06

    References:
      See :func:`scale_by_lora_pre_muon`.

    Sources:
      Primary: as :func:`lora_pre_adam` (arXiv 2602.24283; the Muon variant is
      its Algorithm 2, which could not be read). Authors' code:
      https://github.com/mrflogs/LoRA-Pre (README only).
      Secondary: lyc51758/kronecker-pre, ``muon_optimizers.py``
      (https://github.com/lyc51758/kronecker-pre), a third-party ``LoRAPreMuon``
      that cites Algorithm 2: the factors track a heavy-ball momentum (factor
      steps scaled by ``1/(1-μ)``) and the updated product ``m_B m_A`` goes
      through Newton–Schulz, with no Nesterov term; the papernotes summary
      (address in :func:`lora_pre_adam`), which reports LoRA-Pre Muon results.
      No source with a Nesterov term was found, hence the default
      ``nesterov=False``.
    """
    fn = _MUON_ALIAS_FN
    _check_lora_pre(fn, rank, damping, init_scale, state_dtype, factor_update)
    _validation.check_choice(fn, "shape_scaling", shape_scaling, _dense.SHAPE_SCALINGS)
    matrix_tx = optax.chain(
        scale_by_lora_pre_muon(
            beta,
            rank=rank,
            nesterov=nesterov,
            orthogonalizer=orthogonalizer,
            ns_coeffs=ns_coeffs,
            ns_steps=ns_steps,
            eps=eps,
            damping=damping,
            factor_update=factor_update,
            init_scale=init_scale,
            seed=seed,
            state_dtype=state_dtype,
            pairs=pairs,
        ),
        _dense.scale_by_matrix_shape(shape_scaling, consistent_rms),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _dense.with_adamw_fallback(
        matrix_tx,
        fn=fn,
        pairs=pairs,
        learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
        b1=adam_b1,
        b2=adam_b2,
        eps=adam_eps,
        eps_root=adam_eps_root,
        weight_decay=adam_weight_decay,
    )
