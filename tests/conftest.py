"""Test setup: 8 fake CPU devices before JAX is imported; the repo root importable."""

import os
import sys

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(schema, path) of the tiny synthetic dataset, generated once per test session."""
    from tests import helpers

    return helpers.tiny_dataset(str(tmp_path_factory.mktemp("data")))
