"""Turns a ``benchmarks.run`` results JSON into PNG plots and markdown tables.

Usage::

    python -m benchmarks.plots benchmarks/results/cpu.json [--outdir docs/benchmarks]

Writes ``sweeps.png`` (step time vs m = n, r and layers) and ``tables.md`` (the
README tables) next to each other, and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def _ms(entry: dict[str, Any] | None) -> float | None:
    return None if entry is None else entry["median_ms"]


def _fmt_bytes(b: float | None) -> str:
    if b is None:
        return "—"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if b < 1024 or unit == "GiB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.1f} {unit}"
        b /= 1024
    return str(b)


def targets_table(results: dict[str, Any]) -> str:
    rows = results.get("targets") or []
    if not rows:
        return ""
    lora_names = [k for k in rows[0]["lora"] if k != "adamw"]
    head = "| L, m, n, r | AdamW ms | " + " | ".join(f"{k} ms (×AdamW)" for k in lora_names)
    head += " | dense Muon ms (÷LoRA-Muon) | roofline AdamW / LoRA-Muon ms |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        c, lora = row["config"], row["lora"]
        ad = _ms(lora["adamw"])
        cells = [f"{c['layers']}, {c['m']}, {c['n']}, {c['r']}", f"{ad:.2f}"]
        for k in lora_names:
            cells.append(f"{_ms(lora[k]):.2f} ({_ratio(lora[k], lora['adamw']):.2f}×)")
        dense = row.get("dense", {})
        # Stock optax Muon; results written before the catalogue keyed it "dense_muon".
        stock = dense.get("dense_muon_optax", dense.get("dense_muon"))
        dm, lm = _ms(stock), _ms(lora["lora_muon"])
        cells.append(f"{dm:.0f} (÷{dm / lm:.0f})" if dm else "—")  # type: ignore[operator]
        rf = row.get("roofline_ms", {})
        cells.append(f"{rf.get('adamw', 0):.3f} / {rf.get('lora_muon', 0):.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ratio(entry: dict[str, Any], base: dict[str, Any]) -> float:
    # Median of per-round ratios when recorded (robust to machine drift).
    return entry.get("ratio_to_first") or entry["median_ms"] / base["median_ms"]


def models_table(results: dict[str, Any]) -> str:
    """Every method on model-shaped trees: time, ratio, bytes, rates, roofline."""
    rows = results.get("models") or []
    if not rows:
        return ""
    m = results["machine"]
    bw, gf = m["bandwidth_gbs"], m["matmul_gflops"]
    lines = [
        "| tree (L layers, rank r) | method | ms | ×AdamW | bytes / element | GB/s "
        "| GFLOP/s | roofline ms | % of roofline | peak temporaries / adapter bytes |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        c, lora = row["config"], row["lora"]
        elems, size = c["elements"], 2 if c["dtype"] == "bfloat16" else 4
        tree = f"{c['model']} (L={c['layers']}, r={c['r']}, {elems / 1e6:.1f} M)"
        for name, e in lora.items():
            ms = e["median_ms"]
            roof = max(e["bytes_accessed"] / (bw * 1e9), e["flops"] / (gf * 1e9)) * 1e3
            temps = e["peak_temp_bytes"] / (elems * size) if e["peak_temp_bytes"] is not None else 0
            lines.append(
                f"| {tree} | {name} | {ms:.2f} | {_ratio(e, lora['adamw']):.2f} "
                f"| {e['bytes_accessed'] / elems:.0f} | {e['bytes_accessed'] / ms / 1e6:.1f} "
                f"| {e['flops'] / ms / 1e6:.1f} | {roof:.2f} | {100 * roof / ms:.0f}% "
                f"| {temps:.2f} |"
            )
    return "\n".join(lines)


def dense_table(results: dict[str, Any]) -> str:
    """Step time of the dense-tree methods, against dense AdamW and LoRA-Muon."""
    rows = [r for r in results.get("targets") or [] if r.get("dense")]
    if not rows:
        return ""
    names = [k for k in rows[0]["dense"] if k != "dense_adamw"]
    head = (
        "| L, m, n (dense tree) | dense AdamW ms | "
        + " | ".join(f"{k} ms (×dense AdamW)" for k in names)
        + " | LoRA-Muon (r) ms on the LoRA tree |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        c, dense = row["config"], row["dense"]
        ad = _ms(dense["dense_adamw"])
        cells = [f"{c['layers']}, {c['m']}, {c['n']}", f"{ad:.1f}"]
        cells += [
            f"{_ms(dense[k]):.1f} ({_ms(dense[k]) / ad:.1f}×)"  # type: ignore[operator]
            for k in names
        ]
        cells.append(f"{_ms(row['lora']['lora_muon']):.2f} (r={c['r']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory_table(results: dict[str, Any]) -> str:
    rows = results.get("targets") or []
    if not rows:
        return ""
    row = rows[0]
    c = row["config"]
    lines = [
        f"Config L={c['layers']}, m={c['m']}, n={c['n']}, r={c['r']} ({c['dtype']}):",
        "",
        "| method | tree | optimizer state | state floats / trainable floats | peak temporaries |",
        "|---|---|---|---|---|",
    ]
    lora_elems = c["layers"] * (c["m"] + c["n"]) * c["r"]
    dense_elems = c["layers"] * c["m"] * c["n"]
    for tree, elems in (("lora", lora_elems), ("dense", dense_elems)):
        for name, e in row.get(tree, {}).items():
            lines.append(
                f"| {name} | {tree} | {_fmt_bytes(e['state_bytes'])} "
                f"| {e['state_floats'] / elems:.2f} "
                f"| {_fmt_bytes(e['peak_temp_bytes'])} |"
            )
    return "\n".join(lines)


def e2e_table(results: dict[str, Any]) -> str:
    e = results.get("end_to_end")
    if not e:
        return ""
    ad, lm = e["adamw"]["median_ms"], e["lora_muon"]["median_ms"]
    cfg = e["config"]
    return (
        "| model | AdamW step ms | LoRA-Muon step ms | ratio |\n|---|---|---|---|\n"
        f"| CharTransformer width {cfg['width']}, depth {cfg['depth']}, rank {cfg['rank']}, "
        f"batch {e['batch']}×{cfg['seq_len']} | {ad:.2f} | {lm:.2f} | {lm / ad:.2f}× |"
    )


def sweep_plot(results: dict[str, Any], path: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sweeps = [
        ("sweep_m", "m = n", "m"),
        ("sweep_r", "rank r", "r"),
        ("sweep_layers", "layers L", "layers"),
    ]
    present = [s for s in sweeps if results.get(s[0])]
    if not present:
        return False
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 3.4))
    axes = [axes] if len(present) == 1 else axes
    for ax, (key, label, field) in zip(axes, present, strict=False):
        rows = results[key]
        xs = [r["config"][field] for r in rows]
        for name in rows[0]["lora"]:
            ys = [r["lora"][name]["median_ms"] for r in rows]
            lo = [r["lora"][name]["q1_ms"] for r in rows]
            hi = [r["lora"][name]["q3_ms"] for r in rows]
            ax.plot(xs, ys, marker="o", label=name)
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("step time (ms, median, IQR band)")
        ax.grid(alpha=0.3)
    axes[0].legend()
    m = results["machine"]
    fig.suptitle(f"{m['device']} ({m['cores']} cores), jax {m['jax']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> str:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("results")
    ap.add_argument("--outdir", default=None)
    args = ap.parse_args(argv)
    with open(args.results) as f:
        results = json.load(f)
    outdir = args.outdir or os.path.dirname(args.results) or "."
    os.makedirs(outdir, exist_ok=True)
    m = results["machine"]
    parts = [
        f"Machine: {m['cpu']} ({m['cores']} cores, backend {m['backend']}, {m['device']}), "
        f"jax {m['jax']}, optax {m['optax']}; matmul {m['matmul_gflops']:.0f} GFLOP/s, best "
        f"streaming {m['bandwidth_gbs']:.1f} GB/s; {results['repeats']} repeats per point"
        + (" (--quick)" if results.get("quick") else "")
        + ".",
        "",
        targets_table(results),
        "",
        models_table(results),
        "",
        dense_table(results),
        "",
        memory_table(results),
        "",
        e2e_table(results),
    ]
    text = "\n".join(p for p in parts if p is not None)
    with open(os.path.join(outdir, "tables.md"), "w") as f:
        f.write(text + "\n")
    if sweep_plot(results, os.path.join(outdir, "sweeps.png")):
        text += f"\n\n(plot: {os.path.join(outdir, 'sweeps.png')})"
    print(text)
    return text


if __name__ == "__main__":
    main()
