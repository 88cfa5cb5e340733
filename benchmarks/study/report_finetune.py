"""Section (vi) of the report: zero-init fine-tuning on a frozen dense base."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks.study import figures
from benchmarks.study.aggregate import Curve, fmt, fmt_lr, mean_std
from benchmarks.study.labels import METHOD_LABELS

if TYPE_CHECKING:
    from benchmarks.study.report import Report


def variant_name(method: str, init: str, reb: int) -> str:
    return f"{METHOD_LABELS[method]} {init}" + (f" +rebalance/{reb}" if reb else "")


def finetune_fields(rep: Report) -> dict[str, Any]:
    """The fields every fine-tuning curve of the report's grid shares."""
    return dict(
        task="finetune",
        base_steps=rep.b.steps * rep.grid.ft_base_steps_factor,
        base_lr=rep.grid.ft_base_lr,
    )


def ft_curve(rep: Report, variant: tuple[str, str, int], rank: int) -> Curve | None:
    method, init, reb = variant
    return rep.curve(method=method, rank=rank, init=init, rebalance=reb, **finetune_fields(rep))


def _ratio_row(rank: int, label: str, c: Curve | None) -> tuple[str | None, list, dict]:
    """The table row of one variant, its ratio curves, and the base losses it saw."""
    best = c.best() if c else None
    if best is None:
        return None, [], {}
    recs = c.records_at(best.lr)
    lnr = [rec.get("log_norm_ratio") or {} for rec in recs]
    base = {k: rec[k] for rec in recs for k in ("base_task_val_loss", "base_val_loss") if k in rec}
    m_abs = np.mean([x.get("mean_abs", np.nan) for x in lnr]) if lnr else np.nan
    m_init = np.mean([x.get("init_mean_abs", np.nan) for x in lnr]) if lnr else np.nan
    m_max = np.max([x.get("max_abs", np.nan) for x in lnr]) if lnr else np.nan
    row = (
        f"| {rank} | {label} | {fmt_lr(best.lr)} | {mean_std(best)} | "
        f"{m_abs:.2f} ({m_init:.2f}) | {m_max:.2f} |"
    )
    return row, [rec["ratio_curve"] for rec in recs if rec.get("ratio_curve")], base


def _transfer_rows(rep: Report) -> list[str]:
    lo, hi = rep.grid.ft_ranks[0], rep.grid.ft_ranks[-1]
    rows = [
        f"| variant | best LR r={lo} | best LR r={hi} | ratio | val loss r={hi} at "
        f"r={lo}'s best LR − at its own best |",
        "|---|---|---|---|---|",
    ]
    for v in rep.grid.ft_variants:
        c_lo, c_hi = ft_curve(rep, v, lo), ft_curve(rep, v, hi)
        b_lo = c_lo.best() if c_lo else None
        b_hi = c_hi.best() if c_hi else None
        if b_lo is None or b_hi is None:
            rows.append(
                f"| {variant_name(*v)} | {fmt_lr(b_lo and b_lo.lr)} | "
                f"{fmt_lr(b_hi and b_hi.lr)} | – | – |"
            )
            continue
        at = c_hi.at(b_lo.lr)
        pen = "–" if at is None or at.diverged else f"{at.mean - b_hi.mean:+.3f}"
        rows.append(
            f"| {variant_name(*v)} | {fmt_lr(b_lo.lr)} | {fmt_lr(b_hi.lr)} | "
            f"{b_hi.lr / b_lo.lr:.3g} | {pen} |"
        )
    return rows


def section_finetune(rep: Report) -> None:
    """Loss vs rate per rank, the factor-norm ratio at each best rate, rank transfer."""
    ranks = rep.grid.ft_ranks
    fig, axes = figures.plt().subplots(2, len(ranks), figsize=(5.5 * len(ranks), 8), squeeze=False)
    rows = [
        "| rank | variant | best LR | val loss at best LR | mean abs log(σa/σb) at end "
        "(start) | max abs at end |",
        "|---|---|---|---|---|---|",
    ]
    base: dict[str, float] = {}
    for j, r in enumerate(ranks):
        curves = [(variant_name(*v), ft_curve(rep, v, r)) for v in rep.grid.ft_variants]
        figures.plot_curves(axes[0][j], curves, title=f"fine-tuning, rank {r}")
        ratio_rows = []
        for i, (label, c) in enumerate(curves):
            row, rc, seen = _ratio_row(r, label, c)
            if row is not None:
                rows.append(row)
                base.update(seen)
                if rc:
                    ratio_rows.append((i, label, rc))
        figures.plot_ratio_curves(
            axes[1][j],
            ratio_rows,
            rep.b.steps,
            f"factor-norm ratio at each variant's best LR, rank {r}",
        )
    figures.save(fig, rep.plot_dir / "finetune.png")
    fields = finetune_fields(rep)
    rep.add(
        "## (vi) Zero-init fine-tuning on a frozen dense base",
        "",
        f"A dense base (width {rep.w}, depth {rep.d}) is pretrained with dense Muon "
        f"(LR {rep.grid.ft_base_lr:g}, {fields['base_steps']} steps, seed 0; val loss "
        f"{fmt(base.get('base_val_loss'))}), frozen, and adapters on all its block matrices "
        "are trained on a shifted task: the same corpus upper-cased (the embeddings and head "
        "stay frozen, so the adapters must steer the model to the upper-case symbols; the "
        f"base's loss on it is {fmt(base.get('base_task_val_loss'))}). Budget as above "
        f"({rep.b.steps} steps). Inits: Flax's (`a` He-uniform, `b = 0`), or "
        "`lora_muon_jax.nnx.balance_lora_init` (both factors non-zero with equal spectral "
        "norm `sqrt(0.1)`, their product absorbed into the frozen kernel so the model is "
        "unchanged). Rebalancing: `lora_muon(rebalance=GaugeRebalance(every=10))`.",
        "",
    )
    rep.image("finetune.png", "fine-tuning: val loss vs LR and the factor-norm ratio")
    rep.add(*rows, "")
    if len(ranks) >= 2:
        rep.add("Rank transfer of the fine-tuning rate:", "", *_transfer_rows(rep), "")
