"""Feature selection by influence: drop behaviour types and extractors below a threshold, retrain.

    python tools/select_features.py --config=configs/default.py --workdir=runs/select \
      --threshold=0.1 [--loop] [--report=runs/demo/influence/influence.json]

Round 0 trains the config; each round drops what the previous round's influence report
(tools/influence_report.py's influence.json, computed on the validation split) puts below
`--threshold` (share of the group's influence, or raw influence with --criterion=influence),
retrains and prints the change of `--metric`. `--loop` repeats until the metric drops. Writes
WORKDIR/round_<r>/ (resumable runs), selection.json and selected_config.py, which
`python -m influence_jax.main --config=WORKDIR/selected_config.py` runs.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, logs, metrics  # noqa: E402
from influence_jax.data.schema import DataError  # noqa: E402
from influence_jax.errors import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the rounds and the summary.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.1, "Drop items whose influence is below this.")
_CRITERION = flags.DEFINE_enum("criterion", "share", ["share", "influence"], "What is compared.")
_METRIC = flags.DEFINE_string("metric", "valid/auc", "Validation metric to compare rounds by.")
_MODE = flags.DEFINE_enum("mode", "auto", ["auto", "max", "min"], "auto: min for losses.")
_LOOP = flags.DEFINE_bool("loop", False, "Repeat until the metric drops.")
_MAX_ROUNDS = flags.DEFINE_integer("max_rounds", 5, "Most retraining rounds with --loop.")
_MIN_DELTA = flags.DEFINE_float("min_delta", 0.0, "A change below -min_delta is a drop.")
_REPORT = flags.DEFINE_string(
    "report", None, "Existing influence.json for round 0's drops (checked before round 0 trains)."
)
_PREEMPTED_EXIT = flags.DEFINE_integer(**cli.PREEMPTED_EXIT_FLAG)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_libraries()
    from influence_jax.experiments import selection, trials

    mode = _MODE.value if _MODE.value != "auto" else metrics.mode(_METRIC.value)
    try:
        result = selection.run(
            cli.loaded_config(_CONFIG.value),
            _WORKDIR.value,
            _THRESHOLD.value,
            criterion=_CRITERION.value,
            metric=_METRIC.value,
            mode=mode,
            loop=_LOOP.value,
            max_rounds=_MAX_ROUNDS.value,
            min_delta=_MIN_DELTA.value,
            report_path=_REPORT.value,
        )
    except trials.Preempted as e:
        print(f"selection stopped: {e}", flush=True)
        cli.exit_preempted("select_features", _PREEMPTED_EXIT.value)
        return
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    print(selection.format_summary(result), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
