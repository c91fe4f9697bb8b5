"""derive_qa: graded, paraphrased QA pairs from any log, claims for false-negative masking, determinism,
and the leakage check (which must fail on a planted leak)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from qanchor_lab.derive_qa import (
    DeriveQAConfig,
    LeakageError,
    check_no_leakage,
    claims_for,
    derive_qa,
    derive_world_qa,
    split_log,
    window_frame,
)

CFG = DeriveQAConfig(future_days=30, seed=3, amount_unit="CNY")


@pytest.fixture(scope="module")
def derived_world(small_world):
    """The small synthetic world with its own QA replaced by derived pairs (a global cutoff)."""
    return derive_world_qa(small_world, CFG)


def _windows(world) -> pd.DataFrame:
    return world.users.set_index("user_id")[["cutoff", "window_start", "window_end"]]


def test_answers_are_graded_not_mostly_none(derived_world):
    info = derived_world.manifest["derived_qa"]
    intents = pd.DataFrame(info["intents"])
    kept = intents[intents["kept"]]
    assert info["summary"]["none_share"] < 0.25
    assert (kept["majority_share"] <= CFG.max_majority).all()
    # count intents are graded none/low/medium/high, and each level holds a fair share of the active users
    activity = kept.set_index("intent").loc["activity", "claims"]
    assert {"low", "medium", "high"} <= set(activity)
    assert all(0.2 <= activity[k] <= 0.45 for k in ("low", "medium", "high"))
    assert (kept["n_claims"] >= 2).all() and kept["source"].nunique() == 2
    # an intent that is almost always one claim is dropped, and reported as dropped
    loose = derive_world_qa(replace(derived_world, qa=derived_world.qa), replace(CFG, max_majority=0.35))
    assert set(loose.manifest["derived_qa"]["summary"]["intents_dropped"]) > set(info["summary"]["intents_dropped"])
    assert list(loose.users.columns) == list(derived_world.users.columns)    # a derivation's columns replaced


def test_paraphrased_questions_per_intent(derived_world, small_world):
    qa = derived_world.qa
    per_intent = qa.groupby("intent")["query"].nunique()
    assert (per_intent == 3).all()
    owners = qa.groupby("query")["intent"].nunique()
    assert (owners == 1).all(), "a question text belongs to one intent only"
    assert not set(qa["query"]) & set(small_world.tasks["query"]), "no QA question equals a task query"
    assert set(qa["source"]) == {"uqa", "future"}
    assert list(qa.columns) == ["user_id", "source", "intent", "query", "answer"]


def test_claims_per_intent_are_what_answer_claims_reads(small_world, derived_world):
    """One wording per (intent, claim): world.answer_claims' "intent|answer" key is the claim, so the claim
    masking of pretrain.make_pairs treats two users with one claim as one positive class."""
    from qanchor_lab.world import answer_claims

    qa = derived_world.qa
    keys = pd.Series(answer_claims(qa), index=qa.index)
    assert (keys == qa["intent"] + "|" + qa["answer"]).all()
    # the claim of each row re-derived from its user's history/future equals the claim its answer states
    inputs, windows, future = _split(small_world, derived_world)
    derived = derive_qa(inputs, windows, CFG, future=future, modalities=sorted(small_world.events["modality"].unique()),
                        profiles=small_world.profiles)
    claims = derived.claims.stack().rename("claim").reset_index().rename(columns={"level_1": "intent"})
    merged = qa.merge(claims, on=["user_id", "intent"], how="left")
    assert merged["claim"].notna().all()
    answer_of = merged.groupby(["intent", "claim"])["answer"].nunique()
    claim_of = merged.groupby(["intent", "answer"])["claim"].nunique()
    assert (answer_of == 1).all() and (claim_of == 1).all()


def _split(original, derived_world):
    """Inputs, windows and future of the derived world's pre-training users, cut from the original log."""
    windows = _windows(derived_world).loc[derived_world.users_in("pretrain", "pretrain_val")]
    inputs, future = split_log(original.events, windows, CFG.history_days)
    return inputs, windows, future


def test_deterministic_given_seed(small_world, derived_world):
    again = derive_world_qa(small_world, CFG)
    pd.testing.assert_frame_equal(again.qa, derived_world.qa)
    other = derive_world_qa(small_world, replace(CFG, seed=4))
    assert (other.qa["answer"] == derived_world.qa["answer"]).all()           # claims do not depend on the seed
    assert (other.qa["query"] != derived_world.qa["query"]).mean() > 0.3      # paraphrase choice does


def test_cutoff_keeps_the_future_out_of_the_inputs(small_world, derived_world):
    windows = _windows(derived_world)
    report = check_no_leakage(derived_world.events, windows)
    assert report["input_events"] == len(derived_world.events)
    pre = derived_world.users_in("pretrain", "pretrain_val")
    ev = derived_world.events[derived_world.events["user_id"].isin(pre)]
    assert (ev["timestamp"].to_numpy() < windows.loc[ev["user_id"], "cutoff"].to_numpy()).all()
    # downstream users keep their whole history; pre-training users lost exactly their future window
    down = small_world.events[~small_world.events["user_id"].isin(pre)]
    assert len(derived_world.events) - len(ev) == len(down)
    cut = windows.loc[pre[0], "cutoff"]
    orig = small_world.events[small_world.events["user_id"].isin(pre)]
    assert len(ev) == int((orig["timestamp"] < cut).sum())


def test_leakage_check_fails_on_planted_leaks(derived_world):
    windows = _windows(derived_world)
    ev = derived_world.events
    user = derived_world.users_in("pretrain")[0]
    leak = ev[ev["user_id"] == user].head(1).assign(timestamp=windows.loc[user, "cutoff"])
    with pytest.raises(LeakageError, match=f"at or after their user's cutoff: user '{user}'"):
        check_no_leakage(pd.concat([ev, leak], ignore_index=True), windows)
    early = windows.copy()
    early.loc[user, "window_start"] = early.loc[user, "cutoff"] - pd.Timedelta(hours=1)
    with pytest.raises(LeakageError, match=f"window.*overlap the input.*'{user}'"):
        check_no_leakage(ev, early)
    stray = leak.assign(timestamp=windows.loc[user, "window_end"] + pd.Timedelta(days=1))
    with pytest.raises(LeakageError, match=f"outside their user's window.*'{user}'"):
        check_no_leakage(ev, windows, future=stray)
    with pytest.raises(LeakageError, match="no cutoff"):
        check_no_leakage(ev, windows.drop(index=user))


def test_derive_qa_refuses_leaky_inputs():
    ev = pd.DataFrame({"user_id": ["a", "a", "b"], "modality": "m", "category": ["x", "y", "x"], "channel": "app",
                       "text": ["t1", "t2", "t1"], "amount": 0.0, "duration_s": 0.0,
                       "timestamp": pd.to_datetime(["2024-01-01", "2024-02-10", "2024-01-05"])})
    windows = window_frame(["a", "b"], pd.Timestamp("2024-02-01"), 30)
    with pytest.raises(LeakageError, match="'a'"):
        derive_qa(ev, windows, DeriveQAConfig())
    inputs, future = split_log(ev, windows)
    assert inputs["text"].tolist() == ["t1", "t1"] and future["user_id"].tolist() == ["a"]


def test_claims_for_reproduces_the_fit(small_world, derived_world):
    from qanchor_lab.derive_qa import QAFit

    fit = QAFit.from_dict(derived_world.manifest["derived_qa"]["fit"])
    inputs, windows, future = _split(small_world, derived_world)
    derived = derive_qa(inputs, windows, CFG, future=future, modalities=fit.modalities, profiles=small_world.profiles)
    again = claims_for(inputs, windows, fit, profiles=small_world.profiles)
    assert any(c.startswith("profile:") for c in again.columns)
    with pytest.raises(ValueError, match="pass the profiles table"):
        claims_for(inputs, windows, fit)
    uqa = list(again.columns)
    assert uqa and all(i in derived.claims.columns for i in uqa)
    pd.testing.assert_frame_equal(again, derived.claims[uqa].astype(object), check_dtype=False)


def test_per_user_cutoff(small_world):
    cfg = replace(CFG, cutoff="per_user", input_days=40.0)
    w = derive_world_qa(small_world, cfg)
    first = small_world.events.groupby("user_id")["timestamp"].min()
    pre = w.users_in("pretrain")
    cut = _windows(w).loc[pre, "cutoff"]
    assert ((cut - first.reindex(pre)) == pd.Timedelta(days=40)).all()
    check_no_leakage(w.events, _windows(w))
    assert (w.qa["answer"].ne("")).all() and w.qa["user_id"].isin(pre + w.users_in("pretrain_val")).all()


@pytest.mark.parametrize("kw, match", [
    (dict(cutoff="weekly"), "cutoff='weekly'; valid choices"),
    (dict(cutoff="per_user"), "input_days > 0"),
    (dict(future_days=0), "future_days must be > 0"),
    (dict(max_majority=0.0), "max_majority"),
    (dict(levels=7), "levels must be one of"),
])
def test_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        DeriveQAConfig(**kw)
    assert DeriveQAConfig.from_dict(DeriveQAConfig(seed=5).to_dict()) == DeriveQAConfig(seed=5)


def test_perfect_qa_learner_r2_on_derived_qa_without_oracle(derived_world):
    """The diagnostics' perfect-learner R² reads the derived claims, and the labels when there is no oracle."""
    from qanchor_lab.diagnostics import perfect_qa_learner_r2

    with_oracle = perfect_qa_learner_r2(derived_world, "tune")
    kept = derived_world.manifest["derived_qa"]["fit"]["kept"]
    assert with_oracle["target"] == "oracle_logit"
    assert with_oracle["n_intents"] == sum(not i.startswith("future_") for i in kept)
    assert set(with_oracle["left_out_intents"]) == {i for i in kept if i.startswith("future_")}
    assert with_oracle["claims_r2"] > 0.05
    real = replace(derived_world, labels=derived_world.labels.assign(oracle_prob=np.nan))
    out = perfect_qa_learner_r2(real, "tune")
    assert out["target"] == "label" and "0/1 task label" in out["note"]
    assert np.isfinite(out["claims_r2"]) and np.isfinite(out["features_r2"])
    assert 0 < out["claims_r2"] < with_oracle["claims_r2"]   # label noise bounds the R² of a 0/1 target


def test_profile_subjects_and_a_real_value_called_other():
    """One-hot groups become one categorical subject named by their shared words; a category whose real
    value is "other" stays distinct from the bucket of values outside the fitted vocabulary."""
    from qanchor_lab.derive_qa import OTHER, profile_subjects

    prof = pd.DataFrame({"user_id": list("abcde"), "job_other": [1, 0, 0, 0, 1], "job_nurse": [0, 1, 0, 1, 0],
                         "job_pilot": [0, 0, 1, 0, 0], "zip_region_1": [1, 1, 0, 0, 1], "zip_region_2": [0, 0, 1, 1, 0],
                         "has_car": [1, 0, 1, 0, 1], "income": [10.0, 20.0, 30.0, 40.0, 50.0]})
    subjects = profile_subjects(prof)
    assert subjects == {"job": ["job_other", "job_nurse", "job_pilot"], "zip_region": ["zip_region_1", "zip_region_2"],
                        "has_car": ["has_car"], "income": ["income"]}
    ev = pd.DataFrame({"user_id": list("abcde"), "modality": "m", "category": "x", "channel": "app", "text": "t",
                       "amount": 0.0, "duration_s": 0.0, "timestamp": pd.Timestamp("2024-01-01")})
    windows = window_frame(list("abcde"), pd.Timestamp("2024-02-01"), None)
    d = derive_qa(ev, windows, DeriveQAConfig(max_categories=2, max_majority=1.0), profiles=prof)
    job = d.claims["profile:job"]
    assert job.tolist() == ["other", "nurse", OTHER, "nurse", "other"]     # pilot is outside the top 2
    rows = d.qa[d.qa["intent"] == "profile:job"].set_index("user_id")["answer"]
    assert (rows["a"], rows["b"], rows["c"]) == ("Job: other.", "Job: nurse.", "A less common job.")
    assert set(d.claims["profile:income"]) == {"low", "medium", "high"}


@pytest.mark.slow
def test_diagnose_runs_on_a_log_without_oracle_or_latent_traits(derived_world):
    """Real data: derived QA intents the synthetic INTENTS do not know, no oracle_prob, no latent traits."""
    from qanchor_lab import diagnostics as D
    from qanchor_lab.model import QAnchorModel
    from tests.conftest import tiny_config

    latent = [c for c in derived_world.users.columns if c.startswith("trait_") or c in D.TREND_COLUMNS]
    real = replace(derived_world, labels=derived_world.labels.assign(oracle_prob=np.nan),
                   users=derived_world.users.drop(columns=latent))
    assert latent and not D.has_latent_traits(real)
    model = QAnchorModel.from_data(tiny_config(), real.events, real.profiles, real.users_in("pretrain"))
    diag = D.diagnose(model, real, untrained=model.untrained_start(real.events, real.profiles, real.users_in("pretrain")),
                      max_users=80, max_pairs=80, geometry_users=40)
    assert diag["stage_target"] == "label"
    assert not any(k.startswith("trait:") for k in diag["stages"]["trained"][0])
    kept = set(derived_world.manifest["derived_qa"]["fit"]["kept"])
    claims = pd.DataFrame(diag["claims"]["trained"])
    assert set(claims["intent"]) - {"overall"} <= kept and claims["n"].iloc[-1] > 40
    # every claim of a derived intent is a candidate: its answers over the whole QA table, not just the scored rows
    catalogue = D.intent_catalogue(real.qa)
    for intent in set(claims["intent"]) - {"overall"}:
        assert set(catalogue[intent].answers) == set(real.qa.loc[real.qa["intent"] == intent, "answer"])
    assert np.isfinite(diag["summary"]["trained"]["query_selectivity"])
    # the same untrained start as the trained model: identical numbers
    assert diag["summary"]["trained"] == diag["summary"]["untrained"]
    md = D.diagnostics_markdown(diag)
    assert "Task-label R² per stage" in md and "Latent-trait" not in md and "0/1 task label" in md


def test_a_one_hot_group_and_a_column_of_the_same_name_stay_two_subjects():
    """job_type beside job_type_a / job_type_b: the group is asked about as "job", never silently dropped."""
    from qanchor_lab.derive_qa import profile_subjects

    prof = pd.DataFrame({"user_id": list("abcd"), "job_type_a": [1, 0, 0, 1], "job_type_b": [0, 1, 1, 0],
                         "job_type": [3.0, 1.0, 2.0, 5.0]})
    assert profile_subjects(prof) == {"job": ["job_type_a", "job_type_b"], "job_type": ["job_type"]}
    assert profile_subjects(prof[["user_id", "job_type", "job_type_b", "job_type_a"]]) == {
        "job_type": ["job_type"], "job": ["job_type_b", "job_type_a"]}                  # whatever the column order


def test_derive_world_qa_names_what_it_cannot_derive_from(small_world):
    from qanchor_lab.data import DataValidationError

    with pytest.raises(DataValidationError, match=r"users: column\(s\) \['cutoff'\] are where derive_qa writes"):
        derive_world_qa(replace(small_world, users=small_world.users.assign(cutoff=1)), CFG)
    pre = small_world.users_in("pretrain", "pretrain_val")
    quiet = replace(small_world, events=small_world.events[~small_world.events["user_id"].isin(pre)])
    with pytest.raises(DataValidationError, match="no pretrain/pretrain_val user has an event"):
        derive_world_qa(quiet, replace(CFG, cutoff="per_user", input_days=40.0))
