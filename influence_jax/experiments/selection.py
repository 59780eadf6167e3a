"""Feature selection by influence: drop what the influence report says does not pull its weight.

Round 0 trains the config (or starts from a given influence report). Each round reads the
influence report of the round before (influence_jax/influence.py, influence.json), drops the
behaviour types and ranker extractors whose influence share is below the threshold, retrains,
and records the change of the validation metric. With `loop`, rounds go on until the metric
drops (beyond `min_delta`), nothing is left to drop, or `max_rounds` is reached; the config of
the last round that did not lose is written as WORKDIR/selected_config.py.

What can be switched off, and how:
  - a behaviour type: `config.data.drop_behaviours` (its events are removed from every history,
    train and evaluation, by data/pipeline.py; the data on disk is untouched);
  - an extractor of the ranker: `config.model.extractors`.
The most influential item of each group is always kept.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import ml_collections

from influence_jax import files, metrics
from influence_jax.errors import ConfigError, DataError
from influence_jax.experiments import trials

CRITERIA = ("share", "influence")  # share: influence / the group's total influence
REPORT_DIR = "influence"
SUMMARY_FILE = "selection.json"
SELECTED_CONFIG = "selected_config.py"

ReportFn = Callable[[str, str, str], dict[str, Any]]  # (run workdir, output, split) -> report


def influence_report(workdir: str, output: str, split: str) -> dict[str, Any]:
    """influence.report of the run in `workdir` on `split`, sized for selection (not plots)."""
    from influence_jax import influence, scoring

    run = scoring.load_run(workdir)
    return influence.report(run, output, split=split, sample=64, max_examples=5_000, n_boot=200)


def load_report(path: str) -> dict[str, Any]:
    """The influence report in `path` (`--report`), checked for what selection reads.

    Raises:
      DataError: naming the file, when it is missing, not valid JSON or not an influence report
        (e.g. tools/evaluate.py's output): checked before round 0 trains, not after it.
    """
    report = files.read_json(path)
    if report is None:
        raise DataError(f"--report={path}: no such file")
    check_report(report, f"--report={path}")
    return report


def check_report(report: Any, where: str) -> None:
    """Raises DataError naming `where` and the key unless `report` has what `candidates` reads:
    "behaviour_types" (and optionally "extractors"), each {name: {"influence": number}}."""
    kind = "an influence report (influence.json of tools/influence_report.py)"
    if not isinstance(report, dict):
        raise DataError(f"{where}: not {kind}: it holds a {type(report).__name__}, not an object")
    if "behaviour_types" not in report:
        raise DataError(f"{where}: not {kind}: it has no key 'behaviour_types'")
    for group in ("behaviour_types", "extractors"):
        entries = report.get(group, {})
        if not isinstance(entries, dict):
            raise DataError(f'{where}: {group}: give an object of name -> {{"influence": ...}}')
        for name, entry in entries.items():
            try:
                float(entry["influence"])
            except (KeyError, TypeError, ValueError):
                raise DataError(f"{where}: {group}.{name}: has no 'influence' number") from None


def candidates(
    report: dict[str, Any],
    config: ml_collections.ConfigDict,
    threshold: float,
    criterion: str = "share",
) -> dict[str, list[str]]:
    """What to drop next: {"behaviour_types": [...], "extractors": [...]} below `threshold`.

    Only items still in use are considered (behaviour types not yet dropped; the ranker's
    current extractors), shares are recomputed over them, and the most influential of each
    group is never dropped.
    """
    if criterion not in CRITERIA:
        raise ConfigError(f"--criterion={criterion!r}: choose one of {CRITERIA}")
    dropped = set(config.data.drop_behaviours)
    groups = {"behaviour_types": [t for t in report["behaviour_types"] if t not in dropped]}
    if config.model.name == "ranker":
        used = config.model.extractors
        groups["extractors"] = [e for e in report.get("extractors", {}) if e in used]
    out: dict[str, list[str]] = {}
    for group, names in groups.items():
        infl = {n: float(report[group][n]["influence"]) for n in names}
        total = sum(infl.values()) or 1.0
        score = {n: v / total if criterion == "share" else v for n, v in infl.items()}
        keep = max(score, key=score.get) if score else None
        out[group] = [n for n in names if score[n] < threshold and n != keep]
    return out


def apply(
    config: ml_collections.ConfigDict, drops: dict[str, list[str]]
) -> ml_collections.ConfigDict:
    """`config` with `drops` switched off (on top of what it already drops)."""
    overrides: dict[str, Any] = {}
    if drops.get("behaviour_types"):
        overrides["data.drop_behaviours"] = tuple(config.data.drop_behaviours) + tuple(
            drops["behaviour_types"]
        )
    if drops.get("extractors"):
        gone = set(drops["extractors"])
        overrides["model.extractors"] = tuple(e for e in config.model.extractors if e not in gone)
    return trials.with_overrides(config, overrides)


def _metric(record: dict[str, Any], metric: str) -> float:
    if record["status"] != "ok" or metric not in record["metrics"]:
        raise ConfigError(
            f"--metric={metric}: round {record['round']} has no such metric "
            f"(status {record['status']}; have {sorted(record['metrics'])[:8]}...)"
        )
    return float(record["metrics"][metric])


def check_metric(metric: str, config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError unless `metric` is a key the rounds' evaluation reports (of
    loop.eval_split or loop.final_eval_split); checked before round 0 trains."""
    splits = [s for s in (config.loop.eval_split, config.loop.final_eval_split) if s]
    split, _, rest = metric.partition("/")
    if split not in splits or not metrics.is_metric_key(rest):
        raise ConfigError(
            f"--metric={metric}: give '<split>/<name>' with <split> one of {splits} (the "
            f"splits the rounds evaluate) and <name> one of {metrics.METRICS}, optionally "
            "'/<behaviour type>', or '<split>/<head>/<name>' for a multi-task model"
        )


def run(
    config: ml_collections.ConfigDict,
    workdir: str,
    threshold: float,
    criterion: str = "share",
    metric: str = "valid/auc",
    mode: str = "max",
    loop: bool = False,
    max_rounds: int = 5,
    min_delta: float = 0.0,
    report_path: str | None = None,
    train_fn: trials.TrainFn = trials.train_trial,
    report_fn: ReportFn = influence_report,
) -> dict[str, Any]:
    """Runs the selection rounds in WORKDIR/round_<r>/ (each resumable); see the module docstring.

    Args:
      report_path: an existing influence.json to take round 0's drops from (round 0 is still
        trained here, so that every round's metric is measured the same way); read and checked
        before round 0 trains (DataError naming the file and the missing key).
      mode: "max" if a larger `metric` is better, "min" otherwise.

    Returns:
      {"rounds": [{"round", "dropped", "drop_behaviours", "extractors", metric, "change"}],
       "selected_round", "stopped"}; also written to WORKDIR/selection.json.
    """
    trials.check_final_split(config)
    check_metric(metric, config)
    given = load_report(report_path) if report_path else None  # before round 0 trains
    sign = 1.0 if mode == "max" else -1.0
    split = config.loop.eval_split
    rounds: list[dict[str, Any]] = []
    selected, stopped, cfg = 0, "max_rounds", config
    for r in range(max_rounds + 1):
        d = os.path.join(workdir, f"round_{r}")
        trials.share_synthetic_data(cfg, d, workdir)
        info = {
            "round": r,
            "drop_behaviours": list(cfg.data.drop_behaviours),
            "extractors": list(cfg.model.extractors),
        }
        if not os.path.exists(os.path.join(d, "config.py")):
            os.makedirs(d, exist_ok=True)
            trials.write_config_file(os.path.join(d, "config.py"), cfg, f"Selection round {r}.")
        record = trials.run_in_workdir(cfg, d, info, train_fn)
        value = _metric(record, metric)
        row = {**info, "dropped": rounds[-1]["next"] if rounds else {}, metric: value}
        row["change"] = value - rounds[-1][metric] if rounds else 0.0
        print(
            f"round {r}: drop_behaviours={info['drop_behaviours']} extractors={info['extractors']}"
            f" {metric}={value:.4f}" + (f" ({row['change']:+.4f})" if rounds else ""),
            flush=True,
        )
        if rounds and sign * row["change"] < -min_delta:
            rounds.append(row)
            stopped = "metric_dropped"
            break
        selected = r
        rounds.append(row)
        if r == max_rounds or (r >= 1 and not loop):
            stopped = "max_rounds" if loop else "one_round"
            break
        report = given if r == 0 and given is not None else _report(d, split, report_fn)
        row["next"] = candidates(report, cfg, threshold, criterion)
        if not any(row["next"].values()):
            stopped = "nothing_below_threshold"
            break
        cfg = apply(cfg, row["next"])
    result = {
        "metric": metric,
        "mode": mode,
        "threshold": threshold,
        "criterion": criterion,
        "rounds": rounds,
        "selected_round": selected,
        "stopped": stopped,
    }
    files.write_json(os.path.join(workdir, SUMMARY_FILE), result)
    best = trials.load_config_file(os.path.join(workdir, f"round_{selected}", "config.py"))
    doc = (
        f"Config selected by influence in {os.path.abspath(workdir)} (round {selected}, "
        f"{metric}={rounds[selected][metric]:.6f})."
    )
    trials.write_config_file(os.path.join(workdir, SELECTED_CONFIG), best, doc)
    return result


def _report(round_dir: str, split: str, report_fn: ReportFn) -> dict:
    """The influence report of a finished round: the one written before, or a new one."""
    out = os.path.join(round_dir, REPORT_DIR)
    path = os.path.join(out, "influence.json")
    report = files.read_json(path)
    if report is None:
        report = report_fn(round_dir, out, split)
    check_report(report, path)
    return report


def format_summary(result: dict[str, Any]) -> str:
    """The rounds as printed by tools/select_features.py."""
    m = result["metric"]
    lines = [f"{'round':>5}  {m:>10}  {'change':>8}  dropped this round"]
    for row in result["rounds"]:
        dropped = ", ".join(f"{k}: {v}" for k, v in row["dropped"].items() if v) or "-"
        lines.append(f"{row['round']:>5}  {row[m]:>10.4f}  {row['change']:>+8.4f}  {dropped}")
    lines.append(f"selected round {result['selected_round']} ({result['stopped']})")
    return "\n".join(lines)
