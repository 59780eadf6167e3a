"""Device mesh from config, parameter shardings from path rules, host batch -> global array."""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from influence_jax.config_check import mesh_axis_sizes

DATA, MODEL = "data", "model"


def make_mesh(mesh_cfg: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, model) mesh over `devices` (default: all devices of all processes)."""
    devices = list(devices if devices is not None else jax.devices())
    sizes = mesh_axis_sizes(mesh_cfg, len(devices))
    grid = np.asarray(devices).reshape(sizes[DATA], sizes[MODEL])
    return Mesh(grid, (DATA, MODEL))


def sharding_rules(mesh_cfg: Any, shapes: Any) -> list[tuple[str, P]]:
    """Ordered (regex, spec) rules: the config's own first, then the embedding switch.

    With `shard_embeddings`, every embedding table with at least `shard_min_rows` rows is
    row-sharded over the model axis; everything else stays replicated.
    """
    rules = []
    for regex, spec in mesh_cfg.rules:  # (regex, spec) pairs, checked in config_check
        rules.append((regex, P(*spec) if isinstance(spec, (list, tuple)) else P(spec)))
    if mesh_cfg.shard_embeddings:
        for path, leaf in _flat_paths(shapes):
            name = path.rsplit("/", 1)[-1]
            if name.startswith("embed_") and leaf.shape[0] >= mesh_cfg.shard_min_rows:
                rules.append((re.escape(name) + "$", P(MODEL, None)))
    return rules


def _flat_paths(tree: Any) -> list[tuple[str, Any]]:
    flat, _ = jax.tree_util.tree_flatten_with_path(tree)
    return [("/".join(_key_str(k) for k in path), leaf) for path, leaf in flat]


def _key_str(k: Any) -> str:
    for attr in ("key", "name", "idx"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def tree_shardings(shapes: Any, rules: list[tuple[str, P]], mesh: Mesh) -> Any:
    """NamedSharding per leaf: the first rule whose regex matches the leaf's path, else replicated.

    Optimizer moments mirror the parameter paths (.../mu/embeddings/embed_item_id), so one set of
    rules shards a table and its Adam moments alike. A rule is skipped for leaves whose rank or
    dimensions it does not fit (e.g. scalar counters, or rows not divisible by the axis).
    """

    matched: set[int] = set()

    def pick(path: str, leaf: Any) -> NamedSharding:
        for i, (regex, spec) in enumerate(rules):
            if re.search(regex, path):
                matched.add(i)
                if _fits(spec, leaf.shape, mesh):
                    return NamedSharding(mesh, spec)
        return NamedSharding(mesh, P())

    flat, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    paths = ["/".join(_key_str(k) for k in path) for path, _ in flat]
    leaves = [pick(path, leaf) for path, (_, leaf) in zip(paths, flat, strict=True)]
    for i, (regex, spec) in enumerate(rules):
        if i not in matched:  # a misspelt rule would otherwise shard nothing, silently
            logging.warning(
                "config.mesh.rules: (%r, %s) matches no parameter path (they look like %r); "
                "it shards nothing",
                regex,
                spec,
                next((p for p in paths if "embed" in p), paths[0] if paths else ""),
            )
    return jax.tree_util.tree_unflatten(treedef, leaves)


def _fits(spec: P, shape: tuple[int, ...], mesh: Mesh) -> bool:
    if len(spec) > len(shape):
        return False
    for dim, axis in zip(shape, spec, strict=False):
        if axis is not None and dim % mesh.shape[axis]:
            return False
    return True


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over `data`, replicated over `model`."""
    return NamedSharding(mesh, P(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host-local numpy batch (this process's rows) -> globally sharded device arrays."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}


def to_host(x: jax.Array) -> np.ndarray:
    """A global array's full value on every host (gathers across processes when needed)."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(jax.device_get(x))
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
