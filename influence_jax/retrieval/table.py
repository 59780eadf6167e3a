"""Sparse score tables (key -> its best items) and the vectorised top-M per group that builds
them and turns them into per-user candidate lists. Every source is one of these: co-visitation
(key = item), popular-in-category (key = category), popular overall (one key).
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from influence_jax import sorting
from influence_jax.data.schema import PAD_ID

PAD = PAD_ID  # item id of an empty candidate slot (the vocabularies' padding id)


def _ranked(
    group: np.ndarray, item: np.ndarray, score: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """(order, rank): rows sorted by group, score descending, item ascending, and each sorted
    row's 0-based rank within its group."""
    order = _order(group, item, score)
    g = group[order]
    ar = np.arange(len(g))
    start = np.maximum.accumulate(np.where(np.r_[True, g[1:] != g[:-1]], ar, 0))
    return order, ar - start


def _order(group: np.ndarray, item: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The rows in order of group, score descending, item.

    One stable integer sort where it fits: (group, the score's rank among the distinct scores,
    descending) packed into one int64. Rows that come in (group, item) order, as sum_pairs
    returns them, keep their ties in item order; otherwise only the rows that tie on both are
    sorted by item. On the default run's retrieval (3.9M and 1.8M rows) a third of the
    three-key sort's time in all (docs/ranking.md)."""
    values, rank = np.unique(score, return_inverse=True)
    n = len(values)
    if not n or np.isnan(values[-1]) or group.min() < 0 or (int(group.max()) + 1) * n >= 1 << 63:
        return np.lexsort((item, -score, group))
    key = group.astype(np.int64) * n + (n - 1 - rank.ravel())
    # Rows in (group, item) order already keep their ties in item order.
    return sorting.key_order(key, *(() if _in_group_item_order(group, item) else (item,)))


def _in_group_item_order(group: np.ndarray, item: np.ndarray) -> bool:
    """Whether the rows are sorted by group, then item (equal pairs allowed)."""
    g0, g1 = group[:-1], group[1:]
    return bool(np.all((g1 > g0) | ((g1 == g0) & (item[1:] >= item[:-1]))))


def top_per_group(
    group: np.ndarray, item: np.ndarray, score: np.ndarray, n_groups: int, m: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each group's `m` best items: score descending, then item id ascending.

    Args:
      group, item, score: [N] one row per (group, item); a pair must not repeat.
      n_groups: groups are 0..n_groups-1.
      m: items kept per group.

    Returns:
      (items [n_groups, m] int32, PAD where a group has fewer; scores [n_groups, m] float64, 0
      there).
    """
    items = np.full((n_groups, m), PAD, np.int32)
    scores = np.zeros((n_groups, m), np.float64)
    if not len(group) or m <= 0:
        return items, scores
    order, rank = _ranked(group, item, score)
    keep = rank < m
    at = order[keep]
    items[group[at], rank[keep]] = item[at]
    scores[group[at], rank[keep]] = score[at]
    return items, scores


def sum_pairs(
    key: np.ndarray, item: np.ndarray, score: np.ndarray, n_items: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(key, item, summed score) of each distinct (key, item) pair, sorted by key then item."""
    pair = key.astype(np.int64) * n_items + item
    uniq, inv = np.unique(pair, return_inverse=True)
    total = np.bincount(inv.ravel(), weights=score, minlength=len(uniq))
    k, i = np.divmod(uniq, n_items)
    return k, i.astype(np.int32), total


@dataclasses.dataclass
class Table:
    """key -> its best items with scores, in CSR form (rows sorted by score descending)."""

    indptr: np.ndarray  # [K + 1] int64
    item: np.ndarray  # [nnz] int32
    score: np.ndarray  # [nnz] float64

    @property
    def n_keys(self) -> int:
        return len(self.indptr) - 1

    def row(self, key: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = self.indptr[key], self.indptr[key + 1]
        return self.item[a:b], self.score[a:b]

    @functools.cached_property
    def items_distinct(self) -> bool:
        """Whether no item is in two keys' rows (e.g. category -> items, one category each)."""
        return len(np.unique(self.item)) == len(self.item)

    @classmethod
    def from_pairs(
        cls,
        key: np.ndarray,
        item: np.ndarray,
        score: np.ndarray,
        n_keys: int,
        n_items: int,
        top_m: int,
    ) -> Table:
        """Sums the scores of repeated (key, item) pairs and keeps each key's `top_m` best
        (ties: item id ascending); at most n_keys * top_m entries."""
        k, i, s = sum_pairs(key, item, score, n_items)
        order, rank = _ranked(k, i, s)
        at = order[rank < top_m]  # still grouped by key, best first
        counts = np.bincount(k[at], minlength=n_keys)
        return cls(np.r_[0, np.cumsum(counts)].astype(np.int64), i[at], s[at])


def expand(
    table: Table,
    keys: np.ndarray,
    weights: np.ndarray,
    n_items: int,
    m: int,
    items_distinct: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the `m` items of highest sum over its keys of weight x the table's score.

    Args:
      table: key -> items.
      keys: [R, L] int keys (e.g. a user's history items); slots with weight 0 are ignored.
      weights: [R, L] weight of each key slot.
      n_items, m: item id range, items kept per row.
      items_distinct: `table.items_distinct` holds: an item comes from one key only, so no
        (row, item) pair repeats and nothing needs summing.

    Returns:
      (items [R, m] int32, PAD-padded; scores [R, m]); memory is O(R * L * table row length).
    """
    r, ok = np.nonzero((weights > 0) & (keys >= 0) & (keys < table.n_keys))
    if not len(r):
        return top_per_group(r, r, r.astype(np.float64), len(keys), m)
    # A key repeated in a row (an item viewed twice, a category's many events) is looked up once.
    r, k, w = sum_pairs(r, keys[r, ok], weights[r, ok], table.n_keys)
    a = table.indptr[k]
    n = table.indptr[k + 1] - a
    row = np.repeat(r, n)
    # Positions a..a+n-1 of each slot's table row, without a Python loop.
    at = np.repeat(a - np.r_[0, np.cumsum(n)[:-1]], n) + np.arange(int(n.sum()))
    score = np.repeat(w, n) * table.score[at]
    item = table.item[at]
    if not items_distinct:
        row, item, score = sum_pairs(row, item, score, n_items)
    if m > 0 and table.score.min(initial=0.0) >= 0:
        # A key with m items or more gives its row m distinct candidates scoring at least
        # w x its m-th score (sums only add): nothing below that can be among the row's best m,
        # so only the rest is sorted (ties at the bound are kept).
        full = n >= m
        bound = np.zeros(len(keys))
        np.maximum.at(bound, r[full], w[full] * table.score[a[full] + m - 1])
        keep = score >= bound[row]
        row, item, score = row[keep], item[keep], score[keep]
    return top_per_group(row, item, score, len(keys), m)
