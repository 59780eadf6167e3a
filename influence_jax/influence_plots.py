"""The influence report's figures: behaviour-type and extractor bars with intervals (beside the
learned type weights, and on synthetic data the planted ones), and the faithfulness deletion
curves, as matplotlib figures or PNG bytes (Agg backend).

Every "logit drop" is logit(x) - logit(x without the events), so it is signed: positive when
the removed events raise the score, negative when removing them raises it.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

SIGNED_DROP = "mean logit drop when removed\n(< 0: removing it raises the score)"
PLANTED = "planted"  # legend label of the generator's planted weights (synthetic data)
LEARNED = "learned g_t"  # legend label of the model's type gates


def plots(result: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of `figures(result)`, by name."""
    import matplotlib.pyplot as plt

    return {name: _png(fig, plt) for name, fig in figures(result).items()}


def figures(result: dict[str, Any]) -> dict[str, Any]:
    """Matplotlib figures of an influence report (`influence.report`'s dict), by name:
    behaviour_influence (|logit change| and signed drop per type with 95 % intervals, and the
    type weights g_t / sum g beside the planted ones where the report has them),
    extractor_contributions (|w_j z_j| and w_j z_j) and deletion_curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    where = f"{result['split']} split, step {result['step']}, {result['examples']} examples"
    types = result["behaviour_types"]
    out = {
        "behaviour_influence": _bars(
            plt,
            types,
            "signed",
            ("mean |logit change| when removed", SIGNED_DROP),
            f"Behaviour-type influence, 95% bootstrap CI ({where})",
            weights=_type_weights(types),
        )
    }
    if result["extractors"]:
        out["extractor_contributions"] = _bars(
            plt,
            result["extractors"],
            "contribution",
            ("mean |w_j z_j|", "mean w_j z_j (signed)"),
            f"Extractor contributions w_j z_j to the logit, 95% bootstrap CI ({where})",
        )
    f = result["faithfulness"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if f["examples"]:
        ax.plot(f["k"], f["top_k_drop"], "o-", label="k most influential removed")
        ax.plot(f["k"], f["random_drop"], "s--", label="k random removed")
        ax.legend()
    ax.axhline(0, color="black", lw=0.8)
    ax.set(xlabel="k events removed", ylabel=SIGNED_DROP, xticks=f["k"])
    ax.set_title(f"Deletion curves ({f['examples']} predictions)")
    out["deletion_curves"] = fig
    return out


def _type_weights(types: dict[str, dict]) -> dict[str, np.ndarray]:
    """{legend label: [T] weights summing to 1}: the learned gates g_t / sum g (where the model
    has gates) and the planted weights (where the report has them)."""
    out = {}
    gates = [v.get("gate_normalised") for v in types.values()]
    if types and all(g is not None for g in gates):
        out[LEARNED + " / sum g"] = np.array(gates, float)
    planted = [v.get("planted_weight") for v in types.values()]
    if types and all(p is not None for p in planted):
        out[PLANTED] = np.array(planted, float)
    return out


def _bars(plt, stats: dict, signed: str, labels: tuple[str, str], title: str, weights=None):
    """Two panels: magnitude (`influence`) and direction (`signed`), 95% intervals; with
    `weights` ({label: [N] values}), a third panel of grouped bars, one group per name."""
    names = list(stats)
    weights = weights or {}
    n_panels = 3 if weights else 2
    fig, axes = plt.subplots(1, n_panels, figsize=(n_panels * (0.9 * len(names) + 2.2), 3.8))
    panels = (("influence", "", labels[0]), (signed, signed + "_", labels[1]))
    for ax, (key, ci, label) in zip(axes, panels, strict=False):
        v = np.array([stats[n][key] for n in names])
        lim = np.array([[stats[n][ci + "ci_low"], stats[n][ci + "ci_high"]] for n in names])
        ax.bar(names, v, yerr=np.abs(lim.T - v), capsize=5, color="#4c72b0")
        ax.axhline(0, color="black", lw=0.8)
        ax.set_ylabel(label)
    if weights:
        ax, x = axes[2], np.arange(len(names))
        width = 0.8 / len(weights)
        colors = {PLANTED: "#dd8452"}
        for i, (label, w) in enumerate(weights.items()):
            at = x + (i - (len(weights) - 1) / 2) * width
            ax.bar(at, w, width, label=label, color=colors.get(label, "#4c72b0"))
        ax.set_xticks(x, names)
        ax.set_ylabel("type weight (normalised to sum 1)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    return fig


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
