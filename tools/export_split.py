"""Writes a prepared split with raw ids, timestamps, labels and histories as lists, so that other
libraries can be run on exactly the rows influence_jax trains and evaluates on.

    python tools/export_split.py --data=.prepared/taobao --split=test --output=taobao_test.parquet
    python tools/export_split.py --data=.prepared/taobao --split=train --output=taobao_train.csv

The format follows --output's extension (.parquet or .pq: Parquet, .csv: CSV); --format is
for other names (default parquet), and a --format that contradicts the extension is refused,
as is a .gz name (the file is not compressed).

Columns (influence_jax/data/export.py): user_id, item_id, timestamp, label, label_<head> per head
(datasets prepared with --heads), target_behaviour,
the other user and item fields, hist_item_id, hist_behaviour, hist_<field> and hist_time_gap
(lists, most recent event first; CSV joins them with "|").
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files  # noqa: E402
from influence_jax.data import export  # noqa: E402
from influence_jax.data.dataset import Dataset  # noqa: E402

_DATA = flags.DEFINE_string("data", None, "Prepared dataset folder.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to write: train, valid or test.")
_OUTPUT = flags.DEFINE_string("output", None, "Output file (replaced atomically).")
_FORMAT = flags.DEFINE_enum(
    "format",
    "parquet",
    list(export.FORMATS),
    "Output format; unset, --output's extension decides (.csv: csv), else parquet.",
)
flags.mark_flags_as_required(["data", "output"])


def _export() -> None:
    fmt = files.table_format(_OUTPUT.value, _FORMAT.value, _FORMAT.present)
    files.check_output(_OUTPUT.value, "output")
    n = export.export(Dataset(_DATA.value), _SPLIT.value, _OUTPUT.value, fmt)
    print(f"wrote {n:,} {_SPLIT.value} examples to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(cli.tool_main(_export, "export_split"), flags_parser=cli.parse_flags)
