r"""README figures from result JSON files, so the prose never drifts from what the commands give.

Each figure block of README.md, README.zh-CN.md and docs/quality.md sits between
`<!-- figures:NAME -->` and `<!-- /figures:NAME -->` and is rendered from the JSON files under
docs/results/NAME/:

    python tools/readme_figures.py            # rewrite the blocks from docs/results
    python tools/readme_figures.py --check    # exit 1 if a block differs (the tests run this)

Block `taobao_conversion_influence`: the influence of behaviour types on the Taobao conversion
task over three seeds. To refresh it (about 3 minutes on 2 cores):

    python tools/prepare_data.py --source=taobao \
      --input=$INFLUENCE_JAX_DATA/taobao_userbehavior_sample/UserBehavior_head814users.csv \
      --output=.prepared/taobao_conversion --task=conversion --exposure=pv \
      --target_behaviour=buy --horizon_hours=6
    for s in 0 1 2; do python -m influence_jax.main --config=configs/taobao_conversion.py \
      --config.data.path=.prepared/taobao_conversion --workdir=runs/tc$s \
      --config.seed=$s --config.data.shuffle_seed=$s; done
    python tools/influence_report.py --workdir=runs/tc0,runs/tc1,runs/tc2 --step=best \
      --output=runs/tc_report
    python tools/readme_figures.py --import_influence=runs/tc_report

Block `gpu` (README.md, README.zh-CN.md, docs/benchmarks.md): the JSON lines of
`tools/gpu_benchmark.sh` (its output folder's *.jsonl), the trace summary of
`tools/bench/profile_summary.py` as profile.txt and the card, driver and versions as
machine.json, in docs/results/gpu/.

Block `quality_heads` (docs/quality.md): copy WORKDIR/quality.json of
`tools/quality.py --task=conversion --heads` to docs/results/quality_heads/ and run this tool.

Block `quality_next_item` (README.md, README.zh-CN.md, docs/quality.md): the same for
`tools/quality.py` (the next-item task, one fold) in docs/results/quality_next_item/.

Block `quality_conversion` (README.md, README.zh-CN.md, docs/quality.md): copy
WORKDIR/quality.json of `tools/quality.py --task=conversion --folds=3` to
docs/results/quality_conversion/, beside a meta.json naming the date and the machine
({"date": ..., "machine": ...}), and run this tool.

Block `cpu` (README.md, README.zh-CN.md, docs/benchmarks.md): one folder per machine,
docs/results/cpu/MACHINE/, holding the JSON lines of `python tools/benchmark.py --what=train
--compare=keras,torch --variants=fast --json` as train.jsonl and of `python tools/benchmark.py
--what=rank --compare --json` as rank.jsonl, both from that machine (the engine's rows name it);
the newest machine first.

Block `prepare` (README.md, README.zh-CN.md, docs/benchmarks.md): the JSON lines of
`python tools/benchmark.py --what=prepare --repeats=2 --json` saved as
docs/results/prepare/prepare.jsonl.

Block `spark` (README.md, README.zh-CN.md, docs/spark.md): the JSON lines of
`python tools/benchmark.py --what=prepare --prepare_engines=numpy,spark --repeats=2 --json`
saved as docs/results/spark/engines.jsonl.

Block `two_tower` (docs/ranking.md): per dataset NAME, `tools/retrieve.py --recall_json` without
(NAME-base.json) and with `--two_tower` (NAME-learned.json) and the retriever's meta.json
(NAME-meta.json) in docs/results/two_tower/.

Block `catalogue` (docs/ranking.md): the JSON line of
`python tools/benchmark.py --what=rank --rank_catalogue=1000000 --json` saved as
docs/results/catalogue/catalogue.jsonl.

Block `recall` (README.md, docs/ranking.md): the non-learned runs of block `two_tower`.

Block `ranking_quality` (docs/ranking.md): copy WORKDIR/ranking_quality.json of
`tools/ranking_quality.py` to docs/results/ranking_quality/ and run this tool.

Block `multitask_compare` (docs/quality.md): copy WORKDIR/multitask.json of
`tools/multitask_compare.py` to docs/results/multitask_compare/ and run this tool.

`--import_influence` copies the report's JSON files (the combined one and each run's), the
seeds and the test split's size into docs/results/taobao_conversion_influence/, the plot into
docs/img/, and rewrites the blocks.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import statistics
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import cli, files, lazy  # noqa: E402
from influence_jax.errors import DataError  # noqa: E402
from influence_jax.experiments import tables  # noqa: E402

# Loaded on first use (JAX, Orbax: seconds), after absl has parsed the flags: --help and flag
# errors stay fast.
checkpoint = lazy.module("influence_jax.checkpoint")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results")
READMES = {  # the documents with figure blocks
    "en": os.path.join(ROOT, "README.md"),
    "zh": os.path.join(ROOT, "README.zh-CN.md"),
    "quality": os.path.join(ROOT, "docs", "quality.md"),
    "benchmarks": os.path.join(ROOT, "docs", "benchmarks.md"),
    "ranking": os.path.join(ROOT, "docs", "ranking.md"),
    "spark": os.path.join(ROOT, "docs", "spark.md"),
    "serving": os.path.join(ROOT, "docs", "serving.md"),
}
MULTITASK = "multitask_compare"
INFLUENCE = "taobao_conversion_influence"
GPU = "gpu"
PLOT = os.path.join(ROOT, "docs", "img", "taobao_conversion_influence_runs.png")

_CHECK = flags.DEFINE_bool("check", False, "Only compare: exit 1 when a block is stale.")
_IMPORT = flags.DEFINE_string(
    "import_influence", None, "An influence_report.py output over several runs to import."
)


def _load(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise DataError(f"{path}: no such result file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None


def import_influence(report: str, dest: str) -> None:
    """Copies a multi-run influence report's JSON files and its runs' facts into `dest`."""
    combined = _load(os.path.join(report, "influence.json"))
    if len(combined.get("runs", [])) < 2:
        raise DataError(f"{report}: not a report over several runs (influence_report.py "
                        "--workdir=a,b,c)")  # fmt: skip
    seeds, test = [], None
    for run in combined["runs"]:
        config = checkpoint.read_config(run)
        seeds.append(int(config.seed))
        schema = _load(os.path.join(config.data.path, "schema.json"))
        test = schema["splits"]["test"]
    meta = {"seeds": seeds, "test_rows": test["rows"], "test_positives": test["label_sum"]}
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    shutil.copy(os.path.join(report, "influence.json"), tmp)
    for i, path in enumerate(sorted(glob.glob(os.path.join(report, "run_*", "influence.json")))):
        run = _load(path)
        keep = {k: run[k] for k in ("faithfulness", "step", "examples", "split") if k in run}
        files.write_json(os.path.join(tmp, f"run_{i}.json"), keep)
    files.write_json(os.path.join(tmp, "meta.json"), meta)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    shutil.copy(os.path.join(report, "behaviour_influence_runs.png"), PLOT)


def _range(values, fmt: str = ".2f", scale: float = 1.0) -> str:
    lo, hi = min(values) * scale, max(values) * scale
    sep = " to " if "+" in fmt else "-"  # "-0.1 to +0.2", not "-0.1-+0.2"
    return f"{lo:{fmt}}" if f"{lo:{fmt}}" == f"{hi:{fmt}}" else f"{lo:{fmt}}{sep}{hi:{fmt}}"


def _signed(values) -> str:
    return ", ".join(f"{v:+.3f}" for v in values)


def influence_facts(folder: str) -> dict:
    """The numbers the influence block quotes, from docs/results/<INFLUENCE>/."""
    c = _load(os.path.join(folder, "influence.json"))
    meta = _load(os.path.join(folder, "meta.json"))
    runs = [_load(p) for p in sorted(glob.glob(os.path.join(folder, "run_*.json")))]
    faith = [r["faithfulness"] for r in runs]
    types = c["behaviour_types"]
    orders = c["orders"]
    total = orders["behaviour_types.influence"]
    top = total["per_run"][0][0]
    per_event = sorted(types, key=lambda t: -types[t]["per_event"]["mean"])
    return {
        "seeds": meta["seeds"],
        "n": meta["test_rows"],
        "positives": int(meta["test_positives"]),
        "k1": _range([f["top_k_drop"][0] for f in faith]),
        "k5": _range([f["top_k_drop"][-1] for f in faith]),
        "random": max(abs(v) for f in faith for v in f["random_drop"]),
        "all_hold": all(f["holds"] for f in faith),
        "top": top,
        "top_share": _range(types[top]["share"]["values"], ".0f", 100),
        "events": {t: types[t]["events_per_example"]["mean"] for t in types},
        "total_order": " > ".join(total["per_run"][0]),
        "total_stable": total["stable"],
        "per_event": {t: types[t]["per_event"]["mean"] for t in per_event},
        "per_event_orders": [" > ".join(o) for o in orders["behaviour_types.per_event"]["per_run"]],
        "per_event_stable": orders["behaviour_types.per_event"]["stable"],
        "flipped": {t: types[t]["signed"]["values"] for t in types if not types[t]["sign_stable"]},
        "gate_orders": [" > ".join(o) for o in orders["behaviour_types.gate"]["per_run"]],
        "gate_stable": orders["behaviour_types.gate"]["stable"],
        "add_prob": {
            t: types[t]["counterfactual_add_prob"]["values"]
            for t in types
            if "counterfactual_add_prob" in types[t]
        },
        "contrast_orders": [
            " > ".join(o)
            for o in orders.get("behaviour_types.counterfactual_contrast", {}).get("per_run", [])
        ],
        "contrast_stable": orders.get("behaviour_types.counterfactual_contrast", {}).get("stable"),
    }


def _orders(orders: list[str], sep: str) -> str:
    return sep.join(orders)


def influence_en(f: dict) -> str:
    seeds = ", ".join(map(str, f["seeds"]))
    others = ", ".join(f"{v:.1f} {t}" for t, v in f["events"].items() if t != f["top"])
    per_event = ", ".join(f"{t} {v:.3f}" for t, v in f["per_event"].items())
    flipped = "; ".join(f"{t} ({_signed(v)})" for t, v in f["flipped"].items())
    lines = [
        f"On the Taobao conversion task (`configs/taobao_conversion.py`, the best checkpoints of "
        f"seeds {seeds}; {f['n']:,} test exposures, {f['positives']} conversions), removing each "
        f"prediction's k most influential past events lowers the logit by {f['k1']} at k = 1 and "
        f"{f['k5']} at k = 5 against at most {f['random']:.2f} for k random events"
        + (", on every seed. " if f["all_hold"] else ". "),
        f"The type `{f['top']}` carries {f['top_share']} % of the total influence "
        f"({f['events'][f['top']]:.1f} events of it per history against {others}), and the "
        f"order by total influence, {f['total_order']}, "
        + ("holds on every seed. " if f["total_stable"] else "changes between seeds. "),
        f"Per event (mean over seeds: {per_event}) the order "
        + (
            "holds on every seed. "
            if f["per_event_stable"]
            else f"changes between seeds ({_orders(f['per_event_orders'], '; ')}). "
        ),
    ]
    if f["flipped"]:
        lines.append(
            f"Signed effects that change sign between seeds, flagged by the report: {flipped}; "
            "they say nothing about whether a type raises or lowers the chance of a purchase. "
        )
    if f["add_prob"]:
        probs = ", ".join(
            f"{t} {sum(v) / len(v):+.3f} ({_range(v, '+.3f')})" for t, v in f["add_prob"].items()
        )
        lines.append(
            "Adding one event of a type on the exposed item an hour before (the counterfactual "
            f"check) raises the predicted purchase probability by, mean over seeds (range): "
            f"{probs}; the order by its contrast with the same event on another item "
            + (
                f"holds ({f['contrast_orders'][0]}). "
                if f["contrast_stable"]
                else f"changes between seeds ({_orders(f['contrast_orders'], '; ')}). "
            )
        )
    lines.append(
        "The learned gates' order "
        + (
            f"holds ({f['gate_orders'][0]})."
            if f["gate_stable"]
            else f"changes too ({_orders(f['gate_orders'], '; ')})."
        )
        + f" (`tools/readme_figures.py` writes this paragraph from docs/results/{INFLUENCE}/.)"
    )
    return _wrap("".join(lines))


def influence_zh(f: dict) -> str:
    seeds = "、".join(map(str, f["seeds"]))
    others = "，".join(f"{t} {v:.1f}" for t, v in f["events"].items() if t != f["top"])
    per_event = "，".join(f"{t} {v:.3f}" for t, v in f["per_event"].items())
    flipped = "；".join(f"{t}（{_signed(v)}）" for t, v in f["flipped"].items())
    text = (
        f"在淘宝转化任务上（`configs/taobao_conversion.py`，种子 {seeds} 的最佳检查点；"
        f"{f['n']:,} 个测试曝光、{f['positives']} 次转化），去掉每个预测中影响最大的 k 个历史事件，"
        f"k = 1 时 logit 降低 {f['k1']}，k = 5 时降低 {f['k5']}，而随机去掉 k 个事件的变化至多 "
        f"{f['random']:.2f}"
        + ("，每个种子都如此。" if f["all_hold"] else "。")
        + f"类型 `{f['top']}` 占总影响力的 {f['top_share']} %（每条历史平均 "
        f"{f['events'][f['top']]:.1f} 个，其他类型：{others}），按总影响力的顺序 "
        f"{f['total_order']} "
        + ("在每个种子上一致。" if f["total_stable"] else "随种子而变。")
        + f"按每个事件（种子平均：{per_event}）的顺序"
        + (
            "在每个种子上一致。"
            if f["per_event_stable"]
            else f"随种子而变（{_orders(f['per_event_orders'], '；')}）。"
        )
    )
    if f["flipped"]:
        text += (
            f"带符号效应在种子之间改变符号的类型会被报告标出：{flipped}；"
            "它们不能说明某类型提高还是降低购买概率。"
        )
    if f["add_prob"]:
        probs = "，".join(
            f"{t} {sum(v) / len(v):+.3f}（{_range(v, '+.3f')}）" for t, v in f["add_prob"].items()
        )
        text += (
            f"反事实检查在被曝光的商品上添加一个一小时前的某类型事件，预测的购买概率平均（范围）变化为：{probs}；"
            "按它与把同一事件加在另一商品上的差值排序"
            + (
                f"一致（{f['contrast_orders'][0]}）。"
                if f["contrast_stable"]
                else f"随种子而变（{_orders(f['contrast_orders'], '；')}）。"
            )
        )
    text += "学到的门控值的顺序" + (
        f"一致（{f['gate_orders'][0]}）。"
        if f["gate_stable"]
        else f"同样会变（{_orders(f['gate_orders'], '；')}）。"
    )
    return text + f"（本段由 `tools/readme_figures.py` 根据 docs/results/{INFLUENCE}/ 生成。）"


def _wrap(text: str, width: int = 96) -> str:
    out, line = [], ""
    for word in text.split(" "):
        # A line must not start with ">" (Markdown would quote it): such a word stays behind.
        if line and len(line) + 1 + len(word) > width and not word.startswith(">"):
            out.append(line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    return "\n".join([*out, line])


def conversion_facts(folder: str) -> dict:
    """tools/quality.py --task=conversion's quality.json and meta.json (when and where)."""
    return {
        "results": _load(os.path.join(folder, "quality.json")),
        "meta": _load(os.path.join(folder, "meta.json")),
    }


def _config_ranker(name: str, task: str = "conversion") -> str:
    """tools/quality.py's label of the dataset's config's own ranker for `task`."""
    from influence_jax.data import readers

    source = readers.SOURCES[name]
    module = f"configs.{source.conversion_config if task == 'conversion' else source.config}"
    extractors = __import__(module, fromlist=["get_config"]).get_config().model.extractors
    return f"ranker ({'+'.join(extractors)})"


def _quality_diffs(f: dict, model: str | None, zh: bool, task: str = "conversion") -> list[str]:
    """Per dataset: the model's (default: the task's config's ranker) AUC difference to the
    best baseline with its interval and the test positives. DataError where the results lack
    the config's ranker (the config changed since: run tools/quality.py again)."""
    out = []
    for name, r in sorted(f["results"].items()):
        label = _config_ranker(name, task) if model is None else model
        if label not in r["models"]:
            if model is None:
                raise DataError(
                    f"quality_{task}: no {label!r} (the config's ranker) among the {name} "
                    f"results; run tools/quality.py --task={task} again"
                )
            continue
        models = r["models"]
        d = models[label]["vs_best_baseline"]
        where = name  # the source's registry name, as in the table
        what = {("conversion", True): "次测试转化", ("conversion", False): "test conversions"}
        what.update({("next_item", True): "个测试正例", ("next_item", False): "test positives"})
        conv = f"{r['positives']:,} {what[task, zh]}"
        to = "到" if zh else "to"
        out.append(
            f"{where} {d['diff']:+.3f} ({d['ci_low']:+.3f} {to} {d['ci_high']:+.3f}; {conv})"
            if not zh
            else f"{where} {d['diff']:+.3f}（{d['ci_low']:+.3f} {to} {d['ci_high']:+.3f}；{conv}）"
        )
    return out


LEARNED_LR = "ranker (match+rates)"  # tools/quality.py's "match and rates" variant
# The task's words in the sentences of its quality block (English, Chinese).
TASK_WORDS = {
    "conversion": ("the conversion task (6 h, three folds", "在转化任务上（6 h，三个折"),
    "next_item": (
        "the next-item task (sampled negatives, one fold",
        "在下一物品任务上（采样负例，一个折",
    ),
}


def quality_en(f: dict, task: str) -> str:
    m = f["meta"]
    lr = "; ".join(_quality_diffs(f, LEARNED_LR, False, task))
    return _wrap(
        f"On {TASK_WORDS[task][0]}; {m['date']}, {m['machine']}) the config's ranker against "
        "the best baseline (AUC difference, 95 % interval): "
        + "; ".join(_quality_diffs(f, None, False, task))
        + (f". The ranker with only `match` and `rates`: {lr}." if lr else ".")
    )


def quality_zh(f: dict, task: str) -> str:
    m = f["meta"]
    lr = "；".join(_quality_diffs(f, LEARNED_LR, True, task))
    return (
        f"{TASK_WORDS[task][1]}；{m['date']}，{m['machine']}），"
        "数据集配置中的 ranker 与最佳基线的 AUC 差（95 % 区间）："
        + "；".join(_quality_diffs(f, None, True, task))
        + (f"。只含 `match` 与 `rates` 的 ranker：{lr}。" if lr else "。")
    )


def multitask_facts(folder: str) -> dict:
    """tools/multitask_compare.py's multitask.json."""
    return _load(os.path.join(folder, "multitask.json"))


def gpu_facts(folder: str) -> dict:
    """gpu_benchmark.sh's JSON lines, machine.json and profile.txt of one GPU run."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    import gpu_summary

    parts, status = gpu_summary.load(folder)
    rows = [r for p in parts.values() for r in p]
    rate = lambda impl, batch, key="train_ex_per_s": gpu_summary._rate(rows, impl, batch, key)
    quality = {r["dtype"]: r["test_auc"] for r in parts.get("quality", [])}
    with open(os.path.join(folder, "profile.txt"), encoding="utf-8") as fh:
        profile = fh.read()
    return {
        "machine": _load(os.path.join(folder, "machine.json")),
        "summary": gpu_summary.summary(folder),
        "profile": profile.rstrip("\n"),
        "rate": rate,
        "auc": quality,
        "dense": sorted(
            (r["item_vocab"], r["train_ex_per_s"])
            for r in parts.get("scale_dense", [])
            if r.get("max_len") == 50 and r.get("embed_dim") == 64
        ),
    }


def _m(x: float) -> str:
    return f"{x / 1e6:.2f}M" if x < 1e7 else f"{x / 1e6:.1f}M"


def gpu_en(f: dict) -> str:
    m, r = f["machine"], f["rate"]
    eager = [r("jax", b) / r("torch-eager", b) for b in (8192, 65536)]
    text = (
        f"On one {m['card']} (driver {m['driver']}, JAX {m['versions']['jax']}, {m['date']}, one "
        f"run): training the benchmark seed CNN {_m(r('jax', 8192))} / {_m(r('jax', 65536))} "
        f"examples/s at batch 8192 / 65536 in float32 ({eager[0]:.2f}x / {eager[1]:.2f}x PyTorch "
        f"eager in the same run), {_m(r('jax-bfloat16', 65536))} at 65536 in bfloat16 (held-out "
        f"AUC {f['auc']['bfloat16']:.4f} against {f['auc']['float32']:.4f} in float32); batch "
        f"scoring {_m(r('jax', 8192, 'score_ex_per_s'))} / {_m(r('jax', 65536, 'score_ex_per_s'))}"
        ". Not measured yet on a GPU: the ranker (its default row-sparse train step did not "
        "finish compiling on XLA:GPU within the call) and the row-sparse update at 10M items; "
        "details in docs/benchmarks.md. (Generated by `tools/readme_figures.py` from "
        f"docs/results/{GPU}/.)"
    )
    return _wrap(text)


def gpu_zh(f: dict) -> str:
    m, r = f["machine"], f["rate"]
    eager = [r("jax", b) / r("torch-eager", b) for b in (8192, 65536)]
    bf16, auc = _m(r("jax-bfloat16", 65536)), f["auc"]
    score = [_m(r("jax", b, "score_ex_per_s")) for b in (8192, 65536)]
    return (
        f"在一块 {m['card']} 上（驱动 {m['driver']}，JAX {m['versions']['jax']}，{m['date']}，"
        f"单次运行）：基准种子 CNN 的训练在 batch 8192 / 65536、float32 下为每秒 "
        f"{_m(r('jax', 8192))} / {_m(r('jax', 65536))} 个样本（同一次运行中 PyTorch eager 的 "
        f"{eager[0]:.2f}x / {eager[1]:.2f}x），bfloat16 在 65536 下为 {bf16}"
        f"（留出集 AUC {auc['bfloat16']:.4f}，float32 为 {auc['float32']:.4f}）；"
        f"批量打分 {score[0]} / {score[1]}。尚未在 GPU 上测得：排序模型（其默认的行稀疏"
        "训练步在 XLA:GPU 上未能在调用时限内编译完成）和 1000 万物品下的行稀疏更新；"
        "详见 docs/benchmarks.md。（本段由 `tools/readme_figures.py` "
        f"根据 docs/results/{GPU}/ 生成。）"
    )


def gpu_benchmarks(f: dict) -> str:
    m = f["machine"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items())
    lines = [
        _wrap(
            f"{m['date']}: one {m['card']} ({m['memory_mib']:,} MiB, driver {m['driver']}), "
            f"{m['host']}; {versions}. Command: `{m['command']}` (one call of the device tool), "
            "then a second call for the parts it did not finish. Summary "
            "(`tools/bench/gpu_summary.py`):"
        ),
        "",
        "```",
        f["summary"],
        "```",
        "",
    ]
    if len(f["dense"]) >= 2:
        (lo, lo_rate), (hi, hi_rate) = f["dense"][0], f["dense"][-1]
        lines += [
            _wrap(
                f"Dense Adam on the benchmark model at batch 8192, embedding 64 (second call): "
                f"{lo:,} items {_m(lo_rate)} ex/s, {hi:,} items {_m(hi_rate)} ex/s "
                f"({hi_rate / lo_rate:.0%}; dense Adam rewrites every row of the table and both "
                "moments each step)."
            ),
            "",
        ]
    lines += [
        _wrap(
            f"Stalled: {m['stalled']}. Second call: {m['second_call']}. Both tracebacks end in "
            "the XLA:GPU compile of the row-sparse step (`influence_jax/sparse.py`), the one path "
            "that chains several scatter-adds (the embedding gathers' gradients, the row-wise "
            "Adagrad updates of table and accumulator) ahead of reductions; jax-ml/jax#39483 "
            "reports a GPU-only compile-time blow-up of that shape on these jaxlib versions."
        ),
        "",
        _wrap(
            "Where the float32 step's device time goes (`tools/bench/profile_summary.py`, 10 "
            "traced steps at each batch):"
        ),
        "",
        "```",
        f["profile"],
        "```",
    ]
    return "\n".join(lines)


def two_tower_facts(folder: str) -> dict:
    """Per dataset: retrieve.py --recall_json without (<name>-base.json) and with the learned
    source (<name>-learned.json), and the retriever's meta.json (<name>-meta.json)."""
    out = {}
    for path in sorted(glob.glob(os.path.join(folder, "*-meta.json"))):
        name = os.path.basename(path).removesuffix("-meta.json")
        out[name] = {
            "meta": _load(path),
            "base": _load(os.path.join(folder, f"{name}-base.json")),
            "learned": _load(os.path.join(folder, f"{name}-learned.json")),
        }
    return out


def catalogue_ranking(rows: list[dict]) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    import bench_rank

    r = rows[0]
    every = r["seconds_per_10k_users"] * r["users_in_log"] / 10_000 / 3600
    return _wrap(
        f"{r['date']}, {r['device']}: " + bench_rank.catalogue_text(rows) + f". Every user at "
        f"that rate: about {every:.1f} h on this CPU, divided among the processes of a "
        "multi-process run (each ranks every P-th user)."
    )


def recall_en(f: dict) -> str:
    """README's recall clause, from the non-learned runs of docs/results/two_tower."""
    at = lambda name, src: f[name]["base"]["recall"][src]["200"]
    return _wrap(
        f"(merged at 200: {at('taobao', 'merged'):.2f} on the Taobao sample, all re-purchases; "
        f"{at('retailrocket', 'merged'):.3f} on Retailrocket; {at('movielens', 'merged'):.2f} on "
        f"MovieLens, where popularity alone gives {at('movielens', 'popular'):.2f}):"
    )


def prepare_facts(folder: str, name: str = "prepare.jsonl") -> list[dict]:
    """tools/benchmark.py --json's rows (--what=prepare: prepare.jsonl)."""
    with open(os.path.join(folder, name), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.startswith("{")]


def prepare_benchmarks(rows: list[dict]) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    import bench_prepare

    r = rows[0]
    head = (
        f"Measured {r['date']} on {r['cpu']} (2 cores): "
        f"`python tools/benchmark.py --what=prepare --repeats={r['repeats']}`."
    )
    by = {(x["task"], x["history_storage"]): x for x in rows}
    base, conv, copy = (
        by["next_item", "copy"],
        by["conversion", "reference"],
        by["conversion", "copy"],
    )
    says = (
        f"The conversion task ({conv['examples']:,} examples, every merged view one) prepares "
        f"in {conv['time_ratio']:.2f}x the time of next_item with copied histories "
        f"({conv['seconds']:.1f} s against {base['seconds']:.1f} s) and writes "
        f"{conv['output_mb']:,.0f} MB instead of {copy['output_mb']:,.0f} MB copied "
        f"({copy['time_ratio']:.2f}x the time); peak memory {conv['memory_ratio']:.2f}x."
    )
    table = bench_prepare.table_text(rows)
    return "\n".join([_wrap(head), "", "```", table, "```", "", _wrap(says)])


def _prepare_rows(rows: list[dict]) -> tuple[dict, dict, dict]:
    by = {(x["task"], x["history_storage"]): x for x in rows}
    return by["next_item", "copy"], by["conversion", "reference"], by["conversion", "copy"]


def prepare_en(rows: list[dict]) -> str:
    base, conv, copy = _prepare_rows(rows)
    return _wrap(
        f"On a {base['events'] / 1e6:.0f}M-event synthetic log the conversion task writes "
        f"{conv['examples'] / base['examples']:.1f}x the examples of the next-item task in "
        f"{conv['time_ratio']:.2f}x the time and {conv['memory_ratio']:.2f}x the peak memory, "
        f"{conv['output_mb'] / 1024:.1f} GB on disk (each history event stored once; copied "
        f"into every example: {copy['output_mb'] / 1024:.1f} GB, {copy['time_ratio']:.1f}x the "
        "time) (`tools/benchmark.py --what=prepare`; [docs/benchmarks.md](docs/benchmarks.md))."
    )


def prepare_zh(rows: list[dict]) -> str:
    base, conv, copy = _prepare_rows(rows)
    return (
        f"在 {base['events'] / 1e4:,.0f} 万事件的合成日志上，转化任务写出的样本是 next-item 任务的 "
        f"{conv['examples'] / base['examples']:.1f} 倍，用时 {conv['time_ratio']:.2f} 倍，峰值内存 "
        f"{conv['memory_ratio']:.2f} 倍，占磁盘 {conv['output_mb'] / 1024:.1f} GB"
        "（历史中的每个事件只存一次；复制进每条样本时为 "
        f"{copy['output_mb'] / 1024:.1f} GB，用时 {copy['time_ratio']:.1f} 倍）"
        "（`tools/benchmark.py --what=prepare`；见 [docs/benchmarks.md](docs/benchmarks.md)）。"
    )


SCALE_EVENTS, SCALE_BUCKETS = 10_000_000_000, 4096  # the plan of docs/spark.md


def _serve_rows(rows: list[dict], model: str, n: int) -> tuple[list[dict], list[dict]]:
    """(the export's rows, Keras' rows) of one model and request size, every round."""
    same = [r for r in rows if r["model"] == model and r["rows"] == n]
    return [r for r in same if r["impl"] == "jax-export"], [
        r for r in same if r["impl"] != "jax-export"
    ]


def _serve_head(rows: list[dict]) -> str:
    m = rows[0]["machine"]
    rounds = max(r.get("round", 0) for r in rows) + 1
    return f"{m['cpu']} ({m['cores']} cores, {m['date']}, {rounds} round{'s' * (rounds > 1)})"


def serve_doc(rows: list[dict]) -> str:
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    import bench_serve

    sizes = sorted({r["rows"] for r in rows})
    models = list(dict.fromkeys(r["model"] for r in rows))
    rounds = max(r.get("round", 0) for r in rows) + 1
    head = (
        f"Measured on {_serve_head(rows)}: `python tools/benchmark.py --what=serve --compare "
        f"--serve_rows={','.join(map(str, sizes))} --rank_models={','.join(models)}"
        + (f" --rounds={rounds}" if rounds > 1 else "")
        + " --json` (docs/results/serve/serve.jsonl), JAX "
        f"{rows[0]['machine']['jax']}, one CPU device; Keras {_keras_version(rows)}."
    )
    return "\n".join([_wrap(head), "", "```", bench_serve.table_text(rows), "```"])


def _keras_version(rows: list[dict]) -> str:
    v = next((r["versions"] for r in rows if "versions" in r), {})
    return f"{v.get('keras', '?')} on TensorFlow {v.get('tensorflow', '?')}"


def _serve_models(rows: list[dict]) -> tuple[int, list[tuple[str, float, float, str]]]:
    """(the largest request size, per model: (model, the export's median p50, Keras' median
    p50, the rounds' ratios as tables.spread)) of `rows`."""
    n = max(r["rows"] for r in rows)
    out = []
    for model in dict.fromkeys(r["model"] for r in rows):
        ours, keras = _serve_rows(rows, model, n)
        ratio = tables.spread([r["p50_vs_keras"] for r in ours if "p50_vs_keras" in r])
        out.append((model, _med(ours, "p50_ms"), _med(keras, "p50_ms"), ratio))
    return n, out


def serve_en(rows: list[dict]) -> str:
    n, models = _serve_models(rows)
    parts = [
        f"{ours:.2f} ms with the {model} model ({ratio} as fast as Keras' {keras:.2f} ms)"
        for model, ours, keras, ratio in models
    ]
    return _wrap(
        f"One request of {n:,} candidates takes a median {' and '.join(parts)} through the "
        f"exported program on {_serve_head(rows)}; table in docs/serving.md."
    )


def serve_zh(rows: list[dict]) -> str:
    n, models = _serve_models(rows)
    names = {"default": "默认模型", "full": "完整模型"}
    parts = [
        f"{names.get(model, model)} {ours:.2f} ms（Keras {keras:.2f} ms 的 {ratio} 速度）"
        for model, ours, keras, ratio in models
    ]
    m = rows[0]["machine"]
    return (
        f"在 {m['cpu']}（{m['cores']} 核，{m['date']}）上，经导出程序处理一个含 {n:,} "
        f"个候选的请求，延迟中位数：{'，'.join(parts)}。"
    )


def _engine_rows(rows: list[dict]) -> dict:
    return {(r["task"], r["engine"]): r for r in rows}


def spark_doc(rows: list[dict]) -> str:
    """docs/spark.md: the engines side by side, Spark's phases and the 10B-event plan."""
    sys.path.insert(0, os.path.join(ROOT, "tools", "bench"))
    import bench_prepare

    from influence_jax.data.plan import BUCKET_BYTES_PER_EVENT

    by = _engine_rows(rows)
    r, sp = rows[0], by["next_item", "spark"]
    head = (
        f"Measured {r['date']} on {r['cpu']} ({r['cores']} cores), Spark in local mode "
        f"({sp['master']}): `python tools/benchmark.py --what=prepare --prepare_engines=numpy,"
        f"spark --repeats={r['repeats']}` on the {r['events'] / 1e6:.0f}M-event synthetic log "
        "of tools/make_event_log.py, histories by reference, `--memory_mb="
        f"{r['memory_mb']}`. Peak memory is the whole process tree's (Spark: the driver, its "
        "JVM and the Python workers), sampled every 0.2 s."
    )
    ph = sp["phase_seconds"]
    phases = (
        f"Spark's phases on next_item: scan {ph['pass1']:.0f} s (reading through Spark's CSV "
        f"reader and validating in Python workers), indexing, shuffle, window functions and tasks "
        f"{ph['pass2']:.0f} s, the driver's append {ph['append']:.0f} s; its shuffles wrote "
        f"{sp['shuffle_mb']:,.0f} MB ({sp['shuffle_bytes_per_event']:.1f} bytes per event, "
        f"compressed), spilling {sp['spilled_mb']:,.0f} MB. On one host the numpy engine is "
        f"{sp['time_ratio']:.1f}x faster with {sp['memory_ratio']:.1f}x less memory; Spark "
        "earns its overhead by running the scan and the tasks on many machines."
    )
    e = SCALE_EVENTS
    out_b = {
        t: by[t, "spark"]["output_mb"] * 2**20 / by[t, "spark"]["events"]
        for t in ("next_item", "conversion")
    }
    per_bucket = e / SCALE_BUCKETS
    rate = sp["output_mb"] / max(ph["append"], 1e-3)  # MB/s of the driver's append here
    plan = [
        f"- **Partitioning by user**: `--num_buckets={SCALE_BUCKETS}` gives "
        f"{per_bucket / 1e6:.1f}M events per bucket on average; at the engines' "
        f"{BUCKET_BYTES_PER_EVENT} bytes per event while a bucket is sorted and expanded, "
        f"about {per_bucket * BUCKET_BYTES_PER_EVENT / 2**30:.1f} GB per running task (an 8 GB "
        "executor with 4 cores runs four). A bucket is the unit of memory and of retry.",
        "- **Skew**: a user's events cannot be split (a history is the user's own), so one very "
        "active user (a crawler, a shared account) makes its bucket large. Cap them before "
        "preparing with the cleaning rules, `--max_user_events_per_day` (users above the rate "
        "are dropped with all their events) and `--min_user_events`; schema.json's "
        "`extra.engine` records the largest bucket against the mean, and the run logs a "
        "warning when it is over 4x.",
        f"- **Shuffle volume**: measured here {sp['shuffle_bytes_per_event']:.1f} bytes per "
        f"event (compressed), so about {e * sp['shuffle_bytes_per_event'] / 1e12:.2f} TB for "
        "10B events, nearly all of it pass 2's shuffle of the dense events by bucket (the scan's "
        "aggregations shuffle partial counts per id).",
        f"- **Output**: {out_b['next_item']:.0f} bytes per event on the next-item task and "
        f"{out_b['conversion']:.0f} on conversion here, so about "
        f"{e * out_b['next_item'] / 1e12:.1f} and {e * out_b['conversion'] / 1e12:.1f} TB. "
        f"The driver appends the parts sequentially: {rate:,.0f} MB/s on this machine (into "
        "its page cache; a shared mount is slower), so at least "
        f"{e * out_b['next_item'] / 2**20 / rate / 3600:.1f} h for the next-item output of 10B "
        "events. That append is the step to change at this scale (each bucket's part becoming "
        "shards of the final folder in place, with the event table in parts), as is the "
        "driver's memory for the vocabularies (about 40 bytes per user and item, plus their "
        "feature rows) and their broadcast to every executor.",
        "- **Shards to hosts**: shards are memory-mapped folders of .npy columns; every "
        "training host mounts the prepared folder and each JAX process reads only its own rows "
        "of each global batch (the input pipeline's sharding by process index), so shards do "
        "not need to be copied to particular hosts.",
    ]
    table = bench_prepare.engines_text(rows)
    return "\n".join(
        [
            _wrap(head),
            "",
            "```",
            table,
            "```",
            "",
            _wrap(phases),
            "",
            "### A 10-billion-event log",
            "",
        ]
        + [_wrap(p).replace("\n", "\n  ") for p in plan]
    )


def spark_en(rows: list[dict]) -> str:
    by = _engine_rows(rows)
    sp, base = by["next_item", "spark"], by["next_item", "numpy"]
    return _wrap(
        f"**Preparation on Apache Spark** (`--engine=spark`, [docs/spark.md](docs/spark.md)): "
        "examples decided by window functions over each user's events ordered by time, and the "
        f"same output, file for file, as the numpy engine (tested on the four datasets). On "
        f"the {sp['events'] / 1e6:.0f}M-event log in local mode on a {sp['cores']}-core "
        f"{sp['cpu'].split(',')[0]}: "
        f"{sp['seconds']:.0f} s and {sp['peak_tree_mb'] / 1024:.1f} GB against the numpy "
        f"engine's {base['seconds']:.0f} s and {base['peak_tree_mb'] / 1024:.1f} GB; Spark is "
        "for logs that live on a cluster."
    )


def spark_zh(rows: list[dict]) -> str:
    by = _engine_rows(rows)
    sp, base = by["next_item", "spark"], by["next_item", "numpy"]
    return (
        f"**在 Apache Spark 上准备数据**（`--engine=spark`，见 [docs/spark.md](docs/spark.md)）："
        "样本由按时间排序的每个用户事件上的窗口函数决定，"
        "输出与 numpy 引擎逐文件相同（在四个数据集上测试）。在 "
        f"{sp['events'] / 1e4:,.0f} 万事件的日志上，本机 {sp['cores']} 核 CPU 的 local 模式用时 "
        f"{sp['seconds']:.0f} 秒、{sp['peak_tree_mb'] / 1024:.1f} GB，numpy 引擎为 "
        f"{base['seconds']:.0f} 秒、{base['peak_tree_mb'] / 1024:.1f} GB；"
        "Spark 适用于存放在集群上的日志。"
    )


def cpu_facts(folder: str) -> list[dict]:
    """`cpu_machine_facts` of each machine's folder in `folder`, the newest run first."""
    paths = sorted(os.path.join(folder, d) for d in os.listdir(folder))
    facts = [cpu_machine_facts(p) for p in paths if os.path.isdir(p)]
    if not facts:
        raise DataError(f"{folder}: no machine folder (MACHINE/train.jsonl, MACHINE/rank.jsonl)")
    return sorted(facts, key=lambda f: f["machine"]["date"], reverse=True)


def cpu_machine_facts(folder: str) -> dict:
    """`benchmark.py --what=train --compare=keras,torch --json` (train.jsonl) and
    `--what=rank --compare --json` (rank.jsonl) of one CPU machine, ratios in the same run (with
    `--rounds=N`, in the same round: each key then holds one row per round)."""
    train, rank = prepare_facts(folder, "train.jsonl"), prepare_facts(folder, "rank.jsonl")
    group = lambda rows, key, impl: tables.by_key([r for r in rows if r["impl"] == impl], key)
    jax_train = group(train, lambda r: r["batch"], "jax")
    jax_rank = group(rank, lambda r: (r["model"], r["batch"]), "jax")
    keras_rank = group(rank, lambda r: (r["model"], r["batch"]), "keras-tensorflow")
    m = next(iter(jax_train.values()))[0]["machine"]
    m_rank = next(iter(jax_rank.values()))[0]["machine"]
    if (m_rank["cpu"], m_rank["cores"]) != (m["cpu"], m["cores"]):
        raise DataError(
            f"{folder}: rank.jsonl ran on {m_rank['cpu']} ({m_rank['cores']} cores), "
            f"train.jsonl on {m['cpu']} ({m['cores']} cores): one folder, one machine"
        )
    return {
        "name": os.path.basename(folder),
        "machine": m,
        "rank_date": m_rank["date"],
        "rounds": len(next(iter(jax_train.values()))),
        "rank_rounds": len(next(iter(jax_rank.values()))),
        # XLA CPU devices of the ranking run (`--host_devices=N`; 1: JAX's default)
        "rank_devices": max(r.get("devices", 1) for g in jax_rank.values() for r in g),
        # the hidden layer with bfloat16 operands (bench_util.bf16_hidden_pays)
        "bf16_hidden": any(
            r.get("hidden_operands") == "bfloat16" for g in jax_train.values() for r in g
        ),
        # the step's gradient in row blocks (config.opt.grad_blocks; rows before it: 1)
        "grad_blocks": max(r.get("grad_blocks", 1) for g in jax_train.values() for r in g),
        "train": train,
        "rank": rank,
        # --what=quality rows of that machine (quality.jsonl), where saved
        "quality": prepare_facts(folder, "quality.jsonl")
        if os.path.exists(os.path.join(folder, "quality.jsonl"))
        else [],
        "jax_train": jax_train,
        "jax_rank": jax_rank,
        "keras_rank": keras_rank,
        "batches": sorted(jax_train),
    }


def _stat(rows: list[dict], key: str, fmt: str = ".2f", unit: str = "x", scale=1.0) -> str:
    """`key` of one run's row, or of several rounds' rows their median (lowest-highest)."""
    return tables.spread([scale * r[key] for r in rows], fmt, unit)


def _med(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def _cpu_ratios(f: dict) -> dict:
    t, bs = f["jax_train"], f["batches"]
    pair = lambda key, **kw: " / ".join(_stat(t[b], key, **kw) for b in bs)
    rank = lambda model: " / ".join(_stat(f["jax_rank"][model, b], "score_vs_keras") for b in bs)
    return {
        "batches": " / ".join(str(b) for b in bs),
        "best": " / ".join(dict.fromkeys(r["train_best_ref"] for b in bs for r in t[b])),
        "train": pair("train_vs_best_ref"),
        "limit": pair("train_fraction_of_limit", fmt=".0f", unit=" %", scale=100),
        "score": pair("score_vs_best_ref"),
        "plain": pair("score_plain_vs_best_ref"),
        "default": rank("default"),
        "full": rank("full"),
    }


def _host(f: dict) -> str:
    """The ranking run's `--host_devices` flag, or nothing where it kept JAX's one CPU device."""
    return f" --host_devices={f['rank_devices']}" if f["rank_devices"] > 1 else ""


def _bf16_unit(f: dict) -> str:
    """What multiplies bfloat16 natively on the machine of `f`: AMX or AVX-512 BF16."""
    return "AMX" if "amx_bf16" in f["machine"]["cpu"].split() else "AVX-512 BF16"


def _runs_en(f: dict) -> str:
    if f["rounds"] == 1 and f["rank_rounds"] == 1:
        return "one run, ratios in the same run"
    return (
        f"{f['rounds']} rounds of training and scoring and {f['rank_rounds']} of ranking, the "
        "engine and the references in turn; the median of the rounds' ratios (lowest-highest)"
    )


def cpu_en(machines: list[dict]) -> str:
    said = []
    for f in machines:
        m, r, n = f["machine"], _cpu_ratios(f), f["rank_devices"]
        said.append(
            f"On {m['cpu']} ({m['cores']} cores, {m['date'][:10]}, {_runs_en(f)}): training the "
            f"benchmark seed CNN {r['train']} the best reference "
            f"({r['best']}) at batch {r['batches']}, the step at {r['limit']} of the matmul "
            "limit"
            + (
                " (the hidden layer's operands in bfloat16, training and scoring: this CPU has "
                f"{_bf16_unit(f)})"
                if f["bf16_hidden"]
                else ""
            )
            + _blocks_en(f)
            + f"; batch scoring {r['score']} from folded tables ({r['plain']} with the plain "
            "model"
            + f"); ranking {r['default']} the same model in Keras with the default model and "
            f"{r['full']} with the full one (bst, match)"
            + (f", the engine over {n} CPU devices (`--host_devices`)." if n > 1 else ".")
        )
    said.append(
        "Tables in docs/benchmarks.md. (Generated by `tools/readme_figures.py` from "
        "docs/results/cpu/.)"
    )
    return "\n\n".join(_wrap(t) for t in said)


def _blocks_en(f: dict) -> str:
    g = f["grad_blocks"]
    return f", its gradient in {g} row blocks (`config.opt.grad_blocks={g}`)" if g > 1 else ""


def cpu_zh(machines: list[dict]) -> str:
    said = [_cpu_zh(f) for f in machines]
    said.append(
        "表格见 docs/benchmarks.md。"
        "（本段由 `tools/readme_figures.py` 根据 docs/results/cpu/ 生成。）"
    )
    return "\n\n".join(said)


def _cpu_zh(f: dict) -> str:
    m, r, n = f["machine"], _cpu_ratios(f), f["rank_devices"]
    runs = (
        "单次运行，比值取自同一次运行"
        if f["rounds"] == 1 and f["rank_rounds"] == 1
        else f"训练与打分 {f['rounds']} 轮、排序 {f['rank_rounds']} 轮，引擎与参照轮流运行；"
        "比值为各轮比值的中位数（括号内为最低-最高）"
    )
    bf16 = (
        f"（训练与打分时隐藏层以 bfloat16 操作数相乘，该 CPU 有 {_bf16_unit(f)}）"
        if f["bf16_hidden"]
        else ""
    )
    return (
        f"在 {m['cpu']} 上（{m['cores']} 核，{m['date'][:10]}，{runs}）："
        f"基准种子 CNN 的训练在 batch {r['batches']} 下为最佳参照（{r['best']}）的 {r['train']}，"
        f"训练步达到矩阵乘法上限的 {r['limit']}"
        + bf16
        + (
            f"，梯度分 {f['grad_blocks']} 个行块计算（`config.opt.grad_blocks={f['grad_blocks']}`）"
            if f["grad_blocks"] > 1
            else ""
        )
        + f"；批量打分（折叠表）为 {r['score']}（未折叠模型 {r['plain']}）；"
        f"排序：默认模型为同一模型 Keras 版的 {r['default']}，完整模型（bst、match）为 {r['full']}"
        + (f"，引擎分为 {n} 个 CPU 设备（`--host_devices`）。" if n > 1 else "。")
    )


_NAMES = {"keras": "Keras", "tensorflow": "TensorFlow", "torch": "PyTorch"}


def cpu_benchmarks(machines: list[dict]) -> str:
    return "\n\n".join(
        f"### {f['machine']['cpu']}, {f['machine']['cores']} cores\n\n{_cpu_benchmarks(f)}"
        for f in machines
    )


def _cpu_benchmarks(f: dict) -> str:
    m, bs = f["machine"], f["batches"]
    t0 = f["jax_train"][bs[0]]
    refs = sorted({r["impl"] for r in f["train"] if not r["impl"].startswith("jax")})
    versions = ", ".join(
        f"{k} {v}"
        for k, v in {
            "JAX": m["jax"],
            **{
                _NAMES.get(k, k): v
                for r in f["train"]
                if r["impl"] in refs
                for k, v in r.get("versions", {}).items()
            },
        }.items()
    )
    peaks = sorted(r["matmul_flops_per_s"] / 1e9 for r in t0)
    matmul = f"{peaks[0]:.0f}" if len(peaks) == 1 else f"{peaks[0]:.0f}-{peaks[-1]:.0f}"
    compare = ",".join(dict.fromkeys(impl.split("-")[0] for impl in refs))  # --compare names
    if f["rounds"] == 1:
        runs = (
            "median of each measurement's timed runs, one run of `python tools/benchmark.py "
            f"--what=train --compare={compare} --variants=fast --json` (train.jsonl) and, at "
            f"{f['rank_date']}, one of `--what=rank --compare{_host(f)} --json` (rank.jsonl) in "
            f"docs/results/cpu/{f['name']}/"
        )
    else:
        runs = (
            f"one run of `python tools/benchmark.py --what=train --compare={compare} --rounds="
            f"{f['rounds']} --json` (train.jsonl) and, at {f['rank_date']}, one of `--what=rank "
            f"--compare --rounds={f['rank_rounds']}{_host(f)} --json` (rank.jsonl) in "
            "docs/results/cpu/"
            f"{f['name']}/: in each round the engine, then the matmul limit, then the "
            "references; rates are the median of the rounds (each round's the median of its "
            "timed runs), ratios the median of the rounds' ratios, each taken within its round, "
            "with the lowest and highest"
        )
    head = (
        f"{m['date']}: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; {versions}; "
        f"matmul {matmul} GFLOP/s f32; {runs}. References "
        "with the engine's allocator settings; Keras scores through the faster of `predict` "
        "and a `predict_on_batch` loop."
    )
    q = max(f["quality"], key=lambda r: r["steps"], default=None)  # the longest quality run
    if f["bf16_hidden"]:
        head += (
            " The engine's hidden layer multiplies bfloat16 operands into float32 results on "
            f"this CPU ({_bf16_unit(f)}), in training (forward and gradients) and in scoring "
            "(folded and plain); every other op, the parameters and the optimizer stay float32."
        )
        if q and "test_auc_float32_hidden" in q:
            head += (
                f" Held-out AUC after {q['steps']} steps of `--what=quality` (quality.jsonl): "
                f"{q['test_auc']:.4f} with the bfloat16 hidden layer, "
                f"{q['test_auc_float32_hidden']:.4f} all in float32."
            )
    blocks = f["grad_blocks"]
    if blocks > 1:
        head += (
            f" The engine's train step computes its gradient in {blocks} row blocks "
            f"(`config.opt.grad_blocks={blocks}`), which XLA:CPU runs side by side until their "
            "gradients add up."
        )
        if q and "test_auc_one_block" in q:
            head += (
                f" Held-out AUC after {q['steps']} steps: {q['test_auc']:.4f} in {blocks} "
                f"blocks, {q['test_auc_one_block']:.4f} in one."
            )
    rows = ["| impl | batch | train ex/s | score ex/s | train vs best ref | score vs best ref "
            "| plain model vs best ref | score ex/CPU-s | others' CPU |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    order = {"jax": 0, **{k: i + 1 for i, k in enumerate(refs)}}
    groups = tables.by_key(f["train"], lambda r: (r["batch"], order.get(r["impl"], 9), r["impl"]))
    for (batch, _, impl), g in groups.items():  # sorted by batch, then the engine first
        name = "influence_jax (folded scoring)" if impl == "jax" else impl
        ratio = lambda k, g=g: _stat(g, k) if k in g[0] else ""
        rows.append(
            f"| {name} | {batch} | {_med(g, 'train_ex_per_s'):,.0f} "
            f"| {_med(g, 'score_ex_per_s'):,.0f} | {ratio('train_vs_best_ref')} "
            f"| {ratio('score_vs_best_ref')} | {ratio('score_plain_vs_best_ref')} "
            f"| {_med(g, 'score_ex_per_cpu_s'):,.0f} "
            f"| {max(r.get('others_cpu', 0) for r in g):.0%} |"
        )
    limit = ", ".join(
        f"{_stat(f['jax_train'][b], 'train_fraction_of_limit', '.1f', ' %', 100)} at batch {b}"
        for b in bs
    )
    says = (
        f"The compiled train step costs {t0[0]['train_flops_per_example'] / 1e6:.2f} MFLOP per "
        f"example (XLA's cost analysis) and reaches {limit} of the matmul limit."
    )
    rank = ["| model | batch | engine score fn | eval step | Keras | Keras path | engine vs Keras "
            "| per CPU-second vs Keras |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for (model, b), g in sorted(f["jax_rank"].items()):
        k = f["keras_rank"].get((model, b))  # None where the reference did not run
        paths = "/".join(dict.fromkeys(x["score_path"] for x in k)) if k else ""
        keras = f"{_med(k, 'score_ex_per_s'):,.0f} | {paths}" if k else "- | -"
        vs = f"{_stat(g, 'score_vs_keras')} | {_stat(g, 'score_cpu_vs_keras')}" if k else "- | -"
        rank.append(
            f"| {model} | {b} | {_med(g, 'score_ex_per_s'):,.0f} | {_med(g, 'eval_ex_per_s'):,.0f} "
            f"| {keras} | {vs} |"
        )
    checks = "; ".join(
        f"{model}: {k[0]['params']:,} parameters, scores within "
        f"{max(x['check_max_abs_diff'] for x in k):.1e}"
        for (model, b), k in sorted(f["keras_rank"].items())
        if b == bs[0] and "check_max_abs_diff" in k[0]
    )
    return "\n".join(
        [
            _wrap(head),
            "",
            *rows,
            "",
            _wrap(says),
            "",
            _wrap(
                "Ranking (`--what=rank --compare`), candidates/s; Keras loads the JAX parameters "
                f"({checks}):"
            ),
            "",
            *rank,
        ]  # fmt: skip
    )


BLOCKS = {
    INFLUENCE: (influence_facts, {"en": influence_en, "zh": influence_zh}),
    GPU: (gpu_facts, {"en": gpu_en, "zh": gpu_zh, "benchmarks": gpu_benchmarks}),
    "cpu": (cpu_facts, {"en": cpu_en, "zh": cpu_zh, "benchmarks": cpu_benchmarks}),
    MULTITASK: (multitask_facts, {"quality": tables.multitask_table}),
    "prepare": (
        prepare_facts,
        {"en": prepare_en, "zh": prepare_zh, "benchmarks": prepare_benchmarks},
    ),
    "spark": (
        lambda folder: prepare_facts(folder, "engines.jsonl"),
        {"en": spark_en, "zh": spark_zh, "spark": spark_doc},
    ),
    "two_tower": (two_tower_facts, {"ranking": tables.two_tower_table}),
    "serve": (
        lambda folder: prepare_facts(folder, "serve.jsonl"),
        {"serving": serve_doc, "en": serve_en, "zh": serve_zh},
    ),
    "recall": (
        lambda folder: two_tower_facts(os.path.join(os.path.dirname(folder), "two_tower")),
        {"en": recall_en, "ranking": tables.recall_table},
    ),
    "catalogue": (
        lambda folder: prepare_facts(folder, "catalogue.jsonl"),
        {"ranking": catalogue_ranking},
    ),
    "ranking_quality": (
        lambda folder: _load(os.path.join(folder, "ranking_quality.json")),
        {"ranking": tables.ranking_quality_table},
    ),
    "quality_heads": (
        lambda folder: _load(os.path.join(folder, "quality.json")),
        {"quality": tables.quality_table},
    ),
    "quality_next_item": (
        conversion_facts,
        {
            "en": lambda f: quality_en(f, "next_item"),
            "zh": lambda f: quality_zh(f, "next_item"),
            "quality": lambda f: tables.quality_table(f["results"]),
        },
    ),
    "quality_conversion": (
        conversion_facts,
        {
            "en": lambda f: quality_en(f, "conversion"),
            "zh": lambda f: quality_zh(f, "conversion"),
            "quality": lambda f: tables.quality_table(f["results"]),
        },
    ),
}


def render(text: str, name: str, body: str, path: str) -> str:
    pattern = re.compile(
        rf"(<!-- figures:{name} -->\n)(.*?)(\n<!-- /figures:{name} -->)", re.DOTALL
    )
    if not pattern.search(text):
        raise DataError(f"{path}: no block <!-- figures:{name} --> ... <!-- /figures:{name} -->")
    return pattern.sub(lambda m: m.group(1) + body + m.group(3), text)


def update(check: bool, results: str = RESULTS) -> list[str]:
    """Rewrites (or with `check` only compares) every block; returns the stale documents."""
    stale = []
    for lang, path in READMES.items():
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
        new = text
        for name, (facts, renderers) in BLOCKS.items():
            if lang in renderers:
                body = renderers[lang](facts(os.path.join(results, name)))
                new = render(new, name, body, path)
        if new != text:
            stale.append(path)
            if not check:
                files.write_text(path, new)
    return stale


def _main() -> None:
    if _IMPORT.value:
        import_influence(_IMPORT.value, os.path.join(RESULTS, INFLUENCE))
    stale = update(_CHECK.value)
    if _CHECK.value and stale:
        sys.exit(f"readme_figures: stale: {', '.join(stale)}; run python tools/readme_figures.py")
    print(("stale: " if _CHECK.value else "rewrote: ") + (", ".join(stale) or "nothing"))


if __name__ == "__main__":
    app.run(cli.tool_main(_main, "readme_figures"), flags_parser=cli.parse_flags)
