"""What tools/benchmark.py and its reference implementations share: the model's sizes, the
synthetic data, the command line, the timing rule and the JSON lines. NumPy only, so each
reference process imports nothing but its own framework.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

# The benchmark model (BENCHMARKS.md): three towers over length-MAX_LEN id sequences.
USER_VOCAB, ITEM_VOCAB, BEHAVIOUR_VOCAB = 10_000, 100_000, 10
MAX_LEN = 50
EMBED_DIM, FILTERS, KERNEL_SIZE, POOL = 32, 64, 3, 2
HIDDEN, DROPOUT, LEARNING_RATE = 128, 0.2, 1e-3
ID_KEYS = ("user_ids", "item_ids", "behaviour_ids")

MISSING_DEPS_EXIT = 3  # exit status of a reference whose optional dependencies are absent
NUM_DISTINCT_BATCHES = 4  # batches cycled through, so no step sees the same ids twice in a row


def vocabs(item_vocab: int = ITEM_VOCAB) -> tuple[int, int, int]:
    return USER_VOCAB, item_vocab, BEHAVIOUR_VOCAB


def flat_features(max_len: int = MAX_LEN) -> int:
    """Width of the flattened, concatenated tower outputs (VALID conv, then pooling)."""
    return len(ID_KEYS) * FILTERS * ((max_len - KERNEL_SIZE + 1) // POOL)


def model_flops_per_example(
    max_len: int = MAX_LEN, embed_dim: int = EMBED_DIM, train: bool = True
) -> float:
    """Multiply-adds x 2 of the convolutions and dense layers; training counts 3x (fwd + bwd)."""
    conv = len(ID_KEYS) * (max_len - KERNEL_SIZE + 1) * KERNEL_SIZE * embed_dim * FILTERS * 2
    dense = (flat_features(max_len) * HIDDEN + HIDDEN) * 2
    return (conv + dense) * (3 if train else 1)


def make_batches(
    batch: int,
    max_len: int = MAX_LEN,
    item_vocab: int = ITEM_VOCAB,
    n: int = NUM_DISTINCT_BATCHES,
    seed: int = 0,
) -> list[dict[str, np.ndarray]]:
    """Uniformly random ids and labels: the same bytes in every implementation."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        b = {
            k: rng.integers(0, v, (batch, max_len), dtype=np.int32)
            for k, v in zip(ID_KEYS, vocabs(item_vocab), strict=True)
        }
        b["label"] = rng.integers(0, 2, (batch,)).astype(np.float32)
        b["weight"] = np.ones((batch,), np.float32)
        out.append(b)
    return out


def int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def arg_parser(description: str) -> argparse.ArgumentParser:
    """The command line every reference accepts (a subset of tools/benchmark.py's flags)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batches", type=int_list, default=[1024, 4096], help="e.g. 1024,4096")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.add_argument("--seconds", type=float, default=2.0, help="length of one timed run")
    p.add_argument("--repeats", type=int, default=5, help="timed runs; the median is reported")
    p.add_argument("--max_len", type=int, default=MAX_LEN)
    p.add_argument("--item_vocab", type=int, default=ITEM_VOCAB)
    p.add_argument("--embed_dim", type=int, default=EMBED_DIM)
    p.add_argument("--impls", default="", help="comma-separated subset of this reference's impls")
    return p


def timed_runs(
    run: Callable[[int], None], step_seconds: float, seconds: float, repeats: int
) -> tuple[int, list[float]]:
    """Times `repeats` calls of run(steps), each about `seconds` long; returns (steps, secs).

    `run(steps)` must execute `steps` steps and wait for the last one to finish.
    """
    steps = max(2, math.ceil(seconds / max(step_seconds, 1e-6)))
    secs = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run(steps)
        secs.append(time.perf_counter() - t0)
    return steps, secs


def timed_runs_cpu(
    run: Callable[[int], None], step_seconds: float, seconds: float, repeats: int
) -> tuple[int, list[float], float]:
    """`timed_runs`, plus this process's CPU seconds (all threads) per step over the runs."""
    cpu0 = time.process_time()
    steps, secs = timed_runs(run, step_seconds, seconds, repeats)
    return steps, secs, (time.process_time() - cpu0) / (steps * repeats)


def best_scoring_path(
    paths: dict[str, Callable[[int], None]], batch: int, seconds: float, repeats: int
) -> dict[str, Any]:
    """Times each of a reference's scoring paths (name -> run(steps)); the fastest counts.

    Keras' `model.predict` over a dataset and a loop of `predict_on_batch` on ready tensors
    differ by up to 2x, one way or the other, with the model and batch: the comparison is
    against the faster. Returns the record fields: score_ex_per_s, score_ex_per_cpu_s,
    score_path, score_<path>_ex_per_s for each, score_steps and score_secs of the fastest.
    """
    scoring = {}
    for name, run in paths.items():
        run(2)
        t0 = time.perf_counter()
        run(3)
        step_s = (time.perf_counter() - t0) / 3
        n, secs, cpu = timed_runs_cpu(run, step_s, seconds, repeats)
        scoring[name] = (ex_per_s(batch, n, secs), batch / cpu, n, secs)
    best = max(scoring, key=lambda k: scoring[k][0])
    rate, rate_cpu, steps, secs = scoring[best]
    return {
        "score_ex_per_s": rate,
        "score_ex_per_cpu_s": rate_cpu,
        "score_path": best,
        **{f"score_{k}_ex_per_s": v[0] for k, v in scoring.items()},
        "score_steps": steps,
        "score_secs": secs,
    }


def request_latency(
    paths: dict[str, Callable[[dict], Any]], requests: list[dict], seconds: float, repeats: int
) -> dict[str, Any]:
    """One request at a time (its result fetched before the next starts), for each scoring
    path (name -> call(request) -> host result) over `requests` in turn for about `seconds`,
    `repeats` times, after one warm-up pass. The path with the lowest median latency counts.
    Returns the record fields: p50_ms, p99_ms, requests_per_s, path, p50_<path>_ms."""
    out: dict[str, Any] = {}
    best = None
    for name, call in paths.items():
        for r in requests:  # compiles, warms the caches
            call(r)
        lat: list[float] = []
        total = 0.0
        for _ in range(repeats):
            t_end = time.perf_counter() + seconds
            while True:
                for r in requests:
                    t0 = time.perf_counter()
                    call(r)
                    lat.append(time.perf_counter() - t0)
                if time.perf_counter() >= t_end:
                    break
        total = sum(lat)
        q = np.percentile(np.array(lat) * 1e3, [50, 99])
        row = {"p50_ms": float(q[0]), "p99_ms": float(q[1]), "requests_per_s": len(lat) / total,
               "requests": len(lat), "path": name}  # fmt: skip
        out[f"p50_{name}_ms"] = row["p50_ms"]
        if best is None or row["p50_ms"] < best["p50_ms"]:
            best = row
    return out | (best or {})


def ex_per_s(batch: int, steps: int, secs: list[float]) -> float:
    return batch * steps / statistics.median(secs)


def emit(record: dict[str, Any], as_json: bool) -> None:
    """One result: a JSON line, or a readable line for a person running a reference alone."""
    if as_json:
        print(json.dumps(record), flush=True)
    else:
        train, score = record["train_ex_per_s"], record["score_ex_per_s"]
        print(
            f"{record['impl']:<22} batch {record['batch']:>6}  train {train:>12,.0f} ex/s  "
            f"score {score:>12,.0f} ex/s",
            flush=True,
        )


def missing_deps(what: str, error: Exception) -> None:
    """Exits with MISSING_DEPS_EXIT and one line naming the extra to install."""
    print(
        f"{what} is not installed ({error}); install the benchmark extra: "
        "pip install -e '.[bench]'",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(MISSING_DEPS_EXIT)
