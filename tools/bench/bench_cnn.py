"""The benchmark CNN: the seed model as users write it in Keras/PyTorch, for tools/benchmark.py.

Three towers over length-L id sequences (user, item, behaviour): Embedding -> Conv1D (VALID,
relu) -> MaxPool (window = stride = `pool`); concat -> flatten -> Dropout -> Dense relu ->
Dropout -> Dense 1. The references in tools/bench/bench_refs/ build exactly this model.

Each costly op has a straightforward formulation (flax's layers) and a faster one, chosen by the
fields below; all compute the same function with the same parameters (the fast hidden kernel stored
in its own layout: `keras_params`), so the benchmark can time either and the tests check that they
agree. Measured on a 2-core CPU (train step, batch 1024): flax's max_pool gradient
(select_and_scatter) -> a max of strided slices; threefry dropout masks -> one hash per element
(about 25 ms of CPU time per step -> 5; one murmur round per element instead of two: 1.03x / 1.04x
the step at batch 1024 / 4096 on the AMX Xeon of 2026-12-06, `hash_bits`); the gather, scatter-add
and convolution of the 10-id behaviour tower -> the kernel folded into its table (ConvPool), about
10 ms less per training step and 7% faster scoring, with that kernel's gradient as one matmul over
one-hots built transposed (`onehot_conv1d`; XLA convolves transposed copies); the hidden layer's
kernel stored [O, I], its columns in the order the towers flatten, so that its gradient g^T x is a
plain matmul in the kernel's own layout (`matmul_nt`): x^T g is a batch-contracting dot XLA leaves
to Eigen (about 2-7% of the step on the AVX-512 EPYC of 2026-12-05), and (g^T x)^T plus Keras' row
order cost a transpose and a permutation that XLA fused into each of Adam's reads (1.04-1.06x the
step at batch 1024, 1.01x at 4096, on the Zen 3 EPYC of 2026-12-06). Scoring from a checkpoint can
fold every tower (`fold_for_scoring`, `score_folded`): gathers of precomputed rows replace the user
and item convolutions, which ran at about 2/3 of XLA:CPU's matmul rate. The plain model folds in
scoring too, per call, each tower whose vocabulary is no larger than the batch's positions
(`fold_in_scoring`; the 10K-id user tower at batch 1024, the 100K-id item tower from batch 2048
on): on the AMX Xeon of 2026-12-05 1.10x (batch 1024) and 1.41x (4096) the plain model's scoring
rate without it. The pooled towers flatten tower by tower (`tower_major`), so that XLA fuses
pooling, flattening, dropout and the hidden layer's input cast into one pass instead of writing the
pooled towers and copying them into Keras' position-major concatenation (see docs/benchmarks.md).
Training gathers the user and item embeddings time-major (`time_major_gather`): 1.03x (batch 1024)
and 1.07-1.10x (4096) on the AMX Xeon's two cores (2026-12-06). On CPUs that multiply bfloat16
natively (AMX or AVX-512 BF16) the hidden layer multiplies bfloat16 operands into float32 results
(`bf16_hidden`, `bench_util.bf16_hidden_pays`) in training (`matmul_bf16`: the forward product and
both gradients) and in scoring (plain and folded); every other op, the parameters and the
optimizer stay float32.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

# (tower name, batch key, vocabulary field of BenchCNN)
TOWERS = (
    ("user", "user_ids", "user_vocab"),
    ("item", "item_ids", "item_vocab"),
    ("behaviour", "behaviour_ids", "behaviour_vocab"),
)


def max_pool_slices(x_BxTxC: jax.Array, window: int) -> jax.Array:
    """Max-pool over time (window = stride, trailing remainder dropped) as a max of slices.

    Equals `nn.max_pool(x, (window,), (window,))`, but its gradient is a few elementwise
    selects instead of XLA's select_and_scatter, which is slow on CPU and GPU.
    """
    T_out = x_BxTxC.shape[1] // window
    out = x_BxTxC[:, 0 : T_out * window : window]
    for k in range(1, window):
        out = jnp.maximum(out, x_BxTxC[:, k : T_out * window : window])
    return out


def conv1d(x_BxTxD: jax.Array, kernel_KxDxF: jax.Array) -> jax.Array:
    """VALID Conv1D of [B, T, D] inputs with a (K, D, F) kernel: XLA's convolution."""
    return jax.lax.conv_general_dilated(
        x_BxTxD, kernel_KxDxF, (1,), "VALID", dimension_numbers=("NWC", "WIO", "NWC")
    )


def folded_conv1d(Q_VxKF: jax.Array, ids_BxL: jax.Array, K: int) -> jax.Array:
    """`conv1d(table[ids], kernel)` from Q = table @ kernel stored as [V, K * F] (a row holds
    an id's contribution at each of the K kernel offsets): one gathered row per position (ids
    outside the table clip, as a gather of the table does), then K shifted slices summed."""
    F, T_out = Q_VxKF.shape[1] // K, ids_BxL.shape[1] - K + 1
    rows_BxLxKF = jnp.take(Q_VxKF, ids_BxL, axis=0, mode="clip")
    return sum(rows_BxLxKF[:, k : k + T_out, k * F : (k + 1) * F] for k in range(K))


@jax.custom_vjp
def onehot_conv1d(ids_BxL: jax.Array, P_KxVxF: jax.Array) -> jax.Array:
    """`conv1d(one_hot(ids, V), P)`, whose gradient dP is one [K * V, N] x [N, F] matmul.

    XLA computes the kernel gradient of a convolution as a convolution over transposed
    operands ([V, L, B] one-hots and [T, B, F] output gradients). Here the one-hots come out
    already transposed, [K * V, B * T] built from the ids, and the output gradient g [B * T, F]
    is used as it is: no transposes, one matmul for XLA's matmul library. Ids outside [0, V)
    are all-zero one-hots either way.
    """
    return conv1d(jax.nn.one_hot(ids_BxL, P_KxVxF.shape[1], dtype=P_KxVxF.dtype), P_KxVxF)


def _onehot_conv1d_fwd(ids_BxL, P_KxVxF):
    return onehot_conv1d(ids_BxL, P_KxVxF), (ids_BxL, P_KxVxF)  # P: its shape and dtype


def _onehot_conv1d_bwd(res, g_BxTxF):
    ids_BxL, P_KxVxF = res
    (K, V, F), dtype = P_KxVxF.shape, P_KxVxF.dtype
    B, T, _ = g_BxTxF.shape
    vocab_V1 = jnp.arange(V, dtype=ids_BxL.dtype)[:, None]
    onehots_KVxN = jnp.concatenate(
        [(ids_BxL[:, k : k + T].reshape(1, B * T) == vocab_V1).astype(dtype) for k in range(K)]
    )
    dP_KVxF = jnp.dot(onehots_KVxN, g_BxTxF.reshape(B * T, F).astype(dtype))
    ids_ct = np.zeros(ids_BxL.shape, jax.dtypes.float0)  # integer input: no cotangent
    return ids_ct, dP_KVxF.reshape(K, V, F)


onehot_conv1d.defvjp(_onehot_conv1d_fwd, _onehot_conv1d_bwd)


def conv1d_im2col(x_BxTxD: jax.Array, kernel_KxDxF: jax.Array) -> jax.Array:
    """`conv1d` as one [B*T, K*D] x [K*D, F] matmul over K shifted slices (im2col).

    Kept for comparison: on XLA:CPU (jax 0.10) the whole train step costs about 40% more CPU
    time than with XLA's convolution, mostly in building and transposing the columns.
    """
    K, D, F = kernel_KxDxF.shape
    T_out = x_BxTxD.shape[1] - K + 1
    cols_BxTxKD = jnp.concatenate([x_BxTxD[:, k : k + T_out] for k in range(K)], axis=-1)
    return jnp.dot(cols_BxTxKD, kernel_KxDxF.reshape(K * D, F))


def _hash32(x: jax.Array) -> jax.Array:
    """The murmur3 finaliser: a cheap bijective mix of uint32 counters (elementwise, fusible)."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def hash_bits(key: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """uint32 pseudo-random bits: a hash of each element's index, salted with the key's data.

    Counter-based like threefry but one murmur round per element instead of twenty rounds:
    plenty for dropout masks, and XLA fuses it into the consumer instead of writing the bits
    out. The key's two words are first mixed into two salts (scalars, once per call), so that
    keys which differ in one bit or by one still give unrelated masks.
    """
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        key = jax.random.key_data(key)
    k0, k1 = key.reshape(-1)[0].astype(jnp.uint32), key.reshape(-1)[-1].astype(jnp.uint32)
    salt0 = _hash32(_hash32(k1) ^ k0)
    salts = jnp.stack([salt0, _hash32(salt0 + jnp.uint32(0x9E3779B9))])
    # XLA would fuse this scalar work into every element's loop; a reduce (of the salts and a
    # row of zeros) is computed once, before it.
    salts = jax.lax.reduce(
        jnp.stack([salts, jnp.zeros_like(salts)]), jnp.uint32(0), jax.lax.bitwise_xor, (0,)
    )
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, axis) * jnp.uint32(stride)
        stride *= shape[axis]
    return _hash32((index ^ salts[0]) + salts[1])


@jax.custom_vjp
def matmul_nt(x_BxI: jax.Array, kernel_OxI: jax.Array) -> jax.Array:
    """`x @ kernel.T` for a kernel stored [O, I], whose kernel gradient g^T x is a plain matmul
    that comes out in the kernel's layout.

    With the kernel stored [I, O], as `nn.Dense` keeps it, that gradient is x^T g. Left alone,
    XLA:CPU (jax 0.10) hands that batch-contracting dot to Eigen instead of its faster matmul
    library, at about half the machine's matmul rate for the benchmark's hidden layer (1024 x
    4608 by 128); written as (g^T x)^T it runs as a row-major matmul, but XLA fuses the final
    transpose into each of its consumers (Adam's two moments and the gradient norm), each then a
    strided read of the [4608, 128] gradient. Stored [O, I], the gradient g^T x needs no
    transpose: an optimization barrier keeps g^T materialised (a small [O, B] copy), and the
    product is a row-major matmul XLA gives its matmul library (a `ynn_fusion`).
    """
    return x_BxI @ kernel_OxI.T


def _matmul_nt_fwd(x_BxI, kernel_OxI):
    return x_BxI @ kernel_OxI.T, (x_BxI, kernel_OxI)


def _matmul_nt_bwd(res, g_BxO):
    x_BxI, kernel_OxI = res
    g_OxB = jax.lax.optimization_barrier(g_BxO.T)  # materialised: a row-major operand
    return g_BxO @ kernel_OxI, g_OxB @ x_BxI


matmul_nt.defvjp(_matmul_nt_fwd, _matmul_nt_bwd)


def dot_operands(x: jax.Array, kernel: jax.Array, operands: Any) -> jax.Array:
    """`x @ kernel` with both operands cast to `operands` and the result in x's dtype: a large
    matmul with bfloat16 operands and a float32 result ran at 2.2x the float32 rate on the AMX
    Xeon (583 against 261 GFLOP/s, XLA:CPU, jax 0.10.2)."""
    return jnp.dot(x.astype(operands), kernel.astype(operands), preferred_element_type=x.dtype)


def transposed_copy(a_MxN: jax.Array) -> jax.Array:
    """`a.T` as a stack of slices along a's shorter axis: a row-major [N, M] array, not a
    transpose to XLA.

    XLA:CPU (jax 0.10.2) folds a transpose feeding a dot into the dot's dimension numbers, even
    through an optimization barrier or elementwise ops; the dot then has a column-major operand,
    which its matmul library (YNNPACK) refuses in bfloat16, and the compiler upcasts that dot to
    float32. A concatenation of slices keeps the dot row-major and in bfloat16. For the small
    operands it is used on ([B, 128] gradients, the [128, I] kernel) the copy is cheap.
    """
    M, N = a_MxN.shape
    if M < N:  # the rows side by side
        return jnp.stack([a_MxN[i] for i in range(M)], axis=1)
    return jnp.stack([a_MxN[:, j] for j in range(N)])


@jax.custom_vjp
def matmul_bf16(x_BxI: jax.Array, kernel_OxI: jax.Array) -> jax.Array:
    """`matmul_nt` with bfloat16 operands and a float32 result, whose gradients multiply
    bfloat16 operands into float32 results too: dx = g @ kernel, dkernel = g^T x.

    Each of the three products is a row-major bfloat16 matmul (`transposed_copy`), which
    XLA:CPU runs on AMX: on the AMX Xeon of 2026-12-05 the benchmark's hidden layer ([1024,
    4608] by 128, forward and backward with its relu) took 7.3 ms against 15.5 in float32.
    Scoring runs this forward alone, with the same row-major copy of the kernel.
    """
    return _matmul_bf16_fwd(x_BxI, kernel_OxI)[0]


def _matmul_bf16_fwd(x_BxI, kernel_OxI):
    x, kernel = x_BxI.astype(jnp.bfloat16), kernel_OxI.astype(jnp.bfloat16)
    out = jnp.dot(x, transposed_copy(kernel), preferred_element_type=x_BxI.dtype)
    return out, (x, kernel)


def _matmul_bf16_bwd(res, g_BxO):
    x_BxI, kernel_OxI = res
    g = g_BxO.astype(jnp.bfloat16)
    dkernel_OxI = jnp.dot(transposed_copy(g), x_BxI, preferred_element_type=g_BxO.dtype)
    dx_BxI = jnp.dot(g, kernel_OxI, preferred_element_type=g_BxO.dtype)
    return dx_BxI, dkernel_OxI


matmul_bf16.defvjp(_matmul_bf16_fwd, _matmul_bf16_bwd)


def flatten_towers(pooled: list[jax.Array], tower_major: bool) -> jax.Array:
    """The pooled towers [B, T', F] each as the hidden layer's input [B, towers * T' * F]:
    tower by tower (`BenchCNN.tower_major`) or position by position (Keras' Concatenate and
    Flatten)."""
    B = pooled[0].shape[0]
    if tower_major:
        return jnp.stack(pooled, axis=1).reshape(B, -1)
    return jnp.concatenate(pooled, axis=-1).reshape(B, -1)


def swap_row_blocks(kernel_IxO: jax.Array, A: int, C: int) -> jax.Array:
    """A kernel whose rows are in (a, c, rest) order, its rows put in (c, a, rest) order: Keras'
    position-major hidden kernel ([T', towers, F] rows) for tower-major inputs."""
    out = kernel_IxO.shape[-1]
    return kernel_IxO.reshape(A, C, -1, out).swapaxes(0, 1).reshape(-1, out)


class Dense(nn.Module):
    """`nn.Dense` (same initial distribution and dtype casts) through `matmul_nt`, its kernel
    stored [O, I] (`nn.Dense`'s transposed); with `bf16` through `matmul_bf16` (bfloat16
    operands, float32 results, gradients alike)."""

    features: int
    dtype: Any = jnp.float32
    bf16: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        init = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)
        kernel = self.param("kernel", init, (self.features, x.shape[-1]))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        matmul = matmul_bf16 if self.bf16 else matmul_nt
        return matmul(x, kernel) + bias.astype(self.dtype)


class Dropout(nn.Module):
    """Inverted dropout whose mask comes from `impl`: 'flax' (nn.Dropout), 'hash' or 'rbg'.

    'hash' draws one uint32 per element from `hash_bits` and keeps it when it is at least
    rate * 2**32; 'rbg' uses XLA's RngBitGenerator through jax.random's 'unsafe_rbg' keys.
    """

    rate: float
    impl: str = "hash"

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.impl == "flax":
            return nn.Dropout(self.rate, deterministic=not train)(x)
        if not train or self.rate == 0.0:
            return x
        key = self.make_rng("dropout")
        if self.impl == "hash":
            bits = hash_bits(key, x.shape)
        elif self.impl == "rbg":
            data = (
                jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
            )
            data = data.reshape(-1).astype(jnp.uint32)
            rbg = jax.random.wrap_key_data(jnp.tile(data, 4)[:4], impl="unsafe_rbg")
            bits = jax.random.bits(rbg, x.shape, jnp.uint32)
        else:
            raise ValueError(f"dropout impl {self.impl!r} is not 'flax', 'hash' or 'rbg'")
        threshold = jnp.uint32(min(round(self.rate * 2.0**32), 2**32 - 1))
        return jnp.where(bits >= threshold, x / jnp.asarray(1.0 - self.rate, x.dtype), 0)


class ConvPool(nn.Module):
    """Conv1D (VALID, relu) then max-pool, with flax's layers or the fast formulations.

    The fast path pools before adding the bias and applying relu: a per-channel bias and relu
    are monotone, so max(relu(a + b), relu(c + b)) = relu(max(a, c) + b), on half the elements.

    Called with the embedding table, x holds the ids [B, L] and the kernel is folded into the
    table, P = table @ kernel ([K, V, F]): conv(table[ids], kernel) = conv(one_hot(ids), P) in
    training (for a handful of ids this replaces the gather, its scatter-add gradient and a
    D-channel convolution with a V-channel one), and y[t] = sum_k P[k, ids[t + k]] in scoring,
    one gather of a [K * F] row per position from Q = P as [V, K * F], then K shifted slices.
    An id outside the table embeds as zeros in training and clips in scoring, where a gather of
    the table would clip it.
    """

    filters: int
    kernel_size: int
    pool: int
    conv_impl: str = "lax"  # 'lax' (XLA's convolution) | 'im2col'
    pool_impl: str = "slices"  # 'slices' (max of strided slices) | 'flax' (nn.max_pool)
    dtype: Any = jnp.float32  # compute dtype
    onehot_matmul_grad: bool = True  # folded towers: `onehot_conv1d`'s gradient

    @nn.compact
    def __call__(
        self, x: jax.Array, table_VxD: jax.Array | None = None, train: bool = False
    ) -> jax.Array:
        """x: the embedded sequence [B, L, D], or with `table_VxD` the ids [B, L]."""
        D = x.shape[-1] if table_VxD is None else table_VxD.shape[-1]
        kernel = self.param(
            "kernel", nn.initializers.lecun_normal(), (self.kernel_size, D, self.filters)
        )
        bias = self.param("bias", nn.initializers.zeros_init(), (self.filters,))
        bias = bias.astype(self.dtype)
        if table_VxD is None:
            y_BxTxF = self._conv(x, kernel.astype(self.dtype))
        else:
            V, K, F = table_VxD.shape[0], self.kernel_size, self.filters
            if train:
                P_KxVxF = jnp.einsum("vd,kdf->kvf", table_VxD, kernel).astype(self.dtype)
                if self.conv_impl == "lax" and self.onehot_matmul_grad:
                    y_BxTxF = onehot_conv1d(x, P_KxVxF)
                else:
                    y_BxTxF = self._conv(jax.nn.one_hot(x, V, dtype=self.dtype), P_KxVxF)
            else:
                Q_VxKF = jnp.einsum("vd,kdf->vkf", table_VxD, kernel).reshape(V, K * F)
                y_BxTxF = folded_conv1d(Q_VxKF.astype(self.dtype), x, K)
        if self.pool_impl == "slices":
            return nn.relu(max_pool_slices(y_BxTxF, self.pool) + bias)
        if self.pool_impl == "flax":
            return nn.max_pool(nn.relu(y_BxTxF + bias), (self.pool,), (self.pool,))
        raise ValueError(f"pool impl {self.pool_impl!r} is not 'slices' or 'flax'")

    def _conv(self, x_BxLxD: jax.Array, kernel_KxDxF: jax.Array) -> jax.Array:
        if self.conv_impl == "lax":
            return conv1d(x_BxLxD, kernel_KxDxF)
        if self.conv_impl == "im2col":
            return conv1d_im2col(x_BxLxD, kernel_KxDxF)
        raise ValueError(f"conv impl {self.conv_impl!r} is not 'lax' or 'im2col'")


def _uniform_init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
    """U(-0.05, 0.05), Keras' Embedding default."""
    return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


class BenchCNN(nn.Module):
    """The benchmark model; `__call__(batch, train)` returns `(logit_B, aux)` like the engine's.

    The batch holds `user_ids`, `item_ids`, `behaviour_ids` ([B, L] int32); training also reads
    `label` and `weight` ([B] float32). aux holds each tower's pooled output.
    """

    user_vocab: int = 10_000
    item_vocab: int = 100_000
    behaviour_vocab: int = 10
    embed_dim: int = 32
    filters: int = 64
    kernel_size: int = 3
    pool: int = 2
    hidden: int = 128
    dropout: float = 0.2
    conv_impl: str = "lax"  # see ConvPool
    pool_impl: str = "slices"  # see ConvPool
    dropout_impl: str = "hash"  # see Dropout
    # the hidden layer: 'nt' (Dense, matmul_nt: the kernel stored [O, I], in the order of its
    # input) | 'flax' (nn.Dense: [I, O], Keras' layout); `keras_params` converts
    dense_impl: str = "nt"
    fold_max_vocab: int = 64  # towers with at most this many ids: kernel folded into the table
    onehot_matmul_grad: bool = True  # the folded towers' kernel gradient: see onehot_conv1d
    # Scoring (train=False) also folds, per call, each tower whose vocabulary is no larger than
    # the batch's positions (B * L): folding costs V rows, the convolution B * L positions.
    fold_in_scoring: bool = True
    # The hidden layer multiplies bfloat16-cast operands into float32 results, in training
    # (`matmul_bf16`) and scoring: set where the CPU multiplies bfloat16 natively (AMX or
    # AVX-512 BF16: bench_util.bf16_hidden_pays).
    bf16_hidden: bool = False
    # Flatten the pooled towers tower by tower ([B, towers, T', F]) instead of position by
    # position ([B, T', towers * F], Keras' Concatenate + Flatten): XLA:CPU then fuses the
    # flattening into the pooling, bias, relu, dropout and cast instead of copying the pooled
    # towers into a concatenation. The hidden kernel's columns follow that order (Keras' rows
    # permuted: `keras_params`); dropout draws its mask in the flattened order.
    tower_major: bool = True
    # In training, gather the convolved towers' embeddings time-major ([L, B, D]) and copy them
    # batch-major for the convolution: XLA:CPU transposes the gathered rows to [D, L, B] for the
    # kernel gradient's convolution, and on two cores that transpose and the row copy together
    # ran faster than the one transpose from [B, L, D] (docs/benchmarks.md).
    time_major_gather: bool = True
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32

    @nn.compact
    def __call__(self, batch: dict[str, jax.Array], train: bool = False):
        pooled = {}
        for name, key, vocab_field in TOWERS:
            vocab, ids_BxL = getattr(self, vocab_field), batch[key]
            table = self.param(f"embed_{name}", _uniform_init, (vocab, self.embed_dim))
            fold_here = vocab <= self.fold_max_vocab or (
                not train and self.fold_in_scoring and vocab <= ids_BxL.size
            )
            if fold_here:
                x, fold = ids_BxL, table
            else:  # cast after the gather: its scatter-add gradient stays float32
                if train and self.time_major_gather:  # the same [B, L, D] values
                    x = jnp.take(table, ids_BxL.T, axis=0, mode="clip").swapaxes(0, 1)
                else:
                    x = jnp.take(table, ids_BxL, axis=0, mode="clip")
                x, fold = x.astype(self.dtype), None
            pooled[name] = ConvPool(
                self.filters,
                self.kernel_size,
                self.pool,
                self.conv_impl,
                self.pool_impl,
                self.dtype,
                self.onehot_matmul_grad,
                name=f"{name}_conv",
            )(x, fold, train)
        if self.tower_major and self.dense_impl != "nt":
            raise ValueError("tower_major needs dense_impl='nt' (a kernel in the input's order)")
        h_BxH = flatten_towers([pooled[n] for n, _, _ in TOWERS], self.tower_major)
        h_BxH = Dropout(self.dropout, self.dropout_impl)(h_BxH, train)
        if self.dense_impl == "nt":
            hidden = Dense(self.hidden, self.dtype, self.bf16_hidden, name="hidden")
        elif self.dense_impl == "flax":
            hidden = nn.Dense(self.hidden, dtype=self.dtype, name="hidden")
        else:
            raise ValueError(f"dense impl {self.dense_impl!r} is not 'nt' or 'flax'")
        h_BxH = nn.relu(hidden(h_BxH))
        h_BxH = Dropout(self.dropout, self.dropout_impl)(h_BxH, train)
        logit_B = nn.Dense(1, dtype=self.dtype, name="out")(h_BxH)[:, 0].astype(jnp.float32)
        return logit_B, {"pooled": pooled}


def fold_for_scoring(model: BenchCNN, params: Any) -> dict[str, Any]:
    """Scoring tables: every tower's Conv1D kernel folded into its embedding table, once.

    Without a gradient to keep, a tower's embedding gather and convolution are one lookup:
    conv(table[ids], kernel)[t] = sum_k Q[ids[t + k], k], with Q = table @ kernel stored as
    [V, K * F] (a row holds an id's contribution at each of the K kernel offsets). For the
    benchmark sizes Q is 7.7 MB (users) and 77 MB (items); one 768-byte row per position
    replaces a 128-byte gather and 6K multiply-adds. Compute it once per checkpoint
    (`jax.jit(functools.partial(fold_for_scoring, model))`) and score with `score_folded`.

    Returns:
      {"towers": {name: {"table": Q [V, K*F], "bias": [F]}}, "hidden": ..., "out": ...}: the
      dense layers' parameters, the hidden kernel [I, O] with its rows in the order the model
      flattens its towers (`score_folded`'s), cast once for a `bf16_hidden` one.
    """
    towers = {}
    for name, _, _ in TOWERS:
        table_VxD = params[f"embed_{name}"]
        kernel_KxDxF = params[f"{name}_conv"]["kernel"]
        Q_VxKxF = jnp.einsum("vd,kdf->vkf", table_VxD, kernel_KxDxF, precision="highest")
        towers[name] = {
            "table": Q_VxKxF.reshape(table_VxD.shape[0], -1).astype(model.dtype),
            "bias": params[f"{name}_conv"]["bias"].astype(model.dtype),
        }
    hidden = dict(params["hidden"])
    if model.dense_impl == "nt":  # stored [O, I], its columns in the flattening's order
        hidden["kernel"] = hidden["kernel"].T
    if model.bf16_hidden:  # cast once per checkpoint; score_folded keeps the dtype
        hidden["kernel"] = hidden["kernel"].astype(jnp.bfloat16)
    return {"towers": towers, "hidden": hidden, "out": params["out"]}


def _hidden_rows(model: BenchCNN, kernel_I: int) -> tuple[int, int]:
    """(positions, towers) of the hidden layer's input for `swap_row_blocks`."""
    return kernel_I // (len(TOWERS) * model.filters), len(TOWERS)


def keras_params(model: BenchCNN, params: Any) -> Any:
    """`model`'s parameters in the straightforward model's layout (`STRAIGHTFORWARD`, Keras'):
    the hidden kernel [I, O] with its rows position by position. The fast model stores it [O, I]
    with its columns in the order it flattens the towers (`Dense`, `tower_major`). Only the
    hidden kernel moves, so gradients convert alike; `model_params` is the inverse."""
    if model.dense_impl != "nt":
        return params
    kernel = params["hidden"]["kernel"].T
    if model.tower_major:  # rows (tower, position, F) -> (position, tower, F)
        positions, towers = _hidden_rows(model, kernel.shape[0])
        kernel = swap_row_blocks(kernel, towers, positions)
    return {**params, "hidden": {**params["hidden"], "kernel": kernel}}


def model_params(model: BenchCNN, params: Any) -> Any:
    """Parameters in Keras' layout (`keras_params`) in `model`'s."""
    if model.dense_impl != "nt":
        return params
    kernel = params["hidden"]["kernel"]
    if model.tower_major:
        kernel = swap_row_blocks(kernel, *_hidden_rows(model, kernel.shape[0]))
    return {**params, "hidden": {**params["hidden"], "kernel": kernel.T}}


def score_folded(model: BenchCNN, tables: dict[str, Any], batch: dict[str, jax.Array]):
    """`model.apply(params, batch, train=False)[0]`, the logits, from `fold_for_scoring` tables.

    Ids outside a table clip, as the plain scoring path's gathers do.
    """
    pooled = []
    for name, key, _ in TOWERS:
        t = tables["towers"][name]
        y_BxTxF = folded_conv1d(t["table"], batch[key], model.kernel_size)
        pooled.append(nn.relu(max_pool_slices(y_BxTxF, model.pool) + t["bias"]))
    h_BxH = flatten_towers(pooled, model.tower_major)
    dense = lambda p, x: jnp.dot(x, p["kernel"].astype(model.dtype)) + p["bias"].astype(model.dtype)
    hidden = tables["hidden"]
    if hidden["kernel"].dtype == jnp.bfloat16:  # fold_for_scoring of a bf16_hidden model
        h_BxH = dot_operands(h_BxH, hidden["kernel"], jnp.bfloat16) + hidden["bias"]
    else:
        h_BxH = dense(hidden, h_BxH)
    h_BxH = nn.relu(h_BxH)
    return dense(tables["out"], h_BxH)[:, 0].astype(jnp.float32)


STRAIGHTFORWARD = {
    "conv_impl": "lax",
    "pool_impl": "flax",
    "dropout_impl": "flax",
    "dense_impl": "flax",
    "fold_max_vocab": 0,
    "fold_in_scoring": False,
    "bf16_hidden": False,
    "tower_major": False,
    "time_major_gather": False,
}
