"""The non-learned retriever: its tables are built once from the histories as of a cut, then
candidates are made per chunk of users (every source's list, merged into N per user) and,
for measurement, recall@N of each source and of the merged set against the split's positives.
"""

from __future__ import annotations

import dataclasses
import json
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from influence_jax import files
from influence_jax.data.schema import DataError
from influence_jax.data.vocab import positions
from influence_jax.retrieval import covisit, sources
from influence_jax.retrieval.histories import Histories, behaviour_weights
from influence_jax.retrieval.merge import (
    DEFAULT_QUOTAS,
    LEARNED_QUOTAS,
    SOURCES,
    check_quotas,
    merge,
)
from influence_jax.retrieval.table import Table

RETRIEVE = 200  # candidates per user by default (tools/retrieve.py, rank.py's retrieval)


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """All settings of the non-learned sources and their merge."""

    covisit: covisit.CovisitConfig = covisit.CovisitConfig()
    behaviour_weights: Mapping[str, float] | None = None  # by name; None: histories.DEFAULT_WEIGHTS
    per_category: int = 500  # items kept per category for the category source
    # None: DEFAULT_QUOTAS, or LEARNED_QUOTAS with a learned source.
    quotas: Mapping[str, float] | None = None
    users_per_chunk: int = 8192  # users whose candidates are made at once


@dataclasses.dataclass(frozen=True)
class TwoTowerConfig:
    """Settings of the learned two-tower source (two_tower.py; tools/train_retriever.py's
    flags default to them). Here, not in two_tower.py, so reading them loads no JAX."""

    dim: int = 64  # embedding and output size
    hidden: int = 128  # MLP width of each tower
    temperature: float = 0.2  # chosen on the validation cut (docs/ranking.md)
    log_q: bool = True  # subtract log Q(item) from the in-batch logits
    steps: int = 2000
    batch_size: int = 512
    learning_rate: float = 2e-3
    seed: int = 0
    # Training pairs. "histories": every event in the users' histories as of `as_of` (valid,
    # test or end: only events strictly before it), each with the events before it;
    # "examples": the train split's real interactions (its targets; no sampled negatives).
    pairs: str = "histories"
    as_of: str = "test"


class Retriever:
    """Tables of the sources, built from every user's history as of the cut.

    Args:
      h: the histories (`histories.load_histories`).
      cfg: the settings.
      progress: called with users done while the co-visitation table is counted.
      learned: the learned source (`two_tower.TwoTowerSource`, anything with
        `lists(part, m) -> [U, m]`), or None.
      tables: a folder for the tables: loaded from it when it holds tables (`save_tables`;
        those of other histories or settings raise: cut time, item ids, users, events,
        settings), else built and saved there; None builds and saves nothing. `loaded` says
        which happened.
    """

    def __init__(
        self,
        h: Histories,
        cfg: RetrievalConfig = RetrievalConfig(),
        progress: Callable[[int], None] | None = None,
        learned=None,
        tables: str | None = None,
    ):
        self.h, self.cfg, self.learned = h, cfg, learned
        default = LEARNED_QUOTAS if learned is not None else DEFAULT_QUOTAS
        self.quotas = check_quotas(default if cfg.quotas is None else cfg.quotas)
        self.beh_w = behaviour_weights(h.behaviour_types, cfg.behaviour_weights)
        self.loaded = bool(tables) and os.path.exists(os.path.join(tables, "tables.json"))
        if self.loaded:
            self._load_tables(tables)
            return
        if tables:  # before building: a folder of the user's is not replaced by the tables
            files.check_output(tables, "tables", folder=True, replaces=("tables.json",))
        self.covisit = covisit.covisitation(h, self.beh_w, cfg.covisit, progress)
        self.pop = sources.popularity(h, self.beh_w, cfg.covisit.half_life_s)
        self.category = sources.category_table(h, self.pop, cfg.per_category)
        if tables:
            self.save_tables(tables)

    def _identity(self) -> dict:
        """What saved tables must match: the histories they came from and the settings."""
        return {
            "cut_time": int(self.h.time),
            "n_items": int(self.h.n_items),
            "users": int(len(self.h)),
            "events": int(self.h.valid.sum()),
            "covisit": dataclasses.asdict(self.cfg.covisit),
            "behaviour_weights": self.beh_w.tolist(),
            "per_category": self.cfg.per_category,
        }

    def save_tables(self, folder: str) -> None:
        """The sources' tables (co-visitation, popularity, category) and what they were built
        from, into `folder` (replaced atomically): reused by `Retriever(..., tables=folder)`."""
        arrays = {"covisit_" + k: getattr(self.covisit, k) for k in ("indptr", "item", "score")}
        arrays["pop"] = self.pop
        if self.category is not None:
            arrays.update({"category_" + k: getattr(self.category, k)
                           for k in ("indptr", "item", "score")})  # fmt: skip
        with files.atomic_folder(folder) as tmp:
            np.savez(os.path.join(tmp, "tables.npz"), **arrays)
            files.write_json(os.path.join(tmp, "tables.json"), self._identity())

    def _load_tables(self, folder: str) -> None:
        meta = files.read_json(os.path.join(folder, "tables.json"))
        if meta is None:
            raise DataError(
                f"{folder}: no tables.json; save tables with tools/retrieve.py --tables"
            )
        want = json.loads(json.dumps(self._identity()))  # as JSON holds it
        diff = sorted(k for k in want if meta.get(k) != want[k])
        if diff:
            raise DataError(
                f"{folder}: the saved retrieval tables were built from other histories or "
                f"settings (differing: {', '.join(diff)}); rebuild them"
            )
        path = os.path.join(folder, "tables.npz")
        try:
            with np.load(path) as z:
                self.covisit = Table(*(z["covisit_" + k] for k in ("indptr", "item", "score")))
                self.pop = z["pop"]
                self.category = (
                    Table(*(z["category_" + k] for k in ("indptr", "item", "score")))
                    if "category_indptr" in z
                    else None
                )
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
            raise DataError(
                f"{path}: unreadable ({type(e).__name__}: {str(e)[:200]}); remove {folder} to "
                "build the tables again"
            ) from None

    def lists(self, part: Histories, m: int) -> dict[str, np.ndarray]:
        """Each source's best `m` items for the users of `part` ([U, m]; popular is [m])."""
        half_life = self.cfg.covisit.half_life_s
        out = {
            "recent": sources.recent_items(part, m),
            "covisit": covisit.covisit_candidates(self.covisit, part, self.beh_w, m, half_life),
            "popular": sources.popular_items(self.pop, m),
        }
        if self.category is not None:
            out["category"] = sources.category_popular(
                self.category, part, self.beh_w, half_life, m
            )
        if self.learned is not None:
            out["learned"] = self.learned.lists(part, m)
        return out

    @property
    def sources(self) -> list[str]:
        """The sources this retriever has, in SOURCES order."""
        absent = {"category": self.category is None, "learned": self.learned is None}
        return [s for s in SOURCES if not absent.get(s, False)]

    def chunks(self, h: Histories | None = None) -> Iterator[Histories]:
        """`h` (default: every user the tables were built from) in chunks of users."""
        h = self.h if h is None else h
        step = self.cfg.users_per_chunk
        for a in range(0, len(h), step):
            yield h.rows(a, a + step)

    def candidates(
        self, n: int, seen: np.ndarray | None = None, users: Histories | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """(user_key [C], items [C, n], source [C, n]) per chunk of users (merge.merge); of
        `users` (a selection of the histories, e.g. one process's share) if given."""
        for part in self.chunks(users):
            items, src = merge(
                self.lists(part, n), n, self.quotas, part.user_key, seen, self.h.n_items
            )
            yield part.user_key, items, src


def hits(user_key: np.ndarray, items: np.ndarray, pos_key: np.ndarray, n_items: int) -> np.ndarray:
    """[len(pos_key)] whether each positive (sorted user_key * n_items + item) is among the
    users' candidates `items` ([U, K]; a [K] list is every user's)."""
    if items.ndim == 1:
        items = np.broadcast_to(items, (len(user_key), len(items)))
    key = (np.asarray(user_key, np.int64)[:, None] * n_items + items)[items != 0]
    return np.isin(pos_key, key)


def recall(
    r: Retriever,
    pos_user: np.ndarray,
    pos_item: np.ndarray,
    ns: tuple[int, ...] = (50, 100, 200, 500),
    seen: np.ndarray | None = None,
    exclude_seen: bool = False,
) -> dict:
    """recall@N of every source and of the merged candidates, for each N in `ns`.

    recall@N = the share of the split's distinct positive (user, item) pairs whose item is
    among the user's first N candidates, over the positives of users with a history before
    the cut (the others, cold users, are counted in `positives_without_history`). With `seen`
    (`histories.seen_keys`) it is also given over the positives of items the user had not
    interacted with before the cut (`recall_unseen`), and with `exclude_seen` seen items are
    left out of the merged set (each source's own list is measured as it is)."""
    h = r.h
    pos_key = np.asarray(pos_user, np.int64) * h.n_items + pos_item
    known = np.isin(pos_user, h.user_key)
    pos_key = np.sort(pos_key[known])
    m = max(ns)
    names = r.sources
    found = {(s, n): np.zeros(len(pos_key), bool) for s in (*names, "merged") for n in ns}
    for part in r.chunks():
        mine = np.isin(pos_key // h.n_items, part.user_key)
        lists = r.lists(part, m)
        for n in ns:
            top = {s: lst[..., :n] for s, lst in lists.items()}  # as `candidates` makes them
            for s, lst in top.items():
                found[s, n][mine] |= hits(part.user_key, lst, pos_key[mine], h.n_items)
            excl = seen if exclude_seen else None
            items, _ = merge(top, n, r.quotas, part.user_key, excl, h.n_items)
            found["merged", n][mine] |= hits(part.user_key, items, pos_key[mine], h.n_items)

    def table(rows: np.ndarray) -> dict[str, dict[str, float]]:
        total = max(int(rows.sum()), 1)
        return {
            s: {str(n): round(float(found[s, n][rows].sum()) / total, 4) for n in ns}
            for s in (*names, "merged")
        }

    out = {
        "recall": table(np.ones(len(pos_key), bool)),
        "positives": int(len(pos_key)),
        "positives_without_history": int((~known).sum()),
        "users": int(len(h)),
        "users_with_positives": int(len(np.unique(pos_key // h.n_items))),
    }
    if seen is not None:
        unseen = ~np.isin(pos_key, seen)
        out["recall_unseen"] = table(unseen)
        out["positives_unseen"] = int(unseen.sum())
    return out


def top_k_metrics(
    user_key: np.ndarray,
    items: np.ndarray,
    pos_user: np.ndarray,
    pos_item: np.ndarray,
    k: int,
    per_user: bool = False,
) -> dict:
    """HR@k, NDCG@k and MRR@k of ranked lists against the positives, over the users of
    `user_key` [U] that have at least one positive (the others are not counted).

    items: [U, K'] item ids best first (0 = empty), or [K'] (the same list for every user);
    only the first k count. HR: a positive in the top k; NDCG: sum of 1/log2(1 + rank) over the
    positives there, over the ideal (min(#positives, k) at the top); MRR: 1 / rank of the first
    positive in the top k (0 without one). With `per_user`, also "per_user": {"user_key",
    "hr", "ndcg", "mrr"}, arrays over the counted users (sorted by user_key), for paired
    comparisons and intervals.
    """
    user_key = np.asarray(user_key, np.int64)
    if items.ndim == 1:
        items = np.broadcast_to(items, (len(user_key), len(items)))
    items = np.asarray(items)[:, :k]
    n_items = int(max(items.max(initial=0), np.max(pos_item, initial=0))) + 1
    pos = np.unique(np.asarray(pos_user, np.int64) * n_items + pos_item)
    owners, per_owner = np.unique(pos // n_items, return_counts=True)
    at, has = positions(owners, user_key)
    n_pos = np.where(has, per_owner[at] if len(owners) else 0, 0)
    hit = np.isin(user_key[:, None] * n_items + items, pos) & (items != 0)
    ranks = np.arange(1, items.shape[1] + 1)
    dcg = (hit / np.log2(ranks + 1)).sum(1)
    ideal = np.array([(1 / np.log2(np.arange(2, min(p, k) + 2))).sum() for p in n_pos])
    first = np.where(hit.any(1), hit.argmax(1) + 1, 0)
    rr = np.where(first > 0, 1.0 / np.maximum(first, 1), 0.0)
    got = {
        "hr": hit.any(1)[has].astype(np.float64),
        "ndcg": dcg[has] / np.maximum(ideal[has], 1e-12),
        "mrr": rr[has],
    }
    u = max(int(has.sum()), 1)
    out: dict = {f"{m}@{k}": float(v.sum() / u) for m, v in got.items()}
    out["users"] = int(has.sum())
    if per_user:
        order = np.argsort(user_key[has], kind="stable")
        out["per_user"] = {
            "user_key": user_key[has][order],
            **{m: v[order] for m, v in got.items()},
        }
    return out
