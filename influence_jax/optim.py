"""The optax optimizer chain and learning-rate schedule from `config.opt`."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(opt_cfg: Any, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then constant or cosine decay to the last step."""
    lr, warm = opt_cfg.learning_rate, max(0, int(opt_cfg.warmup_steps))
    if opt_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    else:  # "cosine" (config_check allows no other)
        after = optax.cosine_decay_schedule(lr, max(1, num_steps - warm))
    if not warm:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


# Scalar influence parameters (behaviour-type gates, extractor logits): few, shared by every
# example, and read as the product's output, so they get their own learning-rate multiplier.
INFLUENCE_PARAMS = ("behaviour_type_logits", "extractor_logits", "score_log_scale")
# Running statistics kept as parameters and fitted by a squared-error loss term: plain SGD at
# rate r turns that fit into an exponential moving average with momentum 1 - r, unclipped.
STATS_PARAMS = ("score_mean", "score_var")
# Tables read from the training data (models.extractors.TrainRates): never updated.
FROZEN_PREFIX = "frozen_"


def _core(opt_cfg: Any, schedule: optax.Schedule) -> optax.GradientTransformation:
    if opt_cfg.name == "adamw":
        return optax.adamw(schedule, weight_decay=opt_cfg.weight_decay)
    return optax.adam(schedule)  # "adam" (config_check allows no other)


def param_labels(params: Any) -> Any:
    """'influence' for the influence parameters and the top-level logit bias, 'stats' for
    running statistics, 'frozen' for tables of counts, 'default' for everything else."""

    def label(path, _):
        key = getattr(path[-1], "key", None)
        if key in STATS_PARAMS:
            return "stats"
        if str(key).startswith(FROZEN_PREFIX):
            return "frozen"
        # The model's own top-level logit bias is such a scalar too: over standardised scores
        # it alone carries the base rate, which it must reach within a short run.
        top_bias = key == "bias" and (
            len(path) == 1
            or (len(path) == 2 and str(getattr(path[0], "key", "")).startswith("head_"))
        )  # a multi-task model's heads each have one (models/multitask.py)
        return "influence" if key in INFLUENCE_PARAMS or top_bias else "default"

    return jax.tree_util.tree_map_with_path(label, params)


def make_optimizer(opt_cfg: Any, num_steps: int) -> optax.GradientTransformation:
    """The optax chain of `config.opt` (checked by config_check) for a run of `num_steps`."""
    schedule = learning_rate_schedule(opt_cfg, num_steps)
    mult = float(opt_cfg.influence_lr_multiplier)
    rate = float(opt_cfg.stats_rate)

    def learned(params: Any) -> Any:  # what the gradient clip sees: the learned parameters
        return jax.tree_util.tree_map(
            lambda lab: lab not in ("stats", "frozen"), param_labels(params)
        )

    core = optax.multi_transform(
        {"default": _core(opt_cfg, schedule),
         "influence": _core(opt_cfg, lambda step: mult * schedule(step)),
         "stats": optax.sgd(rate),
         "frozen": optax.set_to_zero()},
        param_labels,
    )  # fmt: skip
    if opt_cfg.grad_clip > 0:
        clip = optax.masked(optax.clip_by_global_norm(opt_cfg.grad_clip), learned)
        return optax.chain(clip, core)
    return core


def average_decay(decay: float, step: jax.Array) -> jax.Array:
    """The weight of the average so far at the update of `step` (counted from 0):
    d (1 - d^t) / (1 - d^(t+1)), which keeps the average equal to the bias-corrected moving
    average (as Adam corrects its moments): sum_s d^(t-s) p_s / sum_s d^(t-s) over the steps so
    far. The first step's is 0, so the initial parameters never enter; it tends to d."""
    log_d = math.log(decay)  # float64: 1 - d^t to float32 precision even for d near 1
    t = step.astype(jnp.float32)
    return jnp.float32(decay) * jnp.expm1(t * log_d) / jnp.expm1((t + 1.0) * log_d)


def update_average(average: Any, params: Any, step: jax.Array, decay: float) -> Any:
    """One step of the parameters' exponential moving average (`config.opt.ema_decay`).

    `average` mirrors `params` (the parameters the optax chain updates: without row-sparse
    tables); tables of counts (`frozen_*`) are copied, never averaged.
    """
    d = average_decay(decay, step)
    return jax.tree_util.tree_map(
        lambda label, a, p: p if label == "frozen" else d * a + (1.0 - d) * p,
        param_labels(params),
        average,
        params,
    )


def with_average(params: Any, average: Any | None) -> Any:
    """The parameters that evaluation, ranking and reports use: `params` with each leaf that
    the moving average holds replaced by its average (row-sparse tables and tables of counts
    stay the trained ones); `params` itself when no average is kept."""
    if average is None:
        return params
    if not isinstance(average, Mapping):
        return average
    out = dict(params)
    for key, value in average.items():
        if not str(key).startswith(FROZEN_PREFIX):
            out[key] = with_average(params[key], value)
    return out
