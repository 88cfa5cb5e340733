"""The report's plots (matplotlib, Agg): val loss vs rate, curves over steps.

Stars mark each curve's best rate; error bars are ± one standard deviation over
seeds; crosses on a panel's top edge are diverged runs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.study.aggregate import Curve, fmt_lr


def plt() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def lr_ticks(ax: Any, axis: str = "x") -> None:
    import matplotlib.ticker as ticker

    fmt = ticker.FuncFormatter(lambda v, _: f"{v:.4g}")
    getattr(ax, f"{axis}axis").set_major_formatter(fmt)
    getattr(ax, f"{axis}axis").set_minor_formatter(ticker.NullFormatter())


def legend(ax: Any) -> None:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7)


def save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt().close(fig)


def _ylim(ax: Any, curves: Sequence[tuple[str, Curve | None]], tops: list[float]) -> None:
    lo = min(
        min(p.mean for p in c.points() if not p.diverged)
        for _, c in curves
        if c is not None and any(not p.diverged for p in c.points())
    )
    hi = min(max(tops), lo + 1.2)
    ax.set_ylim(lo - 0.03, hi + 0.03)


def plot_curves(
    ax: Any,
    curves: Sequence[tuple[str, Curve | None]],
    *,
    title: str,
    ylim: tuple[float, float] | None = None,
    style: Callable | None = None,
) -> None:
    """Seed mean ± std of the final val loss vs LR; diverged points as crosses on top."""
    tops: list[float] = []
    pending_bad = []
    for i, (label, c) in enumerate(curves):
        if c is None:
            continue
        pts = c.points()
        kw = style(i, label) if style else {}
        ok = [p for p in pts if not p.diverged]
        color = kw.get("color")
        if ok:
            line = ax.errorbar(
                [p.lr for p in ok],
                [p.mean for p in ok],
                yerr=[p.std for p in ok],
                marker="o",
                ms=3.5,
                capsize=2,
                label=f"{label} (n={c.seeds()})",
                **kw,
            )
            color = line[0].get_color()
            best = c.best()
            if best is not None:
                ax.plot([best.lr], [best.mean], marker="*", ms=11, color=color, zorder=5)
            tops.extend(p.mean + p.std for p in ok)
        bad = [p for p in pts if p.diverged]
        if bad:
            pending_bad.append((bad, color))
    ax.set_xscale("log", base=2)
    lr_ticks(ax)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("final val loss (nats/char)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ylim:
        ax.set_ylim(*ylim)
    elif tops:
        _ylim(ax, curves, tops)
    y = ax.get_ylim()[1]
    for bad, color in pending_bad:
        ax.plot([p.lr for p in bad], [y] * len(bad), "x", color=color, ms=8, clip_on=False)
    legend(ax)


def plot_training_curves(ax: Any, curves: Sequence[tuple[str, Curve | None]], steps: int) -> None:
    """Seed-mean training loss per chunk at each curve's best rate."""
    for i, (label, c) in enumerate(curves):
        best = c.best() if c else None
        if best is None:
            continue
        arr = np.array(
            [[np.nan if x is None else x for x in r["curve"]] for r in c.records_at(best.lr)], float
        )
        xs = (np.arange(arr.shape[1]) + 0.5) * steps / arr.shape[1]
        ax.plot(
            xs,
            np.nanmean(arr, 0),
            "o-",
            ms=3,
            color=f"C{i}",
            label=f"{label}, LR {fmt_lr(best.lr)}",
        )
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (chunk mean, seed mean)")
    ax.set_title("training curves at each curve's best LR", fontsize=10)
    ax.grid(alpha=0.3)
    legend(ax)


def plot_best_vs_rank(
    ax: Any, ranks: Sequence[int], curves: Sequence[Curve | None], dense: Curve | None
) -> None:
    """Best rate (left axis) and the loss there (right axis) against the rank."""
    rows = [
        (r, c.best()) for r, c in zip(ranks, curves, strict=False) if c is not None and c.best()
    ]
    if not rows:
        return
    ax.plot([r for r, _ in rows], [b.lr for _, b in rows], "o-", label="best LR (LoRA-Muon)")
    db = dense.best() if dense else None
    if db:
        ax.axhline(db.lr, color="black", ls="--", label="best LR (dense Muon)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    lr_ticks(ax, "y")
    lr_ticks(ax, "x")
    ax.set_xlabel("rank")
    ax.set_ylabel("best learning rate")
    ax2 = ax.twinx()
    ax2.plot(
        [r for r, _ in rows],
        [b.mean for _, b in rows],
        "s:",
        color="tab:red",
        label="val loss at best LR",
    )
    ax2.set_ylabel("val loss at best LR", color="tab:red")
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title("best rate and loss vs rank", fontsize=10)


def plot_ratio_curves(
    ax: Any, rows: Sequence[tuple[int, str, list[list[float | None]]]], steps: int, title: str
) -> None:
    """Mean |log σmax(a)/σmax(b)| over pairs per chunk, seed mean, one line per variant."""
    for i, label, rc in rows:
        arr = np.array([[np.nan if x is None else x for x in v] for v in rc], float)
        xs = (np.arange(arr.shape[1]) + 1) * steps / arr.shape[1]
        ax.plot(xs, np.nanmean(arr, 0), "o-", ms=3, label=label, color=f"C{i}")
    ax.set_yscale("symlog", linthresh=1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("mean |log σmax(a)/σmax(b)| over pairs")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    legend(ax)


def plot_rate_ratios(ax: Any, pairs: Sequence[Any]) -> None:
    """Observed η*_dense/η*_r against rank per budget, with the Frobenius rule's line."""
    for i, name in enumerate(dict.fromkeys(p.budget for p in pairs)):
        group = [p for p in pairs if p.budget == name and p.ratio]
        if not group:
            continue
        ranks = [p.rank for p in group]
        ax.plot(ranks, [p.ratio for p in group], "o-", color=f"C{i}", label=f"observed, {name}")
        k = group[0].k
        ax.plot(
            ranks,
            [(2 * r / k) ** 0.5 for r in ranks],
            ":",
            color=f"C{i}",
            label=f"Frobenius rule √(2r/{k}), {name}",
        )
    ax.axhline(1.0, color="black", lw=0.8, ls="--", label="identity (the paper)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    lr_ticks(ax, "x")
    lr_ticks(ax, "y")
    ax.set_xlabel("LoRA rank r")
    ax.set_ylabel("fitted η*_dense / η*_r")
    ax.set_title("dense-to-LoRA optimum ratio vs rank", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    legend(ax)
