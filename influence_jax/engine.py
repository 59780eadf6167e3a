"""One setup for everything that trains, restores or scores a model: `setup(config, schema)`
returns the model, the optimizer, the train state's shardings and abstract shapes, and the
jitted train and eval steps (dense or row-sparse from config).

Training, the tests, the benchmarks and the ranker's abstract restore all call `setup`, so a
setting such as `config.opt.sparse_learning_rate` is read in one place. The steps are pure:
`train_step(state, batch) -> (state, metrics)` returns sums and counts, not means, so that
averages over steps, devices and hosts are exact.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding

from influence_jax import optim, sharding, sparse, xla_options
from influence_jax.data.schema import Schema, dummy_batch
from influence_jax.errors import ConfigError
from influence_jax.models import build_model

EVAL_KEYS = ("user", "item", "hist", "label", "labels", "weight", "user_key", "target_type")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array  # base PRNG key; step t's dropout key is fold_in(rng, t)
    # The parameters' exponential moving average (config.opt.ema_decay > 0; None when off):
    # the params the optax chain updates, without row-sparse tables (optim.update_average).
    ema: Any = None

    def eval_params(self) -> Any:
        """The parameters evaluation, checkpoint selection and ranking use: the moving
        average where one is kept (optim.with_average), else `params`."""
        return optim.with_average(self.params, self.ema)


def bce_sums(logit_B: jax.Array, label_B: jax.Array, weight_B: jax.Array) -> dict[str, jax.Array]:
    """Sums (not means) so averages over steps, devices and hosts stay exact."""
    loss_B = optax.sigmoid_binary_cross_entropy(logit_B, label_B)
    correct_B = ((logit_B > 0) == (label_B > 0.5)).astype(jnp.float32)
    return {
        "loss_sum": jnp.sum(loss_B * weight_B),
        "accuracy_sum": jnp.sum(correct_B * weight_B),
        "count": jnp.sum(weight_B),
    }


def batch_weight(batch: dict[str, jax.Array]) -> jax.Array:
    """The batch's total example weight, at least 1: the denominator of its mean loss."""
    return jnp.maximum(jnp.sum(batch["weight"]), 1.0)


def head_sums(
    model: nn.Module,
    head_logits: dict[str, jax.Array],
    batch: dict[str, jax.Array],
    count: jax.Array,
) -> tuple[dict[str, jax.Array], jax.Array]:
    """Multi-task: (sums, loss). Each head's BCE against its column of batch["labels"]; the loss
    is sum_h loss_weight_h * mean loss_h (means over `count`, `batch_weight` of the batch);
    `loss_sum`/`accuracy_sum` are the objective head's (the step log), `heads/<h>/loss_sum`
    each head's."""
    weights = dict(model.loss_weights or {})
    objective = model.objective_head
    sums, loss = {}, 0.0
    for i, h in enumerate(model.heads):
        s = bce_sums(head_logits[h], batch["labels"][:, i], batch["weight"])
        loss = loss + weights.get(h, 1.0) * s["loss_sum"] / count
        sums[f"heads/{h}/loss_sum"] = s["loss_sum"]
        if h == objective:
            sums.update(s)
    return sums, loss


def training_loss(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    dropout_rng: jax.Array,
    count: jax.Array | None = None,
    share: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(mean loss, sums) of one training batch; the sums carry the learned influence weights.

    The mean is over `count`, default `batch_weight(batch)`; a block of a larger batch
    (`training_grads`) passes that batch's weight as `count` and its share of the batch as
    `share`, so that the blocks' losses add up to the batch's.
    """
    count = batch_weight(batch) if count is None else count
    logit_B, aux = model.apply({"params": params}, batch, train=True, rngs={"dropout": dropout_rng})
    if "head_logits" in aux:
        sums, loss = head_sums(model, aux["head_logits"], batch, count)
    else:
        sums = bce_sums(logit_B, batch["label"], batch["weight"])
        loss = sums["loss_sum"] / count
    # Learned influence weights (extractor, behaviour type) ride along for logging.
    sums.update({f"weights/{k}": v for k, v in aux.get("weights", {}).items()})
    # Fits running statistics kept as parameters (the ranker's score_mean/var); touches
    # nothing else, and is not part of the reported loss.
    return loss + share * aux.get("stats_loss", 0.0), sums


def row_blocks(tree: Any, devices: int, blocks: int) -> Any:
    """[B, ...] leaves -> [blocks, B / blocks, ...]; block i holds rows i of every device's
    share ([B] as [devices, blocks, rows]), so each block stays split over `data` as the
    batch is and no row moves between devices."""

    def split(x: jax.Array) -> jax.Array:
        rows = x.shape[0] // (devices * blocks)
        x = x.reshape(devices, blocks, rows, *x.shape[1:])
        return jnp.swapaxes(x, 0, 1).reshape(blocks, devices * rows, *x.shape[3:])

    return jax.tree_util.tree_map(split, tree)


def training_grads(
    model: nn.Module,
    params: Any,
    batch: dict[str, jax.Array],
    dropout_rng: jax.Array,
    blocks: int = 1,
    mesh: Mesh | None = None,
) -> tuple[Any, dict[str, jax.Array]]:
    """(gradients, sums) of the batch's mean training loss, computed over `blocks` row blocks.

    Each block's loss is its loss sum over the whole batch's weight, so the blocks' gradients
    add up to the batch's; its dropout key is fold_in(dropout_rng, block), and a model that
    standardises with batch statistics (the ranker's extractor scores) uses the block's. The
    sums add up too; the learned influence weights (`weights/...`) are the mean of the
    blocks' (blocks have equal rows): the parameters' own where they depend on nothing else,
    the batch's mean where they are means over rows (mixture models' expert gates).
    The blocks are independent until their gradients add up, so XLA:CPU can run one block's
    ops beside the other's (config.opt.grad_blocks; docs/benchmarks.md has what it measured).
    """
    grad = lambda b, rng, **kw: jax.grad(
        lambda p: training_loss(model, p, b, rng, **kw), has_aux=True
    )(params)
    if blocks <= 1:
        return grad(batch, dropout_rng)
    d = mesh.shape[sharding.DATA] if mesh is not None else 1
    sizes = {x.shape[0] for x in jax.tree_util.tree_leaves(batch)}
    if len(sizes) != 1 or next(iter(sizes)) % (d * blocks):
        raise ConfigError(
            f"config.opt.grad_blocks={blocks}: the batch ({sorted(sizes)} rows) does not split "
            f"into {blocks} blocks on each of the {d} data-parallel devices"
        )
    count = batch_weight(batch)
    split = row_blocks(batch, d, blocks)
    grads, sums = None, {}
    for i in range(blocks):
        block = jax.tree_util.tree_map(lambda x, i=i: x[i], split)
        if mesh is not None:
            block = jax.lax.with_sharding_constraint(block, sharding.batch_sharding(mesh))
        rng = jax.random.fold_in(dropout_rng, i)
        g, s = grad(block, rng, count=count, share=1.0 / blocks)
        grads = g if grads is None else jax.tree_util.tree_map(jnp.add, grads, g)
        for k, v in s.items():
            sums[k] = v if k not in sums else sums[k] + v
    for k in sums:
        if k.startswith("weights/"):
            sums[k] = sums[k] / blocks
    return grads, sums


def make_train_step(
    model: nn.Module,
    tx: optax.GradientTransformation,
    lr_schedule: Any,
    blocks: int = 1,
    mesh: Mesh | None = None,
    ema_decay: float = 0.0,
):
    """Returns the pure `train_step(state, batch) -> (state, metrics)` (dense updates), the
    gradient computed in `blocks` row blocks (`training_grads`); a state with an `ema` moves
    it towards the new parameters at `ema_decay` (optim.update_average)."""

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        grads, sums = training_grads(model, state.params, batch, dropout_rng, blocks, mesh)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = optim.update_average(ema, params, state.step, ema_decay)
        out = dict(
            sums, grad_norm=optax.tree_utils.tree_norm(grads), learning_rate=lr_schedule(state.step)
        )
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return state, out

    return train_step


def make_eval_step(model: nn.Module):
    """Returns `eval_step(params, batch) -> dict` of probabilities and pass-through columns."""

    def eval_step(params: Any, batch: dict[str, jax.Array]) -> dict[str, jax.Array]:
        logit_B, aux = model.apply({"params": params}, batch, train=False)
        keys = ("label", "labels", "weight", "user_key", "target_type")
        keep = {k: batch[k] for k in keys if k in batch}
        if "head_logits" in aux:  # [B, H], in the order of the labels' columns
            heads = tuple(model.heads)
            keep["head_probs"] = jax.nn.sigmoid(
                jnp.stack([aux["head_logits"][h] for h in heads], 1)
            )
            # The headline metrics are the objective head's, against its own label.
            keep["label"] = batch["labels"][:, heads.index(model.objective_head)]
        return dict(keep, prob=jax.nn.sigmoid(logit_B))

    return eval_step


CPU_SCORE_ROWS = 1024  # the most rows a CPU device scores at a time (Engine.score_fn)
CPU_MIN_SCORE_ROWS = 16  # the fewest (smaller blocks: the loop's overhead per block dominates)
_L2_DEFAULT = 1 << 20  # bytes of a core's level-2 cache where the system does not say


def l2_cache_bytes() -> int:
    """One CPU core's level-2 cache in bytes (Linux sysfs; 1 MiB where it does not say)."""
    base = "/sys/devices/system/cpu/cpu0/cache"
    try:
        for entry in sorted(os.listdir(base)):
            read = lambda name, e=entry: open(os.path.join(base, e, name)).read().strip()
            if entry.startswith("index") and read("level") == "2" and read("type") != "Instruction":
                size = read("size")
                unit = {"K": 1 << 10, "M": 1 << 20}.get(size[-1:], 1)
                return int(size.rstrip("KM")) * unit
    except (OSError, ValueError):
        pass
    return _L2_DEFAULT


def widest_row_bytes(fn: Callable, params: Any, batch: dict[str, Any]) -> float:
    """Bytes per example of the largest value `fn(params, batch)` computes: `fn` traced (not
    run) at 8 and at 16 rows, each operation's output size at 16 less that at 8, over 8.
    Values whose size does not grow with the rows (parameters, tables) count 0."""
    shape = lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype)
    abstract = jax.tree_util.tree_map(shape, params)
    size = lambda a: getattr(a, "size", 0) * getattr(getattr(a, "dtype", None), "itemsize", 0)
    sizes = []
    for n in (8, 16):
        rows = {k: jax.ShapeDtypeStruct((n, *v.shape[1:]), v.dtype) for k, v in batch.items()}
        eqns = jax.make_jaxpr(fn)(abstract, rows).jaxpr.eqns
        sizes.append([sum(size(v.aval) for v in e.outvars) for e in eqns])
    if len(sizes[0]) != len(sizes[1]):  # traced differently at the two sizes: no estimate
        return 0.0
    return float(max((b - a for a, b in zip(*sizes, strict=True)), default=0)) / 8


def block_rows_for(fn: Callable, params: Any, batch: dict[str, Any]) -> int:
    """`block_rows` for `fn(params, batch)` on this machine's CPU (logged). With several
    processes every one assumes the default cache: they must compile the same program, and
    their hosts' caches may differ."""
    cache = l2_cache_bytes() if jax.process_count() == 1 else _L2_DEFAULT
    row_bytes = widest_row_bytes(fn, params, batch)
    rows = block_rows(row_bytes, cache)
    logging.info(
        "scoring %d rows at a time on each CPU device (largest value %.1f KB an example, "
        "level-2 cache %d KB)", rows, row_bytes / 1e3, cache >> 10,
    )  # fmt: skip
    return rows


def block_rows(row_bytes: float, cache_bytes: int) -> int:
    """Rows a CPU device scores at a time: the power of two nearest to the rows whose largest
    value (`row_bytes` an example) fills one core's level-2 cache, within [CPU_MIN_SCORE_ROWS,
    CPU_SCORE_ROWS]. On the 2-core Zen 4 EPYC (1 MiB) of 2026-12-07 that gave 128 rows for the
    default ranker (9.6 KB an example: its history embeddings) and 64 for the full one (20.8 KB:
    bst's attention weights), each the fastest of 32-1024 there, 1.3x and 1.4x as fast as 1024
    at batch 4096 (tools/benchmark.py --what=rank --host_devices=2)."""
    if row_bytes <= 0:
        return CPU_SCORE_ROWS
    rows = 2 ** round(math.log2(cache_bytes / row_bytes))
    return int(min(CPU_SCORE_ROWS, max(CPU_MIN_SCORE_ROWS, rows)))


@dataclasses.dataclass(frozen=True)
class Engine:
    """A model with everything needed to train, restore and score it on one mesh.

    Nothing here holds device memory until `init_state()` is called: `abstract_state` is a
    TrainState of ShapeDtypeStructs carrying their shardings (the target of a restore).
    """

    model: nn.Module
    tx: optax.GradientTransformation
    lr_schedule: optax.Schedule
    mesh: Mesh
    sparse_vocabs: tuple[str, ...]  # tables with row-sparse updates (sparse.py); () = dense
    state_shardings: Any  # TrainState of NamedSharding
    abstract_state: Any  # TrainState of ShapeDtypeStruct(sharding=...)
    train_step: Callable  # jitted (state, batch) -> (state, metrics)
    eval_step: Callable  # jitted (params, batch) -> {prob, label, weight, ...}
    init_fn: Callable  # jitted rng -> TrainState, created in its shardings
    params_fn: Callable  # jitted rng -> the initial parameters alone (init_fn's)
    state_fn: Callable  # jitted (params, rng) -> TrainState around params (donated)
    seed: int

    def init_state(self) -> TrainState:
        """The initial train state, created directly in its shardings (nothing on one device)."""
        return self.init_fn(jax.random.PRNGKey(self.seed))

    def init_params(self) -> Any:
        """The initial parameters alone (init_state's), without the optimizer's state."""
        return self.params_fn(jax.random.PRNGKey(self.seed))

    def state_from(self, params: Any) -> TrainState:
        """A state that has not trained yet around `params` (in their shardings): the
        optimizer's state, random key and moving average as `init_state` makes them.
        `params` is donated: its arrays become the state's (no second copy on the devices)."""
        return self.state_fn(params, jax.random.PRNGKey(self.seed))

    @property
    def param_shardings(self) -> Any:
        return self.state_shardings.params

    @property
    def batch_sharding(self) -> NamedSharding:
        return sharding.batch_sharding(self.mesh)

    def jit_scoring(self, fn: Callable) -> Callable:
        """`fn(params, batch) -> per-example outputs` jitted with the params' and the batch's
        shardings (outputs sharded like the batch)."""
        return jax.jit(
            fn,
            in_shardings=(self.param_shardings, self.batch_sharding),
            out_shardings=self.batch_sharding,
        )

    def score_fn(self, rows: int | None = None, logits: bool = False) -> Callable:
        """Jitted `score(params, batch) -> prob_B`, the eval step's probabilities alone; with
        `logits`, `{"prob": prob_B, "logit": logit_B}` (an order without float32's ties at
        probability 1, which a logit above about 17 reaches).

        Each device scores its share of the batch `rows` rows at a time (a `lax.map` over
        blocks) where the share is a larger multiple of `rows`: a block's activations stay in
        the CPU's caches. Default: on CPU `block_rows` for the model (chosen when the function
        is traced: its largest value per example against the level-2 cache), whole batches on
        accelerators; 0 scores whole batches. Blocks change no probability
        (tests/test_ranking.py).
        """
        cpu = self.mesh.devices.flat[0].platform == "cpu"
        d = self.mesh.shape[sharding.DATA]

        def score(params: Any, batch: dict[str, jax.Array]) -> Any:
            logit_B, _ = self.model.apply({"params": params}, batch, train=False)
            prob_B = jax.nn.sigmoid(logit_B)
            return {"prob": prob_B, "logit": logit_B} if logits else prob_B

        def blocked(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
            B = jax.tree_util.tree_leaves(batch)[0].shape[0]
            r = rows or 0
            if rows is None and cpu and B // d >= 2 * CPU_MIN_SCORE_ROWS:  # else one block
                r = block_rows_for(score, params, batch)
            n = B // d // r if r else 0
            if n < 2 or B != n * d * r:
                return score(params, batch)
            blocks = row_blocks(batch, d, n)
            keep = lambda b: jax.lax.with_sharding_constraint(b, self.batch_sharding)
            out = jax.lax.map(lambda b: score(params, keep(b)), blocks)  # [n, d * r, ...]

            def unblock(x: jax.Array) -> jax.Array:
                x = jnp.swapaxes(x.reshape(n, d, r, *x.shape[2:]), 0, 1)
                return x.reshape(B, *x.shape[3:])

            return jax.tree_util.tree_map(unblock, out)

        return self.jit_scoring(blocked)


def init_compiler_options(mesh: Mesh, shapes: Any) -> dict[str, Any] | None:
    """XLA options of the init program, which runs once: fast-compiling on CPU for models of up
    to xla_options.FAST_COMPILE_MAX_ELEMENTS parameters, else None (the defaults)."""
    platform = mesh.devices.flat[0].platform
    return xla_options.fast_compile(platform, xla_options.elements(shapes.params))


def setup(
    config: Any,
    schema: Schema | None,
    mesh: Mesh | None = None,
    *,
    model: nn.Module | None = None,
    example: dict[str, np.ndarray] | None = None,
    donate: bool = True,
) -> Engine:
    """Builds the engine of `config` for `schema` on `mesh` (default: from `config.mesh`).

    Args:
      config: a full config (reads seed, model, opt, mesh and loop.num_steps).
      schema: the dataset schema (vocabulary sizes, fields); may be None with `model` and
        `example` given and row-sparse updates off.
      mesh: the device mesh; default `sharding.make_mesh(config.mesh)` over all devices.
      model: a module to use instead of `build_model(config.model, schema)` (benchmarks).
      example: a batch of the model's input shapes for initialisation (default: from schema).
      donate: donate the state to the train step (its input buffers are reused).
    """
    mesh = mesh if mesh is not None else sharding.make_mesh(config.mesh)
    model = model if model is not None else build_model(config.model, schema)
    example = example if example is not None else dummy_batch(schema)
    num_steps = int(config.loop.num_steps)
    lr_schedule = optim.learning_rate_schedule(config.opt, num_steps)
    tx = optim.make_optimizer(config.opt, num_steps)
    ema_decay = float(config.opt.get("ema_decay", 0.0))  # absent from older runs' configs

    init_params = lambda rng: model.init({"params": rng}, example, train=False)["params"]
    vocabs: tuple[str, ...] = ()
    if config.opt.sparse_embeddings and schema is not None:
        shapes = jax.eval_shape(init_params, jax.random.PRNGKey(0))
        vocabs = sparse.sparse_vocabs(schema, shapes, config.opt.sparse_min_rows)

    def fresh_params(rng: jax.Array) -> Any:
        return init_params(jax.random.split(rng)[0])

    def from_params(params: Any, rng: jax.Array) -> TrainState:
        state_rng = jax.random.split(rng)[1]
        opt_state = sparse.init_opt_state(tx, params, vocabs) if vocabs else tx.init(params)
        # Over what the optax chain updates; the first step replaces it (optim.average_decay),
        # so it starts as a copy of the initial parameters (a buffer of its own: XLA gives each
        # output its own) only for a state that has not trained yet.
        ema = sparse.without(params, vocabs) if ema_decay > 0 else None
        return TrainState(
            step=jnp.zeros((), jnp.int32), params=params, opt_state=opt_state, rng=state_rng,
            ema=ema,
        )  # fmt: skip

    init = lambda rng: from_params(fresh_params(rng), rng)
    shapes = jax.eval_shape(init, jax.random.PRNGKey(0))
    rules = sharding.sharding_rules(config.mesh, shapes.params)
    state_sh = sharding.tree_shardings(shapes, rules, mesh)
    abstract = jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, state_sh
    )
    batch_sh = sharding.batch_sharding(mesh)
    blocks = int(config.opt.get("grad_blocks", 1))
    if vocabs:
        grads_fn = lambda p, b, rng: training_grads(model, p, b, rng, blocks, mesh)
        step = sparse.make_train_step(
            tx, lr_schedule, schema, vocabs, grads_fn, config.opt.sparse_learning_rate, ema_decay
        )
    else:
        step = make_train_step(model, tx, lr_schedule, blocks, mesh, ema_decay)
    train_step = jax.jit(
        step,
        in_shardings=(state_sh, batch_sh),
        out_shardings=(state_sh, sharding.replicated(mesh)),
        donate_argnums=0 if donate else (),
    )
    eval_step = jax.jit(
        make_eval_step(model), in_shardings=(state_sh.params, batch_sh), out_shardings=batch_sh
    )
    fast = init_compiler_options(mesh, shapes)
    return Engine(
        model=model,
        tx=tx,
        lr_schedule=lr_schedule,
        mesh=mesh,
        sparse_vocabs=vocabs,
        state_shardings=state_sh,
        abstract_state=abstract,
        train_step=train_step,
        eval_step=eval_step,
        init_fn=jax.jit(init, out_shardings=state_sh, compiler_options=fast),
        params_fn=jax.jit(fresh_params, out_shardings=state_sh.params, compiler_options=fast),
        state_fn=jax.jit(
            from_params,
            in_shardings=(state_sh.params, None),
            out_shardings=state_sh,
            donate_argnums=0,
            compiler_options=fast,
        ),
        seed=int(config.seed),
    )
