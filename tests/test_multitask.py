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
from influence_jax.models.multitask import chained_logit, objective_vector
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
    # A combination ranks by the weighted mean of the heads' probabilities (as a logit); its
    # heaviest head gives the metrics' label and the reported weights.
    mix = model.clone(objective="buy + 3*engage")
    assert mix.objective_head == "engage"
    p = (
        jax.nn.sigmoid(aux["head_logits"]["buy"]) / 4
        + jax.nn.sigmoid(aux["head_logits"]["engage"]) * 0.75
    )
    np.testing.assert_allclose(
        jax.nn.sigmoid(mix.apply({"params": params}, batch)[0]), p, rtol=1e-5
    )


def test_mmoe_heads_mix_shared_experts_and_keep_the_additive_readout(data):
    schema, path = data
    model = build_model(_config(**{"model.multitask.mixture": "mmoe"}).model, schema)
    batch = helpers.first_batch(schema, path, 16)
    params = model.init(jax.random.key(0), batch)["params"]
    assert set(params) == {
        "embeddings", "expert_0", "expert_1", "expert_2", "gate_buy", "gate_engage",
        "bias_buy", "bias_engage",
    }  # fmt: skip
    params = jax.tree_util.tree_map(  # break the symmetric start (equal gates, equal experts)
        lambda x: x + 0.3 * jax.random.normal(jax.random.key(x.size), x.shape), params
    )
    heads = {}
    for h in ("buy", "engage"):
        logit, aux = model.clone(objective=h).apply({"params": params}, batch)
        heads[h] = aux
        # The head's logit is still the sum of its extractor contributions and its bias.
        np.testing.assert_allclose(
            logit, sum(aux["contributions"].values()) + aux["bias"], rtol=1e-5, atol=1e-5
        )
        gates = np.array([float(g) for g in aux["expert_gates"].values()])
        assert gates.shape == (3,) and gates.sum() == pytest.approx(1.0, abs=1e-5)
        shares = [float(aux["weights"][f"behaviour/{t}"]) for t in schema.behaviour_types]
        assert sum(shares) == pytest.approx(1.0, abs=1e-5)
    # Each head has its own gate, hence its own mixture and its own reported weights.
    assert not np.allclose(
        list(heads["buy"]["expert_gates"].values()), list(heads["engage"]["expert_gates"].values())
    )


@pytest.mark.parametrize(
    "multitask",
    [{}, {"mixture": "mmoe"}, {"chain": {"buy": "engage"}}],
    ids=["towers", "mmoe", "chain"],
)
def test_an_objective_in_the_parameters_scores_as_the_static_one(data, multitask):
    """`runtime_objective` (scoring.with_objective): the objective's weights as a parameter
    give each head's and a mix's logit and aux as the static objective does, one program."""
    schema, path = data
    overrides = {f"model.multitask.{k}": v for k, v in multitask.items()}
    model = build_model(_config(**overrides).model, schema)
    batch = helpers.first_batch(schema, path, 16)
    params = model.init(jax.random.key(0), batch)["params"]
    switchable = model.clone(runtime_objective=True)
    init = switchable.init(jax.random.key(0), batch)["params"]["objective_weights"]
    assert init.tolist() == [0.0, 1.0]  # the static objective's (the last head) at first
    apply = jax.jit(lambda p, b: switchable.apply({"params": p}, b))
    for objective in ("buy", "engage", "buy + 3*engage", "3*buy+engage"):
        want = model.clone(objective=objective).apply({"params": params}, batch)
        weights = jnp.asarray(objective_vector(objective, schema.heads))
        got = apply(dict(params, objective_weights=weights), batch)
        helpers.assert_trees_close(got, want, rtol=1e-5, atol=1e-6)
    assert apply._cache_size() == 1


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


def _trained(tmp_path, mixture: str) -> tuple[dict, str]:
    """(final metrics, workdir) of a 10-step multi-task run with `mixture`."""
    config = _config(
        **{"loop.num_steps": 10, "loop.eval_every": 10, "model.multitask.mixture": mixture}
    )
    workdir = str(tmp_path / "run")
    return train.train_and_evaluate(config, workdir), workdir


# mmoe in the slow tier (about 60 s): the default tier stays under CI's 8 minutes.
@pytest.mark.parametrize("mixture", ["towers", pytest.param("mmoe", marks=pytest.mark.slow)])
def test_training_and_evaluate_give_every_heads_metrics(tmp_path, mixture):
    final, workdir = _trained(tmp_path, mixture)
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
    assert scoring.load_run(workdir, objective="2*buy+engage").model.objective_head == "buy"
    with pytest.raises(DataError, match=r"--objective=click: 'click' is not a head of this run"):
        scoring.load_run(workdir, objective="click")
    if mixture != "towers":
        return
    # Loaded switchable, the run moves between heads with the programs it compiled.
    switchable = scoring.load_run(workdir, switchable=True)
    assert switchable.objective_head == "engage"
    buy = scoring.with_objective(switchable, "buy")
    assert buy.objective_head == "buy" and buy.programs is switchable.programs
    store = run.dataset.examples("test")
    gather = lambda rows: {
        k: v for k, v in store.gather(rows).items() if k in ("user", "item", "hist")
    }

    def scores(r: scoring.Run) -> np.ndarray:
        fn = scoring.program(r, "score", r.engine.score_fn)
        return scoring.batched(fn, r, 40, gather, scoring.global_batch(r, 40))

    np.testing.assert_allclose(scores(buy), scores(run), rtol=1e-5, atol=1e-6)
    assert not np.allclose(scores(switchable), scores(buy))  # engage's, by the same program
    assert len(switchable.programs) == 1
    with pytest.raises(DataError, match=r"--objective=click: 'click' is not a head"):
        scoring.with_objective(switchable, "click")


@pytest.mark.slow  # compiles the report's programs (once for both heads): 43 s on 2 cores
def test_influence_report_of_every_head_and_the_heads_side_by_side(tmp_path):
    _, workdir = _trained(tmp_path, "mmoe")
    out = tmp_path / "heads"
    args = [f"--workdir={workdir}", f"--output={out}", "--objective=each"]
    r = helpers.run_tool(
        "influence_report", *args, "--max_examples=64", "--bootstrap=20", "--sample=8",
        timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    side = json.loads((out / "heads.json").read_text())
    assert side["heads"] == ["buy", "engage"]
    shares = side["behaviour_types"]["cart"]["share"]
    assert set(shares) == {"buy", "engage"} and all(0 <= v <= 1 for v in shares.values())
    assert set(side["behaviour_types"]["cart"]["planted_weight"]) == {"buy", "engage"}
    assert (out / "behaviour_influence_heads.png").stat().st_size > 0
    for h in ("buy", "engage"):
        assert json.loads((out / f"head_{h}" / "influence.json").read_text())["head"] == h
    assert "heads side by side" in r.stdout and "behaviour cart" in r.stdout


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model.multitask.objective": "save"}, r"objective: save: 'save' is not a head"),
        ({"model.multitask.objective": "buy+x*engage"}, r"'x' in 'x\*engage' is not a number"),
        ({"model.multitask.objective": "buy+buy"}, "name each head once"),
        ({"model.multitask.objective": "buy+0.3*"}, r"the term '0.3\*' names no head; write"),
        ({"model.multitask.objective": "buy+"}, r"the term '' names no head"),
        ({"model.multitask.chain": {"buy": "click"}}, r"chain: \['click'\] not among"),
        ({"model.multitask.chain": {"buy": "engage", "engage": "buy"}}, "a parent must be"),
        ({"model.multitask.mixture": "ple"}, r"mixture: 'ple'; choose from \('towers', 'mmoe'\)"),
        ({"model.multitask.mixture": "mmoe", "model.multitask.experts": 0}, "experts: must be"),
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


def test_heads_side_by_side_flags_orders_that_differ():
    from influence_jax import influence_heads

    report = lambda shares: {
        "behaviour_types": {t: {"share": v, "gate_normalised": v} for t, v in shares.items()},
        "extractors": {"din": {"share": 1.0, "weight": 0.5}},
    }
    side = influence_heads.side_by_side(
        {"engage": report({"pv": 0.6, "cart": 0.4}), "buy": report({"pv": 0.3, "cart": 0.7})}
    )
    assert side["behaviour_types"]["cart"]["share"] == {"engage": 0.4, "buy": 0.7}
    assert side["orders"]["share"] == {
        "per_head": {"engage": ["pv", "cart"], "buy": ["cart", "pv"]},
        "same": False,
    }
    text = "\n".join(influence_heads.lines(side))
    assert "order by share differs between heads (engage: pv > cart; buy: cart > pv)" in text
    # A combined report (several runs) gives its means.
    combined = {
        "behaviour_types": {"pv": {"share": {"mean": 0.5, "ci_low": 0.4}}},
        "extractors": {},
    }
    assert influence_heads.side_by_side({"a": combined})["behaviour_types"]["pv"]["share"] == {
        "a": 0.5
    }


def test_a_single_task_run_has_no_objective_to_name_or_switch():
    with pytest.raises(DataError, match=r"^--objective=buy: not a head of this run; it is single"):
        scoring._check_objective("buy", ())
    with pytest.raises(DataError, match="a single-task run has one objective; there are no heads"):
        scoring._check_objective("", ())
    scoring._check_objective("2*buy+click", ("click", "buy"))  # heads of the run: fine
