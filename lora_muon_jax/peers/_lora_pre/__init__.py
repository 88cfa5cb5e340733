"""LoRA-Pre: Adam and Muon with a low-rank momentum for dense weight matrices.

LoRA-Pre (Wang et al., 2026) reads the EMA ``m ← β m + (1-β) g`` as one gradient
step of size ``1-β`` on ``½‖m - g‖²`` and keeps ``m`` as a product ``m_B m_A`` of
two thin factors, refreshed each step by a closed-form damped Newton step on each
factor. The optimizer state of a ``p × q`` matrix shrinks from ``pq`` (Muon) or
``2pq`` (Adam) to ``(p+q) r`` or ``2(p+q) r`` floats.

These are *dense-weight* optimizers (pretraining or full fine-tuning): they update
full matrices and reject trees that contain LoRA factor pairs, which belong to
:func:`lora_muon_jax.lora_muon` and the LoRA-pair peers.

Sources. The paper's full text and code were not readable when this was written (the
official repository, ``github.com/mrflogs/LoRA-Pre``, still holds only a README at
29c53c6; re-checked). Primary: the abstract and introduction (arXiv 2602.24283v1:
EMA as online regression, low-rank factorization of the momentum, Adam and Muon,
Llama 60M-1B). Secondary: the project's notes (``docs/peers.md`` §LoRA-Pre; from a
third-party implementation of Algorithm 1, Eq. 11-12, App. B.1, App. C.1),
papernotes (ICLR 2026), the zij summary, a third-party PyTorch ``LowRankAdam`` that
cites Algorithm 1 and a third-party ``LoRAPreMuon`` that cites Algorithm 2. They
agree on the Newton step of each factor (Theorem 3.1), ``γ1 = 1-√β1``,
``γ2 = 1-β2^{1/4}``, the ``|g|`` factors squared on reconstruction, ``m_B = 0``,
``m_A ~ N(0, 0.02²)`` at init and ``δ = 1e-6``. They disagree on (i) whether the
second factor's step sees the first one's (Gauss–Seidel: the PyTorch code; Jacobi:
``docs/peers.md``, zij) and (ii) which product forms the moment used in the step.
Our choices, with the reasons, are in :func:`newton_steps` and
:func:`scale_by_lora_pre_adam`; both orders are available. The Muon variant's rule
is our inference (``docs/peers.md`` §LoRA-Pre); its momentum has no Nesterov term by
default, as in the one source for Algorithm 2. Addresses: see :func:`lora_pre_adam`
and :func:`lora_pre_muon`.

Modules: :mod:`.adam` (:func:`scale_by_lora_pre_adam`, :func:`lora_pre_adam`),
:mod:`.muon` (:func:`scale_by_lora_pre_muon`, :func:`lora_pre_muon`),
:mod:`.newton` (the damped Newton step of the factors, the solver of both) and
:mod:`.factors` (the factors' rank, initialization and shared checks). Helpers
shared with LiMuon (LoRA-pair rejection, matrix labels, Muon's shape scaling, the
orthogonalizers) live in :mod:`lora_muon_jax.peers._dense_weights`, the AdamW
fallback in :mod:`lora_muon_jax.peers._adamw_routing`.
"""

from lora_muon_jax.peers._lora_pre.adam import LoRAPreAdamState as LoRAPreAdamState
from lora_muon_jax.peers._lora_pre.adam import lora_pre_adam as lora_pre_adam
from lora_muon_jax.peers._lora_pre.adam import scale_by_lora_pre_adam as scale_by_lora_pre_adam
from lora_muon_jax.peers._lora_pre.muon import LoRAPreMuonState as LoRAPreMuonState
from lora_muon_jax.peers._lora_pre.muon import lora_pre_muon as lora_pre_muon
from lora_muon_jax.peers._lora_pre.muon import scale_by_lora_pre_muon as scale_by_lora_pre_muon
from lora_muon_jax.peers._lora_pre.newton import NewtonJob as NewtonJob

# `_damped_inverses` for tests/test_lora_pre.py (the solver's Cholesky fallback).
from lora_muon_jax.peers._lora_pre.newton import _damped_inverses as _damped_inverses
from lora_muon_jax.peers._lora_pre.newton import newton_step as newton_step
from lora_muon_jax.peers._lora_pre.newton import newton_steps as newton_steps
