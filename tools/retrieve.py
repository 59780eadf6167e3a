"""Candidate generation: N candidates per user from non-learned sources (co-visitation, the
user's recent items, popular overall and in the user's categories) and, with --two_tower, a
learned two-tower retriever (tools/train_retriever.py), written atomically as
Parquet (default) or CSV with columns user_id, item_id (raw ids), rank, source: the file
tools/rank.py --candidates scores. --recall measures recall@50/100/200/500 of each source and
of the merged set against the positives of the split after the cut.

    python tools/retrieve.py --data=.prepared/taobao --as_of=test --n=200 \
      --output=candidates.parquet
    python tools/retrieve.py --data=.prepared/taobao --as_of=test --recall \
      --recall_json=recall.json
    python tools/rank.py --workdir=runs/taobao --data=.prepared/taobao \
      --candidates=candidates.parquet --output=top10.parquet

Users are every user with an event before the cut (rank_state/<as_of>), each seen through
the `max_len` most recent events before it; see influence_jax/retrieval/ and docs/ranking.md.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pyarrow as pa
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files, logs, retrieval  # noqa: E402
from influence_jax.data.idmaps import IdMaps  # noqa: E402
from influence_jax.data.schema import DataError, Schema  # noqa: E402

_DATA = flags.DEFINE_string("data", None, "Prepared dataset folder (with rank_state/).")
_AS_OF = flags.DEFINE_string(
    "as_of", "test", "Cut: valid or test (the split's start; recall against its positives)."
)
_N = flags.DEFINE_integer("n", retrieval.RETRIEVE, "Candidates per user.")
_OUTPUT = flags.DEFINE_string("output", None, "Candidates file (replaced atomically).")
_FORMAT = flags.DEFINE_enum("format", "parquet", ["parquet", "csv"], "Output format.")
_RECALL = flags.DEFINE_bool("recall", False, "Print recall@50/100/200/500 of every source.")
_RECALL_JSON = flags.DEFINE_string("recall_json", None, "Also write the recall as JSON here.")
_EXCLUDE_SEEN = flags.DEFINE_bool(
    "exclude_seen", False, "Leave out items the user interacted with before the cut."
)
_WEIGHTS = flags.DEFINE_string(
    "behaviour_weights", "", "name=weight,... (default pv/view 1, cart/fav 3, buy 5, others 1)."
)
_QUOTAS = flags.DEFINE_string(
    "quotas",
    "",
    "Share of --n each source gets first; the rest is filled in the order recent, covisit, "
    "learned, category, popular. Default recent=0.2,covisit=0.5,category=0.15,popular=0.15; "
    "with --two_tower recent=0.2,covisit=0.3,learned=0.3,category=0.1,popular=0.1.",
)
_TABLES = flags.DEFINE_string(
    "tables",
    None,
    "A folder for the sources' tables (co-visitation, popularity, category): loaded if it "
    "holds tables of the same histories and settings, else built and saved there (reuse them "
    "with rank.py --retrieval_tables).",
)
_TWO_TOWER = flags.DEFINE_string(
    "two_tower",
    None,
    "A two-tower retriever trained on this dataset (tools/train_retriever.py --workdir): adds "
    "the learned source.",
)
_WINDOW = flags.DEFINE_integer("window_events", 5, "Co-visitation: history positions apart.")
_WINDOW_HOURS = flags.DEFINE_float("window_hours", 24.0, "Co-visitation: hours apart (0: any).")
_HALF_LIFE = flags.DEFINE_float("half_life_days", 7.0, "Event weight half-life (0: no decay).")
_NEIGHBOURS = flags.DEFINE_integer("neighbours", 50, "Co-visitation neighbours kept per item.")
_PROGRESS = flags.DEFINE_float("progress_every", 10.0, "Seconds between progress lines.")
RECALL_AT = (50, 100, 200, 500)


def _pairs(text: str, flag: str) -> dict[str, float]:
    """name=value,... as a dict; a malformed entry raises DataError naming the flag."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            eq = ""
        if not eq:
            raise DataError(f"--{flag}: {part!r} is not name=number")
    return out


def _config() -> retrieval.RetrievalConfig:
    for flag, v in (("n", _N.value), ("window_events", _WINDOW.value)):
        if v <= 0:
            raise DataError(f"--{flag} must be > 0, got {v}")
    if _NEIGHBOURS.value <= 0:
        raise DataError(f"--neighbours must be > 0, got {_NEIGHBOURS.value}")
    cov = retrieval.CovisitConfig(
        window_events=_WINDOW.value,
        window_seconds=_WINDOW_HOURS.value * 3600,
        half_life_s=_HALF_LIFE.value * 86400,
        neighbours=_NEIGHBOURS.value,
    )
    return retrieval.RetrievalConfig(
        covisit=cov,
        behaviour_weights=_pairs(_WEIGHTS.value, "behaviour_weights"),
        quotas=_pairs(_QUOTAS.value, "quotas") or None,
    )


def _write(r: retrieval.Retriever, maps: IdMaps, seen, log) -> int:
    """Writes the candidates of every user; returns the number of rows."""
    users, items, sources, ranks = [], [], [], []
    progress = logs.Progress(len(r.h), log, _PROGRESS.value, verb="retrieved", unit="users")
    done = 0
    for user_key, it, src in r.candidates(_N.value, seen):
        row, col = np.nonzero(it != 0)
        users.append(user_key[row])
        items.append(it[row, col])
        sources.append(src[row, col])
        ranks.append(col + 1)
        done += len(user_key)
        progress(done)
    cat = (lambda xs, t: np.concatenate(xs) if xs else np.zeros(0, t))  # fmt: skip
    user_key, item = cat(users, np.int64), cat(items, np.int32)
    names = np.array(retrieval.SOURCES, object)
    table = pa.table(
        {
            "user_id": maps.user_raw(user_key),
            "item_id": maps.raw("item_id", item)[0],
            "rank": cat(ranks, np.int64).astype(np.int32),
            "source": names[cat(sources, np.int8)].tolist(),
        }
    )
    files.write_table(table, _OUTPUT.value, _FORMAT.value)
    return table.num_rows


def _retrieve() -> None:
    if _AS_OF.value not in retrieval.histories.SPLIT_OF_CUT:
        raise DataError(f"--as_of must be valid or test, not {_AS_OF.value!r}")
    if not (_OUTPUT.value or _RECALL.value or _RECALL_JSON.value):
        raise DataError("nothing to do: give --output, --recall or --recall_json")
    cfg = _config()
    if _OUTPUT.value:
        files.check_output(_OUTPUT.value, "output")  # before any work
    if _RECALL_JSON.value:
        files.check_output(_RECALL_JSON.value, "recall_json")
    schema = Schema.load(_DATA.value)
    h = retrieval.load_histories(_DATA.value, schema, _AS_OF.value)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    log(f"building sources from {len(h):,} users' histories as of {_AS_OF.value}")
    counted = logs.Progress(len(h), log, _PROGRESS.value, verb="counted", unit="users")
    learned = None
    if _TWO_TOWER.value:
        from influence_jax.retrieval import two_tower

        learned = two_tower.TwoTowerSource(_TWO_TOWER.value, _DATA.value, schema)
        log(f"learned source: the two-tower retriever in {_TWO_TOWER.value}")
    r = retrieval.Retriever(h, cfg, counted, learned, _TABLES.value)
    if _TABLES.value:
        log(("loaded the tables from " if r.loaded else "saved the tables to ") + _TABLES.value)
    seen = retrieval.seen_keys(_DATA.value, h)
    if _OUTPUT.value:
        rows = _write(r, IdMaps(_DATA.value, schema), seen if _EXCLUDE_SEEN.value else None, log)
        print(f"{rows} candidates for {len(h)} users as of {_AS_OF.value} -> {_OUTPUT.value}")
    if _RECALL.value or _RECALL_JSON.value:
        split = retrieval.histories.SPLIT_OF_CUT[_AS_OF.value]
        pu, pi = retrieval.positives(_DATA.value, schema, split)
        res = retrieval.recall(r, pu, pi, RECALL_AT, seen, _EXCLUDE_SEEN.value)
        res.update(as_of=_AS_OF.value, split=split, exclude_seen=_EXCLUDE_SEEN.value)
        print(f"recall@N against the {res['positives']} positives of {split} (users with history):")
        print("source    " + "".join(f"{'@' + str(n):>8}" for n in RECALL_AT))
        for s, row in res["recall"].items():
            print(f"{s:<10}" + "".join(f"{row[str(n)]:>8.3f}" for n in RECALL_AT))
        if _RECALL_JSON.value:
            files.write_json(_RECALL_JSON.value, res)
        print("summary " + json.dumps(res, sort_keys=True))


if __name__ == "__main__":
    flags.mark_flags_as_required(["data"])
    app.run(cli.tool_main(_retrieve, "retrieve"), flags_parser=cli.parse_flags)
