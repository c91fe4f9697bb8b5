"""Tests for qanchor_lab.baselines: the oracle, feature and text-embedding baselines, and the probe."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest

from qanchor_lab import baselines as B
from qanchor_lab.data import DataValidationError
from qanchor_lab.event_encoder import HashingEncoder, get_text_encoder
from qanchor_lab.features import FeatureSpec
from qanchor_lab.metrics import task_metrics
from qanchor_lab.world import WorldConfig, generate_world

N_TASKS = 3  # a few tasks keep the per-task fits fast; every code path runs per task alike


@pytest.fixture(scope="session")
def world():
    return generate_world(WorldConfig(n_users=1500, seed=3))


@pytest.fixture(scope="session")
def small(world):
    """The world restricted to its first tasks (one per domain where possible)."""
    keep = world.tasks.drop_duplicates("domain").head(N_TASKS)["task_id"].tolist()
    return dataclasses.replace(
        world,
        tasks=world.tasks[world.tasks["task_id"].isin(keep)].reset_index(drop=True),
        labels=world.labels[world.labels["task_id"].isin(keep)].reset_index(drop=True),
    )


@pytest.fixture(scope="session")
def spec(world):
    return FeatureSpec.fit(world.events, world.profiles, user_ids=world.users_in("pretrain"))


@pytest.fixture(scope="session")
def splits(world):
    return world.users_in("tune"), world.users_in("test")


def _avg_auc(world, scores, test):
    labels = world.labels[world.labels["user_id"].isin(set(test))]
    return float(task_metrics(labels, scores, world.tasks)["auc"].mean())


def _trait_embed(world, calls):
    """embed_fn over the latent traits (maximally informative); records each call's query."""
    traits = world.users.set_index("user_id")[[c for c in world.users.columns if c.startswith("trait_")]]

    def embed(user_ids, query):
        calls.append(query)
        return traits.loc[list(user_ids)].to_numpy(dtype=float)

    return embed


def _noise_embed(user_ids, query):
    return np.random.default_rng(0).normal(size=(len(user_ids), 8))


def _check_layout(scores, world, test):
    assert list(scores.columns) == ["user_id", "task_id", "score"]
    assert len(scores) == len(test) * len(world.tasks)
    assert set(scores["user_id"]) == set(test)
    assert scores["task_id"].unique().tolist() == world.tasks["task_id"].tolist()
    assert np.isfinite(scores["score"]).all()


def test_oracle_scores_are_the_true_probabilities(world, splits):
    _, test = splits
    sc = B.oracle_scores(world.labels, test)
    _check_layout(sc, world, test)
    merged = sc.merge(world.labels, on=["user_id", "task_id"])
    assert np.array_equal(merged["score"].to_numpy(), merged["oracle_prob"].to_numpy())
    no_truth = world.labels.assign(oracle_prob=np.nan)
    with pytest.raises(DataValidationError, match="oracle_prob is missing"):
        B.oracle_scores(no_truth, test)


def test_oracle_beats_features_which_beat_chance(small, splits):
    tune, test = splits
    oracle = _avg_auc(small, B.oracle_scores(small.labels, test), test)
    logreg = B.feature_scores(small, tune, test, model="logreg", seed=0)
    _check_layout(logreg, small, test)
    gbdt = B.feature_scores(small, tune, test, model="gbdt", seed=0)
    _check_layout(gbdt, small, test)
    a_logreg, a_gbdt = _avg_auc(small, logreg, test), _avg_auc(small, gbdt, test)
    assert oracle > max(a_logreg, a_gbdt)
    assert a_logreg > 0.6 and a_gbdt > 0.6


def test_probe_on_informative_embedding_beats_noise_and_calls_per_task(small, splits):
    tune, test = splits
    calls: list = []
    informative = B.embedding_probe_scores(_trait_embed(small, calls), tune, test, small.labels, small.tasks)
    assert calls == small.tasks["query"].tolist()  # once per task, with that task's query
    _check_layout(informative, small, test)
    noise = B.embedding_probe_scores(_noise_embed, tune, test, small.labels, small.tasks)
    assert _avg_auc(small, informative, test) > _avg_auc(small, noise, test) + 0.15
    assert abs(_avg_auc(small, noise, test) - 0.5) < 0.07

    static_calls: list = []
    B.embedding_probe_scores(_trait_embed(small, static_calls), tune, test, small.labels, small.tasks, query_dependent=False)
    assert static_calls == [None]  # static methods embed once, reused for every task


def test_test_labels_are_never_used_for_fitting(small, splits, spec):
    tune, test = splits
    rng = np.random.default_rng(5)
    labels = small.labels.copy()
    is_test = labels["user_id"].isin(set(test)).to_numpy()
    labels.loc[is_test, "label"] = rng.permutation(labels.loc[is_test, "label"].to_numpy())
    labels.loc[is_test, "oracle_prob"] = rng.uniform(size=int(is_test.sum()))
    shuffled = dataclasses.replace(small, labels=labels)
    for model in ("logreg", "gbdt"):  # also shows that a fixed seed gives identical scores
        pd.testing.assert_frame_equal(
            B.feature_scores(small, tune, test, model=model, feature_spec=spec),
            B.feature_scores(shuffled, tune, test, model=model, feature_spec=spec),
        )
    embed = _trait_embed(small, [])
    pd.testing.assert_frame_equal(
        B.embedding_probe_scores(embed, tune, test, small.labels, small.tasks),
        B.embedding_probe_scores(embed, tune, test, labels, small.tasks),
    )
    # and tune labels do matter: shuffling them changes the fit
    flipped = small.labels.copy()
    flipped.loc[~is_test, "label"] = rng.permutation(flipped.loc[~is_test, "label"].to_numpy())
    assert not B.embedding_probe_scores(embed, tune, test, flipped, small.tasks).equals(
        B.embedding_probe_scores(embed, tune, test, small.labels, small.tasks)
    )


def test_text_embedding_baseline_bypasses_the_disk_cache(small, splits, tmp_path):
    tune, test = splits
    cached = get_text_encoder("hashing", cache_dir=tmp_path, dim=128)
    sc = B.text_embedding_scores(
        small, tune, test, encoder=cached, serialize_kw={"max_chars": 600}, show_progress=False
    )
    _check_layout(sc, small, test)
    assert _avg_auc(small, sc, test) > 0.55
    assert list(tmp_path.rglob("*.safetensors")) == []  # unique user texts never reach the cache
    plain = B.text_embedding_scores(
        small, tune, test, encoder=HashingEncoder(128), serialize_kw={"max_chars": 600}, show_progress=False
    )
    pd.testing.assert_frame_equal(sc, plain)


def test_probe_scores_direct():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(400, 5))
    y = (X[:, 0] + 0.5 * rng.normal(size=400) > 0.8).astype(int)
    p = B.probe_scores(X[:300], y[:300], X[300:], B.ProbeConfig(seed=1))
    assert p.shape == (100,) and ((p >= 0) & (p <= 1)).all()
    assert np.corrcoef(p, X[300:, 0])[0, 1] > 0.8
    with pytest.raises(ValueError, match="test_X has 2"):
        B.probe_scores(X[:300], y[:300], X[300:, :2])
    with pytest.raises(ValueError, match="0/1 labels"):
        B.probe_scores(X[:300], y[:300] * 2, X[300:])
    with pytest.raises(DataValidationError, match="at least 3 of each"):
        B.probe_scores(X[:300], np.r_[np.ones(2), np.zeros(298)], X[300:])


def test_errors_name_the_culprit(small, splits, spec):
    tune, test = splits
    with pytest.raises(ValueError, match="overlap"):
        B.embedding_probe_scores(_noise_embed, tune, test + tune[:3], small.labels, small.tasks)
    first = small.tasks["task_id"].iloc[0]

    def short(user_ids, query):
        return np.zeros((len(user_ids) - 1, 4))

    with pytest.raises(ValueError, match=f"task '{first}'.*rows"):
        B.embedding_probe_scores(short, tune, test, small.labels, small.tasks)
    # a task whose tune users are all negative cannot be fitted
    labels = small.labels.copy()
    labels.loc[(labels["task_id"] == first) & labels["user_id"].isin(set(tune)), "label"] = 0
    with pytest.raises(DataValidationError, match=f"task '{first}'.*0 positive"):
        B.feature_scores(dataclasses.replace(small, labels=labels), tune, test, model="gbdt", feature_spec=spec)
    with pytest.raises(ValueError, match="valid choices: gbdt, logreg"):
        B.feature_scores(small, tune, test, model="xgboost")


@pytest.mark.parametrize(
    "kw, match",
    [({"Cs": ()}, "Cs"), ({"Cs": (0.0, 1.0)}, "Cs"), ({"cv": 1}, "cv"), ({"class_weight": "auto"}, "none, balanced")],
)
def test_probe_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        B.ProbeConfig(**kw)


def test_gbdt_config_validation():
    with pytest.raises(ValueError, match="validation_fraction"):
        B.GBDTConfig(validation_fraction=1.0)
    with pytest.raises(ValueError, match="max_leaf_nodes"):
        B.GBDTConfig(max_leaf_nodes=1)
