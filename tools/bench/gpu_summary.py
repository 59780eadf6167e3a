"""The table that tools/gpu_benchmark.sh prints last: its JSON lines against the speed targets.

python tools/gpu_summary.py DIR    # DIR holds gpu_benchmark.sh's *.jsonl files

Standard library only. Targets (the performance issue, batch sizes as on an H100/H200): at
least 8M training examples/s at batch 65536 (bf16 counts where it keeps AUC within
AUC_TOLERANCE), at least 3x PyTorch eager at batch 8192, and with a 10M-row item table at
least 80% of the 100K-row throughput with the row-sparse update. SMOKE runs (other batch
sizes) compare the smallest and largest batch instead.
"""

from __future__ import annotations

import glob
import json
import os
import sys

TRAIN_TARGET = 8e6  # training examples/s at the large batch
EAGER_RATIO_TARGET = 3.0  # ours / PyTorch eager at the small batch
SPARSE_KEEP_TARGET = 0.8  # 10M-row throughput / 100K-row throughput, row-sparse update
DIN_V100 = 18.7e3  # public DIN training figure, examples/s on one V100 (the speed issue's)
AUC_TOLERANCE = 0.002  # bf16 "keeps AUC": held-out AUC at most this far below f32


def load(folder: str) -> tuple[dict[str, list[dict]], list[dict]]:
    """{part: rows} from DIR/*.jsonl, and the parts' exit statuses."""
    parts, status = {}, []
    for path in sorted(glob.glob(os.path.join(folder, "*.jsonl"))):
        name = os.path.basename(path)[: -len(".jsonl")]
        with open(path) as f:
            rows = [json.loads(line) for line in f if line.startswith("{")]
        if name == "parts":
            status = rows
        else:
            parts[name] = rows
    return parts, status


def _fmt(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def _rate(rows: list[dict], impl: str, batch: int, key: str = "train_ex_per_s") -> float | None:
    hit = [r[key] for r in rows if r.get("impl") == impl and r.get("batch") == batch and key in r]
    return max(hit) if hit else None


def train_table(rows: list[dict], small: int, large: int) -> list[str]:
    impls = list(dict.fromkeys(r["impl"] for r in rows if "train_ex_per_s" in r))
    head = f"{'impl':<24}" + "".join(
        f"{f'{k} b={b}':>18}" for k in ("train", "score") for b in (small, large)
    )
    lines = ["training and scoring, benchmark CNN, examples/s", head]
    for impl in impls:
        cells = [
            _fmt(_rate(rows, impl, b, f"{k}_ex_per_s"))
            for k in ("train", "score")
            for b in (small, large)
        ]
        lines.append(f"{impl:<24}" + "".join(f"{c:>18}" for c in cells))
    return lines


def verdict(ok: bool | None) -> str:
    return "not measured" if ok is None else ("met" if ok else "NOT met")


def targets(train: list[dict], quality: list[dict], small: int, large: int) -> list[str]:
    auc = {r["dtype"]: r["test_auc"] for r in quality}
    bf16_keeps = None
    if "float32" in auc and "bfloat16" in auc:
        bf16_keeps = auc["bfloat16"] >= auc["float32"] - AUC_TOLERANCE
    f32, bf16 = _rate(train, "jax", large), _rate(train, "jax-bfloat16", large)
    best = max([x for x in (f32, bf16 if bf16_keeps else None) if x is not None], default=None)
    ours, eager = _rate(train, "jax", small), _rate(train, "torch-eager", small)
    ratio = ours / eager if ours and eager else None
    lines = ["targets"]
    lines.append(
        f"  train b={large}: f32 {_fmt(f32)}, bf16 {_fmt(bf16)} ex/s "
        f"(bf16 {'keeps' if bf16_keeps else 'does not keep' if bf16_keeps is False else '?'} "
        f"AUC); best counted {_fmt(best)} vs {TRAIN_TARGET:,.0f}: "
        f"{verdict(None if best is None else best >= TRAIN_TARGET)}"
    )
    ratio_ok = None if ratio is None else ratio >= EAGER_RATIO_TARGET
    lines.append(
        f"  train b={small}: ours / PyTorch eager {_fmt(ratio, '.2f')}x vs "
        f"{EAGER_RATIO_TARGET:.0f}x: {verdict(ratio_ok)}"
    )
    return lines


def sparse_lines(rows: list[dict]) -> list[str]:
    """Dense Adam vs row-sparse, largest item table against the smallest."""
    lines = []
    sparse = [r for r in rows if r.get("section") == "sparse_scale"]
    for update in ("dense Adam", "sparse"):
        got = sorted((r["items"], r["step_ms"]) for r in sparse if r["update"] == update)
        if len(got) >= 2:
            (lo, lo_ms), (hi, hi_ms) = got[0], got[-1]
            keep = lo_ms / hi_ms  # throughput at hi / throughput at lo
            tail = f": {verdict(keep >= SPARSE_KEEP_TARGET)}" if update == "sparse" else ""
            lines.append(
                f"  {update}, engine model: {hi:,} items keep {keep:.0%} of the {lo:,}-item "
                f"throughput ({lo_ms:.1f} -> {hi_ms:.1f} ms/step){tail}"
            )
    return lines


def quality_line(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    aucs = ", ".join(f"{r['dtype']} {r['test_auc']:.4f}" for r in rows)
    return [
        f"held-out AUC, {rows[0]['steps']} steps of {rows[0]['batch']} on planted data "
        f"({rows[0]['test_examples']:,} examples, oracle {rows[0]['oracle_auc']:.4f}): {aucs}"
    ]


def rank_table(rows: list[dict]) -> list[str]:
    if not any(r.get("impl") == "jax" for r in rows):
        return []
    lines = [
        "ranking, candidates/s; the ranker's own training, examples/s",
        f"{'model':<9}{'batch':>8}{'score fn':>14}{'eval step':>14}{'train':>14}",
    ]
    merged: dict[tuple, dict] = {}  # (model, batch) -> the scoring and training rows together
    for r in rows:
        if r.get("impl") == "jax":
            merged.setdefault((r["model"], r["batch"]), {}).update(r)
    for (model, batch), r in merged.items():
        lines.append(
            f"{model:<9}{batch:>8}{_fmt(r.get('score_ex_per_s')):>14}"
            f"{_fmt(r.get('eval_ex_per_s')):>14}{_fmt(r.get('train_ex_per_s')):>14}"
        )
    full = [r for r in rows if r.get("model") == "full" and "train_ex_per_s" in r]
    if full:
        r = min(full, key=lambda r: abs(r["batch"] - 8192))
        lines.append(
            f"  full ranker training b={r['batch']}: {r['train_ex_per_s']:,.0f} ex/s, "
            f"{r['train_ex_per_s'] / DIN_V100:.1f}x the public DIN figure on one V100 "
            f"({DIN_V100:,.0f} ex/s)"
        )
    return lines


def summary(folder: str) -> str:
    parts, status = load(folder)
    train = [r for p in ("train", "train_compile", "train_bf16") for r in parts.get(p, [])]
    batches = sorted({r["batch"] for r in train if "batch" in r})
    jax_rows = [r for r in train + parts.get("quality", []) if r.get("impl", "").startswith("jax")]
    device = next((r["device"] for r in jax_rows), "?")
    lines = [f"device: {device}"]
    state = lambda rc: "ok" if rc == 0 else "skipped" if rc == "skipped" else f"exit {rc}"
    took = lambda s: f" ({s['seconds']} s)" if "seconds" in s else ""
    lines.append("parts: " + ", ".join(f"{s['part']} {state(s['rc'])}{took(s)}" for s in status))
    if batches:
        small, large = batches[0], batches[-1]
        quality = parts.get("quality", [])
        lines += train_table(train, small, large) + targets(train, quality, small, large)
    lines += sparse_lines(parts.get("scale", []))
    rank = parts.get("rank", []) + parts.get("rank_train", [])
    lines += quality_line(parts.get("quality", [])) + rank_table(rank)
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) != 2 or not os.path.isdir(sys.argv[1]):
        sys.exit("usage: python tools/gpu_summary.py DIR (gpu_benchmark.sh's output folder)")
    print(summary(sys.argv[1]))
