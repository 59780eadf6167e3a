"""Tiny config for CPU tests: small data, small model, a few steps.

python -m influence_jax.main --config=configs/tiny.py --workdir=/tmp/tiny
"""

from configs import default as default_lib


def get_config():
    config = default_lib.get_config()
    with config.unlocked():
        syn = config.data.synthetic
        syn.num_users, syn.num_items, syn.num_categories = 200, 500, 10
        syn.max_len, syn.min_len = 12, 2
        syn.train_examples, syn.valid_examples, syn.test_examples = 2_048, 512, 512
        syn.rows_per_shard = 1_000
        config.data.batch_size = 64
        config.data.eval_batch_size = 128
        config.model.embed_dim = 8
        config.model.seed_cnn.filters, config.model.seed_cnn.hidden = 8, 16
        config.opt.warmup_steps = 2
        config.loop.num_steps = 20
        config.loop.log_every = 5
        config.loop.eval_every = 10
        config.ckpt.every = 10
    return config
