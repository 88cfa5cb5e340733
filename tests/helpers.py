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


# Two float32 programs that compute the same function in a different order (jitted
# with folded constants vs ``inject_hyperparams``'s traced ones, sharded vs one
# device, a schedule vs a constant, an alias vs its building blocks) agree to a few
# float32 roundings *of each leaf's norm*, not of each entry: an entry far below the
# leaf's scale, or a weak direction of ``msign``, can lose every relative digit while
# the leaf as a whole stays exact. So they are compared per leaf in the Frobenius norm.
#
# Error model, measured (tests/test_optimizer_contract.py's problem, jax 0.10.2, with
# and without tests/conftest.py's XLA flags): the LoRA leaves of every optimizer
# differ by <= 1.7e-7 (Riemannion's thin QRs; <= 6e-8 elsewhere), a 60x margin to
# PROGRAM_RTOL. The one larger error is deterministic, the same on every IEEE CPU:
# AdamW's ``1 - β₂`` with ``β₂ = 0.999`` rounded to a float32 hyperparameter is
# 1.29e-5 off (its ``nu`` state; 6.6e-6 in the update after the square root), which
# STATE_RTOL covers with a 1.5x margin.
PROGRAM_RTOL = 1e-5
STATE_RTOL = 2e-5


def assert_trees_rel_close(actual, desired, rtol: float = PROGRAM_RTOL) -> None:
    """Every leaf of ``actual`` within ``rtol`` of ``desired``, relative, in the Frobenius norm."""
    got, tree = jax.tree_util.tree_flatten_with_path(actual)
    want = tree.flatten_up_to(desired)
    bad = [
        f"{jax.tree_util.keystr(path)}: {err:.2e}"
        for (path, x), y in zip(got, want, strict=True)
        if not (err := rel_err(x, y)) <= rtol
    ]
    assert not bad, f"leaves off by more than {rtol:.1e} (relative, Frobenius): {bad}"
