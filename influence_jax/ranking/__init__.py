"""Batch ranking from a checkpoint: restore parameters only, score (user, candidate) pairs with one
jitted, device-sharded function, keep the top k per user and write them atomically.

run.py (restore, scoring function, batching), contexts.py (ids, users' histories as of the
ranking time, item rows), asof.py (histories at any time from a raw log), candidates.py (from
a file or every train item), output.py (top k, atomic writes, progress) and batch.py (`rank`,
`benchmark_scoring`). The names tools and influence.py use are re-exported here.
"""

from __future__ import annotations

import pyarrow.parquet as pq  # noqa: F401  (tests patch ranking.pq.write_table)

from influence_jax.ranking.asof import contexts_from_log, open_log
from influence_jax.ranking.batch import NUM_EXPLAINED_EVENTS, benchmark_scoring, rank
from influence_jax.ranking.candidates import (
    Candidates,
    default_candidates,
    file_candidates,
    read_candidate_ids,
    train_items,
)
from influence_jax.ranking.contexts import AS_OF, Contexts, IdMaps, item_rows, load_contexts
from influence_jax.ranking.output import Progress, top_k_rows, write_table
from influence_jax.ranking.run import (
    BEST_FILE,
    Run,
    batched,
    global_batch,
    load_run,
    make_score_fn,
    param_shardings,
    resolve_step,
)

__all__ = [
    "AS_OF",
    "BEST_FILE",
    "NUM_EXPLAINED_EVENTS",
    "Candidates",
    "Contexts",
    "IdMaps",
    "Progress",
    "Run",
    "batched",
    "benchmark_scoring",
    "contexts_from_log",
    "default_candidates",
    "file_candidates",
    "global_batch",
    "item_rows",
    "load_contexts",
    "load_run",
    "make_score_fn",
    "open_log",
    "param_shardings",
    "rank",
    "read_candidate_ids",
    "resolve_step",
    "top_k_rows",
    "train_items",
    "write_table",
]
