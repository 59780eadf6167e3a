"""Trains the two-tower retriever (the learned candidate source) on a prepared dataset.

    python tools/train_retriever.py --data=.prepared/taobao --workdir=runs/taobao_two_tower
    python tools/retrieve.py --data=.prepared/taobao --two_tower=runs/taobao_two_tower --recall
    python tools/rank.py --workdir=runs/taobao --two_tower=runs/taobao_two_tower \
      --output=top.parquet

Pairs are every event of the users' histories as of --as_of (events strictly before that cut)
with the events before it (--pairs=examples: the train split's real interactions); the loss is
the in-batch sampled softmax with logQ correction; every device takes a slice of each batch. The
workdir holds the parameters (Orbax) and meta.json (settings, the dataset, losses). See
influence_jax/retrieval/two_tower.py and docs/ranking.md.
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files, lazy  # noqa: E402
from influence_jax.data.schema import DataError, Schema  # noqa: E402
from influence_jax.retrieval.retriever import TwoTowerConfig  # noqa: E402

two_tower = lazy.module("influence_jax.retrieval.two_tower")  # JAX, after the flags

D = TwoTowerConfig()
_DATA = flags.DEFINE_string("data", None, "Prepared dataset folder.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the retriever goes (replaced atomically).")
_STEPS = flags.DEFINE_integer("steps", D.steps, "Training steps.")
_BATCH = flags.DEFINE_integer("batch_size", D.batch_size, "Pairs per step (in-batch negatives).")
_DIM = flags.DEFINE_integer("dim", D.dim, "Embedding and tower output size.")
_HIDDEN = flags.DEFINE_integer("hidden", D.hidden, "Tower MLP width.")
_TEMPERATURE = flags.DEFINE_float("temperature", D.temperature, "Softmax temperature.")
_LOG_Q = flags.DEFINE_bool("log_q", D.log_q, "Subtract log Q(item) from the in-batch logits.")
_LR = flags.DEFINE_float("learning_rate", D.learning_rate, "Adam learning rate.")
_SEED = flags.DEFINE_integer("seed", D.seed, "Initialisation and batch order.")
_PAIRS = flags.DEFINE_enum(
    "pairs",
    D.pairs,
    ["histories", "examples"],
    "Training pairs: every event of the users' histories as of --as_of with the events before "
    "it, or the train split's real interactions (its targets).",
)
_AS_OF = flags.DEFINE_enum(
    "as_of",
    D.as_of,
    ["valid", "test", "end"],
    "--pairs=histories: the cut whose histories teach it (only events before it); retrieving "
    "as of an earlier cut is refused.",
)
_PROGRESS = flags.DEFINE_float("progress_every", 10.0, "Seconds between progress lines.")


def _main() -> None:
    for flag, v in (("steps", _STEPS.value), ("batch_size", _BATCH.value), ("dim", _DIM.value),
                    ("hidden", _HIDDEN.value)):  # fmt: skip
        if v <= 0:
            raise DataError(f"--{flag} must be > 0, got {v}")
    if not _TEMPERATURE.value > 0:
        raise DataError(f"--temperature must be > 0, got {_TEMPERATURE.value}")
    # An existing folder is replaced only when it holds a retriever (two_tower.META).
    files.check_output(_WORKDIR.value, "workdir", folder=True, replaces=("meta.json",))
    schema = Schema.load(_DATA.value)
    cfg = TwoTowerConfig(
        dim=_DIM.value,
        hidden=_HIDDEN.value,
        temperature=_TEMPERATURE.value,
        log_q=_LOG_Q.value,
        steps=_STEPS.value,
        batch_size=_BATCH.value,
        learning_rate=_LR.value,
        seed=_SEED.value,
        pairs=_PAIRS.value,
        as_of=_AS_OF.value,
    )
    log = lambda line: print(line, file=sys.stderr, flush=True)
    params, stats = two_tower.train(_DATA.value, schema, cfg, log, _PROGRESS.value)
    two_tower.save(_WORKDIR.value, params, cfg, schema, _DATA.value, stats)
    print(
        f"two-tower retriever: {stats['pairs']:,} pairs ({cfg.pairs}), {cfg.steps} steps of "
        f"{stats['batch_size']} in {stats['seconds']} s, final loss {stats['losses'][-1][1]:.4f}"
        f" -> {_WORKDIR.value}"
    )


if __name__ == "__main__":
    flags.mark_flags_as_required(["data", "workdir"])
    app.run(cli.tool_main(_main, "train_retriever"), flags_parser=cli.parse_flags)
