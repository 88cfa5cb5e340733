"""LoRA-Muon: spectral steepest descent for LoRA factor pairs."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lora_muon_jax import (
    _adamw_fallback,
    _directions,
    _gauge_rebalancing,
    _pair_tree,
    _pair_types,
    _validation,
)
from lora_muon_jax._lora_muon_state import LoRAMuonState
from lora_muon_jax._split_weight_decay import split_weight_decay
from lora_muon_jax._whitened_polar import SOLVERS, Solver

_SCALE_FN = "scale_by_lora_muon"
_ALIAS_FN = "lora_muon"
# The defaults of `solver` and `eps`: the only values `method="paper"` accepts.
_DEFAULT_SOLVER = "auto"
_DEFAULT_EPS = 1e-6


def _check_common(
    fn: str, beta: Any, lora_scale: Any, eps: Any, method: str, solver: str
) -> _directions.Method:
    """Checks the shared hyperparameters; returns ``method`` as a :data:`Method`."""
    _validation.check_scalar("beta", beta, low=0.0, high=1.0, high_inclusive=False, fn=fn)
    _validation.check_scalar("lora_scale", lora_scale, low=0.0, low_inclusive=False, fn=fn)
    _validation.check_scalar("eps", eps, low=0.0, high=1.0, fn=fn)
    _validation.check_choice(fn, "method", method, _directions.METHODS)
    _validation.check_choice(fn, "solver", solver, SOLVERS)
    if method == "paper":
        _check_paper_args(fn, eps, solver)
    return "paper" if method == "paper" else "gram"


def _check_paper_args(fn: str, eps: Any, solver: str) -> None:
    """Raises if ``method="paper"`` gets a non-default ``solver`` or ``eps``, which it ignores.

    A traced ``eps`` (under ``jit`` or ``inject_hyperparams``) cannot be read and is
    not checked; a concrete one is compared in float32, the dtype
    ``inject_hyperparams`` stores it in.
    """
    ignored = []
    if solver != _DEFAULT_SOLVER:
        ignored.append(f"solver={solver!r}")
    eps_value = _validation.concrete_float(eps)
    if eps_value is not None and np.float32(eps_value) != np.float32(_DEFAULT_EPS):
        ignored.append(f"eps={eps_value:g}")
    if ignored:
        raise ValueError(
            f'{fn}: method="paper" ignores `solver` and `eps` (the r×r solver and the '
            'pseudo-inverse threshold of method="gram"), but got '
            f"{', '.join(ignored)}. Leave them at their defaults "
            f'(solver={_DEFAULT_SOLVER!r}, eps={_DEFAULT_EPS!r}) or use method="gram".'
        )


def scale_by_lora_muon(
    beta: jax.typing.ArrayLike = 0.95,
    *,
    nesterov: bool = False,
    lora_scale: jax.typing.ArrayLike = 1.0,
    pairs: _pair_types.PairsLike = "auto",
    method: _directions.Method = "gram",
    solver: Solver = "auto",
    mu_dtype: Any = None,
    eps: jax.typing.ArrayLike = 1e-6,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales LoRA factor gradients to the LoRA-Muon direction (unit budget).

    For every pair :math:`ΔW = c\, a b` with :math:`a` of shape ``(..., m, r)`` and
    :math:`b` of shape ``(..., r, n)`` it keeps an EMA momentum per factor and
    returns

    .. math::

      m_a &\leftarrow β m_a + (1-β) g_a, \qquad m_b \leftarrow β m_b + (1-β) g_b \\
      R_a &= (a^\top a)^{-1/2}, \qquad R_b = (b b^\top)^{-1/2} \\
      u_a &= \tfrac{1}{2c} \operatorname{msign}(m_a R_b)\, R_b, \qquad
      u_b = \tfrac{1}{2c}\, R_a \operatorname{msign}(R_a m_b),

    where :math:`\operatorname{msign}(X) = U V^\top` for :math:`X = U Σ V^\top`.
    Each tangent term of the product then has unit budget split evenly:
    :math:`\|c\, u_a b\|_2 = \|c\, a u_b\|_2 = 1/2`, so chaining
    :func:`optax.scale_by_learning_rate` with rate :math:`η` moves ``c · a @ b`` by at
    most :math:`η` in spectral norm to first order, like dense Muon. The step depends
    only on the column space of ``a`` and the row space of ``b``: it is invariant to
    every gauge change :math:`(a, b) → (a S, S^{-1} b)`.

    Inverses are pseudo-inverses: a zero factor (Flax's and PEFT's ``b = 0`` init)
    gives zero step to its partner and a finite step to itself, so the first step
    moves only ``b``. All r×r work runs in float32 (in float64 for float64 factors
    under ``jax_enable_x64``, on the exact ``eigh`` route); no ``m × n`` matrix is formed.
    With Nesterov momentum the direction uses :math:`β m_{new} + (1-β) g`. No bias
    correction is needed: ``msign`` ignores the scale of the momentum.

    Every leaf of the tree must belong to a pair; :func:`lora_muon` routes other
    leaves to AdamW.

    Args:
      beta: momentum decay :math:`β` in ``[0, 1)``.
      nesterov: use Nesterov momentum. Static.
      lora_scale: :math:`c` in ``ΔW = c · a @ b`` (PEFT's ``alpha / r``); the factor
        steps are divided by it so the learning rate keeps its meaning.
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static; a
        callable must be listed in ``inject_hyperparams(static_args=...)``.
      method: ``"gram"`` (default): exact, the Gram shortcut (docs/algorithm.md §Gram
        shortcut): four thin Grams and one thin product per pair, and ``r×r`` work batched
        over the whole tree. ``"paper"``: the paper's route, a 7-step damped Newton–Schulz
        inverse square root and an 8-step Polar Express on the thin momentum, for
        reproduction; it takes no ``solver`` or ``eps`` (a non-default value of either
        raises). Static.
      solver: the ``r×r`` solver of ``method="gram"`` (only): ``"cholesky"`` (Cholesky
        whitening, Newton–Schulz polar), ``"newton_schulz"`` (matrix products only),
        ``"eigh"`` (two eigendecompositions) or ``"auto"`` (default: Cholesky on CPU,
        Newton–Schulz on GPU and TPU). The iterative solvers check their result and
        fall back to ``"eigh"`` inside a ``lax.cond``. Static.
      mu_dtype: dtype of the momentum (e.g. ``"bfloat16"``); ``None`` keeps each
        param's dtype. Pass dtypes as strings under ``inject_hyperparams``.
      eps: eigenvalues of the r×r Grams below ``eps · λ_max`` count as zero
        (``method="gram"`` only): directions with no mass get no step. For the partner
        factor's Gram (whitening) the threshold is raised to
        ``max(eps, 100 eps_f32, (2 eps_dtype)²)`` for factors of ``dtype`` (about
        1.2e-5 for float32 and float16, 2.4e-4 for bfloat16): a partner direction
        too weak to be whitened to 1% from float32 Grams, or to survive rounding
        of the update to the param dtype, gets no step. So do partner directions
        whose update would overflow the param dtype (float16). The momentum side
        (the polar factor) uses ``max(eps, 100 eps_f32)`` (about 1.2e-5): a
        whitened momentum direction weaker than that (singular-value ratio
        3.5e-3) cannot be resolved from a float32 Gram and gets no step.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params``.

    Raises:
      ValueError: out-of-range or non-finite hyperparameters, or ``method="paper"``
        with a non-default ``solver`` or ``eps`` (at construction);
        an unpaired factor, mismatched ranks, batch axes or dtypes, a leaf in no
        pair, or missing ``params`` (at trace time, naming the leaf paths).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax import scale_by_lora_muon
      >>> params = {'lora_a': jnp.ones((4, 2)).at[0, 1].set(2.),
      ...           'lora_b': jnp.ones((2, 3)).at[1, 0].set(-1.)}
      >>> tx = optax.chain(scale_by_lora_muon(), optax.scale_by_learning_rate(0.1))
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum((p['lora_a'] @ p['lora_b'] - 1.) ** 2))(params)
      >>> updates, state = tx.update(grads, state, params)
      >>> step = updates['lora_a'] @ params['lora_b'] + params['lora_a'] @ updates['lora_b']
      >>> print(f"{jnp.linalg.norm(step, ord=2):.3f}")  # at most the learning rate
      0.100

    References:
      Cesista, Crowson, Simal, Biderman, `LoRA-Muon: Spectral Steepest Descent on
      the Low-Rank Manifold <https://arxiv.org/abs/2606.12921>`_, 2026

      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024

      Amsel et al., `The Polar Express: Optimal Matrix Sign Methods and Their
      Application to the Muon Algorithm <https://arxiv.org/abs/2505.16932>`_, 2025
    """
    method = _check_common(_SCALE_FN, beta, lora_scale, eps, method, solver)
    mu_dtype = _validation.float_dtype(_SCALE_FN, "mu_dtype", mu_dtype)

    def init_fn(params: Any) -> LoRAMuonState:
        # Validate early (shapes only) so a bad tree fails at init.
        _pair_tree.check_init(_SCALE_FN, params, pairs)
        return LoRAMuonState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        )

    def update_fn(
        updates: Any, state: LoRAMuonState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, LoRAMuonState]:
        del extra_args
        tree = _pair_tree.flatten(_SCALE_FN, updates, params, pairs)
        b32 = jnp.asarray(beta, jnp.float32)
        mu = optax.tree.update_moment(updates, state.mu, b32, 1)  # float32
        source = optax.tree.update_moment(updates, mu, b32, 1) if nesterov else mu
        scale = 0.5 / jnp.asarray(lora_scale, jnp.float32)
        dirs = _factor_directions(tree, tree.treedef.flatten_up_to(source), scale)
        out = list(tree.grads)
        for index, d in dirs.items():
            out[index] = d.astype(tree.params[index].dtype)
        return _pair_tree.unflatten(tree, out), LoRAMuonState(
            count=optax.safe_increment(state.count),
            mu=optax.tree.cast_like(mu, state.mu),
        )

    def _factor_directions(
        tree: _pair_tree.PairTree, sources: list[Any], scale: jax.Array
    ) -> dict[int, jax.Array]:
        if method == "paper":
            return _directions.paper_route(tree.plan.pairs, tree.params, sources, scale)
        factors = _directions.factors_of(tree.plan.pairs, tree.params, eps)
        dirs = _directions.gram_directions(factors, tree.params, sources, scale, solver)
        return {f.index: d for f, d in zip(factors, dirs, strict=True)}

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def lora_muon(
    learning_rate: optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike = 0.95,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    nesterov: bool = False,
    lora_scale: jax.typing.ArrayLike = 1.0,
    pairs: _pair_types.PairsLike = "auto",
    method: _directions.Method = "gram",
    solver: Solver = "auto",
    mu_dtype: Any = None,
    eps: jax.typing.ArrayLike = 1e-6,
    rebalance: _gauge_rebalancing.GaugeRebalance | None = None,
    weight_decay_mask: Any = None,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    adam_eps_root: jax.typing.ArrayLike = 0.0,
    adam_weight_decay: jax.typing.ArrayLike = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    allow_no_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""LoRA-Muon: Muon's spectral steepest descent for LoRA adapters.

    For each factor pair (found by ``pairs``) it applies :func:`scale_by_lora_muon`,
    :func:`optax.scale_by_learning_rate` and :func:`split_weight_decay`:

    .. math::

      a \leftarrow s\,a - \frac{η}{2 c s} \operatorname{msign}(m_a R_b) R_b, \quad
      b \leftarrow s\,b - \frac{η}{2 c s} R_a \operatorname{msign}(R_a m_b), \quad
      s = \sqrt{1 - λη},

    so the product ``c · a @ b`` moves by at most :math:`η` in spectral norm (to
    first order) and decays by :math:`1 - λη`, exactly like a dense weight under
    Muon with decoupled weight decay. Learning rates therefore carry over across
    rank, width and factor scale. Every other leaf (biases, norms, embeddings)
    goes to :func:`optax.adamw` with the ``adam_*`` hyperparameters.

    Works inside :func:`optax.chain`, :func:`optax.partition`, :func:`optax.masked`,
    :class:`optax.MultiSteps`, :func:`optax.apply_if_finite` and under
    :func:`optax.inject_hyperparams` (``learning_rate``, ``beta``, ``weight_decay``
    and the other numbers become state and change without recompiling; list a
    callable ``pairs`` in ``static_args``).

    Args:
      learning_rate: :math:`η`, a float or an optax schedule: the spectral-norm
        budget of each adapter product's first-order change per step.
      beta: momentum decay :math:`β`.
      weight_decay: :math:`λ` of the split weight decay (product decays by
        ``1 - λη``); needs ``λη < 1``.
      nesterov: Nesterov momentum. Static.
      lora_scale: :math:`c` in ``ΔW = c · a @ b`` (PEFT's ``alpha / r``).
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static.
      method: ``"gram"`` (default, exact) or ``"paper"``; see
        :func:`scale_by_lora_muon`. Static.
      solver: the ``r×r`` solver (``"auto"``, ``"cholesky"``, ``"newton_schulz"`` or
        ``"eigh"``); see :func:`scale_by_lora_muon`. Static.
      mu_dtype: momentum dtype for every leaf (LoRA and AdamW), e.g.
        ``"bfloat16"``; ``None`` keeps the param dtype.
      eps: relative eigenvalue threshold of the pseudo-inverses (``method="gram"``
        only).
      rebalance: optional :class:`GaugeRebalance`: every ``every`` steps rescale
        each pair to equal spectral norms (exponent ``alpha``); the product and
        the next update are unchanged.
      weight_decay_mask: optional mask (tree or callable) for the split weight decay
        of LoRA leaves; give both factors of a pair the same value.
      adam_b1: AdamW :math:`β_1` for leaves in no pair.
      adam_b2: AdamW :math:`β_2` for leaves in no pair.
      adam_eps: AdamW :math:`ε` for leaves in no pair.
      adam_eps_root: AdamW :math:`ε_{root}` for leaves in no pair.
      adam_weight_decay: AdamW weight decay for leaves in no pair.
      adam_learning_rate: AdamW learning rate; ``None`` uses ``learning_rate``.
      allow_no_pairs: accept a tree in which ``pairs`` finds no pair (AdamW on
        every leaf). Without it such a tree raises at ``init``, naming the leaves
        that look like LoRA factors; with it, it still does if any leaf does.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params``.

    Raises:
      ValueError: as :func:`scale_by_lora_muon` and :func:`split_weight_decay`.

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax import lora_muon
      >>> k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
      >>> target = jax.random.normal(k1, (16, 8))
      >>> params = {'lora_a': jax.random.normal(k2, (16, 4)) * 0.3,
      ...           'lora_b': jax.random.normal(k3, (4, 8)) * 0.3, 'bias': jnp.zeros(8)}
      >>> loss = lambda p: jnp.mean((p['lora_a'] @ p['lora_b'] + p['bias'] - target) ** 2)
      >>> tx = lora_muon(learning_rate=0.3, beta=0.9)
      >>> @jax.jit
      ... def step(params, state):
      ...   grads = jax.grad(loss)(params)
      ...   updates, state = tx.update(grads, state, params)
      ...   return optax.apply_updates(params, updates), state
      >>> state = tx.init(params)
      >>> print(f"{loss(params):.2f}")
      1.38
      >>> for _ in range(50):
      ...   params, state = step(params, state)
      >>> print(f"{loss(params):.2f}")
      0.22

    References:
      See :func:`scale_by_lora_muon`.
    """
    method = _check_common(_ALIAS_FN, beta, lora_scale, eps, method, solver)
    lora_tx: optax.GradientTransformation = optax.chain(
        scale_by_lora_muon(
            beta,
            nesterov=nesterov,
            lora_scale=lora_scale,
            pairs=pairs,
            method=method,
            solver=solver,
            mu_dtype=mu_dtype,
            eps=eps,
        ),
        optax.scale_by_learning_rate(learning_rate),
        split_weight_decay(weight_decay, learning_rate, mask=weight_decay_mask),
    )
    if rebalance is not None:
        lora_tx = _gauge_rebalancing.with_gauge_rebalancing(lora_tx, rebalance, pairs=pairs)
    return _adamw_fallback.with_adamw_fallback(
        lora_tx,
        pairs=pairs,
        learning_rate=learning_rate if adam_learning_rate is None else adam_learning_rate,
        adam_b1=adam_b1,
        adam_b2=adam_b2,
        adam_eps=adam_eps,
        adam_eps_root=adam_eps_root,
        adam_weight_decay=adam_weight_decay,
        mu_dtype=mu_dtype,
        label="lora_muon",
        allow_no_pairs=allow_no_pairs,
    )
