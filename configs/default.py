"""Default config: the full ranker on built-in synthetic data with planted behaviour-type weights.

Run (well under 2 minutes on a 2-core CPU):

    python -m influence_jax.main --config=configs/default.py --workdir=runs/demo

Override any field on the command line, e.g. `--config.loop.num_steps=50`.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0  # parameter init and dropout seed

    config.data = data = ml_collections.ConfigDict()
    data.source = "synthetic"  # "synthetic" (generated into WORKDIR/data) or "prepared"
    data.path = ""  # prepared dataset folder (tools/prepare_data.py); unused for synthetic
    data.batch_size = 256  # global training batch, examples (split over all data-parallel devices)
    data.eval_batch_size = 1024  # global evaluation batch, examples
    data.shuffle_seed = 0  # order of training examples; part of the resumable data position
    data.prefetch = 4  # host batches prepared ahead of the train step
    data.num_threads = 2  # host threads assembling batches (Grain read threads)
    data.train_time_range = ()  # (start, end) unix s: train only on examples in [start, end)
    data.eval_time_range = ()  # (start, end) unix s: evaluate only examples in [start, end)
    data.drop_behaviours = ()  # behaviour types removed from every history (feature selection)

    data.synthetic = syn = ml_collections.ConfigDict()
    syn.seed = 0  # same seed, same data
    syn.task = "click"  # "click" (target_type buy) or "conversion" (view exposures that convert)
    syn.num_users = 5_000  # distinct users
    syn.num_items = 20_000  # distinct items
    syn.num_categories = 50  # item categories
    syn.max_len = 50  # history length L, events
    syn.min_len = 5  # shortest history, events
    syn.train_examples = 400_000  # rows in the train split (one pass over it by default)
    syn.valid_examples = 10_000  # rows in the valid split
    syn.test_examples = 10_000  # rows in the test split
    syn.type_weights = {"pv": 0.15, "cart": 0.6, "fav": 0.35, "buy": 1.0}  # planted influence
    syn.type_probs = {"pv": 0.55, "cart": 0.15, "fav": 0.15, "buy": 0.15}  # event type mix
    syn.history_scale = 1.0  # logit units per unit of weighted matching history
    syn.item_quality_scale = 0.5  # logit units per s.d. of item quality
    syn.user_scale = 0.3  # logit units per s.d. of user activity
    syn.bias = -1.5  # base logit (task "click")
    syn.conversion_bias = -3.5  # base logit of a conversion (task "conversion"; ~5-10 % positive)
    syn.repeat_view_prob = 0.3  # conversion: share of exposures with 1-3 earlier views of the item
    syn.recency_decay = 0.95  # per-position decay of an event's influence (most recent first)
    syn.signals_absent = ()  # any of "history", "item", "user": signals left out of the labels
    # Conversion only: head name -> {type: planted weight, ..., optional "bias"}; each head gets
    # its own label (the `labels` column, heads in name order; configs/multitask.py). {}: one.
    syn.heads = {}
    syn.rows_per_shard = 65_536  # rows per on-disk shard

    config.model = model = ml_collections.ConfigDict()
    model.name = "ranker"  # registry name: "ranker" (weighted extractors) or "seed_cnn"
    model.embed_dim = 16  # embedding width D per field
    model.share_item_embeddings = True  # history items use the target item's embedding table
    # Initial output bias: "zero", or "prior", the log-odds of the train split's positive rate
    # (the model starts calibrated; matters on rare labels such as conversions).
    model.output_bias = "zero"
    model.extractors = ("din", "dnn", "cnn")  # f_j combined as sum_j w_j f_j (ranker only)
    model.combine = "softmax"  # extractor weights: "softmax" (learned, sum to 1) or "sum"
    model.behaviour_gates = True  # learn one non-negative weight per behaviour type
    model.type_embedding = False  # extractors also read a type embedding (not only its gate)
    model.normalise_scores = True  # standardise each f_j (running stats) so w_j is comparable
    model.din = ml_collections.ConfigDict({"hidden": (32,)})  # target-attention MLP widths
    # Gated counts of history events matching the target (add "match" to extractors to use):
    # MLP widths, recency decays in history positions.
    model.match = ml_collections.ConfigDict({"hidden": (16,), "taus": (1.0, 4.0, 16.0)})
    model.dnn = ml_collections.ConfigDict({"hidden": (64, 32), "dropout": 0.2, "use_history": True})
    model.bst = ml_collections.ConfigDict(  # self-attention (add "bst" to extractors to use)
        {"heads": 2, "ff": 64, "hidden": (32,), "dropout": 0.1}
    )
    model.cnn = ml_collections.ConfigDict(
        {"filters": 32, "kernel_size": 3, "hidden": (64,), "dropout": 0.2}
    )
    # The label's smoothed train-split rate per user, item (and other user/item field) id,
    # leave-one-out in training (add "rates" to extractors to use; not with mixture "mmoe").
    model.rates = ml_collections.ConfigDict({"hidden": (16,)})  # MLP widths
    # Multi-task (model.name="multitask", a dataset with label heads): one ranker tower per head
    # over shared embeddings. objective: the head ranking and reports use ("": the last head);
    # chain: head -> parent, p(head) = p(parent) * tower (ESMM); loss_weights: head -> weight;
    # mixture: "towers" (a tower per head) or "mmoe" (`experts` shared towers, a gate per head).
    model.multitask = ml_collections.ConfigDict(
        {"objective": "", "chain": {}, "loss_weights": {}, "mixture": "towers", "experts": 3}
    )
    # The seed design (model.name="seed_cnn"): Conv1D output channels C per tower, Conv1D width
    # in positions, Dense(relu) width after the towers, dropout before and after that layer.
    model.seed_cnn = ml_collections.ConfigDict(
        {"filters": 32, "kernel_size": 3, "hidden": 128, "dropout": 0.2}
    )

    config.opt = opt = ml_collections.ConfigDict()
    opt.name = "adam"  # "adam" or "adamw"
    opt.learning_rate = 2e-3  # peak learning rate
    opt.warmup_steps = 50  # linear warm-up, steps
    opt.schedule = "cosine"  # "constant" or "cosine" decay after warm-up
    opt.weight_decay = 0.0  # decoupled weight decay (adamw only)
    opt.grad_clip = 1.0  # global gradient-norm clip; 0 disables
    opt.influence_lr_multiplier = 10.0  # learning-rate factor for gates and extractor logits
    opt.stats_rate = 0.02  # update rate of running statistics (EMA momentum 1 - rate)
    # Evaluation, checkpoint selection and ranking use an exponential moving average of the
    # parameters with this decay (bias-corrected; e.g. 0.99 averages over about the last 100
    # steps); 0 = the parameters as trained. Row-sparse tables are not averaged.
    opt.ema_decay = 0.0
    opt.sparse_embeddings = True  # row-sparse updates (row-wise Adagrad) for large tables
    opt.sparse_min_rows = 100_000  # tables with at least this many rows count as large
    opt.sparse_learning_rate = 0.05  # row-wise Adagrad learning rate of the large tables
    # The step's gradient in this many row blocks per device (engine.training_grads): 2 lets
    # XLA:CPU overlap the blocks' ops on a multi-core host, which pays from about 1024 rows a
    # device (docs/benchmarks.md); dropout draws and the ranker's batch statistics are then
    # per block.
    opt.grad_blocks = 1

    config.loop = loop = ml_collections.ConfigDict()
    loop.num_steps = 1_500  # training steps
    loop.log_every = 100  # steps between progress lines and train summaries
    loop.eval_every = 500  # steps between validation runs; 0 = only at the end
    loop.eval_split = "valid"  # split used during training
    loop.final_eval_split = "test"  # evaluated once at the end, on the best checkpoint ("" skips)
    loop.early_stop_metric = "auc"  # eval_split metric picking the best step and early stops
    loop.early_stop_mode = "auto"  # "max", "min" or "auto" (min for *loss*, max otherwise)
    loop.early_stop_patience = 0  # evaluations without improvement before stopping; 0 = never

    config.mesh = mesh = ml_collections.ConfigDict()
    mesh.data = -1  # devices on the data-parallel axis; -1 = all that remain
    mesh.model = 1  # devices on the model axis (rows of sharded embedding tables)
    mesh.shard_embeddings = False  # one switch: row-shard large embedding tables over `model`
    mesh.shard_min_rows = 100_000  # tables with at least this many rows count as large
    mesh.rules = ()  # extra ordered (param path regex, partition spec) rules; first match wins

    config.ckpt = ckpt = ml_collections.ConfigDict()
    ckpt.every = 500  # steps between checkpoints (also one at each evaluation and at the end)
    ckpt.max_to_keep = 3  # most recent checkpoints kept (plus the best); 0 = keep all
    ckpt.async_save = True  # write checkpoints in the background
    ckpt.keep_best = True  # keep the best step (best.json); the final eval uses it, else the last

    # Warm start (influence_jax/warm_start.py): a fresh run's first parameters from another
    # run's checkpoint, embedding rows matched by raw id (e.g. today's retrain on a log
    # prepared again, from yesterday's run); the optimizer and schedule start afresh.
    config.warm_start = ws = ml_collections.ConfigDict()
    ws.workdir = ""  # the source run's WORKDIR; "" = random initial parameters
    ws.step = "best"  # its checkpoint: "best", "latest" or a step number

    config.lock()
    return config
