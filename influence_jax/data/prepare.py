"""Raw event log -> prepared dataset (example shards, vocabularies, schema.json), streaming.

Pass 1 reads the log in chunks and counts ids (vocabularies, popularity, time range). Pass 2
maps ids to dense indices and hash-partitions events by user into bucket files sized from
`memory_mb`. Each bucket is then sorted by (user, time) and turned into examples with vectorised
index arithmetic: the history of a target is the `max_len` most recent events of the same user
strictly before its timestamp. Negatives come from a counter-based hash of (seed, user, event),
so the output does not depend on the bucket count. See `prepare` for the whole recipe.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from influence_jax.data import readers
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, DataError, Field, Schema
from influence_jax.data.store import AtomicDir, ShardWriter

SPLITS = ("train", "valid", "test")
NUM_GAP_BUCKETS = 32  # log2 buckets of seconds: 1 s .. 2^31 s and above
GAP_INVALID = 1  # time_gap id of a zero or negative gap; preparation never emits it
NO_HISTORY = np.iinfo(np.int64).min  # hist_last_ts of an example with an empty history
RECORD = np.dtype(
    [("user", "<i4"), ("item", "<i4"), ("ts", "<i8"), ("value", "<f4"), ("beh", "i1")]
)
BUCKET_BYTES_PER_EVENT = 200  # peak bytes per event while one bucket is sorted and expanded
# Shares of --memory_mb; the rest is for the interpreter, libraries and vocabularies.
BUCKET_SHARE = 0.25  # one bucket of events
BLOCK_SHARE = 0.05  # the examples of one block of targets, while built
SHARD_SHARE = 0.03  # each split's ShardWriter buffer (up to one shard, copied on flush)
READ_SHARE = 1 / 256  # one CSV block; pyarrow keeps a few dozen in flight
MAX_BUCKETS = 1000  # bucket files open at once while partitioning


def gap_bucket(gap: np.ndarray) -> np.ndarray:
    """time_gap ids: 1 for gap <= 0 s, else 2 + min(floor(log2(gap)), NUM_GAP_BUCKETS - 1)."""
    gap = np.asarray(gap, np.int64)
    b = np.floor(np.log2(np.maximum(gap, 1).astype(np.float64))).astype(np.int32)
    return np.where(gap > 0, NUM_RESERVED + np.minimum(b, NUM_GAP_BUCKETS - 1), GAP_INVALID).astype(
        np.int32
    )


@dataclasses.dataclass
class PrepareOptions:
    """How to turn events into examples. None means "the source's default"."""

    max_len: int = 50  # history length L
    target_behaviours: tuple[str, ...] | None = None  # names, or ("any",)
    neg_ratio: int | None = None  # sampled negatives per positive
    neg_strategy: str = "uniform"  # or "popularity"
    label_threshold: float | None = None  # label = value >= threshold instead of 1
    seed: int = 0
    valid_frac: float = 0.1  # fraction of the time range
    test_frac: float = 0.1
    valid_start: int | None = None  # explicit boundaries (unix s) override the fractions
    test_start: int | None = None
    min_timestamp: int | None = None  # events outside [min, max] are dropped (counted)
    max_timestamp: int | None = None
    min_count: int = 1  # ids seen fewer times map to OOV
    min_count_overrides: dict[str, int] = dataclasses.field(default_factory=dict)
    min_history: int = 0  # targets with fewer earlier events are dropped
    dedupe: bool = False
    lenient: bool = False
    memory_mb: int = 2048
    rows_per_shard: int | None = None
    num_buckets: int | None = None  # user partitions (default: sized from memory_mb)
    tmp_dir: str | None = None  # where bucket files go (default: inside the output temp dir)
    command: str = ""
    name: str | None = None

    def resolve(self, source: readers.EventSource) -> PrepareOptions:
        d = source.defaults
        out = dataclasses.replace(self)
        for key in (
            "target_behaviours",
            "neg_ratio",
            "label_threshold",
            "min_timestamp",
            "max_timestamp",
        ):
            if getattr(out, key) is None and key in d:
                setattr(out, key, d[key])
        out.neg_ratio = int(out.neg_ratio or 0)
        targets = tuple(out.target_behaviours or ("any",))
        if "any" in targets:
            targets = source.behaviour_types
        unknown = [t for t in targets if t not in source.behaviour_types]
        if unknown:
            raise DataError(
                f"target behaviour(s) {unknown} not among the source's behaviour "
                f"types {list(source.behaviour_types)}"
            )
        out.target_behaviours = tuple(b for b in source.behaviour_types if b in targets)
        if out.neg_strategy not in ("uniform", "popularity"):
            raise DataError(
                f"--neg_strategy must be uniform or popularity, not {out.neg_strategy!r}"
            )
        if out.label_threshold is not None and not source.has_value:
            raise DataError("--label_threshold needs a value column (--value_col)")
        if not (0 <= out.valid_frac and 0 <= out.test_frac and out.valid_frac + out.test_frac < 1):
            raise DataError("need 0 <= valid_frac, test_frac and valid_frac + test_frac < 1")
        if out.max_len <= 0 or out.memory_mb < 64 or out.neg_ratio < 0 or out.min_count < 1:
            raise DataError("need max_len > 0, memory_mb >= 64, neg_ratio >= 0, min_count >= 1")
        return out


class Vocab:
    """Raw id -> index: `keys` are the kept raw ids, sorted; index = NUM_RESERVED + position."""

    def __init__(self, keys: np.ndarray | pa.Array):
        self.keys = keys

    @property
    def size(self) -> int:
        return NUM_RESERVED + len(self.keys)

    def lookup(self, raw) -> np.ndarray:
        """Index of each raw id (int array or strings); OOV_ID for ids not kept."""
        pos, found = positions(self.keys, raw)
        return np.where(found, pos + NUM_RESERVED, OOV_ID).astype(np.int32)

    def save(self, folder: str, name: str) -> str:
        os.makedirs(folder, exist_ok=True)
        if isinstance(self.keys, np.ndarray):
            np.save(os.path.join(folder, f"{name}.npy"), self.keys)
            return f"{name}.npy"
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(self.keys.to_pylist(), f)
        return f"{name}.json"

    @classmethod
    def load(cls, prepared_dir: str, name: str) -> Vocab:
        """The vocabulary `name` of a prepared dataset (for mapping raw ids at ranking time)."""
        base = os.path.join(prepared_dir, "vocab", name)
        if os.path.exists(base + ".npy"):
            return cls(np.load(base + ".npy"))
        if os.path.exists(base + ".json"):
            with open(base + ".json") as f:
                return cls(pa.array(json.load(f), pa.string()))
        raise DataError(f"{prepared_dir}: no vocabulary file vocab/{name}.npy or .json")


class _DenseIndex:
    """positions() for integer ids that fill their range densely: one table lookup per id."""

    def __init__(self, keys: np.ndarray):
        self.lo = int(keys[0])
        self.table = np.full(int(keys[-1]) - self.lo + 1, -1, np.int32)
        self.table[keys - self.lo] = np.arange(len(keys), dtype=np.int32)

    @staticmethod
    def fits(keys: np.ndarray | pa.Array) -> bool:
        return (
            isinstance(keys, np.ndarray)
            and 0 < len(keys) < 2**31
            and int(keys[-1]) - int(keys[0]) < 4 * len(keys) + (1 << 20)
        )

    def __call__(self, raw) -> tuple[np.ndarray, np.ndarray]:
        raw = np.asarray(raw, np.int64) - self.lo
        inside = (raw >= 0) & (raw < len(self.table))
        pos = self.table[np.where(inside, raw, 0)]
        found = inside & (pos >= 0)
        return np.where(found, pos, 0).astype(np.int64), found


def indexer(keys: np.ndarray | pa.Array):
    """A function raw ids -> (position in sorted `keys`, found); table-driven when dense."""
    if _DenseIndex.fits(keys):
        return _DenseIndex(keys)
    return lambda raw: positions(keys, raw)


def positions(keys: np.ndarray | pa.Array, raw) -> tuple[np.ndarray, np.ndarray]:
    """(position in sorted `keys`, found) for each raw value."""
    if isinstance(keys, np.ndarray):
        raw = np.asarray(raw, dtype=np.int64)
        if len(keys) == 0:
            return np.zeros(len(raw), np.int64), np.zeros(len(raw), bool)
        pos = np.minimum(np.searchsorted(keys, raw), len(keys) - 1)
        return pos, keys[pos] == raw
    idx = pc.index_in(
        pa.array(raw, pa.string()) if not isinstance(raw, pa.Array) else raw, value_set=keys
    )
    return np.asarray(idx.fill_null(0), np.int64), np.asarray(idx.is_valid())


class _Agg:
    """Streaming group-by on column "k" (e.g. value counts), merged with pyarrow hash
    aggregation whenever the pending rows outgrow the merged table."""

    def __init__(self, **aggs: str):
        self.aggs = aggs  # column -> "sum" | "min" | "max"
        self._parts: list[pa.Table] = []
        self._pending = 0
        self._merged = 0

    def add(self, t: pa.Table) -> None:
        self._parts.append(t)
        self._pending += t.num_rows
        if self._pending > max(1 << 20, 2 * self._merged):
            self._merge()

    def _merge(self) -> None:
        if len(self._parts) > 1 or self._pending:
            t = pa.concat_tables(self._parts).group_by("k").aggregate(list(self.aggs.items()))
            cols = {"k": t.column("k")}
            cols.update({c: t.column(f"{c}_{f}") for c, f in self.aggs.items()})
            self._parts = [pa.table(cols)]
            self._merged, self._pending = t.num_rows, 0

    def result(self) -> pa.Table:
        """The aggregated table, sorted by k."""
        self._merge()
        if not self._parts:
            return pa.table(
                {"k": pa.array([], pa.int64()), **{c: pa.array([], pa.int64()) for c in self.aggs}}
            )
        return self._parts[0].sort_by("k").combine_chunks()


class _IdStats:
    """Events per id (and, if `paired`, the min and max of a second id per id, e.g. an item's
    category) over a stream of chunks.

    Small non-negative integer ids are counted in dense arrays indexed by id (8 or 24 bytes per
    possible id, and fast); other ids (strings, negative or huge ints) switch to a pyarrow hash
    aggregation, whose peak is a few hundred bytes per distinct id.
    """

    FILL = {"n": 0, "lo": np.iinfo(np.int64).max, "hi": np.iinfo(np.int64).min}

    def __init__(self, paired: bool, max_bytes: int):
        self.paired = paired
        self.dense = {k: np.zeros(0, np.int64) for k in (("n", "lo", "hi") if paired else ("n",))}
        self.max_slots = max_bytes // (8 * len(self.dense))
        self.sparse: _Agg | None = None

    def add(self, ids: pa.Array, other: pa.Array | None = None) -> None:
        if (
            self.sparse is None
            and pa.types.is_integer(ids.type)
            and (other is None or pa.types.is_integer(other.type))
        ):
            k = np.asarray(ids, np.int64)
            if not len(k) or (k.min() >= 0 and k.max() < self.max_slots):
                self._add_dense(k, None if other is None else np.asarray(other, np.int64))
                return
        if self.sparse is None:
            self.sparse = _Agg(n="sum", lo="min", hi="max") if self.paired else _Agg(n="sum")
            if self.dense["n"].any():
                self.sparse.add(self._dense_table())
            self.dense = {}
        if other is None:
            self.sparse.add(_value_counts(ids))
        else:
            t = (
                pa.table({"k": ids, "c": other})
                .group_by("k")
                .aggregate([("c", "count"), ("c", "min"), ("c", "max")])
            )
            self.sparse.add(
                pa.table(
                    {
                        "k": t.column("k"),
                        "n": t.column("c_count"),
                        "lo": t.column("c_min"),
                        "hi": t.column("c_max"),
                    }
                )
            )

    def _add_dense(self, k: np.ndarray, other: np.ndarray | None) -> None:
        size = len(self.dense["n"])
        need = int(k.max()) + 1 if len(k) else 0
        if need > size:
            grow = min(self.max_slots, max(need, 2 * size)) - size
            self.dense = {
                c: np.concatenate([a, np.full(grow, self.FILL[c], np.int64)])
                for c, a in self.dense.items()
            }
        np.add.at(self.dense["n"], k, 1)
        if self.paired:
            np.minimum.at(self.dense["lo"], k, other)
            np.maximum.at(self.dense["hi"], k, other)

    def _dense_table(self) -> pa.Table:
        seen = np.flatnonzero(self.dense["n"])
        return pa.table({"k": seen, **{c: a[seen] for c, a in self.dense.items()}})

    def result(self) -> pa.Table:
        """Columns k (sorted), n and, if paired, lo and hi."""
        return self.sparse.result() if self.sparse is not None else self._dense_table()


def _value_counts(arr: pa.Array) -> pa.Table:
    vc = pc.value_counts(arr.drop_null())
    return pa.table({"k": vc.field("values"), "n": vc.field("counts")})


def _keys(col: pa.ChunkedArray | pa.Array) -> np.ndarray | pa.Array:
    """Sorted raw ids as int64 numpy (integer ids) or a pyarrow string array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return np.asarray(col, np.int64) if pa.types.is_integer(col.type) else col


def _ids_of(counts: np.ndarray, min_count: int) -> np.ndarray:
    """Vocabulary id of each distinct raw value (by sorted position): kept ones from 2."""
    kept = counts >= min_count
    return np.where(kept, np.cumsum(kept) - 1 + NUM_RESERVED, OOV_ID).astype(np.int32)


def _take(keys: np.ndarray | pa.Array, mask: np.ndarray) -> np.ndarray | pa.Array:
    return keys[mask] if isinstance(keys, np.ndarray) else keys.filter(pa.array(mask))


def _window(chunk: readers.EventChunk, opts: PrepareOptions) -> tuple[readers.EventChunk, int]:
    keep = np.ones(len(chunk), bool)
    if opts.min_timestamp is not None:
        keep &= chunk.timestamp >= opts.min_timestamp
    if opts.max_timestamp is not None:
        keep &= chunk.timestamp <= opts.max_timestamp
    return (chunk, 0) if keep.all() else (chunk.take(keep), int((~keep).sum()))


@dataclasses.dataclass
class _Scan:
    """Pass 1: what the whole log holds."""

    users: pa.Table  # k, n
    items: pa.Table  # k, n, and with categories in the log lo, hi (min and max category)
    categories: pa.Table | None
    behaviours: np.ndarray
    t_min: int
    t_max: int
    counts: dict[str, int]


def _scan(source: readers.EventSource, opts: PrepareOptions, block_bytes: int) -> _Scan:
    tally = readers.Tally(opts.lenient)
    has_cat = source.has_event_category
    budget = int(opts.memory_mb * 2**20 * BUCKET_SHARE)
    users, items, cats = (
        _IdStats(False, budget),
        _IdStats(has_cat, budget),
        _IdStats(False, budget),
    )
    behaviours = np.zeros(len(source.behaviour_types), np.int64)
    t_min, t_max, rows, outside = np.iinfo(np.int64).max, np.iinfo(np.int64).min, 0, 0
    for chunk in source.chunks(block_bytes, tally):
        rows += len(chunk)
        chunk, dropped = _window(chunk, opts)
        outside += dropped
        if not len(chunk):
            continue
        users.add(chunk.user)
        items.add(chunk.item, chunk.category)
        if chunk.category is not None:
            cats.add(chunk.category)
        behaviours += np.bincount(chunk.behaviour, minlength=len(behaviours))
        t_min = min(t_min, int(chunk.timestamp.min()))
        t_max = max(t_max, int(chunk.timestamp.max()))
    events = int(behaviours.sum())
    if events == 0:
        raise DataError(
            f"{[f.path for f in source.files]}: no events to prepare ({rows} valid "
            f"rows, {outside} outside the time window, skipped {tally.as_dict()})"
        )
    counts = {
        "rows_valid": rows,
        "events": events,
        "outside_time_window": outside,
        **{f"skipped_{k}": v for k, v in tally.as_dict().items()},
    }
    return _Scan(
        users.result(),
        items.result(),
        cats.result() if has_cat else None,
        behaviours,
        t_min,
        t_max,
        counts,
    )


@dataclasses.dataclass
class _Plan:
    """Everything needed to turn a bucket of events into examples."""

    user_keys: np.ndarray | pa.Array  # every raw user, sorted: user_key = position
    item_keys: np.ndarray | pa.Array
    user_rows: np.ndarray  # [num users, Fu] int32 feature ids per dense user
    item_rows: np.ndarray  # [num items, Fi] int32 feature ids per dense item
    vocabs: dict[str, Vocab]
    user_fields: list[Field]
    item_fields: list[Field]
    pool: np.ndarray  # dense items that may be sampled as negatives
    pool_cdf: np.ndarray  # cumulative popularity over `pool`
    targets: np.ndarray  # bool per behaviour code
    bounds: tuple[int, int]  # valid_start, test_start
    num_buckets: int
    counts: dict[str, int]


def _side_columns(
    table: readers.SideTable,
    keys: np.ndarray | pa.Array,
    reserved: set[str],
    opts: PrepareOptions,
    vocabs: dict[str, Vocab],
    fields: list[Field],
) -> list[np.ndarray]:
    """Feature id columns (one per side feature) for each dense entity in `keys`."""
    pos, found = positions(keys, table.key)
    out = []
    for name, values in table.features.items():
        if name in reserved or name in vocabs:
            raise DataError(f"side feature {name!r} clashes with another feature; rename it")
        values = values.cast(pa.string())
        vc = _value_counts(values).sort_by("k")
        vocab_keys = vc.column("k").combine_chunks()
        ids = _ids_of(
            np.asarray(vc.column("n")), opts.min_count_overrides.get(name, opts.min_count)
        )
        vocabs[name] = Vocab(_take(vocab_keys, ids >= NUM_RESERVED))
        vpos, vfound = positions(vocab_keys, values)
        col = np.full(len(keys), OOV_ID, np.int32)
        col[pos[found]] = np.where(vfound, ids[vpos], OOV_ID)[found]
        out.append(col)
        fields.append(Field(name, name))
    return out


def _plan(source: readers.EventSource, scan: _Scan, opts: PrepareOptions) -> _Plan:
    mc = lambda name: opts.min_count_overrides.get(name, opts.min_count)
    user_keys, item_keys = _keys(scan.users.column("k")), _keys(scan.items.column("k"))
    item_counts = np.asarray(scan.items.column("n"), np.int64)
    user_ids = _ids_of(np.asarray(scan.users.column("n")), mc("user_id"))
    item_ids = _ids_of(item_counts, mc("item_id"))
    vocabs = {
        "user_id": Vocab(_take(user_keys, user_ids >= NUM_RESERVED)),
        "item_id": Vocab(_take(item_keys, item_ids >= NUM_RESERVED)),
    }
    user_fields, item_fields = [Field("user_id", "user_id")], [Field("item_id", "item_id")]
    user_cols, item_cols = [user_ids], [item_ids]
    counts = {"users": len(user_keys), "items": len(item_keys)}
    if scan.categories is not None:
        cat_keys = _keys(scan.categories.column("k"))
        cat_ids = _ids_of(np.asarray(scan.categories.column("n")), mc("category"))
        lo, hi = scan.items.column("lo"), scan.items.column("hi")
        counts["items_with_several_categories"] = int(pc.sum(pc.not_equal(lo, hi)).as_py() or 0)
        pos, _ = positions(cat_keys, _keys(lo))  # an item's category: its smallest raw one
        item_cols.append(cat_ids[pos])
    elif source.item_table is not None and source.item_table.category is not None:
        t = source.item_table
        vc = _value_counts(t.category).sort_by("k")
        cat_keys = _keys(vc.column("k"))
        cat_ids = _ids_of(np.asarray(vc.column("n")), mc("category"))
        col = np.full(len(item_keys), OOV_ID, np.int32)
        ipos, ifound = positions(item_keys, t.key)
        cpos, _ = positions(cat_keys, t.category)
        col[ipos[ifound]] = cat_ids[cpos][ifound]
        item_cols.append(col)
    if len(item_cols) == 2:
        vocabs["category"] = Vocab(_take(cat_keys, cat_ids >= NUM_RESERVED))
        item_fields.append(Field("category", "category"))
        counts["categories"] = len(cat_keys)
    reserved = {"user_id", "item_id", "category", "behaviour", "time_gap"}
    if source.user_table is not None:
        user_cols += _side_columns(
            source.user_table, user_keys, reserved, opts, vocabs, user_fields
        )
    if source.item_table is not None:
        item_cols += _side_columns(
            source.item_table, item_keys, reserved, opts, vocabs, item_fields
        )
    pool = np.flatnonzero(item_ids >= NUM_RESERVED)
    if opts.neg_ratio and not len(pool):
        raise DataError(
            f"no item reaches min_count={mc('item_id')}; nothing to sample negatives from"
        )
    return _Plan(
        user_keys,
        item_keys,
        np.stack(user_cols, 1).astype(np.int32),
        np.stack(item_cols, 1).astype(np.int32),
        vocabs,
        user_fields,
        item_fields,
        pool,
        np.cumsum(item_counts[pool]).astype(np.float64),
        np.isin(source.behaviour_types, opts.target_behaviours),
        _bounds(scan, opts),
        opts.num_buckets or _num_buckets(int(scan.behaviours.sum()), opts.memory_mb),
        counts,
    )


def _num_buckets(events: int, memory_mb: int) -> int:
    """Buckets so that one fits BUCKET_SHARE of memory; at most MAX_BUCKETS open files."""
    want = math.ceil(events * BUCKET_BYTES_PER_EVENT / (memory_mb * 2**20 * BUCKET_SHARE))
    if want > MAX_BUCKETS:
        logging.warning(
            "%d events need %d buckets for --memory_mb=%d; using %d (raise "
            "--memory_mb to stay within it)",
            events,
            want,
            memory_mb,
            MAX_BUCKETS,
        )
    return max(1, min(want, MAX_BUCKETS))


def _bounds(scan: _Scan, opts: PrepareOptions) -> tuple[int, int]:
    span = scan.t_max - scan.t_min
    test = (
        opts.test_start
        if opts.test_start is not None
        else scan.t_min + math.ceil(span * (1 - opts.test_frac))
        if opts.test_frac > 0
        else scan.t_max + 1
    )
    valid = (
        opts.valid_start
        if opts.valid_start is not None
        else scan.t_min + math.ceil(span * (1 - opts.test_frac - opts.valid_frac))
        if opts.valid_frac > 0
        else test
    )
    if valid > test:
        raise DataError(f"valid_start {valid} is after test_start {test}")
    return int(valid), int(test)


def _partition(
    source: readers.EventSource, plan: _Plan, opts: PrepareOptions, folder: str, block_bytes: int
) -> list[str]:
    """Pass 2: dense-index every event and append it to the file of bucket user % P."""
    os.makedirs(folder, exist_ok=True)
    paths = [os.path.join(folder, f"bucket-{b:05d}.bin") for b in range(plan.num_buckets)]
    files = [open(p, "wb") for p in paths]
    user_pos, item_pos = indexer(plan.user_keys), indexer(plan.item_keys)
    try:
        for chunk in source.chunks(block_bytes, readers.Tally(opts.lenient)):
            chunk, _ = _window(chunk, opts)
            rec = np.empty(len(chunk), RECORD)
            (rec["user"], ok_u), (rec["item"], ok_i) = user_pos(chunk.user), item_pos(chunk.item)
            if not (ok_u.all() and ok_i.all()):
                raise DataError(
                    f"{[f.path for f in source.files]}: an id not seen in the first "
                    "pass; did the input change while it was being prepared?"
                )
            rec["ts"] = chunk.timestamp
            rec["value"] = 1.0 if chunk.value is None else chunk.value
            rec["beh"] = chunk.behaviour
            bucket = rec["user"] % plan.num_buckets
            rec = rec[np.argsort(bucket, kind="stable")]
            ends = np.cumsum(np.bincount(bucket, minlength=plan.num_buckets))
            for b, (lo, hi) in enumerate(zip(np.r_[0, ends[:-1]], ends, strict=True)):
                if hi > lo:
                    files[b].write(rec[lo:hi].tobytes())
    finally:
        for f in files:
            f.close()
    return paths


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a counter-based hash, so a negative depends only on its key."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _uniform(seed: int, user: np.ndarray, ordinal: np.ndarray, slot: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = _mix(np.uint64(seed) ^ _mix(user.astype(np.uint64)))
        h = _mix(h ^ _mix(ordinal.astype(np.uint64)))
        h = _mix(h ^ slot.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _negatives(
    plan: _Plan,
    opts: PrepareOptions,
    user: np.ndarray,
    ordinal: np.ndarray,
    pair_key: np.ndarray,
    t: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """K negatives per target: dense items, resampled while the user had interacted with
    them at or before `t`. Returns (items [T, K], ok [T, K]); not ok = gave up."""
    keys, first_ts = pairs
    k = opts.neg_ratio
    items = np.zeros((len(t), k), np.int64)
    todo = np.ones((len(t), k), bool)
    for attempt in range(64):
        r, c = np.nonzero(todo)
        if not len(r):
            break
        u = _uniform(opts.seed, user[r], ordinal[r], c * 64 + attempt)
        if opts.neg_strategy == "uniform":
            cand = plan.pool[np.minimum((u * len(plan.pool)).astype(np.int64), len(plan.pool) - 1)]
        else:
            at = np.searchsorted(plan.pool_cdf, u * plan.pool_cdf[-1], side="right")
            cand = plan.pool[np.minimum(at, len(plan.pool) - 1)]
        key = pair_key[r] + cand
        pos = np.minimum(np.searchsorted(keys, key), len(keys) - 1)
        seen = (keys[pos] == key) & (first_ts[pos] <= t[r])
        items[r, c] = cand
        todo[r, c] = seen
    return items, ~todo


def _sort_order(ev: np.ndarray) -> np.ndarray:
    """Order by (user, time, behaviour, item, value). One stable sort on a (user, time) key is
    near-linear on logs that are already grouped by user; only tied rows get the full sort."""
    user, ts = ev["user"].astype(np.int64), ev["ts"]
    span = int(ts.max()) - int(ts.min()) + 1
    if int(user.max()) + 1 >= (1 << 62) // span:
        return np.lexsort((ev["value"], ev["item"], ev["beh"], ts, user))
    key = user * span + (ts - ts.min())
    order = np.argsort(key, kind="stable")
    key = key[order]
    tie = key[1:] == key[:-1]
    if tie.any():
        rows = np.zeros(len(key), bool)
        rows[1:] |= tie
        rows[:-1] |= tie
        at = np.flatnonzero(rows)
        sub = order[at]
        order[at] = sub[np.lexsort((ev["value"][sub], ev["item"][sub], ev["beh"][sub], key[at]))]
    return order


def _sort_events(ev: np.ndarray, dedupe: bool) -> tuple[np.ndarray, int]:
    """Sorts events (see `_sort_order`); counts (and maybe drops) exact repeats."""
    ev = ev[_sort_order(ev)] if len(ev) else ev
    dup = np.zeros(len(ev), bool)
    if len(ev) > 1:
        dup[1:] = ev[1:] == ev[:-1]
    n_dup = int(dup.sum())
    return (ev[~dup] if dedupe and n_dup else ev), n_dup


def _bucket_examples(
    ev: np.ndarray, plan: _Plan, opts: PrepareOptions, schema: Schema, counts: dict[str, int]
):
    """Yields (split index, example columns, hist_last_ts, sampled) for one bucket."""
    ev, n_dup = _sort_events(ev, opts.dedupe)
    counts["duplicates"] += n_dup
    n = len(ev)
    user, item, ts, beh = ev["user"], ev["item"].astype(np.int64), ev["ts"], ev["beh"]
    ar = np.arange(n)
    new_user = np.ones(n, bool)
    new_user[1:] = user[1:] != user[:-1]
    new_time = new_user.copy()
    new_time[1:] |= ts[1:] != ts[:-1]
    start = np.maximum.accumulate(np.where(new_user, ar, 0))  # user's first event
    lo = np.maximum.accumulate(np.where(new_time, ar, 0))  # first event at this timestamp
    is_target = plan.targets[beh]
    short = is_target & (lo - start < opts.min_history)
    counts["targets_short_history"] += int(short.sum())
    targets = np.flatnonzero(is_target & ~short)
    counts["targets"] += len(targets)
    n_items = len(plan.item_rows)
    pair_key = (user.astype(np.int64) // plan.num_buckets) * n_items
    pairs = (np.zeros(1, np.int64), np.zeros(1, np.int64))
    if opts.neg_ratio:
        keys, first = np.unique(pair_key + item, return_index=True)  # first = earliest time
        pairs = (keys, ts[first])
    k1 = 1 + opts.neg_ratio
    row_bytes = schema.max_len * len(schema.hist_fields) * 4 + 64
    block = max(256, int(opts.memory_mb * 2**20 * BLOCK_SHARE / (k1 * row_bytes * 2)))
    for b0 in range(0, len(targets), block):
        tg = targets[b0 : b0 + block]
        yield from _examples(tg, ev, item, start, lo, pair_key, pairs, plan, opts, schema, counts)


def _examples(
    tg,
    ev,
    item,
    start,
    lo,
    pair_key,
    pairs,
    plan: _Plan,
    opts: PrepareOptions,
    schema: Schema,
    counts: dict[str, int],
):
    ts, beh, user = ev["ts"], ev["beh"], ev["user"]
    t, L, k1 = ts[tg], schema.max_len, 1 + opts.neg_ratio
    idx = lo[tg, None] - 1 - np.arange(L)  # most recent first
    valid = idx >= start[tg, None]
    idx = np.where(valid, idx, 0)
    hist_item = item[idx]
    cols = {
        "item_id": plan.item_rows[hist_item, 0],
        "behaviour": beh[idx] + NUM_RESERVED,
        "time_gap": gap_bucket(t[:, None] - ts[idx]),
    }
    if "category" in plan.vocabs:
        cols["category"] = plan.item_rows[hist_item, 1]
    hist = np.stack([np.where(valid, cols[f.name], 0) for f in schema.hist_fields], -1)
    last_ts = np.where(valid[:, 0], ts[idx[:, 0]], NO_HISTORY)
    items = item[tg, None]
    ok = np.ones((len(tg), 1), bool)
    if opts.neg_ratio:
        neg, neg_ok = _negatives(plan, opts, user[tg], tg - start[tg], pair_key[tg], t, pairs)
        items, ok = np.concatenate([items, neg], 1), np.concatenate([ok, neg_ok], 1)
        counts["negatives"] += int(neg_ok.sum())
        counts["negatives_unsampleable"] += int((~neg_ok).sum())
    label = np.zeros((len(tg), k1), np.float32)
    label[:, 0] = 1.0 if opts.label_threshold is None else ev["value"][tg] >= opts.label_threshold
    keep = ok.reshape(-1)
    rep = np.repeat(np.arange(len(tg)), k1)[keep]
    out = {
        "user": plan.user_rows[user[tg]][rep],
        "item": plan.item_rows[items.reshape(-1)[keep]],
        "hist": hist.astype(np.int32)[rep],
        "label": label.reshape(-1)[keep],
        "user_key": user[tg].astype(np.int64)[rep],
        "target_type": (beh[tg].astype(np.int32) + NUM_RESERVED)[rep],
        "timestamp": t[rep],
    }
    sampled = np.tile(np.arange(k1) > 0, len(tg))[keep]
    split = np.searchsorted(np.asarray(plan.bounds), t, side="right")[rep]
    for s in range(len(SPLITS)):
        m = split == s
        if m.any():
            yield s, {c: v[m] for c, v in out.items()}, last_ts[rep][m], sampled[m]


class _AuditColumns:
    """Per split sidecar columns for `audit.audit_leakage`, row-aligned with the split's shards:
    audit/<split>/hist_last_ts.npy (time of history slot 0, NO_HISTORY if empty) and
    audit/<split>/sampled.npy (1 for a sampled negative)."""

    DTYPES = {"hist_last_ts": np.dtype("<i8"), "sampled": np.dtype("u1")}

    def __init__(self, root: str, split: str):
        self.folder = os.path.join(root, "audit", split)
        os.makedirs(self.folder, exist_ok=True)
        self._files = {k: open(os.path.join(self.folder, k + ".bin"), "wb") for k in self.DTYPES}

    def add(self, **cols: np.ndarray) -> None:
        for k, f in self._files.items():
            f.write(np.ascontiguousarray(cols[k], self.DTYPES[k]).tobytes())

    def close(self) -> None:
        """Turns the raw appends into .npy files (header, then the bytes)."""
        for k, f in self._files.items():
            f.close()
            raw = f.name
            n = os.path.getsize(raw) // self.DTYPES[k].itemsize
            with open(os.path.join(self.folder, k + ".npy"), "wb") as out, open(raw, "rb") as src:
                np.lib.format.write_array_header_1_0(
                    out,
                    {
                        "descr": np.lib.format.dtype_to_descr(self.DTYPES[k]),
                        "fortran_order": False,
                        "shape": (n,),
                    },
                )
                shutil.copyfileobj(src, out, 1 << 22)
            os.remove(raw)


def _schema(source: readers.EventSource, plan: _Plan, opts: PrepareOptions) -> Schema:
    hist = [Field("item_id", "item_id")]
    if "category" in plan.vocabs:
        hist.append(Field("category", "category"))
    hist += [Field("behaviour", "behaviour"), Field("time_gap", "time_gap")]
    sizes = {name: v.size for name, v in plan.vocabs.items()}
    sizes["behaviour"] = NUM_RESERVED + len(source.behaviour_types)
    sizes["time_gap"] = NUM_RESERVED + NUM_GAP_BUCKETS
    thr = opts.label_threshold
    label = {
        "target_behaviours": list(opts.target_behaviours),
        "positive": "every target event" if thr is None else f"target event with value >= {thr}",
        "label_threshold": thr,
        "neg_ratio": opts.neg_ratio,
        "neg_strategy": opts.neg_strategy,
        "negatives": "sampled items the user had not interacted with at or before the target "
        "time; label 0, same user, history, timestamp and target_type",
        # With ratings as behaviours the target's behaviour id encodes its label.
        "target_type_reveals_label": thr is not None and source.name == "movielens",
    }
    return Schema(
        name=opts.name or source.name,
        vocab_sizes=sizes,
        user_fields=tuple(plan.user_fields),
        item_fields=tuple(plan.item_fields),
        hist_fields=tuple(hist),
        max_len=opts.max_len,
        behaviour_types=tuple(source.behaviour_types),
        label=label,
    )


def _source_block_bytes(opts: PrepareOptions) -> int:
    return int(min(8 << 20, max(1 << 20, opts.memory_mb * 2**20 * READ_SHARE)))


def prepare(source: readers.EventSource, output: str, opts: PrepareOptions) -> Schema:
    """Prepares `source` into the folder `output` (atomically); returns its schema.

    Events and examples stay within about `opts.memory_mb`; on top come the interpreter and
    libraries (~150 MB) and the vocabularies: ~40 bytes per distinct user/item, plus, while
    counting, 8 bytes per possible user id and 24 per possible item id (ids are counted in
    dense arrays up to memory_mb / 4 each, else hashed). Bucket files take 21 bytes per event
    on disk (in the output's temporary folder unless `tmp_dir` is set).
    """
    opts = opts.resolve(source)
    block_bytes = _source_block_bytes(opts)
    with AtomicDir(output) as root:
        scan = _scan(source, opts, block_bytes)
        plan = _plan(source, scan, opts)
        pa.default_memory_pool().release_unused()
        logging.info(
            "pass 1: %d events, %d users, %d items; %d buckets",
            scan.counts["events"],
            plan.counts["users"],
            plan.counts["items"],
            plan.num_buckets,
        )
        schema = _schema(source, plan, opts)
        tmp = opts.tmp_dir or os.path.join(root, "_buckets")
        if opts.tmp_dir:
            tmp = os.path.join(tmp, os.path.basename(root) + "-buckets")
        counts = dict.fromkeys(
            (
                "duplicates",
                "targets",
                "targets_short_history",
                "negatives",
                "negatives_unsampleable",
            ),
            0,
        )
        try:
            paths = _partition(source, plan, opts, tmp, block_bytes)
            pa.default_memory_pool().release_unused()
            splits = _write_examples(paths, root, plan, opts, schema, counts)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        vocab_files = {
            name: "vocab/" + v.save(os.path.join(root, "vocab"), name)
            for name, v in plan.vocabs.items()
        }
        vocab_files["user_key"] = "vocab/" + Vocab(plan.user_keys).save(
            os.path.join(root, "vocab"), "user_key"
        )
        schema = dataclasses.replace(
            schema, splits=splits, extra=_extra(source, scan, plan, opts, counts, vocab_files)
        )
        schema.save(root)
    return schema


def _write_examples(
    paths: list[str],
    root: str,
    plan: _Plan,
    opts: PrepareOptions,
    schema: Schema,
    counts: dict[str, int],
) -> dict[str, dict]:
    row_bytes = (
        schema.max_len * len(schema.hist_fields) + len(schema.user_fields) + len(schema.item_fields)
    ) * 4 + 40
    rows = opts.rows_per_shard or int(
        min(1 << 20, max(4096, opts.memory_mb * 2**20 * SHARD_SHARE / row_bytes))
    )
    writers = [ShardWriter(root, s, schema, rows) for s in SPLITS]
    sidecars = [_AuditColumns(root, s) for s in SPLITS]
    for path in paths:
        ev = np.fromfile(path, RECORD)
        os.remove(path)
        for s, cols, last_ts, sampled in _bucket_examples(ev, plan, opts, schema, counts):
            writers[s].add(cols)
            sidecars[s].add(hist_last_ts=last_ts, sampled=sampled)
        del ev
    for s in sidecars:
        s.close()
    return {s: w.close() for s, w in zip(SPLITS, writers, strict=True)}


def _extra(
    source: readers.EventSource,
    scan: _Scan,
    plan: _Plan,
    opts: PrepareOptions,
    counts: dict[str, int],
    vocab_files: dict[str, str],
) -> dict:
    valid_start, test_start = plan.bounds
    return {
        "command": opts.command,
        "source": source.name,
        "inputs": [os.path.abspath(f.path) for f in source.files],
        "split": {
            "valid_start": valid_start,
            "test_start": test_start,
            "t_min": scan.t_min,
            "t_max": scan.t_max,
            "valid_frac": opts.valid_frac,
            "test_frac": opts.test_frac,
            "rule": "train: t < valid_start; valid: valid_start <= t < test_start; "
            "test: t >= test_start (t = target time, unix s)",
        },
        "time_window": [opts.min_timestamp, opts.max_timestamp],
        "counts": {
            **scan.counts,
            **plan.counts,
            **counts,
            "duplicates_dropped": counts["duplicates"] if opts.dedupe else 0,
            "behaviours": dict(zip(source.behaviour_types, scan.behaviours.tolist(), strict=True)),
        },
        "min_count": {"default": opts.min_count, **opts.min_count_overrides},
        "vocab_files": vocab_files,
        "user_key": "position of the raw user id in vocab/user_key, every user (never OOV): "
        "prepare.positions(prepare.Vocab.load(dir, 'user_key').keys, raw_ids)",
        "time_gap": f"id {GAP_INVALID}: gap <= 0 (never emitted); id {NUM_RESERVED}+b: "
        f"b = min(floor(log2(gap seconds)), {NUM_GAP_BUCKETS - 1})",
        "audit": {
            "hist_last_ts": "audit/<split>/hist_last_ts.npy",
            "sampled": "audit/<split>/sampled.npy",
            "no_history": int(NO_HISTORY),
        },
        "options": {
            "max_len": opts.max_len,
            "seed": opts.seed,
            "dedupe": opts.dedupe,
            "lenient": opts.lenient,
            "min_history": opts.min_history,
            "memory_mb": opts.memory_mb,
            "num_buckets": plan.num_buckets,
        },
        "source_notes": source.notes,
    }
