"""Hyperparameter sweep: grid or random search over config fields, resumable, one trial per folder.

    python tools/sweep.py --config=configs/tiny.py --sweep=sweep.json --workdir=runs/sweep
    # several hosts, no coordinator (DIR on a shared file system):
    python tools/sweep.py ... --num_workers=4 --worker_index=$W     # trials i % 4 == W
    python tools/sweep.py ... --trial_index=$SLURM_ARRAY_TASK_ID     # one trial per job
    # every trial as K-fold time cross-validation (metric e.g. "cv/auc_mean"):
    python tools/sweep.py ... --cv_folds=3 --cv_mode=expanding
    python tools/sweep.py ... --report_only                          # rebuild the table

The sweep file format is in influence_jax/experiments/sweep.py and docs/experiments.md. Writes
DIR/trial_<i>/, DIR/results.csv and .parquet, DIR/best_config.py, and prints the trials best
first. Rerun the same command after an interruption: finished trials are kept, an interrupted
one resumes from its checkpoint. `tensorboard --logdir DIR` compares the trials (HParams tab).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, logs  # noqa: E402
from influence_jax.data.schema import DataError  # noqa: E402
from influence_jax.errors import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Base config file.", lock_config=True)
_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file (.json, or .py with get_sweep()).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep root: one trial_<i>/ folder per trial.")
_TRIAL_INDEX = flags.DEFINE_integer("trial_index", -1, "Run only this trial (-1: see workers).")
_NUM_WORKERS = flags.DEFINE_integer("num_workers", 1, "Processes sharing the sweep.")
_WORKER_INDEX = flags.DEFINE_integer("worker_index", 0, "This process: runs i % N == index.")
_REPORT_ONLY = flags.DEFINE_bool("report_only", False, "Only rebuild the table and best config.")
_ISOLATE = flags.DEFINE_bool(
    "isolate",
    False,
    "Run each trial in a fresh process (this command with --trial_index): memory stays bounded "
    "over long sweeps (in one process it grew about 25 MB per tiny trial over the first eight) "
    "at the cost of a JAX start-up per trial.",
)
_CV_FOLDS = flags.DEFINE_integer("cv_folds", 0, "If > 0, each trial is K-fold time CV.")
_CV_MODE = flags.DEFINE_enum("cv_mode", "expanding", ["expanding", "rolling"], "CV windows.")
_CV_WINDOW = flags.DEFINE_integer("cv_window", 1, "Rolling CV: blocks of training per fold.")
_PREEMPTED_EXIT = flags.DEFINE_integer(**cli.PREEMPTED_EXIT_FLAG)
flags.mark_flags_as_required(["config", "sweep", "workdir"])


def _run_isolated(indices: list[int], workdir: str) -> None:
    """Each trial in a child process; the flags given last win, so the child runs one trial."""
    from influence_jax.experiments import trials

    for i in indices:
        if os.path.exists(os.path.join(workdir, f"trial_{i:03d}", "result.json")):
            continue
        one = [f"--trial_index={i}", "--num_workers=1", "--worker_index=0", "--noisolate"]
        terminated = _run_forwarding_sigterm(
            [sys.executable, os.path.abspath(__file__), *sys.argv[1:], *one]
        )
        finished = os.path.exists(os.path.join(workdir, f"trial_{i:03d}", "result.json"))
        if terminated:  # no further trial
            done = "finished" if finished else "stopped at a saved checkpoint"
            raise trials.Preempted(f"SIGTERM: trial {i} {done}; run again to resume")
        if not finished:
            sys.exit(f"sweep stopped: trial {i} did not finish; run the same command to resume")


def _run_forwarding_sigterm(cmd: list[str]) -> bool:
    """Runs `cmd`, passing a SIGTERM to this process on to it (a scheduler may signal only the
    command it started: the trial then saves a checkpoint and stops, instead of training on
    unsignalled or being killed); returns whether one came."""
    child, came = subprocess.Popen(cmd), []

    def forward(signum: int, frame: object) -> None:
        came.append(signum)
        child.send_signal(signum)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        child.wait()
    except BaseException:  # Ctrl-C: as with subprocess.run, the trial does not outlive the sweep
        child.kill()
        child.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return bool(came)


def _check_cv(sweep, cv) -> None:
    """--cv_* flags and the sweep's metric agree: cross-validated trials report only "cv/..."
    keys and plain trials none, so any other pairing would rank by an empty column."""
    cross_validated = _CV_FOLDS.value != 0
    if cross_validated:
        cv.check_args(_CV_FOLDS.value, _CV_MODE.value, _CV_WINDOW.value)
    if cross_validated != sweep.metric.startswith("cv/"):
        need = "a 'cv/<metric>_<stat>' key (e.g. cv/auc_mean)" if cross_validated else "no cv/ key"
        raise ConfigError(
            f"{sweep.source}: metric: {sweep.metric!r}: with --cv_folds={_CV_FOLDS.value} the "
            f"trials' results have {need}; change the metric or --cv_folds"
        )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_libraries()
    from influence_jax.experiments import cv, trials
    from influence_jax.experiments import sweep as sweep_lib

    config, workdir = cli.loaded_config(_CONFIG.value), _WORKDIR.value
    preempted = False
    try:
        sweep = sweep_lib.load(_SWEEP.value)
        split = config.loop.final_eval_split
        if not _REPORT_ONLY.value:
            train_fn = trials.train_trial
            _check_cv(sweep, cv)
            if _CV_FOLDS.value:
                train_fn = functools.partial(
                    cv.trial_metrics,
                    num_folds=_CV_FOLDS.value,
                    mode=_CV_MODE.value,
                    window=_CV_WINDOW.value,
                )
                config = trials.with_overrides(config, {"loop.final_eval_split": "train"})
            indices = sweep_lib.assigned(
                sweep.num_trials, _TRIAL_INDEX.value, _NUM_WORKERS.value, _WORKER_INDEX.value
            )
            if _ISOLATE.value:
                _run_isolated(indices, workdir)
            else:
                sweep_lib.run(config, sweep, workdir, indices, train_fn)
    except trials.Preempted as e:
        print(f"sweep stopped: {e}", flush=True)
        preempted = True
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    print(sweep_lib.report(workdir, sweep, split), flush=True)
    if preempted:
        cli.exit_preempted("sweep", _PREEMPTED_EXIT.value)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
