"""Influence reports from a checkpoint: how much each behaviour type, extractor and past event
moves a prediction, with bootstrap intervals, segments, and a faithfulness check.

Every influence is a score drop in logit units, `logit(x) - logit(x without some events)`, where
an event is removed by setting its behaviour id and all its fields to padding 0; all the masked
copies of a batch run in one vmapped, jitted, device-sharded pass. Extractor contributions are
the model's own additive parts `w_j * z_j(x)` of the logit (z_j: extractor j's standardised
score). On synthetic data the report puts the generator's planted behaviour-type weights beside
the learned gates, both normalised to sum 1.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
from absl import logging

from influence_jax import counterfactual, files, influence_plots, summary
from influence_jax.data.history import gap_seconds
from influence_jax.data.schema import HIST_BEHAVIOUR, NUM_RESERVED, Schema
from influence_jax.errors import DataError
from influence_jax.logs import Progress
from influence_jax.scoring import Run, batched, copies_logits, global_batch, program

NUM_EXPLAINED_EVENTS = 3  # the most influential past events per ranked row (--explain)
MAX_K = 5  # faithfulness: remove k = 1..MAX_K events
RANDOM_DRAWS = 10  # random k-subsets per example and k
DELETION_COPIES = MAX_K * (1 + RANDOM_DRAWS)  # masked copies per example in `faithfulness`
COUNTERFACTUAL_EXAMPLES = 2048  # examples edited by the counterfactual check (counterfactual.py)
SEPARATION = 0.8  # the lowest extractor weight "stands apart" below this x the next lowest
HIST_LEN_EDGES = (1, 5, 10, 20, 50, 100, 200)  # history-length segments: [0], [1, 5), ...
MAX_SEGMENT_VALUES = 10  # most frequent values kept per categorical segment
ROWS_PER_CALL = 8192  # model rows (examples x masked copies) per device call
PROGRESS_EVERY = 10.0  # seconds between the report's progress lines
TB_PREFIX = "influence_report"  # the report's TensorBoard tags
DEFINITIONS = {
    "behaviour_types.influence": "mean |logit(x) - logit(x without every event of the type)| "
    "over the examples, with a 95% percentile-bootstrap interval (ci_low, ci_high)",
    "behaviour_types.signed": "mean logit drop when the type is removed, logit(x) - logit(x "
    "without the type) (positive: the type raises scores; negative: removing it raises them), "
    "interval signed_ci_low..signed_ci_high",
    "behaviour_types.per_event": "influence summed over examples / events of the type",
    "behaviour_types.gate": "the model's learned weight g_t of the type",
    "behaviour_types.gate_normalised": "g_t / sum of g over the types (the training log's "
    "behaviour weights)",
    "behaviour_types.planted_weight": "synthetic data only: the generator's planted weight of "
    "the type / sum over the types, comparable with gate_normalised",
    "extractors.influence": "mean |w_j z_j(x)|, the extractor's share of the logit",
    "extractors.contribution": "mean w_j z_j(x) (signed)",
    "extractors.weight": "the model's learned w_j",
    "per_event": "leave-one-event-out logit drops of a sample of predictions (events.parquet; "
    "position 0 is the most recent event)",
    "faithfulness": "mean logit drop when the k events with the largest leave-one-out drop "
    "are removed together vs k random events (mean of RANDOM_DRAWS draws)",
    "counterfactual": "per type, one event of the type added on the target item as the most "
    "recent event (gap_seconds before): add_prob / add_logit the mean change of the "
    "probability / logit; contrast_logit that change minus the change from the same event on "
    "another item (the shift of older events cancels); planted_contrast_logit on synthetic "
    "data (counterfactual.py)",
    "behaviour_types.counterfactual_add_prob": "counterfactual.types[t].add_prob.mean",
    "behaviour_types.counterfactual_contrast": "counterfactual.types[t].contrast_logit.mean",
    "extractor_separation": "whether the lowest extractor weight is below SEPARATION x the "
    "next lowest; else the weights cannot tell the two apart; agrees: whether the extractor "
    "of lowest influence is the one (or one of the two) the weights name",
}


def make_masked_fn(run: Run) -> Callable:
    """Jitted `f(params, batch) -> {logit [B], masked [B, C], contributions {name: [B]}}`.

    `batch["remove"]` [B, C, L] marks, for each of C copies of an example's history, the events
    to drop; the C copies run as one vmapped batch.
    """

    def fn(params: Any, batch: dict[str, jax.Array]) -> dict[str, Any]:
        base = {k: batch[k] for k in ("user", "item", "hist")}
        logit_B, aux = run.model.apply({"params": params}, base, train=False)
        keep_CxBxL = jnp.moveaxis(~batch["remove"], 1, 0)
        hist_CxBxLxF = jnp.where(keep_CxBxL[..., None], base["hist"][None], 0)
        masked_CxB = copies_logits(run.model, params, base, hist_CxBxLxF)
        return {
            "logit": logit_B,
            "masked": masked_CxB.T,
            "contributions": aux.get("contributions", {}),
        }

    return program(run, "influence.masked", lambda: run.engine.jit_scoring(fn))


def real_events(hist: np.ndarray, schema: Schema) -> np.ndarray:
    return hist[..., schema.hist_index(HIST_BEHAVIOUR)] != 0


def loo_masks(hist_BxLxF: np.ndarray, schema: Schema) -> np.ndarray:
    """[B, L, L]: copy l drops event l (nothing at padding)."""
    return np.eye(schema.max_len, dtype=bool)[None] & real_events(hist_BxLxF, schema)[:, None, :]


def type_masks(hist_BxLxF: np.ndarray, schema: Schema) -> np.ndarray:
    """[B, T, L]: copy t drops every event of behaviour type t."""
    beh = hist_BxLxF[..., schema.hist_index(HIST_BEHAVIOUR)]
    types = np.arange(schema.num_behaviour_types) + NUM_RESERVED
    return beh[:, None, :] == types[None, :, None]


def masked_deltas(
    run: Run,
    n: int,
    gather: Callable,
    masks: Callable,
    copies: int,
    fn: Any = None,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """{logit [n], contributions, delta [n, C] = logit - masked logit} for rows 0..n-1.

    Args:
      gather: rows -> batch (user, item, hist); masks: (hist, rows) -> remove [B, C, L].
      copies: C; batches hold about ROWS_PER_CALL model rows (examples x copies).
      progress: called with the examples done after each batch.
    """
    fn = fn or make_masked_fn(run)
    with_masks = lambda r: dict(b := gather(r), remove=masks(b["hist"], r))
    bs = global_batch(run, max(1, ROWS_PER_CALL // copies))
    out = batched(fn, run, n, with_masks, bs, progress)
    if out is None:  # no rows
        out = {"logit": np.zeros(0, np.float32), "masked": np.zeros((0, copies), np.float32)}
        out["contributions"] = {}
    return dict(out, delta=out["logit"][:, None] - out["masked"])


class _Work:
    """One progress line over a report's model calls: "influence: D/N model rows (P%) R model
    rows/s ETA H:MM:SS" every PROGRESS_EVERY seconds and at the end; each part is (examples,
    copies)."""

    def __init__(self, parts: list[tuple[int, int]], log: Callable[[str], None]):
        total = sum(n * c for n, c in parts)
        self.log, self.logged = log, -1
        self.progress = Progress(
            total, self._log, PROGRESS_EVERY, verb="influence:", unit="model rows"
        )
        self.base = 0

    def _log(self, line: str) -> None:
        self.logged = self.progress.done
        self.log(line)

    def finish(self) -> None:
        """The closing line, unless the last part already wrote it."""
        if self.logged != self.progress.total:
            self.progress.done = self.progress.total
            self._log(self.progress.line())

    def part(self, n: int, copies: int) -> Callable[[int], None]:
        """The callback of the next part: examples done -> model rows done over the report."""
        base, self.base = self.base, self.base + n * copies
        return lambda done: self.progress(base + done * copies)


def top_events(loo_NxL: np.ndarray, real_NxL: np.ndarray, k: int) -> np.ndarray:
    """Positions [N, k] of the k events whose removal lowers the score most (ties: recent first)."""
    pos = np.broadcast_to(np.arange(loo_NxL.shape[1]), loo_NxL.shape)
    return np.lexsort((pos, np.where(real_NxL, -loo_NxL, np.inf)), axis=-1)[:, :k]


def _column(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """`values` with nulls where not `valid`; floats keep their width (float32 influences, as
    the behaviour and extractor columns)."""
    kind = pa.from_numpy_dtype(values.dtype) if values.dtype.kind == "f" else None
    return pa.array(
        [v if ok else None for v, ok in zip(values.tolist(), valid.tolist(), strict=True)], kind
    )


def explain_columns(
    run: Run,
    n: int,
    gather: Callable,
    seconds_before: np.ndarray | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, pa.Array]:
    """Per row: each behaviour type's and extractor's contribution and the top events.

    Args:
      gather: rows -> batch (user, item, hist) of rows 0..n-1.
      seconds_before: [n, L] the example/ranking time minus each history event's raw time (s),
        reported as event{k}_seconds_before. None where only the time_gap bucket is known: then
        event{k}_gap_bucket_seconds_min holds the bucket's lower bound instead (see
        `gap_seconds`), never labelled as real seconds.
      log: gets a progress line (model rows done, rate, ETA) every PROGRESS_EVERY seconds.
    """
    s, L, maps = run.schema, run.schema.max_len, run.dataset.id_maps
    masks = lambda h, r: np.concatenate([loo_masks(h, s), type_masks(h, s)], 1)
    copies = L + s.num_behaviour_types
    progress = None
    if log is not None:
        work = _Work([(n, copies)], lambda line: log("explain: " + line.split(":", 1)[1].strip()))
        progress = work.part(n, copies)
    out = masked_deltas(run, n, gather, masks, copies, progress=progress)
    if log is not None:
        work.finish()
    delta = out["delta"]
    cols = {f"behaviour_{t}": pa.array(delta[:, L + i]) for i, t in enumerate(s.behaviour_types)}
    for name, c in out["contributions"].items():
        cols[f"extractor_{name}"] = pa.array(c)
    hist = gather(np.arange(n))["hist"] if n else np.zeros((0, L, len(s.hist_fields)), np.int32)
    real = real_events(hist, s)
    top = top_events(delta[:, :L], real, NUM_EXPLAINED_EVENTS)
    rows = np.arange(n)[:, None]
    ev, ok = hist[rows, top], real[rows, top]
    names = s.behaviour_names()
    for k in range(top.shape[1]):
        item, item_ok = maps.raw("item_id", ev[:, k, s.hist_index("item_id")])
        p = f"event{k + 1}_"
        cols[p + "item"] = _column(item, ok[:, k] & item_ok)
        cols[p + "behaviour"] = _column(names[ev[:, k, s.hist_index(HIST_BEHAVIOUR)]], ok[:, k])
        cols[p + "position"] = _column(top[:, k], ok[:, k])
        if seconds_before is not None:
            cols[p + "seconds_before"] = _column(seconds_before[rows[:, 0], top[:, k]], ok[:, k])
        elif "time_gap" in [f.name for f in s.hist_fields]:
            secs = gap_seconds(s, ev[:, k, s.hist_index("time_gap")])
            cols[p + "gap_bucket_seconds_min"] = _column(secs, ok[:, k])
        cols[p + "influence"] = _column(delta[rows[:, 0], top[:, k]], ok[:, k])
    return cols


def bootstrap(values_NxM: np.ndarray, n_boot: int, rng: np.random.Generator, alpha: float = 0.05):
    """(mean [M], ci_low [M], ci_high [M]): percentile bootstrap over rows."""
    v = np.asarray(values_NxM, np.float64).reshape(len(values_NxM), -1)
    mean = v.mean(0) if len(v) else np.full(v.shape[1], np.nan)
    if len(v) < 2:
        return mean, mean.copy(), mean.copy()
    means, chunk = [], max(1, (1 << 22) // len(v))
    for a in range(0, n_boot, chunk):
        idx = rng.integers(0, len(v), (min(chunk, n_boot - a), len(v)))
        means.append(v[idx].mean(1))
    lo, hi = np.quantile(np.concatenate(means), [alpha / 2, 1 - alpha / 2], axis=0)
    return mean, lo, hi


def _stats(names, values_NxM, n_boot: int, rng, key: str, ci: str = "") -> dict[str, dict]:
    """{name: {key: mean, ci + "ci_low": ..., ci + "ci_high": ...}} per column."""
    mean, lo, hi = bootstrap(values_NxM, n_boot, rng)
    return {
        n: {key: float(mean[j]), f"{ci}ci_low": float(lo[j]), f"{ci}ci_high": float(hi[j])}
        for j, n in enumerate(names)
    }


def _both(names, values_NxM, n_boot: int, rng, signed: str) -> dict[str, dict]:
    """Magnitude (`influence`: mean |value|) and direction (`signed`: mean value), with CIs."""
    mag = _stats(names, np.abs(values_NxM), n_boot, rng, "influence")
    sig = _stats(names, values_NxM, n_boot, rng, signed, signed + "_")
    return {n: {**mag[n], **sig[n]} for n in names}


def _summary(types, loto, contrib: dict, n_boot: int, rng) -> dict[str, Any]:
    """Behaviour types (`types`, loto's columns): |logit change| when the type is removed (and
    its signed mean, the logit drop); extractors: |w_j z_j| (and the signed contribution)."""
    c = np.stack(list(contrib.values()), 1) if contrib else np.zeros((len(loto), 0))
    return {
        "n": len(loto),
        "behaviour_types": _both(types, loto, n_boot, rng, "signed"),
        "extractors": _both(list(contrib), c, n_boot, rng, "contribution"),
    }


def _segments(run, maps, ex, types, loto, contrib, n_boot, rng) -> dict[str, Any]:
    """The same summaries per history-length bucket, per value of a user feature and per item
    category (the most frequent values)."""
    s = run.schema
    sub = lambda m: _summary(types, loto[m], {k: v[m] for k, v in contrib.items()}, n_boot, rng)
    n_hist = real_events(ex["hist"], s).sum(1)
    edges = [0] + [e for e in HIST_LEN_EDGES if e <= s.max_len] + [s.max_len + 1]
    out: dict[str, Any] = {"history_length": {}}
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        m = (n_hist >= a) & (n_hist < b)
        if m.any():
            out["history_length"][str(a) if b == a + 1 else f"{a}-{b - 1}"] = sub(m)
    user_feats = [(j, f) for j, f in enumerate(s.user_fields) if f.name != "user_id"]
    groups = [("user_" + f.name, ex["user"][:, j], f.vocab) for j, f in user_feats[:1]]
    if "category" in [f.name for f in s.item_fields]:
        groups.append(("item_category", ex["item"][:, s.item_index("category")], "category"))
    for name, ids, vocab in groups:
        vals, counts = np.unique(ids, return_counts=True)
        raw, ok = maps.raw(vocab, vals)
        keep = np.lexsort((vals, -counts))[:MAX_SEGMENT_VALUES]
        out[name] = {(str(raw[i]) if ok[i] else "<oov>"): sub(ids == vals[i]) for i in keep}
    return out


def faithfulness(
    run: Run,
    gather: Callable,
    loo: np.ndarray,
    real: np.ndarray,
    rng,
    n_boot: int,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Removing the k most influential events (by leave-one-out) vs k random ones, k=1..MAX_K."""
    n, L = loo.shape
    ks = list(range(1, MAX_K + 1))
    if n == 0:  # no prediction has more than MAX_K past events (or none was sampled)
        empty = dict.fromkeys(("top_k_drop", "random_drop", "gap", "gap_ci_low", "gap_ci_high"))
        return {"k": ks, **{k: [] for k in empty}, "holds": None, "examples": 0}
    top = top_events(loo, real, MAX_K)
    remove = np.zeros((n, DELETION_COPIES, L), bool)
    for k in range(1, MAX_K + 1):
        remove[np.arange(n)[:, None], k - 1, top[:, :k]] = True
    noise = np.where(real[:, None, :], rng.random((n, RANDOM_DRAWS, L)), np.inf)
    rand = np.argsort(noise, axis=-1)  # a random order of each example's events
    for k in range(1, MAX_K + 1):
        c = MAX_K + (k - 1) * RANDOM_DRAWS + np.arange(RANDOM_DRAWS)
        ii = np.arange(n)[:, None, None]
        remove[ii, c[None, :, None], rand[:, :, :k]] = True
    out = masked_deltas(run, n, gather, lambda h, r: remove[r], remove.shape[1], None, progress)
    top_drop = out["delta"][:, :MAX_K]
    rand_drop = out["delta"][:, MAX_K:].reshape(n, MAX_K, RANDOM_DRAWS).mean(-1)
    gap, lo, hi = bootstrap(top_drop - rand_drop, n_boot, rng)
    return {
        "k": ks,
        "top_k_drop": top_drop.mean(0).tolist(),
        "random_drop": rand_drop.mean(0).tolist(),
        "gap": gap.tolist(),
        "gap_ci_low": lo.tolist(),
        "gap_ci_high": hi.tolist(),
        "holds": bool(np.all(top_drop.mean(0) > rand_drop.mean(0))),
        "examples": n,
        "units": "logit drop, averaged over examples",
    }


def _learned_weights(run: Run, batch: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """(extractor weights w_j, behaviour-type gates g_t) as the model reports them in aux."""

    def weights(params: Any, batch: dict[str, jax.Array]) -> tuple[dict, dict]:
        _, aux = run.model.apply({"params": params}, batch, train=False)
        return aux.get("extractor_weights", {}), aux.get("behaviour_type_weights", {})

    fn = program(run, "influence.weights", lambda: jax.jit(weights))
    w, g = jax.device_get(fn(run.params, batch))
    return {k: float(v) for k, v in w.items()}, {k: float(v) for k, v in g.items()}


def extractor_separation(
    weights: dict[str, float | None], influence: dict[str, float] | None = None
) -> dict[str, Any]:
    """Whether the lowest extractor weight stands apart from the next lowest: `separated` when
    it is below SEPARATION x the next lowest; else the report says the weights cannot tell the
    two apart (which of them matters less is not known from the weights).

    With `influence` (each extractor's mean |w_j z_j| on the report's split): whether the
    extractor of lowest weight is also the one of lowest influence (`agrees`). The weights
    compare extractors only as far as each standardised score z_j has the spread on this split
    it had in training; where it has not (e.g. counts that fit the train split), the verdict
    says so and names the extractor of lowest influence."""
    w = {k: v for k, v in weights.items() if v is not None}
    if len(w) < 2:
        return {"separated": None, "verdict": "fewer than two weighted extractors"}
    lowest, second = sorted(w, key=w.get)[:2]
    ratio = w[lowest] / w[second] if w[second] > 0 else float("nan")
    separated = bool(ratio < SEPARATION)
    verdict = (
        f"{lowest} has the lowest weight ({w[lowest]:.3f}, {ratio:.2f}x {second}'s)"
        if separated
        else f"the weights cannot tell {lowest} and {second} apart ({w[lowest]:.3f} vs "
        f"{w[second]:.3f}, ratio {ratio:.2f} >= {SEPARATION})"
    )
    out = {"lowest": lowest, "next": second, "ratio": ratio, "separated": separated}
    infl = {k: v for k, v in (influence or {}).items() if k in w}
    if len(infl) == len(w):
        least = min(infl, key=infl.get)
        candidates = (lowest,) if separated else (lowest, second)  # what the weights say
        out |= {"lowest_by_influence": least, "agrees": least in candidates}
        if not out["agrees"]:
            rank = sorted(infl, key=infl.get).index(lowest) + 1
            verdict += (
                f"; but by influence (mean |w z| on this split) {least} is lowest "
                f"({infl[least]:.3f}) and {lowest} is {_ordinal(rank)} lowest of {len(infl)} "
                f"({infl[lowest]:.3f}): the scores' spread here differs from training's, so "
                "judge by influence"
            )
    return out | {"verdict": verdict}


def _ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 <= 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def planted_weights(schema: Schema, head: str = "") -> dict[str, float] | None:
    """The planted behaviour-type weights (of `head`), normalised to sum 1 over the schema's
    types as the learned gates are; None where nothing is planted (planted_type_weights)."""
    w = counterfactual.planted_type_weights(schema, head) or {}
    if not w:
        return None
    if any(t not in w for t in schema.behaviour_types):
        return None
    total = sum(w[t] for t in schema.behaviour_types) or 1.0
    return {t: w[t] / total for t in schema.behaviour_types}


def _add_type_weights(types: dict[str, dict], gates: dict, planted: dict | None) -> None:
    """Per type: gate_normalised (g_t / sum g, where the model has gates) and planted_weight
    (where the data has one)."""
    total = sum(gates.get(t) or 0.0 for t in types)
    planted_total = sum(planted[t] for t in types) if planted else 0.0
    for t, e in types.items():
        if gates.get(t) is not None and total > 0:
            e["gate_normalised"] = gates[t] / total
        if planted is not None:  # over the types reported (a run may drop some)
            e["planted_weight"] = planted[t] / planted_total if planted_total else planted[t]


def report(
    run: Run,
    output: str,
    split: str = "test",
    sample: int = 256,
    max_examples: int = 20_000,
    n_boot: int = 1000,
    seed: int = 0,
    log: Callable[[str], None] = logging.info,
) -> dict[str, Any]:
    """Computes the influence report of `split` and writes it to the folder `output`, logging
    its progress (model rows done, rate, ETA) with `log`.

    Writes influence.json, events.parquet (per-event leave-one-out deltas of the sample), PNG
    plots and the same plots as TensorBoard images. Returns the report dict.
    """
    s, rng = run.schema, np.random.default_rng(seed)
    store = run.dataset.examples(split)  # histories as training saw them (drop_behaviours)
    rows = np.arange(len(store))
    if len(rows) > max_examples:
        rows = np.sort(rng.choice(len(rows), max_examples, replace=False))
    if not len(rows):
        raise DataError(f"{run.data_path}/{split}: no examples to report on")
    ex = store.gather(rows)
    gather = lambda r: {k: ex[k][r] for k in ("user", "item", "hist")}
    fn = make_masked_fn(run)
    # The types the run trained with: a type of config.data.drop_behaviours has no events in
    # its histories and an untrained gate, so it is left out of every figure.
    dropped = set(run.dataset.drop_behaviours)
    kept = [j for j, t in enumerate(s.behaviour_types) if t not in dropped]
    types, T = [s.behaviour_types[j] for j in kept], len(kept)
    real = real_events(ex["hist"], s)
    # The per-event sample (predictions with at least one past event), drawn first from its
    # own stream so the progress total is known from the start.
    pick = np.flatnonzero(real.any(1))
    pick = np.sort(np.random.default_rng([seed, 1]).choice(pick, min(sample, len(pick)), False))
    long = np.flatnonzero(real[pick].sum(1) > MAX_K)  # the faithfulness part's rows
    n_cf = min(len(rows), COUNTERFACTUAL_EXAMPLES)
    parts = [(len(rows), T), (n_cf, 1 + 2 * T), (len(pick), s.max_len)]
    work = _Work(parts + [(len(long), DELETION_COPIES)], log)
    type_masked = lambda h, r: type_masks(h, s)[:, kept]
    out = masked_deltas(run, len(rows), gather, type_masked, T, fn, work.part(len(rows), T))
    loto, contrib = out["delta"], out["contributions"]
    w_ext, gates = _learned_weights(run, gather(np.arange(1)))
    result: dict[str, Any] = {
        "step": run.step,
        "split": split,
        "examples": len(rows),
        "definitions": DEFINITIONS,
    }
    if dropped:
        result["dropped_behaviour_types"] = sorted(dropped)
    result.update(_summary(types, loto, contrib, n_boot, rng))
    for c, (j, t) in enumerate(zip(kept, types, strict=True)):
        n_t = (ex["hist"][..., s.hist_index(HIST_BEHAVIOUR)] == j + NUM_RESERVED).sum(1)
        result["behaviour_types"][t].update(
            events_per_example=float(n_t.mean()),
            per_event=float(np.abs(loto[:, c]).sum() / max(n_t.sum(), 1)),
            gate=gates.get(t),
        )
    head = run.objective_head
    if head:
        result["head"] = head
    _add_type_weights(result["behaviour_types"], gates, planted_weights(s, head))
    for group in ("behaviour_types", "extractors"):
        total = sum(v["influence"] for v in result[group].values()) or 1.0
        for e in result[group].values():
            e["share"] = e["influence"] / total
    for k, e in result["extractors"].items():
        e["weight"] = w_ext.get(k)
    result["extractor_separation"] = extractor_separation(
        w_ext, {k: e["influence"] for k, e in result["extractors"].items()}
    )
    cf_rows = np.sort(rng.choice(len(rows), n_cf, replace=False))
    cf = counterfactual.counterfactual(
        run, lambda r: gather(cf_rows[r]), n_cf, n_boot, rng, work.part(n_cf, 1 + 2 * T), head,
        types,
    )  # fmt: skip
    result["counterfactual"] = cf
    for t, e in cf["types"].items():
        result["behaviour_types"][t].update(
            counterfactual_add_prob=e["add_prob"]["mean"],
            counterfactual_contrast=e["contrast_logit"]["mean"],
        )
    maps = run.dataset.id_maps
    result["segments"] = _segments(run, maps, ex, types, loto, contrib, min(n_boot, 300), rng)

    # Per-event influence for the sample of predictions with at least one past event.
    sub = lambda r: gather(pick[r])
    loo_masked = lambda h, r: loo_masks(h, s)
    loo = masked_deltas(
        run, len(pick), sub, loo_masked, s.max_len, fn, work.part(len(pick), s.max_len)
    )["delta"]
    loo = np.where(real[pick], loo, 0.0)
    result["per_event"] = _per_event(run, maps, ex, rows, pick, loo, output)
    result["faithfulness"] = faithfulness(
        run, lambda r: sub(long[r]), loo[long], real[pick][long], rng, n_boot,
        work.part(len(long), DELETION_COPIES),
    )  # fmt: skip
    work.finish()
    _write(run, result, output)
    return result


def _per_event(run, maps, ex, rows, pick, loo, output) -> dict[str, Any]:
    """Writes events.parquet (one row per real event of the sample); returns its summary."""
    s, hist = run.schema, ex["hist"][pick]
    b, l_pos = np.nonzero(real_events(hist, s))
    ev = hist[b, l_pos]
    beh = np.asarray(s.behaviour_types)[ev[:, s.hist_index(HIST_BEHAVIOUR)] - NUM_RESERVED]
    item, ok = maps.raw("item_id", ev[:, s.hist_index("item_id")])
    target, t_ok = maps.raw("item_id", ex["item"][pick][b, s.item_index("item_id")])
    cols = {
        "example": pa.array(rows[pick][b]),
        "target_item": _column(target, t_ok),
        "position": pa.array(l_pos),
        "item_id": _column(item, ok),
        "behaviour": pa.array(beh),
        "loo_delta": pa.array(loo[b, l_pos].astype(np.float32)),
    }
    files.write_table(pa.table(cols), os.path.join(output, "events.parquet"))
    d = loo[b, l_pos]
    by_type = {
        t: float(d[beh == t].mean()) if (beh == t).any() else None for t in s.behaviour_types
    }
    return {
        "predictions": len(pick),
        "events": len(b),
        "mean_loo_by_type": by_type,
        "mean_loo_by_position": (loo.sum(0) / np.maximum(real_events(hist, s).sum(0), 1)).tolist(),
        "table": "events.parquet",
    }


def _write(run: Run, result: dict[str, Any], output: str) -> None:
    """influence.json (atomically), the PNGs, and the PNGs and headline numbers in TensorBoard."""
    if jax.process_index() != 0:
        return
    os.makedirs(output, exist_ok=True)
    images = influence_plots.plots(result)
    result["plots"] = {name: f"{name}.png" for name in images}
    for name, png in images.items():
        files.write_bytes(os.path.join(output, f"{name}.png"), png)
    # In the report's order: types as the schema has them, segments by size or frequency.
    files.write_json(os.path.join(output, "influence.json"), result, sort_keys=False)
    # Under their own prefix: training's influence/behaviour/<type> is the normalised gate, not
    # this mean |logit change|, and a report written inside the workdir shows beside it.
    with summary.SummaryWriter(output) as writer:
        for name, png in images.items():
            writer.image(f"{TB_PREFIX}/{name}", png, run.step)
        scalars = {
            f"{TB_PREFIX}/behaviour/{t}": v["influence"]
            for t, v in result["behaviour_types"].items()
        }
        f = result["faithfulness"]
        gaps = zip(f["k"], f["gap"], strict=False)  # no gaps when no prediction qualified
        scalars.update({f"{TB_PREFIX}/faithfulness/gap_k{k}": g for k, g in gaps})
        writer.scalars(run.step, scalars)
