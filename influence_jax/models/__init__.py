"""Model registry: `config.model.name` -> a Flax module built from the schema."""

from __future__ import annotations

from typing import Any

import flax.linen as nn

from influence_jax.data.schema import Schema
from influence_jax.models.seed_cnn import SeedCNN

MODELS: dict[str, type[nn.Module]] = {"seed_cnn": SeedCNN}


def build_model(model_cfg: Any, schema: Schema) -> nn.Module:
    """Builds `MODELS[model_cfg.name]` with the config's other fields as keyword arguments."""
    kwargs = dict(model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else model_cfg)
    name = kwargs.pop("name")
    if name not in MODELS:
        from influence_jax.config_check import ConfigError

        raise ConfigError(
            f"config.model.name: unknown model {name!r}; choose from {sorted(MODELS)}"
        )
    return MODELS[name](schema=schema, **kwargs)
