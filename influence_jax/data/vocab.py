"""Vocabularies and id counting for data preparation: raw id <-> dense index, streaming counts.

`Vocab` maps raw ids (integers or strings) to indices with the reserved padding and OOV ids;
`IdStats` counts events per id over a stream of chunks within a memory budget; `positions` and
`indexer` find raw ids in sorted key arrays (table-driven when the ids are dense).
"""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from influence_jax.data.schema import NUM_RESERVED, OOV_ID, DataError


class Vocab:
    """Raw id -> index: `keys` are the kept raw ids in index order; index = NUM_RESERVED +
    position. Keys are sorted, except with a training-period vocabulary: the ids seen in
    training first (sorted), then those first seen later (sorted)."""

    def __init__(self, keys: np.ndarray | pa.Array):
        self.keys = keys
        self._sorted: tuple | None = None  # (sorted keys, their positions or None), lazily

    @property
    def size(self) -> int:
        return NUM_RESERVED + len(self.keys)

    def lookup(self, raw) -> np.ndarray:
        """Index of each raw id (int array or strings); OOV_ID for ids not kept."""
        if self._sorted is None:
            keys, order = self.keys, None
            if isinstance(keys, np.ndarray) and len(keys) > 1 and (keys[1:] < keys[:-1]).any():
                order = np.argsort(keys, kind="stable")
                keys = keys[order]
            self._sorted = (keys, order)
        keys, order = self._sorted
        pos, found = positions(keys, raw)
        if order is not None:
            pos = order[pos]
        return np.where(found, pos + NUM_RESERVED, OOV_ID).astype(np.int32)

    def save(self, folder: str, name: str) -> str:
        os.makedirs(folder, exist_ok=True)
        if isinstance(self.keys, np.ndarray):
            np.save(os.path.join(folder, f"{name}.npy"), self.keys)
            return f"{name}.npy"
        with open(os.path.join(folder, f"{name}.json"), "w") as f:
            json.dump(self.keys.to_pylist(), f)
        return f"{name}.json"

    @staticmethod
    def exists(prepared_dir: str, name: str) -> bool:
        """Whether the prepared dataset saved a vocabulary `name` (raw ids); fixed lists such as
        behaviour types and time-gap buckets have none."""
        base = os.path.join(prepared_dir, "vocab", name)
        return os.path.exists(base + ".npy") or os.path.exists(base + ".json")

    @classmethod
    def load(cls, prepared_dir: str, name: str) -> Vocab:
        """The vocabulary `name` of a prepared dataset (for mapping raw ids at ranking time)."""
        base = os.path.join(prepared_dir, "vocab", name)
        try:
            if os.path.exists(base + ".npy"):
                return cls(np.load(base + ".npy"))
            if os.path.exists(base + ".json"):
                with open(base + ".json") as f:
                    return cls(pa.array(json.load(f), pa.string()))
        except (OSError, ValueError, EOFError, TypeError, pa.ArrowException) as e:
            raise DataError(
                f"{base}: cannot read the vocabulary ({e or 'empty file'}); prepare the data again"
            ) from None
        raise DataError(f"{prepared_dir}: no vocabulary file vocab/{name}.npy or .json")


class DenseIndex:
    """positions() for integer ids that fill their range densely: one table lookup per id."""

    def __init__(self, keys: np.ndarray):
        self.lo = int(keys[0])
        self.table = np.full(int(keys[-1]) - self.lo + 1, -1, np.int32)
        self.table[keys - self.lo] = np.arange(len(keys), dtype=np.int32)

    @staticmethod
    def fits(keys: np.ndarray | pa.Array) -> bool:
        return (
            isinstance(keys, np.ndarray)
            and 0 < len(keys) < 2**31
            and int(keys[-1]) - int(keys[0]) < 4 * len(keys) + (1 << 20)
        )

    def __call__(self, raw) -> tuple[np.ndarray, np.ndarray]:
        raw = np.asarray(raw, np.int64) - self.lo
        inside = (raw >= 0) & (raw < len(self.table))
        pos = self.table[np.where(inside, raw, 0)]
        found = inside & (pos >= 0)
        return np.where(found, pos, 0).astype(np.int64), found


def indexer(keys: np.ndarray | pa.Array):
    """A function raw ids -> (position in sorted `keys`, found); table-driven when dense."""
    if DenseIndex.fits(keys):
        return DenseIndex(keys)
    return lambda raw: positions(keys, raw)


def positions(keys: np.ndarray | pa.Array, raw) -> tuple[np.ndarray, np.ndarray]:
    """(position in sorted `keys`, found) for each raw value."""
    if isinstance(keys, np.ndarray):
        raw = np.asarray(raw, dtype=np.int64)
        if len(keys) == 0:
            return np.zeros(len(raw), np.int64), np.zeros(len(raw), bool)
        pos = np.minimum(np.searchsorted(keys, raw), len(keys) - 1)
        return pos, keys[pos] == raw
    idx = pc.index_in(
        pa.array(raw, pa.string()) if not isinstance(raw, pa.Array) else raw, value_set=keys
    )
    return np.asarray(idx.fill_null(0), np.int64), np.asarray(idx.is_valid())


class Agg:
    """Streaming group-by on column "k" (e.g. value counts), merged with pyarrow hash
    aggregation whenever the pending rows outgrow the merged table."""

    def __init__(self, **aggs: str):
        self.aggs = aggs  # column -> "sum" | "min" | "max"
        self._parts: list[pa.Table] = []
        self._pending = 0
        self._merged = 0

    def add(self, t: pa.Table) -> None:
        self._parts.append(t)
        self._pending += t.num_rows
        if self._pending > max(1 << 20, 2 * self._merged):
            self._merge()

    def _merge(self) -> None:
        if len(self._parts) > 1 or self._pending:
            t = pa.concat_tables(self._parts).group_by("k").aggregate(list(self.aggs.items()))
            cols = {"k": t.column("k")}
            cols.update({c: t.column(f"{c}_{f}") for c, f in self.aggs.items()})
            self._parts = [pa.table(cols)]
            self._merged, self._pending = t.num_rows, 0

    def result(self) -> pa.Table:
        """The aggregated table, sorted by k."""
        self._merge()
        if not self._parts:
            return pa.table(
                {"k": pa.array([], pa.int64()), **{c: pa.array([], pa.int64()) for c in self.aggs}}
            )
        return self._parts[0].sort_by("k").combine_chunks()


class IdStats:
    """Events per id (and, if `paired`, the min and max of a second id per id, e.g. an item's
    category) over a stream of chunks.

    Small non-negative integer ids are counted in dense arrays indexed by id (8 or 24 bytes per
    possible id, and fast); other ids (strings, negative or huge ints) switch to a pyarrow hash
    aggregation, whose peak is a few hundred bytes per distinct id.
    """

    FILL = {"n": 0, "lo": np.iinfo(np.int64).max, "hi": np.iinfo(np.int64).min}

    def __init__(self, paired: bool, max_bytes: int):
        self.paired = paired
        self.dense = {k: np.zeros(0, np.int64) for k in (("n", "lo", "hi") if paired else ("n",))}
        self.max_slots = max_bytes // (8 * len(self.dense))
        self.sparse: Agg | None = None

    def add(self, ids: pa.Array, other: pa.Array | None = None) -> None:
        if (
            self.sparse is None
            and pa.types.is_integer(ids.type)
            and (other is None or pa.types.is_integer(other.type))
        ):
            k = np.asarray(ids, np.int64)
            if not len(k) or (k.min() >= 0 and k.max() < self.max_slots):
                self._add_dense(k, None if other is None else np.asarray(other, np.int64))
                return
        if self.sparse is None:
            self.sparse = Agg(n="sum", lo="min", hi="max") if self.paired else Agg(n="sum")
            if self.dense["n"].any():
                self.sparse.add(self._dense_table())
            self.dense = {}
        if other is None:
            self.sparse.add(value_counts(ids))
        else:
            t = (
                pa.table({"k": ids, "c": other})
                .group_by("k")
                .aggregate([("c", "count"), ("c", "min"), ("c", "max")])
            )
            self.sparse.add(
                pa.table(
                    {
                        "k": t.column("k"),
                        "n": t.column("c_count"),
                        "lo": t.column("c_min"),
                        "hi": t.column("c_max"),
                    }
                )
            )

    def _add_dense(self, k: np.ndarray, other: np.ndarray | None) -> None:
        size = len(self.dense["n"])
        need = int(k.max()) + 1 if len(k) else 0
        if need > size:
            grow = min(self.max_slots, max(need, 2 * size)) - size
            self.dense = {
                c: np.concatenate([a, np.full(grow, self.FILL[c], np.int64)])
                for c, a in self.dense.items()
            }
        np.add.at(self.dense["n"], k, 1)
        if self.paired:
            np.minimum.at(self.dense["lo"], k, other)
            np.maximum.at(self.dense["hi"], k, other)

    def _dense_table(self) -> pa.Table:
        seen = np.flatnonzero(self.dense["n"])
        return pa.table({"k": seen, **{c: a[seen] for c, a in self.dense.items()}})

    def result(self) -> pa.Table:
        """Columns k (sorted), n and, if paired, lo and hi."""
        return self.sparse.result() if self.sparse is not None else self._dense_table()


def value_counts(arr: pa.Array) -> pa.Table:
    vc = pc.value_counts(arr.drop_null())
    return pa.table({"k": vc.field("values"), "n": vc.field("counts")})


def raw_keys(col: pa.ChunkedArray | pa.Array) -> np.ndarray | pa.Array:
    """Sorted raw ids as int64 numpy (integer ids) or a pyarrow string array."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks()
    return np.asarray(col, np.int64) if pa.types.is_integer(col.type) else col


def ids_of(counts: np.ndarray, min_count: int) -> np.ndarray:
    """Vocabulary id of each distinct raw value (by sorted position): kept ones from 2."""
    kept = counts >= min_count
    return np.where(kept, np.cumsum(kept) - 1 + NUM_RESERVED, OOV_ID).astype(np.int32)


def take_keys(keys: np.ndarray | pa.Array, mask: np.ndarray) -> np.ndarray | pa.Array:
    return keys[mask] if isinstance(keys, np.ndarray) else keys.filter(pa.array(mask))
