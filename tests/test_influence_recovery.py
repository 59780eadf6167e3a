"""Honest influence: the default model recovers the planted behaviour-type weights.

Trains configs/default.py (CPU-sized) on three data/init seeds and compares the learned
behaviour-type weights (normalised to sum 1) with the generator's planted ones.
"""

import json
import os

import numpy as np
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from configs import default
from influence_jax import train


def _kendall_tau(a, b):
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return s / (n * (n - 1) / 2)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_default_model_recovers_planted_behaviour_weights(tmp_path, seed):
    config = default.get_config()
    config.seed = config.data.synthetic.seed = seed
    config.loop.eval_every = 0
    config.loop.final_eval_split = ""
    workdir = str(tmp_path / "run")
    train.train_and_evaluate(config, workdir)

    with open(os.path.join(workdir, "planted.json")) as f:
        planted = json.load(f)["behaviour_type_weights_normalised"]
    acc = EventAccumulator(workdir, size_guidance={"scalars": 0})
    acc.Reload()
    learned = {t: acc.Scalars(f"influence/behaviour/{t}")[-1].value for t in planted}
    types = sorted(planted)
    tau = _kendall_tau([planted[t] for t in types], [learned[t] for t in types])
    assert tau == 1.0, (planted, learned)
    for t in types:
        assert learned[t] == pytest.approx(planted[t], rel=0.15), (t, planted, learned)
