"""Prepares a raw interaction log into a dataset folder (shards, vocab/, schema.json).

    python tools/prepare_data.py --source=taobao \
      --input=$INFLUENCE_JAX_DATA/taobao_userbehavior_sample/UserBehavior_head814users.csv \
      --output=.prepared/taobao --target_behaviour=buy --neg_ratio=4 --max_len=50
    python tools/prepare_data.py --source=taobao --task=conversion --exposure=pv \
      --target_behaviour=buy --horizon_hours=6 --input=... --output=.prepared/taobao_conversion
    python tools/prepare_data.py --source=taobao --task=conversion --heads=cart,fav,buy ...

(--heads: one label per behaviour type, the `labels` column, for multi-task models.)

Besides the example shards it writes rank_state/ (every user's history as of valid_start,
test_start and the end of the log, for tools/rank.py). Sources: taobao (UserBehavior.csv,
optionally .gz), movielens (the ml-100k folder), retailrocket (CML train.csv) and events (any
CSV/Parquet log; map its columns with --user_col etc., and say how its timestamps are written
with --time_format and --time_zone):

    python tools/prepare_data.py --source=events --input=log.csv --output=.prepared/mine \
      --user_col=uid --item_col=sku --behaviour_col=act --behaviour_types=view,cart,buy \
      --timestamp_col=day --time_format=yyyymmdd --time_zone=Asia/Shanghai
"""

from __future__ import annotations

import json
import shlex
import sys

from absl import app, flags, logging

try:
    from influence_jax.data import audit, prepare, readers
except ImportError:  # run from a checkout without `pip install -e .`
    import os

    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from influence_jax.data import audit, prepare, readers
from influence_jax import cli
from influence_jax.data.schema import DataError

_SOURCE = flags.DEFINE_enum(
    "source", None, sorted(readers.SOURCES), "Raw data format (data/sources.py).", required=True
)
_INPUT = flags.DEFINE_string(
    "input",
    None,
    "The raw log: " + "; ".join(f"{n}: {s.input}" for n, s in readers.SOURCES.items()) + ".",
    required=True,
)
_OUTPUT = flags.DEFINE_string(
    "output",
    None,
    "Prepared dataset folder (replaced atomically). --engine=spark: also a URI that pyarrow "
    "writes (gs://, s3://, hdfs://; uploaded, schema.json last).",
    required=True,
)
_NAME = flags.DEFINE_string("name", None, "Dataset name in schema.json (default: the source).")
_MAX_LEN = flags.DEFINE_integer("max_len", 50, "History length: most recent events kept.")
_TASK = flags.DEFINE_enum(
    "task",
    "next_item",
    list(prepare.TASKS),
    "next_item: every target event with sampled negatives; conversion: every exposure, labelled "
    "by a target event on the same item within --horizon_hours (no sampled negatives).",
)
_EXPOSURE = flags.DEFINE_string(
    "exposure", None, "conversion: the exposure behaviour (default: taobao pv, retailrocket view)."
)
_HORIZON = flags.DEFINE_float("horizon_hours", 24.0, "conversion: label window after an exposure.")
_SESSION_GAP = flags.DEFINE_float(
    "session_gap_minutes", 30.0, "conversion: repeated exposures of an item closer than this merge."
)
_HEADS = flags.DEFINE_list(
    "heads",
    [],
    "conversion: behaviour types that each get their own label (multi-task heads), e.g. "
    "cart,fav,buy: the `labels` column [N, H], 1 where the exposure is followed by that "
    "behaviour on the item within --horizon_hours. --target_behaviour defaults to them (label: "
    "any head converts). Empty: the single label.",
)
_TARGET = flags.DEFINE_list(
    "target_behaviour",
    None,
    "Behaviours whose events are targets, or 'any' (default: taobao and "
    "retailrocket buy, movielens and events any).",
)
_NEG_RATIO = flags.DEFINE_integer(
    "neg_ratio",
    None,
    "Sampled negatives per positive (default: movielens 0, taobao/retailrocket 4, events 1).",
)
_NEG_STRATEGY = flags.DEFINE_enum(
    "neg_strategy",
    "uniform",
    ["uniform", "popularity"],
    "How negatives are drawn from the in-vocabulary items.",
)
_LABEL_THRESHOLD = flags.DEFINE_float(
    "label_threshold", None, "Label = value >= this (movielens default 4: rating >= 4)."
)
_SEED = flags.DEFINE_integer("seed", 0, "Negative sampling seed.")
_VALID_FRAC = flags.DEFINE_float("valid_frac", 0.1, "Validation share of the time range.")
_TEST_FRAC = flags.DEFINE_float("test_frac", 0.1, "Test share of the time range.")
_VALID_START = flags.DEFINE_integer("valid_start", None, "Explicit train/valid boundary (unix s).")
_TEST_START = flags.DEFINE_integer("test_start", None, "Explicit valid/test boundary (unix s).")
_MIN_TS = flags.DEFINE_integer(
    "min_timestamp",
    None,
    "Drop events before this (unix s; taobao defaults to the official 2017-11-25..12-03 window).",
)
_MAX_TS = flags.DEFINE_integer("max_timestamp", None, "Drop events after this (unix s).")
_MIN_COUNT = flags.DEFINE_integer(
    "min_count", 1, "Ids seen fewer times (in --vocab_period) embed as OOV (id 1)."
)
_VOCAB_PERIOD = flags.DEFINE_enum(
    "vocab_period",
    "train",
    ["train", "all"],
    "Events the user/item/category vocabularies come from. train: before valid_start, as a "
    "model deployed at the cut knows them; later ids embed as OOV but keep their own ids for "
    "exact matches (same item as the target). all: the whole log.",
)
_HISTORY_STORAGE = flags.DEFINE_enum(
    "history_storage",
    "reference",
    ["reference", "copy"],
    "How examples hold their histories. reference: each event is stored once in the dataset's "
    "event table and an example keeps the span of its history (hist_lo, hist_hi); copy: every "
    "example its own [max_len, fields] array (the format before; ~50x the bytes on the "
    "conversion task). Training, ranking and every tool read both alike.",
)
_MIN_COUNT_FOR = flags.DEFINE_list(
    "min_count_for", [], "Per-vocabulary thresholds, e.g. item_id=5,user_id=1."
)
_MIN_HISTORY = flags.DEFINE_integer("min_history", 0, "Drop targets with fewer earlier events.")
_MAX_RATE = flags.DEFINE_float(
    "max_user_events_per_day",
    None,
    "Cleaning: drop users with more events per day of their active span (crawlers, bots).",
)
_MIN_USER_EVENTS = flags.DEFINE_integer(
    "min_user_events", 0, "Cleaning: drop users with fewer events (--min_count keeps them as OOV)."
)
_MIN_ITEM_EVENTS = flags.DEFINE_integer(
    "min_item_events", 0, "Cleaning: drop items with fewer events (--min_count keeps them as OOV)."
)
_DEDUPE = flags.DEFINE_bool("dedupe", False, "Merge exact duplicate events (always counted).")
_LENIENT = flags.DEFINE_bool("lenient", False, "Count and skip malformed rows instead of failing.")
_MEMORY_MB = flags.DEFINE_integer(
    "memory_mb",
    2048,
    "Memory bound for events and examples (vocabularies come on top: ~40 bytes per user/item).",
)
_TMP_DIR = flags.DEFINE_string("tmp_dir", None, "Folder for bucket files (default: in output).")
_ROWS_PER_SHARD = flags.DEFINE_integer(
    "rows_per_shard", None, "Rows per shard (default: sized from --memory_mb)."
)
_NUM_SHARDS = flags.DEFINE_integer(
    "num_shards",
    None,
    "Shards per split, as equal as can be (--engine=spark: the driver knows each split's rows "
    "before it writes them); instead of --rows_per_shard.",
)
_AUDIT = flags.DEFINE_bool("audit", True, "Run the leakage audit on the result.")
_NUM_BUCKETS = flags.DEFINE_integer(
    "num_buckets",
    None,
    "Users are split into this many buckets (dense user index % N), each turned into examples "
    "in memory at once; with --engine=spark, the tasks (default: sized from --memory_mb). The "
    "output is the same for any count but for row order.",
)
_ENGINE = flags.DEFINE_enum(
    "engine",
    "numpy",
    ["numpy", "spark"],
    "numpy: streaming, on this host. spark: the same recipe and output on Apache Spark "
    "(pip install -e '.[spark]' and Java 17+; see docs/spark.md); --input may then also be "
    "table:DB.NAME (a Hive or catalog table), a Parquet folder or any path Spark reads.",
)
_SPARK_MASTER = flags.DEFINE_string(
    "spark_master",
    None,
    "--engine=spark: the master URL (default: spark-submit's, else local[*]).",
)
_SPARK_CONF = flags.DEFINE_list(
    "spark_conf",
    [],
    "--engine=spark: extra Spark settings key=value, e.g. spark.executor.memory=8g.",
)
# --source=events only.
_EVENT_FLAGS = {
    "user": flags.DEFINE_string("user_col", "user_id", "events: user id column."),
    "item": flags.DEFINE_string("item_col", "item_id", "events: item id column."),
    "behaviour": flags.DEFINE_string("behaviour_col", "behaviour", "events: behaviour column."),
    "timestamp": flags.DEFINE_string(
        "timestamp_col", "timestamp", "events: timestamp column (in --time_format)."
    ),
    "category": flags.DEFINE_string("category_col", "", "events: optional item category column."),
    "value": flags.DEFINE_string("value_col", "", "events: optional numeric value column."),
    "behaviour_types": flags.DEFINE_list(
        "behaviour_types", [], "events: behaviour spellings, e.g. view,cart,buy."
    ),
    "delimiter": flags.DEFINE_string("delimiter", ",", "events: CSV delimiter."),
    "header": flags.DEFINE_bool("header", True, "events: the CSV starts with a header line."),
    "names": flags.DEFINE_list("names", [], "events: column names when --noheader."),
    "string_ids": flags.DEFINE_bool("string_ids", False, "events: ids are strings, not ints."),
    "user_table": flags.DEFINE_string("user_table", "", "events: user side-table file."),
    "user_key": flags.DEFINE_string("user_table_key", "", "events: its user id column."),
    "item_table": flags.DEFINE_string("item_table", "", "events: item side-table file."),
    "item_key": flags.DEFINE_string("item_table_key", "", "events: its item id column."),
    "time_format": flags.DEFINE_string(
        "time_format",
        "unix_s",
        f"events: how --timestamp_col is written: {readers.TIME_FORMAT_HELP}. A value not in "
        "the format is a malformed row. Parquet timestamp columns are read as they are.",
    ),
    "time_zone": flags.DEFINE_string(
        "time_zone",
        "UTC",
        "events: time zone of timestamps without their own offset (iso8601, yyyymmdd, "
        "patterns): an IANA name like Asia/Shanghai or a fixed offset like +08:00.",
    ),
    **{
        f"{g}_{k}": flags.DEFINE_list(f"{g}_{k}", [], f"events: {what}; empty: {default}.")
        for g in ("user", "item")
        for k, what, default in (
            ("fields", f"the {g} table's feature columns", "all but the key"),
            ("table_names", f"the {g} table's column names, if it has no header", "its header"),
        )
    },
    **{
        f"{g}_table_delimiter": flags.DEFINE_string(
            f"{g}_table_delimiter", "", f"events: the {g} table's delimiter (default: --delimiter)."
        )
        for g in ("user", "item")
    },
    "item_category": flags.DEFINE_string(
        "item_category", "", "events: the item table's category column (feeds the history)."
    ),
    "numeric_fields": flags.DEFINE_list(
        "numeric_fields",
        [],
        "events: side-table columns bucketed by quantile (fitted on the entities with training "
        "events) instead of one id per distinct value, e.g. price,income.",
    ),
    "numeric_buckets": flags.DEFINE_integer("numeric_buckets", 10, "events: buckets per numeric."),
    "multi_value_fields": flags.DEFINE_list(
        "multi_value_fields",
        [],
        "events: side-table columns holding several values (Action|Comedy): bags of ids.",
    ),
    "multi_value_sep": flags.DEFINE_string(
        "multi_value_sep", "|", "events: the separator of --multi_value_fields (a literal string)."
    ),
    "max_bag": flags.DEFINE_integer("max_bag", 8, "events: values kept per multi-valued cell."),
}


def _event_kwargs() -> dict:
    if _SOURCE.value != "events":
        given = [f.name for f in _EVENT_FLAGS.values() if f.present]
        if given:
            raise DataError(f"--{', --'.join(given)}: only for --source=events")
        return {}
    kw = {k: f.value for k, f in _EVENT_FLAGS.items()}
    return {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}


def _overrides() -> dict[str, int]:
    out = {}
    for item in _MIN_COUNT_FOR.value:
        name, _, n = item.partition("=")
        if not n.strip().isdigit():
            raise DataError(f"--min_count_for: expected name=N, got {item!r}")
        out[name.strip()] = int(n)
    return out


def _spark_conf() -> dict[str, str]:
    out = {}
    for item in _SPARK_CONF.value:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise DataError(f"--spark_conf: expected key=value, got {item!r}")
        out[key.strip()] = value
    return out


def main(argv: list[str]) -> None:
    del argv
    try:
        if "://" not in _OUTPUT.value:  # a URI (--engine=spark) is uploaded, not replaced
            inputs = {f"--input={_INPUT.value}": _INPUT.value}
            for f in (_EVENT_FLAGS["user_table"], _EVENT_FLAGS["item_table"]):
                inputs[f"--{f.name}={f.value}"] = f.value
            prepare.check_output(_OUTPUT.value, inputs)
        source = readers.open_source(_SOURCE.value, _INPUT.value, **_event_kwargs())
        opts = prepare.PrepareOptions(
            max_len=_MAX_LEN.value,
            task=_TASK.value,
            exposure=_EXPOSURE.value,
            horizon_hours=_HORIZON.value,
            session_gap_minutes=_SESSION_GAP.value,
            heads=tuple(_HEADS.value),
            target_behaviours=tuple(_TARGET.value or ()) or None,
            neg_ratio=_NEG_RATIO.value,
            neg_strategy=_NEG_STRATEGY.value,
            label_threshold=_LABEL_THRESHOLD.value,
            seed=_SEED.value,
            valid_frac=_VALID_FRAC.value,
            test_frac=_TEST_FRAC.value,
            valid_start=_VALID_START.value,
            test_start=_TEST_START.value,
            min_timestamp=_MIN_TS.value,
            max_timestamp=_MAX_TS.value,
            min_count=_MIN_COUNT.value,
            vocab_period=_VOCAB_PERIOD.value,
            history_storage=_HISTORY_STORAGE.value,
            min_count_overrides=_overrides(),
            min_history=_MIN_HISTORY.value,
            max_user_events_per_day=_MAX_RATE.value,
            min_user_events=_MIN_USER_EVENTS.value,
            min_item_events=_MIN_ITEM_EVENTS.value,
            dedupe=_DEDUPE.value,
            lenient=_LENIENT.value,
            memory_mb=_MEMORY_MB.value,
            tmp_dir=_TMP_DIR.value,
            rows_per_shard=_ROWS_PER_SHARD.value,
            num_shards=_NUM_SHARDS.value,
            num_buckets=_NUM_BUCKETS.value,
            name=_NAME.value,
            command=shlex.join(["python", *sys.argv]),
        )
        got = {}  # the audit runs before the folder is renamed into place or uploaded
        check = (
            (lambda root: got.update(report=audit.audit_leakage(root))) if _AUDIT.value else None
        )
        if _ENGINE.value == "spark":
            from influence_jax.data import spark

            schema = spark.prepare(
                source,
                _OUTPUT.value,
                opts,
                master=_SPARK_MASTER.value,
                conf=_spark_conf(),
                check=check,
            )
            report = got.get("report")
        else:
            if _SPARK_MASTER.present or _SPARK_CONF.present:
                raise DataError("--spark_master and --spark_conf need --engine=spark")
            schema = prepare.prepare(source, _OUTPUT.value, opts, check=check)
            report = got.get("report")
    except DataError as e:
        sys.exit(f"prepare_data: {e}")
    logging.info("wrote %s", _OUTPUT.value)
    print(
        json.dumps(
            {
                "output": _OUTPUT.value,
                "rows": {s: v["rows"] for s, v in schema.splits.items()},
                "vocab_sizes": schema.vocab_sizes,
                "counts": schema.extra["counts"],
                "rank_state": schema.extra["rank_state"]["cuts"],
                "audit": report,
            },
            indent=1,
        )
    )


def _main(argv: list[str]) -> None:
    with cli.stopped_cleanly("prepare_data"):  # its temporary folder goes on Ctrl-C or SIGTERM
        main(argv)


if __name__ == "__main__":
    app.run(_main, flags_parser=cli.parse_flags)
