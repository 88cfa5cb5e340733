"""Test setup: 8 host CPU devices (sharding tests) and shared fixtures.

The device count must be set before JAX starts its backend, hence at import time.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

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
