"""A prepared dataset opened once and seen as a run sees it under its `config.data`.

Every reader of a trained run (ranking, influence reports, evaluation) goes through one
`Dataset`: its splits are opened once and cached, and the run's restrictions are applied here,
not by each consumer: `examples(split)` holds the histories without the behaviour types the run
was trained without (`config.data.drop_behaviours`), `eval_examples(split)` is also limited to
`config.data.eval_time_range`, and `drop_events` applies the same removal to histories built
elsewhere (ranking contexts).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from influence_jax.data import pipeline, rank_state
from influence_jax.data.history import NO_HISTORY
from influence_jax.data.idmaps import IdMaps
from influence_jax.data.schema import DataError, Schema
from influence_jax.data.store import ExampleStore

VOCAB_FOLDER = "vocab"  # a prepared dataset's vocabularies (vocab.Vocab.save)


def _fingerprint(path: str, schema: Schema) -> str:
    """What a trained model's ids mean in the dataset at `path`: a hash of its vocabularies
    (the files mapping raw ids to ids; a synthetic dataset's generator settings) and its field
    layout. The same for a copy, a move, or the same log prepared again with other splits;
    another for other data whose table sizes happen to be the same."""
    h = hashlib.sha256()
    layout = {
        "vocab_sizes": schema.vocab_sizes,
        "table_sizes": schema.table_sizes,
        "fields": [[f.name, f.vocab] for g in (schema.user_fields, schema.item_fields,
                                                 schema.hist_fields) for f in g],
        "behaviour_types": schema.behaviour_types,
        "generator": schema.extra.get("generator"),
    }  # fmt: skip
    h.update(json.dumps(layout, sort_keys=True, default=str).encode())
    folder = os.path.join(path, VOCAB_FOLDER)
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        h.update(name.encode() + b"\0")
        try:
            with open(os.path.join(folder, name), "rb") as f:
                for block in iter(lambda: f.read(1 << 22), b""):
                    h.update(block)
        except OSError as e:
            raise DataError(f"{folder}/{name}: cannot read ({e.strerror})") from None
    return h.hexdigest()[:32]


class Dataset:
    """The dataset in folder `path` under the data config `data_cfg` (None: no restriction)."""

    def __init__(self, path: str, data_cfg: Mapping[str, Any] | None = None, schema=None):
        self.path = path
        self.schema: Schema = schema if schema is not None else Schema.load(path)
        self.data_cfg = data_cfg if data_cfg is not None else {}
        self.drop_behaviours = tuple(self.data_cfg.get("drop_behaviours", ()) or ())
        # Names are checked against the schema here, once, with the config field in the message.
        self.drop_ids = pipeline.dropped_behaviour_ids(self.schema, self.data_cfg)
        self._stores: dict[str, ExampleStore] = {}

    @functools.cached_property
    def fingerprint(self) -> str:
        """What the model's ids mean in this dataset (`_fingerprint`), hashed once per Dataset
        (training, run loading and a ranking's resume settings all ask)."""
        return _fingerprint(self.path, self.schema)

    def store(self, split: str) -> ExampleStore:
        """The split as stored (no restriction), opened once."""
        if split not in self._stores:
            self._stores[split] = ExampleStore(self.path, split, self.schema)
        return self._stores[split]

    def examples(self, split: str):
        """The split with the run's dropped behaviour types removed from every history."""
        return pipeline.restrict(
            self.store(split), {"drop_behaviours": self.drop_behaviours}, "eval"
        )

    def eval_examples(self, split: str):
        """`examples(split)` limited to `config.data.eval_time_range`: what evaluation covers."""
        return pipeline.restrict(self.store(split), self.data_cfg, "eval")

    def train_examples(self):
        """The train split as training reads it (`config.data.train_time_range` too)."""
        return pipeline.restrict(self.store("train"), self.data_cfg, "train")

    def drop_events(self, hist_NxLxF: np.ndarray) -> np.ndarray:
        """`hist` without the run's dropped behaviour types (as in every training history)."""
        return pipeline.drop_events(hist_NxLxF, self.schema, self.drop_ids)

    def drop_event_times(self, hist_NxLxF: np.ndarray, times_NxL: np.ndarray) -> np.ndarray:
        """Per-slot event times of `hist` (before the drop) placed as `drop_events` places the
        events; emptied slots hold NO_HISTORY."""
        return pipeline.drop_event_times(
            hist_NxLxF, times_NxL, self.schema, self.drop_ids, NO_HISTORY
        )

    @functools.cached_property
    def id_maps(self) -> IdMaps:
        return IdMaps(self.path, self.schema)

    @property
    def has_rank_state(self) -> bool:
        return rank_state.available(self.path)
