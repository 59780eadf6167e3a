"""Trials: one training run in its own workdir, finished when its result file exists.

A trial writes WORKDIR/result.json atomically (temp file, then rename) only after training and
the final evaluation ended; an interrupted trial has no result file and, run again, resumes from
its own checkpoints (train.train_and_evaluate). Also here: config overrides by dotted name and
configs written as Python files (`get_config()`) that `python -m influence_jax.main` accepts.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import importlib.util
import json
import os
import pprint
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import ml_collections

from influence_jax import checkpoint
from influence_jax.errors import ConfigError, TrainingError
from influence_jax.files import read_json, write_json, write_text

RESULT_FILE = "result.json"

TrainFn = Callable[[ml_collections.ConfigDict, str], dict[str, float]]


class Preempted(RuntimeError):
    """A trial stopped (SIGTERM) before its final evaluation; the same command resumes it."""


def get_field(config: ml_collections.ConfigDict, dotted: str, where: str = "") -> Any:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            raise ConfigError(f"{where}{dotted}: the config has no field {dotted!r}")
        node = node[part]
    return node


def with_overrides(
    config: ml_collections.ConfigDict, overrides: Mapping[str, Any], where: str = ""
) -> ml_collections.ConfigDict:
    """A copy of `config` with `overrides` ({"opt.learning_rate": 1e-3, ...}) set.

    JSON lists become tuples (config sequences are tuples). Raises ConfigError naming the field
    for a field the config lacks, a sub-config set as a whole, or a value of the wrong type.
    """
    config = copy.deepcopy(config)
    for dotted, value in overrides.items():
        current = get_field(config, dotted, where)
        if isinstance(current, ml_collections.ConfigDict):
            raise ConfigError(f"{where}{dotted}: is a group of fields; set its fields one by one")
        if isinstance(value, list):
            value = _tuples(value)
        *parents, leaf = dotted.split(".")
        node = get_field(config, ".".join(parents), where) if parents else config
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{where}{dotted}: cannot set {value!r} ({e})") from None
    return config


def _tuples(value: Any) -> Any:
    return tuple(_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def config_to_python(config: ml_collections.ConfigDict, doc: str) -> str:
    """Source of a config file whose `get_config()` returns `config` (same fields and values)."""
    body = pprint.pformat(config.to_dict(), width=92, sort_dicts=True)
    body = "\n".join("        " + line for line in body.splitlines())
    return (
        f'"""{doc.strip()}\n"""\n\nimport ml_collections\n\n\n'
        "def get_config() -> ml_collections.ConfigDict:\n"
        f"    config = ml_collections.ConfigDict(\n{body}\n    )\n"
        "    config.lock()\n    return config\n"
    )


def load_config_file(path: str) -> ml_collections.ConfigDict:
    """`get_config()` of the Python config file `path` (as main.py's --config reads it)."""
    spec = importlib.util.spec_from_file_location(f"_config_{uuid.uuid4().hex}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"{path}: not a Python config file")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def write_config_file(path: str, config: ml_collections.ConfigDict, doc: str) -> None:
    """Writes `config` as a Python config file, atomically, and checks that it reads back equal."""
    write_text(path, config_to_python(config, doc))
    if load_config_file(path).to_dict() != config.to_dict():
        raise ConfigError(f"{path}: the written config does not read back equal to the original")


def check_final_split(config: ml_collections.ConfigDict) -> None:
    """Trials need a final evaluation: it is how a finished run differs from a stopped one."""
    if not config.loop.final_eval_split:
        raise ConfigError(
            "config.loop.final_eval_split: experiments need a final evaluation to tell a "
            "finished trial from a preempted one; set it (e.g. 'test' or 'valid')"
        )


def train_whole(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """train.train_and_evaluate for a tool that scores the run at once (tools/quality.py,
    multitask_compare.py): a SIGTERM, which stops training at a checkpoint, stops the tool too
    (cli.Terminated: exit 143 and one line under cli.run) instead of the tool scoring a partly
    trained run as if it were the finished one."""
    from influence_jax import cli, loop, train

    preempt = loop.Preemption()
    metrics = train.train_and_evaluate(config, workdir, preempt)
    if preempt.requested:
        raise cli.Terminated()
    return metrics


def train_trial(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
    """train.train_and_evaluate, raising Preempted when the run stopped before its final eval."""
    from influence_jax import train

    metrics = train.train_and_evaluate(config, workdir)
    split = config.loop.final_eval_split
    if not any(k.startswith(split + "/") for k in metrics):
        raise Preempted(f"{workdir}: stopped before the final evaluation; run again to resume")
    eval_split = config.loop.eval_split
    if not any(k.startswith(eval_split + "/") for k in metrics):
        # Killed after its last step: the rerun trained nothing, so the loop made no evaluation.
        metrics = {**_saved_eval(workdir, eval_split), **metrics}
    return metrics


def _saved_eval(workdir: str, split: str) -> dict[str, float]:
    """The evaluation metrics stored with the latest checkpoint, as "split/k"."""
    return {f"{split}/{k}": float(v) for k, v in checkpoint.saved_metrics(workdir).items()}


def share_synthetic_data(config: ml_collections.ConfigDict, workdir: str, root: str) -> None:
    """Points WORKDIR/data at one synthetic dataset per generator setting under `root`
    (ROOT/data-<hash>), so that trials do not each generate the same data: train.load_data
    finds it there and keeps it. Runs on prepared data are left alone."""
    from influence_jax.data import synthetic

    if config.data.source != "synthetic":
        return
    link = checkpoint.data_dir(workdir)
    if os.path.lexists(link):
        return
    generator = json.dumps(synthetic.cfg_to_dict(config.data.synthetic), sort_keys=True)
    shared = os.path.join(root, "data-" + hashlib.sha1(generator.encode()).hexdigest()[:10])
    _generate_once(config.data.synthetic, shared)
    os.makedirs(workdir, exist_ok=True)
    os.symlink(os.path.relpath(shared, workdir), link)


def _generate_once(cfg: Any, shared: str) -> None:
    """synthetic.ensure, by one process at a time: workers starting together on a shared
    folder must not replace the dataset under each other. The lock is an flock on
    `.<shared>.lock` beside it, which the kernel releases when its holder exits, killed or
    not (a lock file's mere existence, as before, kept a rerun after a kill waiting for 30
    minutes); the file stays (removing a locked file would let a third process lock a new
    one)."""

    from absl import logging

    from influence_jax.data import synthetic

    lock = os.path.join(os.path.dirname(shared), f".{os.path.basename(shared)}.lock")
    os.makedirs(os.path.dirname(lock), exist_ok=True)
    with open(lock, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("waiting for %s: another process is generating the synthetic data", lock)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            synthetic.ensure(cfg, shared)  # keeps the dataset when the same settings made it
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def run_in_workdir(
    config: ml_collections.ConfigDict,
    workdir: str,
    info: Mapping[str, Any],
    train_fn: TrainFn = train_trial,
) -> dict[str, Any]:
    """Runs one trial in `workdir` unless its result file exists; returns the result record.

    A TrainingError (non-finite loss) finishes the trial with status "failed"; Preempted
    propagates and leaves no result file, so that the next run resumes the trial.

    Returns:
      {**info, "status", "error", "metrics", "best", "seconds", "finished_unix", "run_id"}.
    """
    path = os.path.join(workdir, RESULT_FILE)
    done = read_json(path)
    if done is not None:
        return done
    os.makedirs(workdir, exist_ok=True)
    t0 = time.time()
    status, error, metrics = "ok", "", {}
    try:
        metrics = train_fn(config, workdir)
    except TrainingError as e:
        status, error = "failed", str(e)
    record = {
        **info,
        "status": status,
        "error": error,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "best": checkpoint.read_best(workdir),
        "seconds": round(time.time() - t0, 2),
        "finished_unix": time.time(),
        "run_id": uuid.uuid4().hex,
    }
    write_json(path, record)
    return record
