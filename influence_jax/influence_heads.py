"""The heads of a multi-task run side by side: one influence report per head (or, over several
runs, one combined report per head), laid out as one table, JSON and figure per behaviour type
and extractor, so that "cart matters for purchase but not for engagement" reads at a glance.

For each behaviour type and head: `share` (its part of the total leave-one-type-out influence),
`per_event`, `signed`, the learned gate (`gate_normalised`: g_t / sum g), the counterfactual
contrast (one event of the type on the target item vs on another item, logit) and, on synthetic
data, the planted weight. For each extractor and head: `share` and the learned `weight`. Over
several runs each figure is the mean over the runs (the per-head folders hold the intervals).
"""

from __future__ import annotations

from typing import Any

import numpy as np

TYPE_METRICS = (
    "share",
    "per_event",
    "signed",
    "gate_normalised",
    "gate",
    "counterfactual_contrast",
    "planted_weight",
)
EXTRACTOR_METRICS = ("share", "weight")


def _value(entry: dict[str, Any], metric: str) -> float | None:
    """A single report's figure, or a combined report's mean over runs."""
    v = entry.get(metric)
    if isinstance(v, dict):
        return v.get("mean")
    return None if v is None else float(v)


def side_by_side(reports: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """{head: report} (single-run or combined) -> per type/extractor, metric and head, the
    figure; per head the order of the types by share and by gate; whether the orders agree."""
    heads = list(reports)
    first = reports[heads[0]]
    out: dict[str, Any] = {"heads": heads}
    for group, metrics in (("behaviour_types", TYPE_METRICS), ("extractors", EXTRACTOR_METRICS)):
        out[group] = {
            name: {
                m: {h: _value(reports[h][group][name], m) for h in heads}
                for m in metrics
                if any(_value(reports[h][group][name], m) is not None for h in heads)
            }
            for name in first[group]
        }
    orders = {}
    for m in ("share", "gate_normalised", "counterfactual_contrast"):
        per_head = {}
        for h in heads:
            vals = {
                t: out["behaviour_types"][t].get(m, {}).get(h) for t in first["behaviour_types"]
            }
            if all(v is not None for v in vals.values()):
                per_head[h] = sorted(vals, key=lambda t, vals=vals: -vals[t])
        if per_head:
            orders[m] = {
                "per_head": per_head,
                "same": len({tuple(o) for o in per_head.values()}) == 1,
            }
    out["orders"] = orders
    return out


def lines(s: dict[str, Any]) -> list[str]:
    """The side-by-side table as printed lines: a row per behaviour type and extractor."""
    heads = s["heads"]
    cell = lambda v, fmt: f"{v:{fmt}}" if v is not None else "-"
    head_cols = "".join(f"{h:>26}" for h in heads)
    out = ["heads side by side (share of influence / learned gate share / contrast logit):"]
    out.append(f"{'':<20}{head_cols}")
    for t, v in s["behaviour_types"].items():
        row = ""
        for h in heads:
            share = cell(v.get("share", {}).get(h), ".1%")
            gate = cell(v.get("gate_normalised", {}).get(h), ".1%")
            contrast = cell(v.get("counterfactual_contrast", {}).get(h), "+.3f")
            row += f"{share + ' / ' + gate + ' / ' + contrast:>26}"
        out.append(f"  behaviour {t:<9}{row}")
    for k, v in s["extractors"].items():
        cells = [
            cell(v.get("share", {}).get(h), ".1%")
            + " / w "
            + cell(v.get("weight", {}).get(h), ".3f")
            for h in heads
        ]
        row = "".join(f"{c:>26}" for c in cells)
        out.append(f"  extractor {k:<9}{row}")
    for m, o in s["orders"].items():
        if o["same"]:
            out.append(
                f"  order by {m}: {' > '.join(next(iter(o['per_head'].values())))} on every head"
            )
        else:
            seen = "; ".join(f"{h}: {' > '.join(p)}" for h, p in o["per_head"].items())
            out.append(f"  order by {m} differs between heads ({seen})")
    return out


def plot(s: dict[str, Any]) -> bytes:
    """Per behaviour type, grouped by head: the share of influence (bars), the learned gate
    share (diamonds) and, on synthetic data, the planted weight (crosses)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from influence_jax.influence_plots import _png

    heads, types = s["heads"], list(s["behaviour_types"])
    width = 0.8 / len(heads)
    fig, ax = plt.subplots(figsize=(1.3 * len(types) * len(heads) + 2.5, 4.2))
    x = np.arange(len(types))
    colours = plt.get_cmap("tab10")
    for i, h in enumerate(heads):
        pos = x - 0.4 + width * (i + 0.5)
        get = lambda m, h=h: [s["behaviour_types"][t].get(m, {}).get(h) for t in types]
        share = np.array([np.nan if v is None else v for v in get("share")], float)
        ax.bar(pos, share, width * 0.9, color=colours(i), alpha=0.75, label=f"{h}: share")
        gate = np.array([np.nan if v is None else v for v in get("gate_normalised")], float)
        ax.plot(pos, gate, "D", color=colours(i), mec="black", ms=6, label=f"{h}: learned gate")
        planted = [v for v in get("planted_weight")]
        if any(v is not None for v in planted):
            p = np.array([np.nan if v is None else v for v in planted], float)
            ax.plot(pos, p, "x", color="black", ms=8, mew=2, label="planted" if i == 0 else None)
    ax.set_xticks(x, types)
    ax.set_ylabel("share of the head's total")
    ax.set_title("Behaviour types by head: share of leave-one-type-out influence, learned gates")
    ax.legend(fontsize=7, ncol=2)
    return _png(fig, plt)


def write(s: dict[str, Any], output: str) -> None:
    """OUTPUT/heads.json and OUTPUT/behaviour_influence_heads.png."""
    from influence_jax.influence_runs import write_with_plot

    write_with_plot(s, output, "heads.json", "behaviour_influence_heads", plot(s))
