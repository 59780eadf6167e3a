"""Evaluates a trained run's checkpoint on a split, exactly as training evaluates: AUC, GAUC
(user- and impression-weighted), logloss and accuracy over every example, overall and per
target behaviour type.

    python tools/evaluate.py --workdir=runs/demo
    python tools/evaluate.py --workdir=runs/taobao --data=.prepared/taobao --split=valid \
      --step=best --output=runs/taobao/valid_metrics.json

Prints one line of metrics and one per behaviour type (--json: one JSON object instead);
--output also writes them as JSON and --predictions one row per example (Parquet, or CSV for a
name ending .csv: user_id, item_id, timestamp, label, target_behaviour, score; raw ids), both
atomically. --data may be
left out for a synthetic run.
"""

from __future__ import annotations

import json
import os
import sys

import pyarrow as pa
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files, lazy, metrics  # noqa: E402
from influence_jax.errors import DataError  # noqa: E402

# Loaded on first use (JAX, Orbax: seconds), after absl has parsed the flags: --help and flag
# errors stay fast.
evaluation = lazy.module("influence_jax.evaluation")
scoring = lazy.module("influence_jax.scoring")

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
_DATA = flags.DEFINE_string("data", None, "Prepared dataset folder (default: the run's own).")
_SPLIT = flags.DEFINE_string("split", "test", "Split to evaluate.")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, best or latest.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the metrics to this JSON file.")
_PREDICTIONS = flags.DEFINE_string("predictions", None, "Also write per-example scores (Parquet).")
_JSON = flags.DEFINE_bool("json", False, "Print the metrics as one JSON object.")
_BATCH = flags.DEFINE_integer("batch_size", None, "Global batch (default: the eval batch).")
flags.mark_flags_as_required(["workdir"])


def _evaluate() -> None:
    for flag in (_OUTPUT, _PREDICTIONS):
        if flag.value:
            files.check_output(flag.value, flag.name)  # before any work
    if _BATCH.value is not None and _BATCH.value < 1:
        raise DataError(f"--batch_size must be positive, got {_BATCH.value}")
    run = scoring.load_run(_WORKDIR.value, _DATA.value, _STEP.value)
    if _SPLIT.value not in run.schema.splits:
        raise DataError(f"--split={_SPLIT.value}: the dataset has {sorted(run.schema.splits)}")
    m = evaluation.evaluate_run(run, _SPLIT.value, _BATCH.value)
    record = {"step": run.step, "split": _SPLIT.value, "metrics": m}
    if run.schema.heads and any(f"{h}/auc" in m for h in run.schema.heads):
        # A multi-task run: each head's metrics under the head's name.
        record["heads"] = {
            h: {k.split("/", 1)[1]: v for k, v in m.items() if k.startswith(f"{h}/")}
            for h in run.schema.heads
        }
    if _JSON.value:
        print(json.dumps(record, sort_keys=True))
    else:
        n = int(m["num_examples"])
        head = f"{_SPLIT.value} metrics at step {run.step} ({n:,} examples)"
        print(f"{head}: {metrics.format_metrics(m)}")
        for t in run.schema.behaviour_types:
            if f"auc/{t}" in m:
                line = " ".join(f"{k}={m[f'{k}/{t}']:.4f}" for k in ("auc", "logloss", "accuracy"))
                print(f"  target {t}: {line} ({int(m[f'num_examples/{t}']):,} examples)")
    if _PREDICTIONS.value:  # before --output: the metrics file, once there, has its scores
        rows = evaluation.predict(run, _SPLIT.value, _BATCH.value)
        table = pa.table(
            {k: pa.array(v.tolist() if v.dtype == object else v) for k, v in rows.items()}
        )
        path = _PREDICTIONS.value
        files.write_table(table, path, files.table_format(path, "parquet", explicit=False))
        print(f"wrote {table.num_rows:,} predictions to {path}", file=sys.stderr)
    if _OUTPUT.value:
        files.write_json(_OUTPUT.value, record)


if __name__ == "__main__":
    app.run(cli.tool_main(_evaluate, "evaluate"), flags_parser=cli.parse_flags)
