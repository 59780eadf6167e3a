"""Baselines a model must beat, scored on the same rows of a prepared dataset.

Every baseline reads only what a model reads (the examples' target item, user and history) and
learns, if at all, on the train split:

- `item_rate`, `user_rate`: the target item's / the user's positive rate in train, smoothed
  towards the overall rate (`PRIOR` pseudo-examples);
- `popularity`: the target item's number of positives in train;
- `seen_<type>`: 1 if the target item is in the history as an event of that behaviour type
  ("carted / favourited / bought before"), ties broken by popularity;
- `in_history`: 1 if the target item is anywhere in the history, ties broken by popularity
  (the "has the user touched it" rule);
- `logistic_regression`: a logistic regression (Newton steps, L2) on counting features: the
  target item's and its category's events in the history per behaviour type, the recency of
  the item's last event, the history length, the item's and the user's (leave-one-out) train
  rates and the item's train popularity.

Scores are compared with AUC, GAUC, average precision (PR-AUC) and, for the baselines that are
probabilities (the rates and the regression), logloss. The history holds the `max_len` most
recent events, so "seen before" means "seen within the history the model sees".
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from influence_jax import metrics
from influence_jax.data.dataset import Dataset
from influence_jax.data.schema import HIST_BEHAVIOUR, HIST_ITEM, NUM_RESERVED, Schema

PRIOR = 10.0  # pseudo-examples at the overall rate in the smoothed rates
L2 = 1e-3  # ridge penalty of the logistic regression (features standardised)
MAX_FIT_ROWS = 200_000  # train rows the regression is fitted on (a seeded sample beyond that)
COLUMNS = ("user", "item", "hist", "label", "user_key", "timestamp")


def _counts(keys: np.ndarray, labels: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(examples, positives) per key in [0, size)."""
    n = np.bincount(keys, minlength=size).astype(np.float64)
    pos = np.bincount(keys, weights=labels, minlength=size)
    return n, pos


class Features:
    """Per-example counting features of one split, from the train split's statistics."""

    def __init__(self, schema: Schema, train: dict[str, np.ndarray]):
        self.schema = schema
        self.item_col = schema.item_index(HIST_ITEM)
        self.rate = float(train["label"].mean()) if len(train["label"]) else 0.0
        items = train["item"][:, self.item_col]
        self.n_items = int(schema.vocab_sizes[schema.item_fields[self.item_col].vocab])
        self.item_n, self.item_pos = _counts(items, train["label"], self.n_items)
        self.n_users = int(max(train["user_key"].max(initial=0), 0)) + 1
        self.user_n, self.user_pos = _counts(train["user_key"], train["label"], self.n_users)

    def _smoothed(self, pos: np.ndarray, n: np.ndarray) -> np.ndarray:
        return (pos + PRIOR * self.rate) / (n + PRIOR)

    def rates(self, ex: dict[str, np.ndarray], leave_out: bool) -> tuple[np.ndarray, np.ndarray]:
        """(item rate, user rate) per example; `leave_out` drops the example's own label (for
        train rows, whose labels are in the counts)."""
        own = ex["label"] if leave_out else np.zeros(len(ex["label"]))
        i = ex["item"][:, self.item_col]
        u = ex["user_key"]
        known_u = (u >= 0) & (u < self.n_users)
        u = np.where(known_u, u, 0)
        item = self._smoothed(self.item_pos[i] - own, self.item_n[i] - leave_out)
        user_n = np.where(known_u, self.user_n[u] - leave_out, 0.0)
        user_pos = np.where(known_u, self.user_pos[u] - own, 0.0)
        return item, self._smoothed(user_pos, user_n)

    def popularity(self, ex: dict[str, np.ndarray]) -> np.ndarray:
        return self.item_pos[ex["item"][:, self.item_col]]

    def history(self, ex: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Counts per behaviour type of the target item (`item_<type>`) and, where the schema
        has categories, of its category (`cat_<type>`) in the history; the gap bucket of the
        item's most recent event (`item_recency`, 0 when absent); the history length."""
        s = self.schema
        hist = ex["hist"]
        beh = hist[..., s.hist_index(HIST_BEHAVIOUR)]
        same_item = hist[..., s.hist_index(HIST_ITEM)] == ex["item"][:, self.item_col, None]
        same_item &= beh > 0
        out = {"hist_len": (beh > 0).sum(1).astype(np.float64)}
        names = [f.name for f in s.hist_fields]
        cat = None
        if "category" in names and "category" in [f.name for f in s.item_fields]:
            cat = (
                hist[..., s.hist_index("category")] == ex["item"][:, s.item_index("category"), None]
            )
            cat &= (beh > 0) & (hist[..., s.hist_index("category")] >= NUM_RESERVED)
        for k, t in enumerate(s.behaviour_types):
            of_type = beh == k + NUM_RESERVED
            out[f"item_{t}"] = (same_item & of_type).sum(1).astype(np.float64)
            if cat is not None:
                out[f"cat_{t}"] = (cat & of_type).sum(1).astype(np.float64)
        if "time_gap" in names:
            gap = hist[..., s.hist_index("time_gap")]
            first = np.argmax(same_item, axis=1)  # history is most recent first
            recent = gap[np.arange(len(gap)), first].astype(np.float64)
            oldest = float(s.vocab_sizes["time_gap"])  # gap ids grow with the time since
            out["item_recency"] = np.where(same_item.any(1), oldest - recent, 0.0)
        return out


def _design(f: Features, ex: dict[str, np.ndarray], leave_out: bool) -> np.ndarray:
    item_rate, user_rate = f.rates(ex, leave_out)
    cols = [np.log1p(v) for v in f.history(ex).values()]
    pop = f.popularity(ex) - (ex["label"] if leave_out else 0.0)
    cols += [np.log1p(np.maximum(pop, 0.0)), item_rate, user_rate]
    return np.stack(cols, 1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = L2, steps: int = 50):
    """Standardised features -> (mean, scale, weights with the bias last) by Newton's method."""
    mean, scale = x.mean(0), x.std(0)
    scale = np.where(scale > 0, scale, 1.0)
    z = np.c_[(x - mean) / scale, np.ones(len(x))]
    w = np.zeros(z.shape[1])
    penalty = l2 * np.r_[np.ones(z.shape[1] - 1), 0.0]
    for _ in range(steps):
        p = 1.0 / (1.0 + np.exp(-(z @ w)))
        grad = z.T @ (p - y) / len(y) + penalty * w
        hess = (z * (p * (1 - p))[:, None]).T @ z / len(y) + np.diag(penalty + 1e-9)
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    return mean, scale, w


def predict_logistic(model, x: np.ndarray) -> np.ndarray:
    mean, scale, w = model
    return 1.0 / (1.0 + np.exp(-(np.c_[(x - mean) / scale, np.ones(len(x))] @ w)))


def _examples(dataset: Dataset, split: str) -> dict[str, np.ndarray]:
    store = dataset.examples(split)
    ex = store.gather(np.arange(len(store)))
    return {k: ex[k] for k in COLUMNS}


def scores(dataset: Dataset, split: str = "test", seed: int = 0) -> dict[str, Any]:
    """Every baseline's score per example of `split` (rows in store order), and the labels.

    Returns:
      {"label", "user_key", "scores": {name: [N] float}, "probabilities": names that are
      probabilities}.
    """
    train = _examples(dataset, "train")
    ex = _examples(dataset, split)
    f = Features(dataset.schema, train)
    pop = f.popularity(ex)
    tie = pop / (pop.max() + 1.0) if len(pop) else pop  # in [0, 1): breaks ties, never ranks
    item_rate, user_rate = f.rates(ex, leave_out=split == "train")
    hist = f.history(ex)
    out = {"item_rate": item_rate, "user_rate": user_rate, "popularity": pop}
    for t in dataset.schema.behaviour_types:
        out[f"seen_{t}"] = (hist[f"item_{t}"] > 0) + tie
    seen = sum(hist[f"item_{t}"] for t in dataset.schema.behaviour_types)
    out["in_history"] = (seen > 0) + tie
    rows = np.arange(len(train["label"]))
    if len(rows) > MAX_FIT_ROWS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_FIT_ROWS, replace=False))
    sub = {k: v[rows] for k, v in train.items()}
    model = fit_logistic(_design(f, sub, leave_out=True), sub["label"].astype(np.float64))
    out["logistic_regression"] = predict_logistic(model, _design(f, ex, leave_out=False))
    return {
        "label": ex["label"],
        "user_key": ex["user_key"],
        "scores": out,
        "probabilities": ("item_rate", "user_rate", "logistic_regression"),
    }


def evaluate(label: np.ndarray, score: np.ndarray, user_key: np.ndarray, prob: bool) -> dict:
    """AUC, GAUC, average precision and (for probabilities) logloss of one score column."""
    g = metrics.gauc(label, score, user_key)
    return {
        "auc": metrics.auc(label, score),
        "gauc": g["gauc"],
        "pr_auc": metrics.average_precision(label, score),
        "logloss": metrics.logloss(label, score) if prob else float("nan"),
        "positives": int(label.sum()),
        "examples": len(label),
    }


def report(dataset: Dataset, split: str = "test", seed: int = 0) -> dict[str, dict]:
    """{baseline: metrics} on `split`, best AUC first."""
    return table(scores(dataset, split, seed))


def table(s: dict[str, Any]) -> dict[str, dict]:
    """{baseline: metrics} of a `scores` result, best AUC first."""
    probs = set(s["probabilities"])
    rows = {
        name: evaluate(s["label"], v, s["user_key"], name in probs)
        for name, v in s["scores"].items()
    }
    key: Callable[[str], float] = lambda n: -np.nan_to_num(rows[n]["auc"], nan=-1.0)
    return {n: rows[n] for n in sorted(rows, key=key)}


def paired_auc_difference(
    label: np.ndarray,
    user_key: np.ndarray,
    model_scores: list[np.ndarray],
    base_score: np.ndarray,
    n_boot: int = 500,
    seed: int = 0,
) -> dict[str, float]:
    """AUC of the models (mean over their seeds) minus the baseline's, on the same rows, with a
    95 % percentile interval from resampling users (all of a user's rows move together).

    Returns:
      {"diff", "ci_low", "ci_high", "users"}.
    """
    _, users = np.unique(user_key, return_inverse=True)
    n_users = int(users.max()) + 1 if len(users) else 0
    diff = lambda w: (
        np.mean([metrics.auc(label, s, w) for s in model_scores])
        - metrics.auc(label, base_score, w)
    )
    point = float(diff(None))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot):
        w = np.bincount(rng.integers(0, n_users, n_users), minlength=n_users)[users]
        draws.append(diff(w.astype(np.float64)))
    lo, hi = np.nanquantile(draws, [0.025, 0.975]) if draws else (np.nan, np.nan)
    return {"diff": point, "ci_low": float(lo), "ci_high": float(hi), "users": n_users}
