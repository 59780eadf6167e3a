"""The raw sources: Taobao UserBehavior, MovieLens 100K, Retailrocket CML and a generic events
CSV/Parquet log with a column mapping, each an `EventSource` (event files, behaviour types,
optional user/item side tables and per-source defaults).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from influence_jax.data import timefmt
from influence_jax.data.logio import (
    REPLACEMENT,
    EventChunk,
    EventFile,
    SideTable,
    Tally,
    csv_batches,
    fail_row,
    iter_file,
    parse_id,
    parse_int,
    read_header,
    wrong_field_count,
)
from influence_jax.data.schema import DataError


@dataclasses.dataclass
class EventSource:
    """A raw dataset: event files, behaviour types, side tables and per-source defaults."""

    name: str
    files: list[EventFile]
    behaviour_types: tuple[str, ...]
    string_ids: bool = False
    user_table: SideTable | None = None
    item_table: SideTable | None = None
    defaults: dict[str, object] = dataclasses.field(default_factory=dict)
    notes: dict[str, object] = dataclasses.field(default_factory=dict)
    # The behaviour type spells out the event's value (MovieLens: r1..r5 are the ratings), so a
    # label defined by a value threshold can be read off the target's type.
    behaviour_is_value: bool = False
    # The keyword options that reopen it with SOURCES[name].open(path, **options) (events: the
    # column mapping); saved in schema.json so tools/rank.py --events reads a log the same way.
    options: dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def has_event_category(self) -> bool:
        """Whether the category comes with each event (else maybe from the item table)."""
        return all("category" in f.roles for f in self.files)

    @property
    def has_value(self) -> bool:
        return all("value" in f.roles for f in self.files)

    def chunks(self, block_bytes: int, tally: Tally) -> Iterator[EventChunk]:
        for f in self.files:
            yield from iter_file(f, self.string_ids, block_bytes, tally)


def read_table(
    path: str, delimiter: str = ",", names: tuple[str, ...] | None = None, encoding: str = "utf8"
) -> pa.Table:
    """A whole small delimited (or Parquet) table as string columns; bad rows raise."""
    if path.endswith(".parquet") or path.endswith(".pq"):
        t = pq.read_table(path)
        return pa.table({c: t.column(c).cast(pa.string()) for c in t.column_names})
    cols = list(names or read_header(path, delimiter))
    f = EventFile(path, {}, (), names=names, delimiter=delimiter)
    skipped: dict[int, tuple[str, str]] = {}
    batches = [b for b, _ in csv_batches(f, cols, 1 << 24, skipped, encoding)]
    if skipped:
        raise wrong_field_count(path, skipped)
    t = pa.Table.from_batches(batches) if batches else None
    if t is not None and encoding == "utf8":  # invalid UTF-8 reads as REPLACEMENT
        garbled = [
            np.asarray(pc.fill_null(pc.match_substring(c, REPLACEMENT), False)) for c in t.columns
        ]
        bad = np.logical_or.reduce(garbled)
        if bad.any():
            i = int(np.argmax(bad))  # no line is skipped above and blank lines are still in
            text = delimiter.join(str(c[i]) for c in t.columns)
            raise fail_row(path, i + (1 if names else 2), "bad_encoding", text)
    if t is not None:  # drop blank lines (every field empty)
        empty = [np.asarray(pc.equal(pc.utf8_length(c), 0)) for c in t.columns]
        t = t.filter(pa.array(~np.logical_and.reduce(empty)))
    if t is None or t.num_rows == 0:
        raise DataError(f"{path}: no rows")
    return t


def side_table(
    path: str,
    key: str,
    columns: list[str] | None,
    delimiter: str = ",",
    string_ids: bool = False,
    *,
    names: tuple[str, ...] | None = None,
    category: str = "",
    numeric: tuple[str, ...] = (),
    numeric_buckets: int = 10,
    multi: dict[str, str] | None = None,
    max_bag: int = 8,
) -> SideTable:
    """A user or item side table: `key` column plus feature columns (data/side.py).

    Args:
      columns: the feature columns (default: every column but `key` and `category`).
      names: the column names of a table without a header line.
      category: items only: the column holding the item's category (the history's category
        channel, as an event log's category column would be).
      numeric: feature columns bucketed by quantile into `numeric_buckets` buckets (names
        that are not columns of this table are ignored).
      multi: multi-valued feature columns -> their value separator; up to `max_bag` values.
    """
    t = read_table(path, delimiter, names)
    multi = dict(multi or {})
    if key not in t.column_names:
        raise DataError(f"{path}: missing key column {key!r}; the file has {t.column_names}")
    columns = columns or [c for c in t.column_names if c not in (key, category)]
    wanted = [*columns, *([category] if category else [])]
    missing = [c for c in wanted if c not in t.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {t.column_names}")
    # The numeric and multi-valued names cover both tables: each keeps its own columns.
    numeric = tuple(c for c in numeric if c in columns)
    multi = {c: sep for c, sep in multi.items() if c in columns}
    both = set(numeric) & set(multi)
    if both:
        raise DataError(f"{path}: {sorted(both)} cannot be both numeric and multi-valued")
    if numeric_buckets < 2 or max_bag < 1:
        raise DataError("need --numeric_buckets >= 2 and --max_bag >= 1")
    ids, ok = parse_id(t.column(key).combine_chunks(), string_ids)
    if pc.count_distinct(ids).as_py() != len(ids):
        raise DataError(f"{path}: column {key!r} repeats ids; a side table needs one row per id")
    line0 = 1 if names else 2  # the first data row's line

    def checked(ok: np.ndarray, column: str) -> None:
        if not ok.all():
            bad = int(np.argmin(ok))
            raise fail_row(path, bad + line0, "bad_id", str(t.column(column)[bad]))

    checked(ok, key)
    cat = None
    if category:
        cat, ok = parse_id(t.column(category).combine_chunks(), string_ids)
        checked(ok, category)
    return SideTable(
        ids,
        {c: t.column(c).combine_chunks() for c in columns},
        category=cat,
        numeric=numeric,
        numeric_buckets=numeric_buckets,
        multi=multi,
        max_bag=max_bag,
    )


TAOBAO_COLUMNS = ("user_id", "item_id", "category_id", "behavior_type", "timestamp")
TAOBAO_BEHAVIOURS = ("pv", "cart", "fav", "buy")
# The official UserBehavior window (2017-11-25 00:00 to 2017-12-03 23:59:59, UTC+8).
TAOBAO_WINDOW = (1511539200, 1512316799)


def taobao(path: str) -> EventSource:
    roles = {
        "user": "user_id",
        "item": "item_id",
        "category": "category_id",
        "behaviour": "behavior_type",
        "timestamp": "timestamp",
    }
    f = EventFile(path, roles, TAOBAO_BEHAVIOURS, names=TAOBAO_COLUMNS, quoted=False)
    return EventSource(
        "taobao",
        [f],
        TAOBAO_BEHAVIOURS,
        defaults={
            "target_behaviours": ("buy",),
            "neg_ratio": 4,
            "exposure": "pv",
            "min_timestamp": TAOBAO_WINDOW[0],
            "max_timestamp": TAOBAO_WINDOW[1],
        },
    )


RETAILROCKET_BEHAVIOURS = ("view", "cart", "buy")


def retailrocket(path: str) -> EventSource:
    roles = {
        "user": "user_id",
        "item": "item_id",
        "behaviour": "behavior",
        "timestamp": "timestamp",
    }
    f = EventFile(path, roles, RETAILROCKET_BEHAVIOURS, quoted=False)
    return EventSource(
        "retailrocket",
        [f],
        RETAILROCKET_BEHAVIOURS,
        defaults={"target_behaviours": ("buy",), "neg_ratio": 4, "exposure": "view"},
    )


ML_RATINGS = ("1", "2", "3", "4", "5")
# MovieLens-1M age groups, applied to ML-100K's exact ages.
ML_AGE_EDGES = (18, 25, 35, 45, 50, 56)
ML_ZIP_PREFIX = 2


def movielens(path: str) -> EventSource:
    """ML-100K folder (or its u.data): ratings as behaviours "r1".."r5", value = rating."""
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    data = path if os.path.isfile(path) else os.path.join(folder, "u.data")
    roles = {
        "user": "user",
        "item": "item",
        "behaviour": "rating",
        "value": "rating",
        "timestamp": "timestamp",
    }
    f = EventFile(
        data,
        roles,
        ML_RATINGS,
        names=("user", "item", "rating", "timestamp"),
        delimiter="\t",
        quoted=False,
    )
    users = read_table(
        os.path.join(folder, "u.user"), "|", ("user", "age", "gender", "occupation", "zip")
    )
    age, ok = parse_int(users.column("age").combine_chunks())
    if not ok.all():
        raise fail_row(os.path.join(folder, "u.user"), int(np.argmin(ok)) + 1, "bad_value", "age")
    edges = np.asarray(ML_AGE_EDGES)
    bucket = np.where(
        age < edges[0], 1, edges[np.maximum(np.searchsorted(edges, age, "right") - 1, 0)]
    )
    zips = pc.utf8_slice_codeunits(users.column("zip").combine_chunks(), 0, ML_ZIP_PREFIX)
    user_table = SideTable(
        pa.array(parse_int(users.column("user").combine_chunks())[0]),
        {
            "age": pa.array(bucket.astype(str)),
            "gender": users.column("gender").combine_chunks(),
            "occupation": users.column("occupation").combine_chunks(),
            "zip_prefix": zips,
        },
    )
    genre_names = [line.split("|")[0] for line in _lines(os.path.join(folder, "u.genre"))]
    names = ("item", "title", "release", "video_release", "url") + tuple(
        f"g{i}" for i in range(len(genre_names))
    )
    items = read_table(os.path.join(folder, "u.item"), "|", names, encoding="latin1")
    flags = np.stack(
        [parse_int(items.column(f"g{i}").combine_chunks())[0] for i in range(len(genre_names))],
        axis=1,
    )
    first_genre = np.where(flags.any(axis=1), np.argmax(flags > 0, axis=1), 0)
    item_table = SideTable(
        pa.array(parse_int(items.column("item").combine_chunks())[0]),
        {},
        category=pa.array(first_genre.astype(np.int64)),
    )
    return EventSource(
        "movielens",
        [f],
        tuple(f"r{r}" for r in ML_RATINGS),
        user_table=user_table,
        item_table=item_table,
        defaults={"target_behaviours": ("any",), "neg_ratio": 0, "label_threshold": 4.0},
        behaviour_is_value=True,
        notes={
            "category": "first genre index in u.item",
            "genres": genre_names,
            "age_buckets": "MovieLens-1M groups: 1 (<18), 18, 25, 35, 45, 50, 56",
            "zip_prefix_chars": ML_ZIP_PREFIX,
        },
    )


def _lines(path: str) -> list[str]:
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    with open(path, encoding="latin1") as fh:
        return [ln.rstrip("\r\n") for ln in fh if ln.strip()]


def events(
    path: str,
    *,
    user: str,
    item: str,
    behaviour: str,
    timestamp: str,
    behaviour_types: tuple[str, ...],
    category: str = "",
    value: str = "",
    delimiter: str = ",",
    header: bool = True,
    names: tuple[str, ...] = (),
    string_ids: bool = False,
    user_table: str = "",
    user_key: str = "",
    item_table: str = "",
    item_key: str = "",
    time_format: str = "unix_s",
    time_zone: str = "UTC",
    user_fields: tuple[str, ...] = (),
    item_fields: tuple[str, ...] = (),
    user_table_names: tuple[str, ...] = (),
    item_table_names: tuple[str, ...] = (),
    user_table_delimiter: str = "",
    item_table_delimiter: str = "",
    item_category: str = "",
    numeric_fields: tuple[str, ...] = (),
    numeric_buckets: int = 10,
    multi_value_fields: tuple[str, ...] = (),
    multi_value_sep: str = "|",
    max_bag: int = 8,
) -> EventSource:
    """A generic CSV/Parquet event log with a column mapping given by the caller; timestamps in
    `time_format` (timefmt.py), read in `time_zone` where a value has no offset of its own.

    Side tables (`user_table`, `item_table`; data/side.py): `*_fields` choose their feature
    columns (default: all), `*_table_names` name the columns of a table without a header line,
    `*_table_delimiter` default to `delimiter`; `item_category` is the item table's category
    column (it feeds the history's category channel); `numeric_fields` of either table are
    bucketed by quantile, `multi_value_fields` split on `multi_value_sep` into bags."""
    options = {k: v for k, v in locals().items() if k != "path"}
    behaviour_types, names = tuple(behaviour_types), tuple(names)  # lists once saved as JSON
    timefmt.check(time_format, time_zone)
    if not 0 < len(behaviour_types) <= 100:
        raise DataError("events: --behaviour_types must list 1 to 100 raw behaviour spellings")
    delimiter = _delimiter(delimiter)
    roles = {"user": user, "item": item, "behaviour": behaviour, "timestamp": timestamp}
    if category:
        roles["category"] = category
    if value:
        roles["value"] = value
    if not header and not names:
        raise DataError("events: a file without a header needs --names (its column names)")
    f = EventFile(
        path,
        roles,
        behaviour_types,
        names=None if header else names,
        delimiter=delimiter,
        time_format=time_format,
        time_zone=time_zone,
    )
    tables = {}
    for group, table, key, fields, table_names, sep in (
        ("user", user_table, user_key or user, user_fields, user_table_names, user_table_delimiter),
        ("item", item_table, item_key or item, item_fields, item_table_names, item_table_delimiter),
    ):
        if not table:
            continue
        if not header and not table_names:
            raise DataError(
                f"events: --noheader: the {group} table needs --{group}_table_names (its column "
                "names); a table with a header line needs neither"
            )
        sep = _delimiter(sep) or delimiter
        tables[group] = side_table(
            table,
            key,
            list(fields) or None,
            sep,
            string_ids,
            names=tuple(table_names) or None,
            category=item_category if group == "item" else "",
            numeric=tuple(numeric_fields),
            numeric_buckets=numeric_buckets,
            multi=dict.fromkeys(multi_value_fields, multi_value_sep),
            max_bag=max_bag,
        )
    _all_found(tables, "--numeric_fields", numeric_fields)
    _all_found(tables, "--multi_value_fields", multi_value_fields)
    if item_category and "item" not in tables:
        raise DataError("events: --item_category names a column of --item_table; give the table")
    ut, it = tables.get("user"), tables.get("item")
    return EventSource(
        "events",
        [f],
        behaviour_types,
        string_ids=string_ids,
        user_table=ut,
        item_table=it,
        defaults={"target_behaviours": ("any",), "neg_ratio": 1},
        options={
            **options,
            "behaviour_types": list(behaviour_types),
            "names": list(names),
            "user_table": os.path.abspath(user_table) if user_table else "",
            "item_table": os.path.abspath(item_table) if item_table else "",
        },
    )


def _delimiter(given: str) -> str:
    """A delimiter flag's value, with "\\t" and "tab" meaning a tab."""
    return {"\\t": "\t", "tab": "\t"}.get(given, given)


def _all_found(tables: dict[str, SideTable], flag: str, names: tuple[str, ...]) -> None:
    found = {c for t in tables.values() for c in t.features}
    missing = [c for c in names if c not in found]
    if missing:
        raise DataError(f"events: {flag} names {missing}, not feature columns of the side tables")


@dataclasses.dataclass(frozen=True)
class SourceSpec:
    """One registered source: how to open it and what the tools offer for it."""

    name: str
    open: Callable[..., EventSource]  # (path, **column-mapping options) -> EventSource
    input: str  # what --input names, for help texts
    sample: str = ""  # its public sample under $INFLUENCE_JAX_DATA (tools/quality.py), if any
    config: str = ""  # configs/<config>.py trains on it (next-item task)
    conversion_config: str = ""  # configs/<it>.py trains on its conversion task, if it has one
    heads: tuple[str, ...] = ()  # conversion label heads (--heads) for multi-task comparisons


# The one registry of sources: tools/prepare_data.py, tools/rank.py and tools/quality.py build
# their flags and tables from it. A new source is a reader function above plus one entry here.
SOURCES: dict[str, SourceSpec] = {
    s.name: s
    for s in (
        SourceSpec(
            "taobao",
            taobao,
            "UserBehavior.csv (or .csv.gz)",
            sample="taobao_userbehavior_sample/UserBehavior_head814users.csv",
            config="taobao",
            conversion_config="taobao_conversion",
            heads=("cart", "fav", "buy"),
        ),
        SourceSpec(
            "movielens", movielens, "the ml-100k folder", sample="ml-100k", config="movielens"
        ),
        SourceSpec(
            "retailrocket",
            retailrocket,
            "CML Retailrocket train.csv",
            sample="cml_retailrocket/train.csv",
            config="retailrocket",
            conversion_config="retailrocket_conversion",
            heads=("cart", "buy"),
        ),
        # Any CSV/Parquet log with a column mapping (saved in schema.json for rank.py --events).
        SourceSpec("events", events, "a CSV or Parquet event log"),
    )
}
