"""Exact split metrics of a model: the loop's evaluations during training and the evaluation of a
saved run (tools/evaluate.py) go through the same `evaluate`.

Every example of the split counts once (the last batch is padded with weight-0 rows), and the
metrics (metrics.METRICS, per user and per target behaviour type) are computed on the host over
the whole split, so they are exact whatever the batch size or the number of devices.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh

from influence_jax import metrics, scoring, sharding
from influence_jax.data import pipeline
from influence_jax.data.schema import HIST_ITEM, NUM_RESERVED
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
    heads = examples.schema.heads
    per_head = {h: metrics.MetricAccumulator() for h in heads}
    for batch in pipeline.BatchIterator(batches, prefetch, num_threads):
        batch = {
            k: batch[k].astype(np.int32) if k == "user_key" else batch[k]
            for k in EVAL_KEYS
            if k in batch
        }
        out = {
            k: sharding.to_host(v)
            for k, v in eval_step(params, sharding.to_global(batch, mesh)).items()
        }
        acc.add(out["prob"], out["label"], out["user_key"], out["target_type"], out["weight"])
        if "head_probs" in out:
            for i, h in enumerate(heads):
                per_head[h].add(
                    out["head_probs"][:, i],
                    out["labels"][:, i],
                    out["user_key"],
                    out["target_type"],
                    out["weight"],
                )
    names = {i + NUM_RESERVED: n for i, n in enumerate(examples.schema.behaviour_types)}
    try:
        result = acc.result(names)
        for h, a in per_head.items():  # a multi-task model: each head's as "<head>/<metric>"
            if len(a):
                result.update({f"{h}/{k}": v for k, v in a.result(names).items()})
    except metrics.MetricsError as e:  # e.g. a label that is not 0 or 1: name the split
        where = os.path.join(getattr(examples, "root", ""), getattr(examples, "split", ""))
        raise metrics.MetricsError(f"{where}: {e}") from None
    return result


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


def predict(run: Run, split: str, batch_size: int | None = None) -> dict[str, np.ndarray]:
    """One row per example of `split` (as evaluation sees it), in the split's order: raw user and
    item ids, timestamp, label, target behaviour and the model's probability."""
    examples = run.dataset.eval_examples(split)
    keys = ("user", "item", "hist")
    gather = lambda rows: {k: v for k, v in examples.gather(rows).items() if k in keys}
    bs = scoring.global_batch(run, batch_size)
    n = len(examples)
    prob = scoring.batched(run.engine.score_fn(), run, n, gather, bs)
    maps, schema = run.dataset.id_maps, run.schema
    item_idx = examples.column("item")[:, schema.item_index(HIST_ITEM)]
    types = schema.behaviour_names()
    return {
        "user_id": maps.user_raw(examples.column("user_key")),
        "item_id": maps.raw("item_id", item_idx)[0],
        "timestamp": examples.column("timestamp"),
        "label": examples.column("label"),
        "target_behaviour": types[examples.column("target_type")],
        "score": np.zeros(0, np.float32) if prob is None else prob,
    }
