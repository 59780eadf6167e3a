"""The counterfactual check (counterfactual.py) and the extractor-separation verdict: edits of the
history by hand, the report's section on a tiny run, and an exact linear model."""

from __future__ import annotations

import numpy as np
import pytest

from influence_jax import counterfactual, influence
from influence_jax.data.schema import NUM_RESERVED, Field, Schema

S = Schema(
    name="t",
    vocab_sizes={"item_id": 9, "category": 5, "behaviour": 4, "time_gap": 34},
    user_fields=(Field("item_id", "item_id"),),
    item_fields=(Field("item_id", "item_id"), Field("category", "category")),
    hist_fields=(
        Field("item_id", "item_id"),
        Field("category", "category"),
        Field("behaviour", "behaviour"),
        Field("time_gap", "time_gap"),
    ),
    max_len=3,
    behaviour_types=("pv", "buy"),
)


def test_an_added_event_goes_first_on_the_target_item_and_the_oldest_drops():
    hist = np.array([[[5, 2, 2, 10], [6, 3, 3, 12], [7, 2, 2, 14]]], np.int32)
    item = np.array([[8, 4]], np.int32)
    ev = counterfactual.added_event(S, item, NUM_RESERVED + 1)
    gap = counterfactual.gap_id(S, counterfactual.ADD_GAP_SECONDS)
    assert ev.tolist() == [[8, 4, 3, gap]] and gap == NUM_RESERVED + 11  # 2^11 <= 3600 < 2^12
    out = counterfactual.insert_front(hist, ev)
    assert out.tolist() == [[[8, 4, 3, gap], [5, 2, 2, 10], [6, 3, 3, 12]]]


def test_the_other_item_has_another_category_where_one_exists():
    items = np.array([[2, 2], [3, 2], [4, 3], [5, 2]], np.int32)
    other = counterfactual.other_items(S, items)
    assert (other[:, 1] != items[:, 1]).all()
    assert other[2].tolist() == [5, 2]  # the next example of another category, cyclically


@pytest.mark.parametrize(
    "weights, separated, words",
    [
        ({"din": 0.1, "dnn": 0.5, "cnn": 0.4}, True, "din has the lowest weight (0.100, 0.25x"),
        ({"din": 0.209, "dnn": 0.562, "cnn": 0.229}, False, "cannot tell din and cnn apart"),
    ],
)
def test_extractor_separation_verdict(weights, separated, words):
    v = influence.extractor_separation(weights)
    assert v["separated"] is separated and words in v["verdict"], v
    # Influence that names the same extractor(s) as the weights: nothing added.
    same = influence.extractor_separation(weights, dict(weights))
    assert same["agrees"] and same["verdict"] == v["verdict"]


def test_extractor_separation_says_when_influence_disagrees_with_the_weights():
    """Taobao (a user test): rates had the lowest weight, 0.64x cnn's, but the third largest
    influence of five: the verdict says to judge by influence."""
    w = {"din": 0.30, "dnn": 0.20, "cnn": 0.116, "match": 0.31, "rates": 0.074}
    infl = {"din": 0.50, "dnn": 0.318, "cnn": 0.348, "match": 0.2, "rates": 0.361}
    v = influence.extractor_separation(w, infl)
    assert v["separated"] and not v["agrees"] and v["lowest_by_influence"] == "match"
    assert (
        "but by influence (mean |w z| on this split) match is lowest (0.200) and rates is "
        in (v["verdict"])
    )
    assert "4th lowest of 5 (0.361)" in v["verdict"] and "judge by influence" in v["verdict"]


def test_the_report_holds_the_counterfactual_section(run, tmp_path):
    r = influence.report(run, str(tmp_path / "rep"), sample=16, max_examples=256, n_boot=50)
    cf = r["counterfactual"]
    assert cf["examples"] == 256 and set(cf["types"]) == set(run.schema.behaviour_types)
    for t, e in cf["types"].items():
        for key in ("add_logit", "add_prob", "contrast_logit"):
            assert e[key]["ci_low"] <= e[key]["mean"] <= e[key]["ci_high"], (t, key, e)
        assert abs(e["add_prob"]["mean"]) <= 1
        # Synthetic data: the planted contrast is history_scale * the type's planted weight.
        planted = run.schema.extra["planted"]
        want = planted["history_scale"] * planted["behaviour_type_weights"][t]
        assert e["planted_contrast_logit"] == pytest.approx(want)
        assert r["behaviour_types"][t]["counterfactual_contrast"] == e["contrast_logit"]["mean"]
    assert r["extractor_separation"]["lowest"] in run.model.extractors


def test_faithfulness_without_predictions_is_not_checked_rather_than_failed():
    f = influence.faithfulness(None, None, np.zeros((0, 6)), np.zeros((0, 6), bool), None, 10)
    assert f["examples"] == 0 and f["holds"] is None and f["gap"] == []
