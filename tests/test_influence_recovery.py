"""Honest influence: the default model recovers the planted behaviour-type weights, and its
extractor weights follow the extractor that carries the signal.

Trains configs/default.py (the README's default run, one CPU device, in its own process) on
three data/init seeds and compares the learned behaviour-type weights (normalised to sum 1)
with the generator's planted ones; then trains on data with signals left out of the labels and
checks where the extractor weight goes. The same recovery holds on conversion data
(configs/synthetic_conversion.py: view exposures, about 8 % of which convert), and each
head of the multi-task model recovers its own. Eleven full trainings: the slow tier (`python -m
pytest -m slow`). CI runs seed 0 of each and leaves seeds 1 and 2 (marked `more_seeds`, 8 of
the tier's 23 minutes on a 2-core Zen 3) to the full tier: `python -m pytest -m "slow and not
more_seeds"` is CI's.
"""

import json

import numpy as np
import pytest

from tests import helpers

# Every recovery claim holds on three data/init seeds; CI trains the first.
SEEDS = [0, *(pytest.param(s, marks=pytest.mark.more_seeds) for s in (1, 2))]


def _kendall_tau(a, b):
    n, s = len(a), 0
    for i in range(n):
        for j in range(i + 1, n):
            s += np.sign(a[i] - a[j]) * np.sign(b[i] - b[j])
    return s / (n * (n - 1) / 2)


def _train(
    tmp_path,
    cache: str,
    seed: int,
    absent: tuple[str, ...] = (),
    config: str = "configs/default.py",
    final_eval_split: str = "",
):
    """Trains `config`; returns (workdir, learned weights by TensorBoard tag)."""
    workdir = tmp_path / "run"
    flags = [
        f"--config.seed={seed}",
        f"--config.data.synthetic.seed={seed}",
        "--config.loop.eval_every=0",
        f"--config.loop.final_eval_split={final_eval_split}",
    ]
    if absent:
        flags.append(f"--config.data.synthetic.signals_absent={absent!r}")
    out = helpers.run_main(workdir, *flags, cache=cache, devices=1, config=config, optimize=True)
    assert out.returncode == 0, out.log[-4000:]
    tags = helpers.scalars(workdir)
    prefix = "influence/"
    weights = {t[len(prefix) :]: v[-1][1] for t, v in tags.items() if t.startswith(prefix)}
    metrics = {t: v[-1][1] for t, v in tags.items() if t.startswith(f"{final_eval_split}/")}
    # The measured figures, shown by `python -m pytest -m slow -rP` (the README quotes them).
    print(f"{config} seed {seed} absent {list(absent)}:", json.dumps(weights, sort_keys=True))
    if final_eval_split:
        print(f"{config} seed {seed} {final_eval_split}/auc: {metrics[f'{final_eval_split}/auc']}")
    return workdir, weights


def _assert_recovered(workdir, weights) -> None:
    """Kendall tau = 1 and every learned normalised weight within 15 % of the planted one."""
    planted = json.loads((workdir / "planted.json").read_text())
    planted = planted["behaviour_type_weights_normalised"]
    learned = {t: weights[f"behaviour/{t}"] for t in planted}
    types = sorted(planted)
    tau = _kendall_tau([planted[t] for t in types], [learned[t] for t in types])
    assert tau == 1.0, (planted, learned)
    for t in types:
        assert learned[t] == pytest.approx(planted[t], rel=0.15), (t, planted, learned)


def _assert_counterfactual_recovered(workdir) -> None:
    """Adding one event of each type on the target item (counterfactual.py): the contrasts with
    the same event on another item follow the planted effects (history_scale * type weight)
    in order, and each type's share of their sum is within 20 % of the planted share."""
    from influence_jax import counterfactual, scoring

    run = scoring.load_run(str(workdir))
    store = run.dataset.examples("test")
    n = min(len(store), 2048)
    ex = store.gather(np.arange(n))
    gather = lambda r: {k: ex[k][r] for k in ("user", "item", "hist")}
    cf = counterfactual.counterfactual(run, gather, n, 200, np.random.default_rng(0))
    types = sorted(cf["types"])
    learned = {t: cf["types"][t]["contrast_logit"]["mean"] for t in types}
    planted = {t: cf["types"][t]["planted_contrast_logit"] for t in types}
    print(f"{workdir} counterfactual contrast (learned, planted):", learned, planted)
    tau = _kendall_tau([planted[t] for t in types], [learned[t] for t in types])
    assert tau == 1.0, (learned, planted)
    for t in types:
        share, want = learned[t] / sum(learned.values()), planted[t] / sum(planted.values())
        assert share == pytest.approx(want, rel=0.2), (t, learned, planted)


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_default_model_recovers_planted_behaviour_weights(tmp_path, jax_cache, seed):
    workdir, weights = _train(tmp_path, jax_cache, seed)
    _assert_recovered(workdir, weights)
    _assert_counterfactual_recovered(workdir)
    # The planted labels come mostly from history events matching the target: the target
    # attention extractor carries most of the weight (measured 0.71-0.73 on each seed).
    extractors = {k: v for k, v in weights.items() if k.startswith("extractor/")}
    assert max(extractors, key=extractors.get) == "extractor/din", extractors


@pytest.mark.slow
@pytest.mark.parametrize(
    "absent",
    [("history",), ("item", "user")],
    ids=["history_absent", "only_history"],
)
def test_extractor_weights_follow_the_signal(tmp_path, jax_cache, absent):
    """History left out of the labels: din (which reads only the history) ends lowest.
    Item and user signals left out: din, the extractor built for history, takes nearly all."""
    _, weights = _train(tmp_path, jax_cache, 0, absent)
    w = {k.removeprefix("extractor/"): v for k, v in weights.items() if k.startswith("extractor/")}
    assert set(w) == {"din", "dnn", "cnn"} and sum(w.values()) == pytest.approx(1.0, abs=1e-4)
    if absent == ("history",):
        # Measured (seeds 0, 1, 2): din 0.209 / 0.180 / 0.179, cnn 0.229 / 0.218 / 0.242,
        # dnn 0.562 / 0.602 / 0.579.
        assert min(w, key=w.get) == "din" and w["din"] < 0.3, w
        assert w["din"] < 0.5 * w["dnn"], w
        # din is not below 0.8x cnn here: the report says the weights cannot tell them apart.
        from influence_jax import influence

        sep = influence.extractor_separation(w)
        assert sep["separated"] == (w["din"] < influence.SEPARATION * w["cnn"]), sep
        assert sep["separated"] or "cannot tell din and cnn apart" in sep["verdict"], sep
    else:
        # Measured (seed 0): din 0.913, dnn 0.046, cnn 0.041.
        assert w["din"] > 0.8, w


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_recovery_holds_on_conversion_data(tmp_path, jax_cache, seed):
    """Exposures (views) labelled by planted conversions, about 8 % positive: the same model
    recovers the planted weights from the imbalanced labels (the test AUC is printed)."""
    workdir, weights = _train(
        tmp_path, jax_cache, seed, config="configs/synthetic_conversion.py", final_eval_split="test"
    )
    assert json.loads((workdir / "planted.json").read_text())["task"] == "conversion"
    # Measured (seeds 0 / 1 / 2): buy 0.473 / 0.476 / 0.478, cart 0.284 / 0.281 / 0.293,
    # fav 0.169 / 0.167 / 0.156, pv 0.074 / 0.075 / 0.073 (planted 0.476 / 0.286 / 0.167 / 0.071).
    _assert_recovered(workdir, weights)
    # Conversions come from history events matching the target (din: 0.84-0.88 on each seed).
    extractors = {k: v for k, v in weights.items() if k.startswith("extractor/")}
    assert max(extractors, key=extractors.get) == "extractor/din", extractors


@pytest.mark.slow
@pytest.mark.parametrize("seed", SEEDS)
def test_multitask_heads_recover_their_own_planted_weights(tmp_path, jax_cache, seed):
    """configs/multitask.py: three heads whose planted type orders differ; each head's learned
    gates recover its own planted weights (tau = 1, each within 15 %)."""
    workdir, weights = _train(tmp_path, jax_cache, seed, config="configs/multitask.py")
    planted = json.loads((workdir / "planted.json").read_text())["heads"]
    # Measured at 3,000 steps: the largest relative error over heads and types 7.8 % (seed 1)
    # and 12.2 % (seed 2, save's cart: 0.063 against 0.071).
    for head, p in planted.items():
        want = p["type_weight_normalised"]
        types = sorted(want)
        learned = {t: weights[f"{head}/behaviour/{t}"] for t in types}
        tau = _kendall_tau([want[t] for t in types], [learned[t] for t in types])
        assert tau == 1.0, (head, want, learned)
        for t in types:
            assert learned[t] == pytest.approx(want[t], rel=0.15), (head, t, want, learned)
