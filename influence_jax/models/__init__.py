"""Model registry: `config.model.name` -> a Flax module built from the schema.

`config.model` holds the fields every model shares (embed_dim, share_item_embeddings, the
ranker's extractor list and switches) and one sub-config per model or extractor with its own
settings: `config.model.seed_cnn`, `config.model.din`, `config.model.cnn`, ... A model takes
the shared fields it declares plus its own sub-config; the ranker's extractors each take
`config.model.<extractor name>`. The config is checked in config_check.py before any build.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
from absl import logging

from influence_jax.data.schema import Schema
from influence_jax.models.extractors import EXTRACTORS  # noqa: F401 - part of the registry
from influence_jax.models.multitask import MultiTask
from influence_jax.models.ranker import Ranker
from influence_jax.models.seed_cnn import SeedCNN

MODELS: dict[str, type[nn.Module]] = {"seed_cnn": SeedCNN, "ranker": Ranker, "multitask": MultiTask}
OUTPUT_BIAS = ("zero", "prior")  # config.model.output_bias: the output bias at init


def model_fields(cls: type[nn.Module]) -> set[str]:
    """The settings a module class declares (its dataclass fields, less Flax's and the schema)."""
    return {f.name for f in dataclasses.fields(cls)} - {"name", "parent", "schema"}


def build_model(model_cfg: Any, schema: Schema) -> nn.Module:
    """Builds `MODELS[model_cfg.name]` from the shared fields it declares and its sub-config."""
    cfg = model_cfg.to_dict() if hasattr(model_cfg, "to_dict") else dict(model_cfg)
    cls = MODELS[cfg["name"]]
    declared = model_fields(cls) - {"shared_embeddings"}
    kwargs = {k: _freeze(v) for k, v in cfg.items() if k in declared}
    kwargs["bias_init"] = prior_bias(schema) if cfg.get("output_bias") == "prior" else 0.0
    kwargs.update({k: _freeze(v) for k, v in dict(cfg.get(cfg["name"], {})).items()})
    if "heads" in declared:  # the dataset's heads, in its `labels` column order
        kwargs["heads"] = schema.heads
    if "extractor_args" in declared:
        names = tuple(cfg.get("extractors", ()))
        kwargs["extractors"] = names
        kwargs["extractor_args"] = {n: _freeze(cfg.get(n, {})) for n in names}
    return cls(schema=schema, **kwargs)


def prior_bias(schema: Schema) -> float:
    """Log-odds of the train split's positive rate (0 for data that does not record it)."""
    rate = schema.positive_rate("train")
    if rate is None:
        logging.warning(
            "output_bias=prior: the data does not record its train positive rate (prepared "
            "before label_sum was recorded); starting from bias 0. Re-prepare it to fix."
        )
        return 0.0
    rate = min(max(rate, 1e-4), 1 - 1e-4)
    return math.log(rate / (1 - rate))


def _freeze(v: Any) -> Any:
    """Lists -> tuples, dicts -> dicts of frozen values, so module attributes hash."""
    if isinstance(v, list):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return {k: _freeze(x) for k, x in v.items()}
    return v
