"""Raw ids <-> vocabulary indices of a prepared dataset, through its saved vocabularies
(synthetic data has none: its raw id is the index minus NUM_RESERVED)."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from influence_jax.data.schema import NUM_RESERVED, OOV_ID, Schema
from influence_jax.data.vocab import Vocab, positions


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

    def keyed(self, name: str) -> bool:
        """Whether vocabulary `name` maps raw ids (users, items, categories, side fields); the
        others (behaviour types, time-gap buckets) are fixed lists, the same in every dataset
        of the same sizes."""
        return self.synthetic or Vocab.exists(self.path, name)

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
