"""Spectron: orthogonalized momentum with spectral renormalization, per LoRA factor pair.

The transformation and its alias; the spectral-norm estimates live in
:mod:`lora_muon_jax.peers._spectron.power_iteration`. Sources (paper, code,
reimplementations, with addresses): see :func:`spectron`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _key_paths, _linalg, _pair_tree, _pair_types, _validation
from lora_muon_jax.peers import _adamw_routing
from lora_muon_jax.peers._spectron.power_iteration import power_iteration, start_vectors

_SCALE_FN = "scale_by_spectron"
_ALIAS_FN = "spectron"

# Keller Jordan's quintic Newton–Schulz coefficients, repeated every step (the
# Spectron paper's Algorithm 2, as cited by its reimplementations).
NS_COEFFS: tuple[tuple[float, float, float], ...] = (_linalg.MUON_NS_COEFFS,)


class SpectronState(NamedTuple):
    """State of :func:`scale_by_spectron`: momenta and power-iteration vectors."""

    # shape=(), dtype=int32. The field shadows tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]
    mu: optax.Updates  # like params; dtype=mu_dtype (default: the param's dtype).
    # Right singular vector estimates, one per factor matrix: shape (*batch, r), float32.
    power_vectors: optax.Updates


def _check_coeffs(fn: str, coeffs: Any) -> tuple[tuple[float, float, float], ...]:
    try:
        rows = tuple(tuple(float(c) for c in row) for row in coeffs)
    except (TypeError, ValueError):
        rows = ()
    if not rows or any(len(row) != 3 or not all(map(math.isfinite, row)) for row in rows):
        raise ValueError(
            f"{fn}: `ns_coeffs` must be a non-empty sequence of finite (a, b, c) "
            f"triples; got {coeffs!r}."
        )
    return tuple((a, b, c) for a, b, c in rows)


def _check_common(
    fn: str, beta: Any, ns_steps: Any, ns_coeffs: Any, power_iterations: Any
) -> tuple[int, tuple[tuple[float, float, float], ...], int]:
    _validation.check_scalar("beta", beta, low=0.0, high=1.0, high_inclusive=False, fn=fn)
    steps = _validation.check_static_int(fn, "ns_steps", ns_steps, 1)
    table = _check_coeffs(fn, ns_coeffs)
    if 1 < len(table) < steps:
        raise ValueError(
            f"{fn}: `ns_coeffs` has {len(table)} rows but `ns_steps`={steps}; give one "
            "row (used every step) or at least `ns_steps` rows (the last ones are used)."
        )
    power = _validation.check_static_int(fn, "power_iterations", power_iterations, 1)
    return steps, table, power


def scale_by_spectron(
    beta: jax.typing.ArrayLike = 0.9,
    *,
    nesterov: bool = False,
    ns_steps: int = 5,
    ns_coeffs: Sequence[tuple[float, float, float]] = NS_COEFFS,
    power_iterations: int = 1,
    pairs: _pair_types.PairsLike = "auto",
    mu_dtype: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Rescales LoRA factor gradients to Spectron's direction (unit learning rate).

    For every pair :math:`ΔW = a b` (``a: (..., m, r)``, ``b: (..., r, n)``) it
    keeps an EMA momentum per factor and a power-iteration vector per factor, and
    returns

    .. math::

      m_a &\leftarrow β m_a + (1-β) g_a, \qquad m_b \leftarrow β m_b + (1-β) g_b \\
      O_a &= \operatorname{NS}(m_a), \qquad O_b = \operatorname{NS}(m_b) \\
      u_a &= \frac{O_a}{σ_a + σ_b + 1}, \qquad u_b = \frac{O_b}{σ_a + σ_b + 1},

    where NS is ``ns_steps`` quintic Newton–Schulz steps (an approximate
    :math:`\operatorname{msign}`) and :math:`σ_a ≈ \|a\|_2`, :math:`σ_b ≈ \|b\|_2`
    come from warm-started power iteration. Chaining
    :func:`optax.scale_by_learning_rate` with rate :math:`η` gives Spectron's
    :math:`ρ = η/(σ_a + σ_b + 1)`: the paper's rate is linear in :math:`η`, so the
    learning rate stays an ordinary (schedulable, injectable) last factor and
    this transformation needs no learning rate. With exact orthogonalization the
    full product change is then at most
    :math:`ρ σ_b + σ_a ρ + ρ^2 ≤ η` for :math:`η ≤ 1`; the quintic NS leaves
    singular values up to about 1.2, which loosens this by up to that factor.

    Unlike :func:`scale_by_lora_muon` the step is **not gauge invariant**: under
    :math:`(a, b) → (c a, b / c)` the orthogonalized momenta do not change but the
    product terms :math:`O_a b` and :math:`a O_b` scale by :math:`1/c` and
    :math:`c`, so an imbalanced pair spends its budget on one factor.

    The power iteration keeps a unit vector :math:`v ∈ R^r` per factor matrix
    (the rank side; the reimplementations keep the m- or n-sized left vector,
    which is the same iteration started half a step later) and runs
    ``power_iterations`` steps per update: :math:`u = T v/\|T v\|`,
    :math:`z = T^\top u`, :math:`σ = \|z\|`, :math:`v ← z/σ` for the tall view
    :math:`T` (``a`` or ``bᵀ``). This estimate is never above :math:`σ_{max}`, so
    :math:`ρ` errs large while it converges. Instead of warm-up iterations,
    ``init`` starts each vector at the factor's exact top right singular vector
    (from its r×r Gram, one small ``eigh``), so the first steps are exact even
    when the top two singular values are close; a zero factor (LoRA's ``b = 0``)
    starts from a fixed-seed random unit vector, has :math:`σ = 0` and keeps its
    vector until it moves. No user key is needed and the state is deterministic.
    The Newton–Schulz input is divided by its Frobenius norm with a zero guard,
    so a zero momentum (the partner of a zero factor) gives a zero step. All of
    it runs in float32.

    Every leaf of the tree must belong to a pair; :func:`spectron` routes other
    leaves to AdamW.

    Args:
      beta: momentum decay :math:`β` in ``[0, 1)``.
      nesterov: orthogonalize :math:`β m + (1-β) g` instead of :math:`m`. Static.
      ns_steps: Newton–Schulz steps. Static.
      ns_coeffs: ``(a, b, c)`` triples, used in turn (cycled) for the
        ``ns_steps`` steps; the default repeats ``(3.4445, -4.7750, 2.0315)``.
        Static.
      power_iterations: power-iteration steps per update. Static.
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static.
      mu_dtype: dtype of the momentum; ``None`` keeps each param's dtype.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params``.

    Raises:
      ValueError: out-of-range hyperparameters or a malformed ``ns_coeffs`` (at
        construction); an unpaired factor, mismatched ranks, batch axes or dtypes, a
        leaf in no pair, or missing ``params`` (at trace time, naming the paths).
      TypeError: a non-integer ``ns_steps`` or ``power_iterations``; a complex,
        integer or boolean factor of a pair, in the params (at ``init``) or the
        updates (naming the leaf paths).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.peers import scale_by_spectron
      >>> params = {'lora_a': jnp.eye(4, 2) * 3., 'lora_b': jnp.eye(2, 3)}
      >>> grads = {'lora_a': jnp.ones((4, 2)), 'lora_b': jnp.ones((2, 3))}
      >>> # Cubic Newton–Schulz keeps the rank-1 momentum's singular value at 1.
      >>> tx = scale_by_spectron(beta=0.0, ns_coeffs=((1.5, -0.5, 0.0),))
      >>> u, _ = tx.update(grads, tx.init(params), params)
      >>> print(f"{1 / jnp.linalg.norm(u['lora_a'], ord=2):.2f}")  # σ_a + σ_b + 1 = 3 + 1 + 1
      5.00

    References:
      Janson, Oyallon, Belilovsky, `Stabilizing Native Low-Rank LLM Pretraining
      <https://arxiv.org/abs/2602.12429>`_, 2026

      Jordan et al., `Muon: An optimizer for hidden layers in neural networks
      <https://kellerjordan.github.io/posts/muon/>`_, 2024
    """
    steps, table, power = _check_common(_SCALE_FN, beta, ns_steps, ns_coeffs, power_iterations)
    mu_dtype = _validation.float_dtype(_SCALE_FN, "mu_dtype", mu_dtype)

    def init_fn(params: Any) -> SpectronState:
        plan = _pair_tree.check_init(_SCALE_FN, params, pairs)
        _, leaves, treedef = _key_paths.flatten_with_paths(params)
        vectors = list(leaves)
        for k, pair in enumerate(plan.pairs):
            v_a, v_b = start_vectors(pair, k, leaves)
            vectors[pair.a_index], vectors[pair.b_index] = v_a, v_b
        return SpectronState(
            count=jnp.zeros([], jnp.int32),
            mu=optax.tree.zeros_like(params, dtype=mu_dtype),
            power_vectors=jax.tree_util.tree_unflatten(treedef, vectors),
        )

    def update_fn(
        updates: Any, state: SpectronState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, SpectronState]:
        del extra_args
        tree = _pair_tree.flatten(_SCALE_FN, updates, params, pairs)
        mu_leaves = tree.treedef.flatten_up_to(state.mu)
        vec_leaves = list(tree.treedef.flatten_up_to(state.power_vectors))

        b32 = jnp.asarray(beta, jnp.float32)
        new_mu = [
            b32 * _pair_tree.f32(m) + (1.0 - b32) * _pair_tree.f32(g)
            for m, g in zip(mu_leaves, tree.grads, strict=True)
        ]
        if nesterov:
            source = [
                b32 * m + (1.0 - b32) * _pair_tree.f32(g)
                for m, g in zip(new_mu, tree.grads, strict=True)
            ]
        else:
            source = new_mu

        # Pairs of identical shapes (the adapters of an unscanned model) are stacked
        # and computed as one: compile time grows with the number of shapes only.
        per_pair, ordered = [], []
        for members in _pair_tree.same_shape_groups(tree):

            def stacked(leaves, role, members=members):
                index = (lambda p: p.a_index) if role == "a" else (lambda p: p.b_index)
                return jnp.stack([p.canonical(leaves[index(p)], role) for p in members])

            a, b = (stacked(tree.params, role).astype(jnp.float32) for role in ("a", "b"))
            v_a = jnp.stack([vec_leaves[p.a_index] for p in members])
            v_b = jnp.stack([vec_leaves[p.b_index] for p in members])
            sigma_a, v_a = power_iteration(a, v_a, True, power)
            sigma_b, v_b = power_iteration(b, v_b, False, power)
            scale = (1.0 / (sigma_a + sigma_b + 1.0))[..., None, None]
            o_a = _linalg.newton_schulz(stacked(source, "a"), table, steps) * scale
            o_b = _linalg.newton_schulz(stacked(source, "b"), table, steps) * scale
            for k, pair in enumerate(members):
                per_pair.append((o_a[k], o_b[k]))
                vec_leaves[pair.a_index], vec_leaves[pair.b_index] = v_a[k], v_b[k]
                ordered.append(pair)
        tree = tree._replace(plan=tree.plan._replace(pairs=tuple(ordered)))

        mu_out = [m.astype(old.dtype) for m, old in zip(new_mu, mu_leaves, strict=True)]
        return _pair_tree.scatter(tree, per_pair), SpectronState(
            count=optax.safe_increment(state.count),
            mu=_pair_tree.unflatten(tree, mu_out),
            power_vectors=_pair_tree.unflatten(tree, vec_leaves),
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def spectron(
    learning_rate: optax.ScalarOrSchedule,
    beta: jax.typing.ArrayLike = 0.9,
    weight_decay: optax.ScalarOrSchedule = 0.0,
    *,
    nesterov: bool = False,
    ns_steps: int = 5,
    ns_coeffs: Sequence[tuple[float, float, float]] = NS_COEFFS,
    power_iterations: int = 1,
    pairs: _pair_types.PairsLike = "auto",
    mu_dtype: Any = None,
    weight_decay_mask: Any = None,
    adam_b1: jax.typing.ArrayLike = 0.9,
    adam_b2: jax.typing.ArrayLike = 0.999,
    adam_eps: jax.typing.ArrayLike = 1e-8,
    adam_eps_root: jax.typing.ArrayLike = 0.0,
    adam_weight_decay: jax.typing.ArrayLike = 0.0,
    adam_learning_rate: optax.ScalarOrSchedule | None = None,
    allow_no_pairs: bool = False,
) -> optax.GradientTransformationExtraArgs:
    r"""Spectron: orthogonalized momentum with a spectrally renormalized step.

    For each factor pair (found by ``pairs``) it chains :func:`scale_by_spectron`,
    :func:`optax.add_decayed_weights` and :func:`optax.scale_by_learning_rate`:

    .. math::

      a \leftarrow a - η\Big(\frac{O_a}{σ_a + σ_b + 1} + λ a\Big), \qquad
      b \leftarrow b - η\Big(\frac{O_b}{σ_a + σ_b + 1} + λ b\Big).

    Weight decay is decoupled and factor-wise, as in NVIDIA's reimplementation
    (``p ← p - η λ p``), so the product shrinks by about :math:`(1-λη)^2`. That
    reimplementation decays the factors before it measures :math:`σ`; here
    :math:`σ` is measured on the factors before the step, which differs by
    :math:`O(ηλ)` in :math:`ρ`. Every other leaf (biases, norms, embeddings) goes to
    :func:`optax.adamw` with the ``adam_*`` hyperparameters.

    :math:`η` is a spectral budget on the product change, in the same units as
    :func:`lora_muon`'s (which splits it as :math:`η/2` per factor term), but
    Spectron is not gauge invariant: rescaling :math:`(a, b) → (c a, b / c)`
    changes its steps.

    Works inside :func:`optax.chain`, :func:`optax.partition`, :func:`optax.masked`,
    :class:`optax.MultiSteps`, :func:`optax.apply_if_finite` and under
    :func:`optax.inject_hyperparams` (list ``ns_steps``, ``power_iterations``
    and a callable ``pairs`` in ``static_args``: they set loop lengths).

    Args:
      learning_rate: :math:`η`, a float or an optax schedule.
      beta: momentum decay :math:`β`.
      weight_decay: :math:`λ`, factor-wise decoupled weight decay.
      nesterov: Nesterov momentum. Static.
      ns_steps: Newton–Schulz steps. Static.
      ns_coeffs: Newton–Schulz ``(a, b, c)`` triples, cycled. Static.
      power_iterations: power-iteration steps per update. Static.
      pairs: how to find factor pairs; see :func:`find_lora_pairs`. Static.
      mu_dtype: momentum dtype for every leaf (LoRA and AdamW); ``None`` keeps the
        param dtype.
      weight_decay_mask: optional mask (tree or callable) for the factor-wise decay.
      adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay, adam_learning_rate:
        the :func:`optax.adamw` setting of that name for leaves in no pair
        (``adam_learning_rate=None``: ``learning_rate``).
      allow_no_pairs: accept a tree without LoRA pairs (AdamW on every leaf); see
        :func:`lora_muon_jax.lora_muon`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs` whose ``update`` requires
      ``params``.

    Raises:
      ValueError: as :func:`scale_by_spectron`, and a negative ``weight_decay``.
      TypeError: as :func:`scale_by_spectron` (leaves in no pair go to AdamW and
        are not checked; they may be complex).

    Examples:
      >>> import jax, jax.numpy as jnp, optax
      >>> from lora_muon_jax.peers import spectron
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> params = {'lora_a': jax.random.normal(k1, (6, 2)),
      ...           'lora_b': jax.random.normal(k2, (2, 5))}
      >>> loss = lambda p: jnp.mean((p['lora_a'] @ p['lora_b'] - 1.) ** 2)
      >>> def product_step(c):  # ‖Δ(a b)‖₂ of one step from the factors (c a, b / c)
      ...   p = {'lora_a': c * params['lora_a'], 'lora_b': params['lora_b'] / c}
      ...   tx = spectron(learning_rate=0.1)
      ...   new = optax.apply_updates(p, tx.update(jax.grad(loss)(p), tx.init(p), p)[0])
      ...   return jnp.linalg.norm(new['lora_a'] @ new['lora_b'] - p['lora_a'] @ p['lora_b'], 2)
      >>> print(f"{product_step(1.0):.4f} {product_step(10.0):.4f}")  # below η, gauge-dependent
      0.0655 0.0712

    References:
      See :func:`scale_by_spectron`.

      NVIDIA-NeMo/Emerging-Optimizers, ``orthogonalized_optimizers/spectron.py``
      (a reimplementation: factor-wise decoupled weight decay).

    Sources:
      Primary: Janson, Oyallon, Belilovsky, *Stabilizing Native Low-Rank LLM
      Pretraining*, arXiv 2602.12429 (https://arxiv.org/abs/2602.12429), Alg. 1
      (Spectron) and Alg. 3 (power iteration); its full text was not re-read
      for this paragraph, and the Newton–Schulz coefficients (its Alg. 2) are
      taken as its reimplementations cite them. Authors' code: not found (none
      linked from the abstract, none found by name in public code).
      Secondary: NVIDIA-NeMo/Emerging-Optimizers,
      ``emerging_optimizers/orthogonalized_optimizers/spectron.py``
      (https://github.com/NVIDIA-NeMo/Emerging-Optimizers), which cites Alg. 1
      and Alg. 3 and decays each factor; Cesista, Crowson, Simal, Biderman,
      *LoRA-Muon* (https://arxiv.org/abs/2606.12921), which shows Spectron's
      step depends on the factor gauge; the summary at
      https://api.emergentmind.com/papers/2602.12429.
    """
    _check_common(_ALIAS_FN, beta, ns_steps, ns_coeffs, power_iterations)
    _validation.check_scalar("weight_decay", weight_decay, low=0.0, fn=_ALIAS_FN)
    adamw = _adamw_routing.AdamWSettings(
        adam_learning_rate, adam_b1, adam_b2, adam_eps, adam_eps_root, adam_weight_decay
    )
    lora_tx = optax.chain(
        scale_by_spectron(
            beta,
            nesterov=nesterov,
            ns_steps=ns_steps,
            ns_coeffs=ns_coeffs,
            power_iterations=power_iterations,
            pairs=pairs,
            mu_dtype=mu_dtype,
        ),
        optax.add_decayed_weights(weight_decay, mask=weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return _adamw_routing.for_lora_pairs(
        lora_tx, adamw, learning_rate, _ALIAS_FN, pairs, allow_no_pairs, mu_dtype
    )
