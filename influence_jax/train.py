"""Training library: sharded state creation, the pure train/eval steps, and the training loop."""

from __future__ import annotations

import json
import os
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from influence_jax import checkpoint as ckpt_lib
from influence_jax import config_check, metrics, optim, sharding, sparse, summary
from influence_jax import loop as loop_lib
from influence_jax.data import pipeline, synthetic
from influence_jax.data.schema import NUM_RESERVED, Schema
from influence_jax.data.store import ExampleStore
from influence_jax.loop import TrainingError  # noqa: F401 - part of this module's API
from influence_jax.models import build_model

EVAL_KEYS = ("user", "item", "hist", "label", "weight", "user_key", "target_type")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base PRNG key; step t's dropout key is fold_in(rng, t)


def dummy_batch(schema: Schema, batch_size: int = 2) -> dict[str, np.ndarray]:
    """Zeros shaped like a model batch, for initialisation and shape inference."""
    return {
        "user": np.zeros((batch_size, len(schema.user_fields)), np.int32),
        "item": np.zeros((batch_size, len(schema.item_fields)), np.int32),
        "hist": np.zeros((batch_size, schema.max_len, len(schema.hist_fields)), np.int32),
        "label": np.zeros((batch_size,), np.float32),
        "weight": np.ones((batch_size,), np.float32),
    }


def create_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    schema: Schema,
    seed: int,
    mesh: jax.sharding.Mesh,
    mesh_cfg: Any,
    sparse_vocabs: tuple[str, ...] = (),
) -> tuple[TrainState, Any]:
    """Initialises the train state directly into its shardings; returns (state, shardings).

    The init is traced with eval_shape first, shardings are derived from the abstract shapes,
    and the init is jitted with those out_shardings, so nothing is materialised on one device.
    Tables of `sparse_vocabs` get row-wise Adagrad state instead of optax state (sparse.py).
    """
    batch = dummy_batch(schema)

    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = model.init({"params": init_rng}, batch, train=False)["params"]
        if sparse_vocabs:
            opt_state = sparse.init_opt_state(tx, params, sparse_vocabs)
        else:
            opt_state = tx.init(params)
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=state_rng
        )

    rng = jax.random.PRNGKey(seed)
    shapes = jax.eval_shape(init, rng)
    rules = sharding.sharding_rules(mesh_cfg, shapes.params)
    shardings = sharding.tree_shardings(shapes, rules, mesh)
    state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def sparse_vocabs_for(opt_cfg: Any, model: nn.Module, schema: Schema) -> tuple[str, ...]:
    """The vocabularies whose tables get row-sparse updates (none unless switched on)."""
    if not opt_cfg.sparse_embeddings:
        return ()
    shapes = jax.eval_shape(
        lambda: model.init(jax.random.PRNGKey(0), dummy_batch(schema), train=False)["params"]
    )
    return sparse.sparse_vocabs(schema, shapes, opt_cfg.sparse_min_rows)


def bce_sums(logit_B: jax.Array, label_B: jax.Array, weight_B: jax.Array) -> dict[str, jax.Array]:
    """Sums (not means) so averages over steps, devices and hosts stay exact."""
    loss_B = optax.sigmoid_binary_cross_entropy(logit_B, label_B)
    correct_B = ((logit_B > 0) == (label_B > 0.5)).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss_B * weight_B),
        "accuracy_sum": jnp.sum(correct_B * weight_B),
        "count": jnp.sum(weight_B),
    }


def training_loss(
    model: nn.Module, params: Any, batch: dict[str, jax.Array], dropout_rng: jax.Array
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss, sums) of one training batch; the sums carry the learned influence weights."""
    logit_B, aux = model.apply({"params": params}, batch, train=True, rngs={"dropout": dropout_rng})
    sums = bce_sums(logit_B, batch["label"], batch["weight"])
    # Learned influence weights (extractor, behaviour type) ride along for logging.
    sums.update({f"weights/{k}": v for k, v in aux.get("weights", {}).items()})
    loss = sums["loss_sum"] / jnp.maximum(sums["count"], 1.0)
    # Fits running statistics kept as parameters (the ranker's score_mean/var); touches
    # nothing else, and is not part of the reported loss.
    return loss + aux.get("stats_loss", 0.0), sums


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, lr_schedule: Any):
    """Returns the pure `train_step(state, batch) -> (state, metrics)`."""

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        loss_fn = lambda params: training_loss(model, params, batch, dropout_rng)
        grads, sums = jax.grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        out = dict(
            sums, grad_norm=optax.tree_utils.tree_norm(grads), learning_rate=lr_schedule(state.step)
        )
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), out

    return train_step


def make_eval_step(model: nn.Module):
    """Returns `eval_step(params, batch) -> dict` of probabilities and pass-through columns."""

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logit_B, _ = model.apply({"params": params}, batch, train=False)
        keep = {k: batch[k] for k in ("label", "weight", "user_key", "target_type")}
        return dict(keep, prob=jax.nn.sigmoid(logit_B))

    return eval_step


def evaluate(
    eval_fn: Any, params: Any, store: ExampleStore, config: Any, mesh: jax.sharding.Mesh
) -> dict[str, float]:
    """Exact metrics over every example of `store` (padding rows carry weight 0)."""
    store = pipeline.restrict(store, config.data, "eval")  # the store itself by default
    batches = pipeline.EvalBatches(
        store, config.data.eval_batch_size, jax.process_index(), jax.process_count()
    )
    acc = metrics.MetricAccumulator()
    it = pipeline.BatchIterator(batches, config.data.prefetch, config.data.num_threads)
    for batch in it:
        batch = {k: batch[k].astype(np.int32) if k == "user_key" else batch[k] for k in EVAL_KEYS}
        out = {
            k: sharding.to_host(v)
            for k, v in eval_fn(params, sharding.to_global(batch, mesh)).items()
        }
        acc.add(out["prob"], out["label"], out["user_key"], out["target_type"], out["weight"])
    names = {i + NUM_RESERVED: n for i, n in enumerate(store.schema.behaviour_types)}
    return acc.result(names)


def load_data(config: Any, workdir: str) -> tuple[Schema, str]:
    """The dataset folder for this run; synthetic data is (re)generated into WORKDIR/data."""
    if config.data.source == "synthetic":
        path = os.path.join(workdir, "data")
        if jax.process_index() == 0:
            schema = synthetic.ensure(config.data.synthetic, path)
            synthetic.write_planted(schema, workdir)
        _barrier("synthetic-data")
        return Schema.load(path), path
    return Schema.load(config.data.path), config.data.path


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _format(m: dict[str, float], keys: tuple[str, ...]) -> str:
    return " ".join(f"{k}={m[k]:.4f}" for k in keys if k in m and m[k] == m[k])


def _write_config(config_json: dict, workdir: str) -> None:
    if jax.process_index() == 0:
        path = os.path.join(workdir, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(config_json, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

    Killed at any step and rerun with the same config, a run continues from its newest usable
    checkpoint and ends with the same parameters bit for bit (on the same devices).

    Returns:
      The final evaluation metrics, keys prefixed with the split ("test/auc", ...).

    Raises:
      TrainingError: the loss or the parameters became NaN or Inf (checkpoints stay good).
    """
    preempt = loop_lib.Preemption()  # first, so that SIGTERM during start-up is not fatal
    try:
        return _train_and_evaluate(config, workdir, preempt)
    finally:
        preempt.restore()


def _train_and_evaluate(config: Any, workdir: str, preempt: loop_lib.Preemption) -> dict:
    config_check.check(config, jax.device_count(), jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    schema, data_path = load_data(config, workdir)
    loop_lib.check_config(config.loop, tuple(schema.behaviour_types))
    config_json = json.loads(config.to_json_best_effort())
    _write_config(config_json, workdir)

    mesh = sharding.make_mesh(config.mesh)
    model = build_model(config.model, schema)
    num_steps = config.loop.num_steps
    lr_schedule = optim.learning_rate_schedule(config.opt, num_steps)
    tx = optim.make_optimizer(config.opt, num_steps)
    vocabs = sparse_vocabs_for(config.opt, model, schema)
    state, state_sh = create_state(model, tx, schema, config.seed, mesh, config.mesh, vocabs)
    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        sparse.make_train_step(
            model, tx, lr_schedule, schema, vocabs, training_loss, config.opt.sparse_learning_rate
        )
        if vocabs
        else make_train_step(model, tx, lr_schedule),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        make_eval_step(model), in_shardings=(state_sh.params, batch_sh), out_shardings=batch_sh
    )

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.ckpt, config_json)
    writer = summary.SummaryWriter(workdir, enabled=jax.process_index() == 0)
    try:
        train_store = pipeline.restrict(
            ExampleStore(data_path, "train", schema), config.data, "train"
        )
        batches = pipeline.TrainBatches(
            train_store,
            config.data.batch_size,
            config.data.shuffle_seed,
            num_steps,
            jax.process_index(),
            jax.process_count(),
        )
        it = pipeline.BatchIterator(batches, config.data.prefetch, config.data.num_threads)
        loop = loop_lib.Loop(config, workdir, writer, ckpt, it)
        if ckpt.latest_step() is not None:
            abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh)
            state, data_state, restored = ckpt.restore(abstract)
            loop.load_state(data_state.pop("loop", {}))
            it.set_state(data_state)
            logging.info("resumed from checkpoint step %d (data %s)", restored, data_state)
        if int(state.step) == 0:
            writer.text("config", "```\n" + json.dumps(config_json, indent=2) + "\n```", 0)
        logging.info(
            "training %s on %s (%d train examples, %d devices, mesh %s) for %d steps",
            config.model.name,
            schema.name,
            len(train_store),
            jax.device_count(),
            dict(mesh.shape),
            num_steps,
        )

        def eval_cb(params):
            store = ExampleStore(data_path, config.loop.eval_split, schema)
            return evaluate(eval_fn, params, store, config, mesh)

        state = loop.run(state, train_step, num_steps, preempt, eval_cb)
        final = {}
        if config.loop.final_eval_split and not preempt.requested:
            split = config.loop.final_eval_split
            m = evaluate(
                eval_fn, state.params, ExampleStore(data_path, split, schema), config, mesh
            )
            writer.scalars(int(state.step), {f"{split}/{k}": v for k, v in m.items()})
            final = {f"{split}/{k}": v for k, v in m.items()}
            logging.info("final %s: %s", split, _format(m, ("auc", "gauc", "logloss", "accuracy")))
            print(
                f"final {split} metrics: "
                + _format(m, ("auc", "gauc", "gauc_impression", "logloss", "accuracy")),
                flush=True,
            )
        final.update(loop.last_eval)
        return final
    finally:
        ckpt.close()
        writer.close()
