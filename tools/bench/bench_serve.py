"""`benchmark.py --what=serve`: the latency of one online request (one user's candidates, all
scored at once) through the program tools/export_model.py writes, loaded and called as a
server does (docs/serving.md: `jax.export.deserialize`, then `exp.call` under `jax.jit`, numpy
in and out, one device), against the same model in Keras (bench_refs/keras_ranker.py
--latency: the faster of `predict_on_batch` and the model's call in a `tf.function`), for the
config's model and the full one, at each request size. Each side runs its requests one at a
time, the result fetched before the next; the table gives the median and 99th percentile
latency and the requests per second.
"""

from __future__ import annotations

import bench_rank
import bench_util
import jax
import numpy as np
from bench_refs import common

from influence_jax import serving, sharding
from influence_jax.experiments import tables


def _exported_call(rb: bench_rank.RankBench):
    """`call(request) -> prob` of rb's model as a server runs it: the exported program
    serialized and read back, its parameters on the default device."""
    rows = serving.cpu_block_rows(rb.model, rb.params, rb.schema)
    exp = serving.export_model(rb.model, rb.params, rb.schema, ("cpu",), rows)
    exp = jax.export.deserialize(exp.serialize())
    params = [jax.device_put(np.asarray(x)) for x in jax.tree_util.tree_leaves(rb.params)]
    fn = jax.jit(exp.call)
    return (lambda r: np.asarray(fn(params, r["user"], r["item"], r["hist"]))), rows


def run(
    config_name: str,
    which_models: list[str],
    request_rows: list[int],
    seconds: float,
    repeats: int,
    compare: bool = False,
    ref_kw: dict | None = None,
    rounds: int = 1,
) -> list[dict]:
    """Rows for each model (default / full) and request size: the export's and, with
    `compare`, Keras'; with `rounds` > 1 the two in turn `rounds` times, each row tagged."""
    n = common.NUM_DISTINCT_BATCHES

    def prepare(rb, ex):
        call, block_rows = _exported_call(rb)
        x = {k: ex[k] for k in serving.INPUTS}
        check = {k: v[: bench_rank.CHECK_ROWS] for k, v in x.items()}
        want = sharding.to_host(rb.score_fn(rb.params, sharding.to_global(check, rb.mesh)))
        diff = float(np.max(np.abs(call(check) - want)))
        return call, x, {"export_vs_engine_max_abs_diff": diff, "cpu_block_rows": block_rows}

    def ours(prepared, which, said):
        call, x, info = prepared
        out = []
        for b in request_rows:
            bench_util.progress(f"{said}exported {which} model, requests of {b} ...")
            requests = [{k: v[j * b : (j + 1) * b] for k, v in x.items()} for j in range(n)]
            with bench_util.CpuShareOfOthers() as others:
                r = common.request_latency({"exported": call}, requests, seconds, repeats)
            out.append({"impl": "jax-export", "rows": b, **r, "others_cpu": others.share} | info)
        return out

    def pair(ours, refs):
        for r in ours:
            same = [k for k in refs if k["rows"] == r["rows"]]
            if same:
                r["keras_p50_ms"] = same[0]["p50_ms"]
                r["p50_vs_keras"] = same[0]["p50_ms"] / r["p50_ms"]

    keras_args = None
    if compare:
        keras_args = [
            f"--batches={','.join(map(str, request_rows))}",
            f"--seconds={seconds}",
            f"--repeats={repeats}",
            "--latency",
        ]
    return bench_rank.model_rounds(
        config_name, which_models, max(request_rows), prepare, ours, pair, keras_args, ref_kw,
        rounds,
    )  # fmt: skip


def table_text(rows: list[dict]) -> str:
    """The table of `rows` (without the machine line): the median over rounds of each
    (model, request size, implementation)."""
    rounds = max(r.get("round", 0) for r in rows) + 1
    lines = [
        f"{'model':<9}{'impl':<18}{'rows':>6}{'p50 ms':>9}{'p99 ms':>9}{'requests/s':>12}"
        f"{'p50 vs keras':>20}{'path':>18}"
    ]
    groups = tables.by_key(rows, lambda r: (r["model"], r["rows"], r["impl"] != "jax-export"))
    for (model, n, _), group in groups.items():
        med = lambda key, g=group: float(np.median([r[key] for r in g]))
        ratio = [r["p50_vs_keras"] for r in group if "p50_vs_keras" in r]
        line = f"{model:<9}{group[0]['impl']:<18}{n:>6}{med('p50_ms'):>9.2f}{med('p99_ms'):>9.2f}"
        line += f"{med('requests_per_s'):>12,.0f}"
        line += f"{tables.spread(ratio) if ratio else '':>20}{group[0]['path']:>18}"
        lines.append(line)
    lines.append(
        "(latency of one request, its rows scored at once and the result on the host before the "
        "next, in ms; p50 vs keras: Keras' median latency / the export's"
        + (
            "; each the median of " + f"{rounds} rounds (ratios: lowest-highest)"
            if rounds > 1
            else ""
        )
        + ")"
    )
    for r in rows:
        if r is not next(x for x in rows if x["model"] == r["model"] and x["impl"] == r["impl"]):
            continue
        if r["impl"] == "jax-export":
            blocks = r.get("cpu_block_rows")
            lines.append(
                f"({r['model']}: exported program vs the engine's score function, max |prob "
                f"difference| {r['export_vs_engine_max_abs_diff']:.1e}"
                + (f"; {blocks} rows at a time from {4 * blocks} rows" if blocks else "")
                + ")"
            )
        elif "check_max_abs_diff" in r:
            lines.append(
                f"({r['model']}: Keras with the same parameters, max |score difference| on "
                f"{bench_rank.CHECK_ROWS} examples {r['check_max_abs_diff']:.1e})"
            )
    return "\n".join(lines)


def print_table(rows: list[dict]) -> None:
    rounds = max(r.get("round", 0) for r in rows) + 1
    print(
        f"\n{bench_util.describe_device()}: one online request at a time"
        + (f"; {rounds} rounds, the export then Keras in each" if rounds > 1 else "")
    )
    print(table_text(rows))
    bench_util.busy_warning(rows, lambda r: f"{r['model']} {r['impl']} rows={r['rows']}")
