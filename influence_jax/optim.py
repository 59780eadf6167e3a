"""The optax optimizer chain and learning-rate schedule from `config.opt`."""

from __future__ import annotations

from typing import Any

import optax

from influence_jax.config_check import ConfigError


def learning_rate_schedule(opt_cfg: Any, num_steps: int) -> optax.Schedule:
    """Linear warm-up to `learning_rate`, then constant or cosine decay to the last step."""
    lr, warm = opt_cfg.learning_rate, max(0, int(opt_cfg.warmup_steps))
    if opt_cfg.schedule == "constant":
        after = optax.constant_schedule(lr)
    elif opt_cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(lr, max(1, num_steps - warm))
    else:
        raise ConfigError(
            f"config.opt.schedule: {opt_cfg.schedule!r} is not 'constant' or 'cosine'"
        )
    if not warm:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warm), after], [warm])


def make_optimizer(opt_cfg: Any, num_steps: int) -> optax.GradientTransformation:
    schedule = learning_rate_schedule(opt_cfg, num_steps)
    if opt_cfg.name == "adam":
        core = optax.adam(schedule)
    elif opt_cfg.name == "adamw":
        core = optax.adamw(schedule, weight_decay=opt_cfg.weight_decay)
    else:
        raise ConfigError(f"config.opt.name: {opt_cfg.name!r} is not 'adam' or 'adamw'")
    if opt_cfg.grad_clip > 0:
        return optax.chain(optax.clip_by_global_norm(opt_cfg.grad_clip), core)
    return core
