"""Balanced LoRA initialization and a pre-flight check of LoRA models.

Flax and PEFT start adapters with one zero factor, so ``ΔW = 0``. Under
LoRA-Muon that zero factor has no row (or column) space: the first step moves
only it, it stays tiny for a while, and the factor norms drift apart step after
step (docs/algorithm.md §Zero factors and gauge drift). A balanced start keeps the
model function but gives both factors the same, non-zero spectral scale; the product
it introduces is absorbed into the frozen base weight (``W₀ ← W₀ - c · a @ b``, as
PiSSA does with the top singular directions of ``W₀``; here the directions are
random).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lora_muon_jax import _grams, _pair_matching, _pair_types, _validation
from lora_muon_jax.nnx import _merge_lora

_INIT_FN = "balance_lora_init"
_CHECK_FN = "check_lora_model"


def _scaled_to(x: jax.Array, sigma: jax.Array, target: jax.Array) -> jax.Array:
    ok = sigma > 0
    factor = jnp.where(ok, target / jnp.where(ok, sigma, 1.0), 0.0)
    return x * factor[..., None, None]


@jax.jit
def _is_zero(x: jax.Array) -> jax.Array:
    return jnp.all(x == 0, axis=(-2, -1))


@functools.partial(jax.jit, static_argnames=("keep_scale", "a_dtype", "b_dtype"))
def _balance_pair(
    a: jax.Array,
    b: jax.Array,
    kernel: jax.Array | None,
    key: jax.Array,
    index: jax.Array,
    lora_scale: jax.Array,
    product_scale: jax.Array,
    *,
    keep_scale: bool,
    a_dtype: Any,
    b_dtype: Any,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """Balances one canonical pair; see :func:`balance_lora_init`.

    Returns the new factors (in their dtypes) and the new base weight (``None``
    if none was given). Jitted, so a model with many same-shaped layers compiles
    once.
    """
    a32, b32 = a.astype(jnp.float32), b.astype(jnp.float32)
    zero_a = jnp.all(a32 == 0, axis=(-2, -1))
    zero_b = jnp.all(b32 == 0, axis=(-2, -1))
    draw = zero_a | zero_b
    # One draw for both factors (one random-bits program to compile).
    g = jax.random.normal(jax.random.fold_in(key, index), (a.size + b.size,), jnp.float32)
    ga, gb = g[: a.size].reshape(a.shape), g[a.size :].reshape(b.shape)
    tall, wide = _grams.canonical_layout(a.ndim, True), _grams.canonical_layout(b.ndim, False)
    sa, sb, sga, sgb = _grams.spectral_norms([(a32, tall), (b32, wide), (ga, tall), (gb, wide)])
    # Non-zero pairs: a pure gauge move to the geometric mean sqrt(σa·σb); the
    # product is unchanged.
    # Pairs with a zero factor: draw it, and give both factors the same σ_max,
    # sqrt(product_scale / c) (or the non-zero factor's own); the product was
    # zero, so rescaling the non-zero factor keeps the model too.
    if keep_scale:
        drawn = jnp.where(zero_a, sb, sa)
    else:
        drawn = jnp.broadcast_to(jnp.sqrt(product_scale / lora_scale), sa.shape)
    target = jnp.where(draw, drawn, jnp.sqrt(sa * sb))
    new_a = jnp.where(
        zero_a[..., None, None], _scaled_to(ga, sga, target), _scaled_to(a32, sa, target)
    )
    new_b = jnp.where(
        zero_b[..., None, None], _scaled_to(gb, sgb, target), _scaled_to(b32, sb, target)
    )
    new_a, new_b = new_a.astype(a_dtype), new_b.astype(b_dtype)
    if kernel is not None:
        # W₀ - c·a@b from the factors as stored, so W₀' + c·a@b = W₀ up to one
        # rounding of W₀' to the kernel dtype.
        moved = _merge_lora.fold_canonical(kernel, new_a, new_b, -lora_scale)
        kernel = jnp.where(draw[..., None, None], moved, kernel)
    return new_a, new_b, kernel


def _balance_tree(
    tree: Any,
    key: jax.Array | None,
    pairs: _pair_types.PairsLike,
    lora_scale: Any,
    product_scale: Any,
    base_path: _merge_lora.BasePath | None,
) -> Any:
    found = _merge_lora.pairs_with_bases(_INIT_FN, tree, pairs, base_path)
    leaves, treedef, plan, bases = found.leaves, found.treedef, found.plan, found.bases
    updates: dict[int, jax.Array] = {}
    for k, (pair, base) in enumerate(zip(plan.pairs, bases, strict=True)):
        a_leaf, b_leaf = jnp.asarray(leaves[pair.a_index]), jnp.asarray(leaves[pair.b_index])
        kernel = None
        if base is not None:
            kernel = jnp.asarray(leaves[base])
            _merge_lora.product_shape(
                _INIT_FN,
                pair,
                kernel.shape,
                plan.paths[base],
                tuple(a_leaf.shape),
                tuple(b_leaf.shape),
            )
        a, b = pair.canonical(a_leaf, "a"), pair.canonical(b_leaf, "b")
        zero_a, zero_b = np.asarray(_is_zero(a)), np.asarray(_is_zero(b))
        if np.any(zero_a & zero_b) and product_scale is None:
            raise ValueError(
                f"{_INIT_FN}: both factors of the LoRA pair at {pair.a_path} are zero and "
                "`product_scale=None` keeps no scale; pass a `product_scale`."
            )
        if np.any(zero_a | zero_b):
            if base is None:
                raise ValueError(
                    f"{_INIT_FN}: the LoRA pair at {pair.a_path} has a zero factor and no base "
                    f"weight to absorb a non-zero product (tried {found.tried(pair)}). Pass "
                    "`base_path=`, "
                    "or initialize both factors non-zero."
                )
            if key is None:
                raise ValueError(
                    f"{_INIT_FN}: the LoRA pair at {pair.a_path} has a zero factor; pass a "
                    "PRNG `key` to draw it."
                )
        new_a, new_b, new_kernel = _balance_pair(
            a,
            b,
            None if kernel is None else kernel.reshape((*pair.batch_shape, pair.m, pair.n)),
            jax.random.key(0) if key is None else key,
            k,
            jnp.asarray(lora_scale, jnp.float32),
            jnp.asarray(0.0 if product_scale is None else product_scale, jnp.float32),
            keep_scale=product_scale is None,
            a_dtype=a_leaf.dtype,
            b_dtype=b_leaf.dtype,
        )
        updates[pair.a_index] = pair.restore(new_a, "a", a_leaf.shape)
        updates[pair.b_index] = pair.restore(new_b, "b", b_leaf.shape)
        if new_kernel is not None and base is not None and kernel is not None:
            updates[base] = new_kernel.reshape(kernel.shape)
    # Nothing is replaced until every pair passed its checks.
    for i, x in updates.items():
        leaves[i] = x
    return jax.tree_util.tree_unflatten(treedef, leaves)


def balance_lora_init(
    model_or_params: Any,
    key: jax.Array | None,
    *,
    pairs: _pair_types.PairsLike = "auto",
    lora_scale: jax.typing.ArrayLike = 1.0,
    product_scale: jax.typing.ArrayLike | None = 0.1,
    base_path: _merge_lora.BasePath | None = None,
) -> Any:
    r"""Gives both factors of every adapter equal, non-zero spectral norm, keeping ``W``.

    For each pair (per batch index of stacked layers), with effective weight
    :math:`W = W_0 + c\, a b`:

    * **one factor zero** (Flax's and PEFT's default): the zero factor is drawn
      Gaussian, both factors are scaled to
      :math:`σ_{max}(a) = σ_{max}(b) = \sqrt{ρ / c}` with :math:`ρ` =
      ``product_scale``, and the new product is absorbed into the base weight,
      :math:`W_0 ← W_0 - c\, a b`, computed in float32 from the factors as stored.
      :math:`W` changes by one rounding of :math:`W_0` to its dtype: at most a
      float32 ulp of :math:`\max(|W_0|, |c\, a b|)` per entry, plus the float32
      matmul error;
    * **both factors non-zero**: a gauge move :math:`(a, b) → (s a, b / s)`,
      :math:`s = (σ_{max}(b)/σ_{max}(a))^{1/2}` (:func:`rebalance_pair`); the
      product and ``W₀`` are unchanged (up to one rounding of each factor).

    Afterwards :math:`σ_{max}(a) = σ_{max}(b)` for every pair, so LoRA-Muon starts
    from non-degenerate column and row spaces instead of a zero factor, which
    removes the factor-norm drift of zero-initialized ``b`` (docs/algorithm.md
    §Zero factors and gauge drift).

    The product scale matters. LoRA-Muon turns the factors' column and row spaces
    by about :math:`η / \|c\,ab\|_2` per step: a large absorbed product makes the
    adapter slow to find new directions, a tiny one brings back the drift. In
    regressions with ``1/√fan_in``-scaled base weights (``m, n`` in 24–64,
    ``r`` in 2–8, ``η`` in 0.02–0.1, 100–150 steps) :math:`ρ ≈ 0.1` trained
    about as fast as zero init with :math:`|\log σ_a/σ_b| ≤ 0.25` throughout
    (zero init: about 4.3); :math:`ρ ≈ 2` (the scale of Flax's ``he_uniform``
    ``a``, ``product_scale=None``) trained 3–100× slower.

    Runs eagerly: it checks which factors are zero.

    Args:
      model_or_params: an ``nnx.Module`` (``nnx.LoRALinear``,
        ``nnx.LoRA(base_module=nnx.Linear)``, stacked layers) or a pytree of
        nested dicts with sibling base weights (see :func:`merge_lora`).
      key: PRNG key for the drawn factors (may be ``None`` if no factor is zero).
      pairs: how to find pairs; see :func:`find_lora_pairs`.
      lora_scale: :math:`c` in ``W = W₀ + c · a @ b``.
      product_scale: :math:`ρ`: pairs with a zero factor get factors of spectral
        norm :math:`\sqrt{ρ/c}` each. ``None`` keeps the non-zero factor's
        spectral norm (an error if both are zero).
      base_path: a callable from the path of ``a`` to its base weight's path;
        default: as :func:`merge_lora`.

    Returns:
      A new model (``nnx.merge`` of the updated state) or pytree.

    Raises:
      ValueError: no pair found; a pair with a zero factor but no base weight, or
        no ``key``; both factors zero with ``product_scale=None``; a base weight
        whose shape is not that of ``a @ b``. Messages name the paths.

    Examples:
      >>> import jax, jax.numpy as jnp, numpy as np
      >>> from lora_muon_jax.nnx import balance_lora_init
      >>> rng = np.random.default_rng(0)
      >>> params = {'kernel': jnp.asarray(rng.normal(size=(6, 4)), jnp.float32),
      ...           'lora_a': jnp.asarray(rng.normal(size=(6, 2)), jnp.float32),
      ...           'lora_b': jnp.zeros((2, 4))}  # Flax's zero init
      >>> new = balance_lora_init(params, jax.random.key(1))
      >>> sigma = lambda x: np.linalg.norm(np.asarray(x), 2)
      >>> print(f"{sigma(new['lora_a']):.4f} {sigma(new['lora_b']):.4f}")
      0.3162 0.3162
      >>> w_old = np.asarray(params['kernel'])
      >>> w_new = np.asarray(new['kernel']) + np.asarray(new['lora_a'] @ new['lora_b'])
      >>> print(np.abs(w_new - w_old).max() < 1e-6)
      True

      For an ``nnx`` model (``nnx.LoRALinear``, ``nnx.LoRA`` with a base module),
      ``balance_lora_init(model, key)`` returns a new model with the same outputs.

    References:
      Meng, Wang, Zhang, `PiSSA: Principal Singular Values and Singular Vectors
      Adaptation of Large Language Models <https://arxiv.org/abs/2404.02948>`_, 2024

      Cesista, Crowson, Simal, Biderman, `LoRA-Muon: Spectral Steepest Descent on
      the Low-Rank Manifold <https://arxiv.org/abs/2606.12921>`_, 2026
    """
    _validation.check_scalar("lora_scale", lora_scale, low=0.0, low_inclusive=False, fn=_INIT_FN)
    if product_scale is not None:
        _validation.check_scalar(
            "product_scale", product_scale, low=0.0, low_inclusive=False, fn=_INIT_FN
        )
    if isinstance(model_or_params, nnx.Module):
        graphdef, state = nnx.split(model_or_params)
        state = _balance_tree(state, key, pairs, lora_scale, product_scale, base_path)
        return nnx.merge(graphdef, state)
    return _balance_tree(model_or_params, key, pairs, lora_scale, product_scale, base_path)


def check_lora_model(
    model: nnx.Module, *, wrt: Any = nnx.LoRAParam, pairs: _pair_types.PairsLike = "auto"
) -> tuple[_pair_types.LoRAPair, ...]:
    """Checks that ``nnx.Optimizer(model, lora_muon(...), wrt=wrt)`` will train adapters.

    ``lora_muon`` on a tree with no leaves is a no-op, as every optax
    transformation is, and it sends leaves in no pair to AdamW. Both are silent
    under ``nnx.Optimizer``; this check makes them errors.

    Args:
      model: an ``nnx.Module``.
      wrt: the filter that will be passed to ``nnx.Optimizer``.
      pairs: how to find pairs; see :func:`find_lora_pairs`.

    Returns:
      The pairs ``lora_muon`` will update (paths without a trailing ``.value``).

    Raises:
      ValueError: no variable matches ``wrt``; none of them form a pair; an
        ``nnx.LoRAParam`` is in no pair (it would get AdamW); unpaired factors or
        factors whose ranks, batch axes or dtypes disagree. Messages name paths.

    Examples:
      >>> from flax import nnx
      >>> from lora_muon_jax.nnx import check_lora_model
      >>> model = nnx.LoRALinear(4, 3, lora_rank=2, rngs=nnx.Rngs(0))
      >>> [p.a_path for p in check_lora_model(model)]
      ["['lora']['lora_a']"]
    """
    flat = list(nnx.to_flat_state(nnx.state(model, wrt)))
    if not flat:
        raise ValueError(
            f"{_CHECK_FN}: no variable of the model matches wrt={wrt!r}, so "
            "nnx.Optimizer(model, tx, wrt=...) would have nothing to train (a model built "
            "without nnx.LoRA / nnx.LoRALinear has no nnx.LoRAParam)."
        )
    paths = [tuple(jax.tree_util.DictKey(k) for k in path) for path, _ in flat]
    values = [var.get_value() if isinstance(var, nnx.Variable) else var for _, var in flat]
    plan = _pair_matching.plan_pairs(paths, values, pairs)
    if not plan.pairs:
        raise ValueError(
            f"{_CHECK_FN}: none of the leaves selected by wrt={wrt!r} form a LoRA pair "
            f"({', '.join(plan.paths[:6])}{' ...' if len(plan.paths) > 6 else ''}); "
            "lora_muon would train them all with AdamW. Pass `pairs=` if the factors have "
            "other names."
        )
    lonely: Sequence[str] = [
        plan.paths[i] for i in plan.unpaired if isinstance(flat[i][1], nnx.LoRAParam)
    ]
    if lonely:
        raise ValueError(
            f"{_CHECK_FN}: these nnx.LoRAParam leaves are in no LoRA pair and would be "
            f"trained by AdamW: {', '.join(lonely)}. Pass `pairs=` to name their partners."
        )
    return plan.pairs
