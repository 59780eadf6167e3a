"""Reading raw event files: CSV (streamed with pyarrow; gzip by magic bytes, UTF-8 BOM, CRLF and
a missing final newline handled) and Parquet, validated into `EventChunk`s with the same roles
for every source. A malformed row raises one `DataError` naming the file and line, or with
`lenient` is counted in a `Tally` and skipped.
"""

from __future__ import annotations

import codecs
import collections
import csv
import dataclasses
import gzip
import os
import re
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from absl import logging

from influence_jax.data import timefmt
from influence_jax.data.schema import DataError

ROLES = ("user", "item", "behaviour", "timestamp", "category", "value")
TABLE_PREFIX = "table:"  # an input naming a table of Spark's catalog (--engine=spark only)
_INT_RE = r"^\s*[+-]?[0-9]{1,18}\s*$"
_FLOAT_RE = r"^\s*[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?\s*$"
REASONS = {
    "wrong_field_count": "wrong number of fields",
    "bad_id": "empty or non-integer id",
    "bad_timestamp": "non-integer timestamp",  # unix_s; other formats say which they expected
    "unknown_behaviour": "unknown behaviour type",
    "bad_value": "non-numeric value",
    "bad_encoding": "not UTF-8 text (shown as \ufffd)",
}
REPLACEMENT = "\ufffd"  # what an invalid UTF-8 byte of a CSV reads as (_ValidUtf8)


@dataclasses.dataclass
class EventChunk:
    """Validated events: ids are int64 (or string with `string_ids`) arrow arrays."""

    user: pa.Array
    item: pa.Array
    behaviour: np.ndarray  # int8, index into EventSource.behaviour_types
    timestamp: np.ndarray  # int64 unix seconds
    category: pa.Array | None = None
    value: np.ndarray | None = None  # float32

    def __len__(self) -> int:
        return len(self.timestamp)

    def take(self, mask: np.ndarray) -> EventChunk:
        keep = pa.array(mask)
        return EventChunk(
            user=self.user.filter(keep),
            item=self.item.filter(keep),
            behaviour=self.behaviour[mask],
            timestamp=self.timestamp[mask],
            category=None if self.category is None else self.category.filter(keep),
            value=None if self.value is None else self.value[mask],
        )


@dataclasses.dataclass
class SideTable:
    """Categorical features per user or item: `key` raw ids, `features` string columns."""

    key: pa.Array
    features: dict[str, pa.Array]
    category: pa.Array | None = None  # items only: the item's category (a raw id)
    numeric: tuple[str, ...] = ()  # feature columns bucketed by quantile (data/side.py)
    numeric_buckets: int = 10
    multi: dict[str, str] = dataclasses.field(default_factory=dict)  # bag column -> separator
    max_bag: int = 8  # values kept per multi-valued cell


@dataclasses.dataclass
class EventFile:
    """One delimited (or Parquet) log file and which of its columns play which role."""

    path: str
    roles: dict[str, str]  # role -> column name
    behaviour_values: tuple[str, ...]  # raw spellings, in behaviour_types order
    names: tuple[str, ...] | None = None  # column names when the file has no header
    delimiter: str = ","
    quoted: bool = True
    time_format: str = "unix_s"  # a name of timefmt.TIME_FORMATS or a strptime pattern
    time_zone: str = "UTC"  # of timestamps without their own offset (not unix_s/unix_ms)
    warned_dates: bool = dataclasses.field(default=False, repr=False, compare=False)


class Tally:
    """Counts of skipped rows by reason; in strict mode the first bad row raises instead."""

    def __init__(self, lenient: bool):
        self.lenient = lenient
        self.counts: collections.Counter[str] = collections.Counter()

    def as_dict(self) -> dict[str, int]:
        return {k: int(v) for k, v in sorted(self.counts.items())}


# How a row error ends; a reader without a lenient mode (rank's --events) replaces it.
FIX_ROW = "Fix or delete the row"
LENIENT_ADVICE = ", or pass --lenient to count and skip malformed rows."


def fail_row(path: str, line: int | str, reason: str, text: str, detail: str = "") -> DataError:
    text = text if len(text) <= 200 else text[:200] + "..."  # a runaway row (e.g. a lost quote)
    what = f"{detail} (row {text!r})" if detail else repr(text)
    return DataError(
        f"{path}:{line}: {REASONS.get(reason, reason)}: {what}. {FIX_ROW}{LENIENT_ADVICE}"
    )


def _reason(f: EventFile, reason: str) -> str:
    """The message of `reason` for this file (a bad timestamp names the format expected)."""
    if reason == "bad_timestamp":
        return timefmt.describe(f.time_format)
    return REASONS.get(reason, reason)


def _detail(
    f: EventFile, by_role: dict[str, pa.Array], reason: str, i: int, string_ids: bool = False
) -> str:
    """The field and value at fault, where one field is (an unknown behaviour spelling, a
    timestamp not in the format given, an id that is empty or not an integer), with the flag
    that reads other values where one does."""
    if reason == "bad_timestamp":
        value = by_role["timestamp"][i].as_py()
        hint = ", not unix seconds (--time_format for other formats)"
        return f"{f.roles['timestamp']} = {value!r}" + (hint if f.time_format == "unix_s" else "")
    if reason == "bad_id":
        for role in ("user", "item", "category"):
            if role not in by_role:
                continue
            value = by_role[role][i].as_py()
            text = "" if value is None else str(value).strip()
            if not text:
                return f"{f.roles[role]} is empty"
            if not string_ids and not re.match(_INT_RE, text):
                return (
                    f"{f.roles[role]} = {value!r}, not an integer (ids that are text: "
                    "--string_ids, with --source=events)"
                )
        return ""
    if reason != "unknown_behaviour":
        return ""
    column = f.roles.get("behaviour", "behaviour")
    value = by_role["behaviour"][i].as_py()
    return f"{column} = {value!r}, not one of {', '.join(f.behaviour_values)}"


def _warn_if_dates(f: EventFile, chunk: EventChunk) -> None:
    """Unix seconds that all read as YYYYMMDD dates are most likely dates: say so once."""
    if f.warned_dates or f.time_format != "unix_s" or not timefmt.looks_like_dates(chunk.timestamp):
        return
    f.warned_dates = True
    logging.warning(
        "%s: every timestamp in column %r looks like a YYYYMMDD date (e.g. %d), not unix "
        "seconds (August 1970); if they are dates, pass --time_format=yyyymmdd",
        f.path,
        f.roles.get("timestamp", "timestamp"),
        int(chunk.timestamp[0]),
    )


def wrong_field_count(path: str, skipped: dict[int, tuple[str, str]]) -> DataError:
    """The error for the first row with a wrong field count (`skipped`: csv_batches')."""
    line = min(skipped)
    detail, text = skipped[line]
    return fail_row(path, line, "wrong_field_count", text, detail)


def _check_file(path: str) -> None:
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a file")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")


def open_stream(path: str) -> pa.NativeFile:
    """Opens `path` for reading, decompressing gzip whatever its extension."""
    _check_file(path)
    with open(path, "rb") as f:
        magic = f.read(2)
    if not magic:
        raise DataError(f"{path}: empty file")
    return pa.input_stream(path, compression="gzip" if magic == b"\x1f\x8b" else None)


def read_header(path: str, delimiter: str) -> tuple[str, ...]:
    """The first line's column names (BOM and CRLF stripped)."""
    _check_file(path)
    try:
        with gzip.open(path, "rb") if _is_gzip(path) else open(path, "rb") as f:
            line = f.readline()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read header ({e}); is the gzip file truncated?") from None
    text = line.decode("utf-8-sig", errors="replace").rstrip("\r\n")
    if not text:
        raise DataError(f"{path}: empty file (expected a header line)")
    return tuple(c.strip() for c in text.split(delimiter))


class _ValidUtf8:
    """A byte stream (for pa.PythonFile) with each invalid UTF-8 sequence replaced by U+FFFD.

    pyarrow fails a whole read on a field that is not UTF-8, and decodes a row with a wrong
    field count strictly for `invalid_row_handler` (an invalid byte there prints "Exception
    ignored" and fails the read too). Replaced, such a row parses; `iter_file` then counts
    or reports it by its line (bad_encoding). ASCII blocks, the usual case, pass as they are.
    """

    def __init__(self, raw: pa.NativeFile):
        self.raw = raw
        self.decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.pending = b""  # decoded bytes beyond what the last read asked for
        self.closed = False

    def read(self, n: int = -1) -> bytes:
        while n < 0 or len(self.pending) < n:
            data = self.raw.read(-1 if n < 0 else max(n, 1 << 16))
            if data.isascii() and not self.decoder.getstate()[0]:
                self.pending += data
            else:  # a multi-byte character may straddle two reads: the decoder keeps its head
                self.pending += self.decoder.decode(data, final=not data).encode()
            if not data or n < 0:
                break
        out = self.pending if n < 0 else self.pending[:n]
        self.pending = self.pending[len(out) :]
        return out

    def close(self) -> None:
        self.raw.close()
        self.closed = True


def csv_batches(
    f: EventFile,
    cols: list[str],
    block_bytes: int,
    skipped: dict[int, tuple[str, str]],
    encoding: str = "utf8",
) -> Iterator[tuple[pa.RecordBatch, int]]:
    """Yields (batch of string columns, header lines). Rows with a wrong field count are
    skipped and put in `skipped`: physical line -> ("expected N fields, got M", row text).
    Invalid UTF-8 reads as U+FFFD (REPLACEMENT). Parsing is serial: pyarrow only knows line
    numbers then, and with small blocks it is as fast as threaded here."""
    if f.names is None:
        names, header = read_header(f.path, f.delimiter), 1
    else:
        names, header = f.names, 0
    cols = list(dict.fromkeys(cols))  # one column may play two roles
    cols.sort(key=lambda c: names.index(c) if c in names else -1)  # file order
    missing = [c for c in cols if c not in names]
    if missing:
        raise DataError(f"{f.path}: missing column(s) {missing}; the file has {list(names)}")

    def on_invalid(row) -> str:
        what = f"expected {row.expected_columns} fields, got {row.actual_columns}"
        skipped[row.number] = (what, row.text)
        return "skip"

    try:
        stream = open_stream(f.path)
        if encoding == "utf8":
            stream = pa.PythonFile(_ValidUtf8(stream), mode="r")
        reader = pcsv.open_csv(
            stream,
            read_options=pcsv.ReadOptions(
                column_names=list(names),
                skip_rows=header,
                block_size=block_bytes,
                use_threads=False,
                encoding=encoding,
            ),
            parse_options=pcsv.ParseOptions(
                delimiter=f.delimiter,
                ignore_empty_lines=False,
                quote_char='"' if f.quoted else False,
                invalid_row_handler=on_invalid,
            ),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in cols}, include_columns=cols
            ),
        )
        for batch in reader:
            yield batch, header
    except (pa.ArrowInvalid, OSError, EOFError) as e:
        msg = str(e)
        if "Empty CSV" in msg:
            raise DataError(f"{f.path}: empty file") from None
        if "ompress" in msg or isinstance(e, EOFError):
            msg += "; the gzip file is truncated or corrupt"
        raise DataError(f"{f.path}: cannot parse ({msg})") from None


def parse_int(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """Strings or ints -> (int64 values, valid mask)."""
    if pa.types.is_integer(arr.type):
        ok = np.asarray(arr.is_valid())
        return np.asarray(arr.cast(pa.int64()).fill_null(0)), ok
    if pa.types.is_timestamp(arr.type):
        ok = np.asarray(arr.is_valid())
        secs = pc.cast(arr, pa.timestamp("s"), safe=False).cast(pa.int64()).fill_null(0)
        return np.asarray(secs), ok
    arr = arr.cast(pa.string())
    try:
        return np.asarray(arr.cast(pa.int64())), np.ones(len(arr), bool)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        pass
    ok = pc.fill_null(pc.match_substring_regex(arr, _INT_RE), False)
    clean = pc.replace_substring_regex(pc.utf8_trim_whitespace(arr), r"^\+", "")
    vals = pc.if_else(ok, clean, "0").cast(pa.int64())
    return np.asarray(vals), np.asarray(ok)


def parse_time(arr: pa.Array, time_format: str, time_zone: str) -> tuple[np.ndarray, np.ndarray]:
    """Timestamps in `time_format` (timefmt.py) -> (int64 unix seconds, valid mask). Columns of
    a timestamp type are absolute and read as they are."""
    if pa.types.is_timestamp(arr.type) or time_format in ("unix_s", "unix_ms"):
        secs, ok = parse_int(arr)
        if time_format == "unix_ms" and not pa.types.is_timestamp(arr.type):
            secs = secs // 1000  # floors, before 1970 too
        return secs, ok
    return timefmt.parse(arr, time_format, time_zone)


def parse_float(arr: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    if not pa.types.is_string(arr.type) and not pa.types.is_large_string(arr.type):
        vals = np.asarray(arr.cast(pa.float64()).fill_null(np.nan))
        return vals.astype(np.float32), np.isfinite(vals)
    ok = pc.fill_null(pc.match_substring_regex(arr, _FLOAT_RE), False)
    vals = np.asarray(pc.if_else(ok, pc.utf8_trim_whitespace(arr), "nan").cast(pa.float64()))
    return vals.astype(np.float32), np.asarray(ok) & np.isfinite(vals)


def parse_id(arr: pa.Array, string_ids: bool) -> tuple[pa.Array, np.ndarray]:
    if string_ids:
        arr = pc.utf8_trim_whitespace(arr.cast(pa.string()))
        return arr, np.asarray(pc.fill_null(pc.greater(pc.utf8_length(arr), 0), False))
    vals, ok = parse_int(arr)
    return pa.array(vals), ok


def convert(
    cols: dict[str, pa.Array],
    f: EventFile,
    string_ids: bool,
) -> tuple[EventChunk, np.ndarray, dict[str, np.ndarray]]:
    """Role columns -> (chunk of all rows, blank-row mask, {reason: bad-row mask})."""
    n = len(cols["timestamp"])
    blank = np.ones(n, bool)
    for a in cols.values():
        if pa.types.is_string(a.type):
            blank &= np.asarray(pc.fill_null(pc.equal(pc.utf8_length(a), 0), True))
        else:
            blank &= np.asarray(a.is_null())
    user, ok_u = parse_id(cols["user"], string_ids)
    item, ok_i = parse_id(cols["item"], string_ids)
    bad = {"bad_id": ~(ok_u & ok_i)}
    ts, ok_t = parse_time(cols["timestamp"], f.time_format, f.time_zone)
    bad["bad_timestamp"] = ~ok_t
    raw_b = pc.utf8_trim_whitespace(cols["behaviour"].cast(pa.string()))
    code = pc.index_in(raw_b, value_set=pa.array(list(f.behaviour_values)))
    bad["unknown_behaviour"] = np.asarray(code.is_null())
    beh = np.asarray(code.fill_null(0)).astype(np.int8)
    category = value = None
    if "category" in cols:
        category, ok_c = parse_id(cols["category"], string_ids)
        bad["bad_id"] |= ~ok_c
    if "value" in cols:
        value, ok_v = parse_float(cols["value"])
        bad["bad_value"] = ~ok_v
    for m in bad.values():
        m &= ~blank
    return EventChunk(user, item, beh, ts, category, value), blank, bad


def flag_encoding(by_role: dict[str, pa.Array], blank: np.ndarray, bad: dict) -> None:
    """Marks rows with invalid UTF-8 (read as REPLACEMENT) in a role column as bad_encoding,
    and for that reason only: the garbled value breaks no other rule of its own."""
    enc = np.zeros(len(blank), bool)
    for a in by_role.values():
        if pa.types.is_string(a.type):
            enc |= np.asarray(pc.fill_null(pc.match_substring(a, REPLACEMENT), False))
    if enc.any():
        for m in bad.values():
            m &= ~enc
        bad["bad_encoding"] = enc


def _row_text(batch: pa.RecordBatch, i: int, delimiter: str) -> str:
    return delimiter.join(str(a[i].as_py()) for a in batch.columns)


def _locate_row(
    f: EventFile, row: int, header: int, skipped: dict[int, tuple[str, str]]
) -> tuple[int, str] | None:
    """(first physical line, the file's text) of data row `row` (0-based over the rows the
    parser kept), read again from the file: exact where a quoted field holds a newline and
    with every column, not only those read. Only on the way to an error; None when the file
    cannot be read again."""
    lines: list[str] = []

    def raw():
        opener = gzip.open if _is_gzip(f.path) else open
        with opener(f.path, "rt", encoding="utf-8-sig", errors="replace", newline="") as fh:
            for ln in fh:
                lines.append(ln)
                yield ln

    quoting = {"quotechar": '"'} if f.quoted else {"quoting": csv.QUOTE_NONE}
    start, kept = 1, -1
    try:
        reader = csv.reader(raw(), delimiter=f.delimiter, strict=False, **quoting)
        for record_no, _ in enumerate(reader):
            text, first = "".join(lines).rstrip("\r\n"), start
            lines.clear()
            start = reader.line_num + 1
            if record_no < header or first in skipped:
                continue
            kept += 1
            if kept == row:
                return first, text
    except (OSError, EOFError, csv.Error):
        return None
    return None


def _is_gzip(path: str) -> bool:
    with open(path, "rb") as fh:
        return fh.read(2) == b"\x1f\x8b"


def _physical_line(row: int, header: int, skipped: dict[int, tuple[str, str]]) -> int:
    """Line number of data row `row` (0-based over rows the parser kept)."""
    line = header + row + 1
    for s in sorted(skipped):
        if s <= line:
            line += 1
    return line


def iter_file(
    f: EventFile,
    string_ids: bool,
    block_bytes: int,
    tally: Tally,
) -> Iterator[EventChunk]:
    """Validated chunks of one file; malformed rows raise or are tallied and dropped."""
    cols = {r: f.roles[r] for r in ROLES if r in f.roles}
    if f.path.endswith(".parquet") or f.path.endswith(".pq"):
        yield from _iter_parquet(f, cols, string_ids, block_bytes, tally)
        return
    skipped: dict[int, tuple[str, str]] = {}  # lines with a wrong field count (csv_batches)
    rows = 0
    for batch, header in csv_batches(f, list(cols.values()), block_bytes, skipped):
        by_role = {r: batch.column(c) for r, c in cols.items()}
        chunk, blank, bad = convert(by_role, f, string_ids)
        flag_encoding(by_role, blank, bad)
        tally.counts["blank_lines"] += int(blank.sum())
        if not tally.lenient:
            # The first bad line so far: a bad value in this batch or a skipped line up to it
            # (line, reason, data row or -1, text, detail).
            last = _physical_line(rows + batch.num_rows - 1, header, skipped)
            cands = [(s, "wrong_field_count", -1, *skipped[s][::-1]) for s in skipped if s <= last]
            for reason, m in bad.items():
                if m.any():
                    i = int(np.argmax(m))
                    cands.append(
                        (
                            _physical_line(rows + i, header, skipped),
                            reason,
                            rows + i,
                            _row_text(batch, i, f.delimiter),
                            _detail(f, by_role, reason, i, string_ids),
                        )
                    )
            if cands:
                line, reason, row, text, detail = min(cands)
                if row >= 0:  # the row as the file has it, and its line
                    line, text = _locate_row(f, row, header, skipped) or (line, text)
                if line == 1 and not header and reason in ("bad_id", "bad_timestamp"):
                    detail += "; is line 1 a header? Files of this source have none"
                raise fail_row(f.path, line, _reason(f, reason), text, detail)
        for reason, m in bad.items():
            tally.counts[reason] += int(m.sum())
        rows += batch.num_rows
        drop = blank | np.logical_or.reduce(list(bad.values()))
        chunk = chunk.take(~drop) if drop.any() else chunk
        _warn_if_dates(f, chunk)
        yield chunk
    if skipped and not tally.lenient:
        raise wrong_field_count(f.path, skipped)
    tally.counts["wrong_field_count"] += len(skipped)


def _iter_parquet(
    f: EventFile, cols: dict[str, str], string_ids: bool, block_bytes: int, tally: Tally
) -> Iterator[EventChunk]:
    try:
        pf = pq.ParquetFile(f.path)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{f.path}: cannot read Parquet ({e})") from None
    missing = [c for c in cols.values() if c not in pf.schema_arrow.names]
    if missing:
        raise DataError(
            f"{f.path}: missing column(s) {missing}; the file has {pf.schema_arrow.names}"
        )
    row0 = 0
    for batch in pf.iter_batches(
        batch_size=max(1024, block_bytes // 64), columns=list(cols.values())
    ):
        by_role = {r: batch.column(c) for r, c in cols.items()}
        chunk, blank, bad = convert(by_role, f, string_ids)
        for reason, m in bad.items():
            if m.any() and not tally.lenient:
                i = int(np.argmax(m))
                text = _row_text(batch, i, f.delimiter)
                detail = _detail(f, by_role, reason, i, string_ids)
                raise fail_row(f.path, f"row {row0 + i + 1}", _reason(f, reason), text, detail)
            tally.counts[reason] += int(m.sum())
        row0 += batch.num_rows
        drop = blank | np.logical_or.reduce(list(bad.values()))
        chunk = chunk.take(~drop) if drop.any() else chunk
        _warn_if_dates(f, chunk)
        yield chunk
