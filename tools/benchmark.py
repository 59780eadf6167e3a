"""Speed of the engine against Keras and PyTorch on the same model, and against the limit.

python tools/benchmark.py --what=train [--batches=1024,4096] [--compare] [--json]
python tools/benchmark.py --what=train --compare=torch --dtype=bfloat16
python tools/benchmark.py --what=rank [--compare] [--rank_models=default,full]
python tools/benchmark.py --what=serve [--compare] [--serve_rows=200,1000]
python tools/benchmark.py --what=scale
python tools/benchmark.py --what=input
python tools/benchmark.py --what=quality [--quality_dtypes=float32,bfloat16]
python tools/benchmark.py --what=prepare [--prepare_events=20000000]

The benchmark code lives in tools/bench/. `--what=train` (bench_train.py) times the engine's
own train step on the benchmark CNN (jitted, state donated) and its batch scoring on ready
synthetic batches: examples/s, the median of --repeats timed runs of about --seconds each, after
warm-up. `--compare` (= `--compare=all`, or a list such as `--compare=keras,torch`) runs the
references of tools/bench/bench_refs/, each in its own process, and prints our ratio to the
best of them. The limit is the FLOPs per example of the compiled train step (XLA's cost
analysis) against a timed large matmul on the same device. `--what=rank` (bench_rank.py)
scores candidates with the engine's own ranker (the default config's model and the model
with every registered extractor) through the ranking score function and the evaluation step,
and with `--compare` the same model in Keras.
`--what=serve` (bench_serve.py) times one online request at a time through the exported program
(tools/export_model.py, loaded as docs/serving.md does) against the same model in Keras, for
the --rank_config's model and the full one (--rank_models): median and 99th percentile latency.
`--what=scale` times the step with a 100K vs 10M-row item table and with max_len 50 vs 200;
`--what=input` the input pipeline against the step it feeds (bench_input.py).
`--what=quality` trains the benchmark CNN in each --quality_dtypes on the same planted-signal
data and compares held-out AUC (bench_quality.py): whether mixed precision keeps AUC.
`--what=prepare` times tools/prepare_data.py on one synthetic event log for each task (next_item
and conversion) and history storage (copy, reference) and gives their peak memory and output
size, side by side (bench_prepare.py); with `--prepare_engines=numpy,spark` each task by the numpy
engine and by Spark in local mode (time, peak memory of the process tree, identical output).
"""

from __future__ import annotations

import json
import os
import sys

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))  # the repo root: influence_jax without installing
sys.path.insert(0, os.path.join(TOOLS, "bench"))  # the benchmark code (tools/bench/)

from absl import app, flags  # noqa: E402

from influence_jax import cli, hostmem  # noqa: E402

_WHAT = flags.DEFINE_enum(
    "what",
    "train",
    ["train", "rank", "serve", "scale", "input", "quality", "prepare"],
    "Which benchmark (see the docstring).",
)
_BATCHES = flags.DEFINE_list("batches", ["1024", "4096"], "Batch sizes (--what=train|rank).")
_COMPARE = flags.DEFINE_string(
    "compare",
    "",
    "References to run too: 'all' (= a bare --compare) or some of keras, torch, torch-eager, "
    "torch-compile (--what=rank has only keras).",
)
_GRAD_BLOCKS = flags.DEFINE_integer(
    "grad_blocks",
    0,
    "Row blocks of the fast train step's gradient (config.opt.grad_blocks; --what=train|scale|"
    "quality); 0: 2 on CPU, 1 on accelerators.",
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per line instead of a table.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "JAX compute dtype.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["fast"], "JAX formulations to time: fast, straightforward (flax's layers)."
)
_SECONDS = flags.DEFINE_float("seconds", 2.0, "Length of one timed run, in seconds.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement; the median counts.")
_ROUNDS = flags.DEFINE_integer(
    "rounds",
    1,
    "--what=train|rank: rounds of the engine then the references, in turn in one run; with more "
    "than one, each row carries its round and the table gives each ratio as the median of the "
    "rounds' ratios with their range (a CPU's speed can drift by tens of per cent over minutes).",
    lower_bound=1,
)
_RANK_CONFIG = flags.DEFINE_string(
    "rank_config", "default", "--what=rank: the configs/ module whose model and data sizes count."
)
_RANK_MODELS = flags.DEFINE_list(
    "rank_models", ["default", "full"], "--what=rank: default (the config's extractors), full."
)
_RANK_MEASURE = flags.DEFINE_enum(
    "rank_measure",
    "all",
    ["all", "score", "train"],
    "--what=rank: the scoring rates, the ranker's own training rate, or both.",
)
_RANK_CATALOGUE = flags.DEFINE_integer(
    "rank_catalogue",
    0,
    "--what=rank: instead, rank a sample of a synthetic catalogue of this many users and items "
    "(e.g. 1000000; 20 events per user), reporting time per 10K users and peak memory.",
)
_RANK_SAMPLE = flags.DEFINE_integer(
    "rank_catalogue_sample", 10_000, "--rank_catalogue: users ranked (spread over all)."
)
_RANK_TWO_STAGE = flags.DEFINE_integer(
    "rank_two_stage",
    0,
    "--what=rank: also rank every user of the config's synthetic test split end to end, "
    "two-stage with this many retrieved candidates each (rank.py's default path); 0: skip.",
)
_HOST_DEVICES = flags.DEFINE_integer(
    "host_devices",
    0,
    "--what=rank on CPU: split the host into this many XLA devices (XLA_FLAGS "
    "--xla_force_host_platform_device_count), so the data-parallel score function runs one "
    "batch shard per core (as tools/rank.py --host_devices); 0 keeps JAX's single CPU device.",
    lower_bound=0,
)
_SERVE_ROWS = flags.DEFINE_list(
    "serve_rows", ["200", "1000"], "--what=serve: candidates in one request (one user's)."
)
_SCALE_BATCH = flags.DEFINE_integer("scale_batch", 1024, "Batch size of --what=scale.")
_SCALE_VOCABS = flags.DEFINE_list("scale_vocabs", ["100000", "10000000"], "Item vocabularies.")
_SCALE_EMBED = flags.DEFINE_integer("scale_embed_dim", 64, "Embedding width of the vocab scan.")
_SCALE_LENS = flags.DEFINE_list("scale_lens", ["50", "200"], "Sequence lengths of the scan.")
_QUALITY_DTYPES = flags.DEFINE_list(
    "quality_dtypes",
    ["float32", "bfloat16"],
    "--what=quality: compute dtypes, the first the reference.",
)
_QUALITY_STEPS = flags.DEFINE_integer(
    "quality_steps", 300, "--what=quality: train steps per dtype."
)
_QUALITY_VOCAB = flags.DEFINE_integer(
    "quality_item_vocab", 100_000, "--what=quality: item vocabulary of the planted data."
)
_QUALITY_TEST = flags.DEFINE_integer(
    "quality_test_examples", 131_072, "--what=quality: held-out examples (whole batches)."
)
_PREPARE_EVENTS = flags.DEFINE_integer(
    "prepare_events", 20_000_000, "--what=prepare: events in the synthetic log it writes."
)
_PREPARE_LOG = flags.DEFINE_string(
    "prepare_log", "", "--what=prepare: an existing Taobao-layout log instead of writing one."
)
_PREPARE_MEMORY = flags.DEFINE_integer(
    "prepare_memory_mb", 1024, "--what=prepare: prepare_data.py --memory_mb."
)
_PREPARE_ENGINES = flags.DEFINE_list(
    "prepare_engines",
    ["numpy"],
    "--what=prepare: numpy (tasks x history storages), or numpy,spark: each task by the numpy "
    "engine and by Spark in local mode side by side (needs the .[spark] extra).",
)
_PROFILE_DIR = flags.DEFINE_string(
    "profile_dir",
    "",
    "--what=train: trace a few steps of the fast JAX step at each batch with jax.profiler into "
    "this folder (tools/bench/profile_summary.py prints where the device time goes).",
)
_REF_TIMEOUT = flags.DEFINE_integer("ref_timeout", 900, "Seconds before a reference is stopped.")
_KEEP_HOST_MEMORY = flags.DEFINE_bool(
    "keep_host_memory",
    True,
    "Keep freed host memory in the process (glibc mallopt) so XLA:CPU's per-step buffers are "
    "not page-faulted in afresh every step.",
)


def main(argv: list[str]) -> None:
    del argv
    if _WHAT.value == "input":
        import bench_input

        return bench_input.print_table(bench_input.run())
    if _WHAT.value == "prepare":
        import bench_prepare

        args = (_PREPARE_EVENTS.value, _PREPARE_LOG.value, _REPEATS.value, _PREPARE_MEMORY.value)
        if "spark" in _PREPARE_ENGINES.value:
            rows = bench_prepare.run_engines(*args)
            return _emit(rows, lambda: print(bench_prepare.engines_text(rows)))
        rows = bench_prepare.run(*args)
        return _emit(rows, lambda: bench_prepare.print_table(rows))
    if _HOST_DEVICES.value:
        if _WHAT.value != "rank":  # training would add cross-device all-reduces on one host
            raise app.UsageError("--host_devices applies to --what=rank only")
        hostmem.split_host(_HOST_DEVICES.value)  # before JAX starts
    kept = _KEEP_HOST_MEMORY.value and hostmem.keep_freed_host_memory()  # before JAX starts
    batches = [int(b) for b in _BATCHES.value]
    # The references get the allocator settings the engine gives itself (hostmem.ENV).
    ref_kw = {"timeout": _REF_TIMEOUT.value, "as_json": _JSON.value, "keep_host_memory": kept}
    if _WHAT.value == "rank":
        import bench_rank

        if _RANK_CATALOGUE.value > 0:  # on its own: the catalogue run is long
            n = _RANK_CATALOGUE.value
            cat = bench_rank.catalogue(n, n, 20, _RANK_SAMPLE.value)
            return _emit(cat, lambda: bench_rank.print_catalogue(cat))
        names = [n.strip() for n in _COMPARE.value.split(",") if n.strip()]
        bad = [n for n in names if n not in ("all", "keras")]
        if bad:
            raise app.UsageError(f"--compare: --what=rank has only the keras reference, not {bad}")
        rows = bench_rank.run(
            _RANK_CONFIG.value,
            _RANK_MODELS.value,
            batches,
            _SECONDS.value,
            _REPEATS.value,
            compare=bool(names),
            ref_kw=ref_kw,
            measure=_RANK_MEASURE.value,
            rounds=_ROUNDS.value,
        )
        if _ROUNDS.value > 1:
            _emit(rows, lambda: bench_rank.print_rounds(rows, kept))
        else:
            _emit(rows, lambda: bench_rank.print_table(rows, kept))
        if _RANK_TWO_STAGE.value > 0:
            e2e = bench_rank.two_stage(
                _RANK_CONFIG.value, _RANK_MODELS.value, _RANK_TWO_STAGE.value
            )
            _emit(e2e, lambda: bench_rank.print_two_stage(e2e))
        return None

    if _WHAT.value == "serve":
        import bench_serve

        names = [n.strip() for n in _COMPARE.value.split(",") if n.strip()]
        if [n for n in names if n not in ("all", "keras")]:
            raise app.UsageError("--compare: --what=serve has only the keras reference")
        rows = bench_serve.run(
            _RANK_CONFIG.value,
            _RANK_MODELS.value,
            [int(n) for n in _SERVE_ROWS.value],
            _SECONDS.value,
            _REPEATS.value,
            compare=bool(names),
            ref_kw=ref_kw,
            rounds=_ROUNDS.value,
        )
        return _emit(rows, lambda: bench_serve.print_table(rows))

    if _WHAT.value == "quality":
        import bench_quality

        rows = bench_quality.run(
            _QUALITY_DTYPES.value,
            batches[0],
            _QUALITY_STEPS.value,
            _QUALITY_VOCAB.value,
            _QUALITY_TEST.value,
            grad_blocks=_GRAD_BLOCKS.value,
        )
        return _emit(rows, lambda: bench_quality.print_table(rows))
    import bench_train

    jb = bench_train.JaxBench(
        _DTYPE.value,
        _SECONDS.value,
        _REPEATS.value,
        kept,
        profile_dir=_PROFILE_DIR.value,
        grad_blocks=_GRAD_BLOCKS.value,
    )
    if _WHAT.value == "scale":
        vocabs, lens = [int(v) for v in _SCALE_VOCABS.value], [int(n) for n in _SCALE_LENS.value]
        rows = bench_train.scale(jb, _SCALE_BATCH.value, vocabs, _SCALE_EMBED.value, lens)
        setup = f"{jb.describe()}; batch {_SCALE_BATCH.value}"
        _emit(rows, lambda: bench_train.print_scale(rows, len(vocabs), setup))
        import bench_input  # the engine's own model: dense Adam against row-sparse updates

        sparse_rows = bench_input.vocab_scale(vocabs, _SCALE_BATCH.value, _SCALE_EMBED.value)
        return _emit(sparse_rows, lambda: bench_input.print_scale(sparse_rows))
    try:
        names = bench_train.compare_list(_COMPARE.value)
        if _VARIANTS.value != ["fast"] and _ROUNDS.value > 1:
            raise ValueError("--rounds: the fast variant only (--variants=fast)")
        rounds = []
        for i in range(_ROUNDS.value):
            rows = []
            for batch in batches:
                for variant in _VARIANTS.value:
                    bench_train.bench_util.progress(f"{_round(i)}jax {variant} batch {batch} ...")
                    rows.append(jb.measure(batch, variant=variant, limit=variant == "fast"))
            # The matmul limit right after the engine's steps, before the references: this
            # machine's speed drifts by tens of per cent over minutes (docs/benchmarks.md).
            peak = bench_train.bench_util.matmul_flops_per_s(_DTYPE.value)
            refs = bench_train.run_refs(names, batches, _SECONDS.value, _REPEATS.value, **ref_kw)
            bench_train.add_ratios(rows, refs, peak)
            rounds.append((rows, refs, peak))
    except ValueError as e:
        raise app.UsageError(str(e)) from e
    if len(rounds) == 1:
        rows, refs, peak = rounds[0]
        return _emit(rows + refs, lambda: bench_train.print_table(rows, refs, peak, jb.describe()))
    every = [r | {"round": i} for i, (rows, refs, _) in enumerate(rounds) for r in rows + refs]
    _emit(every, lambda: bench_train.print_rounds(every, jb.describe()))


def _round(i: int) -> str:
    return f"round {i + 1}/{_ROUNDS.value}: " if _ROUNDS.value > 1 else ""


def _emit(rows: list[dict], print_table) -> None:
    if _JSON.value:
        if _WHAT.value in ("train", "rank", "serve"):  # the machine, on the engine's rows
            import bench_util

            host = bench_util.machine()
            for r in rows:
                if r.get("impl", "").startswith("jax"):
                    r["machine"] = host
        for r in rows:
            print(json.dumps(r), flush=True)
    else:
        print_table()


def _bare_compare(argv: list[str]) -> list[str]:
    """absl string flags need a value: a bare `--compare` means `--compare=all`."""
    return ["--compare=all" if a == "--compare" else a for a in argv]


if __name__ == "__main__":
    app.run(main, argv=_bare_compare(sys.argv), flags_parser=cli.parse_flags)
