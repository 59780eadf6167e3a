"""Side-table features (user and item tables) -> id columns of the `user` / `item` arrays.

Three kinds of column (chosen per table with `SideTable.numeric` and `SideTable.multi`):
- categorical (the default): one id per distinct value, `min_count` as for ids;
- numeric (price, income): quantile buckets, `NUMERIC_BUCKETS` by default, fitted on the entities
  with a training-period event (`refit_numeric`; the whole log with `--vocab_period=all`); the
  vocabulary's keys are each bucket's lower bound; a blank or non-numeric value is OOV;
- multi-valued ("Action|Comedy", "1,4,8"): a bag of ids, one column per slot (`name[0]`,
  `name[1]`, ... sharing the vocabulary `name`, padded with 0), which the model pools into one
  embedding (`Field.bag`). Values keep their order in the cell; a cell with more values than
  `max_bag` keeps the first ones (the count cut is in the schema's counts).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from influence_jax.data.logio import SideTable, parse_float
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, PAD_ID, DataError, Field
from influence_jax.data.vocab import Vocab, ids_of, positions, take_keys, value_counts

NUMERIC_BUCKETS = 10


@dataclasses.dataclass
class Numeric:
    """A numeric column kept raw until its buckets are fitted on the training entities."""

    column: int  # index in the group's feature rows
    values: np.ndarray  # float64 per dense entity; NaN: missing
    buckets: int


def side_columns(
    table: SideTable,
    keys: np.ndarray | pa.Array,
    reserved: set[str],
    min_count,
    vocabs: dict[str, Vocab],
    fields: list[Field],
    numeric: list[Numeric],
    counts: dict[str, int],
) -> list[np.ndarray]:
    """Feature id columns for each dense entity in `keys` (appends to `fields`, `vocabs`).

    Args:
      min_count: name -> the minimum count of a categorical value.
      numeric: receives each numeric column (bucketed here over every entity; `refit_numeric`
        fits them again on the training period).
    """
    pos, found = positions(keys, table.key)
    out: list[np.ndarray] = []
    for name, values in table.features.items():
        if name in reserved or name in vocabs:
            raise DataError(f"side feature {name!r} clashes with another feature; rename it")
        if name in table.numeric:
            v, ok = parse_float(values)
            raw = _spread(np.where(ok, v, np.nan).astype(np.float64), pos, found, len(keys), np.nan)
            numeric.append(Numeric(len(fields), raw, table.numeric_buckets))
            col, vocabs[name] = bucketize(raw, np.ones(len(raw), bool), table.numeric_buckets)
            out.append(col)
            fields.append(Field(name, name))
        elif name in table.multi:
            sep = table.multi[name]
            cols, cut = _bag(name, values, sep, table.max_bag, min_count(name), vocabs)
            counts[f"bag_cells_cut_{name}"] = cut
            for k, c in enumerate(cols):
                out.append(_spread(c, pos, found, len(keys), PAD_ID))
                fields.append(Field(f"{name}[{k}]", name, bag=name))
        else:
            ids, vocabs[name] = _encode(values.cast(pa.string()), min_count(name))
            out.append(_spread(ids, pos, found, len(keys), OOV_ID))
            fields.append(Field(name, name))
    return out


def _spread(per_row: np.ndarray, pos: np.ndarray, found: np.ndarray, n: int, fill) -> np.ndarray:
    """A table row's values placed at their entities' positions (`positions(keys, table.key)`);
    `fill` for the entities the table does not have."""
    out = np.full(n, fill, per_row.dtype)
    out[pos[found]] = per_row[found]
    return out


def _encode(values: pa.Array, min_count: int) -> tuple[np.ndarray, Vocab]:
    """(int32 id of each value, OOV below `min_count`; the vocabulary of the kept values)."""
    vc = value_counts(values).sort_by("k")
    vocab_keys = vc.column("k").combine_chunks()
    ids = ids_of(np.asarray(vc.column("n")), min_count)
    vpos, vfound = positions(vocab_keys, values)
    vocab = Vocab(take_keys(vocab_keys, ids >= NUM_RESERVED))
    return np.where(vfound, ids[vpos], OOV_ID).astype(np.int32), vocab


def bucketize(values: np.ndarray, fit: np.ndarray, buckets: int) -> tuple[np.ndarray, Vocab]:
    """(ids, vocabulary): quantile buckets of `values` fitted on the rows `fit`; NaN -> OOV."""
    known = values[fit & np.isfinite(values)]
    if not len(known):
        edges = np.zeros(0)
    else:
        edges = np.unique(np.quantile(known, np.arange(1, buckets) / buckets))
    ids = (NUM_RESERVED + np.searchsorted(edges, values, side="right")).astype(np.int32)
    ids[~np.isfinite(values)] = OOV_ID
    return ids, Vocab(np.r_[-np.inf, edges])


def refit_numeric(
    rows: np.ndarray,
    numeric: list[Numeric],
    fit: np.ndarray,
    fields: list[Field],
    vocabs: dict[str, Vocab],
) -> None:
    """Buckets the numeric columns of `rows` again (in place), fitted on the entities `fit`."""
    for nm in numeric:
        name = fields[nm.column].name
        rows[:, nm.column], vocabs[name] = bucketize(nm.values, fit, nm.buckets)


def _split(values: pa.Array, sep: str) -> pa.ListArray:
    text = pc.utf8_trim_whitespace(values.cast(pa.string()).fill_null(""))
    parts = pc.split_pattern(text, pattern=sep)
    flat = pc.utf8_trim_whitespace(pc.list_flatten(parts))
    keep = pc.greater(pc.utf8_length(flat), 0)
    lengths = pc.list_value_length(parts).to_numpy(zero_copy_only=False)
    rows = np.repeat(np.arange(len(lengths)), lengths)
    kept_rows = rows[np.asarray(keep)]
    offsets = np.r_[0, np.cumsum(np.bincount(kept_rows, minlength=len(lengths)))]
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat.filter(keep))


def _bag(name, values, sep, max_bag, min_count, vocabs) -> tuple[list[np.ndarray], int]:
    """(one id column per bag slot, PAD_ID where a cell has fewer values; cells cut)."""
    lists = _split(values, sep)
    flat_ids, vocabs[name] = _encode(pc.list_flatten(lists), min_count)
    lengths = pc.list_value_length(lists).to_numpy(zero_copy_only=False)
    starts = np.r_[0, np.cumsum(lengths)[:-1]]
    width = int(min(max(lengths.max(initial=0), 1), max_bag))
    cols = []
    for k in range(width):
        has = lengths > k
        c = np.full(len(lengths), PAD_ID, np.int32)
        c[has] = flat_ids[starts[has] + k]
        cols.append(c)
    return cols, int((lengths > max_bag).sum())
