"""Item-to-item co-visitation: items that appear close together in users' histories.

For each user and each ordered pair of events (a, b) at most `window_events` positions apart in
the history and at most `window_seconds` apart in time, with different known items, the pair
(item a -> item b) gains the weight of event b: its behaviour's weight times a recency decay
(halved every `half_life_s` before the cut). Both orders count, so a pair of events adds
w(b) to a -> b and w(a) to b -> a; the same pair seen again (in any user) adds again. Each
item keeps its `neighbours` best neighbours. A user's candidates are the items of highest
sum over the user's history events e of w(e) x score(item(e) -> candidate).

Memory: one chunk of `users_per_chunk` users makes at most users_per_chunk * L * 2 *
window_events pairs (24 bytes each while they are summed); the summed pairs of all chunks are
held until the table is built, at most min(U * L * 2 * window_events, n_items^2) distinct
pairs, and the table keeps at most n_items * neighbours entries (12 bytes each).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from influence_jax.retrieval.histories import Histories, event_weights
from influence_jax.retrieval.table import Table, expand, sum_pairs


@dataclasses.dataclass(frozen=True)
class CovisitConfig:
    """How co-visitation pairs are counted and kept."""

    window_events: int = 5  # pair events at most this many history positions apart
    window_seconds: float = 24 * 3600.0  # ... and at most this many seconds apart (0: no limit)
    half_life_s: float = 7 * 24 * 3600.0  # event weight halves per this age at the cut (0: none)
    neighbours: int = 50  # neighbours kept per item
    users_per_chunk: int = 8192  # users whose pairs are made at once (bounds memory)


def chunk_pairs(
    h: Histories, w: np.ndarray, window_events: int, window_seconds: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(anchor item, neighbour item, weight) of every ordered co-visitation pair of `h`'s users.

    Args:
      h: histories (a chunk of users).
      w: [U, L] event weights (`event_weights`), 0 in slots to ignore.
      window_events, window_seconds: the window (see the module docstring).
    """
    anchors, nbrs, weights = [], [], []
    L = h.item.shape[1]
    for d in range(1, min(window_events, L - 1) + 1):
        a, b = h.item[:, : L - d], h.item[:, d:]
        ok = (w[:, : L - d] > 0) & (w[:, d:] > 0) & (a != b)
        if window_seconds > 0:
            ok &= np.abs(h.ts[:, : L - d] - h.ts[:, d:]) <= window_seconds
        ia, ib = a[ok], b[ok]
        anchors += [ia, ib]
        nbrs += [ib, ia]
        weights += [w[:, d:][ok], w[:, : L - d][ok]]
    if not anchors:
        empty = np.zeros(0, np.int32)
        return empty, empty, np.zeros(0, np.float64)
    return np.concatenate(anchors), np.concatenate(nbrs), np.concatenate(weights)


def covisitation(
    h: Histories,
    beh_w: np.ndarray,
    cfg: CovisitConfig = CovisitConfig(),
    progress: Callable[[int], None] | None = None,
) -> Table:
    """The co-visitation table (item -> its `cfg.neighbours` best neighbours) of `h`.

    Args:
      h: every user's history as of the cut.
      beh_w: [behaviour types] weight per behaviour code (`behaviour_weights`).
      cfg: window, recency and size.
      progress: called with the number of users done after each chunk.
    """
    keys, items, scores = [], [], []
    for a in range(0, len(h), cfg.users_per_chunk):
        part = h.rows(a, a + cfg.users_per_chunk)
        w = event_weights(part, beh_w, cfg.half_life_s)
        k, i, s = sum_pairs(*chunk_pairs(part, w, cfg.window_events, cfg.window_seconds), h.n_items)
        keys.append(k)
        items.append(i)
        scores.append(s)
        if progress is not None:
            progress(min(a + cfg.users_per_chunk, len(h)))
    if not keys:
        return Table(np.zeros(h.n_items + 1, np.int64), np.zeros(0, np.int32), np.zeros(0))
    return Table.from_pairs(
        np.concatenate(keys),
        np.concatenate(items),
        np.concatenate(scores),
        h.n_items,
        h.n_items,
        cfg.neighbours,
    )


def covisit_candidates(
    table: Table,
    h: Histories,
    beh_w: np.ndarray,
    m: int,
    half_life_s: float = CovisitConfig.half_life_s,
    users_per_chunk: int = 8192,
) -> np.ndarray:
    """[U, m] int32 items of highest sum of neighbour scores over each user's history events
    (weighted like the pairs), PAD-padded; the user's own items may be among them."""
    out = np.zeros((len(h), m), np.int32)
    for a in range(0, len(h), users_per_chunk):
        part = h.rows(a, a + users_per_chunk)
        w = event_weights(part, beh_w, half_life_s)
        out[a : a + len(part)] = expand(table, part.item, w, h.n_items, m)[0]
    return out
