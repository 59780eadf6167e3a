"""Baselines a model must beat, on the same rows: non-learned rules and a logistic regression on
counting features (influence_jax/baselines.py), scored on a split of a prepared dataset.

    python tools/baselines.py --data=.prepared/taobao --output=runs/taobao/baselines.json

Prints one line per baseline, best AUC first (AUC, GAUC, PR-AUC, logloss where the baseline is
a probability, positives); --output also writes them as JSON (atomically).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from influence_jax import baselines, cli, files  # noqa: E402
from influence_jax.data.dataset import Dataset  # noqa: E402
from influence_jax.errors import DataError  # noqa: E402

_DATA = flags.DEFINE_string("data", None, "Prepared dataset folder.")
_SPLIT = flags.DEFINE_string("split", "test", "Split to score: valid or test.")
_OUTPUT = flags.DEFINE_string("output", None, "Also write the table as JSON.")
_SEED = flags.DEFINE_integer("seed", 0, "Seed of the regression's training sample.")
flags.mark_flags_as_required(["data"])


def _baselines() -> None:
    if _OUTPUT.value:
        files.check_output(_OUTPUT.value, "output")
    dataset = Dataset(_DATA.value)
    if _SPLIT.value not in dataset.schema.splits or _SPLIT.value == "train":
        raise DataError(f"--split={_SPLIT.value}: choose one of the dataset's valid, test splits")
    rows = baselines.report(dataset, _SPLIT.value, _SEED.value)
    print(f"baselines on {_DATA.value} {_SPLIT.value}:")
    print(f"  {'baseline':<22}{'AUC':>8}{'GAUC':>8}{'PR-AUC':>8}{'logloss':>9}{'positives':>11}")
    for name, m in rows.items():
        ll = f"{m['logloss']:>9.4f}" if m["logloss"] == m["logloss"] else f"{'-':>9}"
        print(
            f"  {name:<22}{m['auc']:>8.4f}{m['gauc']:>8.4f}{m['pr_auc']:>8.4f}{ll}"
            f"{m['positives']:>6,}/{m['examples']:,}"
        )
    if _OUTPUT.value:
        table = [{"baseline": name, **m} for name, m in rows.items()]  # best AUC first
        files.write_json(_OUTPUT.value, {"data": _DATA.value, "split": _SPLIT.value, "rows": table})


if __name__ == "__main__":
    app.run(cli.tool_main(_baselines, "baselines"), flags_parser=cli.parse_flags)
