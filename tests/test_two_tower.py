"""The two-tower retriever (influence_jax/retrieval/two_tower.py, tools/train_retriever.py): the
in-batch loss with logQ correction, the exact sharded top k over 8 devices, and training on a
log whose users each keep to one half of the catalogue, then retrieval through retrieve.py."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from influence_jax import retrieval
from influence_jax.data.idmaps import IdMaps
from influence_jax.data.schema import DataError, Schema
from influence_jax.retrieval import two_tower
from tests import helpers


def test_in_batch_loss_with_log_q_and_duplicates():
    rng = np.random.default_rng(0)
    u, v = rng.normal(size=(2, 5, 4)).astype(np.float32)
    item = np.array([3, 7, 3, 9, 11])  # rows 0 and 2 share an item
    log_q = np.log(np.array([0.4, 0.1, 0.4, 0.2, 0.3], np.float32))
    got = float(two_tower.in_batch_loss(u, v, item, log_q, 0.5))
    logits = u @ v.T / 0.5 - log_q[None, :]
    logits[0, 2] = logits[2, 0] = -1e9  # the same item is not a negative of itself
    want = np.mean([np.log(np.exp(logits[b]).sum()) - logits[b, b] for b in range(5)])
    assert got == pytest.approx(want, rel=1e-5)
    plain = float(two_tower.in_batch_loss(u, v, item, None, 0.5))
    assert plain != pytest.approx(got)  # the correction changes the loss
    # Groups (one per device): each row's negatives are its own group's rows only.
    u6, v6 = rng.normal(size=(2, 6, 4)).astype(np.float32)
    item6, q6 = np.array([1, 2, 3, 4, 5, 6]), np.zeros(6, np.float32)
    halves = [float(two_tower.in_batch_loss(u6[a:a + 3], v6[a:a + 3], item6[a:a + 3],
                                            q6[a:a + 3], 0.5)) for a in (0, 3)]  # fmt: skip
    grouped = float(two_tower.in_batch_loss(u6, v6, item6, q6, 0.5, groups=2))
    assert grouped == pytest.approx(np.mean(halves), rel=1e-5)


def test_sharded_top_k_equals_the_full_sort():
    assert jax.device_count() == 8
    mesh = Mesh(np.asarray(jax.devices()), (two_tower.AXIS,))
    rng = np.random.default_rng(1)
    u = rng.normal(size=(6, 8)).astype(np.float32)
    v = rng.normal(size=(64, 8)).astype(np.float32)
    ids = np.arange(64, dtype=np.int32) + 2
    ids[[5, 40]] = 0  # padding never wins
    scores, got = two_tower.sharded_top_k(mesh, 10)(u, v, ids)
    s = np.where(ids[None] >= 2, u @ v.T, -np.inf)
    order = np.argsort(-s, axis=1)[:, :10]
    np.testing.assert_array_equal(np.asarray(got), ids[order])
    np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(s, order, 1), rtol=1e-5)


def _grouped_log(n_users=40, n_items=60, per_user=30, seed=0) -> str:
    """Users keep to the items of their parity (user % 2 == item % 2), all views."""
    rng = np.random.default_rng(seed)
    rows = []
    for user in range(1, n_users + 1):
        items = rng.choice(np.arange(2 - user % 2, n_items + 1, 2), per_user)
        for t, item in zip(np.sort(rng.integers(1000, 1100, per_user)), items, strict=True):
            rows.append(f"{user},{item},{item % 5},pv,{t}\n")
    return "".join(rows)


@pytest.fixture(scope="module")
def grouped(tmp_path_factory):
    d = tmp_path_factory.mktemp("two-tower")
    data = str(d / "data")
    helpers.prepare_log(
        helpers.write(d / "log.csv", _grouped_log()), data, valid_start=1080, test_start=1090,
        target_behaviours=("pv",), neg_ratio=1, max_len=8,
    )  # fmt: skip
    r = helpers.run_tool(
        "train_retriever", f"--data={data}", f"--workdir={d / 'tt'}", "--steps=150",
        "--batch_size=64", "--dim=16", "--hidden=32", "--temperature=0.1",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return data, str(d / "tt"), r


def test_training_separates_the_halves_of_the_catalogue(grouped):
    data, tt, r = grouped
    meta = json.loads(open(f"{tt}/meta.json").read())
    losses = [loss for _, loss in meta["stats"]["losses"]]
    assert losses[-1] < losses[0] and meta["stats"]["devices"] == 8
    assert "two-tower retriever:" in r.stdout and "ex/s" in r.stderr  # progress lines
    schema = Schema.load(data)
    h = retrieval.load_histories(data, schema, "test")
    src = two_tower.TwoTowerSource(tt, data, schema)
    top = src.lists(h, 10)
    assert top.shape == (len(h), 10) and (top >= 2).all()
    maps = IdMaps(data, schema)
    user_raw = np.asarray(maps.user_raw(h.user_key), np.int64)
    item_raw = np.asarray(maps.raw("item_id", top.reshape(-1))[0], np.int64).reshape(top.shape)
    same = (item_raw % 2) == (user_raw[:, None] % 2)
    assert same.mean() > 0.8  # chance: 0.5


def helpers_state(data, schema):
    from influence_jax.data import rank_state

    return rank_state.load_state(data, schema, "test")


def test_retrieve_cli_adds_the_learned_source(grouped, tmp_path):
    data, tt, _ = grouped
    out = tmp_path / "recall.json"
    r = helpers.run_tool(
        "retrieve", f"--data={data}", f"--two_tower={tt}", "--recall", f"--recall_json={out}"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    rec = json.loads(out.read_text())["recall"]
    assert "learned" in rec and rec["learned"]["50"] > 0
    # A retriever trained on another dataset is refused by name.
    other = tmp_path / "other"
    helpers.prepare_log(
        helpers.write(tmp_path / "log.csv", helpers.random_log(10, 12, 200, seed=1)), other,
        valid_start=1060, test_start=1080,
    )  # fmt: skip
    with pytest.raises(DataError, match="the retriever was trained on"):
        two_tower.TwoTowerSource(tt, str(other), Schema.load(str(other)))
    bad = helpers.run_tool("train_retriever", f"--data={data}", f"--workdir={tmp_path / 'x'}",
                           "--temperature=0")  # fmt: skip
    assert bad.returncode != 0 and "--temperature must be > 0" in bad.stderr
    # Trained on the histories as of test: retrieving as of valid would see the future.
    schema = Schema.load(data)
    early = retrieval.load_histories(data, schema, "valid")
    with pytest.raises(DataError, match="would use events after that cut"):
        two_tower.TwoTowerSource(tt, data, schema).lists(early, 5)


def test_examples_as_pairs_are_the_real_interactions(grouped):
    data, _, _ = grouped
    schema = Schema.load(data)
    ex = two_tower.ExamplePairs(data, schema)
    sampled = np.load(f"{data}/audit/train/sampled.npy")
    assert len(ex) == (sampled == 0).sum() > 0 and (sampled == 1).any()  # negatives left out
    hp = two_tower.HistoryPairs(data, schema, "test")
    user, hist, item = hp.batch(np.arange(len(hp)))
    st = helpers_state(data, schema)
    # Pair (u, i): item = event i of u's history, its history = the events after slot i.
    k = int(np.flatnonzero(hp.i == 2)[0])
    u = hp.u[k]
    assert item[k, 0] == st.hist[u, 2, 0] and (hist[k, :3] == st.hist[u, 3:6]).all()
    n = (st.hist[..., 2] != 0).sum(1)  # events per user; pairs: all but each user's oldest
    older = np.arange(st.hist.shape[1])[None] < (n - 1)[:, None]
    item = st.hist[..., 0]
    want = older & (item >= 2) & (item < schema.table_rows("item_id"))
    assert len(hp) == int(want.sum()) > 0


def test_rank_retrieves_with_the_learned_source(grouped, tmp_path):
    from influence_jax import ranking, scoring

    data, tt, _ = grouped
    run = scoring.make_run(helpers.tiny_config(), data, workdir=str(tmp_path))
    s = ranking.rank(run, str(tmp_path / "top.parquet"), top_k=5, retrieve=12, two_tower=tt,
                     evaluate=True, log=lambda _: None)  # fmt: skip
    assert s["users"] > 0 and "learned only" in s["evaluation"]
    assert s["evaluation"]["learned only"]["users"] == s["evaluation"]["ranked"]["users"]
