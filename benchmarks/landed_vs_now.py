"""Before/after of the engine: a landed LoRA-Muon and today's, side by side in one process.

    python -m benchmarks.landed_vs_now PATH   # PATH holds a package `lora_muon_jax_landed`

A landed version is imported under another package name, made by copying its
``lora_muon_jax/`` folder (``git archive COMMIT lora_muon_jax``) to
``PATH/lora_muon_jax_landed`` and renaming the package in its imports, so AdamW, the
landed step and today's step take turns in one process on the same trees
(interleaved, medians of per-round ratios to AdamW). Every step is timed donated
(params and state updated in place, as training loops run it) and not donated.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import numpy as np
import optax

import lora_muon_jax as lmj
from benchmarks import common, trees


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    sys.path.insert(0, argv[0])
    import lora_muon_jax_landed as landed

    cases: list[tuple[str, Any]] = [("lora", c) for c in trees.CONFIGS] + [
        ("model", (m, r)) for m in trees.MODELS for r in (16, 64)
    ]
    print(
        "| tree | AdamW ms (donated) | landed ×AdamW donated (plain) "
        "| now ×AdamW donated (plain) | landed temps | now temps |"
    )
    print("|---|---|---|---|---|---|")
    for kind, cfg in cases:
        if kind == "lora":
            params, grads = trees.lora_tree(*cfg)
            elems, name = cfg[0] * (cfg[1] + cfg[2]) * cfg[3], "L={}, {}×{}, r={}".format(*cfg)
        else:
            params, grads = trees.model_tree(cfg[0], 4, cfg[1])
            elems, name = trees.adapter_elements(cfg[0], 4, cfg[1]), f"{cfg[0]} L=4, r={cfg[1]}"
        txs = {
            "adamw": optax.adamw(1e-3),
            "landed": landed.lora_muon(0.02),
            "now": lmj.lora_muon(0.02),
        }
        fns: dict[str, Callable[[], Any]] = {}
        temps: dict[str, Any] = {}
        for key, tx in txs.items():
            state = tx.init(params)
            step, plain = common.optimizer_step(tx, donate=True), common.optimizer_step(tx)
            temps[key] = common.compiled_costs(step.lower(params, state, grads).compile())
            fns[key] = common.DonatedCall(step, params, state, grads)
            fns[f"{key}/plain"] = lambda plain=plain, s=state, p=params, g=grads: plain(p, s, g)  # type: ignore[misc]
        t = common.interleaved_times(fns, 21)

        def ratio(key: str, t: dict[str, np.ndarray] = t) -> str:
            donated = np.median(t[key] / t["adamw"])
            plain = np.median(t[f"{key}/plain"] / t["adamw/plain"])
            return f"{donated:.2f} ({plain:.2f})"

        tb = {k: temps[k]["peak_temp_bytes"] / (4 * elems) for k in ("landed", "now")}
        cells = [name, f"{np.median(t['adamw']) * 1e3:.2f}", ratio("landed"), ratio("now")]
        cells += [f"{tb['landed']:.2f}", f"{tb['now']:.2f}"]
        print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
