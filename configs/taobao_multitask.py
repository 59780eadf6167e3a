"""Taobao UserBehavior, multi-task conversion: will this page view turn into an add-to-cart, a
favourite, a purchase within 6 h? One ranker tower per head over shared embeddings.

Prepare (the conversion task with one label per head; the rows are those of
configs/taobao_conversion.py):

    python tools/prepare_data.py --source=taobao \
      --input=$INFLUENCE_JAX_DATA/taobao_userbehavior_sample/UserBehavior_head814users.csv \
      --output=.prepared/taobao_multitask --task=conversion --exposure=pv \
      --heads=cart,fav,buy --horizon_hours=6

Train, then report or rank by any head:

    python -m influence_jax.main --config=configs/taobao_multitask.py \
      --config.data.path=.prepared/taobao_multitask --workdir=runs/taobao_multitask
    python tools/influence_report.py --workdir=runs/taobao_multitask --step=best \
      --output=runs/taobao_multitask_cart --objective=cart

tools/multitask_compare.py sets each head against its single-task model on the same rows.
"""

from configs import taobao_conversion


def get_config():
    config = taobao_conversion.get_config()
    config.model.name = "multitask"  # a ranker tower per head over shared embeddings
    config.model.multitask.objective = "buy"  # early stopping, ranking and reports by default
    return config
