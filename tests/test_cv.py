"""Time-respecting cross-validation: fold windows, the pipeline's row filter, and a real run in
which every fold is checked on the timestamps the input pipeline actually yielded."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from influence_jax import files
from influence_jax.data import pipeline
from influence_jax.data.schema import DataError
from influence_jax.data.store import ExampleStore
from influence_jax.errors import ConfigError
from influence_jax.experiments import cv, trials
from tests import helpers

T0 = 1_700_000_000  # unix seconds
DAY = 86_400


def timestamped(tiny_data, root: str) -> str:
    """A copy of the tiny dataset whose examples carry timestamps, in random row order."""
    path = os.path.join(root, "ts-data")
    if os.path.exists(path):
        return path
    shutil.copytree(tiny_data[1], path)
    schema = tiny_data[0]
    rng = np.random.default_rng(0)
    start = {"train": T0, "valid": T0 + 30 * DAY, "test": T0 + 35 * DAY}
    span = {"train": 30 * DAY, "valid": 5 * DAY, "test": 5 * DAY}
    for split, info in schema.splits.items():
        for rel in info["shards"]:
            f = os.path.join(path, rel, "timestamp.npy")
            n = len(np.load(f))
            np.save(f, (start[split] + rng.integers(0, span[split], n)).astype(np.int64))
    return path


@pytest.mark.parametrize("mode, window", [("expanding", 1), ("rolling", 1), ("rolling", 2)])
def test_folds_tile_the_period_and_train_before_their_window(mode, window):
    t = np.random.default_rng(1).integers(T0, T0 + 30 * DAY, 5_000)
    folds = cv.make_folds(t, 4, mode, window)
    assert len(folds) == 4
    edges = [folds[0].train_end] + [f.eval_end for f in folds]  # b_1 .. b_K+1
    assert edges == sorted(edges) and edges[-1] == t.max() + 1
    sizes = [int(((t >= f.eval_start) & (t < f.eval_end)).sum()) for f in folds]
    assert max(sizes) - min(sizes) <= 0.05 * len(t)  # equal-count blocks
    for i, f in enumerate(folds):
        assert f.train_end == f.eval_start < f.eval_end
        if mode == "expanding":
            assert f.train_start == t.min()
        else:  # the `window` blocks just before the evaluation window
            assert f.train_start == (edges[i - window] if i >= window else t.min())
        if i:
            assert f.eval_start == folds[i - 1].eval_end


def test_synthetic_examples_are_in_time_order(tiny_data):
    schema, path = tiny_data
    t = {s: ExampleStore(path, s, schema).column("timestamp") for s in ("train", "valid", "test")}
    assert np.all(np.diff(t["train"]) > 0) and len(cv.make_folds(t["train"], 3)) == 3
    assert t["train"].max() < t["valid"].min() and t["valid"].max() < t["test"].min()


def test_folds_need_real_timestamps():
    with pytest.raises(DataError, match="synthetic"):
        cv.make_folds(np.zeros(100, np.int64), 3)
    with pytest.raises(DataError, match="fewer folds"):
        cv.make_folds(np.array([1, 1, 1, 1, 2] * 10), 4)
    with pytest.raises(ConfigError, match="cv_mode"):
        cv.make_folds(np.arange(100), 2, "shuffled")


def test_restrict_selects_rows_by_time_and_defaults_to_the_store(tiny_data, tmp_path_factory):
    path = timestamped(tiny_data, str(tmp_path_factory.getbasetemp()))
    store = ExampleStore(path, "train")
    default = helpers.tiny_config().data
    assert pipeline.restrict(store, default, "train") is store  # default: nothing changes
    lo, hi = T0 + 10 * DAY, T0 + 20 * DAY
    cfg = helpers.tiny_config(**{"data.train_time_range": (lo, hi)}).data
    view = pipeline.restrict(store, cfg, "train")
    t = store.column("timestamp")
    assert len(view) == int(((t >= lo) & (t < hi)).sum()) > 0
    got = view.gather(np.arange(len(view)))["timestamp"]
    assert got.min() >= lo and got.max() < hi
    assert pipeline.restrict(store, cfg, "eval") is store  # eval_time_range unset
    empty = helpers.tiny_config(**{"data.eval_time_range": (0, 10)}).data
    with pytest.raises(DataError, match="eval_time_range"):
        pipeline.restrict(store, empty, "eval")


def test_cv_folds_never_train_on_or_after_their_window(tiny_data, tmp_path, monkeypatch):
    path = timestamped(tiny_data, str(tmp_path))
    config = helpers.tiny_config(
        **{
            "data.source": "prepared",
            "data.path": path,
            "model.extractors": ("dnn",),
            "loop.num_steps": 6,
            "loop.log_every": 3,
            "loop.eval_every": 0,
            "ckpt.every": 6,
        }
    )
    seen: dict[str, dict[str, list]] = {}
    current = {}

    to_model_batch = pipeline.to_model_batch

    def spy_train(examples):
        seen[current["fold"]]["train"].append(examples["timestamp"].copy())
        return to_model_batch(examples)

    eval_getitem = pipeline.EvalBatches.__getitem__

    def spy_eval(self, s):
        batch = eval_getitem(self, s)
        seen[current["fold"]]["eval"].append(batch["timestamp"][batch["weight"] > 0].copy())
        return batch

    monkeypatch.setattr(pipeline, "to_model_batch", spy_train)
    monkeypatch.setattr(pipeline.EvalBatches, "__getitem__", spy_eval)

    def train_fn(cfg, workdir):
        current["fold"] = os.path.basename(workdir)
        seen[current["fold"]] = {"train": [], "eval": []}
        return trials.train_trial(cfg, workdir)

    result = cv.run(config, str(tmp_path / "cv"), 2, "expanding", train_fn=train_fn)
    assert sorted(seen) == ["fold_0", "fold_1"]
    all_t = ExampleStore(path, "train").column("timestamp")
    for f in result["folds"]:
        train_t = np.concatenate(seen[f"fold_{f['index']}"]["train"])
        eval_t = np.concatenate(seen[f"fold_{f['index']}"]["eval"])
        assert len(train_t) == 6 * config.data.batch_size
        assert train_t.max() < f["eval_start"], "a fold trained on its evaluation period"
        assert train_t.min() >= f["train_start"]
        assert eval_t.min() >= f["eval_start"] and eval_t.max() < f["eval_end"]
        window = np.sort(all_t[(all_t >= f["eval_start"]) & (all_t < f["eval_end"])])
        # Each evaluation pass (end of training, final) covers the window exactly once.
        assert len(eval_t) == 2 * len(window) and np.array_equal(np.sort(eval_t)[::2], window)
        assert 0.0 < f["metrics"]["auc"] < 1.0
    aucs = [f["metrics"]["auc"] for f in result["folds"]]
    s = result["summary"]["auc"]
    assert s["mean"] == pytest.approx(np.mean(aucs))
    assert s["std"] == pytest.approx(np.std(aucs, ddof=1))
    assert (s["min"], s["max"]) == (min(aucs), max(aucs))
    assert "gauc" in result["summary"]
    # Finished folds are not retrained.
    seen.clear()
    again = cv.run(config, str(tmp_path / "cv"), 2, "expanding", train_fn=train_fn)
    assert not seen and again["summary"] == result["summary"]


def test_a_sweep_can_score_each_trial_by_cross_validation(tiny_data, tmp_path_factory, tmp_path):
    import functools

    from influence_jax.experiments import sweep as sweep_lib

    path = timestamped(tiny_data, str(tmp_path_factory.getbasetemp()))
    config = helpers.tiny_config(**{"data.source": "prepared", "data.path": path})

    def fake_fold(cfg, workdir):  # a fold's "AUC": its learning rate plus its window's end
        end = cfg.data.eval_time_range[1]
        return {"train/auc": cfg.opt.learning_rate + (end - T0) / (100 * DAY)}

    sweep = sweep_lib.parse(
        {"params": {"opt.learning_rate": [0.1, 0.2]}, "metric": "cv/auc_mean"}, "s.json"
    )
    fn = functools.partial(cv.trial_metrics, num_folds=3, train_fn=fake_fold)
    records = sweep_lib.run(config, sweep, str(tmp_path), None, fn)
    for r in records:
        folds = files.read_json(str(tmp_path / f"trial_{r['trial']:03d}" / cv.SUMMARY_FILE))
        aucs = [f["metrics"]["auc"] for f in folds["folds"]]
        assert len(aucs) == 3 and aucs == sorted(aucs)
        assert r["metrics"]["cv/auc_mean"] == pytest.approx(np.mean(aucs))
        assert r["metrics"]["cv/auc_std"] == pytest.approx(np.std(aucs, ddof=1))
    rows = sweep_lib.table_rows(sweep_lib.collect(str(tmp_path)), sweep)
    assert [r["opt.learning_rate"] for r in rows] == [0.2, 0.1]
    # The HParams tab compares trials by the CV summary: it is a scalar in each trial's folder.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "trial_001"))
    acc.Reload()
    mean = acc.Scalars("cv/auc_mean")[0].value
    assert mean == pytest.approx(records[1]["metrics"]["cv/auc_mean"], rel=1e-6)


def test_backtest_folds_tile_the_time_before_the_cut():
    split = {"t_min": 0, "valid_start": 800, "test_start": 900, "t_max": 999}
    cuts = [cv.backtest_cut(split, k) for k in range(3)]
    assert cuts[0] == {"valid_start": 800, "test_start": 900, "max_timestamp": 999}
    for k in (1, 2):  # each fold's log ends just before the next later fold's test window
        assert cuts[k]["max_timestamp"] == cuts[k - 1]["test_start"] - 1
        assert cuts[k]["test_start"] - cuts[k]["valid_start"] == 100
    assert [c["test_start"] for c in cuts] == [900, 800, 700]
    with pytest.raises(DataError, match="fold 8: .* leaves no training period"):
        cv.backtest_cut(split, 8)


def synthetic_config(**overrides):
    """The tiny config on its own synthetic data (generated in the cv workdir), few steps."""
    fast = {"model.extractors": ("dnn",), "loop.num_steps": 4, "loop.eval_every": 0}
    return helpers.tiny_config(**{**fast, "ckpt.every": 4, **overrides})


def test_cv_on_synthetic_data_generates_it_once_and_cuts_folds_from_it(tmp_path):
    def fake_fold(cfg, workdir):  # a fold's "AUC": the end of its evaluation window
        return {"train/auc": cfg.data.eval_time_range[1] / 1e10}

    workdir = tmp_path / "cv"
    result = cv.run(synthetic_config(), str(workdir), 2, train_fn=fake_fold)
    # One dataset, shared by the folds through their data links (trials.share_synthetic_data).
    assert len(list(workdir.glob("data-*"))) == 1
    for i in (0, 1):
        assert os.path.realpath(workdir / f"fold_{i}" / "data") == os.path.realpath(
            workdir / "data"
        )
    t = ExampleStore(str(workdir / "data"), "train").column("timestamp")
    folds = result["folds"]
    assert [f["status"] for f in folds] == ["ok", "ok"]
    assert folds[0]["eval_start"] == folds[0]["train_end"] < folds[1]["eval_start"]
    assert folds[1]["eval_end"] == t.max() + 1
    assert files.read_json(str(workdir / cv.SUMMARY_FILE))["summary"]["auc"]["folds"] == 2
    assert (workdir / "cv.csv").exists()


@pytest.mark.parametrize(
    "args, match",
    [
        ((0,), "--cv_folds=0"),
        ((-1,), "--cv_folds=-1"),
        ((2, "shuffled"), "--cv_mode"),
        ((2, "rolling", 0), "--cv_window=0"),
    ],
)
def test_bad_cv_arguments_fail_before_any_folder_is_made(tmp_path, args, match):
    workdir = tmp_path / "cv"
    with pytest.raises(ConfigError, match=match):
        cv.run(synthetic_config(), str(workdir), *args)
    assert not workdir.exists()


def test_a_config_that_fails_its_check_fails_before_data_is_generated(tmp_path):
    workdir = tmp_path / "cv"
    with pytest.raises(ConfigError, match="batch_size"):
        cv.run(synthetic_config(**{"data.batch_size": 60}), str(workdir), 2)
    assert not workdir.exists()


def test_the_cv_tool_rejects_a_bad_fold_count_before_any_folder(tmp_path):
    workdir = tmp_path / "cv"
    r = helpers.run_tool(
        "cv", "--config=configs/tiny.py", f"--workdir={workdir}", "--cv_folds=0", timeout=120
    )
    assert r.returncode != 0 and "--cv_folds=0: need at least one fold" in r.stderr
    assert "Traceback" not in r.stderr and not workdir.exists()


def test_real_cv_on_synthetic_data_trains_every_fold_and_writes_the_summary(tmp_path):
    workdir = tmp_path / "cv"
    result = cv.run(synthetic_config(), str(workdir), 2)
    assert [f["status"] for f in result["folds"]] == ["ok", "ok"]
    assert all(0.0 < f["metrics"]["auc"] < 1.0 for f in result["folds"])
    saved = files.read_json(str(workdir / cv.SUMMARY_FILE))
    assert saved["summary"]["auc"]["folds"] == 2
    assert saved["summary"] == result["summary"]
    assert "mean" in cv.format_summary(result)
