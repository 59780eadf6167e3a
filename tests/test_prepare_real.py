"""Prepares and audits the real datasets under $INFLUENCE_JAX_DATA (CI: /work/shared/data).

Skipped only when INFLUENCE_JAX_DATA is unset; when it is set, a missing file fails the test.
Expected counts come from /work/shared/data/README.md.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from influence_jax.data import audit, prepare, readers
from influence_jax.data.store import ExampleStore
from tests import helpers

pytestmark = helpers.needs_data


def prepare_and_audit(source: str, path: str, out, **kw):
    schema = prepare.prepare(
        readers.open_source(source, path), str(out), prepare.PrepareOptions(**kw)
    )
    report = audit.audit_leakage(str(out))
    assert report["rows"] == {s: schema.splits[s]["rows"] for s in prepare.SPLITS}
    assert all(schema.splits[s]["rows"] > 0 for s in prepare.SPLITS)
    return schema, report


def test_taobao_sample(tmp_path):
    path = helpers.need("taobao_userbehavior_sample", "UserBehavior_head814users.csv")
    schema, report = prepare_and_audit("taobao", path, tmp_path / "taobao")
    c = schema.extra["counts"]
    assert c["rows_valid"] == 84_287 and c["outside_time_window"] == 35
    assert (c["users"], c["targets"]) == (814, 1_749)  # every buy is in the window
    assert schema.vocab_sizes["behaviour"] == 6 and schema.label["target_behaviours"] == ["buy"]
    total = sum(schema.splits[s]["rows"] for s in prepare.SPLITS)
    assert total == 5 * c["targets"] - c["negatives_unsampleable"]
    assert report["negatives"] == c["negatives"]
    assert schema.extra["split"]["t_min"] >= readers.TAOBAO_WINDOW[0]


def test_movielens_100k(tmp_path):
    schema, report = prepare_and_audit("movielens", helpers.need("ml-100k"), tmp_path / "ml")
    c = schema.extra["counts"]
    assert (c["events"], c["users"], c["items"], c["targets"]) == (100_000, 943, 1_682, 100_000)
    assert c["behaviours"] == {"r1": 6_110, "r2": 11_370, "r3": 27_145, "r4": 34_174, "r5": 21_201}
    labels = np.concatenate(
        [ExampleStore(str(tmp_path / "ml"), s).column("label") for s in prepare.SPLITS]
    )
    assert labels.sum() == 34_174 + 21_201  # rating >= 4
    assert report["negatives"] == 0 and schema.vocab_sizes["age"] == 2 + 7


def test_cml_retailrocket(tmp_path):
    path = helpers.need("cml_retailrocket", "train.csv")
    schema, _ = prepare_and_audit("retailrocket", path, tmp_path / "rr")
    c = schema.extra["counts"]
    assert (c["events"], c["users"], c["items"], c["targets"]) == (97_381, 2_174, 29_905, 9_551)
    assert c["behaviours"] == {"view": 75_374, "cart": 12_456, "buy": 9_551}
    assert c["duplicates"] == 0


def test_short_training_on_prepared_taobao(tmp_path):
    """configs/taobao.py trains end to end on the prepared real sample (short run)."""
    from configs import taobao
    from influence_jax import train

    path = helpers.need("taobao_userbehavior_sample", "UserBehavior_head814users.csv")
    prepare_and_audit("taobao", path, tmp_path / "taobao")
    config = taobao.get_config()
    config.data.path = str(tmp_path / "taobao")
    config.loop.num_steps, config.loop.log_every, config.loop.eval_every = 20, 10, 0
    config.ckpt.every = 20
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert 0.0 < result["test/auc"] < 1.0 and np.isfinite(result["test/logloss"])
    assert result["test/num_examples"] == 1_085


def test_taobao_rank_state_is_leak_free_and_rebuilt_exactly_from_the_log(tmp_path):
    """Every user with an event before each cut has a row whose history ends before the cut;
    the same histories come back when rebuilt from the raw log (ranking --events)."""
    from influence_jax import ranking
    from influence_jax.data.dataset import Dataset

    path = helpers.need("taobao_userbehavior_sample", "UserBehavior_head814users.csv")
    out = str(tmp_path / "taobao")
    schema = prepare.prepare(readers.open_source("taobao", path), out, prepare.PrepareOptions())
    dataset = Dataset(out)
    lo, hi = readers.TAOBAO_WINDOW
    raw = np.loadtxt(path, delimiter=",", usecols=(0, 4), dtype=np.int64)
    raw = raw[(raw[:, 1] >= lo) & (raw[:, 1] <= hi)]
    src = ranking.open_log("taobao", path)
    for cut, t in schema.extra["rank_state"]["cuts"].items():
        ctx = ranking.load_contexts(dataset, cut)
        assert len(ctx.user_key) == len(np.unique(raw[raw[:, 1] < t, 0]))
        last = np.load(os.path.join(out, "rank_state", cut, "last_ts.npy"))
        assert (last < t).all() and (ctx.hist[:, 0, 0] > 0).all()
        rebuilt, _ = ranking.contexts_from_log(dataset, src, t)
        np.testing.assert_array_equal(rebuilt.hist, ctx.hist)
        np.testing.assert_array_equal(rebuilt.user_key, ctx.user_key)


@pytest.mark.slow
def test_quality_table_puts_baselines_beside_the_models(tmp_path):
    """tools/quality.py end to end on the Taobao sample, one short model: the baselines' rows,
    the best baseline chosen on the validation split, and the paired interval."""
    r = helpers.run_tool(
        "quality", f"--data_root={helpers.DATA}", f"--workdir={tmp_path}", "--datasets=taobao",
        "--seeds=0,1", "--models=DNN", "--num_steps=10", "--n_boot=50", timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((tmp_path / "quality.json").read_text())["taobao"]
    assert saved["positives"] > 100 and saved["best_baseline"] in saved["baselines"]
    assert {"logistic_regression", "in_history"} <= set(saved["baselines"])
    d = saved["models"]["DNN"]
    assert len(d["auc"]) == 2 and d["vs_best_baseline"]["ci_low"] <= d["vs_best_baseline"]["diff"]
    assert "baseline: in_history" in (tmp_path / "quality.md").read_text()


@pytest.mark.slow
def test_quality_pools_backtest_folds_of_the_conversion_task(tmp_path):
    """--folds=2 on the Taobao conversion task: the earlier fold is re-prepared with its cut
    one test window back (its log ends where fold 0's test starts), and every figure pools
    both folds' test rows."""
    r = helpers.run_tool(
        "quality", f"--data_root={helpers.DATA}", f"--workdir={tmp_path}", "--datasets=taobao",
        "--task=conversion", "--folds=2", "--seeds=0", "--models=DNN", "--num_steps=10",
        "--n_boot=50", timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((tmp_path / "quality.json").read_text())["taobao"]
    splits = [
        json.loads((tmp_path / "prepared" / f"taobao-conversion{s}" / "schema.json").read_text())
        for s in ("", "-fold1")
    ]
    f0, f1 = (s["extra"]["split"] for s in splits)
    assert f1["t_max"] < f0["test_start"] and f1["test_start"] < f0["test_start"]
    assert saved["folds"] == 2
    assert saved["fold_rows"] == [s["splits"]["test"]["rows"] for s in splits]
    assert saved["rows"] == sum(saved["fold_rows"]) and saved["positives"] > 0
    assert len(saved["models"]["DNN"]["auc"]) == 1
    assert "2 folds)" in (tmp_path / "quality.md").read_text()


@pytest.mark.slow
def test_quality_heads_puts_each_head_beside_its_baselines_and_the_multitask_head(tmp_path):
    """--task=conversion --heads on Taobao: one block per head (cart, fav, buy) with that
    head's baselines and single-task model, and the multi-task model's head on the same rows."""
    r = helpers.run_tool(
        "quality", f"--data_root={helpers.DATA}", f"--workdir={tmp_path}", "--datasets=taobao",
        "--task=conversion", "--heads", "--seeds=0", "--models=DNN", "--num_steps=10",
        "--n_boot=50", timeout=600,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((tmp_path / "quality.json").read_text())
    assert set(saved) == {"taobao, head cart", "taobao, head fav", "taobao, head buy"}
    rows = {b["rows"] for b in saved.values()}
    assert len(rows) == 1  # the same exposures for every head
    positives = [b["positives"] for b in saved.values()]
    assert len(set(positives)) == 3 and min(positives) > 0  # each head's own labels
    for h in ("cart", "fav", "buy"):
        block = saved[f"taobao, head {h}"]
        assert set(block["models"]) == {"DNN", f"multitask, head {h}"}
        d = block["models"][f"multitask, head {h}"]["vs_best_baseline"]
        assert d["ci_low"] <= d["diff"] <= d["ci_high"]
        assert block["best_baseline"] in block["baselines"]
