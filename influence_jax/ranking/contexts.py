"""Who is ranked and with what: raw ids <-> vocabulary indices, each user's context (features and
history as of the ranking time) and the feature rows of candidate items.

Datasets prepared with a ranking state (`rank_state/`, see data/rank_state.py) give every user
with an event before the cut (valid_start, test_start or the end of the log) the history a
training example at that time would hold, built by the same function. Older datasets and
synthetic data have none: their contexts come, with a warning, from each user's latest
prepared example in the split (users without one have no history), as before.
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import pyarrow as pa
from absl import logging

from influence_jax.data import rank_state
from influence_jax.data.plan import SPLITS
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, DataError, Schema
from influence_jax.data.store import ExampleStore
from influence_jax.data.vocab import Vocab, positions

AS_OF = ("valid", "test", "end")  # ranking times: the split boundaries and after the last event


class IdMaps:
    """Raw ids <-> vocabulary indices of a prepared dataset (or of synthetic data: raw = id - 2)."""

    def __init__(self, data_path: str, schema: Schema):
        self.path, self.schema = data_path, schema
        self.synthetic = not os.path.isdir(os.path.join(data_path, "vocab"))
        self._vocabs: dict[str, Vocab] = {}

    def _vocab(self, name: str) -> Vocab:
        if name not in self._vocabs:
            self._vocabs[name] = Vocab.load(self.path, name)
        return self._vocabs[name]

    def integer(self, name: str) -> bool:
        """Whether raw ids of vocabulary `name` are integers."""
        return self.synthetic or isinstance(self._vocab(name).keys, np.ndarray)

    def lookup(self, name: str, raw: np.ndarray) -> np.ndarray:
        """Vocabulary index of each raw id; OOV_ID for unknown ones."""
        if not self.synthetic:
            return self._vocab(name).lookup(raw)
        raw = np.asarray(raw, np.int64)
        ok = (raw >= 0) & (raw < self.schema.vocab_sizes[name] - NUM_RESERVED)
        return np.where(ok, raw + NUM_RESERVED, OOV_ID).astype(np.int32)

    def raw(self, name: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw ids, valid) for indices; reserved ids (padding, OOV) are not valid."""
        idx = np.asarray(idx, np.int64)
        ok = idx >= NUM_RESERVED
        pos = np.where(ok, idx - NUM_RESERVED, 0)
        if self.synthetic:
            return pos, ok
        keys = self._vocab(name).keys
        if isinstance(keys, np.ndarray):
            return keys[pos] if len(keys) else pos, ok
        return np.asarray(keys.take(pa.array(pos)).to_pylist(), object), ok

    def user_keys(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(user_key, found) of raw user ids; user_key indexes every user of the dataset."""
        if self.synthetic:
            raw = np.asarray(raw, np.int64)
            return raw, (raw >= 0) & (raw < self.schema.vocab_sizes["user_id"] - NUM_RESERVED)
        return positions(self._vocab("user_key").keys, raw)

    def user_raw(self, keys: np.ndarray) -> np.ndarray:
        if self.synthetic:
            return np.asarray(keys, np.int64)
        ks = self._vocab("user_key").keys
        return (
            ks[keys] if isinstance(ks, np.ndarray) else np.asarray(ks.take(pa.array(keys)), object)
        )


@dataclasses.dataclass
class Contexts:
    """One row per user: user_key (sorted), user features, history and the example's time."""

    user_key: np.ndarray
    user: np.ndarray
    hist: np.ndarray
    timestamp: np.ndarray  # the ranking time (cut) or the time of the example used (unix s)
    in_split: np.ndarray  # bool: ranked by default (has a state at the cut / an example in split)
    seen: np.ndarray | None = None  # sorted user_key * item vocab size + item_id seen before

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, found) of each user_key."""
        return positions(self.user_key, keys)


def load_contexts(data_path: str, schema: Schema, as_of: str) -> Contexts:
    """Every user's context as of `as_of` (valid, test or end; see the module docstring)."""
    if as_of not in AS_OF and not (as_of in SPLITS and not rank_state.available(data_path)):
        raise DataError(f"--as_of/--split must be one of {list(AS_OF)}, not {as_of!r}")
    if rank_state.available(data_path):
        s = rank_state.load_state(data_path, schema, as_of)
        n = len(s.user_key)
        return Contexts(
            np.asarray(s.user_key, np.int64),
            s.user,
            s.hist,
            np.full(n, s.time, np.int64),
            np.ones(n, bool),
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
    return contexts_from_examples(data_path, schema, as_of)


def contexts_from_examples(data_path: str, schema: Schema, split: str) -> Contexts:
    """Each user's latest example in `split`, else in the splits before it (SPLITS order)."""
    order = list(SPLITS)
    splits = order[: order.index(split) + 1] if split in order else [split]
    stores = [ExampleStore(data_path, s, schema) for s in splits]
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


def item_rows(data_path: str, schema: Schema, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows [len(ids), Fi] of item_id indices, and which ones lack features.

    With a ranking state every item id has its row (rank_state/item_features.npy); otherwise
    rows come from the items of every split's examples, and an item seen only in histories
    takes the item fields histories carry (e.g. category); anything else is OOV.
    """
    if not rank_state.available(data_path):
        return item_rows_from_examples(data_path, schema, ids)
    table = rank_state.load_item_features(data_path)
    inside = (ids >= 0) & (ids < len(table))
    out = table[np.where(inside, ids, OOV_ID)].copy()
    out[:, schema.item_index("item_id")] = np.where(inside, ids, OOV_ID)
    return out, ~inside


def item_rows_from_examples(
    data_path: str, schema: Schema, ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """`item_rows` for datasets without a ranking state (synthetic data, older preparations).

    Rows come from the items of every split's examples; an item seen only in histories takes
    the item fields histories carry (e.g. category); anything else is OOV.
    """
    col = schema.item_index("item_id")
    out = np.full((len(ids), len(schema.item_fields)), OOV_ID, np.int32)
    out[:, col] = ids
    todo = ids >= NUM_RESERVED
    stores = [ExampleStore(data_path, s, schema) for s in schema.splits]
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
