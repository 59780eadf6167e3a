"""Host-memory tuning that must happen before JAX starts its CPU client."""

from __future__ import annotations

import ctypes
import os
import re
import sys

from influence_jax.errors import ConfigError

_DEVICE_COUNT = "--xla_force_host_platform_device_count"


def keep_freed_host_memory() -> bool:
    """Makes glibc reuse freed memory instead of returning it to the OS; True if it applied.

    XLA:CPU allocates each step's temporary buffers (tens of MB) on its own worker threads and
    frees them at the end of the step. By default glibc serves such blocks with mmap (or from
    64 MB per-thread arenas it trims), so every step page-faults its buffers in again: about
    30,000 faults and a third of the step's CPU time at batch 1024 on 2 cores. One arena, no
    mmap and no trimming keep the pages. Must run before JAX starts its CPU client.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    return all(
        libc.mallopt(param, value) == 1
        for param, value in ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2**31 - 1))
    )


# The same three settings as glibc environment tunables, for another process (the benchmark's
# reference implementations get them so that the comparison is like for like).
ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(2**31 - 1),
}


def split_host(devices: int) -> None:
    """Makes JAX's CPU platform `devices` XLA devices (0: leave JAX's single CPU device).

    A data-parallel function then runs one batch shard per device, each on its own thread. On
    the 2-core AMX Xeon of 2026-12-05 the full ranker (bst) scored a 1024-row batch 1.25-1.41x
    as fast over two devices as over one (paired processes; the default ranker and batch 4096
    alike either way): its small batched matmuls do not spread over the cores by themselves.
    Training is slower so (a cross-device gradient sum per step). Replaces a device count
    already in XLA_FLAGS; must run before JAX starts its CPU client.
    """
    if devices < 0:
        raise ConfigError(f"host devices must be 0 (JAX's default) or more, not {devices}")
    if not devices:
        return
    if "jax" in sys.modules:
        from jax._src import xla_bridge

        if xla_bridge.backends_are_initialized():
            raise ConfigError("host devices must be set before JAX starts (its CPU client runs)")
    flags = re.sub(rf"\s*{_DEVICE_COUNT}=\S*", "", os.environ.get("XLA_FLAGS", ""))
    os.environ["XLA_FLAGS"] = f"{flags} {_DEVICE_COUNT}={devices}".strip()
