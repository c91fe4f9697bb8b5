"""Tests of the hand-crafted feature set (FeatureSpec) and the behaviour-as-text serialisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest

from qanchor_lab.data import DataValidationError
from qanchor_lab.features import (FeatureInputError, FeatureSpec, profile_flag_columns, serialize_user,
                                  serialize_users)
from qanchor_lab.schema import SEQUENCE_MODALITIES, SYNTHETIC_MODALITY_SPECS

T = pd.Timestamp


def three_users() -> tuple[pd.DataFrame, pd.DataFrame]:
    """u1: two bills + one search; u2: one bill + one click; u3: one old search, no profile row."""
    events = pd.DataFrame(
        {
            "user_id": ["u1", "u1", "u1", "u2", "u2", "u3"],
            "modality": ["bill", "bill", "search", "bill", "click", "search"],
            "timestamp": [
                T("2024-03-30 10:00"),
                T("2024-02-01 10:00"),
                T("2024-03-31 12:00"),
                T("2024-03-15 00:00"),
                T("2024-03-20 00:00"),
                T("2024-01-05 00:00"),
            ],
            "category": ["food", "travel", "", "food", "home", ""],
            "channel": ["card", "wallet", "app", "card", "app", "app"],
            "text": ["Paid at FreshMart", "Flight to Sanya", "how to save", "Paid at Cafe", "home page", "loan rates"],
            "amount": [58.0, 1200.0, 0.0, 20.0, 0.0, 0.0],
            "duration_s": [0.0, 0.0, 0.0, 0.0, 30.0, 0.0],
        }
    )
    profiles = pd.DataFrame({"user_id": ["u1", "u2"], "age": [34, 50], "city_tier": [2.0, 1.0]})
    return events, profiles


def random_world(n_users: int = 60, n_events: int = 3000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    users = np.array([f"user{i:03d}" for i in range(n_users)], dtype=object)
    mods = rng.choice(np.array(["bill", "miniprogram", "search", "click"], dtype=object), n_events)
    cats = np.array([f"c{j}" for j in range(8)], dtype=object)
    channels = np.array(["card", "wallet"], dtype=object)
    events = pd.DataFrame(
        {
            "user_id": users[rng.integers(0, n_users - 5, n_events)],  # the last 5 users have no events
            "modality": mods,
            "timestamp": T("2024-01-01") + pd.to_timedelta(rng.uniform(0, 90 * 86400, n_events), unit="s"),
            "category": np.where(mods == "search", "", cats[rng.integers(0, 8, n_events)]),
            "channel": np.where(mods == "bill", channels[rng.integers(0, 2, n_events)], "app"),
            "text": [f"event {j}" for j in rng.integers(0, 200, n_events)],
            "amount": np.where(mods == "bill", rng.lognormal(3, 1, n_events), 0.0),
            "duration_s": np.where(mods == "click", rng.exponential(20, n_events), 0.0),
        }
    )
    profiles = pd.DataFrame({"user_id": users, "age": rng.integers(18, 70, n_users), "score": rng.normal(size=n_users)})
    return events, profiles


@pytest.fixture()
def fitted() -> tuple[FeatureSpec, pd.DataFrame, pd.DataFrame]:
    events, profiles = three_users()
    # a declared 90-day window and the synthetic world's four modalities (one has no events here)
    return FeatureSpec.fit(events, profiles, history_days=90, modalities=SEQUENCE_MODALITIES), events, profiles


def test_fit_learns_window_categories_channels(fitted):
    spec, _, _ = fitted
    assert spec.window_end == "2024-04-01T00:00:00"  # the midnight after the last event
    assert spec.categories == {"bill": ["food", "travel"], "miniprogram": [], "search": [], "click": ["home"]}
    assert spec.channels == {"bill": ["card", "wallet"]}
    assert spec.amount_modalities == ["bill"]
    assert spec.duration_modalities == ["click"]
    assert spec.profile_columns == ["age", "city_tier"]
    assert len(spec.feature_names) == len(set(spec.feature_names)) == spec.n_features


def test_hand_computed_values(fitted):
    spec, events, profiles = fitted
    f = spec.frame(events, profiles, ["u1", "u2", "u3"])
    u1, u2, u3 = f.loc["u1"], f.loc["u2"], f.loc["u3"]
    approx = lambda x: pytest.approx(x, rel=1e-5, abs=1e-6)  # noqa: E731  (float32 output)
    assert u1["bill.has"] == 1 and u3["bill.has"] == 0
    assert u1["bill.count_log1p"] == approx(math.log(3))
    assert u1["bill.amount_sum_log1p"] == approx(math.log1p(1258.0))
    assert u1["bill.amount_mean_log1p"] == approx(math.log1p(629.0))
    assert u1["bill.recency_days"] == approx(1 + 14 / 24)  # 2024-03-30 10:00 -> 2024-04-01
    assert u1["bill.recent30_share"] == approx(0.5)  # the February bill is outside the last 30 days
    assert u1["bill.active_days"] == 2
    assert u1["bill.cat=travel.amount_sum_log1p"] == approx(math.log1p(1200.0))
    assert u1["bill.cat=travel.recency_days"] == approx(59 + 14 / 24)
    assert u1["bill.channel=wallet.count_log1p"] == approx(math.log(2))
    assert u1["search.recency_days"] == approx(0.5)
    assert u2["click.dwell_mean_log1p"] == approx(math.log1p(30.0))
    assert u2["bill.recency_days"] == approx(17.0)
    assert u3["search.recency_days"] == approx(87.0)
    assert u3["search.recent30_share"] == 0.0
    # absent modality: zero count, recency = the whole window
    assert u3["bill.count_log1p"] == 0 and u3["bill.recency_days"] == 90
    assert u1["profile.age"] == 34 and u1["profile.missing"] == 0


def test_unseen_category_and_channel_go_to_other(fitted):
    spec, events, profiles = fitted
    new = events.iloc[[0]].assign(category="electronics", channel="crypto", user_id="u9")
    f = spec.frame(new, profiles, ["u9"])
    assert f.loc["u9", "bill.cat=other.count_log1p"] == pytest.approx(math.log(2))
    assert f.loc["u9", "bill.cat=food.count_log1p"] == 0
    assert f.loc["u9", "bill.channel=other.count_log1p"] == pytest.approx(math.log(2))


def test_max_categories_pools_the_rest():
    events, profiles = three_users()
    spec = FeatureSpec.fit(events, profiles, max_categories=1)
    assert spec.categories["bill"] == ["food"]  # 2 food bills beat 1 travel bill
    f = spec.frame(events, profiles, ["u1"])
    assert f.loc["u1", "bill.cat=other.amount_sum_log1p"] == pytest.approx(math.log1p(1200.0))


def test_missing_user_gets_zero_counts_and_profile_means(fitted):
    spec, events, profiles = fitted
    f = spec.frame(events, profiles, ["nobody"])
    row = f.loc["nobody"]
    counts = [c for c in spec.feature_names if c.endswith("count_log1p")]
    assert (row[counts] == 0).all()
    assert (row[[c for c in spec.feature_names if c.endswith("recency_days")]] == 90).all()
    assert row["profile.age"] == pytest.approx(42.0)  # mean of the reference users with a profile
    assert row["profile.city_tier"] == pytest.approx(1.5)
    assert row["profile.missing"] == 1
    assert spec.frame(events, profiles, ["u3"]).loc["u3", "profile.missing"] == 1  # events but no profile


def test_rows_follow_user_ids_and_ignore_event_order(fitted):
    spec, events, profiles = fitted
    full = spec.transform(events, profiles, ["u1", "u2", "u3"])
    shuffled = events.sample(frac=1.0, random_state=3)
    part = spec.transform(shuffled, profiles, ["u3", "u1", "u1"])
    np.testing.assert_array_equal(part, full[[2, 0, 0]])
    assert part.dtype == np.float32 and part.shape == (3, spec.n_features)


def test_events_outside_window_are_ignored(fitted):
    spec, events, profiles = fitted
    later = events.iloc[[0]].assign(timestamp=T("2024-04-15"))  # a label-window event must not leak
    earlier = events.iloc[[0]].assign(timestamp=T("2023-06-01"))
    both = pd.concat([events, later, earlier], ignore_index=True)
    np.testing.assert_array_equal(
        spec.transform(both, profiles, ["u1", "u2"]), spec.transform(events, profiles, ["u1", "u2"])
    )


def test_json_round_trip_gives_identical_transform(tmp_path):
    events, profiles = random_world()
    ids = sorted(set(events["user_id"]))
    spec = FeatureSpec.fit(events, profiles, user_ids=ids[:40])
    again = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    assert again == spec
    a = again.transform(events, profiles, ids, standardize=True)
    np.testing.assert_array_equal(a, spec.transform(events, profiles, ids, standardize=True))
    spec.save(tmp_path / "spec.json")
    assert FeatureSpec.load(tmp_path / "spec.json") == spec


def test_standardisation_on_fit_users():
    events, profiles = random_world()
    ids = list(profiles["user_id"])
    spec = FeatureSpec.fit(events, profiles, user_ids=ids)
    raw = spec.transform(events, profiles, ids).astype(np.float64)
    z = spec.transform(events, profiles, ids, standardize=True).astype(np.float64)
    varying = raw.std(axis=0) > 1e-6
    assert varying.sum() > 50 and (~varying).any()  # profile.missing is constant here
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(z.std(axis=0)[varying], 1.0, atol=1e-4)
    assert np.isfinite(z).all()
    np.testing.assert_array_equal(np.asarray(spec.std)[~varying], 1.0)  # floored, not divided by ~0


def test_fit_on_reference_users_only():
    events, profiles = random_world()
    ids = list(profiles["user_id"])
    a = FeatureSpec.fit(events, profiles, user_ids=ids[:30])
    mine = events[events["user_id"].isin(ids[:30])]
    b = FeatureSpec.fit(mine, profiles, user_ids=ids[:30], window_end=a.window_end)
    assert a.mean == b.mean and a.categories == b.categories


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda e, p: (e.assign(user_id=[1, 1, 1, 2, 2, 3]), p), "events.user_id"),
        (lambda e, p: (e.drop(columns=["timestamp"]), p), "timestamp"),
        (lambda e, p: (e.assign(timestamp=e["timestamp"].astype(str)), p), "events.timestamp"),
        (lambda e, p: (e.assign(modality=["bill", "bill", "search", "bill", "tv", "search"]), p), "'tv'"),
        (lambda e, p: (e.assign(amount=["a"] * 6), p), "events.amount"),
        (lambda e, p: (e, p.assign(city_tier=["one", "two"])), "profiles.city_tier"),
        (lambda e, p: (e, pd.concat([p, p.iloc[[0]]])), "'u1'"),
        (lambda e, p: (e, p.drop(columns=["user_id"])), "user_id"),
    ],
)
def test_bad_input_raises_clear_error(mutate, needle):
    events, profiles = three_users()
    declared = dict(modalities=SEQUENCE_MODALITIES)  # 'tv' is not a declared modality
    spec = FeatureSpec.fit(events, profiles, **declared)
    bad_events, bad_profiles = mutate(events, profiles)
    with pytest.raises(FeatureInputError, match=needle.replace("(", r"\(")) as info:
        spec.transform(bad_events, bad_profiles, ["u1"])
    assert isinstance(info.value, ValueError) and isinstance(info.value, DataValidationError)
    with pytest.raises(FeatureInputError, match=needle):
        FeatureSpec.fit(bad_events, bad_profiles, **declared)


def test_bad_user_ids_and_profile_columns(fitted):
    spec, events, profiles = fitted
    with pytest.raises(FeatureInputError, match=r"user_ids\[1\] is int 7"):
        spec.transform(events, profiles, ["u1", 7])
    with pytest.raises(FeatureInputError, match="city_tier"):
        spec.transform(events, profiles.drop(columns=["city_tier"]), ["u1"])
    with pytest.raises(ValueError, match="history_days"):
        FeatureSpec.fit(events, profiles, history_days=0)
    with pytest.raises(ValueError, match="lacks key"):
        FeatureSpec.from_dict({"modalities": ["bill"]})


def test_feature_layout_is_deterministic():
    events, profiles = random_world(seed=1)
    a = FeatureSpec.fit(events, profiles)
    b = FeatureSpec.fit(events.sample(frac=1.0, random_state=0), profiles.sample(frac=1.0, random_state=0))
    assert a.feature_names == b.feature_names and a.categories == b.categories
    np.testing.assert_allclose(a.mean, b.mean, rtol=1e-12)



def test_feature_groups_name_the_modality_or_the_profile(fitted):
    spec = fitted[0]
    groups = spec.feature_groups()
    assert len(groups) == spec.n_features
    for name, group in zip(spec.feature_names, groups):
        assert group == (name.split(".")[0] if not name.startswith("profile.") else "profile"), name
    assert set(groups) == set(spec.modalities) | {"profile"}
    # a modality whose name extends another's keeps its own columns
    spec2 = FeatureSpec.from_dict({**spec.to_dict(), "modalities": spec.modalities + ["bill_pay"],
                                   "feature_names": spec.feature_names + ["bill_pay.count_log1p"],
                                   "mean": spec.mean + [0.0], "std": spec.std + [1.0]})
    assert spec2.feature_groups()[-1] == "bill_pay"


# -- serialisation ------------------------------------------------------------------------------------
def test_serialize_user_format_and_order():
    events, profiles = three_users()
    text = serialize_user(events[events["user_id"] == "u1"], profiles.set_index("user_id").loc["u1"],
                          modalities=SYNTHETIC_MODALITY_SPECS)
    assert text == (
        "Profile: age 34, city tier 2 | "
        "Bills (2 events, most recent first): Paid at FreshMart 58.0 CNY card; Flight to Sanya 1200.0 CNY wallet | "
        "Searches (1 event, most recent first): how to save"
    )
    u2 = serialize_user(events[events["user_id"] == "u2"], None, modalities=SYNTHETIC_MODALITY_SPECS)
    assert u2.startswith("Profile: unknown | Bills") and "home page (30s)" in u2


def test_serialize_limits_and_truncation():
    events, profiles = random_world()
    uid = events["user_id"].value_counts().index[0]
    mine = events[events["user_id"] == uid]
    text = serialize_user(mine, None, max_events_per_modality=3, max_chars=10_000, modalities=SYNTHETIC_MODALITY_SPECS)
    n_bills = int((mine["modality"] == "bill").sum())
    assert f"Bills ({n_bills} events, most recent first)" in text
    bills_part = text.split("Bills")[1].split(" | ")[0]
    assert bills_part.count(";") == 2  # three events shown
    latest = mine[mine["modality"] == "bill"].sort_values("timestamp").iloc[-1]["text"]
    assert bills_part.split(": ", 1)[1].startswith(latest + " ")
    short = serialize_user(mine, None, max_chars=100)
    assert len(short) == 100 and short.endswith("…")


def test_serialize_users_matches_single_and_is_fast_path():
    events, profiles = random_world()
    ids = ["user059", "user003", "user010", "user003"]  # user059 has no events
    many = serialize_users(events, profiles, ids, max_events_per_modality=5)
    prof = profiles.set_index("user_id")
    one = [serialize_user(events[events["user_id"] == u], prof.loc[u], max_events_per_modality=5) for u in ids]
    assert many == one
    assert many[0].endswith("No recorded behaviour")
    assert serialize_users(events.sample(frac=1.0, random_state=2), profiles, ids, max_events_per_modality=5) == many


def test_serialize_rejects_bad_input():
    events, profiles = three_users()
    with pytest.raises(FeatureInputError, match="several users"):
        serialize_user(events, None)
    with pytest.raises(FeatureInputError, match=r"user_ids\[0\]"):
        serialize_users(events, profiles, [3])
    with pytest.raises(ValueError, match="max_events_per_modality"):
        serialize_users(events, profiles, ["u1"], max_events_per_modality=0)


def test_serialisation_names_set_flags_and_drops_unset_ones():
    # a wide one-hot profile (MovieLens occupations) must not fill MiniLM's 256 word pieces with zeros
    ev = pd.DataFrame({"user_id": ["a", "b"], "modality": ["liked", "liked"],
                       "timestamp": pd.to_datetime(["2026-01-01", "2026-01-02"]), "text": ["rated 5/5: Heat", "rated 4/5: Alien"]})
    prof = pd.DataFrame({"user_id": ["a", "b"], "occupation_artist": [1.0, 0.0], "occupation_doctor": [0.0, 1.0],
                         "age": [30.0, 0.0]})
    a, b = serialize_users(ev, prof, ["a", "b"])
    assert a.startswith("Profile: occupation artist, age 30 |") and "doctor" not in a
    assert b.startswith("Profile: occupation doctor, age 0 |") and "artist" not in b


def test_a_users_text_does_not_depend_on_the_users_serialised_with_it():
    # embedding users in batches of any size, or one new user at serving time, must give each user one text: a
    # batch whose users hold only 0s and 1s in a count column must not read it as a flag ("n cards" for 1 card)
    ev = pd.DataFrame({"user_id": ["a", "b", "c"], "modality": ["bill"] * 3,
                       "timestamp": pd.to_datetime(["2026-01-01", "2026-01-02", "2026-01-03"]),
                       "text": ["Paid at Cafe", "Paid rent", "Paid at Deli"]})
    prof = pd.DataFrame({"user_id": ["a", "b", "c"], "has_loan": [1.0, 0.0, 1.0], "n_cards": [1.0, 0.0, 3.0],
                         "age": [30.0, 41.0, 52.0]})
    full = serialize_users(ev, prof, ["a", "b", "c"])
    assert full[0].startswith("Profile: has loan, n cards 1, age 30 |")
    assert full[1].startswith("Profile: n cards 0, age 41 |")
    assert serialize_users(ev, prof, ["a"])[0] == full[0]
    assert serialize_users(ev, prof, ["b", "a"]) == [full[1], full[0]]
    # one float row cannot tell a 0/1 column from a count: serialize_user is told the population's flag columns
    flags = profile_flag_columns(prof)
    assert flags == {"has_loan"}
    row = prof.set_index("user_id").loc["a"]
    assert serialize_user(ev[ev["user_id"] == "a"], row, profile_flags=flags) == full[0]
    assert serialize_user(ev[ev["user_id"] == "a"], row).startswith("Profile: has loan 1, n cards 1, age 30 |")
    # a boolean column is a flag in every call, a one-row table or one mixed-dtype row (numpy bools) included
    bools = prof.assign(has_loan=prof["has_loan"].astype(bool))
    assert serialize_users(ev, bools.iloc[:1], ["a"])[0] == full[0]
    assert serialize_user(ev[ev["user_id"] == "a"], bools.set_index("user_id").loc["a"]) == full[0]
    # a declared flag must be a profile column, holding 0/1
    with pytest.raises(FeatureInputError, match=r"'n_cards' is a flag \(0/1\), but user 'c' has 3\.0"):
        serialize_users(ev, prof, ["c"], profile_flags=["n_cards"])
    with pytest.raises(FeatureInputError, match=r"\['has_lone'\], not profile column"):
        serialize_user(ev[ev["user_id"] == "a"], row, profile_flags=["has_lone"])
