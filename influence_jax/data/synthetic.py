"""Synthetic multi-behaviour data with planted, known influence weights: the built-in default.

Ground truth. Each item has a category; each user a few favourite categories, an age bucket and
a gender. A history event of behaviour type t on an item of the target's category pushes the
label's logit up by `type_weight[t]` (planted, per type), decayed by recency; an item-quality
term and a user-activity term add signals that need no history. Labels are Bernoulli draws from
sigmoid(logit). Same config and seed, same bytes on disk.

Two tasks (`cfg.task`). "click": the target is a candidate item, target_type buy, the logit's
base is `cfg.bias`. "conversion" mirrors tools/prepare_data.py --task=conversion: each example
is an exposure, a view (pv) of the target item, and the label says whether it converts; the
conversion logit has the same planted terms around a low base `cfg.conversion_bias` (positive
rate about 5-10 %), and with probability `cfg.repeat_view_prob` the history holds 1-3 earlier
views of the exposed item itself, as real logs do. Such an event counts like any event on the
target's category (no extra same-item effect is planted).

Multi-task heads (`cfg.heads`, conversion only): a dict head name -> {type: weight, ..., and
optionally "bias"}. Each head h gets its own label, Bernoulli(sigmoid(logit_h)), where logit_h
is the conversion logit with h's planted type weights (and h's bias, default
`cfg.conversion_bias`) in place of `type_weights`: the `labels` column [N, H], heads in name
order (schema.label["heads"]), and `label` = 1 when any head converts, as for
`prepare_data.py --heads`. The heads' draws come from their own random stream, so the exposures
and histories are the same with any heads. planted.json then holds
`heads[name] = {"type_weight": {type: w}, "type_weight_normalised": ..., "bias": b}` and
`head_order`, and no single `behaviour_type_weights`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from influence_jax import files
from influence_jax.data import store
from influence_jax.data.schema import NUM_RESERVED, DataError, Field, Schema

BEHAVIOURS = ("pv", "cart", "fav", "buy")
SIGNALS = ("history", "item", "user")  # what config.data.synthetic.signals_absent may name
TASKS = ("click", "conversion")
DEFAULT_TYPE_WEIGHTS = {"pv": 0.15, "cart": 0.6, "fav": 0.35, "buy": 1.0}
DEFAULT_TYPE_PROBS = {"pv": 0.55, "cart": 0.15, "fav": 0.15, "buy": 0.15}
NUM_AGE_BUCKETS = 8
NUM_TIME_BUCKETS = 16
PLANTED_FILE = "planted.json"
START_TIME = 1_700_000_000  # unix s of the first synthetic example (2023-11-14)


def time_gap_bucket(gap_seconds: np.ndarray) -> np.ndarray:
    """Log2-bucketed time gap in seconds (>= 1) to a vocabulary id (>= NUM_RESERVED)."""
    b = np.floor(np.log2(np.maximum(gap_seconds, 1))).astype(np.int64)
    return (np.clip(b // 2, 0, NUM_TIME_BUCKETS - 1) + NUM_RESERVED).astype(np.int32)


def heads_of(cfg: Any) -> dict[str, tuple[dict[str, float], float]]:
    """`cfg.heads` checked: head name -> (planted weight per behaviour type, bias), in name order
    (the column order of `labels`); {} without heads. Raises DataError naming the field."""
    heads = cfg.get("heads") or {}
    if not heads:
        return {}
    where = "config.data.synthetic.heads"
    if cfg.task != "conversion":
        raise DataError(f"{where}: heads need task='conversion', not {cfg.task!r}")
    out = {}
    for name in sorted(heads):
        spec = dict(heads[name])
        unknown = sorted(set(spec) - set(BEHAVIOURS) - {"bias"})
        missing = [b for b in BEHAVIOURS if b not in spec]
        if unknown or missing:
            raise DataError(
                f"{where}.{name}: give a weight for each of {list(BEHAVIOURS)} and optionally "
                f"'bias' (missing {missing}, unknown {unknown})"
            )
        weights = {b: float(spec[b]) for b in BEHAVIOURS}
        bias = float(spec.get("bias", cfg.conversion_bias))
        if any(not np.isfinite(w) or w < 0 for w in weights.values()) or not np.isfinite(bias):
            raise DataError(
                f"{where}.{name}: weights must be finite and >= 0 and the bias finite, got "
                f"{weights}, bias {bias}"
            )
        out[str(name)] = (weights, bias)
    return out


def _planted(cfg: Any) -> dict[str, Any]:
    weights = {b: float(cfg.type_weights[b]) for b in BEHAVIOURS}
    total = sum(weights.values())
    conversion = cfg.task == "conversion"
    heads = heads_of(cfg)
    planted = {
        "task": cfg.task,
        "behaviour_type_weights": weights,
        "behaviour_type_weights_normalised": {b: w / total for b, w in weights.items()},
        "history_scale": float(cfg.history_scale),
        "item_quality_scale": float(cfg.item_quality_scale),
        "user_scale": float(cfg.user_scale),
        "bias": float(cfg.conversion_bias if conversion else cfg.bias),
        "recency_decay": float(cfg.recency_decay),
        "signals_absent": list(cfg.signals_absent),
        "seed": int(cfg.seed),
    }
    if conversion:
        planted["repeat_view_prob"] = float(cfg.repeat_view_prob)
        planted["same_item_extra_weight"] = 0.0
    if heads:
        # No single planted weight made `label` (any head): the heads hold the truth.
        del planted["behaviour_type_weights"], planted["behaviour_type_weights_normalised"]
        planted["label"] = "1 when any head's label is 1"
        planted["head_order"] = list(heads)
        planted["heads"] = {
            name: {
                "type_weight": w,
                "type_weight_normalised": {b: v / (sum(w.values()) or 1.0) for b, v in w.items()},
                "bias": bias,
            }
            for name, (w, bias) in heads.items()
        }
    return planted


def _label(cfg: Any) -> dict[str, Any]:
    """How the labels were made (schema.json "label"), in the terms of prepare._label."""
    if cfg.task != "conversion":
        return {
            "kind": "synthetic",
            "task": "click",
            "definition": "Bernoulli(sigmoid(planted logit))",
        }
    return {
        "kind": "synthetic",
        "task": "conversion",
        "definition": "Bernoulli(sigmoid(planted conversion logit))",
        "exposure": "pv",
        "positive": "the exposure converts: a Bernoulli(sigmoid(conversion logit)) draw, the "
        "logit = conversion_bias + history_scale * sum of planted type weights of history "
        "events on the target's category (decayed by recency) + item quality + user activity",
        "negatives": "exposures that did not convert; none sampled",
        "repeat_views": f"with probability {float(cfg.repeat_view_prob):g} the history holds "
        "1-3 earlier views of the exposed item (counted as same-category events)",
        "neg_ratio": 0,
        "target_type": "the exposure's behaviour (pv)",
        "target_type_reveals_label": False,
        **_heads_label(cfg),
    }


def _heads_label(cfg: Any) -> dict[str, Any]:
    """The heads' part of schema.json "label" (none without heads)."""
    heads = heads_of(cfg)
    if not heads:
        return {}
    return {
        "heads": list(heads),
        "head_positive": "labels[:, h]: a Bernoulli(sigmoid(head h's logit)) draw, the "
        "conversion logit with head h's planted type weights and bias (planted.json heads)",
        "definition": "1 when any head's Bernoulli(sigmoid(head logit)) draw is 1",
        "positive": "any head's label is 1",
    }


def _schema(cfg: Any, splits: dict[str, dict]) -> Schema:
    r = NUM_RESERVED
    return Schema(
        name="synthetic",
        vocab_sizes={
            "user_id": cfg.num_users + r,
            "age": NUM_AGE_BUCKETS + r,
            "gender": 2 + r,
            "item_id": cfg.num_items + r,
            "category": cfg.num_categories + r,
            "behaviour": len(BEHAVIOURS) + r,
            "time_gap": NUM_TIME_BUCKETS + r,
        },
        user_fields=(Field("user_id", "user_id"), Field("age", "age"), Field("gender", "gender")),
        item_fields=(Field("item_id", "item_id"), Field("category", "category")),
        hist_fields=(
            Field("item_id", "item_id"),
            Field("category", "category"),
            Field("behaviour", "behaviour"),
            Field("time_gap", "time_gap"),
        ),
        max_len=cfg.max_len,
        behaviour_types=BEHAVIOURS,
        label=_label(cfg),
        splits=splits,
        extra={"generator": cfg_to_dict(cfg), "planted": _planted(cfg)},
    )


def cfg_to_dict(cfg: Any) -> dict[str, Any]:
    """The generator settings as JSON values; no `heads` entry without heads, so data made
    before heads existed still matches its config (`ensure`)."""
    d = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    if not d.get("heads"):
        d.pop("heads", None)
    return json.loads(json.dumps(d, default=list))


class _World:
    """Users, items and categories drawn once per seed; examples are drawn from it."""

    def __init__(self, cfg: Any, rng: np.random.Generator):
        self.cfg = cfg
        self.item_cat = rng.integers(0, cfg.num_categories, cfg.num_items)
        pop = 1.0 / np.arange(1, cfg.num_items + 1) ** 0.8
        self.item_pop = rng.permutation(pop / pop.sum())
        self.item_quality = rng.normal(0, 1, cfg.num_items)
        self.user_fav = rng.integers(0, cfg.num_categories, (cfg.num_users, 3))
        self.user_age = rng.integers(0, NUM_AGE_BUCKETS, cfg.num_users)
        self.user_gender = rng.integers(0, 2, cfg.num_users)
        self.user_activity = rng.normal(0, 1, cfg.num_users)
        self.cat_items = [np.flatnonzero(self.item_cat == c) for c in range(cfg.num_categories)]
        self.heads = heads_of(cfg)

    def _items_in_cats(self, cats: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One random item per requested category (vectorised via per-category offsets)."""
        sizes = np.array([len(x) for x in self.cat_items])
        sizes_c = sizes[cats]
        out = np.empty(cats.shape, np.int64)
        nonempty = sizes_c > 0
        starts = np.concatenate([[0], np.cumsum(sizes)])[:-1]
        flat = np.concatenate(self.cat_items) if sizes.sum() else np.zeros(0, np.int64)
        pick = (rng.random(cats.shape) * np.maximum(sizes_c, 1)).astype(np.int64)
        out[nonempty] = flat[(starts[cats] + pick)[nonempty]]
        out[~nonempty] = rng.integers(0, self.cfg.num_items, int((~nonempty).sum()))
        return out

    def examples(
        self, n: int, rng: np.random.Generator, head_rng: np.random.Generator | None = None
    ) -> dict[str, np.ndarray]:
        """`n` examples of the configured task (the draws of "click" never change); with heads,
        their labels are drawn from `head_rng`, so `rng`'s draws do not depend on them."""
        cfg, r = self.cfg, NUM_RESERVED
        users, valid_NxL, hist_item, hist_type, gaps = self._histories(n, rng)
        # Target: half the time in one of the user's favourite categories.
        tcat = np.where(
            rng.random(n) < 0.5,
            self.user_fav[users, rng.integers(0, 3, n)],
            rng.integers(0, cfg.num_categories, n),
        )
        target = self._items_in_cats(tcat, rng)
        target_cat = self.item_cat[target]
        target_type = "buy"
        if cfg.task == "conversion":
            target_type = "pv"  # the exposure is a view of the target
            self._add_repeat_views(target, valid_NxL, hist_item, hist_type, rng)

        match_NxL = (self.item_cat[hist_item] == target_cat[:, None]) & valid_NxL
        weighted = match_NxL * cfg.recency_decay ** np.arange(cfg.max_len)

        def draw(type_weights: dict, bias: float, g: np.random.Generator) -> np.ndarray:
            """Bernoulli(sigmoid(logit)) labels with these planted type weights and bias."""
            w = np.array([type_weights[b] for b in BEHAVIOURS])
            hist_term = (w[hist_type] * weighted).sum(1)
            absent = set(cfg.signals_absent)
            logit = bias + (0 if "history" in absent else cfg.history_scale * hist_term)
            logit = logit + (
                0 if "item" in absent else cfg.item_quality_scale * self.item_quality[target]
            )
            logit = logit + (0 if "user" in absent else cfg.user_scale * self.user_activity[users])
            return (g.random(n) < 1 / (1 + np.exp(-logit))).astype(np.float32)

        bias = cfg.conversion_bias if cfg.task == "conversion" else cfg.bias
        label = draw(cfg.type_weights, bias, rng)
        labels = None
        if self.heads:
            g = head_rng if head_rng is not None else rng
            labels = np.stack([draw(w, b, g) for w, b in self.heads.values()], 1)
            label = labels.max(1)  # any head converts

        hist = np.stack(
            [hist_item + r, self.item_cat[hist_item] + r, hist_type + r, time_gap_bucket(gaps)],
            axis=-1,
        ).astype(np.int32)
        hist[~valid_NxL] = 0
        return {
            "user": np.stack(
                [users + r, self.user_age[users] + r, self.user_gender[users] + r], -1
            ).astype(np.int32),
            "item": np.stack([target + r, target_cat + r], -1).astype(np.int32),
            "hist": hist,
            "label": label,
            "user_key": users.astype(np.int64),
            "target_type": np.full(n, BEHAVIOURS.index(target_type) + r, np.int32),
            "timestamp": np.zeros(n, np.int64),  # set by `generate`
            **({} if labels is None else {"labels": labels}),
        }

    def _histories(self, n: int, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
        """(users, valid_NxL, hist_item, hist_type, gaps): users and their histories, most
        recent event first; gaps in seconds before the target."""
        cfg = self.cfg
        L = cfg.max_len
        users = rng.integers(0, cfg.num_users, n)
        lengths = rng.integers(cfg.min_len, L + 1, n)
        valid_NxL = np.arange(L)[None, :] < lengths[:, None]
        # History items: from the user's favourite categories with prob 0.6, else by popularity.
        fav_NxL = self.user_fav[users][np.arange(n)[:, None], rng.integers(0, 3, (n, L))]
        from_fav = rng.random((n, L)) < 0.6
        hist_item = np.where(
            from_fav,
            self._items_in_cats(fav_NxL, rng),
            rng.choice(cfg.num_items, (n, L), p=self.item_pop),
        )
        probs = np.array([cfg.type_probs[b] for b in BEHAVIOURS], np.float64)
        hist_type = rng.choice(len(BEHAVIOURS), (n, L), p=probs / probs.sum())
        gaps = np.cumsum(rng.exponential(3600.0 * 6, (n, L)), axis=1) + 60
        return users, valid_NxL, hist_item, hist_type, gaps

    def _add_repeat_views(
        self,
        target: np.ndarray,
        valid_NxL: np.ndarray,
        hist_item: np.ndarray,
        hist_type: np.ndarray,
        rng: np.random.Generator,
    ) -> None:
        """Earlier views of the exposed item, in place: with probability repeat_view_prob an
        exposure's history gets 1-3 of its events (random valid positions) turned into views
        of the target item."""
        n, L = hist_item.shape
        repeat = rng.random(n) < self.cfg.repeat_view_prob
        count = rng.integers(1, 4, n)
        # Rank the valid positions of each row in a random order; padding ranks last.
        keys = rng.random((n, L)) + ~valid_NxL
        rank = np.argsort(np.argsort(keys, axis=1), axis=1)
        views = repeat[:, None] & valid_NxL & (rank < count[:, None])
        hist_item[views] = np.broadcast_to(target[:, None], (n, L))[views]
        hist_type[views] = BEHAVIOURS.index("pv")


def generate(cfg: Any, output_dir: str) -> Schema:
    """Writes a synthetic prepared dataset (train/valid/test) to `output_dir`, atomically.

    Args:
      cfg: `config.data.synthetic` (see configs/default.py for fields and units).
      output_dir: the folder to create; replaced if present.
    Returns:
      The schema written to `output_dir/schema.json`.
    """
    for b in BEHAVIOURS:
        if cfg.type_weights[b] < 0:
            raise DataError(f"config.data.synthetic.type_weights.{b} must be >= 0")
    if cfg.task not in TASKS:
        raise DataError(f"config.data.synthetic.task: {cfg.task!r} is not one of {TASKS}")
    heads_of(cfg)  # checked before anything is written
    rng = np.random.default_rng(cfg.seed)
    head_rng = np.random.default_rng([cfg.seed, 1])  # the heads' draws (see `_World.examples`)
    world = _World(cfg, rng)
    sizes = {"train": cfg.train_examples, "valid": cfg.valid_examples, "test": cfg.test_examples}
    with files.atomic_folder(output_dir) as tmp:
        schema0 = _schema(cfg, {})
        splits, row = {}, 0
        for split, n in sizes.items():
            w = store.ShardWriter(tmp, split, schema0, rows_per_shard=cfg.rows_per_shard)
            done = 0
            while done < n:
                k = min(cfg.rows_per_shard, n - done)
                ex = world.examples(k, rng, head_rng)
                # One example a minute, train then valid then test: a time order for
                # time-respecting cross-validation (labels do not depend on it).
                ex["timestamp"] = START_TIME + 60 * np.arange(row, row + k, dtype=np.int64)
                w.add(ex)
                done, row = done + k, row + k
            splits[split] = w.close()
        schema = _schema(cfg, splits)
        schema.save(tmp)
    return schema


def saved_generator(output_dir: str) -> dict[str, Any] | None:
    """The generator settings of the synthetic dataset in `output_dir`; None when there is
    none (or it cannot be read). DataError when `output_dir` holds something else (a folder of
    the user's files, a file): it is not replaced."""
    if not os.path.exists(output_dir):
        return None
    if not os.path.isdir(output_dir):
        raise DataError(
            f"{output_dir}: exists and is not a folder; remove it or choose another --workdir"
        )
    try:
        return Schema.load(output_dir).extra["generator"]
    except (DataError, KeyError):
        if os.listdir(output_dir) and not os.path.exists(os.path.join(output_dir, "schema.json")):
            raise DataError(
                f"{output_dir}: a folder that is not a synthetic dataset of this engine (no "
                "schema.json) and would be replaced by the generated data; remove it or choose "
                "another --workdir"
            ) from None
        return None


def ensure(cfg: Any, output_dir: str) -> Schema:
    """The synthetic dataset in `output_dir`, generated unless the same config made it (see
    `saved_generator` for what is never replaced)."""
    if saved_generator(output_dir) == cfg_to_dict(cfg):
        return Schema.load(output_dir)
    return generate(cfg, output_dir)


def write_planted(schema: Schema, workdir: str) -> str:
    """Writes the planted ground truth of a synthetic dataset to `workdir/planted.json`."""
    path = os.path.join(workdir, PLANTED_FILE)
    files.write_json(path, schema.extra["planted"])
    return path
