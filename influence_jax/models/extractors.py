"""Feature extractors f_j: each reads the shared embedded inputs and returns a score per example.

Every extractor maps a `Inputs` bundle to `(score_B, aux)`. History events arrive already
gated by their behaviour type's learned weight (`Inputs.gate_BxL`), so each extractor's use of
an event scales with how much that kind of behaviour matters.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from influence_jax.data.schema import Schema
from influence_jax.models.layers import ConvTower
from influence_jax.optim import FROZEN_PREFIX  # TrainRates' counts: never updated


@dataclasses.dataclass(frozen=True)
class Inputs:
    """Embedded inputs shared by all extractors.

    user_BxFxD / item_BxFxD: user and target-item field embeddings.
    event_BxLxD: each history event's item-side embedding (its item fields, summed).
    hist_BxLxE: each event's full embedding (all history fields, concatenated).
    mask_BxL: True at real events. gate_BxL: the event's behaviour-type weight (0 at padding).
    match_BxLxK: exact id matches between the event and the target, per shared item field.
    user_ids_BxF / item_ids_BxF: the raw user and item field ids (before any sparse remapping).
    id_fields: (name, "user" or "item", column, vocabulary size) of each single-valued user and
    item field, for extractors with per-id tables (TrainRates).
    label_B: the examples' labels in training (TrainRates leaves each example's own out), else
    None.
    """

    user_BxFxD: jax.Array
    item_BxFxD: jax.Array
    target_BxD: jax.Array
    event_BxLxD: jax.Array
    hist_BxLxE: jax.Array
    mask_BxL: jax.Array
    gate_BxL: jax.Array
    match_BxLxK: jax.Array  # 1.0 where the event's item field equals the target's (id match)
    user_ids_BxF: jax.Array | None = None
    item_ids_BxF: jax.Array | None = None
    id_fields: tuple[tuple[str, str, int, int], ...] = ()
    label_B: jax.Array | None = None


class SplitDense(nn.Module):
    """`nn.Dense` over the concatenation of `parts` without building it.

    Same parameters (names, shapes, initial values) as nn.Dense on the concatenated input. Each
    part is broadcast against the others' leading axes (a [L, S] table against [B, L, X]
    inputs: its share of the matmul runs once, not once per example), and a part of at most
    `narrow` features is a few multiply-adds that fuse into the sum instead of a matmul.
    """

    features: int
    narrow: int = 4

    @nn.compact
    def __call__(self, parts: Sequence[jax.Array]) -> jax.Array:
        widths = [p.shape[-1] for p in parts]
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (sum(widths), self.features))
        out = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        start = 0
        for p, w in zip(parts, widths, strict=True):
            k = kernel[start : start + w]
            if w <= self.narrow:
                out = out + sum(p[..., j : j + 1] * k[j] for j in range(w))
            else:
                out = out + p @ k
            start += w
        return out


class MLP(nn.Module):
    """Dense(relu) layers with dropout, then one linear output unit."""

    hidden: Sequence[int]
    dropout: float = 0.0
    # A constant added to an extractor's score is the ranker's bias (and is cancelled by score
    # standardisation, where Adam would turn its zero gradient's rounding noise into steps).
    out_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array | Sequence[jax.Array], train: bool) -> jax.Array:
        """x: the input features, or a list of parts of them (concatenated, as SplitDense)."""
        for i, width in enumerate(self.hidden):
            if i == 0 and isinstance(x, list | tuple):
                x = nn.relu(SplitDense(width, name=f"dense_{i}")(x))
            else:
                x = nn.relu(nn.Dense(width, name=f"dense_{i}")(x))
            x = nn.Dropout(self.dropout, deterministic=not train)(x)
        if isinstance(x, list | tuple):  # hidden=(): a linear score of the parts
            x = jnp.concatenate(x, -1)
        return nn.Dense(1, use_bias=self.out_bias, name="out")(x)[..., 0]


class CNNExtractor(nn.Module):
    """The seed design as an extractor: a Conv1D + masked max-pool tower per input group."""

    filters: int = 32
    kernel_size: int = 3
    hidden: Sequence[int] = (64,)
    dropout: float = 0.2

    @nn.compact
    def __call__(self, x: Inputs, train: bool = False):
        ones = lambda a: jnp.ones(a.shape[:2], bool)
        tower = lambda name: ConvTower(self.filters, self.kernel_size, name=name)
        gated_BxLxE = x.hist_BxLxE * x.gate_BxL[..., None]
        pooled = [
            tower("user_tower")(x.user_BxFxD, ones(x.user_BxFxD)),
            tower("item_tower")(x.item_BxFxD, ones(x.item_BxFxD)),
            tower("hist_tower")(gated_BxLxE, x.mask_BxL),
        ]
        h = nn.Dropout(self.dropout, deterministic=not train)(jnp.concatenate(pooled, -1))
        return MLP(self.hidden, self.dropout, out_bias=False, name="mlp")(h, train), {}


class DNNExtractor(nn.Module):
    """Pooled embeddings -> MLP: user and item fields flattened, history as a gated mean."""

    hidden: Sequence[int] = (64, 32)
    dropout: float = 0.2
    use_history: bool = True  # False: a pure profile model (user and item fields only)

    @nn.compact
    def __call__(self, x: Inputs, train: bool = False):
        B = x.user_BxFxD.shape[0]
        parts = [x.user_BxFxD.reshape(B, -1), x.item_BxFxD.reshape(B, -1)]
        if self.use_history:
            n_B = jnp.maximum(jnp.sum(x.mask_BxL, axis=1, keepdims=True), 1)
            w_BxL = x.gate_BxL.astype(x.hist_BxLxE.dtype)
            parts.append(jnp.einsum("bl,ble->be", w_BxL, x.hist_BxLxE) / n_B)
        h = jnp.concatenate(parts, -1)
        return MLP(self.hidden, self.dropout, out_bias=False, name="mlp")(h, train), {}


class TargetAttention(nn.Module):
    """DIN-style target attention: each past event's relevance to the target item.

    Event i contributes `gate_i * a_i`, where a_i = MLP([e_i * q, e_i, match_i, pos_i]) is
    its (unnormalised) relevance to the target q and gate_i its behaviour type's weight. The
    score is the sum over events, so the per-event contributions are exact additive parts of
    this extractor's score (exposed as aux["event_contribution_BxL"]). The attention MLP does
    not see the behaviour type: type effects can only enter through the gate.
    """

    hidden: Sequence[int] = (32,)

    @nn.compact
    def __call__(self, x: Inputs, train: bool = False):
        B, L, D = x.event_BxLxD.shape
        pos_LxD = self.param("position", nn.initializers.normal(0.05), (L, D))
        e = x.event_BxLxD
        q = jnp.broadcast_to(x.target_BxD[:, None, :], e.shape)
        # No target-only input: a term in q alone (item quality) would be summed over events
        # and let this extractor stand in for a profile model, blurring what w_j means.
        # The MLP's input is [e * q, e, match, pos], given in parts (SplitDense): the position
        # term is computed once for all examples and the match flags fuse into the sum, 10-15%
        # faster ranking with the default model than one concatenated [B, L, 2D + K + D] input.
        feats = [jnp.concatenate([e * q, e], -1), x.match_BxLxK, pos_LxD]
        a_BxL = MLP(self.hidden, 0.0, name="attention")(feats, train)
        contrib_BxL = jnp.where(x.mask_BxL, x.gate_BxL * a_BxL, 0.0)
        return jnp.sum(contrib_BxL, axis=1), {
            "event_contribution_BxL": contrib_BxL,
            "attention_BxL": jnp.where(x.mask_BxL, a_BxL, 0.0),
        }


def attend(logits_BxHxTxT: jax.Array, v_BxHxTxd: jax.Array) -> tuple[jax.Array, jax.Array]:
    """softmax(logits) @ v, normalised after the matmul; and the first query's softmax row.

    Dividing the [B, H, T, d] product by the row sums instead of the [B, H, T, T] weights
    changes the fusion XLA:CPU builds: bst's softmax and attention matmul ran as one YNN call
    of 11 ms of the full ranker's 40 ms a batch (batch 1024, the AMX Xeon of 2026-12-05);
    normalised after, the full ranker scored 1.25x / 1.29x as fast at batch 1024 / 4096.
    Equal to `jax.nn.softmax(logits) @ v` in value and gradient (tests/test_ranker.py).
    """
    p_BxHxTxT = jnp.exp(logits_BxHxTxT - jnp.max(logits_BxHxTxT, -1, keepdims=True))
    sum_BxHxTx1 = jnp.sum(p_BxHxTxT, -1, keepdims=True)
    mixed_BxHxTxd = jnp.matmul(p_BxHxTxT, v_BxHxTxd) / sum_BxHxTx1
    return mixed_BxHxTxd, p_BxHxTxT[:, :, 0] / sum_BxHxTx1[:, :, 0]


class SelfAttention(nn.Module):
    """BST-style: one transformer block over [target; gated events], read at the target token.

    Tokens are the target item (its fields, projected to D) and each past event (all its
    history fields, projected to D and scaled by its behaviour type's gate), plus a learned
    position embedding. Padded events are masked out as keys and left out of the pooled
    output. aux["attention_BxL"] is the target token's attention to each event (mean over heads).
    """

    heads: int = 2
    ff: int = 64  # feed-forward width of the block
    hidden: Sequence[int] = (32,)
    dropout: float = 0.1

    @nn.compact
    def __call__(self, x: Inputs, train: bool = False):
        B, L, _ = x.hist_BxLxE.shape
        D = x.target_BxD.shape[-1]
        if D % self.heads:
            raise ValueError(f"bst: embed_dim {D} is not divisible by heads {self.heads}")
        dh = D // self.heads
        event_BxLxD = nn.Dense(D, name="event_proj")(x.hist_BxLxE) * x.gate_BxL[..., None]
        target_BxD = nn.Dense(D, name="target_proj")(x.item_BxFxD.reshape(B, -1))
        tok_BxTxD = jnp.concatenate([target_BxD[:, None], event_BxLxD], 1)
        tok_BxTxD = tok_BxTxD + self.param("position", nn.initializers.normal(0.05), (L + 1, D))
        key_BxT = jnp.concatenate([jnp.ones((B, 1), bool), x.mask_BxL], 1)
        qkv = nn.DenseGeneral((3, self.heads, dh), name="qkv")(tok_BxTxD)  # [B, T, 3, H, dh]
        # Heads-major [B, H, T, dh] batched matmuls: 1.5x faster on XLA:CPU than the einsums
        # over the [B, T, H, dh] layout.
        q, k, v = jnp.transpose(qkv, (2, 0, 3, 1, 4))
        logits_BxHxTxT = jnp.matmul(q, jnp.swapaxes(k, -1, -2)) / jnp.sqrt(dh)
        logits_BxHxTxT = jnp.where(key_BxT[:, None, None, :], logits_BxHxTxT, -1e9)
        mixed_BxHxTxd, att_BxHxT = attend(logits_BxHxTxT, v)
        mixed = jnp.transpose(mixed_BxHxTxd, (0, 2, 1, 3)).reshape(B, L + 1, D)
        drop = nn.Dropout(self.dropout, deterministic=not train)
        h = nn.LayerNorm(name="ln_att")(tok_BxTxD + drop(nn.Dense(D, name="att_out")(mixed)))
        ff = nn.Dense(D, name="ff_out")(nn.relu(nn.Dense(self.ff, name="ff_in")(h)))
        h = nn.LayerNorm(name="ln_ff")(h + drop(ff))
        n_B = jnp.maximum(jnp.sum(x.mask_BxL, axis=1, keepdims=True), 1)
        pooled_BxD = jnp.einsum("bl,bld->bd", x.mask_BxL.astype(h.dtype), h[:, 1:]) / n_B
        out = jnp.concatenate([h[:, 0], pooled_BxD], -1)
        score_B = MLP(self.hidden, self.dropout, out_bias=False, name="mlp")(out, train)
        attention_BxL = jnp.where(x.mask_BxL, jnp.mean(att_BxHxT[..., 1:], axis=1), 0.0)
        return score_B, {"attention_BxL": attention_BxL}


class MatchCounts(nn.Module):
    """Gated counts of history events that match the target, by recency, through a small MLP.

    For each shared item field k (item, category) it counts the events whose id equals the
    target's, each weighted by its behaviour type's gate, overall and with recency decays
    exp(-position / tau): c_B = sum_i gate_i * [match_ik, match_ik * exp(-i / tau)...], plus
    the gated history length. The score is MLP(log1p(c_B)). Few parameters and no embeddings:
    the counting features of a logistic regression, learned end to end, which hold up where
    positives are few (conversions). Type effects enter only through the gates.
    """

    hidden: Sequence[int] = (16,)
    taus: Sequence[float] = (1.0, 4.0, 16.0)  # recency decays, in history positions

    @nn.compact
    def __call__(self, x: Inputs, train: bool = False):
        L = x.match_BxLxK.shape[1]
        pos_L = jnp.arange(L, dtype=jnp.float32)
        decay_LxT = jnp.exp(-pos_L[:, None] / jnp.asarray(self.taus, jnp.float32)[None, :])
        m = x.match_BxLxK
        phi_BxLxF = jnp.concatenate(
            [m, (m[..., :, None] * decay_LxT[None, :, None, :]).reshape(*m.shape[:2], -1)], -1
        )
        g_BxL = jnp.where(x.mask_BxL, x.gate_BxL, 0.0)
        c_BxF = jnp.einsum("bl,blf->bf", g_BxL, phi_BxLxF)
        c_BxF = jnp.concatenate([c_BxF, jnp.sum(g_BxL, axis=1, keepdims=True)], -1)
        return MLP(self.hidden, 0.0, out_bias=False, name="mlp")(jnp.log1p(c_BxF), train), {}


RATE_PRIOR = 10.0  # pseudo-examples at the overall rate in a smoothed rate (baselines.PRIOR)


class TrainRates(nn.Module):
    """The label's smoothed rate in the training split per user id and per item id (and per
    value of every other single-valued user and item field), through a small MLP.

    For each such field f with the example's id v: rate_f = (pos_f[v] + a r) / (n_f[v] + a),
    the positives and examples of v in the train split shrunk towards the overall rate r by a
    pseudo-examples; the MLP reads log(rate_f / r) and log1p(n_f[v]). In training each
    example's own label is left out of its counts (pos - y, n - 1), so the rates it learns from
    are the ones a held-out example sees (the logistic-regression baseline's leave-one-out
    rates; without it a user's rate would hold the very label it predicts). The counts are
    parameters named `frozen_*`, filled from the train split when training starts
    (`train_rate_tables`) and saved in the checkpoint; the optimizer never changes them, and
    ids the train split never held keep the overall rate. In a multi-task model each head's
    tower has its own tables, of its head's labels (not in a mixture of experts). Where
    positives are few (conversions) these rates carry what embeddings of rare ids overfit.
    Scoring the train split itself outside training (tools/evaluate.py --split=train) reads the
    full counts, each example's own label included: such figures flatter the model.
    """

    hidden: Sequence[int] = (16,)

    @nn.compact
    def __call__(self, x: Inputs, train: bool = False):
        if not x.id_fields:
            raise ValueError("rates: the model passes no user or item id fields")
        if train and x.label_B is None:  # e.g. an expert of a mixture, which serves every head
            raise ValueError("rates: training needs the example's label of this tower's head")
        sg = jax.lax.stop_gradient
        rate = sg(self.param(f"{FROZEN_PREFIX}rate", nn.initializers.constant(0.5), ()))
        rate = jnp.clip(rate, 1e-6, 1 - 1e-6)
        ids = {"user": x.user_ids_BxF, "item": x.item_ids_BxF}
        feats = []
        for name, group, col, size in x.id_fields:
            tables = [
                sg(self.param(f"{FROZEN_PREFIX}{kind}_{name}", nn.initializers.zeros, (size,)))
                for kind in ("positives", "examples")
            ]
            v_B = jnp.clip(ids[group][:, col], 0, size - 1)
            pos_B, n_B = (jnp.take(t, v_B) for t in tables)
            if train:  # leave the example's own label out
                pos_B = jnp.maximum(pos_B - x.label_B, 0.0)
                n_B = jnp.maximum(n_B - 1.0, 0.0)
            smoothed = (pos_B + RATE_PRIOR * rate) / (n_B + RATE_PRIOR)
            feats += [jnp.log(smoothed / rate), jnp.log1p(n_B)]
        h = jnp.stack(feats, -1)
        return MLP(self.hidden, 0.0, out_bias=False, name="mlp")(h, train), {}


def id_fields(schema: Schema) -> tuple[tuple[str, str, int, int], ...]:
    """(name, "user" or "item", column, vocabulary size) of each single-valued user and item
    field of `schema` (Inputs.id_fields)."""
    return tuple(
        (f.name, group, j, schema.vocab_sizes[f.vocab])
        for group, fields in (("user", schema.user_fields), ("item", schema.item_fields))
        for j, f in enumerate(fields)
        if not f.bag
    )


def train_rate_tables(
    id_fields: Sequence[tuple[str, str, int, int]],
    user_NxF: np.ndarray,
    item_NxF: np.ndarray,
    label_N: np.ndarray,
) -> dict[str, np.ndarray]:
    """TrainRates' frozen parameters from the train split's ids and labels (checked: ids within
    their vocabularies, labels 0 or 1; ExampleStore.checked_columns): per field, the positives
    and examples of each id, and the overall rate."""
    label = np.asarray(label_N, np.float64)
    cols = {"user": user_NxF, "item": item_NxF}
    out = {f"{FROZEN_PREFIX}rate": np.float32(label.mean() if len(label) else 0.5)}
    for name, group, col, size in id_fields:
        v = np.asarray(cols[group][:, col], np.int64)
        out[f"{FROZEN_PREFIX}positives_{name}"] = np.bincount(v, label, size).astype(np.float32)
        out[f"{FROZEN_PREFIX}examples_{name}"] = np.bincount(v, minlength=size).astype(np.float32)
    return out


EXTRACTORS: dict[str, type[nn.Module]] = {
    "match": MatchCounts,
    "cnn": CNNExtractor,
    "dnn": DNNExtractor,
    "din": TargetAttention,
    "bst": SelfAttention,
    "rates": TrainRates,
}
# Extractors whose parameters include tables filled from the training data.
DATA_EXTRACTORS = ("rates",)
