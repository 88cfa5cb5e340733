"""Spectron (Janson, Oyallon, Belilovsky 2026): orthogonalized momentum per LoRA factor,
with the step divided by ``σ_max(a) + σ_max(b) + 1``.

* :mod:`.optimizer`: :func:`scale_by_spectron` and the alias :func:`spectron`;
* :mod:`.power_iteration`: the warm-started ``σ_max`` estimates and their start vectors.
"""

from lora_muon_jax.peers._spectron.optimizer import NS_COEFFS as NS_COEFFS
from lora_muon_jax.peers._spectron.optimizer import SpectronState as SpectronState
from lora_muon_jax.peers._spectron.optimizer import scale_by_spectron as scale_by_spectron
from lora_muon_jax.peers._spectron.optimizer import spectron as spectron
