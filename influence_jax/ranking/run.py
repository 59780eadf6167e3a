"""A trained run ready to score: params-only Orbax restore, the model rebuilt from the run's
config and the dataset schema, and one jitted, device-sharded scoring function.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import Mesh

from influence_jax import sharding, train
from influence_jax.data import synthetic
from influence_jax.data.schema import DataError, Schema
from influence_jax.models import build_model

BEST_FILE = "best.json"


@dataclasses.dataclass
class Run:
    """A trained run ready to score: its config, data, model and restored parameters."""

    workdir: str
    config: ml_collections.ConfigDict
    schema: Schema
    data_path: str
    model: nn.Module
    params: Any
    step: int
    mesh: Mesh


def resolve_step(workdir: str, step: str | int, available: list[int]) -> int:
    """`step` ("latest", "best" or a number) -> a saved step; best comes from WORKDIR/best.json."""
    if not available:
        raise DataError(f"{workdir}/checkpoints: no checkpoints; train the run first")
    if str(step) == "latest":
        return max(available)
    if str(step) == "best":
        path = os.path.join(workdir, BEST_FILE)
        if not os.path.exists(path):
            logging.warning("%s not found: --step=best falls back to the latest step", path)
            return max(available)
        try:
            with open(path) as f:
                n = int(json.load(f)["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f'{path}: expected {{"step": N, ...}} ({e!r})') from None
    else:
        try:
            n = int(step)
        except ValueError:
            raise DataError(f"--step must be a number, best or latest; got {step!r}") from None
    if n not in available:
        raise DataError(f"{workdir}/checkpoints: no step {n}; saved steps are {available}")
    return n


def _data_path(config: Any, workdir: str, data: str | None) -> str:
    if data:
        return data
    if config.data.source == "synthetic":
        path = os.path.join(workdir, "data")
        try:
            Schema.load(path)
        except DataError:  # the workdir can regenerate its synthetic data
            synthetic.ensure(ml_collections.ConfigDict(config.data.synthetic.to_dict()), path)
        return path
    if not config.data.path or not os.path.isdir(config.data.path):
        raise DataError(
            f"{workdir}/config.json: data path {config.data.path!r} is not a folder; pass --data"
        )
    return config.data.path


def load_run(workdir: str, data: str | None = None, step: str | int = "latest") -> Run:
    """Builds the model from WORKDIR/config.json and the dataset schema; restores params only."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise DataError(f"{cfg_path}: no such file; is {workdir!r} a training workdir?")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    data_path = _data_path(config, workdir, data)
    schema = Schema.load(data_path)
    model = build_model(config.model, schema)
    mesh = sharding.make_mesh(config.mesh)
    init = lambda: model.init(jax.random.PRNGKey(0), train.dummy_batch(schema), train=False)
    shapes = jax.eval_shape(init)["params"]
    shard = sharding.tree_shardings(shapes, sharding.sharding_rules(config.mesh, shapes), mesh)
    abstract = {
        "params": jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard
        )
    }
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=options,
        item_names=("state",),
    )
    try:
        n = resolve_step(workdir, step, sorted(manager.all_steps()))
        # Partial restore: only the "params" subtree of the saved TrainState is read.
        args = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        params = manager.restore(n, args=ocp.args.Composite(state=args))["state"]["params"]
    finally:
        manager.close()
    return Run(os.path.abspath(workdir), config, schema, data_path, model, params, n, mesh)


def param_shardings(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.sharding, params)


def make_score_fn(run: Run) -> Callable:
    """The jitted `score(params, batch) -> prob_B` (as the eval step), batch over `data`."""

    def score(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logit_B, _ = run.model.apply({"params": params}, batch, train=False)
        return jax.nn.sigmoid(logit_B)

    batch_sh = sharding.batch_sharding(run.mesh)
    return jax.jit(
        score, in_shardings=(param_shardings(run.params), batch_sh), out_shardings=batch_sh
    )


def global_batch(run: Run, batch_size: int | None = None) -> int:
    """`batch_size` (default: the eval batch) rounded up to a multiple of the data axis."""
    n_data = math.lcm(run.mesh.shape[sharding.DATA], jax.process_count())
    size = int(batch_size or run.config.data.eval_batch_size)
    return max(n_data, -(-size // n_data) * n_data)


def batched(
    fn: Callable,
    run: Run,
    n: int,
    gather: Callable[[np.ndarray], dict],
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """Runs `fn(params, batch)` over rows 0..n-1 in global batches; returns host arrays [n, ...].

    The last batch is padded with row 0 and the padding dropped. Each process gathers its slice
    of every global batch; batch t+1 is dispatched before batch t is fetched. `progress`, if
    given, is called with the number of rows done after each fetch.
    """
    p, local = jax.process_index(), batch_size // jax.process_count()
    outs, pending = [], None
    fetch = lambda out: jax.tree_util.tree_map(sharding.to_host, out)

    def collect(out: Any) -> None:
        outs.append(fetch(out))
        if progress is not None:
            progress(min(n, len(outs) * batch_size))

    for start in range(0, n, batch_size):
        idx = np.arange(start + p * local, start + (p + 1) * local)
        batch = gather(np.where(idx < n, idx, 0))
        out = fn(run.params, sharding.to_global(batch, run.mesh))
        if pending is not None:
            collect(pending)
        pending = out
    if pending is not None:
        collect(pending)
    if not outs:
        return None
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:n], *outs)
