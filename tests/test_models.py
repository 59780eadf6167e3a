"""Layer and model tests: shapes, masking, the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax import config_check
from influence_jax.data.store import ExampleStore
from influence_jax.errors import ConfigError
from influence_jax.models import build_model
from influence_jax.models.extractors import MLP, Inputs, MatchCounts, SplitDense
from influence_jax.models.layers import ConvTower, masked_max, take_small
from tests import helpers


def test_masked_max_ignores_padding_and_empty_rows():
    x = jnp.array([[[1.0, -2.0], [5.0, 7.0], [9.0, 9.0]], [[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = jnp.array([[True, True, False], [False, False, False]])
    out = np.asarray(masked_max(x, mask))
    np.testing.assert_allclose(out, [[5.0, 7.0], [0.0, 0.0]])


def test_split_dense_is_nn_dense_on_the_concatenation():
    """SplitDense over [wide, narrow, broadcast table] parts: nn.Dense's parameters (same names,
    shapes and initial values) and its output and gradients on the concatenated input."""
    import flax.linen as nn

    rng = np.random.default_rng(0)
    B, L = 3, 5
    wide = jnp.asarray(rng.normal(size=(B, L, 6)), jnp.float32)
    narrow = jnp.asarray(rng.integers(0, 2, (B, L, 2)), jnp.float32)
    table = jnp.asarray(rng.normal(size=(L, 4)), jnp.float32)
    parts = [wide, narrow, table]
    concat = jnp.concatenate([wide, narrow, jnp.broadcast_to(table, (B, L, 4))], -1)
    split, dense = SplitDense(7), nn.Dense(7)
    p_split = split.init(jax.random.PRNGKey(1), parts)
    p_dense = dense.init(jax.random.PRNGKey(1), concat)
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_split, p_dense)
    p = jax.tree_util.tree_map(lambda a: a + 0.1, p_dense)  # a bias that is not zero
    np.testing.assert_allclose(split.apply(p, parts), dense.apply(p, concat), rtol=1e-5, atol=1e-6)
    g_split = jax.grad(lambda p: jnp.sum(jnp.sin(split.apply(p, parts))))(p)
    g_dense = jax.grad(lambda p: jnp.sum(jnp.sin(dense.apply(p, concat))))(p)
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g_split, g_dense
    )


def test_an_mlp_without_hidden_layers_is_a_linear_score_of_its_parts():
    """hidden=() (e.g. --config.model.din.hidden='()'): one Dense(1) on the parts joined."""
    rng = np.random.default_rng(0)
    parts = [jnp.asarray(rng.normal(size=(3, k)), jnp.float32) for k in (4, 2)]
    mlp = MLP(hidden=())
    p = mlp.init(jax.random.PRNGKey(0), parts, train=False)
    w, b = p["params"]["out"]["kernel"], p["params"]["out"]["bias"]
    want = (jnp.concatenate(parts, -1) @ w)[:, 0] + b[0]
    np.testing.assert_allclose(mlp.apply(p, parts, train=False), want, rtol=1e-6)


def test_take_small_is_the_gather():
    """take_small (a chain of selects): the gather's values and the gradient it gives the table."""
    rng = np.random.default_rng(0)
    table = jnp.asarray(rng.normal(size=6), jnp.float32)
    ids = jnp.asarray(rng.integers(0, 6, (4, 9)), jnp.int32)
    np.testing.assert_array_equal(take_small(table, ids), table[ids])
    w = jnp.asarray(rng.normal(size=ids.shape), jnp.float32)
    g_small = jax.grad(lambda t: jnp.sum(w * take_small(t, ids)))(table)
    g_gather = jax.grad(lambda t: jnp.sum(w * t[ids]))(table)
    np.testing.assert_allclose(g_small, g_gather, rtol=1e-6, atol=1e-6)


def test_conv_tower_padding_cannot_change_output():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 10, 6)).astype(np.float32)
    mask = np.arange(10)[None, :] < np.array([[3], [10], [1], [6]])
    tower = ConvTower(filters=5, kernel_size=3)
    params = tower.init(jax.random.PRNGKey(0), x, mask)
    out = tower.apply(params, x, mask)
    x2 = np.where(mask[..., None], x, rng.normal(size=x.shape) * 100).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(tower.apply(params, x2, mask)))
    assert out.shape == (4, 5)


def test_seed_cnn_shapes_and_history_padding(tiny_data):
    schema, path = tiny_data
    config = helpers.tiny_config(**{"model.name": "seed_cnn"})
    model = build_model(config.model, schema)
    batch = helpers.first_batch(schema, path, 16)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    logit, aux = model.apply({"params": params}, batch)
    assert logit.shape == (16,)
    assert aux["pooled"]["hist"].shape == (16, config.model.seed_cnn.filters)
    # Rewrite the ids at padded history positions (behaviour id stays 0 = padding).
    hist = batch["hist"].copy()
    pad = hist[..., schema.hist_index("behaviour")] == 0
    assert pad.any(), "tiny data should have short histories"
    for j, f in enumerate(schema.hist_fields):
        if f.name != "behaviour":
            hist[..., j] = np.where(pad, schema.vocab_sizes[f.vocab] - 1, hist[..., j])
    logit2, _ = model.apply({"params": params}, dict(batch, hist=hist))
    np.testing.assert_array_equal(np.asarray(logit), np.asarray(logit2))


def test_dropout_only_in_training(tiny_data):
    schema, path = tiny_data
    config = helpers.tiny_config(**{"model.seed_cnn.dropout": 0.5, "model.name": "seed_cnn"})
    model = build_model(config.model, schema)
    batch = helpers.first_batch(schema, path, 16)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    a, _ = model.apply({"params": params}, batch, train=False)
    b, _ = model.apply({"params": params}, batch, train=False)
    c, _ = model.apply(
        {"params": params}, batch, train=True, rngs={"dropout": jax.random.PRNGKey(1)}
    )
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not np.allclose(np.asarray(a), np.asarray(c))


def test_unknown_model_name_is_a_config_error():
    with pytest.raises(ConfigError, match="config.model.name"):
        config_check.check(helpers.tiny_config(**{"model.name": "nope"}))


@pytest.mark.parametrize("name", ["ranker", "seed_cnn"])
def test_prior_output_bias_starts_at_the_train_log_odds(tiny_data, name):
    schema, path = tiny_data
    rate = schema.positive_rate("train")
    labels = ExampleStore(path, "train", schema).gather(np.arange(schema.splits["train"]["rows"]))
    assert rate == pytest.approx(float(labels["label"].mean()))  # recorded by the ShardWriter
    batch = helpers.first_batch(schema, path, 16)
    biases = {}
    for prior in ("zero", "prior"):
        config = helpers.tiny_config(**{"model.name": name, "model.output_bias": prior})
        params = build_model(config.model, schema).init(jax.random.PRNGKey(0), batch)["params"]
        biases[prior] = float(params["bias"] if name == "ranker" else params["out"]["bias"][0])
    assert biases["zero"] == 0.0
    assert biases["prior"] == pytest.approx(np.log(rate / (1 - rate)), rel=1e-5)


def test_match_counts_are_gated_recency_weighted_matches():
    """The match extractor's inputs, by hand: gated counts of matching events per field, with
    recency decays, and the gated history length; padding counts nothing."""
    B, L, K = 2, 4, 2
    match = np.zeros((B, L, K), np.float32)
    match[0, 0, 0] = match[0, 2, 0] = match[0, 2, 1] = 1.0  # item at 0 and 2, category at 2
    match[1, 3, 0] = 1.0  # a padded position: must not count
    gate = np.array([[0.5, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0]], np.float32)
    mask = np.array([[1, 1, 1, 0], [1, 1, 1, 0]], bool)
    zeros = lambda *s: jnp.zeros(s)
    x = Inputs(zeros(B, 1, 4), zeros(B, 1, 4), zeros(B, 4), zeros(B, L, 4), zeros(B, L, 8),
               jnp.asarray(mask), jnp.asarray(gate), jnp.asarray(match))  # fmt: skip
    taus = (1.0, 4.0)
    module = MatchCounts(hidden=(), taus=taus)
    params = module.init(jax.random.PRNGKey(0), x)["params"]
    w = np.asarray(params["mlp"]["out"]["kernel"])[:, 0]
    d = lambda i, t: np.exp(-i / t)
    c0 = [0.5 + 2.0, 2.0]  # item matches at 0 (gate 0.5) and 2 (gate 2); category at 2
    c0 += [0.5 * d(0, t) + 2.0 * d(2, t) for t in taus] + [2.0 * d(2, t) for t in taus]
    c0 += [0.5 + 1.0 + 2.0]  # gated length (position 3 is padding)
    c1 = [0.0] * (2 + 2 * len(taus)) + [3.0]
    score, _ = module.apply({"params": params}, x)
    # Feature order: the K match counts, then each field's decays, then the length.
    want = [np.log1p(np.asarray(c)) @ w for c in (c0, c1)]
    np.testing.assert_allclose(np.asarray(score), want, rtol=1e-5)
