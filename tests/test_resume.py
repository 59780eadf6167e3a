"""Exact resume with real processes (a SIGKILL mid-run, then the same command again ends bit for
bit where an uninterrupted run ends), early stopping, last K + best retention, metadata.

The helpers here start `python -m influence_jax.main` on configs/tiny.py; test_faults.py and
test_multihost.py use them too. Subprocesses share one persistent compilation cache, so only the
first run of the session compiles.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from influence_jax import checkpoint as ckpt_lib
from influence_jax import loop as loop_lib
from influence_jax.config_check import ConfigError
from tests import helpers

ROOT = Path(__file__).resolve().parent.parent
FLAGS = ("--config.ckpt.every=5",)  # tiny: 20 steps, evaluations at 10 and 20


@dataclasses.dataclass
class Finished:
    returncode: int
    log: str


def subprocess_env(cache_dir: str, devices: int = 8, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        TF_CPP_MIN_LOG_LEVEL="2",
        **extra,
    )
    return env


def start(
    workdir: Path, *overrides: str, cache: str, devices: int = 8, tag: str = "", **env: str
) -> tuple[subprocess.Popen, Path]:
    """Starts the training command on configs/tiny.py; its output goes to WORKDIR-TAG.log."""
    log = workdir.parent / f"{workdir.name}{tag}.log"
    cmd = [sys.executable, "-m", "influence_jax.main", "--config=configs/tiny.py",
           f"--workdir={workdir}", *overrides]  # fmt: skip
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        proc = subprocess.Popen(
            cmd, cwd=ROOT, env=subprocess_env(cache, devices, **env), stdout=f, stderr=f
        )
    return proc, log


def finish(proc: subprocess.Popen, log: Path, timeout: float = 300) -> Finished:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"timed out after {timeout}s:\n{log.read_text()[-4000:]}")
    return Finished(proc.returncode, log.read_text())


def run_main(workdir: Path, *overrides: str, cache: str, **kw) -> Finished:
    return finish(*start(workdir, *overrides, cache=cache, **kw))


def wait_for(predicate, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    """Polls every 10 ms until `predicate()`; fails if the process exits first."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"condition not reached (rc={proc.poll()}):\n{log.read_text()[-4000:]}")
        time.sleep(0.01)


def ckpt_steps(workdir: Path) -> list[int]:
    """Committed checkpoint steps (half-written ones carry a suffix)."""
    return sorted(int(n) for n in os.listdir(workdir / "checkpoints") if n.isdigit())


def load_state(workdir: Path, step: int) -> dict:
    """A checkpoint's TrainState as a dict of numpy arrays (no devices or model needed)."""
    path = workdir / "checkpoints" / str(step) / "state"
    with ocp.PyTreeCheckpointer() as c:
        tree = c.metadata(path).item_metadata.tree
        args = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
        return c.restore(path, args=ocp.args.PyTreeRestore(restore_args=args))


def assert_trees_equal(a: dict, b: dict) -> None:
    flat_a, flat_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in flat_a] == [p for p, _ in flat_b]
    differ = [
        jax.tree_util.keystr(p)
        for (p, x), (_, y) in zip(flat_a, flat_b, strict=True)
        if not np.array_equal(x, y)
    ]
    assert not differ, f"{len(differ)} of {len(flat_a)} leaves differ: {differ[:8]}"


def scalars(workdir: Path) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(workdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


@functools.lru_cache(maxsize=1)
def reference_run(base: str, cache: str) -> Path:
    """WORKDIR of one uninterrupted run of configs/tiny.py with FLAGS, made once per session."""
    workdir = Path(base) / "reference"
    out = run_main(workdir, *FLAGS, cache=cache)
    assert out.returncode == 0, out.log[-4000:]
    assert ckpt_steps(workdir)[-1] == 20
    return workdir


def session_cache(pytestconfig, tmp_path_factory) -> str:
    """The compilation cache of the subprocesses: kept across sessions in pytest's cache."""
    if getattr(pytestconfig, "cache", None) is not None:
        return str(pytestconfig.cache.mkdir("jax-compilation-cache"))
    return str(tmp_path_factory.getbasetemp() / "jax-cache")


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
    s = loop_lib.EarlyStopping("auc", loop_lib.metric_mode("auc", "auto"), patience=2)
    assert [s.update(t, v) for t, v in ((1, 0.6), (2, 0.7), (3, 0.7), (4, float("nan")))] == [
        True, True, False, False]  # fmt: skip
    assert s.stopped and (s.best, s.best_step) == (0.7, 2)
    assert loop_lib.metric_mode("logloss/buy", "auto") == "min"
    assert loop_lib.metric_mode("logloss", "max") == "max"
    never = loop_lib.EarlyStopping("logloss", "min", patience=0)
    assert not any(never.update(t, 1.0 + t) and never.stopped for t in range(10))
    config = helpers.tiny_config()
    with pytest.raises(ConfigError, match="early_stop_metric.*'aucc'"):
        config.loop.early_stop_metric = "aucc"
        loop_lib.check_config(config.loop, ("pv", "buy"))
    config.loop.early_stop_metric = "auc/buy"
    loop_lib.check_config(config.loop, ("pv", "buy"))


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
