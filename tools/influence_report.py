"""Influence report of a trained run: behaviour-type and extractor influence with bootstrap
intervals, per segment, per-event leave-one-out deltas and the faithfulness check.

    python tools/influence_report.py --workdir=runs/demo --output=runs/demo/influence
    python tools/influence_report.py --workdir=runs/taobao --data=.prepared/taobao \
      --output=runs/taobao/influence --split=test --sample=512
    # one config on several seeds: every figure with an interval over the runs
    python tools/influence_report.py --workdir=runs/s0,runs/s1,runs/s2 --data=.prepared/taobao \
      --output=runs/taobao/influence_seeds --step=best

Writes OUTPUT/influence.json, events.parquet, behaviour_influence.png, extractor_contributions.png,
deletion_curves.png and the same plots as TensorBoard images (tensorboard --logdir=OUTPUT).
With several workdirs each run's report goes to OUTPUT/run_<i>/ and OUTPUT/influence.json
combines them (influence_jax/influence_runs.py): per behaviour type and extractor the mean and
95 % interval over runs of each figure, and the orders and signs that change between runs,
flagged; OUTPUT/behaviour_influence_runs.png plots them. With --objective=each (a multi-task
run) each head's report goes to OUTPUT/head_<head>/ and OUTPUT/heads.json and
behaviour_influence_heads.png put the heads side by side (influence_jax/influence_heads.py).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import (  # noqa: E402
    cli,
    files,
    influence_heads,
    influence_runs,
    lazy,
)
from influence_jax.data.schema import DataError  # noqa: E402

# Loaded on first use (JAX, Orbax: seconds), after absl has parsed the flags: --help and flag
# errors stay fast.
checkpoint = lazy.module("influence_jax.checkpoint")
influence = lazy.module("influence_jax.influence")
scoring = lazy.module("influence_jax.scoring")

_WORKDIR = flags.DEFINE_list(
    "workdir", None, "Training workdir (config.json, checkpoints/); several, comma-separated."
)
_DATA = flags.DEFINE_string("data", None, "Prepared dataset folder (default: the run's own).")
_OUTPUT = flags.DEFINE_string("output", None, "Report folder.")
_SPLIT = flags.DEFINE_string("split", "test", "Split whose predictions are explained.")
_SAMPLE = flags.DEFINE_integer("sample", 256, "Predictions with per-event (leave-one-out) deltas.")
_STEP = flags.DEFINE_string("step", "latest", "Checkpoint: a step number, best or latest.")
_OBJECTIVE = flags.DEFINE_string(
    "objective",
    "",
    "Multi-task runs: the head to score (default: the run's objective head), a weighted mean "
    "of heads ('buy+0.3*cart'), or 'each': a report per head and the heads side by side.",
)
_MAX_EXAMPLES = flags.DEFINE_integer("max_examples", 20_000, "Examples for the global report.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples per interval.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling and bootstrap seed.")
flags.mark_flags_as_required(["workdir", "output"])


_REPORT_FILES = ("influence.json", "heads.json")  # what marks a folder as a report of ours


def _report() -> None:
    # Before any work; an existing folder is replaced only when it is a report.
    files.check_output(_OUTPUT.value, "output", folder=True, replaces=_REPORT_FILES)
    for flag, low in ((_SAMPLE, 0), (_MAX_EXAMPLES, 1), (_BOOTSTRAP, 1)):
        if flag.value < low:
            raise DataError(f"--{flag.name} must be at least {low}, got {flag.value}")
    runs = _WORKDIR.value
    if len(set(runs)) != len(runs):
        raise DataError(f"--workdir names a run twice: {runs}")
    for workdir in runs:  # every run's config read before the first report's work
        checkpoint.read_config(workdir)
    # The report appears whole or not at all: built in a folder beside OUTPUT, then renamed.
    import jax  # after the flag checks: --help and bad flags stay fast

    each = _OBJECTIVE.value == "each"
    heads = scoring.run_heads(runs[0], _DATA.value) if each else (_OBJECTIVE.value,)
    if each and not heads:
        raise DataError(f"--objective=each: {runs[0]} is a single-task run; it has no heads")
    loaded = {}  # --objective=each: each run loaded once, its objective a parameter

    def load(workdir: str, objective: str) -> scoring.Run:
        if not each:
            return scoring.load_run(workdir, _DATA.value, _STEP.value, objective)
        if workdir not in loaded:
            loaded[workdir] = scoring.load_run(workdir, _DATA.value, _STEP.value, switchable=True)
        # The same compiled programs for every head (scoring.with_objective).
        return scoring.with_objective(loaded[workdir], objective)

    with files.atomic_folder(_OUTPUT.value, commit=jax.process_index() == 0) as tmp:
        by_head = {}
        for head in heads:
            if each:
                print(f"== head {head}", flush=True)
            out = os.path.join(tmp, f"head_{head}") if each else tmp
            by_head[head] = _runs([load(w, head) for w in runs], out)
        if each:
            side = influence_heads.side_by_side(by_head)
            influence_heads.write(side, tmp)
            print("\n".join(influence_heads.lines(side)))
    name = "heads.json" if each else "influence.json"
    print(f"report written to {os.path.join(_OUTPUT.value, name)}")


def _runs(runs: list[scoring.Run], output: str) -> dict:
    """The report of one run, or of several combined, written to `output`."""
    reports = []
    for i, run in enumerate(runs):
        out = output if len(runs) == 1 else os.path.join(output, f"run_{i}")
        reports.append(_one(run, out))
    if len(runs) == 1:
        return reports[0]
    workdirs = _WORKDIR.value
    try:
        combined = influence_runs.combine(reports, workdirs)
    except ValueError as e:
        raise DataError(f"--workdir={','.join(workdirs)}: {e}") from None
    influence_runs.write(combined, output)
    print("\n".join(influence_runs.lines(combined)))
    return combined


def _one(run: scoring.Run, output: str) -> dict:
    """One run's report, written to `output` and printed."""
    r = influence.report(
        run,
        output,
        split=_SPLIT.value,
        sample=_SAMPLE.value,
        max_examples=_MAX_EXAMPLES.value,
        n_boot=_BOOTSTRAP.value,
        seed=_SEED.value,
        log=lambda line: print(line, file=sys.stderr, flush=True),
    )
    print(f"influence of {r['examples']} {r['split']} predictions at step {r['step']}:")
    for name, v in r["behaviour_types"].items():
        ci = f"[{v['ci_low']:+.4f}, {v['ci_high']:+.4f}]"
        print(f"  behaviour {name:>8}: {v['influence']:+.4f} {ci}")
    for name, v in r["extractors"].items():
        print(
            f"  extractor {name:>7}: w={v['weight']:.3f} influence (mean |w z|) "
            f"{v['influence']:.4f} ({100 * v['share']:.0f}%), contribution (mean w z) "
            f"{v['contribution']:+.4f}"
        )
    f = r["faithfulness"]
    if not f["examples"]:
        print(
            f"faithfulness: not checked (no sampled prediction has more than {len(f['k'])} past "
            "events; --sample sets how many are drawn)"
        )
    else:
        print(
            f"faithfulness ({f['examples']} predictions, logit drop): top-k "
            + " ".join(f"{x:.4f}" for x in f["top_k_drop"])
            + " | random "
            + " ".join(f"{x:.4f}" for x in f["random_drop"])
            + f" | gap holds for every k: {f['holds']}"
        )
    print(f"  extractor weights: {r['extractor_separation']['verdict']}")
    cf = r["counterfactual"]
    print(
        f"counterfactual ({cf['examples']} predictions; one event of the type on the target "
        f"item, {cf['gap_seconds']} s before):"
    )
    for t, e in cf["types"].items():
        planted = e.get("planted_contrast_logit")
        print(
            f"  behaviour {t:>8}: probability {e['add_prob']['mean']:+.4f} logit "
            f"{e['add_logit']['mean']:+.4f} vs another item {e['contrast_logit']['mean']:+.4f} "
            f"[{e['contrast_logit']['ci_low']:+.4f}, {e['contrast_logit']['ci_high']:+.4f}]"
            + ("" if planted is None else f" (planted {planted:+.4f})")
        )
    return r


if __name__ == "__main__":
    app.run(cli.tool_main(_report, "influence_report"), flags_parser=cli.parse_flags)
