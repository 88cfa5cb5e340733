"""LoRA-Pre (Muon): Muon for dense matrices with its momentum kept as a rank-r product.

Sources and the choices made where they disagree: see :mod:`lora_muon_jax.peers._lora_pre`
and :func:`lora_pre_muon`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _pair_tree, _pair_types, _validation
from lora_muon_jax.peers import _adamw_routing, _dense_weights
from lora_muon_jax.peers._lora_pre import factors, newton

_SCALE_FN = "scale_by_lora_pre_muon"
_ALIAS_FN = "lora_pre_muon"


class LoRAPreMuonState(NamedTuple):
    """State of :func:`scale_by_lora_pre_muon`: one factor pair per matrix."""

    # shape=(), dtype=int32. The field shadows tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]
    m_b: optax.Updates  # per leaf (*batch, p, r), dtype=state_dtype.
    m_a: optax.Updates  # per leaf (*batch, r, q), dtype=state_dtype.


def scale_by_lora_pre_muon(
    beta: jax.typing.ArrayLike = 0.95,
    *,
    rank: int,
    nesterov: bool = False,
    orthogonalizer: _dense_weights.Orthogonalizer = "newton_schulz",
    ns_coeffs: Any = _dense_weights.MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: jax.typing.ArrayLike = 1e-8,
    damping: jax.typing.ArrayLike = 1e-6,
    factor_update: newton.FactorUpdate = "gauss_seidel",
    init_scale: jax.typing.ArrayLike = 0.02,
    seed: int = 0,
    state_dtype: Any = "float32",
    pairs: _pair_types.PairsLike = "auto",
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
    this one is our inference (``docs/peers.md`` §LoRA-Pre).
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
      state_dtype: dtype of the factors (default float32); ``None`` keeps each
        param's dtype.
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
    fn = _SCALE_FN
    sdt = factors.check_hyperparams(fn, rank, damping, init_scale, state_dtype, factor_update)
    _validation.check_scalar(
        "beta", beta, low=0.0, high=1.0, low_inclusive=False, high_inclusive=False, fn=fn
    )
    _validation.check_scalar("eps", eps, low=0.0, fn=fn)
    _dense_weights.check_orthogonalizer(fn, orthogonalizer, ns_coeffs, ns_steps)

    def init_fn(params: Any) -> LoRAPreMuonState:
        _dense_weights.reject_lora_pairs(fn, params, pairs)
        _dense_weights.check_matrices(fn, params, _ALIAS_FN)
        ((m_b, m_a),) = factors.init_factor_trees(params, rank, seed, init_scale, sdt, 1)
        return LoRAPreMuonState(jnp.zeros([], jnp.int32), m_b, m_a)

    def update_fn(
        updates: Any, state: LoRAPreMuonState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LoRAPreMuonState]:
        del params, extra_args
        _dense_weights.reject_lora_pairs(fn, updates, pairs)
        _dense_weights.check_matrices(fn, updates, _ALIAS_FN, "updates")
        treedef: Any  # a jax.tree_util.PyTreeDef
        grads, treedef = jax.tree.flatten(updates)
        count = optax.safe_increment(state.count)
        b = jnp.asarray(beta, jnp.float32)
        gamma = 1.0 - jnp.sqrt(b)
        t = count.astype(jnp.float32)
        delta = jnp.asarray(damping, jnp.float32)

        leaves = list(
            zip(
                grads,
                treedef.flatten_up_to(state.m_b),
                treedef.flatten_up_to(state.m_a),
                strict=True,
            )
        )
        us, jobs = [], []
        for g, mb, ma in leaves:
            g32 = _pair_tree.f32(g)
            m = b * jnp.matmul(_pair_tree.f32(mb), _pair_tree.f32(ma)) + (1.0 - b) * g32
            jobs.append(newton.NewtonJob(g32, _pair_tree.f32(mb), _pair_tree.f32(ma), gamma))
            if nesterov:
                d = b * m / (1.0 - b ** (t + 1.0)) + (1.0 - b) * g32 / (1.0 - b**t)
            else:
                d = m
            o = _dense_weights.orthogonalize(
                d, orthogonalizer, ns_coeffs=ns_coeffs, ns_steps=ns_steps, eps=eps
            )
            us.append(o.astype(g.dtype))
        new = newton.newton_steps(jobs, delta, factor_update)
        bs = [nb.astype(mb.dtype) for (nb, _), (_, mb, _) in zip(new, leaves, strict=True)]
        as_ = [na.astype(ma.dtype) for (_, na), (_, _, ma) in zip(new, leaves, strict=True)]

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
    orthogonalizer: _dense_weights.Orthogonalizer = "newton_schulz",
    ns_coeffs: Any = _dense_weights.MUON_NS_COEFFS,
    ns_steps: int = 5,
    eps: jax.typing.ArrayLike = 1e-8,
    damping: jax.typing.ArrayLike = 1e-6,
    factor_update: newton.FactorUpdate = "gauss_seidel",
    init_scale: jax.typing.ArrayLike = 0.02,
    seed: int = 0,
    state_dtype: Any = "float32",
    shape_scaling: _dense_weights.ShapeScaling = "muon",
    consistent_rms: jax.typing.ArrayLike | None = None,
    weight_decay_mask: Any = None,
    pairs: _pair_types.PairsLike = "auto",
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
      state_dtype: dtype of the factors (default float32); ``None`` keeps each
        param's dtype.
      shape_scaling: ``"muon"`` (default) or ``"none"``.
      consistent_rms: if given, scale by ``consistent_rms · sqrt(max(p, q))``
        instead (0.2 matches AdamW's update RMS).
      weight_decay_mask: optional mask for ``weight_decay``.
      pairs: LoRA pair rules; ``pairs=()`` turns the rejection off.
      adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay, adam_learning_rate:
        the :func:`optax.adamw` setting of that name for leaves with ``ndim < 2``
        (``adam_learning_rate=None``: ``learning_rate``).

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
    fn = _ALIAS_FN
    factors.check_hyperparams(fn, rank, damping, init_scale, state_dtype, factor_update)
    _validation.check_choice(fn, "shape_scaling", shape_scaling, _dense_weights.SHAPE_SCALINGS)
    adamw = _adamw_routing.AdamWSettings(
        adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay
    )
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
        _dense_weights.scale_by_matrix_shape(shape_scaling, consistent_rms),
        optax.add_decayed_weights(weight_decay, weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _adamw_routing.for_matrices(matrix_tx, adamw, learning_rate, fn, pairs)
