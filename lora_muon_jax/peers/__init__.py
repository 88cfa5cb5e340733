"""Peer optimizers for LoRA that LoRA-Muon is compared against, on the same footing.

Each is an Optax transformation with the same pair discovery (``pairs=``), stacking,
dtype and error rules as :func:`lora_muon_jax.lora_muon`:

* on LoRA factor pairs: :func:`spectron`, :func:`lora_rite`, :func:`riemannion`;
* on dense weights (low-rank optimizer *state*): :func:`lora_pre_adam`,
  :func:`lora_pre_muon`, :func:`limuon`.
"""

from lora_muon_jax.peers._lora_rite import LoRARiteState as LoRARiteState
from lora_muon_jax.peers._lora_rite import lora_rite as lora_rite
from lora_muon_jax.peers._lora_rite import scale_by_lora_rite as scale_by_lora_rite
from lora_muon_jax.peers._riemannion import RiemannionState as RiemannionState
from lora_muon_jax.peers._riemannion import riemannion as riemannion
from lora_muon_jax.peers._riemannion import riemannion_loi_init as riemannion_loi_init
from lora_muon_jax.peers._riemannion import scale_by_riemannion as scale_by_riemannion
from lora_muon_jax.peers._spectron import SpectronState as SpectronState
from lora_muon_jax.peers._spectron import scale_by_spectron as scale_by_spectron
from lora_muon_jax.peers._spectron import spectron as spectron

__all__ = [
    "LoRARiteState",
    "RiemannionState",
    "SpectronState",
    "lora_rite",
    "riemannion",
    "riemannion_loi_init",
    "scale_by_lora_rite",
    "scale_by_riemannion",
    "scale_by_spectron",
    "spectron",
]
