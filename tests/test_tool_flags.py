"""Bad flags of the command-line tools: one line on stderr naming the flag (no traceback), a
non-zero exit, before any preparation, training or ranking, and nothing written (an existing
output left as it was). Every case here fails before the tool's real work, so each is a
fraction of a second of a subprocess."""

from __future__ import annotations

import gzip
import os
import subprocess
from pathlib import Path

import pyarrow.csv as pcsv
import pytest

from influence_jax.data.schema import DataError
from influence_jax.ranking import candidates
from tests import helpers


def refused(r: subprocess.CompletedProcess, tool: str, *names: str) -> str:
    """Asserts that `r` is the one-line refusal of `tool` naming each of `names`; returns it."""
    assert r.returncode != 0, (r.stdout[-2000:], r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-4000:]
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(("error: ", f"{tool}: error: ")), r.stderr[-2000:]
    for name in names:
        assert name in last, (name, last)
    return last


def leftovers(folder: Path) -> list[str]:
    """Temporary files of an atomic write left in `folder`."""
    return [n for n in os.listdir(folder) if ".tmp-" in n]


# ----------------------------------------------------------------------------- make_event_log

OLD = "an existing file that a failed run must leave alone\n"


@pytest.mark.parametrize(
    "flag",
    ["--events_per_user=0", "--events=0", "--items=0", "--items=-5", "--categories=0",
     "--block_events=0", "--seed=-1", f"--items={2**31}"],
)  # fmt: skip
def test_make_event_log_checks_its_numbers_and_leaves_the_old_file(tmp_path, flag):
    out = helpers.write(tmp_path / "events.csv", OLD)
    r = helpers.run_tool("make_event_log", "--events=1000", flag, f"--output={out}", timeout=60)
    refused(r, "make_event_log", flag.split("=")[0])
    assert Path(out).read_text() == OLD and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    "output, message",
    [("", "--output is empty"), ("{tmp}", "is a folder"),
     ("{tmp}/file.csv/events.csv", "is a file, not a folder")],
)  # fmt: skip
def test_make_event_log_refuses_an_output_it_cannot_write(tmp_path, output, message):
    helpers.write(tmp_path / "file.csv", OLD)
    output = output.format(tmp=tmp_path)
    r = helpers.run_tool("make_event_log", "--events=1000", f"--output={output}", timeout=60)
    assert message in refused(r, "make_event_log", "--output")
    assert os.listdir(tmp_path) == ["file.csv"] and (tmp_path / "file.csv").read_text() == OLD


def test_make_event_log_replaces_the_file_whole_and_makes_its_folder(tmp_path):
    out = helpers.write(tmp_path / "events.csv", OLD)
    r = helpers.run_tool("make_event_log", "--events=700", "--block_events=100",
                         "--items=50", "--categories=3", f"--output={out}", timeout=60)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    lines = Path(out).read_text().splitlines()
    assert len(lines) == 700 and OLD.strip() not in lines
    items = {int(line.split(",")[1]) for line in lines}
    cats = {int(line.split(",")[2]) for line in lines}
    assert items <= set(range(1, 51)) and cats <= {1, 2, 3}
    gz = tmp_path / "new" / "sub" / "events.csv.gz"  # a folder that is not there yet
    r = helpers.run_tool("make_event_log", "--events=300", f"--output={gz}", timeout=60)
    assert r.returncode == 0, r.stderr[-2000:]
    assert len(gzip.decompress(gz.read_bytes()).decode().splitlines()) == 300
    assert leftovers(tmp_path) == [] and leftovers(gz.parent) == []


# ----------------------------------------------------------------------------- quality


@pytest.mark.parametrize(
    "args, flag",
    [(["--datasets=bogus"], "--datasets"), (["--data_root=/nonexistent-data"], "--data_root"),
     (["--folds=0"], "--folds"), (["--seeds=x"], "--seeds"), (["--seeds="], "--seeds"),
     (["--seeds=1,1"], "--seeds"), (["--models=bogus"], "--models"), (["--n_boot=0"], "--n_boot"),
     (["--heads"], "--heads"), (["--task=conversion", "--heads", "--folds=2"], "--folds"),
     (["--task=conversion", "--horizon_hours=0"], "--horizon_hours"),
     (["--workdir={file}"], "--workdir"), ([], "--data_root")],
)  # fmt: skip
def test_quality_checks_every_flag_before_preparing(tmp_path, args, flag):
    """The data root is an empty folder: a flag checked only after preparation would fail on the
    data root instead; the last case is that data root itself, named before any work."""
    work, data = tmp_path / "work", tmp_path / "data"
    data.mkdir()
    file = helpers.write(tmp_path / "file", OLD)
    args = [a.format(file=file) for a in args]
    r = helpers.run_tool("quality", f"--workdir={work}", f"--data_root={data}", *args, timeout=60)
    last = refused(r, "quality", flag)
    assert "prepared" not in last and not work.exists()
    assert Path(file).read_text() == OLD


# ----------------------------------------------------------------------------- multitask_compare


@pytest.mark.parametrize(
    "args, flag",
    [(["--seeds=x"], "--seeds"), (["--seeds="], "--seeds"), (["--datasets=bogus"], "--datasets"),
     (["--data_root=/nonexistent-data"], "--data_root"), (["--workdir={file}"], "--workdir"),
     (["--horizon_hours=-1"], "--horizon_hours"), ([], "--data_root")],
)  # fmt: skip
def test_multitask_compare_checks_every_flag_before_preparing(tmp_path, args, flag):
    work, data = tmp_path / "work", tmp_path / "data"
    data.mkdir()
    file = helpers.write(tmp_path / "file", OLD)
    args = [a.format(file=file) for a in args]
    r = helpers.run_tool("multitask_compare", f"--workdir={work}", f"--data_root={data}", *args,
                         timeout=60)  # fmt: skip
    last = refused(r, "multitask_compare", flag)
    assert "prepared" not in last and not work.exists()
    assert Path(file).read_text() == OLD


# ----------------------------------------------------------------------------- ranking_quality


@pytest.mark.parametrize(
    "args, flag",
    [(["--output={tmp}"], "--output"), (["--n_boot=0"], "--n_boot"), (["--seeds="], "--seeds"),
     (["--seeds=x"], "--seeds"), (["--top_k=0"], "--top_k"), (["--datasets="], "--datasets"),
     (["--datasets=movielens,movielens"], "--datasets")],
)  # fmt: skip
def test_ranking_quality_checks_its_flags_before_ranking(tmp_path, args, flag):
    """The workdir has no runs: a flag checked after the runs would fail on them instead."""
    args = [a.format(tmp=tmp_path) for a in args]
    r = helpers.run_tool("ranking_quality", f"--workdir={tmp_path}", *args, timeout=60)
    last = refused(r, "ranking_quality", flag)
    assert "no such run" not in last and os.listdir(tmp_path) == []


def test_ranking_quality_names_the_known_datasets_for_an_unknown_one(tmp_path):
    """A name that is no dataset (and has no runs: another name's runs may be ranked, as
    tests/test_ranking.py's tiny ones) is not sent to quality.py, which cannot train it."""
    r = helpers.run_tool("ranking_quality", f"--workdir={tmp_path}", "--datasets=bogus")
    last = refused(r, "ranking_quality", "--datasets", "'bogus'", "not a known dataset")
    assert "quality.py" not in last and os.listdir(tmp_path) == []
    for name in ("movielens", "retailrocket"):  # the registered sources with a sample
        assert name in last
    r = helpers.run_tool("ranking_quality", f"--workdir={tmp_path}", "--datasets=movielens")
    refused(r, "ranking_quality", "movielens-ranker-0: no such run", "tools/quality.py")


# ----------------------------------------------------------------------------- export_split


@pytest.mark.parametrize(
    "fmt, name", [("csv", "out.parquet"), ("parquet", "out.csv"), ("csv", "out.PQ")]
)
@pytest.mark.parametrize("tool", ["export_split", "rank"])
def test_a_format_the_output_name_contradicts_is_refused(tmp_path, fmt, name, tool):
    where = "--data=/nonexistent-data" if tool == "export_split" else "--workdir=/nonexistent"
    r = helpers.run_tool(tool, where, f"--format={fmt}", f"--output={tmp_path / name}",
                         timeout=60)  # fmt: skip
    refused(r, tool, f"--format={fmt}", "--output")
    assert os.listdir(tmp_path) == []


def test_export_split_refuses_a_gz_name(tmp_path):
    r = helpers.run_tool("export_split", "--data=/nonexistent-data",
                         f"--output={tmp_path / 'out.csv.gz'}", timeout=60)  # fmt: skip
    assert "drop the .gz" in refused(r, "export_split", "--output")
    assert os.listdir(tmp_path) == []


def test_export_split_takes_the_format_from_the_extension(tmp_path):
    log = helpers.write(tmp_path / "log.csv", helpers.LOG)
    data = tmp_path / "data"
    helpers.prepare_log(log, data)
    out = tmp_path / "train.csv"  # no --format: CSV, not the default Parquet
    r = helpers.run_tool("export_split", f"--data={data}", "--split=train", f"--output={out}",
                         timeout=120)  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert out.read_bytes()[:4] != b"PAR1"
    t = pcsv.read_csv(out)
    assert t.num_rows == int(r.stdout.split()[1].replace(",", "")) > 0
    assert {"user_id", "item_id", "label"} <= set(t.column_names)


# ----------------------------------------------------------------------------- rank


@pytest.mark.parametrize(
    "flag",
    ["--progress_every=-1", "--progress_every=nan", "--top_k=0", "--batch_size=0",
     "--retrieve_n=-1", "--max_users=-1", "--max_items=-1"],
)  # fmt: skip
def test_rank_checks_its_numbers_as_it_parses_them(tmp_path, flag):
    out = tmp_path / "top.parquet"
    r = helpers.run_tool("rank", "--workdir=/nonexistent-run", f"--output={out}", flag, timeout=60)
    refused(r, "rank", flag.split("=")[0])
    assert os.listdir(tmp_path) == []


def test_rank_says_candidates_is_a_folder_before_loading_the_run(tmp_path):
    folder = tmp_path / "candidates"
    folder.mkdir()
    out = tmp_path / "top.parquet"
    args = ("--workdir=/nonexistent-run", f"--output={out}", f"--candidates={folder}")
    r = helpers.run_tool("rank", *args, timeout=60)
    last = refused(r, "rank", "--candidates", "is a folder")
    assert "nonexistent-run" not in last and not out.exists()
    r = helpers.run_tool("rank", *args[:2], f"--candidates={tmp_path / 'none.csv'}", timeout=60)
    assert "no such file" in refused(r, "rank", "--candidates")


def test_read_candidate_ids_says_a_folder_is_a_folder(tmp_path):
    with pytest.raises(DataError, match="is a folder, not a candidates file"):
        candidates.read_candidate_ids(str(tmp_path), maps=None)
    with pytest.raises(DataError, match="no such candidates file"):
        candidates.read_candidate_ids(str(tmp_path / "none.csv"), maps=None)
