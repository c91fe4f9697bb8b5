"""Tests for qanchor_lab.metrics: AUC/KS by hand, per-task tables, summaries and the bootstraps."""

from __future__ import annotations


import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from qanchor_lab import metrics as M
from qanchor_lab.data import DataValidationError


# ---------------------------------------------------------------------------------------------
# auc / ks


def test_auc_ks_by_hand():
    # pairs (pos, neg): (.35,.1) win, (.35,.4) loss, (.8,.1) win, (.8,.4) win -> 3/4.
    # thresholds .8: TPR .5 FPR 0; .4: .5/.5; .35: 1/.5; .1: 1/1 -> max gap .5
    y, s = [0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]
    assert M.auc(y, s) == pytest.approx(0.75)
    assert M.ks(y, s) == pytest.approx(0.5)


def test_ties_count_half_and_ks_cannot_split_a_tie():
    # pos .5 ties neg .5 (half), beats .2; pos .9 beats both -> 3.5 / 4
    assert M.auc([0, 1, 0, 1], [0.5, 0.5, 0.2, 0.9]) == pytest.approx(0.875)
    assert M.auc([1, 0], [0.3, 0.3]) == pytest.approx(0.5)
    assert M.ks([1, 0], [0.3, 0.3]) == pytest.approx(0.0)
    assert M.ks([1, 1, 0, 0], [0.9, 0.8, 0.2, 0.1]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "y, s, match",
    [
        ([0, 1, 1], [0.1, 0.2], "differ in length: 3 vs 2"),
        ([1, 1, 1], [0.1, 0.2, 0.3], "only class 1"),
        ([0, 1, 1], [0.1, float("nan"), 0.3], r"NaN or infinite .*position\(s\) \[1\]"),
        ([0, 2, 1], [0.1, 0.2, 0.3], r"0/1 labels; found \[2\]"),
        ([], [], "empty"),
    ],
)
def test_auc_ks_bad_input(y, s, match):
    for fn in (M.auc, M.ks):
        with pytest.raises(ValueError, match=match):
            fn(y, s)


@pytest.mark.parametrize("metric", ["auc", "ks"])
def test_weighted_metric_matches_sklearn_with_sample_weight(metric):
    rng = np.random.default_rng(3)
    for _ in range(30):
        n = int(rng.integers(4, 120))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        s = np.round(rng.normal(size=n) + y, int(rng.integers(0, 3)))  # rounding makes ties
        w = rng.integers(0, 4, n).astype(float)
        w[:2] = 1.0
        task = M._sort_task(np.arange(n), y.astype(float), s)
        got = M._weighted_metric(task, w[:, None], metric)[0]
        if metric == "auc":
            want = roc_auc_score(y, s, sample_weight=w)
        else:
            fpr, tpr, _ = roc_curve(y, s, sample_weight=w)
            want = np.max(tpr - fpr)
        assert got == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# tables


def _world(n_users=200, seed=0, tasks=("t1", "t2", "t3"), domains=("risk", "risk", "marketing")):
    """Labels for every (user, task) and a good and a random score table."""
    rng = np.random.default_rng(seed)
    users = [f"u{i:04d}" for i in range(n_users)]
    task_df = pd.DataFrame({"task_id": list(tasks), "domain": list(domains), "query": [f"q {t}" for t in tasks]})
    rows = [(u, t, int(rng.random() < 0.3)) for t in tasks for u in users]
    labels = pd.DataFrame(rows, columns=["user_id", "task_id", "label"])
    good = labels[["user_id", "task_id"]].assign(score=labels["label"] * 2.0 + rng.normal(size=len(labels)))
    noise = labels[["user_id", "task_id"]].assign(score=rng.normal(size=len(labels)))
    return labels, good, noise, task_df


def test_task_metrics_rows_match_direct_computation():
    labels, good, _, tasks = _world()
    table = M.task_metrics(labels, good.sample(frac=1.0, random_state=1), tasks)
    assert table.columns.tolist() == ["task_id", "domain", "auc", "ks", "n", "positive_rate"]
    assert table["task_id"].tolist() == ["t1", "t2", "t3"]
    assert table["domain"].tolist() == ["risk", "risk", "marketing"]
    for row in table.itertuples(index=False):
        lab = labels[labels.task_id == row.task_id].merge(good, on=["user_id", "task_id"])
        assert row.auc == pytest.approx(M.auc(lab.label, lab.score))
        assert row.ks == pytest.approx(M.ks(lab.label, lab.score))
        assert row.n == 200
        assert row.positive_rate == pytest.approx(lab.label.mean())


def test_task_metrics_missing_score_names_user_and_task():
    labels, good, _, tasks = _world()
    partial = good[~((good.user_id == "u0007") & (good.task_id == "t2"))]
    with pytest.raises(DataValidationError, match=r"no score.*\('u0007', 't2'\)"):
        M.task_metrics(labels, partial, tasks)


def test_task_metrics_bad_scores_named():
    labels, good, _, tasks = _world()
    nan = good.copy()
    nan.loc[nan.index[5], "score"] = np.nan
    with pytest.raises(DataValidationError, match=r"'score'.*\('u0005', 't1'\)"):
        M.task_metrics(labels, nan, tasks)
    dup = pd.concat([good, good.iloc[[3]]])
    with pytest.raises(DataValidationError, match=r"more than one score.*'u0003'"):
        M.task_metrics(labels, dup, tasks)
    with pytest.raises(DataValidationError, match=r"missing required column\(s\) 'score'"):
        M.task_metrics(labels, good.rename(columns={"score": "prob"}), tasks)


def test_task_metrics_single_class_task_named():
    labels, good, _, tasks = _world()
    labels = labels.copy()
    labels.loc[labels.task_id == "t3", "label"] = 0
    with pytest.raises(DataValidationError, match=r"task 't3'.*only class 0"):
        M.task_metrics(labels, good, tasks)


def test_summarize_averages_by_hand():
    table = pd.DataFrame(
        {
            "task_id": ["a", "b", "c"],
            "domain": ["marketing", "risk", "risk"],
            "auc": [0.9, 0.6, 0.7],
            "ks": [0.5, 0.2, 0.4],
        }
    )
    out = M.summarize(table)
    assert out["avg_auc"] == pytest.approx((0.9 + 0.6 + 0.7) / 3)
    assert out["avg_ks"] == pytest.approx((0.5 + 0.2 + 0.4) / 3)
    assert list(out["domains"]) == ["risk", "marketing"]  # canonical DOMAINS order
    assert out["domains"]["risk"] == pytest.approx({"auc": 0.65, "ks": 0.3})
    assert out["domains"]["marketing"] == pytest.approx({"auc": 0.9, "ks": 0.5})
    assert out["tasks"]["b"] == pytest.approx({"auc": 0.6, "ks": 0.2})
    with pytest.raises(DataValidationError, match="'ks'"):
        M.summarize(table.drop(columns="ks"))


# ---------------------------------------------------------------------------------------------
# bootstraps


def test_paired_bootstrap_identical_methods_is_zero():
    labels, good, _, tasks = _world()
    out = M.paired_bootstrap(labels, good, good.copy(), tasks, n_boot=200, seed=1)
    assert out["diff"] == 0.0
    assert out["low"] <= 0.0 <= out["high"]
    assert out["low"] == out["high"] == 0.0
    assert out["p_value"] == 1.0


@pytest.mark.parametrize("metric", ["auc", "ks"])
def test_paired_bootstrap_better_method_ci_above_zero(metric):
    labels, good, noise, tasks = _world()
    out = M.paired_bootstrap(labels, good, noise, tasks, metric=metric, n_boot=300, seed=0, per_task=True)
    per_a = M.task_metrics(labels, good, tasks)
    per_b = M.task_metrics(labels, noise, tasks)
    assert out["diff"] == pytest.approx((per_a[metric] - per_b[metric]).mean())
    assert 0.0 < out["low"] < out["diff"] < out["high"]
    assert out["p_value"] == 0.0
    assert set(out["tasks"]) == {"t1", "t2", "t3"}
    for j, t in enumerate(["t1", "t2", "t3"]):
        task = out["tasks"][t]
        assert task["diff"] == pytest.approx(per_a[metric][j] - per_b[metric][j])
        assert task["low"] < task["diff"] < task["high"]
    # reversed order: the difference flips sign and the one-sided p-value goes to 1
    rev = M.paired_bootstrap(labels, noise, good, tasks, metric=metric, n_boot=300, seed=0)
    assert rev["diff"] == pytest.approx(-out["diff"])
    assert rev["high"] < 0.0 and rev["p_value"] == 1.0
    two = M.paired_bootstrap(labels, noise, good, tasks, metric=metric, n_boot=300, seed=0, alternative="two-sided")
    assert two["p_value"] == 0.0


def test_paired_bootstrap_p_value_agrees_with_its_interval():
    """p < 1 - ci just when the basic interval excludes 0, also for KS, whose resampled differences are skewed
    (a coarse score's KS gains less on resamples than a continuous one's): the share of diff* <= 0 would say
    p = 0 while the interval spans 0. A p within one step (2 / n_boot two-sided) of 1 - ci may fall either
    way, as np.quantile interpolates between resamples, so those cases are left out."""
    def off_edge(p, alpha, step):
        return abs(p - alpha) > step + 1e-12

    seen = []
    for seed in range(6):
        labels, good, _, tasks = _world(n_users=600, seed=seed)
        rng = np.random.default_rng(seed)
        fine = good.assign(score=good["score"] + 1.5 * rng.normal(size=len(good)))
        coarse = fine.assign(score=np.round(fine["score"] / 1.5))
        draws = M.Resamples(labels, tasks, {"fine": fine, "coarse": coarse}, n_boot=400, seed=seed)
        for metric in M.METRICS:
            for ci in (0.9, 0.95):
                two = draws.paired("fine", "coarse", metric, ci=ci, alternative="two-sided", per_task=True)
                for out in [two, *two["tasks"].values()]:
                    if off_edge(out["p_value"], 1 - ci, 2 / two["n_boot"]):
                        excludes = out["low"] > 0 or out["high"] < 0
                        seen.append((metric, excludes))
                        assert excludes == (out["p_value"] < 1 - ci), (seed, metric, ci, out)
                one = draws.paired("fine", "coarse", metric, ci=ci, alternative="greater")
                if off_edge(one["p_value"], (1 - ci) / 2, 1 / one["n_boot"]):
                    assert (one["low"] > 0) == (one["p_value"] < (1 - ci) / 2), (seed, metric, ci, one)
    # both sides of the property were exercised, on the skewed metric too, and few cases were on the edge
    assert {("ks", True), ("ks", False), ("auc", True)} <= set(seen) and len(seen) >= 90


def test_bootstraps_deterministic_under_seed():
    labels, good, noise, tasks = _world(n_users=120)
    a = M.paired_bootstrap(labels, good, noise, tasks, n_boot=100, seed=5, per_task=True)
    b = M.paired_bootstrap(labels, good, noise, tasks, n_boot=100, seed=5, per_task=True)
    c = M.paired_bootstrap(labels, good, noise, tasks, n_boot=100, seed=6, per_task=True)
    assert a == b
    assert (a["low"], a["high"]) != (c["low"], c["high"])
    assert M.bootstrap_ci(labels, good, tasks, n_boot=100, seed=5) == M.bootstrap_ci(labels, good, tasks, n_boot=100, seed=5)


def test_bootstrap_ci_brackets_the_observed_average():
    labels, good, _, tasks = _world()
    summary = M.summarize(M.task_metrics(labels, good, tasks))
    for metric in ("auc", "ks"):
        out = M.bootstrap_ci(labels, good, tasks, metric=metric, n_boot=300, seed=0, per_task=True)
        assert out["value"] == pytest.approx(summary[f"avg_{metric}"])
        assert out["low"] < out["value"] < out["high"]
        assert out["high"] - out["low"] < 0.2
        assert out["tasks"]["t2"]["value"] == pytest.approx(summary["tasks"]["t2"][metric])
        narrow = M.bootstrap_ci(labels, good, tasks, metric=metric, n_boot=300, seed=0, ci=0.5)
        assert out["low"] < narrow["low"] < narrow["high"] < out["high"]


def test_bootstrap_resamples_users_not_rows():
    # A task whose labels are a copy of another's with the same scores: if users are resampled jointly,
    # both tasks move together and the per-task bootstrap values are identical in every resample.
    labels, good, _, tasks = _world(tasks=("t1", "t2"), domains=("risk", "risk"))
    labels = labels.copy()
    good = good.copy()
    labels.loc[labels.task_id == "t2", "label"] = labels.loc[labels.task_id == "t1", "label"].to_numpy()
    good.loc[good.task_id == "t2", "score"] = good.loc[good.task_id == "t1", "score"].to_numpy()
    out = M.bootstrap_ci(labels, good, tasks, n_boot=200, seed=0, per_task=True)
    assert out["tasks"]["t1"] == out["tasks"]["t2"]


def test_resamples_shared_by_many_methods_match_the_one_method_bootstraps(monkeypatch):
    labels, good, noise, tasks = _world(n_users=150)
    shuffled = noise.sample(frac=1.0, random_state=0)  # joined on (user, task), not on row order
    draws = M.Resamples(labels, tasks, {"good": good, "noise": shuffled}, n_boot=200, seed=4)
    for metric in M.METRICS:
        assert draws.ci("good", metric, per_task=True) == M.bootstrap_ci(
            labels, good, tasks, metric=metric, n_boot=200, seed=4, per_task=True)
        assert draws.ci("noise", metric, ci=0.8) == M.bootstrap_ci(
            labels, noise, tasks, metric=metric, n_boot=200, seed=4, ci=0.8)
        assert draws.paired("good", "noise", metric, alternative="two-sided", per_task=True) == M.paired_bootstrap(
            labels, good, noise, tasks, metric=metric, n_boot=200, seed=4, alternative="two-sided", per_task=True)
    # each (method, metric) is resampled once, however many intervals and differences read it
    calls = []
    real = M._per_task_values
    monkeypatch.setattr(M, "_per_task_values", lambda prep, name, w, metric: calls.append((name, metric, w.shape[1]))
                        or real(prep, name, w, metric))
    fresh = M.Resamples(labels, tasks, {"good": good, "noise": noise}, n_boot=50, seed=4)
    for _ in range(3):
        fresh.ci("good")
        fresh.paired("good", "noise")
        fresh.paired("noise", "good", ci=0.5)
    assert sorted(calls) == [("good", "auc", 1), ("good", "auc", 50), ("noise", "auc", 1), ("noise", "auc", 50)]
    with pytest.raises(KeyError, match="no scores named 'bad'; known: good, noise"):
        fresh.ci("bad")
    with pytest.raises(ValueError, match="unknown metric 'f1'"):
        fresh.paired("good", "noise", "f1")
    with pytest.raises(DataValidationError, match="noise: 1 labelled"):
        M.Resamples(labels, tasks, {"good": good, "noise": noise.iloc[1:]}, n_boot=10)


def test_resamples_take_hundreds_of_score_tables_quietly():
    """A label curve resamples one table per (method, budget, draw): a few hundred, with no pandas warning."""
    import warnings

    labels, good, noise, tasks = _world(n_users=60)
    tables = {f"m{i}": (good if i % 2 else noise) for i in range(150)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        draws = M.Resamples(labels, tasks, tables, n_boot=20, seed=1)
    assert draws.ci("m1") == M.bootstrap_ci(labels, good, tasks, n_boot=20, seed=1)


def test_contrast_is_paired_for_two_methods_and_weighs_differences_of_differences():
    labels, good, noise, tasks = _world(n_users=150)
    half = good.assign(score=0.5 * good["score"])                      # the same ranking: the same AUC everywhere
    draws = M.Resamples(labels, tasks, {"good": good, "noise": noise, "half": half, "twin": noise.copy()},
                        n_boot=200, seed=4)
    assert draws.contrast({"good": 1, "noise": -1}, per_task=True) == draws.paired("good", "noise", per_task=True)
    # (good - noise) - (half - twin) is zero in every resample, whatever noise does
    zero = draws.contrast({"good": 1, "noise": -1, "half": -1, "twin": 1}, "ks")
    assert [zero["diff"], zero["low"], zero["high"]] == pytest.approx([0, 0, 0], abs=1e-12)
    gain = draws.contrast({"good": 2, "noise": -2})
    once = draws.paired("good", "noise")
    assert gain["diff"] == pytest.approx(2 * once["diff"]) and gain["low"] == pytest.approx(2 * once["low"])
    assert draws.paired("good", "good")["diff"] == 0.0                  # a method against itself
    with pytest.raises(ValueError, match="at least one"):
        draws.contrast({})
    with pytest.raises(KeyError, match="no scores named 'bad'"):
        draws.contrast({"good": 1, "bad": -1})


def test_contrast_widens_by_another_source_of_variation_around_the_same_value():
    labels, good, noise, tasks = _world(n_users=150)
    draws = M.Resamples(labels, tasks, {"good": good, "noise": noise}, n_boot=200, seed=4)
    alone = draws.paired("good", "noise")
    # draws that do not vary add nothing, whatever their level: only deviations from their mean count
    flat = draws.contrast({"good": 1, "noise": -1}, other_draws=np.full(5, 0.3))
    assert [flat["diff"], flat["low"], flat["high"], flat["p_value"]] == [alone["diff"], alone["low"], alone["high"],
                                                                         alone["p_value"]]
    spread = draws.contrast({"good": 1, "noise": -1}, other_draws=np.array([-0.05, 0.05]))
    assert spread["diff"] == alone["diff"] and spread["low"] < alone["low"] - 0.02 and spread["high"] > alone["high"] + 0.02
    for bad in (np.array([0.1]), np.zeros((2, 2)), np.array([0.0, np.nan])):
        with pytest.raises(ValueError, match="other_draws must be a 1-d array of at least 2 finite numbers"):
            draws.contrast({"good": 1, "noise": -1}, other_draws=bad)


def test_bootstrap_bad_arguments():
    labels, good, noise, tasks = _world(n_users=50)
    with pytest.raises(ValueError, match="unknown metric 'f1'; valid choices: auc, ks"):
        M.paired_bootstrap(labels, good, noise, tasks, metric="f1")
    with pytest.raises(ValueError, match="n_boot"):
        M.bootstrap_ci(labels, good, tasks, n_boot=0)
    with pytest.raises(ValueError, match="ci must lie"):
        M.bootstrap_ci(labels, good, tasks, ci=95)
    with pytest.raises(ValueError, match="unknown alternative 'less'"):
        M.paired_bootstrap(labels, good, noise, tasks, alternative="less")
