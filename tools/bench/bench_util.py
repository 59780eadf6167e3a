"""What the benchmark sections share: timing, the CPU share of other processes, the matmul
limit and running a reference implementation in its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from bench_refs import common

from influence_jax import hostmem

TOOLS = os.path.dirname(os.path.abspath(__file__))


def time_steps(
    run: Callable[[int], None], seconds: float, repeats: int
) -> tuple[int, list[float], float]:
    """Warms `run(steps)` up (compiling), sizes a run to about `seconds`, times `repeats` runs.

    Returns (steps per run, wall seconds of each run, this process's CPU seconds per step over
    all runs). CPU time counts every thread of the process; on a machine shared with other
    jobs it varies far less than wall time, so examples per CPU-second compare implementations
    even when the wall-clock figures are low.
    """
    run(2)
    t0 = time.perf_counter()
    run(3)
    return common.timed_runs_cpu(run, (time.perf_counter() - t0) / 3, seconds, repeats)


class Trainer:
    """Runs a jitted `step(state, batch) -> (state, metrics)` over ready batches in turn, as the
    training loop does (step t-1's metrics fetched while step t runs); keeps the state."""

    def __init__(self, step: Callable, state: Any, batches: list):
        self.step, self.state, self.batches = step, state, batches

    def run(self, steps: int) -> None:
        pending = None
        for i in range(steps):
            self.state, m = self.step(self.state, self.batches[i % len(self.batches)])
            if pending is not None:
                jax.device_get(pending)
            pending = m
        jax.device_get(pending)


def matmul_flops_per_s(dtype: str) -> float:
    """FLOP/s of a large square matmul at default precision: what this device sustains."""
    n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    mm = jax.jit(jnp.dot)
    mm(a, a).block_until_ready()
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


SIMD_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")


def _cpuinfo_fields(cpuinfo: str | None) -> dict[str, str] | None:
    """The first CPU's fields of /proc/cpuinfo (or of `cpuinfo`); None where it cannot be read."""
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return None
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def bf16_hidden_pays(cpuinfo: str | None = None) -> bool:
    """Whether this host's CPU multiplies bfloat16 natively, with AMX (amx_bf16 in
    /proc/cpuinfo's flags) or AVX-512 BF16 (avx512_bf16), where the benchmark model's hidden
    layer multiplies bfloat16 operands into float32 results (`BenchCNN.bf16_hidden`). On the AMX
    Xeon of 2026-12-05 that made scoring 1.08-1.31x and training about 1.2x as fast; on the
    AVX-512 BF16 EPYC (Zen 4, no AMX) of 2026-12-07 folded scoring about 1.27x, plain scoring
    1.1-1.2x and training 1.05-1.08x (two runs each way, alternating); held-out AUC within 0.002
    of float32 on both (`--what=quality`). AVX2 CPUs keep float32."""
    flags = (_cpuinfo_fields(cpuinfo) or {}).get("flags", "").split()
    return "amx_bf16" in flags or "avx512_bf16" in flags


def cpu_description(cpuinfo: str | None = None) -> str:
    """The host CPU's model, family and vector extensions ("AMD EPYC (family 26), avx2
    avx512f ..."), read from /proc/cpuinfo; "" where it cannot be read."""
    fields = _cpuinfo_fields(cpuinfo)
    if fields is None:
        return ""
    have = set(fields.get("flags", "").split())
    simd = " ".join(f for f in SIMD_FLAGS if f in have) or "no AVX2"
    family = f" (family {fields['cpu family']})" if "cpu family" in fields else ""
    return f"{fields.get('model name', '?')}{family}, {simd}"


def describe_device() -> str:
    d = jax.devices()[0]
    cpu = cpu_description()
    return (
        f"{d.device_kind} x{jax.device_count()} ({d.platform}, {os.cpu_count()} host cores"
        + (f"; {cpu}" if cpu else "")
        + f"), jax {jax.__version__}"
    )


def machine() -> dict[str, Any]:
    """Where and when a benchmark ran, for its JSON rows: the CPU (model, family, vector
    extensions), cores, memory, the UTC date and JAX's version."""
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (OSError, ValueError):
        mem_gib = None
    return {
        "cpu": cpu_description(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_gib) if mem_gib else None,
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "jax": jax.__version__,
    }


class CpuShareOfOthers:
    """Share of the machine's CPU time that other processes used while the block ran.

    Machine-wide busy time from /proc/stat minus this process's own (or, with `children`, its
    finished children's) CPU time, over wall time x cores. None where /proc/stat is absent.
    """

    def __init__(self, children: bool = False):
        self.children, self.share = children, None

    def _own(self) -> float:
        t = os.times()
        return t.children_user + t.children_system if self.children else t.user + t.system

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return None
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        busy = self._busy()
        if busy is not None and self.busy0 is not None:
            wall = (time.perf_counter() - self.t0) * (os.cpu_count() or 1)
            other = busy - self.busy0 - (self._own() - self.own0)
            self.share = min(1.0, max(0.0, other / max(wall, 1e-9)))
        return False


def run_reference(
    name: str,
    script: str,
    args: list[str],
    timeout: int,
    as_json: bool,
    keep_host_memory: bool = False,
):
    """Runs tools/bench/bench_refs/`script` with `--json` in its own process; returns its JSON rows.

    With `keep_host_memory` the reference runs with the allocator settings the engine gives
    itself (influence_jax.hostmem.ENV, glibc's environment tunables), so both sides are tuned
    alike; each row records it. A missing optional dependency, a failure or a timeout prints a
    note and returns what the reference printed before it stopped (each row gets `others_cpu`).
    """
    cmd = [sys.executable, os.path.join(TOOLS, "bench_refs", script), "--json", *args]
    env = dict(os.environ, **(hostmem.ENV if keep_host_memory else {}))
    progress(f"{name} reference ...")
    with CpuShareOfOthers(children=True) as others:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            note(f"{name} reference: stopped after {timeout} s, no result", as_json)
            return []
    if proc.returncode == common.MISSING_DEPS_EXIT:
        note(f"{name} reference skipped: {proc.stderr.strip().splitlines()[-1]}", as_json)
        return []
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0:
        tail = "\n  ".join(proc.stderr.strip().splitlines()[-8:])
        note(f"{name} reference failed (exit {proc.returncode}):\n  {tail}", as_json)
    for r in rows:
        r["others_cpu"] = others.share
        r["host_memory_kept"] = keep_host_memory
    return rows


def busy_warning(rows: list[dict], label: Callable[[dict], str]) -> None:
    busy = sorted({label(r) for r in rows if (r.get("others_cpu") or 0) > 0.1})
    if busy:
        print(
            "warning: other processes used over 10% of the CPU during "
            + ", ".join(busy)
            + "; unless they only filled idle time, those figures are low"
        )


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def note(msg: str, as_json: bool) -> None:
    """A remark for the reader: on stderr when stdout carries JSON lines."""
    print(msg, file=sys.stderr if as_json else sys.stdout, flush=True)
