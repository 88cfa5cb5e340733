"""Peer optimizers for LoRA that LoRA-Muon is compared against, on the same footing.

Each is an Optax transformation with the same pair discovery, stacking, dtype and
error rules as :func:`lora_muon_jax.lora_muon`.
"""
