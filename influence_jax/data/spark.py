"""Preparation on Apache Spark (`tools/prepare_data.py --engine=spark`): the numpy engine's
recipe (prepare.py) with its passes over the log run as Spark jobs, so a log in Hive, Parquet or
CSV on a cluster is prepared by the cluster and not by one host.

- Read: Spark's own CSV, Parquet and table readers (`--input=table:db.events` for a Hive or
  catalog table); every batch is validated by the numpy engine's converter (logio.convert), so
  ids, behaviour spellings, time formats and malformed rows follow the same rules. A malformed
  row fails the job naming its file and the row, or with `lenient` is counted and skipped.
- Pass 1: the scan's per-user, per-item and per-category counts are Spark aggregations, collected
  to the driver, which makes the plan (vocabularies, feature rows, negative pool, split
  boundaries) with the same code as the numpy engine.
- Pass 2: events get their dense user and item indices from a broadcast of the plan's sorted
  keys (the numpy engine's lookup), are counted per user and item in the training period (the
  `train` vocabularies), and are shuffled by bucket (dense user % buckets).
- Examples: window functions over each user's events ordered by time (`_rules`, partitioned by
  bucket and user, so no further shuffle) decide the examples: exact repeats, how many events
  precede each (its history's length), targets, thresholded labels, exposure sessions,
  conversion and head labels within the horizon, label maturity, short histories. Each task then
  materialises its buckets with the numpy engine's per-bucket writer (prepare.Sinks given those
  decisions): histories or their spans into the event table, the seeded negatives, the ranking
  state, one part folder per bucket.
- The driver appends the parts in bucket order to the prepared folder (shards, event table,
  ranking state, vocabularies, schema.json), so with the same bucket count the output is the
  numpy engine's, file for file (tests/test_spark.py checks it on four real datasets and
  synthetic logs: the window functions and examples.py are two implementations of one set of
  rules).

The output is a folder that the driver and every executor see under one path (one machine, or
a shared mount), written atomically (files.atomic_folder), or a URI of pyarrow's filesystems
(gs://, s3://, hdfs://, file://): then the tasks upload their parts and the driver assembles the
folder locally and uploads it, schema.json last (`prepare`).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs

from influence_jax import files
from influence_jax.data import cleaning, logio, readers
from influence_jax.data.examples import Rules
from influence_jax.data.plan import (
    RECORD,
    SPLITS,
    Plan,
    PrepareOptions,
    Scan,
    make_plan,
    training_vocabs,
)
from influence_jax.data.prepare import Sinks, _schema, finish, new_counts
from influence_jax.data.schema import DataError, Schema
from influence_jax.data.store import shard_sizes
from influence_jax.data.vocab import indexer

TABLE_PREFIX = logio.TABLE_PREFIX  # --input=table:db.events reads a Hive / catalog table
# Per validated row, which rules it broke (bits); 0: a good row.
BLANK = 1
REASON_BITS = {r: 2 << i for i, r in enumerate(logio.REASONS)}
SKEW_WARN, SKEW_MIN_EVENTS = 4.0, 100_000  # a bucket this many times the mean (and this big)
PROGRESS_S = 30.0  # seconds between progress lines of the running Spark stages
PART_ROWS = 1 << 62  # one shard per split in a part: the driver cuts the final shards
WAREHOUSE = os.path.join(tempfile.gettempdir(), "influence_jax-spark-warehouse")
SPARK_MISSING = (
    "--engine=spark needs PySpark and a Java runtime (17 or newer): pip install -e '.[spark]' "
    "and, on Debian/Ubuntu, apt-get install default-jre-headless"
)


def session(master: str | None = None, memory_mb: int = 2048, conf: dict | None = None):
    """A SparkSession: `master` (default: the one spark-submit set, else local[*]). Started
    from Python (not spark-submit), the driver gets `memory_mb` of heap (in local mode it runs
    the tasks too) and the workers this interpreter. Logs at WARN."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise DataError(SPARK_MISSING) from None
    if not shutil.which("java") and not os.environ.get("JAVA_HOME"):
        raise DataError(SPARK_MISSING)
    b = SparkSession.builder.appName("influence_jax-prepare")
    if master:
        b = b.master(master)
    defaults = {
        "spark.ui.showConsoleProgress": "false",
        "spark.sql.shuffle.partitions": "16",
        # Malformed CSV rows are found by the parser only when it parses every column.
        "spark.sql.csv.parser.columnPruning.enabled": "false",
        "spark.sql.session.timeZone": "UTC",
        # Input splits (and so persisted blocks) small enough to be read back into a small
        # heap: 128 MB blocks of events did not fit a 1 GB driver in local mode.
        "spark.sql.files.maxPartitionBytes": f"{min(128, max(8, memory_mb // 32))}m",
    }
    if "PYSPARK_GATEWAY_PORT" not in os.environ:  # not under spark-submit, whose flags rule
        defaults["spark.driver.memory"] = f"{max(1024, memory_mb)}m"
        # A running Python driver hands its workers PYSPARK_PYTHON, or else whatever `python3`
        # is on PATH (spark.pyspark.python is read by spark-submit only): without this, a
        # venv's python run without activating it started workers of another interpreter,
        # which lacked pyarrow.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        # Spark SQL makes its warehouse folder (unused here: no managed tables) at session start
        # in the working folder; an empty `spark-warehouse` was left wherever a user ran.
        defaults["spark.sql.warehouse.dir"] = WAREHOUSE
    for k, v in {**defaults, **(conf or {})}.items():
        b = b.config(k, v)
    spark = b.getOrCreate()
    spark.sparkContext.setLogLevel("WARN")
    return spark


# ---------------------------------------------------------------------------------------------
# Reading


def _csv_names(spark, f: logio.EventFile) -> tuple[str, ...]:
    if f.names is not None:
        return tuple(f.names)
    if os.path.exists(f.path):
        return logio.read_header(f.path, f.delimiter)
    first = spark.read.text(f.path).first()
    if first is None:
        raise DataError(f"{f.path}: empty file (expected a header line)")
    return tuple(c.strip() for c in first[0].lstrip("\ufeff").split(f.delimiter))


def _raw_frame(spark, f: logio.EventFile):
    """The file's role columns (one column may play two roles), its path and, for CSV, the
    text of rows with a wrong field count (`_corrupt`)."""
    from pyspark.sql import functions as F
    from pyspark.sql import types as T

    cols = {r: f.roles[r] for r in logio.ROLES if r in f.roles}
    kind = _kind(f.path)
    if kind == "table":
        df = spark.table(f.path[len(TABLE_PREFIX) :])
    elif kind == "parquet":
        df = spark.read.parquet(f.path)
    else:
        names = _csv_names(spark, f)
        schema = T.StructType(
            [T.StructField(n, T.StringType()) for n in names]
            + [T.StructField("_corrupt", T.StringType())]
        )
        df = (
            spark.read.schema(schema)
            .options(
                sep=f.delimiter,
                header=str(f.names is None).lower(),
                quote='"' if f.quoted else "",
                mode="PERMISSIVE",
                columnNameOfCorruptRecord="_corrupt",
                nullValue="\u0000",  # an empty field stays an empty string, as in pyarrow
            )
            .csv(f.path)
        )
    missing = [c for c in cols.values() if c not in df.columns]
    if missing:
        raise DataError(f"{f.path}: missing column(s) {missing}; the file has {df.columns}")
    corrupt = F.col("_corrupt") if kind == "csv" else F.lit(None).cast("string")
    return df.select(
        *[F.col(c).alias(r) for r, c in cols.items()],
        F.input_file_name().alias("_file"),
        corrupt.alias("_corrupt"),
    )


def _kind(path: str) -> str:
    """How an input is read: "table" (table:NAME), "parquet" (a file or a folder of them) or
    "csv"."""
    if path.startswith(TABLE_PREFIX):
        return "table"
    if path.endswith((".parquet", ".pq")) or (
        os.path.isdir(path) and any(n.endswith(".parquet") for n in os.listdir(path))
    ):
        return "parquet"
    return "csv"


def _validate(
    batches: Iterator[pa.RecordBatch], f: logio.EventFile, string_ids: bool
) -> Iterator[pa.RecordBatch]:
    """Spark task: raw batches -> canonical event columns and the rules each row broke."""
    roles = [r for r in logio.ROLES if r in f.roles]
    for b in batches:
        by_role = {}
        for r in roles:
            a = b.column(r)
            by_role[r] = pc.fill_null(a, "") if pa.types.is_string(a.type) else a
        chunk, blank, bad = logio.convert(by_role, f, string_ids)
        logio.flag_encoding(by_role, blank, bad)  # Spark reads invalid UTF-8 as U+FFFD too
        bits = np.where(blank, BLANK, 0).astype(np.int32)
        for reason, m in bad.items():
            bits |= np.where(m, REASON_BITS[reason], 0).astype(np.int32)
        corrupt = np.asarray(b.column("_corrupt").is_valid())
        bits = np.where(corrupt, REASON_BITS["wrong_field_count"], bits).astype(np.int32)
        text = [None] * b.num_rows
        for i in np.flatnonzero(bits > BLANK)[:1]:  # the first bad row's text, for the error
            text[i] = b.column("_corrupt")[i].as_py() or f.delimiter.join(
                str(by_role[r][i].as_py()) for r in roles
            )
        ok = bits == 0
        n = b.num_rows
        cols = {
            "user": _ids(chunk.user, ok, string_ids),
            "item": _ids(chunk.item, ok, string_ids),
            "ts": pa.array(chunk.timestamp, pa.int64()),
            "value": pa.array(
                np.ones(n, np.float32) if chunk.value is None else chunk.value, pa.float32()
            ),
            "beh": pa.array(chunk.behaviour, pa.int8()),
        }
        if chunk.category is not None:
            cols["category"] = _ids(chunk.category, ok, string_ids)
        cols |= {
            "bits": pa.array(bits),
            "text": pa.array(text, pa.string()),
            # Only where a row broke a rule: the persisted events stay small.
            "file": pc.if_else(
                pa.array(bits > BLANK), b.column("_file"), pa.scalar(None, pa.string())
            ),
        }
        yield pa.RecordBatch.from_pydict(cols)


def _ids(a: pa.Array, ok: np.ndarray, string_ids: bool) -> pa.Array:
    """Ids of good rows; others empty (string) or 0 (they are filtered out)."""
    if string_ids:
        return pc.if_else(pa.array(ok), a, "")
    return pa.array(np.where(ok, np.asarray(a), 0), pa.int64())


def read_events(spark, source: readers.EventSource):
    """Every file of `source` as validated rows: user, item, ts, value, beh[, category] and the
    rules each row broke (`bits`; 0: good), with its file and, for the first bad row of a
    batch, its text."""
    id_type = "string" if source.string_ids else "long"
    out = None
    for f in source.files:
        raw = _raw_frame(spark, f)
        fields = [f"user {id_type}", f"item {id_type}", "ts long", "value float", "beh byte"]
        if "category" in f.roles:
            fields.append(f"category {id_type}")
        fields += ["bits int", "text string", "file string"]
        fn = functools.partial(_validate, f=f, string_ids=source.string_ids)
        df = raw.mapInArrow(fn, ", ".join(fields))
        out = df if out is None else out.unionByName(df)
    return out


# ---------------------------------------------------------------------------------------------
# Pass 1: the scan


def _to_arrow(df) -> pa.Table:
    t = df.toArrow()
    return pa.table(
        {
            c: t.column(c).cast(pa.string())
            if pa.types.is_large_string(t.column(c).type)
            else t.column(c)
            for c in t.column_names
        }
    )


def _stats(df, keys: str, pair: str | None) -> pa.Table:
    """IdStats.result() of the numpy scan: k (sorted), n and, with `pair`, lo, hi."""
    from pyspark.sql import functions as F

    aggs = [F.count(F.lit(1)).alias("n")]
    if pair:
        aggs += [F.min(pair).alias("lo"), F.max(pair).alias("hi")]
    t = _to_arrow(df.groupBy(F.col(keys).alias("k")).agg(*aggs)).sort_by("k")
    return pa.table({c: t.column(c).combine_chunks() for c in t.column_names})


def scan(spark, source: readers.EventSource, opts: PrepareOptions):
    """Pass 1 on Spark: (Scan as the numpy engine's scan_log makes it, the events in the time
    window as a persisted DataFrame: user, item, ts, value, beh[, category])."""
    from pyspark import StorageLevel
    from pyspark.sql import functions as F

    ev = read_events(spark, source).persist(StorageLevel.DISK_ONLY)
    good = F.col("bits") == 0
    window = F.lit(True)
    if opts.min_timestamp is not None:
        window &= F.col("ts") >= opts.min_timestamp
    if opts.max_timestamp is not None:
        window &= F.col("ts") <= opts.max_timestamp
    bit = lambda b: F.sum((F.col("bits").bitwiseAND(b) != 0).cast("long"))  # noqa: E731
    row = ev.agg(
        F.sum(good.cast("long")).alias("rows_valid"),
        F.sum((good & window).cast("long")).alias("events"),
        F.min(F.when(good & window, F.col("ts"))).alias("t_min"),
        F.max(F.when(good & window, F.col("ts"))).alias("t_max"),
        bit(BLANK).alias("blank_lines"),
        *[bit(b).alias(r) for r, b in REASON_BITS.items()],
    ).first()
    rows_valid, n_events = int(row["rows_valid"] or 0), int(row["events"] or 0)
    bad = {r: int(row[r] or 0) for r in REASON_BITS}
    if not opts.lenient and any(bad.values()):
        try:
            _raise_first_bad(ev, source)
        finally:
            ev.unpersist()
    tally = {}
    if any(_kind(f.path) == "csv" for f in source.files):
        tally["blank_lines"] = int(row["blank_lines"] or 0)
        tally["wrong_field_count"] = bad["wrong_field_count"]
    has_value = source.has_value
    for r in ("bad_id", "bad_timestamp", "unknown_behaviour", *(["bad_value"] * has_value)):
        tally[r] = bad[r]
    if bad["bad_encoding"]:  # as the numpy engine's tally: only when a row had it
        tally["bad_encoding"] = bad["bad_encoding"]
    if n_events == 0:
        ev.unpersist()
        raise DataError(
            f"{', '.join(f.path for f in source.files)}: no events to prepare ({rows_valid} valid "
            f"rows, {rows_valid - n_events} outside the time window, skipped {tally})"
        )
    cols = ["user", "item", "ts", "value", "beh"]
    if source.has_event_category:
        cols.append("category")
    events = ev.filter(good & window).select(*cols).persist(StorageLevel.DISK_ONLY)
    rate_rule = bool(opts.max_user_events_per_day)
    users = _stats(events, "user", "ts" if rate_rule else None)
    items = _stats(events, "item", "category" if source.has_event_category else None)
    cats = _stats(events, "category", None) if source.has_event_category else None
    beh = events.groupBy("beh").count().collect()
    behaviours = np.zeros(len(source.behaviour_types), np.int64)
    for r in beh:
        behaviours[int(r["beh"])] = int(r["count"])
    ev.unpersist()
    counts = {
        "rows_valid": rows_valid,
        "events": n_events,
        "outside_time_window": rows_valid - n_events,
        **{f"skipped_{k}": v for k, v in sorted(tally.items())},
    }
    dropped = cleaning.Dropped()
    if opts.cleaning_rules.active:
        users, items, dropped, removed = cleaning.apply(users, items, opts.cleaning_rules)
        counts.update(removed)
    scanned = Scan(
        users, items, cats, behaviours, int(row["t_min"]), int(row["t_max"]), counts, dropped
    )
    return scanned, events


def _raise_first_bad(ev, source: readers.EventSource) -> None:
    from pyspark.sql import functions as F

    r = ev.filter((F.col("bits") > BLANK) & F.col("text").isNotNull()).first()
    if r is None:  # a bad row past the first of its batch
        r = ev.filter(F.col("bits") > BLANK).first()
    reason = next(k for k, b in REASON_BITS.items() if r["bits"] & b)
    raise DataError(
        f"{r['file']}: {logio.REASONS[reason]}: row {r['text']!r}. Fix or delete the row, or "
        "pass --lenient to count and skip malformed rows (the numpy engine, --engine=numpy, "
        "names its line)."
    )


# ---------------------------------------------------------------------------------------------
# Pass 2: dense indices, buckets, examples


def _index_task(batches: Iterator[pa.RecordBatch], ctx) -> Iterator[pa.RecordBatch]:
    """Spark task: events -> dense user and item indices (positions in the plan's sorted keys,
    as the numpy engine's pass 2 finds them) and their bucket; events of ids the cleaning rules
    dropped fall out."""
    user_keys, item_keys, dropped, buckets = ctx.value
    user_pos, item_pos = indexer(user_keys), indexer(item_keys)
    for b in batches:
        user, item = b.column("user"), b.column("item")
        keep = dropped.keep(user, item)
        if keep is not None:
            b = b.filter(pa.array(keep))
            user, item = b.column("user"), b.column("item")
        (u, ok_u), (i, ok_i) = user_pos(user), item_pos(item)
        if not (ok_u.all() and ok_i.all()):
            raise DataError("an id not seen in the first pass; did the input change?")
        yield pa.RecordBatch.from_pydict(
            {
                "u": pa.array(u, pa.int32()),
                "i": pa.array(i, pa.int32()),
                "ts": b.column("ts"),
                "value": b.column("value"),
                "beh": b.column("beh"),
                "bucket": pa.array(u % buckets, pa.int32()),
            }
        )


def _dense(spark, events, plan: Plan):
    """Events with dense user and item indices and their bucket (see `_index_task`)."""
    ctx = spark.sparkContext.broadcast(
        (plan.user_keys, plan.item_keys, plan.dropped, plan.num_buckets)
    )
    task = functools.partial(_index_task, ctx=ctx)
    schema = "u int, i int, ts long, value float, beh byte, bucket int"
    return events.mapInArrow(task, schema), ctx


def _train_counts(dense, n: int, col: str, valid_start: int) -> np.ndarray:
    from pyspark.sql import functions as F

    out = np.zeros(n, np.int64)
    t = dense.filter(F.col("ts") < valid_start).groupBy(col).count().toArrow()
    out[np.asarray(t.column(col), np.int64)] = np.asarray(t.column("count"), np.int64)
    return out


def _is_uri(path: str) -> bool:
    """A URI (gs://, s3://, hdfs://, file://): written through pyarrow.fs, not as a path."""
    return "://" in path


def _write_part(
    ev: np.ndarray, b: int, parts: str, ctx, counts: dict, rules: Rules
) -> dict[str, int]:
    """Bucket `b`'s part folder: prepare.Sinks into a temporary folder, then renamed into
    place (a retried or speculative attempt: the first wins; the content is the same) or, for
    a URI, uploaded. Returns its rows per split."""
    plan, opts, schema, t_max = ctx
    remote = _is_uri(parts)
    scratch = tempfile.mkdtemp(prefix="influence_jax-part-") if remote else None
    final = os.path.join(parts, f"b{b:06d}") if not remote else f"{parts}/b{b:06d}"
    tmp = os.path.join(scratch, "part") if remote else f"{final}.tmp-{uuid.uuid4().hex}"
    sinks = Sinks(tmp, plan, opts, schema, t_max, rows_per_shard=PART_ROWS)
    sinks.add(ev, counts, rules)
    splits, _ = sinks.close(item_features=False)
    rows = {s: int(v["rows"]) for s, v in splits.items()}
    if remote:
        pafs.copy_files(tmp, final)
        shutil.rmtree(scratch, ignore_errors=True)
        return rows
    try:
        os.rename(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


# Bits of the `flags` column the window functions give each event (see `_rules`).
TARGET, SHORT, EXPOSURE, MERGED, IMMATURE = (1 << i for i in range(5))


def _rules(frame, plan: Plan, opts: PrepareOptions, head_codes: tuple[int, ...]):
    """The example rules as window functions over each user's events ordered by time, on a
    frame partitioned by bucket (no further shuffle: every window is partitioned by bucket and
    user). Adds per event:

    - dups: on the first of exact repeats, how many others there are (with `opts.dedupe` they
      are dropped);
    - before: how many of the user's events happen strictly before it (its history's length
      before the max_len cap);
    - label (float), heads (bit h: head h's label), flags (TARGET, SHORT: before <
      min_history, EXPOSURE, MERGED into the previous exposure of the pair, IMMATURE); the
      examples are the events with TARGET and not SHORT (`_rule_counts`).

    next_item: a target is an event of a target behaviour, its label 1 or value >= threshold.
    conversion: an exposure is merged into the previous exposure of the same user and item
    within session_gap_minutes; a kept exposure whose horizon ends before its split's end is a
    target, labelled by whether an event of a target behaviour on the pair follows within
    horizon_hours (the same rule per head). These are the rules examples.py implements with
    index arithmetic; tests/test_spark.py checks the outputs equal."""
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    c, lit = F.col, F.lit
    # Exact repeats: the rows of one (user, time, behaviour, item, value); the first counts
    # the others.
    same = Window.partitionBy("bucket", "u", "ts", "beh", "i", "value")
    first = F.row_number().over(same.orderBy("ts")) == 1
    frame = frame.withColumn("_first", first).withColumn(
        "dups", F.when(c("_first"), F.count(lit(1)).over(same) - 1).otherwise(lit(0))
    )
    if opts.dedupe:
        frame = frame.filter(c("_first"))
    user = Window.partitionBy("bucket", "u").orderBy("ts")
    frame = frame.withColumn("before", F.rank().over(user) - 1)
    targets = [int(b) for b in np.flatnonzero(plan.targets)]
    if opts.task == "conversion":
        gap, horizon = int(opts.session_gap_minutes * 60), int(round(opts.horizon_hours * 3600))
        pair = Window.partitionBy("bucket", "u", "i").orderBy("ts", "beh", "value")
        is_exp = c("beh") == plan.exposure
        prev = F.last(F.when(is_exp, c("ts")), ignorenulls=True).over(
            pair.rowsBetween(Window.unboundedPreceding, -1)
        )
        frame = frame.withColumn("_prev", prev)  # a column: window expressions are not shared
        merged = is_exp & c("_prev").isNotNull() & (c("ts") - c("_prev") <= gap)
        ahead = Window.partitionBy("bucket", "u", "i").orderBy("ts").rangeBetween(0, horizon)
        label = F.max(c("beh").isin(targets).cast("int")).over(ahead)
        heads = lit(0)
        for h, code in enumerate(head_codes):
            heads = heads + F.max((c("beh") == code).cast("int")).over(ahead) * (1 << h)
        valid_start, test_start = plan.bounds
        end = (
            F.when(c("ts") < valid_start, lit(valid_start))
            .when(c("ts") < test_start, lit(test_start))
            .otherwise(lit(plan.t_end))
        )
        immature = is_exp & ~merged & (c("ts") + horizon >= end)
        target = is_exp & ~merged & ~immature
        flags = (
            is_exp.cast("int") * EXPOSURE + merged.cast("int") * MERGED
            + immature.cast("int") * IMMATURE
        )  # fmt: skip
    else:
        target = c("beh").isin(targets)
        thr = opts.label_threshold
        # float32 against float32, as numpy compares the float32 values with the threshold
        label = (
            (c("value") >= lit(float(np.float32(thr))).cast("float")) if thr is not None else lit(1)
        )
        heads, flags = lit(0), lit(0)
    short = c("before") < opts.min_history
    flags = flags + target.cast("int") * TARGET + short.cast("int") * SHORT
    return frame.select(
        "u", "i", "ts", "value", "beh", "bucket", "dups", "before",
        label.cast("float").alias("label"), heads.cast("long").alias("heads"),
        flags.cast("int").alias("flags"),
    )  # fmt: skip


def _rule_counts(flags: np.ndarray, label: np.ndarray, heads: np.ndarray, dups: np.ndarray,
                 opts: PrepareOptions, counts: dict) -> np.ndarray:  # fmt: skip
    """Adds a bucket's counts (schema.json) from the window functions' columns; returns each
    event's `example` flag."""
    f = flags.astype(np.int64)
    target, short = (f & TARGET) > 0, (f & SHORT) > 0
    example = target & ~short
    counts["duplicates"] += int(dups.sum())
    counts["targets"] += int(example.sum())
    counts["targets_short_history"] += int((target & short).sum())
    if opts.task == "conversion":
        exp, merged = (f & EXPOSURE) > 0, (f & MERGED) > 0
        counts["exposures"] += int(exp.sum())
        counts["exposures_merged"] += int(merged.sum())
        counts["exposures_immature"] += int(((f & IMMATURE) > 0).sum())
        counts["conversions"] += int((label[target] > 0).sum())
        for h, name in enumerate(opts.heads):
            counts[f"conversions_{name}"] += int(((heads[target] >> h) & 1).sum())
    return example


def _bucket_task(batches: Iterator[pa.RecordBatch], ctx, parts: str) -> Iterator[pa.RecordBatch]:
    """Spark task: this partition's buckets, with the rules' columns (`_rules`) -> one part
    folder each (prepare.Sinks)."""
    plan, opts, schema, t_max = ctx.value
    got = list(batches)
    if not got or not sum(b.num_rows for b in got):
        return
    t = pa.Table.from_batches(got)
    bucket = np.asarray(t.column("bucket"))
    order = np.argsort(bucket, kind="stable")
    bucket = bucket[order]
    col = lambda name: np.asarray(t.column(name))[order]  # noqa: E731
    rec = np.empty(len(order), RECORD)
    for f, c in (("user", "u"), ("item", "i"), ("ts", "ts"), ("value", "value"), ("beh", "beh")):
        rec[f] = col(c)
    before, label, heads = col("before").astype(np.int64), col("label"), col("heads")
    flags, dups = col("flags"), col("dups")
    ends = np.flatnonzero(np.r_[bucket[1:] != bucket[:-1], True]) + 1
    for lo, hi in zip(np.r_[0, ends[:-1]], ends, strict=True):
        b = int(bucket[lo])
        counts = new_counts(opts)
        part = slice(lo, hi)
        example = _rule_counts(flags[part], label[part], heads[part], dups[part], opts, counts)
        rules = Rules(before[part], example, label[part].astype(np.float32), heads[part])
        rows = _write_part(rec[part], b, parts, (plan, opts, schema, t_max), counts, rules)
        yield pa.RecordBatch.from_pydict(
            {
                "bucket": pa.array([b], pa.int32()),
                "events": pa.array([hi - lo], pa.int64()),
                "counts": [json.dumps(counts)],
                "rows": [json.dumps(rows)],
            }
        )


def _skew(rows: list, buckets: int) -> dict:
    """The largest bucket's events against the mean; a warning when it is over SKEW_WARN x."""
    sizes = [int(r["events"]) for r in rows]
    largest, mean = max(sizes, default=0), sum(sizes) / buckets
    if largest > SKEW_WARN * mean and largest >= SKEW_MIN_EVENTS:
        logging.warning(
            "bucket %d holds %d events, %.1fx the mean bucket: a few very active users (a "
            "user's events stay in one bucket) set the memory and time of its task; cap them "
            "with --max_user_events_per_day or --min_user_events (docs/spark.md)",
            rows[sizes.index(largest)]["bucket"],
            largest,
            largest / mean,
        )
    return {"largest_bucket_events": largest, "mean_bucket_events": round(mean, 1)}


class Progress:
    """While open, logs every `every` seconds each running Spark stage: tasks done of all, the
    rate since the stage was first seen and the time left at that rate."""

    def __init__(self, spark, every: float = PROGRESS_S):
        self.tracker, self.every = spark.sparkContext.statusTracker(), every
        self.phase = "starting"  # what the engine is doing, set as it goes
        self.seen: dict[int, tuple[float, int]] = {}  # stage -> (first seen, tasks done then)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="spark-progress", daemon=True)

    def __enter__(self) -> Progress:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            try:
                ids = self.tracker.getActiveStageIds()
                infos = [self.tracker.getStageInfo(i) for i in ids]
            except Exception:  # noqa: BLE001  (the session is closing; progress is best effort)
                return
            for info in filter(None, infos):
                self.log(info, time.time())

    def log(self, info, now: float) -> str:
        """One stage's line (also logged)."""
        t0, done0 = self.seen.setdefault(info.stageId, (now, info.numCompletedTasks))
        done, total = info.numCompletedTasks, info.numTasks
        rate = (done - done0) / (now - t0) if now > t0 else 0.0
        eta = f"{(total - done) / rate:.0f} s" if rate > 0 else "unknown"
        line = (
            f"spark stage {info.stageId} ({self.phase}; {info.name.split(' at ')[0]}): "
            f"{done}/{total} tasks ({info.numActiveTasks} running), {rate:.2f} tasks/s, ETA {eta}"
        )
        logging.info(line)
        return line


def prepare(
    source: readers.EventSource,
    output: str,
    opts: PrepareOptions,
    *,
    master: str | None = None,
    conf: dict | None = None,
    spark=None,
    check=None,
    progress_s: float = PROGRESS_S,
) -> Schema:
    """Prepares `source` into `output` on Spark (see the module docstring); returns its
    schema. `spark`: a session to use (default: `session(master, opts.memory_mb, conf)`);
    the running stages' progress is logged every `progress_s` seconds.

    `output` is a folder that the driver and every executor see, or a URI that pyarrow.fs
    writes (gs://, s3://, hdfs://, file://): the tasks then upload their parts next to it,
    the driver assembles the folder in a local temporary one (under `opts.tmp_dir`), runs
    `check(folder)` on it if given, and uploads it, schema.json last (a folder without
    schema.json is not a dataset)."""
    opts = opts.resolve(source)
    spark = spark or session(master, opts.memory_mb, conf)
    from pyspark.errors import PySparkException

    with Progress(spark, progress_s) as progress:
        try:
            return _prepare(source, output, opts, spark, check, progress)
        except PySparkException as e:  # a missing path, a failed task: one line, not the JVM's
            raise _one_line(e) from None


def _one_line(e: Exception) -> DataError:
    """Spark's error as one DataError: the DataError a task raised, else Spark's first line."""
    text = str(e)
    raised = re.findall(r"DataError: (.*)", text)
    if raised:
        return DataError(raised[-1])
    first = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(e).__name__)
    return DataError(f"Spark: {first}")


def _prepare(source, output: str, opts: PrepareOptions, spark, check, progress) -> Schema:
    """`prepare` into a folder or, through a local one, a URI."""
    if not _is_uri(output):
        with files.atomic_folder(output) as root:
            parts = os.path.join(root, "_parts")
            schema = _prepare_into(root, parts, source, opts, spark, progress)
            if check:
                check(root)
        return schema
    fs, base = pafs.FileSystem.from_uri(output)
    parts = f"{output.rstrip('/')}.parts-{uuid.uuid4().hex}"
    staging = tempfile.mkdtemp(prefix="influence_jax-spark-", dir=opts.tmp_dir)
    try:
        root = os.path.join(staging, "out")
        schema = _prepare_into(root, parts, source, opts, spark, progress)
        if check:
            check(root)
        _upload(root, fs, base)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        pfs, pbase = pafs.FileSystem.from_uri(parts)
        if pfs.get_file_info(pbase).type != pafs.FileType.NotFound:
            pfs.delete_dir(pbase)
    logging.info("spark: uploaded %s", output)
    return schema


def _upload(root: str, fs, base: str) -> None:
    """Replaces the folder `base` of `fs` with the local folder `root`, schema.json last."""
    if fs.get_file_info(base).type != pafs.FileType.NotFound:
        fs.delete_dir(base)
    local = pafs.LocalFileSystem()
    names = sorted(
        os.path.relpath(os.path.join(d, f), root) for d, _, fs_ in os.walk(root) for f in fs_
    )
    for rel in [n for n in names if n != "schema.json"] + ["schema.json"]:
        dst = f"{base.rstrip('/')}/{rel}"
        fs.create_dir(os.path.dirname(dst), recursive=True)
        pafs.copy_files(
            os.path.join(root, rel), dst, source_filesystem=local, destination_filesystem=fs
        )


def _fetch_part(parts: str, b: int, scratch: str) -> str:
    """Bucket `b`'s part folder as a local path (downloaded into `scratch` from a URI)."""
    if not _is_uri(parts):
        return os.path.join(parts, f"b{b:06d}")
    local = os.path.join(scratch, f"b{b:06d}")
    pafs.copy_files(f"{parts}/b{b:06d}", local)
    return local


def _prepare_into(
    root: str, parts: str, source, opts: PrepareOptions, spark, progress: Progress
) -> Schema:
    """The preparation proper: `root` a new local folder, `parts` where tasks put theirs."""
    from pyspark import StorageLevel

    t0 = time.time()
    os.makedirs(root, exist_ok=True)
    progress.phase = "pass 1: read, validate, count"
    scanned, events = scan(spark, source, opts)
    plan = make_plan(source, scanned, opts)
    t1 = time.time()
    logging.info(
        "spark pass 1: %d events, %d users, %d items; %d buckets (%.1f s)",
        scanned.counts["events"],
        plan.counts["users"],
        plan.counts["items"],
        plan.num_buckets,
        time.time() - t0,
    )
    progress.phase = "pass 2: index, count the training period"
    dense, index_ctx = _dense(spark, events, plan)
    dense = dense.persist(StorageLevel.DISK_ONLY)
    gone = plan.dropped
    if any(x is not None and len(x) for x in (gone.users, gone.items)):
        kept = dense.count()
        plan.counts["cleaning_events_removed"] = scanned.counts["events"] - kept
    valid_start = plan.bounds[0]
    user_n = _train_counts(dense, len(plan.user_keys), "u", valid_start)
    item_n = _train_counts(dense, len(plan.item_keys), "i", valid_start)
    if opts.vocab_period == "train":
        plan = training_vocabs(plan, user_n, item_n, opts)
    events.unpersist()  # `dense` is persisted: pass 2 reads it twice more
    schema = _schema(source, plan, opts)
    ctx = spark.sparkContext.broadcast((plan, opts, schema, scanned.t_max))
    if not _is_uri(parts):
        os.makedirs(parts)
    task = functools.partial(_bucket_task, ctx=ctx, parts=parts)
    head_codes = tuple(schema.behaviour_types.index(h) for h in opts.heads)
    progress.phase = "pass 2: shuffle by bucket, examples"
    P = plan.num_buckets
    rows = (
        _rules(dense.repartition(P, "bucket"), plan, opts, head_codes)
        .mapInArrow(task, "bucket int, events long, counts string, rows string")
        .collect()
    )
    dense.unpersist()
    for c in (ctx, index_ctx):
        c.destroy()
    t2 = time.time()
    logging.info("spark pass 2: %d buckets (%.1f s)", len(rows), t2 - t0)
    skew = _skew(rows, P)
    counts = new_counts(opts)
    for r in rows:
        for k, v in json.loads(r["counts"]).items():
            counts[k] += v
    sizes = None
    if opts.num_shards:  # the parts' rows per split are known: cut each into num_shards
        split_rows = {s: sum(json.loads(r["rows"])[s] for r in rows) for s in SPLITS}
        sizes = {s: shard_sizes(n, opts.num_shards) for s, n in split_rows.items()}
    sinks = Sinks(root, plan, opts, schema, scanned.t_max, shard_sizes=sizes)
    scratch = os.path.join(root, "_fetched")
    order, last = sorted(r["bucket"] for r in rows), time.time()
    for i, b in enumerate(order):
        part = _fetch_part(parts, b, scratch)
        sinks.merge_part(part)
        shutil.rmtree(part)
        if time.time() - last >= progress.every:
            last, spent = time.time(), time.time() - t2
            logging.info(
                "spark: appended %d/%d parts, %.2f parts/s, ETA %.0f s",
                i + 1, len(order), (i + 1) / spent, (len(order) - i - 1) * spent / (i + 1),
            )  # fmt: skip
    for folder in (scratch, *([] if _is_uri(parts) else [parts])):
        shutil.rmtree(folder, ignore_errors=True)
    splits, rank_info = sinks.close()
    engine = {
        "name": "spark",
        "master": spark.sparkContext.master,
        "spark_version": spark.version,
        "buckets": P,
        **skew,
        # Wall seconds: the scan and plan; indexing, shuffle and the tasks; the driver's
        # append of the parts.
        "seconds": {
            "pass1": round(t1 - t0, 2),
            "pass2": round(t2 - t1, 2),
            "append": round(time.time() - t2, 2),
        },
    }
    schema = finish(root, source, scanned, plan, opts, schema, counts, splits, rank_info, engine)
    logging.info("spark: prepared %s in %.1f s", root, time.time() - t0)
    return schema
