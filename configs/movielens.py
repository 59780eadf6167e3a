"""MovieLens 100K: every rating is an example, label = rating >= 4, history = earlier ratings.

Prepare (behaviour types are the ratings r1..r5; user features age group, gender, occupation,
zip prefix; item category = first genre; no sampled negatives):

    python tools/prepare_data.py --source=movielens --input=$INFLUENCE_JAX_DATA/ml-100k \
      --output=.prepared/movielens --label_threshold=4 --neg_ratio=0 --max_len=50

Train:

    python -m influence_jax.main --config=configs/movielens.py \
      --config.data.path=.prepared/movielens --workdir=runs/movielens

About 81k train, 10k valid and 9k test examples (time split 80/10/10 of the time range). The
target_type column is the rating itself, so per-type metric slices hold one label each.
"""

from configs import default as default_lib


def get_config():
    config = default_lib.get_config()
    config.data.source = "prepared"
    config.data.path = ""  # set with --config.data.path=...
    config.data.batch_size = 512  # global training batch, examples
    config.data.eval_batch_size = 2048  # global evaluation batch, examples
    config.model.embed_dim = 16  # embedding width D per field
    # The behaviour type is the rating value (r1..r5): extractors need to read it, not only
    # its gate, to learn what a user's past ratings say about the next one.
    config.model.type_embedding = True
    # + gated exact-match counts. Without "rates" (the label's train rates per id): mean best
    # validation AUC over seeds 0-2 (2026-12-07) 0.7461 without, 0.7458 with.
    config.model.extractors = ("din", "dnn", "cnn", "match")
    config.model.output_bias = "prior"  # start at the train split's log-odds
    config.opt.learning_rate = 1e-3  # peak learning rate
    config.loop.num_steps = 500  # about 3 epochs of the train split (more overfits)
    config.loop.log_every = 100  # steps between progress lines
    config.loop.eval_every = 100  # steps between validation runs (the best one is kept)
    config.ckpt.every = 100  # steps between checkpoints
    return config
