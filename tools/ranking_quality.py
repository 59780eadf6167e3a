"""Two-stage ranking end to end over seeds: the ranked top k against the retriever's single-source
lists, with intervals from resampling users.

    python tools/ranking_quality.py --workdir=runs/quality [--datasets=...] [--seeds=0,1,2]

Reads the next-item runs that `tools/quality.py --workdir=WORKDIR` trains
(WORKDIR/runs/<dataset>-<model>-<seed>, best checkpoint by validation AUC). For each dataset and
seed it ranks every user as of the test split's start exactly as `tools/rank.py --evaluate`
does (N retrieved candidates per user, then the model's top k), and scores the top k and each
single-source list (recent items, co-visitation, category, popular) against the items each
user engaged with in the test period: HR@k, NDCG@k and MRR@k over the users with a positive.
The model's per-user values are averaged over the seeds (the lists do not depend on them);
each difference "ranked - list" gets a 95 % percentile interval from resampling those users
(2,000 resamples). Writes WORKDIR/ranking_quality.json and prints a table; the docs' table is
rendered from that file (tools/readme_figures.py, block `ranking_quality`).
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files, lazy, retrieval  # noqa: E402
from influence_jax.data import readers  # noqa: E402
from influence_jax.data.schema import DataError  # noqa: E402
from influence_jax.experiments import tables  # noqa: E402

# Loaded on first use (JAX, Orbax: seconds), after absl has parsed the flags: --help and flag
# errors stay fast.
ranking = lazy.module("influence_jax.ranking")
scoring = lazy.module("influence_jax.scoring")
ranking_quality = lazy.module("influence_jax.experiments.ranking_quality")

DATASETS = [n for n, s in readers.SOURCES.items() if s.sample and s.config]

_WORKDIR = flags.DEFINE_string("workdir", "runs/quality", "tools/quality.py's workdir.")
_DATASETS = flags.DEFINE_list(
    "datasets",
    DATASETS,
    "Datasets whose runs to rank (another name: its runs must be in WORKDIR/runs already).",
)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1", "2"], "Model seeds.")
_MODEL = flags.DEFINE_string("model", "ranker", "The model's slug in the run folders' names.")
_RETRIEVE = flags.DEFINE_integer(
    "retrieve", retrieval.RETRIEVE, "Candidates per user.", lower_bound=1
)
_TOP_K = flags.DEFINE_integer("top_k", 10, "Length of the evaluated lists.", lower_bound=1)
_N_BOOT = flags.DEFINE_integer("n_boot", 2000, "User resamples for the intervals.", lower_bound=1)
_OUTPUT = flags.DEFINE_string("output", "", "JSON output (default WORKDIR/ranking_quality.json).")


def _check_flags() -> str:
    """Checks every flag and that every run exists, before any ranking; returns the output."""
    names, seeds = list(_DATASETS.value), list(_SEEDS.value)
    if not names or len(set(names)) != len(names):
        what = "names no dataset" if not names else "names a dataset twice"
        raise DataError(
            f"--datasets={','.join(names)}: {what}; the known ones are {', '.join(DATASETS)}"
        )
    cli.parse_seeds(seeds)  # the run folders' names hold quality.py's integer seeds
    path = _OUTPUT.value or os.path.join(_WORKDIR.value, "ranking_quality.json")
    files.check_output(path, "output" if _OUTPUT.value else "workdir")
    for name in names:
        for seed in seeds:
            workdir = os.path.join(_WORKDIR.value, "runs", f"{name}-{_MODEL.value}-{seed}")
            if os.path.isdir(workdir):
                continue  # any dataset's runs will do (the tests rank a tiny one's)
            if name not in DATASETS:
                raise DataError(
                    f"--datasets: {name!r} is not a known dataset (the known ones are "
                    f"{', '.join(DATASETS)}), and {workdir}: no such run"
                )
            raise DataError(
                f"{workdir}: no such run; train it with tools/quality.py "
                f"--workdir={_WORKDIR.value} --datasets={name} --models=ranker --seeds={seed}"
            )
    return path


def _main() -> None:
    path = _check_flags()
    results = {}
    for name in _DATASETS.value:
        per_seed = []
        for seed in _SEEDS.value:
            workdir = os.path.join(_WORKDIR.value, "runs", f"{name}-{_MODEL.value}-{seed}")
            print(f"{name}, seed {seed}: ranking as of test ...", file=sys.stderr, flush=True)
            run = scoring.load_run(workdir, step="best")
            per_seed.append(ranking_quality.evaluate_run(run, _RETRIEVE.value, _TOP_K.value))
        results[name] = ranking_quality.compare(per_seed, _TOP_K.value, _N_BOOT.value)
        results[name]["retrieve"] = _RETRIEVE.value
        results[name]["seed_names"] = list(_SEEDS.value)
    files.write_text(path, json.dumps(results, indent=2, sort_keys=True) + "\n")
    print(tables.ranking_quality_table(results))
    print(f"wrote {path}")


if __name__ == "__main__":
    app.run(cli.tool_main(_main, "ranking_quality"), flags_parser=cli.parse_flags)
