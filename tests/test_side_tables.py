"""Side tables of the generic events source (data/side.py): headerless tables, chosen columns,
the item table's category feeding the history, numeric buckets, multi-valued bags, and the
model pooling a bag into one embedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from influence_jax.data import prepare
from influence_jax.data.schema import NUM_RESERVED, OOV_ID, PAD_ID, DataError, Field, Schema
from influence_jax.models.layers import Embeddings
from tests.helpers import (
    SIDE_ITEMS,
    SIDE_LOG,
    SIDE_USERS,
    open_side_source,
    prepare_side_tables,
    rows,
    write,
)

# The log, tables and sources are shared with tests/test_serving.py (helpers).
LOG, ITEMS, USERS = SIDE_LOG, SIDE_ITEMS, SIDE_USERS
_open, _prepare = open_side_source, prepare_side_tables


def test_log_entities_missing_from_a_side_table_are_counted(tmp_path, caplog):
    src = _open(
        tmp_path,
        user_table=write(tmp_path / "users.csv", "1,30,FR\n2,55,DE\n"),  # no user 3
        user_table_names=("u", "age", "country"),
    )
    opts = prepare.PrepareOptions(
        target_behaviours=("buy",), neg_ratio=0, valid_start=500, test_start=650
    )
    with caplog.at_level("WARNING"):
        counts = prepare.prepare(src, str(tmp_path / "p"), opts).extra["counts"]
    assert counts["users_without_side_row"] == 1 and counts["items_without_side_row"] == 0
    assert "1 of 3 users in the log have no row in the user table" in caplog.text


def test_side_tables_numeric_bags_and_category(tmp_path):
    s = _prepare(tmp_path)
    assert [f.name for f in s.user_fields] == ["user_id", "age", "country"]
    assert [(f.name, f.vocab, f.bag) for f in s.item_fields] == [
        ("item_id", "item_id", ""),
        ("category", "category", ""),
        ("price", "price", ""),
        ("genres[0]", "genres", "genres"),
        ("genres[1]", "genres", "genres"),
    ]  # brand not chosen
    assert "category" in [f.name for f in s.hist_fields]  # from the item table
    assert s.extra["counts"]["bag_cells_cut_genres"] == 1  # B|C|D keeps B|C
    out = tmp_path / "p"
    train = rows(out, "train")  # buys at 250 (user 2, item 13) and 300 (user 1, item 12)
    items = {int(k): r for k, r in zip(train["item"][:, 0], train["item"], strict=True)}
    iv = prepare.Vocab.load(str(out), "item_id")
    i12, i13 = iv.lookup(np.array([12, 13]))
    # Price buckets fitted on the items with training events (10, 11, 12, 13 all before 500):
    # the median of 5, 20, 100 is 20, so 5 -> first bucket, 20 and 100 -> second; 13 missing.
    assert items[i12][2] == NUM_RESERVED + 1 and items[i13][2] == OOV_ID
    g = prepare.Vocab.load(str(out), "genres")
    assert items[i13][3:].tolist() == [g.lookup(np.array(["A"], object))[0], PAD_ID]
    assert items[i12][3:].tolist() == [PAD_ID, PAD_ID]  # no genres
    cats = prepare.Vocab.load(str(out), "category")
    assert items[i12][1] == cats.lookup(np.array([8]))[0]
    prices = prepare.Vocab.load(str(out), "price").keys
    assert prices[0] == -np.inf and prices[1] == 20.0  # each bucket's lower bound


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"item_fields": ("price", "colour")}, r"items\.csv: missing column\(s\) \['colour'\]"),
        ({"numeric_fields": ("price", "genres")}, "both numeric and multi-valued"),
        ({"numeric_fields": ("weight",)}, r"--numeric_fields names \['weight'\]"),
    ],
)
def test_bad_side_table_options_name_the_file_and_column(tmp_path, kw, match):
    base = dict(
        numeric_fields=("price",),
        item_fields=("price", "genres"),
    )
    base.update(kw)
    with pytest.raises(DataError, match=match):
        _open(tmp_path, **base)


def test_a_bag_pools_to_the_mean_of_its_ids_whatever_their_order():
    s = Schema(
        name="t",
        vocab_sizes={"item_id": 5, "g": 6, "behaviour": 3},
        user_fields=(Field("item_id", "item_id"),),
        item_fields=(
            Field("item_id", "item_id"),
            Field("g[0]", "g", "g"),
            Field("g[1]", "g", "g"),
            Field("g[2]", "g", "g"),
        ),
        hist_fields=(Field("item_id", "item_id"), Field("behaviour", "behaviour")),
        max_len=2,
        behaviour_types=("view",),
    )
    emb = Embeddings(s, 4)
    ids = jnp.array([[2, 3, 4, PAD_ID], [2, 4, 3, PAD_ID], [2, PAD_ID, PAD_ID, PAD_ID]])
    params = emb.init(jax.random.key(0), ids, s.item_fields)
    out = emb.apply(params, ids, s.item_fields)
    assert out.shape == (3, 2, 4)  # item_id and one pooled bag
    table = params["params"]["embed_g"]
    np.testing.assert_allclose(out[0, 1], (table[3] + table[4]) / 2, rtol=1e-6)
    np.testing.assert_allclose(out[0], out[1], rtol=1e-6)
    np.testing.assert_allclose(out[2, 1], 0.0)  # an empty bag


def test_the_cli_flags_reach_the_side_tables_and_the_cleaning_rules(tmp_path):
    import json

    from tests import helpers

    out = tmp_path / "data"
    r = helpers.run_tool(
        "prepare_data",
        "--source=events",
        f"--input={write(tmp_path / 'log.csv', LOG)}",
        "--user_col=u",
        "--item_col=i",
        "--behaviour_col=b",
        "--timestamp_col=t",
        "--behaviour_types=view,buy",
        f"--item_table={write(tmp_path / 'items.csv', ITEMS)}",
        "--item_table_names=i,price,genres,cat,brand",
        "--item_table_delimiter=;",
        "--item_fields=price,genres",
        "--item_category=cat",
        "--numeric_fields=price",
        "--multi_value_fields=genres",
        "--max_bag=2",
        "--min_user_events=3",
        "--target_behaviour=buy",
        "--neg_ratio=0",
        "--valid_start=500",
        "--test_start=650",
        f"--output={out}",
    )
    assert r.returncode == 0, r.stderr[-2000:]
    schema = json.loads((out / "schema.json").read_text())
    names = [f["name"] for f in schema["item_fields"]]
    assert names == ["item_id", "category", "price", "genres[0]", "genres[1]"]
    counts = schema["extra"]["counts"]
    assert counts["cleaning_users_below_min"] == 1  # user 2 has two events
    assert counts["cleaning_events_removed"] == 2
