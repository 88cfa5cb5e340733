"""Writes ``docs/lr_transfer.md`` and its plots from the cached study results.

    python -m benchmarks.study.report                       # committed cache -> docs/, README
    python -m benchmarks.study.report --results FILE --out DIR/lr_transfer.md

Nothing is trained here: every number comes from the results JSON written by
:mod:`benchmarks.study.lr_transfer`, the Discussion's included
(:mod:`benchmarks.study.discussion` computes its figures from the results).
Seed statistics are means with the sample standard deviation over the seeds that
ran; a diverged run makes its point's mean infinite (it is drawn as a cross at
the top of its panel, never dropped). The long-budget section is written by
:mod:`benchmarks.study.report_long`.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import registry
from benchmarks.study import discussion as disc
from benchmarks.study import (
    figures,
    report_claims,
    report_finetune,
    report_intro,
    report_long,
    report_long_study,
    report_proxy,
    version,
)
from benchmarks.study.aggregate import Curve, Results, curve_table, fmt_lr, mean_std
from benchmarks.study.aggregate import paired_deltas as paired_deltas
from benchmarks.study.configs import (
    ALL_SECTIONS,
    FULL,
    SECTION_TITLES,
    Grid,
    RunConfig,
    describe,
    grid_from_dict,
)
from benchmarks.study.labels import METHOD_LABELS
from benchmarks.study.labels import PAPER as PAPER
from benchmarks.study.lr_transfer import DEFAULT_RESULTS, REPO
from benchmarks.study.planning import index_results, plan_section
from benchmarks.study.store import load_results

DOCS = REPO / "docs"
DEFAULT_OUT = DOCS / "lr_transfer.md"
README = REPO / "README.md"


class Report:
    def __init__(
        self,
        res: Results,
        out: Path,
        plot_dir: Path,
        grid: Grid,
        head: dict[str, Any] | None = None,
    ) -> None:
        self.res, self.out, self.plot_dir, self.grid = res, out, plot_dir, grid
        # The code version runs are compared with (``version.head_version()``).
        self.head = version.head_version() if head is None else head
        self.lines: list[str] = []
        self.b = grid.budget
        self.w, self.d = grid.width, grid.depth

    def add(self, *lines: str) -> None:
        self.lines.extend(lines)

    def image(self, name: str, alt: str) -> None:
        rel = Path(self.plot_dir.name) / name
        self.add(f"![{alt}]({rel.as_posix()})", "")

    def curve(self, **fields: Any) -> Curve | None:
        fields.setdefault("width", self.w)
        fields.setdefault("depth", self.d)
        return self.res.find(budget=fields.pop("budget", self.b), **fields)

    def short_runs(self) -> list[dict[str, Any]]:
        """Records of sections i–vi: every run but those of the long section and its pilot."""
        skip = {id(r) for r in report_long.long_runs(self.res, self.grid)}
        return [r for r in self.res.runs.values() if id(r) not in skip and "wall_s" in r]

    # -------------------------------------------------------------- sections

    def pilot(self) -> None:
        rows = []
        for method, rank in (("dense_muon", None), ("lora_muon", self.grid.shape_rank)):
            for alr in self.grid.pilot_adam_lrs:
                c = self.curve(
                    budget=dataclasses.replace(self.b, adam_lr=alr), method=method, rank=rank
                )
                p = c.at(0.1) if c else None
                rows.append(
                    f"| {METHOD_LABELS[method]}{'' if rank is None else f' r={rank}'} "
                    f"| {alr:g} | {mean_std(p)} |"
                )
        self.add(
            "## Pilot: the AdamW rate of embeddings, head and norms",
            "",
            "Matrix rate 0.1 (the paper's optimum), one seed. The study fixes the AdamW rate "
            f"of these leaves at {self.b.adam_lr:g} for every method; this table shows how "
            "much the choice moves the loss.",
            "",
            "| model | AdamW rate | val loss |",
            "|---|---|---|",
            *rows,
            "",
        )

    def section_lr(self) -> None:
        plt = figures.plt()
        curves = [("dense Muon", self.curve(method="dense_muon"))]
        curves += [
            (f"LoRA-Muon r={r}", self.curve(method="lora_muon", rank=r))
            for r in self.grid.headline_ranks
        ]
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        figures.plot_curves(ax, curves, title=f"width {self.w}, depth {self.d}")
        figures.save(fig, self.plot_dir / "lr_sweep.png")
        fig, ax = plt.subplots(figsize=(6.5, 4.0))
        figures.plot_training_curves(ax, curves, self.b.steps)
        figures.save(fig, self.plot_dir / "curves.png")
        self.add("## (i) Learning-rate sweep: dense Muon vs rank-2 and rank-32 LoRA-Muon", "")
        self.image("lr_sweep.png", "val loss vs learning rate, dense Muon and LoRA-Muon")
        self.table(curves)
        self.image("curves.png", "training curves at the best learning rates")

    def table(
        self,
        curves: Sequence[tuple[str, Curve | None]],
        ref: Curve | None = None,
        ref_name: str = "",
    ) -> None:
        self.add(*curve_table(curves, ref, ref_name), "")

    def section_rank(self) -> None:
        plt = figures.plt()
        curves = [(f"r={r}", self.curve(method="lora_muon", rank=r)) for r in self.grid.ranks]
        dense = self.curve(method="dense_muon")
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        cmap = plt.get_cmap("viridis")
        n = len(curves)
        figures.plot_curves(
            axes[0],
            curves + [("dense", dense)],
            title="LoRA-Muon across rank",
            style=lambda i, _: (
                {"color": cmap(i / max(1, n - 1))} if i < n else {"color": "black", "ls": "--"}
            ),
        )
        figures.plot_best_vs_rank(axes[1], self.grid.ranks, [c for _, c in curves], dense)
        figures.save(fig, self.plot_dir / "rank.png")
        self.add("## (ii) Rank transfer", "")
        self.image("rank.png", "LoRA-Muon val loss vs learning rate for each rank")
        self.table(
            curves + [("dense Muon", dense)],
            ref=self.curve(method="lora_muon", rank=2),
            ref_name="rank 2",
        )

    def gauge_deltas(self, c: float) -> dict[str, str]:
        """Paired (same seed) loss change under gauge ``c`` at each method's c=1 best LR."""
        out = {}
        r = self.grid.gauge_rank
        for method in ("lora_muon", "spectron"):
            base = self.curve(method=method, rank=r)
            if not base or not base.best():
                continue
            lr = base.best().lr
            diffs = paired_deltas(base, self.curve(method=method, rank=r, gauge=c), lr)
            if diffs:
                out[method] = (
                    f"{np.mean(diffs):+.1e} (LR {fmt_lr(lr)}, rank {r}, "
                    f"n={len(diffs)}; max abs Δ {np.max(np.abs(diffs)):.1e})"
                )
        return out

    def section_gauge(self) -> None:
        plt = figures.plt()
        r = self.grid.gauge_rank
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), sharey=True)
        for ax, method in zip(axes, ("lora_muon", "spectron"), strict=False):
            curves = [
                (f"c={c:g}", self.curve(method=method, rank=r, gauge=c)) for c in self.grid.gauges
            ]
            figures.plot_curves(
                ax, curves, title=f"{METHOD_LABELS[method]}, rank {r}, gauge (c·a, b/c)"
            )
        figures.save(fig, self.plot_dir / "gauge.png")
        self.add(
            "## (iii) Gauge rescaling: LoRA-Muon vs Spectron",
            "",
            f"At initialization every pair is rescaled `a ← c·a`, `b ← b/c` (the model "
            f"function is unchanged); rank {r}. LoRA-Muon's step depends only on the "
            "factors' column and row spaces, so its trajectory should not change; "
            "Spectron's step size `η/(σ_a + σ_b + 1)` does.",
            "",
        )
        self.image("gauge.png", "val loss vs learning rate under gauge rescaling")
        rows = [
            "| method | c | best LR | val loss at best LR | Δ vs c=1 at c=1's best LR "
            "(paired, mean / max abs) |",
            "|---|---|---|---|---|",
        ]
        for method in ("lora_muon", "spectron"):
            base = self.curve(method=method, rank=r)
            lr1 = base.best().lr if base and base.best() else None
            for c in self.grid.gauges:
                cur = self.curve(method=method, rank=r, gauge=c)
                if cur is None:
                    rows.append(f"| {METHOD_LABELS[method]} | {c:g} | not run yet | | |")
                    continue
                best = cur.best()
                diffs = paired_deltas(base, cur, lr1) if lr1 is not None and c != 1.0 else []
                delta = f"{np.mean(diffs):+.2e} / {np.max(np.abs(diffs)):.2e}" if diffs else "–"
                rows.append(
                    f"| {METHOD_LABELS[method]} | {c:g} | {fmt_lr(best and best.lr)} | "
                    f"{mean_std(best)} | {delta} |"
                )
        self.add(*rows, "")

    def section_shape(self) -> None:
        plt = figures.plt()
        r = self.grid.shape_rank
        shapes = {
            "width": [(w, self.d, f"w={w}") for w in self.grid.widths],
            "depth": [(self.w, d, f"d={d}") for d in self.grid.depths],
        }
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        rows = []
        for ax, (kind, specs) in zip(axes, shapes.items(), strict=False):
            curves = []
            for w, d, tag in specs:
                curves.append((f"dense {tag}", self.curve(method="dense_muon", width=w, depth=d)))
                curves.append(
                    (
                        f"LoRA-Muon r={r} {tag}",
                        self.curve(method="lora_muon", rank=r, width=w, depth=d),
                    )
                )
            figures.plot_curves(
                ax,
                curves,
                title=f"{kind} transfer (dense Muon and rank-{r} LoRA-Muon)",
                style=lambda i, _: {"ls": "--" if i % 2 == 0 else "-", "color": f"C{i // 2}"},
            )
            rows += curves
        figures.save(fig, self.plot_dir / "shape.png")
        self.add("## (iv) Width and depth", "")
        self.image("shape.png", "val loss vs learning rate across width and depth")
        self.table(list(dict(rows).items()))

    def baseline_curves(self) -> list[tuple[str, Curve | None]]:
        ranks = self.grid.baseline_ranks
        return (
            [(f"AdamW-LoRA r={r}", self.curve(method="adamw_lora", rank=r)) for r in ranks]
            + [
                ("dense PSGD-Kron", self.curve(method="psgd_kron")),
                ("dense Muon (stock optax)", self.curve(method="dense_muon_optax")),
                ("dense Muon", self.curve(method="dense_muon")),
                (
                    f"dense LoRA-Pre Muon (momentum rank {registry.get('lora_pre_muon').rank})",
                    self.curve(method="lora_pre_muon"),
                ),
                (
                    f"dense LiMuon (momentum rank {registry.get('limuon').rank}, STORM)",
                    self.curve(method="limuon"),
                ),
            ]
            + [(f"Riemannion r={r}", self.curve(method="riemannion", rank=r)) for r in ranks]
            + [(f"LoRA-Muon r={r}", self.curve(method="lora_muon", rank=r)) for r in ranks]
        )

    def section_baselines(self) -> None:
        curves = self.baseline_curves()
        n_adam = len(self.grid.baseline_ranks) + 1
        n_dense = n_adam + 4
        fig, axes = figures.plt().subplots(1, 3, figsize=(16, 4.2), sharey=True)
        figures.plot_curves(
            axes[0], curves[:n_adam], title="Adam-like rates: AdamW-LoRA and PSGD-Kron"
        )
        figures.plot_curves(
            axes[1],
            curves[n_adam:n_dense],
            title="spectral rates, dense: Muon (±optax's shape factor), LoRA-Pre, LiMuon",
        )
        figures.plot_curves(
            axes[2], curves[n_dense:], title="spectral rates, low-rank: Riemannion and LoRA-Muon"
        )
        figures.save(fig, self.plot_dir / "baselines.png")
        self.add(
            "## (v) Baselines and the library's other peers",
            "",
            "Same protocol as above; every dense method acts on the block matrices only "
            "(embeddings, head and norms on the fixed-rate AdamW). LoRA-Pre Muon and LiMuon "
            "run without a shape factor (so `‖ΔW‖₂ ≈ η`, as dense Muon); LiMuon gets its "
            "STORM gradient (the same batch at the previous point) from the training loop, "
            "which costs a second backward pass per step.",
            "",
        )
        self.image("baselines.png", "val loss vs learning rate of the baselines")
        self.table(curves)

    def status(self) -> None:
        """Planned and recorded runs per section, with their code versions, and errors."""
        rows = [
            "| section | planned runs | done | diverged | errors | code: HEAD's / other / "
            "unversioned |",
            "|---|---|---|---|---|---|",
        ]
        runs = self.res.runs
        index = index_results(runs)
        for s in ALL_SECTIONS:
            keys = [c.key() for c in plan_section(s, self.grid, index)]
            done = [runs[k] for k in keys if k in runs]
            code = version.version_counts(done, self.head)
            rows.append(
                f"| {SECTION_TITLES[s]} | {len(keys)} | {len(done)} | "
                f"{sum(r.get('status') == 'diverged' for r in done)} | "
                f"{sum(r.get('status') == 'error' for r in done)} | "
                f"{code.get(version.CURRENT, 0)} / {code.get(version.DIFFERENT, 0)} / "
                f"{code.get(version.UNVERSIONED, 0)} |"
            )
        self.add("## Sweep status", "", *rows, "", *self.code_versions(), "")
        if self.res.errors:
            self.add("Errors (first 5):", "")
            for r in self.res.errors[:5]:
                self.add(f"* `{describe(RunConfig.from_dict(r['config']))}`: {r.get('error', '')}")
            self.add("")

    def code_versions(self) -> list[str]:
        """Which code trained the runs: ``HEAD``'s, other versions (flagged), unversioned."""
        head = self.head
        others: dict[tuple, int] = {}
        unversioned = 0
        for rec in self.res.runs.values():
            kind = version.classify(rec, head)
            if kind == version.DIFFERENT:
                code = rec["code"]
                k = (code["source"], code.get("commit") or "no commit", bool(code.get("dirty")))
                others[k] = others.get(k, 0) + 1
            unversioned += kind == version.UNVERSIONED
        commit = (head.get("commit") or "no git")[:10]
        out = [
            f"**Code versions.** `HEAD` ({commit}): source hash `{head['source']}` (the "
            "optimizers, the example model and data, the registry and the study's training "
            "code; `benchmarks/study/version.py`)."
        ]
        for (src, c, dirty), n in sorted(others.items(), key=lambda kv: -kv[1]):
            state = ", uncommitted changes" if dirty else ""
            out.append(
                f"* ⚠ {n} runs by other code than `HEAD`'s: source `{src}` "
                f"(commit {c[:10]}{state})."
            )
        if unversioned:
            out.append(
                f"* {unversioned} runs unversioned (recorded before runs stored their code "
                "version)."
            )
        return out

    def write(self, discussion: bool = True) -> str:
        report_intro.header(self)
        report_claims.section_claims(self)
        report_intro.headline(self)
        if discussion:
            self.add("## Discussion", "", *disc.discussion(self.res, self.grid), "")
        self.pilot()
        self.section_lr()
        self.section_rank()
        self.section_gauge()
        self.section_shape()
        self.section_baselines()
        report_finetune.section_finetune(self)
        report_long.section_long(self)
        report_proxy.section_proxy(self)
        report_long_study.sections(self)
        self.status()
        text = "\n".join(self.lines).rstrip() + "\n"
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.out.write_text(text)
        return text


def grid_of(data: dict[str, Any]) -> Grid:
    """The grid the sweep ran with (budget overrides included); the full preset otherwise."""
    grid = grid_from_dict(data["meta"]["grid"]) if "grid" in data["meta"] else FULL
    same = dataclasses.replace(grid, seeds=FULL.seeds, long=FULL.long, long_study=FULL.long_study)
    if same == FULL:
        # The full study, whichever `--seeds` its last resumed slice ran with.
        grid = dataclasses.replace(FULL, long=grid.long, long_study=grid.long_study)
    return grid


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.study.report", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="markdown file to write")
    p.add_argument(
        "--no-discussion",
        action="store_true",
        help="leave out the generated discussion (for partial result files)",
    )
    args = p.parse_args(argv)
    data = load_results(args.results)
    res = Results(data)
    plot_dir = args.out.parent / args.out.stem
    grid = grid_of(data)
    Report(res, args.out, plot_dir, grid).write(not args.no_discussion)
    print(f"wrote {args.out} and {plot_dir}/")
    if args.results == DEFAULT_RESULTS and args.out == DEFAULT_OUT:
        block = report_claims.readme_block(report_claims.claims(res, grid), len(data["runs"]))
        README.write_text(report_claims.replace_readme_block(README.read_text(), block))
        print(f"wrote the study block of {README}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
