"""LoRA-RITE (Yen et al., ICLR 2025): adaptive r×r preconditioning of LoRA factors,
invariant to every gauge change of the pair.

* :mod:`.optimizer`: :func:`scale_by_lora_rite` and the alias :func:`lora_rite`;
* :mod:`.preconditioner`: partner bases, unmagnified gradients, moment transport
  and the inverse-square-root preconditioner of a stack of pairs.
"""

from lora_muon_jax.peers._lora_rite.optimizer import LoRARiteState as LoRARiteState
from lora_muon_jax.peers._lora_rite.optimizer import lora_rite as lora_rite
from lora_muon_jax.peers._lora_rite.optimizer import scale_by_lora_rite as scale_by_lora_rite
