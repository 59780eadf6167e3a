"""Time-respecting cross-validation: K folds over the training period, each evaluated after it.

    python tools/cv.py --config=configs/taobao.py --config.data.path=.prepared/taobao \
      --workdir=runs/taobao_cv --cv_folds=4 --cv_mode=expanding
    python tools/cv.py ... --cv_mode=rolling --cv_window=2   # train on the 2 blocks before

Fold i trains on train-split examples before its evaluation window and evaluates on the window
(influence_jax/experiments/cv.py). Writes WORKDIR/fold_<i>/ (a resumable run each), cv.json and
cv.csv, and prints each fold's AUC/GAUC with their mean, standard deviation, min and max. Works
on prepared datasets and on synthetic configs (configs/tiny.py), whose data is generated once in
WORKDIR/data-<hash> and carries timestamps. The fold count, mode and window and the config are
checked before any folder is made or any data generated.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, logs  # noqa: E402
from influence_jax.data.schema import DataError  # noqa: E402
from influence_jax.errors import ConfigError  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Folder for the folds and the summary.")
_FOLDS = flags.DEFINE_integer("cv_folds", 3, "Number of folds K (the period is cut in K + 1).")
_MODE = flags.DEFINE_enum("cv_mode", "expanding", ["expanding", "rolling"], "Training windows.")
_WINDOW = flags.DEFINE_integer("cv_window", 1, "Rolling: blocks of training before each fold.")
_PREEMPTED_EXIT = flags.DEFINE_integer(**cli.PREEMPTED_EXIT_FLAG)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logs.quiet_libraries()
    from influence_jax.experiments import cv, trials

    try:
        config = cli.loaded_config(_CONFIG.value)
        result = cv.run(config, _WORKDIR.value, _FOLDS.value, _MODE.value, _WINDOW.value)
    except trials.Preempted as e:
        print(f"cross-validation stopped: {e}", flush=True)
        cli.exit_preempted("cv", _PREEMPTED_EXIT.value)
        return
    except (ConfigError, DataError) as e:
        sys.exit(f"error: {e}")
    print(cv.format_summary(result), flush=True)


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
