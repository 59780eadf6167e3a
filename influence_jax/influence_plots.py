"""The influence report's figures: behaviour-type and extractor bars with intervals, and the
faithfulness deletion curves, as PNG bytes (matplotlib, Agg backend)."""

from __future__ import annotations

import io
from typing import Any

import numpy as np


def plots(result: dict[str, Any]) -> dict[str, bytes]:
    """PNG bytes of: behaviour-type influence with intervals, extractor contributions, and the
    deletion curves of the faithfulness check."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def bars(stats: dict, signed: str, labels: tuple[str, str], title: str) -> bytes:
        """Two panels: magnitude (`influence`) and direction (`signed`), 95% intervals."""
        names = list(stats)
        fig, axes = plt.subplots(1, 2, figsize=(2 * (0.9 * len(names) + 2.2), 3.8))
        panels = (("influence", "", labels[0]), (signed, signed + "_", labels[1]))
        for ax, (key, ci, label) in zip(axes, panels, strict=True):
            v = np.array([stats[n][key] for n in names])
            lim = np.array([[stats[n][ci + "ci_low"], stats[n][ci + "ci_high"]] for n in names])
            ax.bar(names, v, yerr=np.abs(lim.T - v), capsize=5, color="#4c72b0")
            ax.axhline(0, color="black", lw=0.8)
            ax.set_ylabel(label)
        fig.suptitle(title)
        return _png(fig, plt)

    where = f"{result['split']} split, step {result['step']}, {result['examples']} examples"
    out = {
        "behaviour_influence": bars(
            result["behaviour_types"],
            "signed",
            ("mean |logit change| without the type", "mean logit drop without the type"),
            f"Behaviour-type influence, 95% bootstrap CI ({where})",
        )
    }
    if result["extractors"]:
        out["extractor_contributions"] = bars(
            result["extractors"],
            "contribution",
            ("mean |w_j f_j|", "mean w_j f_j"),
            f"Extractor contributions to the logit, 95% bootstrap CI ({where})",
        )
    f = result["faithfulness"]
    fig, ax = plt.subplots(figsize=(5, 3.6))
    if f["examples"]:
        ax.plot(f["k"], f["top_k_drop"], "o-", label="k most influential removed")
        ax.plot(f["k"], f["random_drop"], "s--", label="k random removed")
        ax.legend()
    ax.set(xlabel="k events removed", ylabel="mean logit drop", xticks=f["k"])
    ax.set_title(f"Deletion curves ({f['examples']} predictions)")
    out["deletion_curves"] = _png(fig, plt)
    return out


def _png(fig, plt) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()
