"""Ranking output: each user's top k with deterministic ties; the progress line (pairs done,
rate, ETA) printed while candidates are scored is logs.Progress. Tables are written by
files.write_table.
"""

from __future__ import annotations

import numpy as np

from influence_jax import sorting


def top_k_rows(
    user: np.ndarray, item: np.ndarray, score: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """(rows, rank) of each user's k best: score descending, then item id ascending."""
    order = _best_first(user, item, score)
    g = user[order]
    first = np.r_[True, g[1:] != g[:-1]] if len(g) else np.zeros(0, bool)
    rank = np.arange(len(g)) - np.maximum.accumulate(np.where(first, np.arange(len(g)), 0)) + 1
    keep = rank <= k
    return order[keep], rank[keep]


def _best_first(user: np.ndarray, item: np.ndarray, score: np.ndarray) -> np.ndarray:
    """The rows in order of user, score descending, item."""
    if _packable(user, score):
        # One integer sort instead of a three-key one (an eighth of its time on 1M pairs): a
        # float32's bits, with the sign bit set for a number >= 0 and every bit flipped for a
        # negative one, order as its value, so (user, score descending) packs into one uint64;
        # only the rows that tie on both are then sorted by item.
        bits = (score + np.float32(0)).view(np.uint32)  # -0.0 + 0 is +0.0
        sign = np.uint32(0x80000000)
        bits = np.where(bits & sign, ~bits, bits | sign)
        key = (user.astype(np.uint64) << np.uint64(32)) | (0xFFFFFFFF - bits).astype(np.uint64)
        return sorting.key_order(key, item)
    _, u = np.unique(user, return_inverse=True)
    _, i = np.unique(item, return_inverse=True)
    return np.lexsort((i, -score.astype(np.float64), u))


def _packable(user: np.ndarray, score: np.ndarray) -> bool:
    """Whether user ids are integers in [0, 2^32) and scores float32 (no NaN)."""
    if not len(user) or user.dtype.kind not in "iu" or score.dtype != np.float32:
        return False
    return bool(user.min() >= 0 and user.max() < 1 << 32 and not np.isnan(score.min()))
