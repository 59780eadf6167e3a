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

`--prepare_engines=numpy,spark` instead prepares each task (histories by reference) with both
engines, Spark in local mode on this machine's cores (docs/spark.md): time, peak memory of the
whole process tree (the driver, Spark's JVM and its Python workers, summed, sampled every
0.2 s; the numpy engine measured the same way) and whether the two outputs are identical.
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import bench_util

SAMPLE_S = 0.2

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


def _command(log: str, out: str, task: str, memory_mb: int, *more: str) -> list[str]:
    """tools/prepare_data.py on the Taobao-layout `log` for `task`, without the audit."""
    return [
        sys.executable,
        os.path.join(TOOLS, "prepare_data.py"),
        "--source=taobao",
        f"--input={log}",
        f"--output={out}",
        f"--memory_mb={memory_mb}",
        "--noaudit",
        *TASKS[task],
        *more,
    ]


def _written(out: str) -> tuple[dict, int, int]:
    """(schema.json, examples in all splits, bytes on disk) of the prepared folder `out`."""
    with open(os.path.join(out, "schema.json")) as f:
        schema = json.load(f)
    rows = sum(s["rows"] for s in schema["splits"].values())
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    return schema, rows, size


def _prepare(
    log: str, out: str, task: str, storage: str, memory_mb: int
) -> tuple[float, float, int, int, float]:
    """(seconds, peak RSS MB, examples written, output bytes, input pipeline examples/s) of
    one preparation in a fresh process."""
    cmd = _command(log, out, task, memory_mb, f"--history_storage={storage}")
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
    _, rows, size = _written(out)
    # Read in a child too: a parent that had mapped the dataset would pass its resident set on
    # to the next preparation's fork (Linux keeps ru_maxrss across exec).
    read = subprocess.run(
        [sys.executable, os.path.abspath(__file__), out], check=True, capture_output=True, text=True
    )
    shutil.rmtree(out)  # the next run needs the disk
    return seconds, usage.ru_maxrss / 1024, rows, size, float(read.stdout.split()[-1])


def _write_log(tmp: str, events: int) -> str:
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
    return log


def run(events: int, log: str | None, repeats: int, memory_mb: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        log = log or _write_log(tmp, events)
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
    return _ratios(rows, lambda r: rows[0], "peak_rss_mb")


def _ratios(rows: list[dict], base_of, memory: str) -> list[dict]:
    """Adds time_ratio and memory_ratio (column `memory`) of each row to `base_of(row)`."""
    for r in rows:
        base = base_of(r)
        r["time_ratio"] = r["seconds"] / base["seconds"]
        r["memory_ratio"] = r[memory] / base[memory]
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


def tree_rss_mb(pid: int) -> float:
    """Resident set of `pid` and all its descendants, summed (MB), from /proc."""
    kids: dict[int, list[int]] = {}
    for p in os.listdir("/proc"):
        if p.isdigit():
            try:
                with open(f"/proc/{p}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            kids.setdefault(ppid, []).append(int(p))
    total, todo = 0, [pid]
    while todo:
        q = todo.pop()
        todo += kids.get(q, [])
        try:
            with open(f"/proc/{q}/status") as f:
                total += next((int(ln.split()[1]) for ln in f if ln.startswith("VmRSS")), 0)
        except OSError:
            pass
    return total / 1024


def _prepare_tree(log: str, out: str, task: str, memory_mb: int, engine: list[str]):
    """(seconds, peak MB of the process tree, examples, output bytes, the Spark engine's phase
    seconds) of one preparation (histories by reference)."""
    cmd = _command(log, out, task, memory_mb, *engine)
    with tempfile.TemporaryFile("w+") as errf:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=errf)
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, tree_rss_mb(proc.pid))
            time.sleep(SAMPLE_S)
        seconds = time.perf_counter() - t0
        errf.seek(0)
        err = errf.read()
    if proc.returncode:
        raise RuntimeError(f"prepare_data.py {' '.join(engine)} failed:\n{err[-2000:]}")
    schema, rows, size = _written(out)
    return seconds, peak, rows, size, schema["extra"]["engine"].get("seconds", {})


def same_output(a: str, b: str) -> bool:
    """Whether two prepared folders hold the same files, byte for byte, and the same
    schema.json but for the engine and the command."""
    import filecmp

    def files(root: str) -> list[str]:
        return sorted(
            os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
        )

    def schema(root: str) -> dict:
        with open(os.path.join(root, "schema.json")) as f:
            s = json.load(f)
        for k in ("engine", "command"):
            s["extra"].pop(k, None)
        return s

    if files(a) != files(b) or schema(a) != schema(b):
        return False
    return all(
        filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)
        for f in files(a)
        if f != "schema.json"
    )


def spark_metrics(folder: str) -> dict:
    """Per run (the mean over the event logs in `folder`): MB written by shuffles, MB spilled
    to disk, and the shuffle's bytes per event of the log."""
    runs = []
    for name in sorted(os.listdir(folder)):  # one run: a file, or a folder of rolled files
        path = os.path.join(folder, name)
        parts = [path] if os.path.isfile(path) else sorted(glob.glob(os.path.join(path, "*")))
        written = spilled = 0
        for part in parts:
            if os.path.basename(part).startswith("appstatus"):
                continue
            with open(part) as f:
                for line in f:
                    if '"SparkListenerTaskEnd"' not in line:
                        continue
                    m = json.loads(line).get("Task Metrics") or {}
                    written += m.get("Shuffle Write Metrics", {}).get("Shuffle Bytes Written", 0)
                    spilled += m.get("Disk Bytes Spilled", 0)
        runs.append((written, spilled))
    if not runs:
        return {}
    return {
        "shuffle_mb": statistics.mean(r[0] for r in runs) / 2**20,
        "spilled_mb": statistics.mean(r[1] for r in runs) / 2**20,
    }


def run_engines(events: int, log: str | None, repeats: int, memory_mb: int) -> list[dict]:
    """Each task with the numpy engine and with Spark in local mode (all cores), side by side."""
    cores = os.cpu_count() or 1
    engines = {"numpy": [], "spark": ["--engine=spark", f"--spark_master=local[{cores}]"]}
    with tempfile.TemporaryDirectory() as tmp:
        log = log or _write_log(tmp, events)
        rows = []
        for task in TASKS:
            outs, got = {}, {}
            for engine, flags in engines.items():
                runs = []
                logs = os.path.join(tmp, "spark-events")
                if engine == "spark":  # Spark's event log: the bytes its shuffles moved
                    os.makedirs(logs, exist_ok=True)
                    conf = f"enabled=true,dir={logs},compress=false".split(",")
                    flags = [
                        *flags,
                        "--spark_conf=" + ",".join(f"spark.eventLog.{c}" for c in conf),
                    ]
                for i in range(repeats):
                    bench_util.progress(f"prepare --task={task} --engine={engine} "
                                        f"({i + 1}/{repeats}) ...")  # fmt: skip
                    outs[engine] = os.path.join(tmp, f"{task}-{engine}")
                    shutil.rmtree(outs[engine], ignore_errors=True)
                    runs.append(_prepare_tree(log, outs[engine], task, memory_mb, flags))
                got[engine] = runs
            same = same_output(outs["numpy"], outs["spark"])
            shuffle = spark_metrics(logs)
            shutil.rmtree(logs)
            for engine, runs in got.items():
                rows.append(
                    {
                        "task": task,
                        "engine": engine,
                        "master": f"local[{cores}]" if engine == "spark" else "",
                        "events": events,
                        "examples": runs[-1][2],
                        "seconds": statistics.median(r[0] for r in runs),
                        "peak_tree_mb": max(r[1] for r in runs),
                        "output_mb": runs[-1][3] / 2**20,
                        "phase_seconds": runs[-1][4],
                        "identical": same,
                        **(shuffle if engine == "spark" else {}),
                        "repeats": repeats,
                        "memory_mb": memory_mb,
                        "cpu": bench_util.cpu_description(),
                        "cores": cores,
                        "date": time.strftime("%Y-%m-%d"),
                    }
                )
            for engine in outs:
                shutil.rmtree(outs[engine])
    for r in rows:
        if "shuffle_mb" in r:
            r["shuffle_bytes_per_event"] = r["shuffle_mb"] * 2**20 / r["events"]
    numpy_row = {r["task"]: r for r in rows if r["engine"] == "numpy"}
    return _ratios(rows, lambda r: numpy_row[r["task"]], "peak_tree_mb")


def engines_text(rows: list[dict]) -> str:
    """The printed table of `run_engines` (rendered into docs/spark.md too)."""
    lines = [
        f"{'task':>11} {'engine':>14} {'examples':>11} {'median s':>9} {'peak MB (tree)':>15} "
        f"{'time ratio':>11} {'memory ratio':>13} {'identical':>10}"
    ]
    for r in rows:
        engine = f"spark {r['master']}" if r["engine"] == "spark" else r["engine"]
        lines.append(
            f"{r['task']:>11} {engine:>14} {r['examples']:>11,} {r['seconds']:>9.1f} "
            f"{r['peak_tree_mb']:>15,.0f} {r['time_ratio']:>10.2f}x {r['memory_ratio']:>12.2f}x "
            f"{'yes' if r['identical'] else 'NO':>10}"
        )
    r = rows[0]
    lines.append(
        f"({r['events']:,} events, --memory_mb={r['memory_mb']}, median of {r['repeats']} runs; "
        "ratios to the numpy engine on the same task; identical: the same files)"
    )
    return "\n".join(lines)
