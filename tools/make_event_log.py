"""Writes a synthetic multi-behaviour event log in the Taobao UserBehavior layout, streaming.

    python tools/make_event_log.py --events=20000000 --output=/tmp/events20m.csv

Rows are `user_id,item_id,category_id,behavior_type,timestamp` (no header), grouped by user and
time-ordered within a user like the official file. Items follow a Zipf-like popularity, each
item has one category, users revisit their recent items (so cart/fav/buy often follow a pv of
the same item), and the behaviour mix is Taobao's (pv 89.8%, cart 5.3%, fav 2.8%, buy 2.1%).
Memory stays at one block of users; a .gz output name writes gzip. Every flag is checked before
anything is written, and the log is written under a temporary name beside --output and renamed
into place at the end: a failure leaves an existing file there untouched.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files  # noqa: E402
from influence_jax.errors import DataError  # noqa: E402

# Item ids are hashed into categories with int64 arithmetic (`_block`): up to 2^31 - 1 items.
MAX_ITEMS = 2**31 - 1

_EVENTS = flags.DEFINE_integer("events", 20_000_000, "Rows to write.", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", None, "CSV file (.gz for gzip).", required=True)
_EVENTS_PER_USER = flags.DEFINE_integer(
    "events_per_user", 100, "Mean events per user.", lower_bound=1
)
_ITEMS = flags.DEFINE_integer(
    "items",
    None,
    "Distinct items (unset: max(10, events / 25)).",
    lower_bound=1,
    upper_bound=MAX_ITEMS,
)
_CATEGORIES = flags.DEFINE_integer(
    "categories", None, "Categories (unset: max(2, items / 400)).", lower_bound=1
)
_SEED = flags.DEFINE_integer("seed", 0, "Random seed.", lower_bound=0)
_BLOCK = flags.DEFINE_integer("block_events", 1 << 20, "Events generated per block.", lower_bound=1)

BEHAVIOURS = ("pv", "cart", "fav", "buy")
BEHAVIOUR_P = (0.898, 0.053, 0.028, 0.021)
START, DAYS = 1511539200, 9
REVISIT_P = 0.3  # chance that an event repeats one of the user's last 5 items


def _block(
    rng: np.random.Generator,
    first_user: int,
    n_events: int,
    n_items: int,
    n_cats: int,
    per_user: int,
) -> tuple[pa.Table, int]:
    """About `n_events` rows for consecutive users from `first_user`; returns (table, users)."""
    sizes = np.maximum(1, rng.geometric(1.0 / per_user, size=max(1, n_events // per_user + 1)))
    sizes = sizes[: np.searchsorted(np.cumsum(sizes), n_events) + 1]
    sizes[-1] -= max(0, int(sizes.sum()) - n_events)
    sizes = sizes[sizes > 0]
    n = int(sizes.sum())
    user = np.repeat(np.arange(first_user, first_user + len(sizes)), sizes)
    start = np.repeat(np.cumsum(sizes) - sizes, sizes)
    rank = (rng.zipf(1.15, size=n) - 1) % n_items
    item = 1 + (rank * 7919 + 13) % n_items  # scatter popular ranks over the id space
    back = rng.integers(1, 6, size=n)
    src = np.arange(n) - back
    revisit = (rng.random(n) < REVISIT_P) & (src >= start)
    item[revisit] = item[src[revisit]]
    ts = START + rng.integers(0, DAYS * 86400, size=n)
    ts = ts[np.lexsort((ts, user))]  # time-ordered within each user
    beh = rng.choice(len(BEHAVIOURS), size=n, p=BEHAVIOUR_P)
    cat = 1 + (item * 2654435761 % 4294967291) % n_cats
    table = pa.table(
        {
            "user_id": user,
            "item_id": item,
            "category_id": cat,
            "behavior_type": pa.DictionaryArray.from_arrays(
                beh.astype(np.int8), list(BEHAVIOURS)
            ).cast(pa.string()),
            "timestamp": ts,
        }
    )
    return table, len(sizes)


def _check_output(path: str) -> None:
    """Raises DataError unless `path` can take the log (before any work)."""
    if not path:
        raise DataError("--output is empty; give a file path")
    files.check_output(path, "output")


def _write(path: str, n_items: int, n_cats: int) -> tuple[int, int]:
    """Streams the log to `path`; returns (events, users) written."""
    rng = np.random.default_rng(_SEED.value)
    compression = "gzip" if _OUTPUT.value.endswith(".gz") else None  # the name, not the temp's
    written, user = 0, 1
    with pa.output_stream(path, compression=compression) as sink:
        writer = None
        while written < _EVENTS.value:
            n = min(_BLOCK.value, _EVENTS.value - written)
            table, users = _block(rng, user, n, n_items, n_cats, _EVENTS_PER_USER.value)
            if writer is None:
                writer = pcsv.CSVWriter(
                    sink,
                    table.schema,
                    write_options=pcsv.WriteOptions(include_header=False, quoting_style="none"),
                )
            writer.write_table(table)
            written += table.num_rows
            user += users
        if writer is not None:
            writer.close()
    return written, user - 1


def _main() -> None:
    _check_output(_OUTPUT.value)  # the numeric flags' ranges are checked as absl parses them
    n_items = _ITEMS.value if _ITEMS.value is not None else max(10, _EVENTS.value // 25)
    n_items = min(n_items, MAX_ITEMS)
    n_cats = _CATEGORIES.value if _CATEGORIES.value is not None else max(2, n_items // 400)
    counts = []
    files.write_atomic(_OUTPUT.value, lambda tmp: counts.append(_write(tmp, n_items, n_cats)))
    written, users = counts[0]
    print(f"wrote {written} events, {users} users, {n_items} items to {_OUTPUT.value}")


if __name__ == "__main__":
    app.run(cli.tool_main(_main, "make_event_log"), flags_parser=cli.parse_flags)
