"""Ranks candidates for users from a trained run's checkpoint: the top k per user, written
atomically as Parquet (default) or CSV with columns user_id, rank, item_id, score.

    python tools/rank.py --workdir=runs/demo --output=runs/demo/top10.parquet --top_k=10
    python tools/rank.py --workdir=runs/taobao --data=.prepared/taobao --step=best \
      --candidates=candidates.csv --output=top10.csv --format=csv --top_k=10 --explain

    python tools/rank.py --workdir=runs/taobao --data=.prepared/taobao --as_of=end \
      --exclude_seen --max_items=5000 --output=top10.parquet
    python tools/rank.py --workdir=runs/taobao --data=.prepared/taobao --output=top10.parquet \
      --events=UserBehavior.csv --as_of=1512200000

Users are ranked as of --as_of (default: --split): valid or test (the split's start) or end
(after the last event), each with the history a training example at that time would hold
(rank_state/ written by prepare_data.py; datasets without it fall back, with a warning, to
each user's latest example in the split). With --events, histories are rebuilt from a raw log
as of any unix time with the same function and the dataset's vocabularies (the log is read as
the dataset's source, or --source; an events log with the column mapping, time format and zone
saved at preparation). Candidates (CSV with a header, or Parquet) hold raw user_id,item_id as
in the original log; without --candidates every user gets --retrieve_n (200) candidates from
the non-learned retriever (co-visitation, the user's recent items, popular in the user's
categories and overall, built from the ranked users' histories as of the ranking time) and
those are scored; --all_items scores every training item instead (--max_items caps them to the
most frequent), after a warning with the number of pairs and the estimated time. --exclude_seen
drops the items the user had already interacted with. A progress line with rate and ETA goes
to stderr. --data may be left out for a synthetic run.

Several processes (JAX's multi-process runtime, JAX_NUM_PROCESSES / JAX_COORDINATOR_ADDRESS /
JAX_PROCESS_ID as for training, one per host): each ranks every P-th user (candidates retrieved
from every user's history) and --output is a folder on storage every host sees, holding
part-<process>.parquet (or .csv) files that pandas, polars, DuckDB and Spark read as one table;
it appears whole once every part is written. --explain runs in one process.
"""

from __future__ import annotations

import json
import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files, hostmem, lazy, retrieval  # noqa: E402
from influence_jax.data import readers  # noqa: E402
from influence_jax.data.schema import DataError  # noqa: E402

ranking = lazy.module("influence_jax.ranking")  # JAX: after the flags (--help stays fast)

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
_DATA = flags.DEFINE_string("data", None, "Prepared dataset folder (default: the run's own).")
_OUTPUT = flags.DEFINE_string("output", None, "Output file (replaced atomically).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Items kept per user.", lower_bound=1)
_CANDIDATES = flags.DEFINE_string("candidates", None, "CSV or Parquet of user_id,item_id.")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, best or latest.")
_OBJECTIVE = flags.DEFINE_string(
    "objective", "", "Multi-task runs: the head to score (default: the run's objective head)."
)
_EXPLAIN = flags.DEFINE_bool(
    "explain", False, "Add behaviour-type and extractor contributions and the top 3 events."
)
_FORMAT = flags.DEFINE_enum(
    "format",
    "parquet",
    ["parquet", "csv"],
    "Output format; unset, --output's extension decides (.csv: csv), else parquet.",
)
_SPLIT = flags.DEFINE_string("split", "test", "Rank as of this split's start: valid or test.")
_AS_OF = flags.DEFINE_string(
    "as_of",
    None,
    "Ranking time (overrides --split): valid, test or end (after the log); with --events, a "
    "unix time.",
)
_EVENTS = flags.DEFINE_string(
    "events", None, "Raw event log: rebuild histories as of --as_of=UNIX_TS from it."
)
_SOURCE = flags.DEFINE_enum(
    "source",
    None,
    list(readers.SOURCES),
    "Format of --events (a source of data/sources.py; default: the dataset's own). An events "
    "log is read with the column mapping, --time_format and --time_zone that prepare_data.py "
    "saved in the dataset's schema.json.",
)
_MAX_ITEMS = flags.DEFINE_integer(
    "max_items",
    0,
    "Without --candidates: score every one of the N most frequent training items (implies "
    "--all_items; 0: no cap).",
    lower_bound=0,
)
_RETRIEVE = flags.DEFINE_integer(
    "retrieve_n",
    retrieval.RETRIEVE,
    "Without --candidates: candidates per user from the non-learned retriever (co-visitation, "
    "recent items, popular in the user's categories and overall; see tools/retrieve.py).",
    lower_bound=0,
)
_TABLES = flags.DEFINE_string(
    "retrieval_tables",
    None,
    "A folder of retrieval tables (tools/retrieve.py --tables): reused when they were built "
    "from the same histories and settings, else built and saved there.",
)
_MAX_USERS = flags.DEFINE_integer(
    "max_users",
    0,
    "Rank only this many users, spread evenly over them (0: all): a sample to time or check a "
    "large run; the retrieval tables still come from every user.",
    lower_bound=0,
)
_TWO_TOWER = flags.DEFINE_string(
    "two_tower",
    None,
    "A two-tower retriever trained on the run's dataset (tools/train_retriever.py --workdir): "
    "its learned source joins the retrieved candidates.",
)
_ALL_ITEMS = flags.DEFINE_bool(
    "all_items",
    False,
    "Without --candidates: score every train item for every user instead of retrieving "
    "(announced with the number of pairs and the time it will take).",
)
_EVALUATE = flags.DEFINE_bool(
    "evaluate",
    False,
    "With --as_of=valid|test: HR@k, NDCG@k and MRR@k (k = --top_k) of the ranked lists against "
    "the split's positives, beside the retriever's single-source lists for the same users.",
)
_EXCLUDE_SEEN = flags.DEFINE_bool(
    "exclude_seen", False, "Without --candidates: drop items the user interacted with before."
)
_BLOCK_PAIRS = flags.DEFINE_integer(
    "block_pairs",
    1 << 20,  # ranking.BLOCK_PAIRS (this tool does not load JAX before its flags are parsed)
    "Candidate pairs scored per block of whole users: each block's top k is kept in "
    "OUTPUT.progress/ until the output is written, and a rerun after a kill resumes there.",
    lower_bound=1,
)
_PROGRESS = flags.DEFINE_float(
    "progress_every",
    10.0,
    "Seconds between progress lines (0: a line after every batch; there is always a last one).",
)
flags.register_validator(  # a validator, not lower_bound: NaN fails it too
    "progress_every",
    lambda seconds: seconds >= 0,
    message="must be 0 or more seconds (0: a line after every batch)",
)
_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_host_memory", True, "Keep freed host memory for reuse (faster scoring; hostmem.py)."
)
_BATCH = flags.DEFINE_integer(
    "batch_size", None, "Global scoring batch (default: eval batch).", lower_bound=1
)
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices",
    0,
    "On CPU: split the host into this many XLA devices, one batch shard each (e.g. the number "
    "of cores; faster for the full ranker, hostmem.split_host); 0 keeps JAX's one CPU device.",
)
flags.mark_flags_as_required(["workdir", "output"])


def _rank() -> None:
    # The flags absl cannot check, before any work (the library checks the file's contents).
    if _CANDIDATES.value is not None:
        if os.path.isdir(_CANDIDATES.value):
            raise DataError(
                f"--candidates={_CANDIDATES.value}: is a folder; give a CSV or Parquet file"
            )
        if not os.path.isfile(_CANDIDATES.value):
            raise DataError(f"--candidates={_CANDIDATES.value}: no such file")
    hostmem.split_host(_HOST_DEVICES.value)  # before JAX starts its CPU client
    cli.init_distributed()  # JAX_NUM_PROCESSES > 1: each process ranks every P-th user
    import jax

    several = jax.process_count() > 1  # then OUTPUT is a folder of part files
    # Before any work; a folder (of part files) is replaced only when it holds ours.
    parts = ("part-00000.parquet", "part-00000.csv")
    files.check_output(_OUTPUT.value, "output", folder=several, replaces=parts)
    fmt = (
        _FORMAT.value
        if several
        else files.table_format(_OUTPUT.value, _FORMAT.value, _FORMAT.present)
    )
    if _EVENTS.value and not _AS_OF.value:
        raise DataError("--events needs --as_of=UNIX_TS")
    run = ranking.load_run(_WORKDIR.value, _DATA.value, _STEP.value, _OBJECTIVE.value)
    events = None
    if _EVENTS.value:
        events = ranking.open_log(_SOURCE.value, _EVENTS.value, run.dataset)
    s = ranking.rank(
        run,
        _OUTPUT.value,
        top_k=_TOP_K.value,
        candidates=_CANDIDATES.value,
        split=_SPLIT.value,
        explain=_EXPLAIN.value,
        fmt=fmt,
        max_items=_MAX_ITEMS.value,
        batch_size=_BATCH.value,
        as_of=_AS_OF.value,
        events=events,
        exclude_seen=_EXCLUDE_SEEN.value,
        log=lambda line: print(line, file=sys.stderr, flush=True),
        progress_every=_PROGRESS.value,
        block_pairs=_BLOCK_PAIRS.value,
        retrieve=0 if _ALL_ITEMS.value else _RETRIEVE.value,
        two_tower=_TWO_TOWER.value,
        max_users=_MAX_USERS.value,
        retrieval_tables=_TABLES.value,
        evaluate=_EVALUATE.value,
    )
    who = f"process {jax.process_index()} of {jax.process_count()}: " if several else ""
    print(
        f"{who}ranked {s['users']} users as of {s['as_of']} at step {s['step']}: "
        f"{s['pairs_scored']} pairs scored ({s['candidates_per_s']:.0f}/s with compilation"
        + (
            f"; {s['pairs_resumed']} of them read back from the stopped run"
            if s["pairs_resumed"]
            else ""
        )
        + "), "
        f"{s['rows_written']} rows -> {_OUTPUT.value} in {s['seconds']} s"
    )
    counts = ("unknown_users", "unknown_user_pairs", "users_without_history", "unknown_items",
              "unknown_item_pairs", "items_without_features", "duplicate_pairs")  # fmt: skip
    print(
        "unknown users (OOV): {unknown_users} ({unknown_user_pairs} pairs); users without "
        "history: {users_without_history}; unknown items (OOV): {unknown_items} "
        "({unknown_item_pairs} pairs); items without features: {items_without_features}; "
        "repeated pairs dropped: {duplicate_pairs}".format(**{k: s.get(k, 0) for k in counts})
    )
    if "evaluation" in s:
        k = _TOP_K.value
        users = s["evaluation"]["ranked"]["users"]
        print(f"against the positives of {s['as_of']} ({users} users with positives):")
        print(f"{'list':<16}{f'HR@{k}':>9}{f'NDCG@{k}':>9}{f'MRR@{k}':>9}")
        for name, m in s["evaluation"].items():
            print(f"{name:<16}{m[f'hr@{k}']:>9.4f}{m[f'ndcg@{k}']:>9.4f}{m[f'mrr@{k}']:>9.4f}")
    print("summary " + json.dumps(s | {"devices": jax.device_count()}, sort_keys=True))


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if _KEEP_HOST_MEMORY.value:
        hostmem.keep_freed_host_memory()  # before JAX starts its CPU client
    cli.run(_rank, "rank")


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
