"""Exact split-level metrics (AUC, GAUC, logloss, accuracy, per behaviour type) on the host
and the reduction of per-step sums/counts. The TensorBoard writer lives in summary.py.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from influence_jax.errors import DataError

_SUM_SUFFIX = "_sum"
# The split metrics, in the order reports print them; any can pick the best checkpoint.
METRICS = ("auc", "gauc", "gauc_impression", "logloss", "accuracy")
LOWER_IS_BETTER = ("logloss",)


def is_metric_key(key: str, heads: bool = True) -> bool:
    """Whether `key` names a metric of a split's evaluation: "<name>" with <name> one of
    METRICS, "<name>/<behaviour type>", or with `heads` a multi-task head's "<head>/<name>"."""
    parts = key.split("/") if isinstance(key, str) else []
    per_type = bool(parts) and parts[0] in METRICS and len(parts) <= 2
    per_head = heads and len(parts) == 2 and parts[1] in METRICS
    return per_type or per_head


def mode(metric: str) -> str:
    """'min' for a metric where lower is better ("logloss", "valid/logloss/buy"), else 'max'."""
    lower = any(p in LOWER_IS_BETTER or p == "loss" for p in metric.split("/"))
    return "min" if lower else "max"


def format_metrics(m: Mapping[str, float], keys: Sequence[str] = METRICS) -> str:
    """Formats `keys` present in `m` and not NaN: "auc=0.7066 gauc=0.7097 ..."; a multi-task
    model's heads follow ("| buy auc=0.71 logloss=0.21 | engage ...")."""
    line = " ".join(f"{k}={m[k]:.4f}" for k in keys if k in m and m[k] == m[k])
    heads = dict.fromkeys(k.split("/")[0] for k in m if k.count("/") == 1 and k.endswith("/auc"))
    for h in heads:
        part = " ".join(
            f"{k}={m[f'{h}/{k}']:.4f}" for k in ("auc", "gauc", "logloss") if f"{h}/{k}" in m
        )
        line += f" | {h} {part}"
    return line


class MetricsError(DataError):
    """Inputs a metric cannot be computed from; the message names the field and the fix (a
    DataError: the entry points report it in one line)."""


# ----------------------------------------------------------------------------- input checks


def _flat(name: str, x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim > 1 and arr.size != arr.shape[0]:
        raise MetricsError(f"{name}: expected one value per example, got shape {arr.shape}")
    return arr.reshape(-1)


def _prepare(
    labels: Any, scores: Any, weights: Any | None, **columns: Any
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Validates the columns and drops weight-0 (padding) rows.

    Returns:
      (labels as bool, scores, weights as float64, the other columns), all of equal length.
    """
    y = _flat("labels", labels)
    s = _flat("scores", scores)
    named = {"scores": s, **{k: _flat(k, v) for k, v in columns.items()}}
    for name, arr in named.items():
        if arr.shape != y.shape:
            raise MetricsError(f"{name}: has {arr.size} values but labels has {y.size}")
    if weights is None:
        w = np.ones(y.shape, np.float64)
    else:
        w = _flat("weights", weights).astype(np.float64)
        if w.shape != y.shape:
            raise MetricsError(f"weights: has {w.size} values but labels has {y.size}")
        if not np.all(w >= 0):  # also catches NaN
            raise MetricsError("weights: must be finite and non-negative (0 marks padding rows)")
        keep = w > 0
        if not keep.all():
            y, w = y[keep], w[keep]
            named = {k: v[keep] for k, v in named.items()}
    if not np.all((y == 0) | (y == 1)):
        bad = np.unique(y[(y != 0) & (y != 1)])[:5]
        raise MetricsError(f"labels: must be 0 or 1 on non-padding rows; found {bad.tolist()}")
    s = named.pop("scores")
    return y.astype(bool), s, w, named


# ----------------------------------------------------------------------------- ranking core


def _split_weights(y: np.ndarray, w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each example's weight as a positive and as a negative; all metrics below use these."""
    pos = np.where(y, w, 0.0)
    return pos, w - pos


def _sort_by_score(
    y: np.ndarray, s: np.ndarray, w: np.ndarray, *columns: np.ndarray
) -> tuple[np.ndarray, ...]:
    """(pos, neg, scores, *columns) in ascending score order, NaN scores last.

    Equal scores become one run in `_ranked_pairs`, so the sort need not be stable; the
    per-type and per-user AUCs reuse this one order instead of sorting again.
    """
    order = np.argsort(s)
    pos, neg = _split_weights(y[order], w[order])
    return pos, neg, s[order], *(c[order] for c in columns)


def _runs(*sorted_keys: np.ndarray) -> np.ndarray:
    """True at index 0 and wherever any of the (equal-length, sorted) keys changes value."""
    starts = np.zeros(sorted_keys[0].shape, bool)
    starts[:1] = True
    for key in sorted_keys:
        starts[1:] |= key[1:] != key[:-1]
    return starts


def _ranked_pairs(
    pos: np.ndarray, neg: np.ndarray, new_group: np.ndarray, new_tie: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group: positive weight, negative weight and the weighted count of correctly ranked
    (positive, negative) pairs, a tie counting 1/2 (Mann-Whitney U).

    Args:
      pos, neg: per-example positive / negative weight, sorted by (group, score).
      new_group: True where a group starts. new_tie: True where a run of equal
        (group, score) starts; it must be True wherever new_group is.
    """
    tie_starts = np.flatnonzero(new_tie)
    tie_pos = np.add.reduceat(pos, tie_starts)
    tie_neg = np.add.reduceat(neg, tie_starts)
    run_opens_group = new_group[tie_starts]
    tie_group = np.cumsum(run_opens_group) - 1
    first_run = np.flatnonzero(run_opens_group)
    # Negatives ranked strictly below a run = negatives before it in the whole order,
    # minus those before its group's first run.
    neg_before = np.cumsum(tie_neg) - tie_neg
    neg_below = neg_before - neg_before[first_run][tie_group]
    n_groups = first_run.size
    pairs = np.bincount(tie_group, tie_pos * (neg_below + 0.5 * tie_neg), minlength=n_groups)
    group_pos = np.bincount(tie_group, tie_pos, minlength=n_groups)
    group_neg = np.bincount(tie_group, tie_neg, minlength=n_groups)
    return group_pos, group_neg, pairs


def _auc_sorted(pos: np.ndarray, neg: np.ndarray, s: np.ndarray) -> float:
    """AUC of examples already in ascending score order."""
    if s.size == 0 or np.isnan(s[-1]):  # NaN sorts last
        return float("nan")
    one_group = np.zeros(s.shape, bool)
    one_group[0] = True
    p, n, pairs = _ranked_pairs(pos, neg, one_group, _runs(s))
    if p[0] == 0 or n[0] == 0:
        return float("nan")
    return float(pairs[0] / (p[0] * n[0]))


def _gauc_sorted(
    pos: np.ndarray, neg: np.ndarray, s: np.ndarray, g: np.ndarray
) -> dict[str, float]:
    """GAUC of examples already in ascending score order (see `gauc`)."""
    out = {"gauc": float("nan"), "gauc_impression": float("nan")}
    if s.size == 0:
        return out | {"gauc_users": 0, "gauc_users_excluded": 0}
    # A stable sort by user keeps each user's examples in score order: the (user, score)
    # order of a lexsort, at about half its cost when the score order is already at hand.
    by_user = np.argsort(g, kind="stable")
    pos, neg, s, g = pos[by_user], neg[by_user], s[by_user], g[by_user]
    new_user = _runs(g)
    p, n, pairs = _ranked_pairs(pos, neg, new_user, new_user | _runs(s))
    valid = (p > 0) & (n > 0)
    counted = int(valid.sum())
    out |= {"gauc_users": counted, "gauc_users_excluded": int(valid.size - counted)}
    if counted == 0 or np.isnan(s).any():
        return out
    user_auc = pairs[valid] / (p[valid] * n[valid])
    impressions = p[valid] + n[valid]
    out["gauc"] = float(user_auc.mean())
    out["gauc_impression"] = float(np.sum(impressions * user_auc) / impressions.sum())
    return out


def _logloss(pos: np.ndarray, neg: np.ndarray, p: np.ndarray, eps: float) -> float:
    total = pos.sum() + neg.sum()
    if total == 0:
        return float("nan")
    p = np.clip(p.astype(np.float64), eps, 1.0 - eps)
    return float(-(np.dot(pos, np.log(p)) + np.dot(neg, np.log1p(-p))) / total)


def _accuracy(pos: np.ndarray, neg: np.ndarray, p: np.ndarray, threshold: float) -> float:
    total = pos.sum() + neg.sum()
    if total == 0 or np.isnan(p).any():
        return float("nan")
    predicted = p > threshold
    return float((pos[predicted].sum() + neg[~predicted].sum()) / total)


# ----------------------------------------------------------------------------- public metrics


def auc(labels: Any, scores: Any, weights: Any | None = None) -> float:
    """Exact ROC AUC; equal scores count 1/2 per pair (as sklearn's `roc_auc_score`).

    Args:
      labels: 0/1 per example. scores: any monotone score (probability or logit).
      weights: optional non-negative example weights; weight-0 rows (padding) are ignored.

    Returns:
      The AUC, or nan when only one class is present or a score is NaN.
    """
    y, s, w, _ = _prepare(labels, scores, weights)
    return _auc_sorted(*_sort_by_score(y, s, w))


def gauc(labels: Any, scores: Any, groups: Any, weights: Any | None = None) -> dict[str, float]:
    """Per-user (group) AUC averaged over users that have both classes.

    Args:
      labels, scores, weights: as for `auc`. groups: the user key of each example.

    Returns:
      `gauc` (each user weighted equally), `gauc_impression` (each user weighted by its
      impressions, i.e. its total example weight; the GAUC of the DIN paper), `gauc_users`
      (users counted) and `gauc_users_excluded` (users with one class only). The two GAUCs
      are nan when no user counts or a score is NaN.
    """
    y, s, w, cols = _prepare(labels, scores, weights, groups=groups)
    return _gauc_sorted(*_sort_by_score(y, s, w, cols["groups"]))


def logloss(labels: Any, probs: Any, weights: Any | None = None, eps: float = 1e-7) -> float:
    """Weighted mean binary cross entropy, with probs clipped to [eps, 1 - eps]; nan if empty."""
    y, p, w, _ = _prepare(labels, probs, weights)
    return _logloss(*_split_weights(y, w), p, eps)


def accuracy(labels: Any, probs: Any, weights: Any | None = None, threshold: float = 0.5) -> float:
    """Weighted fraction of examples where `probs > threshold` equals the label; nan if empty."""
    y, p, w, _ = _prepare(labels, probs, weights)
    return _accuracy(*_split_weights(y, w), p, threshold)


def average_precision(labels: Any, scores: Any, weights: Any | None = None) -> float:
    """Area under the precision-recall curve as average precision (sklearn's definition):
    the sum over distinct score thresholds, highest first, of precision times the recall
    gained there; equal scores enter together.

    Returns:
      nan when there is no positive or a score is NaN.
    """
    y, s, w, _ = _prepare(labels, scores, weights)
    pos, neg = _split_weights(y, w)
    if pos.sum() == 0 or np.isnan(s).any():
        return float("nan")
    order = np.argsort(-s, kind="stable")
    s, pos, neg = s[order], pos[order], neg[order]
    run_end = np.r_[s[1:] != s[:-1], True]
    tp, fp = np.cumsum(pos)[run_end], np.cumsum(neg)[run_end]
    precision, recall = tp / (tp + fp), tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def evaluate(
    labels: Any,
    probs: Any,
    user_key: Any,
    target_type: Any,
    weights: Any | None = None,
    type_names: Mapping[int, str] | None = None,
) -> dict[str, float]:
    """All split metrics, overall and per target behaviour type.

    Args:
      labels, probs, weights: as for `logloss`. user_key: the GAUC group of each example.
      target_type: behaviour type id of each example's target.
      type_names: type id -> name for the sliced keys; ids missing from it use their number.

    Returns:
      `auc`, `gauc`, `gauc_impression`, `gauc_users`, `gauc_users_excluded`, `logloss`,
      `accuracy`, `num_examples` (total weight), `positive_rate`, and for each type present
      `auc/<name>`, `logloss/<name>`, `accuracy/<name>`, `num_examples/<name>`.
    """
    y, p, w, cols = _prepare(labels, probs, weights, user_key=user_key, target_type=target_type)
    pos, neg, p, users, types = _sort_by_score(y, p, w, cols["user_key"], cols["target_type"])
    total = float(w.sum())
    out: dict[str, float] = {
        "num_examples": total,
        "positive_rate": float(pos.sum() / total) if total else float("nan"),
        "auc": _auc_sorted(pos, neg, p),
        **_gauc_sorted(pos, neg, p, users),
        "logloss": _logloss(pos, neg, p, 1e-7),
        "accuracy": _accuracy(pos, neg, p, 0.5),
    }
    names = type_names or {}
    # A handful of behaviour types: one masked pass each over the score-sorted arrays (a
    # boolean mask keeps the order) is cheaper than sorting again.
    for type_id in np.unique(types).tolist():
        m = types == type_id
        name = names.get(int(type_id), str(int(type_id)))
        out[f"auc/{name}"] = _auc_sorted(pos[m], neg[m], p[m])
        out[f"logloss/{name}"] = _logloss(pos[m], neg[m], p[m], 1e-7)
        out[f"accuracy/{name}"] = _accuracy(pos[m], neg[m], p[m], 0.5)
        out[f"num_examples/{name}"] = float(pos[m].sum() + neg[m].sum())
    return out


class MetricAccumulator:
    """Collects host numpy batches over an eval pass; `result` evaluates their concatenation."""

    _FIELDS = ("probs", "labels", "user_key", "target_type", "weights")

    def __init__(self) -> None:
        self._parts: dict[str, list[np.ndarray]] = {k: [] for k in self._FIELDS}

    def reset(self) -> None:
        for parts in self._parts.values():
            parts.clear()

    def __len__(self) -> int:
        """Number of non-padding rows collected."""
        return sum(a.size for a in self._parts["labels"])

    def add(
        self,
        probs: Any,
        labels: Any,
        user_key: Any,
        target_type: Any,
        weights: Any | None = None,
    ) -> None:
        """Adds one batch; rows with weight 0 are padding and are dropped here to save memory."""
        batch = {
            "probs": _flat("probs", probs),
            "labels": _flat("labels", labels),
            "user_key": _flat("user_key", user_key),
            "target_type": _flat("target_type", target_type),
        }
        n = batch["labels"].size
        w = np.ones(n, np.float32) if weights is None else _flat("weights", weights)
        batch["weights"] = w
        for name, arr in batch.items():
            if arr.size != n:
                raise MetricsError(f"{name}: batch has {arr.size} values but labels has {n}")
        keep = w != 0
        for name, arr in batch.items():
            # A copy, so a caller reusing its buffers cannot change what was collected.
            self._parts[name].append(arr[keep] if not keep.all() else arr.copy())

    def result(self, type_names: Mapping[int, str] | None = None) -> dict[str, float]:
        """`evaluate` over everything added since construction or the last `reset`."""
        cols = {
            k: np.concatenate(v) if v else np.zeros(0, np.float32) for k, v in self._parts.items()
        }
        return evaluate(
            cols["labels"],
            cols["probs"],
            cols["user_key"],
            cols["target_type"],
            cols["weights"],
            type_names,
        )


def reduce_step_metrics(steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Combines per-step sums and counts into exact means over all steps.

    Args:
      steps: one dict per train step (host numbers or arrays), all with the same keys.

    Returns:
      Every key summed over steps, except that each `<name>_sum` key is replaced by
      `<name>` = its total divided by the total `count`. Scalars come back as floats.
    """
    if not steps:
        return {}
    keys = list(steps[0])
    for i, step in enumerate(steps):
        if set(step) != set(keys):
            raise MetricsError(
                f"step metrics: step {i} has keys {sorted(step)} but step 0 has {sorted(keys)}"
            )
    totals = {k: np.sum([np.asarray(s[k], np.float64) for s in steps], axis=0) for k in keys}
    means = [k for k in keys if k.endswith(_SUM_SUFFIX)]
    if means and "count" not in totals:
        raise MetricsError(f"step metrics: {means} need a 'count' key to divide by")
    out: dict[str, Any] = {}
    for k, total in totals.items():
        if k.endswith(_SUM_SUFFIX):
            name = k[: -len(_SUM_SUFFIX)]
            if name in totals:
                raise MetricsError(f"step metrics: both {name!r} and {k!r} given; keep one")
            with np.errstate(divide="ignore", invalid="ignore"):
                total = total / totals["count"]
            k = name
        out[k] = float(total) if np.ndim(total) == 0 else total
    return out


# ----------------------------------------------------------------------------- TensorBoard
