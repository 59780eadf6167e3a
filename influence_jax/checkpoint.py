"""Orbax checkpoints of a run: train state (params, optimizer, step, RNG), data position and loop
bookkeeping; keeps the last K steps plus the best one, and verifies every checkpoint it restores.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

PACKAGES = ("influence_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
# Orbax splits each replicated array across its replicas so that every host writes a part; each
# part costs one small jit compile per device on the first save (seconds on 8 CPU devices,
# minutes on a pod). Only arrays whose per-replica part is at least this big are split.
REPLICA_PARALLEL_MIN_BYTES = 4 << 20


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or used; the message names the step and the folder."""


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
def _digest_fn(mesh: jax.sharding.Mesh | None) -> Any:
    out_sh = NamedSharding(mesh, P()) if mesh is not None else None
    return jax.jit(lambda leaves: [_leaf_digest(x) for x in leaves], out_shardings=out_sh)


def tree_digest(tree: Any) -> tuple[list[int], list[str]]:
    """Per-leaf checksums of `tree` and the paths of its leaves holding NaN or Inf.

    The checksum is an integer sum, so a restore on the same or another mesh reproduces it bit
    for bit; a flipped byte in a checkpoint file changes it.
    """
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    leaves = [leaf for _, leaf in flat]
    pairs = jax.device_get(_digest_fn(getattr(leaves[0].sharding, "mesh", None))(leaves))
    bad = [
        jax.tree_util.keystr(path) for (path, _), (_, ok) in zip(flat, pairs, strict=True) if not ok
    ]
    return [int(s) for s, _ in pairs], bad


class Checkpointer:
    """Saves and restores `{"state": TrainState, "data": JSON}` under `directory`.

    The JSON item holds the data position (`next_batch`), the loop's bookkeeping (`loop`) and
    the state's per-leaf checksums (`digest`). Every process takes part in saving (Orbax
    coordinates multi-host writes); each step records the config, package versions and the
    evaluation metrics of that step (if any) in its metadata, the root metadata holds the config
    and versions of the run that created the folder.
    """

    def __init__(self, directory: str, ckpt_cfg: Any, config_json: dict | None = None):
        self.policy = LatestPlusBest(ckpt_cfg.max_to_keep or 0)
        options = ocp.CheckpointManagerOptions(
            enable_async_checkpointing=bool(ckpt_cfg.async_save),
            create=True,
            cleanup_tmp_directories=True,  # half-written saves of a killed run
            preservation_policy=self.policy,
        )
        self.metadata = {"config": config_json or {}, "versions": package_versions()}
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=options,
            item_handlers={"state": _state_handler(), "data": ocp.JsonCheckpointHandler()},
            metadata=self.metadata,
        )

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
        expected = data.pop("digest", None)
        if expected is not None:
            got, _ = tree_digest(out["state"])
            if got != list(expected):
                flat, _ = jax.tree_util.tree_flatten_with_path(out["state"])
                diff = [
                    jax.tree_util.keystr(p)
                    for (p, _), a, b in zip(flat, got, expected, strict=False)
                    if a != b
                ]
                raise CheckpointError(f"checksum mismatch in {', '.join(diff[:5])}")
        return out["state"], data

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def is_saving(self) -> bool:
        return self.manager.is_saving_in_progress()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
