"""The read-side command-line tools on a trained tiny run: tools/evaluate.py gives the metrics
training gave, and every tool refuses a bad output path or flag value in one line, before work."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from influence_jax import evaluation, metrics, scoring
from influence_jax.data.dataset import Dataset
from influence_jax.errors import DataError
from tests import helpers


def test_evaluate_cli_gives_the_metrics_training_gave(run_dir, tmp_path):
    out = tmp_path / "sub" / "metrics.json"
    args = (f"--workdir={run_dir}", f"--output={out}", "--step=best")
    r = helpers.run_tool("evaluate", *args, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    best = json.loads((Path(run_dir) / "best.json").read_text())["step"]
    assert r.stdout.startswith(f"test metrics at step {best} (512 examples): auc=")
    assert "  target buy: auc=" in r.stdout
    saved = json.loads(out.read_text())
    assert saved["step"] == best and saved["split"] == "test"
    # The same numbers as the final evaluation of training, which is that of the best step
    # by the validation metric (TensorBoard keeps float32).
    trained = {k: v[-1][1] for k, v in helpers.scalars(run_dir).items() if k.startswith("test/")}
    assert trained["test/step"] == best
    for key in ("auc", "gauc", "logloss", "accuracy"):
        assert saved["metrics"][key] == pytest.approx(trained[f"test/{key}"], rel=1e-6), key
    # In process, with another batch size: exact metrics do not depend on it.
    again = evaluation.evaluate_run(scoring.load_run(run_dir, step="best"), "test", batch_size=56)
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


def test_an_output_folder_is_replaced_only_when_it_is_the_tools_own(tmp_path):
    from influence_jax import files

    check = lambda p: files.check_output(str(p), "output", folder=True, replaces=("a.json",))
    check(tmp_path / "new")  # nothing there yet
    (tmp_path / "empty").mkdir()
    check(tmp_path / "empty")
    (tmp_path / "ours").mkdir()
    (tmp_path / "ours" / "a.json").write_text("{}")
    check(tmp_path / "ours")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(DataError, match=r"mine: a folder that is not this tool's output \(none of"):
        check(tmp_path / "mine")


def test_a_label_that_is_not_0_or_1_names_the_split(run_dir, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(os.path.join(run_dir, "data"), data)
    labels = data / "test" / "part-00000" / "label.npy"
    y = np.load(labels)
    y[5] = np.nan
    np.save(labels, y)
    run = scoring.load_run(run_dir, data=str(data))
    with pytest.raises(DataError, match=rf"{data / 'test'}: row 5: label is nan, not 0 or 1"):
        evaluation.evaluate_run(run, "test")


def test_a_dataset_the_run_was_not_trained_on_is_one_clear_line(run_dir, tmp_path):
    from influence_jax.data import synthetic

    other = helpers.tiny_config(**{"data.synthetic.num_items": 600})
    synthetic.ensure(other.data.synthetic, str(tmp_path / "other"))
    out = tmp_path / "top.parquet"
    r = helpers.run_tool("rank", f"--workdir={run_dir}", f"--data={tmp_path / 'other'}",
                         f"--output={out}", timeout=180)  # fmt: skip
    assert r.returncode == 2 and not out.exists()
    assert f"--data={tmp_path / 'other'}: not the dataset" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    # A run from before dataset.json: the shapes tell.
    old = tmp_path / "old-run"
    shutil.copytree(run_dir, old, ignore=shutil.ignore_patterns("dataset.json", "data"))
    r = helpers.run_tool("rank", f"--workdir={old}", f"--data={tmp_path / 'other'}",
                         f"--output={out}", timeout=180)  # fmt: skip
    assert r.returncode == 2 and not out.exists()
    assert "['embeddings']['embed_item_id'] has shape (502, 8) in the checkpoint but (602, 8)" in (
        r.stderr
    )
    assert "another dataset" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_evaluate_writes_per_example_predictions(run_dir, tmp_path):
    out = tmp_path / "pred.csv"  # the name's extension picks the format (default Parquet)
    args = (f"--workdir={run_dir}", "--step=best", f"--predictions={out}", "--json")
    r = helpers.run_tool("evaluate", *args, timeout=180)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"wrote 512 predictions to {out}" in r.stderr
    printed = json.loads(r.stdout)
    t = pcsv.read_csv(out).to_pydict()
    assert list(t) == ["user_id", "item_id", "timestamp", "label", "target_behaviour", "score"]
    assert len(t["score"]) == 512 == printed["metrics"]["num_examples"]
    # The rows are the split's, in order, with raw ids (synthetic raw id = index - 2).
    store = scoring.load_run(run_dir).dataset.store("test")
    np.testing.assert_array_equal(t["item_id"], store.column("item")[:, 0] - 2)
    np.testing.assert_array_equal(t["label"], store.column("label"))
    assert metrics.auc(t["label"], t["score"]) == pytest.approx(printed["metrics"]["auc"], rel=1e-6)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_export_split_reads_back_row_for_row(tmp_path, fmt):
    """A prepared Taobao-layout log exported with raw ids: the same rows, labels and histories."""
    log = helpers.write(tmp_path / "log.csv", helpers.random_log(15, 40, 800, seed=3))
    data = tmp_path / "data"
    helpers.prepare_log(log, data, valid_start=1060, test_start=1080, max_len=6, neg_ratio=1)
    out = tmp_path / f"train.{fmt}"
    r = helpers.run_tool("export_split", f"--data={data}", "--split=train", f"--output={out}",
                         f"--format={fmt}", timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    t = (pq.read_table(out) if fmt == "parquet" else pcsv.read_csv(out)).to_pydict()
    d = Dataset(str(data))
    ex = d.store("train").gather(np.arange(len(d.store("train"))))
    maps = d.id_maps
    assert len(t["label"]) == len(ex["label"]) == int(r.stdout.split()[1].replace(",", ""))
    np.testing.assert_array_equal(t["label"], ex["label"])
    want = set(zip(maps.user_raw(ex["user_key"]).tolist(),
                   maps.raw("item_id", ex["item"][:, 0])[0].tolist(),
                   ex["timestamp"].tolist(), strict=True))  # fmt: skip
    got = set(zip(t["user_id"], t["item_id"], t["timestamp"], strict=True))
    assert got == want
    # Histories: raw item ids, most recent first, padding left out.
    for k in range(0, len(ex["label"]), 97):
        beh = ex["hist"][k, :, 2]
        items = maps.raw("item_id", ex["hist"][k, beh > 0, 0])[0].tolist()
        got_items = t["hist_item_id"][k]
        if fmt == "csv":
            got_items = [int(x) for x in str(got_items).split("|")] if got_items != "" else []
        assert got_items == items, k
        assert t["target_behaviour"][k] in ("pv", "cart", "fav", "buy")


def test_prepare_events_cli_reads_the_time_format_and_saves_the_mapping(tmp_path):
    """--time_format/--time_zone reach the events reader through the flags and land in
    schema.json with the column mapping; an unknown format is one line naming the flag."""
    rows = [f"{u},{i},{b},202301{d:02d}" for d, (u, i, b) in enumerate(
        [(1, 10, "view"), (1, 11, "buy"), (2, 10, "view"), (2, 12, "buy"), (1, 12, "buy"),
         (2, 11, "view"), (1, 10, "buy"), (2, 10, "buy")], start=1)]  # fmt: skip
    log = helpers.write(tmp_path / "log.csv", "\n".join(["uid,sku,act,day", *rows]) + "\n")
    args = ["--source=events", f"--input={log}", "--user_col=uid", "--item_col=sku",
            "--behaviour_col=act", "--timestamp_col=day", "--behaviour_types=view,buy",
            "--time_zone=Asia/Shanghai", "--target_behaviour=buy", "--neg_ratio=0",
            "--valid_start=1672934400", "--test_start=1673107200", "--noaudit"]  # fmt: skip
    out = tmp_path / "data"
    r = helpers.run_tool("prepare_data", *args, "--time_format=yyyymmdd", f"--output={out}")
    assert r.returncode == 0, r.stderr[-2000:]
    extra = json.loads((out / "schema.json").read_text())["extra"]
    assert extra["split"]["t_min"] == 1672502400  # 2023-01-01 00:00 in Shanghai (UTC+8)
    opts = extra["source_options"]
    assert (opts["time_format"], opts["time_zone"], opts["timestamp"]) == (
        "yyyymmdd", "Asia/Shanghai", "day",
    )  # fmt: skip
    r = helpers.run_tool("prepare_data", *args, "--time_format=dd.mm", f"--output={out}2")
    assert r.returncode == 1 and "--time_format: unknown format 'dd.mm'" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


HELP = {  # tool -> a flag of its own that --help must list
    "prepare_data": "--task",
    "rank": "--top_k",
    "evaluate": "--split",
    "influence_report": "--workdir",
    "baselines": "--data",
    "export_split": "--format",
    "quality": "--folds",
    "benchmark": "--what",
    "cv": "--cv_folds",
    "sweep": "--sweep",
    "select_features": "--workdir",
    "readme_figures": "--import_influence",
    "multitask_compare": "--datasets",
    "retrieve": "--recall",
}


@pytest.mark.parametrize("tool", sorted(HELP))
def test_every_tool_help_exits_0_and_lists_its_own_flags(tool):
    r = helpers.run_tool(tool, "--help", timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert HELP[tool] in r.stdout + r.stderr


def test_console_script_help_lists_the_training_flags():
    import os
    import subprocess
    import sys

    exe = os.path.join(os.path.dirname(sys.executable), "influence-jax")  # beside this python
    assert os.path.exists(exe), "the influence-jax console script is installed with the package"
    r = subprocess.run([exe, "--help"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and "--workdir" in r.stdout + r.stderr and "--config" in r.stdout


def test_readme_figures_are_rendered_from_the_committed_results(tmp_path):
    """The README's figure blocks equal what tools/readme_figures.py renders from
    docs/results; a changed result makes them stale."""
    r = helpers.run_tool("readme_figures", "--check", timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    sys.path.insert(0, str(helpers.TOOLS))
    import readme_figures

    results = tmp_path / "results"
    shutil.copytree(os.path.join(readme_figures.RESULTS), results)
    meta = results / readme_figures.INFLUENCE / "meta.json"
    m = json.loads(meta.read_text())
    m["test_positives"] += 1
    meta.write_text(json.dumps(m))
    stale = readme_figures.update(check=True, results=str(results))
    assert sorted(stale) == sorted(readme_figures.READMES[k] for k in ("en", "zh"))
    facts = readme_figures.influence_facts(str(results / readme_figures.INFLUENCE))
    assert f"{facts['positives']} conversions" in readme_figures.influence_en(facts)


def test_cpu_speed_figures_follow_the_benchmark_rows(tmp_path):
    """The README's CPU speed sentences and docs/benchmarks.md's per-machine sections come from
    the benchmark's JSON rows, one folder per machine: a changed ratio changes all three
    documents, the text names each machine, and the newest run comes first."""
    sys.path.insert(0, str(helpers.TOOLS))
    import readme_figures

    results = tmp_path / "results"
    shutil.copytree(os.path.join(readme_figures.RESULTS), results)
    machines = sorted(p for p in (results / "cpu").iterdir() if p.is_dir())
    assert machines, "docs/results/cpu/ holds one folder per machine"
    path = machines[0] / "train.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    jax_1024 = next(r for r in rows if r["impl"] == "jax" and r["batch"] == 1024)
    jax_1024["train_vs_best_ref"] = 9.87
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    stale = readme_figures.update(check=True, results=str(results))
    assert sorted(stale) == sorted(readme_figures.READMES[k] for k in ("en", "zh", "benchmarks"))
    facts = readme_figures.cpu_facts(str(results / "cpu"))
    assert len(facts) == len(machines)
    assert [f["machine"]["date"] for f in facts] == sorted(
        (f["machine"]["date"] for f in facts), reverse=True
    )
    assert "9.87x /" in readme_figures.cpu_en(facts)
    for f in facts:  # every machine is named, in both languages and in the docs
        for render in (readme_figures.cpu_en, readme_figures.cpu_zh):
            assert f["machine"]["cpu"] in render(facts)
        assert f"### {f['machine']['cpu']}" in readme_figures.cpu_benchmarks(facts)
    assert "| 9.87x |" in readme_figures.cpu_benchmarks(facts)
    # A machine's two files must come from that machine: its section names only one.
    path = machines[0] / "rank.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for r in rows:
        if "machine" in r:
            r["machine"]["cpu"] = "another CPU"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="another CPU"):
        readme_figures.cpu_facts(str(results / "cpu"))


def test_ctrl_c_during_rank_is_one_line_and_leaves_no_file(run_dir, tmp_path):
    import signal
    import subprocess

    out = tmp_path / "top.csv"
    cmd = [sys.executable, str(helpers.TOOLS / "rank.py"), f"--workdir={run_dir}",
           f"--output={out}", "--format=csv", "--batch_size=8", "--progress_every=0",
           "--all_items"]  # fmt: skip
    # A shell's background job starts with SIGINT ignored, and Python then installs no
    # KeyboardInterrupt handler: start the tool with the default disposition a terminal gives
    # (through a small exec, not preexec_fn, which forks a multithreaded JAX process).
    reset = (
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    cmd = [sys.executable, "-c", reset, *cmd[1:]]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # scoring has started once it reports progress
        lines.append(line)
        if line.startswith("scored "):
            break
    proc.send_signal(signal.SIGINT)
    _, rest = proc.communicate(timeout=120 * helpers.HANG_FACTOR)
    assert proc.returncode == 130, "".join(lines) + rest
    assert rest.strip().splitlines()[-1:] == ["rank: interrupted"], rest
    assert "Traceback" not in rest and not out.exists()
    assert not list(tmp_path.iterdir())  # no temporary file either


@pytest.mark.slow  # three rank processes (about 40 s); test_ranking tests the logic in-process
def test_rank_interrupted_then_run_again_resumes_and_writes_the_same_table(run_dir, tmp_path):
    """Ctrl-C after two of three blocks: the blocks stay in OUTPUT.progress/, and the same
    command run again reads them, scores the third and writes the uninterrupted table."""
    import signal
    import subprocess

    def cmd(out):
        return [sys.executable, str(helpers.TOOLS / "rank.py"), f"--workdir={run_dir}",
                f"--output={out}", "--batch_size=8", "--progress_every=0", "--max_users=3",
                "--max_items=40", "--block_pairs=40", "--top_k=5"]  # fmt: skip

    whole = tmp_path / "whole.parquet"
    r = subprocess.run(cmd(whole), capture_output=True, text=True, cwd=helpers.ROOT, timeout=180)
    assert r.returncode == 0 and r.stderr.count("\nscored ") == 15, r.stderr  # 3 blocks of 5
    out = tmp_path / "top.parquet"
    reset = (  # the default SIGINT disposition a terminal gives (test_ctrl_c_during_rank...)
        "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
        "os.execv(sys.executable, [sys.executable] + sys.argv[1:])"
    )
    first = cmd(out)
    proc = subprocess.Popen([sys.executable, "-c", reset, *first[1:]], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=helpers.ROOT)  # fmt: skip
    seen = 0
    for line in proc.stderr:  # the 11th batch is the third block's first: two are kept
        seen += line.startswith("scored ")
        if seen == 11:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120 * helpers.HANG_FACTOR)
    assert proc.returncode == 130 and not out.exists()
    assert sorted(os.listdir(f"{out}.progress")) == [
        "p000-block-000000.npz", "p000-block-000001.npz", "p000-settings.json"
    ]  # fmt: skip
    r = subprocess.run(first, capture_output=True, text=True, cwd=helpers.ROOT, timeout=180)
    assert r.returncode == 0 and "resuming: 2 blocks already scored" in r.stderr, r.stderr
    lines = [x for x in r.stderr.splitlines() if x.startswith("scored ")]
    assert len(lines) == 2 + 5  # a line per kept block, then the third block's batches
    assert lines[1].startswith("scored 80/120 pairs (67%) 0 pairs/s")  # kept: not in the rate
    assert pq.read_table(out).to_pydict() == pq.read_table(whole).to_pydict()
    assert not os.path.exists(f"{out}.progress")


def test_no_tool_starts_jax_for_help():
    """`--help` (and a flag error) answers before JAX, Orbax or the models load: the tools bind
    those with influence_jax.lazy, so absl parses the flags first (2-3 s saved each)."""
    tools = sorted(p.stem for p in Path(helpers.TOOLS).glob("*.py"))
    assert len(tools) >= 15, tools
    for cmd in [["-m", "influence_jax.main"], *([f"{helpers.TOOLS}/{t}.py"] for t in tools)]:
        r = subprocess.run(
            [sys.executable, "-X", "importtime", *cmd, "--help"],
            capture_output=True, text=True, cwd=helpers.ROOT, timeout=120 * helpers.HANG_FACTOR,
        )  # fmt: skip
        assert r.returncode == 0 and "--" in r.stdout, (cmd, r.stdout[-500:], r.stderr[-2000:])
        loaded = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines()}
        heavy = loaded & {"jax", "orbax.checkpoint", "flax"}
        assert not heavy, (cmd, heavy)


def test_a_lazy_module_runs_its_code_on_first_attribute_use(tmp_path, monkeypatch):
    from influence_jax import lazy

    (tmp_path / "lazy_probe.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_suffix('.ran').write_text('1')\nVALUE = 7\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_probe", raising=False)
    mod = lazy.module("lazy_probe")
    assert sys.modules["lazy_probe"] is mod and lazy.module("lazy_probe") is mod
    assert not (tmp_path / "lazy_probe.ran").exists()  # bound, not run
    assert mod.VALUE == 7 and (tmp_path / "lazy_probe.ran").exists()
    with pytest.raises(ImportError, match="no module named 'influence_jax.nope'"):
        lazy.module("influence_jax.nope")


def test_a_write_clears_the_temporary_files_a_killed_writer_left(tmp_path):
    """Temporary names carry host and pid: the next write of the same target removes those
    of a process that is gone (SIGKILL skips every cleanup) and keeps a live one's and another
    host's (a shared folder)."""
    from influence_jax import files

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    out = tmp_path / "top.csv"
    dead = files.temp_prefix(str(out)).replace(f"-{os.getpid()}-", f"-{gone}-") + "abc"
    live = files.temp_prefix(str(out)) + "xyz"  # this process: still writing
    other = f"top.csv.tmp-otherhost-{gone}-abc"
    # This hostname in another PID namespace (a container sharing the host's network): its pid
    # means another process, so the file is not this namespace's to remove.
    pidns = os.stat("/proc/self/ns/pid").st_ino
    assert files._host().endswith(f"_{pidns}")
    ns = f"top.csv.tmp-{files._host().removesuffix(str(pidns))}{pidns + 1}-{gone}-abc"
    for name in (dead, live, other, ns):
        (tmp_path / name).write_text("part")
    (tmp_path / (dead + "-dir")).mkdir()  # e.g. a folder of influence_report's
    files.write_text(str(out), "done")
    assert sorted(os.listdir(tmp_path)) == sorted([live, other, ns, "top.csv"])
    folder = tmp_path / "prepared"
    (
        tmp_path / (files.temp_prefix(str(folder)).replace(f"-{os.getpid()}-", f"-{gone}-") + "q")
    ).mkdir()
    with files.atomic_folder(str(folder)) as root:
        (Path(root) / "schema.json").write_text("{}")
    assert sorted(os.listdir(tmp_path)) == sorted([live, other, ns, "prepared", "top.csv"])


def test_a_folder_moved_aside_by_a_killed_replace_is_put_back(tmp_path):
    """replace_folder moves the old folder aside, then renames the new one in: a kill between
    the two left no folder at the target and the old one in `<name>.old-*` for good. The next
    write of the target puts it back (then replaces it as usual); a live process's is kept."""
    from influence_jax import files

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    target = tmp_path / "prepared"
    aside = tmp_path / files.temp_prefix(str(target), "old").replace(
        f"-{os.getpid()}-", f"-{gone}-"
    )
    (aside / "x").mkdir(parents=True)
    (aside / "x" / "schema.json").write_text("v1")
    live = tmp_path / (files.temp_prefix(str(target), "old") + "abc")
    live.mkdir()
    assert files.clear_dead_temps(str(target)) == [aside.name]
    assert (target / "schema.json").read_text() == "v1"
    assert sorted(os.listdir(tmp_path)) == sorted(["prepared", live.name])
    live.rmdir()
    with files.atomic_folder(str(target)) as root:  # a replace leaves nothing aside
        (Path(root) / "schema.json").write_text("v2")
    assert (target / "schema.json").read_text() == "v2"
    assert os.listdir(tmp_path) == ["prepared"]


def test_a_preempted_run_exits_0_by_default_or_the_given_code_with_one_line(capsys):
    """--preempted_exit_code (main, sweep, cv, select_features): 0 reads as finished; another
    code, for a scheduler that restarts only failed jobs, comes with one line."""
    from influence_jax import cli

    cli.exit_preempted("sweep", 0)  # returns
    assert capsys.readouterr().err == ""
    with pytest.raises(SystemExit) as stop:
        cli.exit_preempted("sweep", 143)
    assert stop.value.code == 143
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["sweep: stopped by SIGTERM at a saved checkpoint; the same command resumes "
                   "(exit 143, --preempted_exit_code)"]  # fmt: skip


def test_sigterm_ends_a_tool_in_one_line_and_removes_its_temporary_file(tmp_path):
    """SIGTERM (a scheduler's stop) runs the cleanup a Ctrl-C runs: exit 143, one line, no
    temporary file left (it skipped every cleanup before)."""
    import signal
    import time

    out = tmp_path / "log.csv"
    proc = subprocess.Popen(
        [sys.executable, str(helpers.TOOLS / "make_event_log.py"), "--events=50000000",
         "--block_events=100000", f"--output={out}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=helpers.ROOT,
    )  # fmt: skip
    deadline = time.monotonic() + 60 * helpers.HANG_FACTOR
    while not any(p.stat().st_size > 0 for p in tmp_path.iterdir()):  # writing has begun
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60 * helpers.HANG_FACTOR)
    assert proc.returncode == 143 and err.strip().splitlines()[-1] == "make_event_log: terminated"
    assert "Traceback" not in err and list(tmp_path.iterdir()) == []
