"""The "rates" extractor: the label's smoothed train rates per id, leave-one-out in training,
read from frozen tables filled from the train split and kept in the checkpoint."""

import jax
import numpy as np
import pytest

from influence_jax import config_check, optim, scoring, sparse, train
from influence_jax.data import pipeline
from influence_jax.data.schema import RAW_IDS
from influence_jax.data.store import ExampleStore
from influence_jax.errors import ConfigError, DataError
from influence_jax.models import build_model
from influence_jax.models.extractors import RATE_PRIOR, id_fields, train_rate_tables
from tests import helpers

RATES = ("din", "cnn", "rates")


def test_tables_count_each_ids_positives_and_examples():
    fields = (("user_id", "user", 0, 5), ("category", "item", 1, 4))
    user = np.array([[2], [2], [3], [4], [2]])
    item = np.array([[7, 2], [8, 3], [7, 3], [9, 3], [7, 2]])
    label = np.array([1, 0, 1, 0, 0], np.float32)
    t = train_rate_tables(fields, user, item, label)
    np.testing.assert_array_equal(t["frozen_positives_user_id"], [0, 0, 1, 1, 0])
    np.testing.assert_array_equal(t["frozen_examples_user_id"], [0, 0, 3, 1, 1])
    np.testing.assert_array_equal(t["frozen_positives_category"], [0, 0, 1, 1])
    np.testing.assert_array_equal(t["frozen_examples_category"], [0, 0, 2, 3])
    assert t["frozen_rate"] == pytest.approx(0.4)


@pytest.mark.parametrize("column", ["label", "item"])
def test_the_columns_counted_are_checked_as_training_reads_rows(tiny_data, tmp_path, column):
    """The tables are counted from whole columns (not through gather): a NaN label or an id
    outside its vocabulary stops the fill with the split, row and field named, as a batch
    holding that row would."""
    schema, path = tiny_data
    if column == "label":
        at, value = 3, np.nan
        want = r"train: row 3: label is nan"
    else:
        at, value = (5, 0), schema.vocab_sizes["item_id"]  # one past the vocabulary
        want = r"train: row 5: item field 'item_id' holds id \d+, outside vocabulary"
    damage = lambda values: values.__setitem__(at, value)
    copy = helpers.damaged_copy(path, tmp_path / "data", schema, "train", column, damage)
    store = ExampleStore(copy, "train", schema)
    with pytest.raises(DataError, match=want + r".*prepare it again"):
        store.checked_columns(("user", "item", "label"))
    view = pipeline.StoreView(store, np.arange(2, 10))  # a time range's rows
    with pytest.raises(DataError, match=want):
        view.checked_columns(("user", "item", "label"))
    config = helpers.tiny_config(**{"model.extractors": RATES})
    eng, state = helpers.setup(config, schema)
    with pytest.raises(DataError, match=want):
        train.with_train_rates(state, eng, config, store)


def _filled(schema, path, model):
    """The model's parameters with its rate tables filled from the train split."""
    batch = helpers.first_batch(schema, path, 8)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    store = ExampleStore(path, "train", schema)
    cols = (store.column(k) for k in ("user", "item", "label"))
    tables = train_rate_tables(id_fields(schema), *cols)
    assert set(tables) == {k for k in params["rates"] if k.startswith("frozen_")}
    return dict(params, rates=dict(params["rates"], **tables)), tables, store


def test_training_leaves_each_examples_own_label_out(tiny_data):
    """In training an example sees the counts without itself: its logit equals the evaluation
    logit under tables from which that one example was removed."""
    schema, path = tiny_data
    model = build_model(
        helpers.tiny_config(
            **{"model.extractors": ("rates",), "model.normalise_scores": False}
        ).model,
        schema,
    )
    params, tables, store = _filled(schema, path, model)
    ex = store.gather(np.arange(6))
    fields = id_fields(schema)
    for i in range(6):
        one = {k: ex[k][i : i + 1] for k in ("user", "item", "hist", "label")}
        trained, _ = model.apply({"params": params}, one, train=True)
        left_out = dict(tables)
        for name, group, col, _ in fields:
            v = int(one[group][0, col])
            for kind, minus in (("positives", one["label"][0]), ("examples", 1.0)):
                t = left_out[f"frozen_{kind}_{name}"].copy()
                t[v] -= minus
                left_out[f"frozen_{kind}_{name}"] = t
        held_out, _ = model.apply({"params": dict(params, rates=dict(params["rates"], **left_out))},
                                  one)  # fmt: skip
        np.testing.assert_allclose(np.asarray(trained), np.asarray(held_out), rtol=1e-5)
    # And the evaluation logit differs from the training one (the label is in its counts).
    batch = {k: ex[k] for k in ("user", "item", "hist", "label")}
    a, _ = model.apply({"params": params}, batch, train=True)
    b, _ = model.apply({"params": params}, batch)
    assert np.abs(np.asarray(a) - np.asarray(b)).max() > 1e-4


def test_smoothed_rate_of_an_unseen_id_is_the_overall_rate(tiny_data):
    """Ids the train split never held read (0 + a r) / (0 + a) = r: log(rate / r) = 0, and
    log1p(0) = 0: the rates score of such an example is the MLP at zero."""
    schema, path = tiny_data
    config = helpers.tiny_config(**{"model.extractors": ("rates",)})
    model = build_model(config.model, schema)
    params, tables, store = _filled(schema, path, model)
    r = float(tables["frozen_rate"])
    assert 0 < r < 1 and RATE_PRIOR > 0
    empty = {k: np.zeros_like(v) if k != "frozen_rate" else v for k, v in tables.items()}
    one = {k: v[:4] for k, v in store.gather(np.arange(4)).items()}
    one = {k: one[k] for k in ("user", "item", "hist")}
    s = lambda p: np.asarray(model.apply({"params": p}, one)[1]["raw_scores"]["rates"])
    zero = s(dict(params, rates=dict(params["rates"], **empty)))
    np.testing.assert_allclose(zero, zero[0])  # every example alike: no counts, no difference
    assert np.abs(s(params) - zero).max() > 1e-4


def test_the_optimizer_never_updates_frozen_tables():
    params = {"rates": {"frozen_rate": np.float32(0.3), "mlp": {"w": np.ones(3, np.float32)}},
              "embed": np.ones(2, np.float32)}  # fmt: skip
    labels = optim.param_labels(params)
    assert labels["rates"]["frozen_rate"] == "frozen" and labels["embed"] == "default"
    config = helpers.tiny_config(
        **{"opt.name": "adamw", "opt.weight_decay": 0.1, "opt.warmup_steps": 0}
    )
    tx = optim.make_optimizer(config.opt, 10)
    grads = jax.tree_util.tree_map(lambda x: np.ones_like(x), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    assert float(updates["rates"]["frozen_rate"]) == 0.0
    assert np.abs(np.asarray(updates["rates"]["mlp"]["w"])).min() > 0


def test_sparse_tables_keep_the_raw_ids_for_per_id_tables(tiny_data):
    """The sparse train step remaps user and item ids to rows of its gathered tables; the rate
    tables read the ids as they were, so the logits stay those of the full tables."""
    schema, path = tiny_data
    model = build_model(helpers.tiny_config(**{"model.extractors": RATES}).model, schema)
    params, _, _ = _filled(schema, path, model)
    batch = helpers.first_batch(schema, path, 16)
    vocabs = ("user_id", "item_id")
    vparams, remapped, _ = sparse.gather_rows(params, batch, schema, vocabs)
    np.testing.assert_array_equal(np.asarray(remapped[RAW_IDS["user"]]), batch["user"])
    np.testing.assert_array_equal(np.asarray(remapped[RAW_IDS["item"]]), batch["item"])
    assert not np.array_equal(np.asarray(remapped["item"]), batch["item"])
    full, _ = model.apply({"params": params}, batch)
    virt, _ = model.apply({"params": vparams}, remapped)
    np.testing.assert_allclose(np.asarray(full), np.asarray(virt), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("sparse_rows", [0, 100])
def test_training_fills_the_tables_and_keeps_them(tmp_path, sparse_rows):
    """A run with "rates" starts from the train split's counts, and its checkpoint holds them
    unchanged after training (dense and row-sparse embeddings), and ranking reads them."""
    over = {"model.extractors": RATES, "loop.num_steps": 6, "loop.eval_every": 3,
            "ckpt.every": 3, "data.synthetic.train_examples": 512}  # fmt: skip
    if sparse_rows:
        over["opt.sparse_min_rows"] = sparse_rows  # user_id (202) and item_id (502) tables
    else:
        over["opt.sparse_embeddings"] = False
    config = helpers.tiny_config(**over)
    train.train_and_evaluate(config, str(tmp_path))
    run = scoring.load_run(str(tmp_path))
    store = ExampleStore(run.data_path, "train", run.schema)
    cols = (store.column(k) for k in ("user", "item", "label"))
    want = train_rate_tables(id_fields(run.schema), *cols)
    for name, value in want.items():
        np.testing.assert_array_equal(np.asarray(run.params["rates"][name]), value)
    assert float(np.asarray(want["frozen_examples_user_id"]).sum()) == 512


def test_a_mixture_of_experts_refuses_rates():
    config = helpers.tiny_config(
        **{"model.name": "multitask", "model.extractors": RATES, "model.multitask.mixture": "mmoe"}
    )
    with pytest.raises(ConfigError, match="'rates'.*mmoe"):
        config_check.check(config)


def test_each_multitask_tower_counts_and_leaves_out_its_own_heads_label(tmp_path):
    """A tower per head: each tower's tables count that head's labels, and in training each
    tower leaves the example's label of its head out (its logit equals the evaluation logit
    under that head's tables without the example)."""
    heads = {"engage": {"pv": 1.0, "cart": 0.6, "fav": 0.35, "buy": 0.15},
             "buy": {"pv": 0.15, "cart": 1.0, "fav": 0.6, "buy": 0.35}}  # fmt: skip
    config = helpers.tiny_config(
        **{
            "data.synthetic.task": "conversion",
            "data.synthetic.heads": heads,
            "model.name": "multitask",
            "model.extractors": ("match", "rates"),
            "model.normalise_scores": False,
            "loop.num_steps": 4,
            "loop.eval_every": 0,
            "ckpt.every": 4,
        }  # fmt: skip
    )
    train.train_and_evaluate(config, str(tmp_path))
    run = scoring.load_run(str(tmp_path))
    store = ExampleStore(run.data_path, "train", run.schema)
    fields, labels = id_fields(run.schema), store.column("labels")
    ids = [store.column(k) for k in ("user", "item")]
    assert set(run.schema.heads) == {"engage", "buy"}
    for i, h in enumerate(run.schema.heads):
        want = train_rate_tables(fields, *ids, labels[:, i])
        got = run.params[f"head_{h}"]["rates"]
        for name, value in want.items():
            np.testing.assert_array_equal(np.asarray(got[name]), value)
    assert labels[:, 0].sum() != labels[:, 1].sum()  # the heads' tables differ
    # Training: the buy head's tower without each example's own buy label.
    differ = np.flatnonzero(labels[:, 0] != labels[:, 1])[:1]  # a head swap would show
    ex = store.gather(differ)
    one = {k: ex[k] for k in ("user", "item", "hist", "labels")}
    model, params = run.model, run.params
    rngs = {"dropout": jax.random.PRNGKey(0)}  # dropouts of rate 0 still ask for a key
    _, aux = model.apply({"params": params}, one, train=True, rngs=rngs)
    buy = run.schema.heads.index("buy")
    tables = dict(params["head_buy"]["rates"])
    for name, group, col, _ in fields:
        v = int(one[group][0, col])
        for kind, minus in (("positives", one["labels"][0, buy]), ("examples", 1.0)):
            t = np.array(tables[f"frozen_{kind}_{name}"])
            t[v] -= minus
            tables[f"frozen_{kind}_{name}"] = t
    held = dict(params, head_buy=dict(params["head_buy"], rates=tables))
    _, aux_held = model.apply({"params": held}, one)
    np.testing.assert_allclose(
        np.asarray(aux["head_logits"]["buy"]), np.asarray(aux_held["head_logits"]["buy"]),
        rtol=1e-5,
    )  # fmt: skip
