"""The learned candidate source: a two-tower retriever trained by the engine.

User tower: the user's fields and the mean of their history events' embeddings (item id,
category and behaviour of each event, summed), through a two-layer MLP, L2-normalised. Item
tower: the item's fields through its own MLP, L2-normalised. Both share the embedding tables
(`models.layers.Embeddings`), so an item seen in histories and as a candidate has one row.

Training pairs (the user and their history before an event, the event's item) come by default
from every user's history as of a cut (`as_of`, the ranking state: events strictly before it):
each event with the events before it, so views, carts and purchases all teach the retriever;
`pairs="examples"` takes the train split's real interactions instead (its targets, sampled
negatives left out). A retriever trained on histories as of a cut refuses to retrieve as of an
earlier one (it has seen what came after). The loss is the in-batch sampled
softmax: each user's own item against the other items of the batch, logits u.v / temperature
minus log Q(item) (logQ correction: Q is the item's share of the training pairs, the rate at
which it turns up as an in-batch negative, so popular items are not pushed down merely for
being sampled often); other rows with the same item are masked out. Steps are jitted, the batch
split over every device, and each row's negatives are the other rows on its device (batch /
devices of them), so a step's only cross-device traffic is the gradients' all-reduce.

Retrieval scores every item of the embedding table (ids below table_rows, so known at the cut)
against each user and keeps the exact top k: items are sharded over the devices, each device
takes its own top k of u.V_shard and the per-device winners are gathered and cut to k
(`sharded_top_k`). Parameters are an Orbax checkpoint in WORKDIR/params with WORKDIR/meta.json.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from influence_jax import files
from influence_jax.data import rank_state
from influence_jax.data.schema import HIST_BEHAVIOUR, NUM_RESERVED, DataError, Schema
from influence_jax.data.store import ExampleStore
from influence_jax.models.layers import Embeddings
from influence_jax.retrieval.histories import Histories
from influence_jax.retrieval.retriever import TwoTowerConfig  # settings: a light module

AXIS = "shards"  # the one mesh axis: batch rows when training, items when retrieving
META = "meta.json"
NEG = -1e9


class TwoTower(nn.Module):
    schema: Schema
    dim: int
    hidden: int

    def setup(self):
        self.emb = Embeddings(self.schema, self.dim, skip=("time_gap",))
        self.user_layers = (nn.Dense(self.hidden), nn.Dense(self.dim))
        self.item_layers = (nn.Dense(self.hidden), nn.Dense(self.dim))

    def user(self, user: jax.Array, hist: jax.Array) -> jax.Array:
        """[B, Fu], [B, L, Fh] -> [B, dim] unit vectors."""
        s = self.schema
        kept = [j for j, f in enumerate(s.hist_fields) if f.name != "time_gap"]
        mask = (hist[..., s.hist_index(HIST_BEHAVIOUR)] != 0)[..., None].astype(jnp.float32)
        ev = self.emb(hist[..., kept], [s.hist_fields[j] for j in kept], hist=True).sum(-2)
        pooled = (ev * mask).sum(1) / jnp.maximum(mask.sum(1), 1.0)
        u = self.emb(user, s.user_fields).reshape(user.shape[0], -1)
        return _tower(self.user_layers, jnp.concatenate([u, pooled], -1))

    def item(self, item: jax.Array) -> jax.Array:
        """[B, Fi] -> [B, dim] unit vectors."""
        e = self.emb(item, self.schema.item_fields).reshape(item.shape[0], -1)
        return _tower(self.item_layers, e)

    def __call__(self, user, hist, item):
        return self.user(user, hist), self.item(item)


def _tower(layers, x: jax.Array) -> jax.Array:
    x = layers[1](nn.relu(layers[0](x)))
    return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-6)


def in_batch_loss(
    u_BxD: jax.Array,
    v_BxD: jax.Array,
    item_B: jax.Array,
    log_q_B: jax.Array | None,
    temperature: float,
    groups: int = 1,
) -> jax.Array:
    """Sampled softmax over the batch's items: row b's positive is item b, its negatives the
    other rows' items of its group (the batch cut into `groups` runs of consecutive rows, one per
    device, so no device needs another's vectors); rows with the same item are masked out;
    logits u.v / temperature - log Q."""
    B, D = u_BxD.shape
    g, n = groups, B // groups
    u, v, item = u_BxD.reshape(g, n, D), v_BxD.reshape(g, n, D), item_B.reshape(g, n)
    logits = jnp.einsum("gbd,gcd->gbc", u, v) / temperature
    if log_q_B is not None:
        logits = logits - log_q_B.reshape(g, 1, n)
    same = item[:, :, None] == item[:, None, :]
    logits = jnp.where(same & ~jnp.eye(n, dtype=bool)[None], NEG, logits)
    diag = jnp.diagonal(logits, axis1=1, axis2=2)
    return jnp.mean(jax.nn.logsumexp(logits, axis=2) - diag)


def interactions(store: ExampleStore) -> np.ndarray:
    """Rows of the split that are real interactions (not sampled negatives)."""
    side = os.path.join(store.root, "audit", store.split, "sampled.npy")
    if os.path.exists(side):
        return np.flatnonzero(np.load(side) == 0)
    return np.flatnonzero(np.asarray(store.column("label")) > 0.5)


def _embedded(item: np.ndarray, schema: Schema) -> np.ndarray:
    """Items with their own embedding row: not padding or OOV, not first seen after the training
    period (those embed as OOV; a pair of them teaches nothing)."""
    return (item >= NUM_RESERVED) & (item < schema.table_rows("item_id"))


class ExamplePairs:
    """Training pairs from the examples of the train split that are real interactions (of
    items with an embedding row, as in HistoryPairs)."""

    def __init__(self, data_path: str, schema: Schema):
        self.store = ExampleStore(data_path, "train", schema)
        rows = interactions(self.store)
        item = np.asarray(self.store.column("item"))[rows, schema.item_index("item_id")]
        known = _embedded(item, schema)
        self.rows, self.items = rows[known], item[known].astype(np.int64)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        b = self.store.gather(self.rows[np.sort(idx)])
        return b["user"], b["hist"], b["item"]


class HistoryPairs:
    """Training pairs from every user's history as of a cut (rank_state/<cut>): each event of
    the history (but the oldest) with the events before it as its history, so every kind of
    event before the cut teaches the retriever, not only the examples' targets."""

    def __init__(self, data_path: str, schema: Schema, cut: str):
        if not rank_state.available(data_path):
            raise DataError(f"{data_path}: no rank_state/; use --pairs=examples")
        st = rank_state.load_state(data_path, schema, cut)
        self.user, self.hist = np.asarray(st.user), np.asarray(st.hist)
        self.features = rank_state.load_item_features(data_path)
        filled = self.hist[..., schema.hist_index(HIST_BEHAVIOUR)] != 0  # [U, L]
        n = filled.sum(1)
        # Pair (u, i): event i of user u (0 = most recent) with events i+1.. as its history.
        self.u = np.repeat(np.arange(len(n)), np.maximum(n - 1, 0))
        starts = np.cumsum(np.maximum(n - 1, 0)) - np.maximum(n - 1, 0)
        self.i = np.arange(len(self.u)) - np.repeat(starts, np.maximum(n - 1, 0))
        col = schema.hist_index("item_id")
        self.items = self.hist[self.u, self.i, col].astype(np.int64)
        known = _embedded(self.items, schema)
        self.u, self.i, self.items = self.u[known], self.i[known], self.items[known]

    def __len__(self) -> int:
        return len(self.u)

    def batch(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u, i = self.u[idx], self.i[idx]
        L = self.hist.shape[1]
        slot = i[:, None] + 1 + np.arange(L)  # the older events, moved to the front
        ok = slot < L
        hist = self.hist[u[:, None], np.minimum(slot, L - 1)] * ok[..., None]
        return self.user[u], hist.astype(np.int32), self.features[self.items[idx]]


def _mesh() -> Mesh:
    return Mesh(np.asarray(jax.devices()), (AXIS,))


def train(
    data_path: str,
    schema: Schema,
    cfg: TwoTowerConfig,
    log: Callable[[str], None] = print,
    progress_every: float = 10.0,
) -> tuple[dict, dict]:
    """Trains on `cfg.pairs` (see TwoTowerConfig); returns (params, stats)."""
    if jax.process_count() > 1:
        raise DataError("the two-tower retriever trains in one process (any number of devices)")
    if cfg.pairs == "examples":
        pairs = ExamplePairs(data_path, schema)
    elif cfg.pairs == "histories":
        pairs = HistoryPairs(data_path, schema, cfg.as_of)
    else:
        raise DataError(f"--pairs must be histories or examples, not {cfg.pairs!r}")
    if len(pairs) < 2:
        raise DataError(f"{data_path}: {len(pairs)} training pairs ({cfg.pairs}); need 2+")
    item_col = schema.item_index("item_id")
    counts = np.bincount(pairs.items, minlength=schema.vocab_sizes["item_id"]).astype(np.float64)
    log_q = np.log(np.maximum(counts, 0.5) / counts.sum()).astype(np.float32)
    mesh = _mesh()
    n_dev = mesh.devices.size
    batch = max(n_dev, cfg.batch_size // n_dev * n_dev)
    model = TwoTower(schema, cfg.dim, cfg.hidden)
    params = model.init(jax.random.key(cfg.seed), *pairs.batch(np.arange(2)))
    tx = optax.adam(cfg.learning_rate)
    repl, split = NamedSharding(mesh, P()), NamedSharding(mesh, P(AXIS))
    params = jax.device_put(params, repl)
    opt = jax.device_put(tx.init(params), repl)
    log_q_dev = jax.device_put(log_q, repl)

    @partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt, user, hist, item):
        def loss_fn(p):
            u, v = model.apply(p, user, hist, item)
            iid = item[:, item_col]
            lq = log_q_dev[iid] if cfg.log_q else None
            return in_batch_loss(u, v, iid, lq, cfg.temperature, groups=n_dev)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    rng = np.random.default_rng(cfg.seed)
    t0 = last = time.perf_counter()
    losses = []
    for s in range(1, cfg.steps + 1):
        idx = rng.choice(len(pairs), batch, replace=len(pairs) < batch)
        args = [jax.device_put(x, split) for x in pairs.batch(idx)]
        params, opt, loss = step(params, opt, *args)
        # One step at a time: queued steps' cross-device gathers can starve each other of
        # threads on a small CPU host with many (fake) devices.
        loss = float(loss)
        now = time.perf_counter()
        if s == cfg.steps or now - last >= progress_every or s == 1:
            losses.append((s, loss))
            rate = s * batch / max(now - t0, 1e-9)
            eta = (cfg.steps - s) * batch / rate
            log(f"two-tower step {s}/{cfg.steps} loss={loss:.4f} {rate:,.0f} ex/s "
                f"ETA {eta:.0f} s")  # fmt: skip
            last = now
    stats = {
        "pairs": int(len(pairs)),
        "items_trained": int((counts > 0).sum()),
        "batch_size": batch,
        "devices": int(n_dev),
        "losses": losses,
        "seconds": round(time.perf_counter() - t0, 1),
    }
    return jax.device_get(params), stats


def save(workdir: str, params: dict, cfg: TwoTowerConfig, schema: Schema, data_path: str,
         stats: dict) -> None:  # fmt: skip
    """WORKDIR/params (Orbax) and WORKDIR/meta.json, put in place together."""
    with files.atomic_folder(workdir) as tmp:
        ckpt = ocp.StandardCheckpointer()
        ckpt.save(os.path.join(tmp, "params"), params)
        ckpt.wait_until_finished()
        meta = {
            "config": dataclasses.asdict(cfg),
            "data": os.path.abspath(data_path),
            "schema_name": schema.name,
            "vocab_sizes": schema.vocab_sizes,
            "stats": stats,
        }
        files.write_json(os.path.join(tmp, META), meta)


def load(workdir: str, schema: Schema) -> tuple[TwoTower, dict, TwoTowerConfig]:
    """(model, params, config) of a saved retriever; its vocabularies must be the schema's."""
    path = os.path.join(workdir, META)
    meta = files.read_json(path)
    if meta is None:
        raise DataError(f"{path}: missing; train a retriever with tools/train_retriever.py")
    if meta["vocab_sizes"] != schema.vocab_sizes:
        raise DataError(
            f"{workdir}: the retriever was trained on {meta['data']} (vocabularies "
            f"{meta['vocab_sizes']}), not on this dataset ({schema.vocab_sizes})"
        )
    cfg = TwoTowerConfig(**meta["config"])
    model = TwoTower(schema, cfg.dim, cfg.hidden)
    L, fu, fi, fh = (schema.max_len, len(schema.user_fields), len(schema.item_fields),
                     len(schema.hist_fields))  # fmt: skip
    z = lambda *shape: jnp.zeros(shape, jnp.int32)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0), z(1, fu), z(1, L, fh), z(1, fi))
    )
    params = ocp.StandardCheckpointer().restore(os.path.abspath(os.path.join(workdir, "params")),
                                                abstract)  # fmt: skip
    return model, params, cfg


def sharded_top_k(mesh: Mesh, k: int) -> Callable:
    """jit f(u [U, D], v [I, D], ids [I]) -> (scores [U, k], ids [U, k]): the exact top k of
    u.v^T over the items, with items (I a multiple of the mesh size) sharded over the devices:
    each device keeps the top k of its shard, then the winners of all shards are cut to k.
    Items whose id is below NUM_RESERVED (padding) never win."""

    def local(u, v, ids):
        s = jnp.where(ids[None, :] >= NUM_RESERVED, u @ v.T, -jnp.inf)
        top, at = jax.lax.top_k(s, min(k, v.shape[0]))
        got = ids[at]
        top = jax.lax.all_gather(top, AXIS, axis=1, tiled=True)
        got = jax.lax.all_gather(got, AXIS, axis=1, tiled=True)
        best, pos = jax.lax.top_k(top, k)
        return best, jnp.take_along_axis(got, pos, axis=1)

    f = jax.shard_map(
        local, mesh=mesh, in_specs=(P(), P(AXIS), P(AXIS)), out_specs=(P(), P()), check_vma=False
    )
    return jax.jit(f)


class TwoTowerSource:
    """The learned source of `Retriever`: each user's top m items by the two towers.

    Args:
      workdir: a retriever saved by `save` (tools/train_retriever.py).
      data_path, schema: the dataset whose users and items it retrieves for (its ranking
        state gives the users' fields; its item table the candidates).
    """

    def __init__(self, workdir: str, data_path: str, schema: Schema, users_per_call: int = 4096):
        self.schema = schema
        self.model, self.params, self.cfg = load(workdir, schema)
        self.users_per_call = users_per_call
        self.mesh = _mesh()
        feats = rank_state.load_item_features(data_path)
        ids = np.arange(NUM_RESERVED, schema.table_rows("item_id"), dtype=np.int32)
        n_dev = self.mesh.devices.size
        pad = -len(ids) % n_dev
        self.ids = np.concatenate([ids, np.zeros(pad, np.int32)])  # id 0 never wins
        item_fn = jax.jit(lambda p, x: self.model.apply(p, x, method=TwoTower.item))
        self.v = np.concatenate(
            [np.asarray(item_fn(self.params, feats[self.ids[a : a + 8192]]))
             for a in range(0, len(self.ids), 8192)]
        )  # fmt: skip
        self._user_fn = jax.jit(lambda p, u, h: self.model.apply(p, u, h, method=TwoTower.user))
        sh = NamedSharding(self.mesh, P(AXIS))
        self._v = jax.device_put(self.v, sh)
        self._ids = jax.device_put(self.ids, sh)
        self._top: dict[int, Callable] = {}
        self._users = None  # (sorted user_key, user fields) of every user with an event
        if rank_state.available(data_path):
            state = rank_state.load_state(data_path, schema, "end")
            self._users = (np.asarray(state.user_key), np.asarray(state.user))

    def _inputs(self, part: Histories) -> tuple[np.ndarray, np.ndarray]:
        s = self.schema
        U, L = part.item.shape
        user = np.zeros((U, len(s.user_fields)), np.int32)
        if self._users is not None:
            keys, rows = self._users
            at = np.searchsorted(keys, part.user_key)
            ok = (at < len(keys)) & (keys[np.minimum(at, len(keys) - 1)] == part.user_key)
            user[ok] = rows[at[ok]]
        hist = np.zeros((U, L, len(s.hist_fields)), np.int32)
        hist[..., s.hist_index("item_id")] = part.item
        hist[..., s.hist_index(HIST_BEHAVIOUR)] = np.where(
            part.beh >= 0, part.beh + NUM_RESERVED, 0
        )
        if part.category is not None and "category" in [f.name for f in s.hist_fields]:
            hist[..., s.hist_index("category")] = part.category
        return user, hist

    def lists(self, part: Histories, m: int) -> np.ndarray:
        """[U, m] int32 item ids, best first."""
        order = {c: k for k, c in enumerate(rank_state.CUTS)}
        if (self.cfg.pairs == "histories" and part.cut in order
                and order[part.cut] < order[self.cfg.as_of]):  # fmt: skip
            raise DataError(
                f"the two-tower retriever learned from the histories as of {self.cfg.as_of}; "
                f"retrieving as of {part.cut} would use events after that cut (train it with "
                f"--as_of={part.cut})"
            )
        m = min(m, int((self.ids >= NUM_RESERVED).sum()))
        if m not in self._top:
            self._top[m] = sharded_top_k(self.mesh, m)
        user, hist = self._inputs(part)
        out = []
        for a in range(0, len(user), self.users_per_call):
            u = self._user_fn(self.params, user[a : a + self.users_per_call],
                              hist[a : a + self.users_per_call])  # fmt: skip
            _, ids = self._top[m](u, self._v, self._ids)
            out.append(np.asarray(ids, np.int32))
        return np.concatenate(out) if out else np.zeros((0, m), np.int32)
