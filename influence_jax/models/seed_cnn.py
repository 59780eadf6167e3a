"""The seed model: per input group Embedding -> Conv1D -> masked max-pool; joined; MLP; logit."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from influence_jax.data.schema import Schema
from influence_jax.models.layers import ConvTower, Embeddings, history_mask


class SeedCNN(nn.Module):
    """Three CNN towers (user fields, target item fields, behaviour history) and a dense head.

    Returns `(logit_B, aux)`; aux holds each tower's pooled output for reports and tests.
    """

    schema: Schema
    embed_dim: int = 16
    filters: int = 32
    kernel_size: int = 3
    hidden: int = 128
    dropout: float = 0.2
    share_item_embeddings: bool = True
    bias_init: float = 0.0  # initial output bias (config.model.output_bias)

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False):
        s = self.schema
        emb = Embeddings(s, self.embed_dim, self.share_item_embeddings, name="embeddings")
        B = batch["user"].shape[0]
        user_BxFxD = emb(batch["user"], s.user_fields)
        item_BxFxD = emb(batch["item"], s.item_fields)
        hist_BxLxFxD = emb(batch["hist"], s.hist_fields, hist=True)
        mask_BxL = history_mask(batch["hist"], s)
        hist_BxLxD = hist_BxLxFxD.reshape(B, s.max_len, -1)  # fields concatenated per event

        tower = lambda name: ConvTower(self.filters, self.kernel_size, name=name)
        pooled = {
            "user": tower("user_tower")(user_BxFxD, jnp.ones(user_BxFxD.shape[:2], bool)),
            "item": tower("item_tower")(item_BxFxD, jnp.ones(item_BxFxD.shape[:2], bool)),
            "hist": tower("hist_tower")(hist_BxLxD, mask_BxL),
        }
        h = jnp.concatenate([pooled["user"], pooled["item"], pooled["hist"]], axis=-1)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        h = nn.relu(nn.Dense(self.hidden, name="hidden")(h))
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        out = nn.Dense(1, bias_init=nn.initializers.constant(self.bias_init), name="out")
        logit_B = out(h)[:, 0]
        return logit_B, {"pooled": pooled}
