"""Exports a trained run's scoring function for online serving: a folder that jax and numpy
alone load and call, without this package or the model's code (docs/serving.md).

    python tools/export_model.py --workdir=runs/demo --output=runs/demo/serving
    python tools/export_model.py --workdir=runs/taobao --data=.prepared/taobao --step=best \
      --output=serving/taobao --platforms=cpu,cuda

--output (replaced atomically) holds model.jax (jax.export: StableHLO with a symbolic batch
size, lowered for each of --platforms), params.npz, vocab/ (the raw ids of the inputs'
vocabularies), signature.json (inputs, id conventions, parameters, the run) and check.npz (test
rows with the engine's own probabilities for them). A multi-task run exports its objective
(--objective, as rank.py). With --explain, explain.jax too: per row what rank.py --explain
reports (each behaviour type's and past event's logit drop when left out, each extractor's
part of the logit). Prints the signature's summary and the check's largest difference.
"""

from __future__ import annotations

import os
import sys

import numpy as np
from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files, lazy  # noqa: E402

# Loaded on first use (JAX, Orbax: seconds), after absl has parsed the flags.
scoring = lazy.module("influence_jax.scoring")
serving = lazy.module("influence_jax.serving")

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json, checkpoints/).")
_DATA = flags.DEFINE_string("data", None, "Prepared dataset folder (default: the run's own).")
_OUTPUT = flags.DEFINE_string("output", None, "The serving folder to write (replaced whole).")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, best or latest.")
_OBJECTIVE = flags.DEFINE_string(
    "objective", "", "A multi-task run's head (or weighted heads, as rank.py) to export."
)
_PLATFORMS = flags.DEFINE_list(
    "platforms", ["cpu"], "Platforms to lower for: cpu, cuda, rocm, tpu (several: one program)."
)
_CPU_ROWS = flags.DEFINE_integer(
    "cpu_block_rows",
    None,
    "On a CPU, score a request of at least 4x this many rows this many at a time (the "
    "activations stay in cache); default: from the model's widest value on a 1 MiB level-2 "
    "cache; 0: whole requests.",
)
_EXPLAIN = flags.DEFINE_bool(
    "explain",
    False,
    "Also export explain.jax: each behaviour type's, past event's and extractor's influence "
    "on a row's score (1 + history length + types model rows per row: for the rows shown).",
)
flags.mark_flags_as_required(["workdir", "output"])

# The files that mark a folder this tool wrote (it may replace only such a folder).
MARKS = ("signature.json", "model.jax")


def _export() -> None:
    files.check_output(_OUTPUT.value, "output", folder=True, replaces=MARKS)
    platforms = serving.check_platforms(list(_PLATFORMS.value))  # before loading anything
    run = scoring.load_run(_WORKDIR.value, _DATA.value, _STEP.value, _OBJECTIVE.value)
    sig = serving.export_run(run, _OUTPUT.value, platforms, _CPU_ROWS.value, _EXPLAIN.value)
    here = run.mesh.devices.flat[0].platform  # "gpu" on CUDA and ROCm hosts
    if set(sig["platforms"]) & ({"cuda", "rocm"} if here == "gpu" else {here}):
        score, _ = serving.load(_OUTPUT.value)  # what a server loads, checked against the engine
        with np.load(os.path.join(_OUTPUT.value, sig["check"]["file"])) as check:
            rows = (check["user"], check["item"], check["hist"])
            prob = score(*rows)
            diff = float(np.abs(prob - check["prob"]).max())
            if _EXPLAIN.value:
                got, _ = serving.load(_OUTPUT.value, serving.EXPLAIN_FILE)
                got = got(*rows)
                diff_x = max(
                    float(np.abs(got[k] - check[f"explain_{k}"]).max(initial=0.0))
                    for k in ("behaviour", "events", "extractors", "logit")
                )
        checked = (
            f"check on {len(prob)} {sig['check']['split']} rows: largest difference from the "
            f"engine {diff:.2e}" + (f"; explain's (logits) {diff_x:.2e}" if _EXPLAIN.value else "")
        )
    else:
        checked = f"not checked here: the program is for {','.join(sig['platforms'])}, not {here}"
    size = sum(e.stat().st_size for e in os.scandir(_OUTPUT.value) if e.is_file())
    blocks = sig["cpu_block_rows"]
    print(
        f"exported {run.config.model.name} at step {run.step} to {_OUTPUT.value} "
        f"({size / 1e6:.1f} MB, {len(sig['params']['arrays'])} parameter arrays, platforms "
        f"{','.join(sig['platforms'])}; on CPU "
        + (f"{blocks} rows at a time" if blocks else "whole requests")
        + ("; explain.jax" if _EXPLAIN.value else "")
        + f"); inputs user {sig['inputs']['user']['shape']}, item "
        f"{sig['inputs']['item']['shape']}, hist {sig['inputs']['hist']['shape']}; {checked}"
    )


if __name__ == "__main__":
    app.run(cli.tool_main(_export, "export_model"), flags_parser=cli.parse_flags)
