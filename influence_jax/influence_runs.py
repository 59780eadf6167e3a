"""Influence across retrainings: the influence reports of several runs (e.g. one config on
several seeds) as one report whose every figure has a mean and an interval over the runs, and
flags for the orders and signs that do not hold on every run.

For each behaviour type it reports, and the README explains: `influence` (mean |logit change|
when every event of the type is removed: the type's total influence), `per_event` (that total
over the type's events present, so a frequent type is not "most influential" for being
frequent), `signed` (mean logit drop when the type is removed: positive when the type raises
the score), `share`, the learned `gate` and `events_per_example` (the type's event counts). For
each extractor: `influence`, `share`, `contribution` and its learned `weight`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from influence_jax import files

# Two-sided 95 % Student t quantiles by degrees of freedom (runs - 1); 1.96 beyond the table.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
         9: 2.262, 10: 2.228, 15: 2.131, 20: 2.086, 30: 2.042}  # fmt: skip
METRICS = {
    "behaviour_types": (
        "influence",
        "per_event",
        "signed",
        "share",
        "gate",
        "events_per_example",
        "counterfactual_add_prob",
        "counterfactual_contrast",
    ),
    "extractors": ("influence", "contribution", "share", "weight"),
}
# The values a metric can take: its interval over runs is clipped to them (a t interval over
# 2 or 3 runs is wide, and a mean |logit change| or a gate is never below 0).
INF = float("inf")
RANGES = {
    "influence": (0.0, INF),
    "per_event": (0.0, INF),
    "share": (0.0, 1.0),
    "gate": (0.0, INF),
    "events_per_example": (0.0, INF),
    "counterfactual_add_prob": (-1.0, 1.0),
    "weight": (0.0, 1.0),  # softmax weights, or all 1 (combine="sum")
}
RANKED = {
    "behaviour_types": ("influence", "per_event", "gate", "counterfactual_contrast"),
    "extractors": ("weight",),
}
SIGNED = {"behaviour_types": "signed", "extractors": "contribution"}


def t_quantile(df: int) -> float:
    if df <= 0:
        return float("nan")
    return T_975[max(k for k in T_975 if k <= df)] if df <= 30 else 1.96


def over_runs(values: list[float], bounds: tuple[float, float] = (-INF, INF)) -> dict[str, Any]:
    """Mean, standard deviation and 95 % t interval of one figure over runs, the interval
    clipped to the figure's `bounds` (`clipped` says where it was)."""
    v = np.asarray(values, np.float64)
    sd = float(v.std(ddof=1)) if len(v) > 1 else float("nan")
    half = t_quantile(len(v) - 1) * sd / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    mean = float(v.mean())
    lo, hi = mean - half, mean + half
    out = {"values": v.tolist(), "mean": mean, "sd": sd}
    out |= {"ci_low": max(lo, bounds[0]), "ci_high": min(hi, bounds[1])}
    if lo < bounds[0] or hi > bounds[1]:
        out["clipped"] = True
    return out


def refresh_intervals(combined: dict[str, Any]) -> dict[str, Any]:
    """`combined` (combine's dict, e.g. as saved) with every metric's interval computed again
    from its values over the runs (as combine computes it now)."""
    for group, metrics in METRICS.items():
        for entry in combined[group].values():
            for m in metrics:
                if m in entry:
                    entry[m] = over_runs(entry[m]["values"], RANGES.get(m, (-INF, INF)))
    return combined


def combine(reports: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """One report over several runs' reports (each `influence.report`'s dict).

    Returns {"runs", "examples", "behaviour_types", "extractors", "orders", "unstable"}: per
    name and metric the values over runs with their mean and interval, `sign_stable` per name,
    the order of the names by each ranked metric on every run with whether it holds, and
    `unstable`, one plain sentence per order or sign that changes between runs.
    """
    if len(reports) < 2:
        raise ValueError("combining influence reports needs at least two runs")
    out: dict[str, Any] = {"runs": names, "examples": [r["examples"] for r in reports]}
    out["steps"] = [r["step"] for r in reports]
    orders: dict[str, Any] = {}
    unstable: list[str] = []
    for group, metrics in METRICS.items():
        keys = list(reports[0][group])
        if any(list(r[group]) != keys for r in reports):
            raise ValueError(f"the runs' reports name different {group}: not the same model")
        g: dict[str, Any] = {}
        for k in keys:
            g[k] = {}
            for m in metrics:
                vals = [r[group][k].get(m) for r in reports]
                if all(v is not None for v in vals):
                    g[k][m] = over_runs(vals, RANGES.get(m, (-INF, INF)))
            signs = {np.sign(r[group][k][SIGNED[group]]) for r in reports}
            g[k]["sign_stable"] = len(signs) == 1
            if not g[k]["sign_stable"]:
                vals = ", ".join(f"{r[group][k][SIGNED[group]]:+.3f}" for r in reports)
                unstable.append(f"{group} {k}: the sign of {SIGNED[group]} changes ({vals})")
        out[group] = g
        for m in RANKED[group]:
            if not keys or any(reports[0][group][k].get(m) is None for k in keys):
                continue
            per_run = [sorted(keys, key=lambda k, r=r: -r[group][k][m]) for r in reports]
            stable = all(p == per_run[0] for p in per_run)
            orders[f"{group}.{m}"] = {"per_run": per_run, "stable": stable}
            if not stable:
                seen = " | ".join(" > ".join(p) for p in per_run)
                unstable.append(f"{group} by {m}: the order changes between runs ({seen})")
    out["orders"] = orders
    out["unstable"] = unstable
    return out


def lines(c: dict[str, Any]) -> list[str]:
    """The combined report as printed lines: per type and extractor, mean [95 % interval]."""
    f = lambda s: f"{s['mean']:+.4f} [{s['ci_low']:+.4f}, {s['ci_high']:+.4f}]"
    out = [f"influence over {len(c['runs'])} runs (mean [95 % interval over runs]):"]
    if len(c["runs"]) < 4:  # the t quantile of 1 or 2 degrees of freedom is 12.7 or 4.3
        out.append(
            f"  ({len(c['runs'])} runs: the intervals are wide, t = "
            f"{t_quantile(len(c['runs']) - 1):.1f} standard errors each side; each is clipped "
            "to the values its figure can take)"
        )
    for t, v in c["behaviour_types"].items():
        gate = f" gate {f(v['gate'])}" if "gate" in v else ""
        out.append(
            f"  behaviour {t:>8}: total {f(v['influence'])} per event {f(v['per_event'])} "
            f"signed {f(v['signed'])}{gate} events/example {v['events_per_example']['mean']:.1f}"
            + ("" if v["sign_stable"] else "  [sign changes]")
        )
    for k, v in c["extractors"].items():
        w = f" weight {f(v['weight'])}" if "weight" in v else ""
        out.append(f"  extractor {k:>7}: share {f(v['share'])}{w}")
    for name, o in c["orders"].items():
        out.append(
            f"  order by {name}: "
            + (" > ".join(o["per_run"][0]) + " on every run" if o["stable"] else "CHANGES")
        )
    out += [f"  unstable: {u}" for u in c["unstable"]]
    return out


def plot(c: dict[str, Any]) -> bytes:
    """Per behaviour type: total and per-event influence and the signed effect, a bar at the
    mean over runs with its interval and a dot per run; flagged types are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from influence_jax.influence_plots import _png

    types = list(c["behaviour_types"])
    panels = (
        ("influence", "total: mean |logit change|"),
        ("per_event", "per event present"),
        ("signed", "signed: mean logit drop when removed\n(< 0: removing it raises the score)"),
    )
    fig, axes = plt.subplots(1, 3, figsize=(3 * (0.8 * len(types) + 2.0), 3.9))
    for ax, (m, label) in zip(axes, panels, strict=True):
        s = [c["behaviour_types"][t][m] for t in types]
        mean = np.array([x["mean"] for x in s])
        err = np.abs(np.array([[x["ci_low"], x["ci_high"]] for x in s]).T - mean)
        ax.bar(types, mean, yerr=np.nan_to_num(err), capsize=4, color="#4c72b0", alpha=0.8)
        for i, x in enumerate(s):
            ax.plot([i] * len(x["values"]), x["values"], "k.", ms=6)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(label, fontsize=9)
        order = c["orders"].get(f"behaviour_types.{m}")
        if order is not None and not order["stable"]:
            ax.set_xlabel("order changes between runs", color="#c44e52")
        if m == "signed":
            for i, t in enumerate(types):
                if not c["behaviour_types"][t]["sign_stable"]:
                    ax.annotate("sign changes", (i, 0), ha="center", color="#c44e52", fontsize=8)
    fig.suptitle(
        f"Behaviour-type influence over {len(c['runs'])} runs: mean, 95 % interval over runs, "
        "one dot per run",
        fontsize=10,
    )
    return _png(fig, plt)


def write(c: dict[str, Any], output: str) -> None:
    """OUTPUT/influence.json and OUTPUT/behaviour_influence_runs.png, atomically."""
    write_with_plot(c, output, "influence.json", "behaviour_influence_runs", plot(c))


def write_with_plot(result: dict[str, Any], output: str, name: str, plot_name: str, png: bytes):
    """OUTPUT/<plot_name>.png, then `result` (naming the plot under "plots") as OUTPUT/<name>,
    each written atomically."""
    os.makedirs(output, exist_ok=True)
    files.write_bytes(os.path.join(output, f"{plot_name}.png"), png)
    result["plots"] = {plot_name: f"{plot_name}.png"}
    files.write_json(os.path.join(output, name), result, sort_keys=False)
