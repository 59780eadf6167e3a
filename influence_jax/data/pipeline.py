"""Input pipeline: host-local numpy batches from a prepared dataset, resumable to the exact batch.

A record is a whole batch, assembled by one vectorised gather (per-example Python work caps
throughput at tens of thousands of examples/s on small hosts; a gather per batch does not).
Training order: for epoch e, a permutation of the split seeded by (shuffle_seed, e); global
batch s takes rows [j*G, (j+1)*G) of its epoch's permutation (drop remainder) and process p
keeps its slice of them. The data position is therefore just the next batch index.

Grain (when installed) runs the batches on read threads with prefetch and owns the iterator
state; without Grain (some accelerator images) a small thread pool does the same, with the
same state format.
"""

from __future__ import annotations

import concurrent.futures
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np

from influence_jax.data.schema import DataError
from influence_jax.data.store import ExampleStore

try:  # Grain is optional at run time; see pyproject.toml.
    import grain
except ImportError:  # pragma: no cover - exercised on images without grain
    grain = None

MODEL_KEYS = ("user", "item", "hist", "label", "weight")


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
    """Every example of a split exactly once, in order; the last batch padded with weight 0."""

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
