"""Gauge rebalancing: keep the two factors of each pair at equal spectral scale.

A LoRA product ``a @ b`` is unchanged by ``(a, b) → (c a, b / c)``. LoRA-Muon's
product trajectory is too, so the scale split between the factors is free to
drift (zero-initialized ``b`` starts the drift; spec §4). Rebalancing picks
``c = (σ_max(b) / σ_max(a))^{α/2}`` every few steps; it changes neither the product
nor the next product step, only the numerics of the factors.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _grams, _pairs, _pairwise, _validation

_FN = "with_gauge_rebalancing"


class GaugeRebalance(NamedTuple):
    """Settings of gauge rebalancing.

    Attributes:
      every: rebalance on steps ``0, every, 2·every, ...`` (``every >= 1``).
      alpha: exponent in ``c = (σ_max(b)/σ_max(a))^{α/2}``: ``1`` equalizes the two
        spectral norms, smaller values move part of the way.
    """

    every: int = 100
    alpha: float = 1.0


class GaugeRebalanceState(NamedTuple):
    """State of :func:`with_gauge_rebalancing`."""

    # shape=(), dtype=int32. The field shadows tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]
    inner_state: optax.OptState


def gauge_scales(a: jax.Array, b: jax.Array, alpha: jax.typing.ArrayLike = 1.0) -> jax.Array:
    """Per-pair scale ``c = (σ_max(b)/σ_max(a))^{α/2}`` of canonical factors.

    Args:
      a: ``(*batch, m, r)`` left factors.
      b: ``(*batch, r, n)`` right factors.
      alpha: rebalancing exponent.

    Returns:
      ``c`` with shape ``batch``, float32; ``1`` where either factor is zero.
    """
    log_sa, log_sb = _grams.log_spectral_norms(
        [(a, _grams.canonical_layout(a.ndim, True)), (b, _grams.canonical_layout(b.ndim, False))]
    )
    ok = jnp.isfinite(log_sa) & jnp.isfinite(log_sb)
    log_ratio = jnp.where(ok, log_sb - log_sa, 0.0)  # log(σ_max(b) / σ_max(a))
    return jnp.where(ok, jnp.exp(0.5 * jnp.asarray(alpha, jnp.float32) * log_ratio), 1.0)


def rebalance_pair(
    a: jax.Array, b: jax.Array, alpha: jax.typing.ArrayLike = 1.0
) -> tuple[jax.Array, jax.Array]:
    """Rescales one canonical pair ``(a, b) → (c a, b / c)`` towards equal spectral norms.

    Examples:
      >>> import jax.numpy as jnp
      >>> from lora_muon_jax import rebalance_pair
      >>> a, b = jnp.ones((4, 1)) * 100., jnp.ones((1, 4)) * 0.01
      >>> a2, b2 = rebalance_pair(a, b)
      >>> print(f"{jnp.linalg.norm(a2, 2):.2f} {jnp.linalg.norm(b2, 2):.2f}")
      2.00 2.00
    """
    c = gauge_scales(a, b, alpha)[..., None, None]
    return (a * c).astype(a.dtype), (b / c).astype(b.dtype)


def _expand(pair: _pairs.LoRAPair, c: jax.Array, role: str, shape: tuple[int, ...]) -> jax.Array:
    """Broadcasts per-batch ``c`` to a factor's own layout (fused by XLA)."""
    canon = (
        (*pair.batch_shape, pair.m, pair.rank)
        if role == "a"
        else (*pair.batch_shape, pair.rank, pair.n)
    )
    full = jnp.broadcast_to(c[..., None, None], canon)
    return pair.restore(full, role, shape)  # type: ignore[arg-type]


def with_gauge_rebalancing(
    inner: optax.GradientTransformation,
    rebalance: GaugeRebalance = GaugeRebalance(),
    *,
    pairs: _pairs.PairsLike = "auto",
) -> optax.GradientTransformationExtraArgs:
    r"""Wraps a LoRA-Muon chain so every ``rebalance.every`` steps each pair is rebalanced.

    On a rebalancing step the ordinary step is taken and then every pair is moved
    along its gauge orbit,

    .. math::

      a' = c\,(a + u_a), \quad b' = (b + u_b)/c, \quad m_a' = m_a/c, \quad m_b' = c\,m_b,

    with :math:`c = (σ_{max}(b + u_b)/σ_{max}(a + u_a))^{α/2}`, so the factors leave
    the step balanced. Momenta transform like gradients do under the gauge, and
    the LoRA-Muon direction is gauge-covariant, so the product :math:`a'b'` and the
    next update of the product are exactly those without rebalancing. The r×r work runs only on
    rebalancing steps (``lax.cond``). Momenta are found as the ``mu`` of every
    :class:`LoRAMuonState` inside the wrapped state.

    Args:
      inner: the transformation to wrap, typically the LoRA part of
        :func:`lora_muon`; it must contain :func:`scale_by_lora_muon`.
      rebalance: :class:`GaugeRebalance` settings.
      pairs: how to find pairs; see :func:`find_lora_pairs`.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from lora_muon_jax import GaugeRebalance, scale_by_lora_muon
      >>> from lora_muon_jax import with_gauge_rebalancing
      >>> params = {'lora_a': jnp.ones((4, 1)) * 100., 'lora_b': jnp.ones((1, 3)) * 0.01}
      >>> tx = with_gauge_rebalancing(
      ...     optax.chain(scale_by_lora_muon(), optax.scale(-1e-3)), GaugeRebalance(every=1))
      >>> grads = {'lora_a': jnp.ones((4, 1)), 'lora_b': jnp.ones((1, 3))}
      >>> u, _ = tx.update(grads, tx.init(params), params)
      >>> new = optax.apply_updates(params, u)
      >>> print(f"{jnp.linalg.norm(new['lora_a']):.2f} {jnp.linalg.norm(new['lora_b']):.2f}")
      1.86 1.86

    References:
      Cesista, Crowson, Simal, Biderman, `LoRA-Muon: Spectral Steepest Descent on
      the Low-Rank Manifold <https://arxiv.org/abs/2606.12921>`_, 2026
    """
    every, alpha = rebalance
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"{_FN}: `rebalance.every` must be an int >= 1; got {every!r}.")
    _validation.check_scalar("rebalance.alpha", alpha, low=0.0, high=2.0, fn=_FN)
    from lora_muon_jax._core import LoRAMuonState  # the core imports this module

    def init_fn(params: Any) -> GaugeRebalanceState:
        return GaugeRebalanceState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update_fn(
        updates: Any, state: GaugeRebalanceState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, GaugeRebalanceState]:
        tree = _pairwise.flatten(_FN, updates, params, pairs, require_all_paired=False)
        plan, treedef, p_leaves = tree.plan, tree.treedef, tree.params
        inner_updates, inner_state = optax.with_extra_args_support(inner).update(
            updates, state.inner_state, params, **extra_args
        )

        u_leaves = treedef.flatten_up_to(inner_updates)

        def scales() -> list[jax.Array]:
            # Balance the factors *after* the step, so they leave it balanced.
            def new(i: int) -> jax.Array:
                return p_leaves[i].astype(jnp.float32) + u_leaves[i].astype(jnp.float32)

            return [
                gauge_scales(
                    pair.canonical(new(pair.a_index), "a"),
                    pair.canonical(new(pair.b_index), "b"),
                    alpha,
                )
                for pair in plan.pairs
            ]

        ones = [jnp.ones(pair.batch_shape, jnp.float32) for pair in plan.pairs]
        cs = jax.lax.cond(state.count % every == 0, scales, lambda: ones)

        # Per-leaf multiplier for params (c on a, 1/c on b) and momenta (inverse).
        factor_scale: dict[str, tuple[_pairs.LoRAPair, jax.Array, str]] = {}
        for pair, c in zip(plan.pairs, cs, strict=True):
            factor_scale[pair.a_path] = (pair, c, "a")
            factor_scale[pair.b_path] = (pair, 1.0 / c, "b")

        out = list(u_leaves)
        for i, path in enumerate(plan.paths):
            if path in factor_scale:
                pair, c, role = factor_scale[path]
                p = p_leaves[i]
                cf = _expand(pair, c, role, p.shape)
                # c (p + u) - p, written so that c = 1 returns u bit for bit.
                new = (cf - 1.0) * p.astype(jnp.float32) + cf * u_leaves[i].astype(jnp.float32)
                out[i] = new.astype(u_leaves[i].dtype)

        def rescale_mu(node: Any) -> Any:
            if not isinstance(node, LoRAMuonState):
                return node
            mu_paths, mu_leaves, mu_def = _pairs.flatten_with_paths(node.mu)
            new_mu = []
            for path, m in zip(mu_paths, mu_leaves, strict=True):
                key = _pairs.path_str(path)
                if key in factor_scale:
                    pair, c, role = factor_scale[key]
                    m = (m.astype(jnp.float32) / _expand(pair, c, role, m.shape)).astype(m.dtype)
                new_mu.append(m)
            return node._replace(mu=jax.tree_util.tree_unflatten(mu_def, new_mu))

        inner_state = jax.tree.map(
            rescale_mu, inner_state, is_leaf=lambda x: isinstance(x, LoRAMuonState)
        )
        return jax.tree_util.tree_unflatten(treedef, out), GaugeRebalanceState(
            count=optax.safe_increment(state.count), inner_state=inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
