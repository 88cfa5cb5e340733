"""Accuracy of LoRA-Muon's methods against a float64 SVD reference.

Usage::

    python -m benchmarks.accuracy [--trials 5] [--m 256 --n 192 --r 16] [--out FILE]

For random pairs whose factors and momenta have condition number ``cond`` (singular
values spread geometrically over ``[1/cond, 1]``), it compares the float32 factor
directions of ``scale_by_lora_muon`` (default ``"eigh"`` method and the paper's
Newton–Schulz/Polar Express route) with ``msign(m_a R_b) R_b`` and
``R_a msign(R_a m_b)`` computed in float64 by SVD, and reports the largest relative
Frobenius error over trials, plus the error of the spectral norm of each product
term (which should be exactly 1/2 per unit budget).
"""

from __future__ import annotations

import argparse
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import lora_muon_jax as lmj
from benchmarks import common


def _matrix(rng, rows, cols, cond, rank=None):
    k = min(rows, cols)
    u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
    v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
    s = np.geomspace(1.0, 1.0 / cond, k)
    if rank is not None:
        s[rank:] = 0.0
    return (u * s) @ v.T


def _reference(a, b, ma, mb):
    def inv_sqrt(s):
        lam, v = np.linalg.eigh(s)
        keep = lam > 1e-12 * lam.max()
        return (v * np.where(keep, 1 / np.sqrt(np.where(keep, lam, 1)), 0)) @ v.T

    def msign(x):
        u, s, vt = np.linalg.svd(x, full_matrices=False)
        return (u * (s > 1e-12 * s.max())) @ vt

    ra, rb = inv_sqrt(a.T @ a), inv_sqrt(b @ b.T)
    return msign(ma @ rb) @ rb, ra @ msign(ra @ mb)


# Every route of scale_by_lora_muon: the Gram shortcut with each r×r solver, and the
# paper's polynomial route.
ROUTES = ("cholesky", "newton_schulz", "eigh", "paper")


def _tx(route: str):
    if route == "paper":
        return lmj.scale_by_lora_muon(beta=0.0, method="paper")
    return lmj.scale_by_lora_muon(beta=0.0, method="gram", solver=route)  # type: ignore[arg-type]


CASES = (
    ("cond 1", 1.0, 1.0, None),
    ("cond 3", 3.0, 3.0, None),
    ("cond 10", 10.0, 10.0, None),
    ("cond 30", 30.0, 30.0, None),
    ("factors cond 3, momentum cond 300", 3.0, 300.0, None),
    ("momentum of rank 1", 3.0, 3.0, 1),
    ("momentum of rank r/2", 3.0, 3.0, "half"),
)


def run(trials: int, m: int, n: int, r: int) -> list[dict]:
    rng = np.random.default_rng(0)
    fns = {name: jax.jit(_tx(name).update) for name in ROUTES}
    rows = []
    for label, cond_f, cond_m, rank in CASES:
        rank = r // 2 if rank == "half" else rank
        errs: dict[str, list[Any]] = {k: [] for k in fns}
        budget: dict[str, list[Any]] = {k: [] for k in fns}
        for _ in range(trials):
            a, b = _matrix(rng, m, r, cond_f), _matrix(rng, r, n, cond_f)
            ma, mb = _matrix(rng, m, r, cond_m, rank), _matrix(rng, r, n, cond_m, rank)
            da, db = _reference(a, b, ma, mb)
            p = {"lora_a": jnp.asarray(a, jnp.float32), "lora_b": jnp.asarray(b, jnp.float32)}
            g = {"lora_a": jnp.asarray(ma, jnp.float32), "lora_b": jnp.asarray(mb, jnp.float32)}
            for method, fn in fns.items():
                u, _ = fn(g, _tx(method).init(p), p)
                ua, ub = (2 * np.asarray(u[k], np.float64) for k in ("lora_a", "lora_b"))
                err = max(
                    np.linalg.norm(ua - da) / np.linalg.norm(da),
                    np.linalg.norm(ub - db) / np.linalg.norm(db),
                )
                errs[method].append(err)
                budget[method].append(
                    max(abs(np.linalg.norm(ua @ b, 2) - 1), abs(np.linalg.norm(a @ ub, 2) - 1))
                )
        rows.append(
            {
                "case": label,
                **{f"{k}_rel_err": float(max(v)) for k, v in errs.items()},
                **{f"{k}_budget_err": float(max(v)) for k, v in budget.items()},
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    """Markdown: relative direction error and ‖term‖₂ error of every route."""
    head = " | ".join(f"{r} rel. error" for r in ROUTES)
    head += " | " + " | ".join(f"{r} ‖term‖₂ error" for r in ROUTES)
    lines = [f"| case | {head} |", "|---" * (1 + 2 * len(ROUTES)) + "|"]
    for row in rows:
        errs = [f"{row[f'{r}_rel_err']:.1e}" for r in ROUTES]
        errs += [f"{row[f'{r}_budget_err']:.1e}" for r in ROUTES]
        lines.append(f"| {row['case']} | " + " | ".join(errs) + " |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--trials", type=int, default=5)
    ap.add_argument("--m", type=int, default=256)
    ap.add_argument("--n", type=int, default=192)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--out", type=str, default=None)
    args = ap.parse_args(argv)
    rows = run(args.trials, args.m, args.n, args.r)
    print(
        f"float32 vs float64 SVD reference, m={args.m}, n={args.n}, r={args.r}, "
        f"{args.trials} trials (max)"
    )
    print()
    print(table(rows))
    if args.out:
        common.write_json(
            args.out, {"machine": common.machine_info(), "args": vars(args), "rows": rows}
        )
    return rows


if __name__ == "__main__":
    main()
