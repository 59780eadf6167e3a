"""Synthetic conversion: view exposures that convert, with planted behaviour-type weights.

The default's synthetic world with `config.data.synthetic.task="conversion"`: every example is
a view (pv) of an item, labelled 1 when it converts (about 8 % do); the conversion logit holds
the planted per-type weights on history events of the target's category (see
influence_jax/data/synthetic.py). Run:

    python -m influence_jax.main --config=configs/synthetic_conversion.py --workdir=runs/conversion
"""

from configs import default as default_lib


def get_config():
    config = default_lib.get_config()
    syn = config.data.synthetic
    syn.task = "conversion"  # each example a view exposure; label = it converts
    syn.valid_examples = 20_000  # rows in the valid split (about 1,600 conversions)
    syn.test_examples = 20_000  # rows in the test split
    return config
