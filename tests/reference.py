"""A float64 NumPy reference of LoRA-Muon, written from the equations.

The equations are lines L1-L7 of docs/algorithm.md §Algorithm 1. Independent of
the library: SVD for msign, eigh for inverse square roots, the projector form, and a
multi-step loop with momentum, Nesterov, split weight decay and a LoRA scale. Tests
compare the library against it.
"""

from __future__ import annotations

import numpy as np


def msign(x: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """Polar factor ``U Vᵀ`` of the thin SVD; singular values below rtol·σ_max drop."""
    u, s, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
    keep = s > rtol * (s.max() if s.size else 0.0)
    return (u * keep) @ vt


def inv_sqrt_psd(s: np.ndarray, rtol: float = 1e-12) -> np.ndarray:
    """Pseudo-inverse square root of a symmetric PSD matrix."""
    lam, v = np.linalg.eigh((s + s.T) / 2)
    keep = lam > rtol * max(lam.max(), 0.0)
    inv = np.where(keep, 1.0 / np.sqrt(np.where(keep, lam, 1.0)), 0.0)
    return (v * inv) @ v.T


def directions(a, b, ma, mb):
    """``msign(m_a R_b) R_b`` and ``R_a msign(R_a m_b)`` for one pair (2-D arrays)."""
    a, b, ma, mb = (np.asarray(x, np.float64) for x in (a, b, ma, mb))
    ra, rb = inv_sqrt_psd(a.T @ a), inv_sqrt_psd(b @ b.T)
    return msign(ma @ rb) @ rb, ra @ msign(ra @ mb)


def projector_form(a, b, g):
    """First-order product step at β = 0, per unit budget: msign(G P_b) + msign(P_a G)."""
    a, b, g = (np.asarray(x, np.float64) for x in (a, b, g))
    pa = a @ np.linalg.pinv(a.T @ a) @ a.T
    pb = b.T @ np.linalg.pinv(b @ b.T) @ b
    return 0.5 * (msign(g @ pb) + msign(pa @ g))


def run(a, b, grad_fn, *, steps, lr, beta, weight_decay=0.0, nesterov=False, lora_scale=1.0):
    """Runs LoRA-Muon on one 2-D pair; ``grad_fn(a, b) -> (g_a, g_b)``.

    Returns the list of ``(a, b)`` after every step.
    """
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    ma, mb = np.zeros_like(a), np.zeros_like(b)
    out = []
    for t in range(steps):
        eta = lr(t) if callable(lr) else lr
        ga, gb = (np.asarray(g, np.float64) for g in grad_fn(a, b))
        ma = beta * ma + (1 - beta) * ga
        mb = beta * mb + (1 - beta) * gb
        sa, sb = (
            (beta * ma + (1 - beta) * ga, beta * mb + (1 - beta) * gb) if nesterov else (ma, mb)
        )
        da, db = directions(a, b, sa, sb)
        s = np.sqrt(1 - weight_decay * eta)
        step = eta / (2 * lora_scale)
        a, b = s * a - step * da / s, s * b - step * db / s
        out.append((a.copy(), b.copy()))
    return out
