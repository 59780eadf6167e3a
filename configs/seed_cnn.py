"""The seed design alone (three CNN towers + MLP) on the built-in synthetic data: the baseline.

python -m influence_jax.main --config=configs/seed_cnn.py --workdir=runs/seed_cnn
"""

from configs import default as default_lib


def get_config():
    config = default_lib.get_config()
    config.model.name = "seed_cnn"
    return config
