"""Orbax checkpoints and the layout of a run's workdir; every save and every restore.

A workdir holds config.json (the resolved config), checkpoints/<step>/ (train state: params,
optimizer, step, RNG; the data position and loop bookkeeping; per-leaf checksums), best.json
(the best evaluation's step), train.lock while a run trains (workdir_lock.py) and, for
synthetic runs, data/ (the generated dataset). This module is the only one that names those
paths or builds an Orbax CheckpointManager. Training keeps the last K steps plus the best one;
every restore, the ranker's params-only one included, verifies the checksums saved with the
step.
"""

from __future__ import annotations

import copy
import functools
import importlib.metadata
import logging as std_logging
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from influence_jax import files, optim, xla_options
from influence_jax.errors import CheckpointError, DataError

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
BEST_FILE = "best.json"
DATA_DIR = "data"
LOCK_FILE = "train.lock"
DATASET_FILE = "dataset.json"  # the dataset a run trains on: {"path", "fingerprint"}
PACKAGES = ("influence_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
# Orbax splits each replicated array across its replicas so that every host writes a part; each
# part costs one small jit compile per device on the first save (seconds on 8 CPU devices,
# minutes on a pod). Only arrays whose per-replica part is at least this big are split.
REPLICA_PARALLEL_MIN_BYTES = 4 << 20


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), CHECKPOINTS)


def has_checkpoints(workdir: str) -> bool:
    """Whether WORKDIR/checkpoints holds a step folder (usable or not), without Orbax."""
    d = checkpoint_dir(workdir)
    return os.path.isdir(d) and any(n.isdigit() for n in os.listdir(d))


def config_path(workdir: str) -> str:
    return os.path.join(workdir, CONFIG_FILE)


def best_path(workdir: str) -> str:
    return os.path.join(workdir, BEST_FILE)


def lock_path(workdir: str) -> str:
    """The lock file a training run holds (influence_jax/workdir_lock.py)."""
    return os.path.join(workdir, LOCK_FILE)


def data_dir(workdir: str) -> str:
    """Where a synthetic run generates its dataset."""
    return os.path.join(workdir, DATA_DIR)


def write_config(workdir: str, config_json: dict) -> None:
    """WORKDIR/config.json (process 0, atomically)."""
    if jax.process_index() == 0:
        files.write_json(config_path(workdir), config_json)


def dataset_record_path(workdir: str) -> str:
    return os.path.join(workdir, DATASET_FILE)


def check_dataset(workdir: str, path: str, fingerprint: str, flag: str) -> None:
    """DataError when the run's record says it was trained on another dataset than the one at
    `path` (`fingerprint`: data.dataset.fingerprint); runs from before the record pass."""
    try:
        saved = files.read_json(dataset_record_path(workdir))
    except DataError:
        saved = None  # a damaged record does not stop a run; training writes it again
    if not isinstance(saved, dict) or saved.get("fingerprint") in (None, fingerprint):
        return
    raise DataError(
        f"{flag}={path}: not the dataset {workdir!r} was trained on ({saved.get('path')}): "
        "its vocabularies or field layout differ, so the model's ids would name other users "
        "and items. Use the run's dataset, or one prepared from the same log with the same "
        "vocabulary settings"
    )


def write_dataset(workdir: str, path: str, fingerprint: str) -> None:
    """WORKDIR/dataset.json (process 0, atomically)."""
    if jax.process_index() == 0:
        record = {"path": os.path.abspath(path), "fingerprint": fingerprint}
        files.write_json(dataset_record_path(workdir), record)


def read_config(workdir: str) -> ml_collections.ConfigDict:
    """The config a run was trained with (WORKDIR/config.json), in today's layout."""
    path = config_path(workdir)
    raw = files.read_json(path)
    if raw is None:
        raise DataError(f"{path}: no such file; is {workdir!r} a training workdir?")
    _check_config_layout(raw, path)
    return ml_collections.ConfigDict(upgrade_config(raw))


# What every run's config.json holds (config sections, and the fields a run is loaded by).
CONFIG_SECTIONS = {
    "data": ("source", "path"), "model": ("name",), "opt": (), "loop": (), "mesh": (),
}  # fmt: skip


def _check_config_layout(raw: Any, path: str) -> None:
    """DataError naming `path` and the first missing part unless `raw` has a run config's
    layout (a JSON file written over it, e.g. another tool's output, is not a config)."""
    if not isinstance(raw, dict):
        raise DataError(f"{path}: not a run's config (a JSON {type(raw).__name__}, not an object)")
    for section, fields in CONFIG_SECTIONS.items():
        part = raw.get(section)
        missing = [f for f in fields if not isinstance(part, dict) or f not in part]
        if not isinstance(part, dict) or missing:
            what = f"{section}.{missing[0]}" if isinstance(part, dict) else section
            raise DataError(
                f"{path}: not a run's config (no {what}; its keys: {sorted(raw)[:8]}): the "
                "file was overwritten or damaged; every checkpoint keeps a copy of it "
                "(checkpoints/<step>/_CHECKPOINT_METADATA, under custom_metadata.config)"
            )


STATE_SECTIONS = ("model", "data", "opt")  # the config's sections that shape the train state


def config_changes(
    old: dict, new: dict, most: int = 6, sections: Sequence[str] | None = None
) -> list[str]:
    """The fields whose values differ between two configs as JSON ("model.embed_dim: 8 -> 16"),
    model, data and opt first (they shape the state), at most `most` and a count of the rest;
    with `sections`, only the fields under those top-level sections."""

    def flat(d: Any, prefix: str = "") -> dict[str, Any]:
        if not isinstance(d, dict):
            return {prefix: d}
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out

    a, b = flat(upgrade_config(copy.deepcopy(old))), flat(new)
    keys = [k for k in sorted(a.keys() | b.keys()) if a.get(k, "absent") != b.get(k, "absent")]
    if sections is not None:
        keys = [k for k in keys if k.split(".")[0] in sections]
    keys.sort(key=lambda k: k.split(".")[0] not in STATE_SECTIONS)
    out = [f"{k}: {a.get(k, 'absent')!r} -> {b.get(k, 'absent')!r}" for k in keys[:most]]
    if len(keys) > most:
        out.append(f"and {len(keys) - most} more")
    return out


def upgrade_config(raw: dict) -> dict:
    """A config.json of an older run in today's layout: the seed CNN's settings moved from
    config.model into config.model.seed_cnn, and loop.sync_every (never read) is gone."""
    model = raw.get("model", {})
    if "seed_cnn" not in model:
        flat = {
            k: model.pop(k) for k in ("filters", "kernel_size", "hidden", "dropout") if k in model
        }
        model["seed_cnn"] = flat
    raw.get("loop", {}).pop("sync_every", None)
    return raw


def write_best(workdir: str, record: dict) -> None:
    """WORKDIR/best.json: {"step", "metric", "value", "mode", "checkpoint"} (process 0)."""
    if jax.process_index() == 0:
        files.write_json(best_path(workdir), record)


def read_best(workdir: str) -> dict | None:
    return files.read_json(best_path(workdir))


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


class LatestPlusBest:
    """Orbax preservation policy: the newest `n` checkpoints (all if n is 0) plus `best_step`.

    Orbax's own best_fn keeps the best K by metric, which can delete the newest checkpoint; a
    resumable run needs the newest ones and a ranker wants the best, so both are kept.
    """

    def __init__(self, n: int):
        self.n, self.best_step = int(n), None

    def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
        first_latest = len(checkpoints) - self.n if self.n > 0 else 0
        return [i >= first_latest or c.step == self.best_step for i, c in enumerate(checkpoints)]


def _state_handler() -> ocp.PyTreeCheckpointHandler:
    th = ocp.type_handlers
    arrays = th.ArrayHandler(min_slice_bytes_for_replica_parallel=REPLICA_PARALLEL_MIN_BYTES)
    registry = th.create_type_handler_registry(
        (jax.Array, arrays),
        (np.ndarray, th.NumpyHandler()),
        (np.number, th.ScalarHandler()),
        (int, th.ScalarHandler()),
        (float, th.ScalarHandler()),
    )
    return ocp.PyTreeCheckpointHandler(type_handler_registry=registry)


def _leaf_digest(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(sum of the bit patterns mod 2**32, all finite): exact whatever the sharding or order."""
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    bits = jax.lax.bitcast_convert_type(x, jnp.dtype(f"uint{8 * x.dtype.itemsize}"))
    finite = jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact) else jnp.array(True)
    return jnp.sum(bits.astype(jnp.uint32), dtype=jnp.uint32), finite


@functools.lru_cache(maxsize=4)
def _digest_fn(mesh: jax.sharding.Mesh | None, options: tuple = ()) -> Any:
    out_sh = NamedSharding(mesh, P()) if mesh is not None else None
    fn = lambda leaves: [_leaf_digest(x) for x in leaves]
    return jax.jit(fn, out_shardings=out_sh, compiler_options=dict(options) or None)


def tree_digest(tree: Any) -> tuple[list[int], list[str]]:
    """Per-leaf checksums of `tree` and the paths of its leaves holding NaN or Inf.

    The checksum is an integer sum, so a restore on the same or another mesh reproduces it bit
    for bit; a flipped byte in a checkpoint file changes it.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in flat]
    # Fast-compiling on CPU for states of up to 3 x the init's limit (parameters and two
    # moments): the sums are integers, exact whatever the options.
    sh = getattr(leaves[0], "sharding", None)
    platform = next(iter(sh.device_set)).platform if sh is not None else jax.default_backend()
    limit = 3 * xla_options.FAST_COMPILE_MAX_ELEMENTS
    options = xla_options.fast_compile(platform, xla_options.elements(leaves), limit) or {}
    mesh = getattr(sh, "mesh", None)
    pairs = jax.device_get(_digest_fn(mesh, tuple(sorted(options.items())))(leaves))
    bad = [
        jax.tree_util.keystr(path) for (path, _), (_, ok) in zip(flat, pairs, strict=True) if not ok
    ]
    return [int(s) for s, _ in pairs], bad


def _manager(directory: str, options: ocp.CheckpointManagerOptions, **kw) -> Any:
    """The one place an Orbax CheckpointManager is built: a state item and a JSON item."""
    handlers = {"state": _state_handler(), "data": ocp.JsonCheckpointHandler()}
    return ocp.CheckpointManager(directory, options=options, item_handlers=handlers, **kw)


class _ReadOnlyNote(std_logging.Filter):
    """Drops Orbax's warning that a manager opened read-only is read-only (every tool that
    reads a checkpoint opens it so, on purpose)."""

    def filter(self, record: std_logging.LogRecord) -> bool:
        return not str(record.msg).startswith("Given directory is read only")


std_logging.getLogger("absl").addFilter(_ReadOnlyNote())


def _reader(workdir: str) -> Any:
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise DataError(f"{directory}: no checkpoints; train the run first")
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    return _manager(directory, options)


def _check_digest(state: Any, expected: Sequence[int] | None, keep: list[int] | None = None):
    """Raises CheckpointError naming the leaves whose checksums differ from `expected`.

    `keep`: positions of `state`'s leaves among the saved leaves (a partial restore)."""
    if expected is None:  # checkpoints written before checksums existed
        return
    expected = [expected[i] for i in keep] if keep is not None else list(expected)
    got, _ = tree_digest(state)
    if got != expected:
        flat, _ = jax.tree_util.tree_flatten_with_path(state)
        diff = [
            jax.tree_util.keystr(p)
            for (p, _), a, b in zip(flat, got, expected, strict=False)
            if a != b
        ]
        raise CheckpointError(f"checksum mismatch in {', '.join(diff[:5])}")


class Checkpointer:
    """Saves and restores `{"state": TrainState, "data": JSON}` under `directory`.

    The JSON item holds the data position (`next_batch`), the loop's bookkeeping (`loop`) and
    the state's per-leaf checksums (`digest`). Every process takes part in saving (Orbax
    coordinates multi-host writes); each step records the config, package versions and the
    evaluation metrics of that step (if any) in its metadata, the root metadata holds the config
    and versions of the run that created the folder.
    """

    def __init__(self, workdir: str, ckpt_cfg: Any, config_json: dict | None = None):
        self.workdir = workdir
        self.policy = LatestPlusBest(ckpt_cfg.max_to_keep or 0)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(ckpt_cfg.async_save),
            create=True,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
            preservation_policy=self.policy,
        )
        self.metadata = {"config": config_json or {}, "versions": package_versions()}
        self.directory = checkpoint_dir(workdir)
        self.manager = _manager(self.directory, options, metadata=self.metadata)

    @property
    def best_step(self) -> int | None:
        return self.policy.best_step

    @best_step.setter
    def best_step(self, step: int | None) -> None:
        """The step kept beyond the newest `max_to_keep`; set it before saving a new best."""
        self.policy.best_step = step

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(
        self, step: int, state: Any, data_state: dict[str, Any], metrics: dict | None = None
    ) -> None:
        """Saves `state` and the JSON `data_state` as `step` (asynchronously when configured).

        Raises:
          CheckpointError: `state` holds NaN or Inf (nothing is written).
        """
        digest, bad = tree_digest(state)
        if bad:
            raise CheckpointError(
                f"step {step}: not saved to {self.directory}: NaN or Inf in {', '.join(bad[:5])}"
            )
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeSave(state),
                data=ocp.args.JsonSave(dict(data_state, digest=digest)),
            ),
            force=True,
            custom_metadata=dict(self.metadata, metrics=metrics or {}),
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores `step` (default: the newest usable one) into `abstract_state`'s shardings.

        A newer checkpoint that cannot be read or whose checksums do not match (half-written,
        corrupted) is skipped with a warning and deleted once an older one restores, so that the
        run can save that step again.

        Returns:
          (state, data_state, step).
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        errors: list[tuple[int, str]] = []
        for s in steps:
            misfit = self._misfit(abstract_state, s)
            if misfit:  # another model, not damage: no older step of the run fits either
                raise CheckpointError(f"{self.directory}: {misfit}")
            try:
                state, data = self._restore_verified(abstract_state, s)
            except Exception as e:  # noqa: BLE001 - any unusable checkpoint falls back
                errors.append((s, f"{type(e).__name__}: {e}"))
                logging.warning(
                    "checkpoint step %d in %s is unusable (%s: %s); trying an older one",
                    s, self.directory, type(e).__name__, str(e)[:500],
                )  # fmt: skip
                continue
            for bad, why in errors:
                logging.warning("deleting unusable checkpoint step %d (%s)", bad, why[:200])
                self.manager.delete(bad)
            if errors:
                logging.warning("resuming from checkpoint step %d instead", s)
            return state, data, s
        raise CheckpointError(
            f"no usable checkpoint in {self.directory}: "
            + "; ".join(f"step {s}: {why[:300]}" for s, why in errors)
            + ". Move the folder away to start over."
        )

    def _misfit(self, abstract_state: Any, step: int) -> str:
        """Why the parameters saved at `step` cannot fit `abstract_state`'s (their names or
        shapes differ: a config that builds another model), from the checkpoint's metadata and
        before any array is read; "" when they fit or the metadata cannot be read (the restore
        then reports the damage)."""
        try:
            saved = self.manager.item_metadata(step)["state"]
        except Exception:  # noqa: BLE001 - unreadable metadata: the restore's own error says
            return ""
        saved = getattr(saved, "tree", saved)
        if not isinstance(saved, dict) or not isinstance(saved.get("params"), dict):
            return ""
        try:
            _check_shapes(
                abstract_state.params, saved["params"], f"step {step}",
                "the config or the dataset builds another model than the one saved",
            )  # fmt: skip
        except DataError as e:
            return str(e)
        return ""

    def _restore_verified(self, abstract_state: Any, step: int) -> tuple[Any, dict]:
        restore_args = ocp.checkpoint_utils.construct_restore_args(abstract_state)
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.PyTreeRestore(item=abstract_state, restore_args=restore_args),
                data=ocp.args.JsonRestore(),
            ),
        )
        data = dict(out["data"])
        _check_digest(out["state"], data.pop("digest", None))
        return out["state"], data

    def restore_params(self, abstract_state: Any, step: int) -> Any:
        """The parameters alone of `step`, verified (see the module-level restore_params)."""
        self.manager.wait_until_finished()
        return _restore_params(self.manager, abstract_state, step, f"{self.directory}/{step}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def is_saving(self) -> bool:
        return self.manager.is_saving_in_progress()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def resolve_step(workdir: str, step: str | int, available: Sequence[int]) -> int:
    """`step` ("latest", "best" or a number) -> a saved step; best comes from WORKDIR/best.json."""
    available = sorted(available)
    if not available:
        raise DataError(f"{checkpoint_dir(workdir)}: no checkpoints; train the run first")
    if str(step) == "latest":
        return max(available)
    if str(step) == "best":
        path = best_path(workdir)
        if not os.path.exists(path):
            logging.warning("%s not found: --step=best falls back to the latest step", path)
            return max(available)
        try:
            n = int(files.read_json(path)["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f'{path}: expected {{"step": N, ...}} ({e!r})') from None
    else:
        try:
            n = int(step)
        except ValueError:
            raise DataError(f"--step must be a number, best or latest; got {step!r}") from None
    if n not in available:
        raise DataError(f"{checkpoint_dir(workdir)}: no step {n}; saved steps are {available}")
    return n


def restore_params(
    workdir: str, abstract_state: Any, step: str | int = "latest"
) -> tuple[Any, int]:
    """The parameters alone of WORKDIR's checkpoint `step`, into `abstract_state.params`'
    shardings, verified against the checksums saved with them.

    Args:
      abstract_state: the run's whole TrainState as ShapeDtypeStructs (engine.setup), so that
        each parameter's place among the saved checksums is known.

    Returns:
      (params, step).

    Raises:
      DataError: no such step, parameters that do not fit the model (another dataset), or a
        checkpoint that fails its checksums.
    """
    manager = _reader(workdir)
    try:
        n = resolve_step(workdir, step, manager.all_steps())
        return _restore_params(manager, abstract_state, n, f"{checkpoint_dir(workdir)}/{n}"), n
    finally:
        manager.close()


def _check_saved(manager: Any, n: int, where: str, abstract_state: Any) -> None:
    """DataError unless step `n`'s saved parameters (and moving average, where the config keeps
    one) fit `abstract_state`'s, from the checkpoint's metadata, before any array is read."""
    saved = manager.item_metadata(n)["state"]
    saved = getattr(saved, "tree", saved)
    _check_shapes(abstract_state.params, saved["params"], where)
    ema = getattr(abstract_state, "ema", None)
    if ema is not None:
        if saved.get("ema") is None:  # absent, or None (saved by a run without an average)
            raise DataError(
                f"{where}: the checkpoint holds no moving average of the parameters, but the "
                "run's config keeps one (config.opt.ema_decay); it belongs to another config"
            )
        _check_shapes(ema, saved["ema"], where)


def _restore_params(manager: Any, abstract_state: Any, n: int, where: str) -> Any:
    damaged = lambda e: DataError(
        f"{where}: cannot read the checkpoint ({str(e).splitlines()[0][:200]}): its files are "
        "damaged or incomplete; use another --step"
    )
    try:
        _check_saved(manager, n, where, abstract_state)
    except DataError:
        raise
    except (ValueError, OSError) as e:  # tensorstore's read errors are ValueErrors
        raise damaged(e) from None
    abstract = {"params": abstract_state.params}
    ema = getattr(abstract_state, "ema", None)
    if ema is not None:  # the moving average (config.opt.ema_decay) is what the run evaluates
        abstract["ema"] = ema
    state_args = ocp.args.PyTreeRestore(
        item=abstract,
        restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
        partial_restore=True,  # only these subtrees of the saved TrainState are read
    )
    try:
        out = manager.restore(
            n, args=ocp.args.Composite(state=state_args, data=ocp.args.JsonRestore())
        )
    except Exception as e:  # noqa: BLE001 - Orbax wraps read errors in a bare Exception
        if "reading" in str(e) or isinstance(e, OSError):
            raise damaged(e) from None  # the shapes fit (_check_shapes): the files are bad
        if not isinstance(e, (ValueError, KeyError, TypeError)):
            raise
        raise DataError(
            f"{where}: the saved parameters do not fit the model built from the run's config "
            f"and this dataset ({str(e).splitlines()[0][:200]}); was the run trained on "
            "another dataset (--data)?"
        ) from None
    flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
    keep = [i for i, (path, _) in enumerate(flat) if getattr(path[0], "name", None) in abstract]
    digest = out["data"].get("digest")
    if digest is not None and len(digest) != len(flat):
        raise DataError(
            f"{where}: the saved state has {len(digest)} arrays, the run's config gives "
            f"{len(flat)}; the checkpoint does not belong to this config"
        )
    restored = out["state"]["params"]
    if "ema" in abstract:  # in the TrainState's order: params before ema
        restored = [restored, out["state"]["ema"]]
    try:
        _check_digest(restored, digest, keep)
    except CheckpointError as e:
        raise DataError(f"{where}: {e}: the checkpoint is corrupted; use another --step") from None
    return optim.with_average(out["state"]["params"], out["state"].get("ema"))


class ParamReader:
    """The parameters of WORKDIR's checkpoint `step` read one array at a time (a warm start's
    source: never all of its tables in memory at once), each the moving average where the run
    keeps one (as restore_params gives them), verified against its saved checksum.

    `abstract_state`: the run's TrainState as ShapeDtypeStructs with shardings (engine.setup).
    Raises DataError as restore_params does."""

    def __init__(self, workdir: str, abstract_state: Any, step: str | int = "latest"):
        self.manager = _reader(workdir)
        try:
            self.step = resolve_step(workdir, step, self.manager.all_steps())
            self.where = f"{checkpoint_dir(workdir)}/{self.step}"
            try:
                _check_saved(self.manager, self.step, self.where, abstract_state)
                data = self.manager.restore(
                    self.step, args=ocp.args.Composite(data=ocp.args.JsonRestore())
                )["data"]
            except DataError:
                raise
            except (ValueError, OSError) as e:  # tensorstore's read errors are ValueErrors
                raise DataError(f"{self.where}: cannot read the checkpoint ({e})") from None
            self.ema = getattr(abstract_state, "ema", None)
        except BaseException:
            self.manager.close()
            raise
        self.digest = data.get("digest")
        flat, _ = jax.tree_util.tree_flatten_with_path(abstract_state)
        # Each leaf's place among the saved checksums, by (params or ema, its path there).
        self.index = {
            (path[0].name, jax.tree_util.keystr(path[1:])): i for i, (path, _) in enumerate(flat)
        }
        self.params = abstract_state.params
        # Where each parameter is read from: optim.with_average's own choice, made on trees
        # of section names (the average where it holds the leaf, else the trained values).
        tag = lambda tree, name: jax.tree_util.tree_map(lambda _: name, tree)
        sections = tag(self.params, "params")
        if self.ema is not None:
            sections = optim.with_average(sections, tag(self.ema, "ema"))
        self.sections = {
            jax.tree_util.keystr(p): (p, section)
            for p, section in jax.tree_util.tree_leaves_with_path(sections)
        }

    def names(self) -> list[str]:
        """The parameters' paths (`jax.tree_util.keystr`), in tree order."""
        return list(self.sections)

    def read(self, name: str) -> jax.Array:
        """The parameter `name` (names()), in its sharding: the average where one is kept."""
        path, section = self.sections[name]
        keys = [str(getattr(k, "key", k)) for k in path]
        tree = self.ema if section == "ema" else self.params
        leaf = tree
        for k in keys:
            leaf = leaf[k]
        partial: Any = leaf
        for k in reversed(keys):
            partial = {k: partial}
        abstract = {section: partial}
        args = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        try:
            out = self.manager.restore(self.step, args=ocp.args.Composite(state=args))
        except Exception as e:  # noqa: BLE001 - Orbax wraps read errors in a bare Exception
            raise DataError(
                f"{self.where}: cannot read {section}{name} ({str(e).splitlines()[0][:200]}): "
                "its files are damaged or incomplete; use another --step"
            ) from None
        value = out["state"][section]
        for k in keys:
            value = value[k]
        if self.digest is not None:
            try:
                _check_digest([value], self.digest, [self.index[(section, name)]])
            except CheckpointError as e:
                raise DataError(
                    f"{self.where}: {section}{name}: {e}: the checkpoint is corrupted"
                ) from None
        return value

    def close(self) -> None:
        self.manager.close()


TRAINED_ELSEWHERE = "was the run trained on another dataset? Pass the --data it was trained on"


def _check_shapes(want: Any, saved: Any, where: str, hint: str = TRAINED_ELSEWHERE) -> None:
    """Raises DataError naming the first parameter whose saved shape differs from the model's
    (before Orbax tries, and fails noisily, to read it); `hint` ends the message."""
    shape = lambda tree: {
        jax.tree_util.keystr(p): tuple(x.shape)
        for p, x in jax.tree_util.tree_leaves_with_path(tree)
    }
    want, saved = shape(want), shape(saved)
    missing, extra = sorted(set(want) - set(saved)), sorted(set(saved) - set(want))
    if missing or extra:
        raise DataError(
            f"{where}: the saved parameters are not those of the model the run's config builds "
            f"for this dataset (missing {missing[:3]}, unexpected {extra[:3]}): {hint}"
        )
    for path, shp in want.items():
        if saved[path] != shp:
            raise DataError(
                f"{where}: parameter {path} has shape {saved[path]} in the checkpoint but "
                f"{shp} for this dataset: {hint}"
            )


def saved_metrics(workdir: str, step: int | None = None) -> dict[str, float]:
    """The evaluation metrics saved with checkpoint `step` (default: the latest); {} if none."""
    manager = _reader(workdir)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            return {}
        return dict(manager.metadata(step).custom_metadata.get("metrics", {}))
    finally:
        manager.close()
