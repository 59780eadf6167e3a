"""Test setup: 8 fake CPU devices before JAX starts; the repo root importable; the fixtures
shared across test files (their code lives in tests/helpers.py)."""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import pytest  # noqa: E402

from tests import helpers  # noqa: E402  (imports JAX; its CPU client starts only on first use)

# Tests check correctness on tiny models, where compiling is most of the time: the flags that
# make XLA:CPU compile fast (helpers.FAST_COMPILE), this process and its children alike.
os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "")
    + f" --xla_force_host_platform_device_count=8 {helpers.FAST_COMPILE}"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): one worker more than the cores this process may use, at
    most 4.

    Measured on a 2-core AMD EPYC family 23: two workers took a clean clone's default tier from
    15:27 to 12:10. On a 2-core AMD EPYC family 25 (Zen 3), three workers took it from 9:44 to
    8:58 (the processes used 181 % of the 2 cores: tests wait on their subprocesses, on
    checkpoint writes and on each other's compiles). The cap of 4 is a guess, not a measurement:
    every worker starts its own 8-device runs and trainings, whose memory adds up (2.8 GB at
    most per process in that run).
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min((cores or 1) + 1, 4))


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(pytestconfig, tmp_path_factory):
    """One persistent compilation cache for this process and every child process: a program
    compiled once (the tiny model's steps recur in many tests) is loaded, not compiled, again."""
    import jax

    cache = helpers.session_cache(pytestconfig, tmp_path_factory)
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    # Tools the tests start as processes (rank.py, influence_report.py, ...) inherit it.
    os.environ.update(
        JAX_COMPILATION_CACHE_DIR=cache,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return cache


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """(schema, path) of the tiny synthetic dataset, generated once per test session."""
    return helpers.tiny_dataset(str(tmp_path_factory.mktemp("data")))


@pytest.fixture
def jax_cache(pytestconfig, tmp_path_factory) -> str:
    """A compilation cache shared by every subprocess of the session."""
    return helpers.session_cache(pytestconfig, tmp_path_factory)


@pytest.fixture
def reference(tmp_path_factory, jax_cache):
    """The uninterrupted one-process, 8-device tiny run (once per session)."""
    return helpers.reference_run(tmp_path_factory, jax_cache)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """One trained tiny run per session, shared by the ranking and influence tests."""
    return helpers.trained_tiny_run(tmp_path_factory)


@pytest.fixture(scope="module")
def run(run_dir):
    from influence_jax import scoring

    return scoring.load_run(run_dir)
