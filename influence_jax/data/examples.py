"""Examples from one bucket of sorted events: each target event becomes a positive (or a
thresholded label) plus sampled negatives, all with the target's history (see history.py), and
sidecar columns for the leakage audit.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator

import numpy as np

from influence_jax.data.history import Events, histories, user_spans
from influence_jax.data.negatives import negatives
from influence_jax.data.plan import BLOCK_SHARE, SPLITS, Plan, PrepareOptions
from influence_jax.data.schema import NUM_RESERVED, Schema

Block = tuple[int, dict[str, np.ndarray], np.ndarray, np.ndarray]


def bucket_examples(
    ev: np.ndarray, plan: Plan, opts: PrepareOptions, schema: Schema, counts: dict[str, int]
) -> Iterator[Block]:
    """Yields (split index, example columns, hist_last_ts, sampled) for one bucket whose events
    are already sorted (`history.sort_events`)."""
    events = Events.of(ev)
    user, item, ts = events.user, events.item, events.ts
    start, lo = user_spans(events)
    is_target = plan.targets[events.beh]
    short = is_target & (lo - start < opts.min_history)
    counts["targets_short_history"] += int(short.sum())
    targets = np.flatnonzero(is_target & ~short)
    counts["targets"] += len(targets)
    n_items = len(plan.item_rows)
    pair_key = (user.astype(np.int64) // plan.num_buckets) * n_items
    pairs = (np.zeros(1, np.int64), np.zeros(1, np.int64))
    if opts.neg_ratio:
        keys, first = np.unique(pair_key + item, return_index=True)  # first = earliest time
        pairs = (keys, ts[first])
    k1 = 1 + opts.neg_ratio
    row_bytes = schema.max_len * len(schema.hist_fields) * 4 + 64
    block = max(256, int(opts.memory_mb * 2**20 * BLOCK_SHARE / (k1 * row_bytes * 2)))
    for b0 in range(0, len(targets), block):
        tg = targets[b0 : b0 + block]
        yield from _examples(tg, ev, events, start, lo, pair_key, pairs, plan, opts, schema, counts)


def _examples(
    tg: np.ndarray,
    ev: np.ndarray,
    events: Events,
    start: np.ndarray,
    lo: np.ndarray,
    pair_key: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
    plan: Plan,
    opts: PrepareOptions,
    schema: Schema,
    counts: dict[str, int],
) -> Iterator[Block]:
    ts, beh, user = events.ts, events.beh, events.user
    t, k1 = ts[tg], 1 + opts.neg_ratio
    hist, last_ts = histories(
        events,
        start[tg],
        lo[tg],
        t,
        plan.item_rows,
        plan.item_fields,
        schema.hist_fields,
        schema.max_len,
    )
    items = events.item[tg, None]
    ok = np.ones((len(tg), 1), bool)
    if opts.neg_ratio:
        neg, neg_ok = negatives(plan, opts, user[tg], tg - start[tg], pair_key[tg], t, pairs)
        items, ok = np.concatenate([items, neg], 1), np.concatenate([ok, neg_ok], 1)
        counts["negatives"] += int(neg_ok.sum())
        counts["negatives_unsampleable"] += int((~neg_ok).sum())
    label = np.zeros((len(tg), k1), np.float32)
    label[:, 0] = 1.0 if opts.label_threshold is None else ev["value"][tg] >= opts.label_threshold
    keep = ok.reshape(-1)
    rep = np.repeat(np.arange(len(tg)), k1)[keep]
    out = {
        "user": plan.user_rows[user[tg]][rep],
        "item": plan.item_rows[items.reshape(-1)[keep]],
        "hist": hist[rep],
        "label": label.reshape(-1)[keep],
        "user_key": user[tg].astype(np.int64)[rep],
        "target_type": (beh[tg].astype(np.int32) + NUM_RESERVED)[rep],
        "timestamp": t[rep],
    }
    sampled = np.tile(np.arange(k1) > 0, len(tg))[keep]
    split = np.searchsorted(np.asarray(plan.bounds), t, side="right")[rep]
    for s in range(len(SPLITS)):
        m = split == s
        if m.any():
            yield s, {c: v[m] for c, v in out.items()}, last_ts[rep][m], sampled[m]


class NpyColumns:
    """Columns appended block by block to raw files, then turned into .npy files on close:
    `folder/<name>.npy` of shape [rows, *tail] for each name -> (dtype, tail shape)."""

    def __init__(self, folder: str, columns: dict[str, tuple[np.dtype, tuple[int, ...]]]):
        self.folder, self.columns = folder, columns
        os.makedirs(folder, exist_ok=True)
        self._files = {k: open(os.path.join(folder, k + ".bin"), "wb") for k in columns}

    def add(self, **cols: np.ndarray) -> None:
        for k, f in self._files.items():
            f.write(np.ascontiguousarray(cols[k], self.columns[k][0]).tobytes())

    def close(self) -> None:
        """Turns the raw appends into .npy files (header, then the bytes)."""
        for k, f in self._files.items():
            f.close()
            raw = f.name
            dtype, tail = self.columns[k]
            n = os.path.getsize(raw) // (dtype.itemsize * int(np.prod(tail, dtype=np.int64)))
            with open(os.path.join(self.folder, k + ".npy"), "wb") as out, open(raw, "rb") as src:
                np.lib.format.write_array_header_1_0(
                    out,
                    {
                        "descr": np.lib.format.dtype_to_descr(dtype),
                        "fortran_order": False,
                        "shape": (n, *tail),
                    },
                )
                shutil.copyfileobj(src, out, 1 << 22)
            os.remove(raw)


def audit_columns(root: str, split: str) -> NpyColumns:
    """Per split sidecar columns for `audit.audit_leakage`, row-aligned with the split's shards:
    audit/<split>/hist_last_ts.npy (time of history slot 0, NO_HISTORY if empty) and
    audit/<split>/sampled.npy (1 for a sampled negative)."""
    cols = {"hist_last_ts": (np.dtype("<i8"), ()), "sampled": (np.dtype("u1"), ())}
    return NpyColumns(os.path.join(root, "audit", split), cols)
