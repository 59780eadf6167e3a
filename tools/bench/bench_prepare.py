"""Preparation speed and peak memory of each task on one synthetic event log, side by side.

    python tools/benchmark.py --what=prepare [--prepare_events=20000000] [--repeats=3]

Writes a Taobao-layout log with tools/make_event_log.py (or reads --prepare_log), then runs
tools/prepare_data.py on it once per task, history storage and repeat, each in its own process:
next_item (buy with 4 sampled negatives) and conversion (every pv an exposure, labelled by a
buy within 6 hours), each with histories copied into every example (--history_storage=copy,
the only format before) and by reference (the default). Wall time is the median over the
repeats, peak memory the largest resident set of the preparing process (wait4's ru_maxrss),
output the bytes written; the ratio columns are to next_item with copied histories, the
task and format the engine had before conversion existed. "read ex/s" is the training input
pipeline over the prepared train split (batch 1024, shuffled, 2 read threads), the price of
assembling histories at read time.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import bench_util

READ_BATCH, READ_BATCHES = 1024, 200

TOOLS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STORAGE = ("copy", "reference")
TASKS = {
    "next_item": ["--target_behaviour=buy", "--neg_ratio=4"],
    "conversion": [
        "--task=conversion",
        "--exposure=pv",
        "--target_behaviour=buy",
        "--horizon_hours=6",
    ],
}


def _prepare(
    log: str, out: str, task: str, storage: str, memory_mb: int
) -> tuple[float, float, int, int, float]:
    """(seconds, peak RSS MB, examples written, output bytes, input pipeline examples/s) of
    one preparation in a fresh process."""
    cmd = [
        sys.executable,
        os.path.join(TOOLS, "prepare_data.py"),
        "--source=taobao",
        f"--input={log}",
        f"--output={out}",
        f"--memory_mb={memory_mb}",
        "--noaudit",
        f"--history_storage={storage}",
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
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    # Read in a child too: a parent that had mapped the dataset would pass its resident set on
    # to the next preparation's fork (Linux keeps ru_maxrss across exec).
    read = subprocess.run(
        [sys.executable, os.path.abspath(__file__), out], check=True, capture_output=True, text=True
    )
    shutil.rmtree(out)  # the next run needs the disk
    return seconds, usage.ru_maxrss / 1024, rows, size, float(read.stdout.split()[-1])


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
            for storage in STORAGE:
                runs = []
                for i in range(repeats):
                    bench_util.progress(f"prepare --task={task} --history_storage={storage} "
                                        f"({i + 1}/{repeats}) ...")  # fmt: skip
                    out = os.path.join(tmp, f"{task}-{storage}-{i}")
                    runs.append(_prepare(log, out, task, storage, memory_mb))
                rows.append(
                    {
                        "task": task,
                        "history_storage": storage,
                        "events": events,
                        "examples": runs[-1][2],
                        "output_mb": runs[-1][3] / 2**20,
                        "read_per_s": statistics.median(r[4] for r in runs),
                        "seconds": statistics.median(r[0] for r in runs),
                        "peak_rss_mb": max(r[1] for r in runs),
                        "repeats": repeats,
                        "memory_mb": memory_mb,
                        "cpu": bench_util.cpu_description(),
                        "date": time.strftime("%Y-%m-%d"),
                    }
                )
    base = rows[0]
    for r in rows:
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["memory_ratio"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    return rows


def table_text(rows: list[dict]) -> str:
    """The printed table (also rendered into docs/benchmarks.md by tools/readme_figures.py)."""
    lines = [
        f"{'task':>11} {'histories':>10} {'examples':>11} {'median s':>9} {'peak RSS MB':>12} "
        f"{'output MB':>10} {'read ex/s':>10} {'time ratio':>11} {'memory ratio':>13}"
    ]
    for r in rows:
        lines.append(
            f"{r['task']:>11} {r['history_storage']:>10} {r['examples']:>11,} "
            f"{r['seconds']:>9.1f} {r['peak_rss_mb']:>12,.0f} {r['output_mb']:>10,.0f} "
            f"{r['read_per_s']:>10,.0f} {r['time_ratio']:>10.2f}x {r['memory_ratio']:>12.2f}x"
        )
    lines.append(
        f"({rows[0]['events']:,} events, --memory_mb={rows[0]['memory_mb']}, median of "
        f"{rows[0]['repeats']} runs each; ratios to next_item with copied histories)"
    )
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    print(f"{rows[0]['cpu']}, {rows[0]['date']}")
    print(table_text(rows))


def read_rate(data: str) -> float:
    """Examples/s of the training input pipeline over `data`'s train split (0 if too small)."""
    import bench_input

    from influence_jax.data.store import ExampleStore

    store = ExampleStore(data, "train")
    n = min(READ_BATCHES, len(store) // READ_BATCH - 5)
    return bench_input.input_rate(store, READ_BATCH, n, threads=2, prefetch=4) if n > 0 else 0.0


if __name__ == "__main__":  # the read measurement's own process (see _prepare)
    sys.path.insert(0, os.path.dirname(TOOLS))
    print(read_rate(sys.argv[1]))
