"""Leakage audit of a prepared dataset: checks, on the written data, that nothing a model sees
for an example happened at or after that example's target time.

It reads the shards plus the sidecar columns preparation writes for this purpose
(`audit/<split>/hist_last_ts.npy`, `audit/<split>/sampled.npy`) and raises `DataError` on the
first violation.
"""

from __future__ import annotations

import os

import numpy as np

from influence_jax.data import vocab
from influence_jax.data.prepare import GAP_INVALID, NO_HISTORY, SPLITS, gap_bucket
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, PAD_ID, DataError, Schema
from influence_jax.data.store import ExampleStore


def _sidecar(root: str, split: str, name: str, rows: int) -> np.ndarray:
    path = os.path.join(root, "audit", split, f"{name}.npy")
    if not os.path.exists(path):
        raise DataError(
            f"{path}: missing; the audit needs the sidecar columns that "
            "tools/prepare_data.py writes (re-prepare the dataset)"
        )
    arr = np.load(path, mmap_mode="r")
    if len(arr) != rows:
        raise DataError(f"{path}: {len(arr)} rows but the split has {rows}")
    return arr


def _fail(split: str, row: int, what: str) -> DataError:
    return DataError(f"leakage audit: {split} row {row}: {what}")


def _check_bounds(
    split: str, t: np.ndarray, valid_start: int, test_start: int, t_end: int, horizon: int | None
) -> None:
    lo, hi = {
        "train": (None, valid_start),
        "valid": (valid_start, test_start),
        "test": (test_start, None),
    }[split]
    if horizon is not None:  # conversion labels: the horizon must end before the split does
        end = hi if hi is not None else t_end
        late = t + horizon >= end
        if late.any():
            r = int(np.argmax(late))
            raise _fail(
                split,
                r,
                f"exposure at {t[r]} with a {horizon} s horizon reaches past the split's end "
                f"{end}: its label depends on events after the cut (label maturity)",
            )
    bad = np.zeros(len(t), bool)
    if lo is not None:
        bad |= t < lo
    if hi is not None:
        bad |= t >= hi
    if bad.any():
        r = int(np.argmax(bad))
        raise _fail(
            split,
            r,
            f"target time {t[r]} is outside the split's range "
            f"[{lo}, {hi}) (train < valid_start <= valid < test_start <= test)",
        )


def _check_history(
    split: str,
    r0: int,
    hist: np.ndarray,
    t: np.ndarray,
    last_ts: np.ndarray,
    gi: int,
    ii: int,
    bi: int,
    n_beh: int,
) -> int:
    """Checks rows r0.. of one split's history block; returns the number of history events."""
    valid = hist[..., ii] != PAD_ID
    gap = hist[..., gi]

    def check(bad: np.ndarray, what: str) -> None:
        if bad.any():
            r = int(np.argmax(bad.reshape(len(bad), -1).any(-1)))
            raise _fail(split, r0 + r, what)

    check(valid[:, 1:] & ~valid[:, :-1], "history is not left-aligned (padding before events)")
    check((hist != PAD_ID) & ~valid[..., None], "padded history slot has non-zero fields")
    check(
        valid & (gap < NUM_RESERVED),
        f"history event has time_gap id {GAP_INVALID} or padding (gap <= 0: at or after the "
        "target time)",
    )
    check(
        valid & ((hist[..., bi] < NUM_RESERVED) | (hist[..., bi] >= NUM_RESERVED + n_beh)),
        "history event has an invalid behaviour id",
    )
    check(
        valid[:, 1:] & (gap[:, 1:] < gap[:, :-1]),
        "history is not most-recent-first (time gaps decrease along the history)",
    )
    has = valid[:, 0]
    check(has & (last_ts >= t), "most recent history event is at or after the target time")
    check(~has & (last_ts != NO_HISTORY), "empty history but a recorded history time")
    expect = gap_bucket(np.where(has, t - np.where(has, last_ts, 0), 1))
    check(
        has & (gap[:, 0] != expect),
        "time_gap of the most recent history event does not match target time - its time",
    )
    return int(valid.sum())


def audit_leakage(prepared_dir: str, block_rows: int = 1 << 15) -> dict:
    """Checks a prepared dataset for time leakage; raises DataError on the first violation.

    Checks: (1) every target time lies in its split's range, and for conversion labels the
    horizon ends before the split does (the per-head `labels` of --heads use the same horizon
    from the same exposure, so this covers every head); (2) histories are left-aligned,
    most recent first, and every history event is strictly before its target (the stored time
    of the most recent event is earlier than the target and agrees with its time_gap bucket;
    no time_gap is the zero/negative bucket; gaps never shrink along the history); (3) sampled
    negatives have label 0 (every head's too) and are neither in the example's own history
    nor an item the user has a real (non-sampled) example for at or before that time.

    Returns:
      counts: rows per split, history events, negatives and interactions checked.
    """
    schema = Schema.load(prepared_dir)
    try:
        bounds = schema.extra["split"]
        valid_start, test_start = int(bounds["valid_start"]), int(bounds["test_start"])
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{prepared_dir}: schema.json has no extra.split boundaries") from None
    horizon = None
    if schema.label.get("task") == "conversion":
        horizon = int(round(float(schema.label["horizon_hours"]) * 3600))
    t_end = int(bounds.get("t_max", 0)) + 1
    gi, ii = schema.hist_index("time_gap"), schema.hist_index("item_id")
    bi, item_col = schema.hist_index("behaviour"), schema.item_index("item_id")
    counts = {
        "rows": {},
        "history_events": 0,
        "examples_without_history": 0,
        "negatives": 0,
        "interactions": 0,
    }
    real, negs = [], []
    for split in SPLITS:
        rows = int(schema.splits.get(split, {}).get("rows", 0))
        counts["rows"][split] = rows
        if not rows:
            continue
        store = ExampleStore(prepared_dir, split, schema)
        t = store.column("timestamp")
        _check_bounds(split, t, valid_start, test_start, t_end, horizon)
        last_ts = _sidecar(prepared_dir, split, "hist_last_ts", rows)
        sampled = _sidecar(prepared_dir, split, "sampled", rows).astype(bool)
        for r0 in range(0, rows, block_rows):
            b = store.gather(np.arange(r0, min(rows, r0 + block_rows)))
            hist, tb = b["hist"], b["timestamp"]
            counts["history_events"] += _check_history(
                split,
                r0,
                hist,
                tb,
                np.asarray(last_ts[r0 : r0 + len(tb)]),
                gi,
                ii,
                bi,
                schema.num_behaviour_types,
            )
            counts["examples_without_history"] += int((hist[:, 0, ii] == PAD_ID).sum())
            s = sampled[r0 : r0 + len(tb)]
            neg_item = b["item"][:, item_col]
            in_hist = (hist[..., ii] == neg_item[:, None]).any(1) & (neg_item != OOV_ID) & s
            if in_hist.any():
                raise _fail(
                    split,
                    r0 + int(np.argmax(in_hist)),
                    "sampled negative is an item from the example's own history",
                )
            positive = b["label"] != 0
            if schema.heads:
                positive = positive | (b["labels"] != 0).any(1)
            if (positive & s).any():
                raise _fail(
                    split,
                    r0 + int(np.argmax(s & positive)),
                    "sampled negative has a non-zero label",
                )
        cols = (store.column("user_key"), store.column("item")[:, item_col], t)
        real.append([c[~sampled] for c in cols])
        negs.append([c[sampled] for c in cols] + [split, np.flatnonzero(sampled)])
    _check_negatives(real, negs, schema.vocab_sizes["item_id"], counts)
    return counts


def _check_negatives(real: list, negs: list, n_items: int, counts: dict) -> None:
    """No sampled negative is an item the user interacted with at or before its time."""
    if not real:
        return
    ru, ri, rt = (np.concatenate([r[k] for r in real]) for k in range(3))
    counts["interactions"] = len(ru)
    keep = ri != OOV_ID
    key = ru[keep] * n_items + ri[keep]
    order = np.lexsort((rt[keep], key))
    key, first = np.unique(key[order], return_index=True)
    first_t = rt[keep][order][first]
    for nu, ni, nt, split, rows in negs:
        counts["negatives"] += len(nu)
        if not len(nu) or not len(key):
            continue
        k = nu * n_items + ni
        pos, found = vocab.positions(key, k)
        bad = found & (first_t[pos] <= nt) & (ni != OOV_ID)
        if bad.any():
            j = int(np.argmax(bad))
            raise _fail(
                split,
                int(rows[j]),
                f"sampled negative item {ni[j]} was interacted "
                f"with by user_key {nu[j]} at time {first_t[pos[j]]}"
                f" <= the target time {nt[j]}",
            )
