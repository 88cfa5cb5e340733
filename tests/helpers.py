"""Small problem builders shared by the tests."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def well_conditioned(
    rng: np.random.Generator, shape: tuple[int, ...], cond: float = 2.0
) -> np.ndarray:
    """A random matrix stack with singular values spread evenly in [1/cond, 1] (float64)."""
    *batch, rows, cols = shape
    k = min(rows, cols)
    out = np.empty(shape)
    for idx in np.ndindex(*batch):
        u, _ = np.linalg.qr(rng.standard_normal((rows, k)))
        v, _ = np.linalg.qr(rng.standard_normal((cols, k)))
        s = np.linspace(1.0, 1.0 / cond, k)
        out[idx] = (u * s) @ v.T
    return out


def regression_loss(lora_scale: float, target):
    """``0.5 ‖c · a @ b - Y‖²`` on canonical 2-D/stacked factors, and its NumPy gradient."""

    def loss(a, b):
        return 0.5 * jnp.sum((lora_scale * a @ b - target) ** 2)

    def np_grad(a, b):
        g = lora_scale * a @ b - np.asarray(target, np.float64)
        return lora_scale * g @ b.T, lora_scale * a.T @ g

    return loss, np_grad


def product(a, b, lora_scale: float = 1.0):
    return lora_scale * np.asarray(a, np.float64) @ np.asarray(b, np.float64)


def spectral_norm(x) -> float:
    return float(np.linalg.norm(np.asarray(x, np.float64), 2))


def rel_err(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30))


def tree_f32(tree):
    return jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), tree)


# Every route of LoRA-Muon's update: the Gram shortcut with each r×r solver, and
# the paper's polynomial route. Tolerances against float64: the Gram routes are
# exact to float32 rounding; Polar Express leaves singular values in [0.999, 1].
ROUTES = {
    "cholesky": dict(method="gram", solver="cholesky"),
    "newton_schulz": dict(method="gram", solver="newton_schulz"),
    "eigh": dict(method="gram", solver="eigh"),
    "paper": dict(method="paper"),
}
ROUTE_TOL = {"cholesky": 1e-5, "newton_schulz": 1e-5, "eigh": 1e-5, "paper": 2e-3}
