"""On-disk format of prepared examples: per split, shards of `.npy` columns, memory-mapped.

Layout of a prepared dataset folder:

    DIR/schema.json
    DIR/<split>/part-00000/{user,item,hist,label,user_key,target_type,timestamp}.npy
    DIR/vocab/...            (raw id -> index tables, written by preparation)

Columns (N examples): user int32 [N, Fu]; item int32 [N, Fi]; hist int32 [N, L, Fh]
(left-aligned, most recent first, zero-padded); label float32 [N]; user_key int64 [N] (the user's
raw index, for per-user metrics even when the user id maps to OOV); target_type int32 [N] (the
behaviour id of the target event); timestamp int64 [N] (the target's time, unix seconds).
A multi-task dataset (schema.label["heads"] = H head names) also holds labels float32 [N, H],
one label per head in that order, beside `label`.
Random access is a vectorised gather over memory maps, so a batch costs O(1) Python work.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import numpy as np

from influence_jax.data.schema import DataError, Schema

COLUMNS: dict[str, np.dtype] = {
    "user": np.dtype(np.int32),
    "item": np.dtype(np.int32),
    "hist": np.dtype(np.int32),
    "label": np.dtype(np.float32),
    "user_key": np.dtype(np.int64),
    "target_type": np.dtype(np.int32),
    "timestamp": np.dtype(np.int64),
}
HEADS_COLUMN = "labels"  # float32 [N, H]: per-head labels, only in datasets with heads


def columns_of(schema: Schema) -> dict[str, np.dtype]:
    """The example columns of a dataset with `schema`: COLUMNS, plus `labels` with heads."""
    if not schema.heads:
        return COLUMNS
    return {**COLUMNS, HEADS_COLUMN: np.dtype(np.float32)}


def check_columns(columns: dict[str, np.ndarray], schema: Schema, where: str = "") -> int:
    """Checks names, dtypes, shapes and id ranges of a block of examples; returns its row count."""
    want_cols = columns_of(schema)
    missing = set(want_cols) - set(columns)
    if missing:
        raise DataError(f"{where}: missing columns {sorted(missing)}")
    if HEADS_COLUMN in columns and not schema.heads:
        raise DataError(
            f"{where}: column {HEADS_COLUMN} but the schema names no heads (label['heads'])"
        )
    n = len(columns["label"])
    shapes = {
        "user": (n, len(schema.user_fields)),
        "item": (n, len(schema.item_fields)),
        "hist": (n, schema.max_len, len(schema.hist_fields)),
        HEADS_COLUMN: (n, len(schema.heads)),
    }
    for name, dtype in want_cols.items():
        arr = columns[name]
        if arr.dtype != dtype:
            raise DataError(f"{where}: column {name} has dtype {arr.dtype}, expected {dtype}")
        want = shapes.get(name, (n,))
        if arr.shape != want:
            raise DataError(f"{where}: column {name} has shape {arr.shape}, expected {want}")
    for group, fields in (
        ("user", schema.user_fields),
        ("item", schema.item_fields),
        ("hist", schema.hist_fields),
    ):
        arr = columns[group]
        for j, f in enumerate(fields):
            col = arr[..., j]
            if col.size and (col.min() < 0 or col.max() >= schema.vocab_sizes[f.vocab]):
                raise DataError(
                    f"{where}: {group}.{f.name} has ids in [{col.min()}, {col.max()}], outside "
                    f"vocabulary {f.vocab!r} of size {schema.vocab_sizes[f.vocab]}"
                )
    for name in ("label", HEADS_COLUMN):
        if name in want_cols and not np.all(np.isfinite(columns[name])):
            raise DataError(f"{where}: {name} has NaN or Inf")
    return n


class ShardWriter:
    """Appends blocks of examples to one split, cutting shards of `rows_per_shard` rows."""

    def __init__(self, root: str, split: str, schema: Schema, rows_per_shard: int = 1 << 20):
        self.root, self.split, self.schema = root, split, schema
        self.rows_per_shard = rows_per_shard
        self.columns = columns_of(schema)
        self._buf: list[dict[str, np.ndarray]] = []
        self._buf_rows = 0
        self.shards: list[str] = []
        self.rows = 0
        self.label_sum = 0.0  # sum of the labels: the positives of a 0/1 label
        self.label_sums = np.zeros(len(schema.heads), np.float64)  # per head, with heads

    def add(self, columns: dict[str, np.ndarray]) -> None:
        n = check_columns(columns, self.schema, where=f"{self.split} block")
        self.label_sum += float(np.sum(columns["label"], dtype=np.float64))
        if self.schema.heads:
            self.label_sums += np.sum(columns[HEADS_COLUMN], axis=0, dtype=np.float64)
        self._buf.append(columns)
        self._buf_rows += n
        while self._buf_rows >= self.rows_per_shard:
            self._flush(self.rows_per_shard)

    def _flush(self, rows: int) -> None:
        merged = {k: np.concatenate([b[k] for b in self._buf]) for k in self.columns}
        head = {k: v[:rows] for k, v in merged.items()}
        rest = {k: v[rows:] for k, v in merged.items()}
        rel = os.path.join(self.split, f"part-{len(self.shards):05d}")
        shard_dir = os.path.join(self.root, rel)
        os.makedirs(shard_dir, exist_ok=True)
        for k, v in head.items():
            np.save(os.path.join(shard_dir, f"{k}.npy"), np.ascontiguousarray(v))
        self.shards.append(rel)
        self.rows += rows
        self._buf = [rest] if len(rest["label"]) else []
        self._buf_rows = len(rest["label"])

    def close(self) -> dict:
        """Flushes the remainder; returns the split's entry for `Schema.splits`."""
        if self._buf_rows:
            self._flush(self._buf_rows)
        out = {"rows": self.rows, "shards": list(self.shards), "label_sum": self.label_sum}
        if self.schema.heads:
            out["label_sums"] = dict(zip(self.schema.heads, self.label_sums.tolist(), strict=True))
        return out


def write_split(
    root: str,
    split: str,
    schema: Schema,
    columns: dict[str, np.ndarray],
    rows_per_shard: int = 1 << 20,
) -> dict:
    """Writes a whole in-memory split; returns its `Schema.splits` entry."""
    w = ShardWriter(root, split, schema, rows_per_shard)
    w.add(columns)
    return w.close()


class AtomicDir:
    """Context manager: build a folder under a temporary name, rename it into place on success.

    An interrupted or failed run leaves only `<final>.tmp-*`, never a folder that looks complete.
    """

    def __init__(self, final: str):
        self.final = os.path.abspath(final)

    def __enter__(self) -> str:
        parent = os.path.dirname(self.final)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=os.path.basename(self.final) + ".tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        if os.path.exists(self.final):
            old = self.final + ".old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(self.final, old)
            os.replace(self.tmp, self.final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.final)


class ExampleStore:
    """Random access to one split of a prepared dataset."""

    def __init__(self, root: str, split: str, schema: Schema | None = None):
        self.root, self.split = root, split
        self.schema = schema or Schema.load(root)
        if split not in self.schema.splits:
            raise DataError(
                f"{root}: split {split!r} not in schema (have {sorted(self.schema.splits)})"
            )
        shards = self.schema.splits[split]["shards"]
        self.columns = columns_of(self.schema)
        self._cols: list[dict[str, np.ndarray]] = []
        for rel in shards:
            d = os.path.join(root, rel)
            try:
                self._cols.append(
                    {k: np.load(os.path.join(d, f"{k}.npy"), mmap_mode="r") for k in self.columns}
                )
            except (OSError, ValueError) as e:
                raise DataError(f"{d}: cannot read shard ({e})") from None
        sizes = [len(c["label"]) for c in self._cols]
        self._offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        if self._offsets[-1] != self.schema.splits[split]["rows"]:
            raise DataError(
                f"{root}/{split}: shards hold {self._offsets[-1]} rows but schema.json says "
                f"{self.schema.splits[split]['rows']}; the dataset is incomplete or corrupt"
            )

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        """Rows `idx` (any order, repeats allowed) of every column, as fresh numpy arrays."""
        idx = np.asarray(idx, dtype=np.int64)
        if not self._cols:
            if len(idx):
                raise DataError(f"{self.root}/{self.split}: the split is empty")
            s = self.schema
            shapes = {
                "user": (len(s.user_fields),),
                "item": (len(s.item_fields),),
                "hist": (s.max_len, len(s.hist_fields)),
                HEADS_COLUMN: (len(s.heads),),
            }
            return {k: np.zeros((0, *shapes.get(k, ())), dt) for k, dt in self.columns.items()}
        if len(self._cols) == 1:
            return {k: np.asarray(v[idx]) for k, v in self._cols[0].items()}
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        out = {k: np.empty((len(idx),) + v.shape[1:], v.dtype) for k, v in self._cols[0].items()}
        for s in np.unique(shard):
            sel = shard == s
            local = idx[sel] - self._offsets[s]
            for k, v in self._cols[s].items():
                out[k][sel] = v[local]
        return out

    def column(self, name: str) -> np.ndarray:
        """One whole column, concatenated over shards (for metrics and audits)."""
        if not self._cols:  # an empty split (e.g. prepared with valid_frac=0) has no shards
            return self.gather(np.zeros(0, np.int64))[name]
        return np.concatenate([np.asarray(c[name]) for c in self._cols])
