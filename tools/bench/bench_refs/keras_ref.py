"""Reference: the benchmark CNN in Keras 3 on the TensorFlow backend, written as users write it.

python tools/bench/bench_refs/keras_ref.py --batches=1024,4096 [--json]

Training is `model.fit` over a repeating tf.data.Dataset of ready batches (one fit epoch per
timed run); scoring is the faster of `model.predict` on that dataset and a loop of
`model.predict_on_batch` on ready tensors (both reported). Keras' own defaults otherwise (on a
CPU-only machine that means TensorFlow graphs without XLA). Needs the `bench` extra.
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402

try:
    import keras  # noqa: E402
    import tensorflow as tf  # noqa: E402
except ImportError as e:
    common.missing_deps("Keras with TensorFlow", e)


def build_model(max_len: int, item_vocab: int, embed_dim: int) -> keras.Model:
    inputs, towers = [], []
    for key, vocab in zip(common.ID_KEYS, common.vocabs(item_vocab), strict=True):
        ids = keras.Input((max_len,), dtype="int32", name=key)
        x = keras.layers.Embedding(vocab, embed_dim)(ids)
        x = keras.layers.Conv1D(common.FILTERS, common.KERNEL_SIZE, activation="relu")(x)
        towers.append(keras.layers.MaxPooling1D(common.POOL)(x))
        inputs.append(ids)
    x = keras.layers.Flatten()(keras.layers.Concatenate()(towers))
    x = keras.layers.Dropout(common.DROPOUT)(x)
    x = keras.layers.Dense(common.HIDDEN, activation="relu")(x)
    x = keras.layers.Dropout(common.DROPOUT)(x)
    out = keras.layers.Dense(1, activation="sigmoid")(x)
    model = keras.Model(inputs, out)
    model.compile(optimizer=keras.optimizers.Adam(common.LEARNING_RATE), loss="binary_crossentropy")
    return model


class _EpochTimer(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.secs: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t0 = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.secs.append(time.perf_counter() - self._t0)


def dataset(batches: list[dict], with_labels: bool) -> tf.data.Dataset:
    """Ready batches, repeated forever: the input pipeline costs next to nothing."""
    x = {k: tf.constant([b[k] for b in batches]) for k in common.ID_KEYS}
    if not with_labels:
        return tf.data.Dataset.from_tensor_slices(x).repeat()
    y = tf.constant([b["label"] for b in batches])
    return tf.data.Dataset.from_tensor_slices((x, y)).repeat()


def bench(batch: int, args) -> dict:
    model = build_model(args.max_len, args.item_vocab, args.embed_dim)
    batches = common.make_batches(batch, args.max_len, args.item_vocab)
    train_ds, score_ds = dataset(batches, True), dataset(batches, False)
    model.fit(train_ds, steps_per_epoch=2, epochs=1, verbose=0, shuffle=False)  # warm-up
    t0 = time.perf_counter()
    model.fit(train_ds, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
    steps = max(2, round(args.seconds / ((time.perf_counter() - t0) / 3)))
    timer = _EpochTimer()
    model.fit(
        train_ds,
        steps_per_epoch=steps,
        epochs=args.repeats,
        verbose=0,
        shuffle=False,
        callbacks=[timer],
    )
    train = common.ex_per_s(batch, steps, timer.secs)

    ready = [{k: tf.constant(b[k]) for k in common.ID_KEYS} for b in batches]

    def on_batch(n: int) -> None:  # a loop of predict_on_batch on ready tensors
        for i in range(n):
            model.predict_on_batch(ready[i % len(ready)])

    paths = {
        "predict": lambda n: model.predict(score_ds, steps=n, verbose=0),
        "predict_on_batch": on_batch,
    }
    return {
        "impl": "keras-tensorflow",
        "batch": batch,
        "train_ex_per_s": train,
        "train_steps": steps,
        "train_secs": timer.secs,
        **common.best_scoring_path(paths, batch, args.seconds, args.repeats),
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
        "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
    }


def main() -> None:
    args = common.arg_parser(__doc__.splitlines()[0]).parse_args()
    for batch in args.batches:
        common.emit(bench(batch, args), args.json)


if __name__ == "__main__":
    main()
