"""The parameters' moving average (config.opt.ema_decay): what the step averages, what evaluation,
checkpoint selection and ranking read, and that a resumed run ends with the same average."""

import dataclasses

import jax
import numpy as np
import pytest

from influence_jax import checkpoint, config_check, engine, evaluation, loop, optim, scoring, train
from influence_jax.errors import ConfigError, DataError
from tests import helpers


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }


def test_the_average_is_the_bias_corrected_moving_average():
    d = 0.99
    got = [float(optim.average_decay(d, np.int32(t))) for t in (0, 1, 10_000)]
    np.testing.assert_allclose(got, [0.0, d / (1 + d), d], rtol=1e-6)
    # Step by step it is sum_s d^(t-s) p_s / sum_s d^(t-s), near 1 too (float32 throughout).
    rng = np.random.default_rng(0)
    for d in (0.9, 0.9999):
        ps = rng.normal(size=(30, 3)).astype(np.float32)
        avg = {"w": np.zeros(3, np.float32)}
        for t, p in enumerate(ps):
            avg = optim.update_average(avg, {"w": p}, np.int32(t), d)
        w = d ** np.arange(29, -1, -1)
        np.testing.assert_allclose(avg["w"], w @ ps / w.sum(), rtol=1e-5, atol=1e-6)


def test_a_dense_step_moves_the_average_and_evaluation_reads_it(tiny_data):
    schema, path = tiny_data
    batch = helpers.first_batch(schema, path, 64)
    on = helpers.tiny_config(**{"opt.ema_decay": 0.9, "opt.sparse_embeddings": False})
    eng, state0 = helpers.setup(on, schema, jax.devices()[:1])
    helpers.assert_trees_equal(state0.ema, state0.params)  # it starts at the initial params
    state1, _ = eng.train_step(state0, batch)
    state2, _ = eng.train_step(state1, batch)
    # After two steps: (0.9 p1 + p2) / 1.9; the initial parameters have no weight.
    p0, p1, p2 = (_leaves(s.params) for s in (state0, state1, state2))
    want = {k: (0.9 * p1[k] + p2[k]) / 1.9 for k in p0}
    got = _leaves(state2.ema)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-7, err_msg=k)
    moved = [k for k in p0 if not np.array_equal(p2[k], p0[k])]
    assert moved and any(not np.allclose(got[k], p2[k]) for k in moved)
    helpers.assert_trees_equal(state2.eval_params(), state2.ema)
    # Averaging changes no trained parameter: the same steps without it give the same params
    # (to rounding: the average's ops change XLA's fusions, under the tests' fast-compiling
    # flags by up to 3e-8 here; bit for bit with XLA's default flags).
    off = helpers.tiny_config(**{"opt.sparse_embeddings": False})
    eng_off, s = helpers.setup(off, schema, jax.devices()[:1])
    assert s.ema is None
    for _ in range(2):
        s, _ = eng_off.train_step(s, batch)
    helpers.assert_trees_close(s.params, state2.params, rtol=1e-6, atol=1e-7)
    assert s.eval_params() is s.params


def test_a_sparse_step_averages_the_dense_params_and_reads_the_tables_as_trained(tiny_data):
    schema, path = tiny_data
    batch = helpers.first_batch(schema, path, 64)
    config = helpers.tiny_config(**{"opt.ema_decay": 0.9, "opt.sparse_min_rows": 100})
    eng, state = helpers.setup(config, schema)
    assert set(eng.sparse_vocabs) == {"user_id", "item_id"}
    assert set(state.ema["embeddings"]) == set(state.params["embeddings"]) - {
        "embed_user_id",
        "embed_item_id",
    }  # no second copy of a large table
    for _ in range(3):
        state, _ = eng.train_step(state, batch)
    ev = state.eval_params()
    for name in ("embed_user_id", "embed_item_id"):
        np.testing.assert_array_equal(ev["embeddings"][name], state.params["embeddings"][name])
    dense = _leaves(optim.with_average(state.params, state.ema))
    raw, avg = _leaves(state.params), _leaves(state.ema)
    assert all(np.array_equal(dense[k], avg[k]) for k in avg)
    assert any(not np.array_equal(avg[k], raw[k]) for k in avg)


def test_tables_of_counts_are_copied_not_averaged():
    params = {"rates": {"frozen_rate": np.float32(0.3), "w": np.float32(1.0)}}
    average = {"rates": {"frozen_rate": np.float32(0.0), "w": np.float32(0.0)}}
    new = optim.update_average(average, params, np.int32(100), 0.5)
    assert float(new["rates"]["frozen_rate"]) == np.float32(0.3)
    assert float(new["rates"]["w"]) == 0.5
    # Evaluation reads the trained tables even from an average that holds stale ones.
    ev = optim.with_average(params, average)
    assert float(ev["rates"]["frozen_rate"]) == np.float32(0.3) and float(ev["rates"]["w"]) == 0


def test_a_decay_outside_zero_to_one_names_the_field():
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match=r"config\.opt\.ema_decay: must be in \[0, 1\)"):
            config_check.check(helpers.tiny_config(**{"opt.ema_decay": bad}))


class _StopAt(loop.Preemption):
    """A preemption notice at step `at` (as SIGTERM would give)."""

    def __init__(self, at: int):
        super().__init__()
        self.at = at

    def should_stop(self, step: int) -> bool:
        self.requested = self.requested or step >= self.at
        return self.requested


def test_checkpoints_keep_the_average_ranking_reads_it_and_a_resume_ends_the_same(
    tmp_path, tmp_path_factory
):
    config = helpers.tiny_config(
        **{"opt.ema_decay": 0.9, "opt.sparse_min_rows": 100, "mesh.data": 4, "mesh.model": 2,
           "mesh.shard_embeddings": True, "mesh.shard_min_rows": 100}
    )  # fmt: skip
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    result = train.train_and_evaluate(config, whole)
    stop = _StopAt(10)
    train.train_and_evaluate(config, split, stop)
    assert stop.requested and helpers.ckpt_steps(split) == [10]
    resumed = train.train_and_evaluate(config, split)
    a, b = helpers.load_state(whole, 20), helpers.load_state(split, 20)
    assert "ema" in a
    helpers.assert_trees_equal(a, b)  # the average included, bit for bit
    assert resumed["test/auc"] == result["test/auc"]

    # What ranking, evaluation and reports restore is the average (tables as trained).
    run = scoring.load_run(whole)
    want = _leaves(a["params"])
    want.update(_leaves(a["ema"]))
    got = _leaves(run.params)
    assert set(got) == set(want) and run.step == 20
    for k in got:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert any(not np.array_equal(want[k], v) for k, v in _leaves(a["params"]).items())
    # The run's final test metrics are the best step's average's, as `evaluate` gives them.
    assert checkpoint.read_best(whole)["step"] == 20
    assert evaluation.evaluate_run(run, "test")["auc"] == result["test/auc"]
    raw = dataclasses.replace(run, params=jax.device_put(a["params"], run.engine.param_shardings))
    assert evaluation.evaluate_run(raw, "test")["auc"] != result["test/auc"]

    # A run trained without an average, read with a config that keeps one: one clear error.
    plain = helpers.trained_tiny_run(tmp_path_factory)
    schema = scoring.load_run(plain).schema
    eng = engine.setup(helpers.tiny_config(**{"opt.ema_decay": 0.9}), schema)
    with pytest.raises(DataError, match="holds no moving average"):
        checkpoint.restore_params(plain, eng.abstract_state, "latest")
