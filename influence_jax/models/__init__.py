"""Model registry: `config.model.name` -> a Flax module built from the schema."""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn

from influence_jax.config_check import ConfigError
from influence_jax.data.schema import Schema
from influence_jax.models.extractors import EXTRACTORS
from influence_jax.models.ranker import Ranker
from influence_jax.models.seed_cnn import SeedCNN

MODELS: dict[str, type[nn.Module]] = {"seed_cnn": SeedCNN, "ranker": Ranker}


def build_model(model_cfg: Any, schema: Schema) -> nn.Module:
    """Builds `MODELS[model_cfg.name]` from the config fields that model declares.

    `config.model` holds the settings of every model; each takes the fields it declares. The
    ranker's extractors take their settings from `config.model.<extractor name>`.
    """
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    name = cfg.get("name")
    if name not in MODELS:
        raise ConfigError(
            f"config.model.name: unknown model {name!r}; choose from {sorted(MODELS)}"
        )
    cls = MODELS[name]
    declared = {f.name for f in dataclasses.fields(cls)} - {"name", "parent", "schema"}
    kwargs = {k: _freeze(v) for k, v in cfg.items() if k in declared}
    if "extractor_args" in declared:
        names = tuple(cfg.get("extractors", ()))
        unknown = [n for n in names if n not in EXTRACTORS]
        if unknown or not names:
            raise ConfigError(
                f"config.model.extractors: {names!r} must be a non-empty tuple of "
                f"{sorted(EXTRACTORS)}"
            )
        kwargs["extractors"] = names
        kwargs["extractor_args"] = {n: _freeze(cfg.get(n, {})) for n in names}
    return cls(schema=schema, **kwargs)


def _freeze(v: Any) -> Any:
    """Lists -> tuples, dicts -> sorted item tuples' dicts, so module attributes hash."""
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return {k: _freeze(x) for k, x in v.items()}
    return v
