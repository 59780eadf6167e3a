"""Exact split metrics of a model: the loop's evaluations during training and the evaluation of a
saved run (tools/evaluate.py) go through the same `evaluate`.

Every example of the split counts once (the last batch is padded with weight-0 rows), and the
metrics (metrics.METRICS, per user and per target behaviour type) are computed on the host over
the whole split, so they are exact whatever the batch size or the number of devices.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from influence_jax import metrics, sharding
from influence_jax.data import pipeline
from influence_jax.data.schema import NUM_RESERVED
from influence_jax.engine import EVAL_KEYS
from influence_jax.scoring import Run


def evaluate(
    eval_step: Callable,
    params: Any,
    examples: Any,
    batch_size: int,
    mesh: Mesh,
    prefetch: int = 4,
    num_threads: int = 2,
) -> dict[str, float]:
    """Exact metrics of `eval_step` with `params` over every example of `examples`.

    Args:
      eval_step: the engine's jitted eval step (probabilities and pass-through columns).
      examples: one split as the run sees it (an ExampleStore or a restricted view of one).
      batch_size: the global evaluation batch.
    """
    batches = pipeline.EvalBatches(examples, batch_size, jax.process_index(), jax.process_count())
    acc = metrics.MetricAccumulator()
    for batch in pipeline.BatchIterator(batches, prefetch, num_threads):
        batch = {k: batch[k].astype(np.int32) if k == "user_key" else batch[k] for k in EVAL_KEYS}
        out = {
            k: sharding.to_host(v)
            for k, v in eval_step(params, sharding.to_global(batch, mesh)).items()
        }
        acc.add(out["prob"], out["label"], out["user_key"], out["target_type"], out["weight"])
    names = {i + NUM_RESERVED: n for i, n in enumerate(examples.schema.behaviour_types)}
    return acc.result(names)


def evaluate_run(run: Run, split: str, batch_size: int | None = None) -> dict[str, float]:
    """The metrics of a loaded run on `split`, as its training evaluated them."""
    d = run.config.data
    return evaluate(
        run.engine.eval_step,
        run.params,
        run.dataset.eval_examples(split),
        int(batch_size or d.eval_batch_size),
        run.mesh,
        d.prefetch,
        d.num_threads,
    )
