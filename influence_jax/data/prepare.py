"""Raw event log -> prepared dataset (example shards, vocabularies, ranking state, schema.json).

Pass 1 (plan.py) reads the log in chunks and counts ids (vocabularies, popularity, time range).
Pass 2 maps ids to dense indices and hash-partitions events by user into bucket files sized from
`memory_mb`. Each bucket is then sorted by (user, time) and turned into examples (examples.py)
with vectorised index arithmetic: the history of a target is the `max_len` most recent events of
the same user strictly before its timestamp (history.py). The same history function writes each
user's state as of every split boundary for ranking (rank_state.py). Negatives come from a
counter-based hash of (seed, user, event) (negatives.py), so the output does not depend on the
bucket count. See `prepare` for the whole recipe.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import shutil
from collections.abc import Callable

import numpy as np
import pyarrow as pa

from influence_jax import files
from influence_jax.data import rank_state, readers
from influence_jax.data.examples import (
    NpyColumns,
    Rules,
    audit_columns,
    bucket_examples,
    event_table,
)
from influence_jax.data.history import (  # noqa: F401  (re-exported: audit, tests)
    GAP_INVALID,
    NO_HISTORY,
    NUM_GAP_BUCKETS,
    Events,
    event_rows,
    gap_bucket,
    sort_events,
    sort_order,
)
from influence_jax.data.plan import (  # noqa: F401  (re-exported)
    MAX_BUCKETS,
    READ_SHARE,
    RECORD,
    SHARD_SHARE,
    SPLITS,
    TASKS,
    Plan,
    PrepareOptions,
    Scan,
    make_plan,
    partition,
    scan_log,
    training_vocabs,
)
from influence_jax.data.rank_state import RankStateWriter
from influence_jax.data.schema import NUM_RESERVED, SCHEMA_FILE, DataError, Field, Schema
from influence_jax.data.store import ShardWriter
from influence_jax.data.vocab import Vocab, indexer, positions  # noqa: F401  (re-exported)

HISTORY_EVENTS = "history_events"  # the event table's folder (store.py), by reference
VOCAB_RULES = {
    "train": "ids with min_count events before valid_start have embedding rows (schema "
    "table_sizes); every later id keeps its own id beyond them, so exact matches see it, but "
    "embeds as OOV",
    "all": "ids with min_count events in the whole log; the others map to OOV (id 1)",
}


def _schema(source: readers.EventSource, plan: Plan, opts: PrepareOptions) -> Schema:
    hist = [Field("item_id", "item_id")]
    if "category" in plan.vocabs:
        hist.append(Field("category", "category"))
    hist += [Field("behaviour", "behaviour"), Field("time_gap", "time_gap")]
    sizes = {name: v.size for name, v in plan.vocabs.items()}
    sizes["behaviour"] = NUM_RESERVED + len(source.behaviour_types)
    sizes["time_gap"] = NUM_RESERVED + NUM_GAP_BUCKETS
    return Schema(
        name=opts.name or source.name,
        vocab_sizes=sizes,
        user_fields=tuple(plan.user_fields),
        item_fields=tuple(plan.item_fields),
        hist_fields=tuple(hist),
        max_len=opts.max_len,
        behaviour_types=tuple(source.behaviour_types),
        label=_label(source, opts),
        table_sizes=dict(plan.table_sizes),
        history_events=HISTORY_EVENTS if opts.history_storage == "reference" else "",
    )


def _label(source: readers.EventSource, opts: PrepareOptions) -> dict:
    """How the examples' labels were made, for people and reports (schema.json "label")."""
    if opts.task == "conversion":
        return {
            **_heads_label(opts),
            "task": "conversion",
            "exposure": opts.exposure,
            "target_behaviours": list(opts.target_behaviours),
            "horizon_hours": opts.horizon_hours,
            "session_gap_minutes": opts.session_gap_minutes,
            "positive": f"an exposure ({opts.exposure}) followed by a target event on the same "
            f"item by the same user within {opts.horizon_hours:g} h (from the exposure's time)",
            "negatives": "exposures without such an event; none sampled",
            "sessions": f"an exposure of the same user and item within "
            f"{opts.session_gap_minutes:g} min of the previous one is merged into it",
            "maturity": "exposures whose horizon reaches their split's end (train: valid_start, "
            "valid: test_start, test: the end of the log) are dropped",
            "neg_ratio": 0,
            "target_type": "the exposure's behaviour",
            "target_type_reveals_label": False,
        }
    thr = opts.label_threshold
    return {
        "task": "next_item",
        "target_behaviours": list(opts.target_behaviours),
        "positive": "every target event" if thr is None else f"target event with value >= {thr}",
        "label_threshold": thr,
        "neg_ratio": opts.neg_ratio,
        "neg_strategy": opts.neg_strategy,
        "negatives": "sampled items the user had not interacted with at or before the target "
        "time; label 0, same user, history, timestamp and target_type",
        # With ratings as behaviours the target's behaviour id encodes its label.
        "target_type_reveals_label": thr is not None and source.behaviour_is_value,
    }


def _heads_label(opts: PrepareOptions) -> dict:
    """The heads' part of a conversion label (none without heads): their names in the order of
    the `labels` column, and the rule."""
    if not opts.heads:
        return {}
    return {
        "heads": list(opts.heads),
        "head_positive": f"labels[:, h] = 1: the exposure is followed by an event of behaviour "
        f"heads[h] on the same item by the same user within {opts.horizon_hours:g} h (the "
        "positive rule with heads[h] as the only target; the same exposures and maturity)",
    }


def _source_block_bytes(opts: PrepareOptions) -> int:
    return int(min(8 << 20, max(1 << 20, opts.memory_mb * 2**20 * READ_SHARE)))


def prepare(
    source: readers.EventSource,
    output: str,
    opts: PrepareOptions,
    check: Callable[[str], None] | None = None,
) -> Schema:
    """Prepares `source` into the folder `output` (atomically); returns its schema. `check`
    (e.g. the leakage audit) gets the finished folder before it is renamed into place: a
    failed check, or a kill, leaves nothing at `output`.

    Events and examples stay within about `opts.memory_mb`; on top come the interpreter and
    libraries (~150 MB) and the vocabularies: ~40 bytes per distinct user/item, plus, while
    counting, 8 bytes per possible user id and 24 per possible item id (ids are counted in
    dense arrays up to memory_mb / 4 each, else hashed). Bucket files take 21 bytes per event
    on disk (in the output's temporary folder unless `tmp_dir` is set).
    """
    opts = opts.resolve(source)
    tables = [f.path for f in source.files if f.path.startswith(readers.TABLE_PREFIX)]
    if tables:
        raise DataError(f"--input={tables[0]}: tables are read by --engine=spark only")
    folders = [f.path for f in source.files if os.path.isdir(f.path)]
    if folders:  # --engine=spark reads a folder of Parquet files; this engine reads files
        spec = readers.SOURCES.get(source.name)
        expects = f": {spec.input}" if spec else ""
        raise DataError(f"--input={folders[0]}: is a folder; {source.name} expects a file{expects}")
    check_output(output, source_inputs(source))
    if opts.num_shards:
        raise DataError(
            "--num_shards: the numpy engine writes shards as it goes, before it knows a split's "
            "rows; use --rows_per_shard, or --engine=spark"
        )
    if opts.num_buckets and opts.num_buckets > MAX_BUCKETS:
        raise DataError(
            f"--num_buckets={opts.num_buckets}: the numpy engine writes one file per bucket and "
            f"keeps them open, at most {MAX_BUCKETS}; use fewer or --engine=spark"
        )
    block_bytes = _source_block_bytes(opts)
    with files.atomic_folder(output) as root:
        scan = scan_log(source, opts, block_bytes)
        plan = make_plan(source, scan, opts)
        pa.default_memory_pool().release_unused()
        logging.info(
            "pass 1: %d events, %d users, %d items; %d buckets",
            scan.counts["events"],
            plan.counts["users"],
            plan.counts["items"],
            plan.num_buckets,
        )
        tmp = opts.tmp_dir or os.path.join(root, "_buckets")
        if opts.tmp_dir:
            tmp = os.path.join(tmp, os.path.basename(root) + "-buckets")
        counts = new_counts(opts)
        try:
            paths, (user_n, item_n) = partition(source, plan, opts, tmp, block_bytes)
            if opts.vocab_period == "train":
                plan = training_vocabs(plan, user_n, item_n, opts)
            schema = _schema(source, plan, opts)
            pa.default_memory_pool().release_unused()
            splits, rank_info = _write_examples(paths, root, plan, opts, schema, counts, scan.t_max)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        schema = finish(root, source, scan, plan, opts, schema, counts, splits, rank_info)
        if check is not None:
            check(root)
    return schema


def source_inputs(source: readers.EventSource) -> dict[str, str]:
    """The files `source` reads, by flag (event files and the events side tables)."""
    paths = {f"--input={f.path}": f.path for f in source.files}
    for flag in ("user_table", "item_table"):
        if source.options.get(flag):
            paths[f"--{flag}={source.options[flag]}"] = str(source.options[flag])
    return paths


# What a prepared dataset's folder holds (a synthetic one: planted.json too); anything else
# there (a run trained into the folder) keeps it from being replaced.
PREPARED_ENTRIES = frozenset(
    {SCHEMA_FILE, "vocab", HISTORY_EVENTS, rank_state.FOLDER, "audit", "planted.json", *SPLITS}
)


def check_output(output: str, inputs: dict[str, str]) -> None:
    """Raises DataError, before any work, unless the folder `output` can be (re)placed: it
    must not be, hold or lie in an input (`inputs`: flag=value -> path), nor be a folder of
    the user's own (a prepared dataset, with its schema.json, is replaced)."""
    out = os.path.realpath(output)
    for flag, path in inputs.items():
        if not path or path.startswith(readers.TABLE_PREFIX) or "://" in path:
            continue
        p = os.path.realpath(path)
        if out == p:
            how = "is"
        elif p.startswith(out + os.sep):
            how = "holds"
        elif out.startswith(p + os.sep):
            how = "lies in"
        else:
            continue
        raise DataError(
            f"--output={output} {how} {flag}; the output folder is replaced as a whole: "
            "prepare into a folder apart from the input"
        )
    files.check_output(output, "output", folder=True, replaces=("schema.json",))
    foreign = sorted(
        name
        for name in (os.listdir(out) if os.path.isdir(out) else ())
        if name not in PREPARED_ENTRIES and not name.startswith(("_", "."))
    )
    if foreign:
        raise DataError(
            f"--output={output}: holds {', '.join(foreign[:5])} beside a prepared dataset (a "
            "training run's files?); the output folder is replaced as a whole: move them out "
            "or prepare into another folder"
        )


def finish(
    root: str,
    source: readers.EventSource,
    scan: Scan,
    plan: Plan,
    opts: PrepareOptions,
    schema: Schema,
    counts: dict[str, int],
    splits: dict[str, dict],
    rank_info: dict,
    engine: dict | None = None,
) -> Schema:
    """Writes the vocabularies and schema.json of a prepared folder; returns the schema."""
    vocab_files = {
        name: "vocab/" + v.save(os.path.join(root, "vocab"), name)
        for name, v in plan.vocabs.items()
    }
    vocab_files["user_key"] = "vocab/" + Vocab(plan.user_keys).save(
        os.path.join(root, "vocab"), "user_key"
    )
    extra = {**_extra(source, scan, plan, opts, counts, vocab_files), "rank_state": rank_info}
    extra["engine"] = engine or {"name": "numpy"}
    schema = dataclasses.replace(schema, splits=splits, extra=extra)
    schema.save(root)
    return schema


class Sinks:
    """Everything a preparation appends bucket by bucket: each split's example shards and audit
    sidecars, the event table (histories by reference) and the ranking state. The numpy engine
    feeds one Sinks all buckets in turn; the Spark engine (spark.py) one per bucket in its
    tasks, whose folders `merge_part` then appends in bucket order."""

    def __init__(
        self,
        root: str,
        plan: Plan,
        opts: PrepareOptions,
        schema: Schema,
        t_max: int,
        rows_per_shard: int | None = None,
        shard_sizes: dict[str, list[int]] | None = None,
    ):
        row_bytes = (
            schema.max_len * len(schema.hist_fields)
            + len(schema.user_fields)
            + len(schema.item_fields)
        ) * 4 + 40
        rows = (
            rows_per_shard
            or opts.rows_per_shard
            or int(min(1 << 20, max(4096, opts.memory_mb * 2**20 * SHARD_SHARE / row_bytes)))
        )
        self.root, self.plan, self.opts, self.schema = root, plan, opts, schema
        sizes = shard_sizes or {}
        self.writers = [ShardWriter(root, s, schema, rows, sizes.get(s)) for s in SPLITS]
        self.sidecars = [audit_columns(root, s) for s in SPLITS]
        self.table = event_table(root, schema) if schema.history_events else None
        self.state = RankStateWriter(root, plan, schema, t_max)
        self.offset = 0  # events in the event table so far

    def add(self, ev: np.ndarray, counts: dict[str, int], rules: Rules | None = None) -> None:
        """One bucket's events (RECORD, any order); `rules`: per event, the example rules'
        decisions made elsewhere (examples.Rules, the Spark engine's window functions, which
        also deduplicated the events and counted), else this engine's rules apply."""
        if rules is None:
            ev, n_dup = sort_events(ev, self.opts.dedupe)
            counts["duplicates"] += n_dup
        elif len(ev):
            order = sort_order(ev)
            ev, rules = ev[order], rules.take(order)
        events = Events.of(ev)
        # Each event as a history slot, once: for copied histories, the event table, the state.
        plan, schema = self.plan, self.schema
        slots = event_rows(events, plan.item_rows, plan.item_fields, schema.hist_fields)
        blocks = bucket_examples(ev, plan, self.opts, schema, counts, slots, self.offset, rules)
        for s, cols, last_ts, sampled in blocks:
            self.writers[s].add(cols)
            self.sidecars[s].add(hist_last_ts=last_ts, sampled=sampled)
        if self.table is not None:
            self.table.add(rows=slots, ts=events.ts)
            self.offset += len(ev)
        self.state.add(events, slots)

    def columns(self) -> list[NpyColumns]:
        """The column folders besides the example shards (sidecars, event table, state)."""
        table = [self.table] if self.table is not None else []
        return [*self.sidecars, *table, *self.state.columns()]

    def merge_part(self, part: str) -> None:
        """Appends what a Sinks at `part` (one bucket, made the same way) wrote: its examples
        with their history spans moved by this table's offset, then every column folder."""
        shift = self.offset
        for s, w in zip(SPLITS, self.writers, strict=True):
            for shard in sorted(glob.glob(os.path.join(part, s, "part-*"))):
                cols = {k: np.load(os.path.join(shard, k + ".npy")) for k in w.columns}
                for k in ("hist_lo", "hist_hi"):
                    if k in cols:
                        cols[k] += shift
                w.add(cols)
        for c in self.columns():
            rel = os.path.relpath(c.folder, self.root)
            c.add(**{k: np.load(os.path.join(part, rel, k + ".npy")) for k in c.columns})
        if self.table is not None:
            ts = os.path.join(part, self.schema.history_events, "ts.npy")
            self.offset += len(np.load(ts, mmap_mode="r"))

    def close(self, item_features: bool = True) -> tuple[dict[str, dict], dict]:
        """Finishes every file; returns (Schema.splits, the ranking state's description)."""
        for c in [*self.sidecars, *([self.table] if self.table else [])]:
            c.close()
        rank_info = self.state.close(item_features)
        return {s: w.close() for s, w in zip(SPLITS, self.writers, strict=True)}, rank_info


def _write_examples(
    paths: list[str],
    root: str,
    plan: Plan,
    opts: PrepareOptions,
    schema: Schema,
    counts: dict[str, int],
    t_max: int,
) -> tuple[dict[str, dict], dict]:
    sinks = Sinks(root, plan, opts, schema, t_max)
    for path in paths:
        ev = np.fromfile(path, RECORD)
        os.remove(path)
        sinks.add(ev, counts)
        del ev
    return sinks.close()


def new_counts(opts: PrepareOptions) -> dict[str, int]:
    """The example-building counts of schema.json, all 0."""
    return dict.fromkeys(
        (
            "duplicates",
            "targets",
            "targets_short_history",
            "negatives",
            "negatives_unsampleable",
            "exposures",
            "exposures_merged",
            "exposures_immature",
            "conversions",
            *(f"conversions_{h}" for h in opts.heads),
        ),
        0,
    )


def _input_name(path: str) -> str:
    """An input as schema.json records it: files by absolute path, tables and URIs as given."""
    return path if path.startswith(readers.TABLE_PREFIX) or "://" in path else os.path.abspath(path)


def _extra(
    source: readers.EventSource,
    scan: Scan,
    plan: Plan,
    opts: PrepareOptions,
    counts: dict[str, int],
    vocab_files: dict[str, str],
) -> dict:
    valid_start, test_start = plan.bounds
    return {
        "command": opts.command,
        "source": source.name,
        "inputs": [_input_name(f.path) for f in source.files],
        # How the log was read (events: the column mapping, time format and zone), so that
        # tools/rank.py --events reopens a log of it the same way.
        "source_options": source.options,
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
        "vocab_period": {"period": opts.vocab_period, "rule": VOCAB_RULES[opts.vocab_period]},
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
            "task": opts.task,
            "history_storage": opts.history_storage,
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
