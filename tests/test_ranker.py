"""The model family: extractor shapes and masking, the weighted sum, gates, gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax import config_check
from influence_jax.errors import ConfigError
from influence_jax.models import build_model
from tests import helpers


def _model(schema, **over):
    over = {f"model.{k}": v for k, v in over.items()}
    return build_model(helpers.tiny_config(**over).model, schema)


def _pad_scramble(schema, batch):
    """The batch with every id at padded history positions replaced (behaviour stays 0)."""
    hist = batch["hist"].copy()
    pad = hist[..., schema.hist_index("behaviour")] == 0
    assert pad.any()
    for j, f in enumerate(schema.hist_fields):
        if f.name != "behaviour":
            hist[..., j] = np.where(pad, schema.vocab_sizes[f.vocab] - 1, hist[..., j])
    return dict(batch, hist=hist)


@pytest.mark.parametrize(
    "extractors", [("din",), ("dnn",), ("cnn",), ("bst",), ("din", "dnn", "cnn", "bst")]
)
def test_each_extractor_shapes_and_padding(tiny_data, extractors):
    schema, path = tiny_data
    model = _model(schema, extractors=extractors)
    batch = helpers.first_batch(schema, path, 16)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    logit, aux = model.apply({"params": params}, batch)
    assert logit.shape == (16,)
    for name in extractors:
        assert aux["scores"][name].shape == (16,)
    logit2, aux2 = model.apply({"params": params}, _pad_scramble(schema, batch))
    np.testing.assert_allclose(np.asarray(logit), np.asarray(logit2), rtol=1e-6, atol=1e-6)
    if "din" in extractors:
        c = aux["din"]["event_contribution_BxL"]
        assert c.shape == (16, schema.max_len)
        np.testing.assert_allclose(
            np.asarray(c.sum(1)), np.asarray(aux["scores"]["din"]), rtol=1e-5, atol=1e-6
        )
        mask = batch["hist"][..., schema.hist_index("behaviour")] > 0
        assert np.all(np.asarray(c)[~mask] == 0)
    if "bst" in extractors:
        a = np.asarray(aux["bst"]["attention_BxL"])
        mask = batch["hist"][..., schema.hist_index("behaviour")] > 0
        assert a.shape == (16, schema.max_len) and np.all(a[~mask] == 0) and np.all(a >= 0)
        # The target token's attention to the events plus to itself sums to 1.
        assert np.all(a.sum(1) <= 1 + 1e-5) and np.any(a.sum(1) > 0.01)


def test_attention_normalised_after_the_matmul_equals_softmax_then_matmul():
    """extractors.attend (bst): the values and gradients of softmax(logits) @ v, masked keys
    (logit -1e9) included, and the first query's softmax row."""
    from influence_jax.models.extractors import attend

    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    logits = 3.0 * jax.random.normal(k1, (4, 2, 7, 7))
    logits = jnp.where(jax.random.bernoulli(k3, 0.3, (4, 1, 1, 7)), -1e9, logits)
    v = jax.random.normal(k2, (4, 2, 7, 5))
    w = jax.random.normal(k4, (4, 2, 7, 5))  # a cotangent: a weighted sum of the output

    def ref(lg, vv):
        att = jax.nn.softmax(lg, axis=-1)
        return jnp.matmul(att, vv), att[:, :, 0]

    def loss(fn):
        def f(lg, vv):
            mixed, row = fn(lg, vv)
            return jnp.sum(mixed * w) + jnp.sum(row[..., 1:] ** 2)

        return f

    for got, want in zip(attend(logits, v), ref(logits, v), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-6)
    g_got = jax.grad(loss(attend), argnums=(0, 1))(logits, v)
    g_want = jax.grad(loss(ref), argnums=(0, 1))(logits, v)
    for got, want in zip(g_got, g_want, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-6)
    # A wrong normalisation (over the queries instead of the keys) is told apart.
    bad = jnp.matmul(jax.nn.softmax(logits, axis=-2), v)
    assert not np.allclose(np.asarray(bad), np.asarray(ref(logits, v)[0]), atol=1e-3)


def test_logit_is_the_weighted_sum_of_contributions(tiny_data):
    schema, path = tiny_data
    model = _model(schema)
    batch = helpers.first_batch(schema, path, 32)
    params = model.init(jax.random.PRNGKey(1), batch)["params"]
    params["extractor_logits"] = jnp.array([0.3, -1.0, 0.7])  # unequal weights
    logit, aux = model.apply({"params": params}, batch)
    w = np.exp([0.3, -1.0, 0.7]) / np.exp([0.3, -1.0, 0.7]).sum()
    names = ("din", "dnn", "cnn")
    hand = sum(w[j] * np.asarray(aux["scores"][n]) for j, n in enumerate(names))
    np.testing.assert_allclose(np.asarray(logit), hand + float(aux["bias"]), rtol=1e-5, atol=1e-6)
    for j, n in enumerate(names):
        assert float(aux["extractor_weights"][n]) == pytest.approx(w[j], rel=1e-5)
    assert sum(float(v) for v in aux["extractor_weights"].values()) == pytest.approx(1.0)


def test_behaviour_type_weights_are_non_negative_and_gate_events(tiny_data):
    schema, path = tiny_data
    model = _model(schema, extractors=("din",))
    batch = helpers.first_batch(schema, path, 32)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    params["behaviour_type_logits"] = jnp.array([-30.0, 2.0, -5.0, 0.0])
    _, aux = model.apply({"params": params}, batch)
    g = {t: float(v) for t, v in aux["behaviour_type_weights"].items()}
    assert set(g) == set(schema.behaviour_types) and all(v >= 0 for v in g.values())
    assert g["pv"] < 1e-6 < g["buy"]
    # Events of a type whose gate is ~0 contribute ~nothing.
    types = batch["hist"][..., schema.hist_index("behaviour")]
    c = np.asarray(aux["din"]["event_contribution_BxL"])
    assert np.abs(c[types == 2]).max() < 1e-6 and np.abs(c[types == 3]).max() > 0
    shares = {k: float(v) for k, v in aux["weights"].items() if k.startswith("behaviour/")}
    assert sum(shares.values()) == pytest.approx(1.0)


def test_gradients_reach_every_parameter(tiny_data):
    schema, path = tiny_data
    model = _model(schema)
    batch = helpers.first_batch(schema, path, 64)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]

    def loss(p):
        logit, _ = model.apply({"params": p}, batch)
        return jnp.mean(jnp.square(logit - batch["label"]))

    grads = jax.jit(jax.grad(loss))(params)
    flat = jax.tree_util.tree_flatten_with_path(grads)[0]
    dead = [jax.tree_util.keystr(k) for k, g in flat if not np.any(np.asarray(g) != 0)]
    assert dead == [], dead
    # With gates on the type acts only through its gate: no behaviour embedding table exists.
    assert "embed_behaviour" not in params["embeddings"] and "behaviour_type_logits" in params


def test_unknown_extractor_or_extractor_field_is_a_config_error():
    with pytest.raises(ConfigError, match="config.model.extractors"):
        config_check.check(helpers.tiny_config(**{"model.extractors": ("din", "transformer")}))
    config = helpers.tiny_config()
    with config.unlocked():
        config.model.din.hiden = (8,)  # a typo inside an extractor's own settings
    with pytest.raises(ConfigError, match=r"config.model.din: unknown field\(s\) \['hiden'\]"):
        config_check.check(config)


def test_type_embedding_switch(tiny_data):
    schema, path = tiny_data
    batch = helpers.first_batch(schema, path, 16)
    for on in (False, True):
        model = _model(schema, type_embedding=on)
        params = model.init(jax.random.PRNGKey(0), batch)["params"]
        assert ("embed_behaviour" in params["embeddings"]) == on
        logit, _ = model.apply({"params": params}, batch)
        logit2, _ = model.apply({"params": params}, _pad_scramble(schema, batch))
        np.testing.assert_allclose(np.asarray(logit), np.asarray(logit2), rtol=1e-6, atol=1e-6)
