"""Split metrics against sklearn and a per-user loop; the TensorBoard writer read back."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import log_loss, roc_auc_score
from tensorboard.backend.event_processing import event_accumulator

from influence_jax import metrics, summary
from tests.helpers import ROOT


def _data(n: int, seed: int, decimals: int | None = None):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    # Scores correlated with the label, so AUCs are far from 0.5 and errors show.
    scores = 1 / (1 + np.exp(-(rng.normal(size=n) + labels)))
    if decimals is not None:
        scores = np.round(scores, decimals)
    return labels, scores


def _reference_gauc(labels, scores, groups):
    aucs, sizes, excluded = [], [], 0
    for g in np.unique(groups):
        m = groups == g
        if len(np.unique(labels[m])) < 2:
            excluded += 1
            continue
        aucs.append(roc_auc_score(labels[m], scores[m]))
        sizes.append(m.sum())
    aucs, sizes = np.array(aucs), np.array(sizes)
    return aucs.mean(), np.sum(aucs * sizes) / sizes.sum(), len(aucs), excluded


@pytest.mark.parametrize("decimals", [None, 1, 2])
def test_auc_matches_sklearn_with_ties(decimals):
    labels, scores = _data(5000, seed=decimals or 0, decimals=decimals)
    got = metrics.auc(labels, scores)
    assert got == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert 0.6 < got < 0.9


def test_auc_weight_zero_rows_are_dropped():
    labels, scores = _data(4000, seed=1, decimals=1)
    weights = (np.random.default_rng(2).random(4000) > 0.3).astype(np.float32)
    # Padding rows with labels and scores that would change the AUC if they were counted.
    labels_padded = np.where(weights > 0, labels, 1)
    scores_padded = np.where(weights > 0, scores, 0.0)
    keep = weights > 0
    want = roc_auc_score(labels[keep], scores[keep])
    assert metrics.auc(labels_padded, scores_padded, weights) == pytest.approx(want, abs=1e-12)
    assert metrics.auc(labels_padded, scores_padded) != pytest.approx(want, abs=1e-3)


def test_auc_fractional_weights_match_sklearn():
    labels, scores = _data(3000, seed=3, decimals=1)
    weights = np.random.default_rng(4).random(3000) * 3
    want = roc_auc_score(labels, scores, sample_weight=weights)
    assert metrics.auc(labels, scores, weights) == pytest.approx(want, abs=1e-9)


def test_auc_edge_cases():
    assert np.isnan(metrics.auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert np.isnan(metrics.auc([], []))
    assert metrics.auc([0, 1], [0.5, 0.5]) == 0.5
    assert metrics.auc([0, 1, 0, 1], [0.1, 0.9, 0.3, 0.2]) == 0.75
    assert np.isnan(metrics.auc([0, 1, 0], [0.1, np.nan, 0.3]))  # a diverged model shows as nan
    with pytest.raises(metrics.MetricsError, match="labels"):
        metrics.auc([0, 2], [0.1, 0.2])
    with pytest.raises(metrics.MetricsError, match="weights"):
        metrics.auc([0, 1], [0.1, 0.2], [1.0, -1.0])
    with pytest.raises(metrics.MetricsError, match="scores"):
        metrics.auc([0, 1], [0.1, 0.2, 0.3])


@pytest.mark.parametrize("decimals", [None, 1])
def test_gauc_matches_per_user_loop(decimals):
    rng = np.random.default_rng(5)
    n = 6000
    labels, scores = _data(n, seed=6, decimals=decimals)
    # Users of very different sizes, some with a single example or a single class.
    groups = rng.zipf(1.5, n) % 400 + 1000
    got = metrics.gauc(labels, scores, groups)
    gauc, gauc_imp, users, excluded = _reference_gauc(labels, scores, groups)
    assert got["gauc"] == pytest.approx(gauc, abs=1e-12)
    assert got["gauc_impression"] == pytest.approx(gauc_imp, abs=1e-12)
    assert got["gauc_users"] == users
    assert got["gauc_users_excluded"] == excluded
    assert excluded > 0 and users > 10
    assert got["gauc"] != pytest.approx(got["gauc_impression"], abs=1e-4)


def test_gauc_ignores_padding_and_padding_only_users():
    labels, scores = _data(3000, seed=7, decimals=1)
    groups = np.random.default_rng(8).integers(0, 200, 3000)
    weights = (groups % 3 != 0) * (np.arange(3000) % 5 != 0)
    keep = weights > 0
    got = metrics.gauc(labels, scores, groups, weights)
    want = metrics.gauc(labels[keep], scores[keep], groups[keep])
    assert got == want
    gauc, gauc_imp, users, excluded = _reference_gauc(labels[keep], scores[keep], groups[keep])
    assert (got["gauc"], got["gauc_users"]) == (pytest.approx(gauc, abs=1e-12), users)
    assert got["gauc_users"] + got["gauc_users_excluded"] == len(np.unique(groups[keep]))


def test_gauc_no_counted_user_is_nan():
    got = metrics.gauc([1, 0, 1], [0.2, 0.3, 0.4], [1, 2, 3])
    assert np.isnan(got["gauc"]) and np.isnan(got["gauc_impression"])
    assert (got["gauc_users"], got["gauc_users_excluded"]) == (0, 3)


def test_logloss_and_accuracy_match_sklearn():
    labels, probs = _data(2000, seed=9)
    weights = np.random.default_rng(10).integers(0, 2, 2000)
    keep = weights > 0
    assert metrics.logloss(labels, probs) == pytest.approx(log_loss(labels, probs), rel=1e-12)
    assert metrics.logloss(labels, probs, weights) == pytest.approx(
        log_loss(labels[keep], probs[keep]), rel=1e-12
    )
    want_acc = np.mean((probs[keep] > 0.5) == labels[keep])
    assert metrics.accuracy(labels, probs, weights) == pytest.approx(want_acc, abs=1e-12)
    # Clipping keeps a confident mistake finite.
    assert metrics.logloss([1], [0.0]) == pytest.approx(-np.log(1e-7))


def test_evaluate_slices_by_type():
    labels, probs = _data(4000, seed=11, decimals=2)
    rng = np.random.default_rng(12)
    users = rng.integers(0, 300, 4000)
    types = rng.integers(2, 6, 4000)
    weights = (rng.random(4000) > 0.1).astype(np.float32)
    keep = weights > 0
    out = metrics.evaluate(labels, probs, users, types, weights, {2: "pv", 3: "cart", 4: "buy"})
    y, p, t = labels[keep], probs[keep], types[keep]
    assert out["auc"] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert out["logloss"] == pytest.approx(log_loss(y, p), rel=1e-12)
    assert out["num_examples"] == keep.sum()
    assert out["positive_rate"] == pytest.approx(y.mean())
    assert out["gauc"] == metrics.gauc(y, p, users[keep])["gauc"]
    for type_id, name in [(2, "pv"), (3, "cart"), (4, "buy"), (5, "5")]:
        m = t == type_id
        assert out[f"auc/{name}"] == pytest.approx(roc_auc_score(y[m], p[m]), abs=1e-12)
        assert out[f"logloss/{name}"] == pytest.approx(log_loss(y[m], p[m]), rel=1e-12)
        assert out[f"accuracy/{name}"] == pytest.approx(np.mean((p[m] > 0.5) == y[m]))
        assert out[f"num_examples/{name}"] == m.sum()
    assert sum(out[f"num_examples/{n}"] for n in ["pv", "cart", "buy", "5"]) == keep.sum()


def test_accumulator_equals_evaluate_on_concatenation():
    labels, probs = _data(1000, seed=13, decimals=1)
    rng = np.random.default_rng(14)
    users, types = rng.integers(0, 50, 1000), rng.integers(2, 4, 1000)
    weights = np.ones(1000, np.float32)
    weights[-37:] = 0  # the padded last batch
    acc = metrics.MetricAccumulator()
    for start in range(0, 1000, 128):
        sl = slice(start, start + 128)
        acc.add(probs[sl], labels[sl], users[sl], types[sl], weights[sl])
    assert len(acc) == 963
    names = {2: "click"}
    assert acc.result(names) == metrics.evaluate(labels, probs, users, types, weights, names)
    acc.reset()
    assert len(acc) == 0 and acc.result()["num_examples"] == 0
    with pytest.raises(metrics.MetricsError, match="user_key"):
        acc.add(probs[:4], labels[:4], users[:3], types[:4])


def test_reduce_step_metrics():
    steps = [
        {"loss_sum": 4.0, "correct_sum": np.float32(3), "count": 8, "grad_norm": 1.0},
        {"loss_sum": np.array(1.0), "correct_sum": 1, "count": 2, "grad_norm": 2.0},
    ]
    out = metrics.reduce_step_metrics(steps)
    assert out == {"loss": 0.5, "correct": 0.4, "count": 10.0, "grad_norm": 3.0}
    assert all(isinstance(v, float) for v in out.values())
    assert metrics.reduce_step_metrics([]) == {}
    with pytest.raises(metrics.MetricsError, match="count"):
        metrics.reduce_step_metrics([{"loss_sum": 1.0}])
    with pytest.raises(metrics.MetricsError, match="step 1"):
        metrics.reduce_step_metrics([{"count": 1}, {"count": 1, "x": 2}])


def _png(height: int, width: int) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig = plt.figure(figsize=(width / 100, height / 100), dpi=100)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def test_summary_writer_round_trip(tmp_path):
    png = _png(120, 160)
    with summary.SummaryWriter(tmp_path) as writer:
        writer.scalars(1, {"loss": 0.25, "auc/buy": np.float32(0.75)}, prefix="eval/")
        writer.scalar("lr", 1e-3, 2)
        writer.text("config", "# Run\n`lr` = **0.001**", 0)
        writer.image("roc", png, 3)
    with pytest.raises(summary.SummaryError, match="after close"):
        writer.scalar("lr", 1.0, 4)

    ea = event_accumulator.EventAccumulator(
        str(tmp_path), size_guidance={event_accumulator.TENSORS: 0}
    ).Reload()
    assert [(e.step, e.value) for e in ea.Scalars("eval/loss")] == [(1, 0.25)]
    assert ea.Scalars("eval/auc/buy")[0].value == 0.75
    assert ea.Scalars("lr")[0].step == 2
    assert ea.Scalars("lr")[0].value == pytest.approx(1e-3)
    (text,) = ea.Tensors("config")
    assert text.tensor_proto.string_val == [b"# Run\n`lr` = **0.001**"]
    assert ea.summary_metadata["config"].plugin_data.plugin_name == "text"
    (image,) = ea.Images("roc")
    assert (image.step, image.height, image.width) == (3, 120, 160)
    assert image.encoded_image_string == png


def test_summary_writer_rejects_non_png(tmp_path):
    with (
        summary.SummaryWriter(tmp_path) as writer,
        pytest.raises(summary.SummaryError, match="PNG"),
    ):
        writer.image("x", b"GIF89a...", 0)


def test_disabled_summary_writer_writes_nothing(tmp_path):
    logdir = tmp_path / "tb"
    writer = summary.SummaryWriter(logdir, enabled=False)
    writer.scalars(0, {"loss": 1.0})
    writer.scalar("loss", 1.0, 1)
    writer.text("t", "x", 0)
    writer.image("i", b"not even a png", 0)
    writer.flush()
    writer.close()
    writer.scalar("loss", 1.0, 2)
    assert not logdir.exists()
    assert os.listdir(tmp_path) == []


def test_event_files_are_written_without_importing_tensorflow(tmp_path):
    """Where TensorFlow is installed, TensorBoard's own writer imports it (seconds at every
    start); ours does not, and each writer gets its own file, readable once flushed."""
    code = f"""
import sys
from influence_jax import summary
a, b = summary.SummaryWriter({str(tmp_path)!r}), summary.SummaryWriter({str(tmp_path)!r})
a.scalar("x", 1.5, 7)
a.flush()
print("tensorflow" in sys.modules, a._writer.path != b._writer.path)
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == ["False", "True"]
    ea = event_accumulator.EventAccumulator(str(tmp_path)).Reload()  # not closed: flushed
    assert [(e.step, e.value) for e in ea.Scalars("x")] == [(7, 1.5)]


def test_a_resumed_runs_events_replace_the_stopped_runs_later_steps(tmp_path):
    """A run stopped at step 10 whose last checkpoint was step 5 logs 6-10 again when it
    resumes: its SessionLog START at step 6 makes TensorBoard drop the first 6-10, so no step
    shows twice."""
    import time

    with summary.SummaryWriter(tmp_path) as first:
        for step in range(1, 11):
            first.scalars(step, {"train/loss": 1.0})
    time.sleep(1.1)  # event file names carry the second they were made in: another file
    with summary.SummaryWriter(tmp_path) as resumed:
        resumed.restart(6)
        for step in range(6, 13):
            resumed.scalars(step, {"train/loss": 2.0})
    acc = event_accumulator.EventAccumulator(str(tmp_path))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(s, 1.0) for s in range(1, 6)] + [(s, 2.0) for s in range(6, 13)]
