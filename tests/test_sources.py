"""Tests of what the data sources share (qanchor_lab.sources.common), the bring-your-own loader's leakage
check (qanchor_lab.sources.byo) and the hand-built example shop (qanchor_lab.sources.example)."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from qanchor_lab.data import DataValidationError, save_world
from qanchor_lab.schema import SCHEMA_VERSION
from qanchor_lab.sources import byo
from qanchor_lab.sources.common import check_split_sizes, ensure_saved, saved_matches
from qanchor_lab.sources.example import ITEMS, shop_log


@pytest.fixture(scope="module")
def shop():
    """(tables, manifest) of the default example shop."""
    return shop_log(120, seed=0)


def _tables(shop):
    return {k: v.copy() for k, v in shop[0].items()}


# ---------------------------------------------------------------------------------------------------
# sources.common


def test_ensure_saved_reuses_only_a_matching_manifest(shop, tmp_path):
    """Reused when schema version, the source's version and the config all match; rebuilt otherwise."""
    tables, manifest = shop
    world = byo.load(tables, manifest=manifest)
    world.manifest = {**world.manifest, "config": {"seed": 0}, "source_version": 3}
    key = {"config": {"seed": 0}, "source_version": 3}
    builds = []

    def build():
        builds.append(1)
        return world

    out = tmp_path / "w"
    assert not saved_matches(out, key)                     # nothing there yet: built and saved
    ensure_saved(out, key, build)
    assert builds == [1] and saved_matches(out, key)
    ensure_saved(out, key, build)
    assert builds == [1]                                  # reused
    for other in ({**key, "source_version": 4}, {**key, "config": {"seed": 1}}):
        assert not saved_matches(out, other)
    saved = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**saved, "schema_version": SCHEMA_VERSION - 1}))
    assert not saved_matches(out, key)
    assert ensure_saved(out, key, build).manifest["schema_version"] == SCHEMA_VERSION
    assert builds == [1, 1] and saved_matches(out, key)   # rebuilt and saved over the stale one


def test_check_split_sizes_names_the_settings_and_counts():
    check_split_sizes({"pretrain": 1, "pretrain_val": 1, "tune": 1, "test": 1}, {"n": 4}, owner="X")
    with pytest.raises(ValueError, match=r"^X: n=4, share=0\.9 leave split\(s\) pretrain, test without users "
                                         r"\(pretrain 0, pretrain_val 2, tune 2, test 0\)"):
        check_split_sizes({"pretrain": 0, "pretrain_val": 2, "tune": 2, "test": 0}, {"n": 4, "share": 0.9}, owner="X")


# ---------------------------------------------------------------------------------------------------
# byo: no pre-training query is a task query


def test_byo_refuses_qa_that_asks_a_task_query(shop):
    tables = _tables(shop)
    task_q = tables["tasks"]["query"].iloc[0]
    qa = tables["qa"]
    sel = (qa["intent"] == "returns") & qa["query"].str.startswith("Does")
    qa.loc[sel, "query"] = "  " + task_q.upper() + " "            # case and surrounding whitespace do not hide it
    with pytest.raises(DataValidationError, match=rf"qa: {int(sel.sum())} row\(s\) ask a downstream task's query "
                                                  rf"verbatim: {re.escape(repr(task_q))} \(task 'returns_next_month': "
                                                  rf"{int(sel.sum())} qa row\(s\)\)"):
        byo.load(tables, manifest=shop[1])
    byo.load(_tables(shop), manifest=shop[1])                      # the example as shipped passes
    byo.check_task_queries_unseen(qa, tables["tasks"].iloc[0:0])     # no tasks: nothing to leak


def test_saved_worlds_pass_the_task_query_check(shop, tmp_path):
    """A saved world loaded as your own tables (pipeline.load_dataset) goes through the same check."""
    tables, manifest = shop
    world = byo.load(tables, manifest=manifest)
    back = byo.load(save_world(world, tmp_path / "w"))
    assert len(back.qa) == len(world.qa)


# ---------------------------------------------------------------------------------------------------
# the example shop


@pytest.mark.parametrize("n_users", [120, 200])
def test_example_tune_and_test_users_share_favourite_items(n_users):
    """Favourite items cycle with the user index; the tune/test splits must not (they alternated once, and
    tune and test users then had disjoint favourites)."""
    tables, _ = shop_log(n_users, seed=0)
    users = tables["users"].assign(fav=[ITEMS[i % len(ITEMS)][0] for i in range(n_users)])
    fav = users.groupby("split")["fav"].agg(set)
    assert fav["tune"] == fav["test"] == {name for name, _ in ITEMS}
    assert users.groupby("split").size().to_dict() == {
        "pretrain": n_users * 2 // 5 - n_users * 2 // 5 // 5, "pretrain_val": n_users * 2 // 5 // 5,
        "tune": (n_users - n_users * 2 // 5 + 1) // 2, "test": (n_users - n_users * 2 // 5) // 2}


def test_example_is_deterministic_and_keeps_its_populations():
    a, _ = shop_log(120, seed=0)
    b, _ = shop_log(120, seed=0)
    for name in a:
        pd.testing.assert_frame_equal(a[name], b[name])
    n_pre = 120 * 2 // 5
    assert (a["users"]["population"].iloc[:n_pre] == "pretrain").all()      # the first users pre-train
    assert (a["users"]["population"].iloc[n_pre:] == "downstream").all()
    c, _ = shop_log(120, seed=1)
    assert not a["users"]["split"].equals(c["users"]["split"])


def test_derived_qa_leaves_out_a_template_that_asks_a_task_query(shop, tmp_path, capsys):
    """Without a qa table the demo derives QA from the log (pipeline.load_dataset): where a derived query happens
    to word a task's query, those rows are left out and counted, so pre-training never asks a task's question."""
    from qanchor_lab.pipeline import load_dataset

    tables = {k: v for k, v in _tables(shop).items() if k != "qa"}
    d = tmp_path / "no_qa"
    d.mkdir()
    for name, df in tables.items():
        df.to_csv(d / f"{name}.csv", index=False)
    derived = load_dataset(d).qa
    asked = derived["query"].value_counts().index[0]            # the most asked derived query, as a task's query
    tables["tasks"].loc[0, "query"] = f" {asked.upper()}  "
    tables["tasks"].to_csv(d / "tasks.csv", index=False)
    capsys.readouterr()
    world = load_dataset(d)
    n = int((derived["query"] == asked).sum())
    assert len(world.qa) == len(derived) - n and asked not in set(world.qa["query"])
    assert f"left out {n} that asked a task's query verbatim" in capsys.readouterr().out
