"""Multi-task against single-task on real data: each head of the multi-task model beside the
single-task model trained for that head alone, on the same exposures, over seeds.

    python tools/multitask_compare.py --data_root=$INFLUENCE_JAX_DATA \
      --workdir=runs/multitask_compare

For each dataset with conversion heads in data/sources.py (Taobao: cart, fav, buy; Retailrocket:
cart, buy) the conversion task is
prepared once with `--heads` and once per head with that head as its only target (the same
exposures: rows depend only on the exposure and the horizon). The multi-task model is the
dataset's conversion config with `model.name="multitask"` (objective buy: its best checkpoint
by validation AUC of buy scores every head, which favours buy); each single-task model is the
conversion config on its head's labels, best checkpoint by its own validation AUC. The table
(also WORKDIR/multitask.md and multitask.json) gives test AUC per head as mean ± standard
deviation over seeds and the paired difference (multi - single) with a 95 % t interval.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files, influence_runs, lazy  # noqa: E402
from influence_jax.data import prepare, readers  # noqa: E402
from influence_jax.data.schema import DataError, Schema, is_prepared  # noqa: E402
from influence_jax.experiments import tables  # noqa: E402

# Loaded on first use (JAX, Orbax: seconds), after absl has parsed the flags: --help and flag
# errors stay fast.
evaluation = lazy.module("influence_jax.evaluation")
scoring = lazy.module("influence_jax.scoring")
trials = lazy.module("influence_jax.experiments.trials")

# The registered sources with conversion heads (data/sources.py) and their heads.
HEADS = {n: s.heads for n, s in readers.SOURCES.items() if s.heads and s.conversion_config}

_DATA_ROOT = flags.DEFINE_string(
    "data_root", os.environ.get("INFLUENCE_JAX_DATA"), "Shared data folder (INFLUENCE_JAX_DATA)."
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/multitask_compare", "Prepared data and runs.")
_DATASETS = flags.DEFINE_list("datasets", list(HEADS), "Datasets to compare.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Model seeds.")
_HORIZON = flags.DEFINE_float("horizon_hours", 6.0, "The conversion window.")
_STEPS = flags.DEFINE_integer(
    "num_steps", 0, "Override config.loop.num_steps (0: config's).", lower_bound=0
)


def prepared_path(name: str, target: str = "") -> str:
    """Where `prepared` keeps the conversion task of `name` (heads, or the one `target`)."""
    return os.path.join(_WORKDIR.value, "prepared", f"{name}-{target or 'heads'}")


def prepared(name: str, heads: tuple[str, ...], target: str = "") -> str:
    """The conversion task of `name` with label heads, or with the one target `target`."""
    out = prepared_path(name, target)
    try:
        Schema.load(out)
    except DataError:
        spec = readers.SOURCES[name]
        path = os.path.join(_DATA_ROOT.value or "", spec.sample)
        if not _DATA_ROOT.value or not os.path.exists(path):
            raise DataError(f"{path}: missing; set --data_root to the shared data folder") from None
        kw = {"target_behaviours": (target,)} if target else {"heads": heads}
        opts = prepare.PrepareOptions(task="conversion", horizon_hours=_HORIZON.value, **kw)
        prepare.prepare(readers.open_source(name, path), out, opts)
    return out


def run_one(name: str, data: str, seed: int, multitask: bool, tag: str) -> dict[str, float]:
    """Trains one run; returns the test metrics of its best checkpoint."""
    spec = readers.SOURCES[name]
    config = __import__(f"configs.{spec.conversion_config}", fromlist=["x"]).get_config()
    config.data.path, config.seed, config.data.shuffle_seed = data, seed, seed
    if multitask:
        config.model.name, config.model.multitask.objective = "multitask", "buy"
    if _STEPS.value:
        config.loop.num_steps, config.loop.eval_every = _STEPS.value, 0
    workdir = os.path.join(_WORKDIR.value, "runs", f"{name}-{tag}-{seed}")
    shutil.rmtree(workdir, ignore_errors=True)
    trials.train_whole(config, workdir)  # a SIGTERM stops the tool, not just the run
    return evaluation.evaluate_run(scoring.load_run(workdir, data, step="best"), "test")


def compare(name: str, seeds: list[int]) -> dict:
    heads = HEADS[name]
    multi = [run_one(name, prepared(name, heads), s, True, "multitask") for s in seeds]
    out = {}
    for h in heads:
        single = [run_one(name, prepared(name, heads, h), s, False, f"single-{h}") for s in seeds]
        m = [r[f"{h}/auc"] for r in multi]
        s = [r["auc"] for r in single]
        out[h] = {
            "positives": int(Schema.load(prepared(name, heads, h)).splits["test"]["label_sum"]),
            "multitask_auc": m,
            "single_auc": s,
            "difference": influence_runs.over_runs(list(np.subtract(m, s))),
        }
        print(f"{name} {h}: multi-task test AUC {m}, single-task {s}", file=sys.stderr)
    return out


def _seeds() -> list[int]:
    return cli.parse_seeds(_SEEDS.value)


def _main() -> None:
    # Every flag before any preparation or training.
    names = list(_DATASETS.value)
    unknown = [d for d in names if d not in HEADS]
    if unknown or not names or len(set(names)) != len(names):
        what = f"{unknown} unknown" if unknown else "none given" if not names else "a repeat"
        raise DataError(f"--datasets: {what}; choose from {list(HEADS)}")
    seeds = _seeds()
    if not _HORIZON.value > 0:
        raise DataError(f"--horizon_hours must be positive, got {_HORIZON.value}")
    files.check_output(_WORKDIR.value, "workdir", folder=True)
    if _DATA_ROOT.value and not os.path.isdir(_DATA_ROOT.value):
        raise DataError(f"--data_root={_DATA_ROOT.value}: no such folder")
    for name in names:  # the raw log, unless every task the comparison reads is prepared already
        sample = readers.SOURCES[name].sample
        needed = [prepared_path(name)] + [prepared_path(name, h) for h in HEADS[name]]
        has_log = _DATA_ROOT.value and os.path.exists(os.path.join(_DATA_ROOT.value, sample))
        if not has_log and not all(map(is_prepared, needed)):
            where = f"--data_root={_DATA_ROOT.value}" if _DATA_ROOT.value else "--data_root unset"
            raise DataError(
                f"{where}: {name}'s {sample} is not there; set --data_root to the shared data "
                "folder (INFLUENCE_JAX_DATA)"
            )
    results = {name: compare(name, seeds) for name in names}
    md = tables.multitask_table(results)
    files.write_json(os.path.join(_WORKDIR.value, "multitask.json"), results)
    files.write_text(os.path.join(_WORKDIR.value, "multitask.md"), md + "\n")
    print(md)


if __name__ == "__main__":
    app.run(cli.tool_main(_main, "multitask_compare"), flags_parser=cli.parse_flags)
