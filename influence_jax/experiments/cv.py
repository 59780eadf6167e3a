"""Time-respecting cross-validation over the training period, by example timestamp.

The train split's timestamps are cut into K + 1 blocks of about equal size at quantiles
b_0 < b_1 < ... < b_{K+1} (b_0 the first timestamp, b_{K+1} one past the last). Fold i
(i = 1..K) evaluates on the examples of block i, [b_i, b_{i+1}), and trains on the examples
before it: [b_0, b_i) ("expanding") or the last `window` blocks [b_{i-window}, b_i) ("rolling").
No fold ever trains on an example at or after the start of its evaluation window.

Each fold is a trial (trials.py) in WORKDIR/fold_<i>/ whose config restricts the rows with
`config.data.train_time_range` / `config.data.eval_time_range` (data/pipeline.py `restrict`),
evaluates the train split's window (`config.loop.eval_split = final_eval_split = "train"`),
and resumes like any trial. WORKDIR/cv.json and cv.csv hold the folds and their mean, standard
deviation, minimum and maximum.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime
import math
import os
from typing import Any

import ml_collections
import numpy as np

from influence_jax import checkpoint, files, metrics
from influence_jax.errors import ConfigError, DataError
from influence_jax.experiments import trials

MODES = ("expanding", "rolling")
METRICS = metrics.METRICS  # summarised over folds
SPLIT = "train"  # folds are cut from the training period
SUMMARY_FILE = "cv.json"


@dataclasses.dataclass(frozen=True)
class Fold:
    """One fold: train on [train_start, train_end), evaluate on [eval_start, eval_end) (unix s)."""

    index: int
    train_start: int
    train_end: int
    eval_start: int
    eval_end: int


def check_args(num_folds: int, mode: str = "expanding", window: int = 1) -> None:
    """Raises ConfigError for a fold count, mode or rolling window that cannot make folds.

    Cheap, so that the tools call it before any data is generated or any folder is made.
    """
    if num_folds < 1:
        raise ConfigError(f"--cv_folds={num_folds}: need at least one fold")
    if mode not in MODES:
        raise ConfigError(f"--cv_mode={mode!r}: choose one of {MODES}")
    if mode == "rolling" and window < 1:
        raise ConfigError(f"--cv_window={window}: a rolling window is at least one block")


def boundaries(timestamps: np.ndarray, num_folds: int) -> np.ndarray:
    """K + 2 strictly increasing block edges at equal-count quantiles of `timestamps`."""
    t = np.asarray(timestamps, np.int64)
    if num_folds < 1:
        raise ConfigError(f"--cv_folds={num_folds}: need at least one fold")
    if not len(t) or t.min() == t.max():
        raise DataError(
            "the train split's timestamps are all equal: cross-validation by time needs a "
            "prepared dataset (tools/prepare_data.py) or synthetic data generated since "
            "synthetic examples carry timestamps (delete the old synthetic data folder)"
        )
    qs = np.quantile(t, np.arange(1, num_folds + 1) / (num_folds + 1), method="lower")
    edges = np.concatenate([[t.min()], np.ceil(qs).astype(np.int64), [t.max() + 1]])
    if np.any(np.diff(edges) <= 0):
        raise DataError(
            f"the train split has too few distinct timestamps for {num_folds} folds "
            f"(block edges {edges.tolist()}); use fewer folds"
        )
    return edges


def make_folds(
    timestamps: np.ndarray, num_folds: int, mode: str = "expanding", window: int = 1
) -> list[Fold]:
    """The folds over `timestamps` (see the module docstring)."""
    check_args(num_folds, mode, window)
    b = boundaries(timestamps, num_folds)
    folds = []
    for i in range(1, num_folds + 1):
        start = b[0] if mode == "expanding" else b[max(0, i - window)]
        folds.append(Fold(i - 1, int(start), int(b[i]), int(b[i]), int(b[i + 1])))
    return folds


def backtest_cut(split: dict, k: int) -> dict[str, int]:
    """Cut of the k-th earlier backtest fold of a prepared dataset, for re-preparing the log.

    `split` is a schema's "split" record (valid_start, test_start, t_max). Fold 0 is the
    dataset itself; fold k moves both boundaries k test-windows back and ends the log where
    fold k - 1's test window starts, so the folds' test windows tile the time before the cut
    without overlap and each fold has its own training period, validation window, vocabulary
    and label maturity (tools/prepare_data.py --valid_start --test_start --max_timestamp).
    """
    test, valid = int(split["test_start"]), int(split["valid_start"])
    width = int(split["t_max"]) + 1 - test
    if k < 0 or width <= 0:
        raise ConfigError(f"fold {k}: need k >= 0 and a non-empty test window (split {split})")
    if valid - k * width <= int(split["t_min"]):
        raise DataError(
            f"fold {k}: moving the cut back {k} test windows of {width} s leaves no training "
            f"period (the log starts at {split['t_min']}); use fewer folds"
        )
    return {
        "valid_start": valid - k * width,
        "test_start": test - k * width,
        "max_timestamp": test - (k - 1) * width - 1,
    }


def fold_config(config: ml_collections.ConfigDict, fold: Fold) -> ml_collections.ConfigDict:
    """`config` restricted to one fold: its training rows, and its window as the eval split."""
    return trials.with_overrides(
        config,
        {
            "data.train_time_range": (fold.train_start, fold.train_end),
            "data.eval_time_range": (fold.eval_start, fold.eval_end),
            "loop.eval_split": SPLIT,
            "loop.final_eval_split": SPLIT,
        },
    )


def check_config(config: ml_collections.ConfigDict) -> None:
    """The config check every fold would fail, made once before any data is generated (on a
    stand-in fold: the check reads the time ranges' form, not their values)."""
    import jax

    from influence_jax import config_check

    cfg = fold_config(config, Fold(0, 0, 1, 1, 2))
    config_check.check(cfg, jax.device_count(), jax.process_count())


def train_timestamps(config: ml_collections.ConfigDict, workdir: str) -> np.ndarray:
    """Timestamps of the train split the config reads (synthetic data is generated first)."""
    from influence_jax.data.store import ExampleStore

    if config.data.source == "synthetic":
        trials.share_synthetic_data(config, workdir, workdir)
        path = checkpoint.data_dir(workdir)  # the link to the shared WORKDIR/data-<hash>
    else:
        path = config.data.path
    return ExampleStore(path, SPLIT).column("timestamp")


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    num_folds: int,
    mode: str = "expanding",
    window: int = 1,
    train_fn: trials.TrainFn = trials.train_trial,
) -> dict[str, Any]:
    """Trains and evaluates every fold not finished before; writes cv.json and cv.csv.

    Returns:
      {"folds": [{fold bounds, "examples_train", "metrics": {auc, gauc, ...}}], "summary":
      {metric: {"mean", "std", "min", "max"}}, "mode", "window"}; std is the sample standard
      deviation over folds (0 for one fold).

    Raises:
      ConfigError: a bad fold count, mode or window, or a config that fails its check; raised
        before anything is written, synthetic data included.
    """
    check_args(num_folds, mode, window)
    check_config(config)
    os.makedirs(workdir, exist_ok=True)
    t = train_timestamps(config, workdir)
    folds = make_folds(t, num_folds, mode, window)
    out = []
    for fold in folds:
        d = os.path.join(workdir, f"fold_{fold.index}")
        cfg = fold_config(config, fold)
        trials.share_synthetic_data(cfg, d, workdir)
        info = {"fold": dataclasses.asdict(fold)}
        n_train = int(((t >= fold.train_start) & (t < fold.train_end)).sum())
        n_eval = int(((t >= fold.eval_start) & (t < fold.eval_end)).sum())
        print(
            f"fold {fold.index}: train [{fold.train_start}, {fold.train_end}) {n_train} examples, "
            f"evaluate [{fold.eval_start}, {fold.eval_end}) {n_eval} examples",
            flush=True,
        )
        record = trials.run_in_workdir(cfg, d, info, train_fn)
        m = {k: v for k, v in record["metrics"].items() if k.startswith(SPLIT + "/")}
        out.append(
            {
                **dataclasses.asdict(fold),
                "examples_train": n_train,
                "examples_eval": n_eval,
                "status": record["status"],
                "metrics": {k.split("/", 1)[1]: v for k, v in m.items()},
            }
        )
    result = {"mode": mode, "window": window, "folds": out, "summary": summarise(out)}
    files.write_json(os.path.join(workdir, SUMMARY_FILE), result)
    _write_csv(out, os.path.join(workdir, "cv.csv"))
    return result


def trial_metrics(
    config: ml_collections.ConfigDict,
    workdir: str,
    num_folds: int,
    mode: str = "expanding",
    window: int = 1,
    train_fn: trials.TrainFn = trials.train_trial,
) -> dict[str, float]:
    """A whole cross-validation as one sweep trial: {"cv/<metric>_<mean|std|min|max>": value}."""
    result = run(config, workdir, num_folds, mode, window, train_fn)
    return {
        f"cv/{m}_{k}": float(v)
        for m, s in result["summary"].items()
        for k, v in s.items()
        if k != "folds"
    }


def summarise(folds: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Mean, sample standard deviation, min and max of each metric over the finished folds."""
    out = {}
    for name in METRICS:
        v = np.array([f["metrics"].get(name, math.nan) for f in folds if f["status"] == "ok"])
        v = v[np.isfinite(v)]
        if not len(v):
            continue
        std = float(v.std(ddof=1)) if len(v) > 1 else 0.0
        out[name] = {
            "mean": float(v.mean()),
            "std": std,
            "min": float(v.min()),
            "max": float(v.max()),
            "folds": int(len(v)),
        }
    return out


def _write_csv(folds: list[dict[str, Any]], path: str) -> None:
    cols = ["index", "train_start", "train_end", "eval_start", "eval_end", "examples_train",
            "examples_eval", "status", *METRICS]  # fmt: skip

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for fold in folds:
                w.writerow([fold.get(c, fold["metrics"].get(c, "")) for c in cols])

    files.write_atomic(path, write)


def format_summary(result: dict[str, Any]) -> str:
    """Folds and their spread as printed by tools/cv.py."""
    lines = [f"{len(result['folds'])} folds ({result['mode']}):"]
    for f in result["folds"]:
        m = f["metrics"]
        scores = " ".join(f"{k}={m[k]:.4f}" for k in METRICS if k in m)
        lines.append(
            f"  fold {f['index']}: train {f['examples_train']} ex [{_utc(f['train_start'])}, "
            f"{_utc(f['train_end'])}), eval {f['examples_eval']} ex up to "
            f"{_utc(f['eval_end'])}: {scores}"
        )
    for k in (k for k in METRICS if k in result["summary"]):
        s = result["summary"][k]
        lines.append(
            f"  {k:>8}: mean {s['mean']:.4f}  std {s['std']:.4f}  min {s['min']:.4f}  "
            f"max {s['max']:.4f}"
        )
    return "\n".join(lines)


def _utc(t: int) -> str:
    return datetime.datetime.fromtimestamp(t, datetime.UTC).strftime("%Y-%m-%d %H:%M")
