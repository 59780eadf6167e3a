"""`tools/benchmark.py --what=rank` on the tiny config, engine only: the JSON keys, the printed
table, and that the ranking score function and the evaluation step agree. Correctness only."""

import json
import os
import subprocess
import sys

import pytest

from tests import helpers
from tests.helpers import ROOT

TOOLS = os.path.join(ROOT, "tools")
KEYS = {
    "impl",
    "model",
    "extractors",
    "batch",
    "params",
    "score_ex_per_s",
    "rank_path_ex_per_s",
    "eval_ex_per_s",
    "eval_vs_score_max_abs_diff",
    "machine",  # where and when it ran (bench_util.machine)
}


@pytest.mark.slow  # a benchmark's smoke run: the slow tier
def test_rank_benchmark_json_and_table(capsys):
    cmd = [
        sys.executable,
        os.path.join(TOOLS, "benchmark.py"),
        "--what=rank",
        "--rank_config=tiny",
        "--rank_models=default,full",
        "--batches=64",
        "--seconds=0.05",
        "--repeats=1",
        "--rank_two_stage=20",
        "--json",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    e2e = [r for r in rows if r.get("section") == "two_stage"]
    rows = [r for r in rows if r.get("section") != "two_stage"]
    # Two-stage end to end: every test user of the tiny synthetic data, 20 candidates each.
    assert [r["model"] for r in e2e] == ["default", "full"]
    for r in e2e:
        assert r["users"] > 0 and r["retrieve"] == 20 and 0 < r["pairs"] <= 20 * r["users"]
        assert r["users_per_s"] > 0 and r["candidates_per_s"] > 0 and r["peak_rss_mb"] > 0
    assert rows and {r["model"] for r in rows} <= {"default", "full"}
    assert rows[0]["model"] == "default" and rows[0]["batch"] == 64
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["impl"] == "jax" and r["params"] > 0
        assert min(r["score_ex_per_s"], r["rank_path_ex_per_s"], r["eval_ex_per_s"]) > 0
        assert r["eval_vs_score_max_abs_diff"] < 1e-6  # same probabilities from both paths
        assert r["machine"]["cores"] == os.cpu_count() and r["machine"]["jax"]

    bench_rank = helpers.bench_module("bench_rank")
    bench_rank.print_table(rows, host_memory_kept=False)
    out = capsys.readouterr().out
    assert "score ex/s" in out and "eval step" in out and "default" in out
    bench_rank.print_two_stage(e2e)
    assert "two-stage ranking end to end" in capsys.readouterr().out


def test_catalogue_run_ranks_a_sample_of_users():
    r = helpers.run_tool(
        "benchmark", "--what=rank", "--rank_catalogue=600", "--rank_catalogue_sample=50",
        "--json",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    (row,) = [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]
    assert row["section"] == "catalogue" and row["ranked_users"] == 50
    assert row["users_in_log"] > 50 and row["items"] > 2 and row["events"] == 600 * 20
    assert 0 < row["pairs"] <= 50 * 200 and row["tables_seconds"] >= 0  # (not NaN: found)
    assert row["seconds_per_10k_users"] > 0 and row["peak_rss_mb"] > 100


def test_serve_benchmark_times_the_exported_program_one_request_at_a_time(capsys):
    """`--what=serve`, engine only, in process: one row per request size with its latencies,
    and the exported program gives the engine's probabilities."""
    bench_serve = helpers.bench_module("bench_serve")
    rows = bench_serve.run("tiny", ["default"], [8, 32], seconds=0.01, repeats=2)
    assert [(r["impl"], r["rows"]) for r in rows] == [("jax-export", 8), ("jax-export", 32)]
    for r in rows:
        assert 0 < r["p50_ms"] <= r["p99_ms"] and r["requests_per_s"] > 0
        assert r["requests"] >= 2 * 4 and r["path"] == "exported"  # 4 distinct requests a pass
        assert r["export_vs_engine_max_abs_diff"] < 1e-6
    bench_serve.print_table(rows)
    out = capsys.readouterr().out
    assert "one online request at a time" in out and "p99 ms" in out and "jax-export" in out
