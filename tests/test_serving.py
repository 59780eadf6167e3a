"""Export for online serving (influence_jax/serving.py, tools/export_model.py): the exported
program, loaded with jax and numpy alone as docs/serving.md shows, gives the engine's
probabilities at any batch size and for every model; the vocabularies and id rules it carries
map raw ids as the dataset does; bad settings are refused and leave nothing."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from influence_jax import scoring, serving
from influence_jax.data import rank_state, synthetic
from influence_jax.data.dataset import Dataset
from influence_jax.data.store import ExampleStore
from influence_jax.errors import DataError
from tests import helpers

DOC = os.path.join(helpers.ROOT, "docs", "serving.md")


def _documented_loader() -> str:
    with open(DOC) as f:
        text = f.read()
    block = re.search(
        r"<!-- serving:load -->\n```python\n(.*?)```\n<!-- /serving:load -->", text, re.S
    )
    assert block, f"{DOC}: no loading block between the serving:load markers"
    return block.group(1)


def _engine_probs(run, rows: dict[str, np.ndarray]) -> np.ndarray:
    n = len(rows["user"])
    gather = lambda idx: {k: rows[k][idx] for k in serving.INPUTS}
    fn = scoring.make_score_fn(run)
    return scoring.batched(fn, run, n, gather, scoring.global_batch(run, n))


def test_the_documented_loader_scores_as_the_engine_without_this_package(run, tmp_path, jax_cache):
    out = tmp_path / "serve"
    sig = serving.export_run(run, str(out))
    assert sorted(os.listdir(out)) == ["check.npz", "model.jax", "params.npz", "signature.json"]
    assert sig["run"]["step"] == run.step and sig["platforms"] == ["cpu"]
    assert sig["cpu_block_rows"] == serving.cpu_block_rows(run.model, run.params, run.schema)
    assert sig["inputs"]["hist"]["shape"] == ["b", run.schema.max_len, len(run.schema.hist_fields)]
    assert len(sig["params"]["arrays"]) == len(__import__("jax").tree_util.tree_leaves(run.params))
    # Rows the export has not seen, at batch sizes the program was not traced at.
    store = ExampleStore(run.data_path, "valid", run.schema)
    rows = {k: v for k, v in store.gather(np.arange(37)).items() if k in serving.INPUTS}
    np.savez(tmp_path / "rows.npz", **rows)
    script = (
        f"path = {str(out)!r}\n"
        + _documented_loader()
        + (
            "import sys\n"
            "assert not [m for m in sys.modules if m.startswith(('influence_jax', 'flax'))]\n"
            f"rows = np.load({str(tmp_path / 'rows.npz')!r})\n"
            "got = [np.asarray(exp.call(params, *(rows[k][:n] for k in ('user', 'item', 'hist'))))"
            " for n in (1, 5, 37)]\n"
            f"np.savez({str(tmp_path / 'got.npz')!r}, *got, doc=prob)\n"
        )
    )
    env = helpers.subprocess_env(jax_cache, devices=1)
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120 * helpers.HANG_FACTOR,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    want = _engine_probs(run, rows)
    # An id outside its vocabulary is scored as out-of-vocabulary (1), never read out of bounds.
    score, _ = serving.load(str(out))
    odd = {k: v[:4].copy() for k, v in rows.items()}
    odd["user"][0, 0], odd["item"][1, 0], odd["hist"][2, 0, :] = 10**6, -5, 10**6
    oov = {k: v[:4].copy() for k, v in rows.items()}
    oov["user"][0, 0], oov["item"][1, 0], oov["hist"][2, 0, :] = 1, 1, 1
    got_odd = score(odd["user"], odd["item"], odd["hist"])
    assert np.isfinite(got_odd).all()
    np.testing.assert_allclose(got_odd, score(oov["user"], oov["item"], oov["hist"]), atol=1e-7)
    with pytest.raises(DataError, match="exported without --explain; export it again"):
        serving.load(str(out), serving.EXPLAIN_FILE)
    sizes = sig["ids"]["vocabularies"]
    assert all(sizes[v]["size"] == run.schema.vocab_sizes[v] for v in sizes)
    with np.load(tmp_path / "got.npz") as got, np.load(out / "check.npz") as check:
        for i, n in enumerate((1, 5, 37)):
            np.testing.assert_allclose(got[f"arr_{i}"], want[:n], atol=1e-6)
        np.testing.assert_allclose(got["doc"], check["prob"], atol=1e-6)
        assert check["prob"].shape == (serving.CHECK_ROWS,) and len(set(check["prob"])) > 1
        # check.npz holds the engine's probabilities of the test split's first rows.
        test = ExampleStore(run.data_path, "test", run.schema).gather(np.arange(16))
        np.testing.assert_array_equal(check["hist"], test["hist"])
        np.testing.assert_allclose(check["prob"], _engine_probs(run, test), atol=1e-6)


MODELS = {
    "seed_cnn": {"model.name": "seed_cnn"},
    "ranker, every extractor": {
        "model.extractors": ("din", "dnn", "cnn", "bst", "match", "rates"),
        "model.type_embedding": True,
    },
    "multitask": {
        "data.synthetic.task": "conversion",
        "data.synthetic.heads": {
            "engage": {"pv": 1.0, "cart": 0.6, "fav": 0.35, "buy": 0.15},
            "buy": {"pv": 0.15, "cart": 1.0, "fav": 0.6, "buy": 0.35},
        },
        "model.name": "multitask",
        "model.multitask.objective": "engage",
    },
}


@pytest.mark.parametrize("name", list(MODELS))
def test_every_model_exports_and_scores_as_the_engine(name, tmp_path, tiny_data):
    config = helpers.tiny_config(**MODELS[name])
    if "multitask" in name:
        path = str(tmp_path / "data")
        synthetic.ensure(config.data.synthetic, path)
    else:
        path = tiny_data[1]
    run = scoring.make_run(config, path)
    out = str(tmp_path / "serve")
    # Lowered for a GPU too (one program for both; it dispatches on the CPU here); on the CPU
    # a request of 37 rows in blocks of 8 (the last one short), one of 16 whole.
    platforms = ("cpu", "cuda") if name == "seed_cnn" else ("cpu",)
    sig = serving.export_run(run, out, platforms, cpu_rows=8, explain=True)
    assert sig["platforms"] == list(platforms) and sig["run"]["model"] == config.model.name
    assert sig["cpu_block_rows"] == 8
    score, _ = serving.load(out)
    explain, _ = serving.load(out, serving.EXPLAIN_FILE)
    with np.load(os.path.join(out, "check.npz")) as check:
        rows = [check[k] for k in serving.INPUTS]
        np.testing.assert_allclose(score(*rows), check["prob"], atol=1e-6)
        got = explain(*rows)
        for k in ("behaviour", "events", "extractors", "logit"):
            np.testing.assert_allclose(got[k], check[f"explain_{k}"], atol=2e-5, err_msg=k)
    rows = ExampleStore(path, "valid", run.schema).gather(np.arange(37))
    rows = {k: rows[k] for k in serving.INPUTS}
    want = _engine_probs(run, rows)
    np.testing.assert_allclose(score(*rows.values()), want, atol=1e-6)
    # explain.jax: what rank.py --explain reports of each row, at another batch size.
    got, engine = explain(*rows.values()), serving._engine_explain(run, rows)
    np.testing.assert_allclose(got["prob"], want, atol=1e-6)
    for k in ("behaviour", "events", "extractors"):
        np.testing.assert_allclose(got[k], engine[f"explain_{k}"], atol=2e-5, err_msg=k)
    x = sig["explain"]["outputs"]
    assert x["behaviour"]["order"] == list(run.schema.behaviour_types)
    assert got["extractors"].shape == (37, len(x["extractors"]["order"]))
    real = rows["hist"][..., run.schema.hist_index("behaviour")] != 0
    assert not got["events"][~real].any() and np.abs(got["events"][real]).max() > 1e-3
    assert np.abs(got["behaviour"]).max() > 1e-3
    if name == "seed_cnn":  # no extractors to weigh
        assert x["extractors"]["order"] == []
    else:  # a part per extractor
        assert len(x["extractors"]["order"]) == len(config.model.extractors)
    if name == "multitask":  # the run's objective: the engage head's probability, not buy's
        assert sig["run"]["objective"] == sig["run"]["objective_head"] == "engage"


def test_vocabularies_and_id_rules_map_raw_ids_as_the_dataset(tmp_path):
    text = helpers.random_log(20, 60, 1500, seed=5)
    data = str(tmp_path / "data")
    helpers.prepare_log(
        helpers.write(tmp_path / "log.csv", text), data, valid_start=1060, test_start=1080,
        max_len=5, neg_ratio=2,
    )  # fmt: skip
    run = scoring.make_run(helpers.tiny_config(), data)
    out = tmp_path / "serve"
    sig = serving.export_run(run, str(out))
    vocabs = sig["ids"]["vocabularies"]
    assert set(vocabs) == {"user_id", "item_id", "category", "behaviour", "time_gap"}
    # Every item id's `item` input row, as ranking reads it.
    items = np.load(out / sig["items"]["file"])
    np.testing.assert_array_equal(items, rank_state.load_item_features(data))
    rows = ExampleStore(data, "train", run.schema).gather(np.arange(50))
    np.testing.assert_array_equal(items[rows["item"][:, 0]], rows["item"])
    assert vocabs["behaviour"]["types"] == {"pv": 2, "cart": 3, "fav": 4, "buy": 5}
    assert vocabs["time_gap"]["base"] == 2
    dataset = Dataset(data, run.config.data)
    for v in ("user_id", "item_id", "category"):
        keys = np.load(out / vocabs[v]["file"])
        raw = np.array([0, 1, 7, 33, 59, 1000])  # some ids the log has, some it has not
        pos = {k: i for i, k in enumerate(keys.tolist())}
        ids = np.array([2 + pos[r] if r in pos else 1 for r in raw.tolist()])
        np.testing.assert_array_equal(ids, dataset.id_maps.lookup(v, raw))
        assert (ids > 1).any() and (ids == 1).any()


def test_export_cli_writes_the_folder_and_reports_the_check(run_dir, tmp_path):
    out = tmp_path / "serve"
    done = helpers.run_tool("export_model", f"--workdir={run_dir}", f"--output={out}", "--explain")
    assert done.returncode == 0, done.stderr[-3000:]
    line = done.stdout.strip().splitlines()[-1]
    found = re.search(
        r"largest difference from the engine (\S+); explain's \(logits\) (\S+)$", line
    )
    assert found and float(found[1]) <= 1e-6 and float(found[2]) <= 2e-5, line
    assert "check on 16 test rows" in line and "explain.jax" in line
    assert (out / "explain.jax").stat().st_size > 0
    assert "read only" not in done.stderr  # Orbax's note on a manager opened read-only
    sig = json.loads((out / "signature.json").read_text())
    assert sig["run"]["workdir"] == os.path.abspath(run_dir)
    # A folder of the user's own is not replaced; a bad platform is one line; nothing written.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    done = helpers.run_tool("export_model", f"--workdir={run_dir}", f"--output={mine}")
    assert done.returncode != 0 and "not this tool's output" in done.stderr
    assert os.listdir(mine) == ["notes.txt"]
    bad = tmp_path / "bad"
    done = helpers.run_tool(
        "export_model", f"--workdir={run_dir}", f"--output={bad}", "--platforms=cpu,gpu"
    )
    assert done.returncode != 0 and "--platforms: ['gpu'] unknown" in done.stderr
    assert "Traceback" not in done.stderr and not bad.exists()
    # A program for a GPU only is written (lowering needs none) and not run on this CPU.
    gpu = tmp_path / "gpu"
    done = helpers.run_tool(
        "export_model", f"--workdir={run_dir}", f"--output={gpu}", "--platforms=cuda"
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "not checked here: the program is for cuda, not cpu" in done.stdout
    assert json.loads((gpu / "signature.json").read_text())["platforms"] == ["cuda"]
    assert not [p for p in os.listdir(tmp_path) if ".tmp-" in p]


def test_bad_platforms_are_refused():
    for platforms, match in (((), "none given"), (("cpu", "cpu"), "a repeat"), (("gpu",), "gpu")):
        with pytest.raises(DataError, match=match):
            serving.check_platforms(platforms)


def test_side_fields_numeric_buckets_and_bags_are_described_as_the_dataset_maps_them(tmp_path):
    """A dataset with side tables: a numeric field's rule (bucket lower bounds in its file)
    and a multi-valued field's slots (one bag) give the ids the prepared rows hold."""
    schema = helpers.prepare_side_tables(tmp_path)
    data = str(tmp_path / "p")
    run = scoring.make_run(helpers.tiny_config(**{"data.source": "prepared"}), data)
    out = tmp_path / "serve"
    sig = serving.export_run(run, str(out))
    fields = sig["inputs"]["item"]["fields"]
    assert [f.get("bag") for f in fields if f["vocab"] == "genres"] == ["genres", "genres"]
    price = sig["ids"]["vocabularies"]["price"]
    assert "lower bounds" in price["rule"]
    bounds = np.load(out / price["file"])
    raw = {}  # item -> price, from the side table (blank: OOV)
    for line in helpers.SIDE_ITEMS.splitlines():
        item, p = line.split(";")[:2]
        raw[int(item)] = float(p) if p else None
    rows = ExampleStore(data, "train", schema).gather(np.arange(len(ExampleStore(data, "train"))))
    items, _ = run.dataset.id_maps.raw("item_id", rows["item"][:, 0])
    col = [f["name"] for f in fields].index("price")
    for item, got in zip(items.tolist(), rows["item"][:, col].tolist(), strict=True):
        p = raw[item]
        want = 1 if p is None else 1 + int((bounds <= p).sum())
        assert got == want, (item, p, got, want)
    score, _ = serving.load(str(out))
    with np.load(out / "check.npz") as check:
        np.testing.assert_allclose(
            score(check["user"], check["item"], check["hist"]), check["prob"]
        )
