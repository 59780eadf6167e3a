"""Counterfactual influence, closer to the question users ask ("does one more add-to-cart on this
item raise the chance of a purchase, and by how much?") than removing events is.

For each sampled example and behaviour type t, two edited histories are scored: one with an
event of type t on the target item added as the most recent event, `ADD_GAP_SECONDS` before the
example (older events shift back one position; the oldest drops when the history is full), and
one with the same event on another item (the target of another sampled example, of another
category where the data has categories). Reported per type, with bootstrap intervals over
examples:
- `add_prob` / `add_logit`: the mean change of the probability / logit from adding the event on
  the target item: the plain answer;
- `contrast_logit`: the change from adding it on the target item minus the change from adding it
  on the other item. The shift of the older events and the loss of the oldest one are the same
  in both edits and cancel, so this is the effect of the type acting on the target item itself.
On the synthetic default an event of type t on the target's category adds
`history_scale * type_weight[t]` (times decay^0 = 1 as the most recent event) to the label's
logit and one on another category adds nothing, so `planted_contrast_logit` is that value and
the learned contrasts should recover it (tests/test_influence_recovery.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax.data import history, synthetic
from influence_jax.data.schema import HIST_BEHAVIOUR, NUM_RESERVED, Schema
from influence_jax.scoring import Run, batched, copies_logits, global_batch, program

ADD_GAP_SECONDS = 3600  # the added event happened one hour before the example
ROWS_PER_CALL = 4096  # model rows (examples x copies) per call


def gap_id(schema: Schema, seconds: int) -> int:
    """The time_gap id of `seconds` under the dataset's bucketing (synthetic: its own)."""
    bucket = synthetic.time_gap_bucket if "generator" in schema.extra else history.gap_bucket
    return int(np.asarray(bucket(np.array([seconds])))[0])


def added_event(schema: Schema, item_BxF: np.ndarray, type_id: int) -> np.ndarray:
    """[B, Fh] history rows: an event of behaviour id `type_id` on the items `item_BxF`."""
    item_vocabs = [f.vocab for f in schema.item_fields]
    ev = np.zeros((len(item_BxF), len(schema.hist_fields)), np.int32)
    for j, f in enumerate(schema.hist_fields):
        if f.name == HIST_BEHAVIOUR:
            ev[:, j] = type_id
        elif f.name == "time_gap":
            ev[:, j] = gap_id(schema, ADD_GAP_SECONDS)
        elif f.vocab in item_vocabs:
            ev[:, j] = item_BxF[:, item_vocabs.index(f.vocab)]
    return ev


def insert_front(hist_BxLxF: np.ndarray, event_BxF: np.ndarray) -> np.ndarray:
    """The histories with `event` as the most recent event (position 0; the oldest drops)."""
    return np.concatenate([event_BxF[:, None], hist_BxLxF[:, :-1]], axis=1)


def other_items(schema: Schema, item_BxF: np.ndarray) -> np.ndarray:
    """Per example, the target item of another example (of another category where there is
    one among the next 16 examples, cyclically)."""
    n = len(item_BxF)
    if n < 2:
        return item_BxF.copy()
    if "category" not in [f.name for f in schema.item_fields]:
        return np.roll(item_BxF, -1, axis=0)
    cat = item_BxF[:, schema.item_index("category")]
    shifts = np.arange(1, min(16, n - 1) + 1)
    differs = cat[(np.arange(n)[:, None] + shifts[None]) % n] != cat[:, None]
    first = np.where(differs.any(1), shifts[np.argmax(differs, 1)], 1)
    return item_BxF[(np.arange(n) + first) % n]


def copies(
    schema: Schema, batch: dict[str, np.ndarray], other_BxF: np.ndarray, kinds: list[int]
) -> np.ndarray:
    """[B, 1 + 2T, L, F]: the history, then per type t (the indices `kinds` of the schema's
    types) the edit on the target and on the other item."""
    hist = batch["hist"]
    out = [hist]
    for k in kinds:
        for items in (batch["item"], other_BxF):
            out.append(insert_front(hist, added_event(schema, items, k + NUM_RESERVED)))
    return np.stack(out, axis=1)


def make_fn(run: Run) -> Callable:
    """Jitted `f(params, batch{user, item, hists [B, C, L, F]}) -> logits [B, C]`."""

    def fn(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        base = {"user": batch["user"], "item": batch["item"]}
        return copies_logits(run.model, params, base, jnp.moveaxis(batch["hists"], 1, 0)).T

    return program(run, "counterfactual", lambda: run.engine.jit_scoring(fn))


def planted_type_weights(schema: Schema, head: str = "") -> dict[str, float] | None:
    """The synthetic generator's planted (raw) behaviour-type weights, of `head` for data with
    label heads; None for other data, and for labels made without the history signal."""
    planted = schema.extra.get("planted") if "generator" in schema.extra else None
    if not planted or "history" in planted.get("signals_absent", ()):
        return None
    if "heads" in planted:
        return planted["heads"].get(head, {}).get("type_weight") if head else None
    return planted.get("behaviour_type_weights")


def planted_contrast(schema: Schema, head: str = "") -> dict[str, float] | None:
    """history_scale * type_weight[t] (of `head` for data with label heads) on synthetic data
    with the history signal; else None."""
    w = planted_type_weights(schema, head) or {}
    if any(t not in w for t in schema.behaviour_types):
        return None
    scale = schema.extra["planted"].get("history_scale", 1.0)
    return {t: scale * w[t] for t in schema.behaviour_types}


def _interval(v: np.ndarray, n_boot: int, rng: np.random.Generator) -> dict[str, float]:
    idx = rng.integers(0, len(v), (n_boot, len(v)))
    means = v[idx].mean(1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return {"mean": float(v.mean()), "ci_low": float(lo), "ci_high": float(hi)}


def counterfactual(
    run: Run,
    gather: Callable[[np.ndarray], dict[str, np.ndarray]],
    n: int,
    n_boot: int,
    rng: np.random.Generator,
    progress: Callable[[int], None] | None = None,
    head: str = "",
    types: list[str] | None = None,
) -> dict[str, Any]:
    """The counterfactual section of an influence report over examples 0..n-1 (module doc);
    `head`: the multi-task head the run scores, for its planted effects; `types`: the
    behaviour types to add (default: every type of the schema)."""
    s = run.schema
    names = list(s.behaviour_types if types is None else types)
    kinds = [s.behaviour_types.index(t) for t in names]
    T = len(kinds)
    items = gather(np.arange(n))["item"] if n else np.zeros((0, len(s.item_fields)), np.int32)
    other = other_items(s, items)

    def with_copies(r: np.ndarray) -> dict[str, np.ndarray]:
        b = gather(r)
        return {"user": b["user"], "item": b["item"], "hists": copies(s, b, other[r], kinds)}

    bs = global_batch(run, max(1, ROWS_PER_CALL // (1 + 2 * T)))
    logits = (
        batched(make_fn(run), run, n, with_copies, bs, progress)
        if n
        else np.zeros((0, 1 + 2 * T), np.float32)
    )
    base = logits[:, 0]
    prob = jax.nn.sigmoid
    planted = planted_contrast(s, head)
    out: dict[str, Any] = {}
    for k, t in enumerate(names):
        on, off = logits[:, 1 + 2 * k], logits[:, 2 + 2 * k]
        e = {
            "add_logit": _interval(on - base, n_boot, rng),
            "add_prob": _interval(np.asarray(prob(on) - prob(base)), n_boot, rng),
            "contrast_logit": _interval(on - off, n_boot, rng),
        }
        if planted is not None:
            e["planted_contrast_logit"] = planted[t]
        out[t] = e
    return {
        "examples": n,
        "gap_seconds": ADD_GAP_SECONDS,
        "types": out,
        "order_by_contrast": sorted(out, key=lambda t: -out[t]["contrast_logit"]["mean"]),
    }
