"""Sampled negatives: items a user had not interacted with at or before the target's time.

Draws come from a counter-based hash of (seed, user, event ordinal, slot), so a negative depends
only on its key and not on how events were split into buckets.
"""

from __future__ import annotations

import numpy as np

from influence_jax.data import vocab
from influence_jax.data.plan import Plan, PrepareOptions


def mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: a counter-based hash, so a negative depends only on its key."""
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def uniform(seed: int, user: np.ndarray, ordinal: np.ndarray, slot: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = mix(np.uint64(seed) ^ mix(user.astype(np.uint64)))
        h = mix(h ^ mix(ordinal.astype(np.uint64)))
        h = mix(h ^ slot.astype(np.uint64))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def negatives(
    plan: Plan,
    opts: PrepareOptions,
    user: np.ndarray,
    ordinal: np.ndarray,
    pair_key: np.ndarray,
    t: np.ndarray,
    pairs: tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray]:
    """K negatives per target: dense items, resampled while the user had interacted with
    them at or before `t`. Returns (items [T, K], ok [T, K]); not ok = gave up."""
    keys, first_ts = pairs
    k = opts.neg_ratio
    items = np.zeros((len(t), k), np.int64)
    todo = np.ones((len(t), k), bool)
    for attempt in range(64):
        r, c = np.nonzero(todo)
        if not len(r):
            break
        u = uniform(opts.seed, user[r], ordinal[r], c * 64 + attempt)
        if opts.neg_strategy == "uniform":
            cand = plan.pool[np.minimum((u * len(plan.pool)).astype(np.int64), len(plan.pool) - 1)]
        else:
            at = np.searchsorted(plan.pool_cdf, u * plan.pool_cdf[-1], side="right")
            cand = plan.pool[np.minimum(at, len(plan.pool) - 1)]
        key = pair_key[r] + cand
        pos, found = vocab.positions(keys, key)
        seen = found & (first_ts[pos] <= t[r])
        items[r, c] = cand
        todo[r, c] = seen
    return items, ~todo
