"""Batch ranking: params-only restore, scores equal the eval step's, top-k order and tie-breaks,
atomic writes, candidate-file errors (binary and gzip'd files too) and OOV counts, and
tools/rank.py end to end."""

from __future__ import annotations

import collections
import datetime
import gzip
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from influence_jax import checkpoint, engine, hostmem, ranking, scoring, sharding
from influence_jax.data import pipeline, prepare, readers
from influence_jax.data.dataset import Dataset
from influence_jax.data.schema import DataError
from influence_jax.data.store import ExampleStore
from influence_jax.engine import EVAL_KEYS
from influence_jax.errors import ConfigError
from influence_jax.ranking.candidates import read_candidate_ids
from tests import helpers


def rank_cli(*args: str):
    return helpers.run_tool("rank", *args, timeout=120)


def write_csv(path, rows: list[str]) -> str:
    with open(path, "w") as f:
        f.write("\n".join(["user_id,item_id", *rows]) + "\n")
    return str(path)


def test_params_only_restore_matches_the_full_checkpoint(run_dir, run):
    assert run.step == helpers.tiny_config().loop.num_steps
    path = os.path.join(run_dir, "checkpoints", str(run.step), "state")
    ckptr = ocp.PyTreeCheckpointer()
    tree = ckptr.metadata(path).item_metadata.tree
    as_numpy = jax.tree_util.tree_map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
    full = ckptr.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))  # everything
    assert set(full) >= {"params", "opt_state", "step"}
    flat = jax.tree_util.tree_leaves_with_path(run.params)
    assert len(flat) == len(jax.tree_util.tree_leaves(full["params"]))
    jax.tree_util.tree_map_with_path(
        lambda p, a, b: np.testing.assert_array_equal(np.asarray(a), b, err_msg=str(p)),
        run.params,
        full["params"],
    )


def test_params_only_restore_verifies_the_saved_checksums(run_dir, tmp_path):
    """A wrong checksum of a parameter fails the ranker's restore, naming the leaf; one of the
    optimizer state (which the ranker does not read) does not."""
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    meta = copy / "checkpoints" / "20" / "data" / "metadata"
    saved = json.loads(meta.read_text())
    digest = list(saved["digest"])
    # TrainState leaves in order: step, the parameters (sorted paths), the optimizer, the RNG.
    params = jax.tree_util.tree_flatten_with_path(scoring.load_run(run_dir).params)[0]
    first = jax.tree_util.keystr(params[0][0])
    saved["digest"] = [digest[0], digest[1] ^ 1, *digest[2:]]
    meta.write_text(json.dumps(saved))
    with pytest.raises(DataError, match=rf"checksum mismatch in {re.escape(first)}"):
        scoring.load_run(str(copy))
    assert scoring.load_run(str(copy), step="10").step == 10
    saved["digest"] = [*digest[:-2], digest[-2] ^ 1, digest[-1]]  # an optimizer leaf
    meta.write_text(json.dumps(saved))
    assert scoring.load_run(str(copy)).step == 20


def test_step_selection(run_dir, tmp_path):
    shutil.copytree(run_dir, tmp_path / "run")  # other workers read the shared run's best.json
    run_dir = str(tmp_path / "run")
    assert ranking.load_run(run_dir, step="10").step == 10
    best = os.path.join(run_dir, checkpoint.BEST_FILE)
    saved = open(best).read() if os.path.exists(best) else None
    try:
        if saved is not None:
            os.remove(best)
        assert ranking.load_run(run_dir, step="best").step == 20  # no best.json: the latest
        for step in (10, 20):
            with open(best, "w") as f:
                json.dump({"step": step, "metric": "valid/auc", "value": 0.5}, f)
            assert ranking.load_run(run_dir, step="best").step == step
        with open(best, "w") as f:
            json.dump({"metric": "valid/auc"}, f)
        with pytest.raises(DataError, match="best.json"):
            ranking.load_run(run_dir, step="best")
    finally:
        if saved is None:
            os.remove(best)
        else:
            with open(best, "w") as f:
                f.write(saved)
    with pytest.raises(DataError, match="no step 7"):
        ranking.load_run(run_dir, step="7")
    with pytest.raises(DataError, match="--step"):
        ranking.load_run(run_dir, step="newest")


def test_scores_equal_the_eval_step(run):
    store = ExampleStore(run.data_path, "test", run.schema)
    batch = pipeline.EvalBatches(store, 128)[1]
    batch = {
        k: batch[k].astype(np.int32) if k == "user_key" else batch[k]
        for k in EVAL_KEYS
        if k in batch
    }
    eval_step = run.engine.eval_step
    want = sharding.to_host(eval_step(run.params, sharding.to_global(batch, run.mesh))["prob"])
    # Another batch size, so padding and sharding differ from the eval step's.
    gather = lambda r: {k: batch[k][r] for k in ("user", "item", "hist")}
    fn = scoring.make_score_fn(run)
    got = scoring.batched(fn, run, 128, gather, scoring.global_batch(run, 48))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_scores_in_blocks_equal_whole_batch_scores(run):
    """Engine.score_fn scores each device's rows in blocks (a loop in the compiled function)
    where its share is a larger multiple of `rows`; the probabilities are the whole batch's."""
    store = ExampleStore(run.data_path, "test", run.schema)
    d = run.mesh.shape[sharding.DATA]
    batch = store.gather(np.arange(16 * d) % len(store))
    batch = sharding.to_global({k: batch[k] for k in ("user", "item", "hist")}, run.mesh)
    whole, blocked = run.engine.score_fn(rows=0), run.engine.score_fn(rows=4)
    assert "while" in blocked.lower(run.params, batch).as_text()  # 4 blocks of 4 rows a device
    assert "while" not in whole.lower(run.params, batch).as_text()
    want = sharding.to_host(whole(run.params, batch))
    got = blocked(run.params, batch)
    assert got.sharding.is_equivalent_to(run.engine.batch_sharding, 1)
    np.testing.assert_allclose(sharding.to_host(got), want, rtol=0, atol=1e-6)
    odd = run.engine.score_fn(rows=5)  # 16 rows a device: not a multiple, one block
    assert "while" not in odd.lower(run.params, batch).as_text()


def test_cpu_blocks_fit_the_models_widest_value_to_the_cache(run, monkeypatch):
    """By default a CPU device scores the power of two of rows nearest to those whose largest
    value fills a core's level-2 cache (engine.block_rows), within [16, 1024]."""
    assert engine.block_rows(9_600, 1 << 20) == 128  # the default ranker on a 1 MiB cache
    assert engine.block_rows(20_808, 1 << 20) == 64  # the full one (bst's attention weights)
    assert engine.block_rows(20_808, 2 << 20) == 128
    assert engine.block_rows(10, 1 << 20) == engine.CPU_SCORE_ROWS
    assert engine.block_rows(1e9, 1 << 20) == engine.CPU_MIN_SCORE_ROWS
    assert engine.block_rows(0, 1 << 20) == engine.CPU_SCORE_ROWS  # no estimate
    assert engine.l2_cache_bytes() >= 1 << 16
    # The largest value per example, [10, 7] floats here; values of parameters alone count 0.
    f = lambda p, b: jnp.sum(b["x"][:, :, None] * p["w"], -1) + jnp.sum(p["big"] * 2.0)
    p = {"w": jnp.ones((10, 7)), "big": jnp.ones((1000, 100))}
    assert engine.widest_row_bytes(f, p, {"x": jnp.ones((3, 10))}) == 10 * 7 * 4

    store = ExampleStore(run.data_path, "test", run.schema)
    d = run.mesh.shape[sharding.DATA]
    batch = store.gather(np.arange(32 * d) % len(store))
    batch = sharding.to_global({k: batch[k] for k in ("user", "item", "hist")}, run.mesh)
    want = sharding.to_host(run.engine.score_fn(rows=0)(run.params, batch))
    auto = run.engine.score_fn()  # this machine's cache: 32 rows a device fit in one block
    assert "while" not in auto.lower(run.params, batch).as_text()
    monkeypatch.setattr(engine, "l2_cache_bytes", lambda: 1)  # a tiny cache: 2 blocks of 16
    small = run.engine.score_fn()
    assert "while" in small.lower(run.params, batch).as_text()
    np.testing.assert_allclose(sharding.to_host(small(run.params, batch)), want, rtol=0, atol=1e-6)
    # A share of fewer than two blocks of the fewest rows is scored whole, without an estimate.
    monkeypatch.setattr(engine, "widest_row_bytes", lambda *a: pytest.fail("estimated"))
    half = store.gather(np.arange(16 * d) % len(store))
    half = sharding.to_global({k: half[k] for k in ("user", "item", "hist")}, run.mesh)
    assert "while" not in run.engine.score_fn().lower(run.params, half).as_text()


def test_ranked_scores_equal_eval_scores_of_each_users_latest_example(run, tmp_path):
    """Through contexts and a candidates file: (user, item of the user's latest test example)."""
    store = ExampleStore(run.data_path, "test", run.schema)
    uk = store.column("user_key")
    last = {u: i for i, u in enumerate(uk)}  # synthetic timestamps tie: the later row wins
    rows = np.array(sorted(last.values()))[:40]
    ex = store.gather(rows)
    items = ex["item"][:, 0] - 2  # synthetic raw id = index - 2
    path = write_csv(tmp_path / "c.csv", [f"{u},{i}" for u, i in zip(uk[rows], items, strict=True)])
    out = tmp_path / "top.parquet"
    summary = ranking.rank(run, str(out), top_k=1, candidates=path)
    assert summary["pairs_scored"] == len(rows) and summary["unknown_users"] == 0
    got = pq.read_table(out).to_pydict()
    eval_step = run.engine.eval_step
    batch = dict(ex, weight=np.ones(len(rows), np.float32), user_key=uk[rows].astype(np.int32))
    batch = {k: batch[k] for k in EVAL_KEYS if k in batch}
    pad = scoring.global_batch(run, len(rows)) - len(rows)
    batch = {k: np.concatenate([v, v[:pad]]) for k, v in batch.items()}
    want = sharding.to_host(eval_step(run.params, sharding.to_global(batch, run.mesh))["prob"])
    by_user = dict(zip(uk[rows].tolist(), want[: len(rows)].tolist(), strict=True))
    np.testing.assert_allclose(got["score"], [by_user[u] for u in got["user_id"]], atol=1e-6)


def check_ranking(t: dict, k: int) -> None:
    """Ranks 1.. per user, scores non-increasing, equal scores ordered by item id."""
    users = np.asarray(t["user_id"])
    for u in np.unique(users):
        m = users == u
        ranks, score = np.asarray(t["rank"])[m], np.asarray(t["score"])[m]
        item = np.asarray(t["item_id"])[m]
        assert ranks.tolist() == list(range(1, len(ranks) + 1)) and len(ranks) <= k
        assert np.all(np.diff(score) <= 0)
        tie = np.diff(score) == 0
        assert np.all(np.diff(item)[tie] > 0)


def test_rank_cli_end_to_end(run_dir, run, tmp_path):
    out = tmp_path / "top.parquet"
    r = rank_cli(
        f"--workdir={run_dir}", f"--output={out}", "--top_k=5", "--explain", "--max_items=60"
    )
    assert r.returncode == 0, r.stderr[-3000:]
    assert "unknown users (OOV): 0" in r.stdout
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as the umask allows, not 0600
    t = pq.read_table(out)
    assert t.column_names[:4] == ["user_id", "rank", "item_id", "score"]
    types, extractors = run.schema.behaviour_types, run.model.extractors
    for col in [f"behaviour_{b}" for b in types] + [f"extractor_{e}" for e in extractors]:
        assert t.schema.field(col).type == "float"  # float32, as the events' influence below
    assert t.schema.field("event1_influence").type == "float"
    for k in (1, 2, 3):
        for f in ("item", "behaviour", "position", "gap_bucket_seconds_min", "influence"):
            assert f"event{k}_{f}" in t.column_names
        # Synthetic data has no raw event times: only the bucket bound, never named as seconds.
        assert f"event{k}_seconds_before" not in t.column_names
    d = t.to_pydict()
    check_ranking(d, 5)
    test_users = np.unique(ExampleStore(run.data_path, "test", run.schema).column("user_key"))
    assert sorted(set(d["user_id"])) == test_users.tolist()
    # Explained events are real history events, most influential first.
    assert set(d["event1_behaviour"]) <= set(types)
    infl = np.array([d[f"event{k}_influence"] for k in (1, 2, 3)], float)
    ok = ~np.isnan(infl).any(0)
    assert ok.any() and np.all(np.diff(infl[:, ok], axis=0) <= 0)


def test_ties_break_by_item_id_and_unknown_ids_are_counted(run, tmp_path):
    # Items 900000+ are unknown: all map to the OOV id, so their scores tie exactly.
    rows = ["0,900002", "0,900000", "0,3", "0,900001", "0,7", "0,3", "123456789,5", "1,900000"]
    path = write_csv(tmp_path / "c.csv", rows)
    out1, out2 = tmp_path / "a.csv", tmp_path / "b.csv"
    s = ranking.rank(run, str(out1), top_k=10, candidates=path, fmt="csv")
    # In blocks of whole users (about 2 pairs each: user 0's 6 pairs make one): the same table.
    s2 = ranking.rank(run, str(out2), top_k=10, candidates=path, fmt="csv", block_pairs=2)
    assert out1.read_bytes() == out2.read_bytes() and s2["pairs_scored"] == s["pairs_scored"]
    t = pcsv.read_csv(out1).to_pydict()
    check_ranking(t, 10)
    mine = [i for u, i in zip(t["user_id"], t["item_id"], strict=True) if u == 0]
    unknown = [i for i in mine if i >= 900000]
    assert unknown == [900000, 900001, 900002] and len(mine) == 5
    assert (s["unknown_users"], s["unknown_user_pairs"]) == (1, 1)
    assert (s["unknown_items"], s["unknown_item_pairs"]) == (3, 4)
    assert s["duplicate_pairs"] == 1 and s["pairs_scored"] == 7


@pytest.mark.parametrize(
    "rows, match",
    [
        (["0,1", "1,2", "2,x3"], r"c\.csv:4: item_id must be an integer"),
        (["0,1", "1,2,3", "2,4"], r"c\.csv:3: wrong number of fields"),
        (["0,1", ",5"], r"c\.csv:3: user_id must be an integer"),
    ],
)
def test_malformed_candidates_name_the_line(run, tmp_path, rows, match):
    path = write_csv(tmp_path / "c.csv", rows)
    with pytest.raises(DataError, match=match):
        ranking.rank(run, str(tmp_path / "out.parquet"), candidates=path)
    assert not (tmp_path / "out.parquet").exists()


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"batch_size": 0}, r"--batch_size must be positive, got 0"),
        ({"batch_size": -3}, r"--batch_size must be positive, got -3"),
        ({"top_k": 0}, r"--top_k must be at least 1, got 0"),
    ],
)
def test_bad_ranking_settings_are_refused_before_any_work(run, tmp_path, kw, match):
    with pytest.raises(DataError, match=match):
        ranking.rank(run, str(tmp_path / "out.parquet"), **kw)
    assert not (tmp_path / "out.parquet").exists()


def test_candidates_file_needs_both_columns(run, tmp_path):
    path = tmp_path / "c.parquet"
    pq.write_table(pa.table({"user": [1], "item_id": [2]}), path)
    with pytest.raises(DataError, match=r"missing column\(s\) \['user_id'\]"):
        ranking.rank(run, str(tmp_path / "out.parquet"), candidates=str(path))


class _IntegerIds:
    """The IdMaps a candidates reader needs: integer raw ids."""

    def integer(self, name: str) -> bool:
        return True


def test_a_binary_candidates_file_is_one_error_naming_it_without_raw_bytes(tmp_path):
    path = tmp_path / "c.csv"
    path.write_bytes(np.random.default_rng(0).bytes(5000))
    with pytest.raises(DataError) as e:
        read_candidate_ids(str(path), _IntegerIds())
    msg = str(e.value)
    assert msg.startswith(f"{path}: not a UTF-8 CSV or a Parquet file ("), msg
    assert msg.isascii() and msg.isprintable(), msg
    np.save(tmp_path / "c.npy", np.arange(10))
    with pytest.raises(DataError, match=r"c\.npy: not a UTF-8 CSV or a Parquet file"):
        read_candidate_ids(str(tmp_path / "c.npy"), _IntegerIds())


def test_a_non_utf8_malformed_row_past_the_start_is_one_error(tmp_path, capsys):
    path = tmp_path / "c.csv"
    path.write_bytes(b"user_id,item_id\n" + b"1,2\n" * 30_000 + b"\xff\xfe,1,2\n")
    with pytest.raises(DataError, match=r"c\.csv: not a UTF-8 CSV or a Parquet file \(a malformed"):
        read_candidate_ids(str(path), _IntegerIds())
    assert "Exception ignored" not in capsys.readouterr().err


def test_a_gzipped_csv_is_read_and_a_gzipped_binary_is_an_error(tmp_path):
    text = b"user_id,item_id\n1,2\n3,4\n"
    for name in ("c.csv.gz", "c.csv"):  # told by its first bytes, not its name
        (tmp_path / name).write_bytes(gzip.compress(text))
        users, items = read_candidate_ids(str(tmp_path / name), _IntegerIds())
        assert users.tolist() == [1, 3] and items.tolist() == [2, 4]
    (tmp_path / "b.gz").write_bytes(gzip.compress(np.random.default_rng(0).bytes(3000)))
    with pytest.raises(DataError, match=r"b\.gz: not a UTF-8 CSV or a Parquet file \(after gzip"):
        read_candidate_ids(str(tmp_path / "b.gz"), _IntegerIds())
    (tmp_path / "cut.gz").write_bytes(gzip.compress(text + b"5,6\n" * 1000)[:-20])
    with pytest.raises(DataError, match=r"cut\.gz: a gzip file that cannot be decompressed"):
        read_candidate_ids(str(tmp_path / "cut.gz"), _IntegerIds())


def test_a_long_bad_id_is_quoted_short(tmp_path):
    path = write_csv(tmp_path / "c.csv", ["1,2", "3," + "\x01" + "x" * 1000])
    with pytest.raises(DataError) as e:
        read_candidate_ids(path, _IntegerIds())
    assert "c.csv:3: item_id must be an integer id, got '\\x01xxx" in str(e.value)
    assert len(str(e.value)) < len(path) + 120 and str(e.value).isprintable()


def test_rank_cli_scores_alike_over_any_number_of_host_devices(run_dir, run, tmp_path):
    """--host_devices=3 splits the CPU into 3 XLA devices (the tests' processes start with 8): the
    batch is sharded over 3 and every candidate's score equals the 8-device run's."""
    users = np.unique(ExampleStore(run.data_path, "test", run.schema).column("user_key"))[:5]
    path = write_csv(tmp_path / "c.csv", [f"{u},{i}" for u in users for i in range(20)])
    scores = {}
    for n in (0, 3):
        out = tmp_path / f"top{n}.csv"
        args = [f"--output={out}", f"--candidates={path}", "--format=csv", "--top_k=20"]
        r = rank_cli(f"--workdir={run_dir}", f"--host_devices={n}", *args)
        assert r.returncode == 0, r.stderr[-3000:]
        summary = json.loads(r.stdout.split("summary ", 1)[1])
        assert summary["devices"] == (n or 8) and summary["pairs_scored"] == 100
        t = pcsv.read_csv(out).to_pydict()
        pairs = zip(t["user_id"], t["item_id"], strict=True)
        scores[n] = dict(zip(pairs, t["score"], strict=True))
    assert len(scores[3]) == 100 and scores[3].keys() == scores[0].keys()
    got = [scores[3][k] for k in scores[0]]
    np.testing.assert_allclose(got, list(scores[0].values()), atol=1e-6)
    bad = rank_cli(f"--workdir={run_dir}", f"--output={tmp_path / 'x.csv'}", "--host_devices=-1")
    assert bad.returncode == 2 and "host devices must be 0" in bad.stderr


def test_host_devices_are_set_before_jax_starts():
    jax.devices()  # this process's CPU client runs
    with pytest.raises(ConfigError, match="before JAX starts"):
        hostmem.split_host(2)
    before = os.environ.get("XLA_FLAGS")
    hostmem.split_host(0)  # JAX's default: nothing to set
    assert os.environ.get("XLA_FLAGS") == before


def test_rank_cli_reports_a_malformed_file_and_writes_nothing(run_dir, tmp_path):
    path = write_csv(tmp_path / "bad.csv", ["0,1", "1,2", "1,2", "oops,3"])
    out = tmp_path / "top.csv"
    r = rank_cli(f"--workdir={run_dir}", f"--output={out}", f"--candidates={path}", "--format=csv")
    assert r.returncode != 0
    assert "bad.csv:5: user_id must be an integer id, got 'oops'" in r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def test_writes_are_atomic(tmp_path, monkeypatch):
    out = tmp_path / "top.parquet"
    out.write_bytes(b"previous result")

    def fail_halfway(table, where, **kw):
        with open(where, "wb") as f:
            f.write(b"PAR1 partial")
        raise OSError("disk full")

    monkeypatch.setattr(ranking.pq, "write_table", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        ranking.write_table(pa.table({"user_id": [1]}), str(out))
    assert out.read_bytes() == b"previous result"
    assert os.listdir(tmp_path) == ["top.parquet"]


# Ranking on a prepared dataset with a ranking state (rank_state/), with untrained parameters:
# these tests check who is ranked, against what and with which history, not the scores.
@pytest.fixture(scope="module")
def prepared_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("prepared-ranking")
    text = helpers.random_log(20, 60, 1500, seed=5)
    data = str(d / "data")
    helpers.prepare_log(
        helpers.write(d / "log.csv", text), data, valid_start=1060, test_start=1080, max_len=5,
        neg_ratio=2,
    )  # fmt: skip
    log = [line.split(",") for line in text.splitlines()]
    return scoring.make_run(helpers.tiny_config(), data, workdir=str(d)), log


def test_all_items_are_every_train_item_for_every_user_at_the_cut(prepared_run, tmp_path):
    run, log = prepared_run
    lines = []
    out = tmp_path / "all.parquet"
    s = ranking.rank(run, str(out), top_k=10**6, log=lines.append, progress_every=0, retrieve=0)
    train = ExampleStore(run.data_path, "train", run.schema).column("item")[:, 0]
    ids = np.unique(train[train >= 2])
    train_raw = set(ranking.IdMaps(run.data_path, run.schema).raw("item_id", ids)[0].tolist())
    users = {int(u) for u, _, _, _, t in log if int(t) < 1080}  # every user with an event before
    assert s["as_of"] == "test" and s["candidate_items"] == s["train_items"] == len(train_raw)
    assert s["pairs_scored"] == len(users) * len(train_raw)
    t = pq.read_table(out).to_pydict()
    got = {}
    for u, i in zip(t["user_id"], t["item_id"], strict=True):
        got.setdefault(u, set()).add(i)
    assert got == {u: train_raw for u in users}
    check_ranking(t, 10**6)
    assert lines[0].startswith(
        f"scoring {s['pairs_scored']:,} pairs: {len(users)} users as of test"
    )
    # Before it starts: the number of pairs and the time it will take, measured on one batch.
    assert re.fullmatch(
        rf"WARNING: scoring every train item: {s['pairs_scored']:,} pairs, about \d+ s at "
        r"[\d,]+ pairs/s \(one batch measured\); without --all_items/--max_items rank.py "
        r"scores 200 retrieved candidates per user instead",
        lines[1],
    )
    pattern = r"scored [\d,]+/[\d,]+ pairs \(\d+%\) [\d,]+ pairs/s ETA \d+:\d\d:\d\d"
    assert all(re.fullmatch(pattern, x) for x in lines[2:]) and len(lines) > 3
    assert lines[-1].startswith(f"scored {s['pairs_scored']:,}/{s['pairs_scored']:,} pairs (100%)")


def test_default_ranks_the_retrievers_candidates(prepared_run, tmp_path):
    """Two-stage by default: each user's retrieved candidates (the retriever built from the
    ranked users' own histories as of the cut), scored; fewer pairs than every item."""
    run, log = prepared_run
    lines = []
    out = tmp_path / "two_stage.parquet"
    s = ranking.rank(run, str(out), top_k=10**6, log=lines.append, retrieve=8)
    assert s["retrieved_per_user"] == 8
    users = {int(u) for u, _, _, _, t in log if int(t) < 1080}
    t = pq.read_table(out).to_pydict()
    got = {}
    for u, i in zip(t["user_id"], t["item_id"], strict=True):
        got.setdefault(u, set()).add(i)
    assert set(got) == users and all(len(v) == 8 for v in got.values())
    assert s["pairs_scored"] == len(t["user_id"]) == 8 * len(users)
    check_ranking(t, 10**6)
    assert (
        lines[0]
        == f"retrieving 8 candidates for each of {len(users)} users as of test ("
        + (lines[0].split(" (", 1)[1])
    )
    # The same candidates as the retriever gives for these users' histories.
    ctx = ranking.load_contexts(run.dataset, "test")
    rc = ranking.RetrievedCandidates(run, ctx, 8)
    want = {}
    for c in rc.blocks(0):
        for u, i in zip(c.user_out, c.item_out, strict=True):
            want.setdefault(int(u), set()).add(int(i))
    assert {int(u): {int(i) for i in v} for u, v in got.items()} == want
    # With exclude_seen no retrieved item is one the user touched before the cut.
    s2 = ranking.rank(run, str(tmp_path / "unseen.parquet"), 10**6, retrieve=8, exclude_seen=True)
    t2 = pq.read_table(tmp_path / "unseen.parquet").to_pydict()
    seen = {(int(u), int(i)) for u, i, _, _, ts in log if int(ts) < 1080}
    assert s2["pairs_scored"] > 0
    assert not set(zip(map(int, t2["user_id"]), map(int, t2["item_id"]), strict=True)) & seen


def test_top_k_metrics_by_hand():
    from influence_jax.retrieval import top_k_metrics

    # user 1: positives 5, 7 at ranks 1 and 3; user 2: positive 4 at rank 2; user 3: none.
    m = top_k_metrics(
        np.array([1, 2, 3]), np.array([[5, 9, 7], [3, 4, 0], [1, 2, 3]]),
        np.array([1, 1, 2]), np.array([5, 7, 4]), 3,
    )  # fmt: skip
    ndcg1 = (1 + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    assert m["users"] == 2 and m["hr@3"] == 1.0 and m["mrr@3"] == pytest.approx(0.75)
    assert m["ndcg@3"] == pytest.approx((ndcg1 + 1 / np.log2(3)) / 2)
    per = top_k_metrics(
        np.array([2, 1, 3]), np.array([[3, 4, 0], [5, 9, 7], [1, 2, 3]]),
        np.array([1, 1, 2]), np.array([5, 7, 4]), 3, per_user=True,
    )["per_user"]  # fmt: skip
    assert per["user_key"].tolist() == [1, 2]  # users with positives, sorted
    np.testing.assert_allclose(per["ndcg"], [ndcg1, 1 / np.log2(3)])
    assert per["mrr"].tolist() == [1.0, 0.5] and per["hr"].tolist() == [1.0, 1.0]
    one_list = top_k_metrics(
        np.array([1, 2]), np.array([7, 4]), np.array([1, 2]), np.array([4, 4]), 1
    )
    assert (
        one_list["hr@1"] == 0.0
        and top_k_metrics(
            np.array([1, 2]), np.array([7, 4]), np.array([1, 2]), np.array([4, 4]), 2
        )["hr@2"]
        == 1.0
    )


def test_evaluate_scores_the_ranked_lists_against_the_splits_positives(prepared_run, tmp_path):
    run, log = prepared_run
    out = tmp_path / "eval.parquet"
    s = ranking.rank(run, str(out), top_k=5, retrieve=8, evaluate=True)
    ev = s["evaluation"]
    assert {"ranked", "popular only", "covisit only", "recent only"} <= set(ev)
    # By hand: a user with a test-period positive (label 1 in the test split) hit in the top 5.
    from influence_jax import retrieval

    pu, pi = retrieval.positives(run.data_path, run.schema, "test")
    maps = run.dataset.id_maps
    raw_pos = set(zip(maps.user_raw(pu).tolist(), maps.raw("item_id", pi)[0].tolist(), strict=True))
    t = pq.read_table(out).to_pydict()
    ranked_users = set(t["user_id"])
    with_pos = {u for u, _ in raw_pos if u in ranked_users}
    hit = {u for u, i in zip(t["user_id"], t["item_id"], strict=True) if (u, i) in raw_pos}
    assert ev["ranked"]["users"] == len(with_pos) > 0
    assert ev["ranked"]["hr@5"] == pytest.approx(len(hit) / len(with_pos))
    with pytest.raises(DataError, match="--evaluate needs --as_of=valid or test"):
        ranking.rank(run, str(out), top_k=5, as_of="end", evaluate=True)


def test_max_users_ranks_an_even_sample_with_tables_from_everyone(prepared_run, tmp_path):
    run, _ = prepared_run
    full = ranking.rank(run, str(tmp_path / "a.parquet"), top_k=3, retrieve=8)
    s = ranking.rank(run, str(tmp_path / "b.parquet"), top_k=3, retrieve=8, max_users=4)
    assert s["users"] == 4 < full["users"]
    a, b = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    users = sorted(set(b.column("user_id").to_pylist()))
    assert len(users) == 4
    # The same lists as in the full run: the retriever's tables come from every user.
    pick = lambda t: sorted(x for x in zip(*t.to_pydict().values(), strict=True) if x[0] in users)
    assert pick(b) == pick(a)
    with pytest.raises(DataError, match="--max_users"):
        ranking.rank(run, str(tmp_path / "c.parquet"), max_users=-1)
    # Saved retrieval tables: the first run saves them, the second reuses them, same lists.
    tables = tmp_path / "tables"
    for name in ("d.parquet", "e.parquet"):
        ranking.rank(run, str(tmp_path / name), top_k=3, retrieve=8, retrieval_tables=str(tables))
    assert (tables / "tables.npz").exists()
    assert pq.read_table(tmp_path / "d.parquet").equals(pq.read_table(tmp_path / "e.parquet"))
    assert pq.read_table(tmp_path / "d.parquet").equals(a)


def test_ranking_quality_pairs_users_over_seeds(prepared_run):
    from influence_jax.experiments import ranking_quality

    run, _ = prepared_run
    one = ranking_quality.evaluate_run(run, retrieve=8, k=5)
    assert one["ranked"]["per_user"]["user_key"].size == one["ranked"]["users"] > 0
    two = {n: {**e, "per_user": dict(e["per_user"])} for n, e in one.items()}
    two["ranked"]["per_user"]["hr"] = np.ones_like(two["ranked"]["per_user"]["hr"])  # seed 2
    got = ranking_quality.compare([one, two], k=5, n_boot=200)
    assert got["users"] == one["ranked"]["users"] and got["seeds"] == 2
    hr = got["ranked"]["hr"]
    assert hr["seeds"] == [pytest.approx(one["ranked"]["hr@5"]), 1.0]
    assert hr["mean"] == pytest.approx((one["ranked"]["hr@5"] + 1) / 2)  # per user, over seeds
    pop = got["lists"]["popular"]
    assert pop["ndcg"]["mean"] == pytest.approx(one["popular only"]["ndcg@5"])
    for m in ("hr", "ndcg", "mrr"):
        d = pop[m]
        assert d["diff"] == pytest.approx(got["ranked"][m]["mean"] - d["mean"])
        assert d["ci_low"] <= d["diff"] <= d["ci_high"]
    assert pop["hr"]["ci_low"] >= 0  # the seed that hits every user is never below a list
    other = {**one, "ranked": {**one["ranked"], "per_user": {**one["ranked"]["per_user"]}}}
    other["ranked"]["per_user"]["user_key"] = other["ranked"]["per_user"]["user_key"] + 1
    with pytest.raises(DataError, match="different users"):
        ranking_quality.compare([one, other], k=5, n_boot=10)


def test_exclude_seen_and_as_of_end(prepared_run, tmp_path):
    run, log = prepared_run
    out = tmp_path / "end.parquet"
    s = ranking.rank(run, str(out), top_k=10**6, as_of="end", exclude_seen=True, max_items=30)
    seen = {(int(u), int(i)) for u, i, _, _, _ in log}
    t = pq.read_table(out).to_pydict()
    pairs = set(zip(t["user_id"], t["item_id"], strict=True))
    assert s["as_of"] == "end" and s["candidate_items"] == 30 and s["seen_pairs_excluded"] > 0
    assert not pairs & seen and len(pairs) == s["pairs_scored"]
    assert len({u for u, _ in pairs}) == len({u for u, _ in seen})  # every user of the log
    assert s["pairs_scored"] + s["seen_pairs_excluded"] == 30 * len({u for u, _ in seen})
    # Scored in blocks of a few users (each block reduced to its top k): the same table.
    small = tmp_path / "blocks.parquet"
    s2 = ranking.rank(
        run, str(small), top_k=7, as_of="end", exclude_seen=True, max_items=30, block_pairs=50
    )
    ranking.rank(run, str(out), top_k=7, as_of="end", exclude_seen=True, max_items=30)
    assert pq.read_table(small).to_pydict() == pq.read_table(out).to_pydict()
    per_user = collections.Counter(t["user_id"])
    assert s2["pairs_scored"] == s["pairs_scored"]
    assert s2["rows_written"] == sum(min(7, n) for n in per_user.values())


def test_a_stopped_ranking_resumes_from_its_finished_blocks(prepared_run, tmp_path, monkeypatch):
    """Killed after two blocks, the same ranking run again scores only the blocks left and
    writes the same table; other settings start anew; the kept blocks go with the output."""
    from influence_jax.ranking import batch, progress

    run, _ = prepared_run
    kw = dict(top_k=7, as_of="end", exclude_seen=True, max_items=30, block_pairs=50)
    scored, real_batched, real_save = [], batch.batched, progress.BlockStore.save
    monkeypatch.setattr(batch, "batched", lambda *a: scored.append(a[2]) or real_batched(*a))
    whole = tmp_path / "whole.parquet"
    ranking.rank(run, str(whole), **kw)
    every, scored[:] = list(scored), []  # pairs per call: 2 timing the first batch, then blocks
    assert len(every) > 6

    def save_then_stop(self, i, kept):
        real_save(self, i, kept)
        if i == 1:
            raise KeyboardInterrupt  # as a kill after the second block

    monkeypatch.setattr(progress.BlockStore, "save", save_then_stop)
    out = tmp_path / "top.parquet"
    with pytest.raises(KeyboardInterrupt):
        ranking.rank(run, str(out), **kw)
    kept = sorted(os.listdir(f"{out}.progress"))
    assert not out.exists() and len(kept) == 3 and kept[-1] == "p000-settings.json"
    monkeypatch.setattr(progress.BlockStore, "save", real_save)
    scored[:] = []
    lines = []
    summary = ranking.rank(run, str(out), log=lines.append, **kw)
    assert "resuming: 2 blocks already scored" in "\n".join(lines)
    assert scored == every[:2] + every[4:]  # only the blocks left
    assert summary["pairs_resumed"] == sum(every[2:4]) and summary["pairs_scored"] == sum(every[2:])
    assert pq.read_table(out).to_pydict() == pq.read_table(whole).to_pydict()
    assert not os.path.exists(f"{out}.progress")
    # A stop, then other settings (top 5): the old blocks are not used.
    monkeypatch.setattr(progress.BlockStore, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        ranking.rank(run, str(out), **kw)
    monkeypatch.setattr(progress.BlockStore, "save", real_save)
    lines = []
    ranking.rank(run, str(out), log=lines.append, **dict(kw, top_k=5))
    assert "2 blocks of a ranking with other settings; starting anew" in "\n".join(lines)
    ranking.rank(run, str(whole), **dict(kw, top_k=5))
    assert pq.read_table(out).to_pydict() == pq.read_table(whole).to_pydict()


def test_contexts_are_the_rank_state_and_old_datasets_fall_back(prepared_run, tmp_path, caplog):
    run, _ = prepared_run
    ctx = ranking.load_contexts(run.dataset, "valid")
    st = np.load(os.path.join(run.data_path, "rank_state", "valid", "hist.npy"))
    keys = np.load(os.path.join(run.data_path, "rank_state", "valid", "user_key.npy"))
    np.testing.assert_array_equal(ctx.hist, st[np.argsort(keys)])
    assert (ctx.timestamp == 1060).all() and ctx.in_split.all()
    old = tmp_path / "old"
    shutil.copytree(run.data_path, old, ignore=shutil.ignore_patterns("rank_state"))
    with caplog.at_level("WARNING"):
        ctx = ranking.load_contexts(Dataset(str(old)), "valid")
    assert "rerun tools/prepare_data.py" in caplog.text
    valid = ExampleStore(str(old), "valid", run.schema)
    assert set(ctx.user_key[ctx.in_split]) == set(valid.column("user_key"))
    with pytest.raises(DataError, match="prepare_data.py"):
        ranking.load_contexts(Dataset(str(old)), "end")
    with pytest.raises(DataError, match="--as_of"):
        ranking.load_contexts(run.dataset, "train")


def test_progress_line_reports_rate_and_eta():
    now, lines = [0.0], []
    p = ranking.Progress(1000, lines.append, every=5.0, clock=lambda: now[0])
    now[0] = 2.0
    p(100)  # within 5 s of the start: quiet
    now[0] = 6.0
    p(300)
    now[0] = 20.0
    p(1000)
    assert lines == [
        "scored 300/1,000 pairs (30%) 50 pairs/s ETA 0:00:14",
        "scored 1,000/1,000 pairs (100%) 50 pairs/s ETA 0:00:00",
    ]


def test_histories_rebuilt_from_the_raw_log_equal_the_rank_state(prepared_run, tmp_path):
    run, log = prepared_run
    src = ranking.open_log("taobao", os.path.join(run.workdir, "log.csv"))
    for cut, t in run.schema.extra["rank_state"]["cuts"].items():
        got, counts = ranking.contexts_from_log(run.dataset, src, t)
        want = ranking.load_contexts(run.dataset, cut)
        for f in ("user_key", "user", "hist", "timestamp"):
            np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f"{cut} {f}")
        assert counts["log_events"] == len(log) and counts["log_users_not_in_dataset"] == 0
    s = ranking.rank(run, str(tmp_path / "t.parquet"), events=src, as_of=1070, max_items=5)
    assert s["as_of"] == 1070 and s["users"] == len({u for u, *_, t in log if int(t) < 1070})
    with pytest.raises(DataError, match="unix time"):
        ranking.rank(run, str(tmp_path / "t.parquet"), events=src, as_of="end")


def test_a_malformed_row_in_rank_events_does_not_advise_a_lenient_flag(prepared_run, tmp_path):
    run, _ = prepared_run
    bad = tmp_path / "bad.csv"
    lines = open(os.path.join(run.workdir, "log.csv")).read().splitlines()
    bad.write_text("\n".join(lines[:3] + ["1,2,3"] + lines[3:]) + "\n")
    src = ranking.open_log("taobao", str(bad))
    with pytest.raises(DataError) as e:
        ranking.contexts_from_log(run.dataset, src, 1070)
    assert f"{bad}:4:" in str(e.value) and "Fix or delete the row" in str(e.value)
    assert "pass --lenient" not in str(e.value) and "it has no --lenient" in str(e.value)


def test_an_events_log_replays_with_the_mapping_saved_at_preparation(prepared_run, tmp_path):
    """The Taobao-layout log rewritten as a generic events CSV (other column names and order,
    ISO 8601 times in a +08:00 wall clock, some with their own offset): prepared with
    --source=events it gives the same ranking state, and rank.py --events rebuilds it from the
    mapping saved in schema.json, with --source given or left to the dataset's."""
    run, log = prepared_run
    lines = ["when;who;sku;kind;cat"]
    for k, (u, i, c, b, t) in enumerate(log):
        utc = datetime.datetime.fromtimestamp(int(t), datetime.UTC)
        local = (utc + datetime.timedelta(hours=8)).strftime("%Y-%m-%d %H:%M:%S")
        stamp = utc.strftime("%Y-%m-%dT%H:%M:%SZ") if k % 3 == 0 else local
        lines.append(f"{stamp};{u};{i};{b};{c}")
    path = helpers.write(tmp_path / "events.csv", "\n".join(lines) + "\n")
    mapping = dict(user="who", item="sku", behaviour="kind", timestamp="when", category="cat",
                   behaviour_types=("pv", "cart", "fav", "buy"), delimiter=";",
                   time_format="iso8601", time_zone="+08:00")  # fmt: skip
    data = str(tmp_path / "data")
    schema = prepare.prepare(
        readers.open_source("events", path, **mapping),
        data,
        prepare.PrepareOptions(valid_start=1060, test_start=1080, max_len=5, neg_ratio=2,
                               min_timestamp=0, target_behaviours=("buy",)),
    )  # fmt: skip
    saved = schema.extra["source_options"]
    assert saved["time_format"] == "iso8601" and saved["time_zone"] == "+08:00"
    assert saved["behaviour_types"] == ["pv", "cart", "fav", "buy"] and saved["user"] == "who"
    ev_run = scoring.make_run(run.config, data, run.params)
    for source in ("events", None):
        src = ranking.open_log(source, path, ev_run.dataset)
        for cut, t in schema.extra["rank_state"]["cuts"].items():
            got, counts = ranking.contexts_from_log(ev_run.dataset, src, t)
            want = ranking.load_contexts(run.dataset, cut)  # the Taobao path's
            for f in ("user_key", "user", "hist", "timestamp"):
                np.testing.assert_array_equal(getattr(got, f), getattr(want, f), err_msg=f)
            assert counts["log_events"] == len(log) and counts["log_users_not_in_dataset"] == 0
    s = ranking.rank(ev_run, str(tmp_path / "t.parquet"), events=src, as_of=1070, max_items=5)
    assert s["as_of"] == 1070 and s["users"] == len({u for u, *_, t in log if int(t) < 1070})
    # A dataset of another source, or one prepared before the mapping was saved: one clear line.
    with pytest.raises(DataError, match="prepared from --source=taobao, not events"):
        ranking.open_log("events", path, run.dataset)
    old = tmp_path / "old"
    shutil.copytree(data, old)
    with open(old / "schema.json") as f:
        d = json.load(f)
    del d["extra"]["source_options"]
    with open(old / "schema.json", "w") as f:
        json.dump(d, f)
    with pytest.raises(DataError, match="prepared without saved column mapping; re-run prepare"):
        ranking.open_log(None, path, Dataset(str(old)))


def test_a_run_trained_without_a_behaviour_type_ranks_without_it(prepared_run, tmp_path):
    """config.data.drop_behaviours (feature selection) holds in ranking as in training."""
    run, _ = prepared_run
    config = run.config.copy_and_resolve_references()
    config.data.drop_behaviours = ("pv",)
    dropped = scoring.make_run(config, run.data_path, run.params)
    kw = dict(top_k=3, explain=True, max_items=20)
    lines = []
    ranking.rank(run, str(tmp_path / "a.parquet"), **kw, log=lines.append)
    # --explain reports its own progress, to the closing line.
    assert re.fullmatch(r"explain: [\d,]+/[\d,]+ model rows \(100%\) .*", lines[-1]), lines[-1]
    ranking.rank(dropped, str(tmp_path / "b.parquet"), **kw)
    full, kept = pq.read_table(tmp_path / "a.parquet"), pq.read_table(tmp_path / "b.parquet")
    assert "pv" in full.column("event1_behaviour").to_pylist()
    for k in (1, 2, 3):
        assert "pv" not in kept.column(f"event{k}_behaviour").to_pylist()
    assert np.abs(kept.column("behaviour_pv").to_numpy()).max() < 1e-6  # float rounding only


def test_explained_events_give_real_seconds_before_the_ranking_time(tmp_path):
    """event{k}_seconds_before = ranking time - the event's raw timestamp (not the lower bound
    of its log2 time-gap bucket), from the ranking state, from the log (--events) and with a
    behaviour type dropped (the times move with the events)."""
    data = str(tmp_path / "data")
    path = helpers.write(tmp_path / "log.csv", helpers.LOG)
    helpers.prepare_log(path, data, max_len=4, neg_ratio=1)
    run = scoring.make_run(helpers.tiny_config(), data, workdir=str(tmp_path))
    when = {}  # (user, item, behaviour) -> raw time; unique in LOG
    for line in helpers.LOG.splitlines():
        u, i, _, b, t = line.split(",")
        when[(int(u), int(i), b)] = int(t)
    config = run.config.copy_and_resolve_references()
    config.data.drop_behaviours = ("pv",)
    dropped = scoring.make_run(config, data, run.params)
    src = ranking.open_log("taobao", path)
    kw = dict(top_k=10**6, explain=True)
    cases = [(run, "test", 900, {}), (run, 950, 950, {"events": src}), (dropped, "test", 900, {})]
    for r, as_of, at, extra in cases:
        out = tmp_path / "t.parquet"
        ranking.rank(r, str(out), as_of=as_of, **kw, **extra)
        t = pq.read_table(out).to_pydict()
        assert not any("gap_bucket" in c for c in t)
        assert set(t["ranking_time"]) == {at}
        n = 0
        for k in (1, 2, 3):
            for u, i, b, s in zip(
                t["user_id"], t[f"event{k}_item"], t[f"event{k}_behaviour"],
                t[f"event{k}_seconds_before"], strict=True,
            ):  # fmt: skip
                assert (i is None) == (s is None)
                if i is not None:
                    assert s == at - when[(u, i, b)], (at, u, i, b)
                    n += s & (s - 1) != 0  # not a power of 2, unlike a bucket bound
        assert n > 0


def test_ranking_quality_tool_over_two_seeds(run_dir, tmp_path):
    runs = tmp_path / "runs"
    runs.mkdir()
    for seed in (0, 1):  # the same trained run twice stands in for two seeds
        os.symlink(run_dir, runs / f"tiny-ranker-{seed}")
    out = tmp_path / "rq.json"
    r = helpers.run_tool(
        "ranking_quality", f"--workdir={tmp_path}", "--datasets=tiny", "--seeds=0,1",
        "--retrieve=8", "--top_k=5", "--n_boot=50", f"--output={out}",
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    got = json.loads(out.read_text())["tiny"]
    assert got["seeds"] == 2 and got["k"] == 5 and got["users"] > 0
    hr = got["ranked"]["hr"]
    assert hr["seeds"][0] == hr["seeds"][1] == pytest.approx(hr["mean"])  # one run, twice
    assert "| tiny (" in r.stdout and "popular only" in r.stdout
    bad = helpers.run_tool("ranking_quality", f"--workdir={tmp_path}", "--datasets=nope")
    assert bad.returncode != 0 and "nope-ranker-0: no such run" in bad.stderr


@pytest.mark.parametrize(
    "users, scores",
    [
        ("small", "float32"),  # one packed integer sort, then the ties by item
        ("huge", "float32"),  # ids past 2^32: the three-key sort
        ("small", "float64"),
        ("small", "nan"),
        ("small", "signed"),  # logits: negative numbers, -0.0 and infinities, packed too
    ],
)
def test_top_k_rows_orders_by_score_then_item_like_a_sort_by_hand(users, scores):
    rng = np.random.default_rng(0)
    n, k = 3000, 4
    user = rng.integers(0, 200, n).astype(np.int64) + (1 << 40 if users == "huge" else 7)
    item = 10**6 + rng.integers(0, 300, n)
    score = rng.integers(0, 6, n).astype(np.float32) / 8  # ties in most users, 0 among them
    score[rng.random(n) < 0.05] = -0.0
    if scores == "float64":
        score = score.astype(np.float64)
    if scores == "nan":
        score[::97] = np.nan
    if scores == "signed":
        score = (score - 0.3) * rng.choice(np.float32([1, 1e-30, 1e30]), n)
        score[::89], score[::101], score[::103] = np.inf, -np.inf, -0.0
    rows, rank = ranking.top_k_rows(user, item, score, k)
    # By hand: per user, (score descending, item ascending); NaN after every number.
    want = []
    for u in np.unique(user):
        at = np.flatnonzero(user == u)
        key = lambda r: (np.isnan(score[r]), -score[r] if not np.isnan(score[r]) else 0, item[r])
        best = sorted(at, key=key)[:k]
        want += [(r, j + 1) for j, r in enumerate(best)]
    assert list(zip(rows.tolist(), rank.tolist(), strict=True)) == want


@pytest.mark.parametrize("n", [0, 1, 2, 500])
def test_key_order_is_a_lexsort_of_the_key_then_the_minor_keys(n):
    """The packed-key sort behind top k, the retrieval tables and the event sort: the same
    order as a lexsort, with ties on every key kept in input order (stable)."""
    from influence_jax import sorting

    rng = np.random.default_rng(n)
    key = rng.integers(0, 20, n).astype(np.uint64)  # many ties
    a, b = rng.integers(0, 3, n), rng.integers(0, 2, n).astype(str).astype(object)
    assert sorting.key_order(key).tolist() == np.argsort(key, kind="stable").tolist()
    assert sorting.key_order(key, a).tolist() == np.lexsort((a, key)).tolist()
    assert sorting.key_order(key, a, b).tolist() == np.lexsort((b, a, key)).tolist()
    if n > 2:  # ties on every key remain, in input order
        assert len({(int(k), int(x), y) for k, x, y in zip(key, a, b, strict=True)}) < n


def test_a_retrained_step_does_not_resume_the_old_blocks(run_dir, tmp_path, monkeypatch):
    """The settings name the step's checkpoint as written: the same step of a retrained run (a
    new folder) starts anew."""
    from influence_jax.ranking import progress

    shutil.copytree(run_dir, tmp_path / "run")  # its checkpoint is touched below
    run = ranking.load_run(str(tmp_path / "run"))

    kw = dict(top_k=7, max_items=30, max_users=5, block_pairs=50)
    real_save = progress.BlockStore.save

    def save_then_stop(self, i, kept):
        real_save(self, i, kept)
        raise KeyboardInterrupt

    monkeypatch.setattr(progress.BlockStore, "save", save_then_stop)
    out = tmp_path / "top.parquet"
    with pytest.raises(KeyboardInterrupt):
        ranking.rank(run, str(out), **kw)
    monkeypatch.setattr(progress.BlockStore, "save", real_save)
    step = os.path.join(checkpoint.checkpoint_dir(run.workdir), str(run.step))
    st = os.stat(step)
    os.utime(step, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # as a folder written anew
    lines = []
    ranking.rank(run, str(out), log=lines.append, **kw)
    assert "1 blocks of a ranking with other settings; starting anew" in "\n".join(lines)


def test_probabilities_that_round_to_1_still_rank_by_the_model(run, tmp_path):
    """With the output bias raised by 40 every float32 probability is 1: the ranking follows
    the logits (as the unshifted model's order), not item ids."""
    import dataclasses

    params = dict(run.params, bias=run.params["bias"] + 40.0)
    sure = dataclasses.replace(run, params=jax.device_put(params, run.engine.param_shardings))
    items = [3, 5, 7, 9, 11, 13, 17, 19, 23, 29]
    path = write_csv(tmp_path / "c.csv", [f"0,{i}" for i in items])
    ranked = {}
    for name, r in (("sure", sure), ("plain", run)):
        ranking.rank(r, str(tmp_path / f"{name}.csv"), 10, candidates=path, fmt="csv")
        ranked[name] = pcsv.read_csv(str(tmp_path / f"{name}.csv")).to_pydict()
    t, want = ranked["sure"], ranked["plain"]
    assert set(t["score"]) == {1.0}
    assert len(set(want["score"])) == len(items)  # the unshifted model tells them apart
    assert t["item_id"] == want["item_id"] != sorted(items)
