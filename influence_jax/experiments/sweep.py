"""Hyperparameter sweeps: grid or random search over config fields, one trial per sub-workdir.

A sweep file (JSON, or a Python file with `get_sweep()` returning the same dict):

    {"method": "grid" | "random", "num_trials": 8, "seed": 0,
     "metric": "valid/auc", "mode": "max",
     "params": {"opt.learning_rate": [1e-3, 3e-3],               # a list: choose one value
                "model.extractors": [["din"], ["din", "dnn"]],
                "model.dnn.dropout": {"uniform": [0.0, 0.5]},      # random search only
                "opt.weight_decay": {"log_uniform": [1e-6, 1e-3]},
                "model.embed_dim": {"int_uniform": [8, 32]}}}

Trial i always gets the same values (grid: the i-th point of the product in the file's order;
random: drawn from a generator seeded by (seed, i)), so any worker can run any trial with no
coordinator, and DIR/trial_<i>/ holds its trial.json, config.py, config.json, checkpoints,
TensorBoard events and, once finished, result.json. results.csv/.parquet, the printed summary
and best_config.py are rebuilt from whatever result files exist.
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import importlib.util
import itertools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np
import pyarrow as pa

from influence_jax import files, metrics
from influence_jax import summary as summary_lib
from influence_jax.errors import ConfigError
from influence_jax.experiments import hparams, trials

METHODS = ("grid", "random")
DISTRIBUTIONS = ("uniform", "log_uniform", "int_uniform")
CV_STATS = ("mean", "std", "min", "max")  # cross-validated trials: "cv/<metric>_<stat>"
TRIAL_FILE = "trial.json"
TABLE = "results"  # DIR/results.csv and DIR/results.parquet
BEST_CONFIG = "best_config.py"
SESSION_END = ".hparams_end"  # marks that the trial's HParams session end is written


@dataclasses.dataclass(frozen=True)
class Sweep:
    """A parsed sweep file (see the module docstring)."""

    method: str
    params: dict[str, Any]
    num_trials: int
    seed: int = 0
    metric: str = "valid/auc"
    mode: str = "max"
    source: str = "<sweep>"


def load(path: str) -> Sweep:
    """Reads and checks a sweep file (.json, or .py with `get_sweep()`)."""
    if not os.path.exists(path):
        raise ConfigError(f"--sweep={path}: no such file")
    if path.endswith(".py"):
        spec = importlib.util.spec_from_file_location("_sweep", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        raw = module.get_sweep()
    else:
        with open(path) as f:
            try:
                raw = json.load(f)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return parse(raw, path)


def parse(raw: dict[str, Any], source: str = "<sweep>") -> Sweep:
    """Checks a sweep dict; raises ConfigError naming the file and the key."""
    where = f"{source}: "
    unknown = set(raw) - {"method", "params", "num_trials", "seed", "metric", "mode"}
    if unknown:
        raise ConfigError(f"{where}unknown keys {sorted(unknown)}")
    method = raw.get("method", "grid")
    if method not in METHODS:
        raise ConfigError(f"{where}method: {method!r} is not one of {METHODS}")
    params = raw.get("params")
    if not isinstance(params, dict) or not params:
        raise ConfigError(f"{where}params: give a non-empty object of field -> values")
    for name, dist in params.items():
        if isinstance(dist, list):
            if not dist:
                raise ConfigError(f"{where}params.{name}: the list of values is empty")
            continue
        if method == "grid":
            raise ConfigError(f"{where}params.{name}: a grid needs a list of values")
        kind = next(iter(dist), None) if isinstance(dist, dict) and len(dist) == 1 else None
        lo_hi = dist.get(kind) if kind else None
        if kind not in DISTRIBUTIONS or not isinstance(lo_hi, list) or len(lo_hi) != 2:
            raise ConfigError(
                f"{where}params.{name}: give a list of values or one of "
                + ", ".join(f'{{"{d}": [low, high]}}' for d in DISTRIBUTIONS)
            )
        lo, hi = lo_hi
        if not lo <= hi or (kind == "log_uniform" and lo <= 0):
            raise ConfigError(f"{where}params.{name}: bad range {lo_hi} for {kind}")
    grid_size = math.prod(len(v) for v in params.values()) if method == "grid" else None
    num_trials = raw.get("num_trials", grid_size)
    if not isinstance(num_trials, int) or num_trials <= 0:
        raise ConfigError(f"{where}num_trials: give a positive number of trials")
    if grid_size is not None and num_trials != grid_size:
        raise ConfigError(
            f"{where}num_trials: the grid has {grid_size} points; leave num_trials out or set it "
            f"to {grid_size}"
        )
    metric = raw.get("metric", "valid/auc")
    check_metric(metric, where)
    mode = raw.get("mode", "auto")
    if mode == "auto":
        mode = metrics.mode(metric)
    if mode not in ("max", "min"):
        raise ConfigError(f"{where}mode: {mode!r} is not 'max', 'min' or 'auto'")
    return Sweep(
        method=method,
        params=params,
        num_trials=num_trials,
        seed=int(raw.get("seed", 0)),
        metric=metric,
        mode=mode,
        source=source,
    )


def check_metric(metric: Any, where: str = "") -> None:
    """Raises ConfigError unless `metric` names a result key a trial can have.

    The rule of config.loop.early_stop_metric (config_check), behind a split: "<split>/<name>"
    with <name> one of metrics.METRICS, optionally "/<behaviour type>" ("valid/auc/buy"), or
    "<split>/<head>/<name>" (a multi-task model's head); a cross-validated trial's summary is
    "cv/<name>_<mean|std|min|max>". Checked when the sweep file is read, so that a misspelt
    metric stops the sweep before any trial trains instead of ranking by an empty column.
    """
    split, _, rest = metric.partition("/") if isinstance(metric, str) else ("", "", "")
    if split == "cv":
        ok = rest in {f"{m}_{s}" for m in metrics.METRICS for s in CV_STATS}
    else:
        ok = bool(split) and metrics.is_metric_key(rest)
    if not ok:
        raise ConfigError(
            f"{where}metric: {metric!r} is not a result key; give '<split>/<name>' with <name> "
            f"one of {metrics.METRICS}, optionally '/<behaviour type>' (e.g. 'valid/auc', "
            "'valid/auc/buy'), '<split>/<head>/<name>' for a multi-task model, or "
            f"'cv/<name>_<{'|'.join(CV_STATS)}>' with --cv_folds"
        )


def check_metric_split(sweep: Sweep, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError unless the sweep's metric is of a split the trials evaluate (the
    config's loop.eval_split or loop.final_eval_split) or a cross-validation summary."""
    split = sweep.metric.partition("/")[0]
    splits = [s for s in (config.loop.eval_split, config.loop.final_eval_split) if s]
    if split != "cv" and split not in splits:
        raise ConfigError(
            f"{sweep.source}: metric: {sweep.metric!r}: the trials evaluate the split(s) "
            f"{splits} (config.loop.eval_split, config.loop.final_eval_split), not {split!r}"
        )


def trial_values(sweep: Sweep, i: int) -> dict[str, Any]:
    """The field values of trial `i` (the same on every host and every rerun)."""
    if sweep.method == "grid":
        point = next(itertools.islice(itertools.product(*sweep.params.values()), i, None))
        return dict(zip(sweep.params, point, strict=True))
    rng = np.random.default_rng([sweep.seed, i])
    out = {}
    for name, dist in sweep.params.items():
        if isinstance(dist, list):
            out[name] = dist[int(rng.integers(len(dist)))]
            continue
        ((kind, (lo, hi)),) = dist.items()
        if kind == "uniform":
            out[name] = float(rng.uniform(lo, hi))
        elif kind == "log_uniform":
            out[name] = float(math.exp(rng.uniform(math.log(lo), math.log(hi))))
        else:
            out[name] = int(rng.integers(lo, hi + 1))
    return out


def assigned(num_trials: int, trial_index: int, num_workers: int, worker_index: int) -> list[int]:
    """The trials this process runs: `trial_index` alone, or every i with i % N == worker."""
    if trial_index >= 0:
        if trial_index >= num_trials:
            raise ConfigError(f"--trial_index={trial_index}: the sweep has {num_trials} trials")
        return [trial_index]
    if num_workers < 1 or not 0 <= worker_index < num_workers:
        raise ConfigError(
            f"--worker_index={worker_index} --num_workers={num_workers}: need 0 <= worker < N"
        )
    return [i for i in range(num_trials) if i % num_workers == worker_index]


def trial_dir(workdir: str, i: int) -> str:
    return os.path.join(workdir, f"trial_{i:03d}")


def trial_configs(
    config: ml_collections.ConfigDict, sweep: Sweep
) -> list[tuple[dict[str, Any], ml_collections.ConfigDict]]:
    """(values, config) of every trial, each config checked before any training starts."""
    import jax

    from influence_jax import config_check

    trials.check_final_split(config)
    check_metric_split(sweep, config)
    out = []
    for i in range(sweep.num_trials):
        values = trial_values(sweep, i)
        cfg = trials.with_overrides(config, values, where=f"{sweep.source}: params.")
        try:
            config_check.check(cfg, jax.device_count(), jax.process_count())
        except ConfigError as e:
            raise ConfigError(f"{sweep.source}: trial {i} ({values}): {e}") from None
        out.append((values, cfg))
    return out


def run(
    config: ml_collections.ConfigDict,
    sweep: Sweep,
    workdir: str,
    indices: Sequence[int] | None = None,
    train_fn: trials.TrainFn = trials.train_trial,
) -> list[dict[str, Any]]:
    """Runs the trials `indices` (default: all) that have no result file yet, one after another.

    Returns:
      The result records of `indices`, in order (finished before or now).

    Raises:
      trials.Preempted: SIGTERM stopped a trial; the same command resumes it.
      ConfigError: a trial's values do not fit the config, or differ from the values recorded
        in its workdir (the sweep file changed: use a new workdir).
    """
    all_trials = trial_configs(config, sweep)  # checked before the workdir is made
    os.makedirs(workdir, exist_ok=True)
    indices = list(range(sweep.num_trials)) if indices is None else list(indices)
    split = config.loop.final_eval_split
    hparams.write_experiment(
        workdir,
        {k: [v[k] for v, _ in all_trials] for k in sweep.params},
        list(dict.fromkeys([sweep.metric, f"{split}/auc", f"{split}/gauc"])),
    )
    records = []
    for i in indices:
        values, cfg = all_trials[i]
        d = trial_dir(workdir, i)
        _claim(d, i, values, sweep, cfg)
        if not os.path.exists(os.path.join(d, trials.RESULT_FILE)):
            print(f"trial {i}: {values}", flush=True)
            trials.share_synthetic_data(cfg, d, workdir)
            if not glob.glob(os.path.join(d, f"*{hparams.SUFFIX}")):
                hparams.write_session_start(d, values, group=f"trial_{i:03d}")
        record = trials.run_in_workdir(cfg, d, {"trial": i, "params": values}, train_fn)
        if not os.path.exists(os.path.join(d, SESSION_END)):
            # Cross-validated trials: their summary is no training scalar yet; make it one.
            cv_metrics = {k: v for k, v in record["metrics"].items() if k.startswith("cv/")}
            if cv_metrics:
                with summary_lib.SummaryWriter(d) as writer:
                    writer.scalars(0, cv_metrics)
            hparams.write_session_end(d, record["status"] == "ok")
            files.write_text(os.path.join(d, SESSION_END), record["run_id"] + "\n")
        records.append(record)
    return records


def _claim(d: str, i: int, values: dict, sweep: Sweep, cfg: ml_collections.ConfigDict) -> None:
    """Writes the trial's values and config file, or checks them against an earlier run's."""
    path = os.path.join(d, TRIAL_FILE)
    before = files.read_json(path)
    record = json.loads(json.dumps({"trial": i, "params": values}))
    if before is not None:
        if before != record:
            raise ConfigError(
                f"{path}: trial {i} ran with {before['params']}, but {sweep.source} now gives "
                f"{values}; the sweep changed, so use a new --workdir"
            )
        ran = trials.load_config_file(os.path.join(d, "config.py")).to_dict()
        if ran != cfg.to_dict():
            changed = _changed(ran, cfg.to_dict())
            raise ConfigError(
                f"{d}/config.py: trial {i} ran with another base config ({changed}); use the "
                "same --config and overrides as before, or a new --workdir"
            )
        return
    os.makedirs(d, exist_ok=True)
    trials.write_config_file(
        os.path.join(d, "config.py"), cfg, f"Config of sweep trial {i}: {values}."
    )
    files.write_json(path, record)


def _changed(a: dict, b: dict, prefix: str = "") -> str:
    """The first dotted field whose value differs between two config dicts, with both values."""
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            found = _changed(x, y, f"{prefix}{k}.")
            if found:
                return found
        elif x != y:
            return f"{prefix}{k}: {x!r} then, {y!r} now"
    return ""


def collect(workdir: str) -> list[dict[str, Any]]:
    """Every finished trial's result record under `workdir`, by trial index."""
    paths = glob.glob(os.path.join(workdir, "trial_*", trials.RESULT_FILE))
    records = [files.read_json(p) for p in paths]
    return sorted((r for r in records if r is not None), key=lambda r: r["trial"])


def ranked(records: list[dict[str, Any]], metric: str, mode: str) -> list[dict[str, Any]]:
    """Records best first by `metric`; failed trials and trials without the metric last."""

    def key(r: dict) -> tuple[int, float]:
        v = r["metrics"].get(metric, math.nan)
        if r["status"] != "ok" or not math.isfinite(v):
            return (1, 0.0)
        return (0, -v if mode == "max" else v)

    return sorted(records, key=key)


def table_rows(records: list[dict[str, Any]], sweep: Sweep) -> list[dict[str, Any]]:
    """One flat row per trial, best first: trial, status, swept values, metrics, seconds."""
    metric_keys = sorted({k for r in records for k in r["metrics"]})
    rows = []
    for rank, r in enumerate(ranked(records, sweep.metric, sweep.mode), 1):
        row: dict[str, Any] = {"rank": rank, "trial": r["trial"], "status": r["status"]}
        row.update({k: _cell(r["params"].get(k)) for k in sweep.params})
        row.update({k: r["metrics"].get(k, math.nan) for k in metric_keys})
        best = r.get("best") or {}
        row["best_step"] = best.get("step", -1) if best.get("step") is not None else -1
        row["seconds"] = r["seconds"]
        row["error"] = r["error"]
        rows.append(row)
    return rows


def _cell(v: Any) -> Any:
    return v if isinstance(v, int | float | str | bool) or v is None else json.dumps(v)


def write_table(rows: list[dict[str, Any]], workdir: str) -> list[str]:
    """Writes WORKDIR/results.csv and results.parquet atomically; returns their paths."""
    if not rows:
        return []
    path = os.path.join(workdir, TABLE + ".csv")

    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    files.write_atomic(path, write)
    ppath = os.path.join(workdir, TABLE + ".parquet")
    files.write_table(pa.Table.from_pylist(rows), ppath)
    paths = [path, ppath]
    return paths


def summary(rows: list[dict[str, Any]], sweep: Sweep, split: str = "test") -> str:
    """A fixed-width table of the trials, best first by the sweep's metric."""
    cols = ["rank", "trial", *sweep.params, sweep.metric]
    cols += [c for c in (f"{split}/auc", f"{split}/gauc") if c not in cols]
    cols += ["seconds", "status"]
    cells = [[f"{r[c]:.1f}" if c == "seconds" else _fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(x[j]) for x in cells)) for j, c in enumerate(cols)]
    line = lambda xs: "  ".join(x.rjust(w) for x, w in zip(xs, widths, strict=True))
    return "\n".join([line(cols), *(line(x) for x in cells)])


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "nan" if not math.isfinite(v) else (f"{v:.4g}" if abs(v) < 1e-2 else f"{v:.4f}")
    return str(v)


def write_best_config(records: list[dict[str, Any]], sweep: Sweep, workdir: str) -> str | None:
    """Copies the best finished trial's config.py to WORKDIR/best_config.py; returns its path."""
    best = ranked(records, sweep.metric, sweep.mode)
    if not best or best[0]["status"] != "ok" or sweep.metric not in best[0]["metrics"]:
        return None
    r = best[0]
    config = trials.load_config_file(os.path.join(trial_dir(workdir, r["trial"]), "config.py"))
    path = os.path.join(workdir, BEST_CONFIG)
    doc = (
        f"Best trial of the sweep in {os.path.abspath(workdir)}: trial {r['trial']}, "
        f"{sweep.metric}={r['metrics'][sweep.metric]:.6f} ({sweep.mode}), values {r['params']}.\n\n"
        f"    python -m influence_jax.main --config={path} --workdir=runs/best"
    )
    trials.write_config_file(path, config, doc)
    return path


def report(workdir: str, sweep: Sweep, split: str = "test") -> str:
    """Rebuilds the table and best_config.py from the result files; returns the summary."""
    records = collect(workdir)
    rows = table_rows(records, sweep)
    write_table(rows, workdir)
    best = write_best_config(records, sweep, workdir)
    lines = [
        f"{len(records)} of {sweep.num_trials} trials finished; best first by {sweep.metric} "
        f"({sweep.mode}):",
        summary(rows, sweep, split) if rows else "(none yet)",
    ]
    if best:
        lines.append(f"best config: {best}")
    return "\n".join(lines)
