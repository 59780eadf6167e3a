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


# Fixtures shared by the subprocess tests (test_resume, test_faults, test_multihost).
@pytest.fixture
def jax_cache(pytestconfig, tmp_path_factory) -> str:
    """A compilation cache shared by every subprocess of the session."""
    from tests.test_resume import session_cache

    return session_cache(pytestconfig, tmp_path_factory)


@pytest.fixture
def reference(tmp_path_factory, jax_cache):
    """The uninterrupted one-process, 8-device tiny run of test_resume.py (once per session)."""
    from tests.test_resume import reference_run

    return reference_run(str(tmp_path_factory.getbasetemp()), jax_cache)


# Fixtures shared by test_ranking and test_influence: one trained tiny run per session.
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    from tests.test_ranking import trained_tiny_run

    return trained_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def run(run_dir):
    from influence_jax import ranking

    return ranking.load_run(run_dir)
