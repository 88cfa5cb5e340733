"""Example and experiment code built on :mod:`lora_muon_jax`.

The examples, the Colab notebook, the benchmarks and the learning-rate study share
these pieces; the optimizer library itself does not depend on them:

* :mod:`lora_muon_jax_examples.char_lm`: a character-level transformer (Flax NNX)
  with native LoRA factor pairs, its loss and a sampler;
* :mod:`lora_muon_jax_examples.tinyshakespeare`: the TinyShakespeare corpus (found on
  disk or downloaded once, checksummed), a character tokenizer and batches;
* :mod:`lora_muon_jax_examples.proxy_lr`: :func:`proxy_lr_search`, which tunes a dense
  Muon learning rate on a cheap rank-r LoRA-Muon proxy.
"""

from lora_muon_jax_examples.proxy_lr import ProxyResult as ProxyResult
from lora_muon_jax_examples.proxy_lr import ProxyRow as ProxyRow
from lora_muon_jax_examples.proxy_lr import proxy_lr_search as proxy_lr_search

__all__ = ["ProxyResult", "ProxyRow", "proxy_lr_search"]
