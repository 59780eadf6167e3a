"""Preparation passes 1 and 2: options, the scan of the whole log (ids, counts, time range), the
plan (vocabularies, feature rows, negative pool, split boundaries, bucket count) and the
partition of dense-indexed events into per-user bucket files.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from influence_jax.data import cleaning, readers, side
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, DataError, Field
from influence_jax.data.vocab import (
    IdStats,
    Vocab,
    ids_of,
    indexer,
    positions,
    raw_keys,
    take_keys,
    value_counts,
)

SPLITS = ("train", "valid", "test")
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


TASKS = ("next_item", "conversion")
# Which events make the embedding vocabularies. "train": those before valid_start, as a model
# deployed at the cut would know them; every later id keeps its own id beyond the table (exact
# matches see it) but embeds as OOV. "all": the whole log (ids below min_count map to OOV).
VOCAB_PERIODS = ("train", "all")
# How examples hold their histories (store.py). "reference": spans of one event table that
# stores each event once; "copy": every example its own [max_len, Fh] array (about 50x the
# bytes for a conversion dataset, whose examples each see up to max_len events).
HISTORY_STORAGE = ("reference", "copy")


@dataclasses.dataclass
class PrepareOptions:
    """How to turn events into examples. None means "the source's default".

    Tasks: `next_item`, every target event a positive with `neg_ratio` sampled negatives (items
    the user had not touched); `conversion`, every exposure (an event of behaviour `exposure`,
    repeated ones of the same user and item within `session_gap_minutes` counted once) an
    example, labelled 1 when the user performs a target behaviour on that item within
    `horizon_hours` from it, with no sampled negatives; an exposure whose horizon reaches past
    its split's end is dropped (label maturity). With `heads` (conversion only; behaviour types,
    not the exposure's) each exposure also gets one label per head by the same rule with the
    head's behaviour as the target (the `labels` column); `target_behaviours` then defaults to
    the heads, so `label` is 1 when any head converts.
    """

    max_len: int = 50  # history length L
    task: str = "next_item"  # see TASKS
    target_behaviours: tuple[str, ...] | None = None  # names, or ("any",)
    exposure: str | None = None  # conversion: the behaviour that is an exposure (e.g. pv)
    horizon_hours: float = 24.0  # conversion: a target event within this long counts
    session_gap_minutes: float = 30.0  # conversion: repeated exposures closer than this merge
    heads: tuple[str, ...] = ()  # conversion: behaviour types with their own label (multi-task)
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
    min_count: int = 1  # ids seen fewer times (in the vocabulary period) map to OOV
    vocab_period: str = "train"  # see VOCAB_PERIODS
    history_storage: str = "reference"  # see HISTORY_STORAGE
    min_count_overrides: dict[str, int] = dataclasses.field(default_factory=dict)
    min_history: int = 0  # targets with fewer earlier events are dropped
    max_user_events_per_day: float | None = None  # drop faster users (cleaning.py)
    min_user_events: int = 0  # drop users with fewer events (cleaning.py)
    min_item_events: int = 0  # drop items with fewer events (cleaning.py)
    dedupe: bool = False
    lenient: bool = False
    memory_mb: int = 2048
    rows_per_shard: int | None = None
    num_shards: int | None = None  # shards per split (--engine=spark), instead of rows_per_shard
    num_buckets: int | None = None  # user partitions (default: sized from memory_mb)
    tmp_dir: str | None = None  # where bucket files go (default: inside the output temp dir)
    command: str = ""
    name: str | None = None

    @property
    def cleaning_rules(self) -> cleaning.Rules:
        return cleaning.Rules(
            self.max_user_events_per_day, self.min_user_events, self.min_item_events
        )

    def resolve(self, source: readers.EventSource) -> PrepareOptions:
        d = source.defaults
        out = dataclasses.replace(self)
        if out.task not in TASKS:
            raise DataError(f"--task must be one of {TASKS}, not {out.task!r}")
        conversion = out.task == "conversion"
        if conversion and (out.neg_ratio or out.label_threshold is not None):
            raise DataError(
                "--task=conversion labels real exposures: no --neg_ratio or --label_threshold"
            )
        out.heads = _heads(out, source)
        if out.heads and out.target_behaviours is None:
            out.target_behaviours = out.heads  # label: any head converts
        keys = ["target_behaviours", "exposure", "min_timestamp", "max_timestamp"]
        keys += [] if conversion else ["neg_ratio", "label_threshold"]
        for key in keys:
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
        if conversion:
            if out.exposure not in source.behaviour_types:
                raise DataError(
                    f"--exposure: {out.exposure!r} is not a behaviour type of the source "
                    f"{list(source.behaviour_types)}; name the behaviour that shows an item"
                )
            if out.exposure in out.heads:
                raise DataError(
                    f"--heads: {out.exposure!r} is the exposure behaviour (--exposure="
                    f"{out.exposure}); an exposure cannot convert into itself, so it cannot be a "
                    "head"
                )
            if out.exposure in out.target_behaviours:
                raise DataError(
                    f"--exposure={out.exposure} is also a --target_behaviour; an exposure cannot "
                    "convert into itself"
                )
            if not (out.horizon_hours > 0 and out.session_gap_minutes >= 0):
                raise DataError("--task=conversion needs horizon_hours > 0, session_gap >= 0")
        else:
            out.exposure = None
        if out.vocab_period not in VOCAB_PERIODS:
            raise DataError(
                f"--vocab_period must be one of {VOCAB_PERIODS}, not {out.vocab_period!r}"
            )
        if out.history_storage not in HISTORY_STORAGE:
            raise DataError(
                f"--history_storage must be one of {HISTORY_STORAGE}, not {out.history_storage!r}"
            )
        if out.neg_strategy not in ("uniform", "popularity"):
            raise DataError(
                f"--neg_strategy must be uniform or popularity, not {out.neg_strategy!r}"
            )
        if out.label_threshold is not None and not source.has_value:
            raise DataError("--label_threshold needs a value column (--value_col)")
        if not (0 <= out.valid_frac and 0 <= out.test_frac and out.valid_frac + out.test_frac < 1):
            raise DataError("need 0 <= valid_frac, test_frac and valid_frac + test_frac < 1")
        if out.num_buckets is not None and out.num_buckets < 1:
            raise DataError(f"--num_buckets must be at least 1, not {out.num_buckets}")
        if out.num_shards is not None and out.num_shards < 1:
            raise DataError(f"--num_shards must be at least 1, not {out.num_shards}")
        if out.num_shards and out.rows_per_shard:
            raise DataError("--num_shards and --rows_per_shard both set the shards: pass one")
        for flag, value, low in (
            ("max_len", out.max_len, 1),
            ("memory_mb", out.memory_mb, 64),
            ("neg_ratio", out.neg_ratio, 0),
            ("min_count", out.min_count, 1),
        ):
            if value < low:
                raise DataError(f"--{flag} must be at least {low}, not {value}")
        out.cleaning_rules.check()
        return out


def _heads(opts: PrepareOptions, source: readers.EventSource) -> tuple[str, ...]:
    """`opts.heads` checked: conversion only, behaviour types of the source, no repeats."""
    heads = tuple(opts.heads or ())
    if not heads:
        return ()
    types = list(source.behaviour_types)
    if opts.task != "conversion":
        raise DataError(
            f"--heads={','.join(heads)}: heads are only for --task=conversion (one label per "
            f"behaviour an exposure converts into), not --task={opts.task}"
        )
    unknown = [h for h in heads if h not in types]
    if unknown:
        raise DataError(
            f"--heads: {unknown} not among the source's behaviour types {types}; give a "
            "comma-separated list of them, e.g. --heads=cart,buy"
        )
    repeated = sorted({h for h in heads if heads.count(h) > 1})
    if repeated:
        raise DataError(f"--heads: {repeated} given more than once")
    return heads


def window(chunk: readers.EventChunk, opts: PrepareOptions) -> tuple[readers.EventChunk, int]:
    keep = np.ones(len(chunk), bool)
    if opts.min_timestamp is not None:
        keep &= chunk.timestamp >= opts.min_timestamp
    if opts.max_timestamp is not None:
        keep &= chunk.timestamp <= opts.max_timestamp
    return (chunk, 0) if keep.all() else (chunk.take(keep), int((~keep).sum()))


@dataclasses.dataclass
class Scan:
    """Pass 1: what the whole log holds."""

    users: pa.Table  # k, n
    items: pa.Table  # k, n, and with categories in the log lo, hi (min and max category)
    categories: pa.Table | None
    behaviours: np.ndarray
    t_min: int
    t_max: int
    counts: dict[str, int]
    dropped: cleaning.Dropped = dataclasses.field(default_factory=cleaning.Dropped)


def scan_log(source: readers.EventSource, opts: PrepareOptions, block_bytes: int) -> Scan:
    tally = readers.Tally(opts.lenient)
    has_cat = source.has_event_category
    budget = int(opts.memory_mb * 2**20 * BUCKET_SHARE)
    rate_rule = bool(opts.max_user_events_per_day)  # users' first and last times too
    users, items, cats = (
        IdStats(rate_rule, budget),
        IdStats(has_cat, budget),
        IdStats(False, budget),
    )
    behaviours = np.zeros(len(source.behaviour_types), np.int64)
    t_min, t_max, rows, outside = np.iinfo(np.int64).max, np.iinfo(np.int64).min, 0, 0
    for chunk in source.chunks(block_bytes, tally):
        rows += len(chunk)
        chunk, dropped = window(chunk, opts)
        outside += dropped
        if not len(chunk):
            continue
        users.add(chunk.user, pa.array(chunk.timestamp) if rate_rule else None)
        items.add(chunk.item, chunk.category)
        if chunk.category is not None:
            cats.add(chunk.category)
        behaviours += np.bincount(chunk.behaviour, minlength=len(behaviours))
        t_min = min(t_min, int(chunk.timestamp.min()))
        t_max = max(t_max, int(chunk.timestamp.max()))
    events = int(behaviours.sum())
    if events == 0:
        raise DataError(
            f"{', '.join(f.path for f in source.files)}: no events to prepare ({rows} valid "
            f"rows, {outside} outside the time window, skipped {tally.as_dict()})"
        )
    counts = {
        "rows_valid": rows,
        "events": events,
        "outside_time_window": outside,
        **{f"skipped_{k}": v for k, v in tally.as_dict().items()},
    }
    user_t, item_t, dropped = users.result(), items.result(), cleaning.Dropped()
    if opts.cleaning_rules.active:
        user_t, item_t, dropped, removed = cleaning.apply(user_t, item_t, opts.cleaning_rules)
        counts.update(removed)
    return Scan(
        user_t,
        item_t,
        cats.result() if has_cat else None,
        behaviours,
        t_min,
        t_max,
        counts,
        dropped,
    )


@dataclasses.dataclass
class Plan:
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
    exposure: int | None  # conversion: the exposure's behaviour code
    bounds: tuple[int, int]  # valid_start, test_start
    t_end: int  # one second after the last event (the test split's end)
    num_buckets: int
    counts: dict[str, int]
    category_keys: np.ndarray | pa.Array | None = None  # every raw category, sorted
    item_category: np.ndarray | None = None  # per dense item: its category's key position or -1
    table_sizes: dict[str, int] = dataclasses.field(default_factory=dict)  # see Schema
    dropped: cleaning.Dropped = dataclasses.field(default_factory=cleaning.Dropped)
    numeric: dict[str, list] = dataclasses.field(default_factory=dict)  # group -> side.Numeric


def make_plan(source: readers.EventSource, scan: Scan, opts: PrepareOptions) -> Plan:
    mc = lambda name: opts.min_count_overrides.get(name, opts.min_count)
    user_keys, item_keys = raw_keys(scan.users.column("k")), raw_keys(scan.items.column("k"))
    item_counts = np.asarray(scan.items.column("n"), np.int64)
    user_ids = ids_of(np.asarray(scan.users.column("n")), mc("user_id"))
    item_ids = ids_of(item_counts, mc("item_id"))
    vocabs = {
        "user_id": Vocab(take_keys(user_keys, user_ids >= NUM_RESERVED)),
        "item_id": Vocab(take_keys(item_keys, item_ids >= NUM_RESERVED)),
    }
    user_fields, item_fields = [Field("user_id", "user_id")], [Field("item_id", "item_id")]
    user_cols, item_cols = [user_ids], [item_ids]
    counts = {"users": len(user_keys), "items": len(item_keys)}
    if scan.categories is not None:
        cat_keys = raw_keys(scan.categories.column("k"))
        cat_ids = ids_of(np.asarray(scan.categories.column("n")), mc("category"))
        lo, hi = scan.items.column("lo"), scan.items.column("hi")
        counts["items_with_several_categories"] = int(pc.sum(pc.not_equal(lo, hi)).as_py() or 0)
        pos, _ = positions(cat_keys, raw_keys(lo))  # an item's category: its smallest raw one
        item_cols.append(cat_ids[pos])
        item_cat = pos
    elif source.item_table is not None and source.item_table.category is not None:
        t = source.item_table
        vc = value_counts(t.category).sort_by("k")
        cat_keys = raw_keys(vc.column("k"))
        cat_ids = ids_of(np.asarray(vc.column("n")), mc("category"))
        col = np.full(len(item_keys), OOV_ID, np.int32)
        ipos, ifound = positions(item_keys, t.key)
        cpos, _ = positions(cat_keys, t.category)
        col[ipos[ifound]] = cat_ids[cpos][ifound]
        item_cols.append(col)
        item_cat = np.full(len(item_keys), -1, np.int64)
        item_cat[ipos[ifound]] = cpos[ifound]
    if len(item_cols) == 1:
        cat_keys, item_cat = None, None
    else:
        vocabs["category"] = Vocab(take_keys(cat_keys, cat_ids >= NUM_RESERVED))
        item_fields.append(Field("category", "category"))
        counts["categories"] = len(cat_keys)
    reserved = {"user_id", "item_id", "category", "behaviour", "time_gap"}
    numeric: dict[str, list[side.Numeric]] = {"user": [], "item": []}
    for group, table, keys, cols, fields in (
        ("user", source.user_table, user_keys, user_cols, user_fields),
        ("item", source.item_table, item_keys, item_cols, item_fields),
    ):
        if table is not None:
            cols += side.side_columns(
                table, keys, reserved, mc, vocabs, fields, numeric[group], counts
            )
            # Entities of the log the side table lacks: their side features are OOV.
            pos, found = positions(keys, table.key)
            missing = counts[f"{group}s_without_side_row"] = len(keys) - len(np.unique(pos[found]))
            if missing:
                logging.warning(
                    "%d of %d %ss in the log have no row in the %s table; their side features "
                    "are OOV",
                    missing,
                    len(keys),
                    group,
                    group,
                )
    pool = np.flatnonzero(item_ids >= NUM_RESERVED)
    if opts.neg_ratio and not len(pool):
        raise DataError(
            f"no item reaches min_count={mc('item_id')}; nothing to sample negatives from"
        )
    return Plan(
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
        source.behaviour_types.index(opts.exposure) if opts.exposure else None,
        _bounds(scan, opts),
        scan.t_max + 1,
        opts.num_buckets or _num_buckets(int(scan.behaviours.sum()), opts.memory_mb),
        counts,
        cat_keys,
        item_cat,
        dropped=scan.dropped,
        numeric=numeric,
    )


def training_vocabs(
    plan: Plan, user_n: np.ndarray, item_n: np.ndarray, opts: PrepareOptions
) -> Plan:
    """The plan with user, item and category vocabularies from the training period.

    Ids with at least min_count training events (t < valid_start; a category counts the
    training events of its items) come first and get embedding rows (`table_sizes`); every
    other id seen in the log follows them, so exact matches still see it, and embeds as OOV.
    Negatives are drawn from the training period's items, by their training popularity.

    Args:
      user_n, item_n: training-period events per dense user and item (from `partition`).
    """
    mc = lambda name: opts.min_count_overrides.get(name, opts.min_count)
    vocabs, sizes, counts = dict(plan.vocabs), {}, dict(plan.counts)
    user_rows, item_rows = plan.user_rows.copy(), plan.item_rows.copy()

    def remap(name: str, keys, n: np.ndarray) -> np.ndarray:
        table = n >= mc(name)
        t = int(table.sum())
        ids = np.empty(len(n), np.int32)
        ids[table] = NUM_RESERVED + np.arange(t)
        ids[~table] = NUM_RESERVED + t + np.arange(len(n) - t)
        first, late = take_keys(keys, table), take_keys(keys, ~table)
        joined = (
            np.concatenate([first, late])
            if isinstance(keys, np.ndarray)
            else pa.concat_arrays([first, late])
        )
        vocabs[name], sizes[name] = Vocab(joined), NUM_RESERVED + t
        counts[f"{name}_after_training"] = len(n) - t
        return ids

    user_rows[:, 0] = remap("user_id", plan.user_keys, user_n)
    item_rows[:, 0] = remap("item_id", plan.item_keys, item_n)
    if plan.item_category is not None:
        has = plan.item_category >= 0
        cat_n = np.bincount(
            plan.item_category[has], weights=item_n[has], minlength=len(plan.category_keys)
        ).astype(np.int64)
        cat_ids = remap("category", plan.category_keys, cat_n)
        col = [f.name for f in plan.item_fields].index("category")
        item_rows[:, col] = np.where(has, cat_ids[np.maximum(plan.item_category, 0)], OOV_ID)
    for rows, group, n, fields in (
        (user_rows, "user", user_n, plan.user_fields),
        (item_rows, "item", item_n, plan.item_fields),
    ):  # numeric side features: buckets fitted on the entities with training events
        side.refit_numeric(rows, plan.numeric.get(group, []), n > 0, fields, vocabs)
    pool = np.flatnonzero(item_n >= mc("item_id"))
    if opts.neg_ratio and not len(pool):
        raise DataError(
            f"no item reaches min_count={mc('item_id')} in the training period (before "
            f"valid_start {plan.bounds[0]}); nothing to sample negatives from"
        )
    return dataclasses.replace(
        plan,
        user_rows=user_rows,
        item_rows=item_rows,
        vocabs=vocabs,
        pool=pool,
        pool_cdf=np.cumsum(item_n[pool]).astype(np.float64),
        counts=counts,
        table_sizes=sizes,
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


def _bounds(scan: Scan, opts: PrepareOptions) -> tuple[int, int]:
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


def partition(
    source: readers.EventSource, plan: Plan, opts: PrepareOptions, folder: str, block_bytes: int
) -> tuple[list[str], tuple[np.ndarray, np.ndarray]]:
    """Pass 2: dense-index every event and append it to the file of bucket user % P.

    Returns the bucket files and the training-period events (t < valid_start) per dense user
    and per dense item."""
    os.makedirs(folder, exist_ok=True)
    user_n = np.zeros(len(plan.user_keys), np.int64)
    item_n = np.zeros(len(plan.item_keys), np.int64)
    paths = [os.path.join(folder, f"bucket-{b:05d}.bin") for b in range(plan.num_buckets)]
    files = [open(p, "wb") for p in paths]
    user_pos, item_pos = indexer(plan.user_keys), indexer(plan.item_keys)
    try:
        for chunk in source.chunks(block_bytes, readers.Tally(opts.lenient)):
            chunk, _ = window(chunk, opts)
            keep = plan.dropped.keep(chunk.user, chunk.item)
            if keep is not None:  # the events of users and items the cleaning rules dropped
                removed = plan.counts.get("cleaning_events_removed", 0) + int((~keep).sum())
                plan.counts["cleaning_events_removed"] = removed
                chunk = chunk.take(keep)
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
            train = rec["ts"] < plan.bounds[0]
            user_n += np.bincount(rec["user"][train], minlength=len(user_n))
            item_n += np.bincount(rec["item"][train], minlength=len(item_n))
            bucket = rec["user"] % plan.num_buckets
            rec = rec[np.argsort(bucket, kind="stable")]
            ends = np.cumsum(np.bincount(bucket, minlength=plan.num_buckets))
            for b, (lo, hi) in enumerate(zip(np.r_[0, ends[:-1]], ends, strict=True)):
                if hi > lo:
                    files[b].write(rec[lo:hi].tobytes())
    finally:
        for f in files:
            f.close()
    return paths, (user_n, item_n)
