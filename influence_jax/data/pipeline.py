"""Input pipeline: host-local numpy batches from a prepared dataset, resumable to the exact batch.

A record is a whole batch, assembled by one vectorised gather (per-example Python work caps
throughput at tens of thousands of examples/s on small hosts; a gather per batch does not).
Training order: for epoch e, a permutation of the split seeded by (shuffle_seed, e); global
batch s takes rows [j*G, (j+1)*G) of its epoch's permutation (drop remainder) and process p
keeps its slice of them. The data position is therefore just the next batch index.

Grain (when installed) runs the batches on read threads with prefetch and owns the iterator
state; without Grain (some accelerator images) a small thread pool does the same, with the
same state format.

Batches hold `label` [B] and, for a dataset with heads (`schema.heads`), `labels` [B, H], the
same rows' per-head labels: both are columns of the store, so they are gathered, shuffled,
sliced per process and padded (eval) together.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from influence_jax import lazy
from influence_jax.data.schema import HIST_BEHAVIOUR, NUM_RESERVED, DataError, Schema
from influence_jax.data.store import ExampleStore
from influence_jax.errors import ConfigError

try:  # Grain is optional at run time (pyproject.toml); it loads JAX, so on first use only
    grain = lazy.module("grain")
except ImportError:  # pragma: no cover - exercised on images without grain
    grain = None

# `labels` [B, H] (one label per head) only for datasets with heads (schema.label["heads"]).
MODEL_KEYS = ("user", "item", "hist", "label", "labels", "weight")


class TrainBatches:
    """Random access to the training batches of this process: `batches[s]` is global batch s."""

    def __init__(
        self,
        store: ExampleStore,
        global_batch: int,
        seed: int,
        num_batches: int,
        process_index: int = 0,
        process_count: int = 1,
    ):
        if len(store) < global_batch:
            raise DataError(
                f"{store.root}/{store.split}: {len(store)} examples, fewer than one global batch "
                f"of {global_batch}; lower config.data.batch_size"
            )
        self.store, self.global_batch, self.seed = store, global_batch, seed
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.per_epoch = len(store) // global_batch
        self.num_batches = num_batches

    def __len__(self) -> int:
        return self.num_batches

    @functools.lru_cache(maxsize=2)  # noqa: B019 - two epochs live at an epoch boundary
    def _perm(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.store))

    def __getitem__(self, s: int) -> dict[str, np.ndarray]:
        epoch, j = divmod(int(s), self.per_epoch)
        # Sort the global batch, then slice: row order (and so which rows dropout hits) is
        # the same whatever the number of processes.
        rows = np.sort(self._perm(epoch)[j * self.global_batch : (j + 1) * self.global_batch])
        start = self.process_index * self.local_batch
        idx = rows[start : start + self.local_batch]
        return to_model_batch(self.store.gather(idx))


class EvalBatches:
    """Every example of a split exactly once, in order; the last batch padded with weight 0
    (padding rows repeat row 0 in every column, `label` and `labels` included)."""

    def __init__(
        self, store: ExampleStore, global_batch: int, process_index: int = 0, process_count: int = 1
    ):
        self.store, self.global_batch = store, global_batch
        self.local_batch = global_batch // process_count
        self.process_index = process_index
        self.num_batches = -(-len(store) // global_batch)

    def __len__(self) -> int:
        return self.num_batches

    def __getitem__(self, s: int) -> dict[str, np.ndarray]:
        start = s * self.global_batch + self.process_index * self.local_batch
        idx = np.arange(start, start + self.local_batch)
        valid = idx < len(self.store)
        batch = self.store.gather(np.where(valid, idx, 0))
        batch["weight"] = valid.astype(np.float32)
        return batch


class StoreView:
    """A subset of a split's rows and/or histories without some behaviour types (see `restrict`).

    Behaves like the ExampleStore it wraps (`len`, `gather`, `column`, `schema`, `root`,
    `split`): row k of the view is row `rows[k]` of the store.
    """

    def __init__(
        self, store: ExampleStore, rows: np.ndarray | None, drop_ids: tuple[int, ...] = ()
    ):
        self.store, self.schema = store, store.schema
        self.root, self.split = store.root, store.split
        self.rows = None if rows is None else np.asarray(rows, np.int64)
        self.drop_ids = tuple(drop_ids)

    def __len__(self) -> int:
        return len(self.store) if self.rows is None else len(self.rows)

    def gather(self, idx: np.ndarray) -> dict[str, np.ndarray]:
        idx = np.asarray(idx, np.int64)
        out = self.store.gather(idx if self.rows is None else self.rows[idx])
        if self.drop_ids:
            out["hist"] = drop_events(out["hist"], self.schema, self.drop_ids)
        return out

    def checked_columns(self, names: tuple[str, ...]) -> dict[str, np.ndarray]:
        """The store's checked columns (errors name the store's rows), of the view's rows."""
        out = self.store.checked_columns(names)
        if self.rows is not None:
            out = {k: v[self.rows] for k, v in out.items()}
        if "hist" in out:
            out["hist"] = drop_events(out["hist"], self.schema, self.drop_ids)
        return out

    def column(self, name: str) -> np.ndarray:
        col = self.store.column(name)
        col = col if self.rows is None else col[self.rows]
        return drop_events(col, self.schema, self.drop_ids) if name == "hist" else col


def drop_events(hist_NxLxF: np.ndarray, schema: Schema, drop_ids: tuple[int, ...]) -> np.ndarray:
    """Histories without the events whose behaviour id is in `drop_ids`, as if they never
    happened: the remaining events move up (most recent first, order kept), padding fills the end.
    """
    if not drop_ids:
        return hist_NxLxF
    order_NxL, kept_NxL = _kept_first(hist_NxLxF, schema, drop_ids)
    out = np.take_along_axis(hist_NxLxF, order_NxL[..., None], axis=1)
    out[~kept_NxL] = 0
    return out


def drop_event_times(
    hist_NxLxF: np.ndarray,
    times_NxL: np.ndarray,
    schema: Schema,
    drop_ids: tuple[int, ...],
    pad: int,
) -> np.ndarray:
    """`times_NxL` (one value per slot of `hist_NxLxF`, before the drop) moved as `drop_events`
    moves the events, `pad` in the emptied slots."""
    if not drop_ids:
        return times_NxL
    order_NxL, kept_NxL = _kept_first(hist_NxLxF, schema, drop_ids)
    out = np.take_along_axis(np.asarray(times_NxL), order_NxL, axis=1)
    out[~kept_NxL] = pad
    return out


def _kept_first(hist_NxLxF: np.ndarray, schema: Schema, drop_ids: tuple[int, ...]):
    """(order [N, L] that puts the kept events first, in order; kept [N, L] after reordering)."""
    b = hist_NxLxF[..., schema.hist_index(HIST_BEHAVIOUR)]
    keep_NxL = ~np.isin(b, drop_ids) & (b != 0)
    order_NxL = np.argsort(~keep_NxL, axis=1, kind="stable")
    return order_NxL, np.take_along_axis(keep_NxL, order_NxL, axis=1)


def time_rows(store: ExampleStore, time_range: tuple) -> np.ndarray:
    """Row indices of `store` whose timestamp t satisfies start <= t < end (None: unbounded)."""
    start, end = time_range
    t = store.column("timestamp")
    keep = np.ones(len(t), bool)
    if start is not None:
        keep &= t >= start
    if end is not None:
        keep &= t < end
    return np.flatnonzero(keep)


def dropped_behaviour_ids(schema: Schema, data_cfg: Any) -> tuple[int, ...]:
    """Behaviour ids of `config.data.drop_behaviours` (names checked against the schema)."""
    drop = tuple(data_cfg.get("drop_behaviours", ()) or ())
    types = schema.behaviour_types
    unknown = [t for t in drop if t not in types]
    if unknown:
        raise ConfigError(
            f"config.data.drop_behaviours: {unknown} not among the dataset's behaviour types "
            f"{list(types)}"
        )
    return tuple(types.index(t) + NUM_RESERVED for t in drop)


def restrict(store: ExampleStore, data_cfg: Any, role: str) -> ExampleStore | StoreView:
    """`store` as a run sees it under `config.data`; the store itself when no option is set.

    Args:
      store: one split of a prepared dataset.
      data_cfg: `config.data`; reads `train_time_range` (role "train") or `eval_time_range`
        (role "eval"), each () or (start, end) in unix seconds, end exclusive, None unbounded;
        and `drop_behaviours`, behaviour type names removed from every history.
      role: "train" or "eval".
    """
    field = f"{role}_time_range"
    time_range = tuple(data_cfg.get(field, ()) or ())
    drop = tuple(data_cfg.get("drop_behaviours", ()) or ())
    if not time_range and not drop:
        return store
    drop_ids = dropped_behaviour_ids(store.schema, data_cfg)
    rows = None
    if time_range:  # () or (start, end): checked in config_check
        rows = time_rows(store, time_range)
        if not len(rows):
            t = store.column("timestamp")
            span = f"[{t.min()}, {t.max()}]" if len(t) else "empty"
            raise DataError(
                f"{store.root}/{store.split}: no example has a timestamp in config.data.{field}="
                f"{time_range} (the split's timestamps span {span})"
            )
    return StoreView(store, rows, drop_ids)


def to_model_batch(examples: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The arrays a train step reads (metadata columns stay on the host)."""
    out = {k: examples[k] for k in MODEL_KEYS if k in examples}
    out.setdefault("weight", np.ones(len(examples["label"]), np.float32))
    return out


class BatchIterator:
    """Iterates batches `source[start:]` with prefetch; `get_state()`/`set_state()` resume it."""

    def __init__(self, source: Any, prefetch: int = 4, num_threads: int = 2, start: int = 0):
        self.source, self.prefetch, self.num_threads = source, prefetch, num_threads
        self._open(start)

    def _open(self, start: int) -> None:
        self._next = start
        if grain is not None:
            ds = grain.MapDataset.source(self.source)
            if start:
                ds = ds[start:]
            opts = grain.ReadOptions(
                num_threads=self.num_threads, prefetch_buffer_size=self.prefetch
            )
            self._it: Iterator = iter(ds.to_iter_dataset(read_options=opts))
        else:
            self._it = _threaded(self.source, start, self.prefetch, self.num_threads)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._it)
        self._next += 1
        return batch

    def get_state(self) -> dict[str, int]:
        """The data position: index of the next batch this iterator yields."""
        return {"next_batch": self._next}

    def set_state(self, state: dict[str, int]) -> None:
        self._open(int(state["next_batch"]))


def _threaded(source: Any, start: int, prefetch: int, num_threads: int) -> Iterator:
    """Ordered prefetch over `source[start:]` with a thread pool (the no-Grain path)."""
    pool = concurrent.futures.ThreadPoolExecutor(max(1, num_threads))
    pending: list[concurrent.futures.Future] = []
    s = start
    try:
        while True:
            while len(pending) < max(1, prefetch) and s < len(source):
                pending.append(pool.submit(source.__getitem__, s))
                s += 1
            if not pending:
                return
            yield pending.pop(0).result()
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
