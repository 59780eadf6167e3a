"""Two-stage ranking end to end over seeds (tools/ranking_quality.py): the ranked top k and the
retriever's single-source lists scored against the test period's positives, per user, and the
paired differences "ranked - list" with percentile intervals from resampling users."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from influence_jax import influence, ranking
from influence_jax.data.schema import DataError
from influence_jax.scoring import Run

METRICS = ("hr", "ndcg", "mrr")


def evaluate_run(run: Run, retrieve: int, k: int) -> dict:
    """rank.py --evaluate's evaluation of one run as of the test split, with every user's
    values."""
    with tempfile.TemporaryDirectory() as tmp:
        s = ranking.rank(
            run,
            os.path.join(tmp, "top.parquet"),
            top_k=k,
            retrieve=retrieve,
            evaluate=True,
            evaluate_per_user=True,
            log=lambda _: None,
        )
    return s["evaluation"]


def compare(per_seed: list[dict], k: int, n_boot: int, seed: int = 0) -> dict:
    """The seeds' evaluations of one dataset -> means, the seeds' spread and the paired
    differences "ranked - list" with intervals over users."""
    users = per_seed[0]["ranked"]["per_user"]["user_key"]
    for e in per_seed[1:]:
        if not np.array_equal(e["ranked"]["per_user"]["user_key"], users):
            raise DataError("the seeds' runs rank different users; were they prepared alike?")
    ranked = {m: np.mean([e["ranked"]["per_user"][m] for e in per_seed], 0) for m in METRICS}
    seeds = {m: [float(np.mean(e["ranked"]["per_user"][m])) for e in per_seed] for m in METRICS}
    out = {
        "users": int(len(users)),
        "seeds": len(per_seed),
        "k": k,
        "ranked": {m: {"mean": float(ranked[m].mean()), "seeds": seeds[m]} for m in METRICS},
        "lists": {},
    }
    rng = np.random.default_rng(seed)
    for name, got in per_seed[0].items():
        if name == "ranked":
            continue
        pu = got["per_user"]
        if not np.array_equal(pu["user_key"], users):
            raise DataError(f"list {name!r} covers other users than the ranked top {k}")
        diffs = np.stack([ranked[m] - pu[m] for m in METRICS], 1)
        mean, lo, hi = influence.bootstrap(diffs, n_boot, rng)
        out["lists"][name.removesuffix(" only")] = {
            m: {
                "mean": float(np.mean(pu[m])),
                "diff": float(mean[j]),
                "ci_low": float(lo[j]),
                "ci_high": float(hi[j]),
            }
            for j, m in enumerate(METRICS)
        }
    return out
