"""launch/*.sh in dry-run mode: the printed commands run the same `python -m influence_jax.main`;
missing arguments or host variables end in one message naming them (no bash `line NN:` noise)."""

import os
import re
import shlex
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = ["-m", "influence_jax.main", "--config=configs/tiny.py", "--workdir=gs://b/run x"]
OVERRIDES = ["--config.loop.num_steps=5", "--config.model.extractors=('din','dnn')"]


def _launch(script: str, env: dict[str, str], args, gone=("SLURM_", "JAX_")):
    """Runs launch/SCRIPT with DRY_RUN=1 and `env`, without the variables starting `gone`."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith(gone)}
    return subprocess.run(
        ["bash", os.path.join(ROOT, "launch", script), *args],
        env={**clean, "DRY_RUN": "1", **env},
        capture_output=True,
        text=True,
        timeout=30,
    )


def _dry_run(script: str, env: dict[str, str], *args: str) -> list[list[str]]:
    """Runs launch/SCRIPT with DRY_RUN=1; returns each printed command as an argv list."""
    out = _launch(script, env, args)
    assert out.returncode == 0, out.stderr
    return [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]


def _ends_with_train(argv: list[str], python: str) -> None:
    i = argv.index(python)
    assert argv[i + 1 :] == TRAIN + OVERRIDES, argv


def _remote(argv: list[str]) -> list[str]:
    """The argv of the shell command given to `gcloud ... ssh --command=...`."""
    (cmd,) = [a.removeprefix("--command=") for a in argv if a.startswith("--command=")]
    return shlex.split(cmd)


def test_local_dry_run_prints_the_training_command():
    (argv,) = _dry_run("local.sh", {}, "configs/tiny.py", "gs://b/run x", *OVERRIDES)
    _ends_with_train(argv, "python3")
    (argv,) = _dry_run("local.sh", {"PYTHON": "/v/bin/python"}, "configs/tiny.py", "gs://b/run x",
                       *OVERRIDES)  # fmt: skip
    _ends_with_train(argv, "/v/bin/python")


@pytest.mark.parametrize(
    "script", ["local.sh", "gpu_multihost.sh", "tpu_vm.sh", "spark_prepare.sh"]
)
def test_a_dry_run_value_other_than_0_or_1_is_refused(script):
    """DRY_RUN=yes once started the real training (only 1 counted)."""
    out = _launch(script, {"DRY_RUN": "yes", "TPU_NAME": "t", "ZONE": "z"}, ["a", "b", "c"])
    assert out.returncode == 2 and f"launch/{script}: DRY_RUN=yes must be 0 or 1" in out.stderr
    assert not out.stdout


def test_tpu_vm_dry_run_creates_copies_installs_and_trains_on_all_workers():
    env = {"TPU_NAME": "tpu1", "ZONE": "us-central2-b", "PROJECT": "proj", "SPOT": "1"}
    cmds = _dry_run("tpu_vm.sh", env, "configs/tiny.py", "gs://b/run x", *OVERRIDES)
    create, pack, scp, unpack, install, train = cmds
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "tpu1"]
    assert {"--zone=us-central2-b", "--project=proj", "--spot"} <= set(create)
    assert any(a.startswith("--accelerator-type=") for a in create)
    assert "tar" in pack and scp[4] == "scp" and "tar" in _remote(unpack)
    for cmd in (scp, unpack, install, train):
        assert "--worker=all" in cmd and "--zone=us-central2-b" in cmd, cmd
    assert "install" in _remote(install) and "jax[tpu]" in _remote(install)
    remote = _remote(train)
    assert "INFLUENCE_JAX_AUTO_DISTRIBUTED=1" in remote
    _ends_with_train(remote[: remote.index("2>&1")], "python3")


def test_tpu_vm_clones_repo_url_instead_of_copying():
    env = {"TPU_NAME": "tpu1", "ZONE": "z", "REPO_URL": "https://example.com/r.git"}
    cmds = _dry_run("tpu_vm.sh", env, "configs/tiny.py", "gs://b/run x", *OVERRIDES)
    assert not any("scp" in c for c in cmds)
    assert "https://example.com/r.git" in _remote(cmds[1]) and "clone" in _remote(cmds[1])


def test_tpu_vm_without_zone_fails_with_usage():
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), "c", "w"],
        env={**os.environ, "DRY_RUN": "1", "TPU_NAME": "t", "ZONE": ""},
        capture_output=True,
        text=True,
    )
    assert out.returncode != 0 and "usage" in out.stderr


@pytest.mark.parametrize("proc", ["0", "1"])
def test_gpu_multihost_under_slurm_sets_the_distributed_env(proc):
    env = {"SLURM_PROCID": proc, "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "gpu[07-08]",
           "PORT": "4321", "PATH": "/usr/bin:/bin"}  # fmt: skip
    (argv,) = _dry_run("gpu_multihost.sh", env, "configs/tiny.py", "gs://b/run x", *OVERRIDES)
    assert argv[0] == "env"
    assert {
        "JAX_COORDINATOR_ADDRESS=gpu07:4321",
        "JAX_NUM_PROCESSES=2",
        f"JAX_PROCESS_ID={proc}",
    } <= set(argv)
    _ends_with_train(argv, "python3")


def test_gpu_multihost_over_ssh_starts_one_process_per_host():
    env = {"HOSTS": "h0 h1 h2", "REMOTE_DIR": "/shared/code"}
    cmds = _dry_run("gpu_multihost.sh", env, "configs/tiny.py", "gs://b/run x", *OVERRIDES)
    assert [c[:2] for c in cmds] == [["ssh", "h0"], ["ssh", "h1"], ["ssh", "h2"]]
    for i, (_, _, remote) in enumerate(cmds):
        argv = shlex.split(remote)
        assert argv[:3] == ["cd", "/shared/code", "&&"]
        assert {"JAX_COORDINATOR_ADDRESS=h0:1234", "JAX_NUM_PROCESSES=3"} <= set(argv)
        assert f"JAX_PROCESS_ID={i}" in argv
        _ends_with_train(argv, "python3")


def _fails(script: str, env: dict[str, str], *args: str) -> str:
    """Runs launch/SCRIPT with DRY_RUN=1 and no host or TPU variables; returns its stderr."""
    gone = ("SLURM_", "JAX_", "HOSTS", "COORDINATOR", "NUM_PROCESSES", "PROCESS_ID", "TPU_NAME",
            "ZONE")  # fmt: skip
    out = _launch(script, env, args, gone)
    assert out.returncode != 0 and not out.stdout, out
    assert not re.search(r"line \d+:", out.stderr), out.stderr  # bash's ${VAR:?} noise
    assert out.stderr.startswith(f"launch/{script}: "), out.stderr
    return out.stderr


def test_gpu_multihost_without_host_variables_names_them_and_the_three_ways():
    err = _fails("gpu_multihost.sh", {}, "configs/tiny.py", "/shared/run")
    assert "COORDINATOR, NUM_PROCESSES, PROCESS_ID not set" in err
    assert "HOSTS=" in err and "srun" in err and "PROCESS_ID=0" in err
    err = _fails("gpu_multihost.sh", {"COORDINATOR": "h0:1234"}, "configs/tiny.py", "w")
    assert "NUM_PROCESSES, PROCESS_ID not set" in err
    err = _fails("gpu_multihost.sh", {"SLURM_PROCID": "0"}, "configs/tiny.py", "w")
    assert "SLURM_JOB_NODELIST or SLURM_NTASKS" in err


def test_tpu_vm_without_tpu_name_and_zone_names_them():
    err = _fails("tpu_vm.sh", {}, "configs/tiny.py", "gs://b/run")
    assert "TPU_NAME, ZONE not set" in err and "usage" in err
    assert "ZONE not set" in _fails("tpu_vm.sh", {"TPU_NAME": "t"}, "c", "w")


@pytest.mark.parametrize("script", ["local.sh", "tpu_vm.sh", "gpu_multihost.sh"])
def test_a_missing_workdir_argument_is_one_usage_line(script):
    err = _fails(script, {"TPU_NAME": "t", "ZONE": "z"}, "configs/tiny.py")
    assert "needs CONFIG and WORKDIR" in err and "usage" in err


def test_spark_prepare_dry_run_prints_spark_submit_of_prepare_data():
    env = {"SPARK_SUBMIT": "spark-submit", "PYSPARK_PYTHON": "/opt/venv/bin/python", "HIVE": "1"}
    env["SPARK_ARGS"] = "--num-executors 100"
    (argv,) = _dry_run(
        "spark_prepare.sh", env, "yarn", "/mnt/shared/out x", "--source=taobao",
        "--input=table:logs.ub",
    )  # fmt: skip
    assert argv[:3] == ["spark-submit", "--master", "yarn"]
    assert "spark.pyspark.python=/opt/venv/bin/python" in argv
    assert "spark.sql.catalogImplementation=hive" in argv and "--num-executors" in argv
    i = argv.index(os.path.join(ROOT, "tools", "prepare_data.py"))
    assert argv[i + 1 :] == [
        "--engine=spark",
        "--output=/mnt/shared/out x",
        "--source=taobao",
        "--input=table:logs.ub",
    ]


def test_spark_prepare_without_output_is_one_usage_line():
    err = _fails("spark_prepare.sh", {}, "yarn")
    assert "needs MASTER and OUTPUT" in err and "usage" in err
