"""Ranking state written at preparation time: every user's history as of each split boundary.

`rank_state/<cut>/` for cut in valid (as of valid_start), test (as of test_start) and end (after
the last event) holds one row per user with at least one event strictly before the cut:
user_key.npy [U] (position in vocab/user_key), user.npy [U, Fu] (user feature ids),
hist.npy [U, L, Fh] (built by `history.state_as_of`, the function that builds training
histories, so it equals what a training example at the cut would hold), last_ts.npy [U]
(time of the most recent history event, always before the cut) and hist_ts.npy [U, L] (the raw
time of each history event, NO_HISTORY in empty slots: hist keeps only a log2 bucket of the gap;
states written before it existed lack it). `rank_state/seen/` lists each
(user_key, item) pair with its first interaction time (for excluding seen items), and
`rank_state/item_features.npy` [item vocab size, Fi] gives the feature ids of every item id.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from influence_jax.data.examples import NpyColumns
from influence_jax.data.history import Events, event_rows, state_as_of
from influence_jax.data.plan import Plan
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, DataError, Schema

FOLDER = "rank_state"
CUTS = ("valid", "test", "end")
USERS_PER_BLOCK = 1 << 14  # users whose state is built at once (bounds the memory per bucket)
I4, I8 = np.dtype("<i4"), np.dtype("<i8")


class RankStateWriter:
    """Appends each bucket's user states (all cuts) and seen pairs; `close` finishes the files."""

    def __init__(self, root: str, plan: Plan, schema: Schema, t_max: int):
        self.root, self.plan, self.schema = root, plan, schema
        self.cuts = {"valid": plan.bounds[0], "test": plan.bounds[1], "end": int(t_max) + 1}
        L, fu, fh = schema.max_len, len(schema.user_fields), len(schema.hist_fields)
        cols = {
            "user_key": (I8, ()),
            "user": (I4, (fu,)),
            "hist": (I4, (L, fh)),
            "last_ts": (I8, ()),
            "hist_ts": (I8, (L,)),
        }
        base = os.path.join(root, FOLDER)
        self.states = {c: NpyColumns(os.path.join(base, c), cols) for c in self.cuts}
        seen = {"user_key": (I8, ()), "item": (I4, ()), "first_ts": (I8, ())}
        self.seen = NpyColumns(os.path.join(base, "seen"), seen)

    def add(self, events: Events, slots: np.ndarray | None = None) -> None:
        """One bucket's events, sorted as for examples (`history.sort_events`); `slots`: their
        `history.event_rows`, if the caller has them (made here otherwise, once for all cuts)."""
        if not len(events.ts):
            return
        if slots is None:
            plan, fields = self.plan, self.schema.hist_fields
            slots = event_rows(events, plan.item_rows, plan.item_fields, fields)
        first = np.flatnonzero(np.r_[True, events.user[1:] != events.user[:-1]])
        bounds = np.r_[first[::USERS_PER_BLOCK], len(events.ts)] if len(first) else [0]
        for a, b in zip(bounds[:-1], bounds[1:], strict=True):
            part = Events(*(x[a:b] for x in dataclasses.astuple(events)))
            for cut, t in self.cuts.items():
                s = state_as_of(
                    part,
                    t,
                    self.plan.item_rows,
                    self.plan.item_fields,
                    self.schema.hist_fields,
                    self.schema.max_len,
                    slots[a:b],
                )
                self.states[cut].add(
                    user_key=s.user,
                    user=self.plan.user_rows[s.user],
                    hist=s.hist,
                    last_ts=s.last_ts,
                    hist_ts=s.hist_ts,
                )
        item = self.plan.item_rows[events.item, 0].astype(np.int64)
        n_ids = self.schema.vocab_sizes["item_id"]
        key = events.user.astype(np.int64) * n_ids + item
        _, at = np.unique(key, return_index=True)  # first occurrence = earliest (time-sorted)
        at.sort()
        self.seen.add(user_key=events.user[at], item=item[at], first_ts=events.ts[at])

    def columns(self) -> list[NpyColumns]:
        """Its column folders: each cut's state, then the seen pairs."""
        return [*self.states.values(), self.seen]

    def close(self, features: bool = True) -> dict:
        """Finishes the columns and (with `features`) writes item_features.npy; returns the
        schema's description."""
        for c in self.columns():
            c.close()
        if features:
            path = item_features_path(self.root)
            np.save(path, item_features(self.plan))
        return {
            "folder": FOLDER,
            "cuts": self.cuts,
            "rule": "rank_state/<cut>: every user with an event before the cut; hist = the "
            "max_len most recent events strictly before the cut, time gaps from the cut",
            "columns": ["user_key", "user", "hist", "last_ts", "hist_ts"],
            "seen": "rank_state/seen: user_key, item (item_id index), first_ts",
            "item_features": "rank_state/item_features.npy: [item_id vocab size, item fields]",
        }


def item_features(plan: Plan) -> np.ndarray:
    """[item_id vocab size, Fi] feature ids per item_id index; rows 0 and 1 are padding/OOV.

    Items below min_count share the OOV id; their row keeps OOV for every field."""
    ids = plan.item_rows[:, 0]
    out = np.full((plan.vocabs["item_id"].size, plan.item_rows.shape[1]), OOV_ID, np.int32)
    out[:, 0] = np.arange(len(out))
    kept = ids >= NUM_RESERVED
    out[ids[kept]] = plan.item_rows[kept]
    return out


@dataclasses.dataclass
class RankState:
    """Users' state as of one cut (memory-mapped columns, sorted by user_key)."""

    cut: str
    time: int  # the cut (unix s): histories hold only events strictly before it
    user_key: np.ndarray
    user: np.ndarray
    hist: np.ndarray
    last_ts: np.ndarray
    hist_ts: np.ndarray | None  # [U, L] event times (unix s); None in states written before it


def available(data_path: str) -> bool:
    """Whether the prepared dataset has a ranking state (prepared after it existed)."""
    return os.path.isdir(os.path.join(data_path, FOLDER))


def load_state(data_path: str, schema: Schema, cut: str) -> RankState:
    """The state of `cut` (valid, test or end), rows sorted by user_key."""
    info = schema.extra.get(FOLDER, {})
    if cut not in CUTS or cut not in info.get("cuts", {}):
        raise DataError(f"--as_of must be one of {list(CUTS)}, not {cut!r}")
    folder = os.path.join(data_path, FOLDER, cut)
    try:
        cols = {
            k: np.load(os.path.join(folder, k + ".npy"), mmap_mode="r")
            for k in ("user_key", "user", "hist", "last_ts")
        }
        ts_path = os.path.join(folder, "hist_ts.npy")
        if os.path.exists(ts_path):  # absent in states written before it existed
            cols["hist_ts"] = np.load(ts_path, mmap_mode="r")
    except (OSError, ValueError, EOFError) as e:
        raise DataError(
            f"{folder}: cannot read the ranking state ({e}); rerun tools/prepare_data.py"
        ) from None
    order = np.argsort(cols["user_key"], kind="stable")
    if not np.array_equal(order, np.arange(len(order))):  # else keep the memory maps
        cols = {k: np.asarray(v)[order] for k, v in cols.items()}
    return RankState(cut, int(info["cuts"][cut]), hist_ts=cols.pop("hist_ts", None), **cols)


def seen_keys(data_path: str, before: int, n_ids: int) -> np.ndarray:
    """Sorted user_key * n_ids + item_id index of every pair first seen strictly before
    `before` (n_ids: the item_id vocabulary size)."""
    folder = os.path.join(data_path, FOLDER, "seen")
    t = np.load(os.path.join(folder, "first_ts.npy"), mmap_mode="r")
    m = np.asarray(t) < before
    u = np.load(os.path.join(folder, "user_key.npy"))[m].astype(np.int64)
    return np.unique(u * n_ids + np.load(os.path.join(folder, "item.npy"))[m])


def load_item_features(data_path: str) -> np.ndarray:
    """[item_id vocab size, Fi] feature ids per item id (see `item_features`)."""
    return np.load(item_features_path(data_path))


def item_features_path(data_path: str) -> str:
    """Where a prepared dataset keeps its item features (`item_features`)."""
    return os.path.join(data_path, FOLDER, "item_features.npy")
