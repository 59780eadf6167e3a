"""Preparation speed and peak memory of each task on one synthetic event log, side by side.

    python tools/benchmark.py --what=prepare [--prepare_events=20000000] [--repeats=3]

Writes a Taobao-layout log with tools/make_event_log.py (or reads --prepare_log), then runs
tools/prepare_data.py on it once per task and repeat, each in its own process: next_item (buy
with 4 sampled negatives, the default task) and conversion (every pv an exposure, labelled by a
buy within 6 hours). Wall time is the median over the repeats, peak memory the largest resident
set of the preparing process (wait4's ru_maxrss); the last column is the ratio to next_item.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import bench_util

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = {
    "next_item": ["--target_behaviour=buy", "--neg_ratio=4"],
    "conversion": [
        "--task=conversion",
        "--exposure=pv",
        "--target_behaviour=buy",
        "--horizon_hours=6",
    ],
}


def _prepare(log: str, out: str, task: str, memory_mb: int) -> tuple[float, float, int]:
    """(seconds, peak RSS MB, examples written) of one preparation in a fresh process."""
    cmd = [
        sys.executable,
        os.path.join(TOOLS, "prepare_data.py"),
        "--source=taobao",
        f"--input={log}",
        f"--output={out}",
        f"--memory_mb={memory_mb}",
        "--noaudit",
        *TASKS[task],
    ]
    # stderr to a file, not a pipe: a pipe nobody reads while we wait would block the child.
    with tempfile.TemporaryFile("w+") as errf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf)
        _, status, usage = os.wait4(proc.pid, 0)  # this process's own peak, not all children's
        seconds = time.perf_counter() - t0
        errf.seek(0)
        err = errf.read()
    if os.waitstatus_to_exitcode(status):
        raise RuntimeError(f"prepare_data.py --task={task} failed:\n{err[-2000:]}")
    with open(os.path.join(out, "schema.json")) as f:
        rows = sum(s["rows"] for s in json.load(f)["splits"].values())
    return seconds, usage.ru_maxrss / 1024, rows


def run(events: int, log: str | None, repeats: int, memory_mb: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        if not log:
            log = os.path.join(tmp, "events.csv")
            bench_util.progress(f"writing a {events:,}-event log ...")
            subprocess.run(
                [
                    sys.executable,
                    os.path.join(TOOLS, "make_event_log.py"),
                    f"--events={events}",
                    f"--output={log}",
                ],
                check=True,
                capture_output=True,
            )
        rows = []
        for task in TASKS:
            runs = []
            for i in range(repeats):
                bench_util.progress(f"prepare --task={task} ({i + 1}/{repeats}) ...")
                runs.append(_prepare(log, os.path.join(tmp, f"{task}-{i}"), task, memory_mb))
            rows.append(
                {
                    "task": task,
                    "events": events,
                    "examples": runs[-1][2],
                    "seconds": statistics.median(r[0] for r in runs),
                    "peak_rss_mb": max(r[1] for r in runs),
                    "repeats": repeats,
                    "memory_mb": memory_mb,
                }
            )
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["memory_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    return rows


def print_table(rows: list[dict]) -> None:
    print(
        f"{'task':>11} {'examples':>11} {'median s':>9} {'peak RSS MB':>12} "
        f"{'time vs next_item':>18} {'memory vs next_item':>20}"
    )
    for r in rows:
        print(
            f"{r['task']:>11} {r['examples']:>11,} {r['seconds']:>9.1f} {r['peak_rss_mb']:>12,.0f} "
            f"{r['time_ratio']:>17.2f}x {r['memory_ratio']:>19.2f}x"
        )
    print(
        f"({rows[0]['events']:,} events, --memory_mb={rows[0]['memory_mb']}, "
        f"median of {rows[0]['repeats']} runs each)"
    )
