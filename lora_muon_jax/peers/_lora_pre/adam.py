"""LoRA-Pre (Adam): Adam for dense matrices with both moments kept as rank-r products.

Sources and the choices made where they disagree: see :mod:`lora_muon_jax.peers._lora_pre`
and :func:`lora_pre_adam`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _pair_tree, _pair_types, _validation
from lora_muon_jax.peers import _adamw_routing, _dense_weights
from lora_muon_jax.peers._lora_pre import factors, newton

_SCALE_FN = "scale_by_lora_pre_adam"
_ALIAS_FN = "lora_pre_adam"


class LoRAPreAdamState(NamedTuple):
    """State of :func:`scale_by_lora_pre_adam`: two factor pairs per matrix."""

    # shape=(), dtype=int32. The field shadows tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]
    m_b: optax.Updates  # per leaf (*batch, p, r), dtype=state_dtype; first moment.
    m_a: optax.Updates  # per leaf (*batch, r, q), dtype=state_dtype.
    v_b: optax.Updates  # per leaf (*batch, p, r), dtype=state_dtype; tracks |g|.
    v_a: optax.Updates  # per leaf (*batch, r, q), dtype=state_dtype.


def scale_by_lora_pre_adam(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    *,
    rank: int,
    damping: jax.typing.ArrayLike = 1e-6,
    factor_update: newton.FactorUpdate = "gauss_seidel",
    init_scale: jax.typing.ArrayLike = 0.02,
    seed: int = 0,
    state_dtype: Any = "float32",
    pairs: _pair_types.PairsLike = "auto",
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
        solves amplify rounding. ``None`` keeps each param's dtype. A string
        (e.g. ``"bfloat16"``) so it passes through ``inject_hyperparams``.
      pairs: LoRA pair rules (see :func:`lora_muon_jax.find_lora_pairs`). A tree
        with LoRA pairs is rejected; pass ``pairs=()`` to turn detection off.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` (``params`` not needed).

    Raises:
      ValueError: out-of-range hyperparameters; a leaf with ``ndim < 2``; LoRA
        factor pairs in the tree (naming their paths).
      TypeError: a ``rank`` that is not a Python int; a complex, integer or
        boolean matrix leaf in the params (at ``init``) or the updates (naming the
        leaf paths).

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
      The secondary sources disagree on the moment used in the step: the project's notes
      (``docs/peers.md`` §LoRA-Pre) use the old product plus the fresh gradient, as
      here; the zij summary mixes the fresh gradient into the *new* product; the PyTorch
      code uses the new product alone. With Gauss–Seidel and square full-rank factors
      the new product equals the first choice exactly; only the first choice reduces to
      Adam's first step and keeps ``v̂`` away from zero where ``g ≠ 0``. Check against
      the paper's Algorithm 1 before quoting results.

    .. warning::
      The ``|g|`` product fills at rate :math:`\sqrt{β_2}` per step but is bias
      corrected with :math:`1-β_2^t`, so :math:`\hat v` starts small and the first
      ~:math:`1/(1-β_2)` steps are several times larger than Adam's ([S]: use a
      learning-rate warmup). At ranks below ``min(p, q)`` the step is a ratio of two
      low-rank estimates and can exceed Adam's by a large factor where the
      estimate of :math:`|g|` is too small; the stored first moment, in contrast,
      came closer to Adam's with every rank increase in our measurements.
    """
    sdt = factors.check_hyperparams(
        _SCALE_FN, rank, damping, init_scale, state_dtype, factor_update
    )
    _validation.check_scalar(
        "b1", b1, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, fn=_SCALE_FN
    )
    _validation.check_scalar(
        "b2", b2, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, fn=_SCALE_FN
    )
    _validation.check_scalar("eps", eps, low=0.0, fn=_SCALE_FN)

    def init_fn(params: Any) -> LoRAPreAdamState:
        _dense_weights.reject_lora_pairs(_SCALE_FN, params, pairs)
        _dense_weights.check_matrices(_SCALE_FN, params, _ALIAS_FN)
        (m_b, m_a), (v_b, v_a) = factors.init_factor_trees(params, rank, seed, init_scale, sdt, 2)
        return LoRAPreAdamState(jnp.zeros([], jnp.int32), m_b, m_a, v_b, v_a)

    def update_fn(
        updates: Any, state: LoRAPreAdamState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LoRAPreAdamState]:
        del params, extra_args
        _dense_weights.reject_lora_pairs(_SCALE_FN, updates, pairs)
        _dense_weights.check_matrices(_SCALE_FN, updates, _ALIAS_FN, "updates")
        treedef: Any  # a jax.tree_util.PyTreeDef
        grads, treedef = jax.tree.flatten(updates)
        count = optax.safe_increment(state.count)
        beta1, beta2 = jnp.asarray(b1, jnp.float32), jnp.asarray(b2, jnp.float32)
        gamma1, gamma2 = 1.0 - jnp.sqrt(beta1), 1.0 - beta2**0.25
        bc1 = 1.0 - beta1 ** count.astype(jnp.float32)
        bc2 = 1.0 - beta2 ** count.astype(jnp.float32)
        delta = jnp.asarray(damping, jnp.float32)
        eps32 = jnp.asarray(eps, jnp.float32)

        olds = [treedef.flatten_up_to(t) for t in (state.m_b, state.m_a, state.v_b, state.v_a)]
        us, jobs = [], []
        for g, mb, ma, vb, va in zip(grads, *olds, strict=True):
            g32 = _pair_tree.f32(g)
            mb32, ma32, vb32, va32 = (_pair_tree.f32(x) for x in (mb, ma, vb, va))
            # The moments of this step: the stored (old) product decayed once plus the
            # fresh full-rank gradient, i.e. Adam's recursion on the low-rank estimate.
            m = beta1 * jnp.matmul(mb32, ma32) + (1.0 - beta1) * g32
            v = beta2 * jnp.square(jnp.matmul(vb32, va32)) + (1.0 - beta2) * jnp.square(g32)
            us.append(((m / bc1) / (jnp.sqrt(v / bc2) + eps32)).astype(g.dtype))
            jobs += [
                newton.NewtonJob(g32, mb32, ma32, gamma1),
                newton.NewtonJob(jnp.abs(g32), vb32, va32, gamma2),
            ]
        new = newton.newton_steps(jobs, delta, factor_update)
        cols: list[list[Any]] = [us, [], [], [], []]  # u, m_b, m_a, v_b, v_a
        for k, old in enumerate(zip(*olds, strict=True)):
            for col, x, o in zip(cols[1:], (*new[2 * k], *new[2 * k + 1]), old, strict=True):
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
    factor_update: newton.FactorUpdate = "gauss_seidel",
    init_scale: jax.typing.ArrayLike = 0.02,
    seed: int = 0,
    state_dtype: Any = "float32",
    weight_decay_mask: Any = None,
    pairs: _pair_types.PairsLike = "auto",
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
      state_dtype: dtype of the factors (default float32); ``None`` keeps each
        param's dtype.
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
    factors.check_hyperparams(_ALIAS_FN, rank, damping, init_scale, state_dtype, factor_update)
    adamw = _adamw_routing.AdamWSettings(
        adam_learning_rate, b1, b2, eps, adam_eps_root, adam_weight_decay
    )
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
    return _adamw_routing.for_matrices(matrix_tx, adamw, learning_rate, _ALIAS_FN, pairs)
