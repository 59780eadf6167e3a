"""Merging candidate sources into N candidates per user, with quotas and de-duplication.

Sources are taken in a fixed priority order (`SOURCES`: recent, covisit, learned (the two-tower
retriever, when one is given), category, popular).
Pass 1 gives each source up to its quota, round(quota x N) slots, of its best items not taken
yet; pass 2 fills the slots left, in the same order, with each source's next items. An item is
never taken twice for a user (the first source to offer it keeps it), and with `seen` the items
the user interacted with before the cut are never taken (as rank.py --exclude_seen). A user
gets fewer than N only when all sources together offer fewer distinct items.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from influence_jax.data.schema import NUM_RESERVED, DataError
from influence_jax.data.vocab import positions
from influence_jax.retrieval.table import PAD

SOURCES = ("recent", "covisit", "learned", "category", "popular")
DEFAULT_QUOTAS: dict[str, float] = {
    "recent": 0.2,
    "covisit": 0.5,
    "category": 0.15,
    "popular": 0.15,
}
# With a two-tower retriever (the `learned` source), unless quotas are given.
LEARNED_QUOTAS: dict[str, float] = {
    "recent": 0.2,
    "covisit": 0.3,
    "learned": 0.3,
    "category": 0.1,
    "popular": 0.1,
}


def check_quotas(quotas: Mapping[str, float]) -> dict[str, float]:
    """`quotas` with every source (missing ones 0); an unknown name or a negative share raises."""
    unknown = sorted(set(quotas) - set(SOURCES))
    if unknown:
        raise DataError(f"--quotas names {unknown}; the sources are {list(SOURCES)}")
    bad = {k: v for k, v in quotas.items() if not v >= 0}
    if bad:
        raise DataError(f"--quotas must be shares >= 0, got {bad}")
    return {s: float(quotas.get(s, 0.0)) for s in SOURCES}


def merge(
    lists: Mapping[str, np.ndarray],
    n: int,
    quotas: Mapping[str, float] = DEFAULT_QUOTAS,
    user_key: np.ndarray | None = None,
    seen: np.ndarray | None = None,
    n_items: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """N candidates per user from the sources' ranked lists.

    Args:
      lists: source name -> [U, M] int32 item ids best first, PAD-padded, or [M] (the same list
        for every user, e.g. popular); sources of SOURCES missing here offer nothing.
      n: candidates per user.
      quotas: source -> share of n taken in pass 1 (see the module docstring).
      user_key, seen, n_items: with `seen` (sorted user_key * n_items + item of the pairs to
        leave out), those items are excluded.

    Returns:
      (items [U, n] int32 PAD-padded, in the order taken; source [U, n] int8: index into
      SOURCES, -1 in empty slots).
    """
    q = check_quotas(quotas)
    shapes = {v.shape[0] for v in lists.values() if v.ndim == 2}
    if len(shapes) > 1:
        raise ValueError(f"source lists have different numbers of users: {sorted(shapes)}")
    U = shapes.pop() if shapes else 0
    items = np.full((U, n), PAD, np.int32)
    source = np.full((U, n), -1, np.int8)
    fill = np.zeros(U, np.int64)
    rows = np.arange(U, dtype=np.int64)
    stride = max(n_items, 1 + max((int(v.max()) for v in lists.values() if v.size), default=0))
    key_base = (rows if user_key is None else np.asarray(user_key, np.int64)) * stride
    if seen is not None and (user_key is None or n_items <= 0):
        raise ValueError("seen pairs need user_key and n_items")
    # Keys (user_key * stride + item) not to take, kept sorted: the seen pairs, then each
    # source's taken ones (sorting the concatenation of two sorted runs is a linear merge).
    blocked = np.zeros(0, np.int64) if seen is None else np.sort(np.asarray(seen, np.int64))
    for first_pass in (True, False):
        for s, name in enumerate(SOURCES):
            if name not in lists:
                continue
            lst = np.asarray(lists[name], np.int32)
            if lst.ndim == 1:
                lst = np.broadcast_to(lst, (U, len(lst)))
            cap = n - fill
            if first_pass:
                cap = np.minimum(cap, int(round(q[name] * n)))
            key = key_base[:, None] + lst
            taken = positions(blocked, key.ravel())[1].reshape(key.shape)
            ok = (lst >= NUM_RESERVED) & ~taken
            rank = np.cumsum(ok, axis=1)
            take = ok & (rank <= cap[:, None])
            r, c = np.nonzero(take)
            pos = fill[r] + rank[r, c] - 1
            items[r, pos] = lst[r, c]
            source[r, pos] = s
            fill += take.sum(1)
            blocked = np.sort(np.concatenate([blocked, key[r, c]]), kind="stable")
    return items, source
