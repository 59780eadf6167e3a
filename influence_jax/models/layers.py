"""Building blocks shared by the extractors: per-vocabulary embeddings and masked Conv1D towers."""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from influence_jax.data.schema import HIST_BEHAVIOUR, OOV_ID, PAD_ID, Field, Schema

NEG_INF = -1e9


def history_mask(hist_BxLxF: jax.Array, schema: Schema) -> jax.Array:
    """True where a history position holds an event (its behaviour id is not padding)."""
    return hist_BxLxF[..., schema.hist_index(HIST_BEHAVIOUR)] != PAD_ID


class Embeddings(nn.Module):
    """One embedding table per vocabulary of the schema, looked up field by field.

    Tables are named `embed_<vocab>` so sharding rules and reports can find them by path.
    When `share_item` is False, history fields get their own tables (`embed_hist_<vocab>`).
    """

    schema: Schema
    dim: int
    share_item: bool = True
    skip: tuple[str, ...] = ()  # vocabularies the model never looks up (no table is made)

    def setup(self):
        self.tables = {
            v: self._table(f"embed_{v}", self.schema.table_rows(v))
            for v in self.schema.vocab_sizes
            if v not in self.skip
        }
        if not self.share_item:
            self.hist_tables = {
                f.vocab: self._table(f"embed_hist_{f.vocab}", self.schema.table_rows(f.vocab))
                for f in self.schema.hist_fields
                if f.vocab not in self.skip
            }

    def _table(self, name: str, rows: int) -> jax.Array:
        # A plain "params" variable rather than self.param: the sparse train step passes a
        # table holding only the rows a batch uses, which self.param's shape check would refuse.
        init = nn.initializers.normal(stddev=0.05)
        return self.variable(
            "params", name, lambda: init(self.make_rng("params"), (rows, self.dim))
        ).value

    def lookup(self, ids: jax.Array, fields: Sequence[Field], hist: bool = False) -> jax.Array:
        """ids [..., F] -> embeddings [..., S, D], one table per field's vocabulary.

        S = F, except that the slots of a multi-valued field (the fields sharing one `bag`)
        pool into one embedding, the mean over its non-padding ids (zeros when it has none),
        at the position of its first slot.
        """
        return jnp.stack(self.lookup_parts(ids, fields, hist), axis=-2)

    def lookup_parts(
        self, ids: jax.Array, fields: Sequence[Field], hist: bool = False
    ) -> list[jax.Array]:
        """`lookup`'s S embeddings [..., D] as a list, not stacked."""
        tables = self.hist_tables if hist and not self.share_item else self.tables
        out, bags = [], {}
        for j, f in enumerate(fields):
            table, ids_j = tables[f.vocab], ids[..., j]
            if self.schema.table_rows(f.vocab) < self.schema.vocab_sizes[f.vocab]:
                # Ids first seen after the training period have no row: they embed as OOV.
                # (Under row-sparse training `table` holds only the batch's rows and the ids
                # are positions in it, all below its size.)
                ids_j = jnp.where(ids_j < table.shape[0], ids_j, OOV_ID)
            e = jnp.take(table, ids_j, axis=0)
            if not f.bag:
                out.append(e)
                continue
            if f.bag not in bags:
                bags[f.bag] = len(out)
                out.append([])
            out[bags[f.bag]].append((e, ids[..., j] != PAD_ID))
        for k in bags.values():
            e = jnp.stack([e for e, _ in out[k]], -2)
            m = jnp.stack([m for _, m in out[k]], -1).astype(e.dtype)
            out[k] = jnp.einsum("...kd,...k->...d", e, m) / jnp.maximum(m.sum(-1), 1.0)[..., None]
        return out

    def __call__(self, ids: jax.Array, fields: Sequence[Field], hist: bool = False) -> jax.Array:
        return self.lookup(ids, fields, hist)


def take_small(table_N: jax.Array, ids: jax.Array) -> jax.Array:
    """`table_N[ids]` for a table of a few entries, as a chain of selects (ids in [0, N)).

    XLA:CPU's gather is slow for this: the behaviour gates' [B, L] lookup (6 entries) took
    about 1.2 ms of the default ranker's 22 ms at batch 1024 on a family-23 EPYC, while N
    selects fuse into the ops that read the result (about 4.5 % faster ranking there). Same
    values and gradients as the gather.
    """
    out = jnp.zeros(ids.shape, table_N.dtype)
    for k in range(table_N.shape[0]):
        out = jnp.where(ids == k, table_N[k], out)
    return out


def masked_max(x_BxTxC: jax.Array, mask_BxT: jax.Array) -> jax.Array:
    """Max over valid positions; an all-padding row pools to zeros, not to -inf."""
    pooled = jnp.max(jnp.where(mask_BxT[..., None], x_BxTxC, NEG_INF), axis=1)
    return jnp.where(jnp.any(mask_BxT, axis=1)[:, None], pooled, 0.0)


class ConvTower(nn.Module):
    """Conv1D ('SAME', relu) over a sequence, then max-pool over valid positions.

    Padded positions are zeroed before the convolution (exactly what SAME zero-padding sees at
    the edges) and excluded from the max, so their ids cannot change the output.
    """

    filters: int
    kernel_size: int

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, mask_BxT: jax.Array) -> jax.Array:
        x_BxTxD = jnp.where(mask_BxT[..., None], x_BxTxD, 0.0)
        h_BxTxC = nn.relu(nn.Conv(self.filters, (self.kernel_size,), padding="SAME")(x_BxTxD))
        return masked_max(h_BxTxC, mask_BxT)
