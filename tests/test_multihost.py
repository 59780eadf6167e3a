"""Two local processes x 4 fake CPU devices (CPU collectives) train like one process with 8."""

from __future__ import annotations

import glob
import re
import socket

import jax
import numpy as np
import pytest

from influence_jax.data import pipeline
from influence_jax.data.schema import Schema
from influence_jax.data.store import ExampleStore
from tests.helpers import (
    FLAGS,
    ckpt_steps,
    finish,
    load_state,
    scalars,
    start,
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_batches_independent_of_process_count(data_dir) -> bool:
    """Whether processes 0 and 1 of 2 together read global batch 0 exactly as one process does."""
    store = ExampleStore(str(data_dir), "train", Schema.load(str(data_dir)))
    one = pipeline.TrainBatches(store, 64, seed=0, num_batches=1)[0]
    two = [pipeline.TrainBatches(store, 64, 0, 1, p, 2)[0] for p in (0, 1)]
    return all(np.array_equal(one[k], np.concatenate([two[0][k], two[1][k]])) for k in one)


def _final_metrics(log: str) -> str:
    (line,) = re.findall(r"^final test metrics at .*$", log, re.M)
    return line


def _train_in_two_processes(workdir, overrides: tuple[str, ...], cache: str) -> list:
    """The training command as 2 JAX processes of 4 CPU devices each, in one workdir (Orbax
    coordinates the checkpoint writes); each one's Finished, after checking it succeeded."""
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
    procs = [
        start(
            workdir, *overrides, cache=cache, devices=4, tag=f"-{i}", JAX_PROCESS_ID=str(i), **env
        )
        for i in range(2)
    ]
    try:
        outs = [finish(proc, log, timeout=400) for proc, log in procs]
    finally:
        for proc, _ in procs:
            if proc.poll() is None:
                proc.kill()
    for out in outs:
        assert out.returncode == 0, out.log[-4000:]
        assert "2 processes" in out.log or "Connecting to JAX distributed service" in out.log
    return outs


@pytest.mark.slow  # a 2-process training (about 45 s): the slow tier; ranking's stays default
def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path, jax_cache, reference):
    workdir = tmp_path / "run"
    outs = _train_in_two_processes(workdir, FLAGS, jax_cache)

    # Only process 0 writes metrics; both evaluate the same test split to the same numbers.
    assert len(glob.glob(str(workdir / "events.out.tfevents.*"))) == 1
    assert _final_metrics(outs[0].log) == _final_metrics(outs[1].log)

    assert ckpt_steps(workdir) == ckpt_steps(reference)  # every process took part in saving
    ours, ref = scalars(workdir), scalars(reference)
    assert [s for s, _ in ours["train/loss"]] == [5, 10, 15, 20]
    ours_loss, ref_loss = [v for _, v in ours["train/loss"]], [v for _, v in ref["train/loss"]]
    # Same rows in the same order per global batch, so dropout hits the same rows.
    assert _global_batches_independent_of_process_count(reference / "data")
    np.testing.assert_allclose(ours_loss, ref_loss, rtol=1e-5)
    np.testing.assert_allclose(ours["valid/auc"][-1][1], ref["valid/auc"][-1][1], atol=1e-4)

    mine, theirs = load_state(workdir, 20), load_state(reference, 20)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), mine, theirs
    )


# tools/rank.py run with BlockStore.save raising Ctrl-C once block 1 is kept (as a kill after
# the second block), in each process alike: the blocks are global rounds, so both stop there.
_RANK_STOPPED_AFTER_BLOCK_1 = """
import runpy, sys
from influence_jax.ranking import progress
real = progress.BlockStore.save
def save(self, i, kept):
    real(self, i, kept)
    if i == 1:
        raise KeyboardInterrupt
progress.BlockStore.save = save
sys.argv[0] = "tools/rank.py"
runpy.run_path("tools/rank.py", run_name="__main__")
"""


def _rank_in_two_processes(args: list[str], stop_after_block_1: bool = False) -> list[tuple]:
    """tools/rank.py `args` as 2 JAX processes of 4 CPU devices each; (returncode, stdout,
    stderr) of each."""
    import os
    import subprocess
    import sys

    from tests.helpers import ROOT

    env = dict(
        os.environ,
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
        JAX_NUM_PROCESSES="2",
        XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4",
    )
    if stop_after_block_1:
        cmd = [sys.executable, "-c", _RANK_STOPPED_AFTER_BLOCK_1, *args]
    else:
        cmd = [sys.executable, os.path.join(ROOT, "tools", "rank.py"), *args]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=dict(env, JAX_PROCESS_ID=str(i)),
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )  # fmt: skip
        for i in range(2)
    ]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    return [(p.returncode, *r) for p, r in zip(procs, results, strict=True)]


def test_two_processes_rank_every_user_once_like_one_process(run_dir, tmp_path):
    """rank.py under JAX's multi-process runtime: each of 2 processes ranks every other user
    (retrieval tables from every user) and writes its own part file; the folder read as one
    Parquet table equals a 1-process run's file."""
    import os

    import pyarrow.parquet as pq

    from tests.helpers import run_tool

    args = [f"--workdir={run_dir}", "--top_k=5", "--retrieve_n=30"]
    one = run_tool("rank", *args, f"--output={tmp_path / 'one.parquet'}", timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    out = tmp_path / "parts"
    results = _rank_in_two_processes([*args, f"--output={out}"])
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    assert sorted(os.listdir(out)) == ["part-00000.parquet", "part-00001.parquet"]
    assert "process 0 of 2: ranked" in results[0][1] and "process 1 of 2: ranked" in results[1][1]
    # Each process counts the retrieval tables over every user (it said 179/90 users, 199 %).
    counted = re.findall(r"counted (\d+)/(\d+) users", results[0][1] + results[0][2])
    assert counted and all(a == b for a, b in counted), counted
    parts = [pq.read_table(out / f).to_pydict() for f in sorted(os.listdir(out))]
    assert not set(parts[0]["user_id"]) & set(parts[1]["user_id"])  # each user in one part
    order = [("user_id", "ascending"), ("rank", "ascending")]
    both = pq.read_table(out).sort_by(order).to_pydict()  # the folder as one table
    ref = pq.read_table(tmp_path / "one.parquet").sort_by(order).to_pydict()
    for k in ("user_id", "rank", "item_id"):
        assert both[k] == ref[k]
    np.testing.assert_allclose(both["score"], ref["score"], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # three 2-process rankings
def test_two_processes_resume_a_stopped_ranking_whatever_blocks_each_kept(run_dir, tmp_path):
    """A 2-process ranking stopped after two blocks, with process 1's second block lost (as
    when a kill came between the two processes' writes), run again: process 0 takes part in
    that block's round with no pairs, process 1 scores it, and the parts equal an
    uninterrupted run's."""
    import os

    import pyarrow.parquet as pq

    # Every user scores the 30 most frequent items: 90 users, 20 a block, 3 blocks a process.
    args = [f"--workdir={run_dir}", "--top_k=5", "--max_items=30", "--block_pairs=600"]
    whole = tmp_path / "whole"
    for code, _, stderr in _rank_in_two_processes([*args, f"--output={whole}"]):
        assert code == 0, stderr[-3000:]
    out = tmp_path / "parts"
    for code, _, stderr in _rank_in_two_processes([*args, f"--output={out}"], True):
        assert code == 130 and "interrupted" in stderr, stderr[-3000:]
    kept = tmp_path / "parts.progress"
    blocks = sorted(n for n in os.listdir(kept) if "-block-" in n)
    assert blocks == [f"p00{p}-block-00000{i}.npz" for p in (0, 1) for i in (0, 1)], blocks
    os.remove(kept / "p001-block-000001.npz")
    results = _rank_in_two_processes([*args, f"--output={out}"])
    for code, _, stderr in results:
        assert code == 0, stderr[-3000:]
    assert "resuming: 2 blocks already scored" in results[0][1] + results[0][2]
    assert "resuming: 1 block already scored" in results[1][1] + results[1][2]
    assert not kept.exists()
    for part in ("part-00000.parquet", "part-00001.parquet"):
        assert pq.read_table(out / part).to_pydict() == pq.read_table(whole / part).to_pydict()


@pytest.mark.slow  # a 2-process training
def test_two_processes_fill_the_rate_tables_alike(tmp_path, jax_cache):
    """Each process counts the train split itself and places the counts in the global (here
    replicated) tables: the run's checkpoint holds the whole split's counts, sparse tables on."""
    from influence_jax import scoring
    from influence_jax.models.extractors import id_fields, train_rate_tables

    workdir = tmp_path / "run"
    over = ('--config.model.extractors=("din","cnn","rates")', "--config.loop.num_steps=4",
            "--config.loop.eval_every=0", "--config.ckpt.every=4",
            "--config.opt.sparse_min_rows=100")  # fmt: skip
    _train_in_two_processes(workdir, over, jax_cache)
    run = scoring.load_run(str(workdir))
    store = ExampleStore(run.data_path, "train", run.schema)
    want = train_rate_tables(
        id_fields(run.schema), *(store.column(k) for k in ("user", "item", "label"))
    )
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(run.params["rates"][name]), value)
