"""The data side of multi-task learning: one label per head (`labels` [N, H] beside `label`).

Prepared conversion data with --heads checked by hand against a tiny log, the pipeline carrying
`labels` with `label` (train, eval padding, processes, resume), the export's per-head columns,
the synthetic generator's per-head planted weights, and clear errors for bad heads.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import multitask
from influence_jax import config_check
from influence_jax.data import audit, export, pipeline, prepare, synthetic
from influence_jax.data.dataset import Dataset
from influence_jax.data.schema import DataError
from influence_jax.data.store import ExampleStore
from influence_jax.errors import ConfigError
from tests.helpers import ITEM, ROOT, prepare_log, rows, tiny_config, write

PV, CART, FAV, BUY = 2, 3, 4, 5  # behaviour ids (type k -> k + 2)

# user, item, category, behaviour, time. Boundaries valid 500, test 900; horizon 100 s.
LOG = """\
1,10,1,pv,100
1,10,1,cart,150
1,10,1,buy,190
1,11,1,pv,200
1,11,1,cart,250
1,11,1,buy,350
1,12,2,pv,300
1,12,2,fav,320
1,13,2,pv,450
1,13,2,buy,460
2,10,1,cart,110
2,10,1,pv,120
2,10,1,buy,220
2,12,2,pv,600
2,12,2,cart,600
2,11,1,pv,700
3,11,1,pv,950
3,11,1,buy,960
3,12,2,pv,1150
3,12,2,cart,1200
"""
# Per split: (user_key, raw item, time) -> (label, [cart, buy]) of every mature exposure.
EXPECTED = {
    "train": {
        (0, 10, 100): (1.0, [1.0, 1.0]),  # cart 50 s and buy 90 s later
        (0, 11, 200): (1.0, [1.0, 0.0]),  # cart 50 s later; buy 150 s later: past the horizon
        (0, 12, 300): (0.0, [0.0, 0.0]),  # only a fav, not a head
        (1, 10, 120): (1.0, [0.0, 1.0]),  # buy exactly 100 s later; the cart came before
    },
    # user 0's view at 450: its horizon reaches valid_start 500, dropped (buy or not).
    "valid": {
        (1, 12, 600): (1.0, [1.0, 0.0]),  # a cart at the view's own second converts it
        (1, 11, 700): (0.0, [0.0, 0.0]),
    },
    # user 2's view at 1150 + 100 s reaches the end of the log (1201): dropped.
    "test": {(2, 11, 950): (1.0, [0.0, 1.0])},
}


def _prepare(tmp_path, **kw):
    base = dict(task="conversion", heads=("cart", "buy"), horizon_hours=100 / 3600,
                session_gap_minutes=1.0)  # fmt: skip
    out = tmp_path / "mt"
    return prepare_log(write(tmp_path / "log.csv", LOG), out, **{**base, **kw}), out


def _by_exposure(cols):
    raw = {v: k for k, v in ITEM.items()}
    keys = zip(
        cols["user_key"].tolist(), cols["item"][:, 0].tolist(), cols["timestamp"].tolist(),
        strict=True,
    )  # fmt: skip
    return {
        (u, raw[i], t): (float(label), labels.tolist())
        for (u, i, t), label, labels in zip(keys, cols["label"], cols["labels"], strict=True)
    }


def test_head_labels_match_the_log_by_hand(tmp_path):
    schema, out = _prepare(tmp_path)
    for split, want in EXPECTED.items():
        cols = rows(out, split)
        assert cols["labels"].dtype == np.float32 and cols["labels"].shape == (len(want), 2)
        assert _by_exposure(cols) == want, split
        # `label`: any target converts; the targets default to the heads.
        np.testing.assert_array_equal(cols["label"], cols["labels"].max(1))
        assert set(cols["target_type"].tolist()) <= {PV}
    assert schema.heads == ("cart", "buy")
    assert schema.label["heads"] == ["cart", "buy"]
    assert schema.label["target_behaviours"] == ["cart", "buy"]
    c = schema.extra["counts"]
    assert (c["exposures"], c["exposures_immature"]) == (9, 2)
    assert (c["conversions"], c["conversions_cart"], c["conversions_buy"]) == (5, 3, 3)
    assert schema.splits["train"]["label_sum"] == 3.0
    assert schema.splits["train"]["label_sums"] == {"cart": 2.0, "buy": 2.0}
    assert schema.splits["valid"]["label_sums"] == {"cart": 1.0, "buy": 0.0}
    assert audit.audit_leakage(str(out))["rows"] == {"train": 4, "valid": 2, "test": 1}


def test_explicit_targets_keep_their_label_and_no_heads_means_no_labels(tmp_path):
    schema, out = _prepare(tmp_path, target_behaviours=("buy",))
    cols = rows(out, "train")
    np.testing.assert_array_equal(cols["label"], cols["labels"][:, 1])  # label: buy only
    assert schema.label["target_behaviours"] == ["buy"] and schema.heads == ("cart", "buy")

    plain, out = _prepare(tmp_path, heads=(), target_behaviours=("buy",))
    assert "labels" not in rows(out, "train") and "heads" not in plain.label
    assert plain.heads == () and "label_sums" not in plain.splits["train"]
    assert not any(k.startswith("conversions_") for k in plain.extra["counts"])
    assert not os.path.exists(out / "train" / "part-00000" / "labels.npy")


def test_export_writes_one_label_column_per_head(tmp_path):
    _, out = _prepare(tmp_path)
    t = export.table(Dataset(str(out)), "train", np.arange(4))
    names = t.column_names
    assert names[3:6] == ["label", "label_cart", "label_buy"]
    got = {(u, i, ts): (lc, lb) for u, i, ts, lc, lb in zip(
        *(t.column(k).to_pylist() for k in ("user_id", "item_id", "timestamp", "label_cart",
                                            "label_buy")), strict=True)}  # fmt: skip
    assert got == {
        (1, 10, 100): (1.0, 1.0),
        (1, 11, 200): (1.0, 0.0),
        (1, 12, 300): (0.0, 0.0),
        (2, 10, 120): (0.0, 1.0),
    }


@pytest.mark.parametrize(
    "kw,match",
    [
        ({"heads": ("cart", "click")}, r"--heads: \['click'\] not among the source's behaviour"),
        ({"heads": ("pv", "buy")}, "--heads: 'pv' is the exposure behaviour"),
        ({"heads": ("buy", "buy")}, r"--heads: \['buy'\] given more than once"),
        ({"task": "next_item"}, "--heads=cart,buy: heads are only for --task=conversion"),
    ],
)
def test_bad_heads_are_one_clear_error(tmp_path, kw, match):
    with pytest.raises(DataError, match=match):
        _prepare(tmp_path, **kw)


def test_heads_from_the_cli(tmp_path):
    log = write(tmp_path / "log.csv", LOG)
    base = [sys.executable, os.path.join(ROOT, "tools", "prepare_data.py"), "--source=taobao",
            f"--input={log}", "--task=conversion", "--horizon_hours=0.0277777778",
            "--session_gap_minutes=1", "--valid_start=500", "--test_start=900",
            "--min_timestamp=0"]  # fmt: skip
    out = tmp_path / "cli"
    res = subprocess.run(base + [f"--output={out}", "--heads=cart,buy"], capture_output=True,
                         text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr[-2000:]
    schema = json.loads((out / "schema.json").read_text())
    assert schema["label"]["heads"] == ["cart", "buy"]
    assert json.loads(res.stdout)["counts"]["conversions_cart"] == 3
    bad = subprocess.run(base + [f"--output={tmp_path / 'bad'}", "--heads=cart,clik"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert bad.returncode != 0 and not (tmp_path / "bad").exists()
    assert "prepare_data: --heads: ['clik'] not among" in bad.stderr


# ----------------------------------------------------------------------------- the pipeline


@pytest.fixture(scope="module")
def tiny_heads(tmp_path_factory):
    """(schema, path) of configs/tiny.py's world as multi-task conversion data."""
    cfg = tiny_config(**{"data.synthetic.task": "conversion"}).data.synthetic
    cfg.heads = multitask.get_config().data.synthetic.heads
    path = str(tmp_path_factory.mktemp("tiny-heads"))
    return synthetic.generate(cfg, path), path


def test_train_batches_carry_labels_with_label(tiny_heads):
    schema, path = tiny_heads
    store = ExampleStore(path, "train", schema)
    batches = pipeline.TrainBatches(store, 64, seed=2, num_batches=100)
    halves = [
        pipeline.TrainBatches(store, 64, seed=2, num_batches=100, process_index=p, process_count=2)
        for p in range(2)
    ]
    for s in (0, 3, batches.per_epoch + 1):
        b = batches[s]
        assert b["labels"].shape == (64, 3) and b["labels"].dtype == np.float32
        epoch, j = divmod(s, batches.per_epoch)
        perm = np.random.default_rng([2, epoch]).permutation(len(store))
        want = store.gather(np.sort(perm[j * 64 : (j + 1) * 64]))
        for k in ("hist", "label", "labels"):
            np.testing.assert_array_equal(b[k], want[k], err_msg=k)
        np.testing.assert_array_equal(b["label"], b["labels"].max(1))
        for k in ("label", "labels"):  # each process gets its half of both
            np.testing.assert_array_equal(np.concatenate([h[s][k] for h in halves]), b[k])
    # Resuming at a batch yields the same labels as running through to it.
    it = pipeline.BatchIterator(batches, prefetch=2, num_threads=1)
    first = [next(it) for _ in range(3)]
    resumed = pipeline.BatchIterator(batches, prefetch=2, num_threads=1)
    resumed.set_state(it.get_state())
    np.testing.assert_array_equal(next(resumed)["labels"], batches[3]["labels"])
    np.testing.assert_array_equal(first[2]["labels"], batches[2]["labels"])


def test_eval_batches_pad_labels_like_label(tiny_heads):
    schema, path = tiny_heads
    store = ExampleStore(path, "valid", schema)
    batches = pipeline.EvalBatches(store, 96)  # 512 rows: five full batches and 32 rows
    assert len(store) == 512 and len(batches) == 6
    seen = []
    for s in range(len(batches)):
        b = batches[s]
        assert b["labels"].shape == (96, 3)
        real = b["weight"] == 1
        np.testing.assert_array_equal(b["label"], b["labels"].max(1))
        seen.append(b["labels"][real])
    np.testing.assert_array_equal(np.concatenate(seen), store.column("labels"))
    assert int((batches[5]["weight"] == 0).sum()) == 96 - 32


def test_datasets_without_heads_have_no_labels(tiny_data):
    schema, path = tiny_data
    assert schema.heads == ()
    assert "labels" not in pipeline.TrainBatches(ExampleStore(path, "train", schema), 64, 0, 1)[0]
    assert "labels" not in pipeline.EvalBatches(ExampleStore(path, "valid", schema), 64)[0]


# ----------------------------------------------------------------------------- synthetic


def _generate(path, heads, n=30_000):
    cfg = multitask.get_config().data.synthetic
    cfg.train_examples, cfg.valid_examples, cfg.test_examples = n, 1_000, 1_000
    cfg.rows_per_shard = 10_000
    cfg.type_probs = {"pv": 0.45, "cart": 0.1, "fav": 0.1, "buy": 0.35}  # buy-heavy histories too
    cfg.heads = heads
    return synthetic.generate(cfg, str(path)), ExampleStore(str(path), "train")


def test_synthetic_head_rates_follow_their_planted_weights(tmp_path):
    views = {"pv": 1.0, "cart": 0.15, "fav": 0.15, "buy": 0.15, "bias": -3.4}
    buys = {"pv": 0.15, "cart": 0.15, "fav": 0.15, "buy": 1.0}
    schema, store = _generate(tmp_path / "a", {"views": views, "buys": buys})
    assert schema.heads == ("buys", "views")  # name order
    hist, item, labels = store.column("hist"), store.column("item"), store.column("labels")
    np.testing.assert_array_equal(store.column("label"), labels.max(1))
    match = hist[..., 1] == item[:, None, 1]  # events on the target's category (padding never)
    n_pv, n_buy = ((match & (hist[..., 2] == t)).sum(1) for t in (PV, BUY))
    buy_heavy = n_buy >= n_pv + 2  # cart and fav weigh 0.15 in both heads
    view_heavy = n_pv >= n_buy + 4
    assert buy_heavy.sum() > 1_000 and view_heavy.sum() > 1_000
    b, v = labels[:, 0], labels[:, 1]
    # On the same exposures, the head with the larger planted weight for their events converts
    # more; and each head converts more on the events it weighs most. Measured over seeds 0-3:
    # buy-heavy buys 0.27-0.28 vs views 0.12-0.13; view-heavy views 0.46-0.49 vs buys 0.11-0.12.
    assert b[buy_heavy].mean() > v[buy_heavy].mean() + 0.08
    assert v[view_heavy].mean() > b[view_heavy].mean() + 0.08
    assert b[buy_heavy].mean() > b[view_heavy].mean() + 0.08
    assert v[view_heavy].mean() > v[buy_heavy].mean() + 0.08

    # The heads draw from their own stream: the exposures are those of the single-label data.
    _, plain = _generate(tmp_path / "plain", {})
    np.testing.assert_array_equal(hist, plain.column("hist"))
    assert "labels" not in plain.gather(np.arange(2))

    planted = json.loads(open(synthetic.write_planted(schema, str(tmp_path))).read())
    assert planted["head_order"] == ["buys", "views"]
    assert planted["heads"]["views"]["type_weight"] == {t: views[t] for t in synthetic.BEHAVIOURS}
    assert planted["heads"]["views"]["bias"] == -3.4
    assert planted["heads"]["buys"]["bias"] == multitask.get_config().data.synthetic.conversion_bias
    assert "behaviour_type_weights" not in planted
    assert schema.label["heads"] == ["buys", "views"]


def test_the_multitask_config_plants_different_orders():
    cfg = multitask.get_config()
    config_check.check(cfg, num_devices=8)
    heads = synthetic.heads_of(cfg.data.synthetic)
    order = {h: sorted(w, key=w.get, reverse=True) for h, (w, _) in heads.items()}
    assert len(set(map(tuple, order.values()))) == len(order) >= 2


@pytest.mark.parametrize(
    "heads,task,match",
    [
        ({"x": {"pv": 1.0}}, "conversion", r"heads.x: give a weight for each of"),
        ({"x": {"pv": 1, "cart": 1, "fav": 1, "buy": -1}}, "conversion", r"heads.x: weights"),
        ({"x": {"pv": 1, "cart": 1, "fav": 1, "buy": 1}}, "click", "heads: heads need task"),
    ],
)
def test_bad_synthetic_heads_fail_the_config_check(heads, task, match):
    cfg = multitask.get_config()
    cfg.data.synthetic.task = task
    cfg.data.synthetic.heads = heads
    with pytest.raises(ConfigError, match="config.data.synthetic." + match):
        config_check.check(cfg, num_devices=8)


def test_prepare_options_default_to_no_heads():
    assert prepare.PrepareOptions().heads == ()
