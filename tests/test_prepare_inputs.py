"""Data preparation on awkward input: malformed rows (strict and lenient), missing columns, empty
and truncated files, gzip/CRLF/BOM, and the MovieLens, Retailrocket and generic events readers."""

from __future__ import annotations

import datetime as dt
import gzip
import os
import sys
import zoneinfo

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from influence_jax.data import audit, prepare, readers
from influence_jax.data.schema import DataError, Schema
from influence_jax.data.store import ExampleStore
from tests import helpers
from tests.helpers import LOG, rows, write
from tests.helpers import prepare_log as run


def all_rows(out) -> dict[str, np.ndarray]:
    return {s: rows(out, s) for s in prepare.SPLITS}


def assert_same(a, b) -> None:
    for s in prepare.SPLITS:
        for k in a[s]:
            np.testing.assert_array_equal(a[s][k], b[s][k], err_msg=f"{s}.{k}")


BAD_ROWS = [
    (  # the count and the row's text, not ''
        "7,10,1,pv\n",
        "wrong_field_count",
        r"wrong number of fields: expected 5 fields, got 4 \(row '7,10,1,pv'\)",
    ),
    (
        "7,10,1,pv,100,3\n",
        "wrong_field_count",
        r"wrong number of fields: expected 5 fields, got 6 \(row '7,10,1,pv,100,3'\)",
    ),
    (  # the field and its value, the flag for other formats, then the row
        "7,10,1,pv,12:00\n",
        "bad_timestamp",
        r"non-integer timestamp: timestamp = '12:00', not unix seconds \(--time_format for other "
        r"formats\) \(row '7,10,1,pv,12:00'\)",
    ),
    (  # the field and its value, then the row
        "7,10,1,click,100\n",
        "unknown_behaviour",
        r"unknown behaviour type: behavior_type = 'click', not one of pv, cart, fav, buy "
        r"\(row '7,10,1,click,100'\)",
    ),
    (
        "u7,10,1,pv,100\n",
        "bad_id",
        r"empty or non-integer id: user_id = 'u7', not an integer \(ids that are text: "
        r"--string_ids, with --source=events\) \(row 'u7,10,1,pv,100'\)",
    ),
    ("7,,1,pv,100\n", "bad_id", r"empty or non-integer id: item_id is empty \(row '7,,1,pv,100'\)"),
]


@pytest.mark.parametrize(
    "bad,reason,message", BAD_ROWS, ids=[r[1] + str(i) for i, r in enumerate(BAD_ROWS)]
)
def test_malformed_row_stops_with_file_and_line_or_is_counted_when_lenient(
    tmp_path, bad, reason, message
):
    lines = LOG.splitlines(keepends=True)
    text = "".join(lines[:3]) + "\n" + bad + "".join(lines[3:])  # a blank line, then line 5
    path = write(tmp_path / "log.csv", text)
    with pytest.raises(DataError, match=rf"log\.csv:5: {message}.*--lenient"):
        run(path, tmp_path / "strict", max_len=3)
    schema = run(path, tmp_path / "lenient", max_len=3, lenient=True)
    counts = schema.extra["counts"]
    assert counts[f"skipped_{reason}"] == 1 and counts["skipped_blank_lines"] == 1
    clean = run(write(tmp_path / "clean.csv", LOG), tmp_path / "clean", max_len=3)
    assert_same(all_rows(tmp_path / "lenient"), all_rows(tmp_path / "clean"))
    assert clean.extra["counts"]["rows_valid"] == counts["rows_valid"]


@pytest.mark.parametrize(
    "bad,reason,message",
    [
        (b"7,10,1,p\xffv,100\n", "bad_encoding", "not UTF-8 text .*: '7,10,1,p\ufffdv,100'"),
        (b"7,1\xff0,1,pv\n", "wrong_field_count", r"got 4 \(row '7,1\ufffd0,1,pv'\)"),
    ],
    ids=["invalid_field", "invalid_short_row"],
)
def test_invalid_utf8_row_names_the_line_or_is_counted_when_lenient(
    tmp_path, monkeypatch, bad, reason, message
):
    # pyarrow decoded a short row strictly for the invalid-row handler ("Exception ignored in
    # ... on_invalid: UnicodeDecodeError") and failed any read with an invalid field outright.
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    lines = LOG.encode().splitlines(keepends=True)
    (tmp_path / "log.csv").write_bytes(b"".join(lines[:4]) + bad + b"".join(lines[4:]))
    with pytest.raises(DataError, match=rf"log\.csv:5: .*{message}"):
        run(tmp_path / "log.csv", tmp_path / "strict", max_len=3)
    schema = run(tmp_path / "log.csv", tmp_path / "lenient", max_len=3, lenient=True)
    assert schema.extra["counts"][f"skipped_{reason}"] == 1
    run(write(tmp_path / "clean.csv", LOG), tmp_path / "clean", max_len=3)
    assert_same(all_rows(tmp_path / "lenient"), all_rows(tmp_path / "clean"))
    assert not unraisable


def test_valid_utf8_split_across_reads_is_kept(tmp_path):
    # Multi-byte characters straddle the 64 KiB reads of the UTF-8 check: none may be garbled.
    body = "".join(f"{u % 7},{u % 11},\u00e9\u6f22{u},pv,{100 + u}\n" for u in range(20_000))
    src = readers.open_source(
        "events",
        write(tmp_path / "ev.csv", "uid,sku,cat,act,ts\n" + body),
        user="uid",
        item="sku",
        behaviour="act",
        timestamp="ts",
        category="cat",
        behaviour_types=("pv",),
        string_ids=True,
    )
    tally = readers.Tally(lenient=False)
    chunks = list(src.chunks(1 << 16, tally))
    cats = pa.concat_arrays([c.category for c in chunks]).to_pylist()
    assert cats == [f"\u00e9\u6f22{u}" for u in range(20_000)]


def test_line_numbers_survive_many_blocks(tmp_path):
    body = "".join(f"{u % 50},{u % 97},1,pv,{1000 + u}\n" for u in range(80_000))
    path = write(tmp_path / "big.csv", body + "1,2,3,pv,oops\n" + body)
    with pytest.raises(DataError, match=r"big\.csv:80001: non-integer timestamp"):
        run(path, tmp_path / "p", memory_mb=64)
    path = write(tmp_path / "big2.csv", body + "1,2,3\n" + body)
    with pytest.raises(DataError, match=r"big2\.csv:80001: wrong number of fields"):
        run(path, tmp_path / "p", memory_mb=64)


def test_gzip_crlf_bom_and_no_final_newline_read_like_the_clean_file(tmp_path):
    run(write(tmp_path / "clean.csv", LOG), tmp_path / "clean", max_len=3, neg_ratio=1)
    messy = "\ufeff" + LOG.replace("\n", "\r\n").rstrip("\r\n")
    with gzip.open(tmp_path / "messy.csv.gz", "wt", encoding="utf-8", newline="") as f:
        f.write(messy)
    run(tmp_path / "messy.csv.gz", tmp_path / "messy", max_len=3, neg_ratio=1)
    assert_same(all_rows(tmp_path / "clean"), all_rows(tmp_path / "messy"))
    # gzip is recognised by its magic bytes, not the file name.
    (tmp_path / "renamed.csv").write_bytes((tmp_path / "messy.csv.gz").read_bytes())
    run(tmp_path / "renamed.csv", tmp_path / "renamed", max_len=3, neg_ratio=1)
    assert_same(all_rows(tmp_path / "clean"), all_rows(tmp_path / "renamed"))


def test_truncated_gzip_empty_file_missing_column_and_no_events_fail_clearly(tmp_path):
    data = gzip.compress(("".join(LOG for _ in range(200))).encode())
    (tmp_path / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.csv\.gz: .*truncated or corrupt"):
        run(tmp_path / "cut.csv.gz", tmp_path / "p")
    with pytest.raises(DataError, match=r"empty\.csv: empty file"):
        run(write(tmp_path / "empty.csv", ""), tmp_path / "p")
    rr = "user_id,item_id,behavior\n0,3,view\n"
    with pytest.raises(DataError, match=r"rr\.csv: missing column\(s\) \['timestamp'\]"):
        run(write(tmp_path / "rr.csv", rr), tmp_path / "p", source="retailrocket")
    with pytest.raises(DataError, match=r"head\.csv.*no events"):
        run(
            write(tmp_path / "head.csv", "user_id,item_id,behavior,timestamp\n"),
            tmp_path / "p",
            source="retailrocket",
        )
    with pytest.raises(DataError, match=r"e\.csv: empty file"):
        run(write(tmp_path / "e.csv", ""), tmp_path / "p", source="retailrocket")
    with pytest.raises(DataError, match="no such file"):
        run(tmp_path / "nope.csv", tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_retailrocket_reader(tmp_path):
    text = (
        "user_id,item_id,behavior,timestamp\n0,3,view,100\n0,1,cart,200\n0,3,buy,300\n"
        "1,2,view,150\n1,2,buy,400\n2,5,view,120\n"
    )
    out = tmp_path / "p"
    schema = run(
        write(tmp_path / "train.csv", text),
        out,
        source="retailrocket",
        neg_ratio=2,
        valid_start=350,
        test_start=1000,
    )
    assert schema.behaviour_types == ("view", "cart", "buy")
    assert [f.name for f in schema.hist_fields] == ["item_id", "behaviour", "time_gap"]
    assert schema.splits["train"]["rows"] == 3 and schema.splits["valid"]["rows"] == 3
    train = rows(out, "train")
    # User 0 buys item 3 at t=300 after cart 1 @200 and view 3 @100 (items 1, 2, 3, 5 -> 2..5).
    np.testing.assert_array_equal(train["hist"][0, :2, :2], [[2, 2 + 1], [4, 2 + 0]])
    audit.audit_leakage(str(out))


def _movielens(folder) -> None:
    folder.mkdir()
    write(folder / "u.data", "1\t10\t5\t100\n1\t20\t3\t200\n2\t10\t4\t150\n1\t30\t1\t300\n")
    write(folder / "u.user", "1|24|M|technician|85711\n2|60|F|other|T8H1N\n")
    write(folder / "u.genre", "unknown|0\nAction|1\nComedy|2\n\n")
    write(
        folder / "u.item",
        "10|A (1995)|01-Jan-1995||http://x|0|0|1\n"
        "20|B (1995)|01-Jan-1995||http://y|0|1|1\n"
        "30|C \xe9 (1995)|01-Jan-1995||http://z|0|0|0\n",
    )


def test_movielens_ratings_side_features_and_threshold_label(tmp_path):
    _movielens(tmp_path / "ml")
    out = tmp_path / "p"
    schema = run(
        tmp_path / "ml",
        out,
        source="movielens",
        valid_start=250,
        test_start=10**9,
        vocab_period="all",
    )
    assert schema.behaviour_types == ("r1", "r2", "r3", "r4", "r5")
    assert [f.name for f in schema.user_fields] == [
        "user_id",
        "age",
        "gender",
        "occupation",
        "zip_prefix",
    ]
    assert schema.extra["counts"]["negatives"] == 0 and schema.label["label_threshold"] == 4.0
    train = rows(out, "train")
    order = np.lexsort((train["timestamp"], train["user_key"]))
    np.testing.assert_array_equal(train["label"][order], [1, 0, 1])  # ratings 5, 3 and 4
    np.testing.assert_array_equal(train["target_type"][order], [2 + 4, 2 + 2, 2 + 3])
    age = prepare.Vocab.load(str(out), "age").keys.to_pylist()
    assert sorted(age) == ["18", "56"]
    zips = prepare.Vocab.load(str(out), "zip_prefix").keys.to_pylist()
    assert zips == ["85", "T8"]
    # Categories: item 10 -> Comedy (2), 20 -> Action (1, its first genre), 30 -> unknown (0).
    cats = prepare.Vocab.load(str(out), "category").keys.tolist()
    assert cats == [0, 1, 2]
    np.testing.assert_array_equal(train["item"][order][:, 1], [2 + 2, 2 + 1, 2 + 2])
    valid = rows(out, "valid")  # user 1 at t=300 rated 30 (r1): history 20@200, 10@100
    np.testing.assert_array_equal(valid["hist"][0, :2, :3], [[3, 3, 2 + 2], [2, 4, 2 + 4]])
    assert valid["label"][0] == 0
    audit.audit_leakage(str(out))


def _events_table() -> dict[str, list]:
    return {
        "uid": ["a", "a", "b", "a", "b", "c"],
        "sku": ["x", "y", "x", "z", "y", "x"],
        "act": ["click", "click", "click", "order", "order", "click"],
        "ts": [10, 20, 15, 30, 40, 5],
        "price": [1.0, 2.5, 1.0, 9.0, 2.5, 1.0],
    }


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_generic_events_with_string_ids_side_tables_and_value_label(tmp_path, fmt):
    t = _events_table()
    if fmt == "csv":
        body = [";".join(map(str, r)) for r in zip(*t.values(), strict=True)]
        lines = ["uid;sku;act;ts;price", *body]
        path = write(tmp_path / "ev.csv", "\n".join(lines) + "\n")
    else:
        path = str(tmp_path / "ev.parquet")
        pq.write_table(pa.table(t), path)
    write(tmp_path / "users.csv", "uid;country;tier\na;FR;gold\nb;DE;gold\n")
    src = readers.open_source(
        "events",
        path,
        user="uid",
        item="sku",
        behaviour="act",
        timestamp="ts",
        value="price",
        behaviour_types=("click", "order"),
        delimiter=";",
        string_ids=True,
        user_table=str(tmp_path / "users.csv"),
    )
    out = tmp_path / "p"
    schema = prepare.prepare(
        src,
        str(out),
        prepare.PrepareOptions(
            target_behaviours=("order",),
            neg_ratio=0,
            label_threshold=5.0,
            valid_start=35,
            test_start=100,
        ),
    )
    assert [f.name for f in schema.user_fields] == ["user_id", "country", "tier"]
    assert schema.splits["train"]["rows"] == 1 and schema.splits["valid"]["rows"] == 1
    train, valid = rows(out, "train"), rows(out, "valid")
    assert train["label"][0] == 1 and valid["label"][0] == 0  # price 9.0 and 2.5 vs 5.0
    users = prepare.Vocab.load(str(out), "user_id")
    assert users.keys.to_pylist() == ["a", "b", "c"]
    np.testing.assert_array_equal(train["user"][0], [2, 2 + 1, 2])  # a: FR, gold
    np.testing.assert_array_equal(train["hist"][0, :3, 0], [3, 2, 0])  # y@20, x@10
    c = prepare.Vocab.load(str(out), "country").lookup(pa.array(["DE", "US"]))
    assert c.tolist() == [2, 1]
    if fmt == "csv":
        with pytest.raises(DataError, match=r"ev\.csv: missing column\(s\) \['when'\]"):
            readers.open_source(
                "events",
                path,
                user="uid",
                item="sku",
                behaviour="act",
                timestamp="when",
                behaviour_types=("click",),
                delimiter=";",
                string_ids=True,
            ).chunks(1 << 20, readers.Tally(False)).__next__()


def test_events_parquet_bad_timestamp_names_the_row(tmp_path):
    t = _events_table()
    t["ts"] = [str(v) for v in t["ts"]]
    t["ts"][3] = "later"
    pq.write_table(pa.table(t), tmp_path / "ev.parquet")
    src = readers.open_source(
        "events",
        str(tmp_path / "ev.parquet"),
        user="uid",
        item="sku",
        behaviour="act",
        timestamp="ts",
        behaviour_types=("click", "order"),
        string_ids=True,
    )
    with pytest.raises(DataError, match=r"ev\.parquet:row 4: non-integer timestamp"):
        prepare.prepare(src, str(tmp_path / "p"), prepare.PrepareOptions())
    schema = prepare.prepare(src, str(tmp_path / "p"), prepare.PrepareOptions(lenient=True))
    assert schema.extra["counts"]["skipped_bad_timestamp"] == 1
    assert len(ExampleStore(str(tmp_path / "p"), "train")) >= 1


def _timed_log(tmp_path, when: list[str], **kw) -> readers.EventSource:
    """A small events CSV whose `day` column holds `when` (one row per value)."""
    body = [f"u{k % 2},i{k % 3},{'buy' if k % 2 else 'view'},{w}" for k, w in enumerate(when)]
    path = write(tmp_path / "ev.csv", "\n".join(["who,what,kind,day", *body]) + "\n")
    return readers.open_source(
        "events",
        path,
        user="who",
        item="what",
        behaviour="kind",
        timestamp="day",
        behaviour_types=("view", "buy"),
        string_ids=True,
        **kw,
    )


def _times(src: readers.EventSource, lenient: bool = False) -> tuple[list[int], readers.Tally]:
    tally = readers.Tally(lenient)
    ts = [int(t) for c in src.chunks(1 << 20, tally) for t in c.timestamp]
    return ts, tally


@pytest.mark.parametrize("gz", [False, True], ids=["csv", "gzip"])
def test_a_bad_row_is_shown_as_the_file_has_it_on_its_line(tmp_path, gz):
    """A quoted field holding a line break (and CRLF line ends) before the bad row: the error
    names the bad row's own line and quotes the file's text, unread columns included."""
    text = (
        'who,note,what,kind,day\r\n1,"two\r\nlines",5,view,100\r\n\r\n'
        '2,plain,6,view,101\r\n3,"kept, too",7,vieww,102\r\n4,x,8,view,103\r\n'
    )
    path = tmp_path / ("ev.csv.gz" if gz else "ev.csv")
    path.write_bytes(gzip.compress(text.encode()) if gz else text.encode())
    src = readers.open_source(
        "events", str(path), user="who", item="what", behaviour="kind", timestamp="day",
        behaviour_types=("view", "buy"),
    )  # fmt: skip
    want = r"ev\.csv(\.gz)?:6: unknown behaviour type: kind = 'vieww'.* "
    want += r"\(row '3,\"kept, too\",7,vieww,102'\)"
    with pytest.raises(DataError, match=want):
        _times(src)


def _unix(*args, tz: dt.tzinfo = dt.UTC) -> int:
    return int(dt.datetime(*args, tzinfo=tz).timestamp())


SHANGHAI, PLUS8 = zoneinfo.ZoneInfo("Asia/Shanghai"), dt.timezone(dt.timedelta(hours=8))
TIME_CASES = {  # time_format, time_zone, values, unix seconds
    "unix_s": ("unix_s", "UTC", ["1672876800", " +1672876801 "], [1672876800, 1672876801]),
    "unix_ms": ("unix_ms", "UTC", ["1672876800999", "-1"], [1672876800, -1]),  # floored
    "iso8601": (
        "iso8601",
        "Asia/Shanghai",
        [
            "2023-01-05T10:20:30",  # no offset: in --time_zone
            "2023-01-05 10:20:30.75Z",  # fraction dropped
            "2023-01-31T23:59:59+02:00",
            "2023-01-05T10:20:30-0530",
            "2023-02-01",
            "2023-07-01T12:00",
        ],
        [
            _unix(2023, 1, 5, 10, 20, 30, tz=SHANGHAI),
            _unix(2023, 1, 5, 10, 20, 30),
            _unix(2023, 1, 31, 23, 59, 59, tz=dt.timezone(dt.timedelta(hours=2))),
            _unix(2023, 1, 5, 10, 20, 30, tz=dt.timezone(-dt.timedelta(hours=5, minutes=30))),
            _unix(2023, 2, 1, tz=SHANGHAI),
            _unix(2023, 7, 1, 12, tz=SHANGHAI),
        ],
    ),
    "yyyymmdd": (
        "yyyymmdd",
        "+08:00",
        ["20230131", "20230201", "20240229", "20231231"],
        [
            _unix(2023, 1, 31, tz=PLUS8),
            _unix(2023, 2, 1, tz=PLUS8),
            _unix(2024, 2, 29, tz=PLUS8),
            _unix(2023, 12, 31, tz=PLUS8),
        ],
    ),  # fmt: skip
    "pattern": (
        "%d/%m/%Y %H:%M",
        "America/New_York",
        ["05/01/2023 10:20", "05/07/2023 10:20"],  # winter and summer time
        [
            _unix(2023, 1, 5, 10, 20, tz=zoneinfo.ZoneInfo("America/New_York")),
            _unix(2023, 7, 5, 10, 20, tz=zoneinfo.ZoneInfo("America/New_York")),
        ],
    ),  # fmt: skip
}


@pytest.mark.parametrize("case", sorted(TIME_CASES))
def test_events_time_formats_read_as_unix_seconds(tmp_path, case):
    fmt, zone, values, want = TIME_CASES[case]
    got, _ = _times(_timed_log(tmp_path, values, time_format=fmt, time_zone=zone))
    assert got == want
    if case == "yyyymmdd":  # a month boundary is one day
        assert got[1] - got[0] == 86400 and got[0] == _unix(2023, 1, 30, 16)


@pytest.mark.parametrize(
    "fmt,bad",
    [("yyyymmdd", "20231305"), ("yyyymmdd", "20230229"), ("yyyymmdd", "2023-01-05"),
     ("iso8601", "2023-02-30T10:00:00"), ("iso8601", "05/01/2023"), ("unix_ms", "1.5e12"),
     ("%d/%m/%Y", "2023-01-05")],
)  # fmt: skip
def test_a_timestamp_not_in_the_format_names_the_line_or_is_counted_when_lenient(
    tmp_path, fmt, bad
):
    good = {"yyyymmdd": "20230105", "iso8601": "2023-01-05", "unix_ms": "1672876800000"}
    good = good.get(fmt, "05/01/2023")
    src = _timed_log(tmp_path, [good, good, bad, good], time_format=fmt)
    want = rf"ev\.csv:4: timestamp not in format {fmt}: day = '{bad}' \(row '.*{bad}'\)"
    with pytest.raises(DataError, match=want + ".*--lenient"):
        _times(src)
    got, tally = _times(src, lenient=True)
    assert len(got) == 3 and tally.counts["bad_timestamp"] == 1
    opts = prepare.PrepareOptions(lenient=True, neg_ratio=0, valid_start=2**40, test_start=2**41)
    schema = prepare.prepare(src, str(tmp_path / "p"), opts)
    assert schema.extra["counts"]["skipped_bad_timestamp"] == 1
    assert schema.extra["source_options"]["time_format"] == fmt


def test_events_parquet_iso_strings_and_timestamp_columns(tmp_path):
    t = _events_table()
    t["ts"] = [f"2023-01-05T00:00:{v:02d}Z" for v in t["ts"]]
    t["ts"][3] = "2023-01-05T25:00:00Z"
    pq.write_table(pa.table(t), tmp_path / "ev.parquet")
    kw = dict(user="uid", item="sku", behaviour="act", timestamp="ts", string_ids=True)
    kw["behaviour_types"] = ("click", "order")
    src = readers.open_source("events", str(tmp_path / "ev.parquet"), time_format="iso8601", **kw)
    with pytest.raises(DataError, match=r"ev\.parquet:row 4: timestamp not in format iso8601"):
        _times(src)
    assert _times(src, lenient=True)[0] == [_unix(2023, 1, 5, 0, 0, s) for s in (10, 20, 15, 40, 5)]
    # A real timestamp column is absolute: --time_format and --time_zone leave it as it is.
    t["ts"] = pa.array([_unix(2023, 1, 5) + v for v in range(6)], pa.timestamp("s", tz="UTC"))
    pq.write_table(pa.table(t), tmp_path / "ev.parquet")
    src = readers.open_source(
        "events", str(tmp_path / "ev.parquet"), time_format="yyyymmdd", time_zone="+08:00", **kw
    )
    assert _times(src)[0] == [_unix(2023, 1, 5) + v for v in range(6)]


def test_unix_seconds_that_look_like_dates_warn_once(tmp_path, caplog):
    src = _timed_log(tmp_path, ["20230105", "20230106", "20221231"])
    with caplog.at_level("WARNING"):
        got, _ = _times(src)
        _times(src)
    assert got == [20230105, 20230106, 20221231]  # still read as asked
    warnings = [r for r in caplog.records if "--time_format=yyyymmdd" in r.getMessage()]
    assert len(warnings) == 1 and "looks like a YYYYMMDD date" in warnings[0].getMessage()
    caplog.clear()
    with caplog.at_level("WARNING"):
        _times(_timed_log(tmp_path, ["20230105", "1672876800"]))  # not all of them
        _times(_timed_log(tmp_path, ["20231305"]))  # month 13: not a date
    assert "--time_format" not in caplog.text


def test_unknown_time_format_or_zone_is_one_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"--time_format: unknown format 'dd-mm-yyyy'.*iso8601"):
        _timed_log(tmp_path, ["1"], time_format="dd-mm-yyyy")
    with pytest.raises(DataError, match=r"--time_zone: unknown time zone 'Mars/Olympus'"):
        _timed_log(tmp_path, ["1"], time_format="iso8601", time_zone="Mars/Olympus")


def test_bad_side_table_rows_show_their_text_and_line(tmp_path):
    ev = write(tmp_path / "ev.csv", "uid,sku,act,ts\na,x,click,10\nb,y,order,20\n")
    kw = dict(user="uid", item="sku", behaviour="act", timestamp="ts", string_ids=True)
    kw |= dict(behaviour_types=("click", "order"), user_table=str(tmp_path / "users.csv"))
    write(tmp_path / "users.csv", "uid,country\na,FR\nb,DE,extra\n")
    with pytest.raises(DataError, match=r"users\.csv:3: .*got 3 \(row 'b,DE,extra'\)"):
        readers.open_source("events", ev, **kw)
    (tmp_path / "users.csv").write_bytes(b"uid,country\na,FR\nb,D\xffE\n")
    with pytest.raises(DataError, match=r"users\.csv:3: not UTF-8 text .*'b,D\ufffdE'"):
        readers.open_source("events", ev, **kw)


@pytest.mark.parametrize("source", ["taobao", "retailrocket", "events"])
def test_a_folder_as_input_is_one_clear_error(tmp_path, source):
    kw = {}
    if source == "events":
        kw = dict(user="u", item="i", behaviour="b", timestamp="t", behaviour_types=("pv",))
    src = readers.open_source(source, str(tmp_path), **kw)
    with pytest.raises(DataError, match=rf"--input=.*: is a folder; {source} expects a file: "):
        prepare.prepare(src, str(tmp_path / "p"), prepare.PrepareOptions())
    with pytest.raises(DataError, match="is a folder, not a file"):  # other readers of logs
        readers.read_header(str(tmp_path), ",")


def test_output_is_never_a_user_folder_an_input_or_a_sibling(tmp_path):
    log = write(tmp_path / "log.csv", LOG)
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("important")
    with pytest.raises(DataError, match=r"--output=.*mine: a folder that is not this tool's"):
        run(log, mine)
    assert os.listdir(mine) == ["notes.txt"]
    with pytest.raises(DataError, match=r"--output=.*log\.csv is --input=.*log\.csv"):
        run(log, log)
    with pytest.raises(DataError, match=r"--output=.* holds --input=.*log\.csv"):
        run(log, tmp_path)
    assert open(log).read() == LOG
    # A prepared dataset is replaced; a sibling named like the old fixed `<output>.old` is not.
    (tmp_path / "p.old").mkdir()
    (tmp_path / "p.old" / "keep.txt").write_text("someone's")
    run(log, tmp_path / "p", max_len=3)
    run(log, tmp_path / "p", max_len=2)
    assert Schema.load(str(tmp_path / "p")).max_len == 2
    assert (tmp_path / "p.old" / "keep.txt").read_text() == "someone's"
    assert sorted(os.listdir(tmp_path)) == ["log.csv", "mine", "p", "p.old"]
    # ... but not one that a run was trained into: its files are not the dataset's.
    (tmp_path / "p" / "train.log").write_text("a run's")
    with pytest.raises(DataError, match=r"--output=.*p: holds train\.log beside a prepared"):
        run(log, tmp_path / "p", max_len=3)
    assert Schema.load(str(tmp_path / "p")).max_len == 2
    assert (tmp_path / "p" / "train.log").read_text() == "a run's"


def test_prepare_data_refuses_an_output_over_its_input_before_reading(tmp_path):
    log = write(tmp_path / "log.csv", LOG)
    args = ["--source=taobao", f"--input={log}", f"--output={log}"]
    r = helpers.run_tool("prepare_data", *args, timeout=120)
    assert r.returncode == 1 and "--output=" in r.stderr and "is --input=" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and open(log).read() == LOG


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"max_len": 0}, "--max_len must be at least 1, not 0"),
        ({"memory_mb": 10}, "--memory_mb must be at least 64, not 10"),
        ({"neg_ratio": -1}, "--neg_ratio must be at least 0, not -1"),
        ({"min_count": 0}, "--min_count must be at least 1, not 0"),
    ],
)
def test_an_option_out_of_range_names_its_flag(tmp_path, kw, says):
    src = readers.open_source("taobao", write(tmp_path / "log.csv", LOG))
    with pytest.raises(DataError, match=f"^{says}$"):
        prepare.prepare(src, str(tmp_path / "p"), prepare.PrepareOptions(min_timestamp=0, **kw))
    assert not (tmp_path / "p").exists()


def test_a_log_without_events_names_its_file(tmp_path):
    log = write(tmp_path / "log.csv", LOG)
    opts = prepare.PrepareOptions(min_timestamp=10**10)  # every event before the window
    with pytest.raises(DataError, match=rf"^{log}: no events to prepare \(11 valid rows, 11 out"):
        prepare.prepare(readers.open_source("taobao", log), str(tmp_path / "p"), opts)


def test_a_header_line_in_a_headerless_source_is_named_as_one(tmp_path):
    path = write(
        tmp_path / "log.csv", "user_id,item_id,category_id,behavior_type,timestamp\n" + LOG
    )
    with pytest.raises(DataError, match=r"log\.csv:1: .*user_id = 'user_id'.*is line 1 a header\?"):
        run(path, tmp_path / "out", max_len=3)
