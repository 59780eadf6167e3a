"""Candidate (user, item) pairs to score: from a CSV (plain or gzip'd)/Parquet file of raw ids
(mapped through the saved vocabularies; malformed rows and binary files raise naming the line or
the file, never echoing raw bytes), by default N per ranked user from the non-learned retriever
(`RetrievedCandidates`), or every ranked user against every item that is a target of a training
example (`DefaultCandidates`), optionally capped to the most frequent ones; the last two
without the items each user had already interacted with on request.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import os
import sys
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from influence_jax.data import rank_state, vocab
from influence_jax.data.history import NO_HISTORY
from influence_jax.data.idmaps import IdMaps
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, DataError
from influence_jax.ranking.contexts import Contexts, item_rows
from influence_jax.scoring import Run


@dataclasses.dataclass
class Candidates:
    """(user, item) pairs to score: each pair's context row and item row, and its raw ids."""

    ctx: Contexts
    items: np.ndarray  # [I, Fi] item feature rows
    ctx_row: np.ndarray  # [N] row of `ctx` per pair
    item_row: np.ndarray  # [N] row of `items` per pair
    user_out: np.ndarray  # [N] raw user id (output)
    item_out: np.ndarray  # [N] raw item id (output)
    counts: dict[str, int]

    def __len__(self) -> int:
        return len(self.ctx_row)

    def gather(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        c = self.ctx_row[rows]
        return {
            "user": self.ctx.user[c],
            "item": self.items[self.item_row[rows]],
            "hist": self.ctx.hist[c],
        }

    def seconds_before(self, rows: np.ndarray) -> np.ndarray | None:
        """[len(rows), L] int64: the ranking time minus each history event's raw time (s), 0 in
        empty slots; None when the contexts know only the time-gap buckets."""
        if self.ctx.hist_time is None:
            return None
        c = self.ctx_row[rows]
        t = self.ctx.hist_time[c]
        return np.where(t != NO_HISTORY, self.ctx.timestamp[c][:, None] - t, 0)


def _parse_ids(values: pa.Array, integer: bool, path: str, lines: Callable, col: str):
    """String ids -> numpy (int64 when the vocabulary has integer ids); a bad one raises."""
    s = pc.utf8_trim_whitespace(values.cast(pa.string()))
    ok = pc.fill_null(pc.greater(pc.utf8_length(s), 0), False)
    if integer:
        ok = pc.and_(ok, pc.fill_null(pc.match_substring_regex(s, r"^[+-]?[0-9]{1,18}$"), False))
    ok = np.asarray(ok)
    if not ok.all():
        i = int(np.argmin(ok))
        what = "an integer id" if integer else "a non-empty id"
        raise DataError(f"{path}:{lines(i)}: {col} must be {what}, got {_quote(values[i].as_py())}")
    if integer:
        return np.asarray(pc.replace_substring_regex(s, r"^\+", "").cast(pa.int64()))
    return np.asarray(s.to_pylist(), object)


_SNIFF_BYTES = 64 << 10  # the start of a candidates file checked for binary content
_QUOTE_CHARS = 60  # at most this much of a row's text is quoted in an error


def _quote(value: object, limit: int = _QUOTE_CHARS) -> str:
    """repr(value), cut to `limit` characters: never raw bytes or a whole line on the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _printable(message: str, limit: int = 300) -> str:
    """A library's error message with control and undecodable characters escaped, cut short."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _not_text(path: str, head: bytes, what: str = "") -> None:
    """Raises DataError if `head` (the start of a file) holds NUL bytes or invalid UTF-8."""
    why, nul = None, head.find(b"\0")
    if nul >= 0:
        why = f"a NUL byte at byte {nul}"
    else:
        try:
            head.decode("utf-8")
        except UnicodeDecodeError as e:
            if e.start < len(head) - 3:  # not just a character cut by the end of the sniff
                why = f"invalid UTF-8 at byte {e.start}"
    if why:
        raise DataError(
            f"{path}: not a UTF-8 CSV or a Parquet file ({what}{why}); candidates are a CSV "
            "with a user_id,item_id header (optionally gzip'd) or a Parquet file"
        )


def _sniff(path: str) -> str:
    """The kind of a candidates file by its first bytes: "parquet", "gzip" (a gzip'd CSV) or
    "csv"; a binary file raises DataError."""
    with open(path, "rb") as f:
        head = f.read(_SNIFF_BYTES)
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path) as g:
                head = g.read(_SNIFF_BYTES)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path}: a gzip file that cannot be decompressed ({e})") from None
        _not_text(path, head, "after gzip decompression: ")
        return "gzip"
    _not_text(path, head)
    return "csv"


@contextlib.contextmanager
def _undecodable_rows() -> Iterator[list[BaseException]]:
    """Collects the UnicodeDecodeErrors that pyarrow hits (and would print as "Exception
    ignored") while it hands a malformed row that is not UTF-8 to the invalid-row handler."""
    caught: list[BaseException] = []
    old = sys.unraisablehook

    def hook(u):
        if isinstance(u.exc_value, UnicodeDecodeError):
            caught.append(u.exc_value)
        else:
            old(u)

    sys.unraisablehook = hook
    try:
        yield caught
    finally:
        sys.unraisablehook = old


def read_candidate_ids(path: str, maps: IdMaps) -> tuple[np.ndarray, np.ndarray]:
    """(raw user ids, raw item ids) of a CSV (with a header line; plain or gzip'd) or Parquet
    file, told apart by their first bytes.

    Blank CSV lines are skipped; any other malformed row raises a DataError naming its line, and
    a binary file (NUL bytes or invalid UTF-8 near its start) one naming the file.
    """
    if os.path.isdir(path):
        raise DataError(f"{path}: is a folder, not a candidates file (CSV or Parquet)")
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such candidates file")
    kind = _sniff(path)
    cols, parquet = ["user_id", "item_id"], kind == "parquet"
    skipped: list[int] = []
    try:
        if parquet:
            t = pq.read_table(path)
        else:
            with _undecodable_rows() as undecodable:
                t = pcsv.read_csv(
                    pa.input_stream(path, compression="gzip" if kind == "gzip" else None),
                    read_options=pcsv.ReadOptions(use_threads=False),
                    parse_options=pcsv.ParseOptions(
                        ignore_empty_lines=False,
                        invalid_row_handler=lambda row: skipped.append(row.number) or "skip",
                    ),
                    convert_options=pcsv.ConvertOptions(
                        column_types={c: pa.string() for c in cols}
                    ),
                )
    except (pa.ArrowInvalid, OSError, EOFError, zlib.error) as e:
        if not parquet and undecodable:
            raise DataError(
                f"{path}: not a UTF-8 CSV or a Parquet file (a malformed row is not UTF-8 text)"
            ) from None
        raise DataError(f"{path}: cannot read candidates ({_printable(str(e))})") from None
    if skipped:
        raise DataError(f"{path}:{min(skipped)}: wrong number of fields; expected user_id,item_id")
    missing = [c for c in cols if c not in t.column_names]
    if missing:
        raise DataError(f"{path}: missing column(s) {missing}; the file has {t.column_names}")
    u, i = (t.column(c).combine_chunks().cast(pa.string()) for c in cols)
    blank = np.asarray(pc.fill_null(pc.equal(pc.binary_join_element_wise(u, i, ""), ""), True))
    rows = np.flatnonzero(~blank) if not parquet else np.arange(t.num_rows)
    if not len(rows):
        raise DataError(f"{path}: no candidate rows")
    # Line of data row r: the header is line 1 and no line was skipped.
    lines = (lambda r: f"row {rows[r] + 1}") if parquet else (lambda r: rows[r] + 2)
    take = pa.array(rows)
    users = _parse_ids(u.take(take), maps.integer("user_key"), path, lines, "user_id")
    items = _parse_ids(i.take(take), maps.integer("item_id"), path, lines, "item_id")
    return users, items


def _candidates(
    run: Run, ctx: Contexts, ctx_row, item_idx, user_out, item_out, counts
) -> Candidates:
    ids, inverse = np.unique(item_idx, return_inverse=True)
    items, lacking = item_rows(run.dataset, ids)
    counts["items_without_features"] = int(lacking.sum())
    return Candidates(ctx, items, ctx_row, inverse, user_out, item_out, counts)


def _add_contexts(ctx: Contexts, user: np.ndarray) -> Contexts:
    """`ctx` plus one context per row of `user` (features), with an empty history."""
    n = len(user)
    times = ctx.hist_time
    if times is not None:
        times = np.concatenate([times, np.full((n, times.shape[1]), NO_HISTORY, np.int64)])
    return Contexts(
        np.r_[ctx.user_key, np.full(n, -1)],
        np.concatenate([ctx.user, user]),
        np.concatenate([ctx.hist, np.zeros((n,) + ctx.hist.shape[1:], np.int32)]),
        np.r_[ctx.timestamp, np.zeros(n, np.int64)],
        np.r_[ctx.in_split, np.zeros(n, bool)],
        hist_time=times,
    )


def file_candidates(run: Run, path: str, ctx: Contexts) -> Candidates:
    """Pairs from a candidates file (repeats dropped); unknown ids go through the OOV ids."""
    maps = run.dataset.id_maps
    user_raw, item_raw = read_candidate_ids(path, maps)
    n_in = len(user_raw)
    users, u_inv = np.unique(user_raw, return_inverse=True)
    _, i_inv = np.unique(item_raw, return_inverse=True)
    first = np.sort(np.unique(u_inv * (i_inv.max() + 1) + i_inv, return_index=True)[1])
    user_raw, item_raw, u_inv = user_raw[first], item_raw[first], u_inv[first]
    keys, known = maps.user_keys(users)
    pos, has_ctx = ctx.find(keys)
    has_ctx &= known
    # A user without a context: its user_id (OOV when unknown), other fields OOV, no history.
    extra = np.flatnonzero(~has_ctx)
    user = np.full((len(extra), len(run.schema.user_fields)), OOV_ID, np.int32)
    names = [f.name for f in run.schema.user_fields]
    if "user_id" in names:
        uid = maps.lookup("user_id", users[extra][known[extra]])
        user[known[extra], names.index("user_id")] = uid
    row = np.where(has_ctx, pos, 0)
    row[extra] = len(ctx.user_key) + np.arange(len(extra))
    item_idx = maps.lookup("item_id", item_raw)
    counts = {
        "candidate_rows": n_in,
        "duplicate_pairs": n_in - len(user_raw),
        "unknown_users": int((~known).sum()),
        "unknown_user_pairs": int((~known[u_inv]).sum()),
        "users_without_history": int((known & ~has_ctx).sum()),
        "unknown_items": len(np.unique(item_raw[item_idx == OOV_ID])),
        "unknown_item_pairs": int((item_idx == OOV_ID).sum()),
    }
    ctx = _add_contexts(ctx, user)
    return _candidates(run, ctx, row[u_inv], item_idx, user_raw, item_raw, counts)


def train_items(run: Run, max_items: int = 0) -> tuple[np.ndarray, int]:
    """(sorted item_id indices, number of train items): the items that are targets (positive or
    sampled negative) of training examples; with `max_items` > 0 only that many most frequent."""
    ids = run.dataset.store("train").column("item")[:, run.schema.item_index("item_id")]
    ids, n = np.unique(ids[ids >= NUM_RESERVED], return_counts=True)
    if max_items > 0:
        return np.sort(ids[np.lexsort((ids, -n))[:max_items]]), len(ids)
    return ids, len(ids)


def seen_keys(run: Run, ctx: Contexts, n_ids: int) -> np.ndarray:
    """Sorted user_key * n_ids + item_id of the pairs each ranked user interacted with before
    the ranking time (rank_state/seen; without a ranking state: the items in the history)."""
    if ctx.seen is not None:
        return ctx.seen
    if run.dataset.has_rank_state:
        before = int(ctx.timestamp.max()) if len(ctx.timestamp) else 0
        return rank_state.seen_keys(run.data_path, before, n_ids)
    h = ctx.hist[..., run.schema.hist_index("item_id")]
    keys = ctx.user_key[:, None].astype(np.int64) * n_ids + h
    return np.unique(keys[h >= NUM_RESERVED])


def _pairs(source: Any, ctx_row: np.ndarray, item_row: np.ndarray) -> Candidates:
    """Pairs of a candidate source that holds one item table for all its blocks (ctx, items,
    maps, item_raw: raw id per item row, counts)."""
    return Candidates(
        source.ctx,
        source.items,
        ctx_row,
        item_row,
        source.maps.user_raw(source.ctx.user_key[ctx_row]),
        source.item_raw[item_row],
        source.counts,
    )


class DefaultCandidates:
    """Each ranked user x every train item (see `train_items`), less the user's seen items if
    `exclude_seen`, produced in blocks of whole users so memory stays bounded."""

    def __init__(self, run: Run, ctx: Contexts, max_items: int = 0, exclude_seen: bool = False):
        self.ctx, self.maps = ctx, run.dataset.id_maps
        self.top, n_train = train_items(run, max_items)
        self.items, lacking = item_rows(run.dataset, self.top)
        self.item_raw = self.maps.raw("item_id", self.top)[0]
        self.users = np.flatnonzero(ctx.in_split)
        self.n_ids = run.schema.vocab_sizes["item_id"]
        self.seen: np.ndarray | None = None
        if exclude_seen and len(self.users) and len(self.top):
            seen = seen_keys(run, ctx, self.n_ids)
            u, i = np.divmod(seen, self.n_ids)
            self.seen = seen[np.isin(i, self.top) & np.isin(u, ctx.user_key[self.users])]
        excluded = 0 if self.seen is None else len(self.seen)
        self.total = len(self.users) * len(self.top) - excluded
        self.counts = {
            "candidate_items": len(self.top),
            "train_items": n_train,
            "seen_pairs_excluded": excluded,
            "items_without_features": int(lacking.sum()),
        }

    def __len__(self) -> int:
        return self.total

    def blocks(self, pairs_per_block: int) -> Iterator[Candidates]:
        """Candidates of consecutive users (in user_key order), about `pairs_per_block` each."""
        n_items = len(self.top)
        per = max(1, pairs_per_block // max(n_items, 1))
        for a in range(0, len(self.users) if n_items else 0, per):
            users = self.users[a : a + per]
            ctx_row = np.repeat(users, n_items)
            item_row = np.tile(np.arange(n_items), len(users))
            if self.seen is not None and len(self.seen):
                key = self.ctx.user_key[ctx_row] * self.n_ids + self.top[item_row]
                keep = ~vocab.positions(self.seen, key)[1]
                ctx_row, item_row = ctx_row[keep], item_row[keep]
            yield _pairs(self, ctx_row, item_row)


class RetrievedCandidates:
    """Each ranked user x `n` candidates of the non-learned retriever (influence_jax/retrieval:
    co-visitation, the user's recent items, popular in the user's categories and overall),
    built from the ranked users' own histories as of the ranking time, less the user's seen
    items if `exclude_seen`; produced per chunk of users. A user without history gets the
    popular items. With `two_tower` (a retriever's workdir, tools/train_retriever.py) the
    learned source joins them. With `tables` (a folder) the sources' tables are loaded from it
    when it holds those of the same histories and settings, else built and saved there."""

    def __init__(
        self,
        run: Run,
        ctx: Contexts,
        n: int,
        exclude_seen: bool = False,
        progress: Callable[[int], None] | None = None,
        ranked: np.ndarray | None = None,
        two_tower: str | None = None,
        tables: str | None = None,
    ):
        """`ranked` [len(ctx)] bool: the users to make candidates for (default: ctx.in_split);
        the retriever's tables are built from every user of ctx.in_split either way."""
        from influence_jax import retrieval

        self.ctx, self.maps, self.n = ctx, run.dataset.id_maps, n
        users = np.flatnonzero(ctx.in_split)
        times = None if ctx.hist_time is None else ctx.hist_time[users]
        h = retrieval.from_arrays(
            run.schema, ctx.user_key[users], ctx.hist[users], ctx.timestamp[users], times
        )
        learned = None
        if two_tower:
            from influence_jax.retrieval.two_tower import TwoTowerSource

            learned = TwoTowerSource(two_tower, run.data_path, run.schema)
        cfg = retrieval.RetrievalConfig()
        self.retriever = retrieval.Retriever(h, cfg, progress, learned, tables)
        mine = ctx.in_split if ranked is None else ranked
        self.part = h.select(np.isin(h.user_key, ctx.user_key[mine]))
        self.n_ids = run.schema.vocab_sizes["item_id"]
        self.seen = seen_keys(run, ctx, self.n_ids) if exclude_seen else None
        # One feature row per item id, so every block indexes the same table.
        self.items, self.lacking = item_rows(run.dataset, np.arange(self.n_ids))
        self.item_raw = self.maps.raw("item_id", np.arange(self.n_ids))[0]
        self.users = len(self.part)
        self.counts = {"retrieved_per_user": n, "items_without_features": 0}

    def __len__(self) -> int:
        """At most this many pairs (n per user; fewer where the sources run short)."""
        return self.users * self.n

    def blocks(self, pairs_per_block: int) -> Iterator[Candidates]:
        del pairs_per_block  # the retriever's chunks of users
        lacking = np.zeros(self.n_ids, bool)
        for user_key, items, _ in self.retriever.candidates(self.n, self.seen, self.part):
            rows, _ = self.ctx.find(user_key)
            r, c = np.nonzero(items != 0)
            ctx_row, item_row = rows[r], items[r, c].astype(np.int64)
            lacking[item_row] |= self.lacking[item_row]
            self.counts["items_without_features"] = int(lacking.sum())
            yield _pairs(self, ctx_row, item_row)


def default_candidates(
    run: Run, ctx: Contexts, max_items: int = 0, exclude_seen: bool = False
) -> Candidates:
    """All of `DefaultCandidates` as one block."""
    d = DefaultCandidates(run, ctx, max_items, exclude_seen)
    blocks = list(d.blocks(max(len(d.users) * len(d.top), 1)))
    if blocks:
        return blocks[0]
    empty = np.zeros(0, np.int64)
    return Candidates(ctx, d.items, empty, empty, empty, empty, d.counts)
