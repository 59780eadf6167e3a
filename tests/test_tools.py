"""The read-side command-line tools on a trained tiny run: tools/evaluate.py gives the metrics
training gave, and every tool refuses a bad output path or flag value in one line, before work."""

from __future__ import annotations

import json

import numpy as np
import pytest

from influence_jax import evaluation, scoring
from tests import helpers


def test_evaluate_cli_gives_the_metrics_training_gave(run_dir, tmp_path):
    out = tmp_path / "sub" / "metrics.json"
    r = helpers.run_tool("evaluate", f"--workdir={run_dir}", f"--output={out}", timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.startswith("test metrics at step 20 (512 examples): auc=")
    assert "  target buy: auc=" in r.stdout
    saved = json.loads(out.read_text())
    assert saved["step"] == 20 and saved["split"] == "test"
    # The same numbers as the final evaluation of training (TensorBoard keeps float32).
    trained = {k: v[-1][1] for k, v in helpers.scalars(run_dir).items() if k.startswith("test/")}
    for key in ("auc", "gauc", "logloss", "accuracy"):
        assert saved["metrics"][key] == pytest.approx(trained[f"test/{key}"], rel=1e-6), key
    # In process, with another batch size: exact metrics do not depend on it.
    again = evaluation.evaluate_run(scoring.load_run(run_dir), "test", batch_size=56)
    for key in ("auc", "gauc", "logloss"):
        np.testing.assert_allclose(again[key], saved["metrics"][key], rtol=1e-6)


@pytest.mark.parametrize(
    "tool,args,message",
    [
        ("rank", ["--output={tmp}"], "--output={tmp}: is a folder; give a file path"),
        ("rank", ["--output={tmp}/f.txt/x.parquet"], "f.txt is a file, not a folder"),
        ("rank", ["--output=/proc/x.parquet"], "cannot write in /proc"),
        ("influence_report", ["--output={tmp}/f.txt"], "exists and is not a folder"),
        ("influence_report", ["--output={tmp}/r", "--sample=-5"], "--sample must be at least 0"),
        ("influence_report", ["--output={tmp}/r", "--bootstrap=0"], "--bootstrap must be at"),
        ("evaluate", ["--split=nope"], "--split=nope: the dataset has"),
        ("evaluate", ["--step=7"], "no step 7; saved steps are [10, 20]"),
    ],
)
def test_tools_refuse_bad_outputs_and_values_in_one_line(run_dir, tmp_path, tool, args, message):
    (tmp_path / "f.txt").write_text("a file")
    args = [a.format(tmp=tmp_path) for a in args]
    r = helpers.run_tool(tool, f"--workdir={run_dir}", *args, timeout=180)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert message.format(tmp=tmp_path) in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]  # nothing written


def test_a_dataset_the_run_was_not_trained_on_is_one_clear_line(run_dir, tmp_path):
    from influence_jax.data import synthetic

    other = helpers.tiny_config(**{"data.synthetic.num_items": 600})
    synthetic.ensure(other.data.synthetic, str(tmp_path / "other"))
    out = tmp_path / "top.parquet"
    r = helpers.run_tool("rank", f"--workdir={run_dir}", f"--data={tmp_path / 'other'}",
                         f"--output={out}", timeout=180)  # fmt: skip
    assert r.returncode == 2 and not out.exists()
    assert "['embeddings']['embed_item_id'] has shape (502, 8) in the checkpoint but (602, 8)" in (
        r.stderr
    )
    assert "another dataset" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
