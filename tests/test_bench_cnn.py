"""The benchmark model (tools/benchmark.py): shapes, and that its fast formulations compute the
same function as flax's layers. Correctness only; timing lives in the benchmark."""

import os
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests import helpers

bench_cnn = helpers.bench_module("bench_cnn")
STRAIGHTFORWARD, BenchCNN = bench_cnn.STRAIGHTFORWARD, bench_cnn.BenchCNN

SMALL = dict(user_vocab=50, item_vocab=300, behaviour_vocab=6, embed_dim=8, filters=16, hidden=32)


def _batch(B=8, L=12, seed=0, **vocabs):
    rng = np.random.default_rng(seed)
    sizes = {**{k: SMALL[k] for k in ("user_vocab", "item_vocab", "behaviour_vocab")}, **vocabs}
    batch = {
        key: rng.integers(0, sizes[field], (B, L), dtype=np.int32)
        for _, key, field in bench_cnn.TOWERS
    }
    batch["label"] = rng.integers(0, 2, (B,)).astype(np.float32)
    batch["weight"] = np.ones((B,), np.float32)
    return batch


@pytest.mark.parametrize("window,T", [(2, 12), (2, 13), (3, 13)])
def test_strided_slice_pool_equals_flax_max_pool(window, T):
    x = np.random.default_rng(T).normal(size=(4, T, 5)).astype(np.float32)
    want = nn.max_pool(x, (window,), (window,))
    np.testing.assert_array_equal(bench_cnn.max_pool_slices(x, window), want)
    # and its gradient: all to the larger element of each window, as select_and_scatter does
    grad = jax.grad(lambda x: jnp.sum(bench_cnn.max_pool_slices(x, window) ** 2))(x)
    want_grad = jax.grad(lambda x: jnp.sum(nn.max_pool(x, (window,), (window,)) ** 2))(x)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6)


def test_im2col_conv_equals_lax_conv():
    kx, kw = jax.random.split(jax.random.PRNGKey(0))
    x = jax.random.normal(kx, (3, 10, 4))
    w = jax.random.normal(kw, (3, 4, 6))
    np.testing.assert_allclose(
        bench_cnn.conv1d_im2col(x, w), bench_cnn.conv1d(x, w), rtol=1e-5, atol=1e-5
    )


def test_matmul_nt_has_the_gradients_of_a_plain_matmul():
    """The hidden layer's matmul_nt (kernel stored [O, I]) has the gradients of x @ w.T; Dense
    is nn.Dense with the kernel transposed: same names, initial distribution and output."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(3), 3)
    x, w = jax.random.normal(kx, (16, 24)), jax.random.normal(kw, (5, 24))
    g = jax.random.normal(kg, (16, 5))
    got = jax.vjp(bench_cnn.matmul_nt, x, w)[1](g)
    want = jax.vjp(lambda x, w: x @ w.T, x, w)[1](g)
    assert got[1].shape == w.shape
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    x = jax.random.normal(kx, (16, 400))
    mine, flax_dense = bench_cnn.Dense(300), nn.Dense(300)
    p_mine = mine.init(jax.random.PRNGKey(0), x)["params"]
    p_flax = flax_dense.init(jax.random.PRNGKey(0), x)["params"]
    assert p_mine["kernel"].shape == (300, 400) and p_flax["kernel"].shape == (400, 300)
    # the same fan-in (lecun_normal over the 400 inputs), so the same spread
    np.testing.assert_allclose(np.std(p_mine["kernel"]), np.std(p_flax["kernel"]), rtol=0.02)
    np.testing.assert_array_equal(p_mine["bias"], p_flax["bias"])
    p_flax = jax.tree_util.tree_map(lambda a: a + 0.1, p_flax)  # a bias that is not zero
    p_mine = {"kernel": p_flax["kernel"].T, "bias": p_flax["bias"]}
    np.testing.assert_allclose(
        mine.apply({"params": p_mine}, x), flax_dense.apply({"params": p_flax}, x), rtol=1e-5
    )


@pytest.fixture(scope="module")
def params():
    """The straightforward model's parameters (Keras' layout); `_fast` puts them in a fast
    model's (the hidden kernel stored [O, I], its columns tower by tower)."""
    model = BenchCNN(**SMALL, **STRAIGHTFORWARD)
    return jax.jit(model.init)(jax.random.PRNGKey(0), _batch())["params"]


def _fast(model, params):
    return bench_cnn.model_params(model, params)


def test_model_shapes_and_valid_conv_pool_width(params):
    model = BenchCNN(**SMALL)
    logit, aux = jax.jit(model.apply)({"params": _fast(model, params)}, _batch(B=8, L=12))
    assert logit.shape == (8,) and logit.dtype == jnp.float32
    for name, _, _ in bench_cnn.TOWERS:
        # VALID conv: 12 - 3 + 1 = 10 positions, pooled by 2 -> 5.
        assert aux["pooled"][name].shape == (8, 5, SMALL["filters"])
    assert params["hidden"]["kernel"].shape == (3 * 5 * SMALL["filters"], SMALL["hidden"])
    assert params["embed_item"].shape == (SMALL["item_vocab"], SMALL["embed_dim"])
    own = jax.jit(model.init)(jax.random.PRNGKey(0), _batch())["params"]
    assert own["hidden"]["kernel"].shape == (SMALL["hidden"], 3 * 5 * SMALL["filters"])
    assert jax.tree_util.tree_structure(own) == jax.tree_util.tree_structure(params)


def test_keras_layout_round_trips_and_orders_the_rows_by_position(params):
    """keras_params inverts model_params; the fast kernel's column for (tower c, position a,
    filter f) is Keras' row for (a, c, f)."""
    model = BenchCNN(**SMALL)
    fast = _fast(model, params)
    back = bench_cnn.keras_params(model, fast)
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, params)
    A, C, F = 5, len(bench_cnn.TOWERS), SMALL["filters"]
    keras_k, fast_k = np.asarray(params["hidden"]["kernel"]), np.asarray(fast["hidden"]["kernel"])
    for a, c, f in ((0, 0, 0), (1, 0, 3), (0, 2, 5), (4, 1, F - 1)):
        np.testing.assert_array_equal(
            fast_k[:, c * A * F + a * F + f], keras_k[a * C * F + c * F + f]
        )
    flat = BenchCNN(**SMALL, tower_major=False)  # position-major input: only transposed
    np.testing.assert_array_equal(
        bench_cnn.model_params(flat, params)["hidden"]["kernel"], keras_k.T
    )


@pytest.mark.parametrize("train", [False, True])
def test_fast_and_straightforward_formulations_agree(params, train):
    """Scoring folds the behaviour kernel into a gathered table, training convolves one-hot ids;
    both must equal flax's layers on the gathered embeddings (dropout off to compare)."""
    batch = _batch(seed=1)

    def logits(**variant):
        model = BenchCNN(**SMALL, dropout=0.0, **variant)
        apply = lambda p: model.apply({"params": p}, batch, train=train)[0]
        return jax.jit(apply)(_fast(model, params))

    want = logits(**STRAIGHTFORWARD)
    for variant in ({}, {"conv_impl": "im2col"}):
        np.testing.assert_allclose(logits(**variant), want, rtol=1e-4, atol=1e-5)


def test_fast_and_straightforward_gradients_agree(params):
    """The training gradients of the fast formulations (matmul_nt's kernel gradient, the folded
    behaviour tower, the pooling) equal flax's layers' (dropout off to compare), the fast
    model's in its own layout brought to Keras' (`keras_params`)."""
    batch = _batch(seed=4)

    def grads(**variant):
        model = BenchCNN(**SMALL, dropout=0.0, **variant)
        loss = lambda p: jnp.sum(model.apply({"params": p}, batch, train=True)[0] ** 2)
        return bench_cnn.keras_params(model, jax.jit(jax.grad(loss))(_fast(model, params)))

    want, got = grads(**STRAIGHTFORWARD), grads()
    helpers.assert_trees_close(got, want, rtol=1e-4, atol=1e-5)


def test_hash_dropout_keeps_the_rate_and_scales():
    drop = bench_cnn.Dropout(0.2, "hash")
    x = jnp.ones((256, 512))
    apply = jax.jit(lambda key: drop.apply({}, x, True, rngs={"dropout": key}))
    a, b = apply(jax.random.PRNGKey(0)), apply(jax.random.PRNGKey(1))
    kept = np.asarray(a) > 0
    assert abs(kept.mean() - 0.8) < 0.01
    np.testing.assert_allclose(np.asarray(a)[kept], 1 / 0.8, rtol=1e-6)
    assert (kept != (np.asarray(b) > 0)).mean() > 0.2  # another key, another mask
    np.testing.assert_array_equal(drop.apply({}, x, False), x)


def test_hash_dropout_masks_are_unrelated():
    """Neighbouring elements, and each element under keys that differ by one, draw unrelated
    masks: a hash of the index alone, or the key's words used as plain offsets of it, fail."""
    keep = lambda key: np.asarray(bench_cnn.hash_bits(key, (512, 1024))) >= round(0.2 * 2**32)
    corr = lambda a, b: np.corrcoef(a.ravel(), b.ravel())[0, 1]
    a, b = keep(jax.random.PRNGKey(0)), keep(jax.random.PRNGKey(1))
    assert abs(a.mean() - 0.8) < 0.005
    assert abs(corr(a[:, 1:], a[:, :-1])) < 0.01  # along a row
    assert abs(corr(a[1:], a[:-1])) < 0.01  # along a column
    a, b = a.ravel(), b.ravel()
    for shift in (0, 1, 2):  # the other key's mask is no shifted copy either
        assert abs(corr(a[shift:], b[: b.size - shift])) < 0.01
        assert abs(corr(b[shift:], a[: a.size - shift])) < 0.01


def test_hash_bits_mixes_the_key_once_not_in_every_elements_loop():
    """XLA:CPU fuses scalar work into each element's loop: the salts' three murmur rounds must
    stay out of the fusion that hashes the elements (one round, two multiplies, plus the index's
    strides)."""
    hash_bits = jax.jit(lambda key: bench_cnn.hash_bits(key, (64, 96)))
    hlo = hash_bits.lower(jax.random.PRNGKey(0)).compile().as_text()
    computations = re.split(r"\n(?=%?\S+ \([^)]*\) -> )", hlo)
    per_element = [c for c in computations if "-> u32[64,96]" in c.split("\n")[0]]
    assert per_element, hlo
    assert max(c.count(" multiply(") for c in per_element) <= 3, hlo


def test_folded_scoring_equals_the_model(params):
    """Every tower's kernel folded into its table (a checkpoint's scoring tables) scores the
    same logits as the plain model, ids past the end of a table included (both clip)."""
    model = BenchCNN(**SMALL)
    params = jax.tree_util.tree_map(lambda x: x + 0.01 * (x.ndim == 1), params)  # biases != 0
    params = _fast(model, params)
    batch = {k: v for k, v in _batch(seed=2).items() if k.endswith("_ids")}
    batch["item_ids"][0, :3] = SMALL["item_vocab"] + 5
    want = jax.jit(lambda p: model.apply({"params": p}, batch)[0])(params)
    tables = jax.jit(lambda p: bench_cnn.fold_for_scoring(model, p))(params)
    assert tables["towers"]["item"]["table"].shape == (SMALL["item_vocab"], 3 * SMALL["filters"])
    got = jax.jit(lambda t: bench_cnn.score_folded(model, t, batch))(tables)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _rounded(a):
    return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


def test_matmul_bf16_rounds_the_operands_of_all_three_products():
    """matmul_bf16: the product and both gradients multiply bfloat16-rounded operands (x and
    the kernel; g in the gradients) into float32 results: equal to float64 products of the
    rounded operands, and off from the float32 products by more than float32 rounding."""
    kx, kw, kg = jax.random.split(jax.random.PRNGKey(5), 3)
    x, w = jax.random.normal(kx, (64, 48)), jax.random.normal(kw, (24, 48))  # w stored [O, I]
    g = jax.random.normal(kg, (64, 24))
    y, vjp = jax.jit(lambda x, w: jax.vjp(bench_cnn.matmul_bf16, x, w))(x, w)
    dx, dw = vjp(g)
    assert y.dtype == dx.dtype == dw.dtype == jnp.float32 and dw.shape == w.shape
    xr, wr, gr = _rounded(x), _rounded(w), _rounded(g)
    for got, want, exact in (
        (y, xr @ wr.T, np.asarray(x, np.float64) @ np.asarray(w, np.float64).T),
        (dx, gr @ wr, np.asarray(g, np.float64) @ np.asarray(w, np.float64)),
        (dw, gr.T @ xr, np.asarray(g, np.float64).T @ np.asarray(x, np.float64)),
    ):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)
        assert np.max(np.abs(np.asarray(got) - exact)) > 1e-2  # the rounding shows


def test_matmul_bf16_gradients_stay_bfloat16_in_the_compiled_step():
    """XLA:CPU upcasts a bfloat16 dot to float32 where its matmul library refuses it (a
    column-major operand, from a transpose folded into the dot): every dot of matmul_bf16's
    forward and backward, and of its forward alone (scoring), must keep bfloat16 operands
    after compilation."""
    x, w = jnp.ones((256, 192)), jnp.ones((32, 192))

    def dot_operand_dtypes(f):
        hlo = jax.jit(f).lower(x, w).compile().as_text()
        dtype_of = dict(re.findall(r"^\s*(?:ROOT )?(%[\w.\-]+) = (\w+)\[", hlo, re.M))
        dots = re.findall(r" dot\((%[\w.\-]+), (%[\w.\-]+)\)", hlo)
        return [(dtype_of[a], dtype_of[b]) for a, b in dots], hlo

    loss = lambda x, w: jnp.sum(jnp.maximum(bench_cnn.matmul_bf16(x, w), 0) ** 2)
    dtypes, hlo = dot_operand_dtypes(jax.grad(loss, argnums=(0, 1)))
    assert dtypes == [("bf16", "bf16")] * 3, hlo
    dtypes, hlo = dot_operand_dtypes(bench_cnn.matmul_bf16)  # the custom_vjp's primal
    assert dtypes == [("bf16", "bf16")], hlo


def test_bf16_hidden_layer_in_training_and_scoring(params):
    """bf16_hidden: the hidden layer multiplies bfloat16 operands into float32 results, in
    scoring (plain and folded, which agree) and training: logits and gradients close to
    float32's but not equal."""
    batch = _batch(seed=4)
    ids = {k: v for k, v in batch.items() if k.endswith("_ids")}
    f32, bf16 = BenchCNN(**SMALL), BenchCNN(**SMALL, bf16_hidden=True)
    params = _fast(f32, params)  # the same layout for both
    score = lambda m: jax.jit(lambda p: m.apply({"params": p}, ids)[0])
    want, got = score(f32)(params), score(bf16)(params)
    assert "bf16" in str(jax.make_jaxpr(lambda p: bf16.apply({"params": p}, ids)[0])(params))
    assert not np.array_equal(got, want)  # the operands were rounded
    np.testing.assert_allclose(got, want, atol=2e-2 * float(np.std(want)) + 1e-4)
    tables = jax.jit(lambda p: bench_cnn.fold_for_scoring(bf16, p))(params)
    assert tables["hidden"]["kernel"].dtype == jnp.bfloat16
    folded = jax.jit(lambda t: bench_cnn.score_folded(bf16, t, ids))(tables)
    np.testing.assert_allclose(folded, got, rtol=1e-5, atol=1e-6)

    def grads(m):  # without dropout: some draws leave a hidden unit at 0 within bf16's rounding
        m = m.clone(dropout=0.0)  # (its relu then flips, and the gradients differ by more)
        loss = lambda p: jnp.sum(m.apply({"params": p}, batch, train=True)[0])
        return jax.jit(jax.grad(loss))(params)

    g32, g16 = grads(f32), grads(bf16)
    for name in ("hidden", "item_conv"):  # the layer's kernel, and one below it
        assert not np.array_equal(g16[name]["kernel"], g32[name]["kernel"])

    def close(path, a, b):
        tol = 2e-2 * float(np.max(np.abs(b))) + 1e-6
        np.testing.assert_allclose(a, b, atol=tol, err_msg=jax.tree_util.keystr(path))

    jax.tree_util.tree_map_with_path(close, g16, g32)


def test_bf16_hidden_only_where_the_cpu_multiplies_bfloat16():
    amx = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile amx_bf16\n"
    bench_util = helpers.bench_module("bench_util")
    assert bench_util.bf16_hidden_pays(amx)
    assert bench_util.bf16_hidden_pays("flags\t\t: fpu avx2 avx512f avx512_bf16\n")  # Zen 4
    assert not bench_util.bf16_hidden_pays("flags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert not bench_util.bf16_hidden_pays("model name\t: no flags line\n")


def test_references_run_with_the_engines_allocator_settings(tmp_path):
    """benchmark.py's references get the glibc settings the engine gives itself
    (hostmem.ENV), so the comparison is like for like; each row says so."""
    from influence_jax import hostmem

    bench_util = helpers.bench_module("bench_util")
    script = tmp_path / "ref.py"
    keys = sorted(hostmem.ENV)
    script.write_text(
        f"import json, os\nkeys = {keys!r}\n"
        "print(json.dumps({'impl': 'x', 'env': {k: os.environ.get(k) for k in keys}}))\n"
    )
    (row,) = bench_util.run_reference("x", str(script), [], 60, True, keep_host_memory=True)
    assert row["env"] == hostmem.ENV and row["host_memory_kept"] is True
    (row,) = bench_util.run_reference("x", str(script), [], 60, True)
    assert row["host_memory_kept"] is False
    assert all(row["env"][k] == os.environ.get(k) for k in hostmem.ENV)


def test_every_table_names_the_cpu_and_its_vector_extensions():
    bench_util = helpers.bench_module("bench_util")
    info = (
        "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\n"
        "model name\t: Intel Xeon\nflags\t\t: fpu sse avx2 avx512f amx_tile amx_bf16\n"
        "processor\t: 1\nmodel name\t: Intel Xeon\n"
    )
    assert (
        bench_util.cpu_description(info) == "Intel Xeon (family 6), avx2 avx512f amx_tile amx_bf16"
    )
    assert bench_util.cpu_description("model name: Old\nflags: sse2\n") == "Old, no AVX2"
    assert "host cores; " in bench_util.describe_device()  # this machine's CPU, in every table


@pytest.mark.parametrize("B,convolutions", [(8, 1), (32, 0)])
def test_scoring_folds_the_towers_no_larger_than_the_batch(params, B, convolutions):
    """Scoring folds, per call, each tower whose vocabulary is at most the batch's B * L
    positions (users 50 and behaviours 6 of 96 positions; all three of 384) and convolves the
    rest; the scores equal the straightforward model's, ids past a table's end included."""
    params = jax.tree_util.tree_map(lambda x: x + 0.01 * (x.ndim == 1), params)  # biases != 0
    batch = {k: v for k, v in _batch(B=B, seed=3).items() if k.endswith("_ids")}
    batch["item_ids"][0, :3] = SMALL["item_vocab"] + 5
    batch["user_ids"][1, :2] = SMALL["user_vocab"] + 7

    def score(**variant):
        model = BenchCNN(**SMALL, **variant)
        return lambda p: model.apply({"params": _fast(model, p)}, batch)[0]

    assert str(jax.make_jaxpr(score())(params)).count("conv_general_dilated") == convolutions
    want = jax.jit(score(**STRAIGHTFORWARD))(params)
    np.testing.assert_allclose(jax.jit(score())(params), want, rtol=1e-5, atol=1e-6)


def test_tower_major_flattening_writes_no_concatenation(params):
    """The fast model flattens the pooled towers tower by tower: its compiled train step has
    no [B, T', towers * F] concatenation of them (Keras' order, which the straightforward
    model keeps), and it needs the hidden layer whose kernel follows its input's order."""
    batch = _batch(seed=5)
    n_towers, P = len(bench_cnn.TOWERS), (12 - 3 + 1) // 2
    pooled_concat = rf" f32\[8,{P},{n_towers * SMALL['filters']}\]\{{[0-9,]+\}} concatenate\("

    def train_hlo(**variant):
        model = BenchCNN(**SMALL, **variant)
        rngs = {"dropout": jax.random.PRNGKey(1)}
        loss = lambda p: jnp.sum(model.apply({"params": p}, batch, train=True, rngs=rngs)[0])
        return jax.jit(jax.grad(loss)).lower(_fast(model, params)).compile().as_text()

    assert re.search(pooled_concat, train_hlo(tower_major=False))
    assert not re.search(pooled_concat, train_hlo())
    with pytest.raises(ValueError, match="tower_major"):
        BenchCNN(**SMALL, dense_impl="flax").apply({"params": params}, batch)


def test_time_major_gather_keeps_the_values_and_the_gradients(params):
    """Training gathers the convolved towers' embeddings time-major ([L, B, D]) and swaps them
    to [B, L, D]: the same logits and gradients as the batch-major gather (the scatter-add only
    sums in another order); scoring and `time_major_gather=False` gather batch-major."""
    batch = _batch(seed=6)
    D = SMALL["embed_dim"]

    def run(train, **variant):
        model = BenchCNN(**SMALL, dropout=0.0, **variant)
        f = lambda p: jnp.sum(model.apply({"params": p}, batch, train=train)[0] ** 2)
        p = _fast(model, params)
        return jax.jit(f)(p), jax.jit(jax.grad(f))(p), str(jax.make_jaxpr(f)(p))

    time_major = rf"f32\[12,8,{D}\] = gather\["
    loss, grads, jaxpr = run(True)
    assert re.search(time_major, jaxpr), jaxpr
    loss_bm, grads_bm, jaxpr_bm = run(True, time_major_gather=False)
    assert not re.search(time_major, jaxpr_bm) and re.search(rf"f32\[8,12,{D}\] = gather", jaxpr_bm)
    assert not re.search(time_major, run(False)[2])
    np.testing.assert_array_equal(loss, loss_bm)
    assert float(jnp.max(jnp.abs(grads["embed_item"]))) > 1e-3
    helpers.assert_trees_close(grads, grads_bm, rtol=1e-5, atol=1e-6)


def test_onehot_conv1d_gradient_is_one_matmul_equal_to_the_convolutions():
    """onehot_conv1d: the convolution of one-hot ids (ids outside the table embed as zeros),
    and its kernel gradient, computed as one matmul over one-hots built transposed, equals
    the gradient through XLA's convolution; no convolution is left in that gradient."""
    K, V, F = 3, 6, 5
    ids = np.random.default_rng(0).integers(-1, V + 2, (4, 11)).astype(np.int32)
    P = jax.random.normal(jax.random.PRNGKey(0), (K, V, F))
    g = jax.random.normal(jax.random.PRNGKey(1), (4, 11 - K + 1, F))
    plain = lambda P: bench_cnn.conv1d(jax.nn.one_hot(ids, V), P)
    y, vjp = jax.vjp(lambda P: bench_cnn.onehot_conv1d(ids, P), P)
    np.testing.assert_allclose(y, plain(P), rtol=1e-6, atol=1e-6)
    want = jax.vjp(plain, P)[1](g)[0]
    assert float(jnp.max(jnp.abs(want))) > 0.1
    np.testing.assert_allclose(vjp(g)[0], want, rtol=1e-5, atol=1e-5)

    def grad_hlo(conv):  # the gradient alone: XLA drops the unused forward
        return jax.jit(lambda P: jax.vjp(conv, P)[1](g)).lower(P).compile().as_text()

    assert " convolution(" in grad_hlo(plain)
    onehot_hlo = grad_hlo(lambda P: bench_cnn.onehot_conv1d(ids, P))
    assert " convolution(" not in onehot_hlo and " dot(" in onehot_hlo, onehot_hlo


def test_hidden_kernel_gradient_reaches_adam_without_a_transpose(params):
    """The fast hidden kernel is stored [O, I] in the order the towers flatten, so its gradient
    g^T x comes out of the matmul in the parameter's layout: the compiled step (gradient, Adam,
    gradient norm) has no transpose of it. With the kernel stored [I, O] XLA fused the
    transpose of (g^T x) into each of Adam's reads, strided."""
    model, batch = BenchCNN(**SMALL), _batch(B=64, seed=5)
    tx, rngs = optax.adam(1e-3), {"dropout": jax.random.PRNGKey(1)}

    def step(p, opt):
        loss = lambda p: jnp.sum(model.apply({"params": p}, batch, train=True, rngs=rngs)[0])
        g = jax.grad(loss)(p)
        updates, opt = tx.update(g, opt, p)
        return optax.apply_updates(p, updates), opt, optax.tree_utils.tree_norm(g)

    p = _fast(model, params)
    hlo = jax.jit(step).lower(p, tx.init(p)).compile().as_text()
    n_out, n_in = p["hidden"]["kernel"].shape
    shapes = (f"f32[{n_out},{n_in}]", f"f32[{n_in},{n_out}]")
    hidden_dots = [ln for ln in hlo.splitlines() if " dot(" in ln and shapes[0] in ln]
    assert hidden_dots, hlo  # the kernel's gradient, [O, I]
    transposes = [
        ln for ln in hlo.splitlines() if " transpose(" in ln and any(s in ln for s in shapes)
    ]
    assert not transposes, transposes
