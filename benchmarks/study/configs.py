"""What one run of the study is, and the grids the sweep runs.

A run is a :class:`RunConfig`; its :meth:`RunConfig.key` is a hash of the whole
configuration with :data:`STUDY_VERSION`, the key under which its result is stored.
Fields of :class:`RunConfig` and :class:`Budget` are therefore frozen: adding,
renaming or re-defaulting one changes every key (the committed results would no
longer be found); ``tests/test_study_configs.py`` pins keys of committed runs.

A :class:`Grid` holds the sweep's axes (rates, ranks, gauges, shapes) of the
short-budget sections; its :class:`LongGrid` those of the long-budget section (vii),
and its :class:`LongStudy` those of the long-budget sections after it (the powered
proxy test, width 128, shapes, peers, weight decay). :data:`FULL` and :data:`QUICK`
are the presets (``QUICK`` is the tiny slice the test suite runs).

A field may be added to :class:`RunConfig` only with a ``None`` default: ``as_dict``
leaves ``None`` fields out, so every existing key stays the same
(``weight_decay`` was added that way).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

STUDY_VERSION = 1


SECTIONS = ("lr", "rank", "gauge", "shape", "baselines", "finetune")
# The long-budget sections after (vii), most important first (issue 20).
LONG_STUDY_SECTIONS = ("proxy", "width128", "shape_long", "peers_long", "wd_long")
# Run only when named in --only.
EXTRA_SECTIONS = ("pilot", "long_pilot", "long", *LONG_STUDY_SECTIONS)
ALL_SECTIONS = EXTRA_SECTIONS[:1] + SECTIONS + EXTRA_SECTIONS[1:]
SECTION_TITLES = {
    "pilot": "pilot: the fixed AdamW rate of the non-matrix leaves",
    "lr": "(i) LR sweep: dense Muon vs rank-2 and rank-32 LoRA-Muon",
    "rank": "(ii) rank transfer of LoRA-Muon",
    "gauge": "(iii) gauge rescaling: LoRA-Muon vs Spectron",
    "shape": "(iv) width and depth transfer",
    "baselines": "(v) baselines and peers: AdamW-LoRA, Riemannion, stock optax Muon, "
    "PSGD-Kron, LoRA-Pre, LiMuon",
    "finetune": "(vi) zero-init fine-tuning on a frozen dense base",
    "long_pilot": "long-budget pilot: dense Muon at candidate budgets",
    "long": "(vii) long budget: dense Muon, LoRA-Muon, AdamW-LoRA, gauge",
    "proxy": "(viii) powered proxy test: dense Muon vs LoRA-Muon r=2, r=32, 10 seeds",
    "width128": "(ix) long budget at width 128: dense Muon, LoRA-Muon r=2, r=32",
    "shape_long": "(x) long budget across width and depth: dense Muon, LoRA-Muon r=8",
    "peers_long": "(xi) long budget peers: Spectron (and its gauge), LoRA-RITE, "
    "Riemannion, LoRA-Pre, LiMuon, AdamW-LoRA",
    "wd_long": "(xii) long budget split weight decay: dense Muon, LoRA-Muon r=2",
}


def lr_grid(lo: int, hi: int) -> tuple[float, ...]:
    """``0.0125 · 2^k`` for ``k = lo..hi``: the study's common log grid."""
    return tuple(0.0125 * 2.0**k for k in range(lo, hi + 1))


def lr_grid_sqrt2(lo: int, hi: int) -> tuple[float, ...]:
    """``0.0125 · 2^(k/2)`` for ``k = lo..hi``: a √2-spaced grid.

    Its even ``k`` are exactly (bit for bit) the rates ``lr_grid`` has for ``k/2``,
    so runs of the ×2 grid are reused.
    """
    return tuple(0.0125 * 2.0 ** (k / 2) for k in range(lo, hi + 1))


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
    # Decoupled weight decay λ of the matrix rule (dense Muon: W ← (1 − λη)W; LoRA-Muon:
    # its split decay, the product by 1 − λη); None: none (0 is stored as None, so a
    # run without decay has one key).
    weight_decay: float | None = None

    def __post_init__(self) -> None:
        if self.weight_decay is not None and float(self.weight_decay) == 0.0:
            object.__setattr__(self, "weight_decay", None)

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
        """Whether the method trains a LoRA tree (the catalogue's ``tree``)."""
        from benchmarks import registry

        return registry.get(self.method).tree == "lora"

    @staticmethod
    def from_dict(d: dict[str, Any]) -> RunConfig:
        d = {"rank": None, **d}
        d["budget"] = Budget(**d.get("budget", {}))
        return RunConfig(**d)


# (method, rank or None, learning rates): one LR curve per seed.
CurveSpec = tuple[str, "int | None", tuple[float, ...]]


@dataclasses.dataclass(frozen=True)
class LongGrid:
    """The long-budget section: the headline methods at a budget near the paper's loss.

    ``curves`` are swept over ``seeds``; then, at the best rate of the rank-
    ``gauge_rank`` LoRA-Muon curve (once all its seeds ran), every method of
    ``gauge_methods`` runs at gauge 1 and ``gauge`` for every seed. ``pilot`` lists
    candidate ``(steps, batch, seq_len, width, depth)`` budgets on which dense Muon
    ran at ``pilot_lrs`` (seed 0) to choose this one.
    """

    budget: Budget = Budget(steps=1000, batch=32, seq_len=64, chunks=20, eval_windows=1024)
    width: int = 64
    depth: int = 2
    seeds: tuple[int, ...] = (0, 1, 2)
    curves: tuple[CurveSpec, ...] = (
        ("dense_muon", None, lr_grid(-3, 2)),  # 0.0016 ... 0.05
        ("dense_muon_optax", None, lr_grid(-3, 2)),
        ("lora_muon", 2, lr_grid(-2, 3)),  # 0.0031 ... 0.1
        ("lora_muon", 32, lr_grid(-2, 3)),
        ("adamw_lora", 2, lr_grid(-4, 1)),  # 0.00078 ... 0.025
        ("adamw_lora", 32, lr_grid(-6, -1)),  # 0.0002 ... 0.00625
        ("lora_muon", 8, lr_grid(-2, 3)),  # a third rank for the rank-aware rate rule
    )
    gauge: float = 9.0
    gauge_rank: int = 2
    gauge_methods: tuple[str, ...] = ("lora_muon", "spectron")
    extend: int = 2
    # Dense Muon at 0.0125 (its short-budget optimum), seed 0, at candidate budgets
    # (steps, batch, seq_len, width, depth); the chosen one is the cheapest whose
    # loss is near the paper's 1.789 (the sweep then brackets the rate).
    pilot: tuple[tuple[int, int, int, int, int], ...] = (
        (1000, 32, 64, 128, 2),
        (1000, 16, 64, 128, 2),
        (1000, 16, 64, 64, 2),
        (1000, 32, 64, 64, 2),
    )
    pilot_lrs: tuple[float, ...] = (0.0125,)

    def with_budget(self, steps: int, batch: int, seq_len: int, width: int, depth: int) -> LongGrid:
        b = dataclasses.replace(self.budget, steps=steps, batch=batch, seq_len=seq_len)
        return dataclasses.replace(self, budget=b, width=width, depth=depth)


@dataclasses.dataclass(frozen=True)
class LongStudy:
    """The long-budget sections after (vii), at :class:`LongGrid`'s budget and model.

    * ``proxy``: ``proxy_curves`` (dense Muon and LoRA-Muon ranks 2 and 32) on a
      √2-spaced grid spanning both optima, over ``proxy_seeds``; a winning edge is
      extended by ``proxy_step`` at a time (at most ``extend`` times).
    * ``width128``: ``wide_curves`` at width ``wide`` (depth as the long grid).
    * ``shape_long``: ``shape_curves`` at each ``(width, depth)`` of ``shapes``.
    * ``peers_long``: ``peer_curves``; then, once ``gauge_method``'s curve is
      complete, ``gauge_method`` at gauge ``gauge`` and every ``gauge_controls``
      method at gauges 1 and ``gauge``, at ``gauge_method``'s best rate.
    * ``wd_long``: each ``decay_curves`` method at every ``decays`` value (0 is
      the ``proxy`` run itself), at its best ``proxy`` rate once that curve is complete.

    Every section but ``proxy`` runs :class:`LongGrid`'s ``seeds``; the ×2 grids
    extend by a factor 2 (at most ``extend`` times).
    """

    proxy_seeds: tuple[int, ...] = tuple(range(10))
    proxy_curves: tuple[CurveSpec, ...] = (
        ("dense_muon", None, lr_grid_sqrt2(-4, 4)),  # 0.0031 ... 0.05, ×√2: 9 rates
        ("lora_muon", 2, lr_grid_sqrt2(-4, 4)),
        ("lora_muon", 32, lr_grid_sqrt2(-4, 4)),
    )
    proxy_step: float = 2.0**0.5
    wide: int = 128
    wide_curves: tuple[CurveSpec, ...] = (
        ("dense_muon", None, lr_grid(-2, 2)),  # 0.0031 ... 0.05
        ("lora_muon", 2, lr_grid(-2, 2)),
        ("lora_muon", 32, lr_grid(-2, 2)),
    )
    shapes: tuple[tuple[int, int], ...] = ((64, 1), (64, 4), (128, 2))
    shape_curves: tuple[CurveSpec, ...] = (
        ("dense_muon", None, lr_grid(-2, 2)),
        ("lora_muon", 8, lr_grid(-2, 2)),
    )
    peer_curves: tuple[CurveSpec, ...] = (
        ("spectron", 8, lr_grid(-2, 3)),  # 0.0031 ... 0.1, as LoRA-Muon's long curves
        ("riemannion", 8, lr_grid(-2, 3)),
        ("lora_rite", 8, lr_grid(-6, 0)),  # 0.0002 ... 0.0125 (Adam-like rates)
        ("adamw_lora", 8, lr_grid(-5, 0)),  # 0.0004 ... 0.0125
        ("lora_pre_muon", None, lr_grid(-3, 2)),  # 0.0016 ... 0.05, as dense Muon's
        ("limuon", None, lr_grid(-4, 1)),  # 0.0008 ... 0.025 (short-budget best 0.003)
    )
    gauge_method: str = "spectron"
    gauge_controls: tuple[str, ...] = ("lora_muon",)
    gauge: float = 9.0
    decays: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0)
    decay_curves: tuple[tuple[str, int | None], ...] = (("dense_muon", None), ("lora_muon", 2))
    extend: int = 2

    @property
    def gauge_rank(self) -> int | None:
        """The rank of ``gauge_method``'s curve (the LoRA peers' rank)."""
        return next((r for m, r, _ in self.peer_curves if m == self.gauge_method), None)


QUICK_LONG = LongGrid(
    budget=Budget(steps=20, batch=8, seq_len=32, chunks=2, eval_windows=32),
    width=32,
    depth=1,
    seeds=(0,),
    curves=(
        ("dense_muon", None, (0.05,)),
        ("lora_muon", 2, (0.05, 0.2)),
        ("adamw_lora", 2, (3e-3,)),
    ),
    extend=0,
    pilot=((20, 8, 32, 32, 1),),
    pilot_lrs=(0.05,),
)


QUICK_LONG_STUDY = LongStudy(
    proxy_seeds=(0, 1, 2),
    proxy_curves=(("dense_muon", None, (0.05, 0.2)), ("lora_muon", 2, (0.05, 0.2))),
    wide=64,
    wide_curves=(("lora_muon", 2, (0.05,)),),
    shapes=((32, 2),),
    shape_curves=(("lora_muon", 2, (0.05,)),),
    peer_curves=(("spectron", 2, (0.05, 0.2)),),
    decays=(0.1,),
    extend=0,
)


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
        ("lora_muon", "zero", 0),
        ("lora_muon", "zero", 10),
        ("lora_muon", "balanced", 0),
        ("adamw_lora", "zero", 0),
        ("adamw_lora", "balanced", 0),
        ("lora_rite", "zero", 0),
        ("lora_rite", "balanced", 0),
    )
    extend: int = 3  # at most this many extra LRs beyond each edge of a grid
    budget: Budget = Budget()
    long: LongGrid = LongGrid()
    long_study: LongStudy = LongStudy()


def _tuples(v: Any) -> Any:
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def long_grid_from_dict(d: dict[str, Any]) -> LongGrid:
    """The inverse of ``dataclasses.asdict`` for a :class:`LongGrid`."""
    budget = Budget(**d.get("budget", {}))
    return LongGrid(**{k: _tuples(v) for k, v in d.items() if k != "budget"}, budget=budget)


def long_study_from_dict(d: dict[str, Any]) -> LongStudy:
    """The inverse of ``dataclasses.asdict`` for a :class:`LongStudy`."""
    return LongStudy(**{k: _tuples(v) for k, v in d.items()})


def grid_from_dict(d: dict[str, Any]) -> Grid:
    """The inverse of ``dataclasses.asdict`` for a :class:`Grid` read back from JSON.

    Grids saved before the long sections existed get the default :class:`LongGrid`
    and :class:`LongStudy`.
    """
    budget = Budget(**d.get("budget", {}))
    long = long_grid_from_dict(d["long"]) if "long" in d else LongGrid()
    study = long_study_from_dict(d["long_study"]) if "long_study" in d else LongStudy()
    nested = ("budget", "long", "long_study")
    rest = {k: _tuples(v) for k, v in d.items() if k not in nested}
    return Grid(**rest, budget=budget, long=long, long_study=study)


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
    long=QUICK_LONG,
    long_study=QUICK_LONG_STUDY,
)


def describe(cfg: RunConfig) -> str:
    """A one-line description of a run for logs and tables."""
    parts = [
        cfg.method,
        f"lr={cfg.lr:.4g}",
        f"seed={cfg.seed}",
        "dense" if cfg.rank is None else f"r={cfg.rank}",
        f"w={cfg.width}",
        f"d={cfg.depth}",
    ]
    if cfg.gauge != 1.0:
        parts.append(f"c={cfg.gauge:g}")
    if cfg.weight_decay is not None:
        parts.append(f"wd={cfg.weight_decay:g}")
    if cfg.task == "finetune":
        parts.append(f"ft:{cfg.init}" + (f"+reb{cfg.rebalance}" if cfg.rebalance else ""))
    if cfg.budget != Budget():
        b = cfg.budget
        parts.append(f"{b.steps}x{b.batch}x{b.seq_len}")
    return " ".join(parts)
