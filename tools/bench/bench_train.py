"""`benchmark.py --what=train|scale`: the benchmark CNN's train step and batch scoring.

Times the engine's own train step (engine.setup, jitted with the state donated) and
batch scoring on ready synthetic batches, against the references of tools/bench/bench_refs/, and
the compiled step's FLOPs (XLA's cost analysis) against a timed large matmul.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Any

import bench_cnn
import bench_util
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from bench_cnn import STRAIGHTFORWARD, BenchCNN
from bench_refs import common

from configs import default as default_config
from influence_jax import engine, sharding
from influence_jax.experiments import tables

PROFILE_STEPS = 10  # steps traced per profiled batch

REFS = {  # --compare name -> (script, its --impls)
    "keras": ("keras_ref.py", ""),
    "torch": ("torch_ref.py", "eager,compile"),
    "torch-eager": ("torch_ref.py", "eager"),
    "torch-compile": ("torch_ref.py", "compile"),
}


class JaxBench:
    """Times the engine's train step and batch scoring on the benchmark model."""

    def __init__(
        self,
        dtype: str,
        seconds: float,
        repeats: int,
        host_memory_kept: bool,
        profile_dir: str = "",
        grad_blocks: int = 0,
    ):
        self.dtype, self.seconds, self.repeats = dtype, seconds, repeats
        # The fast step's gradient in row blocks (config.opt.grad_blocks); 0: two on CPU,
        # where XLA runs one block's ops beside the other's, one on accelerators.
        cpu = jax.devices()[0].platform == "cpu"
        self.grad_blocks = grad_blocks or (2 if cpu else 1)
        self.profile_dir = profile_dir  # a jax.profiler trace of the fast step per batch there
        self.host_memory_kept = host_memory_kept
        self.mesh = sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "model": 1}))

    def describe(self) -> str:
        memory = "kept" if self.host_memory_kept else "returned to the OS"
        return (
            f"{bench_util.describe_device()}, compute dtype {self.dtype}, freed host memory "
            f"{memory}, the fast step's gradient in {self.grad_blocks} row block"
            + ("s" if self.grad_blocks > 1 else "")
        )

    def model(self, variant: str, item_vocab: int, embed_dim: int) -> BenchCNN:
        if variant not in ("fast", "straightforward"):
            raise ValueError(f"--variants: {variant!r} is not 'fast' or 'straightforward'")
        # The hidden layer with bfloat16 operands on CPUs with AMX or AVX-512 BF16
        # (bf16_hidden_pays).
        cpu = jax.devices()[0].platform == "cpu"
        b = self.dtype == "float32" and cpu and bench_util.bf16_hidden_pays()
        return BenchCNN(
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
            **(STRAIGHTFORWARD if variant == "straightforward" else {"bf16_hidden": b}),
        )

    def compile_step(self, model: BenchCNN, batch: dict, blocks: int = 1) -> tuple[Any, Any, Any]:
        """The engine's train step for `model` with plain Adam (engine.setup), its gradient in
        `blocks` row blocks, jitted with the state donated and compiled for `batch`'s shapes;
        returns (initial state, its shardings, the step)."""
        example = {k: np.zeros((2,) + batch[k].shape[1:], np.int32) for k in common.ID_KEYS}
        config = bench_config(blocks)
        eng = engine.setup(config, None, self.mesh, model=model, example=example)
        state = eng.init_state()
        return state, eng.state_shardings, eng.train_step.lower(state, batch).compile()

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
        model = self.model(variant, item_vocab, embed_dim)
        batches = [
            sharding.to_global(b, self.mesh)
            for b in common.make_batches(batch, max_len, item_vocab)
        ]
        blocks = self.grad_blocks if variant == "fast" else 1
        state, state_sh, step = self.compile_step(model, batches[0], blocks)
        trainer = bench_util.Trainer(step, state, batches)
        run_train = trainer.run

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
            "hidden_operands": "bfloat16" if model.bf16_hidden else self.dtype,
            "grad_blocks": blocks,
        }
        inputs = [{k: b[k] for k in common.ID_KEYS} for b in batches]
        with bench_util.CpuShareOfOthers() as others:
            steps, secs, _ = bench_util.time_steps(run_train, self.seconds, self.repeats)
            row["train_ex_per_s"] = common.ex_per_s(batch, steps, secs)
            row["train_step_s"] = statistics.median(secs) / steps
            if self.profile_dir and variant == "fast":
                # A few more steps under the profiler (tools/bench/profile_summary.py reads it).
                path = os.path.join(self.profile_dir, f"train_{self.dtype}_b{batch}")
                with jax.profiler.trace(path):
                    run_train(PROFILE_STEPS)
                row["profile"] = path
            if score:
                params = trainer.state.params
                row.update(self._score(model, params, state_sh.params, inputs, variant))
        row["others_cpu"] = others.share
        if limit:
            row["train_flops_per_example"] = flops(step) / batch
            row["model_flops_per_example"] = common.model_flops_per_example(max_len, embed_dim)
        return row

    def _score(self, model, params, params_sh, inputs: list[dict], variant: str) -> dict:
        """Scoring rates: the plain model, and (fast variant) from folded scoring tables."""
        batch_sh = sharding.batch_sharding(self.mesh)
        plain = jax.jit(
            lambda p, b: jax.nn.sigmoid(model.apply({"params": p}, b, train=False)[0]),
            in_shardings=(params_sh, batch_sh),
            out_shardings=batch_sh,
        )
        out = {}
        out["score_plain_ex_per_s"], out["score_plain_ex_per_cpu_s"] = self._score_rate(
            plain, params, inputs
        )
        if variant != "fast":
            out["score_ex_per_s"] = out["score_plain_ex_per_s"]
            out["score_ex_per_cpu_s"] = out["score_plain_ex_per_cpu_s"]
            return out
        fold = jax.jit(functools.partial(bench_cnn.fold_for_scoring, model))
        t0 = time.perf_counter()
        tables = jax.block_until_ready(fold(params))
        out["score_fold_first_s"] = time.perf_counter() - t0  # with compilation
        secs = []
        for _ in range(3):
            t0 = time.perf_counter()
            tables = jax.block_until_ready(fold(params))
            secs.append(time.perf_counter() - t0)
        out["score_fold_s"] = statistics.median(secs)
        out["score_fold_bytes"] = sum(x.nbytes for x in jax.tree_util.tree_leaves(tables))
        folded = jax.jit(
            lambda t, b: jax.nn.sigmoid(bench_cnn.score_folded(model, t, b)),
            in_shardings=(sharding.replicated(self.mesh), batch_sh),
            out_shardings=batch_sh,
        )
        out["score_ex_per_s"], out["score_ex_per_cpu_s"] = self._score_rate(folded, tables, inputs)
        return out

    def _score_rate(self, score_fn, params, inputs: list[dict]) -> float:
        def run_score(steps: int) -> None:
            pending = None
            for i in range(steps):
                out = score_fn(params, inputs[i % len(inputs)])
                if pending is not None:  # to the host, as a scorer writes its results
                    sharding.to_host(pending)
                pending = out
            sharding.to_host(pending)

        steps, secs, cpu = bench_util.time_steps(run_score, self.seconds, self.repeats)
        batch = inputs[0][common.ID_KEYS[0]].shape[0]
        return common.ex_per_s(batch, steps, secs), batch / cpu


def bench_config(grad_blocks: int = 1) -> ml_collections.ConfigDict:
    """The default config with the benchmark's plain Adam (constant rate, no clip), dense
    updates, the gradient in `grad_blocks` row blocks, all parameters replicated, seed 0."""
    config = default_config.get_config()
    with config.unlocked():
        config.opt.update(
            name="adam",
            learning_rate=common.LEARNING_RATE,
            schedule="constant",
            warmup_steps=0,
            grad_clip=0.0,
            sparse_embeddings=False,
            grad_blocks=grad_blocks,
        )
        config.loop.num_steps = 1
        config.seed = 0
    return config


def flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older jax: one dict per computation
        cost = cost[0]
    return float(cost["flops"])


def compare_list(text: str) -> list[str]:
    """--compare: 'all' or a comma-separated subset of REFS."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["all"]:
        names = ["keras", "torch"]
    unknown = [n for n in names if n not in REFS]
    if unknown:
        raise ValueError(f"--compare: unknown {unknown}; choose 'all' or from {list(REFS)}")
    return names


def run_refs(names: list[str], batches: list[int], seconds: float, repeats: int, **kw) -> list:
    """Each reference in its own process (bench_util.run_reference's keywords pass through)."""
    rows = []
    for name in names:
        script, impls = REFS[name]
        args = [
            f"--batches={','.join(map(str, batches))}",
            f"--seconds={seconds}",
            f"--repeats={repeats}",
        ] + ([f"--impls={impls}"] if impls else [])
        rows += bench_util.run_reference(name, script, args, **kw)
    return rows


def add_ratios(rows: list[dict], refs: list[dict], peak: float) -> None:
    for r in rows:
        same = [x for x in refs if x["batch"] == r["batch"]]
        for key in ("train", "score"):
            if same:
                best = max(same, key=lambda x: x[f"{key}_ex_per_s"])
                r[f"{key}_best_ref"] = best["impl"]
                r[f"{key}_vs_best_ref"] = r[f"{key}_ex_per_s"] / best[f"{key}_ex_per_s"]
        if same and "score_plain_ex_per_s" in r:
            best = max(x["score_ex_per_s"] for x in same)
            r["score_plain_vs_best_ref"] = r["score_plain_ex_per_s"] / best
        cpu = [x for x in same if "score_ex_per_cpu_s" in x]
        if cpu and "score_ex_per_cpu_s" in r:  # per CPU-second: steadier on a shared machine
            best = max(cpu, key=lambda x: x["score_ex_per_cpu_s"])
            r["score_cpu_best_ref"] = best["impl"]
            r["score_cpu_vs_best_ref"] = r["score_ex_per_cpu_s"] / best["score_ex_per_cpu_s"]
        r["matmul_flops_per_s"] = peak
        if "train_flops_per_example" in r:
            ex_limit = peak / r["train_flops_per_example"]
            r["train_ex_per_s_limit"] = ex_limit
            r["train_fraction_of_limit"] = r["train_ex_per_s"] / ex_limit
            # The same with the model's nominal FLOPs (what a plain implementation executes).
            r["train_fraction_of_limit_nominal"] = (
                r["train_ex_per_s"] * r["model_flops_per_example"] / peak
            )


def print_table(rows: list[dict], refs: list[dict], peak: float, setup: str) -> None:
    print(f"\n{setup}")
    head = f"{'impl':<24}{'batch':>7}{'train ex/s':>13}{'score ex/s':>13}{'plain':>10}"
    head += f"{'train/best':>12}{'score/best':>12}{'ex/cpu-s':>10}{'cpu/best':>10}"
    print(head + f"{'others cpu':>12}")
    for r in sorted(rows + refs, key=lambda x: (x["batch"], not x["impl"].startswith("jax"))):
        line = f"{r['impl']:<24}{r['batch']:>7}{r['train_ex_per_s']:>13,.0f}"
        line += f"{r['score_ex_per_s']:>13,.0f}"
        plain = r.get("score_plain_vs_best_ref")
        line += f"{plain:>9.2f}x" if plain and "score_fold_s" in r else f"{'':>10}"
        for key in ("train", "score"):
            ratio = r.get(f"{key}_vs_best_ref")
            line += f"{ratio:>11.2f}x" if ratio else f"{'':>12}"
        cpu, ratio = r.get("score_ex_per_cpu_s"), r.get("score_cpu_vs_best_ref")
        line += f"{cpu:>10,.0f}" if cpu else f"{'':>10}"
        line += f"{ratio:>9.2f}x" if ratio else f"{'':>10}"
        share = r.get("others_cpu")
        line += f"{share:>11.0%}" if share is not None else ""
        print(line)
    print(
        "  train/best, score/best: ratio to the fastest reference at that batch; others cpu: "
        "share of the machine's CPU time that other processes used meanwhile; ex/cpu-s: "
        "scoring examples per CPU-second of the process (all its threads); cpu/best: ratio to "
        "the reference with the most"
    )
    if any(r.get("host_memory_kept") for r in refs):
        print(
            "  references ran with the engine's allocator settings (glibc: one arena, no mmap, "
            "no trim)"
        )
    paths = {r["impl"]: r["score_path"] for r in refs if "score_path" in r}
    for impl, path in paths.items():
        print(f"  {impl} scoring: the faster of predict and predict_on_batch ({path} here)")
    folded = [r for r in rows if "score_fold_s" in r]
    if folded:
        r = folded[0]
        print(
            f"  score: the engine's scoring from folded tables (each tower's conv kernel times its "
            f"embedding table, {r['score_fold_bytes'] / 2**20:.0f} MiB, precomputed once per "
            f"checkpoint in {r['score_fold_s']:.2f} s, {r['score_fold_first_s']:.2f} s with "
            "compilation); plain: the unfolded model.apply, as a ratio to the best reference"
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
    bench_util.busy_warning(rows + refs, lambda r: f"{r['impl']} b={r['batch']}")


def print_rounds(rows: list[dict], setup: str) -> None:
    """`--rounds=N`: each implementation's median rate over the rounds and the engine's ratios,
    each the median of the rounds' ratios (a round's ratios come from that round alone)."""
    groups = tables.by_key(rows, lambda r: (r["batch"], not r["impl"].startswith("jax"), r["impl"]))
    rounds = max(r["round"] for r in rows) + 1
    print(f"\n{setup}; {rounds} rounds, the engine then the references in each")
    print(
        f"{'impl':<20}{'batch':>7}{'train ex/s':>12}{'score ex/s':>12}{'train/best':>20}"
        f"{'score/best':>20}{'plain/best':>20}{'of limit':>18}"
    )
    for (batch, _, impl), group in groups.items():
        med = lambda k, g=group: statistics.median(r[k] for r in g)
        line = f"{impl:<20}{batch:>7}{med('train_ex_per_s'):>12,.0f}{med('score_ex_per_s'):>12,.0f}"
        for key in ("train_vs_best_ref", "score_vs_best_ref", "score_plain_vs_best_ref"):
            values = [r[key] for r in group if key in r]
            line += f"{tables.spread(values):>20}" if values else f"{'':>20}"
        limit = [
            100 * r["train_fraction_of_limit"] for r in group if "train_fraction_of_limit" in r
        ]
        line += f"{tables.spread(limit, '.0f', ' %'):>18}" if limit else ""
        print(line)
    print(
        "  ex/s: the median of the rounds; x/best: the median of the rounds' ratios to the "
        "fastest reference of that round (lowest-highest); plain: the unfolded model's scoring; "
        "of limit: the train step's share of the matmul limit measured in the same round"
    )
    bench_util.busy_warning(rows, lambda r: f"{r['impl']} b={r['batch']} round {r['round'] + 1}")


def scale(jb: JaxBench, batch: int, vocabs: list[int], embed_dim: int, lens: list[int]) -> list:
    """Rows of step time vs item vocabulary (dense Adam touches every row) and vs max_len."""
    rows = []
    for vocab in vocabs:
        bench_util.progress(f"jax item vocab {vocab:,} ...")
        rows.append(jb.measure(batch, item_vocab=vocab, embed_dim=embed_dim, score=False))
    for max_len in lens:
        bench_util.progress(f"jax max_len {max_len} ...")
        rows.append(jb.measure(batch, max_len=max_len))
    return rows


def print_scale(rows: list[dict], n_vocabs: int, setup: str) -> None:
    print(f"\n{setup}")
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
    if n_vocabs >= 2:
        lo, hi = rows[0], rows[n_vocabs - 1]
        print(
            f"step time, item vocab {hi['item_vocab']:,} / {lo['item_vocab']:,}: "
            f"{hi['train_step_s'] / lo['train_step_s']:.1f}x (dense Adam rewrites every row)"
        )
