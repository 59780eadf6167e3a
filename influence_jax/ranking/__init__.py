"""Batch ranking from a checkpoint: score (user, candidate) pairs with the run's jitted,
device-sharded score function (scoring.py), keep the top k per user and write them atomically.

contexts.py (users' histories as of the ranking time, item rows), asof.py (histories at any
time from a raw log), candidates.py (from a file or every train item), output.py (top k; the
progress line is logs.Progress) and batch.py (`rank`). The names the tools use are re-exported
here.
"""

from __future__ import annotations

import pyarrow.parquet as pq  # noqa: F401  (tests patch ranking.pq.write_table)

from influence_jax.data.idmaps import IdMaps
from influence_jax.files import write_table
from influence_jax.logs import Progress
from influence_jax.ranking.asof import contexts_from_log, open_log
from influence_jax.ranking.batch import RETRIEVE, rank
from influence_jax.ranking.candidates import (
    Candidates,
    RetrievedCandidates,
    default_candidates,
    file_candidates,
    read_candidate_ids,
    train_items,
)
from influence_jax.ranking.contexts import AS_OF, Contexts, item_rows, load_contexts
from influence_jax.ranking.output import top_k_rows
from influence_jax.scoring import Run, load_run

__all__ = [
    "AS_OF",
    "RETRIEVE",
    "Candidates",
    "Contexts",
    "IdMaps",
    "Progress",
    "RetrievedCandidates",
    "Run",
    "contexts_from_log",
    "default_candidates",
    "file_candidates",
    "item_rows",
    "load_contexts",
    "load_run",
    "open_log",
    "rank",
    "read_candidate_ids",
    "top_k_rows",
    "train_items",
    "write_table",
]
