"""Faults with real processes: SIGTERM saves a final checkpoint, corrupted or half-written latest
checkpoints are skipped with a warning, a NaN loss stops the run naming the step and leaves the
good checkpoints intact, a second run on a busy workdir stops naming the first; plus the
checkpointer's own refusal of NaN and checksum check, and the workdir lock's take-over of a lock
left by a killed run."""

from __future__ import annotations

import gc
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from influence_jax import checkpoint as ckpt_lib
from influence_jax import train, workdir_lock, xla_options
from influence_jax.errors import ConfigError, DataError, WorkdirInUseError
from tests.helpers import (
    FLAGS,
    USUAL_COMPILE,
    assert_trees_equal,
    ckpt_steps,
    finish,
    load_state,
    run_main,
    start,
    tiny_config,
    wait_for,
)


def test_sigterm_saves_the_step_reached_and_the_rerun_finishes(tmp_path, jax_cache, reference):
    """SIGTERM: a checkpoint at the step reached, exit --preempted_exit_code (for a scheduler
    that restarts only failed jobs) with one line; the same command finishes the run."""
    workdir = tmp_path / "run"
    proc, log = start(workdir, *FLAGS, "--preempted_exit_code=75", cache=jax_cache)
    wait_for(lambda: (workdir / "checkpoints" / "5").is_dir(), proc, log)
    proc.send_signal(signal.SIGTERM)
    out = finish(proc, log)
    assert out.returncode == 75, out.log[-4000:]
    assert "stopped by SIGTERM at a saved checkpoint; the same command resumes" in out.log
    saved = re.findall(r"SIGTERM received: saved checkpoint at step (\d+)", out.log)
    assert saved, out.log[-4000:]
    step = int(saved[0])
    assert 5 <= step < 20 and ckpt_steps(workdir)[-1] == step
    with open(workdir / "checkpoints" / str(step) / "data" / "metadata") as f:
        assert json.load(f)["next_batch"] == step
    assert "final test metrics" not in out.log

    again = run_main(workdir, *FLAGS, cache=jax_cache)
    assert again.returncode == 0, again.log[-4000:]
    assert f"resumed from checkpoint step {step} " in again.log
    assert_trees_equal(load_state(workdir, 20), load_state(reference, 20))


def _replace_state(checkpoints, step: int, by: int) -> None:
    """Silent corruption that Orbax reads back without complaint, only the checksums saved with
    the checkpoint notice: the arrays of `step` replaced by the well-formed ones of step `by`.
    (Bytes flipped inside Orbax's zstd-compressed data decode or fail depending on where they
    land, which varies with the CPU that computed the values.)"""
    shutil.rmtree(checkpoints / str(step) / "state")
    shutil.copytree(checkpoints / str(by) / "state", checkpoints / str(step) / "state")


def test_corrupted_and_half_written_latest_checkpoints_fall_back(tmp_path, jax_cache, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    assert ckpt_steps(workdir) == [10, 15, 20]
    _replace_state(workdir / "checkpoints", 20, 10)  # step 20: read back without complaint
    # Step 15: its JSON item cut short, as by a writer killed mid-file.
    meta = workdir / "checkpoints" / "15" / "data" / "metadata"
    meta.write_text(meta.read_text()[:20])

    out = run_main(workdir, *FLAGS, cache=jax_cache)
    assert out.returncode == 0, out.log[-4000:]
    unusable = "\n".join(line for line in out.log.splitlines() if "unusable" in line)
    assert re.search(
        r"checkpoint step 20 .* unusable \(CheckpointError: checksum mismatch", unusable
    ), unusable or out.log[-4000:]
    assert re.search(r"checkpoint step 15 .* unusable", unusable), unusable
    assert "resumed from checkpoint step 10 " in out.log
    assert ckpt_steps(workdir)[-1] == 20
    assert_trees_equal(load_state(workdir, 20), load_state(reference, 20))


# Orbax's reads that failed leave futures whose errors surface at garbage collection.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.filterwarnings("ignore:coroutine .* was never awaited:RuntimeWarning")
def test_a_damaged_checkpoint_read_for_scoring_is_one_error_naming_it(tmp_path, reference):
    """Checkpoint files cut short (a copy interrupted, a full disk): loading the run to score
    it (scoring.load_run: ranking, reports, evaluate) says which step is damaged and what to
    do, whether every file is cut (step 20) or only the arrays' bytes (step 15); another step
    still loads."""
    from influence_jax import scoring

    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step, pattern in ((20, "**/*"), (15, "ocdbt.process_0/d/*")):
        state = workdir / "checkpoints" / str(step) / "state"
        cut = [p for p in state.glob(pattern) if p.is_file() and p.stat().st_size > 10]
        assert cut
        for p in cut:
            os.truncate(p, 10)
        with pytest.raises(DataError, match=rf"checkpoints/{step}: cannot read the .* damaged"):
            scoring.load_run(str(workdir), step=step)
    assert scoring.load_run(str(workdir), step=10).step == 10
    gc.collect()  # the failed reads' futures, here, under this test's warning filter


def test_a_damaged_config_json_is_one_error_naming_it(tmp_path, reference):
    from influence_jax import scoring

    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir, ignore=shutil.ignore_patterns("checkpoints"))
    config = workdir / "config.json"
    config.write_text(config.read_text()[:300])
    with pytest.raises(DataError, match=r"config.json: not valid JSON \(.* at line \d+ column"):
        scoring.load_run(str(workdir))
    # Valid JSON that is not a config (another tool's output written over it): one line too.
    for text, missing in (('{"step": 20, "metrics": {}}', "data"), ("[1]", "a JSON list")):
        config.write_text(text)
        with pytest.raises(DataError, match=rf"config.json: not a run's config \(.*{missing}"):
            scoring.load_run(str(workdir))
    config.write_text('{"data": {"source": "prepared"}, "model": {"name": "ranker"}}')
    with pytest.raises(DataError, match=r"no data.path; its keys: \['data', 'model'\]"):
        scoring.load_run(str(workdir))


def test_nan_loss_stops_naming_the_step_and_keeps_good_checkpoints(tmp_path, jax_cache, reference):
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir)
    for step in (15, 20):
        shutil.rmtree(workdir / "checkpoints" / str(step))
    # The resumed run diverges: a learning rate of 1e30 from step 11 on (Adam steps by about
    # the learning rate) makes the parameters huge and the next loss non-finite. (NaN labels,
    # this test's trigger before, are now refused by the loader as a damaged dataset.)
    out = run_main(workdir, *FLAGS, "--config.opt.learning_rate=1e30", cache=jax_cache)
    assert out.returncode != 0
    assert re.search(
        r"training stopped: non-finite loss \((nan|inf)\) at step 1[12]; the last good "
        r"checkpoint \(step 10\)",
        out.log,
    ), out.log[-4000:]
    assert ckpt_steps(workdir) == [10]
    kept = load_state(workdir, 10)
    assert all(np.isfinite(x).all() for x in _float_leaves(kept))
    assert_trees_equal(kept, load_state(reference, 10))


def _float_leaves(tree):
    return [x for x in jax.tree_util.tree_leaves(tree) if np.issubdtype(x.dtype, np.floating)]


def _ckpt_cfg(**kw):
    return ml_collections.ConfigDict(dict(dict(max_to_keep=2, async_save=False), **kw))


def test_checkpointer_refuses_nan_state_and_verifies_checksums(tmp_path):
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "run"), _ckpt_cfg())
    good = {"w": jnp.arange(1 << 16, dtype=jnp.float32).reshape(256, 256), "step": jnp.int32(3)}
    with pytest.raises(ckpt_lib.CheckpointError, match=r"step 1: not saved .*\['w'\]"):
        ckpt.save(1, {"w": jnp.array([1.0, jnp.inf]), "step": jnp.int32(1)}, {"next_batch": 1})
    assert ckpt.all_steps() == []
    ckpt.save(3, good, {"next_batch": 3})
    ckpt.save(4, {"w": good["w"] + 1, "step": good["step"]}, {"next_batch": 4})
    ckpt.close()

    _replace_state(tmp_path / "run" / "checkpoints", 4, 3)  # w of step 3 read back as step 4's
    ckpt = ckpt_lib.Checkpointer(str(tmp_path / "run"), _ckpt_cfg())
    with pytest.raises(ckpt_lib.CheckpointError, match=r"checksum mismatch in \['w'\]"):
        ckpt._restore_verified(good, 4)
    state, data, step = ckpt.restore(good)
    assert step == 3 and data == {"next_batch": 3}
    np.testing.assert_array_equal(state["w"], good["w"])
    assert ckpt.all_steps() == [3]  # the unusable step is gone, so step 4 can be saved again
    ckpt.close()


def test_checksums_are_the_same_whether_compiled_fast_or_as_usual():
    rng = np.random.default_rng(0)
    tree = {
        "w": jnp.asarray(rng.normal(size=(300, 70)), jnp.float32),
        "b": jnp.asarray(rng.normal(size=(7,)), jnp.bfloat16),
        "n": jnp.asarray(rng.integers(-9, 9, size=(5, 3)), jnp.int32),
        "key": jax.random.key(3),
    }
    leaves = jax.tree_util.tree_leaves(tree)
    fast = tuple(sorted(xla_options.FAST_COMPILE.items()))
    usual = tuple(sorted(USUAL_COMPILE.items()))
    sums = {
        o: [int(x) for x, _ in jax.device_get(ckpt_lib._digest_fn(None, o)(leaves))]
        for o in (fast, usual)
    }
    digest, bad = ckpt_lib.tree_digest(tree)  # small, on CPU: compiled fast
    assert sums[fast] == sums[usual] == digest and bad == [] and len(set(digest)) == 4


def test_a_second_run_on_a_locked_workdir_stops_at_once_naming_the_holder(tmp_path, jax_cache):
    workdir = tmp_path / "run"
    workdir.mkdir()
    with workdir_lock.hold(ckpt_lib.lock_path(str(workdir))):
        out = run_main(workdir, *FLAGS, cache=jax_cache)
    assert out.returncode != 0
    assert "Traceback" not in out.log, out.log[-4000:]
    (line,) = [ln for ln in out.log.splitlines() if "is in use" in ln]
    assert line.startswith(f"error: --workdir={workdir} is in use by another training run"), line
    assert f"pid {os.getpid()} on host {socket.gethostname()}, started " in line
    assert "command: " in line and "wait for it, or stop it" in line
    assert not (workdir / "checkpoints").exists() and not list(workdir.glob("events.out.*"))
    assert not (workdir / "train.lock").exists()  # released by the holder, not left by the run


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_lock_left_by_a_killed_run_is_taken_over_and_released_at_the_end(tmp_path, caplog):
    workdir = tmp_path / "run"
    workdir.mkdir()
    lock = ckpt_lib.lock_path(str(workdir))
    pid = _dead_pid()
    holder = {"host": socket.gethostname(), "pid": pid, "started": "then", "command": "x"}
    with open(lock, "w") as f:
        json.dump(holder, f)
    config = tiny_config(**{"loop.num_steps": 2, "loop.eval_every": 0, "ckpt.every": 2,
                            "loop.log_every": 1, "loop.final_eval_split": ""})  # fmt: skip
    train.train_and_evaluate(config, str(workdir))
    assert ckpt_steps(workdir) == [2]
    assert f"taking over the lock of a run that ended without releasing it (pid {pid} " in (
        caplog.text
    )
    assert not os.path.exists(lock)


def test_the_lock_is_held_during_the_run_and_released_after_an_error(tmp_path, monkeypatch):
    workdir = str(tmp_path / "run")
    lock = ckpt_lib.lock_path(workdir)

    def fake_run(config, workdir, preempt):
        with open(lock) as f:
            assert json.load(f)["pid"] == os.getpid()
        with pytest.raises(WorkdirInUseError, match=f"pid {os.getpid()} on host"):
            with workdir_lock.hold(lock):
                pass
        raise RuntimeError("boom")

    monkeypatch.setattr(train, "_train_and_evaluate", fake_run)
    with pytest.raises(RuntimeError, match="boom"):
        train.train_and_evaluate(tiny_config(), workdir)
    assert not os.path.exists(lock)
    with workdir_lock.hold(lock):  # free again
        pass


def test_a_record_from_another_host_is_trusted_until_its_heartbeat_is_stale(tmp_path):
    lock = str(tmp_path / "train.lock")
    with open(lock, "w") as f:
        json.dump({"host": "elsewhere", "pid": 1, "started": "then", "command": "x"}, f)
    with pytest.raises(WorkdirInUseError, match=r"another host \(pid 1 on host elsewhere.*delete"):
        with workdir_lock.hold(lock):
            pass
    assert os.path.exists(lock)  # another host's record stays
    old = os.path.getmtime(lock) - workdir_lock.STALE_S - 1
    os.utime(lock, (old, old))
    with workdir_lock.hold(lock):
        with open(lock) as f:
            assert json.load(f)["host"] == socket.gethostname()
    assert not os.path.exists(lock)


def test_a_failed_start_leaves_the_workdir_as_it_found_it(tmp_path, jax_cache, tiny_data):
    """A start that stops on a data or config error before any checkpoint (here: a warm start
    from a run that does not exist, found after the checkpoint folder and event files are
    made) removes what it made: a new workdir is gone, an existing one keeps only its own
    files. A workdir in the dataset's folder is refused before anything is made."""
    fresh = tmp_path / "fresh"
    bad = ("--config.warm_start.workdir=" + str(tmp_path / "nowhere"),)
    out = run_main(fresh, *bad, cache=jax_cache)
    assert out.returncode != 0 and "config.warm_start.workdir=" in out.log, out.log[-2000:]
    assert not fresh.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    out = run_main(mine, *bad, cache=jax_cache)
    assert out.returncode != 0 and os.listdir(mine) == ["notes.txt"]
    # In library use too: train.train_and_evaluate removes all but the lock's folder.
    config = ml_collections.ConfigDict(tiny_config().to_dict())
    config.warm_start.workdir = str(tmp_path / "nowhere")
    with pytest.raises(ConfigError, match="config.warm_start.workdir="):
        train.train_and_evaluate(config, str(mine))
    assert os.listdir(mine) == ["notes.txt"]
    data = tiny_data[1]
    within = os.path.join(data, "run")
    out = run_main(
        Path(within), "--config.data.source=prepared", f"--config.data.path={data}",
        cache=jax_cache,
    )  # fmt: skip
    assert out.returncode != 0 and "lies in the dataset folder config.data.path=" in out.log
    assert not os.path.exists(within)
