"""Markdown tables of experiment results, shared by the tools that make them and
tools/readme_figures.py, which renders them from the saved JSON."""

from __future__ import annotations

import statistics
from collections.abc import Callable

import numpy as np


def by_key(rows: list[dict], key: Callable[[dict], object]) -> dict:
    """Rows grouped by `key` (impl, batch, ...), sorted by it: with `tools/benchmark.py
    --rounds=N` each group holds one row per round, without it one row."""
    groups: dict = {}
    for r in rows:
        groups.setdefault(key(r), []).append(r)
    return dict(sorted(groups.items()))


def spread(values: list[float], fmt: str = ".2f", unit: str = "x") -> str:
    """One value as itself; several rounds' values as 'median (lowest-highest)', e.g.
    '1.50x (1.20-1.80x)', the form of the benchmark's printed tables, the README and the docs."""
    v = sorted(values)
    mid = f"{statistics.median(v):{fmt}}{unit}"
    return mid if len(v) == 1 else f"{mid} ({v[0]:{fmt}}-{v[-1]:{fmt}}{unit})"


def multitask_table(results: dict) -> str:
    """tools/multitask_compare.py's table: per dataset and head, single- and multi-task test AUC
    (mean ± sd over seeds) and their paired difference with its 95 % interval."""
    cell = lambda v: f"{np.mean(v):.4f} ± {np.std(v, ddof=1) if len(v) > 1 else 0:.4f}"
    lines = [
        "| dataset | head (test positives) | single-task AUC | multi-task AUC | multi - single "
        "(95 % CI over seeds) |",
        "|---|---|---|---|---|",
    ]
    for name, heads in results.items():
        for h, r in heads.items():
            d = r["difference"]
            ci = f"{d['mean']:+.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f})"
            lines.append(
                f"| {name} | {h} ({r['positives']}) | {cell(r['single_auc'])} | "
                f"{cell(r['multitask_auc'])} | {ci} |"
            )
    return "\n".join(lines)


def _cell(values: list[float]) -> str:
    v = np.asarray(values)
    return f"{v.mean():.4f} ± {v.std(ddof=1) if len(v) > 1 else 0:.4f}"


def quality_table(results: dict) -> str:
    """tools/quality.py's Markdown table: per dataset (or head) block, the models' figures as
    mean ± sd over seeds with the AUC difference to the best baseline, then the baselines."""
    cols = ("dataset (test positives / rows)", "model", "AUC", "GAUC", "PR-AUC", "logloss",
            "AUC - best baseline (95 % CI)")  # fmt: skip
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    f = lambda x: f"{x:.4f}" if x == x else "-"
    for name, r in results.items():
        folds = f", {r['folds']} folds" if r.get("folds", 1) > 1 else ""
        where = f"{name} ({r['positives']:,} / {r['rows']:,}{folds})"
        for variant, m in r["models"].items():
            d = m["vs_best_baseline"]
            cells = [_cell(m[k]) for k in ("auc", "gauc", "pr_auc", "logloss")]
            ci = f"{d['diff']:+.4f} ({d['ci_low']:+.4f}, {d['ci_high']:+.4f})"
            lines.append(f"| {where} | {variant} | " + " | ".join(cells) + f" | {ci} |")
        for base, m in r["baselines"].items():
            label = f"baseline: {base}" + (" (best on valid)" if base == r["best_baseline"] else "")
            cells = [f(m[k]) for k in ("auc", "gauc", "pr_auc", "logloss")]
            lines.append(f"| {where} | {label} | " + " | ".join(cells) + " | |")
    return "\n".join(lines)


def ranking_quality_table(results: dict) -> str:
    """tools/ranking_quality.py's table: per dataset, the ranked top k (mean over seeds, with the
    seeds' range) and each single-source list, each list with the paired difference "ranked -
    list" and its 95 % interval over users."""
    rows = []
    for name, r in results.items():
        k, seeds = r["k"], r["seeds"]
        lines = []
        rk = r["ranked"]
        cells = [
            f"{rk[m]['mean']:.3f} ({min(rk[m]['seeds']):.3f}-{max(rk[m]['seeds']):.3f})"
            for m in ("hr", "ndcg", "mrr")
        ]
        lines.append(
            f"| {name} ({r['users']} users) | ranked top {k} ({seeds} seeds) | "
            + " | ".join(cells)
            + " | |"
        )
        for lst, v in r["lists"].items():
            d = v["ndcg"]
            lines.append(
                f"| {name} ({r['users']} users) | {lst} only | "
                + " | ".join(f"{v[m]['mean']:.3f}" for m in ("hr", "ndcg", "mrr"))
                + f" | {d['diff']:+.3f} ({d['ci_low']:+.3f}, {d['ci_high']:+.3f}) |"
            )
        rows += lines
    k = next(iter(results.values()))["k"] if results else 10
    head = (
        f"| dataset (users with test positives) | list | HR@{k} | NDCG@{k} | MRR@{k} | "
        f"ranked - list, NDCG@{k} (95 % CI over users) |"
    )
    return "\n".join([head, "|---|---|---|---|---|---|", *rows])


RECALL_AT = ("50", "100", "200", "500")


def _recall_rows(first: str, second: str, rows: list[tuple[str, str, dict]]) -> str:
    """A recall@N table: header `first` | `second`, then (dataset cell, label, {N: recall})."""
    lines = [
        f"| {first} | {second} | " + " | ".join(f"@{n}" for n in RECALL_AT) + " |",
        "|---|---|" + "---|" * len(RECALL_AT),
    ]
    for head, label, rec in rows:
        lines.append(
            f"| {head} | {label} | " + " | ".join(f"{rec[n]:.3f}" for n in RECALL_AT) + " |"
        )
    return "\n".join(lines)


def two_tower_table(results: dict) -> str:
    """Recall@N of the learned source beside the non-learned retriever, per dataset: `results`
    maps a dataset to {"base": retrieve.py's recall JSON without the learned source, "learned":
    with it, "meta": the retriever's meta.json}."""
    rows = []
    for name, r in results.items():
        base, with_tt = r["base"], r["learned"]
        head = f"{name} ({base['positives']:,}; {r['meta']['stats']['pairs']:,} pairs)"
        rows += [
            (head, "two-tower (learned) only", with_tt["recall"]["learned"]),
            (head, "popular only", base["recall"]["popular"]),
            (head, "merged, non-learned sources", base["recall"]["merged"]),
            (head, "**merged, with the learned source**", with_tt["recall"]["merged"]),
            (head, "two-tower, items new to the user", with_tt["recall_unseen"]["learned"]),
            (head, "merged (non-learned), items new to the user", base["recall_unseen"]["merged"]),
        ]
    return _recall_rows("dataset (positives with history; training pairs)", "list", rows)


def recall_table(results: dict) -> str:
    """recall@N of every non-learned source and of their merge per dataset (`results` as for
    `two_tower_table`; its "base" runs)."""
    order = ("recent", "covisit", "learned", "category", "popular", "merged")
    rows = []
    for name, r in results.items():
        b = r["base"]
        head = f"{name} ({b['positives']:,} / {b['positives_without_history']:,}; {b['users']:,})"
        for src in sorted(b["recall"], key=lambda x: order.index(x) if x in order else 99):
            rows.append((head, "**merged**" if src == "merged" else src, b["recall"][src]))
    return _recall_rows("dataset (positives with history / without; users)", "source", rows)
