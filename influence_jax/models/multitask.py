"""Several heads (one per label of a multi-label dataset) over shared embeddings.

Each head is a `Ranker` tower: its own behaviour-type gates, extractors, extractor weights and
bias, so the same behaviour can matter differently for engagement and for purchase, and each
head's gates and weights are reported side by side. The embedding tables, by far the largest
part of the model, are shared by every head (the shared bottom). A head may be chained to
another ESMM-style (`chain = {"buy": "engage"}`): p(buy | view) = p(engage | view) *
sigmoid(buy tower), so the buy head is trained over all exposures through the product.

The module returns the objective head's logit and that head's aux, so ranking, evaluation and
influence reports work on any head unchanged (`clone(objective=...)`); aux["head_logits"]
holds every head's logit [B] for the multi-task loss and per-head metrics. With
`runtime_objective` the objective is read from the parameter `objective_weights` [H]
(`objective_vector`) instead, so one compiled scoring program serves every head
(scoring.with_objective); training never sets it. For a chained head
the aux (contributions, weights) are its tower's: they add up to the tower's logit, not to the
chained one.

Two forms (`mixture`): "towers", a Ranker tower per head (shared bottom: the embeddings), and
"mmoe", a gated mixture of experts (MMoE, Ma et al. 2018): `experts` Ranker towers shared by
every head, and per head a softmax gate over the experts computed from the example's user and
target-item embeddings, logit_h = sum_k g_hk(x) * expert_k(x) + b_h. The mixture keeps the
additive read-out: a head's extractor contributions are the gate-weighted sums of the
experts', and its reported extractor weights and behaviour-type gates are the experts',
weighted by the head's mean gate over the batch.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

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


def parse_objective(text: str, heads: Sequence[str]) -> dict[str, float]:
    """`objective` -> {head: weight}: one head ("buy"), or a weighted sum of heads' probabilities
    ("buy+0.3*cart", weights positive, a bare head weighs 1). Raises ValueError naming what is
    wrong; "" means the last head."""
    if not text:
        return {heads[-1]: 1.0}
    out: dict[str, float] = {}
    for term in text.replace(" ", "").split("+"):
        weight, _, head = term.rpartition("*")
        if not head:
            raise ValueError(
                f"{text}: the term {term!r} names no head; write terms like 'buy' or "
                f"'0.3*cart', joined by '+' (this run's heads: {list(heads)})"
            )
        try:
            w = float(weight) if weight else 1.0
        except ValueError:
            raise ValueError(f"{text}: {weight!r} in {term!r} is not a number") from None
        if head not in heads:
            raise ValueError(
                f"{text}: {head!r} is not a head of this run; its heads are {list(heads)}"
            )
        if not w > 0 or head in out:
            raise ValueError(f"{text}: name each head once, with a positive weight ({term!r})")
        out[head] = w
    return out


def objective_vector(text: str, heads: Sequence[str]) -> np.ndarray:
    """parse_objective's weights as a float32 [H] vector in `heads` order (0: not in it)."""
    weights = parse_objective(text, heads)
    return np.asarray([weights.get(h, 0.0) for h in heads], np.float32)


class MultiTask(nn.Module):
    """Heads over shared embeddings; returns `(logit of the objective head, aux)`."""

    schema: Schema
    heads: Sequence[str] = ()  # the dataset's heads, in its `labels` column order
    # The head whose logit the model returns ("" = the last head), or a weighted sum of heads'
    # probabilities, "buy+0.3*cart" (parse_objective), returned as the logit of that mean.
    objective: str = ""
    # Read the objective from the parameter `objective_weights` [H] (objective_vector; its
    # initial value: `objective`'s), not from `objective`: scoring only (scoring.load_run).
    runtime_objective: bool = False
    chain: Mapping[str, str] | None = None  # head -> parent head (ESMM): p = p(parent) * tower
    loss_weights: Mapping[str, float] | None = None  # head -> weight of its loss (default 1)
    mixture: str = "towers"  # "towers" (a tower per head) or "mmoe" (experts, a gate per head)
    experts: int = 3  # expert towers of the "mmoe" form
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
        """The head whose logit the model returns: `objective`, or the last head; of a
        combination, the head of the largest weight (its label heads the metrics, its aux the
        reported weights)."""
        weights = parse_objective(self.objective, self.heads)
        return max(weights, key=weights.get)

    def setup(self):
        if self.runtime_objective:
            init = lambda rng, shape: jnp.asarray(objective_vector(self.objective, self.heads))
            self.objective_weights = self.param("objective_weights", init, (len(self.heads),))
        b_vocab = self.schema.hist_fields[self.schema.hist_index("behaviour")].vocab
        skip = (b_vocab,) if self.behaviour_gates and not self.type_embedding else ()
        self.embeddings = Embeddings(
            self.schema, self.embed_dim, self.share_item_embeddings, skip, name="embeddings"
        )
        # tower key -> module name: a tower per head, or the experts of the mixture
        names = {h: f"head_{h}" for h in self.heads}
        if self.mixture == "mmoe":
            names = {f"expert{k}": f"expert_{k}" for k in range(self.experts)}
            self.gates = {h: nn.Dense(self.experts, name=f"gate_{h}") for h in self.heads}
            init = nn.initializers.constant(self.bias_init)
            self.biases = {h: self.param(f"bias_{h}", init, ()) for h in self.heads}
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
                name=module_name,
            )
            for h, module_name in names.items()
        }

    def __call__(self, batch: dict[str, jax.Array], train: bool = False):
        if self.mixture == "mmoe":
            logits, auxes, stats_loss = self._mixture(batch, train)
        else:
            logits, auxes = {}, {}
            for i, h in enumerate(self.heads):
                # A tower's own label (its "rates" extractor leaves it out in training).
                own = dict(batch, label=batch["labels"][:, i]) if "labels" in batch else batch
                logits[h], auxes[h] = self.towers[h](own, train)
            stats_loss = sum(a.get("stats_loss", 0.0) for a in auxes.values())
        for h, parent in dict(self.chain or {}).items():
            logits[h] = chained_logit(logits[parent], logits[h])
        if self.runtime_objective:
            return self._runtime_objective(logits, auxes, stats_loss)
        objective = self.objective_head
        aux = dict(auxes[objective])
        aux["head_logits"] = logits
        combined = parse_objective(self.objective, self.heads)
        if len(combined) > 1:  # a weighted mean of the heads' probabilities, as a logit
            total = sum(combined.values())
            p = sum(w / total * jax.nn.sigmoid(logits[h]) for h, w in combined.items())
            p = jnp.clip(p, 1e-7, 1 - 1e-7)
            aux["objective_logit"] = jnp.log(p) - jnp.log1p(-p)
        # The objective's weights under their usual names (the step log, influence/* in
        # TensorBoard), and every head's under "<head>/".
        aux["weights"] = dict(auxes[objective]["weights"])
        aux["weights"].update(
            {f"{h}/{k}": v for h in self.heads for k, v in auxes[h]["weights"].items()}
        )
        aux["stats_loss"] = stats_loss
        return aux.pop("objective_logit", logits[objective]), aux

    def _runtime_objective(self, logits: dict, auxes: dict, stats_loss: Any):
        """`__call__`'s (logit, aux) for the objective in the parameter `objective_weights`:
        the same values as with `objective` static (up to float rounding), one program."""
        heads = tuple(self.heads)
        w_H = self.objective_weights
        top = jnp.argmax(w_H)  # the objective head (the largest weight's, as objective_head)

        def pick(*per_head: Any) -> jax.Array:  # the objective head's value of a leaf
            out = per_head[0]
            for i, x in enumerate(per_head[1:], 1):
                out = jnp.where(top == i, x, out)
            return out

        logit_HxB = jnp.stack([logits[h] for h in heads])
        p_B = jnp.einsum("h,hb->b", w_H / jnp.sum(w_H), jax.nn.sigmoid(logit_HxB))
        p_B = jnp.clip(p_B, 1e-7, 1 - 1e-7)
        mean_B = jnp.log(p_B) - jnp.log1p(-p_B)  # a weighted mean of probabilities, as a logit
        logit_B = jnp.where(jnp.sum(w_H > 0) > 1, mean_B, pick(*logit_HxB))
        aux = jax.tree_util.tree_map(pick, *(auxes[h] for h in heads))
        aux["head_logits"] = logits
        aux["weights"].update(
            {f"{h}/{k}": v for h in heads for k, v in auxes[h]["weights"].items()}
        )
        aux["stats_loss"] = stats_loss
        return logit_B, aux

    def _mixture(self, batch: dict[str, jax.Array], train: bool):
        """Every head's logit and aux from the gated mixture of the expert towers."""
        outs = [self.towers[f"expert{k}"](batch, train) for k in range(self.experts)]
        e_logit_BxK = jnp.stack([o[0] for o in outs], -1)
        s = self.schema
        x_BxD = jnp.concatenate(
            [
                self.embeddings(batch["user"], s.user_fields).mean(1),
                self.embeddings(batch["item"], s.item_fields).mean(1),
            ],
            -1,
        )
        logits, auxes = {}, {}
        for h in self.heads:
            g_BxK = jax.nn.softmax(self.gates[h](x_BxD), -1)
            bias = self.biases[h]
            logits[h] = jnp.sum(g_BxK * e_logit_BxK, -1) + bias
            auxes[h] = _mixed_aux([o[1] for o in outs], g_BxK, bias)
        return logits, auxes, sum(o[1].get("stats_loss", 0.0) for o in outs)


def _mixed_aux(experts: list[dict], g_BxK: jax.Array, bias: jax.Array) -> dict:
    """A head's Ranker-style aux from its experts': per-example terms mixed by the gate (so
    they still add up to the head's logit), reported weights by the head's mean gate."""
    mean_K = jnp.mean(g_BxK, 0)
    mix_B = lambda key, n: sum(g_BxK[:, k] * a[key][n] for k, a in enumerate(experts))
    mix_w = lambda key, n: sum(mean_K[k] * a[key][n] for k, a in enumerate(experts))
    first = experts[0]
    contributions = {n: mix_B("contributions", n) for n in first["contributions"]}
    weights = {n: mix_w("extractor_weights", n) for n in first["extractor_weights"]}
    gates = {t: mix_w("behaviour_type_weights", t) for t in first["behaviour_type_weights"]}
    total = sum(gates.values())
    return {
        "scores": {n: mix_B("scores", n) for n in first["scores"]},
        "extractor_weights": weights,
        "contributions": contributions,
        "bias": sum(g_BxK[:, k] * a["bias"] for k, a in enumerate(experts)) + bias,
        "behaviour_type_weights": gates,
        "expert_gates": {f"expert{k}": mean_K[k] for k in range(len(experts))},
        "weights": {
            **{f"extractor/{n}": w for n, w in weights.items()},
            **{f"behaviour/{t}": v / total for t, v in gates.items()},
            **{f"expert/{k}": mean_K[k] for k in range(len(experts))},
        },
    }
