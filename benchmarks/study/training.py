"""Training one run of the study: data, optimizer, the compiled loop, the record.

The loop is a ``lax.scan`` over ``steps / chunks`` steps, compiled ahead of time
once per static configuration (method, rank, shape, budget); the learning rate,
the seed and the gauge are arguments, so a whole LR curve runs on one
compilation. Between chunks the host logs the training curve, the factor-norm
ratio and divergence: a loss that is NaN/inf or above ``Budget.diverge_above``
freezes the parameters at the last good step and ends the run at the end of
that chunk, recorded as diverged with its step.

:func:`lora_muon_jax_examples.proxy_lr_search` has a loop of the same kind, but the study
needs what it leaves out (curves per chunk, the divergence step, a frozen base for
fine-tuning, LiMuon's second gradient), so it keeps its own; the two share the
schedule and the seed's keys (``key(seed)`` for the init, ``fold_in(key(seed), 7)``
for the batches: :func:`lora_muon_jax_examples.proxy_lr.seed_keys`), so a seed is
the same run in both.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import io
import json
import math
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import registry
from benchmarks.study.configs import Budget, RunConfig
from benchmarks.study.params import (
    build_params,
    factor_log_ratios,
    finetune_start,
    is_block_matrix,
    merge_adapters,
)
from benchmarks.study.store import finite

CACHE_DIR = Path(tempfile.gettempdir()) / "lora_muon_jax_study"


class Data(NamedTuple):
    vocab: int
    train: jax.Array
    val_x: jax.Array  # (windows, T) fixed evaluation windows
    val_y: jax.Array
    ft_train: jax.Array  # upper-cased corpus for the fine-tuning task
    ft_val_x: jax.Array
    ft_val_y: jax.Array


@functools.lru_cache(maxsize=4)
def load_data(seq_len: int, eval_windows: int) -> Data:
    """TinyShakespeare ids, fixed validation windows, and the upper-cased task."""
    from lora_muon_jax_examples.tinyshakespeare import (
        CharTokenizer,
        load_tinyshakespeare,
        sample_batch,
        split_train_val,
    )

    text = load_tinyshakespeare()
    tok = CharTokenizer.from_text(text)
    train, val = split_train_val(tok.encode(text), 0.1)
    ft_train, ft_val = split_train_val(tok.encode(text.upper()), 0.1)
    rng = np.random.default_rng(2024)
    vx, vy = sample_batch(rng, val, eval_windows, seq_len)
    rng = np.random.default_rng(2024)
    fx, fy = sample_batch(rng, ft_val, eval_windows, seq_len)
    return Data(
        tok.vocab_size,
        jnp.asarray(train),
        jnp.asarray(vx),
        jnp.asarray(vy),
        jnp.asarray(ft_train),
        jnp.asarray(fx),
        jnp.asarray(fy),
    )


# ----------------------------------------------------------------------------- optimizer


def lr_shape(count: jax.Array, b: Budget, steps: int) -> jax.Array:
    """Linear warmup over ``b.warmup`` of the steps, flat, linear decay over the last
    ``b.cooldown`` (:func:`lora_muon_jax_examples.proxy_lr.warmup_cooldown`, the
    schedule ``proxy_lr_search`` defaults to)."""
    from lora_muon_jax_examples.proxy_lr import warmup_cooldown

    return warmup_cooldown(steps, b.warmup, b.cooldown)(count)


DECAY_METHODS = ("dense_muon", "lora_muon")  # the methods ``RunConfig.weight_decay`` supports


def matrix_weight_decay(
    weight_decay: float, learning_rate: Callable[[jax.Array], jax.Array]
) -> optax.GradientTransformation:
    """Decoupled decay of the block matrices: adds ``−λ η_t W`` to their update.

    Chained after dense Muon's ``−η_t msign(M)`` it gives ``W ← (1 − λη_t) W −
    η_t msign(M)``: Muon's decoupled weight decay, and what LoRA-Muon's split decay
    does to each adapter product. Other leaves pass through (their AdamW has none).
    """

    def init(params: Any) -> optax.ScaleByScheduleState:
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros((), jnp.int32))

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        eta = learning_rate(state.count)
        out = jax.tree_util.tree_map_with_path(
            lambda p, u, w: u - weight_decay * eta * w if is_block_matrix(p) else u,
            updates,
            params,
        )
        return out, optax.ScaleByScheduleState(count=optax.safe_increment(state.count))

    return optax.GradientTransformation(init, update)


def make_optimizer(
    cfg: RunConfig, params: Any, peak: Any, steps: int
) -> optax.GradientTransformation:
    """The run's optimizer (from :mod:`benchmarks.registry`) with peak rate ``peak``.

    ``peak`` may be traced: no recompiling per LR. Dense methods act on the block
    matrices only; every other leaf gets AdamW at the fixed ``Budget.adam_lr`` with
    the same schedule shape (AdamW-LoRA: one rate for every leaf). A
    ``weight_decay`` λ decays the matrices (not the AdamW leaves) by ``1 − λη_t`` per
    step: LoRA-Muon's split decay of each product, :func:`matrix_weight_decay` for
    dense Muon.
    """
    b = cfg.budget
    rate = lambda c: peak * lr_shape(c, b, steps)  # noqa: E731
    options: dict[str, Any] = {}
    if cfg.method == "lora_muon" and cfg.rebalance:
        from lora_muon_jax import GaugeRebalance

        options["rebalance"] = GaugeRebalance(every=cfg.rebalance)
    wd = cfg.weight_decay
    if wd is not None and cfg.method not in DECAY_METHODS:
        raise ValueError(f"weight_decay: only {DECAY_METHODS}; got {cfg.method!r}")
    if wd is not None and cfg.method == "lora_muon":
        options["weight_decay"] = wd
    tx = registry.make(
        cfg.method,
        rate,
        params,
        adam_learning_rate=lambda c: b.adam_lr * lr_shape(c, b, steps),
        is_matrix=is_block_matrix,
        **options,
    )
    if wd is not None and cfg.method == "dense_muon":
        tx = optax.chain(tx, matrix_weight_decay(wd, rate))
    return tx


# ----------------------------------------------------------------------------- the loop


class Trainer(NamedTuple):
    init: Callable[..., Any]  # jitted
    chunk: Callable[..., Any]  # compiled ahead of time on first use (see `train`)
    evaluate: Callable[..., Any]


_TRAINERS: dict[tuple, Trainer] = {}
_COMPILED: dict[tuple, Trainer] = {}


def _static_key(cfg: RunConfig, steps: int) -> tuple:
    """What the compiled functions depend on: not the LR, the seed, the gauge, the init.

    (The weight decay is a compile-time constant of the optimizer, so it is in.)
    """
    return (
        cfg.method,
        cfg.rank,
        cfg.width,
        cfg.depth,
        cfg.task,
        cfg.rebalance,
        cfg.weight_decay,
        dataclasses.astuple(cfg.budget),
        steps,
    )


def _tree_select(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda x, y: jax.lax.select(ok, x, y), new, old)


def _step_fn(
    cfg: RunConfig,
    model_loss: Callable,
    tx: optax.GradientTransformation,
    frozen: Any,
    data: Any,
    key: jax.Array,
) -> Callable:
    """One scan step: loss, gradient (and LiMuon's previous-point gradient), update."""
    from lora_muon_jax_examples.tinyshakespeare import sample_batch

    b = cfg.budget
    storm = "prev_grads" in registry.get(cfg.method).extra_args

    def body(carry, t):
        p, s, bad = carry
        batch = sample_batch(jax.random.fold_in(key, t), data, b.batch, b.seq_len)
        loss, g = jax.value_and_grad(model_loss)(p, frozen, batch)
        if storm:
            # STORM: the same batch's gradient at the previous point (kept in the
            # state's last params; the first step uses g itself).
            g_prev = jax.grad(model_loss)(s[1], frozen, batch)
            u, s_inner = tx.update(g, s[0], p, prev_grads=g_prev)
            s_new = (s_inner, p)
        else:
            u, s_new = tx.update(g, s, p)
        p_new = optax.apply_updates(p, u)
        is_bad = ~jnp.isfinite(loss) | (loss > b.diverge_above)
        bad = jnp.where((bad < 0) & is_bad, t, bad)
        ok = bad < 0
        # Freeze at the last good point: no NaN spreads, later steps are wasted only
        # until the end of the chunk.
        return (_tree_select(ok, p_new, p), _tree_select(ok, s_new, s), bad), loss

    return body


def get_trainer(cfg: RunConfig, graphdef: Any, steps: int) -> Trainer:
    """Jitted init/chunk/eval functions for this static configuration (cached)."""
    key = _static_key(cfg, steps)
    if key in _TRAINERS:
        return _TRAINERS[key]
    from flax import nnx

    from lora_muon_jax_examples.char_lm import loss_fn

    finetune = cfg.task == "finetune"
    chunk_len = steps // cfg.budget.chunks
    storm = "prev_grads" in registry.get(cfg.method).extra_args

    def model_loss(p: Any, frozen: Any, batch: Any) -> jax.Array:
        full = merge_adapters(frozen, p) if finetune else p
        return loss_fn(nnx.merge(graphdef, nnx.State(full)), batch)

    @jax.jit
    def init(p: Any, peak: jax.Array) -> Any:
        state = make_optimizer(cfg, p, peak, steps).init(p)
        return (state, p) if storm else state

    @jax.jit
    def chunk(p, opt_state, frozen, data, key, t0, peak, bad):
        tx = make_optimizer(cfg, p, peak, steps)
        body = _step_fn(cfg, model_loss, tx, frozen, data, key)
        (p, opt_state, bad), losses = jax.lax.scan(
            body, (p, opt_state, bad), t0 + jnp.arange(chunk_len)
        )
        return p, opt_state, bad, losses

    @jax.jit
    def evaluate(p, frozen, xs, ys):
        per = jax.lax.map(
            lambda xy: model_loss(p, frozen, xy),
            (xs.reshape(-1, 32, xs.shape[-1]), ys.reshape(-1, 32, ys.shape[-1])),
        )
        return per.mean()

    trainer = Trainer(init, chunk, evaluate)
    _TRAINERS[key] = trainer
    return trainer


def _compiled(
    cfg: RunConfig, graphdef: Any, steps: int, args: tuple, eval_args: tuple
) -> tuple[Trainer, float]:
    """The trainer with its chunk and eval compiled ahead of time, and the compile time.

    Kept for the next runs of the same static configuration (other LRs, seeds,
    gauges, inits), so a curve compiles once.
    """
    skey = _static_key(cfg, steps)
    trainer = get_trainer(cfg, graphdef, steps)
    if skey in _COMPILED:
        return _COMPILED[skey], 0.0
    t = time.perf_counter()
    _COMPILED[skey] = Trainer(
        trainer.init,
        trainer.chunk.lower(*args).compile(),
        trainer.evaluate.lower(*eval_args).compile(),
    )
    return _COMPILED[skey], time.perf_counter() - t


class TrainOutput(NamedTuple):
    record: dict[str, Any]
    params: Any


def _ratio_summary(ratios0: np.ndarray, final: np.ndarray, curve: list[float]) -> dict[str, Any]:
    return {
        "log_norm_ratio": {
            "init_mean_abs": finite(np.mean(np.abs(ratios0)), 4),
            "mean": finite(np.mean(final), 4),
            "mean_abs": finite(np.mean(np.abs(final)), 4),
            "max_abs": finite(np.max(np.abs(final)), 4),
        },
        "ratio_curve": [finite(x, 4) for x in curve],
    }


def _record(
    cfg: RunConfig,
    losses: np.ndarray,
    val: float | None,
    diverged: int | None,
    steps: int,
    wall: float,
    compile_s: float,
) -> dict[str, Any]:
    tail = losses[-max(1, steps // 10) :]
    curve = [
        finite(np.mean(c), 4) for c in np.array_split(losses, min(cfg.budget.chunks, len(losses)))
    ]
    rec: dict[str, Any] = {
        "config": cfg.as_dict(),
        "status": "diverged" if diverged is not None else "ok",
        "val_loss": None if val is None else finite(val),
        "train_loss": None if diverged is not None else finite(np.mean(tail)),
        "diverged_step": diverged,
        "steps_run": int(losses.size),
        "curve": curve,
        "wall_s": round(wall, 2),
        "compile_s": round(compile_s, 2),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if val is not None and not math.isfinite(val):
        rec["status"], rec["val_loss"] = "diverged", None
        rec["diverged_step"] = steps
    return rec


def train(
    cfg: RunConfig,
    data: Data,
    *,
    frozen: Any = None,
    params: Any = None,
    graphdef: Any = None,
    steps: int | None = None,
) -> TrainOutput:
    """Trains one configuration; returns its result record and final params."""
    b = cfg.budget
    steps = b.steps if steps is None else steps
    if steps % b.chunks:
        raise ValueError(f"steps={steps} must be a multiple of chunks={b.chunks}")
    if graphdef is None:
        graphdef, params = build_params(cfg, data.vocab)
    finetune = cfg.task == "finetune"
    train_ids = data.ft_train if finetune else data.train
    val_x, val_y = (data.ft_val_x, data.ft_val_y) if finetune else (data.val_x, data.val_y)
    frozen = {} if frozen is None else frozen

    peak = jnp.asarray(cfg.lr, jnp.float32)
    with contextlib.redirect_stdout(io.StringIO()):  # psgdax prints on init
        opt_state = get_trainer(cfg, graphdef, steps).init(params, peak)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 7)
    chunk_len = steps // b.chunks
    bad = jnp.asarray(-1, jnp.int32)
    trainer, compile_s = _compiled(
        cfg,
        graphdef,
        steps,
        (params, opt_state, frozen, train_ids, key, jnp.int32(0), peak, bad),
        (params, frozen, val_x, val_y),
    )

    t = time.perf_counter()
    ratios0 = factor_log_ratios(params) if (cfg.lora or finetune) else None
    losses, ratio_curve = [], []
    diverged = None
    for i in range(b.chunks):
        params, opt_state, bad, chunk_losses = trainer.chunk(
            params, opt_state, frozen, train_ids, key, jnp.int32(i * chunk_len), peak, bad
        )
        losses.append(np.asarray(chunk_losses))
        if ratios0 is not None:
            ratio_curve.append(float(np.mean(np.abs(factor_log_ratios(params)))))
        if int(bad) >= 0:
            diverged = int(bad)
            break
    val = None if diverged is not None else float(trainer.evaluate(params, frozen, val_x, val_y))
    rec = _record(
        cfg, np.concatenate(losses), val, diverged, steps, time.perf_counter() - t, compile_s
    )
    if ratios0 is not None:
        rec.update(_ratio_summary(ratios0, factor_log_ratios(params), ratio_curve))
    return TrainOutput(rec, params)


# ----------------------------------------------------------------------------- fine-tuning base

_BASES: dict[str, Any] = {}


def base_config(cfg: RunConfig) -> RunConfig:
    """The dense-Muon pretraining run whose params a fine-tuning run starts from."""
    b = dataclasses.replace(cfg.budget, steps=cfg.base_steps)
    return RunConfig(
        method="dense_muon",
        lr=cfg.base_lr,
        seed=0,
        rank=None,
        width=cfg.width,
        depth=cfg.depth,
        budget=b,
    )


def _load_or_train_base(
    bcfg: RunConfig, data: Data, params: Any, log: Callable[[str], None]
) -> tuple[Any, dict]:
    """The base's params and info from the /tmp checkpoint, or trained and saved there."""
    path = CACHE_DIR / f"base_{bcfg.key()}.npz"
    flat, treedef = jax.tree.flatten(params)
    if path.exists():
        with np.load(path) as z:
            params = jax.tree.unflatten(
                treedef, [jnp.asarray(z[f"a{i}"]) for i in range(len(flat))]
            )
        return params, json.loads(path.with_suffix(".json").read_text())
    log(f"pretraining the fine-tuning base ({bcfg.budget.steps} dense-Muon steps)")
    out = train(bcfg, data)
    if out.record["status"] != "ok":
        raise RuntimeError(f"the fine-tuning base diverged: {out.record}")
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    np.savez(path, **{f"a{i}": np.asarray(x) for i, x in enumerate(jax.tree.leaves(out.params))})
    info = {k: out.record[k] for k in ("val_loss", "train_loss", "wall_s", "config")}
    path.with_suffix(".json").write_text(json.dumps(info))
    return out.params, info


def pretrained_base(cfg: RunConfig, data: Data, log: Callable[[str], None]) -> tuple[Any, dict]:
    """``(graphdef, params)`` of the fine-tuning base: memory, /tmp checkpoint or trained."""
    bcfg = base_config(cfg)
    key = bcfg.key()
    graphdef, params = build_params(bcfg, data.vocab)
    if key in _BASES:
        return graphdef, _BASES[key][0]
    params, info = _load_or_train_base(bcfg, data, params, log)
    if "task_val_loss" not in info:
        # The shifted task's loss before fine-tuning: what the adapters start from.
        ev = get_trainer(bcfg, graphdef, bcfg.budget.steps).evaluate
        info["task_val_loss"] = finite(ev(params, {}, data.ft_val_x, data.ft_val_y))
    _BASES[key] = (params, info)
    return graphdef, params


def run_config(cfg: RunConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Trains ``cfg`` (pretraining or fine-tuning) and returns its record."""
    data = load_data(cfg.budget.seq_len, cfg.budget.eval_windows)
    if cfg.task == "pretrain":
        return train(cfg, data).record
    graphdef, base = pretrained_base(cfg, data, log)
    frozen, adapters = finetune_start(cfg, base)
    rec = train(cfg, data, frozen=frozen, params=adapters, graphdef=graphdef).record
    info = _BASES[base_config(cfg).key()][1]
    rec["base_val_loss"] = info["val_loss"]
    rec["base_task_val_loss"] = info["task_val_loss"]
    return rec
