"""Cleaning rules (data/cleaning.py): dropping fast users (bots) and rare users or items gives
the same dataset as deleting their rows from the log by hand, and the schema counts them."""

from __future__ import annotations

import numpy as np
import pytest

from influence_jax.data import prepare
from influence_jax.data.schema import DataError
from tests.helpers import LOG, rows, write
from tests.helpers import prepare_log as run

# User 99 views 200 times in 200 s: a crawler by any rate. Item 77 appears once (user 8).
BOT = "".join(f"99,{10 + i % 4},{1 + i % 4 // 2},pv,{300 + i}\n" for i in range(200))
RARE = "8,77,2,pv,700\n"


def _same(a, b) -> None:
    for s in prepare.SPLITS:
        ra, rb = rows(a, s), rows(b, s)
        assert ra.keys() == rb.keys()
        for k in ra:
            np.testing.assert_array_equal(ra[k], rb[k], err_msg=f"{s}.{k}")


def test_cleaning_equals_deleting_the_rows_by_hand(tmp_path):
    dirty = write(tmp_path / "dirty.csv", LOG + BOT + RARE)
    clean = write(tmp_path / "clean.csv", LOG)
    kw = dict(neg_ratio=1, seed=3)
    s = run(
        dirty,
        tmp_path / "a",
        max_user_events_per_day=100,
        min_item_events=2,
        **kw,
    )
    run(clean, tmp_path / "b", **kw)
    _same(tmp_path / "a", tmp_path / "b")
    c = s.extra["counts"]
    assert c["cleaning_users_over_rate"] == 1
    assert c["cleaning_events_of_users_over_rate"] == 200
    assert c["cleaning_items_below_min"] == 1
    assert c["cleaning_events_of_items_below_min"] == 1
    assert c["cleaning_events_removed"] == 201
    assert c["users"] == 3 and c["items"] == 4


def test_a_slow_user_stays_and_min_user_events_drops_rare_users(tmp_path):
    # User 9 has one event: dropped by min_user_events=2, kept by a rate rule it does not break.
    log = write(tmp_path / "log.csv", LOG)
    s = run(log, tmp_path / "a", max_user_events_per_day=10, min_user_events=2, neg_ratio=1)
    c = s.extra["counts"]
    assert c["cleaning_users_over_rate"] == 0  # 7 events over 900 s is 7 in a (minimum) day
    assert c["cleaning_users_below_min"] == 1 and c["cleaning_events_removed"] == 1
    assert c["users"] == 2


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"max_user_events_per_day": 0.0}, "max_user_events_per_day must be > 0"),
        ({"min_item_events": -1}, "min_item_events must be >= 0"),
        ({"min_user_events": 1000}, "drop every user"),
    ],
)
def test_bad_cleaning_options_name_the_flag(tmp_path, kw, match):
    log = write(tmp_path / "log.csv", LOG)
    with pytest.raises(DataError, match=match):
        run(log, tmp_path / "out", **kw)
    assert not (tmp_path / "out").exists()
