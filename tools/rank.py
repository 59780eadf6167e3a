"""Ranks candidates for users from a trained run's checkpoint: the top k per user, written
atomically as Parquet (default) or CSV with columns user_id, rank, item_id, score.

    python tools/rank.py --workdir=runs/demo --output=runs/demo/top10.parquet --top_k=10
    python tools/rank.py --workdir=runs/taobao --data=.prepared/taobao --step=best \
      --candidates=candidates.csv --output=top10.csv --format=csv --top_k=10 --explain

Candidates (CSV with a header, or Parquet) hold raw user_id,item_id as in the original log;
without --candidates every user with an example in --split is ranked against the
--max_items most frequent training items. --data may be left out for a synthetic run.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys

from absl import app, flags, logging

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import logs, ranking  # noqa: E402
from influence_jax.data.schema import DataError  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
_DATA = flags.DEFINE_string("data", None, "Prepared dataset folder (default: the run's own).")
_OUTPUT = flags.DEFINE_string("output", None, "Output file (replaced atomically).")
_TOP_K = flags.DEFINE_integer("top_k", 10, "Items kept per user.")
_CANDIDATES = flags.DEFINE_string("candidates", None, "CSV or Parquet of user_id,item_id.")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, best or latest.")
_EXPLAIN = flags.DEFINE_bool(
    "explain", False, "Add behaviour-type and extractor contributions and the top 3 events."
)
_FORMAT = flags.DEFINE_enum("format", "parquet", ["parquet", "csv"], "Output format.")
_SPLIT = flags.DEFINE_string("split", "test", "Split whose users (and histories) are ranked.")
_MAX_ITEMS = flags.DEFINE_integer(
    "max_items", 1000, "Without --candidates: most frequent training items scored per user."
)
_BATCH = flags.DEFINE_integer("batch_size", None, "Global scoring batch (default: eval batch).")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.WARNING)
    # Orbax warns that the (read-only) checkpoint folder is read-only; keep its chatter out.
    logs.quiet_libraries(std_logging.ERROR, libs=("orbax",))
    try:
        run = ranking.load_run(_WORKDIR.value, _DATA.value, _STEP.value)
        s = ranking.rank(
            run,
            _OUTPUT.value,
            top_k=_TOP_K.value,
            candidates=_CANDIDATES.value,
            split=_SPLIT.value,
            explain=_EXPLAIN.value,
            fmt=_FORMAT.value,
            max_items=_MAX_ITEMS.value,
            batch_size=_BATCH.value,
        )
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(
        f"ranked {s['users']} users at step {s['step']}: {s['pairs_scored']} pairs scored "
        f"({s['candidates_per_s']:.0f}/s with compilation), {s['rows_written']} rows -> "
        f"{_OUTPUT.value} in {s['seconds']} s"
    )
    print(
        "unknown users (OOV): {unknown_users} ({unknown_user_pairs} pairs); users without "
        "history: {users_without_history}; unknown items (OOV): {unknown_items} "
        "({unknown_item_pairs} pairs); items without features: {items_without_features}; "
        "repeated pairs dropped: {duplicate_pairs}".format(
            **{
                k: s.get(k, 0)
                for k in (
                    "unknown_users",
                    "unknown_user_pairs",
                    "users_without_history",
                    "unknown_items",
                    "unknown_item_pairs",
                    "items_without_features",
                    "duplicate_pairs",
                )
            }
        )
    )
    print("summary " + json.dumps(s, sort_keys=True))


if __name__ == "__main__":
    app.run(main)
