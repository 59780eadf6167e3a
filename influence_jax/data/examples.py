"""Examples from one bucket of sorted events, all with the target's history (see history.py),
and sidecar columns for the leakage audit. Task next_item: each target event becomes a positive
(or a thresholded label) plus sampled negatives. Task conversion: each exposure becomes an
example labelled by whether a target event on the same item follows within the horizon, and
with heads (`PrepareOptions.heads`) one label per head by the same rule (the `labels` column).
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator

import numpy as np

from influence_jax.data.history import (
    Events,
    assemble,
    gap_column,
    last_event_time,
    user_spans,
)
from influence_jax.data.negatives import negatives
from influence_jax.data.plan import BLOCK_SHARE, SPLITS, Plan, PrepareOptions
from influence_jax.data.schema import NUM_RESERVED, Schema

Block = tuple[int, dict[str, np.ndarray], np.ndarray, np.ndarray]


@dataclasses.dataclass
class Rules:
    """Per event of a sorted bucket, what the example rules decided elsewhere (the Spark
    engine's window functions): how many of the user's events precede it in time, whether it
    becomes an example, its label and its head labels (bit h: head h)."""

    before: np.ndarray  # int64
    example: np.ndarray  # bool
    label: np.ndarray  # float32
    heads: np.ndarray  # int64 bits

    def take(self, order: np.ndarray) -> Rules:
        return Rules(*(np.asarray(getattr(self, f.name))[order] for f in dataclasses.fields(self)))

    def head_labels(self, n: int) -> np.ndarray:
        """[E, n] float32 head labels from the bits."""
        return ((self.heads[:, None] >> np.arange(n)) & 1).astype(np.float32)


def bucket_examples(
    ev: np.ndarray,
    plan: Plan,
    opts: PrepareOptions,
    schema: Schema,
    counts: dict[str, int],
    slots: np.ndarray,
    offset: int = 0,
    rules: Rules | None = None,
) -> Iterator[Block]:
    """Yields (split index, example columns, hist_last_ts, sampled) for one bucket whose events
    are already sorted (`history.sort_events`); `slots`: the events as history slots
    (`history.event_rows`).

    Which events become examples, their labels and how many events precede each are found here
    by the numpy engine's rules, or given per event by `rules` (the Spark engine's window
    functions, spark.py), whose counts the caller adds.

    With `schema.history_events` the examples reference their histories (hist_lo, hist_hi into
    the dataset's event table, where this bucket's events start at `offset`; see store.py);
    else each holds its own `hist`, assembled from `slots`."""
    events = Events.of(ev)
    user, item, ts = events.user, events.item, events.ts
    start, lo = user_spans(events)
    n_items = len(plan.item_rows)
    pair_key = (user.astype(np.int64) // plan.num_buckets) * n_items
    heads = np.zeros((len(ts), len(opts.heads)), np.float32)  # per event, its head labels
    if rules is not None:
        lo = start + rules.before
        targets = np.flatnonzero(rules.example)
        positive, heads = rules.label, rules.head_labels(len(opts.heads))
    elif opts.task == "conversion":
        head_codes = tuple(schema.behaviour_types.index(h) for h in opts.heads)
        rows, label, labels = exposures(events, pair_key + item, plan, opts, counts, head_codes)
        is_target = np.zeros(len(ts), bool)
        is_target[rows] = True
        positive = np.zeros(len(ts), np.float32)
        positive[rows] = label
        heads[rows] = labels
    else:
        is_target = plan.targets[events.beh]
        thr = opts.label_threshold
        positive = (ev["value"] >= thr if thr is not None else np.ones(len(ts), bool)).astype(
            np.float32
        )
    if rules is None:
        short = is_target & (lo - start < opts.min_history)
        counts["targets_short_history"] += int(short.sum())
        targets = np.flatnonzero(is_target & ~short)
        counts["targets"] += len(targets)
    pairs = (np.zeros(1, np.int64), np.zeros(1, np.int64))
    if opts.neg_ratio:
        keys, first = np.unique(pair_key + item, return_index=True)  # first = earliest time
        pairs = (keys, ts[first])
    k1 = 1 + opts.neg_ratio
    by_ref = bool(schema.history_events)
    row_bytes = (16 if by_ref else schema.max_len * len(schema.hist_fields) * 4) + 64
    block = max(256, int(opts.memory_mb * 2**20 * BLOCK_SHARE / (k1 * row_bytes * 2)))
    for b0 in range(0, len(targets), block):
        tg = targets[b0 : b0 + block]
        hist = _history_columns(tg, events, None if by_ref else slots, start, lo, schema, offset)
        yield from _examples(
            tg, positive[tg], heads[tg], hist, events, start, pair_key, pairs, plan, opts,
            counts,
        )  # fmt: skip


def _history_columns(
    tg: np.ndarray,
    events: Events,
    slots: np.ndarray | None,
    start: np.ndarray,
    end: np.ndarray,
    schema: Schema,
    offset: int,
) -> dict[str, np.ndarray]:
    """The history columns of targets `tg`: `hist` built from the bucket's events as history
    slots (`history.event_rows`), or (slots None) the spans hist_lo, hist_hi into the event
    table; and `last_ts` for the audit."""
    s, e = start[tg], end[tg]
    out = {"last_ts": last_event_time(events.ts, s, e)}
    if slots is None:
        out["hist_lo"] = offset + np.maximum(s, e - schema.max_len).astype(np.int64)
        out["hist_hi"] = offset + e.astype(np.int64)
    else:
        gap = gap_column(schema.hist_fields)
        out["hist"] = assemble(slots, events.ts, s, e, events.ts[tg], schema.max_len, gap)
    return out


def exposures(
    events: Events,
    pair: np.ndarray,
    plan: Plan,
    opts: PrepareOptions,
    counts: dict[str, int],
    head_codes: tuple[int, ...] = (),
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Conversion task: (rows of the bucket's exposures that become examples, their labels,
    their head labels [n, H]).

    An exposure is an event of behaviour `opts.exposure`; one of the same user and item within
    `session_gap_minutes` of the previous one merges into it. Its label is 1 when a target event
    on the same pair happens at or after it and at most `horizon_hours` later. An exposure whose
    horizon reaches its split's end (valid_start, test_start, the end of the log) is dropped:
    its label would depend on events after the cut. Head h's label is the same rule with the
    behaviour `head_codes[h]` as the only target (the same exposures, so the same maturity).

    Args:
      pair: per event, a key of its (user, item) pair within the bucket.
      head_codes: the heads' behaviour codes (indices into the source's behaviour types).
    """
    ts = events.ts
    exp = np.flatnonzero(events.beh == plan.exposure)
    o = np.lexsort((ts[exp], pair[exp]))
    exp, k, t = exp[o], pair[exp][o], ts[exp][o]
    gap = int(opts.session_gap_minutes * 60)
    new = np.ones(len(exp), bool)
    new[1:] = (k[1:] != k[:-1]) | (t[1:] - t[:-1] > gap)
    counts["exposures"] += len(exp)
    counts["exposures_merged"] += int((~new).sum())
    exp, k, t = exp[new], k[new], t[new]
    horizon = int(round(opts.horizon_hours * 3600))
    label = _converts(ts, pair, plan.targets[events.beh], k, t, horizon)
    heads = np.zeros((len(exp), len(head_codes)), bool)
    for h, code in enumerate(head_codes):
        heads[:, h] = _converts(ts, pair, events.beh == code, k, t, horizon)
    valid_start, test_start = plan.bounds
    end = np.where(t < valid_start, valid_start, np.where(t < test_start, test_start, plan.t_end))
    mature = t + horizon < end
    counts["exposures_immature"] += int((~mature).sum())
    counts["conversions"] += int(label[mature].sum())
    for name, n in zip(opts.heads, heads[mature].sum(0).tolist(), strict=True):
        counts[f"conversions_{name}"] += int(n)
    order = np.argsort(exp[mature])
    return (
        exp[mature][order],
        label[mature][order].astype(np.float32),
        heads[mature][order].astype(np.float32),
    )


def _converts(
    ts: np.ndarray, pair: np.ndarray, is_target: np.ndarray, k: np.ndarray, t: np.ndarray,
    horizon: int,
) -> np.ndarray:  # fmt: skip
    """Per exposure (pair key `k`, time `t`, sorted by (k, t)): whether an event with
    `is_target` on the same pair happens at or after `t` and at most `horizon` s later."""
    label = np.zeros(len(k), bool)
    tgt = np.flatnonzero(is_target)
    if len(tgt) and len(k):
        # Targets sorted by (pair, time) on one line: pair group g at g * span + time.
        o = np.lexsort((ts[tgt], pair[tgt]))
        tk, tt = pair[tgt][o], ts[tgt][o]
        groups, g = np.unique(tk, return_inverse=True)
        t0, span = int(min(tt.min(), t.min())), int(max(tt.max(), t.max())) + 1
        span -= t0
        pos = np.minimum(np.searchsorted(groups, k), len(groups) - 1)
        found = groups[pos] == k
        i = np.searchsorted(g * span + (tt - t0), pos * span + (t - t0))  # first target >= t
        i_ok = np.minimum(i, len(tt) - 1)
        label = found & (i < len(tt)) & (g[i_ok] == pos) & (tt[i_ok] - t <= horizon)
    return label


def _examples(
    tg: np.ndarray,
    positive: np.ndarray,
    heads: np.ndarray,
    hist: dict[str, np.ndarray],
    events: Events,
    start: np.ndarray,
    pair_key: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
    plan: Plan,
    opts: PrepareOptions,
    counts: dict[str, int],
) -> Iterator[Block]:
    ts, beh, user = events.ts, events.beh, events.user
    t, k1 = ts[tg], 1 + opts.neg_ratio
    last_ts = hist.pop("last_ts")
    items = events.item[tg, None]
    ok = np.ones((len(tg), 1), bool)
    if opts.neg_ratio:
        neg, neg_ok = negatives(plan, opts, user[tg], tg - start[tg], pair_key[tg], t, pairs)
        items, ok = np.concatenate([items, neg], 1), np.concatenate([ok, neg_ok], 1)
        counts["negatives"] += int(neg_ok.sum())
        counts["negatives_unsampleable"] += int((~neg_ok).sum())
    label = np.zeros((len(tg), k1), np.float32)
    label[:, 0] = positive
    labels = np.zeros((len(tg), k1, heads.shape[1]), np.float32)  # sampled negatives: 0
    labels[:, 0] = heads
    keep = ok.reshape(-1)
    rep = np.repeat(np.arange(len(tg)), k1)[keep]
    out = {
        "user": plan.user_rows[user[tg]][rep],
        "item": plan.item_rows[items.reshape(-1)[keep]],
        **{k: v[rep] for k, v in hist.items()},
        "label": label.reshape(-1)[keep],
        "user_key": user[tg].astype(np.int64)[rep],
        "target_type": (beh[tg].astype(np.int32) + NUM_RESERVED)[rep],
        "timestamp": t[rep],
    }
    if opts.heads:
        out["labels"] = labels.reshape(-1, heads.shape[1])[keep]
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


def event_table(root: str, schema: Schema) -> NpyColumns:
    """The event table of histories by reference (store.py), appended bucket by bucket:
    DIR/<schema.history_events>/rows.npy int32 [E, Fh] and ts.npy int64 [E]."""
    cols = {"rows": (np.dtype("<i4"), (len(schema.hist_fields),)), "ts": (np.dtype("<i8"), ())}
    return NpyColumns(os.path.join(root, schema.history_events), cols)


def audit_columns(root: str, split: str) -> NpyColumns:
    """Per split sidecar columns for `audit.audit_leakage`, row-aligned with the split's shards:
    audit/<split>/hist_last_ts.npy (time of history slot 0, NO_HISTORY if empty) and
    audit/<split>/sampled.npy (1 for a sampled negative)."""
    cols = {"hist_last_ts": (np.dtype("<i8"), ()), "sampled": (np.dtype("u1"), ())}
    return NpyColumns(os.path.join(root, "audit", split), cols)
