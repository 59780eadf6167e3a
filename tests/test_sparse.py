"""Row-sparse embedding updates: same forward pass, only looked-up rows change, exact Adagrad."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import sparse
from influence_jax.models import build_model
from tests import helpers


def _setup(tiny_data, batch_size=32):
    schema, path = tiny_data
    model = build_model(helpers.tiny_config().model, schema)
    batch = helpers.first_batch(schema, path, batch_size)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    return schema, model, batch, params


def test_virtual_tables_give_the_same_logits(tiny_data):
    schema, model, batch, params = _setup(tiny_data)
    vocabs = sparse.sparse_vocabs(schema, params, min_rows=100)
    assert set(vocabs) == {"user_id", "item_id"}
    vparams, vbatch, rows = sparse.gather_rows(params, batch, schema, vocabs)
    assert (
        vparams["embeddings"]["embed_item_id"].shape[0]
        < params["embeddings"]["embed_item_id"].shape[0]
    )
    full, _ = model.apply({"params": params}, batch)
    virt, _ = model.apply({"params": vparams}, vbatch)
    np.testing.assert_allclose(np.asarray(full), np.asarray(virt), rtol=1e-6, atol=1e-6)
    # Reserved ids keep their positions, so padding and OOV stay recognisable.
    np.testing.assert_array_equal(np.asarray(rows["item_id"]["ids"][:2]), [0, 1])


def test_rowwise_adagrad_touches_only_batch_rows_and_matches_reference(tiny_data):
    schema, model, batch, params = _setup(tiny_data)
    vocabs = ("item_id",)
    state = sparse.init_state(params, vocabs)

    def loss(p, b):
        logit, _ = model.apply({"params": p}, b)
        return jnp.mean(jnp.square(logit - b["label"]))

    vparams, vbatch, rows = sparse.gather_rows(params, batch, schema, vocabs)
    vgrads = jax.grad(loss)(vparams, vbatch)
    new_params, new_state = sparse.rowwise_adagrad(params, vgrads, rows, state, lr=0.1)

    # Reference: dense gradient of the full table, row-wise Adagrad on rows with any gradient.
    dense_g = np.asarray(jax.grad(loss)(params, batch)["embeddings"]["embed_item_id"])
    table = np.asarray(params["embeddings"]["embed_item_id"])
    acc = np.asarray(state["embed_item_id"]) + np.mean(dense_g**2, axis=1, keepdims=True)
    ref = table - 0.1 * dense_g / (np.sqrt(acc) + 1e-8)
    got = np.asarray(new_params["embeddings"]["embed_item_id"])
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-7)
    used = np.unique(np.concatenate([batch["item"][:, 0], batch["hist"][..., 0].ravel()]))
    changed = np.flatnonzero(np.any(got != table, axis=1))
    assert set(changed) <= set(used) and len(changed) > 0
    np.testing.assert_allclose(np.asarray(new_state["embed_item_id"]), acc, rtol=1e-6)


def test_distinct_rows_are_written_once_with_the_numbers_of_the_scatter_add(tiny_data):
    """Distinct rows take a scatter-set (no atomic adds: XLA:GPU compiles f32 scatter-adds to
    compare-and-swap loops on jaxlib 0.10.2-0.11); it must give the scatter-add's numbers."""
    schema, model, batch, params = _setup(tiny_data)
    vocabs = ("item_id", "user_id")
    state = sparse.init_state(params, vocabs)
    vparams, vbatch, rows = sparse.gather_rows(params, batch, schema, vocabs)
    assert all(r["distinct"] for r in rows.values()) and not all(rows["item_id"]["valid"])

    def loss(p):
        logit, _ = model.apply({"params": p}, vbatch)
        return jnp.mean(jnp.square(logit - vbatch["label"]))

    vgrads = jax.grad(loss)(vparams)
    added = {v: dict(r, distinct=False) for v, r in rows.items()}
    update = lambda r: jax.jit(lambda p, g, s: sparse.rowwise_adagrad(p, g, r, s, 0.1))
    got_p, got_s = update(rows)(params, vgrads, state)
    ref_p, ref_s = update(added)(params, vgrads, state)
    for v in vocabs:
        name = f"embed_{v}"
        np.testing.assert_array_equal(got_p["embeddings"][name], ref_p["embeddings"][name])
        np.testing.assert_array_equal(got_s[name], ref_s[name])


def test_sparse_train_step_learns_and_keeps_unused_rows(tiny_data):
    schema, path = tiny_data
    batch = helpers.first_batch(schema, path, 64)
    config = helpers.tiny_config(**{"opt.schedule": "constant", "opt.sparse_min_rows": 100})
    eng, state = helpers.setup(config, schema, jax.devices()[:1])
    assert set(eng.sparse_vocabs) == {"user_id", "item_id"}
    table0 = np.asarray(state.params["embeddings"]["embed_item_id"])
    losses = []
    for _ in range(30):
        state, m = eng.train_step(state, batch)
        losses.append(float(m["loss_sum"] / m["count"]))
    assert losses[-1] < 0.85 * losses[0], losses
    table = np.asarray(state.params["embeddings"]["embed_item_id"])
    used = np.unique(np.concatenate([batch["item"][:, 0], batch["hist"][..., 0].ravel()]))
    unused = np.setdiff1d(np.arange(table.shape[0]), used)
    np.testing.assert_array_equal(table[unused], table0[unused])
    # No dense optimizer moments exist for the sparse tables: nothing of their size is kept.
    shapes = {x.shape for x in jax.tree_util.tree_leaves(state.opt_state["dense"])}
    assert table.shape not in shapes
    # The row-wise Adagrad rate is the config's: a larger one moves the used rows further.
    fast = helpers.tiny_config(
        **{"opt.schedule": "constant", "opt.sparse_min_rows": 100, "opt.sparse_learning_rate": 0.5}
    )
    eng2, state2 = helpers.setup(fast, schema, jax.devices()[:1])
    state2, _ = eng2.train_step(state2, batch)
    state1, _ = eng.train_step(eng.init_state(), batch)
    step_of = lambda st: np.abs(np.asarray(st.params["embeddings"]["embed_item_id"]) - table0).max()
    assert step_of(state2) > 5 * step_of(state1) > 0


def test_train_and_evaluate_with_sparse_tables_on_eight_devices(tmp_path):
    from influence_jax import train

    config = helpers.tiny_config(
        **{
            "opt.sparse_embeddings": True,
            "opt.sparse_min_rows": 100,
            "mesh.data": 4,
            "mesh.model": 2,
            "mesh.shard_embeddings": True,
            "mesh.shard_min_rows": 100,
        }
    )
    result = train.train_and_evaluate(config, str(tmp_path / "run"))
    assert np.isfinite(result["test/logloss"]) and 0 < result["test/auc"] < 1


def test_ids_after_the_training_period_embed_as_oov_but_keep_exact_matches(tiny_data):
    """With table_sizes (prepare_data.py --vocab_period=train) ids at or above the table embed
    as OOV but keep their identity: renaming late ids among themselves changes nothing, turning
    them into OOV loses their exact matches; the row-sparse path agrees with the dense one."""
    schema, path = tiny_data
    n = schema.vocab_sizes["item_id"]
    late = dataclasses.replace(schema, table_sizes={"item_id": n // 2})
    model = build_model(helpers.tiny_config().model, late)
    batch = helpers.first_batch(schema, path, 64)
    params = model.init(jax.random.PRNGKey(0), batch)["params"]
    assert params["embeddings"]["embed_item_id"].shape[0] == n // 2
    full, _ = model.apply({"params": params}, batch)

    def mapped(f):
        out = dict(batch)
        out["item"] = batch["item"].copy()
        out["item"][:, 0] = f(batch["item"][:, 0])
        out["hist"] = batch["hist"].copy()
        out["hist"][..., 0] = f(batch["hist"][..., 0])
        return out

    perm = np.arange(n)
    perm[n // 2 :] = n // 2 + np.random.default_rng(0).permutation(n - n // 2)
    renamed, _ = model.apply({"params": params}, mapped(lambda ids: perm[ids]))
    np.testing.assert_allclose(np.asarray(renamed), np.asarray(full), rtol=1e-6, atol=1e-6)
    is_late = batch["item"][:, :1] >= n // 2
    assert (is_late & (batch["hist"][..., 0] == batch["item"][:, :1])).any()  # late matches
    oov, _ = model.apply(
        {"params": params}, mapped(lambda ids: np.where(ids >= n // 2, 1, ids).astype(ids.dtype))
    )
    assert not np.allclose(np.asarray(oov), np.asarray(full), atol=1e-4)
    vparams, vbatch, rows = sparse.gather_rows(params, batch, late, ("item_id",))
    virt, _ = model.apply({"params": vparams}, vbatch)
    np.testing.assert_allclose(np.asarray(virt), np.asarray(full), rtol=1e-6, atol=1e-6)
    assert int(rows["item_id"]["ids"].max()) < n // 2  # late ids read and update the OOV row
