"""Reference: the engine's ranker (influence_jax/models/ranker.py) in Keras 3 on TensorFlow.

python tools/bench/bench_refs/keras_ranker.py --spec=SPEC.json --data=BATCHES.npz [--check=P.npz]

`tools/benchmark.py --what=rank --compare` writes the spec (schema, sizes and extractor
settings of the JAX model), the batches and, for the check, the JAX parameters with the JAX
scores of a few examples; this process builds the same architecture, loads those parameters,
compares scores and times the faster of `model.predict` over a repeating tf.data.Dataset of
the batches and a loop of `model.predict_on_batch` on ready tensors, Keras' defaults otherwise
(on a CPU-only machine: TensorFlow graphs without XLA). Every registered extractor (din, dnn,
cnn, bst, match) has a Keras version. Needs the `bench` extra.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import common  # noqa: E402
import numpy as np  # noqa: E402

try:
    import keras  # noqa: E402
    import tensorflow as tf  # noqa: E402
    from keras import ops  # noqa: E402
except ImportError as e:
    common.missing_deps("Keras with TensorFlow", e)

NEG_INF = -1e9
_GATE_INIT = 0.5413  # softplus(0.5413) = 1, as the JAX ranker


def _mlp(prefix: str, hidden: list[int], out_bias: bool) -> list[keras.layers.Layer]:
    """Dense(relu) layers then one linear unit, named like the JAX MLP's parameters."""
    layers = [
        keras.layers.Dense(w, activation="relu", name=f"{prefix}__dense_{i}")
        for i, w in enumerate(hidden)
    ]
    return layers + [keras.layers.Dense(1, use_bias=out_bias, name=f"{prefix}__out")]


def _apply(layers: list[keras.layers.Layer], x):
    for layer in layers:
        x = layer(x)
    return x[..., 0]


class KerasRanker(keras.Model):
    """sum_j w_j f_j(x) + bias over din / dnn / cnn / bst / match with softplus behaviour-type
    gates."""

    def __init__(self, spec: dict, **kw):
        super().__init__(**kw)
        self.spec = s = spec
        D, L = s["embed_dim"], s["max_len"]
        unknown = [n for n in s["extractors"] if n not in ("din", "dnn", "cnn", "bst", "match")]
        if unknown or not s["share_item_embeddings"]:
            raise NotImplementedError(
                f"no Keras version of extractors {unknown} / unshared item tables"
            )
        b = s["behaviour_index"]
        skip = {s["hist_fields"][b]} if s["behaviour_gates"] and not s["type_embedding"] else set()
        self.kept = [j for j, v in enumerate(s["hist_fields"]) if not (skip and j == b)]
        item_vocabs = s["item_fields"]
        self.pairs = [
            (item_vocabs.index(s["hist_fields"][j]), k)
            for k, j in enumerate(self.kept)
            if s["hist_fields"][j] in item_vocabs
        ]
        init = keras.initializers.RandomNormal(stddev=0.05)
        self.tables = {
            v: keras.layers.Embedding(
                n, D, embeddings_initializer=init, name=f"embeddings__embed_{v}"
            )
            for v, n in s["vocab_sizes"].items()
            if v not in skip
        }
        if s["behaviour_gates"]:
            self.theta = self.add_weight(
                shape=(s["num_types"],),
                initializer=keras.initializers.Constant(_GATE_INIT),
                name="behaviour_type_logits",
            )
        args = s["extractor_args"]
        if "din" in s["extractors"]:
            self.position = self.add_weight(shape=(L, D), initializer=init, name="din__position")
            self.din_mlp = _mlp("din__attention", args["din"]["hidden"], s["out_bias"]["din"])
        if "dnn" in s["extractors"]:
            self.dnn_mlp = _mlp("dnn__mlp", args["dnn"]["hidden"], s["out_bias"]["dnn"])
        if "cnn" in s["extractors"]:
            c = args["cnn"]
            self.convs = {
                t: keras.layers.Conv1D(
                    c["filters"],
                    c["kernel_size"],
                    padding="same",
                    activation="relu",
                    name=f"cnn__{t}_tower__Conv_0",
                )
                for t in ("user", "item", "hist")
            }
            self.cnn_mlp = _mlp("cnn__mlp", c["hidden"], s["out_bias"]["cnn"])
        if "bst" in s["extractors"]:
            self._build_bst(args["bst"], L, D, init, s["out_bias"]["bst"])
        if "match" in s["extractors"]:
            m = args["match"]
            self.match_mlp = _mlp("match__mlp", m["hidden"], s["out_bias"]["match"])
            pos = np.arange(L, dtype=np.float32)[:, None]
            self.match_decay = np.exp(-pos / np.asarray(m["taus"], np.float32)[None, :])
        J = len(s["extractors"])
        zeros, ones = keras.initializers.Zeros(), keras.initializers.Ones()
        self.beta = self.add_weight(shape=(J,), initializer=zeros, name="extractor_logits")
        self.bias = self.add_weight(shape=(), initializer=zeros, name="bias")
        if s["normalise_scores"]:
            self.score_mean = self.add_weight(shape=(J,), initializer=zeros, name="score_mean")
            self.score_var = self.add_weight(shape=(J,), initializer=ones, name="score_var")
            self.score_log_scale = self.add_weight(
                shape=(), initializer=zeros, name="score_log_scale"
            )

    def _build_bst(self, a: dict, L: int, D: int, init, out_bias: bool) -> None:
        H = a["heads"]
        dense = lambda n, name: keras.layers.Dense(n, name=f"bst__{name}")
        self.bst = {n: dense(D, n) for n in ("event_proj", "target_proj", "att_out", "ff_out")}
        self.bst["ff_in"] = keras.layers.Dense(a["ff"], activation="relu", name="bst__ff_in")
        self.bst["qkv"] = keras.layers.EinsumDense(
            "btd,dkhe->btkhe", (None, 3, H, D // H), bias_axes="khe", name="bst__qkv"
        )
        for n in ("ln_att", "ln_ff"):  # flax's LayerNorm: epsilon 1e-6
            self.bst[n] = keras.layers.LayerNormalization(epsilon=1e-6, name=f"bst__{n}")
        self.bst_position = self.add_weight(
            shape=(L + 1, D), initializer=init, name="bst__position"
        )
        self.bst_mlp = _mlp("bst__mlp", a["hidden"], out_bias)
        self.bst_heads = H

    def _bst(self, hist_gated, item, mask):
        """One transformer block over [target; gated events], read at the target token."""
        b, B = self.bst, ops.shape(item)[0]
        L, D, H = self.spec["max_len"], self.spec["embed_dim"], self.bst_heads
        tok = ops.concatenate(
            [b["target_proj"](ops.reshape(item, (B, -1)))[:, None], b["event_proj"](hist_gated)],
            axis=1,
        )
        tok = tok + self.bst_position[None]
        key = ops.concatenate([ops.ones((B, 1), "bool"), mask], axis=1)
        qkv = b["qkv"](tok)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        logits = ops.einsum("bqhd,bkhd->bhqk", q, k) / float(np.sqrt(D // H))
        att = ops.softmax(ops.where(key[:, None, None, :], logits, NEG_INF), axis=-1)
        mixed = ops.reshape(ops.einsum("bhqk,bkhd->bqhd", att, v), (B, L + 1, D))
        h = b["ln_att"](tok + b["att_out"](mixed))
        h = b["ln_ff"](h + b["ff_out"](b["ff_in"](h)))
        m = ops.cast(mask, "float32")
        n = ops.maximum(ops.sum(m, axis=1, keepdims=True), 1.0)
        pooled = ops.einsum("bl,bld->bd", m, h[:, 1:]) / n
        return _apply(self.bst_mlp, ops.concatenate([h[:, 0], pooled], axis=-1))

    def _embed(self, ids, vocabs: list[str]):
        return ops.stack([self.tables[v](ids[..., j]) for j, v in enumerate(vocabs)], axis=-2)

    def call(self, inputs, training=False):
        s, r = self.spec, self.spec["reserved"]
        user_ids, item_ids, hist_ids = inputs["user"], inputs["item"], inputs["hist"]
        b = s["behaviour_index"]
        user = self._embed(user_ids, s["user_fields"])  # [B, Fu, D]
        item = self._embed(item_ids, s["item_fields"])  # [B, Fi, D]
        kept_ids = ops.stack([hist_ids[..., j] for j in self.kept], axis=-1)
        hist = self._embed(kept_ids, [s["hist_fields"][j] for j in self.kept])  # [B, L, E/D, D]
        mask = ops.not_equal(hist_ids[..., b], 0)
        if s["behaviour_gates"]:
            gates = ops.concatenate([ops.array([0.0, 1.0]), ops.softplus(self.theta)], axis=0)
        else:
            gates = ops.concatenate([ops.array([0.0, 1.0]), ops.ones((s["num_types"],))], axis=0)
        gate = ops.where(mask, ops.take(gates, hist_ids[..., b], axis=0), 0.0)
        target = sum(item[:, i] for i, _ in self.pairs)
        event = sum(hist[:, :, k] for _, k in self.pairs)
        match = ops.stack(
            [
                ops.logical_and(
                    ops.equal(kept_ids[..., k], item_ids[:, i : i + 1]),
                    ops.greater_equal(kept_ids[..., k], r),
                )
                for i, k in self.pairs
            ],
            axis=-1,
        )
        match = ops.cast(match, "float32")
        B, L = ops.shape(hist_ids)[0], s["max_len"]
        hist_flat = ops.reshape(hist, (B, L, len(self.kept) * s["embed_dim"]))
        hist_gated = hist_flat * gate[..., None]  # events scaled by their type's gate
        scores = []
        for name in s["extractors"]:
            if name == "din":
                q = ops.broadcast_to(target[:, None, :], ops.shape(event))
                pos = ops.broadcast_to(self.position[None], ops.shape(event))
                a = _apply(self.din_mlp, ops.concatenate([event * q, event, match, pos], axis=-1))
                scores.append(ops.sum(ops.where(mask, gate * a, 0.0), axis=1))
            elif name == "bst":
                scores.append(self._bst(hist_gated, item, mask))
            elif name == "match":
                scores.append(self._match(match, mask, gate))
            elif name == "dnn":
                n = ops.maximum(ops.sum(ops.cast(mask, "float32"), axis=1, keepdims=True), 1.0)
                pooled = ops.einsum("bl,ble->be", gate, hist_flat) / n
                h = ops.concatenate(
                    [ops.reshape(user, (B, -1)), ops.reshape(item, (B, -1)), pooled], axis=-1
                )
                scores.append(_apply(self.dnn_mlp, h))
            else:
                pooled = [
                    ops.max(self.convs["user"](user), axis=1),
                    ops.max(self.convs["item"](item), axis=1),
                    self._masked_max(
                        self.convs["hist"](ops.where(mask[..., None], hist_gated, 0.0)), mask
                    ),
                ]
                scores.append(_apply(self.cnn_mlp, ops.concatenate(pooled, axis=-1)))
        f = ops.stack(scores)  # [J, B]
        if s["normalise_scores"]:
            v = ops.maximum(self.score_var, 0.0)[:, None] + 1e-5
            f = ops.exp(self.score_log_scale) * (f - self.score_mean[:, None]) / ops.sqrt(v)
        w = ops.softmax(self.beta) if s["combine"] == "softmax" else ops.ones_like(self.beta)
        return ops.sigmoid(ops.sum(w[:, None] * f, axis=0) + self.bias)

    def _match(self, match, mask, gate):
        """Gated counts of target matches, overall and by recency decay, through an MLP."""
        B, L = ops.shape(match)[0], self.spec["max_len"]
        decayed = match[..., :, None] * self.match_decay[None, :, None, :]  # [B, L, K, T]
        phi = ops.concatenate([match, ops.reshape(decayed, (B, L, -1))], axis=-1)
        g = ops.where(mask, gate, 0.0)
        c = ops.concatenate(
            [ops.einsum("bl,blf->bf", g, phi), ops.sum(g, axis=1, keepdims=True)], axis=-1
        )
        return _apply(self.match_mlp, ops.log1p(c))

    @staticmethod
    def _masked_max(h, mask):
        pooled = ops.max(ops.where(mask[..., None], h, NEG_INF), axis=1)
        return ops.where(ops.any(mask, axis=1)[:, None], pooled, 0.0)


def load_jax_params(model: KerasRanker, flat: dict[str, np.ndarray]) -> int:
    """Assigns JAX parameters (npz keys: their '/'-joined paths) to the Keras variables.

    Keras names mirror the JAX paths with '__' for '/': `cnn__mlp__out/kernel` is
    `cnn/mlp/out/kernel`; an Embedding's `embeddings__embed_item_id/embeddings` is
    `embeddings/embed_item_id`. Every variable must find its parameter.
    """
    n = 0
    for var in model.weights:
        key = var.path.removeprefix(f"{model.name}/").replace("__", "/")
        key = key.removesuffix("/embeddings") if key.startswith("embeddings/") else key
        if "/ln_" in key:  # Keras LayerNormalization's gamma / beta: flax's scale / bias
            key = key.removesuffix("/gamma").removesuffix("/beta") + (
                "/scale" if var.path.endswith("gamma") else "/bias"
            )
        if key not in flat:
            raise KeyError(f"no JAX parameter {key!r} for Keras variable {var.path!r}")
        if tuple(flat[key].shape) != tuple(var.shape):
            raise ValueError(f"{key}: JAX shape {flat[key].shape} != Keras {var.shape}")
        var.assign(flat[key])
        n += 1
    return n


def main() -> None:
    p = common.arg_parser(__doc__.splitlines()[0])
    p.add_argument("--spec", required=True, help="JSON written by tools/bench_rank.py")
    p.add_argument("--data", required=True, help="npz of user, item, hist arrays")
    p.add_argument("--check", default="", help="npz of JAX params and scores to compare")
    p.add_argument(
        "--latency", action="store_true", help="time one request at a time (--batches: its rows)"
    )
    args = p.parse_args()
    with open(args.spec) as f:
        spec = json.load(f)
    data = np.load(args.data)
    model = KerasRanker(spec, name="keras_ranker")
    first = {k: data[k][:8] for k in ("user", "item", "hist")}
    model.predict(first, verbose=0)  # builds the weights
    extra = {"params": int(model.count_params())}
    if args.check:
        ref = np.load(args.check)
        flat = {k[len("param:") :]: ref[k] for k in ref.files if k.startswith("param:")}
        extra["params_loaded"] = load_jax_params(model, flat)
        rows = {k: ref[k] for k in ("user", "item", "hist")}
        got = model.predict(rows, verbose=0)
        extra["check_max_abs_diff"] = float(np.max(np.abs(got - ref["scores"])))
    for batch in args.batches:
        record = (latency if args.latency else bench)(model, data, batch, args) | extra
        if args.json:
            print(json.dumps(record), flush=True)
        else:
            rate = (
                f"p50 {record['p50_ms']:.2f} ms a request"
                if args.latency
                else f"{record['score_ex_per_s']:,.0f} ex/s"
            )
            print(f"keras ranker batch {batch}: {rate}", flush=True)


def bench(model: KerasRanker, data, batch: int, args) -> dict:
    """Scoring examples/s: the faster of `model.predict` over ready batches (one dataset element
    each) and a loop of `predict_on_batch` on ready tensors (common.best_scoring_path)."""
    n = common.NUM_DISTINCT_BATCHES
    x = {
        k: tf.constant(data[k][: n * batch].reshape(n, batch, *data[k].shape[1:]))
        for k in ("user", "item", "hist")
    }
    ds = tf.data.Dataset.from_tensor_slices(x).repeat()
    ready = [{k: v[i] for k, v in x.items()} for i in range(n)]

    def on_batch(steps: int) -> None:
        for i in range(steps):
            model.predict_on_batch(ready[i % n])

    paths = {
        "predict": lambda steps: model.predict(ds, steps=steps, verbose=0),
        "predict_on_batch": on_batch,
    }
    return {
        "impl": "keras-tensorflow",
        "batch": batch,
        **common.best_scoring_path(paths, batch, args.seconds, args.repeats),
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
        "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
    }


def latency(model: KerasRanker, data, batch: int, args) -> dict:
    """One online request of `batch` rows at a time, numpy in and out (common.request_latency):
    the faster of `predict_on_batch` and the model's call in a `tf.function` (a SavedModel
    signature's path)."""
    n = common.NUM_DISTINCT_BATCHES
    requests = [
        {k: data[k][i * batch : (i + 1) * batch] for k in ("user", "item", "hist")}
        for i in range(n)
    ]
    graph = tf.function(lambda x: model(x, training=False), reduce_retracing=True)
    paths = {
        "predict_on_batch": lambda r: np.asarray(model.predict_on_batch(r)),
        "tf_function": lambda r: graph({k: tf.convert_to_tensor(v) for k, v in r.items()}).numpy(),
    }
    return {
        "impl": "keras-tensorflow",
        "rows": batch,
        **common.request_latency(paths, requests, args.seconds, args.repeats),
        "versions": {"keras": keras.__version__, "tensorflow": tf.__version__},
        "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
    }


if __name__ == "__main__":
    main()
    sys.exit(0)
