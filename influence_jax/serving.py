"""A trained run exported for online serving: loadable with jax and numpy alone.

`export_run` writes a folder (tools/export_model.py):

- `model.jax`: the run's scoring function `score(params, user, item, hist) -> prob`, serialized
  by `jax.export` (StableHLO and its calling convention) with a symbolic batch size `b`, for the
  platforms asked for (a program lowered for several dispatches on the one it runs on);
- `params.npz`: the parameters (the moving average where the run keeps one, as evaluation and
  ranking read it), `p00000`, `p00001`, ... in the order the program takes them;
- `vocab/<name>.npy` or `.json`: the raw ids (a numeric field: its buckets' lower bounds) of
  each vocabulary the inputs index, copied from the prepared dataset;
- `items.npy` (datasets with a ranking state): every item id's `item` input row;
- `signature.json`: the inputs' fields, dtypes and shapes, the id rules (padding 0, OOV 1 and
  ids outside a vocabulary's size, raw ids by file position, behaviour types, time-gap and
  numeric buckets), the parameters' names and dtypes, the run (workdir, step, model,
  objective), the CPU block rows and the JAX version;
- `check.npz`: a few rows of the test split (`user`, `item`, `hist`) with the probabilities the
  engine's own scoring function gives them (`prob`): a serving port checks itself against them;
- with `explain`: `explain.jax`, `explain(params, user, item, hist) -> {prob, logit, behaviour
  [b, T], events [b, L], extractors [b, E]}`, what `rank.py --explain` reports of a row (each
  behaviour type's and past event's logit drop when left out, each extractor's w_j f_j), and
  the engine's values for the check rows in check.npz (`explain_*`).

The probabilities are those of `rank.py` and `evaluate.py` for the same rows
(tests/test_serving.py). Loading, with nothing of this package (docs/serving.md):

    exp = jax.export.deserialize(bytearray(open(f"{path}/model.jax", "rb").read()))
    prob = exp.call(params, user, item, hist)
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from influence_jax import engine, files, influence, scoring
from influence_jax.data import rank_state
from influence_jax.data.history import gap_column, gap_seconds
from influence_jax.data.schema import HIST_BEHAVIOUR, NUM_RESERVED, OOV_ID, Schema
from influence_jax.data.store import ExampleStore
from influence_jax.data.vocab import Vocab
from influence_jax.errors import DataError

MODEL_FILE = "model.jax"
EXPLAIN_FILE = "explain.jax"
# explain's outputs, in the order of the program's flat results (a dict's: sorted keys)
EXPLAIN_OUTPUTS = ("behaviour", "events", "extractors", "logit", "prob")
PARAMS_FILE = "params.npz"
SIGNATURE_FILE = "signature.json"
CHECK_FILE = "check.npz"
ITEMS_FILE = "items.npy"
VOCAB_DIR = "vocab"
FORMAT = 1
INPUTS = ("user", "item", "hist")
PLATFORMS = ("cpu", "cuda", "rocm", "tpu")
CHECK_ROWS = 16
# A CPU request of this many blocks or more is scored in blocks: measured on the 2-core Zen 4
# EPYC (2026-12-07, one process, whole and blocked programs alternated), the full model's 1000
# rows 1.6x as fast in blocks of 64 or 128, its 200 rows 1.7x slower in blocks of 64 (padded to
# 256), the default model's alike either way.
BLOCKED_FROM = 4
L2_BYTES = 1 << 20  # the level-2 cache the CPU blocks assume (the serving machine is unknown)


def check_platforms(platforms: list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """The platforms to lower for, validated; DataError naming a bad one."""
    bad = [p for p in platforms if p not in PLATFORMS]
    if bad or not platforms or len(set(platforms)) != len(platforms):
        what = f"{bad} unknown" if bad else "none given" if not platforms else "a repeat"
        raise DataError(f"--platforms: {what}; choose from {list(PLATFORMS)}")
    return tuple(platforms)


def input_fields(schema: Schema) -> dict[str, tuple]:
    """Each input's fields: its columns, in order."""
    fields = (schema.user_fields, schema.item_fields, schema.hist_fields)
    return dict(zip(INPUTS, fields, strict=True))


def input_specs(schema: Schema, batch: Any) -> tuple[jax.ShapeDtypeStruct, ...]:
    """The ShapeDtypeStructs of (user, item, hist) for `batch` rows (an int or a symbol)."""
    widths = {
        "user": (len(schema.user_fields),),
        "item": (len(schema.item_fields),),
        "hist": (schema.max_len, len(schema.hist_fields)),
    }
    return tuple(jax.ShapeDtypeStruct((batch, *widths[k]), jnp.int32) for k in INPUTS)


def _scores(model: Any) -> Any:
    """`probs(params, batch)`: the model's probabilities, as the engine's score function."""
    return lambda p, batch: jax.nn.sigmoid(model.apply({"params": p}, batch, train=False)[0])


def cpu_block_rows(model: Any, params: Any, schema: Schema) -> int:
    """The rows a CPU scores at a time in the exported program: engine.block_rows for the
    model's widest value per example on a L2_BYTES level-2 cache."""
    example = dict(zip(INPUTS, input_specs(schema, 8), strict=True))
    row_bytes = engine.widest_row_bytes(_scores(model), params, example)
    return engine.block_rows(row_bytes, L2_BYTES)


def export_model(
    model: Any,
    params: Any,
    schema: Schema,
    platforms: tuple[str, ...],
    cpu_rows: int,
) -> Any:
    """`score(flat params, user, item, hist) -> prob` of `model` as a `jax.export.Exported`
    with a symbolic batch size `b`; the parameters in `jax.tree_util.tree_leaves` order.

    On a CPU a request of at least BLOCKED_FROM x `cpu_rows` rows is scored `cpu_rows` at a
    time (a loop inside the program), so a block's activations stay in the core's cache, as
    the engine's batch scoring does (cpu_block_rows; 0: whole requests). Other platforms
    score whole requests. Blocks change a probability by float32 rounding at most."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    probs = _scores(model)
    inputs = _inputs(schema)

    def score(flat: list[jax.Array], user, item, hist) -> jax.Array:
        return probs(jax.tree_util.tree_unflatten(treedef, flat), inputs(user, item, hist))

    def blocked(flat: list[jax.Array], user, item, hist) -> jax.Array:
        b, r = user.shape[0], cpu_rows
        xs = [jnp.pad(x, [(0, r)] + [(0, 0)] * (x.ndim - 1)) for x in (user, item, hist)]

        def block(i: jax.Array, out: jax.Array) -> jax.Array:
            part = [jax.lax.dynamic_slice_in_dim(x, i * r, r) for x in xs]
            return jax.lax.dynamic_update_slice_in_dim(out, score(flat, *part), i * r, 0)

        def in_blocks() -> jax.Array:
            out = jnp.zeros((b + r,), jnp.float32)
            return jax.lax.fori_loop(0, (b + r - 1) // r, block, out)[:b]

        whole = lambda: score(flat, user, item, hist)
        return jax.lax.cond(jnp.asarray(b) >= BLOCKED_FROM * r, in_blocks, whole)

    def serve(flat: list[jax.Array], user, item, hist) -> jax.Array:
        if not cpu_rows or "cpu" not in platforms:
            return score(flat, user, item, hist)
        return jax.lax.platform_dependent(flat, user, item, hist, cpu=blocked, default=score)

    return _export(serve, leaves, schema, platforms)


def _inputs(schema: Schema):
    """`(user, item, hist) -> batch` with every id outside its vocabulary (negative, or at or
    above its size) as OOV, never read out of a table's bounds."""
    sizes = {
        k: jnp.asarray([schema.vocab_sizes[f.vocab] for f in fs], jnp.int32)
        for k, fs in input_fields(schema).items()
    }
    inside = lambda x, k: jnp.where((x >= 0) & (x < sizes[k]), x, OOV_ID)
    return lambda *xs: {k: inside(x, k) for k, x in zip(INPUTS, xs, strict=True)}


def _export(fn: Any, leaves: list, schema: Schema, platforms: tuple[str, ...]) -> Any:
    """`fn(flat params, user, item, hist)` exported with a symbolic batch size `b`."""
    specs = [jax.ShapeDtypeStruct(x.shape, x.dtype) for x in leaves]
    (b,) = jax.export.symbolic_shape("b")
    return jax.export.export(jax.jit(fn), platforms=platforms)(specs, *input_specs(schema, b))


def export_explain(model: Any, params: Any, schema: Schema, platforms: tuple[str, ...]) -> Any:
    """`explain(flat params, user, item, hist) -> {prob [b], logit [b], behaviour [b, T],
    events [b, L], extractors [b, E]}` of `model` as a `jax.export.Exported`: per row the logit
    drop when every event of behaviour type t is left out, when history event l alone is (0 at
    padding), and each extractor's part w_j f_j of the logit (E = 0 for a model without
    them), as influence.explain_columns computes them for rank.py --explain. A row costs
    1 + L + T model rows, so explain the rows shown, not every candidate."""
    leaves, treedef = jax.tree_util.tree_flatten(params)
    inputs, L = _inputs(schema), schema.max_len
    types = jnp.arange(schema.num_behaviour_types) + NUM_RESERVED
    beh_col = schema.hist_index(HIST_BEHAVIOUR)

    def explain(flat: list[jax.Array], user, item, hist) -> dict[str, jax.Array]:
        p, batch = jax.tree_util.tree_unflatten(treedef, flat), inputs(user, item, hist)
        logit, aux = model.apply({"params": p}, batch, train=False)
        beh = batch["hist"][..., beh_col]
        real = beh != 0
        remove = jnp.concatenate(
            [jnp.eye(L, dtype=bool)[None] & real[:, None, :], beh[:, None, :] == types[:, None]],
            axis=1,
        )  # [b, L + T, L]: copy l drops event l, copy L + t every event of type t
        keep = jnp.moveaxis(~remove, 1, 0)
        hists = jnp.where(keep[..., None], batch["hist"][None], 0)
        delta = logit[:, None] - scoring.copies_logits(model, p, batch, hists).T
        c = aux.get("contributions", {})
        parts = [c[k] for k in sorted(c)]  # _contribution_names' order
        return {
            "prob": jax.nn.sigmoid(logit),
            "logit": logit,
            "behaviour": delta[:, L:],
            "events": jnp.where(real, delta[:, :L], 0.0),
            "extractors": jnp.stack(parts, 1) if parts else jnp.zeros((logit.shape[0], 0)),
        }

    return _export(explain, leaves, schema, platforms)


def _explain_signature(run: scoring.Run, exp: Any) -> dict[str, Any]:
    s = run.schema
    names = list(_contribution_names(run))
    return {
        "file": EXPLAIN_FILE,
        "call": "exp.call(params, user, item, hist) -> dict of the outputs",
        "outputs": {
            "prob": {"shape": ["b"]},
            "logit": {"shape": ["b"]},
            "behaviour": {
                "shape": ["b", s.num_behaviour_types],
                "order": list(s.behaviour_types),
                "meaning": "logit - logit with every event of the type left out",
            },
            "events": {
                "shape": ["b", s.max_len],
                "meaning": "logit - logit with the history's event l alone left out (the hist "
                "input's order, most recent first); 0 at padding",
            },
            "extractors": {
                "shape": ["b", len(names)],
                "order": names,
                "meaning": "each extractor's part w_j f_j of the logit",
            },
        },
        "flat_order": list(EXPLAIN_OUTPUTS),
        "cost": f"{1 + s.max_len + s.num_behaviour_types} model rows per row",
        "platforms": list(exp.platforms),
    }


def _contribution_names(run: scoring.Run) -> tuple[str, ...]:
    """The extractors the model reports a part of the logit for, sorted by name."""
    example = dict(zip(INPUTS, input_specs(run.schema, 2), strict=True))
    out = jax.eval_shape(
        lambda p, b: run.model.apply({"params": p}, b, train=False), run.params, example
    )
    return tuple(sorted(out[1].get("contributions", {})))


def _engine_explain(run: scoring.Run, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The engine's explanation of `rows` (influence.masked_deltas, as rank.py --explain)."""
    s, L, n = run.schema, run.schema.max_len, len(rows["user"])
    gather = lambda idx: {k: rows[k][idx] for k in INPUTS}
    masks = lambda h, r: np.concatenate([influence.loo_masks(h, s), influence.type_masks(h, s)], 1)
    out = influence.masked_deltas(run, n, gather, masks, L + s.num_behaviour_types)
    delta, real = out["delta"], influence.real_events(rows["hist"], s)
    c = out["contributions"]
    parts = [np.asarray(c[k], np.float32) for k in sorted(c)]
    return {
        "explain_behaviour": delta[:, L:].astype(np.float32),
        "explain_events": np.where(real, delta[:, :L], 0.0).astype(np.float32),
        "explain_extractors": np.stack(parts, 1) if parts else np.zeros((n, 0), np.float32),
        "explain_logit": np.asarray(out["logit"], np.float32),
    }


def _ids(schema: Schema, synthetic: bool, copied: dict[str, str]) -> dict[str, Any]:
    """How raw values become the inputs' ids, per vocabulary the inputs index."""
    out: dict[str, Any] = {}
    vocabs = {f.vocab for fs in input_fields(schema).values() for f in fs}
    numeric = set(schema.extra.get("source_options", {}).get("numeric_fields") or ())
    for v in sorted(vocabs):
        out[v] = {"size": schema.vocab_sizes[v]}  # ids outside [0, size) are scored as OOV
        if v in copied and v in numeric:  # data/side.py: quantile buckets, lower bounds kept
            out[v] |= {
                "file": copied[v],
                "rule": f"{NUM_RESERVED - 1} + the number of the file's bucket lower bounds "
                f"(the first -inf) at or below the value; {OOV_ID} (OOV) for a blank or "
                "non-numeric value",
            }
        elif v in copied:
            out[v] |= {
                "file": copied[v],
                "rule": f"{NUM_RESERVED} + the raw id's position in the file; {OOV_ID} (OOV) for "
                "an id not in it",
            }
        elif v == "behaviour":
            out[v] |= {
                "types": {t: NUM_RESERVED + k for k, t in enumerate(schema.behaviour_types)},
                "rule": "the event's behaviour type's id",
            }
        elif v == "time_gap":
            base = int(gap_seconds(schema, np.array([NUM_RESERVED + 1]))[0])
            top = schema.vocab_sizes[v] - NUM_RESERVED - 1
            low = f"{OOV_ID} for a gap <= 0" if base == 2 else "a gap under 1 s counts as 1 s"
            out[v] |= {
                "rule": f"{NUM_RESERVED} + min(floor(log_{base}(seconds)), {top}) for the "
                "seconds from the event to the candidate's time (a history holds only events "
                f"before it); {low}",
                "base": base,
            }
        elif synthetic:
            top = schema.vocab_sizes[v] - NUM_RESERVED - 1
            out[v] |= {"rule": f"{NUM_RESERVED} + the raw id (synthetic data: ids 0..{top})"}
        else:
            raise DataError(f"vocabulary {v}: no raw ids saved and no fixed rule; cannot export")
    return out


def signature(
    run: scoring.Run, exp: Any, copied: dict[str, str], names: list[str], synthetic: bool
) -> dict[str, Any]:
    s = run.schema
    fields = lambda fs: [
        {"name": f.name, "vocab": f.vocab, **({"bag": f.bag} if f.bag else {})} for f in fs
    ]
    gap = gap_column(s.hist_fields)
    return {
        "format": FORMAT,
        "run": {
            "workdir": run.workdir,
            "step": run.step,
            "model": run.config.model.name,
            # A multi-task run's objective as exported (a head, or weighted heads), its head
            "objective": run.config.model.multitask.objective
            if run.config.model.name == "multitask"
            else "",
            "objective_head": run.objective_head,
            "dataset": s.name,
        },
        "jax_version": jax.__version__,
        "platforms": list(exp.platforms),
        "call": "exp.call(params, user, item, hist) -> prob",
        "inputs": {
            "user": {
                "dtype": "int32",
                "shape": ["b", len(s.user_fields)],
                "fields": fields(s.user_fields),
            },
            "item": {
                "dtype": "int32",
                "shape": ["b", len(s.item_fields)],
                "fields": fields(s.item_fields),
            },
            "hist": {
                "dtype": "int32",
                "shape": ["b", s.max_len, len(s.hist_fields)],
                "fields": fields(s.hist_fields),
                "order": f"the user's {s.max_len} most recent events strictly before the "
                "candidate's time, most recent first; empty slots all 0 (padding)",
                "time_gap_field": gap,
            },
        },  # fmt: skip
        "output": {"prob": {"dtype": "float32", "shape": ["b"]}},
        "ids": {"padding": 0, "oov": OOV_ID, "vocabularies": _ids(s, synthetic, copied)},
        "params": {
            "file": PARAMS_FILE,
            "arrays": [
                {"key": f"p{i:05d}", "name": n, "dtype": str(a.dtype), "shape": list(a.shape)}
                for i, (n, a) in enumerate(zip(names, exp.in_avals[: len(names)], strict=True))
            ],
        },
        "check": {"file": CHECK_FILE, "rows": None},
    }


def _host(x: jax.Array) -> np.ndarray:
    """A parameter as a numpy array npz can hold (dtypes numpy lacks as unsigned integers of
    their width; signature.json names the dtype, `.view` restores it)."""
    a = np.asarray(jax.device_get(x))
    if a.dtype.kind not in "biuf" or a.dtype.type.__module__ != "numpy":
        a = a.view(np.dtype(f"uint{8 * a.dtype.itemsize}"))
    return a


def _check_rows(run: scoring.Run, n: int) -> dict[str, np.ndarray]:
    """The first `n` rows of the test split (valid, train: the first that has rows) and the
    engine's probabilities for them."""
    for split in ("test", "valid", "train"):
        if split in run.schema.splits and run.schema.splits[split]["rows"]:
            break
    else:
        raise DataError(f"{run.data_path}: no split has rows to check the export on")
    store = ExampleStore(run.data_path, split, run.schema)
    n = min(n, len(store))
    gather = lambda idx: {k: v for k, v in store.gather(idx).items() if k in INPUTS}
    fn = scoring.make_score_fn(run)
    prob = scoring.batched(fn, run, n, gather, scoring.global_batch(run, n))
    rows = gather(np.arange(n))
    return {**rows, "prob": np.asarray(prob, np.float32), "split": np.array(split)}


def export_run(
    run: scoring.Run,
    output: str,
    platforms: tuple[str, ...] = ("cpu",),
    cpu_rows: int | None = None,
    explain: bool = False,
) -> dict:
    """Writes the serving folder of `run` to `output` (atomically; module doc); returns its
    signature. `cpu_rows`: export_model's (None: cpu_block_rows); `explain`: explain.jax too."""
    if jax.process_count() > 1:
        raise DataError("export runs in one process; run it without JAX_NUM_PROCESSES")
    if cpu_rows is not None and cpu_rows < 0:
        raise DataError(f"--cpu_block_rows must be 0 (whole requests) or more, not {cpu_rows}")
    if cpu_rows is None:
        cpu_rows = cpu_block_rows(run.model, run.params, run.schema)
    exp = export_model(run.model, run.params, run.schema, check_platforms(platforms), cpu_rows)
    flat, _ = jax.tree_util.tree_flatten_with_path(run.params)
    names = [jax.tree_util.keystr(p) for p, _ in flat]
    synthetic = run.dataset.id_maps.synthetic
    check = _check_rows(run, CHECK_ROWS)
    explained = None
    if explain:
        explained = export_explain(run.model, run.params, run.schema, platforms)
        check.update(_engine_explain(run, {k: check[k] for k in INPUTS}))
    with files.atomic_folder(output) as tmp:
        copied = {}
        for v in sorted({f.vocab for fs in input_fields(run.schema).values() for f in fs}):
            if not synthetic and Vocab.exists(run.data_path, v):
                os.makedirs(os.path.join(tmp, VOCAB_DIR), exist_ok=True)
                for ext in (".npy", ".json"):
                    src = os.path.join(run.data_path, VOCAB_DIR, v + ext)
                    if os.path.exists(src):
                        shutil.copyfile(src, os.path.join(tmp, VOCAB_DIR, v + ext))
                        copied[v] = f"{VOCAB_DIR}/{v}{ext}"
        features = rank_state.item_features_path(run.data_path)
        has_items = os.path.exists(features)  # datasets prepared with a ranking state
        if has_items:
            shutil.copyfile(features, os.path.join(tmp, ITEMS_FILE))
        sig = signature(run, exp, copied, names, synthetic)
        if has_items:
            sig["items"] = {
                "file": ITEMS_FILE,
                "rule": "row i is the `item` input of item id i: its fields' ids (the history's "
                "item fields of an event on it too)",
            }
        sig["check"]["rows"], sig["check"]["split"] = len(check["prob"]), str(check.pop("split"))
        sig["cpu_block_rows"] = cpu_rows
        with open(os.path.join(tmp, MODEL_FILE), "wb") as f:
            f.write(exp.serialize())
        if explained is not None:
            sig["explain"] = _explain_signature(run, explained)
            with open(os.path.join(tmp, EXPLAIN_FILE), "wb") as f:
                f.write(explained.serialize())
        arrays = {f"p{i:05d}": _host(x) for i, (_, x) in enumerate(flat)}
        np.savez(os.path.join(tmp, PARAMS_FILE), **arrays)
        np.savez(os.path.join(tmp, CHECK_FILE), **check)
        files.write_json(os.path.join(tmp, SIGNATURE_FILE), sig)
    return sig


def load(path: str, program: str = MODEL_FILE):
    """(fn, signature) of an exported folder: `fn(user, item, hist)` -> prob (or, with
    program=EXPLAIN_FILE, explain's dict) as numpy, the program and parameters loaded with jax
    and numpy alone (the recipe of docs/serving.md)."""
    with open(os.path.join(path, SIGNATURE_FILE)) as f:
        sig = json.load(f)
    if program == EXPLAIN_FILE and "explain" not in sig:
        raise DataError(f"{path}: exported without --explain; export it again with it")
    with open(os.path.join(path, program), "rb") as f:
        exp = jax.export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(path, PARAMS_FILE)) as npz:
        params = [npz[p["key"]].view(jnp.dtype(p["dtype"])) for p in sig["params"]["arrays"]]
    params = [jax.device_put(p) for p in params]
    call = jax.jit(exp.call)
    host = lambda out: jax.tree_util.tree_map(np.asarray, out)
    return (lambda user, item, hist: host(call(params, user, item, hist))), sig
