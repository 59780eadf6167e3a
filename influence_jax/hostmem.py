"""Host-memory tuning that must happen before JAX starts its CPU client."""

from __future__ import annotations

import ctypes
import os
import re
import sys

from influence_jax.errors import ConfigError

_DEVICE_COUNT = "--xla_force_host_platform_device_count"

# Rows of the train batch per CPU device from which `--host_memory=auto` keeps one arena
# (`arenas`): the benchmark CNN's buffers at 1024 rows are tens of MB; the default ranker was as
# fast either way at 1024 rows and faster with the threads' arenas at 256.
ONE_ARENA_BATCH = 1024
HOST_MEMORY = ("auto", "one_arena", "thread_arenas", "off")  # main.py's --host_memory


def keep_freed_host_memory(one_arena: bool = True) -> bool:
    """Makes glibc reuse freed memory instead of returning it to the OS; True if it applied.

    XLA:CPU allocates each step's temporary buffers on its own worker threads and frees them
    at the end of the step. By default glibc serves large blocks with mmap and trims what is
    freed, so every step page-faults its buffers in again: about 30,000 faults and a third of
    the step's CPU time for the benchmark CNN at batch 1024 on 2 cores. No mmap and no
    trimming keep the pages.

    `one_arena` also makes every thread allocate from one arena. That suits large buffers (a
    thread's arena grows in heaps of at most 64 MB, and glibc unmaps a heap as soon as all of
    it is free, whatever the trim threshold): the benchmark CNN trained about 2x as fast at
    batch 1024 and 4096 with one arena as with glibc's 8 per core. Small buffers want the
    threads' own arenas (one is a lock every thread takes): the multi-task model at batch 256
    trained 1.4-1.9x as fast with them as without any setting, and faster than with one arena
    (docs/benchmarks.md, 2026-12-06; `arenas` chooses).
    Must run before JAX starts its CPU client (its threads keep the arenas they started with).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (macOS, musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8
    settings = [(m_mmap_max, 0), (m_trim_threshold, 2**31 - 1)]
    if one_arena:
        settings.insert(0, (m_arena_max, 1))
    return all(libc.mallopt(param, value) == 1 for param, value in settings)


def arenas(choice: str, batch_size: int) -> bool | None:
    """`--host_memory` -> keep_freed_host_memory's `one_arena`, or None to leave glibc alone.

    "auto": one arena where each CPU device of this host (XLA_FLAGS' forced device count,
    else 1) trains on ONE_ARENA_BATCH rows of the batch or more (large per-step buffers),
    the threads' own arenas below (many small ones). `batch_size` is the global batch: in a
    multi-process run each process's share is smaller, but the process count is not known
    before JAX's runtime starts, so such a run may keep one arena where its rows are fewer.
    """
    if choice not in HOST_MEMORY:
        raise ConfigError(f"--host_memory={choice}: choose from {', '.join(HOST_MEMORY)}")
    if choice == "off":
        return None
    if choice == "auto":
        return batch_size // host_devices() >= ONE_ARENA_BATCH
    return choice == "one_arena"


def host_devices() -> int:
    """The CPU devices JAX will make of this host: XLA_FLAGS' forced count, else 1."""
    found = re.findall(rf"{_DEVICE_COUNT}=(\d+)", os.environ.get("XLA_FLAGS", ""))
    return max(int(found[-1]), 1) if found else 1


# keep_freed_host_memory's settings with one arena as glibc environment tunables, for another
# process (the benchmark's references get them so that the comparison is like for like).
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
