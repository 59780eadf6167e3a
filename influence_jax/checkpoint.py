"""Orbax checkpoints of a run: train state (params, optimizer, step, RNG) + data position."""

from __future__ import annotations

import importlib.metadata
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

PACKAGES = ("influence_jax", "jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


class Checkpointer:
    """Saves and restores `{"state": TrainState, "data": iterator state}` under `directory`.

    Every process takes part in saving (Orbax coordinates multi-host writes); the config and
    package versions go into the manager's metadata beside the steps.
    """

    def __init__(self, directory: str, ckpt_cfg: Any, config_json: dict | None = None):
        options = ocp.CheckpointManagerOptions(
            max_to_keep=ckpt_cfg.max_to_keep,
            enable_async_checkpointing=bool(ckpt_cfg.async_save),
            create=True,
        )
        metadata = {"config": config_json or {}, "versions": package_versions()}
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "data"), metadata=metadata
        )

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, data_state: dict[str, Any]) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
            ),
            force=True,
        )

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict, int]:
        """Restores `step` (default: the newest readable one) into `abstract_state`'s shardings.

        A latest checkpoint that cannot be read (half-written, corrupted) is skipped with a
        warning and the one before it is used.

        Returns:
          (state, data_state, step).
        """
        steps = [step] if step is not None else sorted(self.all_steps(), reverse=True)
        errors = []
        for s in steps:
            try:
                out = self.manager.restore(
                    s,
                    args=ocp.args.Composite(
                        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
                    ),
                )
                if errors:
                    logging.warning(
                        "restored checkpoint step %d after skipping: %s", s, "; ".join(errors)
                    )
                return out["state"], dict(out["data"]), s
            except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back
                errors.append(f"step {s}: {type(e).__name__}: {e}")
                logging.warning(
                    "checkpoint step %d in %s is unreadable (%s); trying an older one",
                    s,
                    self.directory,
                    e,
                )
        raise FileNotFoundError(f"no readable checkpoint in {self.directory}: {errors}")

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_with_shardings(shapes: Any, shardings: Any) -> Any:
    """ShapeDtypeStructs carrying the target shardings, for sharded restore."""
    return jax.tree_util.tree_map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings
    )
