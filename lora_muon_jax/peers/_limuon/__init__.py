"""LiMuon (Huang, Luo, Chen 2025): Muon with a STORM variance-reduced momentum for dense
weights, optionally carried as a randomized low-rank SVD.

* :mod:`.optimizer`: :func:`scale_by_limuon` and the alias :func:`limuon`;
* :mod:`.low_rank`: the carried rank-``r̂`` momentum (Option #2) and its
  :func:`randomized_svd` (:func:`lora_muon_jax._linalg.randomized_svd`).
"""

from lora_muon_jax.peers._limuon.low_rank import LowRankMomentum as LowRankMomentum
from lora_muon_jax.peers._limuon.low_rank import randomized_svd as randomized_svd
from lora_muon_jax.peers._limuon.low_rank import reconstruct as reconstruct
from lora_muon_jax.peers._limuon.optimizer import LiMuonState as LiMuonState
from lora_muon_jax.peers._limuon.optimizer import limuon as limuon
from lora_muon_jax.peers._limuon.optimizer import scale_by_limuon as scale_by_limuon
