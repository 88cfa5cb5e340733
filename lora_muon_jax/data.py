"""Deprecated: the TinyShakespeare loader moved to :mod:`lora_muon_jax_examples.tinyshakespeare`.

It is example code, not part of the optimizer library; this module re-exports it for
old imports and will be removed.
"""

import warnings

from lora_muon_jax_examples.tinyshakespeare import *  # noqa: F403
from lora_muon_jax_examples.tinyshakespeare import __all__ as __all__

warnings.warn(
    "lora_muon_jax.data moved to lora_muon_jax_examples.tinyshakespeare; import it from there.",
    DeprecationWarning,
    stacklevel=2,
)
