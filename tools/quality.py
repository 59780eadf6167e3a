"""Quality table: the default and full rankers vs the seed CNN and a DNN, real data, 3 seeds.

    python tools/quality.py --data_root=$INFLUENCE_JAX_DATA --workdir=runs/quality

Prepares each dataset once (tools/prepare_data.py defaults: Taobao and Retailrocket predict buy
with 4 sampled negatives, MovieLens predicts rating >= 4), trains every (model, seed) with the
dataset's config, and prints test AUC / GAUC / logloss as mean and spread over seeds, as a
Markdown table (also written to WORKDIR/quality.md and quality.json).
"""

from __future__ import annotations

import os
import sys
import time

import numpy as np
from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import files, train  # noqa: E402
from influence_jax.data import prepare, readers  # noqa: E402
from influence_jax.data.schema import DataError, Schema  # noqa: E402

# Every registered source with a public sample and a config (data/sources.py).
DATASETS = {n: s for n, s in readers.SOURCES.items() if s.sample and s.config}
MODELS = {  # variant -> config.model overrides
    "ranker (din+dnn+cnn)": {"name": "ranker"},
    "seed CNN": {"name": "seed_cnn"},
    "DNN": {"name": "ranker", "extractors": ("dnn",), "combine": "sum"},
    "full ranker (+bst)": {"name": "ranker", "extractors": ("din", "dnn", "cnn", "bst")},
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
_STEPS = flags.DEFINE_integer("num_steps", 0, "Override config.loop.num_steps (0: config's).")


def prepared(name: str) -> str:
    out = os.path.join(_WORKDIR.value, "prepared", name)
    try:
        Schema.load(out)
    except DataError:
        path = os.path.join(_DATA_ROOT.value, DATASETS[name].sample)
        if not os.path.exists(path):
            raise DataError(f"{path}: missing; set --data_root to the shared data folder") from None
        prepare.prepare(readers.open_source(name, path), out, prepare.PrepareOptions())
    return out


def run_one(name: str, data: str, variant: str, seed: int) -> dict[str, float]:
    module = __import__(f"configs.{DATASETS[name].config}", fromlist=["get_config"])
    config = module.get_config()
    config.data.path, config.seed = data, seed
    for k, v in MODELS[variant].items():
        config.model[k] = v
    if _STEPS.value:
        config.loop.num_steps = _STEPS.value
    config.loop.eval_every = 0
    slug = "".join(c if c.isalnum() else "_" for c in variant.split("(")[0].strip())
    workdir = os.path.join(_WORKDIR.value, "runs", f"{name}-{slug}-{seed}")
    if os.path.exists(workdir):
        import shutil

        shutil.rmtree(workdir)
    return train.train_and_evaluate(config, workdir)


def table(results: dict) -> str:
    lines = ["| dataset | model | test AUC | test GAUC | test logloss |", "|---|---|---|---|---|"]
    for name, by_model in results.items():
        for variant, runs in by_model.items():
            cells = []
            for key in ("test/auc", "test/gauc", "test/logloss"):
                v = np.array([r[key] for r in runs])
                cells.append(f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}")
            lines.append(f"| {name} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    logging.set_verbosity(logging.WARNING)
    results: dict = {}
    for name in _DATASETS.value:
        data = prepared(name)
        results[name] = {}
        for variant in _MODELS.value:
            if variant not in MODELS:
                raise app.UsageError(f"--models: unknown variant {variant!r}; have {list(MODELS)}")
            runs = []
            for seed in map(int, _SEEDS.value):
                t0 = time.time()
                m = run_one(name, data, variant, seed)
                runs.append({k: float(v) for k, v in m.items() if k.startswith("test/")})
                print(
                    f"{name:12s} {variant:22s} seed {seed}: test AUC {m['test/auc']:.4f} "
                    f"({time.time() - t0:.0f}s)",
                    flush=True,
                )
            results[name][variant] = runs
    md = table(results)
    print(md)
    files.write_text(os.path.join(_WORKDIR.value, "quality.md"), md + "\n")
    files.write_json(os.path.join(_WORKDIR.value, "quality.json"), results)


if __name__ == "__main__":
    app.run(main)
