"""Every check of a config, in one place: one clear ConfigError naming the field.

`check(config)` needs nothing but the config and runs before JAX starts (main.py calls it
before the multi-process runtime); with `num_devices` it also checks the mesh and the batch
split over devices and processes. `check_schema(config, schema)` checks the names that only the
dataset can confirm (dropped behaviour types, a per-type early-stopping metric, splits).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Any

from influence_jax import metrics
from influence_jax.data import synthetic
from influence_jax.errors import ConfigError, DataError
from influence_jax.models import EXTRACTORS, MODELS, OUTPUT_BIAS, model_fields
from influence_jax.models.multitask import parse_objective

DATA_SOURCES = ("synthetic", "prepared")
OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("constant", "cosine")
COMBINE = ("softmax", "sum")
EARLY_STOP_MODES = ("auto", "max", "min")


def check(config: Any, num_devices: int | None = None, num_processes: int = 1) -> None:
    """Raises ConfigError for the first invalid field of `config`.

    Args:
      num_devices: devices of the run; when given, the mesh and the division of the batches
        over data-parallel devices and processes are checked too.
    """
    _check_data(config.data)
    _check_model(config.model)
    _check_opt(config.opt)
    _check_loop(config.loop)
    _check_mesh(config.mesh)
    _positive(config.ckpt, "ckpt", "every")
    _at_least(config.ckpt, "ckpt", "max_to_keep", 0)
    if config.get("warm_start") is not None:  # absent from older runs' configs
        _check_warm_start(config.warm_start)
    if num_devices is not None:
        check_devices(config, num_devices, num_processes)


def check_devices(config: Any, num_devices: int, num_processes: int = 1) -> None:
    """The mesh fits `num_devices`; both batch sizes divide over its data axis and processes."""
    data_par = mesh_axis_sizes(config.mesh, num_devices)["data"]
    for field in ("batch_size", "eval_batch_size"):
        b = getattr(config.data, field)
        if b % data_par:
            raise ConfigError(
                f"config.data.{field}={b} does not divide over the {data_par} data-parallel "
                f"devices of the mesh; use a multiple of {data_par}"
            )
        if b % num_processes:
            raise ConfigError(
                f"config.data.{field}={b} does not divide over {num_processes} processes"
            )
    blocks = config.opt.grad_blocks
    if config.data.batch_size % (data_par * blocks):
        raise ConfigError(
            f"config.opt.grad_blocks={blocks}: config.data.batch_size={config.data.batch_size} "
            f"does not split into {blocks} blocks on each of the {data_par} data-parallel "
            f"devices; use a multiple of {data_par * blocks}"
        )


def check_schema(config: Any, schema: Any) -> None:
    """Names that the dataset must confirm: behaviour types and splits."""
    types = tuple(schema.behaviour_types)
    unknown = [t for t in config.data.drop_behaviours if t not in types]
    if unknown:
        raise ConfigError(
            f"config.data.drop_behaviours: {unknown} not among the dataset's behaviour types "
            f"{list(types)}"
        )
    if types and set(types) <= set(config.data.drop_behaviours):
        logging.warning(
            "config.data.drop_behaviours drops every behaviour type %s: the model trains "
            "without any history (a no-history baseline)",
            list(types),
        )
    _, _, kind = config.loop.early_stop_metric.partition("/")
    if kind and kind not in types:
        raise ConfigError(
            f"config.loop.early_stop_metric: {config.loop.early_stop_metric!r}: {kind!r} is not "
            f"a behaviour type of the dataset {list(types)}"
        )
    _check_heads(config.model, tuple(getattr(schema, "heads", ())))
    for field in ("eval_split", "final_eval_split"):
        split = getattr(config.loop, field)
        if split and split not in schema.splits:
            raise ConfigError(
                f"config.loop.{field}: the dataset has no split {split!r}; it has "
                f"{sorted(schema.splits)}"
            )


MIXTURES = ("towers", "mmoe")  # config.model.multitask.mixture


def _check_heads(m: Any, heads: tuple[str, ...]) -> None:
    """A multi-task model needs a dataset with heads; its objective, chain and loss weights
    name heads, and a chain's parent is not itself chained."""
    if m.name != "multitask":
        return
    if not heads:
        raise ConfigError(
            "config.model.name='multitask' needs a dataset with label heads (prepare_data.py "
            "--heads=..., or config.data.synthetic.heads); this one has a single label"
        )
    mt = m.get("multitask", {})
    if mt.get("mixture", "towers") not in MIXTURES:
        raise ConfigError(
            f"config.model.multitask.mixture: {mt.get('mixture')!r}; choose from {MIXTURES}"
        )
    if mt.get("mixture") == "mmoe" and not int(mt.get("experts", 3)) >= 1:
        raise ConfigError(
            f"config.model.multitask.experts: must be at least 1, got {mt.get('experts')}"
        )
    try:
        parse_objective(mt.get("objective", ""), heads)
    except ValueError as e:
        raise ConfigError(f"config.model.multitask.objective: {e}") from None
    named = {}
    chain = dict(mt.get("chain", {}) or {})
    named["chain"] = list(chain) + list(chain.values())
    named["loss_weights"] = list(dict(mt.get("loss_weights", {}) or {}))
    for field, names in named.items():
        unknown = [n for n in names if n not in heads]
        if unknown:
            raise ConfigError(
                f"config.model.multitask.{field}: {unknown} not among the dataset's heads "
                f"{list(heads)}"
            )
    nested = [h for h, parent in chain.items() if parent in chain or parent == h]
    if nested:
        raise ConfigError(
            f"config.model.multitask.chain: {nested} chain to a chained head or to themselves; "
            "a parent must be a plain head"
        )


def mesh_axis_sizes(mesh_cfg: Any, num_devices: int) -> dict[str, int]:
    """Sizes of the `data` and `model` axes; -1 means all remaining devices."""
    data, model = int(mesh_cfg.data), int(mesh_cfg.model)
    if data == 0 or model == 0 or data < -1 or model < -1 or (data == -1 and model == -1):
        raise ConfigError(
            f"config.mesh: data={data}, model={model}; give positive sizes, at most one of them -1"
        )
    given = {"data": data, "model": model}
    fixed = model if data == -1 else data if model == -1 else None  # the size that is set
    if fixed is not None and num_devices % fixed == 0:
        data, model = (num_devices // fixed, model) if data == -1 else (data, num_devices // fixed)
    if data * model != num_devices:
        said = ", ".join(f"{k}={v}" for k, v in given.items() if v != -1)
        what = (
            f"{said} does not divide the {num_devices} devices"
            if fixed is not None
            else f"data={data} x model={model} != {num_devices} devices"
        )
        raise ConfigError(f"config.mesh: {what}; the mesh uses every device of the run")
    return {"data": data, "model": model}


def metric_mode(metric: str, mode: str) -> str:
    """'max' or 'min' for `metric`; mode 'auto' means min for losses, max otherwise."""
    if mode in ("max", "min"):
        return mode
    if mode != "auto":
        raise ConfigError(f"config.loop.early_stop_mode: {mode!r} is not one of {EARLY_STOP_MODES}")
    return metrics.mode(metric)


def _positive(node: Any, where: str, field: str) -> None:
    value = getattr(node, field)
    if not value > 0:
        raise ConfigError(f"config.{where}.{field}: must be positive, got {value}")


def _at_least(node: Any, where: str, field: str, low: float) -> None:
    value = getattr(node, field)
    if not value >= low:
        raise ConfigError(f"config.{where}.{field}: must be >= {low}, got {value}")


def _one_of(value: Any, choices: tuple, field: str) -> None:
    if value not in choices:
        raise ConfigError(f"config.{field}: {value!r} is not one of {choices}")


def _rate(value: float, field: str) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"config.{field}: must be in [0, 1), got {value}")


def _check_data(d: Any) -> None:
    _one_of(d.source, DATA_SOURCES, "data.source")
    if d.source == "prepared" and not d.path:
        raise ConfigError(
            "config.data.path: set it to a prepared dataset folder "
            "(tools/prepare_data.py) when config.data.source='prepared'"
        )
    for field in ("batch_size", "eval_batch_size", "num_threads"):
        _positive(d, "data", field)
    _at_least(d, "data", "prefetch", 0)
    _at_least(d, "data", "shuffle_seed", 0)
    for field in ("train_time_range", "eval_time_range"):
        value = tuple(getattr(d, field) or ())
        if value and len(value) != 2:
            raise ConfigError(f"config.data.{field}: give () or (start, end), got {value}")
    if isinstance(d.drop_behaviours, str):
        raise ConfigError(
            f"config.data.drop_behaviours: give a tuple of names, e.g. ({d.drop_behaviours!r},)"
        )
    if d.source == "synthetic":
        syn = d.synthetic
        sizes = ("num_users", "num_items", "num_categories", "max_len", "min_len")
        for field in sizes + ("train_examples", "valid_examples", "test_examples"):
            _positive(syn, "data.synthetic", field)
        _positive(syn, "data.synthetic", "rows_per_shard")
        if syn.min_len > syn.max_len:
            raise ConfigError(
                f"config.data.synthetic.min_len: {syn.min_len} exceeds max_len {syn.max_len}"
            )
        _check_synthetic_task(syn)


def _check_synthetic_task(syn: Any) -> None:
    """The task and its conversion fields (a bias in logits, a probability)."""
    _one_of(syn.task, synthetic.TASKS, "data.synthetic.task")
    _at_least(syn, "data.synthetic", "seed", 0)
    # ConfigDict's typing rejects non-numbers; NaN and inf pass it.
    for field in ("bias", "conversion_bias", "history_scale", "item_quality_scale", "user_scale"):
        if not math.isfinite(getattr(syn, field)):
            raise ConfigError(
                f"config.data.synthetic.{field}: must be finite, got {getattr(syn, field)}"
            )
    if not 0.0 < syn.recency_decay <= 1.0:
        raise ConfigError(
            f"config.data.synthetic.recency_decay: must be in (0, 1], got {syn.recency_decay}"
        )
    unknown = sorted(set(syn.signals_absent) - set(synthetic.SIGNALS))
    if isinstance(syn.signals_absent, str) or unknown:
        raise ConfigError(
            f"config.data.synthetic.signals_absent: give a tuple of {synthetic.SIGNALS}, got "
            f"{syn.signals_absent!r}"
        )
    for field in ("type_weights", "type_probs"):
        table = dict(getattr(syn, field))
        if sorted(table) != sorted(synthetic.BEHAVIOURS):
            raise ConfigError(
                f"config.data.synthetic.{field}: give a value for each of {synthetic.BEHAVIOURS}"
                f", got {sorted(table)}"
            )
        for b, v in table.items():
            if not (math.isfinite(v) and v >= 0):
                raise ConfigError(f"config.data.synthetic.{field}.{b}: must be >= 0, got {v}")
    if not sum(syn.type_probs.values()) > 0:
        raise ConfigError("config.data.synthetic.type_probs: at least one must be positive")
    if not 0.0 <= syn.repeat_view_prob <= 1.0:
        raise ConfigError(
            f"config.data.synthetic.repeat_view_prob: must be in [0, 1], got {syn.repeat_view_prob}"
        )
    try:
        synthetic.heads_of(syn)
    except DataError as e:
        raise ConfigError(str(e)) from None


def _check_fields(args: Any, cls: type, where: str) -> None:
    """`args` (a sub-config) sets only fields that `cls` declares, with sane dropout rates."""
    args = args.to_dict() if hasattr(args, "to_dict") else dict(args or {})
    declared = model_fields(cls)
    unknown = sorted(set(args) - declared)
    if unknown:
        raise ConfigError(
            f"config.model.{where}: unknown field(s) {unknown}; {cls.__name__} takes "
            f"{sorted(declared)}"
        )
    for field, value in args.items():
        if field == "dropout":
            _rate(value, f"model.{where}.dropout")
        elif field in ("filters", "kernel_size", "heads", "ff") and not value > 0:
            raise ConfigError(f"config.model.{where}.{field}: must be positive, got {value}")
        elif field == "taus" and not (_seq(value) and all(t > 0 for t in _seq(value))):
            raise ConfigError(f"config.model.{where}.taus: decays must be positive, got {value}")
        elif field == "hidden" and not all(h > 0 for h in _seq(value)):
            raise ConfigError(f"config.model.{where}.hidden: widths must be positive, got {value}")


def _seq(value: Any) -> tuple:
    return tuple(value) if isinstance(value, list | tuple) else (value,)


def _check_model(m: Any) -> None:
    if m.name not in MODELS:
        raise ConfigError(
            f"config.model.name: unknown model {m.name!r}; choose from {sorted(MODELS)}"
        )
    _positive(m, "model", "embed_dim")
    _one_of(m.get("output_bias", "zero"), OUTPUT_BIAS, "model.output_bias")
    if m.name in ("ranker", "multitask"):
        names = tuple(m.extractors)
        unknown = [n for n in names if n not in EXTRACTORS]
        if unknown or not names or len(set(names)) != len(names):
            raise ConfigError(
                f"config.model.extractors: {names!r} must be a non-empty tuple of distinct names "
                f"from {sorted(EXTRACTORS)}"
            )
        _one_of(m.combine, COMBINE, "model.combine")
        if m.name == "multitask" and "rates" in names and m.multitask.mixture == "mmoe":
            raise ConfigError(
                "config.model.extractors: 'rates' learns one label's train rates, and the "
                "experts of model.multitask.mixture='mmoe' serve every head; use it with "
                "mixture='towers' (a tower per head) or in a single-task ranker"
            )
    # Every model's and extractor's own settings, used now or not: a typo fails today.
    for name, cls in {**MODELS, **EXTRACTORS}.items():
        if name in m:
            _check_fields(m[name], cls, name)


def _check_opt(o: Any) -> None:
    _one_of(o.name, OPTIMIZERS, "opt.name")
    _one_of(o.schedule, SCHEDULES, "opt.schedule")
    for field in ("learning_rate", "influence_lr_multiplier", "sparse_learning_rate",
                  "sparse_min_rows", "grad_blocks"):  # fmt: skip
        _positive(o, "opt", field)
    for field in ("warmup_steps", "weight_decay", "grad_clip"):
        _at_least(o, "opt", field, 0)
    if not 0 < o.stats_rate <= 1:
        raise ConfigError(f"config.opt.stats_rate: must be in (0, 1], got {o.stats_rate}")
    if not 0 <= o.get("ema_decay", 0.0) < 1:
        raise ConfigError(f"config.opt.ema_decay: must be in [0, 1), got {o.ema_decay}")


def _check_warm_start(ws: Any) -> None:
    step = str(ws.step)
    if step not in ("best", "latest") and not step.isdigit():
        raise ConfigError(f"config.warm_start.step: 'best', 'latest' or a number, got {step!r}")


def _check_loop(lp: Any) -> None:
    for field in ("num_steps", "log_every"):
        _positive(lp, "loop", field)
    _at_least(lp, "loop", "eval_every", 0)
    _at_least(lp, "loop", "early_stop_patience", 0)
    if not lp.eval_split:
        raise ConfigError("config.loop.eval_split: name the split evaluated during training")
    metric = lp.early_stop_metric
    if not metric:
        if lp.early_stop_patience:
            raise ConfigError("config.loop.early_stop_patience: set config.loop.early_stop_metric")
    elif not metrics.is_metric_key(metric, heads=False):
        raise ConfigError(
            f"config.loop.early_stop_metric: {metric!r} is not one of {metrics.METRICS}, "
            "optionally '/<behaviour type>'"
        )
    metric_mode(metric, lp.early_stop_mode)


MESH_AXES = ("data", "model")  # sharding.DATA, sharding.MODEL (that module loads JAX)


def _check_mesh(mesh: Any) -> None:
    for field in ("data", "model"):
        value = getattr(mesh, field)
        if not isinstance(value, int) or value == 0 or value < -1:
            raise ConfigError(f"config.mesh.{field}: give a positive size or -1, got {value!r}")
    if mesh.data == -1 and mesh.model == -1:
        raise ConfigError("config.mesh: at most one of data and model may be -1")
    _positive(mesh, "mesh", "shard_min_rows")
    for entry in mesh.rules:
        if not isinstance(entry, list | tuple) or len(entry) != 2:
            raise ConfigError(f"config.mesh.rules: {entry!r} is not a (regex, spec) pair")
        regex, spec = entry
        try:
            re.compile(regex)
        except (re.error, TypeError) as e:
            raise ConfigError(
                f"config.mesh.rules: {regex!r} is not a regular expression ({e})"
            ) from None
        axes = spec if isinstance(spec, list | tuple) else (spec,)
        for axis in axes:
            names = axis if isinstance(axis, list | tuple) else (axis,)
            if any(a is not None and a not in MESH_AXES for a in names):
                raise ConfigError(
                    f"config.mesh.rules: ({regex!r}, {spec!r}): give each dimension one of the "
                    f"mesh axes {MESH_AXES} or None"
                )
