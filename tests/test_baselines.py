"""Tests for qanchor_lab.baselines: the oracle, feature, TF-IDF and text-embedding baselines, the probe,
and the probe on features and an embedding together."""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from sklearn.metrics import roc_auc_score

from qanchor_lab import baselines as B
from qanchor_lab.data import DataValidationError
from qanchor_lab.event_encoder import HashingEncoder, get_text_encoder
from qanchor_lab.features import FeatureSpec, OutsideWindowWarning
from qanchor_lab.metrics import task_metrics
from qanchor_lab.schema import World
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
    with pytest.raises(ValueError, match="extra_train and extra_test together"):
        B.probe_scores(X[:300], y[:300], X[300:], extra_train=X[:300])
    with pytest.raises(ValueError, match="extra_test has 2"):
        B.probe_scores(X[:300], y[:300], X[300:], extra_train=X[:300, :3], extra_test=X[300:, :2])
    with pytest.raises(ValueError, match="extra_shares"):
        B.probe_scores(X[:300], y[:300], X[300:], extra_train=X[:300], extra_test=X[300:], extra_shares=(-1.0,))
    with pytest.raises(ValueError, match="standardize_extra=False"):
        B.probe_scores(X[:300], y[:300], X[300:], extra_train=sp.csr_matrix(X[:300]), extra_test=sp.csr_matrix(X[300:]))


def test_fit_linear_probe_is_the_probe_of_probe_scores():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(300, 6)) * rng.uniform(0.5, 5, size=6)
    y = (X[:, 0] / 2 + X[:, 1] + rng.normal(size=300) > 0.5).astype(int)
    cfg = B.ProbeConfig(seed=2)
    fitted = B.fit_linear_probe(X[:200], y[:200], cfg)
    z = (X[200:] - fitted["mean"]) / fitted["scale"]
    mine = 1 / (1 + np.exp(-(z @ fitted["coef"] + fitted["intercept"][0])))
    np.testing.assert_allclose(mine, B.probe_scores(X[:200], y[:200], X[200:], cfg), atol=1e-5)
    with pytest.raises(DataValidationError, match="at least 3 of each"):
        B.fit_linear_probe(X[:50], np.r_[np.ones(2), np.zeros(48)])


def test_probe_sample_weights_count_rows_as_often_as_repeating_them():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(360, 4)) * [1, 3, 0.5, 2]
    y = (X[:, 0] + 0.3 * X[:, 1] + rng.normal(size=360) > 0.3).astype(int)
    count = rng.integers(1, 4, size=300)                                 # a bootstrap-like draw: 1 to 3 copies
    one_c = B.ProbeConfig(Cs=(0.1,))                                     # C fixed: no CV folds to tell the two apart
    weighted = B.probe_scores(X[:300], y[:300], X[300:], one_c, sample_weight=count)
    repeated = B.probe_scores(np.repeat(X[:300], count, axis=0), np.repeat(y[:300], count), X[300:], one_c)
    plain = B.probe_scores(X[:300], y[:300], X[300:], one_c)
    np.testing.assert_allclose(weighted, repeated, atol=2e-4)            # lbfgs stops within its tolerance
    assert np.abs(weighted - plain).max() > 0.02                         # the weights are not ignored
    # no weights and unit weights fit the same probe (the report's fit, refit 0 of label_budget.refit_scores)
    np.testing.assert_allclose(B.probe_scores(X[:300], y[:300], X[300:], sample_weight=np.ones(300)),
                               B.probe_scores(X[:300], y[:300], X[300:]), atol=1e-9)
    blocks, tests = [X[:300, :2], X[:300, 2:]], [X[300:, :2], X[300:, 2:]]
    np.testing.assert_allclose(B.blended_probe_scores(blocks, y[:300], tests, sample_weight=np.ones(300)),
                               B.blended_probe_scores(blocks, y[:300], tests), atol=1e-9)
    assert not np.allclose(B.blended_probe_scores(blocks, y[:300], tests, sample_weight=count),
                           B.blended_probe_scores(blocks, y[:300], tests))
    # the blend weight is chosen by weighted out-of-fold AUC: with one column a block, a probe ranks users alike
    # whatever the weights, and block a explains the heavily weighted half, so the blend keeps a alone
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=600), rng.normal(size=600)
    heavy = np.arange(600) < 300
    yb = (rng.random(600) < 1 / (1 + np.exp(-np.where(heavy, 2 * a, 2 * b)))).astype(int)
    cols = [a[:, None], b[:, None]]
    assert np.corrcoef(B.blended_probe_scores(cols, yb, cols, sample_weight=np.where(heavy, 12.0, 1.0)), a)[0, 1] > 0.999
    assert np.corrcoef(B.blended_probe_scores(cols, yb, cols), a)[0, 1] < 0.8
    with pytest.raises(ValueError, match=r"probe sample_weight: weights must be finite and > 0 .*row\(s\) \[7\]"):
        B.probe_scores(X[:300], y[:300], X[300:], sample_weight=np.where(np.arange(300) == 7, 0.0, 1.0))
    with pytest.raises(ValueError, match=r"blended probe sample_weight: expected one weight per training row \(300\)"):
        B.blended_probe_scores(blocks, y[:300], tests, sample_weight=np.ones(299))


def test_probe_extra_block_is_not_drowned_by_a_wide_one():
    """One informative column beside 300 noise columns: a plain hstack shrinks it with the noise;
    rescaling the block by a CV-chosen share lets it lead. Dense and sparse blocks agree."""
    rng = np.random.default_rng(3)
    n, n_train = 1000, 600
    signal = rng.normal(size=(n, 1))
    y = (signal[:, 0] + 0.7 * rng.normal(size=n) > 0.5).astype(int)
    noise = rng.normal(size=(n, 300))
    cfg = B.ProbeConfig(seed=0)

    def auc(p):
        return roc_auc_score(y[n_train:], p)

    plain = B.probe_scores(np.hstack([noise, signal])[:n_train], y[:n_train], np.hstack([noise, signal])[n_train:], cfg)
    kw = dict(extra_train=signal[:n_train], extra_test=signal[n_train:], extra_shares=B.EMBEDDING_SHARES)
    block = B.probe_scores(noise[:n_train], y[:n_train], noise[n_train:], cfg, **kw)
    assert auc(block) > auc(plain) + 0.03 and auc(block) > 0.85
    # the extra block as given (no standardisation), sparse or dense, gives the same scores
    dense = B.probe_scores(noise[:n_train], y[:n_train], noise[n_train:], cfg, standardize_extra=False, **kw)
    sparse = B.probe_scores(noise[:n_train], y[:n_train], noise[n_train:], cfg, standardize_extra=False,
                            **{**kw, "extra_train": sp.csr_matrix(signal[:n_train]), "extra_test": sp.csr_matrix(signal[n_train:])})
    np.testing.assert_allclose(dense, sparse, rtol=1e-6)
    # share 0 is X alone
    np.testing.assert_array_equal(
        B.probe_scores(noise[:n_train], y[:n_train], noise[n_train:], cfg, **{**kw, "extra_shares": (0.0,)}),
        B.probe_scores(noise[:n_train], y[:n_train], noise[n_train:], cfg),
    )


def test_errors_name_the_culprit(small, splits, spec):
    tune, test = splits
    with pytest.raises(ValueError, match="overlap"):
        B.embedding_probe_scores(_noise_embed, tune, test + tune[:3], small.labels, small.tasks)
    with pytest.raises(TypeError, match="test_users must be a list of strings, not a single string"):
        B.embedding_probe_scores(_noise_embed, tune, test[0], small.labels, small.tasks)
    with pytest.raises(ValueError, match=r"tune_users repeats 1 value\(s\)"):
        B.embedding_probe_scores(_noise_embed, tune + tune[:1], test, small.labels, small.tasks)
    with pytest.raises(ValueError, match="test_users is empty"):
        B.oracle_scores(small.labels, [])
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
    # two positives are enough for the GBDT's stratified early-stopping split, as for scikit-learn
    two = labels["user_id"].isin(set(tune[:2])) & (labels["task_id"] == first)
    labels.loc[two, "label"] = 1
    few = dataclasses.replace(small, labels=labels[labels["task_id"] == first],
                              tasks=small.tasks[small.tasks["task_id"] == first])
    assert len(B.feature_scores(few, tune, test, model="gbdt", feature_spec=spec)) == len(test)
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


# ----------------------------------------------------------------------------------------------
# features + TF-IDF, and features + embedding


def _word_world(n_users: int = 400, seed: int = 0) -> World:
    """A hand-made world whose one label is decided only by a word in a search text.

    Every user has the same number of search events (search carries no category, amount or dwell),
    spread alike over the window, and a random profile: the hand-crafted features see nothing but
    noise. Positives once searched "ways to delay credit card repayment", negatives "easy dinner
    recipes" instead."""
    rng = np.random.default_rng(seed)
    users = [f"w{i:04d}" for i in range(n_users)]
    split = np.array(["pretrain"] * (n_users // 4) + ["tune"] * (3 * n_users // 8))
    split = np.r_[split, ["test"] * (n_users - len(split))]
    label = rng.integers(0, 2, size=n_users)
    neutral = ["weather tomorrow", "news today", "express delivery tracking", "calculator app", "translate english"]
    rows = []
    for u, y in zip(users, label):
        texts = list(rng.choice(neutral, size=5)) + ["ways to delay credit card repayment" if y else "easy dinner recipes"]
        stamps = pd.Timestamp("2026-01-05") + pd.to_timedelta(np.sort(rng.uniform(0, 80, size=6)), unit="D")
        rows += [{"user_id": u, "modality": "search", "timestamp": t, "text": x} for t, x in zip(stamps, rng.permutation(texts))]
    events = pd.DataFrame(rows).assign(category="", channel="app", amount=0.0, duration_s=0.0)
    tasks = pd.DataFrame({"task_id": ["repay_late"], "domain": ["risk"], "query": ["Will this user repay late?"],
                          "description": ["decided by one search"]})
    return World(
        events=events,
        profiles=pd.DataFrame({"user_id": users, "age": rng.integers(20, 60, size=n_users).astype(float)}),
        users=pd.DataFrame({"user_id": users, "population": np.where(split == "pretrain", "pretrain", "downstream"),
                            "split": split}),
        qa=pd.DataFrame(columns=["user_id", "source", "intent", "query", "answer"]),
        tasks=tasks,
        labels=pd.DataFrame({"user_id": users, "task_id": "repay_late", "label": label,
                             "oracle_prob": label.astype(float)}),
    )


@pytest.fixture(scope="module")
def word_world():
    return _word_world()


def test_tfidf_reads_the_event_text(word_world):
    w = word_world
    tune, test = w.users_in("tune"), w.users_in("test")
    text = B.tfidf_feature_scores(w, tune, test, seed=0)
    _check_layout(text, w, test)
    features = B.feature_scores(w, tune, test, model="logreg", seed=0)
    assert _avg_auc(w, text, test) >= 0.9
    assert abs(_avg_auc(w, features, test) - 0.5) < 0.12  # the word is invisible to the features


def test_tfidf_features_layout_and_only_tune_labels(small, splits, spec):
    tune, test = splits
    sc = B.tfidf_feature_scores(small, tune, test, seed=0, feature_spec=spec)
    _check_layout(sc, small, test)
    assert _avg_auc(small, sc, test) > 0.6
    # shuffled test labels (and oracle probabilities) leave every score unchanged; the same seed
    # gives the same scores bit for bit
    rng = np.random.default_rng(7)
    labels = small.labels.copy()
    is_test = labels["user_id"].isin(set(test)).to_numpy()
    labels.loc[is_test, "label"] = rng.permutation(labels.loc[is_test, "label"].to_numpy())
    labels.loc[is_test, "oracle_prob"] = rng.uniform(size=int(is_test.sum()))
    shuffled = dataclasses.replace(small, labels=labels)
    pd.testing.assert_frame_equal(sc, B.tfidf_feature_scores(shuffled, tune, test, seed=0, feature_spec=spec))
    # the text block is in the fit: a tiny share of it gives other scores
    tiny = B.tfidf_feature_scores(small, tune, test, seed=0, feature_spec=spec, config=B.TfidfConfig(text_share=1e-6))
    assert not np.allclose(tiny["score"], sc["score"])


def test_tfidf_is_fitted_on_tune_users_only(word_world):
    """Vocabulary, idf and block scale come from the tune users: rewording some test users' searches
    (a new word used by many of them, a common one gone) moves their own scores and nobody else's."""
    w = word_world
    tune, test = w.users_in("tune"), w.users_in("test")
    base = B.tfidf_feature_scores(w, tune, test, seed=0)
    changed = set(test[: len(test) // 2])
    events = w.events.copy()
    events.loc[events["user_id"].isin(changed) & (events["text"] == "weather tomorrow"), "text"] = "zyzzyva zyzzyva"
    again = B.tfidf_feature_scores(dataclasses.replace(w, events=events), tune, test, seed=0)
    same = ~base["user_id"].isin(changed)
    pd.testing.assert_frame_equal(base[same], again[same])
    assert not np.allclose(base.loc[~same, "score"], again.loc[~same, "score"])


def _truth_embed(world, calls):
    """A query-dependent embed_fn that knows what the features miss: the logit of the task's true
    probability (the task is read off the query) next to three noise columns."""
    by_query = dict(zip(world.tasks["query"], world.tasks["task_id"]))
    truth = world.labels.pivot(index="user_id", columns="task_id", values="oracle_prob")

    def embed(user_ids, query):
        calls.append(query)
        p = truth.loc[list(user_ids), by_query[query]].to_numpy(dtype=float).clip(1e-6, 1 - 1e-6)
        noise = np.random.default_rng(1).normal(size=(len(user_ids), 3))
        return np.column_stack([np.log(p / (1 - p)), noise])

    return embed


def test_combined_probe_beats_features_alone(small, splits, spec):
    tune, test = splits
    calls: list = []
    combined = B.combined_probe_scores(_truth_embed(small, calls), small, tune, test, seed=0, feature_spec=spec)
    assert calls == small.tasks["query"].tolist()  # once per task, with that task's query
    _check_layout(combined, small, test)
    features = B.feature_scores(small, tune, test, model="logreg", seed=0, feature_spec=spec)
    assert _avg_auc(small, combined, test) > _avg_auc(small, features, test) + 0.03
    # a useless embedding costs the features little: the probe learns to ignore it
    noise = B.combined_probe_scores(_noise_embed, small, tune, test, seed=0, feature_spec=spec)
    assert _avg_auc(small, noise, test) > _avg_auc(small, features, test) - 0.03
    # only tune labels are read
    labels = small.labels.copy()
    is_test = labels["user_id"].isin(set(test)).to_numpy()
    labels.loc[is_test, "label"] = 1 - labels.loc[is_test, "label"]
    pd.testing.assert_frame_equal(
        combined,
        B.combined_probe_scores(_truth_embed(small, []), dataclasses.replace(small, labels=labels), tune, test,
                                seed=0, feature_spec=spec),
    )
    static_calls: list = []
    B.combined_probe_scores(_trait_embed(small, static_calls), small, tune, test, feature_spec=spec, query_dependent=False)
    assert static_calls == [None]


def test_new_baselines_name_bad_input(small, splits, word_world):
    tune, test = splits
    with pytest.raises(DataValidationError, match=r"tune_users: 1 user id\(s\) are not in world.users.*'nobody'"):
        B.tfidf_feature_scores(small, tune[:-1] + ["nobody"], test)
    with pytest.raises(DataValidationError, match=r"test_users: 2 user id\(s\) are not in world.users.*'ghost1'"):
        B.combined_probe_scores(_noise_embed, small, tune, test[:-2] + ["ghost1", "ghost2"])
    with pytest.raises(DataValidationError, match="not in world.users"):
        B.feature_scores(small, tune, test[:-1] + ["nobody"], model="logreg")
    with pytest.raises(ValueError, match="overlap"):
        B.tfidf_feature_scores(small, tune, test + tune[:2])
    no_text = dataclasses.replace(word_world, events=word_world.events.drop(columns="text"))
    with pytest.raises(DataValidationError, match="no 'text' column"):
        B.tfidf_feature_scores(no_text, word_world.users_in("tune"), word_world.users_in("test"))
    with pytest.raises(DataValidationError, match="no term occurs in 10000 or more tune users"):
        B.tfidf_feature_scores(word_world, word_world.users_in("tune"), word_world.users_in("test"),
                               config=B.TfidfConfig(min_df=10_000))

    def short(user_ids, query):
        return np.zeros((len(user_ids) - 1, 4))

    with pytest.raises(ValueError, match="embed_fn.*rows"):
        B.combined_probe_scores(short, small, tune, test)


@pytest.mark.parametrize(
    "kw, match",
    [
        ({"ngram_max": 0}, "ngram_max.*1: words only"),
        ({"min_df": 0}, "min_df"),
        ({"min_df": 2.5}, "min_df"),
        ({"text_share": 0.0}, "text_share.*feature_scores"),
        ({"text_share": float("inf")}, "text_share"),
        ({"sublinear_tf": "yes"}, "sublinear_tf"),
        ({"probe": {"Cs": (1.0,)}}, "ProbeConfig or None"),
    ],
)
def test_tfidf_config_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        B.TfidfConfig(**kw)


def test_blended_probes_weigh_complementary_blocks_and_check_their_input():
    from qanchor_lab.baselines import ProbeConfig, probe_scores, blended_probe_scores, blend_min_per_class

    rng = np.random.default_rng(0)
    n = 900
    a, b = rng.normal(size=(n, 1)), rng.normal(size=(n, 1))
    y = (rng.random(n) < 1 / (1 + np.exp(-(1.5 * a[:, 0] + 1.5 * b[:, 0])))).astype(int)
    # block A: the first signal among 60 noise columns; block B: the second signal, 4 columns
    A = np.hstack([a, rng.normal(size=(n, 60))])
    Bk = np.hstack([b, rng.normal(size=(n, 3))])
    tr, te = np.arange(600), np.arange(600, n)
    auc = lambda s: roc_auc_score(y[te], s)  # noqa: E731
    blended = auc(blended_probe_scores([A[tr], Bk[tr]], y[tr], [A[te], Bk[te]]))
    alone = max(auc(probe_scores(A[tr], y[tr], A[te])), auc(probe_scores(Bk[tr], y[tr], Bk[te])))
    assert blended > alone + 0.03          # both signals, each read by its own probe
    again = blended_probe_scores([A[tr], Bk[tr]], y[tr], [A[te], Bk[te]])
    np.testing.assert_array_equal(again, blended_probe_scores([A[tr], Bk[tr]], y[tr], [A[te], Bk[te]]))
    with pytest.raises(ValueError, match="two train blocks and their two test blocks"):
        blended_probe_scores([A[tr], Bk[tr]], y[tr], [A[te]])
    # a user's score does not depend on who else is scored
    np.testing.assert_allclose(blended_probe_scores([A[tr], Bk[tr]], y[tr], [A[te][:50], Bk[te][:50]]),
                               again[:50], rtol=1e-9)
    few = np.zeros(40, dtype=int)
    few[:4] = 1
    assert blend_min_per_class(ProbeConfig()) == 5
    with pytest.raises(DataValidationError, match="blended probe.*4 positive.*at least 5"):
        blended_probe_scores([A[:40], Bk[:40]], few, [A[:5], Bk[:5]])


def test_a_task_too_rare_to_blend_falls_back_to_one_probe_with_a_warning():
    rng = np.random.default_rng(0)
    n_tune, n_test = 120, 40
    users = [f"u{i}" for i in range(n_tune + n_test)]
    y = np.zeros(n_tune + n_test, dtype=int)
    y[[0, 10, 20, 30, n_tune, n_tune + 1]] = 1                 # 4 tune positives: enough to probe, not to blend
    labels = pd.DataFrame({"user_id": users, "task_id": "t", "label": y})
    tasks = pd.DataFrame({"task_id": ["t"], "domain": ["risk"], "query": ["Will it happen?"], "positive_rate": [0.05]})
    feats = rng.normal(size=(n_tune + n_test, 5))
    emb = lambda ids, q: rng.normal(size=(len(ids), 4))        # noqa: E731
    with pytest.warns(UserWarning, match="task 't': 4 positive.*one probe"):
        out = B.embedding_probe_scores(emb, users[:n_tune], users[n_tune:], labels, tasks, features=feats)
    assert len(out) == n_test and np.isfinite(out["score"]).all()


def test_text_embedding_reads_only_the_history_window(small, splits):
    """The text baseline serialises what the features read: a test user's event after the window's end (a label
    window's behaviour) stays out of their text, one inside it is in."""
    tune, test = splits
    start, end = FeatureSpec.fit_world(small, small.users_in("pretrain")).window
    user = test[0]
    row = small.events[small.events["user_id"] == user].iloc[[0]]
    extra = pd.concat([row.assign(timestamp=end + pd.Timedelta(hours=2), text="zzafter the window"),
                       row.assign(timestamp=end - pd.Timedelta(hours=2), text="zzinside the window")])
    world = dataclasses.replace(small, events=pd.concat([small.events, extra], ignore_index=True))

    class Recorder:
        name = "recorder"
        texts: list[str] = []

        def encode(self, texts):
            self.texts.extend(texts)
            return np.ones((len(texts), 4), dtype=np.float32)

    rec = Recorder()
    with pytest.warns(OutsideWindowWarning, match="1 at or after its end"):  # said, as for the features
        B.text_embedding_vectors(world, [user, test[1]], encoder=rec, show_progress=False)
    assert "zzinside the window" in rec.texts[0]
    assert "zzafter the window" not in rec.texts[0]
