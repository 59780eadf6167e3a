"""Training and scoring speed of the benchmark CNN, against Keras and PyTorch, and the limit.

python tools/benchmark.py --what=train [--batches=1024,4096] [--compare] [--json]
python tools/benchmark.py --what=train --compare=torch --dtype=bfloat16
python tools/benchmark.py --what=scale

`--what=train` times the engine's own train step (train.make_train_step, jitted with the
state donated) and a jitted scoring function on ready synthetic batches: examples/s, the median
of --repeats timed runs of about --seconds each, after warm-up. `--compare` (= `--compare=all`,
or a list such as `--compare=keras,torch`) runs the references of tools/bench_refs/, each in its
own process, and prints our ratio to the best of them. The limit is the FLOPs per example of the
compiled train step (XLA's cost analysis) against a timed large matmul on the same device.
`--what=scale` times the step with a 100K vs 10M-row item table and with max_len 50 vs 200.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

TOOLS = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(TOOLS))  # the repo root: influence_jax without installing
sys.path.insert(0, TOOLS)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from bench_refs import common  # noqa: E402

from configs import default as default_config  # noqa: E402
from influence_jax import hostmem, optim, sharding, train  # noqa: E402
from influence_jax.models.bench_cnn import STRAIGHTFORWARD, BenchCNN  # noqa: E402

REFS = {  # --compare name -> (script, its --impls)
    "keras": ("keras_ref.py", ""),
    "torch": ("torch_ref.py", "eager,compile"),
    "torch-eager": ("torch_ref.py", "eager"),
    "torch-compile": ("torch_ref.py", "compile"),
}

_WHAT = flags.DEFINE_enum(
    "what", "train", ["train", "scale", "input"], "Which benchmark (input: tools/bench_input.py)."
)
_BATCHES = flags.DEFINE_list("batches", ["1024", "4096"], "Batch sizes (--what=train).")
_COMPARE = flags.DEFINE_string(
    "compare", "", f"References to run too: 'all' (= a bare --compare) or some of {list(REFS)}."
)
_JSON = flags.DEFINE_bool("json", False, "Print one JSON object per line instead of a table.")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "JAX compute dtype.")
_VARIANTS = flags.DEFINE_list(
    "variants", ["fast"], "JAX formulations to time: fast, straightforward (flax's layers)."
)
_SECONDS = flags.DEFINE_float("seconds", 2.0, "Length of one timed run, in seconds.")
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per measurement; the median counts.")
_SCALE_BATCH = flags.DEFINE_integer("scale_batch", 1024, "Batch size of --what=scale.")
_SCALE_VOCABS = flags.DEFINE_list("scale_vocabs", ["100000", "10000000"], "Item vocabularies.")
_SCALE_EMBED = flags.DEFINE_integer("scale_embed_dim", 64, "Embedding width of the vocab scan.")
_SCALE_LENS = flags.DEFINE_list("scale_lens", ["50", "200"], "Sequence lengths of the scan.")
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
        import bench_input  # tools/ is on sys.path when this file runs as a script

        return bench_input.print_table(bench_input.run())
    kept = _KEEP_HOST_MEMORY.value and hostmem.keep_freed_host_memory()
    jb = JaxBench(_DTYPE.value, _SECONDS.value, _REPEATS.value, kept)
    if _WHAT.value == "scale":
        return _scale(jb)
    batches = [int(b) for b in _BATCHES.value]
    rows = []
    for batch in batches:
        for variant in _VARIANTS.value:
            _progress(f"jax {variant} batch {batch} ...")
            rows.append(jb.measure(batch, variant=variant, limit=variant == "fast"))
    refs = _run_refs(batches)
    peak = matmul_flops_per_s(_DTYPE.value)
    _add_ratios(rows, refs, peak)
    if _JSON.value:
        for r in rows + refs:
            print(json.dumps(r), flush=True)
    else:
        _print_table(rows, refs, peak, jb.describe())


class JaxBench:
    """Times the engine's train step and a jitted scorer on the benchmark model."""

    def __init__(self, dtype: str, seconds: float, repeats: int, host_memory_kept: bool):
        self.dtype, self.seconds, self.repeats = dtype, seconds, repeats
        self.host_memory_kept = host_memory_kept
        self.mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1}))

    def describe(self) -> str:
        d = jax.devices()[0]
        return (
            f"{d.device_kind} x{jax.device_count()} ({d.platform}, {os.cpu_count()} host cores), "
            f"jax {jax.__version__}, compute dtype {self.dtype}, freed host memory "
            + ("kept" if self.host_memory_kept else "returned to the OS")
        )

    def measure(
        self,
        batch: int,
        variant: str = "fast",
        item_vocab: int = common.ITEM_VOCAB,
        embed_dim: int = common.EMBED_DIM,
        max_len: int = common.MAX_LEN,
        score: bool = True,
        limit: bool = False,
    ) -> dict:
        """One row: train (and score) examples/s; with `limit`, the compiled step's FLOPs."""
        if variant not in ("fast", "straightforward"):
            raise app.UsageError(f"--variants: {variant!r} is not 'fast' or 'straightforward'")
        model = BenchCNN(
            user_vocab=common.USER_VOCAB,
            item_vocab=item_vocab,
            behaviour_vocab=common.BEHAVIOUR_VOCAB,
            embed_dim=embed_dim,
            filters=common.FILTERS,
            kernel_size=common.KERNEL_SIZE,
            pool=common.POOL,
            hidden=common.HIDDEN,
            dropout=common.DROPOUT,
            dtype=jnp.dtype(self.dtype),
            **(STRAIGHTFORWARD if variant == "straightforward" else {}),
        )
        opt_cfg = _adam_config()
        tx = optim.make_optimizer(opt_cfg, 1)
        example = {k: np.zeros((2, max_len), np.int32) for k in common.ID_KEYS}

        def init(rng: jax.Array) -> train.TrainState:
            init_rng, state_rng = jax.random.split(rng)
            params = model.init({"params": init_rng}, example, train=False)["params"]
            return train.TrainState(
                step=jnp.zeros((), jnp.int32),
                params=params,
                opt_state=tx.init(params),
                rng=state_rng,
            )

        rng = jax.random.PRNGKey(0)
        state_sh = sharding.tree_shardings(jax.eval_shape(init, rng), [], self.mesh)
        state = jax.jit(init, out_shardings=state_sh)(rng)
        batch_sh = sharding.batch_sharding(self.mesh)
        batches = [
            sharding.to_global(b, self.mesh)
            for b in common.make_batches(batch, max_len, item_vocab)
        ]
        step = (
            jax.jit(
                train.make_train_step(model, tx, optim.learning_rate_schedule(opt_cfg, 1)),
                in_shardings=(state_sh, batch_sh),
                out_shardings=(state_sh, sharding.replicated(self.mesh)),
                donate_argnums=0,
            )
            .lower(state, batches[0])
            .compile()
        )

        def run_train(steps: int) -> None:
            nonlocal state
            pending = None
            for i in range(steps):
                state, m = step(state, batches[i % len(batches)])
                if pending is not None:  # step t-1's metrics while step t runs, as the loop does
                    jax.device_get(pending)
                pending = m
            jax.device_get(pending)

        impl = "jax" if variant == "fast" else "jax-straightforward"
        row = {
            "impl": impl if self.dtype == "float32" else f"{impl}-{self.dtype}",
            "batch": batch,
            "dtype": self.dtype,
            "variant": variant,
            "item_vocab": item_vocab,
            "embed_dim": embed_dim,
            "max_len": max_len,
            "device": jax.devices()[0].device_kind,
            "num_devices": jax.device_count(),
            "versions": {"jax": jax.__version__},
            "host_memory_kept": self.host_memory_kept,
        }
        with CpuShareOfOthers() as others:
            steps, secs = self._time(run_train)
            row["train_ex_per_s"] = common.ex_per_s(batch, steps, secs)
            row["train_step_s"] = statistics.median(secs) / steps
            if score:
                row["score_ex_per_s"] = self._score(model, state, state_sh, batches, batch)
        row["others_cpu"] = others.share
        if limit:
            row["train_flops_per_example"] = _flops(step) / batch
            row["model_flops_per_example"] = common.model_flops_per_example(max_len, embed_dim)
        return row

    def _score(self, model, state, state_sh, batches, batch: int) -> float:
        score_fn = jax.jit(
            lambda params, b: jax.nn.sigmoid(model.apply({"params": params}, b, train=False)[0]),
            in_shardings=(state_sh.params, sharding.batch_sharding(self.mesh)),
            out_shardings=sharding.batch_sharding(self.mesh),
        )
        inputs = [{k: b[k] for k in common.ID_KEYS} for b in batches]

        def run_score(steps: int) -> None:
            pending = None
            for i in range(steps):
                out = score_fn(state.params, inputs[i % len(inputs)])
                if pending is not None:  # to the host, as a scorer writes its results
                    sharding.to_host(pending)
                pending = out
            sharding.to_host(pending)

        steps, secs = self._time(run_score)
        return common.ex_per_s(batch, steps, secs)

    def _time(self, run) -> tuple[int, list[float]]:
        run(2)  # compile (scoring) and warm up
        t0 = time.perf_counter()
        run(3)
        return common.timed_runs(run, (time.perf_counter() - t0) / 3, self.seconds, self.repeats)


def _adam_config() -> ml_collections.ConfigDict:
    """The engine's optimizer config with the benchmark's plain Adam: constant rate, no clip."""
    opt_cfg = default_config.get_config().opt
    with opt_cfg.unlocked():
        opt_cfg.update(
            name="adam",
            learning_rate=common.LEARNING_RATE,
            schedule="constant",
            warmup_steps=0,
            grad_clip=0.0,
        )
    return opt_cfg


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def matmul_flops_per_s(dtype: str) -> float:
    """FLOP/s of a large square matmul at default precision: what this device sustains."""
    n = 2048 if jax.devices()[0].platform == "cpu" else 8192
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.dtype(dtype))
    mm = jax.jit(jnp.dot)
    mm(a, a).block_until_ready()
    best = float("inf")
    for _ in range(7):
        t0 = time.perf_counter()
        mm(a, a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


class CpuShareOfOthers:
    """Share of the machine's CPU time that other processes used while the block ran.

    Machine-wide busy time from /proc/stat minus this process's own (or, with `children`, its
    finished children's) CPU time, over wall time x cores. None where /proc/stat is absent.
    """

    def __init__(self, children: bool = False):
        self.children, self.share = children, None

    def _own(self) -> float:
        t = os.times()
        return t.children_user + t.children_system if self.children else t.user + t.system

    @staticmethod
    def _busy() -> float | None:
        try:
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:9]]
        except OSError:
            return None
        return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait

    def __enter__(self):
        self.t0, self.busy0, self.own0 = time.perf_counter(), self._busy(), self._own()
        return self

    def __exit__(self, *exc):
        busy = self._busy()
        if busy is not None and self.busy0 is not None:
            wall = (time.perf_counter() - self.t0) * (os.cpu_count() or 1)
            other = busy - self.busy0 - (self._own() - self.own0)
            self.share = min(1.0, max(0.0, other / max(wall, 1e-9)))
        return False


def _compare_list() -> list[str]:
    names = [n.strip() for n in _COMPARE.value.split(",") if n.strip()]
    if names == ["all"]:
        names = ["keras", "torch"]
    unknown = [n for n in names if n not in REFS]
    if unknown:
        raise app.UsageError(f"--compare: unknown {unknown}; choose 'all' or from {list(REFS)}")
    return names


def _run_refs(batches: list[int]) -> list[dict]:
    """Each reference in its own process; a missing optional dependency skips it with a note."""
    rows = []
    for name in _compare_list():
        script, impls = REFS[name]
        cmd = [
            sys.executable,
            os.path.join(TOOLS, "bench_refs", script),
            "--json",
            f"--batches={','.join(map(str, batches))}",
            f"--seconds={_SECONDS.value}",
            f"--repeats={_REPEATS.value}",
        ] + ([f"--impls={impls}"] if impls else [])
        _progress(f"{name} reference ...")
        with CpuShareOfOthers(children=True) as others:
            try:
                proc = subprocess.run(
                    cmd, capture_output=True, text=True, timeout=_REF_TIMEOUT.value
                )
            except subprocess.TimeoutExpired:
                _note(f"{name} reference: stopped after {_REF_TIMEOUT.value} s, no result")
                continue
        if proc.returncode == common.MISSING_DEPS_EXIT:
            _note(f"{name} reference skipped: {proc.stderr.strip().splitlines()[-1]}")
            continue
        got = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0:
            tail = "\n  ".join(proc.stderr.strip().splitlines()[-8:])
            _note(f"{name} reference failed (exit {proc.returncode}):\n  {tail}")
        for r in got:
            r["others_cpu"] = others.share
        rows += got
    return rows


def _add_ratios(rows: list[dict], refs: list[dict], peak: float) -> None:
    for r in rows:
        same = [x for x in refs if x["batch"] == r["batch"]]
        for key in ("train", "score"):
            if same:
                best = max(same, key=lambda x: x[f"{key}_ex_per_s"])
                r[f"{key}_best_ref"] = best["impl"]
                r[f"{key}_vs_best_ref"] = r[f"{key}_ex_per_s"] / best[f"{key}_ex_per_s"]
        r["matmul_flops_per_s"] = peak
        if "train_flops_per_example" in r:
            ex_limit = peak / r["train_flops_per_example"]
            r["train_ex_per_s_limit"] = ex_limit
            r["train_fraction_of_limit"] = r["train_ex_per_s"] / ex_limit
            # The same with the model's nominal FLOPs (what a plain implementation executes).
            r["train_fraction_of_limit_nominal"] = (
                r["train_ex_per_s"] * r["model_flops_per_example"] / peak
            )


def _print_table(rows: list[dict], refs: list[dict], peak: float, setup: str) -> None:
    print(f"\n{setup}")
    head = f"{'impl':<24}{'batch':>7}{'train ex/s':>13}{'score ex/s':>13}"
    print(head + f"{'train/best':>12}{'score/best':>12}{'others cpu':>12}")
    for r in sorted(rows + refs, key=lambda x: (x["batch"], not x["impl"].startswith("jax"))):
        line = f"{r['impl']:<24}{r['batch']:>7}{r['train_ex_per_s']:>13,.0f}"
        line += f"{r['score_ex_per_s']:>13,.0f}"
        for key in ("train", "score"):
            ratio = r.get(f"{key}_vs_best_ref")
            line += f"{ratio:>11.2f}x" if ratio else f"{'':>12}"
        share = r.get("others_cpu")
        line += f"{share:>11.0%}" if share is not None else ""
        print(line)
    print(
        "  train/best, score/best: ratio to the fastest reference at that batch; others cpu: "
        "share of the machine's CPU time that other processes used meanwhile"
    )
    for r in rows:
        if "train_flops_per_example" not in r:
            continue
        print(
            f"limit ({r['impl']}, batch {r['batch']}): compiled train step "
            f"{r['train_flops_per_example'] / 1e6:.2f} MFLOP/example (XLA cost analysis; the "
            f"model's convolutions and dense layers: {r['model_flops_per_example'] / 1e6:.2f}), "
            f"matmul {peak / 1e9:,.0f} GFLOP/s -> {r['train_ex_per_s_limit']:,.0f} ex/s; "
            f"reached {r['train_fraction_of_limit']:.1%} "
            f"({r['train_fraction_of_limit_nominal']:.1%} counting the nominal FLOPs)"
        )
    busy = [r for r in rows + refs if (r.get("others_cpu") or 0) > 0.1]
    if busy:
        print(
            "warning: other processes used over 10% of the CPU during "
            + ", ".join(sorted({f"{r['impl']} b={r['batch']}" for r in busy}))
            + "; unless they only filled idle time, those figures are low"
        )


def _scale(jb) -> None:
    """Step time vs item vocabulary (dense Adam touches every row), throughput vs max_len."""
    batch, rows = _SCALE_BATCH.value, []
    for vocab in [int(v) for v in _SCALE_VOCABS.value]:
        _progress(f"jax item vocab {vocab:,} ...")
        rows.append(jb.measure(batch, item_vocab=vocab, embed_dim=_SCALE_EMBED.value, score=False))
    for max_len in [int(n) for n in _SCALE_LENS.value]:
        _progress(f"jax max_len {max_len} ...")
        rows.append(jb.measure(batch, max_len=max_len))
    if _JSON.value:
        for r in rows:
            print(json.dumps(r), flush=True)
        return
    print(f"\n{jb.describe()}; batch {batch}")
    print(
        f"{'item vocab':>12}{'embed':>7}{'max_len':>9}{'step ms':>10}{'train ex/s':>13}"
        f"{'score ex/s':>13}"
    )
    for r in rows:
        score = f"{r['score_ex_per_s']:>13,.0f}" if "score_ex_per_s" in r else f"{'-':>13}"
        print(
            f"{r['item_vocab']:>12,}{r['embed_dim']:>7}{r['max_len']:>9}"
            f"{1e3 * r['train_step_s']:>10.1f}{r['train_ex_per_s']:>13,.0f}{score}"
        )
    n = len(_SCALE_VOCABS.value)
    if n >= 2:
        lo, hi = rows[0], rows[n - 1]
        print(
            f"step time, item vocab {hi['item_vocab']:,} / {lo['item_vocab']:,}: "
            f"{hi['train_step_s'] / lo['train_step_s']:.1f}x (dense Adam rewrites every row)"
        )
    import bench_input  # the engine's own model: dense Adam against row-sparse updates

    bench_input.print_scale(bench_input.vocab_scale(batch=batch))


def _progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr if _JSON.value else sys.stdout, flush=True)


def _bare_compare(argv: list[str]) -> list[str]:
    """absl string flags need a value: a bare `--compare` means `--compare=all`."""
    return ["--compare=all" if a == "--compare" else a for a in argv]


if __name__ == "__main__":
    app.run(main, argv=_bare_compare(sys.argv))
