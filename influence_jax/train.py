"""Training library: `train_and_evaluate(config, workdir)` runs (or resumes) one training run.

The pieces live below it: engine.py (model, optimizer, sharded state, jitted steps),
loop.py (the step loop), checkpoint.py (the workdir and Orbax), evaluation.py (exact metrics).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from absl import logging

from influence_jax import checkpoint as ckpt_lib
from influence_jax import (
    config_check,
    engine,
    evaluation,
    files,
    logs,
    metrics,
    summary,
    warm_start,
    workdir_lock,
)
from influence_jax import loop as loop_lib
from influence_jax.data import pipeline, synthetic
from influence_jax.data.dataset import Dataset
from influence_jax.errors import (
    ConfigError,
    DataError,
    TrainingError,  # noqa: F401 - part of this module's API
    WorkdirInUseError,
)
from influence_jax.models import extractors


def load_data(config: Any, workdir: str) -> Dataset:
    """The dataset of this run; synthetic data is (re)generated into WORKDIR/data."""
    if config.data.source == "synthetic":
        path = ckpt_lib.data_dir(workdir)
        _check_same_synthetic_data(config, workdir, path)  # every process: it only reads
        if jax.process_index() == 0:
            schema = synthetic.ensure(config.data.synthetic, path)
            synthetic.write_planted(schema, workdir)
        _barrier("synthetic-data")
        return Dataset(path, config.data)
    return Dataset(config.data.path, config.data)


def _check_same_synthetic_data(config: Any, workdir: str, path: str) -> None:
    """ConfigError when a run with checkpoints would regenerate its synthetic data from other
    settings (its checkpoints were trained on the data there, which would be replaced)."""
    saved = synthetic.saved_generator(path)
    new = synthetic.cfg_to_dict(config.data.synthetic)
    if saved is None or saved == new or not ckpt_lib.has_checkpoints(workdir):
        return
    wrap = lambda d: {"data": {"synthetic": d}}  # noqa: E731
    changes = ckpt_lib.config_changes(wrap(saved), wrap(new))
    raise ConfigError(
        f"--workdir={workdir}: its checkpoints were trained on the synthetic data in {path}, "
        f"made with other settings ({'; '.join(changes)}); resume with the run's settings, or "
        "train in a new --workdir"
    )


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def train_and_evaluate(
    config: Any, workdir: str, preempt: loop_lib.Preemption | None = None
) -> dict[str, float]:
    """Trains `config` in `workdir` (resuming from its latest checkpoint) and evaluates.

    Killed at any step and rerun with the same config, a run continues from its newest usable
    checkpoint and ends with the same parameters bit for bit (on the same devices).

    Returns:
      The final evaluation metrics, keys prefixed with the split ("test/auc", ...). A run that
      SIGTERM stopped (at a saved checkpoint) returns without the final evaluation; `preempt`,
      when given, tells it (`preempt.requested`) and catches SIGTERM from its creation on.

    Raises:
      ConfigError: an invalid config field (before any work).
      WorkdirInUseError: another run trains in `workdir` (before any checkpoint is touched).
      TrainingError: the loss or the parameters became NaN or Inf (checkpoints stay good).
    """
    if preempt is None:  # first, so that SIGTERM during start-up is not fatal
        preempt = loop_lib.Preemption()
    try:
        config_check.check(config, jax.device_count(), jax.process_count())
        before = files.entries(workdir)
        os.makedirs(workdir, exist_ok=True)
        with contextlib.ExitStack() as stack:
            _lock_workdir(workdir, stack)
            try:
                return _train_and_evaluate(config, workdir, preempt)
            except (ConfigError, DataError, ckpt_lib.CheckpointError):
                undo_failed_start(workdir, before)  # still holding the lock
                raise
    finally:
        preempt.restore()


def undo_failed_start(workdir: str, before: set[str] | None) -> None:
    """After a start that stopped on an error before WORKDIR held any checkpoint (a bad
    dataset, too few examples, a missing warm-start run): removes what it made there (its
    event files, checkpoint folder, generated data), so that a failed start leaves the folder
    as it found it (main.py then removes its log, and WORKDIR where it made it). The files
    that were there stay, and so does the lock (released on the way out). Process 0 does it."""
    if jax.process_index() != 0 or "://" in workdir or ckpt_lib.has_checkpoints(workdir):
        return
    made = (
        (files.entries(workdir) or set())
        - (before or set())
        - {os.path.basename(ckpt_lib.lock_path(workdir))}
    )
    for name in made:
        path = os.path.join(workdir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
    if made:
        logging.info("removed what the failed start made in %s: %s", workdir, sorted(made))


def _lock_workdir(workdir: str, stack: contextlib.ExitStack) -> None:
    """Process 0 takes the workdir's lock (all processes share the workdir) until `stack`
    closes; in a multi-process run every process stops when process 0 did not get it."""
    multi = jax.process_count() > 1
    try:
        lock = workdir_lock.hold(ckpt_lib.lock_path(workdir), enabled=jax.process_index() == 0)
        stack.enter_context(lock)
    except Exception:
        if multi:
            _agree_from_process_0(False)
        raise
    if multi and not _agree_from_process_0(True):
        raise WorkdirInUseError(f"--workdir={workdir}: process 0 could not lock it (see its log)")


def _agree_from_process_0(ok: bool) -> bool:
    from jax.experimental import multihost_utils

    return bool(multihost_utils.broadcast_one_to_all(np.int32(ok)))


def _resume(ckpt, eng, workdir: str, config_json: dict) -> tuple:
    """ckpt.restore of the newest usable step; when none fits and the config differs from the
    run's config.json, a ConfigError naming the fields that differ."""
    try:
        return ckpt.restore(eng.abstract_state)
    except ckpt_lib.CheckpointError as e:
        try:  # read only here: a damaged config.json does not stop a resume that works
            saved = files.read_json(ckpt_lib.config_path(workdir))
        except DataError:
            saved = None
        # Only the sections that shape the state can make it misfit (a resume may change
        # loop.num_steps and the like); all fields when none of those differ.
        changes = []
        if saved:
            changes = ckpt_lib.config_changes(
                saved, config_json, sections=ckpt_lib.STATE_SECTIONS
            ) or ckpt_lib.config_changes(saved, config_json)
        if not changes:
            raise
        raise ConfigError(
            f"--workdir={workdir}: its checkpoints do not fit this config, which differs from "
            f"the run's {ckpt_lib.CONFIG_FILE} in {'; '.join(changes)}. Resume with the run's "
            f"settings, or train in a new --workdir ({str(e)[:300]})"
        ) from None


def with_train_rates(state: Any, eng: engine.Engine, config: Any, train_examples: Any) -> Any:
    """`state` with the "rates" extractor's tables (models.extractors.TrainRates) holding the
    train split's counts (as training reads it: config.data's time range), a multi-task
    model's per head from that head's labels; unchanged for models without that extractor. A
    fresh state only: a resumed one has them in its checkpoint."""
    m = config.model
    if m.name not in ("ranker", "multitask") or "rates" not in tuple(m.extractors):
        return state
    schema = train_examples.schema
    label = "label" if m.name == "ranker" else "labels"
    cols = train_examples.checked_columns(("user", "item", label))
    fields, ids = extractors.id_fields(schema), (cols["user"], cols["item"])

    def filled(rates: dict, shardings: dict, label_N: np.ndarray) -> dict:
        tables = extractors.train_rate_tables(fields, *ids, label_N)
        out = dict(rates)
        for name, value in tables.items():
            value = np.asarray(value, rates[name].dtype)  # the same on every process
            out[name] = jax.make_array_from_callback(
                value.shape, shardings[name], lambda i, v=value: v[i]
            )
        return out

    params, sh = dict(state.params), eng.param_shardings
    if m.name == "ranker":
        params["rates"] = filled(params["rates"], sh["rates"], cols[label])
    else:  # a tower per head (config_check refuses "rates" in a mixture of experts)
        for i, h in enumerate(schema.heads):
            tower = f"head_{h}"
            rates = filled(params[tower]["rates"], sh[tower]["rates"], cols[label][:, i])
            params[tower] = dict(params[tower], rates=rates)
    return state.replace(params=params)


def _train_and_evaluate(config: Any, workdir: str, preempt: loop_lib.Preemption) -> dict:
    dataset = load_data(config, workdir)
    config_check.check_schema(config, dataset.schema)
    data_print = dataset.fingerprint
    if ckpt_lib.has_checkpoints(workdir):  # resuming: on the data trained on so far?
        ckpt_lib.check_dataset(workdir, dataset.path, data_print, "config.data.path")
    config_json = json.loads(config.to_json_best_effort())

    eng = engine.setup(config, dataset.schema)
    num_steps = config.loop.num_steps
    ckpt = ckpt_lib.Checkpointer(workdir, config.ckpt, config_json)
    writer = summary.SummaryWriter(workdir, enabled=jax.process_index() == 0)
    try:
        train_examples = dataset.train_examples()
        batches = pipeline.TrainBatches(
            train_examples,
            config.data.batch_size,
            config.data.shuffle_seed,
            num_steps,
            jax.process_index(),
            jax.process_count(),
        )
        it = pipeline.BatchIterator(batches, config.data.prefetch, config.data.num_threads)
        loop = loop_lib.Loop(config, workdir, writer, ckpt, it)
        ws = config.get("warm_start")  # absent from older runs' configs
        warmed = False
        if ckpt.latest_step() is None:
            if ws is not None and ws.workdir:
                if os.path.abspath(ws.workdir) == os.path.abspath(workdir):
                    raise ConfigError(
                        f"config.warm_start.workdir={ws.workdir} is this run's own --workdir"
                    )
                state, warmed = warm_start.warm_start(eng, config, dataset), True
            else:
                state = eng.init_state()
            state = with_train_rates(state, eng, config, train_examples)
        else:
            if ws is not None and ws.workdir:
                logging.info("resuming: config.warm_start (%s) is not read again", ws.workdir)
            state, data_state, restored = _resume(ckpt, eng, workdir, config_json)
            writer.restart(restored + 1)  # TensorBoard drops the stopped run's later steps
            loop.load_state(data_state.pop("loop", {}))
            it.set_state(data_state)
            logging.info("resumed from checkpoint step %d (data %s)", restored, data_state)
        # Written once the state is there: a resume that fails leaves the run's own config.
        ckpt_lib.write_config(workdir, config_json)
        ckpt_lib.write_dataset(workdir, dataset.path, data_print)
        if int(state.step) == 0:
            writer.text("config", "```\n" + json.dumps(config_json, indent=2) + "\n```", 0)
        logging.info(
            "training %s on %s (%d train examples, %d devices, mesh %s) for %d steps",
            config.model.name,
            dataset.schema.name,
            len(train_examples),
            jax.device_count(),
            dict(eng.mesh.shape),
            num_steps,
        )

        def evaluate(params: Any, split: str) -> dict[str, float]:
            d = config.data
            examples = dataset.eval_examples(split)
            return evaluation.evaluate(
                eng.eval_step, params, examples, d.eval_batch_size, eng.mesh, d.prefetch,
                d.num_threads,
            )  # fmt: skip

        eval_cb = lambda params: evaluate(params, config.loop.eval_split)
        if warmed:  # where the warm start starts, before any step (TensorBoard step 0)
            m = eval_cb(state.eval_params())
            writer.scalars(0, {f"{config.loop.eval_split}/{k}": v for k, v in m.items()})
            logging.info(
                "eval %s of the warm start, before training: %s", config.loop.eval_split,
                metrics.format_metrics(m),
            )  # fmt: skip
        state = loop.run(state, eng.train_step, num_steps, preempt, eval_cb)
        final = {}
        split = config.loop.final_eval_split
        if split and not preempt.requested:
            params, at, which = state.eval_params(), int(state.step), "last step"
            best = loop.stopper.best_step
            if config.ckpt.keep_best and best is not None:
                # The checkpoint chosen by the validation metric, not whatever the last step was.
                which = f"best {config.loop.eval_split}/{loop.stopper.metric}"
                if best != at:
                    params, at = ckpt.restore_params(eng.abstract_state, best), best
            m = evaluate(params, split)
            final = {f"{split}/{k}": v for k, v in m.items()}
            writer.scalars(int(state.step), {**final, f"{split}/step": at})
            final[f"{split}/step"] = at
            line = f"final {split} metrics at step {at} ({which}): {metrics.format_metrics(m)}"
            _say(line)
            if jax.process_index() == 0:
                _print_summary(workdir, loop.stopper, config)
        final.update(loop.last_eval)
        return final
    finally:
        ckpt.close()
        writer.close()


def _print_summary(workdir: str, stopper: Any, config: Any) -> None:
    """The run's last lines: the best step and its metric, where the checkpoints are, and the
    TensorBoard command."""
    if stopper.best_step is not None:
        metric = f"{config.loop.eval_split}/{stopper.metric}"
        _say(f"best step {stopper.best_step}: {metric}={stopper.best:.4f}")
    _say(f"checkpoints: {os.path.join(workdir, 'checkpoints')}")
    _say(f"tensorboard --logdir {workdir}")


def _say(line: str) -> None:
    """One of the run's last lines: on stdout once (not again through absl's terminal log),
    and in train.log."""
    print(line, flush=True)
    logs.to_files(line)
