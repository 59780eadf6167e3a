"""Sorting many rows by several keys: one stable sort of a packed integer key, then only the
rows that tie on it sorted by the remaining keys.

A lexsort over three or four keys costs several full sorts; where the leading keys pack into
one integer (user and time, user and score bits, group and score rank), one stable argsort of
that integer does most of the work and the ties are usually few. Used by the event sort
(data/history.py), the ranker's top k (ranking/output.py) and the retrieval tables
(retrieval/table.py).
"""

import numpy as np


def key_order(key: np.ndarray, *minor: np.ndarray) -> np.ndarray:
    """The rows in order of `key`, then of each `minor` key in turn (the first most
    significant); rows equal on all keys keep their input order.

    Args:
      key: [N] the packed leading keys, any sortable dtype.
      *minor: [N] arrays (any lexsort-able dtype) that break ties of `key`.
    """
    order = np.argsort(key, kind="stable")
    if not minor or len(order) < 2:
        return order
    sorted_key = key[order]
    tie = sorted_key[1:] == sorted_key[:-1]
    if tie.any():
        rows = np.zeros(len(order), bool)  # whole runs of equal keys, in sorted order
        rows[1:] |= tie
        rows[:-1] |= tie
        at = np.flatnonzero(rows)
        sub = order[at]
        order[at] = sub[np.lexsort((*(m[sub] for m in reversed(minor)), sorted_key[at]))]
    return order
