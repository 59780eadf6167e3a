"""`benchmark.py --what=quality`: does a compute dtype keep AUC?

Trains the benchmark CNN with the engine's train step (the same one `--what=train` times) in
each compute dtype on the same planted-signal data, from the same initial parameters, and
compares held-out AUC: mixed precision counts as a speed-up only where it keeps AUC. Where the
benchmark's model multiplies its hidden layer's operands in bfloat16 (`BenchCNN.bf16_hidden`,
CPUs with AMX or AVX-512 BF16), the float32 row also trains and scores the model all in float32
from the same start (`test_auc_float32_hidden`).

The data: ids drawn uniformly as in the speed benchmark, and labels from a known logit, the
mean over positions of hidden per-id scores of each tower's vocabulary (user, item, behaviour),
so every tower carries signal and the best possible AUC (the oracle, scoring with the true
logit) is printed beside the model's.
"""

from __future__ import annotations

import dataclasses
import time

import bench_train
import jax
import numpy as np
from bench_refs import common

from influence_jax import metrics, sharding

# Weight of each tower's mean id score in the planted logit; the means have sd ~1/sqrt(L).
SIGNAL = {"user_ids": 3.0, "item_ids": 6.0, "behaviour_ids": 3.0}


class PlantedData:
    """Hidden N(0, 1) scores per id of each vocabulary; labels ~ Bernoulli(sigmoid(logit))."""

    def __init__(self, item_vocab: int, max_len: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.max_len = max_len
        self.vocabs = dict(zip(common.ID_KEYS, common.vocabs(item_vocab), strict=True))
        self.scores = {k: rng.normal(size=v).astype(np.float32) for k, v in self.vocabs.items()}

    def batch(self, size: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(model inputs with label and weight, the true logit) for `size` fresh examples."""
        rng = np.random.default_rng(seed)
        b = {
            k: rng.integers(0, v, (size, self.max_len), dtype=np.int32)
            for k, v in self.vocabs.items()
        }
        logit = sum(SIGNAL[k] * self.scores[k][b[k]].mean(axis=1) for k in common.ID_KEYS)
        b["label"] = (rng.random(size) < 1 / (1 + np.exp(-logit))).astype(np.float32)
        b["weight"] = np.ones(size, np.float32)
        return b, logit


def train_and_score(
    dtype: str,
    train_batches: list[dict],
    test: dict,
    item_vocab: int,
    bf16_hidden: bool | None = None,
    grad_blocks: int = 0,
) -> dict:
    """One dtype: a train step per batch of `train_batches`, then AUC on `test`; the benchmark's
    model (`JaxBench.model`) and step (its gradient in `grad_blocks` row blocks, 0: the
    benchmark's default), with `bf16_hidden` set where given."""
    jb = bench_train.JaxBench(dtype, 0.0, 0, host_memory_kept=False, grad_blocks=grad_blocks)
    model = jb.model("fast", item_vocab, common.EMBED_DIM)
    if bf16_hidden is not None:
        model = dataclasses.replace(model, bf16_hidden=bf16_hidden)
    batch, steps = len(train_batches[0]["label"]), len(train_batches)
    first = sharding.to_global(train_batches[0], jb.mesh)
    state, _, step = jb.compile_step(model, first, jb.grad_blocks)
    t0 = time.perf_counter()
    pending = None
    for b in train_batches:
        state, m = step(state, sharding.to_global(b, jb.mesh))
        if pending is not None:  # step t-1's metrics while step t runs: two steps in flight
            jax.device_get(pending)
        pending = m
    last = jax.device_get(pending)
    train_s = time.perf_counter() - t0
    score = jax.jit(lambda p, x: model.apply({"params": p}, x, train=False)[0])
    inputs = {k: test[k] for k in common.ID_KEYS}
    logits = np.concatenate(
        [
            sharding.to_host(score(state.params, sharding.to_global(part, jb.mesh)))
            for part in _chunks(inputs, batch)
        ]
    )
    if not np.all(np.isfinite(logits)):
        raise FloatingPointError(f"{dtype}: non-finite held-out logits after {steps} steps")
    return {
        "impl": "jax" if dtype == "float32" else f"jax-{dtype}",
        "dtype": dtype,
        "batch": batch,
        "steps": steps,
        "item_vocab": item_vocab,
        "test_examples": len(logits),
        "test_auc": metrics.auc(test["label"], logits),
        "last_train_loss": float(last["loss_sum"] / max(float(last["count"]), 1.0)),
        "train_s": train_s,
        "device": jax.devices()[0].device_kind,
        "hidden_operands": "bfloat16" if model.bf16_hidden else dtype,
        "grad_blocks": jb.grad_blocks,
    }


def _chunks(inputs: dict[str, np.ndarray], size: int):
    n = next(iter(inputs.values())).shape[0]
    for start in range(0, n - size + 1, size):
        yield {k: v[start : start + size] for k, v in inputs.items()}


def run(
    dtypes: list[str],
    batch: int,
    steps: int,
    item_vocab: int = common.ITEM_VOCAB,
    test_examples: int = 131_072,
    max_len: int = common.MAX_LEN,
    grad_blocks: int = 0,
) -> list[dict]:
    """A row per dtype (first row: the reference dtype), each with `auc_vs_first`; the step's
    gradient in `grad_blocks` row blocks (0: the benchmark's default), and where that is more
    than one, the AUC of the whole batch's gradient beside it.

    The held-out set (rounded up to whole batches) is the same for every dtype, so the AUC
    differences are paired; at the default 131K examples an AUC's standard error is ~0.0015.
    """
    data = PlantedData(item_vocab, max_len)
    test, true_logit = data.batch(-(-test_examples // batch) * batch, seed=10**6)
    oracle = metrics.auc(test["label"], true_logit)
    train_batches = [data.batch(batch, seed=1 + i)[0] for i in range(steps)]
    rows = []
    for dtype in dtypes:
        row = train_and_score(dtype, train_batches, test, item_vocab, grad_blocks=grad_blocks)
        if row["hidden_operands"] != dtype:  # bfloat16 hidden layer: against it in `dtype`
            blocks = row["grad_blocks"]
            same = train_and_score(
                dtype, train_batches, test, item_vocab, bf16_hidden=False, grad_blocks=blocks
            )
            row[f"test_auc_{dtype}_hidden"] = same["test_auc"]
            row[f"train_s_{dtype}_hidden"] = same["train_s"]
        if row["grad_blocks"] > 1:  # the gradient in row blocks: against the whole batch's
            whole = train_and_score(dtype, train_batches, test, item_vocab, grad_blocks=1)
            row["test_auc_one_block"] = whole["test_auc"]
            row["train_s_one_block"] = whole["train_s"]
        row["oracle_auc"] = oracle
        row["auc_vs_first"] = row["test_auc"] - (rows[0]["test_auc"] if rows else row["test_auc"])
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    r0 = rows[0]
    print(
        f"\n{r0['device']}: benchmark CNN, {r0['steps']} steps of {r0['batch']} on planted "
        f"data (item vocab {r0['item_vocab']:,}), AUC on {r0['test_examples']:,} held-out "
        f"examples; oracle AUC {r0['oracle_auc']:.4f}"
    )
    print(f"{'dtype':<12}{'test AUC':>10}{'vs ' + r0['dtype']:>14}{'train loss':>12}{'train s':>9}")
    for r in rows:
        print(
            f"{r['dtype']:<12}{r['test_auc']:>10.4f}{r['auc_vs_first']:>+14.4f}"
            f"{r['last_train_loss']:>12.4f}{r['train_s']:>9.1f}"
        )
    for r in rows:
        if "test_auc_one_block" in r:
            whole = r["test_auc_one_block"]
            print(
                f"  {r['dtype']}: the gradient in {r['grad_blocks']} row blocks: "
                f"{r['test_auc']:.4f} in {r['train_s']:.1f} s; in one: {whole:.4f} "
                f"({r['test_auc'] - whole:+.4f}) in {r['train_s_one_block']:.1f} s"
            )
        if f"test_auc_{r['dtype']}_hidden" in r:
            same, secs = r[f"test_auc_{r['dtype']}_hidden"], r[f"train_s_{r['dtype']}_hidden"]
            print(
                f"  {r['dtype']}: the hidden layer's operands in bfloat16, training and scoring "
                f"(bench_util.bf16_hidden_pays): {r['test_auc']:.4f} in {r['train_s']:.1f} s; in "
                f"{r['dtype']}: {same:.4f} ({r['test_auc'] - same:+.4f}) in {secs:.1f} s"
            )
