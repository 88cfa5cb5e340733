"""Studies: longer, cached experiments whose results are committed and reported.

* :mod:`benchmarks.study.lr_transfer`: the TinyShakespeare learning-rate transfer
  study (dense Muon vs LoRA-Muon across rank, width, depth and gauge, with
  baselines and a fine-tuning part); ``python -m benchmarks.study.lr_transfer``.
* :mod:`benchmarks.study.report`: turns its cached results into
  ``docs/lr_transfer.md`` and the plots under ``docs/lr_transfer/``.
"""
