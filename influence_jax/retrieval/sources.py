"""Non-learned candidate sources besides co-visitation: the user's own recent items
(re-engagement), the items popular overall, and the items popular in the user's recent
categories. Each returns item ids of the dataset's vocabulary, best first, PAD-padded.

Popularity counts the events of the histories as of the cut (each user's `max_len` most
recent events, see histories.py), each weighted like a co-visitation event: its behaviour's
weight, halved every `half_life_s` before the cut.
"""

from __future__ import annotations

import numpy as np

from influence_jax.data.schema import NUM_RESERVED
from influence_jax.retrieval.histories import Histories, event_weights
from influence_jax.retrieval.table import PAD, Table, expand, top_per_group


def recent_items(h: Histories, m: int) -> np.ndarray:
    """[U, m] int32: each user's distinct known items, most recent first (an item's place is
    that of its latest event), PAD-padded."""
    U, L = h.item.shape
    row, slot = np.nonzero(h.valid)
    key = row.astype(np.int64) * h.n_items + h.item[row, slot]
    _, first = np.unique(key, return_index=True)  # slots run most recent first within a row
    first.sort()
    row, slot = row[first], slot[first]
    # Rank = slot order within the row: a score that decreases along the history.
    items, _ = top_per_group(row, h.item[row, slot], (L - slot).astype(np.float64), U, m)
    return items


def popularity(h: Histories, beh_w: np.ndarray, half_life_s: float) -> np.ndarray:
    """[n_items] float64 weighted event count of each item id (0 for PAD and OOV)."""
    w = event_weights(h, beh_w, half_life_s)
    ok = w > 0
    return np.bincount(h.item[ok], weights=w[ok], minlength=h.n_items)


def popular_items(pop: np.ndarray, m: int) -> np.ndarray:
    """[m] int32: the `m` items of highest popularity (ties: id ascending), PAD-padded."""
    ids = np.flatnonzero(pop > 0)
    best = ids[np.lexsort((ids, -pop[ids]))[:m]].astype(np.int32)
    return np.r_[best, np.full(m - len(best), PAD, np.int32)]


def category_table(h: Histories, pop: np.ndarray, per_category: int) -> Table | None:
    """category -> its `per_category` most popular items (None without a category field).

    An item's category is the one its history events carry (item_features at preparation)."""
    if h.category is None:
        return None
    ok = h.valid & (h.category >= NUM_RESERVED)  # not an OOV or padding category
    item = h.item[ok]
    cat = h.category[ok].astype(np.int64)
    pair = np.unique(cat * h.n_items + item)
    c, i = np.divmod(pair, h.n_items)
    n_cat = int(c.max()) + 1 if len(c) else 0
    return Table.from_pairs(c, i.astype(np.int32), pop[i], n_cat, h.n_items, per_category)


def category_popular(
    table: Table | None,
    h: Histories,
    beh_w: np.ndarray,
    half_life_s: float,
    m: int,
    users_per_chunk: int = 8192,
) -> np.ndarray:
    """[U, m] int32: items popular in the user's recent categories. A candidate's score is the
    sum over the user's history events e of w(e) x popularity(candidate) where the candidate is
    among the most popular of e's category, so the user's heaviest categories come first.
    All PAD without a category field."""
    out = np.zeros((len(h), m), np.int32)
    if table is None:
        return out
    distinct = table.items_distinct  # an item has one category (item_features): fast path
    for a in range(0, len(h), users_per_chunk):
        part = h.rows(a, a + users_per_chunk)
        w = event_weights(part, beh_w, half_life_s)
        out[a : a + len(part)] = expand(table, part.category, w, h.n_items, m, distinct)[0]
    return out
