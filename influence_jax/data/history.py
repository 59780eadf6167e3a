"""Behaviour histories, built one way for training examples and for ranking.

A bucket's events are sorted by (user, time, ...); an event's history "as of" time t is the
`max_len` most recent events of the same user strictly before t, most recent first, each as
(item fields, behaviour, bucketed time gap t - event time). `assemble` builds them for any
rows given each row's user span, from the events as history slots (`event_rows`);
`user_spans` gives the spans of training targets (as of the target's own time) and
`state_as_of` those of every user as of a cut (a split boundary or any ranking time), so
training and ranking histories cannot drift apart.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from influence_jax import sorting
from influence_jax.data.schema import NUM_RESERVED, Field, Schema

NUM_GAP_BUCKETS = 32  # log2 buckets of seconds: 1 s .. 2^31 s and above
GAP_INVALID = 1  # time_gap id of a zero or negative gap; preparation never emits it
NO_HISTORY = np.iinfo(np.int64).min  # hist_last_ts of an example with an empty history


def gap_bucket(gap: np.ndarray) -> np.ndarray:
    """time_gap ids: 1 for gap <= 0 s, else 2 + min(floor(log2(gap)), NUM_GAP_BUCKETS - 1)."""
    gap = np.asarray(gap, np.int64)
    b = np.floor(np.log2(np.maximum(gap, 1).astype(np.float64))).astype(np.int32)
    return np.where(gap > 0, NUM_RESERVED + np.minimum(b, NUM_GAP_BUCKETS - 1), GAP_INVALID).astype(
        np.int32
    )


def sort_order(ev: np.ndarray) -> np.ndarray:
    """Order by (user, time, behaviour, item, value). One stable sort on a (user, time) key is
    near-linear on logs that are already grouped by user; only tied rows get the full sort."""
    user, ts = ev["user"].astype(np.int64), ev["ts"]
    span = int(ts.max()) - int(ts.min()) + 1
    if int(user.max()) + 1 >= (1 << 62) // span:
        return np.lexsort((ev["value"], ev["item"], ev["beh"], ts, user))
    key = user * span + (ts - ts.min())
    return sorting.key_order(key, ev["beh"], ev["item"], ev["value"])


def sort_events(ev: np.ndarray, dedupe: bool) -> tuple[np.ndarray, int]:
    """Sorts events (see `sort_order`); counts (and maybe drops) exact repeats."""
    ev = ev[sort_order(ev)] if len(ev) else ev
    dup = np.zeros(len(ev), bool)
    if len(ev) > 1:
        dup[1:] = ev[1:] == ev[:-1]
    n_dup = int(dup.sum())
    return (ev[~dup] if dedupe and n_dup else ev), n_dup


@dataclasses.dataclass
class Events:
    """One bucket's events sorted by (user, time) (see `sort_events`), as plain columns."""

    user: np.ndarray  # dense user index
    item: np.ndarray  # dense item index (int64)
    ts: np.ndarray  # unix s
    beh: np.ndarray  # behaviour code (0-based)

    @classmethod
    def of(cls, ev: np.ndarray) -> Events:
        return cls(ev["user"], ev["item"].astype(np.int64), ev["ts"], ev["beh"])


def user_spans(events: Events) -> tuple[np.ndarray, np.ndarray]:
    """(start, lo) per event: index of the user's first event and of the user's first event at
    this event's timestamp, so [start, lo) are the user's events strictly before it."""
    user, ts, n = events.user, events.ts, len(events.ts)
    ar = np.arange(n)
    new_user = np.ones(n, bool)
    new_user[1:] = user[1:] != user[:-1]
    new_time = new_user.copy()
    new_time[1:] |= ts[1:] != ts[:-1]
    start = np.maximum.accumulate(np.where(new_user, ar, 0))
    lo = np.maximum.accumulate(np.where(new_time, ar, 0))
    return start, lo


def gap_seconds(schema: Schema, gap_ids: np.ndarray) -> np.ndarray:
    """Lower bound of each time_gap bucket in seconds (synthetic buckets are powers of 4): all
    that the history tensor keeps of an event's time, so never a real gap in seconds."""
    base = 4 if "generator" in schema.extra else 2
    return base ** np.maximum(gap_ids.astype(np.int64) - NUM_RESERVED, 0)


def _slots(start: np.ndarray, end: np.ndarray, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """(event index [R, max_len], valid [R, max_len]) of each history slot, most recent first;
    the index of an empty slot is 0."""
    idx = end[:, None] - 1 - np.arange(max_len)
    valid = idx >= start[:, None]
    return np.where(valid, idx, 0), valid


def event_times(events: Events, start: np.ndarray, end: np.ndarray, max_len: int) -> np.ndarray:
    """[R, max_len] int64 raw time (unix s) of each slot of the histories `assemble` builds from
    the same spans, NO_HISTORY in empty slots: the time_gap field only keeps a log2 bucket."""
    idx, valid = _slots(start, end, max_len)
    return np.where(valid, events.ts[idx], NO_HISTORY).astype(np.int64)


def event_rows(
    events: Events,
    item_rows: np.ndarray,
    item_fields: list[Field] | tuple[Field, ...],
    hist_fields: list[Field] | tuple[Field, ...],
) -> np.ndarray:
    """[E, Fh] int32: each event as one history slot, its time_gap column 0 (the gap depends
    on the time the history is seen from; `assemble` fills it in)."""
    cols = {"behaviour": events.beh.astype(np.int32) + NUM_RESERVED}
    for j, f in enumerate(item_fields):
        if any(h.name == f.name for h in hist_fields):
            cols[f.name] = item_rows[events.item, j]
    zero = np.zeros(len(events.ts), np.int32)
    return np.stack([cols.get(f.name, zero) for f in hist_fields], -1).astype(np.int32)


def gap_column(hist_fields: list[Field] | tuple[Field, ...]) -> int | None:
    """Index of the time_gap history field, None without one."""
    names = [f.name for f in hist_fields]
    return names.index("time_gap") if "time_gap" in names else None


def assemble(
    rows: np.ndarray,
    ts: np.ndarray,
    start: np.ndarray,
    end: np.ndarray,
    t: np.ndarray,
    max_len: int,
    gap_col: int | None,
) -> np.ndarray:
    """[R, max_len, Fh] int32 histories from event rows (`event_rows`, or a memory map of them)
    and times: row r holds rows[end_r - 1], rows[end_r - 2], ... down to start_r (at most
    max_len), most recent first, padding 0, with the time_gap column set to the bucket of
    t_r - ts[event]."""
    idx, valid = _slots(np.asarray(start), np.asarray(end), max_len)
    flat = idx.reshape(-1)
    # np.take, not rows[flat]: on a memory map it is ~10x faster than fancy indexing.
    hist = np.asarray(np.take(rows, flat, axis=0)).reshape(*idx.shape, rows.shape[-1])
    hist = hist.astype(np.int32, copy=False)
    if gap_col is not None:
        seen = np.asarray(np.take(ts, flat)).reshape(idx.shape)
        hist[..., gap_col] = gap_bucket(np.asarray(t)[:, None] - seen)
    hist *= valid[..., None]  # padding 0 (cheaper than a masked assignment)
    return hist


def last_event_time(ts: np.ndarray, start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """[R] time of events[end - 1] (the most recent history event), NO_HISTORY where the
    history [start, end) is empty."""
    has = end > start
    return np.where(has, ts[np.where(has, end - 1, 0)], NO_HISTORY).astype(np.int64)


@dataclasses.dataclass
class UserState:
    """Every user with at least one event strictly before `cut`, as of `cut`."""

    user: np.ndarray  # [U] dense user index (= user_key)
    hist: np.ndarray  # [U, L, Fh] int32
    last_ts: np.ndarray  # [U] time of the most recent event in hist
    hist_ts: np.ndarray  # [U, L] int64 time of each event in hist (unix s), NO_HISTORY if empty


def state_as_of(
    events: Events,
    cut: int,
    item_rows: np.ndarray,
    item_fields: list[Field] | tuple[Field, ...],
    hist_fields: list[Field] | tuple[Field, ...],
    max_len: int,
    slots: np.ndarray | None = None,
) -> UserState:
    """Each user's history as a training example at time `cut` would hold it (`slots`: the
    events' `event_rows`, when the caller has them already)."""
    n = len(events.ts)
    if not n:
        return UserState(
            np.zeros(0, np.int64),
            np.zeros((0, max_len, len(hist_fields)), np.int32),
            np.zeros(0, np.int64),
            np.zeros((0, max_len), np.int64),
        )
    first = np.flatnonzero(np.r_[True, events.user[1:] != events.user[:-1]])
    # Events are time-sorted within a user, so those before the cut are a prefix of its span.
    before = np.add.reduceat((events.ts < cut).astype(np.int64), first)
    keep = before > 0
    start = first[keep]
    end = start + before[keep]
    t = np.full(len(start), cut, np.int64)
    if slots is None:
        slots = event_rows(events, item_rows, item_fields, hist_fields)
    hist = assemble(slots, events.ts, start, end, t, max_len, gap_column(hist_fields))
    last_ts = last_event_time(events.ts, start, end)
    hist_ts = event_times(events, start, end, max_len)
    return UserState(events.user[start].astype(np.int64), hist, last_ts, hist_ts)
