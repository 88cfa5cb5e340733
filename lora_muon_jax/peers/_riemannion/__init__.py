"""Riemannion (Bogachev et al. 2025): Muon on the manifold of fixed-rank matrices for
LoRA pairs, and its locally optimal initialization (LOI).

* :mod:`.optimizer`: :func:`scale_by_riemannion` and the alias :func:`riemannion`;
* :mod:`.fixed_rank`: one pair's step on the manifold (tangent projection,
  projected ``msign``, truncated-SVD retraction, momentum transport);
* :mod:`.loi`: :func:`riemannion_loi_init`, the initializer (BackPropRSVD).
"""

from lora_muon_jax.peers._riemannion.loi import default_alpha as default_alpha
from lora_muon_jax.peers._riemannion.loi import riemannion_loi_init as riemannion_loi_init
from lora_muon_jax.peers._riemannion.optimizer import RiemannionState as RiemannionState
from lora_muon_jax.peers._riemannion.optimizer import riemannion as riemannion
from lora_muon_jax.peers._riemannion.optimizer import scale_by_riemannion as scale_by_riemannion
