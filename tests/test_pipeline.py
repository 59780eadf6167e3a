"""Input pipeline: determinism, epoch coverage, process sharding, eval padding, resumable state."""

import json
import os
import re
import shutil

import numpy as np
import pytest

from influence_jax.data import pipeline, synthetic
from influence_jax.data.schema import DataError
from influence_jax.data.store import ExampleStore
from tests import helpers


def _rows(batch):
    return [tuple(r) for r in batch["hist"].reshape(len(batch["hist"]), -1)]


def test_train_batches_cover_an_epoch_and_are_deterministic(tiny_data):
    schema, path = tiny_data
    store = ExampleStore(path, "train", schema)
    a = pipeline.TrainBatches(store, 64, seed=3, num_batches=100)
    b = pipeline.TrainBatches(store, 64, seed=3, num_batches=100)
    assert a.per_epoch == len(store) // 64
    seen = np.concatenate([a[s]["label"] for s in range(a.per_epoch)])
    assert len(seen) == a.per_epoch * 64
    for s in (0, 5, a.per_epoch, a.per_epoch + 7):
        for k in ("user", "item", "hist", "label"):
            np.testing.assert_array_equal(a[s][k], b[s][k])
    # A new epoch is a new permutation.
    assert _rows(a[0]) != _rows(a[a.per_epoch])


def test_processes_get_disjoint_halves_of_each_global_batch(tiny_data):
    schema, path = tiny_data
    store = ExampleStore(path, "train", schema)
    whole = pipeline.TrainBatches(store, 64, seed=1, num_batches=10)
    parts = [
        pipeline.TrainBatches(store, 64, seed=1, num_batches=10, process_index=p, process_count=2)
        for p in range(2)
    ]
    for s in (0, 4):
        halves = [p[s] for p in parts]
        assert all(len(h["label"]) == 32 for h in halves)
        assert sorted(_rows(halves[0]) + _rows(halves[1])) == sorted(_rows(whole[s]))


def test_eval_batches_score_every_example_once(tiny_data):
    schema, path = tiny_data
    store = ExampleStore(path, "valid", schema)
    ev = pipeline.EvalBatches(store, 96)
    batches = [ev[s] for s in range(len(ev))]
    weights = np.concatenate([b["weight"] for b in batches])
    assert weights.sum() == len(store) and len(weights) == len(ev) * 96
    got = np.concatenate([b["timestamp"] * 0 + b["user_key"] for b in batches])[weights > 0]
    np.testing.assert_array_equal(got, store.column("user_key"))


@pytest.mark.parametrize("use_grain", [True, False])
def test_iterator_state_resumes_at_the_same_batch(tiny_data, monkeypatch, use_grain):
    if not use_grain:
        monkeypatch.setattr(pipeline, "grain", None)
    schema, path = tiny_data
    source = pipeline.TrainBatches(ExampleStore(path, "train", schema), 64, seed=0, num_batches=12)
    it = pipeline.BatchIterator(source, prefetch=3, num_threads=2)
    first = [next(it) for _ in range(5)]
    state = it.get_state()
    assert state == {"next_batch": 5}
    rest = [b["label"] for b in it]
    it2 = pipeline.BatchIterator(source, prefetch=2, num_threads=1)
    it2.set_state(state)
    rest2 = [b["label"] for b in it2]
    assert len(rest) == len(rest2) == 7
    for x, y in zip(rest, rest2, strict=True):
        np.testing.assert_array_equal(x, y)
    np.testing.assert_array_equal(first[0]["label"], source[0]["label"])


def test_too_small_split_is_a_clear_error(tiny_data):
    schema, path = tiny_data
    with pytest.raises(DataError, match="fewer than one global batch"):
        pipeline.TrainBatches(ExampleStore(path, "valid", schema), 4096, seed=0, num_batches=1)


@pytest.mark.parametrize("column", ["item", "hist", "label"])
def test_an_id_outside_its_vocabulary_names_row_and_field(tiny_data, tmp_path, column):
    """A damaged or hand-edited split: the lookup would clamp the id silently (and a NaN label
    gave NaN metrics, or a loss error blaming the learning rate)."""
    schema, path = tiny_data
    if column == "item":
        at = (5, 0)  # one past the vocabulary
        value = schema.vocab_sizes["item_id"]
        want = r"valid: row 5: item field 'item_id' holds id \d+, outside vocabulary 'item_id'"
    elif column == "hist":
        at, value = (3, 2, schema.hist_index("behaviour")), -1
        want = r"valid: row 3, event 2: hist field 'behaviour' holds id -1"
    else:
        at, value = 7, np.nan
        want = r"valid: row 7: label is nan, not 0 or 1"
    damage = lambda ids: ids.__setitem__(at, value)
    copy = helpers.damaged_copy(path, tmp_path / "data", schema, "valid", column, damage)
    batches = pipeline.EvalBatches(ExampleStore(copy, "valid", schema), 16)
    assert len(batches[1]["label"]) == 16  # rows 16-31 are whole
    with pytest.raises(DataError, match=want + r".*prepare it again"):
        batches[0]  # noqa: B018


@pytest.mark.parametrize("damage", ["empty-npy", "short-column", "split-without-rows"])
def test_a_damaged_split_is_one_error_naming_it(tiny_data, tmp_path, damage):
    schema, path = tiny_data
    copy = tmp_path / "data"
    shutil.copytree(path, copy)
    shard = os.path.join(copy, schema.splits["valid"]["shards"][0])
    if damage == "empty-npy":
        open(os.path.join(shard, "item.npy"), "w").close()
        want = rf"{re.escape(shard)}: cannot read shard \(No data left in file\)"
    elif damage == "short-column":
        np.save(os.path.join(shard, "user.npy"), np.load(os.path.join(shard, "user.npy"))[:-1])
        want = rf"{re.escape(shard)}: the columns' row counts differ .*the shard is damaged"
    else:
        d = json.loads((copy / "schema.json").read_text())
        del d["splits"]["valid"]["rows"]
        (copy / "schema.json").write_text(json.dumps(d))
        want = r"schema.json: splits.valid: needs 'rows' \(a count\) and 'shards'"
    with pytest.raises(DataError, match=want):
        ExampleStore(str(copy), "valid")


def test_synthetic_same_seed_same_data_and_planted_weights(tmp_path):
    cfg = helpers.tiny_config().data.synthetic
    a = synthetic.generate(cfg, str(tmp_path / "a"))
    synthetic.generate(cfg, str(tmp_path / "b"))
    for split in ("train", "test"):
        x, y = ExampleStore(str(tmp_path / "a"), split), ExampleStore(str(tmp_path / "b"), split)
        for k in ("user", "item", "hist", "label"):
            np.testing.assert_array_equal(x.column(k), y.column(k))
    assert a.extra["planted"]["behaviour_type_weights"] == dict(cfg.type_weights)
    norm = a.extra["planted"]["behaviour_type_weights_normalised"]
    assert sum(norm.values()) == pytest.approx(1.0)
    assert a.behaviour_types == ("pv", "cart", "fav", "buy")
    # Labels really depend on the planted history signal: matching history raises the rate.
    s = ExampleStore(str(tmp_path / "a"), "train")
    hist, item, label = s.column("hist"), s.column("item"), s.column("label")
    match = (hist[..., 1] == item[:, None, 1]).sum(1)
    assert label[match >= 3].mean() > label[match == 0].mean() + 0.05
