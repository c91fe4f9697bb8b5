"""Tests for qanchor_lab.data: every bad-input error names its culprit; valid tables round-trip."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from qanchor_lab import data as D
from qanchor_lab.data import DataValidationError
from qanchor_lab.schema import SCHEMA_VERSION, SEQUENCE_MODALITIES, TABLES, World, declared_window
from qanchor_lab.sources import byo

T = pd.Timestamp


def _events():
    return pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u2", "u2", "u3"],
            "modality": ["bill", "search", "click", "miniprogram", "bill"],
            "timestamp": ["2025-01-03 10:00:00", "2025-01-04 11:30:00", "2025-02-01", "2025-02-02 08:00:00", "2025-03-01"],
            "text": ["paid at a noodle shop", "cheap flights to Bangkok", "opened wealth tab", "used bike app", "paid rent"],
            "amount": [35.5, 0.0, 0.0, 0.0, 3200.0],
        }
    )


def _users():
    return pd.DataFrame(
        {
            "user_id": ["u1", "u2", "u3"],
            "population": ["pretrain", "downstream", "downstream"],
            "split": ["pretrain", "tune", "test"],
            "persona": ["saver", "student", "traveller"],
            "trait_liquidity_stress": [0.1, -0.4, 1.2],
        }
    )


def _tasks():
    return pd.DataFrame(
        {
            "task_id": ["late_repay", "coupon_use"],
            "domain": ["risk", "marketing"],
            "query": ["Will this user repay late next month?", "Will this user redeem a coupon?"],
        }
    )


def _labels():
    return pd.DataFrame(
        {
            "user_id": ["u2", "u3", "u2", "u3"],
            "task_id": ["late_repay", "late_repay", "coupon_use", "coupon_use"],
            "label": [0, 1, 1, 0],
            "oracle_prob": [0.1, 0.7, 0.6, 0.2],
        }
    )


def _qa():
    return pd.DataFrame(
        {
            "user_id": ["u1", "u1"],
            "source": ["future", "uqa"],
            "intent": ["travel_next", "spend_food"],
            "query": ["Will the user book travel next month?", "Does the user eat out often?"],
            "answer": ["Yes, flights to Bangkok.", "Yes, several noodle shops."],
        }
    )


def _profiles():
    return pd.DataFrame({"user_id": ["u1", "u2", "u3"], "n_bills": [1, 0, 1], "avg_amount": [35.5, 0.0, 3200.0]})


def _world() -> World:
    return World(
        events=_events(), profiles=_profiles(), users=_users(), qa=_qa(), tasks=_tasks(), labels=_labels(),
        manifest={"seed": 7},
    )


# ---------------------------------------------------------------------------------------------
# normalisation of valid input


def test_events_normalised_and_input_untouched():
    raw = _events()
    before = raw.copy(deep=True)
    out = D.validate_events(raw)
    pd.testing.assert_frame_equal(raw, before)
    assert out is not raw
    assert out.columns.tolist()[:8] == ["user_id", "modality", "timestamp", "category", "channel", "text", "amount", "duration_s"]
    assert out["timestamp"].dtype == "datetime64[ns]"
    assert out["timestamp"].iloc[2] == pd.Timestamp("2025-02-01")  # mixed formats parse
    assert out["category"].tolist() == [""] * 5 and out["channel"].tolist() == ["app"] * 5
    assert out["duration_s"].dtype == np.float64 and (out["duration_s"] == 0.0).all()
    out.loc[0, "text"] = "changed"
    assert raw.loc[0, "text"] == "paid at a noodle shop"


def test_tz_aware_timestamps_become_naive_utc_and_ids_become_strings():
    raw = _events().assign(
        timestamp=pd.to_datetime(["2025-01-03 18:00"] * 5).tz_localize("Asia/Shanghai"),
        user_id=[1, 1, 2, 2, 3],
    )
    out = D.validate_events(raw)
    assert out["timestamp"].iloc[0] == pd.Timestamp("2025-01-03 10:00")
    assert out["user_id"].tolist() == ["1", "1", "2", "2", "3"]


def test_optional_text_missing_value_gets_default():
    raw = _events().assign(category=["food", None, "", np.nan, "housing"])
    assert D.validate_events(raw)["category"].tolist() == ["food", "", "", "", "housing"]


def test_labels_from_float_zero_one_and_oracle_prob_default():
    out = D.validate_labels(_labels().drop(columns="oracle_prob").assign(label=[0.0, 1.0, 1.0, 0.0]), tasks=_tasks())
    assert out["label"].dtype == np.int64 and out["label"].tolist() == [0, 1, 1, 0]
    assert out["oracle_prob"].isna().all()


def test_users_qa_tasks_profiles_normalised():
    users = D.validate_users(_users().drop(columns="persona"))
    assert users["persona"].tolist() == ["", "", ""]
    assert users["trait_liquidity_stress"].dtype == np.float64
    assert D.validate_qa(_qa().drop(columns=["source", "intent"]))["source"].tolist() == ["uqa", "uqa"]
    assert D.validate_tasks(_tasks().drop(columns="domain"))["domain"].tolist() == ["engagement"] * 2
    prof = D.validate_profiles(_profiles())
    assert prof["n_bills"].dtype == np.float64


# ---------------------------------------------------------------------------------------------
# every error names its culprit


def test_missing_column_named_with_found_columns():
    with pytest.raises(DataValidationError, match=r"events: missing required column\(s\) 'timestamp'; found columns: 'user_id', 'modality', 'text'"):
        D.validate_events(_events()[["user_id", "modality", "text"]])
    with pytest.raises(DataValidationError, match=r"labels: missing required column\(s\) 'label'"):
        D.validate_labels(_labels().drop(columns="label"))


def test_bad_timestamp_names_user_and_value():
    raw = _events()
    raw.loc[3, "timestamp"] = "yesterday-ish"
    with pytest.raises(DataValidationError, match=r"'timestamp' has 1 unparseable.*user 'u2': 'yesterday-ish'"):
        D.validate_events(raw)


def test_missing_and_numeric_timestamps():
    raw = _events()
    raw.loc[4, "timestamp"] = None
    with pytest.raises(DataValidationError, match=r"missing timestamp.*'u3'"):
        D.validate_events(raw)
    with pytest.raises(DataValidationError, match=r"'timestamp' holds numbers.*unit='s'"):
        D.validate_events(_events().assign(timestamp=[1.7e9] * 5))


def test_day_first_and_month_first_dates_are_never_mixed_in_one_column(tmp_path):
    # pandas would read rows 0 and 2 month-first (1 March, 2 May) and row 1 day-first (21 February)
    day_first = ["03/01/2025 10:00", "21/02/2025 15:00", "05/02/2025 09:00", "2025-02-02", "2025-03-01"]
    culprits = r"events: column 'timestamp' has 2 .*day-first and month-first.*'03/01/2025 10:00'.*'05/02/2025 09:00'.*ISO 8601"
    with pytest.raises(DataValidationError, match=culprits):
        D.validate_events(_events().assign(timestamp=day_first))
    _events().assign(timestamp=day_first).to_csv(tmp_path / "events.csv", index=False)
    with pytest.raises(DataValidationError, match=culprits):
        D.read_table(tmp_path / "events.csv", "events")
    # no format to infer from the first value: pandas reads every row its own way
    with pytest.raises(DataValidationError, match=r"'1/3/25'.*'03/01/2025'"):
        D.validate_events(_events().assign(timestamp=["1/3/25", "03/01/2025", "21/02/2025", "2025-02-02", "2025-03-01"]))
    # dates that read one way only keep working, all with the one convention
    one_way = ["2025-01-03", "13/01/2025", "25/12/2025 08:30", "Feb 5, 2025", "2025-03-01T10:00:00+08:00"]
    assert D.validate_events(_events().assign(timestamp=one_way))["timestamp"].tolist() == [
        T("2025-01-03"), T("2025-01-13"), T("2025-12-25 08:30"), T("2025-02-05"), T("2025-03-01 02:00")]
    one_format = ["21.02.2025", "03.01.2025", "05.02.2025", "2025-02-02", "2025-03-01"]  # day-first from its first value
    assert D.validate_events(_events().assign(timestamp=one_format))["timestamp"].dt.month.tolist() == [2, 1, 2, 2, 3]


def test_unknown_modality_names_value_user_and_choices():
    raw = _events()
    raw.loc[1, "modality"] = "tiktok"
    with pytest.raises(
        DataValidationError,
        match=r"'modality' has unknown value\(s\) 'tiktok' in 1 row\(s\) at user\(s\) 'u1'; valid choices: bill, miniprogram, search, click",
    ):
        D.validate_events(raw, modalities=SEQUENCE_MODALITIES)
    # a restricted modality set is honoured
    with pytest.raises(DataValidationError, match=r"unknown value\(s\) 'search', 'click', 'miniprogram'"):
        D.validate_events(_events(), modalities=("bill",))


def test_nan_and_non_numeric_amount_named():
    raw = _events()
    raw.loc[4, "amount"] = np.nan
    with pytest.raises(DataValidationError, match=r"'amount' has 1 NaN or infinite value\(s\) at user\(s\) 'u3'"):
        D.validate_events(raw)
    raw = _events().astype({"amount": object})
    raw.loc[0, "amount"] = "35 yuan"
    with pytest.raises(DataValidationError, match=r"'amount' has 1 non-numeric.*user 'u1': '35 yuan'"):
        D.validate_events(raw)
    raw = _events().assign(duration_s=[0.0, 0.0, -3.0, 0.0, 0.0])
    with pytest.raises(DataValidationError, match=r"'duration_s' has 1 negative.*'u2'"):
        D.validate_events(raw)


def test_duplicate_rows_name_user_and_count():
    # exact repeats of events are real (two identical purchases on one day): kept and counted
    raw = pd.concat([_events(), _events().iloc[[2, 2, 4]]], ignore_index=True)
    out = D.validate_events(raw)
    assert len(out) == len(raw) and D.count_duplicate_events(out) == 3
    with pytest.raises(DataValidationError, match=r"qa: 1 duplicate row.*'u1' \(1\)"):
        D.validate_qa(pd.concat([_qa(), _qa().iloc[[0]]]))


def test_empty_user_id_and_text():
    raw = _events()
    raw.loc[3, "user_id"] = "  "
    with pytest.raises(DataValidationError, match=r"'user_id' has 1 empty or blank value\(s\) at row\(s\) 3"):
        D.validate_events(raw)
    raw = _events()
    raw.loc[1, "text"] = None
    with pytest.raises(DataValidationError, match=r"'text' has 1 empty or blank.*user\(s\) 'u1'"):
        D.validate_events(raw)
    qa = _qa()
    qa.loc[1, "answer"] = ""
    with pytest.raises(DataValidationError, match=r"qa: column 'answer'.*'u1'"):
        D.validate_qa(qa)


def test_empty_table():
    with pytest.raises(DataValidationError, match=r"events: the table is empty"):
        D.validate_events(_events().iloc[:0])
    with pytest.raises(DataValidationError, match=r"expected a pandas DataFrame, got list"):
        D.validate_tasks([{"task_id": "x"}])


def test_bad_label_named():
    lab = _labels()
    lab.loc[2, "label"] = 2
    with pytest.raises(DataValidationError, match=r"'label' must be 0 or 1; found 2 in 1 row\(s\) at user\(s\) 'u2'"):
        D.validate_labels(lab)
    lab = _labels().assign(label=[0, 0.5, 1, 0])
    with pytest.raises(DataValidationError, match=r"whole numbers.*user 'u3': 0.5"):
        D.validate_labels(lab)
    lab = _labels().assign(oracle_prob=[0.1, 1.5, 0.2, 0.3])
    with pytest.raises(DataValidationError, match=r"oracle_prob.*\[0, 1\].*'u3': 1.5"):
        D.validate_labels(lab)


def test_unknown_task_and_duplicate_label_named():
    lab = _labels()
    lab.loc[1, "task_id"] = "churn"
    with pytest.raises(DataValidationError, match=r"task_id\(s\) 'churn' are not in the tasks table.*'u3'"):
        D.validate_labels(lab, tasks=_tasks())
    lab = pd.concat([_labels(), _labels().iloc[[0]].assign(label=1)])
    with pytest.raises(DataValidationError, match=r"user_id/task_id must be unique; repeated: \('u2', 'late_repay'\) \(2×\)"):
        D.validate_labels(lab)


def test_tasks_errors_named():
    tasks = _tasks()
    tasks.loc[1, "domain"] = "fraud"
    with pytest.raises(DataValidationError, match=r"'coupon_use': 'fraud'.*valid choices: engagement, risk, marketing"):
        D.validate_tasks(tasks)
    with pytest.raises(DataValidationError, match=r"task_id must be unique; repeated: 'late_repay'"):
        D.validate_tasks(pd.concat([_tasks(), _tasks().iloc[[0]]]))


def test_users_and_profiles_errors_named():
    users = _users()
    users.loc[2, "split"] = "train"
    with pytest.raises(DataValidationError, match=r"'split' has unknown value\(s\) 'train'.*'u3'.*pretrain, pretrain_val, tune, test"):
        D.validate_users(users)
    with pytest.raises(DataValidationError, match=r"users: user_id must be unique.*'u1' \(2×\)"):
        D.validate_users(pd.concat([_users(), _users().iloc[[0]]]))
    prof = _profiles().astype({"avg_amount": float})
    prof.loc[1, "avg_amount"] = np.inf
    with pytest.raises(DataValidationError, match=r"profiles: NaN or infinite.*'avg_amount'.*'u2'"):
        D.validate_profiles(prof)
    prof = _profiles().assign(city=["Hangzhou", "Beijing", "Shanghai"])
    with pytest.raises(DataValidationError, match=r"profiles: column 'city' has 3 non-numeric.*'u1': 'Hangzhou'"):
        D.validate_profiles(prof)
    prof = _profiles().assign(**{"7": 1.0}).rename(columns={"7": 7})      # an in-memory frame's integer name
    with pytest.raises(DataValidationError, match=r"profiles: column names must be strings; got 7"):
        D.validate_profiles(prof)


def test_users_without_events_named():
    users = pd.concat([_users(), _users().iloc[[0]].assign(user_id="u9")], ignore_index=True)
    D.validate_events(_events(), users=users)  # a profile-only user is a real user
    with pytest.raises(DataValidationError, match=r"users: 1 user\(s\) have no events: 'u9'"):
        D.check_users_have_events(_events(), users)  # the strict check, on request
    with pytest.raises(DataValidationError, match=r"events: 1 user\(s\) are not in the users table: 'u3'"):
        D.validate_events(_events(), users=_users().iloc[:2])
    with pytest.raises(DataValidationError, match=r"events: 1 user\(s\) are not in the users table: 'u3'"):
        D.check_users_have_events(_events(), _users().iloc[:2])


def test_many_offenders_are_summarised():
    raw = pd.concat([_events()] * 4, ignore_index=True).assign(user_id=[f"x{i}" for i in range(20)], modality="fax")
    with pytest.raises(DataValidationError, match=r"'x0', 'x1', 'x2', 'x3', 'x4' and 15 more") as info:
        D.validate_events(raw, modalities=SEQUENCE_MODALITIES)
    assert "x5" not in str(info.value)


def test_errors_are_clean_not_pandas_tracebacks():
    raw = _events()
    raw.loc[0, "timestamp"] = "not a date"
    with pytest.raises(DataValidationError) as info:
        D.validate_events(raw)
    assert info.value.__cause__ is None
    assert info.value.__suppress_context__ or info.value.__context__ is None


# ---------------------------------------------------------------------------------------------
# files


def test_load_world_round_trip(tmp_path):
    world = _world()
    D.save_world(world, tmp_path / "w")
    assert json.loads((tmp_path / "w" / "manifest.json").read_text()) == {"schema_version": SCHEMA_VERSION, "seed": 7}
    back = D.load_world(tmp_path / "w")
    for name in TABLES:
        pd.testing.assert_frame_equal(back.table(name), getattr(D, f"validate_{name}")(world.table(name)))
    assert back.manifest["seed"] == 7
    assert back.users_in("tune", "test") == ["u2", "u3"]


def test_load_world_hand_written_parquet(tmp_path):
    for name, frame in [("events", _events()), ("profiles", _profiles()), ("users", _users()), ("qa", _qa()),
                        ("tasks", _tasks()), ("labels", _labels())]:
        frame.to_parquet(tmp_path / f"{name}.parquet")
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION}))
    world = D.load_world(tmp_path)
    assert world.events["timestamp"].dtype == "datetime64[ns]"
    assert len(world.labels) == 4


def test_load_world_errors(tmp_path):
    with pytest.raises(DataValidationError, match="world directory not found"):
        D.load_world(tmp_path / "nope")
    D.save_world(_world(), tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1}))
    with pytest.raises(DataValidationError, match=f"schema_version {SCHEMA_VERSION + 1}"):
        D.load_world(tmp_path)
    (tmp_path / "manifest.json").unlink()
    bad_labels = _labels()
    bad_labels.loc[0, "user_id"] = "ghost"
    bad_labels.to_parquet(tmp_path / "labels.parquet")
    with pytest.raises(DataValidationError, match=r"labels: 1 user\(s\) are not in the users table: 'ghost'"):
        D.load_world(tmp_path)
    (tmp_path / "qa.parquet").unlink()
    with pytest.raises(DataValidationError, match=r"missing table file\(s\) 'qa.parquet'"):
        D.load_world(tmp_path)


def test_history_window_is_naive_utc_and_a_bad_bound_is_named():
    aware = {"start": "2025-01-03T08:00:00+08:00", "end": "2025-03-01T08:00:00+08:00"}
    assert declared_window({"history_window": aware}) == (T("2025-01-03"), T("2025-03-01"))
    assert declared_window({"history_window": {"start": "2025-01-03", "end": aware["end"]}}) == (T("2025-01-03"), T("2025-03-01"))
    # compared with the naive-UTC events: 2025-03-01 00:00 UTC is outside (08:00 local would take it in)
    world = byo.load({"events": _events(), "users": _users()}, manifest={"history_window": aware})
    assert world.manifest["counts"]["events_outside_window"] == 1
    for bound, value in [("start", 20250101), ("end", 1.7e9), ("start", True)]:
        with pytest.raises(ValueError, match=rf"history_window.{bound}' must be an ISO date string.*{value!r}"):
            declared_window({"history_window": {bound: value}})
    with pytest.raises(DataValidationError, match=r"history_window.start' must be an ISO date string.*20250101"):
        byo.load({"events": _events(), "users": _users()}, manifest={"history_window": {"start": 20250101}})
    with pytest.raises(ValueError, match=r"history_window.end': '03/01/2025' is not an unambiguous date.*ISO 8601"):
        declared_window({"history_window": {"end": "03/01/2025"}})


def test_read_table_csv_keeps_string_ids(tmp_path):
    users = _users().assign(user_id=["007", "008", "009"])
    users.to_csv(tmp_path / "users.csv", index=False)
    assert D.read_table(tmp_path / "users.csv", "users")["user_id"].tolist() == ["007", "008", "009"]
    _events().to_csv(tmp_path / "events.csv", index=False)
    out = D.read_table(tmp_path / "events.csv", "events")
    assert out["timestamp"].dtype == "datetime64[ns]"
    with pytest.raises(DataValidationError, match="cannot tell the format of 'events.json'"):
        (tmp_path / "events.json").write_text("{}")
        D.read_table(tmp_path / "events.json", "events")
    with pytest.raises(DataValidationError, match="unknown table 'event'"):
        D.read_table(tmp_path / "events.csv", "event")


def test_validation_fast_on_large_events():
    rng = np.random.default_rng(0)
    n = 600_000
    users = np.array([f"u{i:05d}" for i in range(20_000)])
    texts = np.array([f"paid at merchant {i}" for i in range(500)])
    big = pd.DataFrame(
        {
            "user_id": users[rng.integers(0, len(users), n)],
            "modality": np.array(["bill", "miniprogram", "search", "click"])[rng.integers(0, 4, n)],
            "timestamp": pd.Timestamp("2025-01-01") + pd.to_timedelta(rng.integers(0, 90 * 86400, n), unit="s"),
            "category": "food",
            "channel": "app",
            "text": texts[rng.integers(0, len(texts), n)],
            "amount": rng.gamma(2.0, 50.0, n),
            "duration_s": rng.exponential(30.0, n),
        }
    )
    start = time.perf_counter()
    out = D.validate_events(big)
    elapsed = time.perf_counter() - start
    assert len(out) == n
    assert elapsed < 5.0, f"validating {n} events took {elapsed:.1f} s"
