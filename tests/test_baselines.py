"""Baselines on the same rows: each rule computed by hand agrees, the regression matches
scikit-learn's, PR-AUC matches scikit-learn's, and tools/baselines.py end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from influence_jax import baselines, metrics
from influence_jax.data.dataset import Dataset
from tests import helpers


def test_average_precision_matches_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(0)
    y = (rng.random(400) < 0.3).astype(int)
    s = np.round(rng.random(400), 1)  # many ties
    w = rng.random(400)
    assert metrics.average_precision(y, s) == pytest.approx(average_precision_score(y, s))
    want = average_precision_score(y, s, sample_weight=w)
    assert metrics.average_precision(y, s, w) == pytest.approx(want)
    assert np.isnan(metrics.average_precision(np.zeros(5), np.arange(5)))


def test_logistic_regression_matches_sklearn():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2000, 4)) * [1.0, 3.0, 0.5, 10.0] + [0, 1, 2, 3]
    y = (rng.random(2000) < 1 / (1 + np.exp(-(x[:, 0] - 0.2 * x[:, 1])))).astype(float)
    model = baselines.fit_logistic(x, y, l2=1e-3)
    mean, scale, _ = model
    ref = LogisticRegression(C=1 / (1e-3 * len(y)), tol=1e-10, max_iter=1000)
    ref.fit((x - mean) / scale, y)
    np.testing.assert_allclose(
        baselines.predict_logistic(model, x), ref.predict_proba((x - mean) / scale)[:, 1],
        atol=1e-5,
    )  # fmt: skip


def test_rules_agree_with_hand_computation(tiny_data):
    _, path = tiny_data
    dataset = Dataset(path)
    s = baselines.scores(dataset, "test")
    train = dataset.store("train").gather(np.arange(len(dataset.store("train"))))
    test = dataset.store("test").gather(np.arange(len(dataset.store("test"))))
    item, hist_item = test["item"][:, 0], test["hist"][..., 0]
    # in_history: 1 + a tie-break below 1 exactly when the target is in the history.
    np.testing.assert_array_equal(
        s["scores"]["in_history"] >= 1, (hist_item == item[:, None]).any(1)
    )
    # item_rate: the item's train positives and examples, smoothed towards the overall rate.
    rate = train["label"].mean()
    for i in np.unique(item)[:20]:
        on = train["item"][:, 0] == i
        want = (train["label"][on].sum() + baselines.PRIOR * rate) / (on.sum() + baselines.PRIOR)
        np.testing.assert_allclose(s["scores"]["item_rate"][item == i], want, rtol=1e-12)
    np.testing.assert_array_equal(s["label"], test["label"])
    probs = s["scores"]["logistic_regression"]
    assert ((probs > 0) & (probs < 1)).all() and set(s["probabilities"]) <= set(s["scores"])


def test_baselines_cli(tiny_data, tmp_path):
    out = tmp_path / "b.json"
    r = helpers.run_tool("baselines", f"--data={tiny_data[1]}", f"--output={out}", timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    saved = json.loads(out.read_text())["rows"]
    names = [r["baseline"] for r in saved]
    assert {"logistic_regression", "in_history", "item_rate", "seen_buy"} <= set(names)
    aucs = [r["auc"] for r in saved]
    assert aucs == sorted(aucs, reverse=True) and all(0 <= a <= 1 for a in aucs)
    assert "logistic_regression" in r.stdout.splitlines()[2 + names.index("logistic_regression")]
    bad = helpers.run_tool("baselines", f"--data={tiny_data[1]}", "--split=train", timeout=120)
    assert bad.returncode == 2 and "--split=train" in bad.stderr


def test_paired_difference_resamples_users():
    rng = np.random.default_rng(2)
    users = np.repeat(np.arange(60), 10)
    label = (rng.random(600) < 0.3).astype(float)
    base = rng.random(600)
    same = baselines.paired_auc_difference(label, users, [base, base], base, n_boot=50)
    assert same["diff"] == 0 and same["ci_low"] == same["ci_high"] == 0 and same["users"] == 60
    better = label + rng.random(600)  # ranks every positive above every negative
    d = baselines.paired_auc_difference(label, users, [better], base, n_boot=200)
    assert d["diff"] == pytest.approx(1 - metrics.auc(label, base))
    assert 0 < d["ci_low"] < d["diff"] < d["ci_high"]
