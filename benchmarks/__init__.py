"""Benchmarks and studies of lora_muon_jax (``python -m benchmarks.run``, ``benchmarks.study``).

LoRA-Muon's r×r factorizations run as LAPACK custom calls on CPU. jaxlib's LAPACK
comes from an OpenBLAS whose worker threads spin against XLA's own threads on a
small CPU (measured: r = 32 updates 10–25× slower on 2 cores), so every benchmark
pins it to one thread unless the caller set ``OPENBLAS_NUM_THREADS`` already. This
must happen before jax is imported, hence here.
"""

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
