"""Data preparation on small hand-made logs: exact histories, splits, negatives, OOV, duplicates,
the leakage audit (passes, and fails on corrupted data), atomic output and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from influence_jax.data import audit, prepare, readers
from influence_jax.data.schema import DataError, Schema
from influence_jax.data.store import ExampleStore
from tests.helpers import BUY, CART, CAT, FAV, ITEM, LOG, PV, random_log, rows, write
from tests.helpers import prepare_log as run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def find(cols, user_key: int, t: int, label: float = 1.0) -> int:
    hit = np.flatnonzero(
        (cols["user_key"] == user_key) & (cols["timestamp"] == t) & (cols["label"] == label)
    )
    assert len(hit) == 1, hit
    return int(hit[0])


def test_history_is_the_most_recent_events_strictly_before_the_target(tmp_path):
    out = tmp_path / "p"
    schema = run(write(tmp_path / "log.csv", LOG), out, max_len=3, neg_ratio=0)
    assert [f.name for f in schema.hist_fields] == ["item_id", "category", "behaviour", "time_gap"]
    assert schema.splits["train"]["rows"] == 3 and schema.splits["valid"]["rows"] == 1
    assert schema.splits["test"]["rows"] == 1
    train = rows(out, "train")
    r = find(train, user_key=0, t=400)
    # Before t=400: pv 10@100, fav 11@200, pv 12@300, cart 10@300; pv 13@400 is at the target
    # time and left out. Ties at 300 are ordered (behaviour, item); most recent first.
    gap = lambda s: int(prepare.gap_bucket(np.array([s]))[0])
    np.testing.assert_array_equal(
        train["hist"][r],
        [
            [ITEM[10], CAT[1], CART, gap(100)],
            [ITEM[12], CAT[2], PV, gap(100)],
            [ITEM[11], CAT[1], FAV, gap(200)],
        ],
    )
    np.testing.assert_array_equal(train["item"][r], [ITEM[10], CAT[1]])
    np.testing.assert_array_equal(train["user"][r], [2])
    assert train["target_type"][r] == BUY and train["label"][r] == 1
    assert gap(100) == 2 + 6 and gap(1) == 2 and gap(0) == prepare.GAP_INVALID
    empty = find(train, user_key=2, t=120)  # user 9's only event: no history at all
    assert not train["hist"][empty].any()
    test = rows(out, "test")
    np.testing.assert_array_equal(test["hist"][0, :, 0], [ITEM[10], ITEM[13], ITEM[10]])
    np.testing.assert_array_equal(test["hist"][0, :, 2], [BUY, PV, CART])
    valid = rows(out, "valid")
    np.testing.assert_array_equal(valid["hist"][0, :2, 0], [ITEM[11], ITEM[11]])
    np.testing.assert_array_equal(valid["hist"][0, :2, 2], [BUY, PV])
    assert valid["hist"][0, 2].sum() == 0
    last = np.load(out / "audit" / "train" / "hist_last_ts.npy")
    assert last[r] == 300 and last[empty] == prepare.NO_HISTORY
    assert schema.extra["split"]["valid_start"] == 500
    assert prepare.Vocab.load(str(out), "item_id").lookup([12, 99]).tolist() == [4, 1]


@pytest.mark.parametrize("storage", ["reference", "copy"])
def test_audit_passes_then_fails_on_corrupted_copies(tmp_path, storage):
    out = tmp_path / "p"
    # Two more items (14, 15 -> ids 6, 7) from another user leave room for negatives.
    run(
        write(tmp_path / "log.csv", LOG + "99,14,3,pv,50\n99,15,3,pv,60\n"),
        out,
        max_len=3,
        neg_ratio=2,
        seed=3,
        history_storage=storage,
    )
    assert os.path.exists(out / "history_events") == (storage == "reference")
    counts = audit.audit_leakage(str(out))
    assert counts["negatives"] == 10 and counts["rows"]["train"] == 9

    def corrupt(name, fn):
        bad = tmp_path / name
        shutil.copytree(out, bad)
        fn(bad)
        with pytest.raises(DataError, match="leakage audit"):
            audit.audit_leakage(str(bad))

    train_part = "train/part-00000"
    cols = rows(out, "train")
    r = find(cols, user_key=0, t=400)
    neg = int(
        np.flatnonzero((cols["user_key"] == 0) & (cols["timestamp"] == 400) & (cols["label"] == 0))[
            0
        ]
    )

    def history_at_target_time(d):  # the recorded last history time moved to the target time
        a = np.load(d / "audit" / "train" / "hist_last_ts.npy", mmap_mode="r+")
        a[r] = 400

    def zero_gap(d):
        if storage == "copy":
            a = np.load(d / train_part / "hist.npy", mmap_mode="r+")
            a[r, 1, 3] = prepare.GAP_INVALID
        else:  # the event in slot 1 moved to the target's time
            hi = np.load(d / train_part / "hist_hi.npy")
            a = np.load(d / "history_events" / "ts.npy", mmap_mode="r+")
            a[hi[r] - 2] = 400

    def test_row_before_boundary(d):
        a = np.load(d / "test/part-00000/timestamp.npy", mmap_mode="r+")
        a[0] = 899

    def train_row_after_boundary(d):
        a = np.load(d / train_part / "timestamp.npy", mmap_mode="r+")
        a[r] = 500

    def negative_from_history(d):
        item = np.load(d / train_part / "item.npy", mmap_mode="r+")
        item[neg, 0] = cols["hist"][neg, 2, 0]

    def negative_bought_earlier(d):  # user 7 bought item 10 at t=400; a test negative is 10
        neg = int(np.flatnonzero(np.load(d / "audit/test/sampled.npy"))[0])
        item = np.load(d / "test/part-00000/item.npy", mmap_mode="r+")
        if storage == "copy":
            hist = np.load(d / "test/part-00000/hist.npy", mmap_mode="r+")
            hist[neg, :, :] = 0  # hide it from the example's own history
        else:
            hi = np.load(d / "test/part-00000/hist_hi.npy", mmap_mode="r+")
            hi[neg] = np.load(d / "test/part-00000/hist_lo.npy")[neg]
        last = np.load(d / "audit/test/hist_last_ts.npy", mmap_mode="r+")
        last[neg] = prepare.NO_HISTORY
        item[neg, 0] = ITEM[10]

    for fn in (
        history_at_target_time,
        zero_gap,
        test_row_before_boundary,
        train_row_after_boundary,
        negative_from_history,
        negative_bought_earlier,
    ):
        corrupt(fn.__name__, fn)


@pytest.mark.parametrize("strategy", ["uniform", "popularity"])
def test_negatives_are_never_items_the_user_touched_by_then(tmp_path, strategy):
    text = random_log(12, 25, 600, seed=1)
    out = tmp_path / "p"
    schema = run(
        write(tmp_path / "log.csv", text),
        out,
        neg_ratio=4,
        neg_strategy=strategy,
        valid_start=1060,
        test_start=1080,
        max_len=5,
    )
    first = {}
    for line in text.splitlines():
        u, i, _, _, t = line.split(",")
        first[(int(u), int(i))] = min(int(t), first.get((int(u), int(i)), 10**9))
    users = np.load(out / "vocab" / "user_key.npy")
    item_keys = np.load(out / "vocab" / "item_id.npy")
    checked = 0
    for split in prepare.SPLITS:
        cols = rows(out, split)
        sampled = np.load(out / "audit" / split / "sampled.npy").astype(bool)
        assert (cols["label"][sampled] == 0).all() and (cols["label"][~sampled] == 1).all()
        for uk, item, t in zip(
            cols["user_key"][sampled],
            cols["item"][sampled, 0],
            cols["timestamp"][sampled],
            strict=True,
        ):
            raw = (int(users[uk]), int(item_keys[item - 2]))
            assert first.get(raw, 10**9) > t, (raw, t)
            checked += 1
    assert checked == schema.extra["counts"]["negatives"] > 0
    audit.audit_leakage(str(out))


def test_output_does_not_depend_on_bucket_count_and_is_seeded(tmp_path):
    log = write(tmp_path / "log.csv", random_log(30, 40, 800, seed=2))

    def table(out, **kw):
        run(log, out, neg_ratio=3, valid_start=1060, test_start=1080, max_len=4, **kw)
        got = []
        for split in prepare.SPLITS:
            c = rows(out, split)
            flat = np.concatenate(
                [
                    c["user"],
                    c["item"],
                    c["hist"].reshape(len(c["label"]), -1),
                    c["label"][:, None],
                    c["user_key"][:, None],
                    c["timestamp"][:, None],
                ],
                1,
            )
            got.append(flat[np.lexsort(flat.T[::-1])])
        return got

    one = table(tmp_path / "a", num_buckets=1)
    many = table(tmp_path / "b", num_buckets=7, rows_per_shard=50)
    other_seed = table(tmp_path / "c", num_buckets=1, seed=5)
    for a, b in zip(one, many, strict=True):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, c) for a, c in zip(one, other_seed, strict=True))
    assert len(Schema.load(str(tmp_path / "b")).splits["train"]["shards"]) > 1


@pytest.mark.parametrize("task", ["next_item", "conversion"])
def test_histories_by_reference_read_back_equal_to_copies(tmp_path, task):
    log = write(tmp_path / "log.csv", random_log(30, 40, 3000, seed=4))
    kw = dict(valid_start=1060, test_start=1080, max_len=6, num_buckets=5, rows_per_shard=30)
    if task == "conversion":
        kw.update(task=task, target_behaviours=("buy",), horizon_hours=5 / 3600)
    else:
        kw.update(neg_ratio=2)
    ref = run(log, tmp_path / "ref", **kw)
    copy = run(log, tmp_path / "copy", history_storage="copy", **kw)
    assert ref.history_events == "history_events" and copy.history_events == ""
    assert not os.path.exists(tmp_path / "ref" / "train" / "part-00000" / "hist.npy")
    events = np.load(tmp_path / "ref" / "history_events" / "ts.npy")
    assert len(events) == ref.extra["counts"]["events"]  # each event once
    for split in prepare.SPLITS:
        a, b = (
            ExampleStore(str(tmp_path / "ref"), split),
            ExampleStore(str(tmp_path / "copy"), split),
        )
        assert len(a) == len(b) > 0 and len(ref.splits[split]["shards"]) > 1
        idx = np.random.default_rng(0).permutation(len(a))[: len(a) // 2]  # any order, shards
        for got, want in (
            (a.gather(idx), b.gather(idx)),
            (rows(tmp_path / "ref", split), rows(tmp_path / "copy", split)),
        ):
            assert list(got) == list(want)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k], err_msg=f"{split}.{k}")
        np.testing.assert_array_equal(a.column("hist"), b.column("hist"))
        assert a.column("hist").any()
    # A span past the event table is an error naming the table, not an IndexError.
    hi = np.load(tmp_path / "ref" / "train" / "part-00000" / "hist_hi.npy", mmap_mode="r+")
    hi[0] = len(events) + 1
    with pytest.raises(DataError, match="history_events.*outside the table"):
        ExampleStore(str(tmp_path / "ref"), "train").gather(np.arange(3))


def test_rare_ids_map_to_oov_but_user_key_stays_dense(tmp_path):
    out = tmp_path / "p"
    schema = run(
        write(tmp_path / "log.csv", LOG),
        out,
        max_len=3,
        neg_ratio=0,
        min_count=2,
        min_count_overrides={"user_id": 3},
        vocab_period="all",
    )
    # Items 10, 11, 12 are seen 3 times, 13 twice: all kept; categories too.
    assert schema.vocab_sizes["item_id"] == 6
    # Users with >= 3 events: 7 and 8; user 9 (one event) is OOV but keeps user_key 2.
    assert schema.vocab_sizes["user_id"] == 4
    train = rows(out, "train")
    r = find(train, user_key=2, t=120)
    assert train["user"][r, 0] == 1
    log2 = write(tmp_path / "log2.csv", LOG)
    run(log2, tmp_path / "q", max_len=3, neg_ratio=0, min_count=3, vocab_period="all")
    q = rows(tmp_path / "q", "test")  # user 7 at t=1000: buy 10, pv 13 (rare -> OOV), cart 10
    np.testing.assert_array_equal(q["hist"][0, :, 0], [2, 1, 2])
    assert prepare.Vocab.load(str(tmp_path / "q"), "item_id").keys.tolist() == [10, 11, 12]
    assert prepare.Vocab.load(str(tmp_path / "q"), "item_id").lookup([13, 12]).tolist() == [1, 4]


def test_vocabularies_come_from_the_training_period_and_later_ids_still_match(tmp_path):
    # After valid_start (500): a new user 10 and a new item 14 of a new category 3; user 7
    # views item 14 at 950 and buys it at 990 (a test example whose history holds the view).
    log = write(
        tmp_path / "log.csv",
        LOG + "10,14,3,pv,600\n10,14,3,buy,700\n7,14,3,pv,950\n7,14,3,buy,990\n",
    )
    schema = run(log, tmp_path / "p", max_len=3, neg_ratio=0)
    assert schema.table_sizes == {"user_id": 2 + 3, "item_id": 2 + 4, "category": 2 + 2}
    assert schema.vocab_sizes["item_id"] == 2 + 5 and schema.vocab_sizes["user_id"] == 2 + 4
    assert schema.extra["counts"]["item_id_after_training"] == 1
    assert schema.extra["vocab_period"]["period"] == "train"
    items = prepare.Vocab.load(str(tmp_path / "p"), "item_id")
    assert items.keys.tolist() == [10, 11, 12, 13, 14] and items.lookup([14, 10]).tolist() == [6, 2]
    test = rows(tmp_path / "p", "test")
    r = find(test, user_key=0, t=990)
    # The late item keeps its own id (6, beyond the 6 embedding rows) in the target and in the
    # history, so "same item as the target" still holds; so does its late category (4).
    np.testing.assert_array_equal(test["item"][r], [6, 4])
    np.testing.assert_array_equal(test["hist"][r, 0, :3], [6, 4, PV])
    valid = rows(tmp_path / "p", "valid")
    assert valid["user"][find(valid, user_key=3, t=700), 0] == 5  # user 10: late id 5
    audit.audit_leakage(str(tmp_path / "p"))
    # --vocab_period=all: one table over the whole log, ids sorted as before.
    whole = run(log, tmp_path / "q", max_len=3, neg_ratio=0, vocab_period="all")
    assert whole.table_sizes == {} and whole.vocab_sizes["item_id"] == 2 + 5
    q = rows(tmp_path / "q", "test")
    np.testing.assert_array_equal(q["item"][find(q, user_key=0, t=990)], [6, 4])
    with pytest.raises(DataError, match="vocab_period"):
        run(log, tmp_path / "r", vocab_period="future")


def test_duplicates_are_counted_and_merged_only_with_dedupe(tmp_path):
    log = write(tmp_path / "log.csv", LOG + "7,11,1,fav,200\n7,10,1,buy,400\n")
    kept = run(log, tmp_path / "a", max_len=3, neg_ratio=0)
    merged = run(log, tmp_path / "b", max_len=3, neg_ratio=0, dedupe=True)
    assert kept.extra["counts"]["duplicates"] == merged.extra["counts"]["duplicates"] == 2
    assert kept.extra["counts"]["duplicates_dropped"] == 0
    assert merged.extra["counts"]["duplicates_dropped"] == 2
    assert kept.splits["train"]["rows"] == 4 and merged.splits["train"]["rows"] == 3
    test = rows(tmp_path / "a", "test")
    np.testing.assert_array_equal(test["hist"][0, :, 0], [ITEM[10], ITEM[10], ITEM[13]])


def test_failure_leaves_no_output_folder_and_keeps_the_old_one(tmp_path):
    bad = write(tmp_path / "bad.csv", LOG + "7,10,1,buy\n")
    out = tmp_path / "p"
    with pytest.raises(DataError, match=r"bad\.csv:12: wrong number of fields"):
        run(bad, out)
    assert os.listdir(tmp_path) == ["bad.csv"]  # no folder, no leftover temp folder
    run(write(tmp_path / "good.csv", LOG), out, max_len=3)
    with pytest.raises(DataError):
        run(bad, out)
    assert Schema.load(str(out)).splits["train"]["rows"] > 0
    assert sorted(os.listdir(tmp_path)) == ["bad.csv", "good.csv", "p"]


def test_the_check_sees_the_finished_folder_before_it_is_renamed_into_place(tmp_path):
    """The leakage audit runs in the temporary folder: a failed audit (or a kill during it)
    leaves no dataset at the output that looks finished but was never checked."""
    out, seen = tmp_path / "p", []

    def check(root):
        seen.append(Schema.load(root).splits["train"]["rows"])
        assert not out.exists() and sum(audit.audit_leakage(root)["rows"].values()) > 0
        raise DataError("the audit failed")

    source = readers.open_source("taobao", write(tmp_path / "log.csv", LOG))
    opts = prepare.PrepareOptions(valid_start=500, test_start=900, min_timestamp=0)
    with pytest.raises(DataError, match="the audit failed"):
        prepare.prepare(source, str(out), opts, check=check)
    assert seen and seen[0] > 0 and sorted(os.listdir(tmp_path)) == ["log.csv"]


def test_cli_prepares_a_synthetic_log_and_records_the_command(tmp_path):
    log = tmp_path / "events.csv.gz"
    env = {**os.environ, "PYTHONPATH": ROOT}
    subprocess.run(
        [sys.executable, "tools/make_event_log.py", "--events=3000", f"--output={log}"],
        cwd=ROOT,
        check=True,
        env=env,
        capture_output=True,
    )
    out = tmp_path / "prepared"
    cmd = [
        sys.executable,
        "tools/prepare_data.py",
        "--source=taobao",
        f"--input={log}",
        f"--output={out}",
        "--target_behaviour=buy,cart",
        "--neg_ratio=2",
        "--max_len=8",
        "--memory_mb=64",
        "--nolenient",
    ]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    schema = Schema.load(str(out))
    assert schema.extra["command"].startswith("python tools/prepare_data.py --source=taobao")
    assert "--neg_ratio=2" in schema.extra["command"]
    assert schema.label["target_behaviours"] == ["cart", "buy"]
    assert report["audit"]["negatives"] == schema.extra["counts"]["negatives"] > 0
    assert (
        sum(v["rows"] for v in schema.splits.values())
        == 3 * (schema.extra["counts"]["targets"])
        - schema.extra["counts"]["negatives_unsampleable"]
    )
    res = subprocess.run(
        cmd[:3] + [f"--input={tmp_path / 'missing.csv'}", cmd[4]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
    )
    assert res.returncode == 1 and "missing.csv: no such file" in res.stderr
    assert "Traceback" not in res.stderr


def test_time_split_by_fractions_and_counts(tmp_path):
    text = "".join(
        f"1,{i % 5 + 1},1,{'buy' if i % 2 else 'pv'},{1000 + 10 * i}\n" for i in range(101)
    )
    schema = prepare.prepare(
        readers.open_source("taobao", write(tmp_path / "l.csv", text)),
        str(tmp_path / "p"),
        prepare.PrepareOptions(
            neg_ratio=0, valid_frac=0.2, test_frac=0.1, min_timestamp=0, max_timestamp=1900
        ),
    )
    split = schema.extra["split"]
    assert (split["t_min"], split["t_max"]) == (1000, 1900)
    assert (split["valid_start"], split["test_start"]) == (1630, 1810)
    assert schema.extra["counts"]["outside_time_window"] == 10
    got = {s: schema.splits[s]["rows"] for s in prepare.SPLITS}
    assert got == {"train": 31, "valid": 9, "test": 5}  # odd i: i < 63, 63..79, 81..89
    assert schema.extra["counts"]["behaviours"] == {"pv": 46, "cart": 0, "fav": 0, "buy": 45}


def test_huge_and_negative_ids_take_the_hash_path_with_the_same_result(tmp_path):
    shifted = "".join(
        f"{int(u) * 10**15},{-int(i)},{c},{b},{t}\n"
        for u, i, c, b, t in (line.split(",") for line in LOG.splitlines())
    )
    run(write(tmp_path / "a.csv", LOG), tmp_path / "a", max_len=3, neg_ratio=2)
    run(write(tmp_path / "b.csv", shifted), tmp_path / "b", max_len=3, neg_ratio=2)
    # Item ids are negated, so their vocabulary order reverses: raw 10..13 -> ids 5..2.
    flip = np.array([0, 1, 5, 4, 3, 2])
    for split in prepare.SPLITS:
        a, b = rows(tmp_path / "a", split), rows(tmp_path / "b", split)
        np.testing.assert_array_equal(a["hist"][..., 0], flip[b["hist"][..., 0]])
        np.testing.assert_array_equal(a["user"], b["user"])
        np.testing.assert_array_equal(a["timestamp"], b["timestamp"])
    assert prepare.Vocab.load(str(tmp_path / "b"), "user_id").keys[0] == 7 * 10**15


def test_an_empty_split_is_written_and_readable(tmp_path):
    schema = run(write(tmp_path / "log.csv", LOG), tmp_path / "p", max_len=3, valid_start=900)
    assert schema.splits["valid"] == {"rows": 0, "shards": [], "label_sum": 0.0}
    store = ExampleStore(str(tmp_path / "p"), "valid")
    assert len(store) == 0 and store.column("hist").shape == (0, 3, 4)
    assert audit.audit_leakage(str(tmp_path / "p"))["rows"]["valid"] == 0


def test_min_history_drops_targets_with_too_few_earlier_events(tmp_path):
    schema = run(
        write(tmp_path / "log.csv", LOG),
        tmp_path / "p",
        max_len=3,
        min_history=2,
        tmp_dir=str(tmp_path / "scratch"),
    )
    # Buys with >= 2 earlier events: user 7 at 400 and 1000, user 8 at 600.
    assert schema.extra["counts"]["targets_short_history"] == 2
    assert schema.extra["counts"]["targets"] == 3
    assert os.listdir(tmp_path / "scratch") == []  # bucket files cleaned up


def test_rank_state_equals_a_training_example_at_the_cut(tmp_path):
    """User 8 has events before test_start (900) but no test example; its ranking state must
    equal the history of an example at t=900, built by preparing the log plus such an event."""
    log = LOG + "10,10,1,pv,700\n"  # user 10 starts after valid_start
    a = run(write(tmp_path / "a.csv", log), tmp_path / "a", max_len=3, neg_ratio=0)
    run(write(tmp_path / "b.csv", log + "8,13,2,buy,900\n"), tmp_path / "b", max_len=3, neg_ratio=0)
    cuts = a.extra["rank_state"]["cuts"]
    assert cuts == {"valid": 500, "test": 900, "end": 1001}
    state = lambda cut, col: np.load(tmp_path / "a" / "rank_state" / cut / f"{col}.npy")
    # Users 7, 8, 9, 10 -> keys 0..3; user 10 has no event before valid_start.
    assert sorted(state("valid", "user_key")) == [0, 1, 2]
    assert sorted(state("test", "user_key")) == sorted(state("end", "user_key")) == [0, 1, 2, 3]
    assert 1 not in rows(tmp_path / "a", "test")["user_key"]
    b = rows(tmp_path / "b", "test")
    r = find(b, user_key=1, t=900)
    row = int(np.flatnonzero(state("test", "user_key") == 1)[0])
    np.testing.assert_array_equal(state("test", "hist")[row], b["hist"][r])
    np.testing.assert_array_equal(state("test", "user")[row], b["user"][r])
    assert state("test", "last_ts")[row] == 600
    # User 9's only event (buy 13 at 120), seen from valid_start.
    row = int(np.flatnonzero(state("valid", "user_key") == 2)[0])
    gap = int(prepare.gap_bucket(np.array([500 - 120]))[0])
    np.testing.assert_array_equal(state("valid", "hist")[row, 0], [ITEM[13], CAT[2], BUY, gap])
    assert not state("valid", "hist")[row, 1:].any()
    feats = np.load(tmp_path / "a" / "rank_state" / "item_features.npy")
    np.testing.assert_array_equal(feats[[ITEM[10], ITEM[12]]], [[ITEM[10], CAT[1]], [4, CAT[2]]])


def test_rank_state_histories_hold_only_events_before_the_cut(tmp_path):
    """Against a plain-Python reference: the 5 most recent events strictly before each cut."""
    text = random_log(12, 25, 600, seed=2)
    schema = run(
        write(tmp_path / "log.csv", text),
        tmp_path / "p",
        valid_start=1060,
        test_start=1080,
        max_len=5,
        neg_ratio=0,
    )
    beh = {b: k for k, b in enumerate(readers.TAOBAO_BEHAVIOURS)}
    ev = sorted(
        (int(u), int(t), beh[b], int(i))
        for u, i, _, b, t in (line.split(",") for line in text.splitlines())
    )
    users, items = sorted({e[0] for e in ev}), sorted({e[3] for e in ev})
    for cut, t_cut in schema.extra["rank_state"]["cuts"].items():
        d = tmp_path / "p" / "rank_state" / cut
        keys, hist = np.load(d / "user_key.npy"), np.load(d / "hist.npy")
        last, times = np.load(d / "last_ts.npy"), np.load(d / "hist_ts.npy")
        assert (last < t_cut).all()
        want_users = sorted({users.index(u) for u, t, _, _ in ev if t < t_cut})
        assert sorted(keys.tolist()) == want_users
        for k, h, row_times in zip(keys, hist, times, strict=True):
            before = [e for e in ev if e[0] == users[k] and e[1] < t_cut][::-1][:5]
            want = [
                [items.index(i) + 2, b + 2, int(prepare.gap_bucket(np.array([t_cut - t]))[0])]
                for _, t, b, i in before
            ]
            got = h[: len(before)][:, [0, 2, 3]].tolist()
            assert got == want, (cut, k)
            assert not h[len(before) :].any()
            assert row_times[: len(before)].tolist() == [t for _, t, _, _ in before]
            assert (row_times[len(before) :] == prepare.NO_HISTORY).all()


# user, item, category, behaviour, time. Boundaries: valid 500, test 900; horizon 100 s.
CONVERSION_LOG = """\
1,10,1,pv,100
1,10,1,pv,110
1,10,1,buy,150
1,11,1,pv,200
1,11,1,pv,400
1,11,1,cart,420
1,12,2,pv,300
2,10,1,pv,120
2,10,1,buy,500
2,12,2,pv,600
2,12,2,buy,600
3,11,1,pv,950
3,11,1,buy,960
"""


def _conversion(tmp_path, **kw):
    base = dict(task="conversion", target_behaviours=("buy",), horizon_hours=100 / 3600,
                session_gap_minutes=1.0)  # fmt: skip
    kw = {**base, **kw}
    out = tmp_path / "conv"
    return run(write(tmp_path / "log.csv", CONVERSION_LOG), out, **kw), out


def test_conversion_examples_are_exposures_labelled_within_the_horizon(tmp_path):
    schema, out = _conversion(tmp_path)
    got = {
        s: sorted(
            zip(
                r["user_key"].tolist(),
                r["item"][:, 0].tolist(),
                r["timestamp"].tolist(),
                r["label"].tolist(),
                strict=True,
            )
        )  # fmt: skip
        for s in prepare.SPLITS
        for r in [rows(out, s)]
    }
    assert got == {
        # user 1: the views of item 10 at 100 and 110 merge (10 s apart) and convert at 150;
        # item 11 viewed at 200 (no purchase) and again at 400, whose horizon reaches
        # valid_start: dropped; item 12 not bought. User 2 buys item 10 380 s after the view.
        "train": [
            (0, ITEM[10], 100, 1.0),
            (0, ITEM[11], 200, 0.0),
            (0, ITEM[12], 300, 0.0),
            (1, ITEM[10], 120, 0.0),
        ],  # fmt: skip
        # A purchase at the view's own second converts it.
        "valid": [(1, ITEM[12], 600, 1.0)],
        # User 3's view at 950 ends the log within its horizon: dropped.
        "test": [],
    }
    c = schema.extra["counts"]
    assert (c["exposures"], c["exposures_merged"], c["exposures_immature"]) == (8, 1, 2)
    assert c["conversions"] == 2 and c["negatives"] == 0
    assert schema.label["task"] == "conversion" and schema.label["exposure"] == "pv"
    train = rows(out, "train")
    # Every example's target type is the exposure's; its history holds only earlier events,
    # the earlier views of the same item included.
    assert set(train["target_type"].tolist()) == {PV}
    r = find(train, user_key=0, t=200, label=0.0)
    assert train["hist"][r, :3, 0].tolist() == [ITEM[10], ITEM[10], ITEM[10]]  # buy, pv, pv
    assert audit.audit_leakage(str(out))["negatives"] == 0


def test_the_audit_fails_a_conversion_label_past_the_cut(tmp_path):
    _, out = _conversion(tmp_path)
    a = np.load(out / "train" / "part-00000" / "timestamp.npy", mmap_mode="r+")
    a[np.argmax(a)] = 450  # 450 + 100 s reaches valid_start 500
    with pytest.raises(DataError, match="reaches past the split's end 500.*label maturity"):
        audit.audit_leakage(str(out))


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"neg_ratio": 2}, "no --neg_ratio"),
        ({"exposure": "buy"}, "exposure=buy is also a --target_behaviour"),
        ({"exposure": "click"}, "--exposure: 'click' is not a behaviour type"),
        ({"horizon_hours": 0.0}, "horizon_hours > 0"),
    ],
)
def test_conversion_options_are_checked(tmp_path, kw, match):
    with pytest.raises(DataError, match=match):
        _conversion(tmp_path, **kw)


def test_conversion_from_the_cli(tmp_path):
    log = write(tmp_path / "log.csv", CONVERSION_LOG)
    out = tmp_path / "cli"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "prepare_data.py"), "--source=taobao",
           f"--input={log}", f"--output={out}", "--task=conversion", "--horizon_hours=0.0277",
           "--session_gap_minutes=1", "--valid_start=500", "--test_start=900",
           "--min_timestamp=0"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    schema = json.loads((out / "schema.json").read_text())
    assert schema["label"]["exposure"] == "pv" and schema["label"]["target_behaviours"] == ["buy"]
    assert json.loads(res.stdout)["rows"] == {"train": 4, "valid": 1, "test": 0}
