"""train_and_evaluate on configs/tiny.py: artifacts, TensorBoard read-back, resume, planted.json."""

import glob
import json
import os

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from influence_jax import train
from influence_jax.data import synthetic
from tests import helpers


def _steps(workdir):
    return sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())


def _scalars(workdir):
    acc = EventAccumulator(workdir, size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc, {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def test_train_and_evaluate_writes_checkpoint_events_config_and_resumes(tmp_path):
    workdir = str(tmp_path / "run")
    config = helpers.tiny_config()
    result = train.train_and_evaluate(config, workdir)

    assert 0.0 <= result["test/auc"] <= 1.0 and np.isfinite(result["test/logloss"])
    # The final test metrics are those of the best checkpoint by the validation metric.
    with open(os.path.join(workdir, "best.json")) as f:
        best = json.load(f)
    assert result["test/step"] == best["step"] and best["metric"] == "valid/auc"
    assert "valid/auc" in result and "valid/gauc" in result
    assert _steps(workdir) == [10, 20]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["name"] == "ranker"
    with open(os.path.join(workdir, synthetic.PLANTED_FILE)) as f:
        planted = json.load(f)["behaviour_type_weights"]
    assert planted == dict(config.data.synthetic.type_weights)

    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    acc, scalars = _scalars(workdir)
    for tag in (
        "train/loss",
        "train/learning_rate",
        "perf/examples_per_s",
        "valid/auc",
        "valid/logloss",
        "test/auc",
        "influence/behaviour/buy",
        "influence/extractor/din",
    ):
        assert tag in scalars, sorted(scalars)
    assert [s for s, _ in scalars["train/loss"]] == [5, 10, 15, 20]
    assert all(np.isfinite(v) for _, v in scalars["train/loss"])
    assert "config" in acc.Tags()["tensors"]

    # Same command with more steps resumes from step 20 instead of starting over.
    config.loop.num_steps = 30
    train.train_and_evaluate(config, workdir)
    _, scalars = _scalars(workdir)
    assert [s for s, _ in scalars["train/loss"]][-3:] == [20, 25, 30]
    assert _steps(workdir)[-1] == 30
