"""Histories at any ranking time, rebuilt from a raw event log with the dataset's saved
vocabularies and the function that builds training histories (`history.state_as_of`).

The log is read with the dataset's source reader and time window; users are those of the
prepared dataset (others are counted and skipped), item ids and categories map through the
saved vocabularies and `rank_state/item_features.npy` (an item below min_count keeps the OOV
item id and takes its smallest raw category in the log, as in preparation), and user features
come from the dataset's ranking state. On the log the dataset was prepared from, the histories
as of a split boundary equal `rank_state/<cut>/` exactly.
"""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa

from influence_jax.data import rank_state, readers
from influence_jax.data.dataset import Dataset
from influence_jax.data.history import Events, sort_events, state_as_of
from influence_jax.data.logio import LENIENT_ADVICE
from influence_jax.data.plan import RECORD
from influence_jax.data.schema import OOV_ID, DataError
from influence_jax.data.vocab import Vocab, positions
from influence_jax.ranking.contexts import Contexts


def _read(source: readers.EventSource, window: list | None) -> dict[str, list]:
    """The log's events in `window`; a malformed row is an error (rank has no lenient mode)."""
    try:
        return _read_strict(source, window)
    except DataError as e:
        message = str(e)
        if not message.endswith(LENIENT_ADVICE):
            raise
        raise DataError(
            message[: -len(LENIENT_ADVICE)]
            + " (rank reads --events strictly; it has no --lenient)."
        ) from None


def _read_strict(source: readers.EventSource, window: list | None) -> dict[str, list]:
    cols: dict[str, list] = {k: [] for k in ("user", "item", "ts", "beh", "value", "cat")}
    lo, hi = window if window else (None, None)
    for chunk in source.chunks(4 << 20, readers.Tally(False)):
        keep = np.ones(len(chunk), bool)
        if lo is not None:
            keep &= chunk.timestamp >= lo
        if hi is not None:
            keep &= chunk.timestamp <= hi
        chunk = chunk if keep.all() else chunk.take(keep)
        cols["user"].append(chunk.user)
        cols["item"].append(chunk.item)
        cols["ts"].append(chunk.timestamp)
        cols["beh"].append(chunk.behaviour)
        cols["value"].append(
            np.ones(len(chunk), np.float32) if chunk.value is None else chunk.value
        )
        cols["cat"].append(chunk.category)
    return cols


def _concat(parts: list) -> np.ndarray | pa.Array | None:
    if not parts or parts[0] is None:
        return None
    if isinstance(parts[0], pa.Array):
        return pa.concat_arrays(parts)
    return np.concatenate(parts)


def contexts_from_log(
    dataset: Dataset, source: readers.EventSource, as_of: int
) -> tuple[Contexts, dict[str, int]]:
    """Every dataset user with an event strictly before `as_of` (unix s) in the log, as of then
    (histories without the run's dropped behaviour types).

    Returns the contexts and counts (events read, events before as_of, users skipped)."""
    data_path, schema = dataset.path, dataset.schema
    if not dataset.has_rank_state:
        raise DataError(f"{data_path}: no rank_state/; rerun tools/prepare_data.py first")
    if tuple(source.behaviour_types) != tuple(schema.behaviour_types):
        raise DataError(
            f"{source.name}: behaviour types {list(source.behaviour_types)} differ from the "
            f"dataset's {list(schema.behaviour_types)}; use the source it was prepared from"
        )
    cols = {k: _concat(v) for k, v in _read(source, schema.extra.get("time_window")).items()}
    n_read = len(cols["ts"])
    if not n_read:
        raise DataError(f"{[f.path for f in source.files]}: no events in the dataset's time window")
    user_key, known = positions(Vocab.load(data_path, "user_key").keys, cols["user"])
    items, inverse = np.unique(np.asarray(cols["item"]), return_inverse=True)
    item_ids = Vocab.load(data_path, "item_id").lookup(items)
    table = rank_state.load_item_features(data_path)
    item_rows = table[item_ids].copy()
    names = [f.name for f in schema.item_fields]
    if "category" in names and cols["cat"] is not None:
        # An item below min_count takes its smallest raw category in the log, as in preparation.
        t = pa.table({"k": inverse, "c": cols["cat"]}).group_by("k").aggregate([("c", "min")])
        smallest = t.sort_by("k").column("c_min").combine_chunks()
        rare = item_ids == OOV_ID
        cat_ids = Vocab.load(data_path, "category").lookup(smallest)
        item_rows[rare, names.index("category")] = cat_ids[rare]
    before = known & (np.asarray(cols["ts"]) < as_of)
    ev = np.empty(int(before.sum()), RECORD)
    ev["user"], ev["item"] = user_key[before], inverse[before]
    ev["ts"], ev["beh"], ev["value"] = (
        cols["ts"][before],
        cols["beh"][before],
        cols["value"][before],
    )
    ev, _ = sort_events(ev, bool(schema.extra.get("options", {}).get("dedupe", False)))
    s = state_as_of(
        Events.of(ev), as_of, item_rows, schema.item_fields, schema.hist_fields, schema.max_len
    )
    users = rank_state.load_state(data_path, schema, "end")  # every user, with features
    row, _ = positions(np.asarray(users.user_key), s.user)
    n_ids = schema.vocab_sizes["item_id"]
    seen = np.unique(ev["user"].astype(np.int64) * n_ids + item_rows[ev["item"], 0])
    ctx = Contexts(
        s.user,
        np.asarray(users.user)[row],
        dataset.drop_events(s.hist),
        np.full(len(s.user), as_of, np.int64),
        np.ones(len(s.user), bool),
        seen,
        dataset.drop_event_times(s.hist, s.hist_ts),
    )
    counts = {
        "log_events": n_read,
        "log_events_before_as_of": int(before.sum()),
        "log_users_not_in_dataset": len(np.unique(np.asarray(cols["user"])[~known])),
    }
    return ctx, counts


def open_log(source: str | None, path: str, dataset: Dataset | None = None) -> readers.EventSource:
    """The raw log `path` read as `source` (default: the source `dataset` was prepared from);
    an `events` log with the column mapping, time format and zone saved at preparation.

    Side tables are left out: user and item features come from the dataset's ranking state."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such event log")
    extra = dataset.schema.extra if dataset is not None else {}
    source = source or extra.get("source")
    if not source:
        raise DataError("--events: the dataset does not record its source; pass --source")
    if source != "events":
        return readers.open_source(source, path)
    if dataset is None:
        raise DataError("--source=events: the column mapping comes from the prepared dataset")
    if extra.get("source") != "events":
        raise DataError(
            f"{dataset.path}: prepared from --source={extra.get('source')}, not events; pass "
            "the source it was prepared from"
        )
    options = extra.get("source_options")
    if not options:
        raise DataError(
            f"{dataset.path}: prepared without saved column mapping; re-run prepare_data.py "
            "to rank from an events log"
        )
    return readers.open_source("events", path, **{**options, "user_table": "", "item_table": ""})
