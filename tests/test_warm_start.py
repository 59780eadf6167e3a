"""Warm start (config.warm_start): a run on a log prepared again starts from another run's
parameters, embedding rows matched by raw id."""

import gc
import os

import jax
import numpy as np
import pytest

from influence_jax import checkpoint, config_check, engine, scoring, sparse, train, warm_start
from influence_jax.data.dataset import Dataset
from influence_jax.errors import ConfigError
from tests import helpers

BOUNDS = {"valid_start": 1070, "test_start": 1085}
# Sharded tables (rows over `model`) and the rates extractor's tables of counts, which a warm
# start must not copy (they are the new train split's).
OVER = {
    "data.source": "prepared",
    "loop.num_steps": 10,
    "model.extractors": ("din", "dnn", "cnn", "match", "rates"),
    "mesh.data": 4,
    "mesh.model": 2,
    "mesh.shard_embeddings": True,
    "mesh.shard_min_rows": 8,
}


def _logs(tmp_path):
    """Yesterday's log, and today's: without items 1-5 (the other items' ids move down) and
    with new users 31-35 and items 41-50."""
    old = helpers.random_log(30, 40, 1500, seed=0)
    kept = [ln for ln in old.splitlines() if int(ln.split(",")[1]) > 5]
    rng = np.random.default_rng(1)
    new = [
        f"{u},{i},{i % 3},pv,{t}"
        for u, i, t in zip(
            rng.integers(31, 36, 200), rng.integers(41, 51, 200), rng.integers(1000, 1100, 200),
            strict=True,
        )
    ]  # fmt: skip
    a = helpers.write(tmp_path / "a.csv", old)
    b = helpers.write(tmp_path / "b.csv", "\n".join(kept + new) + "\n")
    helpers.prepare_log(a, tmp_path / "A", **BOUNDS)
    helpers.prepare_log(b, tmp_path / "B", **BOUNDS)
    return str(tmp_path / "A"), str(tmp_path / "B")


def _config(path, **extra):
    return helpers.tiny_config(**{**OVER, "data.path": path, **extra})


def _live_bytes() -> int:
    gc.collect()  # arrays only a reference cycle still holds are garbage, not memory in use
    return sum(x.nbytes for x in jax.live_arrays())


def test_a_warm_start_copies_the_model_and_matches_embedding_rows_by_raw_id(tmp_path, monkeypatch):
    a, b = _logs(tmp_path)
    src_dir = str(tmp_path / "yesterday")
    train.train_and_evaluate(_config(a, **{"opt.ema_decay": 0.9}), src_dir)
    src = scoring.load_run(src_dir, step="best")  # its moving average, as ranking reads it

    config = _config(b, **{"warm_start.workdir": src_dir})
    dataset = Dataset(b, config.data)
    eng = engine.setup(config, dataset.schema)
    init = eng.init_state()
    # What the warm start holds on the devices before each table's copy: the new parameters
    # and what it read of the source run, not the optimizer's state as well (made after).
    # The source is read one array at a time: of its tables, only the one being copied is
    # alive then (the others not read yet, or freed once copied).
    size = lambda tree: sum(x.nbytes for x in jax.tree_util.tree_leaves(tree))
    tables = {
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(init.params)
        if warm_start.table_vocab(str(p[-1].key), dataset.schema)
    }  # fmt: skip
    held, alive, got, before = [], [], [], _live_bytes()
    row_sources, read = warm_start.row_sources, checkpoint.ParamReader.read

    def spy(*args):
        held.append(_live_bytes() - before)
        alive.append(sum(n in tables and not a.is_deleted() for n, a in got))
        return row_sources(*args)

    monkeypatch.setattr(warm_start, "row_sources", spy)
    monkeypatch.setattr(
        checkpoint.ParamReader, "read", lambda r, n: got.append((n, a := read(r, n))) or a
    )
    state = warm_start.warm_start(eng, config, dataset)
    monkeypatch.undo()
    assert len(held) == len(tables) > 1 and alive == [1] * len(tables), (held, alive)
    assert max(held) <= size(init.params) + size(src.params) + 1024, held
    # Read where the source keeps an average: one array per parameter, the counts' excepted.
    assert sorted(n for n, _ in got) == sorted(
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(src.params)
        if not str(p[-1].key).startswith("frozen_")
    )  # fmt: skip
    # The state around them has not trained: the optimizer's state and key of a fresh one.
    helpers.assert_trees_equal(state.opt_state, init.opt_state)
    np.testing.assert_array_equal(jax.random.key_data(state.rng), jax.random.key_data(init.rng))
    assert int(state.step) == 0

    new_items, old_items = dataset.id_maps, src.dataset.id_maps
    table = np.asarray(state.params["embeddings"]["embed_item_id"])
    src_table = np.asarray(src.params["embeddings"]["embed_item_id"])
    init_table = np.asarray(init.params["embeddings"]["embed_item_id"])
    raw, ok = new_items.raw("item_id", np.arange(table.shape[0]))
    moved = 0
    for idx in np.flatnonzero(ok):
        r = int(raw[idx])
        at = int(old_items.lookup("item_id", np.array([r]))[0])
        if r <= 40:  # yesterday's item: its trained row, wherever its id moved
            np.testing.assert_array_equal(table[idx], src_table[at], err_msg=f"item {r}")
            moved += at != idx
        else:  # a new item keeps its initial row
            np.testing.assert_array_equal(table[idx], init_table[idx], err_msg=f"item {r}")
    assert moved > 20  # the ids did move: a copy by position would fail above
    np.testing.assert_array_equal(table[:2], src_table[:2])  # padding and OOV rows
    assert (
        state.params["embeddings"]["embed_item_id"].sharding
        == (eng.param_shardings["embeddings"]["embed_item_id"])
    )
    # Every other parameter is the source's; the tables of counts are this run's (here still
    # the initial zeros: train.with_train_rates counts them from the new train split).
    helpers.assert_trees_equal(state.params["dnn"], src.params["dnn"])
    helpers.assert_trees_equal(state.params["rates"]["mlp"], src.params["rates"]["mlp"])
    assert state.params["rates"]["frozen_examples_item_id"].shape == (table.shape[0],)
    assert not np.asarray(state.params["rates"]["frozen_examples_item_id"]).any()

    # Through a training run; a resume reads its own checkpoint, not the source run again
    # (moved away here).
    result = train.train_and_evaluate(config, str(tmp_path / "today"))
    assert np.isfinite(result["test/logloss"])
    steps = [step for step, _ in helpers.scalars(tmp_path / "today")["valid/auc"]]
    assert steps == [0, 10]  # the warm start's own validation before the first step

    os.rename(src_dir, str(tmp_path / "moved"))
    assert (
        train.train_and_evaluate(config, str(tmp_path / "today"))["test/auc"] == result["test/auc"]
    )
    os.rename(str(tmp_path / "moved"), src_dir)
    with pytest.raises(ConfigError, match="this run's own --workdir"):
        train.train_and_evaluate(
            _config(b, **{"warm_start.workdir": str(tmp_path / "fresh")}), str(tmp_path / "fresh")
        )

    # A moving average starts at the warm parameters, not at the random ones.
    averaged = _config(b, **{"warm_start.workdir": src_dir, "opt.ema_decay": 0.9})
    eng_a = engine.setup(averaged, dataset.schema)
    warm = warm_start.warm_start(eng_a, averaged, dataset)
    helpers.assert_trees_equal(warm.eval_params(), warm.params)
    pointer = lambda x: x.addressable_shards[0].data.unsafe_buffer_pointer()
    kept = jax.tree_util.tree_leaves(sparse.without(warm.params, eng_a.sparse_vocabs))
    assert all(
        pointer(a) != pointer(b)
        for a, b in zip(kept, jax.tree_util.tree_leaves(warm.ema), strict=True)
    )  # buffers of its own: the train step donates both

    # Another model, other sizes, no such run: one error naming the field.
    other = _config(b, **{"warm_start.workdir": src_dir, "model.extractors": ("din", "dnn")})
    with pytest.raises(ConfigError, match=r"warm_start\.workdir=.*its model is not this config"):
        warm_start.warm_start(engine.setup(other, dataset.schema), other, dataset)
    wide = _config(b, **{"warm_start.workdir": src_dir, "model.embed_dim": 16})
    eng_w = engine.setup(wide, dataset.schema)
    with pytest.raises(ConfigError, match=r"parameter \[.*there and .*same model and sizes"):
        warm_start.warm_start(eng_w, wide, dataset)
    none = _config(b, **{"warm_start.workdir": str(tmp_path / "nothing")})
    with pytest.raises(ConfigError, match=r"config\.warm_start\.workdir=.*nothing"):
        warm_start.warm_start(eng, none, dataset)


def test_a_bad_warm_start_step_names_the_field():
    with pytest.raises(ConfigError, match=r"config\.warm_start\.step: 'best', 'latest' or a num"):
        config_check.check(helpers.tiny_config(**{"warm_start.step": "newest"}))
    config_check.check(helpers.tiny_config(**{"warm_start.step": "20"}))


def test_table_names_map_to_their_vocabularies(tiny_data):
    schema, _ = tiny_data
    assert warm_start.table_vocab("embed_item_id", schema) == "item_id"
    assert warm_start.table_vocab("embed_hist_item_id", schema) == "item_id"
    assert warm_start.table_vocab("kernel", schema) is None
    assert warm_start.table_vocab("embed_nothing", schema) is None


class _Ids:
    """The raw ids of one vocabulary: position i + 2 holds keys[i] (integers or strings)."""

    def __init__(self, keys):
        self.keys = list(keys)

    def keyed(self, name):
        return True

    def integer(self, name):
        return all(isinstance(k, int) for k in self.keys)

    def raw(self, name, idx):
        ok = idx >= 2
        return np.array([self.keys[i - 2] if i >= 2 else 0 for i in idx], object), ok

    def lookup(self, name, raw):
        at = {k: i + 2 for i, k in enumerate(self.keys)}
        return np.array([at.get(r.item() if hasattr(r, "item") else r, 1) for r in raw], np.int32)


class _Data:
    def __init__(self, keys):
        self.id_maps = _Ids(keys)


@pytest.mark.parametrize(
    "old, new, want",
    [
        ([5, 7, 9], [9, 5, 11], [0, 1, 4, 2, -1]),  # moved ids, a new one
        ([5, 7, 9], ["9", "x", "7"], [0, 1, 4, -1, 3]),  # integers there, strings here
        (["9", "5"], [5, 9], [0, 1, 3, 2]),  # strings there, integers here
    ],
)
def test_rows_follow_the_raw_ids_whatever_their_type(old, new, want):
    at, found = warm_start.row_sources(_Data(old), _Data(new), "v", len(old) + 2, len(new) + 2)
    np.testing.assert_array_equal(np.where(found, at, -1), want)
