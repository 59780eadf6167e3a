"""Candidate generation, the first stage of two-stage recommendation: non-learned sources
(co-visitation, the user's recent items, popular overall and in the user's categories) built
from a prepared dataset's histories as of a cut, optionally a learned two-tower retriever
(two_tower.py, trained by tools/train_retriever.py), merged into N candidates per user, and
their recall against the split's positives. tools/retrieve.py writes the candidates file that
tools/rank.py --candidates scores.

histories.py (the events and the positives), table.py (sparse key -> items tables, top-M per
group), covisit.py, sources.py, merge.py (quotas, de-duplication, seen items) and
retriever.py (the tables built once; candidates and recall per chunk of users).
"""

from influence_jax.retrieval.covisit import CovisitConfig, covisitation
from influence_jax.retrieval.histories import (
    Histories,
    behaviour_weights,
    from_arrays,
    load_histories,
    positives,
    seen_keys,
)
from influence_jax.retrieval.merge import DEFAULT_QUOTAS, LEARNED_QUOTAS, SOURCES, merge
from influence_jax.retrieval.retriever import (
    RETRIEVE,
    RetrievalConfig,
    Retriever,
    recall,
    top_k_metrics,
)

__all__ = [
    "DEFAULT_QUOTAS",
    "LEARNED_QUOTAS",
    "RETRIEVE",
    "SOURCES",
    "CovisitConfig",
    "Histories",
    "RetrievalConfig",
    "Retriever",
    "behaviour_weights",
    "covisitation",
    "from_arrays",
    "load_histories",
    "merge",
    "positives",
    "recall",
    "seen_keys",
    "top_k_metrics",
]
