"""Row-sparse embedding updates: a train step reads and writes only the table rows it looks up.

Dense Adam over a 10M-row table rewrites every row every step. Here each large table
(`embeddings/embed_<vocab>` with at least `min_rows` rows) is handled apart from the optax
chain: the step gathers the rows its batch uses into a small "virtual" table, remaps the
batch's ids to positions in it (keeping the reserved ids 0 and 1 at positions 0 and 1, so
padding and OOV tests in the model still hold), differentiates with respect to those rows
only, and applies row-wise Adagrad (one accumulator per row, as in TorchRec) with scatter-adds.
Cost per step: O(ids in the batch), whatever the vocabulary.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from influence_jax.data.schema import NUM_RESERVED, OOV_ID, RAW_IDS, Schema

GROUPS = ("user", "item", "hist")


def sparse_vocabs(schema: Schema, params: Any, min_rows: int) -> tuple[str, ...]:
    """Vocabularies whose shared embedding table has at least `min_rows` rows."""
    tables = params.get("embeddings", {}) if hasattr(params, "get") else {}
    return tuple(
        v for v in schema.vocab_sizes
        if f"embed_{v}" in tables and tables[f"embed_{v}"].shape[0] >= min_rows
    )  # fmt: skip


def _columns(schema: Schema, vocab: str) -> list[tuple[str, int]]:
    fields = {"user": schema.user_fields, "item": schema.item_fields, "hist": schema.hist_fields}
    return [(g, j) for g in GROUPS for j, f in enumerate(fields[g]) if f.vocab == vocab]


def gather_rows(
    params: Any, batch: dict[str, jax.Array], schema: Schema, vocabs: tuple[str, ...]
) -> tuple[Any, dict[str, jax.Array], dict[str, Any]]:
    """Replaces each sparse table by the rows the batch uses; remaps the batch's ids to them.

    Returns:
      (params with virtual tables, remapped batch, per vocabulary {"ids": row ids [N],
      "valid": [N] bool}); positions past the number of distinct ids repeat a real id and
      are marked invalid.
    """
    params = jax.tree_util.tree_map(lambda x: x, params)  # shallow copy of the containers
    # Per-id tables other than the embeddings (models.extractors.TrainRates) read the ids as
    # they were.
    batch = dict(batch, **{RAW_IDS[g]: batch[g] for g in ("user", "item")})
    rows = {}
    for v in vocabs:
        cols = _columns(schema, v)
        flat = [batch[g][..., j].reshape(-1) for g, j in cols]
        reserved = jnp.arange(NUM_RESERVED, dtype=flat[0].dtype)
        ids = jnp.concatenate([reserved, *flat])
        uniq, inverse = jnp.unique(ids, size=ids.shape[0], return_inverse=True)
        # `uniq` rises strictly over the distinct ids, then repeats the smallest id as filler.
        distinct = 1 + jnp.sum(uniq[1:] > uniq[:-1])
        valid = jnp.arange(ids.shape[0]) < distinct
        inverse = inverse.reshape(-1).astype(jnp.int32)
        offset = NUM_RESERVED
        for (g, j), col in zip(cols, flat, strict=True):
            new = inverse[offset : offset + col.shape[0]].reshape(batch[g][..., j].shape)
            batch[g] = jnp.asarray(batch[g]).at[..., j].set(new)
            offset += col.shape[0]
        table = params["embeddings"][f"embed_{v}"]
        collapsed = schema.table_rows(v) < schema.vocab_sizes[v]
        if collapsed:
            # Ids after the training period keep their own positions (exact matches see
            # them) but read and update the OOV row; their updates add up there.
            uniq = jnp.where(uniq < table.shape[0], uniq, OOV_ID)
        params["embeddings"][f"embed_{v}"] = jnp.take(table, uniq, axis=0)
        rows[v] = {"ids": uniq, "valid": valid, "distinct": not collapsed}
    return params, batch, rows


def init_state(params: Any, vocabs: tuple[str, ...], initial: float = 0.1) -> dict[str, Any]:
    """Row-wise Adagrad accumulators, shaped [V, 1] so row-sharding rules apply to them."""
    return {
        f"embed_{v}": jnp.full((params["embeddings"][f"embed_{v}"].shape[0], 1), initial)
        for v in vocabs
    }


def rowwise_adagrad(
    params: Any,
    grads: Any,
    rows: dict[str, Any],
    state: dict[str, Any],
    lr: jax.Array,
    eps: float = 1e-8,
) -> tuple[Any, dict[str, Any]]:
    """Applies row-wise Adagrad to the rows in `rows`; returns (params, state).

    `grads` holds the virtual tables' gradients ([N, D] per sparse vocabulary).
    """
    params = jax.tree_util.tree_map(lambda x: x, params)
    state = dict(state)
    for v, r in rows.items():
        name = f"embed_{v}"
        g_NxD = jnp.where(r["valid"][:, None], grads["embeddings"][name], 0.0)
        sq_Nx1 = jnp.mean(jnp.square(g_NxD), axis=1, keepdims=True)
        acc_Nx1 = jnp.take(state[name], r["ids"], axis=0) + sq_Nx1
        step_NxD = -lr * g_NxD / (jnp.sqrt(acc_Nx1) + eps)
        table = params["embeddings"][name]
        if r.get("distinct", False):
            # Valid rows are distinct: write each updated row once (no atomic adds; the same
            # numbers as adding the step); invalid positions go past the end and are dropped.
            ids = jnp.where(r["valid"], r["ids"], table.shape[0])
            rows_NxD = jnp.take(table, r["ids"], axis=0) + step_NxD
            params["embeddings"][name] = table.at[ids].set(rows_NxD, mode="drop")
            state[name] = state[name].at[ids].set(acc_Nx1, mode="drop")
        else:
            # Invalid positions carry zero gradient, hence zero update and zero accumulator
            # change, so their duplicated row ids add nothing; collapsed ids add up.
            params["embeddings"][name] = table.at[r["ids"]].add(step_NxD)
            state[name] = state[name].at[r["ids"]].add(sq_Nx1)
    return params, state


def without(params: Any, vocabs: tuple[str, ...]) -> Any:
    """`params` minus the sparse tables (what the dense optax chain sees)."""
    out = jax.tree_util.tree_map(lambda x: x, params)
    for v in vocabs:
        del out["embeddings"][f"embed_{v}"]
    return out


def merge(dense: Any, tables: dict[str, jax.Array]) -> Any:
    """Puts sparse tables back into a params tree that lacks them."""
    out = jax.tree_util.tree_map(lambda x: x, dense)
    out["embeddings"].update(tables)
    return out


def init_opt_state(tx: Any, params: Any, vocabs: tuple[str, ...]) -> dict[str, Any]:
    """Optimizer state: the optax chain over the dense params, row-wise Adagrad for the rest."""
    return {"dense": tx.init(without(params, vocabs)), "sparse": init_state(params, vocabs)}


def make_train_step(
    tx: Any,
    lr_schedule: Any,
    schema: Schema,
    vocabs: tuple[str, ...],
    training_grads: Any,
    sparse_lr: float,
    ema_decay: float = 0.0,
):
    """`train_step(state, batch) -> (state, metrics)` with row-sparse updates of `vocabs`.

    Same contract as engine.make_train_step; `state.opt_state` is `init_opt_state`'s layout;
    a state's `ema` averages the dense parameters only (the large tables are not averaged).
    `training_grads(params, batch, dropout_rng) -> (gradients, sums)` differentiates the
    batch's mean training loss (engine.training_grads).
    """
    import optax

    from influence_jax import optim

    def train_step(state: Any, batch: dict[str, jax.Array]):
        dropout_rng = jax.random.fold_in(state.rng, state.step)
        vparams, vbatch, rows = gather_rows(state.params, batch, schema, vocabs)
        grads, sums = training_grads(vparams, vbatch, dropout_rng)
        dense_params = without(state.params, vocabs)
        dense_grads = without(grads, vocabs)
        updates, dense_state = tx.update(dense_grads, state.opt_state["dense"], dense_params)
        dense_params = optax.apply_updates(dense_params, updates)
        ema = state.ema
        if ema is not None:
            ema = optim.update_average(ema, dense_params, state.step, ema_decay)
        tables = {f"embed_{v}": state.params["embeddings"][f"embed_{v}"] for v in vocabs}
        params, sparse_state = rowwise_adagrad(
            merge(dense_params, tables), grads, rows, state.opt_state["sparse"], sparse_lr
        )
        out = dict(
            sums,
            grad_norm=optax.tree_utils.tree_norm(dense_grads),
            learning_rate=lr_schedule(state.step),
        )
        opt_state = {"dense": dense_state, "sparse": sparse_state}
        state = state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema=ema)
        return state, out

    return train_step
