"""The label curve: probe AUC against the number of labelled tune users, paired across representations."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from qanchor_lab.label_budget import curve_summary, draw_labelled, fit_label_curve, label_curve, run_label_curve


def test_draw_labelled_keeps_the_class_balance_and_a_floor_per_class():
    y = np.r_[np.ones(30), np.zeros(270)].astype(int)
    rng = np.random.default_rng(0)
    picked = draw_labelled(y, 100, rng, 3)
    assert len(picked) == len(set(picked)) == 100 and y[picked].sum() == 10       # 10% positive, as the split
    assert y[draw_labelled(y, 12, rng, 3)].sum() == 3                              # the floor: round(1.2) -> 3
    assert np.array_equal(draw_labelled(y, 50, np.random.default_rng(5), 3), draw_labelled(y, 50, np.random.default_rng(5), 3))
    with pytest.raises(ValueError, match="exceeds the 300 tune users"):
        draw_labelled(y, 301, rng, 3)
    with pytest.raises(ValueError, match="cannot hold 3 of each class"):
        draw_labelled(y, 5, rng, 3)


def _split(world):
    return world.users_in("tune"), world.users_in("test")


def _labels(world, tasks):
    return world.labels[world.labels["task_id"].isin(tasks["task_id"])]


def _oracle_reps(world, tune, test, rng):
    """'own': each task's true logit plus noise, in that task's slice only (per task); 'noise': random."""
    tasks = world.tasks["task_id"].tolist()
    p = world.labels.pivot(index="user_id", columns="task_id", values="oracle_prob").loc[tune + test, tasks].to_numpy()
    own = np.log(p / (1 - p))[:, :, None] + rng.normal(0, 1, (len(p), len(tasks), 3))   # (U, T, 3)
    return {"own": own, "noise": rng.normal(size=(len(p), 4))}


def _two_tasks(world):
    """(tune, test, tasks, reps, labels) of the world's first two tasks: 'own' (their true logits plus noise) and
    'noise'."""
    tune, test = _split(world)
    tasks = world.tasks.iloc[:2]
    reps = _oracle_reps(world, tune, test, np.random.default_rng(0))
    return tune, test, tasks, {"own": reps["own"][:, :2], "noise": reps["noise"]}, _labels(world, tasks)


def test_label_curve_is_paired_deterministic_and_tells_signal_from_noise(small_world):
    tune, test = _split(small_world)
    tasks = small_world.tasks.iloc[:2]
    reps = _oracle_reps(small_world, tune, test, np.random.default_rng(0))
    reps = {"own": reps["own"][:, :2], "noise": reps["noise"], "twin": reps["own"][:, :2].copy()}
    kw = dict(budgets=(40, len(tune)), draws=3, seed=1)
    curve = label_curve(reps, _labels(small_world, tasks), tasks, tune, test, **kw)
    assert len(curve) == (3 + 1) * 2 * 3                             # every tune user: one draw only
    assert curve.equals(label_curve(reps, _labels(small_world, tasks), tasks, tune, test, **kw))
    # the same users are labelled for every representation: a copy scores exactly alike, draw by draw
    paired = curve.pivot_table(index=["budget", "draw", "task_id"], columns="method", values="auc")
    assert (paired["own"] == paired["twin"]).all() and paired["own"].nunique() > 3
    assert not curve.equals(label_curve(reps, _labels(small_world, tasks), tasks, tune, test, **{**kw, "seed": 2}))
    # rows by budget, draw, task (the tasks table's order), method (the representations' order)
    order = [(n, r, t, m) for n, r in [(40, 0), (40, 1), (40, 2), (len(tune), 0)] for t in tasks["task_id"] for m in reps]
    assert list(curve[["budget", "draw", "task_id", "method"]].itertuples(index=False, name=None)) == order
    # each task draws its own labelled users: a copy of a task under another id, with the same labels and the same
    # representation, gets other draws (the same share of positives), so the curve's draws are not tied across tasks
    first = tasks["task_id"].iloc[0]
    both = pd.concat([tasks.iloc[:1], tasks.iloc[:1].assign(task_id="copy")], ignore_index=True)
    first_labels = small_world.labels[small_world.labels["task_id"] == first]
    twins = label_curve({"noise": reps["noise"]}, pd.concat([first_labels, first_labels.assign(task_id="copy")]), both,
                        tune, test, budgets=(40,), draws=3, seed=1).pivot_table(index="draw", columns="task_id",
                                                                                  values=["auc", "n_positive"])
    assert (twins["n_positive"][first] == twins["n_positive"]["copy"]).all()
    assert (twins["auc"][first] != twins["auc"]["copy"]).all()
    s = curve_summary(curve, reference="noise").set_index(["budget", "method"])
    few = s.loc[(40, "own")]
    assert few["draws"] == 3 and few["diff_low"] > 0.1 and few["auc_low"] <= few["auc"] <= few["auc_high"]
    assert s.loc[(40, "noise"), "diff"] == 0
    assert abs(s.loc[(40, "noise"), "auc"] - 0.5) < 0.1
    assert np.isnan(s.loc[(len(tune), "own"), "auc_low"])            # one draw: no interval over draws
    assert s.loc[(len(tune), "own"), "auc"] >= few["auc"] - 0.02


def test_label_curve_summary_also_resamples_the_test_users(small_world):
    from qanchor_lab.baselines import probe_scores
    from qanchor_lab.metrics import bootstrap_ci

    tune, test, tasks, reps, labels = _two_tasks(small_world)
    curve = fit_label_curve(reps, labels, tasks, tune, test, budgets=(40, len(tune)), draws=3, seed=1)
    assert curve.table().equals(label_curve(reps, labels, tasks, tune, test, budgets=(40, len(tune)), draws=3, seed=1))
    s = curve.summary("noise", n_boot=300, seed=4).set_index(["budget", "method"])
    t = curve_summary(curve.table(), reference="noise").set_index(["budget", "method"])
    # the values are the curve's; the draws' t-intervals are kept as *_draws_*; both intervals are wider than them
    assert s["auc"].tolist() == t["auc"].tolist() and s["diff"].tolist() == t["diff"].tolist()
    few = s.loc[(40, "own")]
    assert [few[f"{v}_draws_{e}"] for v in ("auc", "diff") for e in ("low", "high")] == \
        [t.loc[(40, "own"), f"{v}_{e}"] for v in ("auc", "diff") for e in ("low", "high")]
    assert few["auc_low"] < few["auc_draws_low"] < few["auc"] < few["auc_draws_high"] < few["auc_high"]
    assert 0.1 < few["diff_low"] < few["diff_draws_low"] and few["diff_high"] > few["diff_draws_high"]
    assert (s.loc[(40, "noise"), ["diff", "diff_low", "diff_high"]] == 0).all()   # the reference against itself
    # every tune user labelled: one fit, nothing drawn, so the interval is the report's bootstrap interval for the
    # same probe on the same test users (fitted here independently of the curve)
    every = s.loc[(len(tune), "own")]
    assert np.isnan(every["auc_draws_low"])
    y_tune = labels.pivot(index="user_id", columns="task_id", values="label").loc[tune, tasks["task_id"]].to_numpy()
    scores = pd.concat([pd.DataFrame({"user_id": test, "task_id": t, "score": probe_scores(
        reps["own"][:len(tune), k], y_tune[:, k], reps["own"][len(tune):, k])}) for k, t in enumerate(tasks["task_id"])])
    report = bootstrap_ci(labels[labels["user_id"].isin(set(test))], scores, tasks, n_boot=300, seed=4)
    assert [every["auc"], every["auc_low"], every["auc_high"]] == pytest.approx(
        [report["value"], report["low"], report["high"]], abs=1e-12)
    # the test users' resamples follow n_boot and the seed, and one summary's resamples serve every reference
    other = curve.summary("noise", n_boot=200, seed=4).set_index(["budget", "method"])
    assert other.loc[(40, "own"), "auc"] == few["auc"] and other.loc[(40, "own"), "auc_low"] != few["auc_low"]
    vs_own = curve.summary("own", n_boot=300, seed=4).set_index(["budget", "method"])
    assert vs_own.loc[(40, "own"), ["auc_low", "auc_high"]].tolist() == few[["auc_low", "auc_high"]].tolist()
    assert vs_own.loc[(40, "noise"), "diff_high"] == pytest.approx(-few["diff_low"])
    with pytest.raises(ValueError, match="reference 'nope'"):
        curve.summary("nope")
    # a single draw below every tune user: the spread over draws is unknown, so no interval
    one = fit_label_curve(reps, labels, tasks, tune, test, budgets=(40,), draws=1, seed=1).summary("noise")
    assert one[["auc_low", "diff_high"]].isna().all().all()


def test_label_curve_leaves_a_test_user_out_of_a_task_it_has_no_label_for(small_world):
    from qanchor_lab.data import DataValidationError

    tune, test, tasks, reps, labels = _two_tasks(small_world)
    first, gone = tasks["task_id"].iloc[0], test[0]
    holed = labels[~((labels["user_id"] == gone) & (labels["task_id"] == first))]
    kw = dict(budgets=(40,), draws=2, seed=1)
    curve = fit_label_curve(reps, holed, tasks, tune, test, **kw)
    # for that task, as if the user were not tested at all (the report scores labelled pairs only)
    keep = np.r_[np.arange(len(tune)), len(tune) + np.arange(1, len(test))]
    without = label_curve({k: v[keep] for k, v in reps.items()}, labels, tasks, tune, test[1:], **kw)
    ours = curve.table()
    assert ours[ours["task_id"] == first]["auc"].tolist() == without[without["task_id"] == first]["auc"].tolist()
    assert ours[ours["task_id"] != first]["auc"].tolist() != without[without["task_id"] != first]["auc"].tolist()
    assert np.isfinite(curve.summary("noise", n_boot=50)[["auc_low", "diff_high"]].to_numpy()).all()
    # a task whose labelled test users are all of one class has no AUC: named, not a scikit-learn error
    one_class = labels.assign(label=np.where((labels["task_id"] == first) & labels["user_id"].isin(set(test)), 0,
                                             labels["label"]))
    with pytest.raises(DataValidationError, match=f"task {first!r}: the labelled test users need both classes"):
        label_curve(reps, one_class, tasks, tune, test, **kw)


def test_probe_commands_check_their_counts_before_loading_anything(capsys, tmp_path):
    """A bad count is named at once, before the run (here not even a run) is loaded and every user embedded."""
    from qanchor_lab.cli import main

    nowhere = str(tmp_path / "nowhere")
    for argv, message in ((["label-curve", nowhere, "--draws", "0"], "--draws must be >= 1; got 0"),
                          (["label-curve", nowhere, "--budgets", "0,50"], "--budgets must be >= 1; got 0"),
                          (["tune-splits", nowhere, "--folds", "1"], "--folds must be >= 2; got 1"),
                          (["tune-splits", nowhere, "--splits", "0"], "--splits must be >= 1; got 0"),
                          (["tune-splits", nowhere, "--fit-share", "1"], "--fit-share must lie strictly between"),
                          (["refit-intervals", nowhere, "--refits", "1"], "--refits must be >= 2; got 1")):
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    assert main(["label-curve", nowhere]) == 2 and "neither a run directory" in capsys.readouterr().err


def test_label_curve_names_what_is_wrong(small_world):
    tune, test = _split(small_world)
    tasks = small_world.tasks.iloc[:1]
    good = np.zeros((len(tune) + len(test), 2))
    with pytest.raises(ValueError, match=r"representation 'short'.*rows"):
        label_curve({"short": good[:-1]}, _labels(small_world, tasks), tasks, tune, test, budgets=(40,))
    with pytest.raises(ValueError, match=r"representation 'per_task'.*\(users, tasks, d\)"):
        label_curve({"per_task": np.zeros((len(good), 3, 2))}, _labels(small_world, tasks), tasks, tune, test, budgets=(40,))
    with pytest.raises(ValueError, match="budgets must be labelled-user counts"):
        label_curve({"x": good}, _labels(small_world, tasks), tasks, tune, test, budgets=(0,))
    with pytest.raises(ValueError, match="cannot hold 3 of each class"):
        label_curve({"x": good}, _labels(small_world, tasks), tasks, tune, test, budgets=(4,))
    with pytest.raises(ValueError, match="reference 'nope'"):
        curve_summary(pd.DataFrame({"budget": [1], "draw": [0], "task_id": ["t"], "method": ["x"], "auc": [0.5]}), "nope")


@pytest.mark.slow
def test_run_label_curve_reads_a_model_under_each_query_and_the_features(tiny_model, small_world):
    from qanchor_lab.pipeline import restrict_tasks

    world = restrict_tasks(small_world, small_world.tasks["task_id"].tolist()[:2])
    curve = run_label_curve(tiny_model.eval(), world, budgets=(60,), draws=2, others={"copy": tiny_model},
                            show_progress=False)
    assert set(curve.methods) == {"qanchor_base", "static_embedding", "copy", "logreg_features"}
    s = curve.summary(n_boot=200).set_index("method")
    assert s.loc["copy", "diff"] == pytest.approx(0.0, abs=1e-12)   # the same model under the same queries
    assert s["auc"].between(0.3, 1.0).all() and curve.table()["auc"].between(0.3, 1.0).all()


@pytest.mark.slow
def test_cli_label_curve_writes_the_curve_and_names_bad_input(tiny_model, small_world, tmp_path, capsys):
    from qanchor_lab.cli import main
    from qanchor_lab.data import save_world
    from qanchor_lab.pipeline import restrict_tasks

    tiny_model.save_pretrained(tmp_path / "run" / "model")
    save_world(restrict_tasks(small_world, small_world.tasks["task_id"].tolist()[:2]), tmp_path / "data")
    rc = main(["label-curve", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--budgets", "40,60", "--draws", "2"])
    out = capsys.readouterr().out
    assert rc == 0 and "task query - generic query" in out and "wrote" in out
    curve = pd.read_csv(tmp_path / "run" / "label_curve.csv")
    assert set(curve["budget"]) == {40, 60} and set(curve["method"]) == {
        "qanchor_base", "static_embedding", "untrained", "logreg_features"}
    summary = pd.read_csv(tmp_path / "run" / "label_curve_summary.csv")
    assert set(summary["reference"]) == {"logreg_features", "static_embedding"}
    # intervals over the draws and the test users, the draws' own kept beside them
    assert (summary["auc_low"] < summary["auc_draws_low"]).all() and (summary["auc_high"] > summary["auc_draws_high"]).all()
    assert (tmp_path / "run" / "label_curve.html").stat().st_size > 1000
    assert main(["label-curve", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--budgets", "40,many"]) == 2
    assert "--budgets must be comma-separated integers" in capsys.readouterr().err


def test_tune_splits_read_tune_users_only_pair_the_methods_and_tell_signal_from_noise(small_world):
    from qanchor_lab.label_budget import tune_splits

    tune = small_world.users_in("tune")
    tasks = small_world.tasks.iloc[:2]
    test = small_world.users_in("test")
    reps = _oracle_reps(small_world, tune, test, np.random.default_rng(0))
    n = len(tune)
    reps = {"own": reps["own"][:n, :2], "noise": reps["noise"][:n], "twin": reps["own"][:n, :2].copy()}
    labels = _labels(small_world, tasks)
    frame = tune_splits(reps, labels, tasks, tune, splits=4, fit_share=0.7, seed=3)
    assert len(frame) == 4 * 2 * 3 and set(frame["draw"]) == {0, 1, 2, 3}
    assert set(frame["budget"]) == {round(0.7 * n)}
    assert frame.equals(tune_splits(reps, labels, tasks, tune, splits=4, fit_share=0.7, seed=3))      # seeded
    paired = frame.pivot_table(index=["draw", "task_id"], columns="method", values="auc")
    assert (paired["own"] == paired["twin"]).all() and paired["own"].nunique() == len(paired)    # splits differ
    s = curve_summary(frame, reference="noise").set_index("method")
    assert s.loc["own", "draws"] == 4 and s.loc["own", "diff_low"] > 0.1
    # test users are never read: their labels may be missing altogether
    no_test = labels[labels["user_id"].isin(set(tune))]
    assert frame.equals(tune_splits(reps, no_test, tasks, tune, splits=4, fit_share=0.7, seed=3))
    with pytest.raises(ValueError, match=r"representation 'noise': expected one row per tune user \(%d\)" % n):
        tune_splits({"noise": reps["noise"][:-1]}, labels, tasks, tune)
    with pytest.raises(ValueError, match="fit_share must lie strictly between 0 and 1"):
        tune_splits(reps, labels, tasks, tune, fit_share=1.0)
    with pytest.raises(ValueError, match="splits must be an int >= 1"):
        tune_splits(reps, labels, tasks, tune, splits=0)
    # a scored tune user without a label is named as a tune user, with the task it lacks
    lacking = tasks["task_id"].iloc[1]
    gap = labels[~((labels["user_id"] == tune[5]) & (labels["task_id"] == lacking))]
    with pytest.raises(ValueError, match=r"1 tune user\(s\) miss one, e.g. \['%s'\] \(task '%s'" % (tune[5], lacking)):
        tune_splits(reps, gap, tasks, tune, splits=2)
    # the labels alone rule out a split whose fitted users lack a class, or whose scored users hold one: said by
    # check_tune_splits before anything is embedded, and by tune_splits before anything is fitted
    from qanchor_lab.label_budget import check_tune_splits

    assert check_tune_splits(labels, tasks, tune, splits=4, fit_share=0.7, seed=3) == round(0.7 * n)
    few = r"tune split 0: task '[a-z_]+': a budget of 4 cannot hold 3 of each class \(\d positive, \d negative"
    with pytest.raises(ValueError, match=few):
        check_tune_splits(labels, tasks, tune, fit_share=4 / n)
    with pytest.raises(ValueError, match=few):
        tune_splits({"wrong rows": np.zeros((1, 2))}, labels, tasks, tune, fit_share=4 / n)   # before the rows check
    with pytest.raises(ValueError, match=r"tune split \d+: task '[a-z_]+': its 1 scored tune users are all [01], and "
                                         r"an AUC needs both classes"):
        check_tune_splits(labels, tasks, tune, fit_share=(n - 1) / n)


def test_split_contrasts_pair_two_runs_draw_by_draw():
    from qanchor_lab.label_budget import split_contrasts

    rng = np.random.default_rng(0)
    rows = [{"budget": b, "draw": d, "task_id": t, "method": m, "auc": 0.6 + rng.normal(0, 0.05)}
            for b in (20, 200) for d in range(6) for t in ("t1", "t2") for m in ("a", "b", "other:a", "other:b")]
    curve = pd.DataFrame(rows)
    table = split_contrasts(curve, {"a - b": {"a": 1, "b": -1}, "gain - other's": {"a": 1, "b": -1, "other:a": -1,
                                                                                   "other:b": 1}})
    assert list(table["budget"]) == [20, 20, 200, 200] and (table["draws"] == 6).all()
    # one contrast of two methods is curve_summary's paired difference, interval and all
    ref = curve_summary(curve[curve["method"].isin(["a", "b"])], reference="b").set_index(["budget", "method"])
    got = table[table["contrast"] == "a - b"].set_index("budget")
    for b in (20, 200):
        assert np.allclose(got.loc[b, ["diff", "low", "high"]].to_numpy(float),
                           ref.loc[(b, "a"), ["diff", "diff_low", "diff_high"]].to_numpy(float))
    # paired by draw: a shift shared by a run's two methods on one draw cancels, so the difference of differences
    # is the same whatever each draw's level; shuffling the other run's draws changes it
    per = curve.groupby(["budget", "draw", "method"])["auc"].mean().unstack()
    want = (per["a"] - per["b"] - per["other:a"] + per["other:b"]).groupby(level="budget").mean()
    assert np.allclose(table[table["contrast"] == "gain - other's"]["diff"], want.to_numpy())
    shifted = curve.assign(auc=curve["auc"] + np.where(curve["method"].str.startswith("other:"), curve["draw"] * 0.1, 0))
    gain = table[table["contrast"] == "gain - other's"]
    again = split_contrasts(shifted, {"g": {"a": 1, "b": -1, "other:a": -1, "other:b": 1}})
    assert np.allclose(again[["diff", "low"]], gain[["diff", "low"]])
    other = curve["method"].str.startswith("other:")
    rolled = curve.assign(draw=np.where(other, (curve["draw"] + 1) % 6, curve["draw"]))
    unpaired = split_contrasts(rolled, {"g": {"a": 1, "b": -1, "other:a": -1, "other:b": 1}})
    assert np.allclose(unpaired["diff"], gain["diff"]) and not np.allclose(unpaired["low"], gain["low"])
    with pytest.raises(ValueError, match="contrasts name methods the curve lacks: c; methods"):
        split_contrasts(curve, {"x": {"a": 1, "c": -1}})
    with pytest.raises(ValueError, match="curve is empty"):
        split_contrasts(curve.iloc[:0], {"x": {"a": 1}})


def test_tune_crossfit_scores_every_tune_user_once_and_its_resamples_cover_users(small_world):
    from qanchor_lab.label_budget import tune_crossfit, tune_resamples, tune_splits

    tune = small_world.users_in("tune")
    tasks = small_world.tasks.iloc[:2]
    reps = _oracle_reps(small_world, tune, [], np.random.default_rng(0))
    reps = {"own": reps["own"][:, :2], "noise": reps["noise"], "twin": reps["own"][:, :2].copy()}
    labels = _labels(small_world, tasks)
    scores = tune_crossfit(reps, labels, tasks, tune, folds=4, seed=3)
    assert len(scores) == len(tune) * 2 * 3 and not scores.duplicated(["user_id", "task_id", "method"]).any()
    folds = scores.drop_duplicates("user_id").set_index("user_id")["fold"]
    assert sorted(folds.index) == sorted(tune) and folds.value_counts().max() - folds.value_counts().min() <= 1
    assert scores.equals(tune_crossfit(reps, labels, tasks, tune, folds=4, seed=3))               # seeded
    wide = scores.pivot_table(index=["user_id", "task_id"], columns="method", values="score")
    assert (wide["own"] == wide["twin"]).all()                          # paired: the same folds for every method
    # test users are never read: their labels may be missing altogether
    no_test = labels[labels["user_id"].isin(set(tune))]
    assert scores.equals(tune_crossfit(reps, no_test, tasks, tune, folds=4, seed=3))
    draws = tune_resamples(scores, no_test, tasks, n_boot=300, seed=0)
    own = draws.paired("own", "noise")
    assert own["low"] > 0.1 and draws.paired("own", "twin")["diff"] == 0.0
    # each fold's AUC is its own probe's, averaged over folds and tasks
    y = no_test.set_index(["user_id", "task_id"])["label"]
    per_fold = [roc_auc_score(y.loc[list(zip(g.user_id, g.task_id))], g.score)
                for _, g in scores[scores.method == "own"].groupby(["task_id", "fold"])]
    assert draws.ci("own")["value"] == pytest.approx(np.mean(per_fold))
    # intervals that resample users are wider than the splits' (which cover the probe's draws only)
    splits = curve_summary(tune_splits(reps, labels, tasks, tune, splits=20, seed=3), reference="noise")
    half_splits = splits.set_index("method").loc["own", ["diff_low", "diff_high"]].diff().iloc[-1] / 2
    assert (own["high"] - own["low"]) / 2 > half_splits
    with pytest.raises(ValueError, match="folds must be an int >= 2"):
        tune_crossfit(reps, labels, tasks, tune, folds=1)
    with pytest.raises(ValueError, match=r"representation 'noise': expected one row per tune user \(%d\)" % len(tune)):
        tune_crossfit({"noise": reps["noise"][:-1]}, labels, tasks, tune)
    lacking = tasks["task_id"].iloc[1]
    gap = labels[~((labels["user_id"] == tune[5]) & (labels["task_id"] == lacking))]
    with pytest.raises(ValueError, match=r"tune_crossfit scores tune users.*\['%s'\] \(task '%s'" % (tune[5], lacking)):
        tune_crossfit(reps, gap, tasks, tune)
    with pytest.raises(ValueError, match="tune scores.*fold"):
        tune_resamples(scores.drop(columns="fold"), labels, tasks)


def test_refit_scores_refit_the_probes_on_shared_draws_and_widen_the_report_intervals(small_world):
    from qanchor_lab.baselines import ProbeConfig, blended_probe_scores, probe_scores
    from qanchor_lab.label_budget import refit_contrasts, refit_scores
    from qanchor_lab.metrics import Resamples

    tune, test = _split(small_world)
    tasks = small_world.tasks.iloc[:2]
    reps = _oracle_reps(small_world, tune, test, np.random.default_rng(0))
    reps = {"own": reps["own"][:, :2], "noise": reps["noise"], "twin": reps["own"][:, :2].copy()}
    labels = _labels(small_world, tasks)
    blends = {"both": ("noise", "own")}
    kw = dict(refits=4, seed=2, blends=blends)
    scores = refit_scores(reps, labels, tasks, tune, test, **kw)
    assert len(scores) == 5 * 4 * 2 * len(test) and set(scores["refit"]) == set(range(5))
    assert scores.equals(refit_scores(reps, labels, tasks, tune, test, **kw))                    # seeded
    assert scores.equals(refit_scores(reps, labels, tasks, tune, test, **kw, n_jobs=2))          # any n_jobs
    # refit 0 is the report's fit: every tune user once
    y = labels.set_index(["user_id", "task_id"])["label"]
    task = tasks["task_id"].iloc[1]
    first = scores[(scores.refit == 0) & (scores.task_id == task)].set_index("method")
    yk = y.loc[list(zip(tune, [task] * len(tune)))].to_numpy()
    own = reps["own"][:, 1]
    np.testing.assert_array_equal(first.loc["own", "score"], probe_scores(own[:len(tune)], yk, own[len(tune):]))
    np.testing.assert_array_equal(first.loc["both", "score"], blended_probe_scores(
        [reps["noise"][:len(tune)], own[:len(tune)]], yk, [reps["noise"][len(tune):], own[len(tune):]]))
    # a representation's own probe settings (the demo's features probe shuffles its CV folds with the run's seed)
    own7 = refit_scores(reps, labels, tasks, tune, test, **kw, configs={"own": ProbeConfig(seed=7)})
    first7 = own7[(own7.refit == 0) & (own7.task_id == task)].set_index("method")
    np.testing.assert_array_equal(first7.loc["own", "score"],
                                  probe_scores(own[:len(tune)], yk, own[len(tune):], ProbeConfig(seed=7)))
    assert (first7.loc["twin", "score"].to_numpy() == first.loc["twin", "score"].to_numpy()).all()
    wide = scores.pivot_table(index=["refit", "user_id", "task_id"], columns="method", values="score", observed=True)
    assert (wide["own"] == wide["twin"]).all()                     # the same draw for every representation
    assert wide["own"].groupby(level="refit").mean().nunique() == 5  # each draw its own fit
    table = refit_contrasts(scores, labels, tasks, {"own - noise": {"own": 1, "noise": -1},
                                                    "own - twin": {"own": 1, "twin": -1}}, n_boot=300, seed=5)
    rows = table.set_index("contrast")
    first_all = scores[scores.refit == 0].astype({"user_id": str, "task_id": str, "method": str})
    report = Resamples(labels[labels.user_id.isin(set(test))], tasks,
                       {m: g[["user_id", "task_id", "score"]] for m, g in first_all.groupby("method")},
                       n_boot=300, seed=5).paired("own", "noise")
    assert [rows.loc["own - noise", k] for k in ("diff", "low", "high")] == [report["diff"], report["low"], report["high"]]
    gain = rows.loc["own - noise"]
    assert gain["fit_sd"] > 0 and gain["fit_low"] < gain["low"] and gain["fit_high"] > gain["high"] and gain["fit_low"] > 0.1
    assert rows.loc["own - twin", ["diff", "fit_sd", "fit_low", "fit_high"]].tolist() == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="refits must be an int >= 2"):
        refit_scores(reps, labels, tasks, tune, test, refits=1)
    with pytest.raises(ValueError, match=r"blend 'both': give two of the representations \(own, noise, twin\)"):
        refit_scores(reps, labels, tasks, tune, test, blends={"both": ("noise", "gone")})
    with pytest.raises(ValueError, match=r"configs: 'gone' name no representation; known: own, noise, twin"):
        refit_scores(reps, labels, tasks, tune, test, configs={"gone": ProbeConfig()})
    with pytest.raises(ValueError, match="contrast 'x': no refit scores for gone"):
        refit_contrasts(scores, labels, tasks, {"x": {"own": 1, "gone": -1}})
    with pytest.raises(ValueError, match="need refit 0"):
        refit_contrasts(scores[scores.refit > 0], labels, tasks, {"x": {"own": 1}})


def test_refit_scores_fit_a_rare_class_as_the_report_does(small_world):
    """A task with 4 tune positives: the report's qanchor_plus_features falls back to one probe (too few to blend),
    so refit 0 does too; every bootstrap draw keeps enough distinct positives for its probes (drawn again where
    one would not), and a class too rare for any draw is named."""
    from qanchor_lab.baselines import EMBEDDING_SHARES, probe_scores
    from qanchor_lab.label_budget import refit_scores

    tune, test = _split(small_world)
    tasks = small_world.tasks.iloc[:1]
    task = tasks["task_id"].iloc[0]
    reps = _oracle_reps(small_world, tune, test, np.random.default_rng(0))
    reps = {"own": reps["own"][:, :1], "noise": reps["noise"]}

    def rare(n_pos):
        labels = _labels(small_world, tasks).copy()
        tune_pos = labels.index[labels["user_id"].isin(set(tune)) & (labels["label"] == 1)]
        labels.loc[tune_pos[n_pos:], "label"] = 0
        return labels

    labels = rare(4)
    # seed 4: most of these draws hold fewer than 3 of the 4 positives, which no probe can be fitted on
    scores = refit_scores(reps, labels, tasks, tune, test, refits=4, seed=4, blends={"both": ("noise", "own")})
    assert set(scores["refit"]) == set(range(5))
    yk = labels.set_index("user_id").loc[tune, "label"].to_numpy()
    first = scores[scores.refit == 0].set_index("method")
    own = reps["own"][:, 0]
    np.testing.assert_array_equal(first.loc["both", "score"], probe_scores(
        reps["noise"][:len(tune)], yk, reps["noise"][len(tune):], extra_train=own[:len(tune)],
        extra_test=own[len(tune):], extra_shares=EMBEDDING_SHARES))
    with pytest.raises(ValueError, match=r"task '[^']+': 100 bootstrap draws of the \d+ tune users each left fewer "
                                         r"than 3 distinct users of a class \(2 positive"):
        refit_scores(reps, rare(2), tasks, tune, test, refits=2)


def _forbid_embedding(monkeypatch):
    """Embedding a user now fails the test: what should fail first must fail before it."""
    import qanchor_lab.label_budget as LB

    def embedded(*args, **kwargs):
        raise AssertionError("embedded the users before checking the splits")

    monkeypatch.setattr(LB, "model_representations", embedded)


@pytest.mark.slow
def test_cli_tune_splits_writes_the_splits_and_names_bad_input(tiny_model, small_world, tmp_path, capsys,
                                                              monkeypatch):
    from qanchor_lab.cli import main
    from qanchor_lab.data import save_world
    from qanchor_lab.pipeline import restrict_tasks

    tiny_model.save_pretrained(tmp_path / "run" / "model")
    save_world(restrict_tasks(small_world, small_world.tasks["task_id"].tolist()[:2]), tmp_path / "data")
    rc = main(["tune-splits", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--splits", "3", "--no-untrained"])
    out = capsys.readouterr().out
    assert rc == 0 and "task query - generic query" in out and "wrote" in out
    frame = pd.read_csv(tmp_path / "run" / "tune_splits.csv")
    tune = small_world.users_in("tune")
    assert set(frame["draw"]) == {0, 1, 2} and set(frame["budget"]) == {round(0.7 * len(tune))}
    assert set(frame["method"]) == {"qanchor_base", "static_embedding", "logreg_features"}
    summary = pd.read_csv(tmp_path / "run" / "tune_splits_summary.csv")
    assert set(summary["reference"]) == {"logreg_features", "static_embedding"} and (summary["draws"] == 3).all()
    scores = pd.read_parquet(tmp_path / "run" / "tune_scores.parquet")
    assert set(scores["user_id"]) == set(tune) and set(scores["fold"]) == set(range(5))
    assert "every tune user scored once (5-fold cross-fit)" in out
    # the same model against its own output: every difference between the two runs is zero
    rc = main(["tune-splits", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--splits", "2", "--no-untrained",
               "--out", str(tmp_path / "again"), "--against", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0 and "the query's gain: this run - other: +0.0000 [+0.0000, +0.0000]" in out
    assert "each probe fitted on about" in out and "whatever --fit-share" in out
    # 2 splits against the other's 3: compared user by user over the cross-fit, not split by split
    assert "not paired by split with --against" in out and not (tmp_path / "again" / "tune_splits_against.csv").exists()
    rc = main(["tune-splits", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--splits", "3", "--no-untrained",
               "--out", str(tmp_path / "paired"), "--against", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert rc == 0 and "on the same 3 splits, paired by split" in out and "not paired by split" not in out
    paired = pd.read_csv(tmp_path / "paired" / "tune_splits_against.csv")
    assert set(paired["contrast"]) == {"base: this run - other", "static: this run - other",
                                       "the query's gain: this run - other"}
    assert (paired["draws"] == 3).all() and (paired[["diff", "low", "high"]] == 0).all().all()
    assert main(["tune-splits", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--fit-share", "1.5"]) == 2
    assert "--fit-share must lie strictly between 0 and 1" in capsys.readouterr().err
    assert main(["tune-splits", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--against",
                 str(tmp_path / "nowhere")]) == 2
    assert "no tune_scores.parquet there; run `python -m qanchor_lab tune-splits" in capsys.readouterr().err
    rc = main(["tune-splits", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--splits", "2", "--no-untrained",
               "--folds", "3", "--out", str(tmp_path / "three"), "--against", str(tmp_path / "run")])
    assert rc == 2 and "not on the same tune users and folds" in capsys.readouterr().err
    # a --fit-share too small for a task is named before any user is embedded
    _forbid_embedding(monkeypatch)
    assert main(["tune-splits", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--fit-share", "0.01",
                 "--no-untrained"]) == 2
    assert "tune split 0: task" in capsys.readouterr().err


@pytest.mark.slow
def test_run_tune_splits_reads_a_model_and_checks_the_splits_before_embedding(tiny_model, small_world, monkeypatch):
    import qanchor_lab.label_budget as LB
    from qanchor_lab.pipeline import restrict_tasks

    world = restrict_tasks(small_world, small_world.tasks["task_id"].tolist()[:2])
    frame = LB.run_tune_splits(tiny_model, world, splits=2, seed=1, show_progress=False)
    assert set(frame["method"]) == {"qanchor_base", "static_embedding", "logreg_features"}
    assert set(frame["draw"]) == {0, 1} and len(frame) == 2 * 2 * 3 and frame["auc"].between(0, 1).all()

    _forbid_embedding(monkeypatch)
    with pytest.raises(ValueError, match="tune split 0: task .*cannot hold 3 of each class"):
        LB.run_tune_splits(tiny_model, world, fit_share=0.01, show_progress=False)


@pytest.mark.slow
def test_cli_refit_intervals_prints_the_mechanisms_with_both_intervals(tiny_model, small_world, tmp_path, capsys):
    import copy
    import json

    import torch

    from qanchor_lab.cli import main
    from qanchor_lab.data import save_world
    from qanchor_lab.pipeline import restrict_tasks

    tiny_model.save_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / "demo_config.json").write_text(json.dumps({"seed": 3, "n_boot": 200}))
    save_world(restrict_tasks(small_world, small_world.tasks["task_id"].tolist()[:2]), tmp_path / "data")
    rc = main(["refit-intervals", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--refits", "3", "--jobs", "1"])
    out = capsys.readouterr().out
    assert rc == 0 and "refitted on 3 bootstrap draws" in out and "wrote" in out
    table = pd.read_csv(tmp_path / "run" / "refit_intervals.csv").set_index("contrast")
    # the untrained model is there, so all three mechanisms the refits can cover
    assert list(table.index) == ["pre-training", "the task query", "the embedding next to the features"]
    assert (table["refits"] == 3).all()
    # the fixture's model is its own untrained start: the same embeddings, refitted on the same draws, differ by 0
    assert table.loc["pre-training", ["diff", "fit_sd", "fit_low", "fit_high"]].tolist() == [0, 0, 0, 0]
    moved = table.drop(index="pre-training")
    assert (moved["fit_sd"] > 0).all() and ((moved["fit_low"] < moved["low"]) & (moved["fit_high"] > moved["high"])).all()
    scores = pd.read_parquet(tmp_path / "run" / "refit_scores.parquet")
    assert set(scores["refit"]) == {0, 1, 2, 3} and set(scores["user_id"]) == set(small_world.users_in("test"))
    assert set(scores["method"]) == {"qanchor_base", "static_embedding", "untrained", "logreg_features",
                                     "qanchor_plus_features"}
    assert main(["refit-intervals", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--refits", "1"]) == 2
    assert "--refits must be >= 2; got 1" in capsys.readouterr().err
    # against another run: its model (here the same one with a perturbed head) embedded on this run's world and
    # refitted on the same draws; the query's gain between runs is the base difference less the static one
    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        noise = torch.randn(other.head[-1].weight.shape, generator=torch.Generator().manual_seed(0))
        other.head[-1].weight.add_(0.5 * noise)
    other.save_pretrained(tmp_path / "other")
    rc = main(["refit-intervals", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--refits", "2",
               "--jobs", "1", "--no-untrained", "--out", str(tmp_path / "vs"), "--against", str(tmp_path / "other")])
    out = capsys.readouterr().out
    assert rc == 0 and f"other: {tmp_path / 'other'}" in out
    table = pd.read_csv(tmp_path / "vs" / "refit_intervals.csv").set_index("contrast")
    between = ["base: this run - other", "static: this run - other", "the query's gain: this run - other"]
    assert list(table.index) == ["the task query", "the embedding next to the features"] + between
    assert (table.loc[between, "diff"] != 0).all() and (table.loc[between, "fit_sd"] > 0).all()
    d = table["diff"]
    assert d[between[2]] == pytest.approx(d[between[0]] - d[between[1]], abs=1e-12)
    methods = set(pd.read_parquet(tmp_path / "vs" / "refit_scores.parquet")["method"])
    assert {"other:qanchor_base", "other:static_embedding"} <= methods
    assert main(["refit-intervals", str(tmp_path / "run"), "--data", str(tmp_path / "data"), "--against",
                 str(tmp_path / "nowhere")]) == 2
    assert "nowhere is neither a run directory with model/" in capsys.readouterr().err


def test_few_label_read_is_one_budget_of_the_curve_and_says_when_it_cannot_run(small_world):
    from qanchor_lab.label_budget import few_label_read

    tune, test, tasks, reps, labels = _two_tasks(small_world)
    few = few_label_read(reps, labels, tasks, tune, test, budget=40, draws=3, seed=1, reference="noise")
    s = curve_summary(label_curve(reps, labels, tasks, tune, test, budgets=(40,), draws=3, seed=1),
                      reference="noise").set_index("method")
    assert (few["budget"], few["draws"], few["reference"]) == (40, 3, "noise")
    for method in ("own", "noise"):   # the values, and the t-intervals over draws, are the curve's
        r = few["methods"][method]
        assert [r[k] for k in ("auc", "auc_draws_low", "auc_draws_high", "diff", "diff_draws_low", "diff_draws_high")] \
            == pytest.approx(s.loc[method, ["auc", "auc_low", "auc_high", "diff", "diff_low", "diff_high"]].tolist())
    # the reported intervals also resample the test users: wider than the draws' alone, around the same values
    for method in ("own", "noise"):
        r = few["methods"][method]
        assert r["auc_low"] < r["auc_draws_low"] <= r["auc"] <= r["auc_draws_high"] < r["auc_high"]
    own = few["methods"]["own"]
    assert 0.1 < own["diff_low"] < own["diff_draws_low"] and own["diff_high"] > own["diff_draws_high"]
    assert [few["methods"]["noise"][k] for k in ("diff", "diff_low", "diff_high")] == [0, 0, 0]  # the reference
    assert few["n_boot"] == 1000 and "which users were tested" in few["interval"]
    # the test users' resamples follow n_boot and the seed; the values do not move with them
    other = few_label_read(reps, labels, tasks, tune, test, budget=40, draws=3, seed=1, reference="noise", n_boot=200)
    assert other["methods"]["own"]["auc"] == own["auc"] and other["methods"]["own"]["auc_low"] != own["auc_low"]
    # one draw: how much another draw would move the read is unknown, so no interval
    one = few_label_read(reps, labels, tasks, tune, test, budget=40, draws=1, seed=1, reference="noise")["methods"]["own"]
    assert np.isnan([one["auc_low"], one["diff_high"], one["diff_draws_low"]]).all() and one["diff"] > 0.1
    # two worker processes give the same read (each task's draws are seeded by the task, not by the worker)
    assert few_label_read(reps, labels, tasks, tune, test, budget=40, draws=3, seed=1, reference="noise",
                          n_jobs=2) == few
    # a budget the tune split cannot give is left out, naming the task, instead of failing the whole evaluation
    every = few_label_read(reps, labels, tasks, tune, test, budget=len(tune), draws=3, reference="noise")
    assert set(every) == {"budget", "draws", "skipped"} and f"all {len(tune)} tune users" in every["skipped"]
    assert every["skipped"].startswith(f"task {tasks['task_id'].iloc[0]!r}")
    assert "cannot hold 3 of each class" in few_label_read(reps, labels, tasks, tune, test, budget=4, draws=3,
                                                            reference="noise")["skipped"]
    with pytest.raises(ValueError, match="reference 'static_embedding' is not among the representations: own, noise"):
        few_label_read(reps, labels, tasks, tune, test, budget=40, draws=3)
