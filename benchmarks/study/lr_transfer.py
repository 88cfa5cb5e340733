"""TinyShakespeare learning-rate transfer study: dense Muon, LoRA-Muon and peers.

    python -m benchmarks.study.lr_transfer                 # the full sweep (hours; resumable)
    python -m benchmarks.study.lr_transfer --quick         # a tiny slice, < 3 min
    python -m benchmarks.study.lr_transfer --only lr --max-runs 20
    python -m benchmarks.study.lr_transfer --list          # what is planned, what is done

Char-level transformers (:class:`lora_muon_jax.models.CharTransformer`) are trained
for a fixed budget at every learning rate of a log grid, per method and model shape,
and the final losses are cached, one run per configuration, in a JSON file
(``benchmarks/study/results/lr_transfer.json``). Every run is keyed by a hash of its
whole configuration (with :data:`STUDY_VERSION`) and the file is rewritten atomically
after each run, so an interrupted sweep resumes where it stopped and a changed
configuration never reuses a stale result. A run whose loss becomes NaN/inf or
exceeds ``Budget.diverge_above`` is stopped and recorded as diverged, with the step.

Methods (``RunConfig.method``); every optimizer sends the leaves that are not adapter
or block matrices (embeddings, positions, head, norm scales) to AdamW with the fixed
rate ``Budget.adam_lr`` (same warmup/cooldown shape), so only the matrix rule and its
learning rate vary:

* ``lora_muon``: :func:`lora_muon_jax.lora_muon` on native low-rank models (both
  factors random, balanced);
* ``spectron``: :func:`lora_muon_jax.peers.spectron` on the same models;
* ``adamw_lora``: :func:`optax.adamw` on every leaf of the low-rank model, one rate;
* ``lora_rite``: :func:`lora_muon_jax.peers.lora_rite` (fine-tuning part);
* ``dense_muon``: the dense twin (``rank=None``) with
  :func:`optax.contrib.scale_by_muon` on the block matrices and no shape factor, so
  ``‖ΔW‖₂ ≈ η`` as LoRA-Muon's product step (same β = 0.95, no Nesterov);
* ``dense_muon_optax``: stock :func:`optax.contrib.muon` (Nesterov, the
  ``sqrt(max(1, fan_out/fan_in))`` width factor), labelled so that only block
  matrices get Muon (its default labels every 2-D leaf, embeddings and head too);
* ``psgd_kron``: PSGD Kron (``psgdax.kron``) on the block matrices of the dense twin.

Fine-tuning (``task="finetune"``): a dense base is pretrained with dense Muon (kept
in memory and in a temporary checkpoint, never committed), frozen, and adapters on
every block matrix are trained on an upper-cased copy of the corpus (a task shift
the frozen embeddings and head must be steered to), from Flax's zero init
(``a`` He-uniform, ``b = 0``) or :func:`lora_muon_jax.nnx.balance_lora_init`, with or
without gauge rebalancing.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import hashlib
import io
import json
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

STUDY_VERSION = 1
REPO = Path(__file__).resolve().parents[2]
DEFAULT_RESULTS = REPO / "benchmarks" / "study" / "results" / "lr_transfer.json"
CACHE_DIR = Path(tempfile.gettempdir()) / "lora_muon_jax_study"

LORA_METHODS = ("lora_muon", "spectron", "adamw_lora", "lora_rite", "riemannion")
DENSE_METHODS = ("dense_muon", "dense_muon_optax", "psgd_kron", "lora_pre_muon", "limuon")
PEER_RANK = 8  # rank of LoRA-Pre's momentum factors and of LiMuon's compressed momentum
METHODS = LORA_METHODS + DENSE_METHODS
SECTIONS = ("lr", "rank", "gauge", "shape", "baselines", "finetune")
SECTION_TITLES = {
    "pilot": "pilot: the fixed AdamW rate of the non-matrix leaves",
    "lr": "(i) LR sweep: dense Muon vs rank-2 and rank-32 LoRA-Muon",
    "rank": "(ii) rank transfer of LoRA-Muon",
    "gauge": "(iii) gauge rescaling: LoRA-Muon vs Spectron",
    "shape": "(iv) width and depth transfer",
    "baselines": "(v) baselines and peers: AdamW-LoRA, Riemannion, stock optax Muon, "
                 "PSGD-Kron, LoRA-Pre, LiMuon",
    "finetune": "(vi) zero-init fine-tuning on a frozen dense base",
}


def lr_grid(lo: int, hi: int) -> tuple[float, ...]:
    """``0.0125 · 2^k`` for ``k = lo..hi``: the study's common log grid."""
    return tuple(0.0125 * 2.0**k for k in range(lo, hi + 1))


# ----------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class Budget:
    """Everything a run's cost and protocol depend on besides the model and optimizer."""

    steps: int = 200
    batch: int = 16
    seq_len: int = 64
    heads: int = 4
    mlp_ratio: int = 4
    adam_lr: float = 1e-2  # fixed for every method; the "pilot" section checks it
    warmup: float = 0.05  # share of steps with a linear warmup
    cooldown: float = 0.2  # share of steps with a linear decay to 0 at the end
    chunks: int = 10  # outer chunks: curve points and divergence checks
    eval_windows: int = 256
    diverge_above: float = 7.0  # log(65) + ~3: far above the uniform prediction


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One training run. ``key()`` hashes all of it (``None`` fields left out)."""

    method: str
    lr: float
    seed: int
    rank: int | None
    width: int = 128
    depth: int = 2
    gauge: float = 1.0
    task: str = "pretrain"
    init: str = "random"  # pretrain: "random"; finetune: "zero" | "balanced"
    rebalance: int = 0  # lora_muon gauge rebalancing every N steps; 0: off
    budget: Budget = Budget()
    base_steps: int | None = None  # finetune: steps of the dense base
    base_lr: float | None = None  # finetune: dense Muon rate of the base

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if v is not None}

    def key(self) -> str:
        blob = json.dumps({"v": STUDY_VERSION, **self.as_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def curve(self) -> tuple:
        """Identity of the LR curve this run belongs to (everything but lr and seed)."""
        d = self.as_dict()
        d.pop("lr")
        d.pop("seed")
        return tuple(sorted((k, json.dumps(v, sort_keys=True)) for k, v in d.items()))

    @property
    def lora(self) -> bool:
        return self.method in LORA_METHODS

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        d = {"rank": None, **d}
        d["budget"] = Budget(**d.get("budget", {}))
        return RunConfig(**d)


@dataclasses.dataclass(frozen=True)
class Grid:
    """The sweep's axes; :data:`FULL` and :data:`QUICK` are the two presets."""

    seeds: tuple[int, ...] = (0, 1, 2)
    width: int = 128
    depth: int = 2
    headline_ranks: tuple[int, ...] = (2, 32)
    ranks: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    widths: tuple[int, ...] = (64, 128)
    depths: tuple[int, ...] = (1, 2, 4)
    gauges: tuple[float, ...] = (1.0, 3.0, 9.0, 27.0)
    gauge_rank: int = 8
    shape_rank: int = 8
    baseline_ranks: tuple[int, ...] = (2, 32)
    ft_ranks: tuple[int, ...] = (2, 32)
    spectral_lrs: tuple[float, ...] = lr_grid(-2, 5)  # 0.003125 ... 0.4
    shape_lrs: tuple[float, ...] = lr_grid(-1, 4)  # 0.00625 ... 0.2
    gauge_muon_lrs: tuple[float, ...] = lr_grid(-1, 2)  # 0.00625 ... 0.05
    adam_lrs: tuple[float, ...] = lr_grid(-6, 1)  # 0.000195 ... 0.025
    ft_spectral_lrs: tuple[float, ...] = lr_grid(-3, 3)  # 0.0016 ... 0.1
    ft_adam_lrs: tuple[float, ...] = lr_grid(-7, -1)  # 0.0001 ... 0.00625
    pilot_adam_lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2, 3e-2)
    ft_base_lr: float = 0.0125  # dense Muon's best rate in section (i)
    ft_base_steps_factor: int = 2
    ft_variants: tuple[tuple[str, str, int], ...] = (  # (method, init, rebalance every)
        ("lora_muon", "zero", 0), ("lora_muon", "zero", 10), ("lora_muon", "balanced", 0),
        ("adamw_lora", "zero", 0), ("adamw_lora", "balanced", 0),
        ("lora_rite", "zero", 0), ("lora_rite", "balanced", 0),
    )
    extend: int = 3  # at most this many extra LRs beyond each edge of a grid
    budget: Budget = Budget()


def grid_from_dict(d: dict[str, Any]) -> Grid:
    """The inverse of ``dataclasses.asdict`` for a :class:`Grid` read back from JSON."""

    def tup(v: Any) -> Any:
        return tuple(tup(x) for x in v) if isinstance(v, list) else v

    budget = Budget(**d.get("budget", {}))
    return Grid(**{k: tup(v) for k, v in d.items() if k != "budget"}, budget=budget)


FULL = Grid()
QUICK = Grid(
    seeds=(0,),
    width=32,
    depth=1,
    headline_ranks=(2,),
    ranks=(2, 4),
    widths=(32,),
    depths=(1, 2),
    gauges=(1.0, 9.0),
    gauge_rank=2,
    shape_rank=2,
    baseline_ranks=(2,),
    ft_ranks=(2,),
    spectral_lrs=(0.05, 0.2),
    shape_lrs=(0.05,),
    gauge_muon_lrs=(0.05,),
    adam_lrs=(3e-3,),
    ft_spectral_lrs=(0.05,),
    ft_adam_lrs=(3e-3,),
    pilot_adam_lrs=(3e-3,),
    ft_base_steps_factor=1,
    ft_variants=(("lora_muon", "zero", 10), ("lora_muon", "balanced", 0), ("lora_rite", "zero", 0)),
    extend=0,
    budget=Budget(steps=20, batch=8, seq_len=32, chunks=2, eval_windows=32),
)


# ----------------------------------------------------------------------------- planning


def index_results(results: dict[str, Any]) -> dict[tuple, dict[float, list[float]]]:
    """``{curve: {lr: [final val loss per seed run]}}``; a diverged run counts as inf."""
    index: dict[tuple, dict[float, list[float]]] = {}
    for rec in results.values():
        if rec.get("status") == "error":
            continue
        cfg = RunConfig.from_dict(rec["config"])
        loss = rec.get("val_loss")
        index.setdefault(cfg.curve(), {}).setdefault(cfg.lr, []).append(
            math.inf if loss is None else loss
        )
    return index


def _curve_lrs(
    grid_lrs: Sequence[float], curve: tuple, index: dict[tuple, Any], extend: int,
    union: bool = True,
) -> list[float]:
    """The grid, every LR this curve already ran at, and one LR past a winning edge.

    The winner is the LR with the lowest seed-mean final val loss among those run
    (a diverged seed makes the mean infinite). Planning from the results keeps
    extensions stable across resumes: once any seed ran an LR, every seed gets it.
    """
    by_lr = index.get(curve, {})
    if not union:
        return sorted(grid_lrs)
    lrs = sorted(set(grid_lrs) | set(by_lr))
    if extend <= 0 or not all(lr in by_lr for lr in grid_lrs):
        return lrs
    means = {lr: float(np.mean(v)) for lr, v in by_lr.items()}
    best = min(means, key=lambda lr: (means[lr], lr))
    if not math.isfinite(means[best]):
        return lrs
    lo_limit, hi_limit = min(grid_lrs) / 2.0**extend, max(grid_lrs) * 2.0**extend
    if best == max(lrs) and best * 2 <= hi_limit * (1 + 1e-9):
        lrs.append(best * 2)
    elif best == min(lrs) and best / 2 >= lo_limit * (1 - 1e-9):
        lrs.insert(0, best / 2)
    return lrs


def _sweep(
    base: RunConfig, lrs: Sequence[float], grid: Grid, index: dict[tuple, Any], union: bool
) -> list[RunConfig]:
    curve = base.curve()
    out = []
    for lr in _curve_lrs(lrs, curve, index, grid.extend, union):
        out.append(dataclasses.replace(base, lr=lr))
    return out


def plan_section(section: str, grid: Grid, index: dict[tuple, Any]) -> list[RunConfig]:
    """All runs of one section, seed-major (every curve's seed 0 first).

    ``index`` is :func:`index_results` of the results so far (for edge extensions).
    """
    b = grid.budget
    base = RunConfig(method="lora_muon", lr=0.0, seed=0, rank=None, width=grid.width,
                     depth=grid.depth, budget=b)
    curves: list[tuple[RunConfig, Sequence[float]]] = []
    if section == "pilot":
        for method, rank in (("dense_muon", None), ("lora_muon", grid.shape_rank)):
            for adam_lr in grid.pilot_adam_lrs:
                cfg = dataclasses.replace(base, method=method, rank=rank,
                                          budget=dataclasses.replace(b, adam_lr=adam_lr))
                curves.append((cfg, (0.1,)))
        grid = dataclasses.replace(grid, seeds=grid.seeds[:1], extend=0)
    elif section == "lr":
        curves.append((dataclasses.replace(base, method="dense_muon"), grid.spectral_lrs))
        for r in grid.headline_ranks:
            curves.append((dataclasses.replace(base, rank=r), grid.spectral_lrs))
    elif section == "rank":
        for r in grid.ranks:
            curves.append((dataclasses.replace(base, rank=r), grid.spectral_lrs))
    elif section == "gauge":
        for c in grid.gauges:
            lrs = grid.spectral_lrs if c == 1.0 else grid.gauge_muon_lrs
            curves.append((dataclasses.replace(base, rank=grid.gauge_rank, gauge=c), lrs))
            curves.append((dataclasses.replace(base, method="spectron", rank=grid.gauge_rank,
                                               gauge=c), grid.spectral_lrs))
    elif section == "shape":
        shapes = [(w, grid.depth) for w in grid.widths] + [(grid.width, d) for d in grid.depths]
        for w, d in dict.fromkeys(shapes):
            for method, rank in (("dense_muon", None), ("lora_muon", grid.shape_rank)):
                curves.append((dataclasses.replace(base, method=method, rank=rank, width=w,
                                                   depth=d), grid.shape_lrs))
    elif section == "baselines":
        for r in grid.baseline_ranks:
            curves.append((dataclasses.replace(base, method="adamw_lora", rank=r), grid.adam_lrs))
        curves.append((dataclasses.replace(base, method="dense_muon_optax"), grid.spectral_lrs))
        if _psgdax_available():
            curves.append((dataclasses.replace(base, method="psgd_kron"), grid.adam_lrs))
        # The library's other peers on the same footing (spectral rates).
        for r in grid.baseline_ranks:
            curves.append((dataclasses.replace(base, method="riemannion", rank=r),
                           grid.spectral_lrs))
        for method in ("lora_pre_muon", "limuon"):
            curves.append((dataclasses.replace(base, method=method), grid.spectral_lrs))
    elif section == "finetune":
        ft = dataclasses.replace(
            base, task="finetune", base_steps=b.steps * grid.ft_base_steps_factor,
            base_lr=grid.ft_base_lr,
        )
        for r in grid.ft_ranks:
            for method, init, reb in grid.ft_variants:
                lrs = grid.ft_spectral_lrs if method == "lora_muon" else grid.ft_adam_lrs
                curves.append((dataclasses.replace(ft, method=method, rank=r, init=init,
                                                   rebalance=reb), lrs))
    else:
        raise ValueError(f"unknown section {section!r}; choose from {('pilot',) + SECTIONS}")
    out: list[RunConfig] = []
    for seed in grid.seeds:
        for cfg, lrs in curves:
            out += _sweep(dataclasses.replace(cfg, seed=seed), lrs, grid, index,
                          union=section != "pilot")
    return out


def plan(sections: Iterable[str], grid: Grid, results: dict[str, Any]) -> list[tuple[str, RunConfig]]:
    """Every planned run, in priority order, with its section; duplicates kept once."""
    seen, out = set(), []
    index = index_results(results)
    for s in sections:
        for cfg in plan_section(s, grid, index):
            k = cfg.key()
            if k not in seen:
                seen.add(k)
                out.append((s, cfg))
    return out


# ----------------------------------------------------------------------------- results I/O


def load_results(path: Path) -> dict[str, Any]:
    if not path.exists():
        return {"meta": {}, "runs": {}}
    with open(path) as f:
        data = json.load(f)
    data.setdefault("meta", {})
    data.setdefault("runs", {})
    return data


def save_results(path: Path, data: dict[str, Any]) -> None:
    """Writes ``data`` atomically: a temporary file in the same folder, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True, allow_nan=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_run(path: Path, key: str, record: dict[str, Any], meta: dict[str, Any]) -> None:
    """Adds one run to the file, merging with what is on disk now."""
    data = load_results(path)
    data["runs"][key] = record
    data["meta"].update(meta)
    save_results(path, data)


def _finite(x: Any, digits: int = 5) -> float | None:
    x = float(x)
    return round(x, digits) if math.isfinite(x) else None


# ----------------------------------------------------------------------------- data


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
    from lora_muon_jax.data import CharTokenizer, load_tinyshakespeare, sample_batch, split_train_val

    text = load_tinyshakespeare()
    tok = CharTokenizer.from_text(text)
    train, val = split_train_val(tok.encode(text), 0.1)
    ft_train, ft_val = split_train_val(tok.encode(text.upper()), 0.1)
    rng = np.random.default_rng(2024)
    vx, vy = sample_batch(rng, val, eval_windows, seq_len)
    rng = np.random.default_rng(2024)
    fx, fy = sample_batch(rng, ft_val, eval_windows, seq_len)
    return Data(tok.vocab_size, jnp.asarray(train), jnp.asarray(vx), jnp.asarray(vy),
                jnp.asarray(ft_train), jnp.asarray(fx), jnp.asarray(fy))


# ----------------------------------------------------------------------------- models


def _path_names(path: tuple) -> tuple[str, ...]:
    return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def _is_block_matrix(path: tuple) -> bool:
    names = _path_names(path)
    return names[0] == "blocks" and names[-1] == "kernel"


def build_params(cfg: RunConfig, vocab: int) -> tuple[Any, Any]:
    """``(graphdef, params)`` of the run's model; gauge ``(c a, b / c)`` applied."""
    from flax import nnx

    from lora_muon_jax.models import CharTransformer

    b = cfg.budget
    rank = cfg.rank if cfg.task == "pretrain" else None
    model = CharTransformer(vocab, width=cfg.width, depth=cfg.depth, heads=b.heads, rank=rank,
                            seq_len=b.seq_len, mlp_ratio=b.mlp_ratio,
                            rngs=nnx.Rngs(cfg.seed))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    if cfg.gauge != 1.0:
        params = _gauge(params, cfg.gauge)
    return graphdef, params


def _gauge(tree: Any, c: float) -> Any:
    if isinstance(tree, dict):
        if "lora_a" in tree and "lora_b" in tree:
            return {**tree, "lora_a": tree["lora_a"] * c, "lora_b": tree["lora_b"] / c}
        return {k: _gauge(v, c) for k, v in tree.items()}
    return tree


def _adapters_for(base: Any, rank: int, key: jax.Array) -> Any:
    """Flax's LoRA init for every block matrix: ``a`` He-uniform ``(in, r)``, ``b = 0``."""
    init = jax.nn.initializers.he_uniform()
    paths, leaves = zip(*jax.tree_util.tree_flatten_with_path(base)[0])
    out: dict = {}
    for i, (path, w) in enumerate(zip(paths, leaves)):
        if not _is_block_matrix(path):
            continue
        node = out
        for name in [getattr(k, "key", k) for k in path[:-1]]:
            node = node.setdefault(name, {})
        m, n = w.shape
        node["lora_a"] = init(jax.random.fold_in(key, i), (m, rank), jnp.float32)
        node["lora_b"] = jnp.zeros((rank, n), jnp.float32)
    return out


def _kernels(tree: Any, path: tuple = ()) -> dict[tuple, Any]:
    """``{path of the layer: kernel}`` for every block matrix of a dense pure dict."""
    return {
        tuple(getattr(k, "key", k) for k in p[:-1]): w
        for p, w in jax.tree_util.tree_flatten_with_path(tree)[0]
        if _is_block_matrix(p)
    }


def _set_in(tree: dict, path: tuple, name: str, value: Any) -> dict:
    if not path:
        return {**tree, name: value}
    return {**tree, path[0]: _set_in(tree[path[0]], path[1:], name, value)}


def _get_in(tree: Any, path: tuple) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def merge_adapters(base: dict, adapters: dict) -> dict:
    """The dense pure dict with every adapted kernel replaced by ``W₀ + a @ b``."""
    out = base
    for path in _kernels(base):
        pair = _get_in(adapters, path)
        w0 = _get_in(base, path)["kernel"]
        out = _set_in(out, path, "kernel", w0 + pair["lora_a"] @ pair["lora_b"])
    return out


def finetune_start(cfg: RunConfig, base: dict) -> tuple[dict, dict]:
    """``(frozen base, adapters)`` of a fine-tuning run: zero or balanced init."""
    adapters = _adapters_for(base, cfg.rank, jax.random.key(1000 + cfg.seed))
    if cfg.init == "zero":
        return base, adapters
    if cfg.init != "balanced":
        raise ValueError(f"finetune init must be 'zero' or 'balanced'; got {cfg.init!r}")
    from lora_muon_jax.nnx import balance_lora_init

    joint = adapters
    for path, w in _kernels(base).items():
        joint = _set_in(joint, path, "kernel", w)
    joint = balance_lora_init(joint, jax.random.key(2000 + cfg.seed))
    new_base, new_adapters = base, {}
    for path in _kernels(base):
        node = _get_in(joint, path)
        new_base = _set_in(new_base, path, "kernel", node["kernel"])
        a_b = {"lora_a": node["lora_a"], "lora_b": node["lora_b"]}
        new_adapters = _nested_set(new_adapters, path, a_b)
    return new_base, new_adapters


def _nested_set(tree: dict, path: tuple, value: Any) -> dict:
    if len(path) == 1:
        return {**tree, path[0]: value}
    return {**tree, path[0]: _nested_set(tree.get(path[0], {}), path[1:], value)}


# ----------------------------------------------------------------------------- optimizers


def _psgdax_available() -> bool:
    try:
        import psgdax  # noqa: F401
    except ImportError:
        return False
    return True


def lr_shape(count: jax.Array, b: Budget, steps: int) -> jax.Array:
    """Linear warmup over ``b.warmup`` of the steps, flat, linear decay over the last ``b.cooldown``."""
    t = jnp.asarray(count, jnp.float32)
    warm = max(1.0, round(b.warmup * steps))
    cool = max(1.0, round(b.cooldown * steps))
    return jnp.minimum(1.0, (t + 1.0) / warm) * jnp.clip((steps - t) / cool, 0.0, 1.0)


def make_optimizer(cfg: RunConfig, params: Any, peak: Any, steps: int) -> optax.GradientTransformation:
    """The run's optimizer with peak rate ``peak`` (may be traced: no recompiling per LR)."""
    b = cfg.budget
    lr = lambda c: peak * lr_shape(c, b, steps)  # noqa: E731
    adam_lr = lambda c: b.adam_lr * lr_shape(c, b, steps)  # noqa: E731
    m = cfg.method
    if m == "lora_muon":
        from lora_muon_jax import GaugeRebalance, lora_muon

        reb = GaugeRebalance(every=cfg.rebalance) if cfg.rebalance else None
        return lora_muon(lr, adam_learning_rate=adam_lr, rebalance=reb)
    if m == "spectron":
        from lora_muon_jax.peers import spectron

        return spectron(lr, adam_learning_rate=adam_lr)
    if m == "lora_rite":
        from lora_muon_jax.peers import lora_rite

        return lora_rite(lr, adam_learning_rate=adam_lr)
    if m == "riemannion":
        from lora_muon_jax.peers import riemannion

        return riemannion(lr, adam_learning_rate=adam_lr)
    if m == "adamw_lora":
        return optax.adamw(lr, weight_decay=0.0)
    labels = jax.tree_util.tree_map_with_path(
        lambda p, _: "matrix" if _is_block_matrix(p) else "adam", params
    )
    adam = optax.adamw(adam_lr, weight_decay=0.0)
    if m == "dense_muon":
        from optax.contrib import MuonDimensionNumbers, scale_by_muon

        dims = lambda u: jax.tree.map(lambda _: MuonDimensionNumbers(), u)  # noqa: E731
        muon = optax.chain(
            scale_by_muon(beta=0.95, nesterov=False, weight_dimension_numbers=dims),
            optax.scale_by_learning_rate(lr),
        )
        return optax.partition({"matrix": muon, "adam": adam}, labels)
    if m == "dense_muon_optax":
        from optax.contrib import MuonDimensionNumbers, muon

        dims = jax.tree_util.tree_map_with_path(
            lambda p, _: MuonDimensionNumbers() if _is_block_matrix(p) else None, params
        )
        return muon(lr, adam_learning_rate=adam_lr, muon_weight_dimension_numbers=dims)
    if m in ("lora_pre_muon", "limuon"):
        from lora_muon_jax import peers

        # Block matrices only (embeddings and head are 2-D too), no shape factor:
        # ‖ΔW‖₂ ≈ η as dense_muon. LiMuon gets its STORM gradient from the loop.
        if m == "lora_pre_muon":
            peer = peers.lora_pre_muon(lr, rank=PEER_RANK, nesterov=False,
                                       shape_scaling="none")
        else:
            peer = peers.limuon(lr, rank=PEER_RANK)
        return optax.partition({"matrix": peer, "adam": adam}, labels)
    if m == "psgd_kron":
        import psgdax

        return optax.partition({"matrix": psgdax.kron(lr, b1=0.9), "adam": adam}, labels)
    raise ValueError(f"unknown method {m!r}; choose from {METHODS}")


# ----------------------------------------------------------------------------- training


class Trainer(NamedTuple):
    init: Callable[..., Any]  # jitted
    chunk: Callable[..., Any]  # compiled ahead of time on first use (see `train`)
    evaluate: Callable[..., Any]


_TRAINERS: dict[tuple, Trainer] = {}
_COMPILED: dict[tuple, Trainer] = {}


def _static_key(cfg: RunConfig, steps: int) -> tuple:
    """What the compiled functions depend on: not the LR, the seed, the gauge, the init."""
    return (cfg.method, cfg.rank, cfg.width, cfg.depth, cfg.task, cfg.rebalance,
            dataclasses.astuple(cfg.budget), steps)


def _tree_select(ok: jax.Array, new: Any, old: Any) -> Any:
    return jax.tree.map(lambda x, y: jax.lax.select(ok, x, y), new, old)


def get_trainer(cfg: RunConfig, graphdef: Any, params: Any, steps: int) -> Trainer:
    """Jitted init/chunk/eval functions for this static configuration (cached)."""
    key = _static_key(cfg, steps)
    if key in _TRAINERS:
        return _TRAINERS[key]
    from flax import nnx

    from lora_muon_jax.models import loss_fn

    b = cfg.budget
    finetune = cfg.task == "finetune"
    chunk_len = steps // b.chunks

    def model_loss(p: Any, frozen: Any, batch: Any) -> jax.Array:
        full = merge_adapters(frozen, p) if finetune else p
        return loss_fn(nnx.merge(graphdef, nnx.State(full)), batch)

    @jax.jit
    def init(p: Any, peak: jax.Array) -> Any:
        state = make_optimizer(cfg, p, peak, steps).init(p)
        return (state, p) if cfg.method == "limuon" else state

    @jax.jit
    def chunk(p, opt_state, frozen, data, key, t0, peak, bad):
        from lora_muon_jax.data import sample_batch

        tx = make_optimizer(cfg, p, peak, steps)

        def body(carry, t):
            p, s, bad = carry
            batch = sample_batch(jax.random.fold_in(key, t), data, b.batch, b.seq_len)
            loss, g = jax.value_and_grad(model_loss)(p, frozen, batch)
            if cfg.method == "limuon":
                # STORM: the same batch's gradient at the previous point (kept in the
                # state's last params; the first step uses g itself).
                p_prev = s[1]
                g_prev = jax.grad(model_loss)(p_prev, frozen, batch)
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

        (p, opt_state, bad), losses = jax.lax.scan(
            body, (p, opt_state, bad), t0 + jnp.arange(chunk_len)
        )
        return p, opt_state, bad, losses

    @jax.jit
    def evaluate(p, frozen, xs, ys):
        per = jax.lax.map(lambda xy: model_loss(p, frozen, xy),
                          (xs.reshape(-1, 32, xs.shape[-1]), ys.reshape(-1, 32, ys.shape[-1])))
        return per.mean()

    trainer = Trainer(init, chunk, evaluate)
    _TRAINERS[key] = trainer
    return trainer


def factor_log_ratios(params: Any) -> np.ndarray:
    """``log σ_max(a) − log σ_max(b)`` of every ``lora_a``/``lora_b`` pair (host SVDs)."""
    out = []

    def walk(t: Any) -> None:
        if isinstance(t, dict):
            if "lora_a" in t and "lora_b" in t:
                sa = np.linalg.norm(np.asarray(t["lora_a"], np.float64), 2)
                sb = np.linalg.norm(np.asarray(t["lora_b"], np.float64), 2)
                out.append(np.log(max(sa, 1e-30)) - np.log(max(sb, 1e-30)))
            else:
                for v in t.values():
                    walk(v)

    walk(params)
    return np.asarray(out)


class TrainOutput(NamedTuple):
    record: dict[str, Any]
    params: Any


def train(cfg: RunConfig, data: Data, *, frozen: Any = None, params: Any = None,
          graphdef: Any = None, steps: int | None = None) -> TrainOutput:
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

    compile_s = 0.0
    t = time.perf_counter()
    skey = _static_key(cfg, steps)
    trainer = get_trainer(cfg, graphdef, params, steps)
    peak = jnp.asarray(cfg.lr, jnp.float32)
    with contextlib.redirect_stdout(io.StringIO()):  # psgdax prints on init
        opt_state = trainer.init(params, peak)
    key = jax.random.fold_in(jax.random.key(cfg.seed), 7)
    chunk_len = steps // b.chunks
    bad = jnp.asarray(-1, jnp.int32)
    if skey not in _COMPILED:
        # Ahead-of-time compilation, timed apart from the run and kept for the next
        # runs of the same static configuration (other LRs, seeds, gauges, inits).
        _COMPILED[skey] = Trainer(
            trainer.init,
            trainer.chunk.lower(params, opt_state, frozen, train_ids, key, jnp.int32(0), peak,
                                bad).compile(),
            trainer.evaluate.lower(params, frozen, val_x, val_y).compile(),
        )
        compile_s = time.perf_counter() - t
    trainer = _COMPILED[skey]

    t = time.perf_counter()
    ratios0 = factor_log_ratios(params) if (cfg.lora or finetune) else None
    losses, ratio_curve = [], []
    diverged_step = None
    for i in range(b.chunks):
        params, opt_state, bad, chunk_losses = trainer.chunk(
            params, opt_state, frozen, train_ids, key, jnp.int32(i * chunk_len), peak, bad
        )
        losses.append(np.asarray(chunk_losses))
        if ratios0 is not None:
            ratio_curve.append(float(np.mean(np.abs(factor_log_ratios(params)))))
        if int(bad) >= 0:
            diverged_step = int(bad)
            break
    losses = np.concatenate(losses)
    val = None if diverged_step is not None else float(trainer.evaluate(params, frozen, val_x, val_y))
    wall = time.perf_counter() - t

    tail = losses[-max(1, steps // 10):]
    curve = [_finite(np.mean(c), 4) for c in np.array_split(losses, min(b.chunks, len(losses)))]
    rec: dict[str, Any] = {
        "config": cfg.as_dict(),
        "status": "diverged" if diverged_step is not None else "ok",
        "val_loss": None if val is None else _finite(val),
        "train_loss": None if diverged_step is not None else _finite(np.mean(tail)),
        "diverged_step": diverged_step,
        "steps_run": int(losses.size),
        "curve": curve,
        "wall_s": round(wall, 2),
        "compile_s": round(compile_s, 2),
        "finished": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
    }
    if val is not None and not math.isfinite(val):
        rec["status"], rec["val_loss"] = "diverged", None
        rec["diverged_step"] = steps
    if ratios0 is not None:
        final = factor_log_ratios(params)
        rec["log_norm_ratio"] = {
            "init_mean_abs": _finite(np.mean(np.abs(ratios0)), 4),
            "mean": _finite(np.mean(final), 4),
            "mean_abs": _finite(np.mean(np.abs(final)), 4),
            "max_abs": _finite(np.max(np.abs(final)), 4),
        }
        rec["ratio_curve"] = [_finite(x, 4) for x in ratio_curve]
    return TrainOutput(rec, params)


# ----------------------------------------------------------------------------- fine-tuning base

_BASES: dict[str, Any] = {}


def base_config(cfg: RunConfig) -> RunConfig:
    """The dense-Muon pretraining run whose params a fine-tuning run starts from."""
    b = dataclasses.replace(cfg.budget, steps=cfg.base_steps)
    return RunConfig(method="dense_muon", lr=cfg.base_lr, seed=0, rank=None, width=cfg.width,
                     depth=cfg.depth, budget=b)


def pretrained_base(cfg: RunConfig, data: Data, log: Callable[[str], None]) -> tuple[Any, dict]:
    """``(graphdef, params)`` of the fine-tuning base: memory, /tmp checkpoint or trained."""
    bcfg = base_config(cfg)
    key = bcfg.key()
    graphdef, params = build_params(bcfg, data.vocab)
    if key in _BASES:
        return graphdef, _BASES[key][0]
    path = CACHE_DIR / f"base_{key}.npz"
    flat, treedef = jax.tree.flatten(params)
    if path.exists():
        with np.load(path) as z:
            params = jax.tree.unflatten(treedef, [jnp.asarray(z[f"a{i}"]) for i in range(len(flat))])
        info = json.loads(path.with_suffix(".json").read_text())
    else:
        log(f"pretraining the fine-tuning base ({bcfg.budget.steps} dense-Muon steps)")
        out = train(bcfg, data)
        params, info = out.params, out.record
        if out.record["status"] != "ok":
            raise RuntimeError(f"the fine-tuning base diverged: {out.record}")
        CACHE_DIR.mkdir(parents=True, exist_ok=True)
        leaves = jax.tree.leaves(params)
        np.savez(path, **{f"a{i}": np.asarray(x) for i, x in enumerate(leaves)})
        info = {k: info[k] for k in ("val_loss", "train_loss", "wall_s", "config")}
        path.with_suffix(".json").write_text(json.dumps(info))
    if "task_val_loss" not in info:
        # The shifted task's loss before fine-tuning: what the adapters start from.
        ev = get_trainer(bcfg, graphdef, params, bcfg.budget.steps).evaluate
        info["task_val_loss"] = _finite(ev(params, {}, data.ft_val_x, data.ft_val_y))
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


# ----------------------------------------------------------------------------- CLI


def machine_meta() -> dict[str, Any]:
    try:
        from benchmarks.common import machine_info

        info = machine_info()
    except Exception:  # the study must not depend on the benchmark harness
        info = {"jax": jax.__version__, "optax": optax.__version__}
    return {"machine": info, "study_version": STUDY_VERSION}


def _describe(cfg: RunConfig) -> str:
    parts = [cfg.method, f"lr={cfg.lr:.4g}", f"seed={cfg.seed}",
             "dense" if cfg.rank is None else f"r={cfg.rank}", f"w={cfg.width}", f"d={cfg.depth}"]
    if cfg.gauge != 1.0:
        parts.append(f"c={cfg.gauge:g}")
    if cfg.task == "finetune":
        parts.append(f"ft:{cfg.init}" + (f"+reb{cfg.rebalance}" if cfg.rebalance else ""))
    return " ".join(parts)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.study.lr_transfer",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--quick", action="store_true", help="a tiny slice of every section (< 3 min)")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results JSON (cache)")
    p.add_argument("--only", type=str, default=None,
                   help=f"comma-separated sections of {('pilot',) + SECTIONS}")
    p.add_argument("--max-runs", type=int, default=None, help="stop after this many new runs")
    p.add_argument("--list", action="store_true", help="print the plan and what is done, run nothing")
    p.add_argument("--retry-errors", action="store_true", help="re-run runs recorded as errors")
    # Overrides of the preset budget/grid (for tests and small machines).
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--width", type=int, default=None)
    p.add_argument("--depth", type=int, default=None)
    p.add_argument("--chunks", type=int, default=None)
    p.add_argument("--eval-windows", type=int, default=None)
    p.add_argument("--seeds", type=int, default=None, help="number of seeds")
    return p.parse_args(argv)


def grid_from_args(args: argparse.Namespace) -> Grid:
    grid = QUICK if args.quick else FULL
    budget = dataclasses.replace(grid.budget, **{
        k: v for k, v in (("steps", args.steps), ("batch", args.batch), ("seq_len", args.seq_len),
                          ("chunks", args.chunks), ("eval_windows", args.eval_windows))
        if v is not None
    })
    changes: dict[str, Any] = {"budget": budget}
    if args.width is not None:
        changes["width"] = args.width
        changes["widths"] = (args.width,) if args.quick else (args.width // 2, args.width)
    if args.depth is not None:
        changes["depth"] = args.depth
    if args.seeds is not None:
        changes["seeds"] = tuple(range(args.seeds))
    return dataclasses.replace(grid, **changes)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    grid = grid_from_args(args)
    sections = tuple(s.strip() for s in args.only.split(",")) if args.only else SECTIONS
    for s in sections:
        if s not in ("pilot",) + SECTIONS:
            raise SystemExit(f"--only: unknown section {s!r}; choose from {('pilot',) + SECTIONS}")
    path = args.results
    log = lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)  # noqa: E731
    meta = {**machine_meta(), "grid": dataclasses.asdict(grid)}

    if args.list:
        runs = load_results(path)["runs"]
        for section, cfg in plan(sections, grid, runs):
            status = runs.get(cfg.key(), {}).get("status", "-")
            print(f"{section:10s} {status:9s} {cfg.key()} {_describe(cfg)}")
        return 0

    done = 0
    failed: set[str] = set()
    while args.max_runs is None or done < args.max_runs:
        runs = load_results(path)["runs"]
        todo = [
            (s, c) for s, c in plan(sections, grid, runs)
            if c.key() not in failed
            and (c.key() not in runs or (args.retry_errors and runs[c.key()]["status"] == "error"))
        ]
        if not todo:
            break
        section, cfg = todo[0]
        log(f"{section}: {_describe(cfg)} ({len(todo)} left in plan)")
        try:
            rec = run_config(cfg, log)
        except Exception as e:  # recorded, not fatal: one broken method must not stop a sweep
            traceback.print_exc()
            rec = {"config": cfg.as_dict(), "status": "error", "val_loss": None,
                   "error": f"{type(e).__name__}: {e}"[:500]}
            failed.add(cfg.key())
        record_run(path, cfg.key(), rec, meta)
        done += 1
        if rec["status"] == "error":
            log(f"  error: {rec['error']}")
        else:
            log(f"  {rec['status']}: val {rec['val_loss']} train {rec['train_loss']} "
                f"step {rec['diverged_step']} ({rec['wall_s']} s + compile {rec['compile_s']} s)")
    log(f"{done} new runs; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
