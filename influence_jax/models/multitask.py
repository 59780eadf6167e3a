"""Several heads (one per label of a multi-label dataset) over shared embeddings.

Each head is a `Ranker` tower: its own behaviour-type gates, extractors, extractor weights and
bias, so the same behaviour can matter differently for engagement and for purchase, and each
head's gates and weights are reported side by side. The embedding tables, by far the largest
part of the model, are shared by every head (the shared bottom). A head may be chained to
another ESMM-style (`chain = {"buy": "engage"}`): p(buy | view) = p(engage | view) *
sigmoid(buy tower), so the buy head is trained over all exposures through the product.

The module returns the objective head's logit and that head's aux, so ranking, evaluation and
influence reports work on any head unchanged (`clone(objective=...)`); aux["head_logits"]
holds every head's logit [B] for the multi-task loss and per-head metrics. For a chained head
the aux (contributions, weights) are its tower's: they add up to the tower's logit, not to the
chained one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from influence_jax.data.schema import Schema
from influence_jax.models.layers import Embeddings
from influence_jax.models.ranker import Ranker


def chained_logit(parent_logit: jax.Array, tower_logit: jax.Array) -> jax.Array:
    """logit(sigmoid(a) * sigmoid(b)), stably: log p - log(1 - p) with log p <= 0."""
    log_p = -jax.nn.softplus(-parent_logit) - jax.nn.softplus(-tower_logit)
    log_p = jnp.minimum(log_p, -1e-7)
    # log(1 - exp(x)) for x < 0, accurate on both sides of -log 2.
    log_1mp = jnp.where(log_p > -0.6931, jnp.log(-jnp.expm1(log_p)), jnp.log1p(-jnp.exp(log_p)))
    return log_p - log_1mp


class MultiTask(nn.Module):
    """Heads over shared embeddings; returns `(logit of the objective head, aux)`."""

    schema: Schema
    heads: Sequence[str] = ()  # the dataset's heads, in its `labels` column order
    objective: str = ""  # the head whose logit the model returns ("" = the last head)
    chain: Mapping[str, str] | None = None  # head -> parent head (ESMM): p = p(parent) * tower
    loss_weights: Mapping[str, float] | None = None  # head -> weight of its loss (default 1)
    embed_dim: int = 16
    extractors: Sequence[str] = ("din", "dnn", "cnn")
    extractor_args: Mapping[str, Mapping[str, Any]] | None = None
    combine: str = "softmax"
    behaviour_gates: bool = True
    share_item_embeddings: bool = True
    type_embedding: bool = False
    normalise_scores: bool = True
    bias_init: float = 0.0

    @property
    def objective_head(self) -> str:
        """The head whose logit the model returns: `objective`, or the last head."""
        return self.objective or self.heads[-1]

    def setup(self):
        b_vocab = self.schema.hist_fields[self.schema.hist_index("behaviour")].vocab
        skip = (b_vocab,) if self.behaviour_gates and not self.type_embedding else ()
        self.embeddings = Embeddings(
            self.schema, self.embed_dim, self.share_item_embeddings, skip, name="embeddings"
        )
        self.towers = {
            h: Ranker(
                schema=self.schema,
                embed_dim=self.embed_dim,
                extractors=self.extractors,
                extractor_args=self.extractor_args,
                combine=self.combine,
                behaviour_gates=self.behaviour_gates,
                share_item_embeddings=self.share_item_embeddings,
                type_embedding=self.type_embedding,
                normalise_scores=self.normalise_scores,
                bias_init=self.bias_init,
                shared_embeddings=self.embeddings,
                name=f"head_{h}",
            )
            for h in self.heads
        }

    def __call__(self, batch: dict[str, jax.Array], train: bool = False):
        logits, auxes = {}, {}
        for h in self.heads:
            logits[h], auxes[h] = self.towers[h](batch, train)
        for h, parent in dict(self.chain or {}).items():
            logits[h] = chained_logit(logits[parent], logits[h])
        objective = self.objective_head
        aux = dict(auxes[objective])
        aux["head_logits"] = logits
        # The objective's weights under their usual names (the step log, influence/* in
        # TensorBoard), and every head's under "<head>/".
        aux["weights"] = dict(auxes[objective]["weights"])
        aux["weights"].update(
            {f"{h}/{k}": v for h in self.heads for k, v in auxes[h]["weights"].items()}
        )
        aux["stats_loss"] = sum(a.get("stats_loss", 0.0) for a in auxes.values())
        return logits[objective], aux
