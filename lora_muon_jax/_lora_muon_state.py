"""The state of :func:`lora_muon_jax.scale_by_lora_muon`: one momentum per factor.

It lives apart from the optimizer so that gauge rebalancing can find and rescale
the momenta without importing the optimizer (which imports rebalancing).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import optax


class LoRAMuonState(NamedTuple):
    """State of :func:`scale_by_lora_muon`: one momentum per factor, nothing else."""

    # shape=(), dtype=int32. The field shadows tuple.count (optax naming).
    count: jax.Array  # type: ignore[assignment]
    mu: optax.Updates  # like params; dtype=mu_dtype (default: the param's dtype).
