"""The read side's base: a trained run loaded for scoring, and batched scoring over the mesh.

`load_run(workdir)` rebuilds the engine (engine.setup) from the run's saved config and the
dataset's schema, restores the parameters only, verified against their saved checksums
(checkpoint.restore_params), and opens the dataset once as the run saw it (data/dataset.py:
its dropped behaviour types already removed). Ranking, influence reports and evaluation all
start here; this module imports none of them. A multi-task run loaded `switchable` reads its
objective from its parameters: `with_objective` moves it to another head or mix of heads with
the programs already compiled (`program`), so a report per head compiles once.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh

from influence_jax import checkpoint, engine, sharding
from influence_jax.data import synthetic
from influence_jax.data.dataset import Dataset
from influence_jax.data.schema import Schema
from influence_jax.errors import DataError
from influence_jax.models.multitask import objective_vector, parse_objective


@dataclasses.dataclass
class Run:
    """A trained run ready to score: its config, dataset view, engine and parameters."""

    workdir: str
    config: ml_collections.ConfigDict
    dataset: Dataset
    engine: engine.Engine
    params: Any
    step: int
    # A switchable multi-task run's objective (load_run, with_objective); "" otherwise.
    objective: str = ""
    # Jitted programs by name (`program`), shared with the copies with_objective makes.
    programs: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    @property
    def schema(self) -> Schema:
        return self.dataset.schema

    @property
    def data_path(self) -> str:
        return self.dataset.path

    @property
    def model(self) -> nn.Module:
        return self.engine.model

    @property
    def mesh(self) -> Mesh:
        return self.engine.mesh

    @property
    def objective_head(self) -> str:
        """The head a multi-task run's scores are (its objective's largest weight); "" for
        other runs."""
        if self.objective:
            weights = parse_objective(self.objective, self.model.heads)
            return max(weights, key=weights.get)
        return getattr(self.model, "objective_head", "")


def make_run(
    config: Any, data_path: str, params: Any = None, step: int = 0, workdir: str = ""
) -> Run:
    """A Run from a config and a dataset folder; `params` default to a fresh initialisation."""
    dataset = Dataset(data_path, config.data)
    eng = engine.setup(config, dataset.schema)
    params = params if params is not None else eng.init_state().params
    return Run(workdir, config, dataset, eng, params, step)


def _data_path(config: Any, workdir: str, data: str | None) -> str:
    if data:
        if not os.path.isdir(data):
            raise DataError(f"--data={data}: no such dataset folder")
        return data
    if config.data.source == "synthetic":
        path = checkpoint.data_dir(workdir)
        try:
            Schema.load(path)
        except DataError:  # the workdir can regenerate its synthetic data
            synthetic.ensure(ml_collections.ConfigDict(config.data.synthetic.to_dict()), path)
        return path
    if not config.data.path or not os.path.isdir(config.data.path):
        raise DataError(
            f"{checkpoint.config_path(workdir)}: data path {config.data.path!r} is not a folder; "
            "pass --data"
        )
    return config.data.path


def run_heads(workdir: str, data: str | None = None) -> tuple[str, ...]:
    """A multi-task run's heads (its dataset's label columns); () for other runs."""
    config = checkpoint.read_config(workdir)
    if config.model.name != "multitask":
        return ()
    return Dataset(_data_path(config, workdir, data), config.data).schema.heads


def open_run(workdir: str, data: str | None = None) -> tuple[ml_collections.ConfigDict, Dataset]:
    """The run's config and dataset (`data`, default its own), checked to be the dataset it
    trained on; DataError otherwise."""
    config = checkpoint.read_config(workdir)
    dataset = Dataset(_data_path(config, workdir, data), config.data)
    # The same ids as in training? (--data, or the run's own folder prepared again since.)
    flag = "--data" if data else "the run's config.data.path"
    checkpoint.check_dataset(workdir, dataset.path, dataset.fingerprint, flag)
    return config, dataset


def load_run(
    workdir: str,
    data: str | None = None,
    step: str | int = "latest",
    objective: str = "",
    switchable: bool = False,
) -> Run:
    """The run in `workdir` at `step` ("latest", "best" or a number), parameters only.

    Args:
      objective: a multi-task run's head whose score the run gives (ranking, influence), or
        a weighted sum of heads' probabilities ("buy+0.3*cart", models.multitask.
        parse_objective); "" keeps the trained objective. Other runs take only "".
      switchable: a multi-task run only: the objective is a parameter (the model's
        `runtime_objective`), for `with_objective`.

    Raises:
      DataError: no such run or step, a checkpoint that fails its checksums, a dataset whose
        schema does not fit the checkpoint (e.g. `--data` of another dataset), or an objective
        that is not a head of the run.
    """
    config, dataset = open_run(workdir, data)
    if objective or switchable:
        _check_objective(
            objective, dataset.schema.heads if config.model.name == "multitask" else ()
        )
        config = ml_collections.ConfigDict(config.to_dict())
        config.model.multitask.objective = objective or config.model.multitask.objective
    eng = engine.setup(config, dataset.schema)
    params, n = checkpoint.restore_params(workdir, eng.abstract_state, step)
    try:  # only a hint: a damaged best.json does not stop loading the latest step
        best = checkpoint.read_best(workdir) if step == "latest" else None
    except DataError:
        best = None
    if isinstance(best, dict) and isinstance(best.get("step"), int) and best["step"] != n:
        logging.warning(
            "%s: scoring the latest checkpoint, step %d; the best by %s is step %d (--step=best)",
            workdir, n, best.get("metric", "the validation metric"), best["step"],
        )  # fmt: skip
    run = Run(os.path.abspath(workdir), config, dataset, eng, params, n)
    if not switchable:
        return run
    # The same model reading its objective from the parameters: its own engine (programs
    # and shardings with the one more parameter), the restored parameters beside it.
    eng = engine.setup(config, dataset.schema, model=eng.model.clone(runtime_objective=True))
    run = dataclasses.replace(run, engine=eng)
    return with_objective(run, config.model.multitask.objective or eng.model.objective_head)


def _check_objective(objective: str, heads: tuple[str, ...]) -> None:
    """DataError unless `objective` ("" the trained one) names heads of the run (`heads`)."""
    if not heads:
        if objective:
            raise DataError(f"--objective={objective}: not a head of this run; it is single-task")
        raise DataError("a single-task run has one objective; there are no heads to switch")
    try:
        parse_objective(objective, heads)
    except ValueError as e:
        raise DataError(f"--objective={e}") from None


def with_objective(run: Run, objective: str) -> Run:
    """A switchable run (load_run) scoring `objective` (a head, or a weighted sum of heads'
    probabilities): the same engine and compiled programs, the objective's weights in the
    parameters. DataError for an objective that is not the run's heads'."""
    model = run.model
    if not getattr(model, "runtime_objective", False):
        raise ValueError(f"{run.workdir}: not loaded switchable (scoring.load_run)")
    _check_objective(objective, tuple(model.heads))
    sh = run.engine.param_shardings["objective_weights"]
    weights = jax.device_put(objective_vector(objective, model.heads), sh)
    objective = objective or model.heads[-1]  # "": the last head, as parse_objective
    return dataclasses.replace(
        run, params=dict(run.params, objective_weights=weights), objective=objective
    )


def program(run: Run, name: str, build: Callable[[], Callable]) -> Callable:
    """The run's jitted program `name`, built by `build()` the first time: a switchable
    run's copies (with_objective) share it, so each head reuses one compiled program. Programs
    must take the parameters as an argument (they differ between copies)."""
    key = (name, id(run.engine))
    if key not in run.programs:
        run.programs[key] = build()
    return run.programs[key]


def copies_logits(
    model: nn.Module, params: Any, base: dict[str, jax.Array], hist_CxBxLxF: jax.Array
) -> jax.Array:
    """[C, B] logits of the examples `base` (user, item) with each of C histories, vmapped."""
    apply = lambda h: model.apply({"params": params}, dict(base, hist=h), train=False)[0]
    return jax.vmap(apply)(hist_CxBxLxF)


def make_score_fn(run: Run, logits: bool = False) -> Callable:
    """The jitted `score(params, batch) -> prob_B` (the eval step's probabilities); with
    `logits`, `{"prob", "logit"}` (engine.Engine.score_fn)."""
    return run.engine.score_fn(logits=logits)


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

    def batches():
        for start in range(0, n, batch_size):
            idx = np.arange(start + p * local, start + (p + 1) * local)
            yield gather(np.where(idx < n, idx, 0))

    fetch = lambda out: jax.tree_util.tree_map(sharding.to_host, out)
    return _pipelined(fn, run, batches(), fetch, n, batch_size, progress)


def _pipelined(fn, run: Run, batches, fetch, n: int, per_batch: int, progress) -> Any:
    """`fn` over host batches, batch t+1 dispatched before batch t is fetched; the fetched
    outputs concatenated and cut to n rows (None when there are none)."""
    outs, pending = [], None

    def collect(out: Any) -> None:
        outs.append(fetch(out))
        if progress is not None:
            progress(min(n, len(outs) * per_batch))

    for batch in batches:
        out = fn(run.params, sharding.to_global(batch, run.mesh))
        if pending is not None:
            collect(pending)
        pending = out
    if pending is not None:
        collect(pending)
    if not outs or not n:
        return None
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:n], *outs)


def local_rows(x: jax.Array) -> np.ndarray:
    """This process's rows of a batch-sharded global array, in order (replicas once)."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    shards = {}
    for sh in x.addressable_shards:
        shards.setdefault(sh.index[0].start or 0, sh)
    return np.concatenate([np.asarray(shards[k].data) for k in sorted(shards)])


def batched_local(
    fn: Callable,
    run: Run,
    n: int,
    gather: Callable[[np.ndarray], dict] | None,
    batch_size: int,
    steps: int,
    progress: Callable[[int], None] | None = None,
) -> Any:
    """Like `batched`, but every process scores its own rows 0..n-1 (n may differ between
    processes): `steps` global batches (every process the same number: the most any needs),
    each holding batch_size / processes rows of each process (padded; a process with no rows
    left feeds zero ids), and each process keeps its own rows' outputs."""
    local = batch_size // jax.process_count()
    s = run.schema
    pad = {
        "user": np.zeros((local, len(s.user_fields)), np.int32),
        "item": np.zeros((local, len(s.item_fields)), np.int32),
        "hist": np.zeros((local, s.max_len, len(s.hist_fields)), np.int32),
    }

    def batches():
        for step in range(steps):
            idx = np.arange(step * local, (step + 1) * local)
            yield gather(np.where(idx < n, idx, 0)) if n and step * local < n else pad

    fetch = lambda out: jax.tree_util.tree_map(local_rows, out)
    return _pipelined(fn, run, batches(), fetch, n, local, progress)
