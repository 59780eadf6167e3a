"""On-disk format of prepared examples: per split, shards of `.npy` columns, memory-mapped.

Layout of a prepared dataset folder:

    DIR/schema.json
    DIR/<split>/part-00000/{user,item,hist,label,user_key,target_type,timestamp}.npy
    DIR/history_events/{rows,ts}.npy   (histories by reference: see below; then the shards hold
                                        hist_lo.npy, hist_hi.npy instead of hist.npy)
    DIR/vocab/...            (raw id -> index tables, written by preparation)

Columns (N examples): user int32 [N, Fu]; item int32 [N, Fi]; hist int32 [N, L, Fh]
(left-aligned, most recent first, zero-padded); label float32 [N]; user_key int64 [N] (the user's
raw index, for per-user metrics even when the user id maps to OOV); target_type int32 [N] (the
behaviour id of the target event); timestamp int64 [N] (the target's time, unix seconds).
A multi-task dataset (schema.label["heads"] = H head names) also holds labels float32 [N, H],
one label per head in that order, beside `label`.
Random access is a vectorised gather over memory maps, so a batch costs O(1) Python work.

Histories by reference (`schema.history_events`, the default of tools/prepare_data.py): a
shard holds hist_lo, hist_hi int64 [N] instead of `hist`, and the dataset one event table,
DIR/<history_events>/{rows.npy int32 [E, Fh] (each event as a history slot, time_gap 0),
ts.npy int64 [E]}, sorted by (user, time). An example's history is rows[hist_hi - 1], ...,
rows[hist_lo] (at most max_len, most recent first), its time_gap the bucket of the example's
timestamp minus the event's time: `history.assemble`, the function preparation itself uses,
so `gather` returns the same `hist` either way. Each event is stored once instead of once per
example that sees it (a conversion dataset's examples see 50 events each).
"""

from __future__ import annotations

import os

import numpy as np

from influence_jax.data import history
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
# Histories by reference: the span [hist_lo, hist_hi) of the dataset's event table.
REF_COLUMNS = {"hist_lo": np.dtype(np.int64), "hist_hi": np.dtype(np.int64)}
EVENT_FILES = ("rows", "ts")  # DIR/<history_events>/{rows,ts}.npy


def columns_of(schema: Schema) -> dict[str, np.dtype]:
    """The example columns of a dataset with `schema` as `gather` returns them: COLUMNS, plus
    `labels` with heads."""
    if not schema.heads:
        return COLUMNS
    return {**COLUMNS, HEADS_COLUMN: np.dtype(np.float32)}


def stored_columns(schema: Schema) -> dict[str, np.dtype]:
    """The columns of a shard on disk: `columns_of`, with hist_lo and hist_hi in place of
    `hist` when histories are stored by reference."""
    cols = columns_of(schema)
    if not schema.history_events:
        return cols
    out = {k: v for k, v in cols.items() if k != "hist"}
    return {**out, **REF_COLUMNS}


def check_columns(columns: dict[str, np.ndarray], schema: Schema, where: str = "") -> int:
    """Checks names, dtypes, shapes and id ranges of a block of examples; returns its row count."""
    want_cols = stored_columns(schema)
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
    groups = [("user", schema.user_fields), ("item", schema.item_fields)]
    if schema.history_events:
        lo, hi = columns["hist_lo"], columns["hist_hi"]
        if n and (lo.min() < 0 or np.any(hi < lo) or np.any(hi - lo > schema.max_len)):
            raise DataError(
                f"{where}: history spans [hist_lo, hist_hi) must satisfy 0 <= hist_lo <= hist_hi "
                f"<= hist_lo + max_len ({schema.max_len})"
            )
    else:
        groups.append(("hist", schema.hist_fields))
    for group, fields in groups:
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


def shard_sizes(rows: int, shards: int) -> list[int]:
    """`rows` cut into `shards` shards as equal as can be (the first ones a row longer); fewer
    when there are fewer rows than shards (a shard is never empty)."""
    q, r = divmod(rows, shards)
    return [q + 1] * r + [q] * (shards - r) if q else [1] * rows


class ShardWriter:
    """Appends blocks of examples to one split, cutting shards of `rows_per_shard` rows, or of
    the given `sizes` in turn (then `rows_per_shard` beyond them)."""

    def __init__(
        self,
        root: str,
        split: str,
        schema: Schema,
        rows_per_shard: int = 1 << 20,
        sizes: list[int] | None = None,
    ):
        self.root, self.split, self.schema = root, split, schema
        self._rows_per_shard, self._sizes = rows_per_shard, list(sizes or ())
        self.columns = stored_columns(schema)
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

    @property
    def rows_per_shard(self) -> int:
        """The size of the next shard."""
        k = len(self.shards)
        return self._sizes[k] if k < len(self._sizes) else self._rows_per_shard

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
        stored = stored_columns(self.schema)
        self._events = HistoryEvents(root, self.schema) if self.schema.history_events else None
        self._cols: list[dict[str, np.ndarray]] = []
        for rel in shards:
            d = os.path.join(root, rel)
            try:
                self._cols.append(
                    {k: np.load(os.path.join(d, f"{k}.npy"), mmap_mode="r") for k in stored}
                )
            except (OSError, ValueError, EOFError) as e:  # EOFError: an empty .npy file
                raise DataError(f"{d}: cannot read shard ({e or 'empty file'})") from None
            c = self._cols[-1]
            lengths = {k: len(v) for k, v in c.items()}
            if len(set(lengths.values())) > 1:
                raise DataError(
                    f"{d}: the columns' row counts differ ({lengths}); the shard is damaged"
                )
        # Id bounds per field (uint32: a negative id is out of bounds too); ids at or above a
        # table size are in range (they embed as OOV), ids at or above the vocabulary are not.
        self._bounds = {
            col: np.array([self.schema.vocab_sizes[f.vocab] for f in fields], np.uint32)
            for col, fields in (
                ("user", self.schema.user_fields),
                ("item", self.schema.item_fields),
                ("hist", self.schema.hist_fields),
            )
        }
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
            cols = self._cols[0]
            return self._checked(
                self._with_histories({k: _take(v, idx) for k, v in cols.items()}), idx
            )
        shard = np.searchsorted(self._offsets, idx, side="right") - 1
        out = {k: np.empty((len(idx),) + v.shape[1:], v.dtype) for k, v in self._cols[0].items()}
        for s in np.unique(shard):
            sel = shard == s
            local = idx[sel] - self._offsets[s]
            for k, v in self._cols[s].items():
                out[k][sel] = _take(v, local)
        return self._checked(self._with_histories(out), idx)

    def _checked(self, out: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, np.ndarray]:
        """`out`, once every id is within its vocabulary (a damaged or hand-edited file would
        otherwise be clamped silently by the embedding lookup); else a DataError naming the
        split, row and field."""
        for col, bound in self._bounds.items():
            ids = out.get(col)
            if ids is None:  # checked_columns: only the columns asked for
                continue
            if ids.dtype != np.int32:
                raise DataError(
                    f"{self.root}/{self.split}: column {col!r} is {ids.dtype}, expected int32"
                )
            bad = ids.view(np.uint32) >= bound
            if not bad.any():
                continue
            at = np.argwhere(bad)[0]
            fields = {"user": self.schema.user_fields, "item": self.schema.item_fields}
            field = fields.get(col, self.schema.hist_fields)[at[-1]]
            where = f"row {int(idx[at[0]])}" + (f", event {at[1]}" if col == "hist" else "")
            raise DataError(
                f"{self.root}/{self.split}: {where}: {col} field {field.name!r} holds id "
                f"{int(ids[tuple(at)])}, outside vocabulary {field.vocab!r} "
                f"[0, {int(bound[at[-1]])}); the dataset is damaged: prepare it again"
            )
        for col in ("label", "labels"):
            y = out.get(col)
            if y is None:
                continue
            bad = (y != 0) & (y != 1)  # NaN too
            if bad.any():
                at = np.argwhere(bad)[0]
                raise DataError(
                    f"{self.root}/{self.split}: row {int(idx[at[0]])}: {col} is "
                    f"{y[tuple(at)]}, not 0 or 1; the dataset is damaged: prepare it again"
                )
        return out

    def _with_histories(self, out: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Stored columns -> `columns_of` columns: histories by reference are assembled."""
        if self._events is None:
            return out
        lo, hi = out.pop("hist_lo"), out.pop("hist_hi")
        out["hist"] = self._events.histories(lo, hi, out["timestamp"])
        return {k: out[k] for k in self.columns}

    def checked_columns(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """Whole columns as `column` reads them, checked as `gather` checks its rows (ids within
        their vocabularies, labels 0 or 1): for tables counted from a whole split."""
        out = {k: self.column(k) for k in names}
        return self._checked(out, np.arange(len(self), dtype=np.int64))

    def column(self, name: str) -> np.ndarray:
        """One whole column, concatenated over shards (for metrics and audits)."""
        if not self._cols:  # an empty split (e.g. prepared with valid_frac=0) has no shards
            return self.gather(np.zeros(0, np.int64))[name]
        if name == "hist" and self._events is not None:
            lo, hi, t = (self.column(k) for k in ("hist_lo", "hist_hi", "timestamp"))
            return self._events.histories(lo, hi, t)
        return np.concatenate([np.asarray(c[name]) for c in self._cols])


def _take(column: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """column[idx] as a fresh array; np.take beats fancy indexing on memory maps of small rows."""
    return np.asarray(np.take(column, idx, axis=0))


class HistoryEvents:
    """The event table of a dataset whose histories are stored by reference (module doc)."""

    def __init__(self, root: str, schema: Schema):
        self.schema = schema
        self.folder = os.path.join(root, schema.history_events)
        try:
            self.rows, self.ts = (
                np.load(os.path.join(self.folder, f"{k}.npy"), mmap_mode="r") for k in EVENT_FILES
            )
        except (OSError, ValueError, EOFError) as e:
            raise DataError(f"{self.folder}: cannot read the history event table ({e})") from None
        fh = len(schema.hist_fields)
        if self.rows.shape != (len(self.ts), fh) or self.rows.dtype != np.int32:
            raise DataError(
                f"{self.folder}: rows.npy is {self.rows.dtype} {self.rows.shape}, expected "
                f"int32 ({len(self.ts)}, {fh}) (one row per event of ts.npy)"
            )
        self.gap_column = history.gap_column(schema.hist_fields)

    def histories(self, lo: np.ndarray, hi: np.ndarray, t: np.ndarray) -> np.ndarray:
        """[N, max_len, Fh] int32: the histories of spans [lo, hi) seen at times t."""
        if len(hi) and (int(lo.min()) < 0 or int(hi.max()) > len(self.ts)):
            raise DataError(
                f"{self.folder}: history spans reach events [{lo.min()}, {hi.max()}) outside the "
                f"table's {len(self.ts)}; the dataset is incomplete or corrupt"
            )
        return history.assemble(self.rows, self.ts, lo, hi, t, self.schema.max_len, self.gap_column)
