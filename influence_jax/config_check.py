"""Start-up validation of a config: one clear error naming the field, before any work starts."""

from __future__ import annotations

from typing import Any


class ConfigError(ValueError):
    """A config value a user set is invalid; the message names the field and what to do."""


def check(config: Any, num_devices: int, num_processes: int = 1) -> None:
    """Raises ConfigError for the first invalid field of `config` on `num_devices` devices."""
    from influence_jax.models import MODELS

    d = config.data
    if d.source not in ("synthetic", "prepared"):
        raise ConfigError(f"config.data.source: {d.source!r} is not 'synthetic' or 'prepared'")
    if d.source == "prepared" and not d.path:
        raise ConfigError(
            "config.data.path: set it to a prepared dataset folder "
            "(tools/prepare_data.py) when config.data.source='prepared'"
        )
    for field in ("batch_size", "eval_batch_size"):
        if getattr(d, field) <= 0:
            raise ConfigError(f"config.data.{field}: must be positive, got {getattr(d, field)}")
    if config.model.name not in MODELS:
        raise ConfigError(
            f"config.model.name: unknown model {config.model.name!r}; choose from {sorted(MODELS)}"
        )
    if not 0.0 <= config.model.dropout < 1.0:
        raise ConfigError(f"config.model.dropout: must be in [0, 1), got {config.model.dropout}")
    for field in ("num_steps", "log_every"):
        if getattr(config.loop, field) <= 0:
            raise ConfigError(
                f"config.loop.{field}: must be positive, got {getattr(config.loop, field)}"
            )
    if config.opt.learning_rate <= 0:
        raise ConfigError(
            f"config.opt.learning_rate: must be positive, got {config.opt.learning_rate}"
        )
    if config.ckpt.every <= 0:
        raise ConfigError(f"config.ckpt.every: must be positive, got {config.ckpt.every}")
    data_par = mesh_axis_sizes(config.mesh, num_devices)["data"]
    for field in ("batch_size", "eval_batch_size"):
        b = getattr(d, field)
        if b % data_par:
            raise ConfigError(
                f"config.data.{field}={b} does not divide over the {data_par} data-parallel "
                f"devices of the mesh; use a multiple of {data_par}"
            )
        if b % num_processes:
            raise ConfigError(
                f"config.data.{field}={b} does not divide over {num_processes} processes"
            )


def mesh_axis_sizes(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Sizes of the `data` and `model` axes; -1 means all remaining devices."""
    data, model = int(mesh_cfg.data), int(mesh_cfg.model)
    if data == 0 or model == 0 or data < -1 or model < -1 or (data == -1 and model == -1):
        raise ConfigError(
            f"config.mesh: data={data}, model={model}; give positive sizes, at most one of them -1"
        )
    if data == -1:
        data = num_devices // model
    if model == -1:
        model = num_devices // data
    if data * model != num_devices:
        raise ConfigError(f"config.mesh: data={data} x model={model} != {num_devices} devices")
    return {"data": data, "model": model}
