"""Training library: sharded state creation, the pure train/eval steps, and the training loop."""

from __future__ import annotations

import json
import math
import os
import signal
import time
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from influence_jax import checkpoint as ckpt_lib
from influence_jax import config_check, metrics, optim, sharding
from influence_jax.data import pipeline, synthetic
from influence_jax.data.schema import NUM_RESERVED, Schema
from influence_jax.data.store import ExampleStore
from influence_jax.models import build_model

EVAL_KEYS = ("user", "item", "hist", "label", "weight", "user_key", "target_type")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message names the step."""


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
) -> tuple[TrainState, Any]:
    """Initialises the train state directly into its shardings; returns (state, shardings).

    The init is traced with eval_shape first, shardings are derived from the abstract shapes,
    and the init is jitted with those out_shardings, so nothing is materialised on one device.
    """
    batch = dummy_batch(schema)

    def init(rng: jax.Array) -> TrainState:
        init_rng, state_rng = jax.random.split(rng)
        params = model.init({"params": init_rng}, batch, train=False)["params"]
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=state_rng
        )

    rng = jax.random.PRNGKey(seed)
    shapes = jax.eval_shape(init, rng)
    rules = sharding.sharding_rules(mesh_cfg, shapes.params)
    shardings = sharding.tree_shardings(shapes, rules, mesh)
    state = jax.jit(init, out_shardings=shardings)(rng)
    return state, shardings


def bce_sums(logit_B: jax.Array, label_B: jax.Array, weight_B: jax.Array) -> dict[str, jax.Array]:
    """Sums (not means) so averages over steps, devices and hosts stay exact."""
    loss_B = optax.sigmoid_binary_cross_entropy(logit_B, label_B)
    correct_B = ((logit_B > 0) == (label_B > 0.5)).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss_B * weight_B),
        "accuracy_sum": jnp.sum(correct_B * weight_B),
        "count": jnp.sum(weight_B),
    }


def make_train_step(model: nn.Module, tx: optax.GradientTransformation, lr_schedule: Any):
    """Returns the pure `train_step(state, batch) -> (state, metrics)`."""

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        dropout_rng = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            logit_B, aux = model.apply(
                {"params": params}, batch, train=True, rngs={"dropout": dropout_rng}
            )
            sums = bce_sums(logit_B, batch["label"], batch["weight"])
            # Learned influence weights (extractor, behaviour type) ride along for logging.
            sums.update({f"weights/{k}": v for k, v in aux.get("weights", {}).items()})
            return sums["loss_sum"] / jnp.maximum(sums["count"], 1.0), sums

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


class _Preemption:
    """Turns SIGTERM (a preemption notice) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. some test runners)
            self._old = None

    def _handle(self, signum, frame):
        self.requested = True

    def restore(self):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config: Any, workdir: str) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

    Returns:
      The final evaluation metrics, keys prefixed with the split ("test/auc", ...).
    """
    config_check.check(config, jax.device_count(), jax.process_count())
    os.makedirs(workdir, exist_ok=True)
    is_main = jax.process_index() == 0
    schema, data_path = load_data(config, workdir)
    config_json = json.loads(config.to_json_best_effort())
    if is_main:
        with open(os.path.join(workdir, "config.json.tmp"), "w") as f:
            json.dump(config_json, f, indent=2, sort_keys=True)
        os.replace(os.path.join(workdir, "config.json.tmp"), os.path.join(workdir, "config.json"))

    mesh = sharding.make_mesh(config.mesh)
    model = build_model(config.model, schema)
    num_steps = config.loop.num_steps
    lr_schedule = optim.learning_rate_schedule(config.opt, num_steps)
    tx = optim.make_optimizer(config.opt, num_steps)
    state, state_sh = create_state(model, tx, schema, config.seed, mesh, config.mesh)
    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(
        make_train_step(model, tx, lr_schedule),
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0,
    )
    eval_fn = jax.jit(
        make_eval_step(model), in_shardings=(state_sh.params, batch_sh), out_shardings=batch_sh
    )

    ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), config.ckpt, config_json)
    train_store = ExampleStore(data_path, "train", schema)
    batches = pipeline.TrainBatches(
        train_store,
        config.data.batch_size,
        config.data.shuffle_seed,
        num_steps,
        jax.process_index(),
        jax.process_count(),
    )
    it = pipeline.BatchIterator(batches, config.data.prefetch, config.data.num_threads)
    if ckpt.latest_step() is not None:
        abstract = ckpt_lib.abstract_with_shardings(jax.eval_shape(lambda: state), state_sh)
        state, data_state, restored = ckpt.restore(abstract)
        it.set_state(data_state)
        logging.info(
            "resumed from checkpoint step %d (next batch %d)", restored, data_state["next_batch"]
        )

    writer = metrics.SummaryWriter(workdir, enabled=is_main)
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
    loop = _Loop(config, writer, ckpt, it)
    preempt = _Preemption()
    try:
        state = loop.run(
            state,
            train_step,
            num_steps,
            preempt,
            lambda params: evaluate(
                eval_fn,
                params,
                ExampleStore(data_path, config.loop.eval_split, schema),
                config,
                mesh,
            ),
        )
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
        preempt.restore()
        ckpt.close()
        writer.close()


class _Loop:
    """The step loop: progress logs, summaries, periodic eval and checkpoints, NaN guard."""

    def __init__(self, config: Any, writer: Any, ckpt: ckpt_lib.Checkpointer, it: Any):
        self.config, self.writer, self.ckpt, self.it = config, writer, ckpt, it
        self.last_eval: dict[str, float] = {}
        self.global_batch = config.data.batch_size

    def _save(self, state: TrainState, step: int) -> None:
        self.ckpt.save(step, state, self.it.get_state())

    def run(
        self, state: TrainState, train_step: Any, num_steps: int, preempt: _Preemption, eval_cb: Any
    ) -> TrainState:
        cfg = self.config.loop
        start = int(state.step)
        window: list[dict[str, float]] = []
        t_window, wait_window = time.perf_counter(), 0.0
        t_start, pending = time.perf_counter(), None
        for step in range(start, num_steps):
            t0 = time.perf_counter()
            batch = next(self.it)
            wait_window += time.perf_counter() - t0
            state, m = train_step(state, sharding.to_global(batch, _mesh_of(state)))
            # Fetch step t-1's metrics while step t runs: this hides the transfer and bounds the
            # number of dispatched-but-unfinished steps to two. Unbounded async dispatch of
            # all-reduce steps over forced host devices hit XLA's collective timeout on 2 cores.
            if pending is not None:
                window.append(self._check(*pending))
            pending = (step + 1, m)
            done = step + 1
            if done % cfg.log_every == 0 or done == num_steps or done % self.config.ckpt.every == 0:
                window.append(self._check(*pending))
                pending = None
            if window and (done % cfg.log_every == 0 or done == num_steps):
                self._log(
                    done,
                    num_steps,
                    window,
                    time.perf_counter() - t_window,
                    wait_window,
                    start,
                    t_start,
                )
                window, t_window, wait_window = [], time.perf_counter(), 0.0
            if cfg.eval_every and done % cfg.eval_every == 0 and done != num_steps:
                self._eval(done, state, eval_cb)
            if done % self.config.ckpt.every == 0 or done == num_steps or preempt.requested:
                self._save(state, done)
            if preempt.requested:
                logging.warning("SIGTERM received: saved checkpoint at step %d, stopping", done)
                self.ckpt.wait()
                return state
        if start < num_steps:
            self._eval(num_steps, state, eval_cb)
        return state

    def _check(self, step: int, m: Any) -> dict[str, float]:
        host = {k: float(v) for k, v in jax.device_get(m).items()}
        if not math.isfinite(host["loss_sum"]):
            raise TrainingError(
                f"non-finite loss ({host['loss_sum']}) at step {step}; the last good checkpoint "
                f"in {self.ckpt.directory} is kept. Lower config.opt.learning_rate or check the "
                "data."
            )
        return host

    def _log(self, done, num_steps, window, elapsed, wait, start, t_start) -> None:
        m = metrics.reduce_step_metrics(window)
        n = len(window)  # keys without a _sum/count pair are per-step values: average them
        grad_norm, lr = m["grad_norm"] / n, m["learning_rate"] / n
        weights = {k.split("/", 1)[1]: v / n for k, v in m.items() if k.startswith("weights/")}
        ex_s = n * self.global_batch / max(elapsed, 1e-9)
        steps_s = (done - start) / max(time.perf_counter() - t_start, 1e-9)
        eta = (num_steps - done) / max(steps_s, 1e-9)
        behaviour = " ".join(
            f"{k.split('/')[1]}={v:.3f}" for k, v in weights.items() if k.startswith("behaviour/")
        )
        logging.info(
            "step %d/%d loss=%.4f acc=%.4f grad_norm=%.3f lr=%.2e %.0f ex/s input_wait=%.0f%% "
            "ETA %s%s",
            done, num_steps, m["loss"], m["accuracy"], grad_norm, lr, ex_s,
            100 * wait / max(elapsed, 1e-9), _hms(eta),
            f" | behaviour weights {behaviour}" if behaviour else "",
        )  # fmt: skip
        self.writer.scalars(
            done,
            {
                "train/loss": m["loss"],
                "train/accuracy": m["accuracy"],
                "train/grad_norm": grad_norm,
                "train/learning_rate": lr,
                "perf/examples_per_s": ex_s,
                "perf/examples_per_s_per_device": ex_s / jax.device_count(),
                "perf/input_wait_fraction": wait / max(elapsed, 1e-9),
                **{f"influence/{k}": v for k, v in weights.items()},
            },
        )

    def _eval(self, step: int, state: TrainState, eval_cb: Any) -> None:
        t0 = time.perf_counter()
        m = eval_cb(state.params)
        split = self.config.loop.eval_split
        self.last_eval = {f"{split}/{k}": v for k, v in m.items()}
        self.writer.scalars(step, self.last_eval)
        self.writer.flush()
        logging.info(
            "eval %s at step %d (%.1fs): %s",
            split,
            step,
            time.perf_counter() - t0,
            _format(m, ("auc", "gauc", "logloss", "accuracy")),
        )


def _mesh_of(state: TrainState) -> jax.sharding.Mesh:
    return jax.tree_util.tree_leaves(state.params)[0].sharding.mesh


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"
