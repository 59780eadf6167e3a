"""Train-step tests: loss reference, golden values after a few steps, learning, device-count
invariance."""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax import engine, sharding, xla_options
from influence_jax.data import pipeline
from influence_jax.data.store import ExampleStore
from influence_jax.errors import ConfigError
from tests import helpers

GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "tiny_steps.json")
GOLDEN_STEPS = 5
REGENERATE = "REGENERATE_GOLDEN=1 python -m pytest tests/test_train.py -k golden"


def test_bce_sums_match_numpy_reference():
    rng = np.random.default_rng(0)
    logit = rng.normal(size=100).astype(np.float32) * 3
    label = (rng.random(100) < 0.4).astype(np.float32)
    weight = (rng.random(100) < 0.8).astype(np.float32)
    p = 1 / (1 + np.exp(-logit.astype(np.float64)))
    ref = -(label * np.log(p) + (1 - label) * np.log(1 - p))
    out = jax.device_get(engine.bce_sums(logit, label, weight))
    np.testing.assert_allclose(out["loss_sum"], (ref * weight).sum(), rtol=1e-5)
    assert out["count"] == weight.sum()
    np.testing.assert_allclose(out["accuracy_sum"], (((p > 0.5) == (label > 0.5)) * weight).sum())


def _tiny_steps(tiny_data) -> dict[str, list[float]]:
    """Loss, gradient norm, learning rate and learned weights of the first tiny steps (1 device,
    the training pipeline's own batches)."""
    schema, path = tiny_data
    config = helpers.tiny_config()
    eng, state = helpers.setup(config, schema, jax.devices()[:1])
    batches = pipeline.TrainBatches(ExampleStore(path, "train", schema), 64, 0, GOLDEN_STEPS)
    out: dict[str, list[float]] = {}
    for i in range(GOLDEN_STEPS):
        state, m = eng.train_step(state, sharding.to_global(batches[i], eng.mesh))
        m = {k: float(v) for k, v in jax.device_get(m).items()}
        row = {"loss": m["loss_sum"] / m["count"], "grad_norm": m["grad_norm"]}
        row["learning_rate"] = m["learning_rate"]
        for k, v in row.items():
            out.setdefault(k, []).append(v)
    gates = jax.device_get(state.params["behaviour_type_logits"])
    ext = jax.device_get(state.params["extractor_logits"])
    out["behaviour_type_logits"] = [float(x) for x in gates]
    out["extractor_logits"] = [float(x) for x in ext]
    return out


def test_tiny_steps_match_golden(tiny_data):
    """The trainer's numbers after a few steps of configs/tiny.py (losses, gradient norms,
    the learned gates and extractor logits) against stored values, as nanodo tests its trainer."""
    got = _tiny_steps(tiny_data)
    if os.environ.get("REGENERATE_GOLDEN") == "1":
        with open(GOLDEN, "w") as f:
            json.dump(got, f, indent=2)
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert set(got) == set(golden)
    for key, want in golden.items():
        np.testing.assert_allclose(
            got[key],
            want,
            rtol=1e-4,
            atol=1e-6,
            err_msg=f"{key} after {GOLDEN_STEPS} tiny train steps changed; if the change is "
            f"intended, regenerate with: {REGENERATE}",
        )
    # The gates and extractor logits moved from their equal starting values: the golden values
    # check the learned influence weights, not only the loss.
    assert np.ptp(golden["behaviour_type_logits"]) > 1e-4
    assert np.ptp(golden["extractor_logits"]) > 1e-4


def test_small_models_compile_init_fast_on_cpu_and_draw_the_same_state(tiny_data, monkeypatch):
    schema, _ = tiny_data
    eng, fast = helpers.setup(helpers.tiny_config(), schema)
    shapes = eng.abstract_state
    assert engine.init_compiler_options(eng.mesh, shapes) == xla_options.FAST_COMPILE
    monkeypatch.setattr(xla_options, "FAST_COMPILE_MAX_ELEMENTS", 1000)
    assert engine.init_compiler_options(eng.mesh, shapes) is None
    # The same init compiled with XLA:CPU's usual options (over this process's fast ones).
    init = jax.jit(
        eng.init_fn.__wrapped__,
        out_shardings=eng.state_shardings,
        compiler_options=helpers.USUAL_COMPILE,
    )
    state = init(jax.random.PRNGKey(eng.seed))
    helpers.assert_trees_close(fast.params, state.params, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(fast.rng, state.rng)
    assert any(np.abs(x).max() > 0.01 for x in jax.tree_util.tree_leaves(state.params))


def test_thirty_steps_on_a_fixed_batch_lower_the_loss(tiny_data):
    schema, path = tiny_data
    no_dropout = {f"model.{e}.dropout": 0.0 for e in ("cnn", "dnn")}
    config = helpers.tiny_config(**no_dropout, **{"opt.schedule": "constant"})
    eng, state = helpers.setup(config, schema, jax.devices()[:1])
    batch = sharding.to_global(helpers.first_batch(schema, path, 64), eng.mesh)
    losses = []
    for _ in range(30):
        state, m = eng.train_step(state, batch)
        losses.append(float(m["loss_sum"] / m["count"]))
    assert losses[-1] < 0.85 * losses[0], losses


@pytest.mark.parametrize("mesh_over", [{"data": 8, "model": 1}, {"data": 4, "model": 2}])
def test_one_device_and_eight_devices_agree(tiny_data, mesh_over):
    schema, path = tiny_data
    batch = helpers.first_batch(schema, path, 64)
    results = []
    for devices, shape, shard in (
        (jax.devices()[:1], {"data": 1, "model": 1}, False),
        (jax.devices()[:8], mesh_over, mesh_over["model"] > 1),
    ):
        cfg = helpers.tiny_config(
            **{
                "mesh.data": shape["data"],
                "mesh.model": shape["model"],
                "mesh.shard_embeddings": shard,
                "mesh.shard_min_rows": 100,
            }
        )
        eng, state = helpers.setup(cfg, schema, devices)
        if shard:
            emb = state.params["embeddings"]["embed_item_id"]
            assert emb.sharding.spec[0] == "model", emb.sharding
        for _ in range(3):
            state, m = eng.train_step(state, sharding.to_global(batch, eng.mesh))
        results.append((float(m["loss_sum"]), jax.device_get(state.params)))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-5)
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(
            a, b, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        ),
        results[0][1],
        results[1][1],
    )


def _after_steps(tiny_data, blocks: int, devices, steps: int = 2, **overrides):
    """(last metrics, params) after `steps` train steps on one batch with `blocks` blocks."""
    schema, path = tiny_data
    batch = helpers.first_batch(schema, path, 64)
    over = {"opt.schedule": "constant", "opt.grad_blocks": blocks, **overrides}
    eng, state = helpers.setup(helpers.tiny_config(**over), schema, devices)
    for _ in range(steps):
        state, m = eng.train_step(state, sharding.to_global(batch, eng.mesh))
    return jax.device_get(m), jax.device_get(state.params)


@pytest.mark.parametrize("sparse_tables", [False, True], ids=["dense", "row-sparse"])
@pytest.mark.parametrize("n_devices", [1, 8])
def test_gradient_blocks_add_up_to_the_whole_batchs_gradient(tiny_data, n_devices, sparse_tables):
    """Without dropout or batch statistics (the seed CNN), the step's gradient in two row blocks
    per device is the whole batch's: the same metrics and parameters after two steps, with
    dense Adam and with row-sparse tables, on one device and on eight."""
    over = {
        "model.name": "seed_cnn",
        "model.seed_cnn.dropout": 0.0,
        "opt.sparse_embeddings": sparse_tables,
        "opt.sparse_min_rows": 100,
    }
    devices = jax.devices()[:n_devices]
    (m1, p1), (m2, p2) = (_after_steps(tiny_data, b, devices, **over) for b in (1, 2))
    assert m1["count"] == m2["count"] == 64
    for k in ("loss_sum", "accuracy_sum", "grad_norm"):
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-5, err_msg=k)
    jax.tree_util.tree_map_with_path(
        lambda path, a, b: np.testing.assert_allclose(
            b, a, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path)
        ),
        p1,
        p2,
    )


def test_gradient_blocks_log_the_weights_once_and_fit_the_mean_of_the_blocks(tiny_data):
    """The ranker in two blocks: the logged influence weights are the parameters' (not a sum
    over blocks), the counts add up, and the running mean of each extractor's score moves to the
    mean of the blocks' means, the batch's mean (equal blocks, no dropout)."""
    over = {f"model.{e}.dropout": 0.0 for e in ("cnn", "dnn")}
    (m1, p1), (m2, p2) = (_after_steps(tiny_data, b, jax.devices()[:1], 1, **over) for b in (1, 2))
    weights = [k for k in m1 if k.startswith("weights/")]
    assert weights and m2["count"] == m1["count"] == 64
    for k in weights:
        np.testing.assert_allclose(m2[k], m1[k], rtol=1e-6, err_msg=k)
    np.testing.assert_allclose(p2["score_mean"], p1["score_mean"], rtol=1e-5, atol=1e-7)
    # The variance fits the blocks' own variances, which leave out the spread between blocks.
    assert not np.allclose(p2["score_var"], p1["score_var"], rtol=1e-6, atol=0)


class _RowMeanWeight(nn.Module):
    """A logit x * w whose logged influence weight is a mean over the batch's rows."""

    @nn.compact
    def __call__(self, batch, train=False):
        w = self.param("w", nn.initializers.ones, (1,))
        return batch["x"] * w[0], {"weights": {"row_mean": jnp.mean(batch["x"])}}


def test_gradient_blocks_log_the_batchs_mean_of_a_row_dependent_weight():
    """A weight that is a mean over rows (a mixture model's expert gates) is logged as the whole
    batch's mean, the mean of the equal blocks' means, not one block's; the loss sum adds up."""
    model = _RowMeanWeight()
    batch = {
        "x": jnp.arange(8, dtype=jnp.float32),
        "label": jnp.array([0, 1] * 4, jnp.float32),
        "weight": jnp.ones(8),
    }
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    rng = jax.random.PRNGKey(1)
    g1, s1 = engine.training_grads(model, params, batch, rng, blocks=1)
    g2, s2 = engine.training_grads(model, params, batch, rng, blocks=2)
    assert float(s1["weights/row_mean"]) == 3.5
    np.testing.assert_allclose(s2["weights/row_mean"], 3.5, rtol=1e-6)
    np.testing.assert_allclose(s2["loss_sum"], s1["loss_sum"], rtol=1e-6)
    np.testing.assert_allclose(g2["w"], g1["w"], rtol=1e-5)


def test_gradient_blocks_that_do_not_split_the_batch_name_the_field(tiny_data):
    schema, path = tiny_data
    config = helpers.tiny_config(**{"opt.grad_blocks": 3})
    eng, state = helpers.setup(config, schema, jax.devices()[:1])
    batch = sharding.to_global(helpers.first_batch(schema, path, 64), eng.mesh)
    with pytest.raises(ConfigError, match=r"config.opt.grad_blocks=3: the batch \(\[64\] rows\)"):
        eng.train_step(state, batch)


def test_a_mesh_rule_that_matches_no_parameter_is_warned_of(caplog):
    from jax.sharding import PartitionSpec as P

    shapes = {"params": {"embeddings": {"embed_item_id": jax.ShapeDtypeStruct((8, 4), "f4")}}}
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
    rules = [("embed_itme", P("model", None)), ("embed_item_id$", P("model", None))]
    with caplog.at_level("WARNING"):
        out = sharding.tree_shardings(shapes, rules, mesh)
    assert out["params"]["embeddings"]["embed_item_id"].spec == P("model", None)
    assert "('embed_itme', P('model', None)) matches no parameter path" in caplog.text
    assert "embed_item_id$" not in caplog.text
