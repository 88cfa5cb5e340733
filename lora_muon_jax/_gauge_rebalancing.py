"""Gauge rebalancing: keep the two factors of each pair at equal spectral scale.

A LoRA product ``a @ b`` is unchanged by ``(a, b) → (c a, b / c)``. LoRA-Muon's
product trajectory is too, so the scale split between the factors is free to
drift (zero-initialized ``b`` starts the drift; docs/algorithm.md §Zero factors and
gauge drift). Rebalancing picks ``c = (σ_max(b) / σ_max(a))^{α/2}`` every few steps;
it changes neither the product nor the next product step, only the numerics of the
factors.
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _directions, _grams, _pair_tree, _pair_types, _validation
from lora_muon_jax._lora_muon_state import LoRAMuonState

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
    return jnp.exp(_log_scale(log_sa, log_sb, alpha))


def _log_scale(log_sa: jax.Array, log_sb: jax.Array, alpha: jax.typing.ArrayLike) -> jax.Array:
    """``log c = (α/2) log(σ_max(b)/σ_max(a))``; ``0`` where a factor is zero."""
    ok = jnp.isfinite(log_sa) & jnp.isfinite(log_sb)
    return jnp.where(ok, 0.5 * jnp.asarray(alpha, jnp.float32) * (log_sb - log_sa), 0.0)


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

    Raises:
      TypeError: a complex, integer or boolean factor (named in the message).
    """
    _validation.check_float_leaves("rebalance_pair", ("a", "b"), (a, b), None)
    c = gauge_scales(a, b, alpha)[..., None, None]
    return (a * c).astype(a.dtype), (b / c).astype(b.dtype)


def _log_scales(
    tree: _pair_tree.PairTree, new: list[jax.Array], alpha: jax.typing.ArrayLike
) -> list[jax.Array]:
    """``log c`` of every pair (its batch shape) that balances the factors ``new``.

    ``c = (σ_max(b)/σ_max(a))^{α/2}`` (see :func:`gauge_scales`), from Grams of the
    leaves as stored; ``0`` where a factor is zero.
    """
    out = []
    for pair in tree.plan.pairs:
        a, b = new[pair.a_index], new[pair.b_index]
        log_sa, log_sb = _grams.log_spectral_norms(
            [(a, pair.layout("a", a.ndim)), (b, pair.layout("b", b.ndim))]
        )
        out.append(_log_scale(log_sa, log_sb, alpha))
    return out


def _leaf_multipliers(tree: _pair_tree.PairTree, log_c: list[jax.Array]) -> dict[int, jax.Array]:
    """``c`` for every ``a`` leaf and ``1/c`` for every ``b`` leaf, in the leaf's layout."""
    out: dict[int, jax.Array] = {}
    for pair, lc in zip(tree.plan.pairs, log_c, strict=True):
        roles: tuple[tuple[Literal["a", "b"], int, float], ...] = (
            ("a", pair.a_index, 1.0),
            ("b", pair.b_index, -1.0),
        )
        for role, index, sign in roles:
            ndim = tree.params[index].ndim
            out[index] = _directions.per_batch(jnp.exp(sign * lc), pair.layout(role, ndim), ndim)
    return out


def _rescale_momenta(node: Any, treedef: Any, mult: dict[int, jax.Array]) -> Any:
    """Divides the momentum of every factor by its leaf's multiplier (gradients' gauge)."""
    if not isinstance(node, LoRAMuonState):
        return node
    mu = treedef.flatten_up_to(node.mu)
    for i, m in mult.items():
        mu[i] = (mu[i].astype(jnp.float32) / m).astype(mu[i].dtype)
    return node._replace(mu=jax.tree_util.tree_unflatten(treedef, mu))


def with_gauge_rebalancing(
    inner: optax.GradientTransformation,
    rebalance: GaugeRebalance = GaugeRebalance(),
    *,
    pairs: _pair_types.PairsLike = "auto",
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

    def init_fn(params: Any) -> GaugeRebalanceState:
        return GaugeRebalanceState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update_fn(
        updates: Any, state: GaugeRebalanceState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, GaugeRebalanceState]:
        tree = _pair_tree.flatten(_FN, updates, params, pairs, require_all_paired=False)
        inner_updates, inner_state = optax.with_extra_args_support(inner).update(
            updates, state.inner_state, params, **extra_args
        )

        u_leaves = tree.treedef.flatten_up_to(inner_updates)
        # Balance the factors *after* the step, so they leave it balanced.
        new = [
            p.astype(jnp.float32) + u.astype(jnp.float32)
            for p, u in zip(tree.params, u_leaves, strict=True)
        ]
        zeros = [jnp.zeros(p.batch_shape, jnp.float32) for p in tree.plan.pairs]
        log_c = jax.lax.cond(
            state.count % every == 0, lambda: _log_scales(tree, new, alpha), lambda: zeros
        )
        mult = _leaf_multipliers(tree, log_c)  # exactly 1 off rebalancing steps
        out = list(u_leaves)
        for i, c in mult.items():
            # c (p + u) - p, written so that c = 1 returns u bit for bit.
            p32 = tree.params[i].astype(jnp.float32)
            out[i] = ((c - 1.0) * p32 + c * u_leaves[i].astype(jnp.float32)).astype(out[i].dtype)
        inner_state = jax.tree.map(
            lambda node: _rescale_momenta(node, tree.treedef, mult),
            inner_state,
            is_leaf=lambda x: isinstance(x, LoRAMuonState),
        )
        return jax.tree_util.tree_unflatten(tree.treedef, out), GaugeRebalanceState(
            count=optax.safe_increment(state.count), inner_state=inner_state
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
