"""Shared test helpers: tiny configs, tiny synthetic datasets and one-step runners."""

from __future__ import annotations

import functools

import jax
import numpy as np

from configs import tiny
from influence_jax import optim, sharding, train
from influence_jax.data import pipeline, synthetic
from influence_jax.data.store import ExampleStore
from influence_jax.models import build_model


def tiny_config(**overrides):
    config = tiny.get_config()
    for dotted, value in overrides.items():
        node = config
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


@functools.lru_cache(maxsize=4)
def tiny_dataset(root: str, seed: int = 0):
    """(schema, path) of the tiny synthetic dataset under `root` (generated once per session)."""
    config = tiny_config(**{"data.synthetic.seed": seed})
    path = f"{root}/tiny-data-{seed}"
    return synthetic.ensure(config.data.synthetic, path), path


def first_batch(schema, path, batch_size: int = 64) -> dict[str, np.ndarray]:
    store = ExampleStore(path, "train", schema)
    return pipeline.TrainBatches(store, batch_size, seed=0, num_batches=1)[0]


def setup(config, schema, devices=None, mesh_cfg=None):
    """(model, state, jitted train step, mesh) for `config` on `devices`."""
    mesh_cfg = mesh_cfg or config.mesh
    mesh = sharding.make_mesh(mesh_cfg, devices)
    model = build_model(config.model, schema)
    lr = optim.learning_rate_schedule(config.opt, config.loop.num_steps)
    tx = optim.make_optimizer(config.opt, config.loop.num_steps)
    state, state_sh = train.create_state(model, tx, schema, config.seed, mesh, mesh_cfg)
    step = jax.jit(
        train.make_train_step(model, tx, lr),
        in_shardings=(state_sh, sharding.batch_sharding(mesh)),
        out_shardings=(state_sh, sharding.replicated(mesh)),
    )
    return model, state, step, mesh
