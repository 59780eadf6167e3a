"""Candidate generation (influence_jax/retrieval, tools/retrieve.py): co-visitation counts,
recent items, merge quotas, recall, and the CLI end to end on a tiny prepared log."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from influence_jax import retrieval
from influence_jax.data.history import NO_HISTORY
from influence_jax.data.idmaps import IdMaps
from influence_jax.data.schema import DataError, Schema
from influence_jax.ranking.candidates import read_candidate_ids
from influence_jax.retrieval import covisit, sources
from tests import helpers

TYPES = ("pv", "cart", "fav", "buy")
PV, CART, FAV, BUY = range(4)
DAY = 86400
CUT = 100 * DAY
V = 20  # item ids 0..19


def hist(items, behs, ages, user_key=None) -> retrieval.Histories:
    """Histories of users given per slot (most recent first; item 0 = empty); ages in seconds
    before the cut."""
    item = np.array(items, np.int32)
    filled = item != 0
    return retrieval.Histories(
        cut="test",
        time=CUT,
        user_key=np.arange(len(item)) if user_key is None else np.array(user_key, np.int64),
        item=item,
        beh=np.where(filled, np.array(behs), -1).astype(np.int32),
        ts=np.where(filled, CUT - np.array(ages, np.int64), NO_HISTORY),
        category=None,
        behaviour_types=TYPES,
        n_items=V,
    )


def rows(table) -> dict[int, list[tuple[int, float]]]:
    out = {}
    for k in range(table.n_keys):
        it, sc = table.row(k)
        if len(it):
            out[k] = list(zip(it.tolist(), np.round(sc, 6).tolist(), strict=True))
    return out


W = retrieval.behaviour_weights(TYPES, None)  # pv 1, cart 3, fav 3, buy 5


def test_default_weights_and_unknown_names():
    assert W.tolist() == [1, 3, 3, 5]
    assert retrieval.behaviour_weights(TYPES, {"pv": 2}).tolist() == [2, 3, 3, 5]
    with pytest.raises(DataError, match=r"\['r5'\]"):
        retrieval.behaviour_weights(TYPES, {"r5": 1})


def test_covisitation_counts_equal_hand_computed_ones():
    # Slots (most recent first): 10 buy, 11 pv, 10 pv, 12 cart. A pair (a, b) adds w(b) to
    # a -> b and w(a) to b -> a. Window 2 positions: (0,1) (1,2) (2,3) (1,3); (0,2) is 10-10.
    h = hist([[10, 11, 10, 12]], [[BUY, PV, PV, CART]], [[0, 60, 120, 180]])
    cfg = covisit.CovisitConfig(window_events=2, window_seconds=0, half_life_s=0, neighbours=5)
    t = covisit.covisitation(h, W, cfg)
    assert rows(t) == {
        10: [(12, 3.0), (11, 2.0)],  # 10->11: w(slot1)=1 + w(slot1)=1; 10->12: w(cart)=3
        11: [(10, 6.0), (12, 3.0)],  # 11->10: buy 5 + pv 1
        12: [(10, 1.0), (11, 1.0)],  # ties by item id
    }
    # Window 1: only adjacent slots.
    t1 = covisit.covisitation(h, W, covisit.CovisitConfig(1, 0, 0, 5))
    assert rows(t1) == {10: [(12, 3.0), (11, 2.0)], 11: [(10, 6.0)], 12: [(10, 1.0)]}
    # Neighbours kept per item.
    assert rows(covisit.covisitation(h, W, covisit.CovisitConfig(2, 0, 0, 1)))[11] == [(10, 6.0)]


def test_covisitation_time_window_recency_and_users_add_up():
    # Slot 3 is two days older than slot 2: a one-day window drops the pairs with it.
    h = hist([[10, 11, 10, 12]], [[BUY, PV, PV, CART]], [[0, 60, 120, 2 * DAY + 120]])
    t = covisit.covisitation(h, W, covisit.CovisitConfig(2, DAY, 0, 5))
    assert rows(t) == {10: [(11, 2.0)], 11: [(10, 6.0)]}
    # Half-life one day: an event one day before the cut weighs half; two users add up and
    # chunking does not change the sums.
    h2 = hist([[10, 11], [11, 10]], [[PV, CART], [PV, PV]], [[0, DAY], [DAY, DAY]])
    for chunk in (1, 8):
        cfg = covisit.CovisitConfig(1, 0, DAY, 5, users_per_chunk=chunk)
        t2 = covisit.covisitation(h2, W, cfg)
        assert rows(t2) == {10: [(11, 1.5 + 0.5)], 11: [(10, 1.0 + 0.5)]}


def test_user_scores_sum_neighbour_scores_of_history_events():
    h = hist([[10, 11, 10, 12]], [[BUY, PV, PV, CART]], [[0, 60, 120, 180]])
    t = covisit.covisitation(h, W, covisit.CovisitConfig(2, 0, 0, 5))
    # User with 11 (buy, w 5) and 12 (pv, w 1): 10 = 5*6 + 1*1, 12 = 5*3, 11 = 1*1.
    u = hist([[11, 12, 0]], [[BUY, PV, 0]], [[0, 10, 0]])
    got = covisit.covisit_candidates(t, u, W, 4, half_life_s=0)
    assert got.tolist() == [[10, 12, 11, 0]]


def test_recent_items_are_distinct_most_recent_first():
    h = hist(
        [[10, 11, 10, 1, 12, 0], [13, 0, 0, 0, 0, 0]],  # 1 = an OOV item, skipped
        [[PV, PV, BUY, PV, CART, 0], [PV, 0, 0, 0, 0, 0]],
        [[0, 1, 2, 3, 4, 0], [0, 0, 0, 0, 0, 0]],
    )
    assert sources.recent_items(h, 4).tolist() == [[10, 11, 12, 0], [13, 0, 0, 0]]
    assert sources.recent_items(h, 2).tolist() == [[10, 11], [13, 0]]


def test_popular_items_weighted_and_padded():
    h = hist([[10, 11, 0], [11, 12, 12]], [[PV, PV, 0], [PV, PV, PV]], [[0, 0, 0], [0, 0, 0]])
    pop = sources.popularity(h, W, 0)
    assert sources.popular_items(pop, 5).tolist() == [11, 12, 10, 0, 0]


def _expand_by_hand(table, keys, weights, n_items, m):
    """expand() one row at a time: dense scores, then score descending, item ascending."""
    items = np.zeros((len(keys), m), np.int32)
    scores = np.zeros((len(keys), m))
    for r in range(len(keys)):
        dense = np.zeros(n_items)
        for k, w in zip(keys[r], weights[r], strict=True):
            if w > 0 and 0 <= k < table.n_keys:
                it, sc = table.row(k)
                dense[it] += w * sc
        best = [i for i in np.lexsort((np.arange(n_items), -dense)) if dense[i] > 0][:m]
        items[r, : len(best)], scores[r, : len(best)] = best, dense[best]
    return items, scores


@pytest.mark.parametrize("distinct", [True, False])
def test_expand_equals_the_scores_summed_by_hand(distinct):
    """expand() against a dense sum per row, with many ties, repeated and out-of-range keys, on
    a table where each item has one key (category -> items: nothing to sum) and on one where
    items recur across keys (co-visitation: scores add up)."""
    from influence_jax.retrieval.table import Table, expand

    rng = np.random.default_rng(0)
    n_keys, n_items, m = 30, 400, 7
    if distinct:
        key, item = rng.integers(0, n_keys, n_items - 2), np.arange(2, n_items)
    else:
        key, item = rng.integers(0, n_keys, 3000), rng.integers(2, n_items, 3000)
    score = rng.integers(1, 4, len(item)).astype(np.float64)
    table = Table.from_pairs(key, item.astype(np.int32), score, n_keys, n_items, top_m=10)
    assert table.items_distinct == distinct and np.diff(table.indptr).max() == 10 > m
    keys = rng.integers(-1, n_keys + 2, (40, 12))
    weights = rng.integers(0, 4, keys.shape).astype(np.float64)
    got = expand(table, keys, weights, n_items, m, items_distinct=distinct)
    want = _expand_by_hand(table, keys, weights, n_items, m)
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_allclose(got[1], want[1])
    assert (got[0] != 0).sum() > 30 * m  # most rows full
    assert not Table(np.r_[0, 1, 2], np.r_[5, 5].astype(np.int32), np.r_[1.0, 1.0]).items_distinct


LISTS = {
    "recent": np.array([[5, 6, 7], [15, 0, 0]], np.int32),
    "covisit": np.array([[6, 8, 9, 10], [16, 17, 0, 0]], np.int32),
    "popular": np.array([11, 5, 12], np.int32),
}
QUOTAS = {"recent": 0.25, "covisit": 0.5, "popular": 0.25}


def test_merge_quotas_then_fill_without_duplicates():
    items, src = retrieval.merge(LISTS, 4, QUOTAS)
    # recent 1, covisit 2, popular 1; user 1's covisit list is short, popular fills nothing
    # more in pass 1 (quota 1), then pass 2 fills in source order.
    assert items.tolist() == [[5, 6, 8, 11], [15, 16, 17, 11]]
    P = retrieval.SOURCES.index("popular")  # source ids index SOURCES
    assert retrieval.SOURCES[:2] == ("recent", "covisit")
    assert src.tolist() == [[0, 1, 1, P], [0, 1, 1, P]]
    items, src = retrieval.merge(LISTS, 8, QUOTAS)
    # Pass 1: recent 5 6 | covisit 8 9 10 (6 taken) | popular 11 12 (5 taken); pass 2: 7.
    assert items[0].tolist() == [5, 6, 8, 9, 10, 11, 12, 7]
    assert src[0].tolist() == [0, 0, 1, 1, 1, P, P, 0]
    # User 1 has only 6 distinct items in all.
    assert items[1].tolist() == [15, 16, 17, 11, 5, 12, 0, 0]
    assert src[1].tolist() == [0, 1, 1, P, P, P, -1, -1]


def test_merge_excludes_seen_items():
    seen = np.sort(np.array([100 * V + 6, 100 * V + 11, 101 * V + 15], np.int64))
    items, _ = retrieval.merge(LISTS, 4, QUOTAS, np.array([100, 101]), seen, V)
    assert items.tolist() == [[5, 8, 9, 12], [16, 17, 11, 5]]


def test_merge_rejects_unknown_sources_and_negative_shares():
    with pytest.raises(DataError, match="twotower"):
        retrieval.merge(LISTS, 4, {"twotower": 1.0})
    with pytest.raises(DataError, match=">= 0"):
        retrieval.merge(LISTS, 4, {"recent": -1})


def test_recall_on_a_toy_case():
    # User 0 saw 10 then 11 (10 most recent), user 1 saw 12; user 2 has no history.
    h = hist([[10, 11], [12, 0]], [[PV, PV], [PV, 0]], [[0, 0], [0, 0]])
    cfg = retrieval.RetrievalConfig(covisit=covisit.CovisitConfig(half_life_s=0))
    r = retrieval.Retriever(h, cfg)
    pos_user, pos_item = np.array([0, 0, 1, 2]), np.array([11, 13, 12, 10], np.int32)
    res = retrieval.recall(r, pos_user, pos_item, ns=(1, 2), seen=np.array([0 * V + 11]))
    assert res["positives"] == 3 and res["positives_without_history"] == 1
    assert res["recall"]["recent"] == {"1": round(1 / 3, 4), "2": round(2 / 3, 4)}
    assert res["recall"]["popular"] == {"1": 0.0, "2": round(1 / 3, 4)}  # 10, 11, 12 tie
    assert res["positives_unseen"] == 2 and res["recall_unseen"]["recent"]["2"] == 0.5
    assert "category" not in res["recall"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("retrieval")
    data = str(d / "data")
    helpers.prepare_log(
        helpers.write(d / "log.csv", helpers.random_log(20, 60, 1500, seed=5)), data,
        valid_start=1060, test_start=1080, max_len=5, neg_ratio=2,
    )  # fmt: skip
    return data


def test_cli_writes_candidates_rank_reads(tiny_data, tmp_path):
    out = tmp_path / "cand.parquet"
    js = tmp_path / "recall.json"
    r = helpers.run_tool(
        "retrieve", f"--data={tiny_data}", "--n=7", f"--output={out}", f"--recall_json={js}",
        "--exclude_seen", timeout=60,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    schema = Schema.load(tiny_data)
    maps = IdMaps(tiny_data, schema)
    users, items = read_candidate_ids(str(out), maps)
    h = retrieval.load_histories(tiny_data, schema, "test")
    assert set(users.tolist()) == set(maps.user_raw(h.user_key).tolist())
    pairs = set(zip(users.tolist(), items.tolist(), strict=True))
    assert len(pairs) == len(users)  # no repeats
    assert np.bincount(np.unique(users, return_inverse=True)[1]).max() <= 7
    t = pq.read_table(out)
    assert t.column_names == ["user_id", "item_id", "rank", "source"]
    assert set(t.column("source").to_pylist()) <= set(retrieval.SOURCES) - {"recent"}
    seen = retrieval.seen_keys(tiny_data, h)
    keys, _ = maps.user_keys(users)
    assert not np.isin(keys * h.n_items + maps.lookup("item_id", items), seen).any()
    assert '"merged"' in js.read_text() and "recall@N" in r.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["--n=0"], "--n must be > 0, got 0"),
        (["--as_of=end"], "--as_of must be valid or test, not 'end'"),
        (["--quotas=recent"], "--quotas: 'recent' is not name=number"),
    ],
)
def test_cli_bad_flags_are_one_line(tiny_data, tmp_path, args, message):
    out = tmp_path / "c.csv"
    r = helpers.run_tool("retrieve", f"--data={tiny_data}", f"--output={out}", *args, timeout=60)
    assert r.returncode == 2 and not out.exists(), (r.stdout, r.stderr)
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_saved_tables_are_reused_and_checked(tiny_data, tmp_path):
    schema = Schema.load(tiny_data)
    h = retrieval.load_histories(tiny_data, schema, "test")
    built = retrieval.Retriever(h)
    built.save_tables(str(tmp_path / "t"))
    loaded = retrieval.Retriever(h, tables=str(tmp_path / "t"))
    for name, lst in built.lists(h, 9).items():
        np.testing.assert_array_equal(loaded.lists(h, 9)[name], lst, err_msg=name)
    other = retrieval.RetrievalConfig(covisit=retrieval.CovisitConfig(neighbours=3))
    with pytest.raises(DataError, match="differing: covisit"):
        retrieval.Retriever(h, other, tables=str(tmp_path / "t"))
    early = retrieval.load_histories(tiny_data, schema, "valid")
    with pytest.raises(DataError, match="other histories or settings"):
        retrieval.Retriever(early, tables=str(tmp_path / "t"))
    # A folder of the user's is not replaced by tables; cut tables are one error.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not this tool's output"):
        retrieval.Retriever(h, tables=str(mine))
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    npz = tmp_path / "t" / "tables.npz"
    npz.write_bytes(npz.read_bytes()[:100])
    with pytest.raises(DataError, match=r"tables\.npz: unreadable .* to build the tables again"):
        retrieval.Retriever(h, tables=str(tmp_path / "t"))
    built.save_tables(str(tmp_path / "t"))
    # The CLI: the first call saves, the second loads and writes the same candidates.
    outs = []
    for k in range(2):
        out = tmp_path / f"c{k}.csv"
        args = ["--n=6", f"--output={out}", "--format=csv", f"--tables={tmp_path / 'cli'}"]
        r = helpers.run_tool("retrieve", f"--data={tiny_data}", *args, timeout=60)
        assert r.returncode == 0, r.stderr[-3000:]
        assert ("saved the tables" if k == 0 else "loaded the tables") in r.stderr
        outs.append(out.read_text())
    assert outs[0] == outs[1]


@pytest.mark.parametrize("rows", ["presorted", "shuffled", "nan"])
def test_top_per_group_breaks_score_ties_by_item_in_any_input_order(rows):
    """top_per_group against a sort per group by hand, with many ties, on rows in (group, item)
    order (sum_pairs' output: no item sort needed), on shuffled rows (ties sorted by item) and
    with a NaN score (the three-key sort; NaN last)."""
    from influence_jax.retrieval.table import top_per_group

    rng = np.random.default_rng(1)
    n_groups, n_items, m = 25, 60, 6
    pair = np.unique(rng.integers(0, n_groups * n_items, 900))
    group, item = np.divmod(pair, n_items)
    score = rng.integers(0, 4, len(pair)).astype(np.float64)  # ties in most groups
    if rows != "presorted":
        p = rng.permutation(len(pair))
        group, item, score = group[p], item[p], score[p]
    if rows == "nan":
        score[group == 3] = np.nan
        score[np.flatnonzero(group == 3)[0]] = 2.0
    items, scores = top_per_group(group, item.astype(np.int32), score, n_groups, m)
    for g in range(n_groups):
        at = np.flatnonzero(group == g)
        best = sorted(at, key=lambda r: (np.isnan(score[r]), -np.nan_to_num(score[r]), item[r]))
        best = best[:m]
        assert items[g].tolist() == item[best].tolist() + [0] * (m - len(best))
        np.testing.assert_array_equal(scores[g][: len(best)], score[best])


def test_retrieval_on_synthetic_data_says_it_needs_a_prepared_log(tmp_path):
    schema, path = helpers.tiny_dataset(str(tmp_path))
    with pytest.raises(DataError, match="synthetic data has no event log to retrieve"):
        retrieval.load_histories(path, schema, "test")
