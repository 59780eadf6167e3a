"""The events candidate generation learns from: every user's history as of a cut, from the
prepared dataset's ranking state, and the items each user engaged with after it.

A prepared dataset keeps no file of raw (user, item, behaviour, time) events: preparation
streams the log through buckets and writes example shards and `rank_state/`. The training-period
events retrieval sees are therefore each user's `max_len` most recent events strictly before the
cut (`rank_state/<cut>/hist.npy`: item id, category, behaviour; `hist_ts.npy`: raw times),
the same histories a ranked user carries. Older events of heavy users are not seen; the items a
user ever touched before the cut are still known from `rank_state/seen` (`seen_keys`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import numpy as np

from influence_jax.data import rank_state
from influence_jax.data.history import NO_HISTORY, gap_seconds
from influence_jax.data.schema import NUM_RESERVED, DataError, Schema
from influence_jax.data.store import ExampleStore

# Default weight of each behaviour type by name (types not listed weigh 1): a purchase or cart
# next to an item says more about what goes with it than a view.
DEFAULT_WEIGHTS: dict[str, float] = {
    "pv": 1.0,
    "view": 1.0,
    "click": 1.0,
    "cart": 3.0,
    "addtocart": 3.0,
    "fav": 3.0,
    "buy": 5.0,
    "transaction": 5.0,
}
SPLIT_OF_CUT = {"valid": "valid", "test": "test"}  # the split whose events follow each cut


@dataclasses.dataclass
class Histories:
    """Users' histories as of a cut, most recent event first (slot 0), padded at the end."""

    cut: str  # valid, test or end
    time: int  # the cut (unix s); every event is strictly before it
    user_key: np.ndarray  # [U] int64, sorted
    item: np.ndarray  # [U, L] int32 dense item id; 0 (padding) in empty slots, 1 = OOV item
    beh: np.ndarray  # [U, L] int32 behaviour code (index into behaviour_types), -1 when empty
    ts: np.ndarray  # [U, L] int64 event time (unix s); NO_HISTORY when empty
    category: np.ndarray | None  # [U, L] int32 category id of the event's item (if in schema)
    behaviour_types: tuple[str, ...]
    n_items: int  # item_id vocabulary size: dense ids are in [0, n_items)

    @property
    def valid(self) -> np.ndarray:
        """[U, L] slots holding an event of a known item (not padding, not OOV)."""
        return self.item >= NUM_RESERVED

    def __len__(self) -> int:
        return len(self.user_key)

    def select(self, keep: np.ndarray | slice) -> Histories:
        """The users where `keep` [U] bool is set (or a slice of them: views)."""
        cat = None if self.category is None else self.category[keep]
        return dataclasses.replace(
            self,
            user_key=self.user_key[keep],
            item=self.item[keep],
            beh=self.beh[keep],
            ts=self.ts[keep],
            category=cat,
        )

    def rows(self, a: int, b: int) -> Histories:
        """Users a..b-1 (a chunk; the arrays are views)."""
        return self.select(slice(a, b))


def load_histories(data_path: str, schema: Schema, cut: str) -> Histories:
    """The histories of `rank_state/<cut>` (cut: valid, test or end).

    States written before `hist_ts.npy` existed give each event the time of the lower bound of
    its log2 time-gap bucket (cut - 2^k s), a coarse but ordered stand-in.
    """
    if not rank_state.available(data_path):
        if schema.name == "synthetic":
            raise DataError(
                f"{data_path}: synthetic data has no event log to retrieve candidates from; "
                "retrieval needs a dataset made by tools/prepare_data.py"
            )
        raise DataError(
            f"{data_path}: no rank_state/ folder (prepared before it existed); rerun "
            "tools/prepare_data.py to retrieve candidates"
        )
    s = rank_state.load_state(data_path, schema, cut)
    user_key = np.asarray(s.user_key, np.int64)
    time = np.full(len(user_key), s.time, np.int64)
    return from_arrays(schema, user_key, np.asarray(s.hist), time, s.hist_ts, cut, s.time)


def from_arrays(
    schema: Schema,
    user_key: np.ndarray,
    hist: np.ndarray,
    time: np.ndarray,
    hist_time: np.ndarray | None = None,
    cut: str = "contexts",
    cut_time: int | None = None,
) -> Histories:
    """Histories of users given as ranking contexts (sorted user_key [U], hist [U, L, F] with the
    schema's history fields, each user's time [U] and, where known, each event's raw time): the
    ranker's own view of the users, also for data without a ranking state (each user's latest
    example) and for histories rebuilt from a raw log. Without raw times an event's time is
    its user's time less the lower bound of its time-gap bucket."""
    hist = np.asarray(hist)
    item = hist[..., schema.hist_index("item_id")].astype(np.int32)
    filled = item != 0
    beh = np.where(filled, hist[..., schema.hist_index("behaviour")] - NUM_RESERVED, -1)
    time = np.asarray(time, np.int64)
    if hist_time is not None:
        ts = np.asarray(hist_time, np.int64)
    else:
        gap = gap_seconds(schema, hist[..., schema.hist_index("time_gap")])
        ts = np.where(filled, time[:, None] - gap, NO_HISTORY)
    names = [f.name for f in schema.hist_fields]
    category = hist[..., names.index("category")].astype(np.int32) if "category" in names else None
    return Histories(
        cut=cut,
        time=int(cut_time if cut_time is not None else time.max(initial=0)),
        user_key=np.asarray(user_key, np.int64),
        item=item,
        beh=beh.astype(np.int32),
        ts=ts,
        category=category,
        behaviour_types=tuple(schema.behaviour_types),
        n_items=int(schema.vocab_sizes["item_id"]),
    )


def behaviour_weights(types: tuple[str, ...], given: Mapping[str, float] | None) -> np.ndarray:
    """[len(types)] weight per behaviour code: `given` by name, else DEFAULT_WEIGHTS, else 1.

    A name in `given` that is not a behaviour type of the dataset raises DataError."""
    given = dict(given or {})
    unknown = sorted(set(given) - set(types))
    if unknown:
        raise DataError(
            f"--behaviour_weights names {unknown}, not behaviour types of the dataset "
            f"(which has {list(types)})"
        )
    return np.array([given.get(t, DEFAULT_WEIGHTS.get(t, 1.0)) for t in types], np.float64)


def event_weights(h: Histories, beh_w: np.ndarray, half_life_s: float) -> np.ndarray:
    """[U, L] float64 weight of each event: its behaviour's weight, halved every `half_life_s`
    seconds before the cut (no decay when `half_life_s` <= 0); 0 in invalid slots."""
    ok = h.valid
    w = beh_w[np.where(ok, h.beh, 0)]
    if half_life_s > 0:
        age = np.where(ok, h.time - h.ts, 0).astype(np.float64)
        w = w * np.exp2(-age / half_life_s)
    return np.where(ok, w, 0.0)


def positives(data_path: str, schema: Schema, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Distinct (user_key, item id) of the split's positives (label 1): the items each user
    engaged with (next_item) or converted on (conversion) in the split's period."""
    store = ExampleStore(data_path, split, schema)
    label = np.asarray(store.column("label"))
    item = np.asarray(store.column("item"))[:, schema.item_index("item_id")].astype(np.int64)
    user = np.asarray(store.column("user_key")).astype(np.int64)
    pos = label > 0.5
    key = np.unique(user[pos] * int(schema.vocab_sizes["item_id"]) + item[pos])
    u, i = np.divmod(key, int(schema.vocab_sizes["item_id"]))
    return u, i.astype(np.int32)


def seen_keys(data_path: str, h: Histories) -> np.ndarray:
    """Sorted user_key * n_items + item of every pair a user interacted with before the cut
    (`rank_state/seen`, so older than the history too)."""
    return rank_state.seen_keys(data_path, h.time, h.n_items)
