"""What the report calls each method, and what the paper reports (no imports of the study).

A leaf module: every report module imports these names from here, so none of them
needs :mod:`benchmarks.study.report` (which imports them all).
"""

from __future__ import annotations

from benchmarks import registry

# What the paper reports (docs/algorithm.md §Sources: from a secondary source, not checked
# against the PDF).
PAPER = {
    "dense_best_lr": 0.1,
    "dense_val": 1.789,
    "rank2_best_lr": 0.1,
    "rank2_val": 2.156,
    "rank32_val": 1.776,
    "spectron_gauge9": 2.0e-2,
    "lora_muon_gauge9": -5.1e-5,
}

# The catalogue's labels (benchmarks/registry.py).
METHOD_LABELS = {name: m.label for name, m in registry.METHODS.items()}


def label(method: str, rank: int | None = None) -> str:
    """``"LoRA-Muon r=2"``, ``"dense Muon"``: a curve's name in tables."""
    return METHOD_LABELS.get(method, method) + ("" if rank is None else f" r={rank}")
