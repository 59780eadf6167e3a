"""Batch ranking from a checkpoint: restore parameters only, score (user, candidate) pairs with one
jitted, device-sharded function, keep the top k per user and write them atomically.

A user's context (user features and history) is the one data preparation built for the user's
most recent example in the chosen split (or, for users without one, in an earlier split; ties in
time go to the later row): the `max_len` most recent events strictly before that example's time,
so ranking reads exactly the histories training read. Candidate ids are raw ids, mapped through
the dataset's saved vocabularies (synthetic data has none: a raw id is its index minus 2).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
from absl import logging
from jax.sharding import Mesh

from influence_jax import sharding, train
from influence_jax.data import synthetic
from influence_jax.data.prepare import SPLITS, Vocab, positions
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, DataError, Schema
from influence_jax.data.store import ExampleStore
from influence_jax.models import build_model

BEST_FILE = "best.json"
NUM_EXPLAINED_EVENTS = 3


@dataclasses.dataclass
class Run:
    """A trained run ready to score: its config, data, model and restored parameters."""

    workdir: str
    config: ml_collections.ConfigDict
    schema: Schema
    data_path: str
    model: nn.Module
    params: Any
    step: int
    mesh: Mesh


def resolve_step(workdir: str, step: str | int, available: list[int]) -> int:
    """`step` ("latest", "best" or a number) -> a saved step; best comes from WORKDIR/best.json."""
    if not available:
        raise DataError(f"{workdir}/checkpoints: no checkpoints; train the run first")
    if str(step) == "latest":
        return max(available)
    if str(step) == "best":
        path = os.path.join(workdir, BEST_FILE)
        if not os.path.exists(path):
            logging.warning("%s not found: --step=best falls back to the latest step", path)
            return max(available)
        try:
            with open(path) as f:
                n = int(json.load(f)["step"])
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f'{path}: expected {{"step": N, ...}} ({e!r})') from None
    else:
        try:
            n = int(step)
        except ValueError:
            raise DataError(f"--step must be a number, best or latest; got {step!r}") from None
    if n not in available:
        raise DataError(f"{workdir}/checkpoints: no step {n}; saved steps are {available}")
    return n


def _data_path(config: Any, workdir: str, data: str | None) -> str:
    if data:
        return data
    if config.data.source == "synthetic":
        path = os.path.join(workdir, "data")
        try:
            Schema.load(path)
        except DataError:  # the workdir can regenerate its synthetic data
            synthetic.ensure(ml_collections.ConfigDict(config.data.synthetic.to_dict()), path)
        return path
    if not config.data.path or not os.path.isdir(config.data.path):
        raise DataError(
            f"{workdir}/config.json: data path {config.data.path!r} is not a folder; pass --data"
        )
    return config.data.path


def load_run(workdir: str, data: str | None = None, step: str | int = "latest") -> Run:
    """Builds the model from WORKDIR/config.json and the dataset schema; restores params only."""
    cfg_path = os.path.join(workdir, "config.json")
    if not os.path.exists(cfg_path):
        raise DataError(f"{cfg_path}: no such file; is {workdir!r} a training workdir?")
    with open(cfg_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    data_path = _data_path(config, workdir, data)
    schema = Schema.load(data_path)
    model = build_model(config.model, schema)
    mesh = sharding.make_mesh(config.mesh)
    init = lambda: model.init(jax.random.PRNGKey(0), train.dummy_batch(schema), train=False)
    shapes = jax.eval_shape(init)["params"]
    shard = sharding.tree_shardings(shapes, sharding.sharding_rules(config.mesh, shapes), mesh)
    abstract = {
        "params": jax.tree_util.tree_map(
            lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shard
        )
    }
    options = ocp.CheckpointManagerOptions(read_only=True, create=False, save_interval_steps=0)
    manager = ocp.CheckpointManager(
        os.path.join(os.path.abspath(workdir), "checkpoints"),
        options=options,
        item_names=("state",),
    )
    try:
        n = resolve_step(workdir, step, sorted(manager.all_steps()))
        # Partial restore: only the "params" subtree of the saved TrainState is read.
        args = ocp.args.PyTreeRestore(
            item=abstract,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
            partial_restore=True,
        )
        params = manager.restore(n, args=ocp.args.Composite(state=args))["state"]["params"]
    finally:
        manager.close()
    return Run(os.path.abspath(workdir), config, schema, data_path, model, params, n, mesh)


def param_shardings(params: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: x.sharding, params)


def make_score_fn(run: Run) -> Callable:
    """The jitted `score(params, batch) -> prob_B` (as the eval step), batch over `data`."""

    def score(params: Any, batch: dict[str, jax.Array]) -> jax.Array:
        logit_B, _ = run.model.apply({"params": params}, batch, train=False)
        return jax.nn.sigmoid(logit_B)

    batch_sh = sharding.batch_sharding(run.mesh)
    return jax.jit(
        score, in_shardings=(param_shardings(run.params), batch_sh), out_shardings=batch_sh
    )


def global_batch(run: Run, batch_size: int | None = None) -> int:
    """`batch_size` (default: the eval batch) rounded up to a multiple of the data axis."""
    n_data = math.lcm(run.mesh.shape[sharding.DATA], jax.process_count())
    size = int(batch_size or run.config.data.eval_batch_size)
    return max(n_data, -(-size // n_data) * n_data)


def batched(
    fn: Callable, run: Run, n: int, gather: Callable[[np.ndarray], dict], batch_size: int
) -> Any:
    """Runs `fn(params, batch)` over rows 0..n-1 in global batches; returns host arrays [n, ...].

    The last batch is padded with row 0 and the padding dropped. Each process gathers its slice
    of every global batch; batch t+1 is dispatched before batch t is fetched.
    """
    p, local = jax.process_index(), batch_size // jax.process_count()
    outs, pending = [], None
    fetch = lambda out: jax.tree_util.tree_map(sharding.to_host, out)
    for start in range(0, n, batch_size):
        idx = np.arange(start + p * local, start + (p + 1) * local)
        batch = gather(np.where(idx < n, idx, 0))
        out = fn(run.params, sharding.to_global(batch, run.mesh))
        if pending is not None:
            outs.append(fetch(pending))
        pending = out
    if pending is not None:
        outs.append(fetch(pending))
    if not outs:
        return None
    return jax.tree_util.tree_map(lambda *xs: np.concatenate(xs)[:n], *outs)


class IdMaps:
    """Raw ids <-> vocabulary indices of a prepared dataset (or of synthetic data: raw = id - 2)."""

    def __init__(self, data_path: str, schema: Schema):
        self.path, self.schema = data_path, schema
        self.synthetic = not os.path.isdir(os.path.join(data_path, "vocab"))
        self._vocabs: dict[str, Vocab] = {}

    def _vocab(self, name: str) -> Vocab:
        if name not in self._vocabs:
            self._vocabs[name] = Vocab.load(self.path, name)
        return self._vocabs[name]

    def integer(self, name: str) -> bool:
        """Whether raw ids of vocabulary `name` are integers."""
        return self.synthetic or isinstance(self._vocab(name).keys, np.ndarray)

    def lookup(self, name: str, raw: np.ndarray) -> np.ndarray:
        """Vocabulary index of each raw id; OOV_ID for unknown ones."""
        if not self.synthetic:
            return self._vocab(name).lookup(raw)
        raw = np.asarray(raw, np.int64)
        ok = (raw >= 0) & (raw < self.schema.vocab_sizes[name] - NUM_RESERVED)
        return np.where(ok, raw + NUM_RESERVED, OOV_ID).astype(np.int32)

    def raw(self, name: str, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(raw ids, valid) for indices; reserved ids (padding, OOV) are not valid."""
        idx = np.asarray(idx, np.int64)
        ok = idx >= NUM_RESERVED
        pos = np.where(ok, idx - NUM_RESERVED, 0)
        if self.synthetic:
            return pos, ok
        keys = self._vocab(name).keys
        if isinstance(keys, np.ndarray):
            return keys[pos] if len(keys) else pos, ok
        return np.asarray(keys.take(pa.array(pos)).to_pylist(), object), ok

    def user_keys(self, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(user_key, found) of raw user ids; user_key indexes every user of the dataset."""
        if self.synthetic:
            raw = np.asarray(raw, np.int64)
            return raw, (raw >= 0) & (raw < self.schema.vocab_sizes["user_id"] - NUM_RESERVED)
        return positions(self._vocab("user_key").keys, raw)

    def user_raw(self, keys: np.ndarray) -> np.ndarray:
        if self.synthetic:
            return np.asarray(keys, np.int64)
        ks = self._vocab("user_key").keys
        return (
            ks[keys] if isinstance(ks, np.ndarray) else np.asarray(ks.take(pa.array(keys)), object)
        )


@dataclasses.dataclass
class Contexts:
    """One row per user: user_key (sorted), user features, history and the example's time."""

    user_key: np.ndarray
    user: np.ndarray
    hist: np.ndarray
    timestamp: np.ndarray  # time of the example the context comes from (unix s)
    in_split: np.ndarray  # bool: the context comes from the chosen split itself

    def find(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row, found) of each user_key."""
        return positions(self.user_key, keys)


def load_contexts(data_path: str, schema: Schema, split: str) -> Contexts:
    """Each user's latest example in `split`, else in the splits before it (SPLITS order)."""
    order = list(SPLITS)
    splits = order[: order.index(split) + 1] if split in order else [split]
    stores = [ExampleStore(data_path, s, schema) for s in splits]
    keys, rows, src = [], [], []
    for si, store in enumerate(stores):
        uk, ts = store.column("user_key"), store.column("timestamp")
        o = np.lexsort((np.arange(len(uk)), ts, uk))
        last = o[np.r_[uk[o][1:] != uk[o][:-1], True]] if len(o) else o
        keys.append(uk[last]), rows.append(last), src.append(np.full(len(last), si))
    keys, rows, src = (np.concatenate(x).astype(np.int64) for x in (keys, rows, src))
    o = np.lexsort((src, keys))  # a user's context from the latest split wins
    keep = o[np.r_[keys[o][1:] != keys[o][:-1], True]] if len(o) else o
    keys, rows, src = keys[keep], rows[keep], src[keep]
    L, Fh = schema.max_len, len(schema.hist_fields)
    user = np.zeros((len(keys), len(schema.user_fields)), np.int32)
    hist, ts = np.zeros((len(keys), L, Fh), np.int32), np.zeros(len(keys), np.int64)
    for si, store in enumerate(stores):
        m = src == si
        g = store.gather(rows[m])
        user[m], hist[m], ts[m] = g["user"], g["hist"], g["timestamp"]
    return Contexts(keys, user, hist, ts, src == len(stores) - 1)


def item_rows(data_path: str, schema: Schema, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Feature rows [len(ids), Fi] of item_id indices, and which ones lack features.

    Rows come from the items of every split's examples; an item seen only in histories takes
    the item fields histories carry (e.g. category); anything else is OOV.
    """
    col = schema.item_index("item_id")
    out = np.full((len(ids), len(schema.item_fields)), OOV_ID, np.int32)
    out[:, col] = ids
    todo = ids >= NUM_RESERVED
    stores = [ExampleStore(data_path, s, schema) for s in schema.splits]
    for store in stores:
        item = store.column("item")
        known, first = np.unique(item[:, col], return_index=True)
        pos, found = positions(known, ids)
        hit = todo & found
        out[hit] = item[first[pos[hit]]]
        todo &= ~hit
    item_names = {g.name for g in schema.item_fields} - {"item_id"}
    shared = [
        (schema.item_index(f.name), j)
        for j, f in enumerate(schema.hist_fields)
        if f.name in item_names
    ]
    h_item = schema.hist_index("item_id")
    for store in stores:
        for a in range(0, len(store) if todo.any() and shared else 0, 1 << 15):
            hist = store.gather(np.arange(a, min(a + (1 << 15), len(store))))["hist"]
            flat = hist.reshape(-1, hist.shape[-1])
            known, first = np.unique(flat[:, h_item], return_index=True)
            pos, found = positions(known, ids)
            hit = todo & found
            for i, j in shared:
                out[hit, i] = flat[first[pos[hit]], j]
            todo &= ~hit
    return out, todo & (ids >= NUM_RESERVED)


@dataclasses.dataclass
class Candidates:
    """(user, item) pairs to score: each pair's context row and item row, and its raw ids."""

    ctx: Contexts
    items: np.ndarray  # [I, Fi] item feature rows
    ctx_row: np.ndarray  # [N] row of `ctx` per pair
    item_row: np.ndarray  # [N] row of `items` per pair
    user_out: np.ndarray  # [N] raw user id (output)
    item_out: np.ndarray  # [N] raw item id (output)
    counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.ctx_row)

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        c = self.ctx_row[rows]
        return {
            "user": self.ctx.user[c],
            "item": self.items[self.item_row[rows]],
            "hist": self.ctx.hist[c],
        }


def _parse_ids(values: pa.Array, integer: bool, path: str, lines: Callable, col: str):
    """String ids -> numpy (int64 when the vocabulary has integer ids); a bad one raises."""
    s = pc.utf8_trim_whitespace(values.cast(pa.string()))
    ok = pc.fill_null(pc.greater(pc.utf8_length(s), 0), False)
    if integer:
        ok = pc.and_(ok, pc.fill_null(pc.match_substring_regex(s, r"^[+-]?[0-9]{1,18}$"), False))
    ok = np.asarray(ok)
    if not ok.all():
        i = int(np.argmin(ok))
        what = "an integer id" if integer else "a non-empty id"
        raise DataError(f"{path}:{lines(i)}: {col} must be {what}, got {values[i].as_py()!r}")
    if integer:
        return np.asarray(pc.replace_substring_regex(s, r"^\+", "").cast(pa.int64()))
    return np.asarray(s.to_pylist(), object)


def read_candidate_ids(path: str, maps: IdMaps) -> tuple[np.ndarray, np.ndarray]:
    """(raw user ids, raw item ids) of a CSV (with a header line) or Parquet file.

    Blank CSV lines are skipped; any other malformed row raises a DataError naming its line.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such candidates file")
    cols, parquet = ["user_id", "item_id"], path.endswith((".parquet", ".pq"))
    skipped: list[int] = []
    try:
        if parquet:
            t = pq.read_table(path)
        else:
            t = pcsv.read_csv(
                path,
                read_options=pcsv.ReadOptions(use_threads=False),
                parse_options=pcsv.ParseOptions(
                    ignore_empty_lines=False,
                    invalid_row_handler=lambda row: skipped.append(row.number) or "skip",
                ),
                convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in cols}),
            )
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{path}: cannot read candidates ({e})") from None
    if skipped:
        raise DataError(f"{path}:{min(skipped)}: wrong number of fields; expected user_id,item_id")
    missing = [c for c in cols if c not in t.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {t.column_names}")
    u, i = (t.column(c).combine_chunks().cast(pa.string()) for c in cols)
    blank = np.asarray(pc.fill_null(pc.equal(pc.binary_join_element_wise(u, i, ""), ""), True))
    rows = np.flatnonzero(~blank) if not parquet else np.arange(t.num_rows)
    if not len(rows):
        raise DataError(f"{path}: no candidate rows")
    # Line of data row r: the header is line 1 and no line was skipped.
    lines = (lambda r: f"row {rows[r] + 1}") if parquet else (lambda r: rows[r] + 2)
    take = pa.array(rows)
    users = _parse_ids(u.take(take), maps.integer("user_key"), path, lines, "user_id")
    items = _parse_ids(i.take(take), maps.integer("item_id"), path, lines, "item_id")
    return users, items


def _candidates(
    run: Run, ctx: Contexts, ctx_row, item_idx, user_out, item_out, counts
) -> Candidates:
    ids, inverse = np.unique(item_idx, return_inverse=True)
    items, lacking = item_rows(run.data_path, run.schema, ids)
    counts["items_without_features"] = int(lacking.sum())
    return Candidates(ctx, items, ctx_row, inverse, user_out, item_out, counts)


def _add_contexts(ctx: Contexts, user: np.ndarray) -> Contexts:
    """`ctx` plus one context per row of `user` (features), with an empty history."""
    n = len(user)
    return Contexts(
        np.r_[ctx.user_key, np.full(n, -1)],
        np.concatenate([ctx.user, user]),
        np.concatenate([ctx.hist, np.zeros((n,) + ctx.hist.shape[1:], np.int32)]),
        np.r_[ctx.timestamp, np.zeros(n, np.int64)],
        np.r_[ctx.in_split, np.zeros(n, bool)],
    )


def file_candidates(run: Run, path: str, ctx: Contexts, maps: IdMaps) -> Candidates:
    """Pairs from a candidates file (repeats dropped); unknown ids go through the OOV ids."""
    user_raw, item_raw = read_candidate_ids(path, maps)
    n_in = len(user_raw)
    users, u_inv = np.unique(user_raw, return_inverse=True)
    _, i_inv = np.unique(item_raw, return_inverse=True)
    first = np.sort(np.unique(u_inv * (i_inv.max() + 1) + i_inv, return_index=True)[1])
    user_raw, item_raw, u_inv = user_raw[first], item_raw[first], u_inv[first]
    keys, known = maps.user_keys(users)
    pos, has_ctx = ctx.find(keys)
    has_ctx &= known
    # A user without a context: its user_id (OOV when unknown), other fields OOV, no history.
    extra = np.flatnonzero(~has_ctx)
    user = np.full((len(extra), len(run.schema.user_fields)), OOV_ID, np.int32)
    names = [f.name for f in run.schema.user_fields]
    if "user_id" in names:
        uid = maps.lookup("user_id", users[extra][known[extra]])
        user[known[extra], names.index("user_id")] = uid
    row = np.where(has_ctx, pos, 0)
    row[extra] = len(ctx.user_key) + np.arange(len(extra))
    item_idx = maps.lookup("item_id", item_raw)
    counts = {
        "candidate_rows": n_in,
        "duplicate_pairs": n_in - len(user_raw),
        "unknown_users": int((~known).sum()),
        "unknown_user_pairs": int((~known[u_inv]).sum()),
        "users_without_history": int((known & ~has_ctx).sum()),
        "unknown_items": len(np.unique(item_raw[item_idx == OOV_ID])),
        "unknown_item_pairs": int((item_idx == OOV_ID).sum()),
    }
    ctx = _add_contexts(ctx, user)
    return _candidates(run, ctx, row[u_inv], item_idx, user_raw, item_raw, counts)


def default_candidates(run: Run, ctx: Contexts, maps: IdMaps, max_items: int) -> Candidates:
    """Each user with an example in the chosen split x the `max_items` most frequent train items."""
    store = ExampleStore(run.data_path, "train", run.schema)
    ids = store.column("item")[:, run.schema.item_index("item_id")]
    ids, n = np.unique(ids[ids >= NUM_RESERVED], return_counts=True)
    top = np.sort(ids[np.lexsort((ids, -n))[:max_items]])
    users = np.flatnonzero(ctx.in_split)
    ctx_row, item_idx = np.repeat(users, len(top)), np.tile(top, len(users))
    counts = {"candidate_items": len(top), "train_items": len(ids)}
    user_out = maps.user_raw(ctx.user_key[ctx_row])
    item_out = maps.raw("item_id", item_idx)[0]
    return _candidates(run, ctx, ctx_row, item_idx, user_out, item_out, counts)


def top_k_rows(user: np.ndarray, item: np.ndarray, score: np.ndarray, k: int):
    """(rows, rank) of each user's k best: score descending, then item id ascending."""
    _, u = np.unique(user, return_inverse=True)
    _, i = np.unique(item, return_inverse=True)
    order = np.lexsort((i, -score.astype(np.float64), u))
    g = u[order]
    first = np.r_[True, g[1:] != g[:-1]] if len(g) else np.zeros(0, bool)
    rank = np.arange(len(g)) - np.maximum.accumulate(np.where(first, np.arange(len(g)), 0)) + 1
    keep = rank <= k
    return order[keep], rank[keep]


def write_table(table: pa.Table, path: str, fmt: str = "parquet") -> None:
    """Writes `table` as Parquet or CSV atomically: a temporary file, then a rename."""
    if fmt not in ("parquet", "csv"):
        raise DataError(f"--format must be parquet or csv, not {fmt!r}")
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp-", dir=folder)
    os.close(fd)
    try:
        if fmt == "parquet":
            pq.write_table(table, tmp)
        else:
            pcsv.write_csv(table, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rank(
    run: Run,
    output: str,
    top_k: int = 10,
    candidates: str | None = None,
    split: str = "test",
    explain: bool = False,
    fmt: str = "parquet",
    max_items: int = 1000,
    batch_size: int | None = None,
) -> dict[str, Any]:
    """Scores the candidates, writes each user's top k to `output`; returns a summary.

    Columns: user_id, rank (1 = best), item_id (raw ids), score (the model's probability, as in
    evaluation). Ties break by item id, ascending. With `explain` (logit units, see
    influence.py): behaviour_<type> (logit drop without that type's events), extractor_<name>
    (w_j f_j), event{1,2,3}_{item,behaviour,position,seconds_before,influence} (the events whose
    removal lowers the logit most; seconds_before is the lower bound of the time-gap bucket) and
    ranking_time (time of the example whose history is used; null for users without one).
    """
    if top_k < 1:
        raise DataError(f"--top_k must be at least 1, got {top_k}")
    t0 = time.perf_counter()
    maps = IdMaps(run.data_path, run.schema)
    ctx = load_contexts(run.data_path, run.schema, split)
    cands = (
        file_candidates(run, candidates, ctx, maps)
        if candidates
        else default_candidates(run, ctx, maps, max_items)
    )
    bs = global_batch(run, batch_size)
    t1 = time.perf_counter()
    prob = batched(make_score_fn(run), run, len(cands), cands.gather, bs)
    prob = np.zeros(0, np.float32) if prob is None else prob
    t_score = time.perf_counter() - t1
    rows, ranks = top_k_rows(cands.user_out, cands.item_out, prob, top_k)
    cols = {
        "user_id": pa.array(cands.user_out[rows].tolist()),
        "rank": pa.array(ranks, pa.int32()),
        "item_id": pa.array(cands.item_out[rows].tolist()),
        "score": pa.array(prob[rows], pa.float32()),
    }
    if explain:
        from influence_jax import influence  # influence builds on this module

        gather = lambda r: cands.gather(rows[r])
        cols.update(influence.explain_columns(run, len(rows), gather, maps))
        c = cands.ctx_row[rows]  # users without a context (user_key -1) have no ranking time
        cols["ranking_time"] = pa.array(cands.ctx.timestamp[c], mask=cands.ctx.user_key[c] < 0)
    if jax.process_index() == 0:
        write_table(pa.table(cols), output, fmt)
    return {
        "step": run.step,
        "users": len(np.unique(cands.user_out)) if len(cands) else 0,
        "pairs_scored": len(cands),
        "rows_written": len(rows),
        **cands.counts,
        "seconds": round(time.perf_counter() - t0, 2),
        "candidates_per_s": round(len(cands) / max(t_score, 1e-9), 1),
    }


def benchmark_scoring(run_or_workdir: Run | str, batch: int | None = None, n: int = 20) -> float:
    """Candidates scored per second by the ranking path (gather, transfer, jitted score, fetch).

    Args:
      run_or_workdir: a loaded `Run` or a training workdir (its latest checkpoint).
      batch: global batch (default: the run's eval batch); n: batches timed after a warm-up.
    """
    run = load_run(run_or_workdir) if isinstance(run_or_workdir, str) else run_or_workdir
    bs = global_batch(run, batch)
    store = ExampleStore(run.data_path, "train", run.schema)
    ex = store.gather(np.arange(bs) % max(len(store), 1))
    gather = lambda rows: {k: ex[k][rows % bs] for k in ("user", "item", "hist")}
    fn = make_score_fn(run)
    jax.block_until_ready(batched(fn, run, bs, gather, bs))  # compile
    t0 = time.perf_counter()
    batched(fn, run, bs * n, gather, bs)
    return bs * n / (time.perf_counter() - t0)
