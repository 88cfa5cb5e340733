"""The page's claim table: each claim of the paper beside ours at both budgets.

One row per claim: the paper's figure (from a secondary source,
:data:`~benchmarks.study.labels.PAPER`), ours at the short budget (sections i–iv) and
at the long one (sections vii–xi, "pending: section X, k of N runs" until the
section has the runs the row needs), and a verdict per budget computed by the rules
of :func:`rules` (``tests/test_study_report.py`` checks them on synthetic results):

* *rate claims* (a best rate carries over): the cost, in nats, of training a curve at
  a common rate instead of its own best, against the seed spread;
* *loss claims* (one model beats another): the difference of the seed means, seed
  by seed, against the seed spread;
* *gauge claims*: the largest per-seed loss change under the gauge, against a tenth
  of the seed spread;
* the powered proxy test's verdict (section viii, :mod:`~benchmarks.study.proxy_stats`)
  where it has run.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from benchmarks.study import report_proxy
from benchmarks.study.aggregate import Curve, Point, Results, fmt, fmt_lr
from benchmarks.study.configs import SECTION_TITLES, Grid
from benchmarks.study.labels import PAPER, label
from benchmarks.study.planning import decay_lr, index_results, peer_gauge_lr, progress
from benchmarks.study.proxy_stats import INCONCLUSIVE, REFUTED, SHOWN
from benchmarks.study.report_long import long_curve
from benchmarks.study.report_long_study import at_seeds, study_curve

if TYPE_CHECKING:
    from benchmarks.study.report import Report

REPRODUCED, NOT_REPRODUCED, PENDING = "reproduced", "not reproduced", "pending"
DECIDES = 2  # a cost or difference decides against a tie beyond this many seed spreads
GAUGE_SHARE = 10  # gauge invariant: no seed moves by more than 1/GAUGE_SHARE of the spread
MIN_SEEDS = 2  # below this many seeds there is no spread: inconclusive
POWERED = {SHOWN: REPRODUCED, REFUTED: NOT_REPRODUCED, INCONCLUSIVE: INCONCLUSIVE}


class Cell(NamedTuple):
    """Our figure at one budget and its verdict."""

    ours: str
    verdict: str


class Claim(NamedTuple):
    claim: str
    paper: str
    short: Cell
    long: Cell


# ----------------------------------------------------------------------------- rules


def pending(res: Results, grid: Grid, section: str) -> Cell:
    """``pending: section (x), k of N runs``."""
    done, planned = progress(section, grid, res.runs)
    number = SECTION_TITLES[section].split(" ", 1)[0]
    return Cell(f"pending: section {number}, {done} of {planned} runs", PENDING)


def by_spread(cost: float, spread: float, n: int) -> str:
    """A rate claim's verdict from the cost of the common rate (nats) and the seed spread."""
    if n < MIN_SEEDS:
        return INCONCLUSIVE
    if cost <= spread:
        return REPRODUCED
    return NOT_REPRODUCED if cost > DECIDES * spread else INCONCLUSIVE


def _n(points: Sequence[Point]) -> str:
    lo, hi = min(len(p.losses) for p in points), max(len(p.losses) for p in points)
    return f"n={lo}" if lo == hi else f"n={lo}–{hi}"


def _cost(curve: Curve, best: Point, lr: float) -> tuple[float, float]:
    """``curve``'s loss at ``lr`` minus its best, and the larger seed std of the two.

    Infinite where a seed diverged at ``lr``; NaN where not every seed of the best ran.
    """
    at = curve.complete().at(lr)
    if at is None or len(at.losses) < len(best.losses):
        return math.nan, best.std
    if at.diverged:
        return math.inf, best.std
    return at.mean - best.mean, max(at.std, best.std)


def shared_rate(curves: dict[str, Curve]) -> Cell:
    """Is there one rate every curve trains at within seed spread of its own best?

    The candidate rates are those every curve ran; the one whose worst cost (in seed
    spreads) is smallest is reported. Reproduced: that worst cost is within the
    spread; not reproduced: every candidate costs some curve more than
    ``DECIDES`` spreads; otherwise (or below ``MIN_SEEDS`` seeds) inconclusive.
    """
    bests = {name: c.best() for name, c in curves.items()}
    rates = set.intersection(*({p.lr for p in c.complete().points()} for c in curves.values()))
    groups: dict[float, list[str]] = {}
    for name, b in bests.items():
        groups.setdefault(b.lr, []).append(name)
    optima = "; ".join(f"{fmt_lr(lr)}: {', '.join(ns)}" for lr, ns in sorted(groups.items()))
    n = min(len(b.losses) for b in bests.values())
    scored = []
    for lr in sorted(rates):
        costs = {name: _cost(curves[name], b, lr) for name, b in bests.items()}
        if any(math.isnan(c) for c, _ in costs.values()):
            continue
        name, (cost, spread) = max(costs.items(), key=lambda kv: (_in_spreads(*kv[1]), kv[1][0]))
        scored.append((_in_spreads(cost, spread), cost, lr, name, spread))
    if not scored:
        return Cell(
            f"best rates {optima}; no rate run by all; {_n(list(bests.values()))}", INCONCLUSIVE
        )
    # The rate whose worst cost is the fewest spreads (then the fewest nats).
    _, cost, lr, name, spread = min(scored)
    sd = f"{spread:.3f}" if len(bests[name].losses) >= MIN_SEEDS else "–, one seed"
    return Cell(
        f"best rates {optima}; at {fmt_lr(lr)} the worst, {name}, is {cost:+.3f} nats off its "
        f"best (spread {sd}); {_n(list(bests.values()))}",
        by_spread(cost, spread, n),
    )


def _in_spreads(cost: float, spread: float) -> float:
    if cost <= 0:
        return 0.0
    return cost / spread if spread > 0 else math.inf


def proxy_cell(dense: Curve, proxy: Curve, name: str) -> Cell:
    """Dense Muon trained at the proxy's best rate, against its own best (a rate claim)."""
    db, pb = dense.best(), proxy.best()
    cost, spread = _cost(dense, db, pb.lr)
    n = min(len(db.losses), len(pb.losses))
    if math.isnan(cost):
        return Cell(f"dense Muon not run at {name}'s rate {fmt_lr(pb.lr)}", INCONCLUSIVE)
    return Cell(
        f"{name} {fmt_lr(pb.lr)} vs dense Muon {fmt_lr(db.lr)} (×{pb.lr / db.lr:.3g}); dense "
        f"Muon at {name}'s rate {cost:+.3f} nats (spread {spread:.3f}); n={n}",
        by_spread(cost, spread, n),
    )


def seed_diffs(ref: Point, other: Point) -> list[float]:
    """``other − ref``, seed by seed over the seeds both points have (in ``ref``'s order)."""
    mine = dict(zip(other.seeds, other.losses, strict=True))
    return [mine[s] - v for s, v in zip(ref.seeds, ref.losses, strict=True) if s in mine]


def diff_cell(ref: Curve, other: Curve, lead_claimed: bool = True) -> Cell:
    """``other`` minus ``ref`` at each curve's best rate, seed by seed (a loss claim).

    Decided when the seed-mean difference exceeds ``DECIDES`` seed spreads and every
    seed has its sign: reproduced if ``other`` leads as claimed, else not.
    """
    rb, ob = ref.best(), other.best()
    diffs = seed_diffs(rb, ob)
    d, spread = ob.mean - rb.mean, max(rb.std, ob.std)
    verdict = INCONCLUSIVE
    if len(diffs) >= MIN_SEEDS and abs(d) > DECIDES * spread:
        if all(np.sign(x) == np.sign(d) for x in diffs):
            verdict = REPRODUCED if (d < 0) == lead_claimed else NOT_REPRODUCED
    seeds = ", ".join(f"{x:+.3f}" for x in diffs)
    return Cell(
        f"{d:+.3f} ({fmt(ob.mean)} vs {fmt(rb.mean)}; per seed {seeds}; spread "
        f"{spread:.3f}; n={len(diffs)})",
        verdict,
    )


def _paired(base: Curve, moved: Curve, lr: float) -> list[float]:
    """``moved − base`` at ``lr``, seed by seed in seed order (both finite)."""
    out = []
    for (rate, s), rec in sorted(moved.runs.items(), key=lambda kv: kv[0][1]):
        other = base.runs.get((rate, s))
        if math.isclose(rate, lr, rel_tol=1e-9) and other is not None:
            if rec.get("val_loss") is not None and other.get("val_loss") is not None:
                out.append(rec["val_loss"] - other["val_loss"])
    return out


def gauge_cell(
    base: Curve, moved: Curve, lr: float, invariant: bool, where: str, paper: float | None = None
) -> Cell | None:
    """The gauge's paired loss change at ``lr`` (a gauge claim); ``None`` below two seeds.

    Invariant when no seed moves by more than 1/``GAUGE_SHARE`` of the seed spread of
    the gauge-1 losses at ``lr``; reproduced when that matches ``invariant``. With
    ``paper``, the per-seed changes and whether the mean has the paper's sign.
    """
    d = _paired(base, moved, lr)
    at = base.complete().at(lr)
    if len(d) < MIN_SEEDS or at is None:
        return None
    top = float(np.max(np.abs(d)))
    found = top <= at.std / GAUGE_SHARE
    mean, seeds = float(np.mean(d)), ""
    if paper is not None:
        sign = "the same sign as" if np.sign(mean) == np.sign(paper) else "the opposite sign to"
        seeds = f"; per seed {', '.join(f'{x:+.1e}' for x in d)}; {sign} the paper's"
    return Cell(
        f"{mean:+.1e} (max abs {top:.1e} vs seed spread {at.std:.3f}{seeds}; {where} "
        f"{fmt_lr(lr)}; n={len(d)})",
        REPRODUCED if found == invariant else NOT_REPRODUCED,
    )


# ----------------------------------------------------------------------------- claims


class Finder:
    """Curves of both budgets, on each section's own seeds."""

    def __init__(self, res: Results, grid: Grid) -> None:
        self.res, self.grid = res, grid

    def short(self, **fields: Any) -> Curve | None:
        fields.setdefault("width", self.grid.width)
        fields.setdefault("depth", self.grid.depth)
        c = self.res.find(budget=self.grid.budget, **fields)
        return c if c is not None and c.best() is not None else None

    def long(self, method: str, rank: int | None, gauge: float = 1.0) -> Curve | None:
        c = long_curve(self.res, self.grid, method, rank, gauge)
        return c if c is not None and c.best() is not None else None

    def study(
        self, method: str, rank: int | None, rates: Sequence[float] = (), **fields: Any
    ) -> Curve | None:
        """A curve of sections (ix)–(xi): section (vii)'s seeds, its own ``rates``."""
        c = study_curve(self.res, self.grid, method, rank, **fields)
        c = c.on_seeds(self.grid.long.seeds, rates) if c else None
        return c if c is not None and c.best() is not None else None

    def pending(self, section: str) -> Cell:
        return pending(self.res, self.grid, section)

    def complete(self, section: str) -> bool:
        """Has ``section`` run every run it plans (and planned any)?"""
        done, planned = progress(section, self.grid, self.res.runs)
        return planned > 0 and done >= planned


def _transfer(f: Finder, curves: dict[str, Curve | None], section: str) -> Cell:
    have = {k: c for k, c in curves.items() if c is not None}
    return shared_rate(have) if len(have) >= 2 else f.pending(section)


def rank_claim(f: Finder) -> Claim:
    g = f.grid
    short = {f"r={r}": f.short(method="lora_muon", rank=r) for r in g.ranks}
    ranks = sorted({r for m, r, _ in g.long.curves if m == "lora_muon"})
    long = {f"r={r}": f.long("lora_muon", r) for r in ranks}
    return Claim(
        "LoRA-Muon's best rate transfers across rank",
        f"claimed; the source gives no per-rank optima (rank 2: {PAPER['rank2_best_lr']:g})",
        _transfer(f, short, "rank"),
        _transfer(f, long, "long"),
    )


def proxy_claim(f: Finder) -> Claim:
    dense, r2 = f.short(method="dense_muon"), f.short(method="lora_muon", rank=2)
    short = proxy_cell(dense, r2, "rank 2") if dense and r2 else f.pending("lr")
    dense, r2 = f.long("dense_muon", None), f.long("lora_muon", 2)
    vii = proxy_cell(dense, r2, "rank 2") if dense and r2 else f.pending("long")
    test = report_proxy.tests(f.res, f.grid).get(("lora_muon", 2))
    if test is None:
        viii = f.pending("proxy")
    else:
        viii = Cell(
            f"optimum ratio {test.ratio.value:.2f} [{test.ratio.lo:.2f}, {test.ratio.hi:.2f}], "
            f"TOST p = {test.tost_p:.3f}, n={test.n}",
            POWERED[test.verdict],
        )
    return Claim(
        "The rank-2 proxy's best rate is dense Muon's",
        f"{PAPER['rank2_best_lr']:g} and {PAPER['dense_best_lr']:g}: equal",
        short,
        Cell(
            f"Section (vii): {vii.ours}. Powered test, section (viii): {viii.ours}",
            f"(vii) {vii.verdict}; (viii) {viii.verdict}",
        ),
    )


class Rank32(NamedTuple):
    """The largest headline rank against dense Muon: short budget, width 64 and 128."""

    rank: int
    short: Cell
    vii: Cell  # section (vii)'s width
    ix: Cell  # the paper's width (section ix)


def rank32_cells(f: Finder) -> Rank32:
    hi, g = max(f.grid.headline_ranks), f.grid
    dense, top = f.short(method="dense_muon"), f.short(method="lora_muon", rank=hi)
    short = diff_cell(dense, top) if dense and top else f.pending("lr")
    dense, top = f.long("dense_muon", None), f.long("lora_muon", hi)
    vii = diff_cell(dense, top) if dense and top else f.pending("long")
    wide = g.long_study.wide
    dense, top = f.study("dense_muon", None, width=wide), f.study("lora_muon", hi, width=wide)
    ix = diff_cell(dense, top) if dense and top and f.complete("width128") else None
    return Rank32(hi, short, vii, ix or f.pending("width128"))


def rank32_claim(f: Finder) -> Claim:
    """Rank ``r`` minus dense: at width 64 (section vii) and the paper's width 128 (ix)."""
    c, g = rank32_cells(f), f.grid
    return Claim(
        f"Rank {c.rank} beats dense Muon (val loss, rank {c.rank} minus dense, each at its "
        "best rate)",
        f"{PAPER['rank32_val'] - PAPER['dense_val']:+.3f} ({PAPER['rank32_val']} vs "
        f"{PAPER['dense_val']}, width 128)",
        c.short,
        Cell(
            f"Width {g.long.width} (rank {c.rank} of {g.long.width}), section (vii): "
            f"{c.vii.ours}. Width {g.long_study.wide} (rank {c.rank} of "
            f"{g.long_study.wide}), section (ix): {c.ix.ours}",
            f"(vii) {c.vii.verdict}; (ix) {c.ix.verdict}",
        ),
    )


def _decay_points(f: Finder, method: str, rank: int | None) -> dict[float, Point] | None:
    """Loss at each decay λ (0 included), at the method's best proxy rate, section (vii)'s seeds."""
    lr = decay_lr(f.grid, index_results(f.res.runs), method, rank)
    if lr is None:
        return None
    s = f.grid.long_study
    points = {
        wd: at_seeds(
            study_curve(f.res, f.grid, method, rank, weight_decay=wd), lr, f.grid.long.seeds
        )
        for wd in (0.0, *s.decays)
    }
    return {wd: p for wd, p in points.items() if p is not None and not p.diverged} or None


def decay_cell(dense: dict[float, Point], r2: dict[float, Point]) -> Cell:
    """Dense Muon at rank 2's best decay λ against its own best λ (a rate-like claim).

    Each method's best λ has the lowest seed-mean loss; the cost is dense Muon's loss at
    rank 2's best λ minus its loss at its own, judged against the seed spread as the rate
    claims are (:func:`by_spread`).
    """
    best_d = min(dense, key=lambda wd: dense[wd].mean)
    best_r = min(r2, key=lambda wd: r2[wd].mean)
    n = min(len(p.losses) for p in (*dense.values(), *r2.values()))
    at = dense.get(best_r)
    if at is None:
        return Cell(f"dense Muon has no finite run at λ = {best_r:g}", INCONCLUSIVE)
    cost, spread = at.mean - dense[best_d].mean, max(at.std, dense[best_d].std)
    return Cell(
        f"best λ: dense Muon {best_d:g}, rank 2 {best_r:g}; dense Muon at rank 2's λ "
        f"{cost:+.3f} nats (spread {spread:.3f}); n={n}",
        by_spread(cost, spread, n),
    )


def decay_claim(f: Finder) -> Claim:
    """Does rank 2's best split weight decay carry over to dense Muon (section xii)?"""
    name = "The split decay's best λ transfers from LoRA-Muon rank 2 to dense Muon"
    paper = "not in the source: the study's own question"
    short = Cell("not run at this budget", "–")
    dense, r2 = _decay_points(f, "dense_muon", None), _decay_points(f, "lora_muon", 2)
    if not (f.complete("wd_long") and dense and r2):
        return Claim(name, paper, short, f.pending("wd_long"))
    return Claim(name, paper, short, decay_cell(dense, r2))


def _short_gauge(f: Finder, method: str, invariant: bool, paper: float | None = None) -> Cell:
    """Section (iii)'s gauge ×9 (or its largest) at the method's own best rate."""
    r, g = f.grid.gauge_rank, f.grid.gauges
    c = 9.0 if 9.0 in g else max(g)
    base, moved = f.short(method=method, rank=r), f.short(method=method, rank=r, gauge=c)
    cell = None
    if base and moved:
        where = f"×{c:g}, rank {r}, its own best rate"
        cell = gauge_cell(base, moved, base.best().lr, invariant, where, paper)
    return cell or f.pending("gauge")


def _long_gauge(f: Finder, method: str, invariant: bool, paper: float | None = None) -> Cell:
    """Section (vii)'s gauge pair, at rank-2 LoRA-Muon's best rate."""
    g = f.grid.long
    base, moved = f.long(method, g.gauge_rank), f.long(method, g.gauge_rank, g.gauge)
    cell = None
    if base and moved:
        lr = next(iter(moved.runs))[0]
        where = f"×{g.gauge:g}, rank {g.gauge_rank}, {label('lora_muon', g.gauge_rank)}'s best rate"
        cell = gauge_cell(base, moved, lr, invariant, where, paper)
    return cell or f.pending("long")


def lora_gauge_claim(f: Finder) -> Claim:
    return Claim(
        "LoRA-Muon is gauge invariant (loss change under gauge ×9)",
        f"{PAPER['lora_muon_gauge9']:+.1e}",
        _short_gauge(f, "lora_muon", True),
        _long_gauge(f, "lora_muon", True),
    )


def _own_rate_gauge(f: Finder, paper: float) -> Cell:
    """Spectron's gauge at its own best rate: section (xi)'s gauge study."""
    s = f.grid.long_study
    lr = peer_gauge_lr(f.grid, index_results(f.res.runs))
    own = next((lrs for m, _, lrs in s.peer_curves if m == s.gauge_method), ())
    base = f.study(s.gauge_method, s.gauge_rank, own)
    moved = f.study(s.gauge_method, s.gauge_rank, gauge=s.gauge)
    cell = None
    if lr is not None and base and moved:
        where = f"×{s.gauge:g}, rank {s.gauge_rank}, its own best rate"
        cell = gauge_cell(base, moved, lr, False, where, paper)
    return cell or f.pending("peers_long")


def spectron_gauge_claim(f: Finder) -> Claim:
    """Section (vii) measures Spectron at LoRA-Muon's rate; section (xi) at its own."""
    paper = PAPER["spectron_gauge9"]
    vii, own = _long_gauge(f, "spectron", False, paper), _own_rate_gauge(f, paper)
    return Claim(
        "Spectron is not gauge invariant (loss change under gauge ×9)",
        f"{paper:+.1e}",
        _short_gauge(f, "spectron", False, paper),
        Cell(
            f"(vii), at LoRA-Muon's rate, not Spectron's own: {vii.ours}. (xi), at "
            f"Spectron's own best rate: {own.ours}",
            f"(vii) {vii.verdict}; (xi) {own.verdict}",
        ),
    )


def shape_claim(f: Finder) -> Claim:
    g, s = f.grid, f.grid.long_study
    r = g.shape_rank
    shapes = dict.fromkeys([(w, g.depth) for w in g.widths] + [(g.width, d) for d in g.depths])
    short = {
        f"w={w} d={d}": f.short(method="lora_muon", rank=r, width=w, depth=d) for w, d in shapes
    }
    lr_rank, own = next(((k, lrs) for m, k, lrs in s.shape_curves if m == "lora_muon"), (r, ()))
    shapes = dict.fromkeys(((g.long.width, g.long.depth), *s.shapes))
    long = {f"w={w} d={d}": f.study("lora_muon", lr_rank, own, width=w, depth=d) for w, d in shapes}
    cell = _transfer(f, long, "shape_long")
    done, planned = progress("shape_long", g, f.res.runs)
    if cell.verdict != PENDING and done < planned:
        cell = Cell(f"{cell.ours} (partial: {done} of {planned} runs)", cell.verdict)
    first = _transfer(f, short, "shape")
    return Claim(
        "LoRA-Muon's best rate transfers across width and depth",
        "claimed; the source gives no optima",
        Cell(f"rank {r}: {first.ours}", first.verdict),
        Cell(f"rank {lr_rank}: {cell.ours}", cell.verdict),
    )


def claims(res: Results, grid: Grid) -> list[Claim]:
    """Every row of the claim table."""
    f = Finder(res, grid)
    return [
        rank_claim(f),
        proxy_claim(f),
        rank32_claim(f),
        lora_gauge_claim(f),
        spectron_gauge_claim(f),
        shape_claim(f),
        decay_claim(f),
    ]


# ----------------------------------------------------------------------------- the page


def table(rows: Sequence[Claim]) -> list[str]:
    out = [
        "| # | claim | paper's figure (secondary source) | ours, short budget | verdict, "
        "short | ours, long budget | verdict, long |",
        "|---|---|---|---|---|---|---|",
    ]
    for i, c in enumerate(rows, 1):
        out.append(
            f"| {i} | {c.claim} | {c.paper} | {c.short.ours} | **{c.short.verdict}** | "
            f"{c.long.ours} | **{c.long.verdict}** |"
        )
    return out


README_BEGIN, README_END = "<!-- study-claims:begin -->", "<!-- study-claims:end -->"


def readme_block(rows: Sequence[Claim], runs: int) -> str:
    """The README's study headline: each claim's verdict at both budgets."""
    out = [
        f"From {runs} committed runs; the figures behind each verdict are in "
        "[docs/lr_transfer.md](docs/lr_transfer.md).",
        "",
        "| # | claim | short budget (200 steps) | long budget (1,000 steps) |",
        "|---|---|---|---|",
    ]
    out += [
        f"| {i} | {c.claim} | {c.short.verdict} | {c.long.verdict} |" for i, c in enumerate(rows, 1)
    ]
    return "\n".join(out)


def replace_readme_block(text: str, block: str) -> str:
    """``text`` with what stands between the study-claims markers replaced by ``block``."""
    start, end = text.index(README_BEGIN) + len(README_BEGIN), text.index(README_END)
    return text[:start] + "\n" + block + "\n" + text[end:]


def rules() -> list[str]:
    """How each verdict is reached, and what the comparisons are matched on."""
    return [
        f"**Verdicts.** The seed spread is the larger sample standard deviation over seeds "
        f"of the losses compared; with fewer than {MIN_SEEDS} seeds there is none, and the "
        f"verdict is *{INCONCLUSIVE}*. *Rate claims* (1, 2, 6; on each section's grid of "
        f"rates, steps of ×2): a curve's cost is its loss at a common rate minus its loss "
        f"at its own best; *{REPRODUCED}* when one rate every curve ran costs each of them at most "
        f"its spread (claim 2: dense Muon at the rank-2 optimum), *{NOT_REPRODUCED}* when "
        f"every such rate costs some curve more than {DECIDES} spreads, otherwise "
        f"*{INCONCLUSIVE}*. *Loss claims* (3): the difference of the seed means, each model "
        f"at its best rate, decides when it exceeds {DECIDES} spreads and every seed's "
        f"difference has its sign (*{REPRODUCED}* in the paper's direction, *"
        f"{NOT_REPRODUCED}* against it), otherwise *{INCONCLUSIVE}*. *Gauge claims* (4, 5): "
        f"a method is gauge invariant when no seed's loss moves under the gauge (paired by "
        f"seed) by more than 1/{GAUGE_SHARE} of the seed spread at that rate; the claim is "
        f"*{REPRODUCED}* when that matches it, else *{NOT_REPRODUCED}*. Section (viii)'s "
        f"powered test (optima fitted per seed, equivalence within ×√2 by TOST) maps *"
        f"{SHOWN}* to *{REPRODUCED}*, *{REFUTED}* to *{NOT_REPRODUCED}*. *{PENDING}*: the "
        f"section has not run what the row needs.",
        "",
        "**Matched on steps and tokens, not compute.** At a budget every method runs the "
        "same steps, batch and sequence length and, per seed, sees the same batches: "
        "runs are step- and token-matched. They are not compute-matched (equal "
        "floating-point operations or wall time per method): a rank-r step costs less "
        "than a dense one, and LiMuon takes a second backward pass per step. No claim on "
        "this page is made at matched compute.",
    ]


def section_claims(rep: Report) -> None:
    """The claim table, its rules and what the runs are matched on."""
    rep.add(
        "## The paper's claims: verdicts at both budgets",
        "",
        "The paper's figures come from a secondary source "
        "([Sources](algorithm.md#sources); kept in `benchmarks/study/labels.py`), not from "
        "the paper's text, and were not checked against the PDF. Ours come from the "
        "sections named; every cell is computed from the results.",
        "",
        *table(claims(rep.res, rep.grid)),
        "",
        *rules(),
        "",
    )
