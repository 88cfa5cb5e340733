"""Peer optimizers for LoRA that LoRA-Muon is compared against, on the same footing.

Each is an Optax transformation with the same pair discovery (``pairs=``), stacking,
dtype and error rules as :func:`lora_muon_jax.lora_muon`:

* on LoRA factor pairs: :func:`spectron`, :func:`lora_rite`, :func:`riemannion`;
* on dense weights (low-rank optimizer *state*): :func:`lora_pre_adam`,
  :func:`lora_pre_muon`, :func:`limuon`.

Each peer is a subpackage (``_spectron``, ``_lora_rite``, ``_riemannion``,
``_lora_pre``, ``_limuon``) holding its transformation, its alias, and its
initializer and solvers beside them; ``peers/README.md`` maps each to its paper,
its sources and the shared helpers it uses.
"""

from lora_muon_jax.peers._limuon import LiMuonState as LiMuonState
from lora_muon_jax.peers._limuon import LowRankMomentum as LowRankMomentum
from lora_muon_jax.peers._limuon import limuon as limuon
from lora_muon_jax.peers._limuon import randomized_svd as randomized_svd
from lora_muon_jax.peers._limuon import scale_by_limuon as scale_by_limuon
from lora_muon_jax.peers._lora_pre import LoRAPreAdamState as LoRAPreAdamState
from lora_muon_jax.peers._lora_pre import LoRAPreMuonState as LoRAPreMuonState
from lora_muon_jax.peers._lora_pre import lora_pre_adam as lora_pre_adam
from lora_muon_jax.peers._lora_pre import lora_pre_muon as lora_pre_muon
from lora_muon_jax.peers._lora_pre import scale_by_lora_pre_adam as scale_by_lora_pre_adam
from lora_muon_jax.peers._lora_pre import scale_by_lora_pre_muon as scale_by_lora_pre_muon
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
    "LiMuonState",
    "LoRAPreAdamState",
    "LoRAPreMuonState",
    "LoRARiteState",
    "LowRankMomentum",
    "RiemannionState",
    "SpectronState",
    "limuon",
    "lora_pre_adam",
    "lora_pre_muon",
    "lora_rite",
    "randomized_svd",
    "riemannion",
    "riemannion_loi_init",
    "scale_by_limuon",
    "scale_by_lora_pre_adam",
    "scale_by_lora_pre_muon",
    "scale_by_lora_rite",
    "scale_by_riemannion",
    "scale_by_spectron",
    "spectron",
]
