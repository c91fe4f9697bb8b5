"""The data contract for real logs (issue 10): each defect found converting real logs has a regression
test here, and a hand-built log (qanchor_lab.sources.example, not the synthetic generator) runs end to
end through the byo source, pre-training and evaluation."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from qanchor_lab import data as D
from qanchor_lab.data import DataValidationError
from qanchor_lab.evaluate import NO_ORACLE, evaluate_methods, oracle_available, results_markdown
from qanchor_lab.features import FeatureInputError, FeatureSpec, OutsideWindowWarning, serialize_users
from qanchor_lab.schema import SYNTHETIC_MODALITY_SPECS, ModalitySpec, World
from qanchor_lab.sources import byo, load_source
from qanchor_lab.sources.example import SHOP_MANIFEST, shop_log

T = pd.Timestamp


@pytest.fixture(scope="module")
def shop():
    """(tables, manifest, world) of the hand-built shop log."""
    tables, manifest = shop_log(120, seed=0)
    return tables, manifest, byo.load(tables, manifest=manifest)


def _tables(shop):
    return {k: v.copy() for k, v in shop[0].items()}


# ---------------------------------------------------------------------------------------------------
# modalities are declared by the dataset


def test_dataset_declares_its_modalities(shop):
    _, manifest, world = shop
    assert world.modalities == ("order", "review", "support")
    assert [s.unit for s in world.modality_specs] == ["USD", "", ""]
    # without a declaration: the names found in the events, by name, no unit, any sign
    tables = _tables(shop)
    plain = byo.load(tables)
    assert plain.modalities == ("order", "review", "support")
    assert all(s.unit == "" and s.amount == "any" for s in plain.modality_specs)
    # the synthetic world declares its four, and old synthetic manifests still read as them
    assert World(*[pd.DataFrame()] * 6, manifest={"generator_version": 1}).modality_specs == SYNTHETIC_MODALITY_SPECS


def test_undeclared_modality_and_bad_declarations_are_named(shop):
    tables = _tables(shop)
    tables["events"].loc[3, "modality"] = "wishlist"
    with pytest.raises(DataValidationError, match=r"'modality' has unknown value\(s\) 'wishlist'.*user\(s\) 'c0000'.*order, review, support"):
        byo.load(tables, manifest=SHOP_MANIFEST)
    bad = {**SHOP_MANIFEST, "modalities": [{"name": "order", "amount": "sometimes"}]}
    with pytest.raises(DataValidationError, match=r"amount='sometimes'; valid choices: 'positive'"):
        byo.load(_tables(shop), manifest=bad)
    with pytest.raises(ValueError, match=r"reserved for the tabular profile"):
        ModalitySpec("profile")
    from qanchor_lab.model import QAnchorConfig

    assert QAnchorConfig(modalities=("order", "review")).modalities == ("order", "review")
    with pytest.raises(ValueError, match=r"modality name 'two words' invalid"):
        QAnchorConfig(modalities=("two words",))


def test_saved_world_keeps_its_declarations(shop, tmp_path):
    _, _, world = shop
    tables = {k: v for k, v in vars(world).items() if k != "manifest"}
    tables["profiles"] = world.profiles  # has columns here
    D.save_world(world, tmp_path / "w")
    back = D.load_world(tmp_path / "w")
    assert back.modality_specs == world.modality_specs and back.history_window == world.history_window
    # the declared sign rule is checked when a saved world is read back
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    manifest["modalities"][0]["amount"] = "positive"
    (tmp_path / "w" / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataValidationError, match=r"must be > 0 for modality 'order'"):
        D.load_world(tmp_path / "w")


# ---------------------------------------------------------------------------------------------------
# refunds and units


def test_amount_sign_rules_follow_the_declaration(shop):
    tables, _, _ = shop
    events = tables["events"]
    refund_user = events.loc[events["amount"] < 0, "user_id"].iloc[0]
    positive = [{"name": "order", "amount": "positive"}, "review", "support"]
    with pytest.raises(DataValidationError, match=rf"'amount' must be > 0 for modality 'order'.*user '{refund_user}': -\d+.*amount='any'"):
        D.validate_events(events, modalities=positive)
    D.validate_events(events, modalities=SHOP_MANIFEST["modalities"])  # refunds declared: accepted
    bad = events.copy()
    bad.loc[bad["modality"] == "review", "amount"] = 3.0
    with pytest.raises(DataValidationError, match=r"must be 0 \(the modality carries no amounts\) for modality 'review'"):
        D.validate_events(bad, modalities=SHOP_MANIFEST["modalities"])


def test_serialisation_prints_the_declared_unit(shop):
    _, _, world = shop
    uid = world.events.loc[world.events["modality"] == "order", "user_id"].iloc[0]
    declared = serialize_users(world.events, world.profiles, [uid], modalities=world.modality_specs)[0]
    assert "Orders (" in declared and " USD" in declared and "CNY" not in declared
    bare = serialize_users(world.events, world.profiles, [uid])[0]
    assert "USD" not in bare and "CNY" not in bare and "Order (" in bare
    # the synthetic world keeps its currency because it declares it
    syn = pd.DataFrame({"user_id": ["u"], "modality": ["bill"], "timestamp": [T("2026-01-02")], "text": ["Paid"],
                        "amount": [12.5]})
    assert "Paid 12.5 CNY" in serialize_users(syn, None, ["u"], modalities=SYNTHETIC_MODALITY_SPECS)[0]


# ---------------------------------------------------------------------------------------------------
# duplicates, users without events


def test_exact_repeats_are_kept_and_counted(shop):
    tables, _, world = shop
    assert len(world.events) == len(tables["events"])  # nothing merged or dropped
    n_dup = int(tables["events"].duplicated().sum())
    assert n_dup > 0 and world.manifest["counts"]["duplicate_event_rows"] == n_dup
    ev = world.events
    dup_user = ev.loc[ev.duplicated(keep="first"), "user_id"].iloc[0]
    spec = FeatureSpec.fit_world(world)
    row = spec.frame(ev, world.profiles, [dup_user]).loc[dup_user]
    start, end = world.history_window
    mine = ev[(ev["user_id"] == dup_user) & (ev["modality"] == "order") & (ev["timestamp"] >= start) & (ev["timestamp"] < end)]
    assert row["order.count_log1p"] == pytest.approx(math.log1p(len(mine)), rel=1e-5)  # both repeats count


def test_users_without_events_are_real_users(shop):
    _, _, world = shop
    have = set(world.events["user_id"])
    quiet = [u for u in world.users["user_id"] if u not in have]
    assert quiet, "the example has profile-only users"
    no_review = [u for u in have if not ((world.events["user_id"] == u) & (world.events["modality"] == "review")).any()]
    assert no_review
    with pytest.raises(DataValidationError, match=r"have no events"):
        D.check_users_have_events(world.events, world.users)  # only on request
    D.check_world(world)  # the default accepts them


def test_users_without_a_profile_row_are_counted(shop):
    tables = _tables(shop)
    assert shop[2].manifest["counts"]["users_without_profile_row"] == int(
        (~tables["users"]["user_id"].isin(tables["profiles"]["user_id"])).sum())
    dropped = tables["profiles"]["user_id"].iloc[:3].tolist()
    tables["profiles"] = tables["profiles"].iloc[3:]
    world = byo.load(tables, manifest=shop[1])
    assert world.manifest["counts"]["users_without_profile_row"] == shop[2].manifest["counts"]["users_without_profile_row"] + 3
    assert FeatureSpec.fit_world(world).frame(world.events, world.profiles, dropped)["profile.missing"].eq(1).all()
    del tables["profiles"]
    assert byo.load(tables, manifest=shop[1]).manifest["counts"]["users_without_profile_row"] == len(tables["users"])


def test_profile_only_and_single_modality_users_get_finite_embeddings(tiny_model, small_world):
    w = small_world
    real = w.users_in("test")[0]
    bill_only = w.events[(w.events["user_id"] == real) & (w.events["modality"] == "bill")].assign(user_id="bill_only")
    events = pd.concat([w.events, bill_only], ignore_index=True)
    profiles = pd.concat([w.profiles, w.profiles[w.profiles["user_id"] == real].assign(user_id="profile_only")])
    ids = [real, "bill_only", "profile_only", "nothing_at_all"]
    store = tiny_model.behaviour(events, profiles, ids)
    batch = store.batch(store.indices(ids))
    assert not batch.masks["search"][1].any() and not any(batch.masks[m][2].any() for m in batch.masks)
    emb = tiny_model.eval().encode(store, ["Will this user churn?", "Will this user travel?"])  # (4, 2, d)
    assert emb.shape[:2] == (4, 2) and np.isfinite(emb).all()
    norms = np.linalg.norm(emb, axis=-1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-4)
    assert not np.allclose(emb[1], emb[2])  # the bill events reach the embedding
    alone = tiny_model.behaviour(events, profiles, ["profile_only", "nothing_at_all"])  # no event in the batch
    quiet = tiny_model.encode(alone, ["Will this user churn?"])  # (2, 1, d)
    np.testing.assert_allclose(quiet[:, 0], emb[2:, 0], rtol=1e-4, atol=1e-5)  # as in the mixed batch


# ---------------------------------------------------------------------------------------------------
# windows


def _spread_events():
    """One user with events over 200 days, another only at the start."""
    ts = [T("2025-01-01") + pd.Timedelta(days=d) for d in (0, 50, 120, 199)]
    return pd.DataFrame({"user_id": ["a"] * 4 + ["b"], "modality": ["x"] * 5,
                         "timestamp": ts + [T("2025-01-03")], "text": ["e"] * 5})


def test_feature_window_defaults_to_all_history_without_dropping():
    ev = _spread_events()
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideWindowWarning)
        spec = FeatureSpec.fit(ev, None)
    assert spec.history_days == 200 and spec.window_end == "2025-07-20T00:00:00"
    assert spec.events_before_window == spec.events_after_window == 0
    assert spec.frame(ev, None, ["a"]).loc["a", "x.count_log1p"] == pytest.approx(math.log(5))


def test_an_inferred_window_says_which_other_users_events_it_leaves_out(monkeypatch):
    """The window fitted on the reference users reads every user: another user's later days are warned about."""
    from qanchor_lab import features

    monkeypatch.setattr(features, "_WARNED", set())
    ev = pd.concat([_spread_events(), pd.DataFrame({"user_id": ["c", "c"], "modality": ["x", "x"], "text": ["e", "e"],
                                                    "timestamp": [T("2025-03-01"), T("2025-09-01")]})])
    with pytest.warns(OutsideWindowWarning, match=r"1 of the other \(non-reference\) users' 2 events fall outside "
                      r"the feature window \[2025-01-01 00:00:00, 2025-07-20 00:00:00\).*\(0 before, 1 at or after"):
        spec = FeatureSpec.fit(ev, None, user_ids=["a", "b"])
    assert spec.events_before_window == spec.events_after_window == 0     # the counts stay the reference users'
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideWindowWarning)
        FeatureSpec.fit(ev, None, user_ids=["a", "b"], window_end="2025-09-02")   # a window that covers them


def test_an_infinite_or_clashing_profile_value_is_named_not_spread():
    ev = _spread_events().assign(amount=[1.0, 2.0, np.inf, 3.0, 4.0])
    with pytest.raises(FeatureInputError, match=r"events.amount is inf at row 2 \(user 'a'\); it must be finite"):
        FeatureSpec.fit(ev, None)
    prof = pd.DataFrame({"user_id": ["a", "b"], "income": [1.0, -np.inf]})
    with pytest.raises(FeatureInputError, match=r"profiles.income is -inf for user 'b'"):
        FeatureSpec.fit(_spread_events(), prof)
    spec = FeatureSpec.fit(_spread_events(), prof.assign(income=[1.0, np.nan]))  # missing: filled, as before
    assert spec.frame(_spread_events(), prof.assign(income=[1.0, np.nan]), ["b"]).loc["b", "profile.income"] == 1.0
    with pytest.raises(FeatureInputError, match="column named 'missing'.*profile.missing"):   # one name, two features
        FeatureSpec.fit(_spread_events(), prof.rename(columns={"income": "missing"}).assign(missing=[1.0, 2.0]))


def test_declared_window_counts_and_warns_about_what_it_leaves_out(monkeypatch):
    from qanchor_lab import features

    monkeypatch.setattr(features, "_WARNED", set())  # each message is shown once per process
    ev = _spread_events()
    with pytest.warns(OutsideWindowWarning, match=r"3 of the reference users' 5 events fall outside.*\(3 before, 0 at or after"):
        spec = FeatureSpec.fit(ev, None, window_end="2025-07-20", history_days=90)
    assert (spec.events_before_window, spec.events_after_window) == (3, 0)
    with pytest.warns(OutsideWindowWarning, match=r"\(0 before, 2 at or after"):
        spec = FeatureSpec.fit(ev, None, window_start="2025-01-01", window_end="2025-03-01")
    assert spec.history_days == 59
    with warnings.catch_warnings():
        warnings.simplefilter("error", OutsideWindowWarning)  # the same message again: not repeated
        again = FeatureSpec.fit(ev, None, window_start="2025-01-01", window_end="2025-03-01")
    assert again.events_after_window == 2  # still counted on the spec
    with pytest.raises(ValueError, match="window_start or history_days, not both"):
        FeatureSpec.fit(ev, None, window_start="2025-01-01", history_days=30)


def test_the_declared_window_reaches_features_and_sequences(shop, tiny_model):
    from qanchor_lab.pipeline import DemoConfig, build_model

    _, _, world = shop
    spec = FeatureSpec.fit_world(world)
    assert spec.window == world.history_window
    assert spec.events_before_window > 0 and spec.events_after_window > 0
    cfg = replace(DemoConfig.fast(), text_encoder="hashing")
    model = build_model(world, cfg)
    assert model.config.modalities == world.modalities and model.feature_spec.window == world.history_window
    # a user whose only support ticket lies after the window has an empty support sequence
    ev = world.events
    late = ev[ev["timestamp"] >= world.history_window[1]]
    uid = next(u for u in late["user_id"] if not ((ev["user_id"] == u) & (ev["modality"] == "support")
                                                   & (ev["timestamp"] < world.history_window[1])).any())
    store = model.behaviour(ev, world.profiles, [uid])
    assert not store.batch([0]).masks["support"].any()


# ---------------------------------------------------------------------------------------------------
# text reaches the hand-crafted features


def test_a_status_in_the_text_counts_in_the_features(shop):
    _, _, world = shop
    spec = FeatureSpec.fit_world(world)
    assert "returned" in spec.words["order"]
    start, end = world.history_window
    ev = world.events[(world.events["timestamp"] >= start) & (world.events["timestamp"] < end)]
    n_returned = ev[ev["text"].str.contains("returned")].groupby("user_id").size()
    uid = n_returned.idxmax()
    value = spec.frame(world.events, world.profiles, [uid]).loc[uid, "order.word=returned.count_log1p"]
    assert value == pytest.approx(math.log1p(n_returned[uid]), rel=1e-5)


def test_refunds_are_features_and_keep_their_sign_in_sequences(shop):
    from qanchor_lab.behaviour import event_numeric_fields, sorted_events

    _, _, world = shop
    spec = FeatureSpec.fit_world(world)
    assert spec.refund_modalities == ["order"]
    start, end = world.history_window
    ev = world.events[(world.events["timestamp"] >= start) & (world.events["timestamp"] < end)]
    refunds = ev[ev["amount"] < 0].groupby("user_id")["amount"].agg(["size", "sum"])
    uid = refunds["size"].idxmax()
    row = spec.frame(world.events, world.profiles, [uid]).loc[uid]
    assert row["order.refund.count_log1p"] == pytest.approx(math.log1p(refunds.loc[uid, "size"]), rel=1e-5)
    assert row["order.refund.amount_sum_log1p"] == pytest.approx(math.log1p(-refunds.loc[uid, "sum"]), rel=1e-5)
    paid = ev[(ev["user_id"] == uid) & (ev["modality"] == "order") & (ev["amount"] > 0)]["amount"].sum()
    assert row["order.amount_sum_log1p"] == pytest.approx(math.log1p(paid), rel=1e-5)  # what was paid, not net
    mine = sorted_events(world.events, [uid], ["order"], spec.window)
    numeric = event_numeric_fields(mine, spec)  # (E, 3)
    np.testing.assert_array_equal(numeric[:, 0] < 0, mine["amount"].to_numpy() < 0)


def test_specs_saved_before_text_features_load_unchanged(small_world):
    world = small_world  # no refunds, and no words: what a version-1 spec computed
    spec = FeatureSpec.fit_world(world, max_words=0)
    old = {k: v for k, v in spec.to_dict().items()
           if k not in ("words", "events_before_window", "events_after_window", "refund_modalities")}
    again = FeatureSpec.from_dict(old)
    ids = world.users_in("test")[:50]
    np.testing.assert_array_equal(again.transform(world.events, world.profiles, ids),
                                  spec.transform(world.events, world.profiles, ids))


# ---------------------------------------------------------------------------------------------------
# evaluation without an oracle


def test_oracle_is_skipped_when_labels_carry_no_oracle_prob(shop):
    _, _, world = shop
    test = world.users_in("test")
    assert not oracle_available(world.labels, test)
    with_oracle = world.labels.assign(oracle_prob=0.5)
    assert oracle_available(with_oracle, test)
    half = with_oracle.copy()
    half.loc[half.index[:3], "oracle_prob"] = np.nan
    with pytest.raises(DataValidationError, match=r"oracle_prob is given for some test rows but missing"):
        oracle_available(half, test)
    scores = {"const": world.labels[["user_id", "task_id"]].assign(score=np.arange(len(world.labels)) % 7)}
    metrics = evaluate_methods(scores, world.labels, world.tasks, test, n_boot=10, seed=0)
    metrics["skipped_methods"] = {"oracle": NO_ORACLE}
    assert "Not evaluated: oracle (true probability): labels carry no oracle_prob" in results_markdown(metrics)


# ---------------------------------------------------------------------------------------------------
# the byo source


def test_byo_reads_csv_parquet_and_frames_alike(shop, tmp_path):
    tables, manifest, world = shop
    for fmt in ("csv", "parquet"):
        d = tmp_path / fmt
        d.mkdir()
        for name, df in tables.items():
            getattr(df, f"to_{fmt}")(d / f"{name}.{fmt}", index=False)
        (d / "manifest.json").write_text(json.dumps(manifest))
        back = load_source("byo", source=d)
        for name in ("events", "users", "qa", "tasks", "labels"):
            pd.testing.assert_frame_equal(back.table(name), world.table(name), check_dtype=False)
        assert back.manifest["counts"] == world.manifest["counts"]


def test_byo_errors_name_table_column_user_value(shop, tmp_path):
    tables = _tables(shop)
    with pytest.raises(DataValidationError, match=r"missing required table\(s\) 'users'"):
        byo.load({"events": tables["events"]})
    with pytest.raises(DataValidationError, match=r"unknown table name\(s\) 'orders'"):
        byo.load({**tables, "orders": tables["events"]})
    users = tables["users"].copy()
    users.loc[0, "split"] = "test"  # a pre-training user in the test split
    with pytest.raises(DataValidationError, match=r"users: 1 user\(s\) have a split outside their population \('c0000': pretrain/test"):
        byo.load({**tables, "users": users})
    labels = pd.concat([tables["labels"], tables["labels"].iloc[[0]].assign(user_id="c0001")])
    with pytest.raises(DataValidationError, match=r"labels: 1 row\(s\) belong to users outside the downstream population: 'c0001'"):
        byo.load({**tables, "labels": labels})
    events = tables["events"].astype({"timestamp": object})
    events.loc[5, "timestamp"] = "yesterday"
    with pytest.raises(DataValidationError, match=r"events: column 'timestamp' has 1 unparseable.*'yesterday'"):
        byo.load({**tables, "events": events})
    no_qa = {k: v for k, v in tables.items() if k != "qa"}
    assert byo.load(no_qa).qa.empty  # optional for the source...
    d = tmp_path / "no_qa"
    d.mkdir()
    for name, df in no_qa.items():
        df.to_csv(d / f"{name}.csv", index=False)
    from qanchor_lab.pipeline import load_dataset

    world = load_dataset(d)  # ...and the demo derives pre-training pairs from the event log (derive_qa)
    assert set(world.qa["source"]) == {"uqa", "future"}
    assert set(world.qa["user_id"]) <= set(world.users_in("pretrain", "pretrain_val"))
    # a task the demo cannot fit or score (one class among its tune users) is named before pre-training
    task = no_qa["tasks"]["task_id"].iloc[0]
    tune = set(no_qa["users"].loc[no_qa["users"]["split"] == "tune", "user_id"])
    labels = no_qa["labels"].copy()
    labels.loc[(labels["task_id"] == task) & labels["user_id"].isin(tune), "label"] = 0
    labels.to_csv(d / "labels.csv", index=False)
    with pytest.raises(DataValidationError, match=rf"task {task!r}: the tune users' labels are \[0\]; the demo fits"):
        load_dataset(d)


def test_pretrain_cli_reads_a_pretraining_only_directory(shop, tmp_path, capsys):
    """`pretrain --data DIR` on your own log: only events and pre-training users, no QA, tasks or labels."""
    from qanchor_lab.cli import main
    from qanchor_lab.pipeline import load_dataset

    tables = _tables(shop)
    users = tables["users"][tables["users"]["split"].isin(["pretrain", "pretrain_val"])]
    d = tmp_path / "log"
    d.mkdir()
    users.to_csv(d / "users.csv", index=False)
    tables["events"][tables["events"]["user_id"].isin(users["user_id"])].to_csv(d / "events.csv", index=False)
    with pytest.raises(DataValidationError, match=r"no user in split\(s\) tune, test"):
        load_dataset(d)  # the demo also evaluates
    world = load_dataset(d, for_evaluation=False)
    assert set(world.qa["source"]) == {"uqa", "future"} and world.tasks.empty
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutsideWindowWarning)
        assert main(["pretrain", "--data", str(d), "--out", str(tmp_path / "run"), "--fast", "--epochs", "0.05"]) == 0
    summary = json.loads((tmp_path / "run" / "pretrain_summary.json").read_text())
    assert summary["steps"] >= 1 and summary["retrieval"]["trained"]["n"] > 0
    # the seed is the demo's unless given (demo --seed N pre-trains with N; pretrain --seed N does the same)
    def seed_of():
        return json.loads((tmp_path / "run" / "qanchor_config.json").read_text())["backbone"]["seed"]

    assert seed_of() == 7
    # a directory holding a model is not trained over unless asked: the model is kept, the command says how
    weights = (tmp_path / "run" / "qanchor.safetensors").read_bytes()
    again = ["pretrain", "--data", str(d), "--out", str(tmp_path / "run"), "--fast", "--epochs", "0.05", "--seed", "3"]
    assert main(again) == 2
    assert "already holds a pre-trained model; give another --out, --overwrite" in capsys.readouterr().err
    assert (tmp_path / "run" / "qanchor.safetensors").read_bytes() == weights and seed_of() == 7
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutsideWindowWarning)
        assert main(again + ["--overwrite"]) == 0
    assert seed_of() == 3 and (tmp_path / "run" / "qanchor.safetensors").read_bytes() != weights
    # any stage setting by dotted key (--set), read as JSON; a malformed one is named before anything runs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutsideWindowWarning)
        assert main(["pretrain", "--data", str(d), "--out", str(tmp_path / "d16"), "--fast", "--epochs", "0.05",
                     "--set", "model.embed_dim=16", "--set", "pretrain.reconstruction=1.0"]) == 0
    assert json.loads((tmp_path / "d16" / "qanchor_config.json").read_text())["embed_dim"] == 16
    assert json.loads((tmp_path / "run" / "qanchor_config.json").read_text())["embed_dim"] != 16
    for bad in ("embed_dim=16", "model.embed_dim", "model.embed_dim=0", "model.width=16"):
        assert main(["pretrain", "--data", str(d), "--out", str(tmp_path / "bad"), "--fast", "--set", bad]) == 2
    assert not (tmp_path / "bad").exists()
    users.iloc[:0].to_csv(d / "users.csv", index=False)  # nobody to pre-train: a clear error, not a traceback
    assert main(["pretrain", "--data", str(d), "--out", str(tmp_path / "run2"), "--fast"]) == 2


@pytest.mark.slow
def test_hand_built_log_runs_end_to_end(shop, tmp_path):
    """A user's own directory (CSV, custom modalities, repeats, refunds, quiet users, events outside the
    window, no oracle) through load_dataset, pre-training and every method of the evaluation."""
    from qanchor_lab.pipeline import DemoConfig, evaluate_run, load_dataset, pretrain_world

    tables, manifest, _ = shop
    d = tmp_path / "my_shop"
    d.mkdir()
    for name, df in tables.items():
        df.to_csv(d / f"{name}.csv", index=False)
    (d / "manifest.json").write_text(json.dumps(manifest))
    world = load_dataset(d)
    cfg = replace(DemoConfig.fast(), text_encoder="hashing", max_steps=3, batch_size=8, tune_epochs=1, n_boot=20,
                  retrieval_pairs=40, text_max_chars=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OutsideWindowWarning)  # the example has events outside its window
        model, summary = pretrain_world(world, tmp_path / "run" / "model", cfg, show_progress=False)
        metrics = evaluate_run(model, world, cfg, tmp_path / "run", show_progress=False)
    assert summary["steps"] == 3 and model.config.modalities == ("order", "review", "support")
    assert "oracle" not in metrics["methods"] and metrics["skipped_methods"] == {"oracle": NO_ORACLE}
    expected = {"gbdt_features", "logreg_features", "tfidf_features", "text_embedding", "static_embedding",
                "untrained", "qanchor_base", "qanchor_prompt_tuned", "qanchor_plus_features"}
    assert set(metrics["methods"]) == expected
    for entry in metrics["methods"].values():
        assert 0.0 <= entry["avg_auc"] <= 1.0 and set(entry["tasks"]) == set(tables["tasks"]["task_id"])


def test_a_run_on_your_own_tables_is_diagnosed_on_them(shop, tmp_path, monkeypatch):
    """`diagnose` / `label-curve` / `tune-splits` read the dataset a `demo --data DIR` run names in its marker (CSV
    tables, no qa table: the pairs derived again with the run's seed), not the synthetic world its sizes imply."""
    from qanchor_lab import pipeline
    from qanchor_lab.diagnostics import load_run, resolve_run
    from qanchor_lab.model import CONFIG_NAME

    tables, manifest, _ = shop
    d = tmp_path / "my_shop"
    d.mkdir()
    for name, df in tables.items():
        if name != "qa":
            df.to_csv(d / f"{name}.csv", index=False)
    (d / "manifest.json").write_text(json.dumps(manifest))
    run = tmp_path / "runs" / "demo-my_shop"
    (run / "model").mkdir(parents=True)
    (run / "model" / CONFIG_NAME).write_text("{}")
    cfg = replace(pipeline.DemoConfig(), seed=3)
    (run / "demo_config.json").write_text(json.dumps(pipeline.run_key(cfg, d)))
    monkeypatch.setattr(pipeline, "DATA_ROOT", tmp_path / "data")     # where the synthetic world would be
    assert resolve_run(run) == (run / "model", d.resolve())
    model_dir, world = load_run(run)
    assert model_dir == run / "model"
    assert sorted(world.users["user_id"]) == sorted(tables["users"]["user_id"])
    assert world.qa.equals(pipeline.load_dataset(d, seed=3).qa) and len(world.qa) > 0
    assert sorted(load_run(run / "model", data=d)[1].users["user_id"]) == sorted(tables["users"]["user_id"])
    # every table a Parquet file: still read as the run read it (load_dataset), not as a saved world
    for name, df in tables.items():
        df.to_parquet(d / f"{name}.parquet", index=False)
        (d / f"{name}.csv").unlink(missing_ok=True)
    monkeypatch.setattr("qanchor_lab.data.load_world", lambda *a, **k: pytest.fail("read as a saved world"))
    assert load_run(run)[1].qa.equals(pipeline.load_dataset(d, seed=3).qa)


def test_string_list_names_what_is_wrong_with_a_list_of_ids_or_texts():
    from qanchor_lab.schema import string_list

    assert string_list(pd.Series(["u1", "u2"]), "user_ids") == ["u1", "u2"]
    assert string_list(np.array(["a", "b"]), "texts") == ["a", "b"]      # numpy strings are strings
    assert string_list((), "queries") == []
    with pytest.raises(TypeError, match=r"queries must be a list of strings, not a single string: pass \['Will"):
        string_list("Will this user churn?", "queries")
    with pytest.raises(TypeError, match="user_ids must be a list of strings, got int"):
        string_list(7, "user_ids")
    with pytest.raises(TypeError, match=r"user_ids\[1\] is int 7; expected a string"):
        string_list(["u1", 7], "user_ids")
    with pytest.raises(ValueError, match="queries is empty: give at least one"):
        string_list([], "queries", allow_empty=False)
    with pytest.raises(ValueError, match=r"tune_users repeats 2 value\(s\): \['u1', 'u2'\]"):
        string_list(["u1", "u2", "u1", "u2", "u3"], "tune_users", unique=True)
    assert string_list(["u1", "u1"], "user_ids") == ["u1", "u1"]          # repeats are allowed unless asked
