"""Multi-task heads (models/multitask.py): shared embeddings and one tower per head, the ESMM
chain, the per-head loss against hand-computed BCE, per-head metrics in training, evaluation
and evaluate.py --json, ranking and reports by head, and the config checks."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from influence_jax import config_check, engine, scoring, train
from influence_jax.data import synthetic
from influence_jax.errors import ConfigError, DataError
from influence_jax.models import build_model
from influence_jax.models.multitask import chained_logit
from tests import helpers

HEADS = {
    "engage": {"pv": 1.0, "cart": 0.6, "fav": 0.35, "buy": 0.15},
    "buy": {"pv": 0.15, "cart": 1.0, "fav": 0.6, "buy": 0.35},
}


def _config(**overrides):
    kw = {
        "data.synthetic.task": "conversion",
        "data.synthetic.heads": HEADS,
        "model.name": "multitask",
    }
    kw.update(overrides)
    return helpers.tiny_config(**kw)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    config = _config()
    path = str(tmp_path_factory.mktemp("mt") / "data")
    return synthetic.ensure(config.data.synthetic, path), path


def test_chained_logit_is_the_logit_of_the_product():
    a, b = jnp.array([-3.0, 0.0, 2.0, 8.0]), jnp.array([1.0, -2.0, 0.5, 9.0])
    p = jax.nn.sigmoid(a) * jax.nn.sigmoid(b)
    np.testing.assert_allclose(jax.nn.sigmoid(chained_logit(a, b)), p, rtol=1e-5)


def test_heads_share_the_embeddings_and_each_has_its_tower(data):
    schema, path = data
    assert schema.heads == ("buy", "engage")  # name order, the labels' column order
    model = build_model(_config().model, schema)
    batch = helpers.first_batch(schema, path, 16)
    params = model.init(jax.random.key(0), batch)["params"]
    assert set(params) == {"embeddings", "head_buy", "head_engage"}
    assert "embeddings" not in params["head_buy"]
    logit, aux = model.apply({"params": params}, batch)
    assert set(aux["head_logits"]) == {"buy", "engage"}
    np.testing.assert_array_equal(logit, aux["head_logits"]["engage"])  # default: the last head
    assert "engage/behaviour/pv" in aux["weights"] and "buy/behaviour/pv" in aux["weights"]
    eng = model.clone(objective="buy")
    np.testing.assert_array_equal(
        eng.apply({"params": params}, batch)[0], aux["head_logits"]["buy"]
    )


def test_the_loss_is_the_weighted_sum_of_each_heads_bce(data):
    schema, path = data
    config = _config(**{"model.multitask.loss_weights": {"buy": 2.0}})
    model = build_model(config.model, schema)
    batch = helpers.first_batch(schema, path, 32)
    params = model.init(jax.random.key(0), batch)["params"]
    rng = jax.random.key(1)
    loss, sums = engine.training_loss(model, params, batch, rng)
    _, aux = model.apply({"params": params}, batch, train=True, rngs={"dropout": rng})
    want = 0.0
    for i, (h, w) in enumerate((("buy", 2.0), ("engage", 1.0))):
        bce = optax.sigmoid_binary_cross_entropy(aux["head_logits"][h], batch["labels"][:, i])
        want += w * float(jnp.mean(bce))
        np.testing.assert_allclose(sums[f"heads/{h}/loss_sum"], jnp.sum(bce), rtol=1e-5)
    np.testing.assert_allclose(loss - aux["stats_loss"], want, rtol=1e-5)


def test_training_and_evaluate_report_every_head(tmp_path):
    config = _config(**{"loop.num_steps": 10, "loop.eval_every": 10})
    workdir = str(tmp_path / "run")
    final = train.train_and_evaluate(config, workdir)
    for h in ("buy", "engage"):
        assert 0 <= final[f"test/{h}/auc"] <= 1 and final[f"test/{h}/logloss"] > 0
    assert final["test/auc"] == final["test/engage/auc"]  # the headline: the objective's
    tags = helpers.scalars(workdir)
    assert "valid/buy/auc" in tags and "influence/buy/behaviour/pv" in tags
    r = helpers.run_tool("evaluate", f"--workdir={workdir}", "--json", timeout=180)
    assert r.returncode == 0, r.stderr
    record = json.loads(r.stdout)
    assert set(record["heads"]) == {"buy", "engage"}
    assert record["heads"]["buy"]["auc"] == pytest.approx(final["test/buy/auc"])
    run = scoring.load_run(workdir, objective="buy")
    assert run.model.objective == "buy"
    with pytest.raises(DataError, match=r"--objective=click: not a head of this run; its heads"):
        scoring.load_run(workdir, objective="click")


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model.multitask.objective": "save"}, r"objective: \['save'\] not among"),
        ({"model.multitask.chain": {"buy": "click"}}, r"chain: \['click'\] not among"),
        ({"model.multitask.chain": {"buy": "engage", "engage": "buy"}}, "a parent must be"),
    ],
)
def test_bad_multitask_settings_name_the_field(data, overrides, match):
    schema, _ = data
    with pytest.raises(ConfigError, match=match):
        config_check.check_schema(_config(**overrides), schema)


def test_a_multitask_model_needs_a_dataset_with_heads(tmp_path):
    schema = synthetic.ensure(helpers.tiny_config().data.synthetic, str(tmp_path / "d"))
    with pytest.raises(ConfigError, match="needs a dataset with label heads"):
        config_check.check_schema(_config(), schema)
