"""Host-memory tuning that must happen before JAX starts its CPU client."""

from __future__ import annotations

import ctypes


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
