"""Split weight decay: decoupled weight decay of a LoRA product, not of its factors."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lora_muon_jax import _key_paths, _validation

_FN = "split_weight_decay"


class SplitWeightDecayState(NamedTuple):
    """State of :func:`split_weight_decay`."""

    # shape=(), dtype=int32: step of the learning-rate schedule.
    # The field shadows tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]


def _value_at(x: optax.ScalarOrSchedule, count: jax.Array) -> Any:
    return x(count) if callable(x) else x


def _check_dtypes(tree: Any, what: str) -> None:
    """Every leaf is a factor here: complex, integer and boolean leaves are refused."""
    paths, leaves, _ = _key_paths.flatten_with_paths(tree)
    names = [_key_paths.path_str(p) for p in paths]
    _validation.check_float_leaves(_FN, names, leaves, what)


def split_weight_decay(
    weight_decay: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule,
    mask: Any = None,
) -> optax.GradientTransformationExtraArgs:
    r"""Decays the product of each LoRA pair by ``1 - λη``, splitting it between factors.

    Given the incoming step :math:`Δ` (already scaled by the learning rate) it
    returns the update that moves every parameter to

    .. math::

      θ \leftarrow s\,θ + Δ / s, \qquad s = \sqrt{1 - λ η_t},

    so that for a pair :math:`(a, b)`

    .. math::

      (s a + Δ_a/s)(s b + Δ_b/s) = (1 - λη_t)\, a b + Δ_a b + a Δ_b + Δ_a Δ_b / s^2:

    the product decays exactly like a dense weight under decoupled weight decay
    (AdamW, Muon), and the first-order step is untouched. Chaining
    :func:`optax.add_decayed_weights` instead decays each factor, which shrinks the
    product by :math:`(1 - λη)^2`: a different rule.

    Place it last in a chain, after :func:`optax.scale_by_learning_rate` with the
    same ``learning_rate``; the schedule is evaluated on this transformation's own
    step count. If ``λη_t ≥ 1`` is known at trace time it raises; if it only happens
    at run time (traced or scheduled values), the update is NaN so that
    :func:`optax.apply_if_finite` or a NaN check stops the step instead of silently
    flipping the sign of the weights.

    Args:
      weight_decay: :math:`λ`, a float or a schedule.
      learning_rate: :math:`η`, the same float or schedule given to
        :func:`optax.scale_by_learning_rate`.
      mask: optional tree (or callable returning one) of booleans: where ``False``
        the update passes through. Both factors of a pair should share one value,
        or the product no longer decays by ``1 - λη``.

    Returns:
      An :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: non-finite or negative ``weight_decay``, non-finite
        ``learning_rate``, or ``λη ≥ 1`` when both are known; ``params`` missing in
        ``update``.
      TypeError: a complex, integer or boolean leaf in the params (``init``) or
        the updates (``update``), named by its path: every leaf it sees is
        treated as a LoRA factor (mask the others out with ``mask``).

    Examples:
      >>> import jax.numpy as jnp, optax
      >>> from lora_muon_jax import split_weight_decay
      >>> params = {'lora_a': jnp.ones((3, 1)), 'lora_b': jnp.ones((1, 2))}
      >>> tx = split_weight_decay(weight_decay=0.5, learning_rate=0.1)
      >>> zero = optax.tree.zeros_like(params)
      >>> updates, _ = tx.update(zero, tx.init(params), params)
      >>> new = optax.apply_updates(params, updates)
      >>> print(f"{(new['lora_a'] @ new['lora_b'])[0, 0]:.3f}")  # 1 - 0.5 * 0.1
      0.950

    References:
      Cesista, Crowson, Simal, Biderman, `LoRA-Muon: Spectral Steepest Descent on
      the Low-Rank Manifold <https://arxiv.org/abs/2606.12921>`_, 2026

      Loshchilov and Hutter, `Decoupled Weight Decay Regularization
      <https://arxiv.org/abs/1711.05101>`_, 2019
    """
    _validation.check_scalar("weight_decay", weight_decay, low=0.0, fn=_FN)
    _validation.check_scalar("learning_rate", learning_rate, fn=_FN)
    lam0, eta0 = (_validation.concrete_float(v) for v in (weight_decay, learning_rate))
    if lam0 is not None and eta0 is not None and lam0 * eta0 >= 1.0:
        raise ValueError(
            f"{_FN}: weight_decay * learning_rate = {lam0 * eta0:g} >= 1; the product "
            "would be decayed by a non-positive factor. Lower one of them."
        )
    # A static zero decay is the identity; skip its arithmetic but keep the state so
    # the state tree does not depend on the value.
    skip = isinstance(weight_decay, (int, float)) and weight_decay == 0

    def init_fn(params: Any) -> SplitWeightDecayState:
        _check_dtypes(params, "params")
        return SplitWeightDecayState(count=jnp.zeros([], jnp.int32))

    def update_fn(
        updates: Any, state: SplitWeightDecayState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, SplitWeightDecayState]:
        del extra_args
        new_state = SplitWeightDecayState(count=optax.safe_increment(state.count))
        _check_dtypes(updates, "updates")
        if skip:
            return updates, new_state
        paths, leaves, treedef = _key_paths.flatten_with_paths(updates)
        p_leaves = _validation.params_leaves(_FN, paths, params)
        _check_dtypes(params, "params")
        lam = _value_at(weight_decay, state.count)
        eta = _value_at(learning_rate, state.count)
        lam_c, eta_c = _validation.concrete_float(lam), _validation.concrete_float(eta)
        if lam_c is not None and eta_c is not None and lam_c * eta_c >= 1.0:
            raise ValueError(
                f"{_FN}: weight_decay * learning_rate = {lam_c * eta_c:g} >= 1 at "
                "this step; lower one of them."
            )
        decay = jnp.asarray(lam, jnp.float32) * jnp.asarray(eta, jnp.float32)
        s = jnp.where(decay < 1.0, jnp.sqrt(jnp.maximum(1.0 - decay, 0.0)), jnp.nan)

        def one(u: jax.Array, p: jax.Array) -> jax.Array:
            out = (s - 1.0) * p.astype(jnp.float32) + u.astype(jnp.float32) / s
            return out.astype(u.dtype)

        out = [one(u, p) for u, p in zip(leaves, p_leaves, strict=True)]
        return jax.tree_util.tree_unflatten(treedef, out), new_state

    tx = optax.GradientTransformationExtraArgs(init_fn, update_fn)
    return tx if mask is None else optax.masked(tx, mask)
