"""`tools/benchmark.py --rounds=N`: the engine and the references in turn, each round's ratios
taken within the round, and the tables (printed, README, docs/benchmarks.md) giving each ratio as
the median of the rounds' with their range. Correctness only; timing lives in the benchmark."""

import json
import os
import subprocess
import sys

import pytest

from influence_jax.experiments import tables
from tests import helpers
from tests.helpers import ROOT


def _rows(ratios: list[float], batch: int = 1024) -> list[dict]:
    """One engine row and one Keras row per round; the engine's ratios are `ratios`."""
    rows = []
    for i, x in enumerate(ratios):
        keras = {"impl": "keras-tensorflow", "batch": batch, "round": i, "train_ex_per_s": 1e4}
        keras |= {"score_ex_per_s": 5e4, "score_ex_per_cpu_s": 3e4}
        jax = dict(keras, impl="jax", train_ex_per_s=1e4 * x, train_vs_best_ref=x)
        jax |= {"score_vs_best_ref": 2 * x, "score_plain_vs_best_ref": x / 2}
        jax |= {"train_fraction_of_limit": x / 4, "train_best_ref": "keras-tensorflow"}
        rows += [jax, keras]
    return rows


def test_spread_is_the_median_and_range_of_the_rounds():
    assert tables.spread([1.8, 1.2, 1.5]) == "1.50x (1.20-1.80x)"
    assert tables.spread([40.0, 30.0], ".0f", " %") == "35 % (30-40 %)"
    assert tables.spread([1.25]) == "1.25x"  # one run: its value alone
    groups = tables.by_key(_rows([1.0, 2.0])[::-1], lambda r: (r["impl"],))
    assert list(groups) == [("jax",), ("keras-tensorflow",)]  # sorted by key
    assert [r["round"] for r in groups[("jax",)]] == [1, 0]  # rows in their order


def test_train_rounds_table_gives_medians_and_ranges(capsys):
    bench_train = helpers.bench_module("bench_train")
    bench_train.print_rounds(_rows([1.8, 1.2, 1.5]), "setup")
    out = capsys.readouterr().out
    assert "3 rounds" in out
    jax = next(line for line in out.splitlines() if line.startswith("jax "))
    assert "15,000" in jax  # the median rate
    assert "1.50x (1.20-1.80x)" in jax and "3.00x (2.40-3.60x)" in jax  # train, score
    assert "0.75x (0.60-0.90x)" in jax and "38 % (30-45 %)" in jax  # plain, share of limit


def test_rank_rounds_table_gives_medians_and_ranges(capsys):
    bench_rank = helpers.bench_module("bench_rank")
    rows = []
    for i, x in enumerate([1.2, 1.6, 1.4]):
        keras = {"impl": "keras-tensorflow", "model": "full", "batch": 64, "round": i}
        keras |= {"score_ex_per_s": 1e4}
        rows += [keras, dict(keras, impl="jax", score_ex_per_s=1e4 * x, score_vs_keras=x)]
        rows[-1]["score_cpu_vs_keras"] = x + 1
    bench_rank.print_rounds(rows, host_memory_kept=True)
    out = capsys.readouterr().out
    jax = next(line for line in out.splitlines() if line.split()[:2] == ["full", "jax"])
    assert "14,000" in jax and "1.40x (1.20-1.60x)" in jax and "2.40x (2.20-2.60x)" in jax


def test_readme_figures_read_the_rounds(tmp_path):
    """A machine folder written with --rounds: the README and docs give the median ratio of the
    rounds with its range; moving one round's ratio moves the range."""
    sys.path.insert(0, str(helpers.TOOLS))
    import readme_figures

    src = os.path.join(readme_figures.RESULTS, "cpu")
    folder = tmp_path / "cpu" / "m"
    folder.mkdir(parents=True)
    name = sorted(d for d in os.listdir(src) if os.path.isdir(os.path.join(src, d)))[0]
    for kind, ratio in (("train", "train_vs_best_ref"), ("rank", "score_vs_keras")):
        rows = [json.loads(line) for line in open(os.path.join(src, name, f"{kind}.jsonl"))]
        out = []
        for i, scale in enumerate((1.0, 0.5, 2.0)):
            for r in rows:
                r = json.loads(json.dumps(r)) | {"round": i}
                if "machine" in r:  # an AMX CPU
                    r["machine"]["cpu"] = r["machine"]["cpu"] + " amx_tile amx_bf16"
                if ratio in r:
                    r[ratio] = 1.0 * scale
                if kind == "rank" and r["impl"] == "jax":
                    r["devices"] = 2  # ranked with --host_devices=2
                if kind == "train" and r["impl"] == "jax":
                    r["hidden_operands"] = "bfloat16"  # trained and scored so (an AMX CPU)
                    r["grad_blocks"] = 2  # the step's gradient in two row blocks
                out.append(r)
        (folder / f"{kind}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in out))
    quality = [
        {"steps": s, "test_auc": 0.7 + s / 1e4, "test_auc_float32_hidden": 0.69}
        | {"test_auc_one_block": 0.6995}
        for s in (3, 9)
    ]
    (folder / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in quality))
    facts = readme_figures.cpu_facts(str(tmp_path / "cpu"))
    assert facts[0]["rounds"] == 3 and facts[0]["rank_rounds"] == 3
    en = " ".join(readme_figures.cpu_en(facts).split())  # unwrapped
    assert "3 rounds of training and scoring and 3 of ranking" in en
    assert "1.00x (0.50-2.00x) / 1.00x (0.50-2.00x) the best reference" in en
    assert "the engine over 2 CPU devices (`--host_devices`)" in en
    assert (
        "of the matmul limit (the hidden layer's operands in bfloat16, training and scoring: "
        "this CPU has AMX), its gradient in 2 row blocks (`config.opt.grad_blocks=2`); batch "
        "scoring" in en
    )
    zen4 = {"machine": {"cpu": "AMD EPYC (family 25), avx2 avx512f avx512_bf16 avx512_vnni"}}
    assert readme_figures._bf16_unit(zen4) == "AVX-512 BF16"
    zh = readme_figures.cpu_zh(facts)
    assert "3 轮" in zh and "2 个 CPU 设备" in zh and "bfloat16 操作数" in zh
    assert "梯度分 2 个行块计算" in zh
    doc = readme_figures.cpu_benchmarks(facts)
    assert "--rounds=3" in doc and "| 1.00x (0.50-2.00x) |" in doc
    said = " ".join(doc.split())
    assert "--what=rank --compare --rounds=3 --host_devices=2 --json" in said
    assert "hidden layer multiplies bfloat16 operands into float32 results" in said
    assert (
        "AUC after 9 steps of `--what=quality` (quality.jsonl): 0.7009 with the bfloat16 hidden "
        "layer, 0.6900 all in float32." in said
    )
    assert (
        "gradient in 2 row blocks (`config.opt.grad_blocks=2`), which XLA:CPU runs side by side "
        "until their gradients add up. Held-out AUC after 9 steps: 0.7009 in 2 blocks, 0.6995 "
        "in one." in said
    )
    assert doc.count("| jax ") == 0 and doc.count("influence_jax (folded scoring)") == len(
        facts[0]["batches"]
    )  # one row per batch, not per round


@pytest.mark.slow  # compiles the benchmark model's step once per round
def test_train_benchmark_runs_rounds_in_turn():
    cmd = [sys.executable, os.path.join(helpers.TOOLS, "benchmark.py"), "--what=train"]
    cmd += ["--compare=", "--batches=64", "--seconds=0.05", "--repeats=1", "--rounds=2"]
    proc = subprocess.run(cmd + ["--json"], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["impl"], r["round"]) for r in rows] == [("jax", 0), ("jax", 1)]
    assert all(r["train_ex_per_s"] > 0 and r["matmul_flops_per_s"] > 0 for r in rows)
    assert proc.stderr.index("round 1/2: jax") < proc.stderr.index("round 2/2: jax")
    bad = subprocess.run(
        cmd + ["--variants=fast,straightforward"], capture_output=True, text=True, cwd=ROOT
    )
    assert bad.returncode != 0 and "--rounds: the fast variant only" in bad.stderr


@pytest.mark.slow  # a benchmark's smoke run: the slow tier
def test_rank_benchmark_runs_rounds_on_one_setup():
    """Each model is set up once, then timed round after round (the progress shows its rounds
    in order before the next model's), every row tagged with its round."""
    cmd = [sys.executable, os.path.join(helpers.TOOLS, "benchmark.py"), "--what=rank"]
    cmd += ["--rank_config=tiny", "--rank_models=default,full", "--batches=64", "--rounds=2"]
    cmd += ["--seconds=0.05", "--repeats=1", "--rank_measure=score", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    got = [(r["model"], r["impl"], r["round"]) for r in rows]
    assert got == [
        ("default", "jax", 0),
        ("default", "jax", 1),
        ("full", "jax", 0),
        ("full", "jax", 1),
    ]
    assert all(r["score_ex_per_s"] > 0 for r in rows)
    said = [line for line in proc.stderr.splitlines() if "jax ranker" in line]
    assert [s.split(":")[0] for s in said] == ["round 1/2", "round 2/2"] * 2
