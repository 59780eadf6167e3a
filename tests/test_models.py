"""Layer and model tests: shapes, masking, the registry."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax import config_check
from influence_jax.errors import ConfigError
from influence_jax.models import build_model
from influence_jax.models.layers import ConvTower, masked_max
from tests import helpers


def test_masked_max_ignores_padding_and_empty_rows():
    x = jnp.array([[[1.0, -2.0], [5.0, 7.0], [9.0, 9.0]], [[3.0, 4.0], [0.0, 0.0], [0.0, 0.0]]])
    mask = jnp.array([[True, True, False], [False, False, False]])
    out = np.asarray(masked_max(x, mask))
    np.testing.assert_allclose(out, [[5.0, 7.0], [0.0, 0.0]])


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
