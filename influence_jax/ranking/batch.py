"""Batch ranking: score every candidate pair with the run's jitted scoring function, keep each
user's top k and write them atomically (with `explain`, each row's influence columns).
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import itertools
import os
import shutil
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import pyarrow as pa
from absl import logging

from influence_jax import influence
from influence_jax.checkpoint import checkpoint_dir
from influence_jax.data import readers
from influence_jax.errors import DataError
from influence_jax.files import replace_folder, write_table
from influence_jax.logs import Progress
from influence_jax.ranking.asof import contexts_from_log
from influence_jax.ranking.candidates import (
    Candidates,
    DefaultCandidates,
    RetrievedCandidates,
    file_candidates,
)
from influence_jax.ranking.contexts import Contexts, load_contexts
from influence_jax.ranking.output import top_k_rows
from influence_jax.ranking.progress import BlockStore, file_identity
from influence_jax.retrieval.retriever import RETRIEVE  # candidates per user by default
from influence_jax.scoring import Run, batched, batched_local, global_batch, make_score_fn

BLOCK_PAIRS = 1 << 20  # default candidates scored (and reduced to the top k) per block of users


def _when(ts: int) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%d %H:%M:%S")


def _score_top_k(
    run: Run,
    ctx: Contexts,
    blocks: Iterator[Candidates],
    total: int,
    top_k: int,
    batch_size: int | None,
    log: Callable[[str], None],
    progress_every: float,
    store: BlockStore | None = None,
    reused: list[int] | None = None,
) -> tuple[Candidates, np.ndarray, np.ndarray]:
    """Scores each block of candidates (whole users per block) and keeps each user's top k;
    with `store`, blocks it holds are read instead of scored (their pairs appended to
    `reused`) and new ones are saved there.

    Returns the kept pairs (as one `Candidates`, in output order), their scores and ranks."""
    # Ordered by logit: float32 probabilities tie at 1 above a logit of about 17.
    fn, bs = make_score_fn(run, logits=True), global_batch(run, batch_size)
    progress = Progress(total, log, progress_every)
    done, kept, first = 0, [], None
    for i, (c, steps) in enumerate(_blocks_in_step(blocks, bs)):
        show = lambda d, base=done: progress(base + d)
        saved = store.load(i) if store is not None and c is not None else None
        if saved is not None:  # scored before the ranking was stopped
            if steps is not None:  # the other processes score this round: no pairs from here
                batched_local(fn, run, 0, None, bs, steps, lambda d: None)
            kept.append(saved)
        elif steps is None:
            out = batched(fn, run, len(c), c.gather, bs, show)
        else:  # several processes: each its own pairs, the same number of global batches
            n, gather = (0, None) if c is None else (len(c), c.gather)
            out = batched_local(fn, run, n, gather, bs, steps, show)
        if c is None:  # this process is out of blocks; the others were not
            continue
        first = c if first is None else first
        done += len(c)
        if saved is not None:
            progress.skip(len(c))
            progress(done)
            if reused is not None:
                reused.append(len(c))
            continue
        none = np.zeros(0, np.float32)
        prob, logit = (none, none) if out is None else (out["prob"], out["logit"])
        rows, ranks = top_k_rows(c.user_out, c.item_out, logit, top_k)
        block = {f: getattr(c, f)[rows] for f in ("ctx_row", "item_row", "user_out", "item_out")}
        kept.append(dict(block, prob=prob[rows], ranks=ranks))
        if store is not None:
            store.save(i, kept[-1])
    if first is None:  # no user to rank: an empty table
        e = np.zeros(0, np.int64)
        items = np.zeros((0, len(run.schema.item_fields)), np.int32)
        return Candidates(ctx, items, e, e, e, e, {}), np.zeros(0, np.float32), e
    cat = lambda f: np.concatenate([k[f] for k in kept])
    out = Candidates(
        first.ctx,
        first.items,
        cat("ctx_row"),
        cat("item_row"),
        cat("user_out"),
        cat("item_out"),
        first.counts,
    )
    return out, cat("prob"), cat("ranks")


def _blocks_in_step(
    blocks: Iterator[Candidates], batch_size: int
) -> Iterator[tuple[Candidates | None, int | None]]:
    """(block, None) per block in one process; with several processes (block or None, global
    batches): the processes agree before each block on the number of global batches it takes
    (the most any process needs) and go on until every process is out of blocks."""
    if jax.process_count() == 1:
        yield from ((c, None) for c in blocks)
        return
    from jax.experimental import multihost_utils

    local = batch_size // jax.process_count()
    while True:
        c = next(blocks, None)
        n = np.array([len(c) if c is not None else 0, c is not None], np.int64)
        every = np.asarray(multihost_utils.process_allgather(n)).reshape(-1, 2)
        if not every[:, 1].any():
            return
        yield c, int(-(-every[:, 0].max() // local))


def _share(ctx: Contexts) -> Contexts:
    """This process's users to rank: every P-th of the users ranked by default."""
    p, count = jax.process_index(), jax.process_count()
    if count == 1:
        return ctx
    users = np.flatnonzero(ctx.in_split)
    mine = np.zeros_like(ctx.in_split)
    mine[users[p::count]] = True
    return dataclasses.replace(ctx, in_split=mine)


def _sample(ctx: Contexts, max_users: int) -> Contexts:
    """At most `max_users` of the users to rank, spread evenly over them (0: all)."""
    users = np.flatnonzero(ctx.in_split)
    if not max_users or len(users) <= max_users:
        return ctx
    keep = np.zeros_like(ctx.in_split)
    keep[users[np.linspace(0, len(users) - 1, max_users).round().astype(np.int64)]] = True
    return dataclasses.replace(ctx, in_split=keep)


def _file_share(c: Candidates) -> Candidates:
    """This process's pairs of a candidates file: every P-th user (by raw id order)."""
    p, count = jax.process_index(), jax.process_count()
    if count == 1:
        return c
    users, inv = np.unique(c.user_out, return_inverse=True)
    keep = np.flatnonzero(np.arange(len(users))[inv] % count == p)
    return dataclasses.replace(
        c,
        ctx_row=c.ctx_row[keep],
        item_row=c.item_row[keep],
        user_out=c.user_out[keep],
        item_out=c.item_out[keep],
    )


def _file_blocks(c: Candidates, block_pairs: int) -> Iterator[Candidates]:
    """A candidates file's pairs in blocks of whole users (in user order; about `block_pairs`
    pairs each: a block ends with the user whose pairs cross the limit), so that each block's
    top k is kept as it is scored (progress.py)."""
    if len(c) <= block_pairs:
        yield c
        return
    _, inv = np.unique(c.user_out, return_inverse=True)
    order = np.argsort(inv, kind="stable")
    first = np.flatnonzero(np.r_[True, np.diff(inv[order]) != 0])  # each user's first row
    window = first // block_pairs
    cuts = np.r_[first[np.r_[True, np.diff(window) != 0]], len(order)]
    for a, b in itertools.pairwise(cuts):
        rows = order[a:b]
        yield dataclasses.replace(
            c,
            ctx_row=c.ctx_row[rows],
            item_row=c.item_row[rows],
            user_out=c.user_out[rows],
            item_out=c.item_out[rows],
        )


def _write_parts(table: pa.Table, output: str, fmt: str) -> None:
    """Several processes: OUTPUT is a folder of part files (part-<process>.<fmt>), one per
    process, that Parquet readers (pandas, polars, DuckDB, Spark) read as one table; built in
    OUTPUT.partial and renamed into place by process 0 once every part is written."""
    from jax.experimental import multihost_utils

    p = jax.process_index()
    partial = output.rstrip("/") + ".partial"
    if p == 0:
        shutil.rmtree(partial, ignore_errors=True)
        os.makedirs(partial)
    multihost_utils.sync_global_devices("rank: parts folder made")
    write_table(table, os.path.join(partial, f"part-{p:05d}.{fmt}"), fmt)
    multihost_utils.sync_global_devices("rank: parts written")
    if p == 0:
        replace_folder(partial, output)
    multihost_utils.sync_global_devices("rank: output in place")


def _evaluate(
    run: Run,
    split: str,
    user_raw: np.ndarray,
    item_raw: np.ndarray,
    ranks: np.ndarray,
    k: int,
    lists: dict[str, np.ndarray],
    list_users: np.ndarray | None,
    per_user: bool = False,
) -> dict[str, dict]:
    """HR@k, NDCG@k and MRR@k of the written top k against the split's positives (the items
    each user engaged with or converted on after the ranking time), and of the retriever's
    single-source lists (popular, co-visitation, recent, category) for the same users; with
    `per_user` each also holds the per-user values (retrieval.top_k_metrics)."""
    from influence_jax import retrieval

    maps = run.dataset.id_maps
    pos_user, pos_item = retrieval.positives(run.data_path, run.schema, split)
    keys, _ = maps.user_keys(np.asarray(user_raw))
    items = maps.lookup("item_id", np.asarray(item_raw))
    users, row = np.unique(keys, return_inverse=True)
    top = np.zeros((len(users), k), np.int64)
    top[row, np.asarray(ranks) - 1] = items
    metrics = functools.partial(retrieval.top_k_metrics, per_user=per_user)
    out = {"ranked": metrics(users, top, pos_user, pos_item, k)}
    for name, lst in lists.items():
        out[f"{name} only"] = metrics(list_users, lst, pos_user, pos_item, k)
    return out


def _counted(blocks: Iterator[Candidates], sizes: list[int]) -> Iterator[Candidates]:
    """`blocks`, appending each one's number of pairs to `sizes` as it passes."""
    for b in blocks:
        sizes.append(len(b))
        yield b


def _announce(
    run: Run, blocks: Iterator[Candidates], total: int, batch_size: int | None, log
) -> Iterator[Candidates]:
    """Scores one batch of the first block (compiling), times a second, and warns with the
    number of pairs and the estimated time before every train item is scored."""
    first = next(blocks, None)
    if first is None:
        return iter(())
    fn, bs = make_score_fn(run), global_batch(run, batch_size)
    n = min(bs, len(first))
    batched(fn, run, n, first.gather, bs)  # compiles
    t0 = time.perf_counter()
    batched(fn, run, n, first.gather, bs)
    rate = n / max(time.perf_counter() - t0, 1e-9)
    eta = total / rate
    log(
        f"WARNING: scoring every train item: {total:,} pairs, about {_duration(eta)} at "
        f"{rate:,.0f} pairs/s (one batch measured); without --all_items/--max_items rank.py "
        f"scores {RETRIEVE} retrieved candidates per user instead"
    )
    return itertools.chain([first], blocks)


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def rank(
    run: Run,
    output: str,
    top_k: int = 10,
    candidates: str | None = None,
    split: str = "test",
    explain: bool = False,
    fmt: str = "parquet",
    max_items: int = 0,
    batch_size: int | None = None,
    as_of: str | int | None = None,
    exclude_seen: bool = False,
    events: readers.EventSource | None = None,
    log: Callable[[str], None] = logging.info,
    progress_every: float = 10.0,
    block_pairs: int = BLOCK_PAIRS,
    retrieve: int = RETRIEVE,
    evaluate: bool = False,
    evaluate_per_user: bool = False,
    two_tower: str | None = None,
    max_users: int = 0,
    retrieval_tables: str | None = None,
) -> dict[str, Any]:
    """Scores the candidates, writes each user's top k to `output`; returns a summary.

    Users are ranked as of `as_of` (default: `split`): valid or test (the split's start: every
    user with an earlier event, with the history a training example at that time would hold)
    or end (after the last event); with `events` (a raw log of the dataset's source), as of any
    time `as_of` (unix s), histories rebuilt from that log (see asof.py). Without `candidates`,
    every such user gets `retrieve` candidates from the non-learned retriever (two-stage:
    candidates.RetrievedCandidates); with `retrieve` = 0 or `max_items` > 0 every user is
    scored against every train item (the `max_items` most frequent if > 0), announced with the
    number of pairs and the time it will take, measured on one batch. Either way without the
    items the user had already interacted with if `exclude_seen`. `log` gets the plan and a
    progress line (pairs done, rate, ETA) every `progress_every` seconds.

    Columns: user_id, rank (1 = best), item_id (raw ids), score (the model's probability, as in
    evaluation). Ties break by item id, ascending. With `explain` (logit units, see
    influence.py): behaviour_<type> (logit drop without that type's events), extractor_<name>
    (w_j z_j), event{1,2,3}_{item,behaviour,position,seconds_before,influence} (the events whose
    removal lowers the logit most; seconds_before = ranking_time - the event's raw time, in
    seconds) and ranking_time (the time the history is seen from; null for users without one).
    Contexts without raw event times (no ranking state, or one written before hist_ts.npy, e.g.
    synthetic data) give event{k}_gap_bucket_seconds_min instead of seconds_before: the lower
    bound of the event's log2 time-gap bucket, not the real gap.

    `retrieval_tables`: a folder whose saved retrieval tables are reused (if built from the
    same histories and settings; else they are built and saved there).
    `max_users` > 0 ranks only that many of the users, spread evenly over them (the retrieval
    tables still come from every user): a sample to time or check a large run.
    `two_tower`: a trained two-tower retriever's workdir, whose learned source joins the
    retrieval (tools/train_retriever.py). With `evaluate` the summary's "evaluation" holds the
    top k's metrics against the split's positives beside the retriever's single-source lists
    (`_evaluate`), with `evaluate_per_user` also every user's values
    (tools/ranking_quality.py's intervals).
    """
    if top_k < 1:
        raise DataError(f"--top_k must be at least 1, got {top_k}")
    if batch_size is not None and batch_size < 1:
        raise DataError(f"--batch_size must be positive, got {batch_size}")
    if evaluate and (events is not None or str(as_of or split) not in ("valid", "test")):
        raise DataError("--evaluate needs --as_of=valid or test (the split's positives)")
    if max_items < 0:
        raise DataError(f"--max_items must be 0 (all) or more, got {max_items}")
    t0 = time.perf_counter()
    when = as_of or split
    log_counts: dict[str, int] = {}
    if events is not None:
        try:
            when = int(when)
        except ValueError:
            raise DataError(f"--as_of must be a unix time with --events, not {when!r}") from None
        ctx, log_counts = contexts_from_log(run.dataset, events, when)
    else:
        # Without the behaviour types the run was trained without, as its training histories.
        ctx = load_contexts(run.dataset, str(when))
    if jax.process_count() > 1 and explain:
        raise DataError("--explain ranks in one process; run it without JAX_NUM_PROCESSES")
    everyone = ctx
    if max_users < 0:
        raise DataError(f"--max_users must be 0 (all) or more, got {max_users}")
    ctx = _share(_sample(ctx, max_users))  # several processes: each ranks every P-th user
    if retrieve < 0:
        raise DataError(f"--retrieve_n must be 0 (every train item) or more, got {retrieve}")
    n_users = len(np.unique(ctx.user_key[ctx.in_split]))  # this process's share
    at = f" as of {when} ({_when(int(ctx.timestamp.max()))} UTC)" if len(ctx.timestamp) else ""
    all_items = not candidates and (retrieve == 0 or max_items > 0)
    retrieved = not candidates and not all_items
    if candidates:
        cands = _file_share(file_candidates(run, candidates, everyone))
        total, blocks, counts = len(cands), _file_blocks(cands, block_pairs), cands.counts
        what = f"candidates from {candidates}{at}"
    elif retrieved:
        log(f"retrieving {retrieve} candidates for each of {n_users:,} users{at}")
        t1 = time.perf_counter()
        # The tables come from every user's history (each process's own share of the users
        # gets candidates): counted over all of them.
        builders = int(np.count_nonzero(everyone.in_split))
        counted = Progress(builders, log, progress_every, verb="counted", unit="users")
        got = RetrievedCandidates(
            run, everyone, retrieve, exclude_seen, counted, ctx.in_split, two_tower,
            retrieval_tables,
        )  # fmt: skip
        log(f"retrieval tables built in {time.perf_counter() - t1:.1f} s")
        total, blocks, counts = len(got), got.blocks(block_pairs), got.counts
        what = f"{n_users:,} users{at}, up to {retrieve} retrieved candidates each"
    else:
        default = DefaultCandidates(run, ctx, max_items, exclude_seen)
        total, blocks, counts = len(default), default.blocks(block_pairs), default.counts
        what = f"{n_users:,} users{at}, {counts['candidate_items']:,} train items each" + (
            f", {counts['seen_pairs_excluded']:,} seen pairs excluded" if exclude_seen else ""
        )
    log(f"scoring {'up to ' if not (candidates or all_items) else ''}{total:,} pairs: {what}")
    if all_items:
        blocks = _announce(run, blocks, total, batch_size, log)
    # What the blocks are scored with: a rerun with the same settings resumes (progress.py).
    settings = {
        "workdir": os.path.abspath(run.workdir),
        "step": run.step,
        # The step's folder as written (a retrained run's step N is another), the data's ids.
        "checkpoint": file_identity(os.path.join(checkpoint_dir(run.workdir), str(run.step))),
        "objective": getattr(run, "objective", None),
        "data": os.path.abspath(run.dataset.path),
        "data_fingerprint": run.dataset.fingerprint,
        "as_of": when,
        "events": [file_identity(f.path) for f in events.files] if events is not None else None,
        "candidates": file_identity(candidates),
        "two_tower": file_identity(os.path.join(two_tower, "meta.json")) if two_tower else None,
        "top_k": top_k,
        "max_items": max_items,
        "retrieve": retrieve,
        "exclude_seen": exclude_seen,
        "max_users": max_users,
        "block_pairs": block_pairs,
        "batch": global_batch(run, batch_size),
        "processes": jax.process_count(),
    }
    store = BlockStore(output, settings, jax.process_index(), log)
    t1 = time.perf_counter()
    scored: list[int] = []
    reused: list[int] = []
    cands, prob, ranks = _score_top_k(
        run, ctx, _counted(blocks, scored), total, top_k, batch_size, log, progress_every, store,
        reused,
    )  # fmt: skip
    t_score = time.perf_counter() - t1
    total = sum(scored)
    rows = np.arange(len(cands))
    cols = {
        "user_id": pa.array(cands.user_out[rows].tolist()),
        "rank": pa.array(ranks, pa.int32()),
        "item_id": pa.array(cands.item_out[rows].tolist()),
        "score": pa.array(prob[rows], pa.float32()),
    }
    if explain:
        gather = lambda r: cands.gather(rows[r])
        secs = cands.seconds_before(rows)
        cols.update(influence.explain_columns(run, len(rows), gather, secs, log))
        c = cands.ctx_row[rows]  # users without a context (user_key -1) have no ranking time
        cols["ranking_time"] = pa.array(cands.ctx.timestamp[c], mask=cands.ctx.user_key[c] < 0)
    if jax.process_count() > 1:
        _write_parts(pa.table(cols), output, fmt)
    else:
        write_table(pa.table(cols), output, fmt)
    store.finish()  # the output is written: the kept blocks go
    evaluation = {}
    if evaluate:
        lists = got.retriever.lists(got.part, top_k) if retrieved else {}
        who = got.part.user_key if retrieved else None
        out = (cands.user_out[rows], cands.item_out[rows], ranks)
        evaluation = _evaluate(run, str(when), *out, top_k, lists, who, evaluate_per_user)
    return {
        **({"evaluation": evaluation} if evaluate else {}),
        "step": run.step,
        "as_of": when,
        "users": len(np.unique(cands.user_out)) if len(cands) else 0,
        "pairs_scored": total,
        "pairs_resumed": sum(reused),  # of pairs_scored: read back from OUTPUT.progress/
        "rows_written": len(rows),
        **counts,
        **log_counts,
        "seconds": round(time.perf_counter() - t0, 2),
        "scoring_seconds": round(t_score, 2),
        "candidates_per_s": round((total - sum(reused)) / max(t_score, 1e-9), 1),
    }
