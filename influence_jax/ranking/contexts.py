"""Who is ranked and with what: each user's context (features and history as of the ranking
time) and the feature rows of candidate items. Histories come without the behaviour types the
run was trained without (the run's Dataset applies config.data.drop_behaviours).

Datasets prepared with a ranking state (`rank_state/`, see data/rank_state.py) give every user
with an event before the cut (valid_start, test_start or the end of the log) the history a
training example at that time would hold, built by the same function. Older datasets and
synthetic data have none: their contexts come, with a warning, from each user's latest
prepared example in the split (users without one have no history), as before. Contexts carry
each history event's raw time (`hist_time`) where the ranking state stores it, so explanations
can give real seconds; prepared examples keep only the log2 time-gap bucket.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from absl import logging

from influence_jax.data import rank_state
from influence_jax.data.dataset import Dataset
from influence_jax.data.idmaps import IdMaps  # noqa: F401 - re-exported (ranking.IdMaps)
from influence_jax.data.plan import SPLITS
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, DataError
from influence_jax.data.vocab import positions

AS_OF = ("valid", "test", "end")  # ranking times: the split boundaries and after the last event


@dataclasses.dataclass
class Contexts:
    """One row per user: user_key (sorted), user features, history and the example's time."""

    user_key: np.ndarray
    user: np.ndarray
    hist: np.ndarray
    timestamp: np.ndarray  # the ranking time (cut) or the time of the example used (unix s)
    in_split: np.ndarray  # bool: ranked by default (has a state at the cut / an example in split)
    seen: np.ndarray | None = None  # sorted user_key * item vocab size + item_id seen before
    # [N, L] int64 raw time (unix s) of each history event, NO_HISTORY in empty slots; None
    # where only the time_gap bucket is known (prepared examples, rank states without hist_ts).
    hist_time: np.ndarray | None = None

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, found) of each user_key."""
        return positions(self.user_key, keys)


def load_contexts(dataset: Dataset, as_of: str) -> Contexts:
    """Every user's context as of `as_of` (valid, test or end; see the module docstring)."""
    ctx = _load_contexts(dataset, as_of)
    times = ctx.hist_time
    if times is not None:
        times = dataset.drop_event_times(ctx.hist, times)
    return dataclasses.replace(ctx, hist=dataset.drop_events(ctx.hist), hist_time=times)


def _load_contexts(dataset: Dataset, as_of: str) -> Contexts:
    data_path, schema = dataset.path, dataset.schema
    if as_of not in AS_OF and not (as_of in SPLITS and not dataset.has_rank_state):
        raise DataError(f"--as_of/--split must be one of {list(AS_OF)}, not {as_of!r}")
    if dataset.has_rank_state:
        s = rank_state.load_state(data_path, schema, as_of)
        n = len(s.user_key)
        return Contexts(
            np.asarray(s.user_key, np.int64),
            s.user,
            s.hist,
            np.full(n, s.time, np.int64),
            np.ones(n, bool),
            hist_time=None if s.hist_ts is None else np.asarray(s.hist_ts, np.int64),
        )
    if as_of == "end":
        raise DataError(
            f"{data_path}: --as_of=end needs a ranking state (rank_state/); rerun "
            "tools/prepare_data.py"
        )
    logging.warning(
        "%s has no rank_state/ (synthetic data, or prepared before it existed): histories come "
        "from each user's latest example in the %s split and users without one are not ranked "
        "by default; rerun tools/prepare_data.py to rank every user as of the split start",
        data_path,
        as_of,
    )
    return contexts_from_examples(dataset, as_of)


def contexts_from_examples(dataset: Dataset, split: str) -> Contexts:
    """Each user's latest example in `split`, else in the splits before it (SPLITS order)."""
    schema = dataset.schema
    order = list(SPLITS)
    splits = order[: order.index(split) + 1] if split in order else [split]
    stores = [dataset.store(s) for s in splits]
    keys, rows, src = [], [], []
    for si, store in enumerate(stores):
        uk, ts = store.column("user_key"), store.column("timestamp")
        o = np.lexsort((np.arange(len(uk)), ts, uk))
        last = o[np.r_[uk[o][1:] != uk[o][:-1], True]] if len(o) else o
        keys.append(uk[last]), rows.append(last), src.append(np.full(len(last), si))
    keys, rows, src = (np.concatenate(x).astype(np.int64) for x in (keys, rows, src))
    o = np.lexsort((src, keys))  # a user's context from the latest split wins
    keep = o[np.r_[keys[o][1:] != keys[o][:-1], True]] if len(o) else o
    keys, rows, src = keys[keep], rows[keep], src[keep]
    L, Fh = schema.max_len, len(schema.hist_fields)
    user = np.zeros((len(keys), len(schema.user_fields)), np.int32)
    hist, ts = np.zeros((len(keys), L, Fh), np.int32), np.zeros(len(keys), np.int64)
    for si, store in enumerate(stores):
        m = src == si
        g = store.gather(rows[m])
        user[m], hist[m], ts[m] = g["user"], g["hist"], g["timestamp"]
    return Contexts(keys, user, hist, ts, src == len(stores) - 1)


def item_rows(dataset: Dataset, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows [len(ids), Fi] of item_id indices, and which ones lack features.

    With a ranking state every item id has its row (rank_state/item_features.npy); otherwise
    rows come from the items of every split's examples, and an item seen only in histories
    takes the item fields histories carry (e.g. category); anything else is OOV.
    """
    schema = dataset.schema
    if not dataset.has_rank_state:
        return item_rows_from_examples(dataset, ids)
    table = rank_state.load_item_features(dataset.path)
    inside = (ids >= 0) & (ids < len(table))
    out = table[np.where(inside, ids, OOV_ID)].copy()
    out[:, schema.item_index("item_id")] = np.where(inside, ids, OOV_ID)
    return out, ~inside


def item_rows_from_examples(dataset: Dataset, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """`item_rows` for datasets without a ranking state (synthetic data, older preparations).

    Rows come from the items of every split's examples; an item seen only in histories takes
    the item fields histories carry (e.g. category); anything else is OOV.
    """
    schema = dataset.schema
    col = schema.item_index("item_id")
    out = np.full((len(ids), len(schema.item_fields)), OOV_ID, np.int32)
    out[:, col] = ids
    todo = ids >= NUM_RESERVED
    stores = [dataset.store(s) for s in schema.splits]
    for store in stores:
        item = store.column("item")
        known, first = np.unique(item[:, col], return_index=True)
        pos, found = positions(known, ids)
        hit = todo & found
        out[hit] = item[first[pos[hit]]]
        todo &= ~hit
    item_names = {g.name for g in schema.item_fields} - {"item_id"}
    shared = [
        (schema.item_index(f.name), j)
        for j, f in enumerate(schema.hist_fields)
        if f.name in item_names
    ]
    h_item = schema.hist_index("item_id")
    for store in stores:
        for a in range(0, len(store) if todo.any() and shared else 0, 1 << 15):
            hist = store.gather(np.arange(a, min(a + (1 << 15), len(store))))["hist"]
            flat = hist.reshape(-1, hist.shape[-1])
            known, first = np.unique(flat[:, h_item], return_index=True)
            pos, found = positions(known, ids)
            hit = todo & found
            for i, j in shared:
                out[hit, i] = flat[first[pos[hit]], j]
            todo &= ~hit
    return out, todo & (ids >= NUM_RESERVED)
