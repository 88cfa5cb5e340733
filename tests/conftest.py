"""Test setup: 8 host CPU devices (sharding tests) and shared fixtures.

The device count must be set before JAX starts its backend, hence at import time.
"""

import os

# 8 host devices for the sharding tests. The suite is dominated by XLA's compile
# time of tiny programs, so LLVM optimization is off (about 30% less CPU) and XLA
# CPU's older fusion emitters replace the MLIR ones (about half the CPU again, jax
# 0.10.2); results stay within every test's tolerance.
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0"
    " --xla_cpu_use_fusion_emitters=false",
)

# The TinyShakespeare corpus is never copied into the repository. In this project's
# layout (and in CI) it sits in ../shared/data beside the checkout; elsewhere the
# loader finds it in its cache or downloads it once there, checking its SHA-256, so
# the tests that train on text run. Offline and without a copy they skip, saying why.
_SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
if "LORA_MUON_JAX_DATA" not in os.environ:
    if os.path.isdir(_SHARED_DATA):
        os.environ["LORA_MUON_JAX_DATA"] = os.path.abspath(_SHARED_DATA)
    else:
        from lora_muon_jax_examples.tinyshakespeare import load_tinyshakespeare

        try:
            load_tinyshakespeare()  # the cache, or one checksummed download into it
        except FileNotFoundError:
            pass  # offline: the text tests skip with their reason (pytest -rs)

import hypothesis  # noqa: E402
import jax  # noqa: E402
import pytest  # noqa: E402

hypothesis.settings.register_profile(
    "default", max_examples=25, deadline=None, derandomize=True, print_blob=True
)
hypothesis.settings.load_profile("default")


@pytest.fixture
def key():
    return jax.random.key(0)
