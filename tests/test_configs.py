"""Every config builds; bad values fail at start-up with one message naming the field."""

import glob
import importlib.util
import os
import subprocess
import sys

import pytest

from influence_jax import config_check
from influence_jax.errors import ConfigError
from tests import helpers

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.py")))


@pytest.mark.parametrize(
    "path", [p for p in CONFIGS if not p.endswith("__init__.py")], ids=os.path.basename
)
def test_every_config_builds_and_checks(path):
    spec = importlib.util.spec_from_file_location("cfg", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    if config.data.source == "prepared" and not config.data.path:
        config.data.path = "/some/prepared/dataset"
    config_check.check(config, num_devices=8)
    assert module.__doc__ and "python" in module.__doc__, "docstring must hold the run command"


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"data.batch_size": 0}, "config.data.batch_size"),
        ({"data.batch_size": -4}, "config.data.batch_size"),
        ({"data.batch_size": 60}, "config.data.batch_size=60 does not divide"),
        ({"data.eval_batch_size": 100}, "config.data.eval_batch_size=100 does not divide"),
        ({"model.name": "resnet"}, "config.model.name"),
        ({"model.cnn.dropout": 1.0}, "config.model.cnn.dropout"),
        ({"model.seed_cnn.dropout": -0.1}, "config.model.seed_cnn.dropout"),
        ({"model.extractors": ()}, "config.model.extractors"),
        ({"model.combine": "mean"}, "config.model.combine"),
        ({"opt.name": "sgd"}, "config.opt.name"),
        ({"opt.schedule": "linear"}, "config.opt.schedule"),
        ({"opt.stats_rate": 0.0}, "config.opt.stats_rate"),
        ({"opt.sparse_learning_rate": 0.0}, "config.opt.sparse_learning_rate"),
        ({"opt.grad_blocks": 0}, "config.opt.grad_blocks"),
        ({"opt.grad_blocks": 3}, "config.opt.grad_blocks=3: config.data.batch_size=64 does not"),
        ({"loop.eval_every": -1}, "config.loop.eval_every"),
        ({"loop.early_stop_metric": "aucc"}, "config.loop.early_stop_metric"),
        ({"loop.early_stop_mode": "up"}, "config.loop.early_stop_mode"),
        ({"ckpt.every": 0}, "config.ckpt.every"),
        ({"data.train_time_range": (1,)}, "config.data.train_time_range"),
        ({"mesh.rules": (("embed",),)}, "config.mesh.rules"),
        ({"loop.num_steps": 0}, "config.loop.num_steps"),
        ({"opt.learning_rate": 0.0}, "config.opt.learning_rate"),
        ({"data.source": "csv"}, "config.data.source"),
        ({"data.source": "prepared"}, "config.data.path"),
        ({"mesh.data": 3}, "config.mesh"),
        ({"data.synthetic.task": "buy"}, "config.data.synthetic.task"),
        ({"model.output_bias": "mean"}, "config.model.output_bias"),
        ({"model.match.taus": (4.0, 0.0)}, "config.model.match.taus"),
        ({"data.synthetic.conversion_bias": float("nan")}, "config.data.synthetic.conversion_bias"),
        ({"data.synthetic.repeat_view_prob": 1.5}, "config.data.synthetic.repeat_view_prob"),
        ({"mesh.rules": (("[", "model"),)}, "config.mesh.rules: '[' is not a regular"),
        ({"mesh.rules": ((".*embed.*", "axis"),)}, "give each dimension one of the mesh axes"),
        ({"mesh.model": 3}, "config.mesh: model=3 does not divide the 8 devices"),
        ({"mesh.data": 3, "mesh.model": 2}, "config.mesh: data=3 x model=2 != 8 devices"),
        ({"data.shuffle_seed": -1}, "config.data.shuffle_seed: must be >= 0"),
        ({"data.synthetic.seed": -1}, "config.data.synthetic.seed: must be >= 0"),
        ({"data.synthetic.bias": float("nan")}, "config.data.synthetic.bias: must be finite"),
        ({"data.synthetic.history_scale": float("inf")}, "config.data.synthetic.history_scale"),
        ({"data.synthetic.recency_decay": -2.0}, "config.data.synthetic.recency_decay"),
        ({"data.synthetic.signals_absent": ("foo",)}, "config.data.synthetic.signals_absent"),
        ({"data.synthetic.type_weights.fav": float("nan")}, "synthetic.type_weights.fav: must"),
        ({"data.synthetic.type_probs.pv": -0.1}, "config.data.synthetic.type_probs.pv: must"),
    ],
)
def test_bad_config_values_name_the_field(overrides, field):
    config = helpers.tiny_config(**overrides)
    with pytest.raises(ConfigError) as e:
        config_check.check(config, num_devices=8)
    assert field in str(e.value)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--config=configs/tiny.py", "--config.loop.num_stepz=5"],
         "error: a config override (--config.loop.num_stepz) is not valid: no field 'num_stepz' "
         '(Did you mean "num_steps" instead of "num_stepz"?)'),
        (["--config=configs/tiny.py", "--config.data.batch_size=0"],
         "error: config.data.batch_size: must be positive, got 0"),
        (["--config=configs/nope.py"], "error: --config: "),
    ],
)  # fmt: skip
def test_main_reports_a_bad_config_in_one_line_before_any_work(tmp_path, args, message):
    workdir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "influence_jax.main", f"--workdir={workdir}", *args],
        capture_output=True, text=True, cwd=helpers.ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(message), r.stderr
    assert "Traceback" not in r.stderr and not workdir.exists()


def test_main_refuses_a_workdir_that_is_a_file(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("a file of the user's")
    r = subprocess.run(
        [sys.executable, "-m", "influence_jax.main", f"--workdir={workdir}",
         "--config=configs/tiny.py"],
        capture_output=True, text=True, cwd=helpers.ROOT, timeout=120,
    )  # fmt: skip
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last == f"error: --workdir={workdir}: exists and is not a folder"
    assert workdir.read_text() == "a file of the user's"


def test_main_writes_why_it_stopped_into_train_log(tmp_path):
    """An error after train.log opened (a dataset path that does not exist) ends the log too,
    and the terminal shows it once. (A log there already: one this start makes goes with the
    rest of what it made, tests/test_faults.py.)"""
    workdir, missing = tmp_path / "run", tmp_path / "no-such-data"
    workdir.mkdir()
    (workdir / "train.log").write_text("an earlier attempt's line\n")
    r = subprocess.run(
        [sys.executable, "-m", "influence_jax.main", f"--workdir={workdir}",
         "--config=configs/tiny.py", "--config.data.source=prepared",
         f"--config.data.path={missing}"],
        capture_output=True, text=True, cwd=helpers.ROOT, timeout=120,
    )  # fmt: skip
    last = r.stderr.strip().splitlines()[-1]
    assert r.returncode != 0 and last.startswith("error: ") and str(missing) in last, r.stderr
    assert r.stderr.count(last[len("error: ") :]) == 1 and "Traceback" not in r.stderr
    log = (workdir / "train.log").read_text().strip().splitlines()
    assert log[-1].startswith("E") and log[-1].endswith(last), log[-1]
    assert log[0] == "an earlier attempt's line" and sorted(os.listdir(workdir)) == ["train.log"]


@pytest.mark.parametrize(
    "text,message",
    [
        ("def get_config(:\n", "error: --config: {path}:1: not a Python config file (invalid"),
        ('{"loop": {"num_steps": 3}}\n', "error: --config: the file defines no get_config()"),
        ("def get_config():\n    return 5\n", "error: --config: get_config() returned int, not"),
        (None, "error: --config={path}:foo: TypeError: get_config() takes 0 positional"),
    ],
    ids=["syntax", "json", "not-a-config", "argument"],
)
def test_a_config_file_that_is_not_one_is_one_line(tmp_path, text, message):
    path = tmp_path / "c.py"
    path.write_text(text or (helpers.ROOT / "configs" / "tiny.py").read_text())
    flag = f"{path}:foo" if text is None else str(path)
    workdir = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "-m", "influence_jax.main", f"--workdir={workdir}", f"--config={flag}"],
        capture_output=True, text=True, cwd=helpers.ROOT, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0 and r.stderr.strip().splitlines()[-1].startswith(
        message.format(path=path)
    ), r.stderr
    assert "Traceback" not in r.stderr and not workdir.exists()


@pytest.mark.parametrize("workdir", ["", "{file}/sub"])
def test_main_refuses_an_empty_workdir_or_one_under_a_file(tmp_path, workdir):
    file = tmp_path / "f"
    file.write_text("x")
    r = subprocess.run(
        [sys.executable, "-m", "influence_jax.main", f"--workdir={workdir.format(file=file)}",
         "--config=configs/tiny.py"],
        capture_output=True, text=True, cwd=helpers.ROOT, timeout=120,
    )  # fmt: skip
    last = r.stderr.strip().splitlines()[-1]
    want = f"{file} is a file, not a folder" if workdir else "--workdir: give the run's folder"
    assert r.returncode != 0 and last.startswith("error: ") and want in last, r.stderr
    assert "Traceback" not in r.stderr and file.read_text() == "x"


def test_dropping_every_behaviour_type_is_warned_of(tiny_data, caplog):
    schema, _ = tiny_data
    config = helpers.tiny_config(**{"data.drop_behaviours": tuple(schema.behaviour_types)})
    with caplog.at_level("WARNING"):
        config_check.check_schema(config, schema)
    assert "drops every behaviour type" in caplog.text
    caplog.clear()
    config_check.check_schema(helpers.tiny_config(**{"data.drop_behaviours": ("pv",)}), schema)
    assert "drops every" not in caplog.text
