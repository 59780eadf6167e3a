"""`benchmark.py --what=rank`: candidates scored per second by the engine's ranker.

For the config's model ("default") and the same model with every registered extractor
("full"), on synthetic examples of the config's sizes: the ranking score function (jitted
like ranking.make_score_fn: params in their shardings, batch split over the data axis) on
ready device batches and on host batches (the ranking loop's transfer in and out included),
the evaluation step (engine.setup's, as evaluation.evaluate runs it) on the same batches, and
with `compare` the same architecture in Keras (tools/bench/bench_refs/keras_ranker.py, its own
process) loaded with the same parameters, its scores checked against ours.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import resource
import statistics
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import bench_util
import jax
import numpy as np
from bench_refs import common

from influence_jax import engine, sharding
from influence_jax.data import synthetic
from influence_jax.data.schema import HIST_BEHAVIOUR, NUM_RESERVED, Schema
from influence_jax.data.store import ExampleStore
from influence_jax.experiments import tables
from influence_jax.models.extractors import DATA_EXTRACTORS, EXTRACTORS

CHECK_ROWS = 64  # examples whose Keras scores are compared with ours


def model_config(config_name: str, which: str):
    """The config of `configs/<config_name>.py`; "full" turns on every registered extractor
    but those whose tables come from the training data ("rates": two lookups per id field,
    which the synthetic benchmark data would leave empty)."""
    config = importlib.import_module(f"configs.{config_name}").get_config()
    if which == "full":
        with config.unlocked():
            config.model.extractors = tuple(n for n in EXTRACTORS if n not in DATA_EXTRACTORS)
    elif which != "default":
        raise ValueError(f"--rank_models: {which!r} is not 'default' or 'full'")
    return config


def make_examples(config, n: int, workdir: str) -> tuple[Schema, dict[str, np.ndarray]]:
    """n synthetic examples of the config's sizes, gathered as the evaluation reads them."""
    syn = config.data.synthetic.copy_and_resolve_references()
    syn.train_examples, syn.valid_examples, syn.test_examples = n, 64, 64
    schema = synthetic.generate(syn, workdir)
    ex = ExampleStore(workdir, "train", schema).gather(np.arange(n))
    out = {k: ex[k] for k in ("user", "item", "hist", "label")}
    out["user_key"] = ex["user_key"].astype(np.int32)  # as evaluation.evaluate passes it
    out["target_type"] = ex["target_type"].astype(np.int32)
    out["weight"] = np.ones(n, np.float32)
    return schema, out


def keras_spec(model, schema: Schema, params) -> dict:
    """What keras_ranker.py needs to build the same architecture (params: which biases exist)."""
    args = dict(model.extractor_args or {})
    resolved = {}
    for name in model.extractors:
        module = EXTRACTORS[name](**dict(args.get(name, {})))
        resolved[name] = {
            f.name: _jsonable(getattr(module, f.name))
            for f in dataclasses.fields(module)
            if f.name not in ("parent", "name")
        }
    return {
        "vocab_sizes": dict(schema.vocab_sizes),
        "user_fields": [f.vocab for f in schema.user_fields],
        "item_fields": [f.vocab for f in schema.item_fields],
        "hist_fields": [f.vocab for f in schema.hist_fields],
        "behaviour_index": schema.hist_index(HIST_BEHAVIOUR),
        "num_types": len(schema.behaviour_types),
        "reserved": NUM_RESERVED,
        "max_len": schema.max_len,
        "embed_dim": model.embed_dim,
        "extractors": list(model.extractors),
        "extractor_args": resolved,
        "out_bias": {  # each extractor's MLP: whether its output unit has a bias
            n: any(
                "bias" in sub["out"]
                for sub in params[n].values()
                if isinstance(sub, Mapping) and "out" in sub
            )
            for n in model.extractors
        },
        "combine": model.combine,
        "behaviour_gates": model.behaviour_gates,
        "share_item_embeddings": model.share_item_embeddings,
        "type_embedding": model.type_embedding,
        "normalise_scores": bool(getattr(model, "normalise_scores", False)),
    }


def _spread(params: dict) -> dict:
    """Random values for the ranker's scalar-ish parameters, which start out symmetric (every
    gate 1, equal extractor weights, unit score statistics): a Keras model that ignored a gate
    or a weight would otherwise score the same and pass the check."""
    rng = np.random.default_rng(0)
    out = dict(params)
    for name in ("behaviour_type_logits", "extractor_logits", "score_mean", "bias"):
        if name in out:
            x = out[name]
            out[name] = jax.device_put(x + rng.normal(0, 0.5, x.shape).astype(x.dtype), x.sharding)
    if "score_var" in out:
        x = out["score_var"]
        out["score_var"] = jax.device_put(rng.uniform(0.5, 2, x.shape).astype(x.dtype), x.sharding)
    return out


def _jsonable(v):
    return [_jsonable(x) for x in v] if isinstance(v, list | tuple) else v


class RankBench:
    """One model: params initialised into their shardings, the score function and eval step."""

    def __init__(self, config, schema: Schema):
        self.config, self.schema = config, schema
        eng = engine.setup(config, schema)  # what ranking and evaluation run
        self.model, self.mesh, self.params_sh = eng.model, eng.mesh, eng.param_shardings
        self.params = _spread(eng.init_state().params)
        self.num_params = sum(x.size for x in jax.tree_util.tree_leaves(self.params))
        self.score_fn = eng.score_fn()  # the ranking score function (scoring.make_score_fn)
        self.eval_fn = eng.eval_step
        self.train_step, self.init_state = eng.train_step, eng.init_state  # the config's optimizer

    def measure(
        self,
        ex: dict[str, np.ndarray],
        batch: int,
        seconds: float,
        repeats: int,
        what: str = "all",
    ) -> dict:
        """One row; `what`: "all", "score" (the scoring rates) or "train" (training only)."""
        n = common.NUM_DISTINCT_BATCHES
        host = [{k: v[i * batch : (i + 1) * batch] for k, v in ex.items()} for i in range(n)]
        inputs = [{k: b[k] for k in ("user", "item", "hist")} for b in host]
        ready = [sharding.to_global(b, self.mesh) for b in inputs]
        to_host = lambda out: jax.tree_util.tree_map(sharding.to_host, out)

        def loop(fn, batches, transfer: bool):
            def run(steps: int) -> None:
                pending = None
                for i in range(steps):
                    b = batches[i % n]
                    out = fn(self.params, sharding.to_global(b, self.mesh) if transfer else b)
                    if pending is not None:  # step t-1's results while step t runs
                        to_host(pending)
                    pending = out
                to_host(pending)

            steps, secs, cpu = bench_util.time_steps(run, seconds, repeats)
            return common.ex_per_s(batch, steps, secs), batch / cpu

        row = {"impl": "jax", "batch": batch, "params": int(self.num_params)}
        row["devices"] = self.mesh.devices.size
        stage = lambda name: bench_util.progress(f"  {name} ({time.perf_counter() - t0:.0f} s)")
        t0 = time.perf_counter()
        with bench_util.CpuShareOfOthers() as others:
            if what in ("all", "train"):
                row["train_ex_per_s"] = self._train_rate(host, batch, seconds, repeats)
                stage("train step timed")
            if what == "train":
                row["others_cpu"] = others.share
                return row
            row["score_ex_per_s"], row["score_ex_per_cpu_s"] = loop(self.score_fn, ready, False)
            stage("score fn timed")
            row["rank_path_ex_per_s"], _ = loop(self.score_fn, inputs, True)
            stage("rank path timed")
            row["eval_ex_per_s"], _ = loop(self.eval_fn, host, True)
            stage("eval step timed")
        row["others_cpu"] = others.share
        score = sharding.to_host(self.score_fn(self.params, ready[0]))
        prob = sharding.to_host(
            self.eval_fn(self.params, sharding.to_global(host[0], self.mesh))["prob"]
        )
        row["eval_vs_score_max_abs_diff"] = float(np.max(np.abs(score - prob)))
        return row

    def _train_rate(self, host: list[dict], batch: int, seconds: float, repeats: int) -> float:
        """Training examples/s of the engine's train step (the config's optimizer, dropout on)
        on ready device batches, as the training loop runs it (metrics fetched one step late)."""
        ready = [sharding.to_global(b, self.mesh) for b in host]
        trainer = bench_util.Trainer(self.train_step, self.init_state(), ready)
        steps, secs, _ = bench_util.time_steps(trainer.run, seconds, repeats)
        return common.ex_per_s(batch, steps, secs)

    def write_keras_inputs(self, ex: dict, tmp: str) -> list[str]:
        """The spec, batches and check files for keras_ranker.py; returns its arguments."""
        paths = {k: os.path.join(tmp, f) for k, f in (("spec", "spec.json"), ("data", "x.npz"))}
        with open(paths["spec"], "w") as f:
            json.dump(keras_spec(self.model, self.schema, self.params), f)
        x = {k: ex[k] for k in ("user", "item", "hist")}
        np.savez(paths["data"], **x)
        rows = {k: v[:CHECK_ROWS] for k, v in x.items()}
        scores = sharding.to_host(self.score_fn(self.params, sharding.to_global(rows, self.mesh)))
        flat = {
            "param:" + "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(self.params)[0]
        }
        paths["check"] = os.path.join(tmp, "check.npz")
        np.savez(paths["check"], scores=scores, **rows, **flat)
        return [f"--{k}={v}" for k, v in paths.items()]


def model_rounds(
    config_name: str,
    which_models: list[str],
    rows: int,
    prepare: Callable[[RankBench, dict], Any],
    ours: Callable[[Any, str, str], list[dict]],
    pair: Callable[[list[dict], list[dict]], None],
    keras_args: list[str] | None = None,
    ref_kw: dict | None = None,
    rounds: int = 1,
) -> list[dict]:
    """The rounds of a scoring benchmark against Keras, for each model (default / full; one
    with the extractors of an earlier one is timed once): `rows` synthetic examples per
    distinct batch and a RankBench made once, `prepare(rb, examples)` once, then `rounds`
    times in turn `ours(prepared, model, said)` (our rows; `said` prefixes progress lines) and,
    with `keras_args`, bench_refs/keras_ranker.py on the same inputs and parameters;
    `pair(ours, keras')` adds the ratios. Rows tagged with the model, its extractors, the
    config and (rounds > 1) the round."""
    out, seen = [], {}
    for which in which_models:
        config = model_config(config_name, which)
        extractors = tuple(config.model.extractors)
        if frozenset(extractors) in seen:
            bench_util.note(
                f"model {which!r} has the extractors of {seen[frozenset(extractors)]!r} "
                f"{extractors}: timed once",
                (ref_kw or {}).get("as_json", False),
            )
            continue
        seen[frozenset(extractors)] = which
        with tempfile.TemporaryDirectory() as tmp:
            schema, ex = make_examples(config, common.NUM_DISTINCT_BATCHES * rows, tmp)
            rb = RankBench(config, schema)
            prepared = prepare(rb, ex)
            info = {"model": which, "extractors": list(extractors), "config": config_name}
            args = None if keras_args is None else rb.write_keras_inputs(ex, tmp) + keras_args
            for i in range(rounds):
                tag = info | ({"round": i} if rounds > 1 else {})
                said = f"round {i + 1}/{rounds}: " if rounds > 1 else ""
                mine = [r | tag for r in ours(prepared, which, said)]
                refs = []
                if args is not None:
                    refs = [
                        r | tag
                        for r in bench_util.run_reference(
                            "keras ranker", "keras_ranker.py", args, **(ref_kw or {})
                        )
                    ]
                pair(mine, refs)
                out += mine + refs
    return out


def run(
    config_name: str,
    which_models: list[str],
    batches: list[int],
    seconds: float,
    repeats: int,
    compare: bool = False,
    ref_kw: dict | None = None,
    measure: str = "all",
    rounds: int = 1,
) -> list[dict]:
    """Rows for each model (default / full) and batch: ours and, with `compare`, Keras'.

    With `rounds` > 1 each model's data and engine are set up once and then the engine and Keras
    run `rounds` times in turn, each row tagged with its round and its ratios from that round.
    """

    def ours(prepared, which, said):
        rb, ex = prepared
        out = []
        for batch in batches:
            bench_util.progress(f"{said}jax ranker {which} batch {batch} ...")
            out.append(rb.measure(ex, batch, seconds, repeats, measure))
        return out

    keras_args = None
    if compare:
        keras_args = [
            f"--batches={','.join(map(str, batches))}",
            f"--seconds={seconds}",
            f"--repeats={repeats}",
        ]
    return model_rounds(
        config_name, which_models, max(batches), lambda rb, ex: (rb, ex), ours, _add_ratios,
        keras_args, ref_kw, rounds,
    )  # fmt: skip


def _add_ratios(ours: list[dict], refs: list[dict]) -> None:
    """Each of our rows against Keras' row of the same batch (of the same round)."""
    for r in ours:
        same = [x for x in refs if x["batch"] == r["batch"]]
        if same and "score_ex_per_s" in r:
            k = same[0]["score_ex_per_s"]
            r["keras_score_ex_per_s"] = k
            for key in ("score", "rank_path", "eval"):
                r[f"{key}_vs_keras"] = r[f"{key}_ex_per_s"] / k
            r["score_cpu_vs_keras"] = r["score_ex_per_cpu_s"] / same[0]["score_ex_per_cpu_s"]


def two_stage(config_name: str, which_models: list[str], n: int, top_k: int = 10) -> list[dict]:
    """End-to-end two-stage ranking (tools/rank.py's default path: retrieval of `n` candidates
    per user, then scoring them) of every user of the config's synthetic test split, with
    freshly initialised parameters (speed does not depend on training): users/s and
    candidates/s with retrieval, compilation and the top-k included."""
    from influence_jax import ranking, scoring

    rows = []
    for which in which_models:
        config = model_config(config_name, which)
        with tempfile.TemporaryDirectory() as tmp:
            synthetic.generate(config.data.synthetic.copy_and_resolve_references(), tmp)
            run = scoring.make_run(config, tmp, workdir=tmp)
            bench_util.progress(f"jax two-stage ranking, {which} model, {n} candidates ...")
            t0 = time.perf_counter()
            s = ranking.rank(run, os.path.join(tmp, "top.parquet"), top_k, retrieve=n,
                             log=lambda _: None)  # fmt: skip
            secs = time.perf_counter() - t0
        rows.append({
            "impl": "jax", "section": "two_stage", "model": which, "config": config_name,
            "retrieve": n, "users": s["users"], "pairs": s["pairs_scored"], "seconds": secs,
            "scoring_seconds": s["scoring_seconds"], "users_per_s": s["users"] / secs,
            "candidates_per_s": s["pairs_scored"] / secs,
            "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        })  # fmt: skip
    return rows


def catalogue(
    users: int, items: int, events_per_user: int, sample: int, n: int = 200, top_k: int = 10
) -> list[dict]:
    """Two-stage ranking on a synthetic catalogue of `users` x `items`: writes a log of
    users x events_per_user events (tools/make_event_log.py), prepares it (next_item, buy, one
    negative), then ranks `sample` users (rank.py --max_users, spread over all users) with `n`
    retrieved candidates each, the retrieval tables built from every user. Reports the time
    of each phase, the time per 10K ranked users and the process's peak memory."""
    import subprocess
    import sys

    from influence_jax import ranking, scoring

    tools = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = model_config("default", "default")
    with tempfile.TemporaryDirectory() as tmp:
        log, data = os.path.join(tmp, "events.csv"), os.path.join(tmp, "data")
        bench_util.progress(f"writing {users * events_per_user:,} events ({users:,} users) ...")
        make = [
            os.path.join(tools, "make_event_log.py"),
            f"--events={users * events_per_user}",
            f"--events_per_user={events_per_user}",
            f"--items={items}",
            f"--output={log}",
        ]
        subprocess.run([sys.executable, *make], check=True, capture_output=True)
        bench_util.progress("preparing ...")
        t0 = time.perf_counter()
        subprocess.run([sys.executable, os.path.join(tools, "prepare_data.py"), "--source=taobao",
                        f"--input={log}", f"--output={data}", "--target_behaviour=buy",
                        "--neg_ratio=1", "--noaudit"], check=True, capture_output=True)  # fmt: skip
        prep = time.perf_counter() - t0
        os.remove(log)
        run = scoring.make_run(config, data, workdir=tmp)
        lines: list[str] = []
        bench_util.progress(f"ranking {sample:,} users, {n} candidates each ...")
        t0 = time.perf_counter()
        s = ranking.rank(run, os.path.join(tmp, "top.parquet"), top_k, retrieve=n,
                         max_users=sample, log=lines.append, progress_every=0)  # fmt: skip
        secs = time.perf_counter() - t0
        built = [float(x.split(" in ")[-1].split()[0]) for x in lines if "tables built in" in x]
        schema = run.schema
    tables = built[0] if built else float("nan")
    return [{
        "impl": "jax", "section": "catalogue", "users_in_log": int(schema.extra["counts"]["users"]),
        "items": int(schema.vocab_sizes["item_id"]), "events": users * events_per_user,
        "prepare_seconds": prep, "ranked_users": s["users"], "retrieve": n,
        "pairs": s["pairs_scored"],
        "seconds": secs, "tables_seconds": tables, "scoring_seconds": s["scoring_seconds"],
        "seconds_per_10k_users": (secs - tables) / max(s["users"], 1) * 10_000,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": bench_util.describe_device(), "date": time.strftime("%Y-%m-%d"),
    }]  # fmt: skip


def catalogue_text(rows: list[dict]) -> str:
    """The catalogue run in words (printed, and rendered into docs/ranking.md)."""
    r = rows[0]
    return (
        f"{r['users_in_log']:,} users x {r['items']:,} item ids ({r['events']:,} events; prepared "
        f"in {r['prepare_seconds']:.0f} s); {r['ranked_users']:,} users ranked ({r['retrieve']} "
        f"candidates each, {r['pairs']:,} pairs): retrieval tables from every user "
        f"{r['tables_seconds']:.0f} s, then {r['seconds_per_10k_users']:.1f} s per 10K users "
        f"(scoring {r['scoring_seconds']:.1f} s in all); peak memory {r['peak_rss_mb']:,.0f} MB"
    )


def print_catalogue(rows: list[dict]) -> None:
    print(f"\n{bench_util.describe_device()}: two-stage ranking on a synthetic catalogue")
    print(catalogue_text(rows))


def print_two_stage(rows: list[dict]) -> None:
    print(f"\n{bench_util.describe_device()}: two-stage ranking end to end (rank.py's default)")
    print(f"{'model':<9}{'N':>6}{'users':>8}{'pairs':>11}{'seconds':>9}{'users/s':>9}"
          f"{'cands/s':>10}{'peak MB':>9}")  # fmt: skip
    for r in rows:
        print(
            f"{r['model']:<9}{r['retrieve']:>6}{r['users']:>8,}{r['pairs']:>11,}"
            f"{r['seconds']:>9.1f}{r['users_per_s']:>9,.0f}{r['candidates_per_s']:>10,.0f}"
            f"{r['peak_rss_mb']:>9,.0f}"
        )
    print(
        "  retrieval (tables from the users' histories, N candidates each), scoring and the "
        "top 10 per user, with compilation; untrained parameters; peak MB: the process's peak "
        "resident memory so far"
    )


def print_table(rows: list[dict], host_memory_kept: bool) -> None:
    print(
        f"\n{bench_util.describe_device()}, freed host memory "
        + ("kept" if host_memory_kept else "returned to the OS")
    )
    print(
        f"{'model':<9}{'impl':<18}{'batch':>7}{'params':>10}{'score ex/s':>13}{'rank path':>12}"
        f"{'eval step':>12}{'train ex/s':>12}{'vs keras':>10}{'ex/cpu-s':>10}{'vs keras':>10}"
        f"{'others cpu':>12}"
    )
    cell = lambda r, key, width: f"{r[key]:>{width},.0f}" if key in r else f"{'-':>{width}}"
    for r in rows:
        impl = r["impl"] + (f" x{r['devices']}" if r.get("devices", 1) > 1 else "")
        line = f"{r['model']:<9}{impl:<18}{r['batch']:>7}{r['params']:>10,}"
        line += cell(r, "score_ex_per_s", 13) + cell(r, "rank_path_ex_per_s", 12)
        line += cell(r, "eval_ex_per_s", 12) + cell(r, "train_ex_per_s", 12)
        ratio = r.get("score_vs_keras")
        line += f"{ratio:>9.2f}x" if ratio else " " * 10
        line += cell(r, "score_ex_per_cpu_s", 10)
        ratio = r.get("score_cpu_vs_keras")
        line += f"{ratio:>9.2f}x" if ratio else " " * 10
        share = r.get("others_cpu")
        line += f"{share:>11.0%}" if share is not None else ""
        print(line)
    print(
        "  score: the ranking score function on ready device batches, results fetched to the host "
        "(Keras: the faster of model.predict and a predict_on_batch loop on ready batches); "
        "rank path: the same with each host batch transferred in; eval step: the engine's, "
        "as evaluation runs it; candidates/s; train: "
        "the engine's train step (the config's optimizer) on ready batches, examples/s; "
        "ex/cpu-s: scoring candidates per CPU-second of the process (all its threads)"
    )
    for r in rows:
        if r["impl"] == "jax" and "eval_vs_score_max_abs_diff" in r:
            print(
                f"  {r['model']} b={r['batch']}: eval step vs score function, max |prob "
                f"difference| {r['eval_vs_score_max_abs_diff']:.1e}"
            )
        elif "check_max_abs_diff" in r and r is _first(rows, r["model"]):
            print(
                f"  {r['model']}: Keras {r['params']:,} parameters ({r['params_loaded']} variables "
                f"loaded from JAX), max |score difference| on {CHECK_ROWS} examples "
                f"{r['check_max_abs_diff']:.1e}"
            )
    paths = [f"{r['model']} b={r['batch']}: {r['score_path']}" for r in rows if "score_path" in r]
    if paths:
        print(f"  Keras' faster scoring path: {', '.join(paths)}")
    bench_util.busy_warning(rows, lambda r: f"{r['model']} {r['impl']} b={r['batch']}")


def print_rounds(rows: list[dict], host_memory_kept: bool) -> None:
    """`--rounds=N`: median rates over the rounds, the ratios as the median of the rounds'."""
    rounds = max(r["round"] for r in rows) + 1
    print(
        f"\n{bench_util.describe_device()}, freed host memory "
        + ("kept" if host_memory_kept else "returned to the OS")
        + f"; {rounds} rounds, the engine then Keras in each"
    )
    print(
        f"{'model':<9}{'impl':<18}{'batch':>7}{'score ex/s':>13}{'vs keras':>20}{'per cpu-s':>20}"
    )
    groups = tables.by_key(rows, lambda r: (r["model"], r["batch"], r["impl"] != "jax", r["impl"]))
    for (model, batch, _, impl), group in groups.items():
        rate = statistics.median(r["score_ex_per_s"] for r in group)
        line = f"{model:<9}{impl:<18}{batch:>7}{rate:>13,.0f}"
        for key in ("score_vs_keras", "score_cpu_vs_keras"):
            values = [r[key] for r in group if key in r]
            line += f"{tables.spread(values):>20}" if values else ""
        print(line)
    print(
        "  candidates/s, the median of the rounds; vs keras: the median of the rounds' ratios "
        "(lowest-highest), each from its own round"
    )
    bench_util.busy_warning(rows, lambda r: f"{r['model']} {r['impl']} b={r['batch']}")


def _first(rows: list[dict], model: str) -> dict:
    return next(r for r in rows if r["model"] == model and r["impl"] != "jax")
