"""Tests of the synthetic UserU world generator (qanchor_lab.world)."""

from __future__ import annotations

import hashlib
import json
import re
import time

import numpy as np
import pandas as pd
import pytest

from qanchor_lab import schema
from qanchor_lab.world import (
    answer_claims,
    INTENTS,
    TASK_SPECS,
    WorldConfig,
    _sample_latents,
    build_evidence,
    calibrate_tasks,
    catalogue_texts,
    ensure_world,
    events_per_user,
    generate_world,
    oracle_probabilities,
    read_world,
    save_world,
    user_timeline,
    verify_answers,
    world_summary,
)

SMALL = WorldConfig(n_users=2000, seed=11)
TINY = WorldConfig(n_users=400, seed=5)
DTYPES = {"str": "str", "datetime": "datetime64[ns]", "float": "float64", "int": "int64"}


@pytest.fixture(scope="session")
def world():
    return generate_world(SMALL)


@pytest.fixture(scope="session")
def evidence(world):
    pre = world.users_in("pretrain", "pretrain_val")
    return build_evidence(world.events[world.events["user_id"].isin(pre)], world.profiles[world.profiles["user_id"].isin(pre)],
                          start_date=SMALL.start_date, history_days=SMALL.history_days)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


# ----------------------------------------------------------------------------------------------
# config


@pytest.mark.parametrize("bad, field", [
    ({"n_users": 5}, "n_users"),
    ({"seed": -1}, "seed"),
    ({"val_share": 1.5}, "val_share"),
    ({"pretrain_share": 0.0}, "pretrain_share"),
    ({"start_date": "not a date"}, "start_date"),
    ({"history_days": 3}, "history_days"),
    ({"difficulty": 0.0}, "difficulty"),
    ({"hallucination_rate": 1.0}, "hallucination_rate"),
    ({"qa_per_user_min": 5, "qa_per_user_max": 2}, "qa_per_user_min"),
    ({"qa_style": "essay"}, "qa_style"),
    ({"terse_answer_share": 1.5}, "terse_answer_share"),
    ({"side_interests": 161}, "side_interests"),
    ({"side_interests": -1}, "side_interests"),
])
def test_config_rejects_bad_values_naming_the_field(bad, field):
    with pytest.raises(ValueError, match=field):
        WorldConfig(**bad)


@pytest.mark.parametrize("shares, empty", [
    ({"n_users": 40, "pretrain_share": 0.25, "val_share": 0.96}, r"split\(s\) pretrain without users \(pretrain 0, pretrain_val 10"),
    ({"n_users": 40, "pretrain_share": 0.75, "test_share": 0.96}, r"split\(s\) tune without users .*tune 0, test 10"),
    ({"n_users": 1000, "pretrain_share": 0.99, "test_share": 0.95}, r"test_share=0\.95 leave split\(s\) tune without"),
])
def test_config_rejects_shares_that_leave_a_split_empty(shares, empty):
    with pytest.raises(ValueError, match=r"WorldConfig: n_users=\d+, pretrain_share=.*" + empty):
        WorldConfig(**shares)
    # the sizes generate_world assigns: the defaults' rounding, unchanged
    assert WorldConfig(n_users=2000).split_sizes() == {"pretrain": 900, "pretrain_val": 100, "tune": 500, "test": 500}


def test_config_dict_roundtrip_and_unknown_keys():
    cfg = WorldConfig(n_users=1234, seed=9, difficulty=1.5)
    assert WorldConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="n_userz"):
        WorldConfig.from_dict({"n_userz": 10})
    with pytest.raises(TypeError, match="WorldConfig"):
        generate_world({"n_users": 100})


# ----------------------------------------------------------------------------------------------
# schema


def test_tables_follow_the_schema(world):
    for col, kind in schema.EVENT_COLUMNS.items():
        assert str(world.events[col].dtype) == DTYPES[kind], col
    for table, columns in (("qa", schema.QA_COLUMNS), ("tasks", schema.TASK_COLUMNS), ("labels", schema.LABEL_COLUMNS)):
        frame = world.table(table)
        assert list(frame.columns) == list(columns), table
        for col, kind in columns.items():
            assert str(frame[col].dtype) == DTYPES[kind], (table, col)
    assert list(world.users.columns[:4]) == ["user_id", "population", "split", "persona"]
    traits = [c for c in world.users.columns if c.startswith("trait_")]
    assert len(traits) >= 8 and all(world.users[c].dtype == np.float64 for c in traits)
    features = world.profiles.drop(columns="user_id")
    assert features.shape[1] >= 5 and (features.dtypes == np.float64).all()
    assert np.isfinite(features.to_numpy()).all()
    assert world.users["user_id"].str.fullmatch(r"u\d{6}").all()
    assert world.profiles["user_id"].tolist() == world.users["user_id"].tolist()


def test_event_rows_are_consistent(world):
    ev = world.events
    start = pd.Timestamp(SMALL.start_date)
    assert ev["timestamp"].min() >= start
    assert ev["timestamp"].max() < start + pd.Timedelta(days=SMALL.history_days)
    assert set(ev["modality"]) == set(schema.SEQUENCE_MODALITIES)
    order = ev.sort_values(["user_id", "timestamp"], kind="stable").index
    assert (order == ev.index).all(), "events must be sorted by user_id, timestamp"
    assert not ev.duplicated().any()
    assert (ev["text"].str.strip() != "").all()
    bill = ev["modality"] == "bill"
    assert (ev.loc[bill, "amount"] > 0).all() and (ev.loc[~bill, "amount"] == 0).all()
    assert (ev.loc[~bill, "channel"] == "app").all() and (ev.loc[bill, "channel"] != "app").all()
    dwell = ev["modality"].isin(["miniprogram", "click"])
    assert (ev.loc[dwell, "duration_s"] > 0).all() and (ev.loc[~dwell, "duration_s"] == 0).all()
    assert (ev.loc[ev["modality"] == "search", "category"] == "").all()


def test_data_module_validates_the_saved_world(world, tmp_path):
    from qanchor_lab.data import load_world

    save_world(world, tmp_path / "w")
    loaded = load_world(tmp_path / "w")
    for name in schema.TABLES:
        pd.testing.assert_frame_equal(loaded.table(name), world.table(name))


# ----------------------------------------------------------------------------------------------
# populations, splits, realism


def test_populations_are_disjoint_and_splits_sized(world):
    u = world.users
    assert set(u.loc[u["population"] == "pretrain", "split"]) == {"pretrain", "pretrain_val"}
    assert set(u.loc[u["population"] == "downstream", "split"]) == {"tune", "test"}
    n_pre = round(SMALL.n_users * SMALL.pretrain_share)
    assert (u["population"] == "pretrain").sum() == n_pre
    assert (u["split"] == "pretrain_val").sum() == round(n_pre * SMALL.val_share)
    assert (u["split"] == "test").sum() == round((SMALL.n_users - n_pre) * SMALL.test_share)
    down = set(world.users_in("tune", "test"))
    assert set(world.labels["user_id"]) == down
    assert world.labels.groupby("user_id").size().eq(len(TASK_SPECS)).all()
    assert set(world.qa["user_id"]) <= set(world.users_in("pretrain", "pretrain_val"))
    assert set(world.qa["user_id"]).isdisjoint(down)


def test_default_size_has_a_large_enough_test_split():
    cfg = WorldConfig()
    n_down = cfg.n_users - round(cfg.n_users * cfg.pretrain_share)
    assert round(n_down * cfg.test_share) >= 1000


def test_activity_is_heavy_tailed_and_modalities_sparse(world):
    counts = events_per_user(world)
    assert (counts["total"] >= 1).all(), "every user has at least one event"
    assert 25 <= counts["total"].median() <= 60
    assert (counts["total"] > 300).any() and (counts["total"] < 5).any()
    no_search = (counts["search"] == 0).mean()
    assert 0.15 <= no_search <= 0.35
    assert (counts["miniprogram"] == 0).mean() > 0.05
    assert world.users["shared_device"].mean() > 0.03


def test_distinct_texts_are_bounded(world):
    texts = catalogue_texts()
    assert len(set(texts)) == len(texts) <= 5000
    assert world.events["text"].isin(texts).all()
    assert world.events["text"].nunique() <= len(texts)
    assert not world.events["text"].str.contains(r"u\d{6}").any()


def test_signal_lives_in_timing(world):
    """The engagement trend is invisible in counts but shifts app events towards the window's end."""
    ev = world.events[world.events["modality"].isin(["miniprogram", "click"])]
    half = pd.Timestamp(SMALL.start_date) + pd.Timedelta(days=SMALL.history_days / 2)
    late = (ev["timestamp"] >= half).groupby(ev["user_id"]).agg(["mean", "size"])
    late = late[late["size"] >= 20].join(world.users.set_index("user_id")["trend_engagement"])
    assert late["mean"].corr(late["trend_engagement"]) > 0.4
    totals = late["size"].rank().corr(late["trend_engagement"].rank())
    assert abs(totals) < 0.1


def test_signal_lives_in_search_wording(world):
    """Repayment worry shows in what users search for (category is empty for searches)."""
    search = world.events[world.events["modality"] == "search"]
    worried = search["text"].isin(["how to delay credit card repayment", "credit card repayment extension",
                                   "what happens if i repay my credit card late", "minimum payment credit card penalty",
                                   "can i split my credit card bill into installments", "late repayment effect on credit score",
                                   "ask bank for more time to repay"])
    share = worried.groupby(search["user_id"]).agg(["mean", "size"])
    share = share[share["size"] >= 5].join(world.users.set_index("user_id")["trait_repayment_worry"])
    assert share["mean"].corr(share["trait_repayment_worry"]) > 0.3


# ----------------------------------------------------------------------------------------------
# QA and self-reflection


def test_intents_cover_enough_paraphrases(world):
    uqa = [i for i in INTENTS.values() if i.source == "uqa"]
    assert len(uqa) >= 30 and all(len(set(i.queries)) >= 3 for i in INTENTS.values())
    assert any(i.source == "future" for i in INTENTS.values())
    used = world.qa.groupby("intent")["query"].nunique()
    assert (world.qa.loc[world.qa["source"] == "uqa", "intent"].nunique()) >= 30
    assert (used >= 3).sum() >= 30
    assert set(world.qa["source"]) == set(schema.QA_SOURCES)
    n_pre = len(world.users_in("pretrain", "pretrain_val"))
    assert 3.5 * n_pre <= len(world.qa) <= 7 * n_pre
    assert not world.qa.duplicated().any()


def test_task_queries_are_not_pretraining_queries(world):
    task_queries = {t.query.strip().lower() for t in TASK_SPECS}
    all_queries = {q.strip().lower() for i in INTENTS.values() for q in i.queries}
    assert task_queries.isdisjoint(all_queries)
    assert task_queries.isdisjoint(set(world.qa["query"].str.strip().str.lower()))


def test_task_words_are_seen_in_pretraining(world):
    pre = set(world.users_in("pretrain", "pretrain_val"))
    seen: set[str] = set()
    qa = world.qa
    for text in pd.concat([qa["query"], qa["answer"]]).unique():
        seen |= _words(text)
    for text in world.events.loc[world.events["user_id"].isin(pre), "text"].unique():
        seen |= _words(text)
    for spec in TASK_SPECS:
        assert _words(spec.query) <= seen, (spec.task_id, _words(spec.query) - seen)


def test_few_is_a_null_claim_only_where_it_means_too_little_to_tell():
    """"few" is salient in the count intents ("Yes: a few late payment fees") and null only in the change/trend
    intents, where it says there is too little activity to tell; "none" and "0|0" never report anything."""
    too_little = re.compile(r"too little|hardly any|no spending to compare", re.I)
    with_few = {iid: it for iid, it in INTENTS.items() if "few" in it.answers}
    assert len(with_few) >= 30
    for iid, it in with_few.items():
        says_nothing = all(too_little.search(a) for a in it.answers["few"])
        assert ("few" in it.null_claims) == says_nothing, (iid, it.answers["few"], it.null_claims)
    assert {i for i, it in with_few.items() if "few" in it.null_claims} == {
        "activity_trend", "borrowing_trend", "future_app_change", "future_money_troubles", "future_spend_change"}
    assert all({"none", "0|0"} & set(it.answers) <= it.null_claims for it in INTENTS.values())


def test_verifier_keeps_true_answers_and_drops_wrong_ones(world, evidence):
    qa = world.qa[world.qa["source"] == "uqa"].reset_index(drop=True)
    assert verify_answers(qa, evidence).all(), "every kept answer re-verifies"
    rng = np.random.default_rng(0)
    corrupt = rng.random(len(qa)) < 0.3
    answers = qa["answer"].to_numpy(dtype=object).copy()
    for r in np.flatnonzero(corrupt):
        it = INTENTS[qa.at[r, "intent"]]
        true_claim = next(c for c, a in it.answers.items() if answers[r] in a)
        wrong = [c for c in it.answers if c != true_claim]
        answers[r] = it.answers[wrong[rng.integers(len(wrong))]][0]
    bad = qa.assign(answer=pd.array(answers, dtype="str"))
    np.testing.assert_array_equal(verify_answers(bad, evidence), ~corrupt)
    with pytest.raises(ValueError, match="unknown intent"):
        verify_answers(qa.head(1).assign(intent="nope"), evidence)


def test_self_reflection_drop_share_follows_the_hallucination_rate():
    clean = generate_world(WorldConfig(n_users=400, seed=5, hallucination_rate=0.0))
    assert clean.manifest["self_reflection"]["dropped"] == 0
    noisy = generate_world(WorldConfig(n_users=400, seed=5, hallucination_rate=0.9))
    sr = noisy.manifest["self_reflection"]
    assert sr["drop_share"] > 0.85 and sr["kept"] == len(noisy.qa)
    assert sr["generated"] == sr["kept"] + sr["dropped"]


def test_graded_qa_changes_only_what_pretraining_is_told():
    counts = generate_world(WorldConfig(n_users=1200, seed=3, qa_style="counts"))
    graded = generate_world(WorldConfig(n_users=1200, seed=3, qa_style="graded"))
    for table in ("events", "profiles", "users", "labels"):
        pd.testing.assert_frame_equal(getattr(counts, table), getattr(graded, table), obj=table)
    assert not counts.qa["answer"].equals(graded.qa["answer"])
    style_of = {iid: it.styles for iid, it in INTENTS.items()}
    assert all("graded" in style_of[i] for i in graded.qa["intent"].unique())
    assert all("counts" in style_of[i] for i in counts.qa["intent"].unique())

    def null_share(w):
        fut = w.qa[w.qa["source"] == "future"]
        claims = pd.Series(answer_claims(fut)).str.split("|", n=1).str[1]
        return claims.isin(["none", "few", "0|0"]).mean()

    # graded D_future answers say something about far more users than next month's rare-event counts
    assert null_share(graded) < null_share(counts) - 0.08
    pre = graded.users_in("pretrain", "pretrain_val")
    ev = build_evidence(graded.events[graded.events["user_id"].isin(pre)], graded.profiles[graded.profiles["user_id"].isin(pre)],
                        start_date="2026-01-01", history_days=90)
    assert verify_answers(graded.qa[graded.qa["source"] == "uqa"], ev).all()


def test_terse_answers_change_only_the_wording_of_kept_answers():
    plain = generate_world(WorldConfig(n_users=600, seed=3))
    terse = generate_world(WorldConfig(n_users=600, seed=3, terse_answer_share=0.5))
    for table in ("events", "profiles", "users", "labels"):
        pd.testing.assert_frame_equal(getattr(plain, table), getattr(terse, table), obj=table)
    # the same rows survive self-reflection and state the same claims; about half are reworded
    pd.testing.assert_frame_equal(plain.qa.drop(columns="answer"), terse.qa.drop(columns="answer"))
    assert (answer_claims(plain.qa) == answer_claims(terse.qa)).all()
    changed = plain.qa["answer"] != terse.qa["answer"]
    assert 0.25 < changed.mean() < 0.5
    # a short answer is shared across intents: the question, not the answer, says what it is about
    shared = terse.qa.loc[changed].groupby("answer")["intent"].nunique()
    assert shared.get("No.", 0) >= 5 and shared.get("Yes, once.", 0) >= 5
    # and is still one claim's wording within its intent
    assert all(len(set(it.terse.values())) == len(it.terse) for it in INTENTS.values())
    # the claim diagnostics score a model against the wordings its world used
    from qanchor_lab.diagnostics import intent_catalogue
    assert "No." in intent_catalogue(terse.qa)["late_fees"].answers["none"]
    assert "No." not in intent_catalogue(plain.qa)["late_fees"].answers["none"]


def test_side_interests_add_profile_columns_and_questions_and_change_nothing_else(tmp_path):
    """WorldConfig.side_interests: a richer user (docs/design.md §7.41) whose events, core profile, users, tasks,
    labels and core QA are the plain world's, byte for byte."""
    from qanchor_lab.sources.synthetic.interests import CLAIMS, QA_PER_USER, column_name, SIDE_INTEREST_NAMES

    plain = generate_world(WorldConfig(n_users=600, seed=3))
    rich = generate_world(WorldConfig(n_users=600, seed=3, side_interests=12))
    for table in ("events", "users", "tasks", "labels"):
        pd.testing.assert_frame_equal(getattr(plain, table), getattr(rich, table), obj=table)
    cols = [column_name(n) for n in SIDE_INTEREST_NAMES[:12]]
    assert cols[:2] == ["interest_fishing_gear", "interest_piano_gear"]
    assert list(rich.profiles.columns) == list(plain.profiles.columns) + cols
    pd.testing.assert_frame_equal(plain.profiles, rich.profiles[list(plain.profiles.columns)])
    shown = rich.profiles[cols].to_numpy()
    assert abs(shown.mean()) < 0.1 and 1.0 < shown.std() < 1.1            # sd 1 plus the profile's noise
    assert np.abs(np.corrcoef(shown.T)[np.triu_indices(12, 1)]).max() < 0.15  # independent interests
    pd.testing.assert_frame_equal(plain.qa, rich.qa.iloc[:len(plain.qa)])
    side = rich.qa.iloc[len(plain.qa):]
    pre = set(rich.users_in("pretrain", "pretrain_val"))
    assert set(side["user_id"]) == pre and (side.groupby("user_id").size() == QA_PER_USER).all()
    assert side.groupby("user_id")["intent"].nunique().eq(QA_PER_USER).all()   # distinct interests per user
    assert set(side["intent"]) <= set(cols) and set(side["source"]) == {"uqa"}
    assert rich.manifest["counts"]["side_interest_qa"] == len(side)
    # the answer names its interest and states a level that agrees with the profile's noisy view of it
    prof = rich.profiles.set_index("user_id")
    level = {text.split(" {n}")[0]: rank for rank, (_, _, text) in enumerate(CLAIMS)}
    for row in side.head(200).itertuples():
        name = row.intent.removeprefix("interest_").replace("_", " ")
        assert name in row.query and row.answer.endswith(f"{name}.")
        rank = level[row.answer.split(f" {name}")[0]]
        assert rank == 0 or prof.at[row.user_id, row.intent] > -0.5 - 1.5   # noise sd 0.3: five sd
        assert rank == 2 or prof.at[row.user_id, row.intent] < 0.7 + 1.5
    # the rich world is a world like any other: saved, validated and loaded back
    assert read_world(save_world(rich, tmp_path / "rich")).profiles.shape == rich.profiles.shape


# ----------------------------------------------------------------------------------------------
# tasks and calibration


def test_tasks_table(world):
    t = world.tasks.set_index("task_id")
    assert len(t) == 10 and set(t["domain"]) == set(schema.DOMAINS)
    assert t.at["ivr_cash_reserve", "domain"] == "marketing"
    assert t.at["credit_delinquency", "domain"] == "risk"
    assert world.labels["oracle_prob"].between(0, 1).all()
    assert set(world.labels["label"].unique()) == {0, 1}


def test_calibration_holds_on_an_independent_sample():
    """Rates and expected oracle AUCs hit their targets on latents the calibration never saw."""
    cfg = WorldConfig()
    lat = _sample_latents(np.random.default_rng(12345), 30_000, cfg)
    probs = oracle_probabilities(lat.feats, cfg)
    hard = oracle_probabilities(lat.feats, WorldConfig(difficulty=2.0))
    y = np.random.default_rng(1).random(probs.shape) < probs
    from sklearn.metrics import roc_auc_score

    for j, spec in enumerate(TASK_SPECS):
        assert abs(probs[:, j].mean() - spec.target_rate) < 0.01, spec.task_id
        auc = roc_auc_score(y[:, j], probs[:, j])
        assert abs(auc - spec.target_auc) < 0.02, (spec.task_id, auc)
        assert 0.05 <= spec.target_rate <= 0.40 and 0.70 <= spec.target_auc <= 0.95
        # larger difficulty keeps the rate but flattens the probabilities: lower oracle AUC
        y_hard = np.random.default_rng(1).random(len(hard)) < hard[:, j]
        assert abs(hard[:, j].mean() - spec.target_rate) < 0.01
        assert roc_auc_score(y_hard, hard[:, j]) < auc - 0.04, spec.task_id
    assert calibrate_tasks(cfg) is calibrate_tasks(WorldConfig(seed=99, n_users=3000))


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 7])
def test_default_world_task_ranges(seed):
    summary = world_summary(generate_world(WorldConfig(seed=seed)))
    assert (summary["n_test"] >= 1000).all()
    assert summary["positive_rate"].between(0.05, 0.40).all(), summary
    assert summary["oracle_auc"].between(0.70, 0.95).all(), summary
    assert (summary["oracle_ks"] > 0.2).all()


# ----------------------------------------------------------------------------------------------
# determinism, files, manifest


def test_same_seed_same_world_other_seed_different():
    a, b = generate_world(TINY), generate_world(TINY)
    for name in schema.TABLES:
        pd.testing.assert_frame_equal(a.table(name), b.table(name))
    assert json.dumps(a.manifest, sort_keys=True) == json.dumps(b.manifest, sort_keys=True)
    c = generate_world(WorldConfig(n_users=TINY.n_users, seed=TINY.seed + 1))
    assert not a.events.equals(c.events)
    assert not a.labels["label"].equals(c.labels["label"])
    assert not a.users["split"].equals(c.users["split"])


def test_saved_files_are_byte_identical(tmp_path):
    paths = [save_world(generate_world(TINY), tmp_path / d) for d in ("a", "b")]
    names = sorted(p.name for p in paths[0].iterdir())
    assert names == sorted([f"{t}.parquet" for t in schema.TABLES] + ["manifest.json"])
    for name in names:
        digests = {hashlib.sha256((p / name).read_bytes()).hexdigest() for p in paths}
        assert len(digests) == 1, name


def test_shared_device_users_keep_their_other_person_next_month(monkeypatch):
    """A shared device's search/click views come from one other person, in the history and next month alike."""
    from qanchor_lab.sources.synthetic import generate as G

    calls = []
    real = G._simulate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append((kwargs, out))
        return out

    monkeypatch.setattr(G, "_simulate", spy)
    world = generate_world(WorldConfig(n_users=200, seed=5))
    assert world.users["shared_device"].any()
    (hist_kw, (_, hist_other)), (fut_kw, (_, fut_other)) = calls
    assert not hist_kw["future"] and fut_kw["future"]
    np.testing.assert_array_equal(fut_kw.get("other"), hist_other)   # handed over by generate_world...
    np.testing.assert_array_equal(fut_other, hist_other)             # ...and used by the future window
    # The drawn permutation of this world has fixed points (users 32 and 188): nobody shares a device with themself.
    assert (hist_other != np.arange(len(world.users))).all()


def test_someone_else_changes_only_the_users_a_permutation_maps_to_themselves():
    from qanchor_lab.sources.synthetic.simulation import _someone_else

    perm = np.array([0, 2, 1, 3, 4, 6, 5, 7])                         # fixed points 0, 3, 4, 7 (3 and 4 adjacent)
    out = _someone_else(perm)
    assert (out != np.arange(8)).all()
    np.testing.assert_array_equal(out[[1, 2, 5, 6]], perm[[1, 2, 5, 6]])
    np.testing.assert_array_equal(out[[0, 3, 4, 7]], perm[[1, 4, 5, 0]])
    np.testing.assert_array_equal(perm, [0, 2, 1, 3, 4, 6, 5, 7])      # the input is left as it was
    np.testing.assert_array_equal(_someone_else(np.array([0])), [0])   # one user has no one else


def test_a_profile_on_a_level_edge_gets_the_level_its_wording_includes():
    """Credit limits are whole hundreds and utilisation has three decimals, so users sit exactly on the stated
    edges: "Medium: 5,000 to 20,000", "Moderately: 30% to 70% of the limit"."""
    ev = pd.DataFrame({"profile:credit_limit": [4900.0, 5000.0, 20000.0, 20100.0],
                       "profile:credit_utilisation": [0.299, 0.3, 0.7, 0.701]})
    assert list(INTENTS["credit_limit"].claim(ev)) == ["low", "medium", "medium", "high"]
    assert list(INTENTS["credit_use"].claim(ev)) == ["low", "moderate", "moderate", "high"]


# sha256 (first 16 hex) of each table as CSV for WorldConfig(n_users=200, seed=5), from generator version 1:
# versions 2 and 3 changed only the QA table here (3 moves no shared-device user of this world), so a
# generator change that moves any other table is caught here.
V1_DIGESTS = {"events": "626eef44a5eeb2eb", "profiles": "815862e45230f022", "users": "66e272d74f2d827a",
              "labels": "27aec820e5a069d6", "tasks": "df2527db396926a3"}


def test_generator_versions_2_and_3_leave_every_table_but_qa_as_it_was():
    world = generate_world(WorldConfig(n_users=200, seed=5))
    got = {t: hashlib.sha256(world.table(t).to_csv(index=False).encode()).hexdigest()[:16] for t in V1_DIGESTS}
    assert got == V1_DIGESTS
    assert world.manifest["generator_version"] == 3


def test_small_world_manifest_is_strict_json(tmp_path):
    """A small world's test split can hold one label class only: its oracle AUC/KS are undefined and written
    as null, never as NaN (not JSON)."""
    world = generate_world(WorldConfig(n_users=100, seed=3))

    def strict(constant):
        raise ValueError(f"non-standard JSON constant {constant}")

    json.dumps(world.manifest, allow_nan=False)
    json.loads((save_world(world, tmp_path / "w") / "manifest.json").read_text(), parse_constant=strict)
    undefined = [t for t, v in world.manifest["tasks"].items() if v["oracle_auc"] is None]
    assert undefined, "the fixture world should have a task with one label class among its test users"
    assert all(world.manifest["tasks"][t]["oracle_ks"] is None for t in undefined)


def test_manifest_contents(world):
    m = json.loads(json.dumps(world.manifest))
    assert m["schema_version"] == schema.SCHEMA_VERSION and m["seed"] == SMALL.seed
    assert WorldConfig.from_dict(m["config"]) == SMALL
    assert sum(m["counts"]["users"].values()) == len(world.users)
    assert sum(m["counts"]["events"].values()) == len(world.events)
    assert sum(m["counts"]["qa"].values()) == len(world.qa)
    assert set(m["tasks"]) == {t.task_id for t in TASK_SPECS}
    assert {"positive_rate", "oracle_auc", "oracle_ks"} <= set(m["tasks"]["credit_delinquency"])
    sr = m["self_reflection"]
    assert abs(sr["drop_share"] - SMALL.hallucination_rate) < 0.03
    assert not any(re.search(r"time|second|duration", k) for k in _all_keys(m) if k != "duration_s")


def _all_keys(d):
    for k, v in d.items():
        yield k
        if isinstance(v, dict):
            yield from _all_keys(v)


def test_ensure_world_reuses_matching_directory(tmp_path):
    out = tmp_path / "w"
    first = ensure_world(out, TINY)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    time.sleep(0.01)
    again = ensure_world(out, TINY)
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps
    for name in schema.TABLES:
        pd.testing.assert_frame_equal(first.table(name), again.table(name))
    other = WorldConfig(n_users=TINY.n_users, seed=TINY.seed + 1)
    ensure_world(out, other)
    assert read_world(out).manifest["config"] == other.to_dict()
    # written under another schema version: regenerated, not read (reading it would fail)
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "schema_version": schema.SCHEMA_VERSION - 1}))
    assert ensure_world(out, other).manifest["schema_version"] == schema.SCHEMA_VERSION
    assert read_world(out).manifest["schema_version"] == schema.SCHEMA_VERSION


# ----------------------------------------------------------------------------------------------
# notebook helpers


def test_user_timeline_and_summary(world):
    uid = world.users["user_id"].iloc[0]
    tl = user_timeline(world, uid)
    assert (tl["user_id"] == uid).all() and tl["timestamp"].is_monotonic_increasing and (tl["hover"] != "").all()
    with pytest.raises(KeyError, match="nobody"):
        user_timeline(world, "nobody")
    summary = world_summary(world)
    assert list(summary.columns) == ["task_id", "domain", "positive_rate", "oracle_auc", "oracle_ks", "n_test"]
    assert len(summary) == 10


@pytest.mark.slow
def test_ten_thousand_users_generate_quickly(tmp_path):
    start = time.perf_counter()
    save_world(generate_world(WorldConfig(n_users=10_000, seed=1)), tmp_path / "w")
    assert time.perf_counter() - start < 60


@pytest.mark.parametrize("style", ["counts", "graded"])
def test_qa_per_user_max_above_the_styles_intents_is_refused_not_cut(style, monkeypatch):
    """Each user is asked distinct intents of the config's qa_style, so a qa_per_user_max above that style's intent
    count was cut to it without a word: it is refused naming the value and the largest valid one, and the largest
    valid one is honoured exactly."""
    from qanchor_lab.sources.synthetic import generate as gen_mod

    n_style = sum(style in it.styles for it in INTENTS.values())
    assert n_style < len(INTENTS)   # the gap the old bound (every intent) let through
    with pytest.raises(ValueError, match=rf"qa_per_user_max.* <= {n_style} \(the intents of qa_style='{style}'.*"
                                         rf"got 4/{n_style + 1}"):
        WorldConfig(n_users=60, qa_per_user_max=n_style + 1, qa_style=style)
    per_user = {}

    def spy(rng, evidence, config):   # the QA rows before self-reflection drops the failed ones
        out = synthesise(rng, evidence, config)
        per_user.update(out.groupby("user_id").size())
        return out

    synthesise = gen_mod._synthesise_qa
    monkeypatch.setattr(gen_mod, "_synthesise_qa", spy)
    generate_world(WorldConfig(n_users=60, seed=3, qa_per_user_min=n_style, qa_per_user_max=n_style, qa_style=style))
    assert per_user and set(per_user.values()) == {n_style}
