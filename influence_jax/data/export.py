"""A prepared split written out with raw ids, so that other libraries can be run on exactly the
rows the engine trains and evaluates on (tools/export_split.py).

One row per example, in the split's order: `user_id` and `item_id` (raw ids; null where the
dataset maps an id to out-of-vocabulary), `timestamp` (unix s), `label`, with heads one
`label_<head>` per head (schema.label["heads"], in that order), `target_behaviour`,
the other user and item fields (`user_<field>`, `item_<field>`, raw values), and the history as
lists, most recent event first, padding left out: `hist_item_id`, `hist_behaviour` (type
names), `hist_<field>` for the other history fields (raw values) and `hist_time_gap` (the time
gap's bucket id: 2 + floor(log2(seconds)), see history.gap_bucket). Parquet keeps the lists;
CSV joins each list's values with "|".
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from influence_jax import files
from influence_jax.data.dataset import Dataset
from influence_jax.data.schema import HIST_BEHAVIOUR, HIST_ITEM
from influence_jax.errors import DataError

FORMATS = ("parquet", "csv")
CHUNK_ROWS = 1 << 16


def _raw(dataset: Dataset, vocab: str, idx: np.ndarray) -> pa.Array:
    values, ok = dataset.id_maps.raw(vocab, idx)
    return pa.array(values.tolist() if values.dtype == object else values, mask=~ok)


def _lists(values: pa.Array, lengths: np.ndarray) -> pa.Array:
    offsets = np.r_[0, np.cumsum(lengths)].astype(np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), values)


def table(dataset: Dataset, split: str, rows: np.ndarray) -> pa.Table:
    """The export table of `rows` of `split` (see the module docstring)."""
    s, ex = dataset.schema, dataset.examples(split).gather(rows)
    types = s.behaviour_names()
    cols: dict[str, pa.Array] = {}
    for j, f in enumerate(s.user_fields):
        name = "user_id" if f.name == "user_id" else f"user_{f.name}"
        cols[name] = _raw(dataset, f.vocab, ex["user"][:, j])
    if "user_id" not in cols:
        cols["user_id"] = pa.array(dataset.id_maps.user_raw(ex["user_key"]))
    for j, f in enumerate(s.item_fields):
        name = "item_id" if f.name == HIST_ITEM else f"item_{f.name}"
        cols[name] = _raw(dataset, f.vocab, ex["item"][:, j])
    cols["timestamp"] = pa.array(ex["timestamp"])
    cols["label"] = pa.array(ex["label"])
    heads = [f"label_{h}" for h in s.heads]
    for j, name in enumerate(heads):
        cols[name] = pa.array(ex["labels"][:, j])
    cols["target_behaviour"] = pa.array(types[ex["target_type"]].tolist())
    hist = ex["hist"]
    lengths = (hist[..., s.hist_index(HIST_BEHAVIOUR)] != 0).sum(1)
    real = np.arange(s.max_len)[None, :] < lengths[:, None]  # left-aligned, most recent first
    for j, f in enumerate(s.hist_fields):
        v = hist[..., j][real]
        if f.name == HIST_BEHAVIOUR:
            values = pa.array(types[v].tolist())
        elif f.name == "time_gap":
            values = pa.array(v)
        else:
            values = _raw(dataset, f.vocab, v)
        cols[f"hist_{f.name}"] = _lists(values, lengths)
    order = ["user_id", "item_id", "timestamp", "label", *heads, "target_behaviour"]
    return pa.table({k: cols[k] for k in order + [k for k in cols if k not in order]})


def _csv_ready(t: pa.Table) -> pa.Table:
    """List columns joined with "|" (CSV has no lists)."""
    out = {}
    for name in t.column_names:
        col = t.column(name)
        if pa.types.is_list(col.type):
            lists = col.to_pylist()
            col = pa.array(["|".join(map(str, v)) for v in lists])
        out[name] = col
    return pa.table(out)


def export(dataset: Dataset, split: str, path: str, fmt: str = "parquet") -> int:
    """Writes `split` of `dataset` to `path` (atomically) in chunks; returns the row count."""
    if fmt not in FORMATS:
        raise DataError(f"--format must be one of {FORMATS}, not {fmt!r}")
    if split not in dataset.schema.splits:
        raise DataError(f"--split={split}: the dataset has {sorted(dataset.schema.splits)}")
    n = len(dataset.examples(split))

    def write(tmp: str) -> None:
        writer = None
        try:
            for a in range(0, max(n, 1), CHUNK_ROWS):
                t = table(dataset, split, np.arange(a, min(a + CHUNK_ROWS, n)))
                if fmt == "csv":
                    t = _csv_ready(t)
                if writer is None:
                    writer = (pq.ParquetWriter if fmt == "parquet" else pcsv.CSVWriter)(
                        tmp, t.schema
                    )
                writer.write_table(t)
        finally:
            if writer is not None:
                writer.close()

    files.write_atomic(path, write)
    return n
