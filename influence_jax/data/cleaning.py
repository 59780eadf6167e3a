"""Cleaning rules between the scan (pass 1) and the plan: drop users whose event rate is far
beyond the rest (crawlers, bots) and users or items with too few events.

Rules, all on the whole log (after the time window) and off by default:
- `max_user_events_per_day`: a user's rate is their events divided by the days between their
  first and last event (at least one day); users above it are dropped with all their events.
- `min_user_events` / `min_item_events`: users / items with fewer events are dropped with their
  events. Unlike `min_count`, which keeps such ids and embeds them as out-of-vocabulary, these
  remove the rows. The item rule counts an item's events before the user rules remove any.

The schema's counts report what each rule removed (`cleaning_*`).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from influence_jax.data.schema import DataError

DAY = 86400


@dataclasses.dataclass(frozen=True)
class Rules:
    max_user_events_per_day: float | None = None
    min_user_events: int = 0
    min_item_events: int = 0

    @property
    def active(self) -> bool:
        return bool(self.max_user_events_per_day or self.min_user_events or self.min_item_events)

    def check(self) -> None:
        rate = self.max_user_events_per_day
        if rate is not None and not rate > 0:
            raise DataError(f"--max_user_events_per_day must be > 0, not {rate}")
        for name in ("min_user_events", "min_item_events"):
            if getattr(self, name) < 0:
                raise DataError(f"--{name} must be >= 0, not {getattr(self, name)}")


@dataclasses.dataclass
class Dropped:
    """Raw ids removed by the rules; `keep` tells which events of a chunk stay."""

    users: pa.Array | None = None
    items: pa.Array | None = None

    def keep(self, user: pa.Array, item: pa.Array) -> np.ndarray | None:
        """Bool mask of the events to keep, or None when every event stays."""
        mask = None
        for ids, gone in ((user, self.users), (item, self.items)):
            if gone is not None and len(gone):
                hit = np.asarray(pc.is_in(ids, value_set=gone.cast(ids.type)))
                mask = ~hit if mask is None else mask & ~hit
        return mask


def apply(
    users: pa.Table, items: pa.Table, rules: Rules
) -> tuple[pa.Table, pa.Table, Dropped, dict]:
    """Filters the scan's per-user and per-item tables (k, n[, lo, hi]) by `rules`.

    Returns the kept users and items, the dropped raw ids and counts of what each rule removed
    (users and their events; items and their events before the user rules)."""
    counts: dict[str, int] = {}
    n_user = np.asarray(users.column("n"), np.int64)
    drop_user = np.zeros(len(n_user), bool)
    if rules.max_user_events_per_day:
        span_days = np.maximum(
            (np.asarray(users.column("hi")) - np.asarray(users.column("lo"))) / DAY, 1.0
        )
        bots = n_user / span_days > rules.max_user_events_per_day
        counts["cleaning_users_over_rate"] = int(bots.sum())
        counts["cleaning_events_of_users_over_rate"] = int(n_user[bots].sum())
        drop_user |= bots
    if rules.min_user_events:
        few = (n_user < rules.min_user_events) & ~drop_user
        counts["cleaning_users_below_min"] = int(few.sum())
        counts["cleaning_events_of_users_below_min"] = int(n_user[few].sum())
        drop_user |= few
    n_item = np.asarray(items.column("n"), np.int64)
    drop_item = n_item < rules.min_item_events
    if rules.min_item_events:
        counts["cleaning_items_below_min"] = int(drop_item.sum())
        counts["cleaning_events_of_items_below_min"] = int(n_item[drop_item].sum())
    if drop_user.all() or drop_item.all():
        raise DataError(
            f"the cleaning rules ({dataclasses.asdict(rules)}) drop every "
            f"{'user' if drop_user.all() else 'item'}; loosen them"
        )
    dropped = Dropped(
        users.column("k").combine_chunks().filter(pa.array(drop_user)),
        items.column("k").combine_chunks().filter(pa.array(drop_item)),
    )
    return users.filter(pa.array(~drop_user)), items.filter(pa.array(~drop_item)), dropped, counts
