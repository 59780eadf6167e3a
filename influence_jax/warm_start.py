"""Warm start: a new run's first parameters from another run's checkpoint, on new data.

The daily retrain of a recommender: today's log is prepared again (new users and items, ids
renumbered), and today's run starts from yesterday's model instead of from random values
(`config.warm_start.workdir`, `config.warm_start.step`). Every parameter is copied from the
source run's checkpoint (its moving average where it kept one, as its evaluation and ranking
read it), except:

- embedding tables (`embed_<vocab>`, `embed_hist_<vocab>`), which are matched row by row
  through the raw ids: an id of the new vocabulary that the source vocabulary holds, with a
  trained row there, gets that row; a new id keeps its initial row; the reserved rows
  (padding, OOV) are copied;
- the `rates` extractor's tables of counts (`frozen_*`), which the new run counts from its own
  train split.

Everything else must have the same path and shape as in the source run (the same model and
sizes), else one ConfigError names the first parameter that differs. The optimizer state, the
step and the learning-rate schedule start afresh. The source run's dataset must still be where
its `dataset.json` says (its vocabularies give the raw ids). The row matching is one jitted
gather per table in the tables' own shardings, so sharded tables and multi-process runs need no
table on one host.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from influence_jax import checkpoint, engine, optim, scoring
from influence_jax.data.dataset import Dataset
from influence_jax.data.schema import NUM_RESERVED, Schema
from influence_jax.errors import ConfigError, DataError

TABLE_PREFIX = "embed_"


def table_vocab(key: str, schema: Schema) -> str | None:
    """The vocabulary of an embedding table's parameter name (`embed_item_id`,
    `embed_hist_item_id`), or None for any other parameter."""
    if not key.startswith(TABLE_PREFIX):
        return None
    name = key[len(TABLE_PREFIX) :]
    if name in schema.vocab_sizes:
        return name
    if name.startswith("hist_") and name[len("hist_") :] in schema.vocab_sizes:
        return name[len("hist_") :]
    return None


def row_sources(src: Dataset, dst: Dataset, vocab: str, src_rows: int, dst_rows: int):
    """(index [dst_rows] into the source table, found [dst_rows]): for each row of the new
    table, the source row of the same raw id; reserved rows map to themselves. A vocabulary
    without raw ids (behaviour types, time-gap buckets) maps row to row, at equal sizes."""
    idx = np.arange(dst_rows, dtype=np.int64)
    if not (src.id_maps.keyed(vocab) and dst.id_maps.keyed(vocab)):
        if src_rows != dst_rows:
            raise ConfigError(
                f"config.warm_start: vocabulary {vocab} has {src_rows} rows in the source run's "
                f"dataset and {dst_rows} in this one, and no raw ids to match them by"
            )
        return idx.astype(np.int32), np.ones(dst_rows, bool)
    raw, valid = dst.id_maps.raw(vocab, idx)
    at = np.full(dst_rows, -1, np.int64)
    if valid.any():
        raw = raw[valid]
        if src.id_maps.integer(vocab) and not dst.id_maps.integer(vocab):
            # Integer ids there, strings here (a column read another way): digits match.
            digits = np.array([str(x).lstrip("-").isdigit() for x in raw], bool)
            found_at = np.full(len(raw), -1, np.int64)
            if digits.any():
                found_at[digits] = src.id_maps.lookup(vocab, raw[digits].astype(np.int64))
            at[valid] = found_at
        else:
            if not src.id_maps.integer(vocab) and dst.id_maps.integer(vocab):
                raw = np.array([str(x) for x in raw], object)  # strings there
            at[valid] = src.id_maps.lookup(vocab, raw)
    at[:NUM_RESERVED] = idx[:NUM_RESERVED]
    found = (at >= 0) & (at < src_rows) & ((at >= NUM_RESERVED) | (idx < NUM_RESERVED))
    return np.where(found, at, 0).astype(np.int32), found


def _remap(table, source, at, found):
    return jnp.where(found[:, None], jnp.take(source, at, axis=0), table)


def warm_start(eng: engine.Engine, config: Any, dataset: Dataset) -> Any:
    """A state that has not trained yet (`eng.init_state`'s optimizer state, random key and
    step) around parameters from `config.warm_start.workdir` (module doc).

    Memory: beside the new parameters the devices hold one array of the source run at a time
    (checkpoint.ParamReader reads them one by one, the average alone where one is kept): each
    new table is donated to the gather that fills it, each source array freed once copied,
    and the optimizer's state is made after the copy.
    """
    ws = config.warm_start
    try:
        src_config, src_data = scoring.open_run(ws.workdir)
        src_eng = engine.setup(src_config, src_data.schema)
        reader = checkpoint.ParamReader(ws.workdir, src_eng.abstract_state, ws.step)
    except DataError as e:  # no such run or step, its dataset gone, a damaged checkpoint
        raise ConfigError(f"config.warm_start.workdir={ws.workdir}: {e}") from None
    try:
        return _copy(eng, dataset, reader, src_data, ws.workdir)
    except DataError as e:  # a damaged array of the checkpoint
        raise ConfigError(f"config.warm_start.workdir={ws.workdir}: {e}") from None
    finally:
        reader.close()


def _copy(
    eng: engine.Engine,
    dataset: Dataset,
    reader: checkpoint.ParamReader,
    src_data: Dataset,
    src_dir: str,
) -> Any:
    where = f"config.warm_start.workdir={src_dir} (step {reader.step})"
    if tuple(src_data.schema.behaviour_types) != tuple(dataset.schema.behaviour_types):
        raise ConfigError(
            f"{where}: its behaviour types {list(src_data.schema.behaviour_types)} are not this "
            f"dataset's {list(dataset.schema.behaviour_types)}"
        )
    src_names = set(reader.names())
    flat, treedef = jax.tree_util.tree_flatten_with_path(eng.init_params())
    shardings = jax.tree_util.tree_leaves(eng.param_shardings)
    missing = [jax.tree_util.keystr(p) for p, _ in flat if jax.tree_util.keystr(p) not in src_names]
    extra = sorted(src_names - {jax.tree_util.keystr(p) for p, _ in flat})
    if missing or extra:
        raise ConfigError(
            f"{where}: its model is not this config's (parameters only here: {missing[:3]}, "
            f"only there: {extra[:3]}); warm-start from a run of the same model"
        )
    out, matched = [], {}
    for (path, leaf), sh in zip(flat, shardings, strict=True):
        name, key = jax.tree_util.keystr(path), str(getattr(path[-1], "key", ""))
        if key.startswith(optim.FROZEN_PREFIX):
            out.append(leaf)  # counted from this run's train split (train.with_train_rates)
            continue
        source = reader.read(name)  # one array at a time: the source run is never whole here
        vocab = table_vocab(key, dataset.schema)
        same = source.shape[1:] == leaf.shape[1:] and source.dtype == leaf.dtype
        if not same or (vocab is None and source.shape != leaf.shape):
            raise ConfigError(
                f"{where}: parameter {name} is {source.dtype}{list(source.shape)} there and "
                f"{leaf.dtype}{list(leaf.shape)} in this config; warm-start from a run of the "
                "same model and sizes"
            )
        elif vocab is not None:
            at, found = row_sources(src_data, dataset, vocab, source.shape[0], leaf.shape[0])
            matched[name] = (int(found[NUM_RESERVED:].sum()), leaf.shape[0] - NUM_RESERVED)
            rows = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec())
            # The same host arrays on every process, placed without a transfer between them.
            at, found = (
                jax.make_array_from_callback(x.shape, rows, lambda i, x=x: x[i])
                for x in (at, found)
            )
            out.append(jax.jit(_remap, out_shardings=sh, donate_argnums=0)(leaf, source, at, found))
            source.delete()
        else:
            out.append(jax.device_put(source, sh))
    params = jax.tree_util.tree_unflatten(treedef, out)
    for name, (hit, total) in matched.items():
        logging.info("warm start: %s: %d of %d ids have the source run's rows", name, hit, total)
    logging.info("warm start from %s: %d parameters", where, len(out))
    # A moving average (config.opt.ema_decay) starts at them too, in buffers of its own.
    return eng.state_from(params)
