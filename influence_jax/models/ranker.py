"""The full model: I = sum_j w_j * f_j(x) over feature extractors, with behaviour-type gates.

Learned, readable outputs (also in aux): the extractor weights w = softmax(beta), and one
non-negative weight per behaviour type, g_t = softplus(theta_t), which scales every history
event of type t wherever an extractor reads it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from influence_jax.data.schema import HIST_BEHAVIOUR, NUM_RESERVED, RAW_IDS, Schema
from influence_jax.models.extractors import EXTRACTORS, Inputs, id_fields
from influence_jax.models.layers import Embeddings, history_mask, take_small

_GATE_INIT = 0.5413  # softplus(0.5413) = 1.0: every behaviour type starts with weight 1


class Ranker(nn.Module):
    """Weighted sum of extractors; returns `(logit_B, aux)`.

    aux: `scores` {extractor: f_j [B]}, `extractor_weights` {extractor: w_j},
    `contributions` {extractor: w_j * f_j [B]}, `bias`, `behaviour_type_weights` {type: g_t},
    `weights` (flat scalars for logging), and each extractor's own aux under its name (e.g.
    din's per-event contributions). logit = sum_j w_j f_j + bias exactly.
    """

    schema: Schema
    embed_dim: int = 16
    extractors: Sequence[str] = ("din", "dnn", "cnn")
    extractor_args: Mapping[str, Mapping[str, Any]] | None = None
    combine: str = "softmax"  # "softmax" (learned, normalised) or "sum" (all weights 1)
    behaviour_gates: bool = True
    share_item_embeddings: bool = True
    # Also embed the behaviour type for the extractors. Off, a type acts only through its gate
    # and the gate is its whole influence; on (e.g. MovieLens, where the type is the rating
    # value), extractors may also read it, and the gate is the gated share of its influence.
    type_embedding: bool = False
    # Standardise each extractor's score before weighting it (see `_standardise`), so w_j
    # (times one shared scale) is the only way an extractor's share of the logit can grow.
    normalise_scores: bool = True
    bias_init: float = 0.0  # initial output bias (config.model.output_bias)
    # Embeddings owned by a parent and shared with other towers (models/multitask.py).
    shared_embeddings: nn.Module | None = None

    def _gates(self) -> jax.Array:
        """Per behaviour id (pad, OOV, types...) -> gate; pad 0, OOV 1, types learned."""
        T = self.schema.num_behaviour_types
        if self.behaviour_gates:
            theta = self.param("behaviour_type_logits", nn.initializers.constant(_GATE_INIT), (T,))
            g_T = nn.softplus(theta)
        else:
            g_T = jnp.ones((T,))
        return jnp.concatenate([jnp.array([0.0, 1.0]), g_T])

    def _inputs(self, batch: dict[str, jax.Array], gates: jax.Array, train: bool) -> Inputs:
        s = self.schema
        b = s.hist_index(HIST_BEHAVIOUR)
        # With gates on, the type reaches the extractors only through its gate, so its learned
        # weight is the whole of its influence rather than a share of it: no type embedding.
        skip = (s.hist_fields[b].vocab,) if self.behaviour_gates and not self.type_embedding else ()
        emb = self.shared_embeddings
        if emb is None:
            emb = Embeddings(s, self.embed_dim, self.share_item_embeddings, skip, name="embeddings")
        user = emb(batch["user"], s.user_fields)
        item = emb(batch["item"], s.item_fields)
        kept = [j for j in range(len(s.hist_fields)) if not (skip and j == b)]
        # The history fields' embeddings as a list: one concatenation [B, L, E] for the
        # extractors (a stacked [B, L, S, D] reshaped became two copies, one per consumer, in
        # XLA:CPU's fusions: 15% of the default model's ranking time).
        hist_parts = emb.lookup_parts(
            batch["hist"][..., kept], [s.hist_fields[j] for j in kept], hist=True
        )
        mask = history_mask(batch["hist"], s)
        item_vocabs = [f.vocab for f in s.item_fields]
        pairs = [
            (item_vocabs.index(s.hist_fields[j].vocab), k)
            for k, j in enumerate(kept)
            if s.hist_fields[j].vocab in item_vocabs
        ]
        target = sum(item[:, i] for i, _ in pairs)
        event = sum(hist_parts[j] for _, j in pairs)
        # Exact id matches (same item, same category) are the strongest single cue of a
        # repeat interaction; embeddings of rare ids cannot express them.
        ids_item, ids_hist = batch["item"], batch["hist"][..., kept]
        match = jnp.stack(
            [
                (ids_hist[..., k] == ids_item[:, None, i]) & (ids_hist[..., k] >= NUM_RESERVED)
                for i, k in pairs
            ],
            -1,
        ).astype(jnp.float32)
        gate = jnp.where(mask, take_small(gates, batch["hist"][..., b]), 0.0)
        return Inputs(
            user_BxFxD=user,
            item_BxFxD=item,
            target_BxD=target,
            event_BxLxD=event,
            hist_BxLxE=jnp.concatenate(hist_parts, -1),
            mask_BxL=mask,
            gate_BxL=gate,
            match_BxLxK=match,
            # The ids as the data holds them: the sparse train step remaps `user` and `item` to
            # rows of its gathered tables (sparse.gather_rows) and keeps these.
            user_ids_BxF=batch.get(RAW_IDS["user"], batch["user"]),
            item_ids_BxF=batch.get(RAW_IDS["item"], batch["item"]),
            id_fields=id_fields(s),
            label_B=batch.get("label") if train else None,
        )

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False):
        gates = self._gates()
        x = self._inputs(batch, gates, train)
        args = dict(self.extractor_args or {})
        scores, aux = {}, {}
        for name in self.extractors:
            score_B, extra = EXTRACTORS[name](**dict(args.get(name, {})), name=name)(x, train)
            scores[name], aux[name] = score_B, extra
        extra = {}
        if self.normalise_scores:
            scores, extra = self._standardise(scores, batch.get("weight"), train)
        beta = self.param("extractor_logits", nn.initializers.zeros, (len(self.extractors),))
        w_J = jax.nn.softmax(beta) if self.combine == "softmax" else jnp.ones_like(beta)
        bias = self.param("bias", nn.initializers.constant(self.bias_init), ())
        weights = {n: w_J[j] for j, n in enumerate(self.extractors)}
        contributions = {n: weights[n] * scores[n] for n in self.extractors}
        logit_B = sum(contributions.values()) + bias
        types = self.schema.behaviour_types
        g = {t: gates[k + NUM_RESERVED] for k, t in enumerate(types)}
        total = sum(g.values())
        aux.update(
            extra,
            scores=scores,
            extractor_weights=weights,
            contributions=contributions,
            bias=bias,
            behaviour_type_weights=g,
            weights={
                **{f"extractor/{n}": w for n, w in weights.items()},
                **{f"behaviour/{t}": v / total for t, v in g.items()},
            },
        )
        return logit_B, aux

    def _standardise(
        self, scores: dict[str, jax.Array], weight_B: jax.Array | None, train: bool
    ) -> tuple[dict[str, jax.Array], dict[str, Any]]:
        """scale * (f_j - mean_j) / std_j per extractor, like batch normalisation.

        Without it, an extractor can grow its score instead of its weight, and w_j says nothing
        about which extractor carries the signal. Training standardises with the batch's own
        statistics (gradients flow through them, so f_j's scale cannot matter); evaluation and
        ranking use running statistics, the parameters `score_mean` and `score_var`, fitted to
        the batch statistics by the loss term returned as aux["stats_loss"]; the optimizer
        updates them with plain SGD (optim.STATS_PARAMS), so they are an exponential moving
        average of the batch statistics.
        """
        J = len(self.extractors)
        f_JxB = jnp.stack([scores[n] for n in self.extractors])
        mean = self.param("score_mean", nn.initializers.zeros, (J,))
        var = self.param("score_var", nn.initializers.ones, (J,))
        log_scale = self.param("score_log_scale", nn.initializers.zeros, ())
        extra: dict[str, Any] = {"raw_scores": scores}
        if train:
            w_B = jnp.ones(f_JxB.shape[1]) if weight_B is None else weight_B
            n = jnp.maximum(jnp.sum(w_B), 1.0)
            m_J = jnp.sum(f_JxB * w_B, axis=1) / n
            v_J = jnp.sum(jnp.square(f_JxB - m_J[:, None]) * w_B, axis=1) / n
            sg = jax.lax.stop_gradient
            extra["stats_loss"] = 0.5 * (
                jnp.sum(jnp.square(mean - sg(m_J))) + jnp.sum(jnp.square(var - sg(v_J)))
            )
        else:
            m_J, v_J = mean, var
        z_JxB = (f_JxB - m_J[:, None]) * jax.lax.rsqrt(jnp.maximum(v_J, 0.0)[:, None] + 1e-5)
        z_JxB = jnp.exp(log_scale) * z_JxB
        return {n: z_JxB[j] for j, n in enumerate(self.extractors)}, extra
