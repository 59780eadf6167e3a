"""Exact resume with real processes (a SIGKILL mid-run, then the same command again ends bit for
bit where an uninterrupted run ends), early stopping, last K + best retention, metadata.

The runs are `python -m influence_jax.main` on configs/tiny.py (tests/helpers.py); subprocesses
share one persistent compilation cache, so only the first run of the session compiles.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import os
import re
import shutil
import types

import jax
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from influence_jax import checkpoint as ckpt_lib
from influence_jax import config_check, evaluation, scoring, train
from influence_jax import loop as loop_lib
from influence_jax.errors import ConfigError, DataError
from tests import helpers
from tests.helpers import (
    FLAGS,
    assert_trees_equal,
    ckpt_steps,
    load_state,
    run_main,
    scalars,
    start,
    wait_for,
)


def test_sigkill_then_same_command_ends_bit_identical(tmp_path, jax_cache, reference):
    workdir = tmp_path / "run"
    proc, log = start(workdir, *FLAGS, cache=jax_cache)
    ckdir = workdir / "checkpoints"
    # Kill the moment step 10's checkpoint appears: often while it is still being written.
    wait_for(lambda: ckdir.is_dir() and any(n.split(".")[0] == "10" for n in os.listdir(ckdir)),
             proc, log)  # fmt: skip
    proc.kill()
    proc.wait()
    assert 20 not in ckpt_steps(workdir), "the run ended before the kill"

    out = run_main(workdir, *FLAGS, cache=jax_cache)
    assert out.returncode == 0, out.log[-4000:]
    resumed = re.findall(r"resumed from checkpoint step (\d+)", out.log)
    assert resumed and int(resumed[-1]) in (5, 10), out.log[-4000:]
    assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
    assert_trees_equal(load_state(workdir, 20), load_state(reference, 20))


ABSL_PREFIX = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ", re.M)


def test_the_terminal_shows_plain_lines_and_train_log_keeps_the_prefixes(reference):
    terminal = (reference.parent / "reference.log").read_text()
    assert "step 20/20 loss=" in terminal
    assert not ABSL_PREFIX.search(terminal), terminal[-2000:]
    assert "Unable to initialize backend" not in terminal
    log = (reference / "train.log").read_text()
    lines = [ln for ln in log.splitlines() if ln]
    assert lines and all(ABSL_PREFIX.match(ln) for ln in lines), log[-2000:]
    assert any("step 20/20 loss=" in ln for ln in lines)
    # The last lines, printed on stdout once, are in the log too.
    for said in ("final test metrics at step", "best step ", "checkpoints: ", "tensorboard --"):
        assert any(said in ln for ln in lines[-6:]), (said, lines[-6:])
        assert terminal.count(said) == 1, said


def test_early_stopping_keeps_last_k_plus_best_and_records_it(tmp_path, jax_cache):
    workdir = tmp_path / "run"
    # Maximising the validation logloss (which falls as the model learns) makes the first
    # evaluation the best and stops the run `patience` evaluations later.
    flags = (
        "--config.loop.eval_every=2",
        "--config.ckpt.every=100",
        "--config.ckpt.max_to_keep=1",
        "--config.loop.early_stop_metric=logloss",
        "--config.loop.early_stop_mode=max",
        "--config.loop.early_stop_patience=2",
    )
    out = run_main(workdir, *flags, cache=jax_cache)
    assert out.returncode == 0, out.log[-4000:]

    evals = scalars(workdir)["valid/logloss"]
    stopper = loop_lib.EarlyStopping("logloss", "max", patience=2)
    for step, value in evals:
        stopper.update(step, value)
        if stopper.stopped:
            break
    stop = evals[-1][0]
    assert stopper.stopped and step == stop < 20, evals
    assert ckpt_steps(workdir) == sorted({stopper.best_step, stop})
    with open(workdir / "best.json") as f:
        best = json.load(f)
    assert best["step"] == stopper.best_step and best["metric"] == "valid/logloss"
    assert best["mode"] == "max" and best["value"] == pytest.approx(stopper.best, rel=1e-6)
    # The final test metrics are the best checkpoint's, not the last step's.
    assert stopper.best_step < stop
    assert f"final test metrics at step {stopper.best_step} (best valid/logloss)" in out.log
    final = {k: v[-1] for k, v in scalars(workdir).items() if k.startswith("test/")}
    assert final["test/step"] == (stop, stopper.best_step)
    best_run = evaluation.evaluate_run(scoring.load_run(str(workdir), step="best"), "test")
    assert final["test/auc"][1] == pytest.approx(best_run["auc"], rel=1e-6)

    manager = ocp.CheckpointManager(
        workdir / "checkpoints", options=ocp.CheckpointManagerOptions(read_only=True)
    )
    step_meta = manager.metadata(stop).custom_metadata
    assert step_meta["config"]["loop"]["early_stop_patience"] == 2
    assert step_meta["versions"]["jax"] == jax.__version__
    assert step_meta["metrics"]["logloss"] == pytest.approx(evals[-1][1], rel=1e-6)
    assert manager.metadata().custom_metadata["config"]["model"]["name"] == "ranker"
    manager.close()

    # The decision is saved, so rerunning the command does not train on (see the test below).
    with open(workdir / "checkpoints" / str(stop) / "data" / "metadata") as f:
        saved = json.load(f)["loop"]["early_stopping"]
    assert saved["stopped"] and saved["best_step"] == stopper.best_step


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_a_resume_with_another_model_names_the_change_and_keeps_the_run(
    tmp_path, reference, caplog
):
    """Resuming with a config whose state does not fit the checkpoints: one error naming the
    fields that differ from the run's config.json and the first parameter that does not fit,
    found in the checkpoint's metadata before any array is read (no checkpoint is called
    unusable, no failed read leaves its errors to surface later); the config.json and the
    checkpoints stay as they were, so the run still loads and resumes with its own settings.
    Only the sections that shape the state are named (not loop.num_steps)."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    saved = (workdir / "config.json").read_text()
    # A longer run too, which alone is a valid resume: not named among the changes.
    config = helpers.tiny_config(**{"model.embed_dim": 16, "ckpt.every": 5, "loop.num_steps": 40})
    with pytest.raises(ConfigError, match=r"config.json in model.embed_dim: 8 -> 16\. Resume") as e:
        train.train_and_evaluate(config, str(workdir))
    assert "step 20: parameter" in str(e.value) and "in the checkpoint but" in str(e.value)
    assert "num_steps" not in str(e.value)
    assert "unusable" not in caplog.text and "trying an older" not in caplog.text
    gc.collect()  # a failed read's future would raise here (the warning filter above)
    assert (workdir / "config.json").read_text() == saved
    assert ckpt_steps(workdir) == ckpt_steps(reference)
    assert scoring.load_run(str(workdir)).step == 20


def test_a_resume_with_other_synthetic_data_names_the_change_and_keeps_the_data(
    tmp_path, reference
):
    """Other generator settings on a run with checkpoints would regenerate WORKDIR/data under
    them (the run then resumed on data it never saw): refused, naming the fields."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    schema = (workdir / "data" / "schema.json").read_text()
    config = helpers.tiny_config(**{"data.synthetic.bias": 3.0, "ckpt.every": 5})
    with pytest.raises(ConfigError, match=r"made with other settings \(data.synthetic.bias: "):
        train.train_and_evaluate(config, str(workdir))
    assert (workdir / "data" / "schema.json").read_text() == schema
    assert ckpt_steps(workdir) == ckpt_steps(reference)


def test_a_run_refuses_other_data_of_the_same_shapes(tmp_path, reference):
    """Data whose table sizes equal the run's but whose ids mean other users and items (here:
    the generator's seed 1 instead of 0) is refused by scoring and by a resume; a copy of the
    run's own data elsewhere is accepted."""
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    record = json.loads((workdir / "dataset.json").read_text())
    assert record["path"].endswith("/data") and len(record["fingerprint"]) == 32
    _, other = helpers.tiny_dataset(str(tmp_path), seed=1)
    with pytest.raises(DataError, match=rf"--data={re.escape(other)}: not the dataset .* was tr"):
        scoring.load_run(str(workdir), data=other)
    shutil.copytree(workdir / "data", tmp_path / "moved")
    assert scoring.load_run(str(workdir), data=str(tmp_path / "moved")).step == 20
    config = helpers.tiny_config(**{"data.source": "prepared", "data.path": other})
    with pytest.raises(DataError, match=r"config.data.path=.*: not the dataset"):
        train.train_and_evaluate(config, str(workdir))
    assert json.loads((workdir / "dataset.json").read_text()) == record


def test_synthetic_data_does_not_replace_a_folder_of_the_users(tmp_path):
    workdir = tmp_path / "run"
    (workdir / "data").mkdir(parents=True)
    (workdir / "data" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match=r"data: a folder that is not a synthetic dataset"):
        train.train_and_evaluate(helpers.tiny_config(), str(workdir))
    assert (workdir / "data" / "notes.txt").read_text() == "mine"


def test_a_run_that_stopped_early_does_not_train_again(tmp_path):
    config = helpers.tiny_config(**{"loop.early_stop_patience": 2})
    ckpt = types.SimpleNamespace(best_step=None)
    loop = loop_lib.Loop(config, str(tmp_path), writer=None, ckpt=ckpt, it=None)
    saved = {"metric": "auc", "mode": "max", "best": 0.7, "best_step": 4, "bad_evals": 2}
    loop.load_state({"early_stopping": dict(saved, stopped=True)})
    assert ckpt.best_step == 4  # kept beyond max_to_keep from the start
    state = types.SimpleNamespace(step=8)
    assert loop.run(state, train_step=None, num_steps=20, preempt=None, eval_cb=None) is state


@dataclasses.dataclass
class _Info:
    step: int


def test_latest_plus_best_policy_keeps_newest_k_and_the_best():
    policy = ckpt_lib.LatestPlusBest(2)
    infos = [_Info(s) for s in (10, 20, 30, 40)]
    assert policy.should_preserve(infos, context=None) == [False, False, True, True]
    policy.best_step = 10
    assert policy.should_preserve(infos, context=None) == [True, False, True, True]
    assert ckpt_lib.LatestPlusBest(0).should_preserve(infos, context=None) == [True] * 4


def test_early_stopping_rule_and_mode_inference():
    s = loop_lib.EarlyStopping("auc", config_check.metric_mode("auc", "auto"), patience=2)
    assert [s.update(t, v) for t, v in ((1, 0.6), (2, 0.7), (3, 0.7), (4, float("nan")))] == [
        True, True, False, False]  # fmt: skip
    assert s.stopped and (s.best, s.best_step) == (0.7, 2)
    assert config_check.metric_mode("logloss/buy", "auto") == "min"
    assert config_check.metric_mode("logloss", "max") == "max"
    never = loop_lib.EarlyStopping("logloss", "min", patience=0)
    assert not any(never.update(t, 1.0 + t) and never.stopped for t in range(10))
    config = helpers.tiny_config()
    with pytest.raises(ConfigError, match="early_stop_metric.*'aucc'"):
        config.loop.early_stop_metric = "aucc"
        config_check.check(config)
    schema = types.SimpleNamespace(behaviour_types=("pv", "buy"), splits={"valid": {}, "test": {}})
    config.loop.early_stop_metric = "auc/buy"
    config_check.check(config)
    config_check.check_schema(config, schema)
    config.loop.early_stop_metric = "auc/fav"
    with pytest.raises(ConfigError, match="early_stop_metric.*'fav' is not a behaviour type"):
        config_check.check_schema(config, schema)


def test_the_run_writes_monitoring_summaries_and_progress_lines(reference):
    tags = scalars(reference)
    for tag in ("train/loss", "train/grad_norm", "train/learning_rate",
                "perf/examples_per_s_per_device", "perf/input_wait_fraction",
                "perf/input_wait_s_per_step", "perf/compute_s_per_step",
                "influence/extractor/din", "influence/behaviour/buy",
                "valid/auc", "valid/logloss", "valid/best_auc", "test/gauc"):  # fmt: skip
        assert tag in tags, sorted(tags)
    assert [s for s, _ in tags["perf/compute_s_per_step"]] == [5, 10, 15, 20]
    assert all(v > 0 for _, v in tags["perf/compute_s_per_step"])
    acc = EventAccumulator(str(reference), size_guidance={"tensors": 0})
    acc.Reload()
    assert "config" in acc.Tags()["tensors"]
    log = (reference.parent / "reference.log").read_text()
    assert re.search(r"step 10/20 loss=\d\.\d{4} .* ex/s input_wait=\d+% ETA 0:00:\d\d", log)
