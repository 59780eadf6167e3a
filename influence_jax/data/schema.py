"""The feature schema, written once by data preparation as `schema.json` beside the data.

The pipeline, the model and the ranker all read it; no vocabulary size is typed anywhere else.

Id conventions shared by every vocabulary: id 0 is padding, id 1 is out-of-vocabulary, real
values start at 2. Behaviour type `behaviour_types[k]` has id `k + NUM_RESERVED` in the
`behaviour` vocabulary.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import numpy as np

from influence_jax.errors import DataError  # noqa: F401 - re-exported for the data modules

PAD_ID = 0
OOV_ID = 1
NUM_RESERVED = 2
# Batch keys of the user and item ids as the data holds them, kept by the sparse train step
# beside the ids it remaps to rows of its gathered tables (sparse.gather_rows).
RAW_IDS = {"user": "user_raw_ids", "item": "item_raw_ids"}
SCHEMA_FILE = "schema.json"
SCHEMA_VERSION = 1

# The history must carry these roles; the model finds them by name.
HIST_ITEM = "item_id"
HIST_BEHAVIOUR = "behaviour"


@dataclasses.dataclass(frozen=True)
class Field:
    """One categorical feature: its name and the vocabulary (embedding table) it indexes.

    Fields with the same non-empty `bag` are the slots of one multi-valued feature (padded with
    PAD_ID); the model pools them into one embedding.
    """

    name: str
    vocab: str
    bag: str = ""


@dataclasses.dataclass(frozen=True)
class Schema:
    """What a prepared dataset holds. See module docstring for id conventions.

    Attributes:
      name: dataset name, e.g. synthetic or taobao.
      vocab_sizes: ids of each vocabulary (its id range), reserved ids included.
      table_sizes: embedding rows of a vocabulary whose ids were first seen partly after the
        training period (`prepare_data.py --vocab_period=train`): ids at or above it keep their
        own id, so exact matches (same item as the target) still see them, but embed as OOV,
        as they would for a model deployed at the cut. Absent: the whole id range.
      user_fields / item_fields / hist_fields: columns of the `user` [N, Fu], `item` [N, Fi]
        and `hist` [N, L, Fh] arrays, in order.
      max_len: L, the history length (most recent events, left-aligned, zero-padded).
      behaviour_types: names of the behaviour types, e.g. ("pv", "cart", "fav", "buy").
      label: how the label was defined (free-form, for people and reports). Multi-task data
        also holds `label["heads"]`, the names of the H heads, in the column order of the
        examples' `labels` [N, H] (one label per head; see `heads`).
      splits: per split name, {"rows": int, "shards": [relative dirs], "label_sum": float}, and
        with heads "label_sums": {head: float}.
      extra: anything else preparation wants to record (command, boundaries, counts).
      history_events: "" when every example stores its own `hist`; else the folder (relative
        to the dataset) of the event table the examples' histories reference (store.py:
        histories by reference, written by tools/prepare_data.py).
    """

    name: str
    vocab_sizes: dict[str, int]
    user_fields: tuple[Field, ...]
    item_fields: tuple[Field, ...]
    hist_fields: tuple[Field, ...]
    max_len: int
    behaviour_types: tuple[str, ...]
    label: dict[str, Any] = dataclasses.field(default_factory=dict)
    splits: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    table_sizes: dict[str, int] = dataclasses.field(default_factory=dict)
    history_events: str = ""

    def __post_init__(self):
        for v, n in self.table_sizes.items():
            if v not in self.vocab_sizes or not NUM_RESERVED <= n <= self.vocab_sizes[v]:
                raise DataError(
                    f"schema: table_sizes[{v!r}] = {n} must be within [{NUM_RESERVED}, "
                    f"vocab_sizes[{v!r}] = {self.vocab_sizes.get(v)}]"
                )
        for group in ("user_fields", "item_fields", "hist_fields"):
            for f in getattr(self, group):
                if f.vocab not in self.vocab_sizes:
                    raise DataError(
                        f"schema: field {group}.{f.name} uses vocabulary {f.vocab!r}, "
                        f"which is not in vocab_sizes {sorted(self.vocab_sizes)}"
                    )
        names = [f.name for f in self.hist_fields]
        for role in (HIST_ITEM, HIST_BEHAVIOUR):
            if role not in names:
                raise DataError(f"schema: hist_fields must include {role!r}; got {names}")
        want = len(self.behaviour_types) + NUM_RESERVED
        if self.vocab_sizes.get("behaviour") != want:
            raise DataError(
                f"schema: vocab_sizes['behaviour'] must be len(behaviour_types) + {NUM_RESERVED}"
                f" = {want}, got {self.vocab_sizes.get('behaviour')}"
            )
        if self.max_len <= 0:
            raise DataError(f"schema: max_len must be positive, got {self.max_len}")

    def positive_rate(self, split: str = "train") -> float | None:
        """Mean label of `split`, or None for data prepared before splits recorded label_sum."""
        info = self.splits.get(split, {})
        if "label_sum" not in info or not info.get("rows"):
            return None
        return float(info["label_sum"]) / int(info["rows"])

    @property
    def heads(self) -> tuple[str, ...]:
        """Names of the label heads (columns of the `labels` example column); () when the
        dataset has only the single `label`."""
        return tuple(self.label.get("heads", ()) or ())

    def table_rows(self, vocab: str) -> int:
        """Embedding rows of `vocab`: ids at or above it embed as OOV (see table_sizes)."""
        return self.table_sizes.get(vocab, self.vocab_sizes[vocab])

    def hist_index(self, name: str) -> int:
        """Column of history field `name` in the `hist` array."""
        return [f.name for f in self.hist_fields].index(name)

    def item_index(self, name: str) -> int:
        return [f.name for f in self.item_fields].index(name)

    @property
    def num_behaviour_types(self) -> int:
        return len(self.behaviour_types)

    def behaviour_names(self) -> np.ndarray:
        """Behaviour type name by behaviour id (object array; "" at the reserved ids)."""
        return np.asarray([""] * NUM_RESERVED + list(self.behaviour_types), object)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for g in ("user_fields", "item_fields", "hist_fields"):
            for f in d[g]:
                if not f["bag"]:
                    del f["bag"]  # as before bags existed
        if not self.table_sizes:
            del d["table_sizes"]
        if not self.history_events:
            del d["history_events"]  # as before histories by reference
        d["version"] = SCHEMA_VERSION
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], source: str = "schema") -> Schema:
        try:
            kw = {k: d[k] for k in ("name", "vocab_sizes", "max_len", "behaviour_types")}
            groups = {
                g: tuple(Field(**f) for f in d[g])
                for g in ("user_fields", "item_fields", "hist_fields")
            }
        except (KeyError, TypeError) as e:
            raise DataError(f"{source}: missing or malformed key {e}") from None
        for split, info in d.get("splits", {}).items():
            ok = isinstance(info, dict) and isinstance(info.get("shards"), list)
            if not (ok and isinstance(info.get("rows"), int) and info["rows"] >= 0):
                raise DataError(
                    f"{source}: splits.{split}: needs 'rows' (a count) and 'shards' (a list of "
                    f"folders), got {str(info)[:120]}"
                )
        return cls(
            name=kw["name"],
            vocab_sizes={k: int(v) for k, v in kw["vocab_sizes"].items()},
            max_len=int(kw["max_len"]),
            behaviour_types=tuple(kw["behaviour_types"]),
            label=d.get("label", {}),
            splits=d.get("splits", {}),
            extra=d.get("extra", {}),
            table_sizes={k: int(v) for k, v in d.get("table_sizes", {}).items()},
            history_events=str(d.get("history_events", "")),
            **groups,
        )

    def save(self, directory: str) -> str:
        """Writes schema.json atomically into `directory`; returns its path."""
        path = os.path.join(directory, SCHEMA_FILE)
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.to_json(), f, indent=2, sort_keys=True)
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str) -> Schema:
        path = os.path.join(directory, SCHEMA_FILE)
        if not os.path.exists(path):
            raise DataError(
                f"{path}: no schema.json; is {directory!r} a prepared dataset? "
                "Make one with tools/prepare_data.py."
            )
        with open(path) as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e})") from None
        return cls.from_json(d, source=path)


def is_prepared(path: str) -> bool:
    """Whether `path` holds a readable prepared dataset (its schema.json)."""
    try:
        Schema.load(path)
    except DataError:
        return False
    return True


def dummy_batch(schema: Schema, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Zeros shaped like a model batch, for initialisation and shape inference."""
    return {
        "user": np.zeros((batch_size, len(schema.user_fields)), np.int32),
        "item": np.zeros((batch_size, len(schema.item_fields)), np.int32),
        "hist": np.zeros((batch_size, schema.max_len, len(schema.hist_fields)), np.int32),
        "label": np.zeros((batch_size,), np.float32),
        "weight": np.ones((batch_size,), np.float32),
    }
