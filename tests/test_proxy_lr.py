"""proxy_lr_search: picks the rate that a hand-written LoRA-Muon loop finds best, runs
the study's protocol by default, and reproduces the study's own runs."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lora_muon_jax import lora_muon
from lora_muon_jax_examples.proxy_lr import (
    STUDY_ADAM_LR,
    ProxyResult,
    ProxyRow,
    proxy_lr_search,
    seed_keys,
    warmup_cooldown,
)

M, N = 8, 6


def _target(rank: int = 2) -> jax.Array:
    k1, k2 = jax.random.split(jax.random.key(42))
    return jax.random.normal(k1, (M, rank)) @ jax.random.normal(k2, (rank, N)) / 3


TARGET = _target()


def init_fn(key: jax.Array, rank: int) -> dict:
    ka, kb = jax.random.split(key)
    return {
        "w": {
            "lora_a": jax.random.normal(ka, (M, rank)) / 3,
            "lora_b": jax.random.normal(kb, (rank, N)) / 3,
        },
        "bias": jnp.zeros(N),
    }


def loss_fn(params: dict, x: jax.Array) -> jax.Array:
    w = params["w"]["lora_a"] @ params["w"]["lora_b"]
    return jnp.mean((x @ w + params["bias"] - x @ TARGET) ** 2)


def batch_fn(key: jax.Array) -> jax.Array:
    return jax.random.normal(key, (16, M))


def _tx(lr, sched):
    # The bias (in no pair) on AdamW at the fixed study rate, with the same schedule.
    return lora_muon(lambda c: lr * sched(c), adam_learning_rate=lambda c: STUDY_ADAM_LR * sched(c))


@functools.partial(jax.jit, static_argnums=4)
def _step(params, state, k, lr, sched):
    loss, g = jax.value_and_grad(loss_fn)(params, batch_fn(k))
    u, state = _tx(lr, sched).update(g, state, params)
    return optax.apply_updates(params, u), state, loss


def _manual(lr: float, seed: int, steps: int, schedule) -> float:
    """The same run written out: the study's keys, LoRA-Muon, mean loss of the last tenth."""
    k_init, k_data = seed_keys(seed)
    assert np.array_equal(jax.random.key_data(k_init), jax.random.key_data(jax.random.key(seed)))
    params = init_fn(k_init, 2)
    state = _tx(0.0, schedule).init(params)
    losses = []
    for t in range(steps):
        params, state, loss = _step(params, state, jax.random.fold_in(k_data, t), lr, schedule)
        losses.append(float(loss))
    return float(np.mean(losses[-max(1, steps // 10) :]))


def test_matches_a_hand_written_loop_and_picks_its_argmin():
    lrs = [0.003, 0.03, 0.3]
    steps = 30
    sched = lambda c: jnp.minimum(1.0, (c + 1.0) / 5.0)  # noqa: E731
    res = proxy_lr_search(
        init_fn, loss_fn, batch_fn, lrs, steps=steps, seeds=(0, 3), schedule=sched
    )
    assert isinstance(res, ProxyResult) and res.rank == 2
    assert [row.learning_rate for row in res.table] == sorted(lrs)
    manual = {lr: [_manual(lr, s, steps, sched) for s in (0, 3)] for lr in lrs}
    for row in res.table:
        assert isinstance(row, ProxyRow) and row.diverged == 0
        np.testing.assert_allclose(row.losses, manual[row.learning_rate], rtol=2e-4, atol=1e-6)
        np.testing.assert_allclose(row.loss, np.mean(manual[row.learning_rate]), rtol=2e-4)
    expected = min(lrs, key=lambda lr: np.mean(manual[lr]))
    assert res.best_lr == expected
    assert res.at_edge == (expected in (min(lrs), max(lrs)))


def test_one_compilation_for_all_rates_and_seeds():
    traces = []

    def counting_loss(params, x):
        traces.append(1)
        return loss_fn(params, x)

    proxy_lr_search(
        init_fn,
        counting_loss,
        batch_fn,
        [0.01, 0.1, 1.0],
        steps=5,
        seeds=(0, 1),
        optimizer=optax.sgd,
    )
    # One trace of the training step serves every rate and seed (the final loss of a
    # run without eval_batch is its training loss).
    assert len(traces) == 1


def test_diverged_rates_are_never_chosen_and_eval_batch_is_used():
    eval_x = jax.random.normal(jax.random.key(9), (64, M))
    res = proxy_lr_search(
        init_fn,
        loss_fn,
        batch_fn,
        [0.05, 1e6],
        steps=10,
        seeds=(0, 1),
        eval_batch=eval_x,
        diverge_above=1e3,
    )
    big = res.table[-1]
    assert big.learning_rate == 1e6 and big.diverged == 2 and math.isinf(big.loss)
    assert res.best_lr == 0.05 and res.at_edge
    assert all(math.isfinite(x) for x in res.table[0].losses)


def test_all_diverged_raises():
    with pytest.raises(ValueError, match="every learning rate diverged"):
        proxy_lr_search(
            init_fn, loss_fn, batch_fn, [1e6], steps=5, diverge_above=1e3, optimizer=optax.sgd
        )


def test_nnx_module_proxy():
    from flax import nnx

    from lora_muon_jax_examples.char_lm import LowRankLinear

    def make(key, rank):
        return LowRankLinear(M, N, rank, rngs=nnx.Rngs(params=key))

    def module_loss(layer, x):
        return jnp.mean((layer(x) - x @ TARGET) ** 2)

    eval_x = jax.random.normal(jax.random.key(5), (256, M))
    res = proxy_lr_search(
        make,
        module_loss,
        batch_fn,
        [0.01, 0.1],
        steps=20,
        seeds=(0, 1),
        schedule=lambda c: 1.0,
        eval_batch=eval_x,
    )
    # The same seeds' modules before training (seed_keys: the init key of each seed).
    start = np.mean([float(module_loss(make(seed_keys(s)[0], 2), eval_x)) for s in (0, 1)])
    # Both rates trained the module's LoRAParam factors; the larger one much further.
    assert all(r.loss < 0.9 * start for r in res.table), (start, res.table)
    assert res.best_lr == 0.1 and res.table[1].loss < 0.4 * start


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(learning_rates=[]), "learning_rates"),
        (dict(learning_rates=[0.1, -1.0]), "learning_rates"),
        (dict(learning_rates=[0.1, 0.1]), "duplicates"),
        (dict(rank=0), "rank"),
        (dict(steps=2.5), "steps"),
        (dict(seeds=()), "seeds"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = dict(learning_rates=[0.1])
    args.update(kwargs)
    lrs = args.pop("learning_rates")
    with pytest.raises(ValueError, match=match):
        proxy_lr_search(init_fn, loss_fn, batch_fn, lrs, **args)


def test_proxy_without_pairs_or_with_wrong_rank():
    with pytest.raises(ValueError, match="no LoRA pair"):
        proxy_lr_search(
            lambda k, r: {"w": jnp.ones((M, N))}, lambda p, x: jnp.sum(p["w"]), batch_fn, [0.1]
        )
    with pytest.raises(ValueError, match="another rank"):
        proxy_lr_search(lambda k, r: init_fn(k, 3), loss_fn, batch_fn, [0.1], rank=2)


def test_log_parabola_optimum_is_the_vertex_in_log_rate():
    from lora_muon_jax_examples.proxy_lr import log_parabola_optimum

    # L = 3 (log2 η − log2 0.04)² + 1 on a ×2 grid: the vertex is exactly 0.04, off-grid.
    rates = [0.0125 * 2.0**k for k in range(-2, 4)]
    losses = [3 * math.log2(r / 0.04) ** 2 + 1 for r in rates]
    assert log_parabola_optimum(rates[::-1], losses[::-1]) == pytest.approx(0.04, rel=1e-9)
    # Uneven spacing: the three-point parabola through (x, L) is still exact.
    rates = [0.01, 0.03, 0.05, 0.2]
    losses = [(math.log2(r) - math.log2(0.042)) ** 2 for r in rates]
    assert log_parabola_optimum(rates, losses) == pytest.approx(0.042, rel=1e-9)
    # Best on an edge, a diverged neighbour, a concave triple: the best grid rate.
    assert log_parabola_optimum([0.1, 0.2, 0.4], [3.0, 2.0, 1.0]) == 0.4
    assert log_parabola_optimum([0.1, 0.2, 0.4], [3.0, 1.0, math.inf]) == 0.2
    with pytest.raises(ValueError, match="no finite loss"):
        log_parabola_optimum([0.1], [math.inf])
    with pytest.raises(ValueError, match="2 rates but 1 losses"):
        log_parabola_optimum([0.1, 0.2], [1.0])


def test_dense_lr_is_the_fitted_optimum_times_the_factor():
    from lora_muon_jax_examples.proxy_lr import log_parabola_optimum

    lrs = [0.01, 0.03, 0.1, 0.3, 1.0]
    res = proxy_lr_search(init_fn, loss_fn, batch_fn, lrs, steps=20, seeds=(0,))
    fitted = log_parabola_optimum(lrs, [row.loss for row in res.table])
    assert res.dense_lr == pytest.approx(fitted)
    i = lrs.index(res.best_lr)
    if 0 < i < len(lrs) - 1:  # between the best rate's neighbours
        assert lrs[i - 1] <= res.dense_lr <= lrs[i + 1]
    half = proxy_lr_search(
        init_fn, loss_fn, batch_fn, lrs, steps=20, seeds=(0,), dense_lr_factor=0.5
    )
    assert half.dense_lr == pytest.approx(0.5 * res.dense_lr) and half.best_lr == res.best_lr
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="dense_lr_factor"):
            proxy_lr_search(init_fn, loss_fn, batch_fn, lrs, steps=2, dense_lr_factor=bad)


def test_default_schedule_and_a_fixed_adam_rate_for_leaves_in_no_pair():
    lrs, steps = [0.03, 0.3], 20
    res = proxy_lr_search(init_fn, loss_fn, batch_fn, lrs, steps=steps, seeds=(1,))
    want = [_manual(lr, 1, steps, warmup_cooldown(steps)) for lr in lrs]
    np.testing.assert_allclose([row.loss for row in res.table], want, rtol=2e-4, atol=1e-6)
    # adam_learning_rate=None: the bias follows the swept rate instead, another run.
    swept = proxy_lr_search(
        init_fn, loss_fn, batch_fn, lrs, steps=steps, seeds=(1,), adam_learning_rate=None
    )
    assert not np.allclose([r.loss for r in swept.table], [r.loss for r in res.table])
    # An optimizer without the keyword (optax.sgd) just gets the swept rate.
    proxy_lr_search(init_fn, loss_fn, batch_fn, lrs, steps=2, seeds=(0,), optimizer=optax.sgd)
    for bad in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="adam_learning_rate"):
            proxy_lr_search(init_fn, loss_fn, batch_fn, lrs, steps=2, adam_learning_rate=bad)


def test_defaults_follow_the_study():
    """The defaults are the study's long-budget protocol, and its verdict stands."""
    import inspect

    from benchmarks.study import configs, report_proxy, report_rule, training, transfer
    from benchmarks.study.aggregate import Results
    from benchmarks.study.lr_transfer import DEFAULT_RESULTS
    from benchmarks.study.report import grid_of
    from benchmarks.study.store import load_results

    defaults = {k: p.default for k, p in inspect.signature(proxy_lr_search).parameters.items()}
    long = configs.LongGrid()
    assert defaults["steps"] == long.budget.steps
    assert tuple(defaults["seeds"]) == long.seeds
    assert defaults["adam_learning_rate"] == long.budget.adam_lr == configs.Budget().adam_lr
    assert defaults["rank"] == 2 and defaults["dense_lr_factor"] == 1.0
    # schedule=None is the study's schedule shape.
    b, steps = long.budget, long.budget.steps
    ts = jnp.arange(steps)
    np.testing.assert_array_equal(warmup_cooldown(steps)(ts), training.lr_shape(ts, b, steps))
    # dense_lr_factor = 1: the long budget's fitted dense/LoRA ratio is within ×√2 of 1,
    # and the powered proxy test (section viii), once run, does not refute it.
    data = load_results(DEFAULT_RESULTS)
    grid, res = grid_of(data), Results(data)
    long_pairs = [p for p in report_rule.pairs(res, grid) if p.budget == "long"]
    ratio = transfer.fit_constant(long_pairs)
    assert 2**-0.5 <= ratio / defaults["dense_lr_factor"] <= 2**0.5, ratio
    test = report_proxy.tests(res, grid).get(("lora_muon", 2))
    assert test is None or test.verdict != "refuted", test


def _have_corpus() -> bool:
    from lora_muon_jax_examples import tinyshakespeare

    try:
        tinyshakespeare.load_tinyshakespeare(download=False)
    except FileNotFoundError:
        return False
    return True


@pytest.mark.skipif(not _have_corpus(), reason="TinyShakespeare not on disk")
def test_tool_reproduces_the_study_runs_on_a_small_case():
    """Same model, data, seeds and protocol: the tool's table is the study's runs, and its
    ``dense_lr`` the study's fitted optimum of that curve, so the study's verdict on that
    optimum (sections vii and viii) is a verdict on the tool's answer."""
    from flax import nnx

    from benchmarks.study import configs, training, transfer
    from benchmarks.study.aggregate import Curve
    from lora_muon_jax_examples import char_lm, tinyshakespeare

    b = configs.QUICK.budget  # 20 steps of 8 × 32, the study's schedule and AdamW rate
    cfg = configs.RunConfig("lora_muon", 0.0, 0, 2, width=32, depth=1, budget=b)
    rates, seeds = (0.025, 0.1, 0.4), (0, 1)
    data = training.load_data(b.seq_len, b.eval_windows)
    runs = {
        (lr, s): training.run_config(dataclasses.replace(cfg, lr=lr, seed=s))
        for lr in rates
        for s in seeds
    }
    graphdef, _ = training.build_params(cfg, data.vocab)

    def init(key, rank):
        model = char_lm.CharTransformer(
            data.vocab, width=32, depth=1, heads=b.heads, rank=rank, seq_len=b.seq_len,
            mlp_ratio=b.mlp_ratio, rngs=nnx.Rngs(key),
        )  # fmt: skip
        return nnx.to_pure_dict(nnx.split(model)[1])

    res = proxy_lr_search(
        init,
        lambda p, batch: char_lm.loss_fn(nnx.merge(graphdef, nnx.State(p)), batch),
        lambda k: tinyshakespeare.sample_batch(k, data.train, b.batch, b.seq_len),
        rates,
        steps=b.steps,
        seeds=seeds,
        eval_batch=(data.val_x, data.val_y),
        diverge_above=b.diverge_above,
    )
    for row in res.table:
        study = [runs[(row.learning_rate, s)]["val_loss"] for s in seeds]
        np.testing.assert_allclose(row.losses, study, rtol=1e-4)
    curve = Curve(cfg, runs)
    assert res.best_lr == curve.best().lr
    assert res.dense_lr == pytest.approx(transfer.fitted_optimum(curve), rel=1e-3)
