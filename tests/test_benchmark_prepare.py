"""`tools/benchmark.py --what=prepare` at a tiny size: both tasks and both history storages
prepared from one log, in their own processes, with the ratio columns against next_item (copied
histories). Correctness only; timing is the
benchmark's."""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from tests import helpers


@pytest.mark.slow  # about 30 s: four preparations of one log
def test_prepare_benchmark_runs_both_tasks_on_one_log():
    r = helpers.run_tool(
        "benchmark", "--what=prepare", "--prepare_events=20000", "--repeats=1", "--json"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    got = [(x["task"], x["history_storage"]) for x in rows]
    assert got == [(t, s) for t in ("next_item", "conversion") for s in ("copy", "reference")]
    nxt, nxt_ref, conv, conv_ref = rows
    assert nxt["time_ratio"] == 1.0 and nxt["memory_ratio"] == 1.0
    assert conv["seconds"] > 0 and conv["peak_rss_mb"] > 50  # a real process's resident set
    # every view is an exposure: far more examples than one per purchase with 4 negatives
    assert conv["examples"] == conv_ref["examples"] > nxt["examples"] == nxt_ref["examples"] > 0
    assert abs(conv_ref["time_ratio"] - conv_ref["seconds"] / nxt["seconds"]) < 1e-9
    # by reference each event is stored once: the conversion output shrinks severalfold
    assert conv_ref["output_mb"] * 3 < conv["output_mb"]


@pytest.mark.slow
@pytest.mark.not_in_ci  # about 85 s (Spark); test_spark.py checks the engines agree
def test_prepare_benchmark_compares_the_engines_on_one_log():
    """--prepare_engines=numpy,spark: each task by both engines, identical outputs, Spark's
    shuffle bytes read from its event log and its phase times from schema.json."""
    if importlib.util.find_spec("pyspark") is None:
        if os.environ.get("CI"):
            pytest.fail("the Spark benchmark smoke needs '.[spark]', which .ci/run installs")
        pytest.skip("needs PySpark and Java 17+: pip install -e '.[spark]'")
    r = helpers.run_tool(
        "benchmark",
        "--what=prepare",
        "--prepare_events=20000",
        "--repeats=1",
        "--prepare_engines=numpy,spark",
        "--json",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    assert [(x["task"], x["engine"]) for x in rows] == [
        (t, e) for t in ("next_item", "conversion") for e in ("numpy", "spark")
    ]
    assert all(x["identical"] for x in rows)
    for numpy_row, spark_row in (rows[:2], rows[2:]):
        assert numpy_row["examples"] == spark_row["examples"] > 0
        assert spark_row["shuffle_mb"] > 0 and spark_row["shuffle_bytes_per_event"] > 1
        assert set(spark_row["phase_seconds"]) == {"pass1", "pass2", "append"}
        assert spark_row["peak_tree_mb"] > numpy_row["peak_tree_mb"] > 50  # the JVM counts
