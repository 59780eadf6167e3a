"""Input-pipeline throughput against the train step it feeds (`benchmark.py --what=input`).

For each history length, generates a synthetic prepared dataset, times the training
pipeline (Grain read threads + prefetch, vectorised batch gathers from memory-mapped shards)
on its own, then times the default model's jitted train step on batches already in memory,
and prints both with their ratio. The pipeline should deliver at least 5x the step's rate.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

import jax  # noqa: E402

from configs import default  # noqa: E402
from influence_jax import engine, sharding  # noqa: E402
from influence_jax.data import pipeline, synthetic  # noqa: E402
from influence_jax.data.store import ExampleStore  # noqa: E402


def input_rate(store: ExampleStore, batch: int, n: int, threads: int, prefetch: int) -> float:
    source = pipeline.TrainBatches(store, batch, seed=0, num_batches=n + 5)
    it = pipeline.BatchIterator(source, prefetch=prefetch, num_threads=threads)
    for _ in range(5):  # warm the threads and page cache
        next(it)
    t0 = time.perf_counter()
    for _ in range(n):
        next(it)
    return n * batch / (time.perf_counter() - t0)


def step_rate(config, schema, store: ExampleStore, batch: int, n: int, warmup: int = 1) -> float:
    """Examples/s of the engine's jitted train step (dense or row-sparse from config)."""
    with config.unlocked():
        config.loop.num_steps = 1000
    eng = engine.setup(config, schema)
    state, step, mesh = eng.init_state(), eng.train_step, eng.mesh
    source = pipeline.TrainBatches(store, batch, seed=0, num_batches=4)
    batches = [sharding.to_global(source[i], mesh) for i in range(4)]
    for i in range(warmup):  # compiles; later ones fault in the pages of large tables
        state, m = step(state, batches[i % 4])
    jax.block_until_ready(m)
    t0 = time.perf_counter()
    for i in range(n):
        state, m = step(state, batches[i % 4])
    jax.block_until_ready(m)
    return n * batch / (time.perf_counter() - t0)


def run(max_lens=(50, 200), batch: int = 1024, examples: int = 60_000) -> list[dict]:
    """Returns one row per history length: input and train-step examples/s and their ratio."""
    rows = []
    for max_len in max_lens:
        config = default.get_config()
        syn = config.data.synthetic
        syn.max_len, syn.train_examples = max_len, examples
        syn.valid_examples = syn.test_examples = 1_000
        with tempfile.TemporaryDirectory() as tmp:
            schema = synthetic.generate(syn, os.path.join(tmp, "data"))
            store = ExampleStore(os.path.join(tmp, "data"), "train", schema)
            inp = input_rate(store, batch, 40, config.data.num_threads, config.data.prefetch)
            stp = step_rate(config, schema, store, batch, 10)
        rows.append(
            {
                "max_len": max_len,
                "batch": batch,
                "input_ex_per_s": inp,
                "train_step_ex_per_s": stp,
                "ratio": inp / stp,
            }
        )
    return rows


def vocab_scale(items=(100_000, 10_000_000), batch: int = 1024, dim: int = 64) -> list[dict]:
    """Train-step time of the default model as the item table grows, dense Adam vs sparse."""
    rows = []
    for sparse_on in (False, True):
        for n_items in items:
            config = default.get_config()
            syn = config.data.synthetic
            syn.num_items, syn.train_examples = n_items, 8 * batch
            syn.valid_examples = syn.test_examples = 1_000
            config.model.embed_dim = dim
            # Item tables go row-sparse (the 50K-row threshold, lowered for smaller test tables).
            config.opt.sparse_embeddings = sparse_on
            config.opt.sparse_min_rows = min(50_000, *items)
            with tempfile.TemporaryDirectory() as tmp:
                schema = synthetic.generate(syn, os.path.join(tmp, "data"))
                store = ExampleStore(os.path.join(tmp, "data"), "train", schema)
                # Sparse steps are short and a 10M-row table's first steps fault its pages
                # in (5 timed steps read 1.34x; 20 after 3 warm-ups 1.04-1.23x, 2-core Zen 3).
                n, warmup = (20, 3) if sparse_on else (5, 1)
                rate = step_rate(config, schema, store, batch, n, warmup)
            rows.append(
                {
                    "section": "sparse_scale",
                    "items": n_items,
                    "update": "sparse" if sparse_on else "dense Adam",
                    "batch": batch,
                    "step_ms": 1000 * batch / rate,
                }
            )
    return rows


def print_scale(rows: list[dict]) -> None:
    print(f"{'update':>11} {'items':>11} {'step ms':>9} {'vs smallest':>12}")
    for r in rows:
        base = next(x for x in rows if x["update"] == r["update"])["step_ms"]
        print(
            f"{r['update']:>11} {r['items']:>11,} {r['step_ms']:>9.1f} "
            f"{r['step_ms'] / base:>11.2f}x"
        )


def print_table(rows: list[dict]) -> None:
    print(f"{'max_len':>8} {'batch':>6} {'input ex/s':>12} {'train step ex/s':>16} {'ratio':>7}")
    for r in rows:
        print(
            f"{r['max_len']:>8} {r['batch']:>6} {r['input_ex_per_s']:>12,.0f} "
            f"{r['train_step_ex_per_s']:>16,.0f} {r['ratio']:>6.1f}x"
        )


if __name__ == "__main__":
    print_table(run())
    print_scale(vocab_scale())
