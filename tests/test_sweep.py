"""Sweeps: trial values, partition over workers, resume after a real SIGKILL, the results table,
best_config.py, and the HParams summaries.

The logic tests use a stand-in for training (a function of the trial's config), so they run in
milliseconds; one test runs the real `tools/sweep.py` on the tiny config in subprocesses.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from influence_jax.errors import ConfigError
from influence_jax.experiments import sweep as sweep_lib
from influence_jax.experiments import trials
from tests import helpers
from tests.helpers import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
GRID = {
    "method": "grid",
    "metric": "valid/auc",
    "params": {"opt.learning_rate": [0.002, 0.01], "model.embed_dim": [8, 16]},
}
# The real sweep: values that leave the compiled programs alone (the persistent compilation
# cache then compiles once for all four trials), a small model and few steps, with checkpoints
# to resume from mid-trial.
REAL = {
    "method": "grid",
    "metric": "valid/auc",
    "params": {"seed": [0, 1], "data.shuffle_seed": [0, 1]},
}
FAST = (
    "--config.model.extractors=('dnn',)",
    "--config.loop.num_steps=40",
    "--config.loop.eval_every=0",
    "--config.ckpt.every=4",
)


def prepared(tiny_data):
    """The tiny config on the session's tiny dataset (no data generation per trial)."""
    return helpers.tiny_config(**{"data.source": "prepared", "data.path": tiny_data[1]})


def fake_train(config, workdir):
    """Stands in for training: metrics that depend on the trial's values."""
    lr, dim = config.opt.learning_rate, config.model.embed_dim
    os.makedirs(workdir, exist_ok=True)
    return {"valid/auc": 0.5 + lr + dim / 1000, "test/auc": 0.4 + lr}


def test_train_whole_stops_the_tool_on_sigterm_instead_of_scoring_a_partly_trained_run(
    monkeypatch, tmp_path
):
    """tools/quality.py and multitask_compare.py score each run they train at once: a SIGTERM
    during training (which then returns, at a saved checkpoint) stops the tool (cli.Terminated,
    exit 143 under cli.run) instead of the tool scoring that run as a finished one."""
    from influence_jax import cli, train

    def sigterm_during_training(config, workdir, preempt):
        try:
            preempt._handle(signal.SIGTERM, None)  # what its SIGTERM handler does
            return {}
        finally:
            preempt.restore()

    monkeypatch.setattr(train, "train_and_evaluate", sigterm_during_training)
    with pytest.raises(cli.Terminated):
        trials.train_whole(None, str(tmp_path))
    monkeypatch.setattr(train, "train_and_evaluate", lambda c, w, p: {"test/auc": 0.5})
    assert trials.train_whole(None, str(tmp_path)) == {"test/auc": 0.5}


def test_grid_values_and_partition():
    sweep = sweep_lib.parse(GRID)
    assert sweep.num_trials == 4
    points = [sweep_lib.trial_values(sweep, i) for i in range(4)]
    assert {(p["opt.learning_rate"], p["model.embed_dim"]) for p in points} == {
        (a, b) for a in (0.002, 0.01) for b in (8, 16)
    }
    parts = [sweep_lib.assigned(7, -1, 3, w) for w in range(3)]
    assert parts == [[0, 3, 6], [1, 4], [2, 5]]
    assert sweep_lib.assigned(7, 5, 3, 0) == [5]
    with pytest.raises(ConfigError, match="trial_index"):
        sweep_lib.assigned(4, 4, 1, 0)
    with pytest.raises(ConfigError, match="worker_index"):
        sweep_lib.assigned(4, -1, 2, 2)


def test_the_example_sweep_file_fits_the_default_config():
    from configs import default

    sweep = sweep_lib.load(str(ROOT / "configs" / "sweep_default.json"))
    configs = sweep_lib.trial_configs(default.get_config(), sweep)
    assert len(configs) == sweep.num_trials == 4
    assert {c.model.extractors for _, c in configs} == {("din", "dnn", "cnn"), ("din",)}


def test_random_values_are_reproducible_and_in_range():
    raw = {
        "method": "random",
        "num_trials": 20,
        "seed": 3,
        "params": {
            "opt.learning_rate": {"log_uniform": [1e-4, 1e-2]},
            "model.cnn.dropout": {"uniform": [0.0, 0.5]},
            "model.embed_dim": {"int_uniform": [4, 6]},
            "model.extractors": [["din"], ["din", "dnn"]],
        },
    }
    sweep = sweep_lib.parse(raw)
    a = [sweep_lib.trial_values(sweep, i) for i in range(20)]
    assert a == [sweep_lib.trial_values(sweep_lib.parse(raw), i) for i in range(20)]
    assert all(1e-4 <= v["opt.learning_rate"] <= 1e-2 for v in a)
    assert all(0.0 <= v["model.cnn.dropout"] <= 0.5 for v in a)
    assert {v["model.embed_dim"] for v in a} == {4, 5, 6}
    assert len({v["opt.learning_rate"] for v in a}) == 20
    # Log-uniform: about half the draws below the geometric mean 1e-3.
    assert 4 <= sum(v["opt.learning_rate"] < 1e-3 for v in a) <= 16
    other = sweep_lib.parse({**raw, "seed": 4})
    assert sweep_lib.trial_values(other, 0) != a[0]


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"method": "grid", "params": {"opt.learning_rate": {"uniform": [0, 1]}}}, "a grid needs"),
        ({"method": "bayes", "params": {"x": [1]}}, "method"),
        ({"method": "random", "num_trials": 2, "params": {"x": {"normal": [0, 1]}}}, "params.x"),
        ({"params": {"opt.learning_rate": [1e-3]}, "num_trials": 3}, "grid has 1 points"),
        ({"params": {}}, "params"),
    ],
)
def test_bad_sweep_files(raw, match):
    with pytest.raises(ConfigError, match=match):
        sweep_lib.parse(raw, "s.json")


@pytest.mark.parametrize(
    "metric", ["valid/auc", "test/logloss", "valid/auc/buy", "valid/click/auc", "cv/auc_mean"]
)
def test_metrics_a_trial_reports_are_accepted(metric):
    assert sweep_lib.parse({**GRID, "metric": metric}, "s.json").metric == metric


@pytest.mark.parametrize(
    "metric", ["valid/nosuch", "auc", "valid", "/auc", "valid/click/buy/auc", "cv/auc", 3]
)
def test_an_unknown_metric_names_the_sweep_file_and_the_field(metric):
    with pytest.raises(ConfigError, match=r"^s\.json: metric: .* is not a result key"):
        sweep_lib.parse({**GRID, "metric": metric}, "s.json")


def test_a_metric_of_a_split_the_trials_do_not_evaluate_stops_before_any_trial(tmp_path, tiny_data):
    sweep = sweep_lib.parse({**GRID, "metric": "train/auc"}, "s.json")
    calls = []
    with pytest.raises(ConfigError, match="s.json: metric: 'train/auc'.*'valid', 'test'"):
        sweep_lib.run(prepared(tiny_data), sweep, str(tmp_path / "sw"), None, calls.append)
    assert not calls and not (tmp_path / "sw").exists()


@pytest.mark.parametrize(
    "metric, cv_folds, match",
    [
        ("valid/nosuch", 0, "metric: 'valid/nosuch' is not a result key"),
        ("valid/auc", 2, "with --cv_folds=2 .* 'cv/<metric>_<stat>'"),
        ("cv/auc_mean", -1, "--cv_folds=-1: need at least one fold"),
    ],
    ids=["unknown-metric", "cv-needs-a-cv-metric", "negative-folds"],
)
def test_the_sweep_tool_checks_its_metric_before_any_trial(tmp_path, metric, cv_folds, match):
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps({**GRID, "metric": metric}))
    d = tmp_path / "sweep"
    r = helpers.run_tool(
        "sweep", "--config=configs/tiny.py", f"--sweep={sweep_file}", f"--workdir={d}",
        f"--cv_folds={cv_folds}", "--config.loop.num_steps=5", timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert re.search(match, r.stderr), r.stderr[-2000:]
    assert str(sweep_file) in r.stderr or "cv_folds=-1" in r.stderr
    assert not d.exists()


def test_bad_values_name_the_field(tmp_path, tiny_data):
    config = prepared(tiny_data)
    bad = sweep_lib.parse({"params": {"opt.learnin_rate": [1e-3]}}, "s.json")
    with pytest.raises(ConfigError, match="opt.learnin_rate"):
        sweep_lib.run(config, bad, str(tmp_path), train_fn=fake_train)
    wrong_type = sweep_lib.parse({"params": {"model.embed_dim": [8.5]}}, "s.json")
    with pytest.raises(ConfigError, match="model.embed_dim"):
        sweep_lib.run(config, wrong_type, str(tmp_path), train_fn=fake_train)
    indivisible = sweep_lib.parse({"params": {"data.batch_size": [60]}}, "s.json")
    with pytest.raises(ConfigError, match="trial 0.*batch_size"):
        sweep_lib.run(config, indivisible, str(tmp_path), train_fn=fake_train)


def test_workers_share_one_table_and_finished_trials_are_kept(tmp_path, tiny_data):
    config, sweep, d = prepared(tiny_data), sweep_lib.parse(GRID), str(tmp_path)
    calls = []
    counting = lambda c, w: calls.append(w) or fake_train(c, w)
    for w in range(2):  # two workers, one after the other here
        sweep_lib.run(config, sweep, d, sweep_lib.assigned(4, -1, 2, w), counting)
    assert sorted(os.path.basename(c) for c in calls) == [f"trial_00{i}" for i in range(4)]
    before = {r["trial"]: r["run_id"] for r in sweep_lib.collect(d)}
    sweep_lib.run(config, sweep, d, None, counting)  # everything finished: nothing reruns
    assert len(calls) == 4
    assert {r["trial"]: r["run_id"] for r in sweep_lib.collect(d)} == before
    text = sweep_lib.report(d, sweep)
    assert "4 of 4 trials finished" in text
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    aucs = [float(r["valid/auc"]) for r in rows]
    assert aucs == sorted(aucs, reverse=True) and len(rows) == 4
    best = rows[0]
    assert (float(best["opt.learning_rate"]), int(best["model.embed_dim"])) == (0.01, 16)
    loaded = trials.load_config_file(str(tmp_path / "best_config.py"))
    want = trials.load_config_file(str(tmp_path / f"trial_{int(best['trial']):03d}" / "config.py"))
    assert loaded.to_dict() == want.to_dict()
    assert (loaded.opt.learning_rate, loaded.model.embed_dim) == (0.01, 16)
    # A changed sweep file does not silently mix with the old trials.
    changed = sweep_lib.parse({**GRID, "params": {**GRID["params"], "model.embed_dim": [8, 32]}})
    with pytest.raises(ConfigError, match="use a new --workdir"):
        sweep_lib.run(config, changed, d, None, fake_train)
    longer = helpers.tiny_config(**{"data.source": "prepared", "data.path": tiny_data[1],
                                     "loop.num_steps": 99})  # fmt: skip
    with pytest.raises(ConfigError, match="loop.num_steps: 20 then, 99 now"):
        sweep_lib.run(longer, sweep, d, None, fake_train)


def test_failed_trial_is_recorded_and_ranked_last(tmp_path, tiny_data):
    from influence_jax.loop import TrainingError

    def flaky(config, workdir):
        if config.opt.learning_rate > 0.005:
            raise TrainingError("non-finite loss at step 3")
        return fake_train(config, workdir)

    sweep = sweep_lib.parse(GRID)
    sweep_lib.run(prepared(tiny_data), sweep, str(tmp_path), None, flaky)
    rows = sweep_lib.table_rows(sweep_lib.collect(str(tmp_path)), sweep)
    assert [r["status"] for r in rows] == ["ok", "ok", "failed", "failed"]
    assert "non-finite" in rows[-1]["error"]


def _hparams_events(logdir: str) -> list[str]:
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.plugins.hparams import plugin_data_pb2

    kinds = []
    for path in glob.glob(os.path.join(logdir, "events.out.tfevents.*.hparams")):
        for event in event_file_loader.EventFileLoader(path).Load():
            for v in event.summary.value:
                if v.metadata.plugin_data.plugin_name == "hparams":
                    data = plugin_data_pb2.HParamsPluginData.FromString(
                        v.metadata.plugin_data.content
                    )
                    kinds.append(data.WhichOneof("data"))
    return kinds


def _saved_steps(workdir: Path) -> list[str]:
    """Finished checkpoints (Orbax writes into a temporary folder and renames it when done)."""
    ckpt = workdir / "checkpoints"
    return [p for p in os.listdir(ckpt) if p.isdigit()] if ckpt.is_dir() else []


def _sweep_cmd(workdir: Path, sweep_file: Path) -> list[str]:
    return [sys.executable, "tools/sweep.py", "--config=configs/tiny.py",
            f"--sweep={sweep_file}", f"--workdir={workdir}", *FAST]  # fmt: skip


@pytest.mark.slow  # two trials, each in its own process
def test_an_isolated_sweep_runs_each_trial_in_its_own_process(tmp_path, jax_cache):
    """--isolate: the sweep's own share of the trials (worker 0 of 2: trials 0 and 2), each
    trained by this command run again with --trial_index, then the table of them."""
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(REAL))
    d = tmp_path / "sweep"
    cmd = _sweep_cmd(d, sweep_file) + ["--isolate", "--num_workers=2", "--worker_index=0"]
    out = subprocess.run(
        cmd, cwd=ROOT, env=subprocess_env(jax_cache, devices=1), capture_output=True,
        text=True, timeout=600,
    )  # fmt: skip
    assert out.returncode == 0, (out.stdout + out.stderr)[-3000:]
    assert sorted(glob.glob(str(d / "trial_*" / "result.json"))) == [
        str(d / f"trial_{i:03d}" / "result.json") for i in (0, 2)
    ]
    assert "2 of 4 trials finished" in out.stdout, out.stdout[-3000:]


@pytest.mark.slow  # one trial's process start and a few steps
def test_an_isolated_sweep_passes_sigterm_to_its_trial(tmp_path, jax_cache):
    """--isolate: a SIGTERM to the sweep's own process only (a scheduler may signal just the
    command it started) reaches the trial's process, which saves a checkpoint and stops; the
    sweep then exits --preempted_exit_code. (The trial trained on unsignalled before.)"""
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(REAL))
    d = tmp_path / "sweep"
    cmd = _sweep_cmd(d, sweep_file) + ["--isolate", "--preempted_exit_code=75",
                                       "--config.loop.num_steps=4000"]  # fmt: skip
    log_path = tmp_path / "sweep.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=subprocess_env(jax_cache, devices=1), stdout=log, stderr=log
        )
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None and not _saved_steps(d / "trial_000"):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)  # this process only, not its group
        proc.wait(timeout=240)
    out = log_path.read_text()
    assert proc.returncode == 75, out[-3000:]
    assert "SIGTERM received: saved checkpoint at step" in out, out[-3000:]
    assert "sweep stopped: SIGTERM: trial 0 stopped at a saved checkpoint" in out
    assert not (d / "trial_000" / "result.json").exists() and not (d / "trial_001").exists()


@pytest.mark.slow  # about 50 s of trainings; the resume logic has fast tests above
def test_real_sweep_killed_after_two_trials_resumes_the_rest(tmp_path, jax_cache):
    """A real sweep, SIGKILLed while its third trial runs, then the same command again."""
    sweep_file = tmp_path / "sweep.json"
    sweep_file.write_text(json.dumps(REAL))
    d = tmp_path / "sweep"
    env = subprocess_env(jax_cache, devices=1)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_sweep_cmd(d, sweep_file), cwd=ROOT, env=env, stdout=log, stderr=log)
    results = lambda: sorted(glob.glob(str(d / "trial_*" / "result.json")))
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        # Kill once two trials are done and the third has a checkpoint to resume from.
        if len(results()) >= 2 and _saved_steps(d / "trial_002"):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    log.close()
    first = results()
    assert len(first) == 2, (tmp_path / "first.log").read_text()[-3000:]
    before = {p: (os.stat(p).st_mtime_ns, json.load(open(p))["run_id"]) for p in first}
    assert not (d / "trial_002" / "result.json").exists()

    second = subprocess.run(
        _sweep_cmd(d, sweep_file), cwd=ROOT, env=env, capture_output=True, text=True, timeout=240
    )
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-3000:]
    assert {p: (os.stat(p).st_mtime_ns, json.load(open(p))["run_id"]) for p in first} == before
    assert "trial 0:" not in second.stdout and "trial 1:" not in second.stdout
    assert "trial 2:" in second.stdout and "trial 3:" in second.stdout
    assert "resumed from checkpoint step" in out  # trial 2 continued, not restarted
    assert len(results()) == 4 and "4 of 4 trials finished" in second.stdout

    with open(d / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert sorted(int(r["trial"]) for r in rows) == [0, 1, 2, 3]
    for r in rows:
        assert r["status"] == "ok"
        assert 0.0 < float(r["valid/auc"]) < 1.0 and 0.0 < float(r["test/auc"]) < 1.0
    aucs = [float(r["valid/auc"]) for r in rows]
    assert aucs == sorted(aucs, reverse=True)
    best = d / f"trial_{int(rows[0]['trial']):03d}"
    loaded = trials.load_config_file(str(d / "best_config.py"))
    want = json.loads((best / "config.json").read_text())
    assert json.loads(loaded.to_json_best_effort()) == want
    # TensorBoard: every trial's scalars and HParams session under the sweep root.
    assert _hparams_events(str(d)) == ["experiment"]
    for i in range(4):
        t = d / f"trial_{i:03d}"
        assert sorted(_hparams_events(str(t))) == ["session_end_info", "session_start_info"]
        assert [p for p in glob.glob(str(t / "events.out.tfevents.*")) if "hparams" not in p]


def test_the_synthetic_data_lock_of_a_killed_process_does_not_hold_up_the_rerun(tmp_path):
    """The shared data's lock is an flock: a holder killed while generating (SIGKILL leaves
    the lock file behind) releases it, and the next trial generates the data at once."""
    shared = str(tmp_path / "data-x")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(600)",
         str(tmp_path / ".data-x.lock")],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()
    holder.wait()
    assert os.path.exists(tmp_path / ".data-x.lock")
    cfg = helpers.tiny_config(**{"data.synthetic.train_examples": 64}).data.synthetic
    trials._generate_once(cfg, shared)  # hung up to 30 minutes on a lock file left behind
    assert os.path.exists(os.path.join(shared, "schema.json"))
