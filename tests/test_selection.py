"""Feature selection by influence: what falls below the threshold, the loop's stopping rule, the
pipeline's behaviour-type filter, and one real round (train, influence report, drop, retrain)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from influence_jax.data import pipeline
from influence_jax.data.schema import NUM_RESERVED
from influence_jax.data.store import ExampleStore
from influence_jax.errors import ConfigError, DataError
from influence_jax.experiments import selection, trials
from tests import helpers

TYPES = ("pv", "cart", "fav", "buy")


def report(behaviour: dict[str, float], extractors: dict[str, float] | None = None) -> dict:
    """The part of influence.json that selection reads."""
    return {
        "behaviour_types": {k: {"influence": v} for k, v in behaviour.items()},
        "extractors": {k: {"influence": v} for k, v in (extractors or {}).items()},
    }


def test_candidates_are_below_threshold_among_what_is_still_used():
    config = helpers.tiny_config()
    r = report({"pv": 1.0, "cart": 2.0, "fav": 3.0, "buy": 14.0}, {"din": 8, "dnn": 1, "cnn": 1})
    # shares: pv 0.05, cart 0.1, fav 0.15, buy 0.7; din 0.8, dnn 0.1, cnn 0.1
    got = selection.candidates(r, config, 0.12)
    assert got == {"behaviour_types": ["pv", "cart"], "extractors": ["dnn", "cnn"]}
    assert selection.candidates(r, config, 2.5, "influence")["behaviour_types"] == ["pv", "cart"]
    # Already dropped types leave the shares: without pv, cart's share is 2 / 19 > 0.1.
    dropped = helpers.tiny_config(**{"data.drop_behaviours": ("pv",)})
    assert selection.candidates(r, dropped, 0.1)["behaviour_types"] == []
    # The most influential item of a group is never dropped, whatever the threshold.
    everything = selection.candidates(r, config, 1.1)
    assert "buy" not in everything["behaviour_types"] and "din" not in everything["extractors"]
    with pytest.raises(ConfigError, match="criterion"):
        selection.candidates(r, config, 0.1, "gain")
    cfg = selection.apply(config, got)
    assert cfg.data.drop_behaviours == ("pv", "cart") and cfg.model.extractors == ("din",)
    assert config.data.drop_behaviours == ()  # apply copies


def test_loop_stops_when_the_metric_drops_and_keeps_the_last_good_round(tmp_path, tiny_data):
    config = helpers.tiny_config(**{"data.source": "prepared", "data.path": tiny_data[1]})
    calls = []

    def train_fn(cfg, workdir):  # better with up to two types dropped, worse with three
        calls.append(os.path.basename(workdir))
        n = len(cfg.data.drop_behaviours)
        return {"valid/auc": 0.70 + 0.01 * n if n <= 2 else 0.65, "test/auc": 0.6}

    def report_fn(round_dir, out, split):  # round r: type r has the least influence
        r = int(round_dir.rsplit("_", 1)[1])
        return report({t: 0.01 if i == r else 1.0 for i, t in enumerate(TYPES)})

    kw = dict(threshold=0.05, loop=True, train_fn=train_fn, report_fn=report_fn)
    result = selection.run(config, str(tmp_path), **kw)
    assert calls == ["round_0", "round_1", "round_2", "round_3"]
    assert [r["drop_behaviours"] for r in result["rounds"]] == [
        [],
        ["pv"],
        ["pv", "cart"],
        ["pv", "cart", "fav"],
    ]
    assert result["stopped"] == "metric_dropped" and result["selected_round"] == 2
    assert [round(r["change"], 6) for r in result["rounds"]] == [0.0, 0.01, 0.01, -0.07]
    chosen = trials.load_config_file(str(tmp_path / "selected_config.py"))
    assert chosen.data.drop_behaviours == ("pv", "cart")
    assert json.loads((tmp_path / "selection.json").read_text())["selected_round"] == 2
    # Rerun: every round is finished, nothing trains again, same answer.
    again = selection.run(config, str(tmp_path), **kw)
    assert len(calls) == 4 and again["rounds"] == result["rounds"]


@pytest.mark.parametrize(
    "text, match",
    [
        (None, "no such file"),
        ("{not json", "not valid JSON"),
        ('{"valid/auc": 0.7, "valid/gauc": 0.6}', "no key 'behaviour_types'"),
        ("[1, 2]", "not an influence report"),
        ('{"behaviour_types": {"pv": 0.3}}', "behaviour_types.pv: has no 'influence'"),
        ('{"behaviour_types": {"pv": {"influence": 1}}, "extractors": []}', "extractors: "),
    ],
    ids=["missing", "not-json", "evaluate-output", "a-list", "no-influence", "bad-extractors"],
)
def test_a_bad_report_fails_before_round_0_naming_the_file(tmp_path, tiny_data, text, match):
    path = tmp_path / "given.json"
    if text is not None:
        path.write_text(text)
    config = helpers.tiny_config(**{"data.source": "prepared", "data.path": tiny_data[1]})
    calls = []
    train_fn = lambda cfg, workdir: calls.append(workdir) or {"valid/auc": 0.7}
    workdir = tmp_path / "select"
    with pytest.raises(DataError, match=match) as e:
        selection.run(config, str(workdir), 0.1, report_path=str(path), train_fn=train_fn)
    assert str(path) in str(e.value)
    assert not calls and not workdir.exists()


@pytest.mark.parametrize("metric", ["valid/acc", "train/auc", "auc", "valid/auc/buy/x"])
def test_a_bad_metric_fails_before_round_0(tmp_path, tiny_data, metric):
    config = helpers.tiny_config(**{"data.source": "prepared", "data.path": tiny_data[1]})
    calls = []
    train_fn = lambda cfg, workdir: calls.append(workdir) or {"valid/auc": 0.7}
    workdir = tmp_path / "select"
    with pytest.raises(ConfigError, match=rf"--metric={metric}: give '<split>/<name>'"):
        selection.run(config, str(workdir), 0.1, metric=metric, train_fn=train_fn)
    assert not calls and not workdir.exists()


def test_a_given_report_sets_round_0s_drops(tmp_path, tiny_data):
    given = tmp_path / "given.json"
    given.write_text(json.dumps(report({"pv": 0.01, "cart": 1.0, "fav": 1.0, "buy": 1.0})))
    config = helpers.tiny_config(**{"data.source": "prepared", "data.path": tiny_data[1]})

    def train_fn(cfg, workdir):
        os.makedirs(workdir, exist_ok=True)
        return {"valid/auc": 0.7, "test/auc": 0.6}

    result = selection.run(
        config, str(tmp_path / "select"), 0.05, report_path=str(given), train_fn=train_fn
    )
    assert result["rounds"][1]["drop_behaviours"] == ["pv"]


def test_drop_events_removes_a_type_and_keeps_the_order(tiny_data):
    schema, path = tiny_data
    hist = ExampleStore(path, "train").gather(np.arange(64))["hist"]
    b = schema.hist_index("behaviour")
    cart = schema.behaviour_types.index("cart") + NUM_RESERVED
    out = pipeline.drop_events(hist, schema, (cart,))
    assert (out[..., b] == cart).sum() == 0 and (hist[..., b] == cart).sum() > 0
    for row_in, row_out in zip(hist, out, strict=True):
        kept = row_in[(row_in[:, b] != cart) & (row_in[:, b] != 0)]
        assert np.array_equal(row_out[: len(kept)], kept)
        assert not row_out[len(kept) :].any()
    with pytest.raises(ConfigError, match="drop_behaviours"):
        cfg = helpers.tiny_config(**{"data.drop_behaviours": ("click",)})
        pipeline.restrict(ExampleStore(path, "train"), cfg.data, "train")


def test_real_round_drops_what_is_below_threshold_and_retrains(tmp_path, tiny_data, monkeypatch):
    schema, path = tiny_data
    config = helpers.tiny_config(
        **{
            "data.source": "prepared",
            "data.path": path,
            "model.extractors": ("dnn",),
            "loop.num_steps": 8,
            "loop.log_every": 4,
            "loop.eval_every": 0,
            "ckpt.every": 8,
        }
    )
    seen: dict[str, list[np.ndarray]] = {}
    current = {}
    to_model_batch = pipeline.to_model_batch

    def spy(examples):
        batch = to_model_batch(examples)
        seen[current["run"]].append(batch["hist"][..., schema.hist_index("behaviour")].copy())
        return batch

    monkeypatch.setattr(pipeline, "to_model_batch", spy)

    def train_fn(cfg, workdir):
        current["run"] = os.path.basename(workdir)
        seen[current["run"]] = []
        return trials.train_trial(cfg, workdir)

    # 4 types: at least one has a share below 0.26 (and the top one is always kept).
    result = selection.run(config, str(tmp_path), threshold=0.26, train_fn=train_fn)
    r0 = json.loads((tmp_path / "round_0" / "influence" / "influence.json").read_text())
    shares = {t: v["influence"] for t, v in r0["behaviour_types"].items()}
    total = sum(shares.values())
    top = max(shares, key=shares.get)
    want = [t for t in TYPES if shares[t] / total < 0.26 and t != top]
    assert want and result["rounds"][1]["drop_behaviours"] == want
    ran = json.loads((tmp_path / "round_1" / "config.json").read_text())
    assert ran["data"]["drop_behaviours"] == want
    ids = [schema.behaviour_types.index(t) + NUM_RESERVED for t in want]
    before, after = np.concatenate(seen["round_0"]), np.concatenate(seen["round_1"])
    assert np.isin(before, ids).any() and not np.isin(after, ids).any()
    m0, m1 = (r["valid/auc"] for r in result["rounds"])
    assert result["rounds"][1]["change"] == pytest.approx(m1 - m0)
    assert result["selected_round"] == (1 if m1 >= m0 else 0)
    chosen = trials.load_config_file(str(tmp_path / "selected_config.py"))
    assert chosen.data.drop_behaviours == (tuple(want) if m1 >= m0 else ())
