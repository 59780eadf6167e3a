"""Markdown tables of experiment results, shared by the tools that make them and
tools/readme_figures.py, which renders them from the saved JSON."""

from __future__ import annotations

import numpy as np


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
