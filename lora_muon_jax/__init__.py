"""lora_muon_jax: spectral optimizers for LoRA adapters, as Optax transformations.

The main entry point is :func:`lora_muon`; its building blocks are
:func:`scale_by_lora_muon`, :func:`split_weight_decay` and
:func:`with_gauge_rebalancing`; :func:`lora_muon_pair_step` is Algorithm 1 for one
pair, the definition the rest implements. Pair discovery (:func:`find_lora_pairs`,
:class:`PairRule`, :data:`PRESETS`) is shared by every optimizer in the package, and
:mod:`lora_muon_jax.peers` holds the optimizers LoRA-Muon is compared with.
"""

from importlib import metadata as _metadata

from lora_muon_jax._algorithm1 import PairState as PairState
from lora_muon_jax._algorithm1 import lora_muon_pair_step as lora_muon_pair_step
from lora_muon_jax._diagnostics import LoRADiagnosticsState as LoRADiagnosticsState
from lora_muon_jax._diagnostics import LoRAPairDiagnostics as LoRAPairDiagnostics
from lora_muon_jax._diagnostics import lora_pair_diagnostics as lora_pair_diagnostics
from lora_muon_jax._diagnostics import with_lora_diagnostics as with_lora_diagnostics
from lora_muon_jax._gauge_rebalancing import GaugeRebalance as GaugeRebalance
from lora_muon_jax._gauge_rebalancing import GaugeRebalanceState as GaugeRebalanceState
from lora_muon_jax._gauge_rebalancing import rebalance_pair as rebalance_pair
from lora_muon_jax._gauge_rebalancing import with_gauge_rebalancing as with_gauge_rebalancing
from lora_muon_jax._lora_muon import lora_muon as lora_muon
from lora_muon_jax._lora_muon import scale_by_lora_muon as scale_by_lora_muon
from lora_muon_jax._lora_muon_state import LoRAMuonState as LoRAMuonState
from lora_muon_jax._pair_labels import lora_param_labels as lora_param_labels
from lora_muon_jax._pair_matching import find_lora_pairs as find_lora_pairs
from lora_muon_jax._pair_presets import PRESETS as PRESETS
from lora_muon_jax._pair_presets import leading_batch_axes as leading_batch_axes
from lora_muon_jax._pair_presets import peft_adapter as peft_adapter
from lora_muon_jax._pair_types import AmbiguousLayoutError as AmbiguousLayoutError
from lora_muon_jax._pair_types import FactorAxes as FactorAxes
from lora_muon_jax._pair_types import LoRAFactor as LoRAFactor
from lora_muon_jax._pair_types import LoRAPair as LoRAPair
from lora_muon_jax._pair_types import PairRule as PairRule
from lora_muon_jax._split_weight_decay import SplitWeightDecayState as SplitWeightDecayState
from lora_muon_jax._split_weight_decay import split_weight_decay as split_weight_decay
from lora_muon_jax.lora_scale import peft_config_lora_scale as peft_config_lora_scale
from lora_muon_jax.lora_scale import qwix_lora_scale as qwix_lora_scale
from lora_muon_jax.peft_io import PeftAdapter as PeftAdapter
from lora_muon_jax.peft_io import load_peft_adapter as load_peft_adapter
from lora_muon_jax.peft_io import save_peft_adapter as save_peft_adapter

try:
    __version__ = _metadata.version("lora_muon_jax")
except _metadata.PackageNotFoundError:  # running from a source tree
    __version__ = "0.0.0"

__all__ = [
    "PRESETS",
    "AmbiguousLayoutError",
    "FactorAxes",
    "GaugeRebalance",
    "GaugeRebalanceState",
    "LoRADiagnosticsState",
    "LoRAFactor",
    "LoRAMuonState",
    "LoRAPair",
    "LoRAPairDiagnostics",
    "PairRule",
    "PairState",
    "PeftAdapter",
    "SplitWeightDecayState",
    "find_lora_pairs",
    "leading_batch_axes",
    "load_peft_adapter",
    "lora_muon",
    "lora_muon_pair_step",
    "lora_pair_diagnostics",
    "lora_param_labels",
    "peft_adapter",
    "peft_config_lora_scale",
    "qwix_lora_scale",
    "rebalance_pair",
    "save_peft_adapter",
    "scale_by_lora_muon",
    "split_weight_decay",
    "with_gauge_rebalancing",
    "with_lora_diagnostics",
]
