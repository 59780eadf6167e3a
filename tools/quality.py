"""Quality table: each dataset config's ranker (with and without its exact-match counts), the
seed CNN and a DNN against the baselines of influence_jax/baselines.py on the same rows, real
data, 3 seeds. The next-item task trains with configs/<dataset>.py, the conversion task with
configs/<dataset>_conversion.py (data/sources.py names both).

    python tools/quality.py --data_root=$INFLUENCE_JAX_DATA --workdir=runs/quality
    python tools/quality.py --data_root=$INFLUENCE_JAX_DATA --workdir=runs/quality_conversion \
      --task=conversion --horizon_hours=6

Prepares each dataset once (tools/prepare_data.py defaults: Taobao and Retailrocket predict buy
with 4 sampled negatives, MovieLens predicts rating >= 4; with --task=conversion every view is
an example labelled by a purchase within --horizon_hours, for the sources with an exposure
behaviour), scores every baseline, trains every (model, seed) with the dataset's config
(evaluating the validation split as the config says) and scores the test split with its best
checkpoint by validation AUC. The Markdown table (also WORKDIR/quality.md and quality.json)
gives test AUC / GAUC / PR-AUC / logloss as mean ± standard deviation over seeds, each
baseline's figures, and for each model the AUC difference to the best baseline (the one with
the best validation AUC, so that the test split picks nothing) with a 95 % interval from
resampling users. With `--task=conversion --heads`, each head of the sources with conversion
heads is its own block (its baselines and models on that head's labels) with the head of one
multi-task model trained on every head beside them, on the same exposures:

    python tools/quality.py --data_root=$INFLUENCE_JAX_DATA --workdir=runs/quality_heads \
      --task=conversion --heads --models=ranker
"""

from __future__ import annotations

import os
import shutil
import sys
import time

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import baselines, cli, files, lazy, metrics  # noqa: E402
from influence_jax.data import prepare, readers  # noqa: E402
from influence_jax.data.dataset import Dataset  # noqa: E402
from influence_jax.data.schema import DataError, Schema, is_prepared  # noqa: E402
from influence_jax.experiments import tables  # noqa: E402

# Loaded on first use (JAX, Orbax: seconds), after absl has parsed the flags: --help and flag
# errors stay fast.
evaluation = lazy.module("influence_jax.evaluation")
scoring = lazy.module("influence_jax.scoring")
trials = lazy.module("influence_jax.experiments.trials")
cv = lazy.module("influence_jax.experiments.cv")

# Every registered source with a public sample and a config (data/sources.py).
DATASETS = {n: s for n, s in readers.SOURCES.items() if s.sample and s.config}
MODELS = {  # variant -> config.model overrides of the dataset's config
    "ranker": {},  # the config's own model (shown with its extractors)
    "ranker without match": {"extractors": ("din", "dnn", "cnn")},
    "match and rates": {"extractors": ("match", "rates")},
    "seed CNN": {"name": "seed_cnn"},
    "DNN": {"extractors": ("dnn",), "combine": "sum"},
}

_DATA_ROOT = flags.DEFINE_string(
    "data_root",
    os.environ.get("INFLUENCE_JAX_DATA", ""),
    "Folder holding the public datasets (shared/data).",
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/quality", "Where prepared data and runs go.")
_DATASETS = flags.DEFINE_list("datasets", list(DATASETS), "Datasets to evaluate.")
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Model seeds.")
_MODELS = flags.DEFINE_list("models", list(MODELS), "Model variants to train (names of MODELS).")
_STEPS = flags.DEFINE_integer(
    "num_steps", 0, "Override config.loop.num_steps (0: config's).", lower_bound=0
)
_N_BOOT = flags.DEFINE_integer(
    "n_boot", 500, "User resamples for the interval of the difference.", lower_bound=1
)
_TASK = flags.DEFINE_enum(
    "task", "next_item", ["next_item", "conversion"], "The prepared task (tools/prepare_data.py)."
)
_HORIZON = flags.DEFINE_float("horizon_hours", 6.0, "--task=conversion: the label window.")
_HEADS = flags.DEFINE_bool(
    "heads",
    False,
    "--task=conversion: for the sources with conversion heads (data/sources.py), one block per "
    "head: its baselines and --models on that head's labels, and the head of a multi-task model "
    "trained on every head at once (the conversion config with model.name=multitask), the same "
    "exposures.",
)
_FOLDS = flags.DEFINE_integer(
    "folds",
    1,
    "Backtest folds: fold k re-prepares the log with its cut k test windows earlier "
    "(experiments/cv.py backtest_cut); every figure pools the folds' test rows.",
    lower_bound=1,
)


def prepared_path(name: str, fold: int = 0, target: str = "", heads: tuple[str, ...] = ()) -> str:
    """Where `prepared` keeps the dataset prepared for these arguments."""
    task = _TASK.value
    out = os.path.join(
        _WORKDIR.value, "prepared", name if task == "next_item" else f"{name}-{task}"
    )
    if target:
        out = f"{out}-{target}"
    elif heads:
        out = f"{out}-heads"
    return f"{out}-fold{fold}" if fold else out


def prepared(name: str, fold: int = 0, target: str = "", heads: tuple[str, ...] = ()) -> str:
    """The dataset prepared for the task; fold k > 0 with its cut k test windows earlier; with
    `target`, the conversion task for that behaviour, with `heads` one label column per head."""
    out = prepared_path(name, fold, target, heads)
    kw = {}
    if target:
        kw = {"target_behaviours": (target,)}
    elif heads:
        kw = {"heads": heads}
    cut = {}
    if fold:
        cut = cv.backtest_cut(Schema.load(prepared(name)).extra["split"], fold)
    try:
        Schema.load(out)
    except DataError:
        path = os.path.join(_DATA_ROOT.value, DATASETS[name].sample)
        if not os.path.exists(path):
            raise DataError(f"{path}: missing; set --data_root to the shared data folder") from None
        opts = prepare.PrepareOptions(task=_TASK.value, horizon_hours=_HORIZON.value, **cut, **kw)
        prepare.prepare(readers.open_source(name, path), out, opts)
    return out


def config_for(name: str, variant: str):
    """The dataset's config for the task (next-item or conversion) with the variant's model."""
    spec = DATASETS[name]
    module = spec.conversion_config if _TASK.value == "conversion" else spec.config
    config = __import__(f"configs.{module}", fromlist=["get_config"]).get_config()
    for k, v in MODELS[variant].items():
        config.model[k] = v
    return config


def model_label(variant: str, config) -> str:
    """The table's name of a variant: a ranker shows its extractors (but the DNN)."""
    m = config.model
    shown = m.name == "ranker" and variant != "DNN"
    return f"ranker ({'+'.join(m.extractors)})" if shown else variant


def run_one(
    name: str, data: str, variant: str, seed: int, fold: int = 0, heads: tuple[str, ...] = ()
) -> np.ndarray | dict[str, np.ndarray]:
    """Trains one (model, seed); returns its test scores (best checkpoint), rows in split order.
    With `heads` (variant "multitask"): {head: that head's test scores}."""
    config = config_for(name, "ranker" if heads else variant)
    config.data.path, config.seed = data, seed
    if heads:  # objective buy, as tools/multitask_compare.py: its best checkpoint scores all
        config.model.name = "multitask"
        config.model.multitask.objective = "buy" if "buy" in heads else heads[-1]
    if _STEPS.value:
        config.loop.num_steps = _STEPS.value
        config.loop.eval_every = 0  # a short run: one evaluation, at the end
    slug = "".join(c if c.isalnum() else "_" for c in variant.split("(")[0].strip())
    tag = f"-fold{fold}" if fold else ""
    workdir = os.path.join(_WORKDIR.value, "runs", f"{name}-{slug}-{seed}{tag}")
    if os.path.exists(workdir):
        shutil.rmtree(workdir)
    trials.train_whole(config, workdir)  # a SIGTERM stops the tool, not just the run
    if heads:
        return {
            h: evaluation.predict(scoring.load_run(workdir, data, "best", h), "test")["score"]
            for h in heads
        }
    run = scoring.load_run(workdir, data, step="best")
    return evaluation.predict(run, "test")["score"]


def pooled(datasets: list[Dataset], split: str) -> dict:
    """Every baseline's scores on `split` of each fold, rows concatenated fold by fold, with
    `user_key` unique per (fold, user) (GAUC groups) and `user_raw` the raw user id (the
    interval resamples a user's rows of every fold together)."""
    parts = [baselines.scores(d, split) for d in datasets]
    offset, keys, raw = 0, [], []
    for d, p in zip(datasets, parts, strict=True):
        keys.append(p["user_key"].astype(np.int64) + offset)
        offset = int(keys[-1].max(initial=offset - 1)) + 1
        raw.append(np.asarray(d.id_maps.user_raw(p["user_key"])).astype(str))
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros(0)
    return {
        "label": cat([p["label"] for p in parts]),
        "user_key": cat(keys),
        "user_raw": cat(raw),
        "scores": {n: cat([p["scores"][n] for p in parts]) for n in parts[0]["scores"]},
        "probabilities": parts[0]["probabilities"],
        "fold_rows": [len(p["label"]) for p in parts],
        "fold_positives": [int(p["label"].sum()) for p in parts],
    }


def evaluate_dataset(name: str, target: str = "", multitask: dict | None = None) -> dict:
    """Baselines and every (model, seed) on one dataset, test rows pooled over the folds; with
    `target`, the conversion task of that head, and `multitask` {seed: {head: test scores}}
    (same rows) adds the multi-task model's row for it."""
    folds = [prepared(name, k, target) for k in range(_FOLDS.value)]
    datasets = [Dataset(d) for d in folds]
    best = next(iter(baselines.table(pooled(datasets, "valid"))))  # best validation AUC first
    base = pooled(datasets, "test")
    label, users = base["label"], base["user_key"]
    out = {
        "positives": int(label.sum()),
        "rows": len(label),
        "folds": len(folds),
        "fold_positives": base["fold_positives"],
        "fold_rows": base["fold_rows"],
        "best_baseline": best,
        "baselines": baselines.table(base),
        "models": {},
    }
    summarise = lambda scores: _model_figures(label, users, base, best, scores)
    for variant in _MODELS.value:  # names checked by _check_flags
        scores = []
        for seed in map(int, _SEEDS.value):
            t0 = time.time()
            scores.append(
                np.concatenate([run_one(name, d, variant, seed, k) for k, d in enumerate(folds)])
            )
            auc = metrics.auc(label, scores[-1])
            print(f"{name:12s} {variant:22s} seed {seed}: test AUC {auc:.4f} "
                  f"({time.time() - t0:.0f}s)", flush=True)  # fmt: skip
        out["models"][model_label(variant, config_for(name, variant))] = summarise(scores)
    if multitask:
        out["models"][f"multitask, head {target}"] = summarise(
            [per_head[target] for per_head in multitask.values()]
        )
    return out


def _model_figures(label, users, base: dict, best: str, scores: list[np.ndarray]) -> dict:
    """A model's figures over seeds and its paired AUC difference to the best baseline."""
    per_seed = [baselines.evaluate(label, s, users, prob=True) for s in scores]
    m = {k: [r[k] for r in per_seed] for k in ("auc", "gauc", "pr_auc", "logloss")}
    m["vs_best_baseline"] = baselines.paired_auc_difference(
        label, base["user_raw"], scores, base["scores"][best], _N_BOOT.value
    )
    return m


def evaluate_heads(name: str) -> dict:
    """Every head of `name` as its own block: the head's baselines and models, and the head of
    one multi-task model trained on all of them (the rows must be the same exposures)."""
    heads = DATASETS[name].heads
    data = prepared(name, heads=heads)
    test = Dataset(data).eval_examples("test")
    for i, h in enumerate(heads):  # the same exposures in the same order, labelled per head
        single = Dataset(prepared(name, target=h)).eval_examples("test")
        same = len(single) == len(test) and all(
            np.array_equal(single.column(k), test.column(k)) for k in ("user_key", "timestamp")
        )
        if not same or not np.array_equal(single.column("label"), test.column("labels")[:, i]):
            raise DataError(f"{data}: its test rows differ from the {h!r} task's; re-prepare")
    multitask = {}
    for seed in map(int, _SEEDS.value):
        t0 = time.time()
        multitask[seed] = run_one(name, data, "multitask", seed, heads=heads)
        print(f"{name:12s} multitask seed {seed}: {time.time() - t0:.0f}s", flush=True)
    return {f"{name}, head {h}": evaluate_dataset(name, h, multitask) for h in heads}


def _seeds() -> list[int]:
    return cli.parse_seeds(_SEEDS.value)


def _checked_datasets() -> list[str]:
    """The datasets to evaluate (every flag checked first, before any preparation or training),
    left out with a line those that the task does not apply to."""
    names = list(_DATASETS.value)
    unknown = [n for n in names if n not in DATASETS]
    if unknown or not names or len(set(names)) != len(names):
        what = f"{unknown} not known" if unknown else "none given" if not names else "a repeat"
        raise DataError(f"--datasets: {what}; choose from {list(DATASETS)}")
    unknown = [m for m in _MODELS.value if m not in MODELS]
    if unknown or not _MODELS.value:
        what = f"{unknown} not known" if unknown else "none given"
        raise DataError(f"--models: {what}; choose from {list(MODELS)}")
    _seeds()
    if _HEADS.value and _TASK.value != "conversion":
        raise DataError("--heads needs --task=conversion")
    if _HEADS.value and _FOLDS.value != 1:
        raise DataError(f"--heads takes one fold (--folds=1), not --folds={_FOLDS.value}")
    if _TASK.value == "conversion" and not _HORIZON.value > 0:
        raise DataError(f"--horizon_hours must be positive, got {_HORIZON.value}")
    files.check_output(_WORKDIR.value, "workdir", folder=True)
    if _DATA_ROOT.value and not os.path.isdir(_DATA_ROOT.value):
        raise DataError(f"--data_root={_DATA_ROOT.value}: no such folder")
    if _TASK.value == "conversion":  # only sources with an exposure behaviour and a config
        keep = [n for n in names if DATASETS[n].conversion_config]
        for n in sorted(set(names) - set(keep)):
            print(f"{n}: no exposure behaviour, not a conversion dataset; left out", flush=True)
        names = keep
        if not names:
            conversion = [n for n, spec in DATASETS.items() if spec.conversion_config]
            raise DataError(f"--datasets: none has a conversion task; choose from {conversion}")
    for name in names:  # the raw log, unless everything the run reads is prepared already
        path = os.path.join(_DATA_ROOT.value, DATASETS[name].sample)
        if not os.path.exists(path) and not all(map(is_prepared, _needed(name))):
            where = f"--data_root={_DATA_ROOT.value}" if _DATA_ROOT.value else "--data_root unset"
            raise DataError(
                f"{where}: {name}'s {DATASETS[name].sample} is not there; set --data_root to "
                "the shared data folder (INFLUENCE_JAX_DATA)"
            )
    return names


def _needed(name: str) -> list[str]:
    """The prepared folders that evaluating `name` reads."""
    heads = DATASETS[name].heads if _HEADS.value else ()
    if heads:
        return [prepared_path(name, heads=heads)] + [prepared_path(name, target=h) for h in heads]
    return [prepared_path(name, k) for k in range(_FOLDS.value)]


def _main() -> None:
    names = _checked_datasets()
    results = {}
    for name in names:
        if _HEADS.value and DATASETS[name].heads:
            results.update(evaluate_heads(name))
        else:
            results[name] = evaluate_dataset(name)
    md = tables.quality_table(results)
    print(md)
    files.write_text(os.path.join(_WORKDIR.value, "quality.md"), md + "\n")
    files.write_json(os.path.join(_WORKDIR.value, "quality.json"), results)


if __name__ == "__main__":
    app.run(cli.tool_main(_main, "quality"), flags_parser=cli.parse_flags)
