"""Optimizer-state bytes and step time of the dense-weight peers on one dense tree.

Usage::

    python -m benchmarks.dense_peers [--quick] [--repeats 20] [--configs "4,512,512,32"]
                                     [--out FILE]

For each configuration ``(L, m, n, r)`` the tree holds ``L`` separate ``m × n``
weight matrices and ``L`` biases of length ``n`` (biases go to AdamW in every
optimizer that has a fallback). Side by side, in one process and interleaved
repeat by repeat, it times a jitted ``update + apply_updates`` of

* dense ``optax.adamw`` and dense ``optax.contrib.muon``;
* ``optax.contrib.galore`` at rank ``r`` (its default: Adam moments in the
  projected space);
* LoRA-Pre (Adam) and LoRA-Pre (Muon) at rank ``r``;
* LiMuon Option #1 (full STORM momentum) and Option #2 (rank ``r`` carried
  momentum), fed ``prev_grads`` so the variance-reduction term is computed.

Every optimizer is stepped once before timing, so the timed call is a steady-state
step (LoRA-Pre's ``m_B`` is non-zero). GaLore refreshes its projectors (an SVD of
every matrix's gradient) only every ``update_proj_gap = 200`` steps; that refresh is
not in the timed step and is reported separately. LiMuon's second gradient is a
cost of the model, not of the optimizer, and is not timed.

State bytes are exact: the sum of ``nbytes`` over every array of the state tree
(counters and PRNG keys included), float32 throughout.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import common
from lora_muon_jax.peers import limuon, lora_pre_adam, lora_pre_muon

QUICK_CONFIGS = ((2, 256, 256, 16),)
CONFIGS = ((4, 512, 512, 32), (4, 1024, 1024, 64), (2, 1024, 4096, 64))
LR = 1e-3


def dense_tree(layers: int, m: int, n: int, seed: int = 0) -> tuple[dict[str, Any], dict[str, Any]]:
    """``L`` separate float32 matrices and biases, and gradients of the same tree."""
    keys = jax.random.split(jax.random.key(seed), 2 * layers)
    params = {
        f"layer{i}": {
            "w": jax.random.normal(keys[2 * i], (m, n)) / np.sqrt(m),
            "b": jnp.zeros((n,)),
        }
        for i in range(layers)
    }
    # A gradient with a decaying spectrum (what low-rank states are built for) plus noise.
    grads = {}
    for i in range(layers):
        k1, k2, k3 = jax.random.split(keys[2 * i + 1], 3)
        k = min(m, n)
        u = jax.random.normal(k1, (m, k)) * (0.9 ** jnp.arange(k))
        grads[f"layer{i}"] = {
            "w": 1e-2
            * (
                u @ jax.random.normal(k2, (k, n)) / np.sqrt(k * n)
                + 0.1 * jax.random.normal(k3, (m, n)) / np.sqrt(n)
            ),
            "b": 1e-3 * jnp.ones((n,)),
        }
    return params, grads


def contenders(r: int) -> dict[str, optax.GradientTransformation]:
    return {
        "adamw (dense)": optax.adamw(LR),
        "muon (dense)": optax.contrib.muon(LR),
        "galore": optax.contrib.galore(LR, rank=r),
        "lora_pre_adam": lora_pre_adam(LR, rank=r),
        "lora_pre_muon": lora_pre_muon(LR, rank=r),
        "limuon #1": limuon(LR),
        "limuon #2": limuon(LR, rank=r),
    }


def _step(tx: optax.GradientTransformation, name: str) -> Callable[..., Any]:
    """The donated step (params and state updated in place, as training loops run it)."""
    if not name.startswith("limuon"):
        return common.optimizer_step(tx, donate=True)

    def step(params, state, grads):
        # The STORM term needs g̃; the grads stand in for it (same shapes, same work).
        updates, state = tx.update(grads, state, params, prev_grads=grads)
        return optax.apply_updates(params, updates), state

    return jax.jit(step, donate_argnums=(0, 1))


def state_bytes(state: Any) -> int:
    return int(sum(x.nbytes for x in jax.tree.leaves(state)))


def galore_refresh_ms(r: int, params: Any, grads: Any, repeats: int) -> dict[str, float]:
    """GaLore's step at count 0 (projector refresh: an SVD per matrix).

    Not donated: every call must start again from the state at count 0.
    """
    tx = optax.contrib.galore(LR, rank=r)
    step = common.optimizer_step(tx)
    state = tx.init(params)
    times = common.interleaved_times(
        {"galore_refresh": lambda: step(params, state, grads)}, repeats
    )
    return common.summarize(times["galore_refresh"])


def run_config(cfg: tuple[int, int, int, int], repeats: int) -> dict[str, Any]:
    layers, m, n, r = cfg
    params, grads = dense_tree(layers, m, n)
    fns, states = {}, {}
    for name, tx in contenders(r).items():
        step = _step(tx, name)
        # One step from copies (the step donates them): steady state from now on.
        p, s = step(jax.tree.map(jnp.copy, params), tx.init(params), grads)
        states[name] = jax.tree.map(jnp.copy, s)
        fns[name] = common.DonatedCall(step, p, s, grads)
        common.assert_finite(fns[name](), name)
    times = common.interleaved_times(fns, repeats)
    return {
        "config": dict(layers=layers, m=m, n=n, r=r),
        "param_bytes": state_bytes(params),
        "state_bytes": {k: state_bytes(v) for k, v in states.items()},
        "times": {k: common.summarize(v) for k, v in times.items()},
        "galore_refresh": galore_refresh_ms(r, params, grads, max(3, repeats // 4)),
    }


def _mib(b: int) -> str:
    return f"{b / 2**20:.2f}"


def table(rows: list[dict[str, Any]], machine: dict[str, Any]) -> str:
    lines = [
        f"Machine: {machine['cpu']} ({machine['cores']} cores, {machine['backend']}: "
        f"{machine['device']}), jax {machine['jax']}, optax {machine['optax']}. "
        "Medians over interleaved repeats; IQR in brackets.",
    ]
    for row in rows:
        c = row["config"]
        adam_bytes = row["state_bytes"]["adamw (dense)"]
        adam_ms = row["times"]["adamw (dense)"]["median_ms"]
        lines += [
            "",
            f"**L={c['layers']} matrices of {c['m']}×{c['n']} (+ biases), rank r={c['r']}; "
            f"params {_mib(row['param_bytes'])} MiB**",
            "",
            "| optimizer | state MiB | state / params | state / AdamW | step ms [IQR] "
            "| × AdamW time |",
            "|---|---|---|---|---|---|",
        ]
        for name, b in row["state_bytes"].items():
            t = row["times"][name]
            lines.append(
                f"| {name} | {_mib(b)} | {b / row['param_bytes']:.3f} | {b / adam_bytes:.3f} "
                f"| {t['median_ms']:.2f} [{t['q1_ms']:.2f}–{t['q3_ms']:.2f}] "
                f"| {t['median_ms'] / adam_ms:.2f} |"
            )
        g = row["galore_refresh"]
        lines.append(
            f"\nGaLore projector refresh step (every 200 steps): {g['median_ms']:.2f} ms "
            f"(n={g['n']})."
        )
    return "\n".join(lines)


def check_state_sizes(row: dict[str, Any]) -> None:
    """The state-size formulas of the peers, checked on the measured bytes (float32)."""
    c = row["config"]
    L, m, n, r = c["layers"], c["m"], c["n"], c["r"]
    bias = 2 * L * n * 4  # AdamW fallback moments for the biases
    s = row["state_bytes"]
    small = 64  # counters and PRNG keys
    expect = {
        "lora_pre_adam": 2 * L * (m + n) * r * 4 + bias,
        "lora_pre_muon": L * (m + n) * r * 4 + bias,
        "limuon #2": L * ((m + n) * r + r) * 4 + bias,
        "limuon #1": L * m * n * 4 + bias,
    }
    for name, want in expect.items():
        if not 0 <= s[name] - want <= small:
            raise AssertionError(f"{name}: state {s[name]} B, formula {want} B (+ counters)")


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help=f"one small config {QUICK_CONFIGS[0]}")
    ap.add_argument("--repeats", type=int, default=20, help="timed repeats (at least 20)")
    ap.add_argument("--configs", type=str, default=None, help="e.g. '4,1024,1024,64;2,512,512,32'")
    ap.add_argument("--out", type=str, default=None, help="write the results as JSON")
    args = ap.parse_args(argv)
    if args.repeats < 20:
        ap.error("--repeats must be at least 20 (medians of fewer repeats are too noisy)")
    configs = QUICK_CONFIGS if args.quick else CONFIGS
    if args.configs:
        configs = tuple(tuple(int(v) for v in c.split(",")) for c in args.configs.split(";"))  # type: ignore[assignment]
    machine = common.machine_info()
    rows = []
    for cfg in configs:
        row = run_config(cfg, args.repeats)
        check_state_sizes(row)
        rows.append(row)
    print(table(rows, machine))
    if args.out:
        common.write_json(args.out, {"machine": machine, "rows": rows})
    return rows


if __name__ == "__main__":
    main()
