"""Train-step tests: loss reference, golden step, learning, device-count invariance."""

import json
import os

import jax
import numpy as np
import pytest

from influence_jax import sharding, train
from tests import helpers

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "one_step.json")


def test_bce_sums_match_numpy_reference():
    rng = np.random.default_rng(0)
    logit = rng.normal(size=100).astype(np.float32) * 3
    label = (rng.random(100) < 0.4).astype(np.float32)
    weight = (rng.random(100) < 0.8).astype(np.float32)
    p = 1 / (1 + np.exp(-logit.astype(np.float64)))
    ref = -(label * np.log(p) + (1 - label) * np.log(1 - p))
    out = jax.device_get(train.bce_sums(logit, label, weight))
    np.testing.assert_allclose(out["loss_sum"], (ref * weight).sum(), rtol=1e-5)
    assert out["count"] == weight.sum()
    np.testing.assert_allclose(out["accuracy_sum"], (((p > 0.5) == (label > 0.5)) * weight).sum())


def _one_step_loss(tiny_data):
    schema, path = tiny_data
    config = helpers.tiny_config()
    _, state, step, mesh = helpers.setup(config, schema, jax.devices()[:1])
    batch = helpers.first_batch(schema, path, config.data.batch_size)
    _, m = step(state, sharding.to_global(batch, mesh))
    return float(m["loss_sum"] / m["count"])


def test_one_step_matches_golden(tiny_data):
    loss = _one_step_loss(tiny_data)
    if os.environ.get("REGENERATE_GOLDEN") == "1":
        with open(GOLDEN, "w") as f:
            json.dump({"tiny_one_step_loss": loss}, f, indent=2)
    with open(GOLDEN) as f:
        golden = json.load(f)["tiny_one_step_loss"]
    assert loss == pytest.approx(golden, rel=1e-5), (
        "one train step on configs/tiny.py changed its loss; if the change is intended, "
        "regenerate with: REGENERATE_GOLDEN=1 pytest tests/test_train.py -k golden"
    )


def test_thirty_steps_on_a_fixed_batch_lower_the_loss(tiny_data):
    schema, path = tiny_data
    config = helpers.tiny_config(**{"model.dropout": 0.0, "opt.schedule": "constant"})
    _, state, step, mesh = helpers.setup(config, schema, jax.devices()[:1])
    batch = sharding.to_global(helpers.first_batch(schema, path, 64), mesh)
    losses = []
    for _ in range(30):
        state, m = step(state, batch)
        losses.append(float(m["loss_sum"] / m["count"]))
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("mesh_over", [{"data": 8, "model": 1}, {"data": 4, "model": 2}])
def test_one_device_and_eight_devices_agree(tiny_data, mesh_over):
    schema, path = tiny_data
    config = helpers.tiny_config(**{"model.dropout": 0.0})
    batch = helpers.first_batch(schema, path, 64)
    results = []
    for devices, shape, shard in (
        (jax.devices()[:1], {"data": 1, "model": 1}, False),
        (jax.devices()[:8], mesh_over, mesh_over["model"] > 1),
    ):
        cfg = helpers.tiny_config(
            **{
                "model.dropout": 0.0,
                "mesh.data": shape["data"],
                "mesh.model": shape["model"],
                "mesh.shard_embeddings": shard,
                "mesh.shard_min_rows": 100,
            }
        )
        _, state, step, mesh = helpers.setup(cfg, schema, devices)
        if shard:
            emb = state.params["embeddings"]["embed_item_id"]
            assert emb.sharding.spec[0] == "model", emb.sharding
        for _ in range(3):
            state, m = step(state, sharding.to_global(batch, mesh))
        results.append((float(m["loss_sum"]), jax.device_get(state.params)))
    assert config.model.dropout == 0.0
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        ),
        results[0][1],
        results[1][1],
    )
