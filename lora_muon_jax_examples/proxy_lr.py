"""Learning-rate search on a cheap low-rank proxy, for dense Muon.

LoRA-Muon's learning rate is a spectral-norm budget on each adapter product's
change, the same unit as dense Muon's ``‖ΔW‖₂ = η``. The rate that trains a
native rank-``r`` twin of a model best is therefore a candidate rate for the dense
model (the LoRA-Muon paper's "proxy" claim; ``docs/lr_transfer.md`` measures how
well it holds). :func:`proxy_lr_search` turns that into a tool: it sweeps the rate
on the rank-``r`` proxy, one compilation for every rate and seed, and returns the
winner with the whole table, and the rate it transfers to dense Muon: the optimum
fitted between the grid's rates (:func:`log_parabola_optimum`).

Its defaults are the protocol of the TinyShakespeare study's long budget
(``docs/lr_transfer.md``, section vii), where the proxy's optimum matched dense
Muon's: :data:`STUDY_STEPS` steps, seeds :data:`STUDY_SEEDS`, the study's schedule
shape (:func:`warmup_cooldown`), AdamW at the fixed rate :data:`STUDY_ADAM_LR` for
every leaf in no pair, and ``dense_lr_factor=1``. A seed draws the same
initialization and batch stream as the study's run of that seed.
"""

from __future__ import annotations

import inspect
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

import lora_muon_jax as lmj
from lora_muon_jax import _validation

_FN = "proxy_lr_search"

STUDY_STEPS = 1000  # the study's long budget, where proxy and dense optima matched
STUDY_SEEDS = (0, 1, 2)  # one seed's argmin moved by a whole ×2 grid step there
STUDY_ADAM_LR = 1e-2  # the study's fixed AdamW rate of leaves in no pair (Budget.adam_lr)
STUDY_WARMUP = 0.05  # share of steps with a linear warmup
STUDY_COOLDOWN = 0.2  # share of steps with a linear decay to 0 at the end
DATA_FOLD = 7  # a seed's batch key: fold_in(key(seed), DATA_FOLD), as in the study


def warmup_cooldown(
    steps: int, warmup: float = STUDY_WARMUP, cooldown: float = STUDY_COOLDOWN
) -> Callable[[jax.Array], jax.Array]:
    r"""The study's schedule shape: linear warmup, flat, linear decay to 0.

    .. math::

      s(t) = \min\Big(1, \frac{t + 1}{w}\Big)\,
             \operatorname{clip}\Big(\frac{T - t}{c}, 0, 1\Big),

    with :math:`T` = ``steps``, :math:`w = \max(1, \operatorname{round}(\text{warmup}
    \cdot T))` and :math:`c = \max(1, \operatorname{round}(\text{cooldown} \cdot T))`.

    Args:
      steps: the run's length :math:`T`.
      warmup: share of the steps that warm up linearly.
      cooldown: share of the steps, at the end, that decay linearly to 0.

    Returns:
      ``step -> multiplier`` (traceable).

    Examples:
      >>> from lora_muon_jax_examples.proxy_lr import warmup_cooldown
      >>> s = warmup_cooldown(100)
      >>> [round(float(s(t)), 2) for t in (0, 4, 50, 80, 90, 99)]
      [0.2, 1.0, 1.0, 1.0, 0.5, 0.05]
    """
    warm = max(1.0, round(warmup * steps))
    cool = max(1.0, round(cooldown * steps))

    def schedule(count: jax.Array) -> jax.Array:
        t = jnp.asarray(count, jnp.float32)
        return jnp.minimum(1.0, (t + 1.0) / warm) * jnp.clip((steps - t) / cool, 0.0, 1.0)

    return schedule


def seed_keys(seed: int) -> tuple[jax.Array, jax.Array]:
    """``(init key, data key)`` of a seed: ``key(seed)`` and ``fold_in(key(seed), 7)``.

    Step ``t`` draws its batch from ``fold_in(data key, t)``: the derivation of the
    study's training loop (``benchmarks/study/training.py``), so a seed means the
    same initialization (``nnx.Rngs(seed)`` equals ``nnx.Rngs(key(seed))``) and batch
    stream in both.
    """
    key = jax.random.key(int(seed))
    return key, jax.random.fold_in(key, DATA_FOLD)


def _accepts(fn: Callable[..., Any], name: str) -> bool:
    """Whether ``fn`` takes a keyword ``name`` (or ``**kwargs``)."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class ProxyRow(NamedTuple):
    """One learning rate of a :func:`proxy_lr_search` sweep.

    Attributes:
      learning_rate: the rate :math:`η`.
      loss: mean final loss over seeds; ``inf`` if any seed diverged.
      losses: final loss of each seed (``inf``: diverged).
      diverged: how many seeds diverged.
    """

    learning_rate: float
    loss: float
    losses: tuple[float, ...]
    diverged: int


class ProxyResult(NamedTuple):
    """What :func:`proxy_lr_search` found.

    Attributes:
      best_lr: the rate with the lowest mean final loss (ties: the smaller rate).
      table: one :class:`ProxyRow` per rate, in increasing order.
      rank: the proxy's adapter rank.
      at_edge: ``best_lr`` is the smallest or largest rate tried, so the optimum
        may lie outside the grid: widen it before trusting ``best_lr``.
      dense_lr: the rate for dense Muon: ``dense_lr_factor`` times the proxy's
        optimum fitted between grid rates (:func:`log_parabola_optimum`).
    """

    best_lr: float
    table: tuple[ProxyRow, ...]
    rank: int
    at_edge: bool
    dense_lr: float


def log_parabola_optimum(rates: Sequence[float], losses: Sequence[float]) -> float:
    r"""The rate at the vertex of a parabola in :math:`\log_2 η` through the best loss.

    With :math:`x = \log_2 η` and :math:`L_{i-1}, L_i, L_{i+1}` the lowest finite loss
    and its two neighbours on the sorted grid, the parabola
    :math:`L(x) = a x^2 + b x + c` through the three points has its vertex at

    .. math::

      x^\star = -\frac{b}{2a}

    (``numpy.polyfit``, exact for three points), clipped to
    :math:`[x_{i-1}, x_{i+1}]`. Near its optimum a loss-vs-log-rate curve is flat and
    seed noise moves the grid's argmin by a whole grid step; the vertex uses the
    neighbours too. The best grid rate itself is returned when it is on an edge,
    when a neighbour diverged (``inf``), or when the parabola does not open upwards.

    Args:
      rates: positive rates (any order, distinct).
      losses: the loss at each rate (``inf`` for a diverged rate).

    Returns:
      The fitted optimal rate.

    Raises:
      ValueError: lengths differ, or no loss is finite.

    Examples:
      >>> import math
      >>> from lora_muon_jax_examples.proxy_lr import log_parabola_optimum
      >>> rates = [0.0125, 0.025, 0.05, 0.1]
      >>> losses = [math.log2(r / 0.03) ** 2 for r in rates]  # optimum at 0.03
      >>> print(f"{log_parabola_optimum(rates, losses):.4f}")
      0.0300
    """
    if len(rates) != len(losses):
        raise ValueError(f"log_parabola_optimum: {len(rates)} rates but {len(losses)} losses.")
    pairs = sorted(zip((float(r) for r in rates), (float(v) for v in losses), strict=False))
    finite = [k for k, (_, v) in enumerate(pairs) if math.isfinite(v)]
    if not finite:
        raise ValueError("log_parabola_optimum: no finite loss.")
    i = min(finite, key=lambda k: (pairs[k][1], pairs[k][0]))
    if i in (0, len(pairs) - 1) or not all(math.isfinite(pairs[k][1]) for k in (i - 1, i + 1)):
        return pairs[i][0]
    x = np.log2([pairs[k][0] for k in (i - 1, i, i + 1)])
    a, b, _ = np.polyfit(x, [pairs[k][1] for k in (i - 1, i, i + 1)], 2)
    if a <= 0:
        return pairs[i][0]
    return float(2.0 ** np.clip(-b / (2 * a), x[0], x[2]))


def _split_module(obj: Any) -> tuple[Any, Any, Callable[[Any, Any], Any]] | None:
    """``(params, rest, rebuild)`` of an ``nnx.Module``; ``None`` for a plain pytree.

    flax is only consulted when it is already imported: an object of a module
    that was never imported cannot be an ``nnx.Module``.
    """
    if "flax" not in sys.modules:
        return None
    from flax import nnx

    if not isinstance(obj, nnx.Module):
        return None
    graphdef, params, rest = nnx.split(obj, nnx.Param, ...)  # type: ignore[misc]
    return params, rest, lambda p, r: nnx.merge(graphdef, p, r)


def _check_args(learning_rates: Any, rank: Any, steps: Any, seeds: Any) -> tuple[float, ...]:
    for name, value in (("rank", rank), ("steps", steps)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{_FN}: `{name}` must be a positive int; got {value!r}.")
    lrs = tuple(float(x) for x in np.atleast_1d(np.asarray(learning_rates, dtype=float)))
    if not lrs or not all(math.isfinite(x) and x > 0 for x in lrs):
        raise ValueError(
            f"{_FN}: `learning_rates` must be a non-empty sequence of positive finite "
            f"floats; got {learning_rates!r}."
        )
    if len(set(lrs)) != len(lrs):
        raise ValueError(f"{_FN}: `learning_rates` has duplicates: {learning_rates!r}.")
    if not len(seeds) or not all(isinstance(s, int | np.integer) for s in seeds):
        raise ValueError(f"{_FN}: `seeds` must be a non-empty sequence of ints; got {seeds!r}.")
    return tuple(sorted(lrs))


def _check_proxy(params: Any, rank: int) -> None:
    found = lmj.find_lora_pairs(params)
    if not found:
        raise ValueError(
            f"{_FN}: `init_fn(key, rank)` returned no LoRA pair (no sibling `lora_a`/"
            "`lora_b` leaves or `nnx.LoRAParam`s); it must build the rank-r LoRA twin "
            "of the model."
        )
    wrong = [p.a_path for p in found if p.rank != rank]
    if wrong:
        raise ValueError(
            f"{_FN}: `init_fn(key, rank={rank})` built pairs of another rank at "
            f"{', '.join(wrong[:4])}; pass `rank` on to the adapters."
        )


def proxy_lr_search(
    init_fn: Callable[[jax.Array, int], Any],
    loss_fn: Callable[[Any, Any], jax.Array],
    batch_fn: Callable[[jax.Array], Any],
    learning_rates: Sequence[float],
    *,
    rank: int = 2,
    steps: int = STUDY_STEPS,
    seeds: Sequence[int] = STUDY_SEEDS,
    eval_batch: Any = None,
    optimizer: Callable[..., optax.GradientTransformation] = lmj.lora_muon,
    schedule: Callable[[jax.Array], jax.Array] | None = None,
    adam_learning_rate: float | None = STUDY_ADAM_LR,
    diverge_above: float | None = None,
    dense_lr_factor: float = 1.0,
) -> ProxyResult:
    r"""Sweeps LoRA-Muon's learning rate on a rank-``r`` proxy; the winner is for dense Muon.

    For every rate :math:`η` and seed it trains ``init_fn(key, rank)`` for ``steps``
    steps with ``optimizer(lambda t: η · schedule(t), adam_learning_rate=lambda t:
    η_adam · schedule(t))`` (default :func:`lora_muon`: adapter pairs get LoRA-Muon,
    every other leaf AdamW at the fixed peak rate ``η_adam = adam_learning_rate``,
    the same for every swept :math:`η`) and records the final loss: ``loss_fn`` on
    ``eval_batch``, or the mean training loss of the last tenth of the steps. Then

    .. math::

      η^\star = \arg\min_η \frac{1}{|S|} \sum_{s \in S} L_s(η).

    LoRA-Muon moves each product ``a @ b`` by at most :math:`η` in spectral norm per
    step, the step of dense Muon :math:`ΔW = -η\,\operatorname{msign}(G)`, so
    :math:`η^\star` is the rate to try on the dense model with a Muon whose update
    has unit spectral norm (``optax.contrib.muon`` also multiplies each update by
    :math:`\sqrt{\max(1, d_{out}/d_{in})}`; its rate can differ by up to that factor).
    The proxy must share the dense model's width, depth and data; ``r = 2`` is
    usually enough.

    The rate to use is ``dense_lr``: the proxy's optimum fitted between the grid's
    rates (:func:`log_parabola_optimum`; the grid's argmin alone moves by a whole
    grid step with seed noise on the flat bottom of the curve), times
    ``dense_lr_factor``. The TinyShakespeare study (``docs/lr_transfer.md``, section
    vii) found the proxy's optimum to equal dense Muon's, within seed noise, when
    both are trained at a budget that reaches the paper's loss; at a much shorter
    budget (200 steps) dense Muon wanted roughly half of it, at every rank. The ratio
    did not depend on the rank, so the rank-aware rule :math:`\sqrt{2r/\min(m, n)}`
    (equal Frobenius norms of the two steps) is not applied. So: give the proxy the
    dense run's own steps, batch and schedule, and train dense Muon at ``dense_lr``;
    for a short dense run (a few hundred steps, far from the loss it would reach),
    pass ``dense_lr_factor=0.5``. Section (viii) of the study page tests the
    long-budget equivalence with 10 paired seeds.

    The defaults are the study's long-budget protocol: :data:`STUDY_STEPS` steps,
    the seeds :data:`STUDY_SEEDS` (with one seed the argmin moved by a whole ×2
    grid step there), :func:`warmup_cooldown` as the schedule, and the leaves in no
    pair (embeddings, norms, head) on AdamW at the fixed :data:`STUDY_ADAM_LR` (swept
    with the LoRA rate instead, their own optimum would pull the proxy's).

    The rate is traced: the training loop (a ``lax.scan``) compiles once for all
    rates and seeds. A seed diverges when its loss becomes NaN/inf or exceeds
    ``diverge_above``; its parameters are frozen from then on and its loss counts as
    ``inf``, so a rate where any seed diverged is never chosen. All seeds of a rate
    see the same batches as the other rates (paired comparison); a seed's keys are
    :func:`seed_keys`, the study's, so its initialization and batches are those of
    the study's run with that seed.

    Args:
      init_fn: ``(key, rank) -> params`` of the proxy: a pytree with sibling
        ``lora_a``/``lora_b`` leaves (any :func:`find_lora_pairs` layout) or an
        ``nnx.Module`` with ``nnx.LoRAParam`` factors; its ``nnx.Param`` leaves are
        trained and other variables are kept as they are.
      loss_fn: ``(params, batch) -> scalar`` (for a module: ``(module, batch)``).
      batch_fn: ``key -> batch``, traceable (it runs inside the compiled loop).
      learning_rates: the rates to try (positive, distinct).
      rank: the adapter rank passed to ``init_fn``; every pair must have it.
      steps: training steps per run.
      seeds: seeds; each gives ``init_fn`` and the batch stream their keys
        (:func:`seed_keys`).
      eval_batch: a fixed batch for the final loss; ``None`` uses the mean
        training loss of the last ``max(1, steps // 10)`` steps.
      optimizer: ``learning_rate -> GradientTransformation``; called inside ``jit``
        with a schedule, so it must accept a callable rate (every optax alias does).
        Pass e.g. ``functools.partial(lora_muon, beta=0.9)`` to change settings.
      schedule: ``step -> multiplier`` of both rates (warmup, decay);
        ``None``: :func:`warmup_cooldown` of ``steps``. Pass ``lambda t: 1.0`` for
        a constant rate.
      adam_learning_rate: the fixed peak AdamW rate of the leaves in no pair,
        passed to ``optimizer`` as ``adam_learning_rate`` (with ``schedule``'s
        shape) when it takes that keyword (:func:`lora_muon` and the library's
        peers do; for one that does not, such as ``optax.sgd``, it is ignored);
        ``None``: those leaves get the swept rate.
      diverge_above: a loss above this counts as diverged (besides NaN/inf).
      dense_lr_factor: ``dense_lr`` is this times the fitted proxy optimum (``> 0``).

    Returns:
      A :class:`ProxyResult`: ``best_lr``, the table, the rank, ``at_edge`` and
      ``dense_lr``.

    Raises:
      ValueError: bad ``learning_rates``, ``rank``, ``steps``, ``seeds``,
        ``adam_learning_rate`` or ``dense_lr_factor``; a proxy with no LoRA pair or
        with pairs of another rank; every rate diverged.

    Examples:
      A rank-2 regression target; the proxy is a rank-2 product fit to it.

      >>> import jax, jax.numpy as jnp
      >>> from lora_muon_jax_examples import proxy_lr_search
      >>> k1, k2 = jax.random.split(jax.random.key(0))
      >>> target = jax.random.normal(k1, (8, 2)) @ jax.random.normal(k2, (2, 6)) / 3
      >>> def init_fn(key, rank):
      ...   ka, kb = jax.random.split(key)
      ...   return {'w': {'lora_a': jax.random.normal(ka, (8, rank)) / 3,
      ...                 'lora_b': jax.random.normal(kb, (rank, 6)) / 3}}
      >>> def loss_fn(params, x):
      ...   w = params['w']['lora_a'] @ params['w']['lora_b']
      ...   return jnp.mean((x @ w - x @ target) ** 2)
      >>> batch_fn = lambda key: jax.random.normal(key, (32, 8))
      >>> result = proxy_lr_search(init_fn, loss_fn, batch_fn, [0.01, 0.03, 0.1, 0.3, 1.0],
      ...                          steps=50, seeds=(0, 1))
      >>> for row in result.table:
      ...   print(f"{row.learning_rate:5g}  {row.loss:.2f}  diverged={row.diverged}")
       0.01  2.27  diverged=0
       0.03  1.23  diverged=0
        0.1  0.13  diverged=0
        0.3  0.08  diverged=0
          1  0.36  diverged=0
      >>> result.best_lr, result.at_edge
      (0.3, False)
      >>> print(f"{result.dense_lr:.2f}")  # fitted between 0.1 and 1
      0.21

    References:
      Cesista, Crowson, Simal, Biderman, `LoRA-Muon: Spectral Steepest Descent on
      the Low-Rank Manifold <https://arxiv.org/abs/2606.12921>`_, 2026
    """
    lrs = _check_args(learning_rates, rank, steps, seeds)
    for name, value in (
        ("dense_lr_factor", dense_lr_factor),
        ("adam_learning_rate", adam_learning_rate),
    ):
        if value is not None:
            _validation.check_scalar(name, value, low=0.0, low_inclusive=False, fn=_FN)
    if schedule is None:
        schedule = warmup_cooldown(steps)
    adam = None
    if adam_learning_rate is not None and _accepts(optimizer, "adam_learning_rate"):
        adam = float(adam_learning_rate)

    keys = [seed_keys(seed) for seed in seeds]
    first = init_fn(keys[0][0], rank)
    split = _split_module(first)
    if split is None:
        rebuild: Callable[[Any, Any], Any] = lambda p, rest: p  # noqa: E731
    else:
        rebuild = split[2]

    def parts(obj: Any) -> tuple[Any, Any]:
        s = _split_module(obj)
        return (obj, None) if s is None else (s[0], s[1])

    _check_proxy(parts(first)[0], rank)

    def loss_of(params: Any, rest: Any, batch: Any) -> jax.Array:
        return jnp.asarray(loss_fn(rebuild(params, rest), batch), jnp.float32)

    def make_tx(lr: jax.Array) -> optax.GradientTransformation:
        rate = lambda count: lr * schedule(count)  # noqa: E731
        if adam is None:
            return optimizer(rate)
        return optimizer(rate, adam_learning_rate=lambda count: adam * schedule(count))

    run = _compiled_run(loss_of, batch_fn, make_tx, steps, diverge_above)
    per_lr: dict[float, list[float]] = {lr: [] for lr in lrs}
    for i, (k_init, k_data) in enumerate(keys):
        params, rest = parts(first if i == 0 else init_fn(k_init, rank))
        for lr in lrs:
            out = run(params, rest, jnp.asarray(lr, jnp.float32), k_data, eval_batch)
            per_lr[lr].append(float(out))
    return _result(per_lr, lrs, rank, dense_lr_factor)


def _compiled_run(
    loss_of: Callable[[Any, Any, Any], jax.Array],
    batch_fn: Callable[[jax.Array], Any],
    make_tx: Callable[[jax.Array], optax.GradientTransformation],
    steps: int,
    diverge_above: float | None,
) -> Callable[..., jax.Array]:
    """One jitted run: ``(params, rest, lr, data key, eval batch) -> final loss`` (inf:
    diverged). Step ``t`` trains on ``batch_fn(fold_in(data key, t))``."""
    threshold = math.inf if diverge_above is None else float(diverge_above)
    tail = max(1, steps // 10)

    @jax.jit
    def run(params: Any, rest: Any, lr: jax.Array, key: jax.Array, batch_eval: Any) -> jax.Array:
        tx = make_tx(lr)
        state = tx.init(params)

        def body(carry, t):
            p, s, bad = carry
            batch = batch_fn(jax.random.fold_in(key, t))
            loss, grads = jax.value_and_grad(loss_of)(p, rest, batch)
            updates, s_new = tx.update(grads, s, p)
            p_new = optax.apply_updates(p, updates)
            bad = bad | ~jnp.isfinite(loss) | (loss > threshold)
            keep = lambda new, old: jax.tree.map(  # noqa: E731
                lambda x, y: jax.lax.select(bad, y, x), new, old
            )
            # Frozen at the last good point: NaN never reaches the final loss.
            return (keep(p_new, p), keep(s_new, s), bad), loss

        carry = (params, state, jnp.zeros((), bool))
        (params, _, bad), losses = jax.lax.scan(body, carry, jnp.arange(steps))
        if batch_eval is None:
            final = jnp.mean(losses[-tail:])
        else:
            final = loss_of(params, rest, batch_eval)
        bad = bad | ~jnp.isfinite(final) | (final > threshold)
        return jnp.where(bad, jnp.inf, final)

    return run


def _result(
    per_lr: dict[float, list[float]], lrs: Sequence[float], rank: int, dense_lr_factor: float
) -> ProxyResult:
    """The table, the grid's winner and the fitted rate for dense Muon."""
    table = tuple(
        ProxyRow(
            learning_rate=lr,
            loss=float(np.mean(v)) if all(math.isfinite(x) for x in v) else math.inf,
            losses=tuple(v),
            diverged=sum(not math.isfinite(x) for x in v),
        )
        for lr, v in per_lr.items()
    )
    finite = [row for row in table if math.isfinite(row.loss)]
    if not finite:
        raise ValueError(
            f"{_FN}: every learning rate diverged on the rank-{rank} proxy "
            f"({', '.join(f'{lr:g}' for lr in lrs)}); try smaller rates."
        )
    best = min(finite, key=lambda row: (row.loss, row.learning_rate)).learning_rate
    fitted = log_parabola_optimum([row.learning_rate for row in table], [row.loss for row in table])
    return ProxyResult(
        best_lr=best,
        table=table,
        rank=rank,
        at_edge=best in (lrs[0], lrs[-1]),
        dense_lr=float(dense_lr_factor) * fitted,
    )
