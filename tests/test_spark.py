"""The Spark engine (data/spark.py): with the same bucket count its output is the numpy
engine's, file for file (schema.json but for the engine and command), on the real datasets and
synthetic logs, from CSV, Parquet and a catalog table; malformed rows fail or are counted alike;
the leakage audit passes on its output; tools/prepare_data.py --engine=spark runs it.

CI installs PySpark and Java (.ci/run), so there these tests run; elsewhere without the extra
they skip with the install line. The real datasets and the spark-submit run are in the slow
tier (`python -m pytest -m slow`), the rest in the default one."""

from __future__ import annotations

import filecmp
import importlib.util
import json
import logging
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from influence_jax.data import audit, prepare, readers, store
from influence_jax.data.schema import DataError
from tests.helpers import ROOT, need, needs_data, random_log, rows, write

HAVE_SPARK = importlib.util.find_spec("pyspark") is not None and shutil.which("java") is not None


@pytest.fixture(scope="module")
def spark():
    if not HAVE_SPARK:
        if os.environ.get("CI"):
            pytest.fail("CI must run the Spark tests: .ci/run installs Java and '.[spark]'")
        pytest.skip("needs PySpark and Java 17+: pip install -e '.[spark]'")
    from influence_jax.data import spark as spark_engine

    # Started as from an interpreter that is not the first `python3` on PATH (a venv's python
    # run without activating it): the workers must still run this interpreter.
    java = os.path.dirname(shutil.which("java"))
    bin_dir = os.path.dirname(sys.executable)
    path = os.pathsep.join(
        [java] + [d for d in os.environ["PATH"].split(os.pathsep) if d and d != bin_dir]
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("PYSPARK_PYTHON", raising=False)
        mp.setenv("PATH", path)
        session = spark_engine.session("local[2]", 1024)
    yield session
    session.stop()


def test_workers_run_the_drivers_interpreter(spark):
    got = spark.sparkContext.parallelize([0], 1).map(lambda _: (sys.executable, sys.prefix))
    assert got.collect() == [(sys.executable, sys.prefix)]


def test_the_session_leaves_no_warehouse_folder_where_it_started(spark):
    from influence_jax.data import spark as spark_engine

    assert spark.conf.get("spark.sql.warehouse.dir").endswith(spark_engine.WAREHOUSE)
    spark.sql("SHOW TABLES").collect()  # the catalog starts: its default database's folder
    assert not os.path.exists(os.path.join(os.getcwd(), "spark-warehouse"))


def _both(source, tmp_path, spark, **kw) -> tuple[str, str]:
    """Prepares `source` with both engines (3 buckets); returns (numpy folder, spark folder)."""
    from influence_jax.data import spark as spark_engine

    kw.setdefault("num_buckets", 3)
    a, b = str(tmp_path / "numpy"), str(tmp_path / "spark")
    prepare.prepare(source, a, prepare.PrepareOptions(**kw))
    spark_engine.prepare(source, b, prepare.PrepareOptions(**kw), spark=spark)
    return a, b


def _schema(path: str, drop: tuple[str, ...] = ()) -> dict:
    with open(os.path.join(path, "schema.json")) as f:
        s = json.load(f)
    for k in ("engine", "command", *drop):
        s["extra"].pop(k, None)
    return s


def assert_same_output(a: str, b: str, drop: tuple[str, ...] = ()) -> None:
    """Every file of the two prepared folders byte for byte; schema.json but for `drop`."""
    files = lambda root: sorted(  # noqa: E731
        os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs
    )
    assert files(a) == files(b)
    differ = [
        f
        for f in files(a)
        if f != "schema.json"
        and not filecmp.cmp(os.path.join(a, f), os.path.join(b, f), shallow=False)
    ]
    assert differ == []
    assert _schema(a, drop) == _schema(b, drop)
    assert _schema(b)["splits"]["train"]["rows"] > 0


REAL = {
    "taobao-next-item": ("taobao", "taobao_userbehavior_sample/UserBehavior_head814users.csv", {}),
    "taobao-conversion-heads": (
        "taobao",
        "taobao_userbehavior_sample/UserBehavior_head814users.csv",
        {"task": "conversion", "heads": ("cart", "fav", "buy")},
    ),
    "movielens": ("movielens", "ml-100k", {}),
    "retailrocket-conversion": (
        "retailrocket",
        "cml_retailrocket/train.csv",
        {"task": "conversion", "num_buckets": 5},
    ),
}


@pytest.mark.slow  # about 30 s: the default tier keeps the synthetic and format cases
@needs_data
@pytest.mark.parametrize("case", sorted(REAL))
def test_spark_equals_numpy_on_the_real_datasets(case, tmp_path, spark):
    name, rel, kw = REAL[case]
    a, b = _both(readers.open_source(name, need(rel)), tmp_path, spark, **kw)
    assert_same_output(a, b)
    assert _schema(b)["extra"]["counts"]["events"] > 10_000
    if case == "taobao-next-item":
        report = audit.audit_leakage(b)  # raises on a leak
        assert report["rows"]["train"] > 0 and report["history_events"] > 0


def test_spark_equals_numpy_on_a_synthetic_log_with_ties(tmp_path, spark):
    """Many timestamp ties and exact duplicates; deduplication, cleaning rules, per-vocabulary
    min counts, copied histories and popularity negatives all go through both engines."""
    log = write(tmp_path / "log.csv", random_log(60, 40, 3000, seed=3) * 2)
    source = readers.open_source("taobao", log)
    kw = {
        "valid_start": 1060,
        "test_start": 1080,
        "min_timestamp": 0,
        "dedupe": True,
        "min_user_events": 100,
        "min_count_for": None,
        "history_storage": "copy",
        "neg_strategy": "popularity",
        "max_len": 7,
        "rows_per_shard": 997,
    }
    kw.pop("min_count_for")
    a, b = _both(source, tmp_path, spark, min_count_overrides={"item_id": 3}, **kw)
    assert_same_output(a, b)
    counts = _schema(b)["extra"]["counts"]
    assert counts["duplicates"] > 0 and counts["cleaning_users_below_min"] > 0
    assert len(_schema(b)["splits"]["train"]["shards"]) > 1


def test_window_rules_equal_numpy_on_conversion_with_sessions_heads_and_repeats(tmp_path, spark):
    """The Spark engine decides examples with window functions (spark._rules), the numpy engine
    with index arithmetic (examples.py): merged sessions, immature exposures, heads, short
    histories and exact repeats kept (no dedupe) come out the same."""
    log = write(tmp_path / "log.csv", random_log(40, 12, 3000, seed=5) * 2)
    kw = {
        "task": "conversion",
        "heads": ("cart", "buy"),
        "session_gap_minutes": 0.2,  # 12 s: timestamps span 100 s
        "horizon_hours": 0.005,  # 18 s
        "min_history": 3,
        "valid_start": 1050,
        "test_start": 1075,
        "min_timestamp": 0,
        "num_buckets": 4,
    }
    a, b = _both(readers.open_source("taobao", log), tmp_path, spark, **kw)
    assert_same_output(a, b)
    counts = _schema(b)["extra"]["counts"]
    for k in ("duplicates", "exposures_merged", "exposures_immature", "targets_short_history"):
        assert counts[k] > 0, k
    assert 0 < counts["conversions"] < counts["targets"]
    assert 0 < counts["conversions_cart"] < counts["targets"]


def test_a_threshold_label_compares_float32_values_as_numpy_does(tmp_path, spark):
    """0.7 is not a float32: a value read as float32(0.7) is labelled positive at
    --label_threshold=0.7 by both engines (Spark would compare it with the double 0.7)."""
    csv, kw = _events_log(tmp_path, amounts=("0.3", "0.7", "1.1"))
    opts = dict(label_threshold=0.7, neg_ratio=0, dedupe=True, min_history=1)
    a, b = _both(readers.open_source("events", csv, **kw), tmp_path, spark, **opts)
    assert_same_output(a, b)
    labels = rows(b, "train")["label"]
    assert 0.5 < labels.mean() < 0.8  # 0.7 and 1.1 are positives


def test_other_bucket_counts_give_the_same_examples_in_another_order(tmp_path, spark):
    from influence_jax.data import spark as spark_engine

    log = write(tmp_path / "log.csv", random_log(50, 30, 2000, seed=6))
    source = readers.open_source("taobao", log)
    kw = dict(valid_start=1060, test_start=1080, min_timestamp=0)
    a, b = str(tmp_path / "numpy2"), str(tmp_path / "spark5")
    prepare.prepare(source, a, prepare.PrepareOptions(num_buckets=2, **kw))
    spark_engine.prepare(source, b, prepare.PrepareOptions(num_buckets=5, **kw), spark=spark)
    for split in ("train", "valid", "test"):
        x, y = rows(a, split), rows(b, split)  # histories assembled from each event table
        flat = lambda r: np.concatenate(  # noqa: E731
            [r[k].reshape(len(r["label"]), -1).astype(np.int64) for k in sorted(r)], axis=1
        )
        assert sorted(x) == sorted(y) and "hist" in x and "hist_lo" not in x
        fx, fy = flat(x), flat(y)
        assert len(fx) > 0
        if split == "train":
            assert not np.array_equal(fx, fy)  # another row order ...
        by_value = lambda f: f[np.lexsort(f.T[::-1])]  # noqa: E731
        np.testing.assert_array_equal(by_value(fx), by_value(fy))  # ... of the same rows
    # --num_shards: the same rows in the same order, each split cut into 3 near-equal shards.
    c = str(tmp_path / "spark5x3")
    opts = prepare.PrepareOptions(num_buckets=5, num_shards=3, **kw)
    spark_engine.prepare(source, c, opts, spark=spark)
    for split, entry in _schema(c)["splits"].items():
        y, z = rows(b, split), rows(c, split)
        assert sorted(y) == sorted(z)
        for k in y:
            np.testing.assert_array_equal(y[k], z[k])
        sizes = [len(np.load(os.path.join(c, s, "label.npy"))) for s in entry["shards"]]
        assert len(sizes) == 3 and sum(sizes) == entry["rows"] and max(sizes) - min(sizes) <= 1


def _events_log(tmp_path, amounts: tuple[str, ...] | None = None) -> tuple[str, dict]:
    """A generic events log with string ids, a value column (drawn from `amounts`, else 1 to
    49) and a user side table."""
    rng = np.random.default_rng(0)
    n = 2000
    t = pa.table(
        {
            "uid": [f"u{u}" for u in rng.integers(0, 50, n)],
            "sku": [f"s{i:03d}" for i in rng.integers(0, 80, n)],
            "act": rng.choice(["view", "cart", "buy"], n, p=[0.7, 0.2, 0.1]).tolist(),
            "amount": (
                rng.choice(amounts, n).tolist()
                if amounts
                else rng.integers(1, 50, n).astype(str).tolist()
            ),
            "day": [str(1_700_000_000 + int(x)) for x in rng.integers(0, 86400 * 20, n)],
        }
    )
    csv = tmp_path / "log.csv"
    with open(csv, "w") as f:
        f.write(",".join(t.column_names) + "\n")
        for row in zip(*(t.column(c).to_pylist() for c in t.column_names), strict=True):
            f.write(",".join(row) + "\n")
    pq.write_table(t, tmp_path / "log.parquet")
    users = write(
        tmp_path / "users.csv", "uid,tier\n" + "".join(f"u{u},t{u % 4}\n" for u in range(50))
    )
    kw = dict(
        user="uid",
        item="sku",
        behaviour="act",
        timestamp="day",
        value="amount",
        behaviour_types=("view", "cart", "buy"),
        string_ids=True,
        user_table=users,
    )
    return str(csv), kw


def test_events_from_csv_parquet_and_a_table_give_the_numpy_output(tmp_path, spark):
    from influence_jax.data import spark as spark_engine

    csv, kw = _events_log(tmp_path)
    opts = dict(num_buckets=2, neg_ratio=2)
    a, b = _both(readers.open_source("events", csv, **kw), tmp_path, spark, **opts)
    assert_same_output(a, b)
    # The same log as Parquet, and as a table of the session's catalog (a Hive table alike).
    spark.read.parquet(str(tmp_path / "log.parquet")).createOrReplaceTempView("events_log")
    for name, path in (("parquet", str(tmp_path / "log.parquet")), ("table", "table:events_log")):
        out = str(tmp_path / name)
        source = readers.open_source("events", path, **kw)
        spark_engine.prepare(source, out, prepare.PrepareOptions(**opts), spark=spark)
        assert_same_output(a, out, drop=("inputs", "counts"))
        counts = _schema(out)["extra"]["counts"]
        assert counts["events"] == _schema(a)["extra"]["counts"]["events"] == 2000


def test_an_output_uri_is_assembled_locally_and_uploaded_schema_last(tmp_path, spark, caplog):
    """A URI output goes through pyarrow.fs (here file://, the code path of gs://, s3://,
    hdfs://): parts uploaded by the tasks, the folder assembled by the driver, checked, then
    uploaded; the result equals the numpy engine's and nothing else is left behind."""
    from influence_jax.data import spark as spark_engine

    log = write(tmp_path / "log.csv", random_log(40, 30, 1500, seed=5))
    source = readers.open_source("taobao", log)
    kw = dict(valid_start=1060, test_start=1080, min_timestamp=0, num_buckets=3)
    prepare.prepare(source, str(tmp_path / "numpy"), prepare.PrepareOptions(**kw))
    remote = tmp_path / "bucket"
    remote.mkdir()
    checked = []
    opts = prepare.PrepareOptions(**kw, tmp_dir=str(tmp_path / "scratch"))
    os.makedirs(opts.tmp_dir)
    uri = f"file://{remote}/prepared"
    with caplog.at_level(logging.INFO):  # progress of the running stages, several a second
        spark_engine.prepare(source, uri, opts, spark=spark, check=checked.append, progress_s=0.05)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spark stage")]
    assert lines and all(re.search(r"\d+/\d+ tasks .* tasks/s, ETA ", x) for x in lines)
    assert any("(pass 1: read, validate, count;" in x for x in lines)
    assert_same_output(str(tmp_path / "numpy"), str(remote / "prepared"), drop=("inputs",))
    assert len(checked) == 1 and not os.path.exists(checked[0])  # the local copy is gone
    assert os.listdir(remote) == ["prepared"] and os.listdir(tmp_path / "scratch") == []


def test_a_malformed_row_fails_naming_the_file_or_is_counted_as_numpy_counts_it(tmp_path, spark):
    from influence_jax.data import spark as spark_engine

    good = random_log(20, 15, 400, seed=1)
    bad = "7,x,1,pv,1050\n9,3,1,jump,1051\n4,4,1\n\n"  # the last: a blank line
    log = tmp_path / "bad.csv"  # and a row with a byte that is not UTF-8 (in its category)
    log.write_bytes((good + bad).encode() + b"5,6,7\xff,pv,1052\n" + good.encode())
    log = str(log)
    source = readers.open_source("taobao", log)
    opts = dict(valid_start=1060, test_start=1080, min_timestamp=0, num_buckets=2)
    with pytest.raises(DataError, match=r"bad\.csv: .*(non-integer id|unknown behaviour|number)"):
        spark_engine.prepare(
            source, str(tmp_path / "out"), prepare.PrepareOptions(**opts), spark=spark
        )
    assert not os.path.exists(tmp_path / "out")  # nothing half-written
    assert not [p for p in os.listdir(tmp_path) if p.startswith("out.tmp")]
    a, b = _both(source, tmp_path, spark, lenient=True, **opts)
    assert_same_output(a, b, drop=("counts",))
    counts, numpy_counts = _schema(b)["extra"]["counts"], _schema(a)["extra"]["counts"]
    assert (counts["skipped_bad_id"], counts["skipped_unknown_behaviour"]) == (1, 1)
    assert counts["skipped_wrong_field_count"] == 1 and counts["skipped_bad_encoding"] == 1
    # The one documented difference (docs/spark.md): Spark's CSV reader drops blank lines
    # before they can be counted.
    assert (numpy_counts["skipped_blank_lines"], counts["skipped_blank_lines"]) == (1, 0)
    numpy_counts["skipped_blank_lines"] = 0
    assert counts == numpy_counts


@pytest.mark.slow  # a second JVM and spark-submit: about 15 s
def test_spark_submit_runs_prepare_data_through_the_launch_script(tmp_path):
    """launch/spark_prepare.sh for real, with PySpark's own spark-submit in local mode."""
    if not HAVE_SPARK:
        pytest.skip("needs PySpark and Java 17+: pip install -e '.[spark]'")
    import pyspark

    log = write(tmp_path / "log.csv", random_log(30, 20, 800, seed=2))
    kw = dict(valid_start=1060, test_start=1080, min_timestamp=0, num_buckets=2)
    flags = [f"--{k}={v}" for k, v in kw.items()]
    out = tmp_path / "spark"
    env = {
        **os.environ,
        "SPARK_SUBMIT": os.path.join(os.path.dirname(pyspark.__file__), "bin", "spark-submit"),
        "PYSPARK_PYTHON": sys.executable,
        "DRIVER_MEMORY": "700m",
        "EXECUTOR_MEMORY": "700m",
    }
    res = subprocess.run(
        ["bash", str(ROOT / "launch" / "spark_prepare.sh"), "local[1]", str(out)]
        + ["--source=taobao", f"--input={log}", *flags],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    # spark-submit may print its own lines after prepare_data.py's JSON
    printed, _ = json.JSONDecoder().raw_decode(res.stdout[res.stdout.index("{") :])
    assert printed["audit"]["rows"]["train"] > 0  # prepare_data.py audits the output
    source = readers.open_source("taobao", log)
    prepare.prepare(source, str(tmp_path / "numpy"), prepare.PrepareOptions(**kw))
    assert_same_output(str(tmp_path / "numpy"), str(out))
    with open(out / "schema.json") as f:
        extra = json.load(f)["extra"]
    assert extra["engine"]["name"] == "spark" and extra["engine"]["master"] == "local[1]"
    assert "--engine=spark" in extra["command"]


def test_a_missing_input_is_one_clear_error(tmp_path, spark):
    from influence_jax.data import spark as spark_engine

    for path in (str(tmp_path / "nope.parquet"), "table:no_such_table"):
        source = readers.open_source("events", path, **_events_log(tmp_path)[1])
        out = str(tmp_path / "out")
        with pytest.raises(DataError, match=r"^Spark: .*(nope\.parquet|no_such_table)"):
            spark_engine.prepare(source, out, prepare.PrepareOptions(), spark=spark)
        assert not os.path.exists(out)


def test_bucket_and_shard_counts_out_of_range_are_one_clear_error(tmp_path):
    log = write(tmp_path / "log.csv", random_log(10, 10, 100, seed=4))
    source = readers.open_source("taobao", log)
    for kw, says in (
        ({"num_buckets": 0}, "--num_buckets must be at least 1"),
        ({"num_buckets": 1001}, "--engine=spark"),
        ({"num_shards": 0}, "--num_shards must be at least 1"),
        ({"num_shards": 4, "rows_per_shard": 10}, "--num_shards and --rows_per_shard"),
        ({"num_shards": 4}, "use --rows_per_shard, or --engine=spark"),
    ):
        opts = prepare.PrepareOptions(min_timestamp=0, **kw)
        with pytest.raises(DataError, match=says):
            prepare.prepare(source, str(tmp_path / "out"), opts)
    assert not os.path.exists(tmp_path / "out")
    assert store.shard_sizes(10, 4) == [3, 3, 2, 2] and store.shard_sizes(2, 4) == [1, 1]
    table = readers.open_source("taobao", "table:logs.user_behavior")
    with pytest.raises(
        DataError, match="table:logs.user_behavior: tables are read by --engine=spark"
    ):
        prepare.prepare(table, str(tmp_path / "out"), prepare.PrepareOptions())
