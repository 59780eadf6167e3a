"""The allocator settings of influence_jax/hostmem.py: what each --host_memory choice means, and
that glibc then keeps a freed step buffer instead of unmapping it (checked in a fresh process
with glibc's own statistics, as XLA:CPU's threads would see it)."""

import json
import subprocess
import sys

import pytest

from influence_jax import hostmem
from influence_jax.errors import ConfigError

# Run in a fresh process: settings apply to one process for good, and the thread arenas to
# threads started after them. Prints glibc's statistics around a 48 MB block (mallinfo2) and
# how many arenas hold memory once a second thread has allocated (malloc_info's <heap>s).
_PROBE = r"""
import ctypes, json, os, sys, tempfile, threading
from influence_jax import hostmem
choice = sys.argv[1]
if choice != "none":
    assert hostmem.keep_freed_host_memory(one_arena=choice == "one")
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.fopen.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
class Info(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in "arena ordblks smblks hblks hblkhd usmblks "
                "fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
size = 48 << 20
before = libc.mallinfo2().hblkhd
p = libc.malloc(size)
mapped = libc.mallinfo2().hblkhd - before
libc.free(p)
kept = libc.mallinfo2().arena
held = []
t = threading.Thread(target=lambda: held.append(libc.malloc(100_000)))
t.start(); t.join()
with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "info.xml")
    f = libc.fopen(path.encode(), b"w")
    libc.malloc_info(0, f); libc.fclose(f)
    heaps = open(path).read().count("<heap nr=")
print(json.dumps({"mapped": mapped, "kept": kept, "size": size, "heaps": heaps}))
"""


def _probe(choice: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _PROBE, choice], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_buffers_are_kept_in_one_arena_or_in_each_threads():
    plain, one, threads = _probe("none"), _probe("one"), _probe("threads")
    # glibc's defaults: the block is mmapped, and unmapped when freed.
    assert plain["mapped"] >= plain["size"] and plain["kept"] < plain["size"], plain
    for r in (one, threads):  # kept: served from the heap, and still there after the free
        assert r["mapped"] == 0 and r["kept"] >= r["size"], r
    assert one["heaps"] == 1, one  # the second thread allocated from the main arena
    assert threads["heaps"] >= 2, threads  # ... from its own


def test_host_memory_choices(monkeypatch):
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    assert hostmem.arenas("off", 4096) is None
    assert hostmem.arenas("auto", 256) is False  # small buffers: the threads' arenas
    assert hostmem.arenas("auto", hostmem.ONE_ARENA_BATCH) is True
    assert hostmem.arenas("one_arena", 256) is True
    assert hostmem.arenas("thread_arenas", 4096) is False
    # Per CPU device of the host: 8 devices share a batch of 1024 in rows of 128.
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert hostmem.host_devices() == 8
    assert hostmem.arenas("auto", 1024) is False
    assert hostmem.arenas("auto", 8 * hostmem.ONE_ARENA_BATCH) is True
    with pytest.raises(ConfigError, match="--host_memory=fast: choose from auto"):
        hostmem.arenas("fast", 256)
