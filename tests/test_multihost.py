"""Two local processes x 4 fake CPU devices (CPU collectives) train like one process with 8."""

from __future__ import annotations

import glob
import re
import socket

import jax
import numpy as np

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


def test_two_processes_train_like_one_process_with_the_same_devices(tmp_path, jax_cache, reference):
    workdir = tmp_path / "run"  # one workdir for both: Orbax coordinates the checkpoint writes
    env = {"JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{_free_port()}", "JAX_NUM_PROCESSES": "2"}
    procs = [
        start(
            workdir, *FLAGS, cache=jax_cache, devices=4, tag=f"-{i}", JAX_PROCESS_ID=str(i), **env
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
