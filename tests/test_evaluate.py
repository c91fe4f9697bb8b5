"""Tests for qanchor_lab.evaluate (metrics contract, CIs, missing scores, tables) and qanchor_lab.report."""

from __future__ import annotations

import json
import math
import re
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from qanchor_lab.data import DataValidationError
from qanchor_lab.evaluate import (
    METHODS,
    evaluate_methods,
    method_order,
    results_markdown,
    results_table,
    write_metrics,
)
from qanchor_lab.report import figure_loss_curves, figure_task_bars, where_qanchor_stands, write_report

N_USERS = 600
TASKS = pd.DataFrame(
    {
        "task_id": ["eng_a", "risk_a", "risk_b", "mkt_a"],
        "domain": ["engagement", "risk", "risk", "marketing"],
        "query": ["Will the user open the app?", "Will the user pay late?", "Will the user default?", "Will the user use a coupon?"],
    }
)


@pytest.fixture(scope="module")
def toy():
    """Known-probability labels for 600 users (half tune, half test) and scores of graded quality."""
    rng = np.random.default_rng(11)
    users = [f"u{i:04d}" for i in range(N_USERS)]
    rows = []
    for t, task_id in enumerate(TASKS["task_id"]):
        logit = rng.normal(size=N_USERS) * 2.0 - 1.0
        p = 1 / (1 + np.exp(-logit))
        rows.append(pd.DataFrame({"user_id": users, "task_id": task_id, "label": rng.binomial(1, p), "oracle_prob": p, "_logit": logit}))
    full = pd.concat(rows, ignore_index=True)
    labels = full[["user_id", "task_id", "label", "oracle_prob"]]
    test = users[N_USERS // 2 :]

    def noisy(sigma):
        return full[["user_id", "task_id"]].assign(score=full["_logit"] + rng.normal(scale=sigma, size=len(full)))

    scores = {
        "qanchor_prompt_tuned": noisy(1.0),
        "oracle": full[["user_id", "task_id"]].assign(score=full["oracle_prob"]),
        "gbdt_features": noisy(3.0),
        "my_method": full[["user_id", "task_id"]].assign(score=rng.normal(size=len(full))),
    }
    return labels, scores, test


@pytest.fixture(scope="module")
def metrics(toy):
    labels, scores, test = toy
    return evaluate_methods(scores, labels, TASKS, test, n_boot=300, seed=0)


def test_contract_keys_order_and_sane_values(metrics):
    methods = metrics["methods"]
    # known methods first in METHODS order, unknown names after
    assert list(methods) == ["oracle", "gbdt_features", "qanchor_prompt_tuned", "my_method"]
    assert metrics["reference"] == "qanchor_prompt_tuned"
    assert metrics["n_test_users"] == N_USERS // 2 and metrics["n_tasks"] == 4
    for name, e in methods.items():
        for key in ("avg_auc", "avg_ks", "domains", "tasks", "avg_auc_ci", "avg_ks_ci", "vs_reference"):
            assert key in e, (name, key)
        assert list(e["tasks"]) == TASKS["task_id"].tolist()
        assert list(e["domains"]) == ["engagement", "risk", "marketing"]
        assert e["avg_auc"] == pytest.approx(np.mean([t["auc"] for t in e["tasks"].values()]))
        assert e["domains"]["risk"]["auc"] == pytest.approx((e["tasks"]["risk_a"]["auc"] + e["tasks"]["risk_b"]["auc"]) / 2)
        lo, hi = e["avg_auc_ci"]
        assert lo <= e["avg_auc"] <= hi and hi - lo < 0.2
        lo, hi = e["avg_ks_ci"]
        assert lo <= e["avg_ks"] <= hi
        assert 0 <= e["avg_ks"] <= 1
        vs = e["vs_reference"]
        assert vs["auc_low"] <= vs["auc_diff"] <= vs["auc_high"]
        assert vs["ks_low"] <= vs["ks_diff"] <= vs["ks_high"]
        assert vs["auc_diff"] == pytest.approx(e["avg_auc"] - methods["qanchor_prompt_tuned"]["avg_auc"])
    # graded quality shows up in the numbers
    auc = {n: e["avg_auc"] for n, e in methods.items()}
    assert auc["oracle"] > auc["qanchor_prompt_tuned"] > auc["gbdt_features"] > auc["my_method"]
    assert abs(auc["my_method"] - 0.5) < 0.06
    assert methods["qanchor_prompt_tuned"]["vs_reference"] == {k: 0.0 for k in methods["oracle"]["vs_reference"]}
    assert methods["gbdt_features"]["vs_reference"]["auc_high"] < 0  # reliably worse than the reference


def test_only_test_users_count(toy, metrics):
    labels, scores, test = toy
    # wreck the scores of non-test users: the metrics must not move
    broken = {}
    for name, s in scores.items():
        s = s.copy()
        s.loc[~s["user_id"].isin(test), "score"] = np.nan
        broken[name] = s
    again = evaluate_methods(broken, labels, TASKS, test, n_boot=300, seed=0)
    assert again == metrics
    # the score table may also simply omit non-test users
    only_test = {n: s[s["user_id"].isin(test)] for n, s in scores.items()}
    assert evaluate_methods(only_test, labels, TASKS, test, n_boot=300, seed=0) == metrics


def test_missing_or_nan_score_names_method_and_task(toy):
    labels, scores, test = toy
    s = scores["gbdt_features"]
    dropped = s.drop(s.index[(s["user_id"] == test[3]) & (s["task_id"] == "risk_b")])
    with pytest.raises(DataValidationError, match=r"method 'gbdt_features'.*task 'risk_b'.*" + test[3]):
        evaluate_methods({"gbdt_features": dropped}, labels, TASKS, test, n_boot=50)
    nan = s.copy()
    nan.loc[(nan["user_id"] == test[0]) & (nan["task_id"] == "mkt_a"), "score"] = np.nan
    with pytest.raises(DataValidationError, match=r"method 'gbdt_features'.*task 'mkt_a'"):
        evaluate_methods({"qanchor_prompt_tuned": scores["qanchor_prompt_tuned"], "gbdt_features": nan}, labels, TASKS, test, n_boot=50)
    with pytest.raises(DataValidationError, match=r"method 'oracle'.*missing required column.*'score'"):
        evaluate_methods({"oracle": s.drop(columns="score")}, labels, TASKS, test, n_boot=50)


def test_subset_without_reference_and_determinism(toy):
    labels, scores, test = toy
    sub = {"gbdt_features": scores["gbdt_features"], "oracle": scores["oracle"]}
    a = evaluate_methods(sub, labels, TASKS, test, n_boot=100, seed=4)
    b = evaluate_methods(sub, labels, TASKS, test, n_boot=100, seed=4)
    assert a == b
    assert a["reference"] is None
    assert all("vs_reference" not in e for e in a["methods"].values())
    c = evaluate_methods(sub, labels, TASKS, test, reference="oracle", n_boot=100, seed=4)
    assert c["methods"]["gbdt_features"]["vs_reference"]["auc_diff"] < 0


def test_method_order():
    assert method_order(["zeta", "qanchor_base", "oracle", "alpha"]) == ["oracle", "qanchor_base", "zeta", "alpha"]
    assert method_order(list(reversed(METHODS))) == list(METHODS)
    # the feature baselines sit together; Q-Anchor next to the features comes after prompt tuning
    assert method_order(["qanchor_plus_features", "qanchor_prompt_tuned", "text_embedding", "tfidf_features",
                         "logreg_features"]) == ["logreg_features", "tfidf_features", "text_embedding",
                                                 "qanchor_prompt_tuned", "qanchor_plus_features"]


def test_every_known_method_has_a_label_and_a_colour():
    from qanchor_lab.evaluate import METHOD_LABELS
    from qanchor_lab.report import _COLOURS

    assert set(METHOD_LABELS) == set(METHODS) and set(_COLOURS) == set(METHODS)
    assert len(set(METHOD_LABELS.values())) == len(METHODS) and len(set(_COLOURS.values())) == len(METHODS)


def test_new_baselines_reach_the_table_and_report(toy, tmp_path):
    labels, scores, test = toy
    named = {"qanchor_plus_features": scores["qanchor_prompt_tuned"], "tfidf_features": scores["gbdt_features"],
             "logreg_features": scores["my_method"], "qanchor_prompt_tuned": scores["qanchor_prompt_tuned"]}
    metrics = evaluate_methods(named, labels, TASKS, test, n_boot=50, seed=0)
    assert list(results_table(metrics).index) == ["logreg_features", "tfidf_features", "qanchor_prompt_tuned",
                                                  "qanchor_plus_features"]
    first_table = results_markdown(metrics).split("\n\n")[0].splitlines()
    assert [line.split(" | ")[0] for line in first_table[2:]] == [
        "| logreg_features", "| tfidf_features", "| qanchor_prompt_tuned", "| qanchor_plus_features"]
    html = write_report(tmp_path / "r.html", metrics).read_text()
    for label in ("features + event-text TF-IDF + logistic regression", "Q-Anchor (task query) + features + probe"):
        assert label in html


def test_results_table_and_markdown(metrics):
    table = results_table(metrics)
    assert list(table.index) == list(metrics["methods"])
    assert table.loc["oracle", "avg_auc"] == pytest.approx(metrics["methods"]["oracle"]["avg_auc"])
    assert table.loc["gbdt_features", "auc_risk"] == pytest.approx(metrics["methods"]["gbdt_features"]["domains"]["risk"]["auc"])
    assert {"avg_auc_low", "avg_auc_high", "avg_ks", "auc_diff", "auc_diff_low", "auc_diff_high"} <= set(table.columns)
    md = results_markdown(metrics)
    lines = md.strip().splitlines()
    assert len(lines) == 2 + len(metrics["methods"])  # header, rule, one row per method
    assert all(line.startswith("| ") and line.endswith(" |") for line in lines)
    assert len({line.count(" | ") for line in lines}) == 1  # same column count in every row
    oracle_row = next(line for line in lines if line.startswith("| oracle "))
    assert f"{metrics['methods']['oracle']['avg_auc']:.3f} [" in oracle_row
    assert "| reference |" in next(line for line in lines if line.startswith("| qanchor_prompt_tuned "))


def test_write_metrics_roundtrip(tmp_path, metrics):
    path = write_metrics(metrics, tmp_path / "run" / "metrics.json", config={"seed": 0, "out": tmp_path}, wall_seconds=12.5)
    data = json.loads(path.read_text())
    assert data["methods"] == json.loads(json.dumps(metrics["methods"]))
    assert data["config"] == {"seed": 0, "out": str(tmp_path)}
    assert data["wall_seconds"] == 12.5
    with pytest.raises(ValueError, match="NaN"):
        write_metrics(metrics, tmp_path / "bad.json", config={"x": math.nan}, wall_seconds=1.0)


def test_where_qanchor_stands_reads_the_numbers(metrics):
    text = where_qanchor_stands(metrics)
    m = metrics["methods"]
    assert f"{m['qanchor_prompt_tuned']['avg_auc']:.3f}" in text
    assert "reliably better than features + GBDT" in text
    assert "reliably worse than oracle" not in text  # the oracle is reported as a gap, not a baseline
    assert f"reaches {m['oracle']['avg_auc']:.3f}" in text


def test_write_report_self_contained_and_deterministic(tmp_path, metrics):
    log = [{"step": s, "loss": 5 / s, "contrastive": 3 / s, "ntp": 2 / s} for s in range(1, 40)]
    retrieval = {"untrained": {"n": 200, "n_candidates": 100, "chance_top1": 0.01, "top1": 0.02, "top5": 0.06},
                 "trained": {"n": 200, "n_candidates": 100, "chance_top1": 0.01, "top1": 0.31, "top5": 0.55}}
    kw = dict(loss_log=log, retrieval=retrieval, notes=["run on 2026-01-01"])
    a = write_report(tmp_path / "a.html", metrics, **kw).read_text()
    b = write_report(tmp_path / "b.html", metrics, **kw).read_text()
    assert a == b
    assert '<table class="results">' in a and "features + GBDT" in a
    assert f"{metrics['methods']['oracle']['avg_auc']:.3f} [" in a
    # plotly.js inlined exactly once (its licence header opens the bundle); no script tag loads a file
    assert a.count("* plotly.js v") == 1
    assert re.search(r"<script[^>]*\bsrc=", a) is None
    for div in ("fig-task-auc", "fig-domain-auc", "fig-loss", "fig-retrieval"):
        assert f'id="{div}"' in a
    assert "Where Q-Anchor stands" in a and "run on 2026-01-01" in a
    plain = write_report(tmp_path / "c.html", metrics).read_text()
    assert 'id="fig-loss"' not in plain and 'id="fig-task-auc"' in plain


def test_figures(metrics):
    fig = figure_task_bars(metrics)
    names = [t.name for t in fig.data]
    assert "oracle (true probability)" in names
    oracle = next(t for t in fig.data if t.name == "oracle (true probability)")
    assert oracle.type == "scatter" and list(oracle.x) == TASKS["task_id"].tolist()
    assert sum(t.type == "bar" for t in fig.data) == 3  # every method but the oracle
    loss = figure_loss_curves([{"step": 2, "loss": 1.0, "contrastive": 0.6, "ntp": 0.4}, {"step": 1, "loss": 2.0, "contrastive": 1.2, "ntp": 0.8}])
    assert [t.name for t in loss.data] == ["total", "contrastive", "next-token"]
    assert list(loss.data[0].x) == [1, 2]
    with pytest.raises(ValueError, match="record 0 has no 'step'"):
        figure_loss_curves([{"loss": 1.0}])


def test_evaluate_run_names_unknown_task_ids(small_world, tmp_path):
    from qanchor_lab.pipeline import DemoConfig, evaluate_run

    with pytest.raises(ValueError, match="nope.*valid: dormancy_churn"):
        evaluate_run(None, small_world, DemoConfig.fast(), tmp_path, task_ids=["dormancy_churn", "nope"])


@pytest.mark.slow
def test_evaluate_run_on_a_task_subset_scores_every_method(small_world, tiny_model, tmp_path, monkeypatch):
    from dataclasses import replace

    from qanchor_lab.features import FeatureSpec
    from qanchor_lab.pipeline import DemoConfig, evaluate_run

    fits, fit = [], FeatureSpec.fit.__func__
    monkeypatch.setattr(FeatureSpec, "fit", classmethod(lambda cls, *a, **k: fits.append(1) or fit(cls, *a, **k)))
    cfg = replace(DemoConfig.fast(), text_encoder="hashing", tune_epochs=1, n_boot=20, text_max_chars=100)
    ids = ["dormancy_churn", "travel_coupon"]
    metrics = evaluate_run(tiny_model.eval(), small_world, cfg, tmp_path, task_ids=ids, show_progress=False)
    # one FeatureSpec for every feature method (features, tf-idf, the text's window, + features, the few-label read),
    # and the untrained model's own (QAnchorModel.from_data)
    assert len(fits) == 2
    assert set(metrics["methods"]) == set(METHODS)
    for m in metrics["methods"].values():
        assert set(m["tasks"]) == set(ids) and set(m["domains"]) == {"engagement", "marketing"}
    assert set(metrics["prompt_tuning"]) == set(ids)
    assert sorted(p.stem for p in (tmp_path / "adapters").glob("*.safetensors")) == sorted(ids)


def test_evaluate_run_names_methods_it_cannot_skip(small_world, tmp_path):
    from qanchor_lab.pipeline import DemoConfig, evaluate_run

    with pytest.raises(ValueError, match="'qanchor_base', 'textembedding'.*can be left out: oracle, gbdt_features"):
        evaluate_run(None, small_world, DemoConfig.fast(), tmp_path, skip_methods=["textembedding", "qanchor_base"])
    with pytest.raises(TypeError, match="not the string 'text_embedding'"):
        evaluate_run(None, small_world, DemoConfig.fast(), tmp_path, skip_methods="text_embedding")


@pytest.mark.slow
def test_evaluate_run_leaves_out_the_skipped_methods_and_says_so(small_world, tiny_model, tmp_path):
    from dataclasses import replace

    from qanchor_lab.evaluate import results_markdown
    from qanchor_lab.pipeline import DemoConfig, evaluate_run

    cfg = replace(DemoConfig.fast(), text_encoder="hashing", tune_epochs=1, n_boot=20, text_max_chars=100)
    skip = ["text_embedding", "untrained", "oracle"]
    metrics = evaluate_run(tiny_model.eval(), small_world, cfg, tmp_path, task_ids=["dormancy_churn"],
                           skip_methods=skip, show_progress=False)
    assert set(metrics["methods"]) == set(METHODS) - set(skip)
    assert set(metrics["skipped_methods"]) == set(skip)
    assert "pre-training" not in {c["question"] for c in metrics["comparisons"]}   # it needs the untrained model
    assert "Not evaluated: text embedding + probe: left out by the caller" in results_markdown(metrics)
    # the few-label read: the task query, the generic query and the features, each probe fitted on 100 tune users
    few = metrics["few_labels"]
    assert (few["budget"], few["draws"], few["reference"]) == (cfg.few_labels, cfg.few_label_draws, "static_embedding")
    assert set(few["methods"]) == {"qanchor_base", "static_embedding", "logreg_features"}
    assert all(0.3 < r["auc"] < 1 and r["auc_low"] <= r["auc"] <= r["auc_high"] for r in few["methods"].values())
    assert "With 100 labelled tune users a task" in results_markdown(metrics)
    assert "<h2>With few labels</h2>" in write_report(tmp_path / "r.html", metrics).read_text()
    # the time of what ran, and nothing for what was left out
    assert set(metrics["evaluation_seconds"]) == {"gbdt_features", "logreg_features", "tfidf_features", "query_embeddings",
                                                  "probes", "plus_features", "prompt_tuning", "bootstrap", "few_labels"}
    assert all(v >= 0 for v in metrics["evaluation_seconds"].values())


def test_stopwatch_sums_repeats_and_keeps_the_time_of_a_failed_stage():
    from qanchor_lab.pipeline import Stopwatch

    watch = Stopwatch()
    for _ in range(2):
        with watch("a"):
            time.sleep(0.02)
    with pytest.raises(KeyError):
        with watch("b"):
            time.sleep(0.05)
            raise KeyError("boom")
    assert 0.04 <= watch["a"] < 1 and 0.05 <= watch["b"] < 1
    assert watch.line().startswith("b ") and ", a " in watch.line()


def test_mechanism_comparisons_are_paired_differences_of_scored_methods(toy, tmp_path):
    from qanchor_lab.evaluate import comparisons_markdown

    labels, scores, test = toy
    named = {"qanchor_base": scores["qanchor_prompt_tuned"], "untrained": scores["gbdt_features"],
             "qanchor_prompt_tuned": scores["my_method"]}
    metrics = evaluate_methods(named, labels, TASKS, test, n_boot=200, seed=0)
    got = {c["question"]: c for c in metrics["comparisons"]}
    # only the pairs whose two methods were scored
    assert set(got) == {"pre-training", "prompt tuning"}
    m = metrics["methods"]
    pre = got["pre-training"]
    assert pre["a"] == "qanchor_base" and pre["b"] == "untrained"
    assert pre["auc_diff"] == pytest.approx(m["qanchor_base"]["avg_auc"] - m["untrained"]["avg_auc"])
    assert pre["auc_low"] > 0                       # sigma 1 vs sigma 3 noise around the true logit
    prompt = got["prompt tuning"]                   # a random score minus a good one
    assert prompt["auc_high"] < 0
    # the same numbers as the reference column where the pair is (x, reference)
    assert prompt["auc_diff"] == pytest.approx(-m["qanchor_base"]["vs_reference"]["auc_diff"])
    md = comparisons_markdown(metrics)
    assert "| pre-training | qanchor_base − untrained |" in md and "| yes |" in md
    html = write_report(tmp_path / "r.html", metrics).read_text()
    assert "Does each mechanism matter?" in html


def test_comparisons_headers_name_the_level_the_intervals_were_drawn_at(toy, tmp_path):
    from qanchor_lab.evaluate import comparisons_markdown

    labels, scores, test = toy
    named = {"qanchor_base": scores["qanchor_prompt_tuned"], "untrained": scores["gbdt_features"]}
    metrics = evaluate_methods(named, labels, TASKS, test, n_boot=50, seed=0, ci=0.80)
    assert metrics["comparisons"] and metrics["bootstrap"]["ci"] == 0.80
    md = comparisons_markdown(metrics)
    html = write_report(tmp_path / "r.html", metrics).read_text()
    for text in (md, html):
        assert "AUC diff [80% CI]" in text and "KS diff [80% CI]" in text
        assert "95% CI" not in text


def test_a_cached_demo_model_is_keyed_by_the_configs_it_resolves_to(monkeypatch, tmp_path):
    """A changed library default (here the reconstruction weight) must retrain, not reuse an older model."""
    from dataclasses import replace

    from qanchor_lab.pipeline import DemoConfig, run_key

    cfg = DemoConfig()
    key = run_key(cfg)
    assert json.loads(json.dumps(key)) == key                      # what the marker file gives back
    assert key["pretrain_config"]["reconstruction"] == cfg.pretrain_config().reconstruction
    original = DemoConfig.pretrain_config
    monkeypatch.setattr(DemoConfig, "pretrain_config", lambda self: replace(original(self), reconstruction=0.5))
    assert run_key(cfg) != key
    assert run_key(cfg, tmp_path)["data"] == str(tmp_path.resolve())
    # a new generator (or MovieLens source) version rebuilds the world: a model trained on the old one is not reused
    import qanchor_lab.sources.movielens as ML
    import qanchor_lab.world as W

    ml = run_key(replace(cfg, dataset="movielens"))
    monkeypatch.setattr(W, "GENERATOR_VERSION", W.GENERATOR_VERSION + 1)
    assert run_key(cfg)["world_version"] != key["world_version"]
    assert run_key(replace(cfg, dataset="movielens")) == ml
    monkeypatch.setattr(ML, "SOURCE_VERSION", ML.SOURCE_VERSION + 1)
    assert run_key(replace(cfg, dataset="movielens")) != ml


def test_a_demo_model_is_reused_when_only_evaluation_settings_change():
    """Changing how a run is evaluated (prompt tokens, tuning epochs, resamples, the text baseline's text) must not
    retrain its model; every other setting must."""
    from dataclasses import fields, replace

    from qanchor_lab.pipeline import EVALUATION_FIELDS, DemoConfig, run_key

    cfg = DemoConfig()
    key = run_key(cfg)
    evaluation = {"n_prompt": 3, "tune_epochs": 2, "n_boot": 50, "text_max_chars": 100, "text_max_events": 2,
                  "few_labels": 50, "few_label_draws": 3}
    assert set(evaluation) == set(EVALUATION_FIELDS)
    for name, value in evaluation.items():
        assert run_key(replace(cfg, **{name: value})) == key, name
    # overrides reach the key through the model and pre-training configs they resolve to (next test)
    assert {f.name for f in fields(DemoConfig)} - set(EVALUATION_FIELDS) - {"overrides"} <= set(key)
    for name, value in {"epochs": 1.0, "max_events": 4, "retrieval_pairs": 100, "max_steps": 5, "seed": 8}.items():
        assert run_key(replace(cfg, **{name: value})) != key, name


def test_demo_overrides_reach_the_stage_configs_and_the_run_key():
    """DemoConfig.overrides (the CLI's --set) change any stage setting by dotted key: the model is retrained when a
    model or pre-training setting changes, not when only prompt tuning does; a bad key or value is named at once."""
    from dataclasses import asdict

    from qanchor_lab.pipeline import DemoConfig, run_key

    base = DemoConfig()
    cfg = DemoConfig(overrides={"model.embed_dim": 16, "pretrain.reconstruction": 1.0, "tuning.lr": 1e-3})
    model, pretrain, tuning = cfg.model_config(), cfg.pretrain_config(), cfg.tuning_config()
    assert (model.embed_dim, pretrain.reconstruction, tuning.lr) == (16, 1.0, 1e-3)
    assert base.model_config().embed_dim != 16 and base.pretrain_config().reconstruction != 1.0
    # everything else is the demo's: its seed, epochs and prompt tokens, the rest of the library's defaults
    assert (model.backbone.seed, pretrain.epochs, pretrain.seed, tuning.n_prompt) == (7, 1.5, 7, 6)
    for a, b in ((model, base.model_config()), (pretrain, base.pretrain_config()), (tuning, base.tuning_config())):
        assert {k for k in asdict(a) if asdict(a)[k] != asdict(b)[k]} <= {"embed_dim", "reconstruction", "lr"}
    assert run_key(DemoConfig(overrides={"tuning.lr": 1e-3})) == run_key(base)          # the same model
    assert run_key(DemoConfig(overrides={"model.embed_dim": 16})) != run_key(base)
    assert run_key(DemoConfig(overrides={"pretrain.epochs": 6})) != run_key(base)
    for bad, message in (({"embed_dim": 16}, "SECTION.NAME"), ({"world.n_users": 400}, "one of model, pretrain, tuning"),
                         ({"model.embed_dims": 16}, "valid keys there: .*embed_dim"),
                         ({"model.embed_dim": -1}, r"overrides .*model.embed_dim.*: embed_dim must be >= 1"),
                         ({"model.embed_dim": "wide"}, r"model.embed_dim' takes an integer \(now 128\), got 'wide'"),
                         ({"model.use_user_token": 0}, "takes true or false"), ({"pretrain": 3}, "SECTION.NAME"),
                         # settings whose default is None: their kind is checked by the stage, before anything runs
                         ({"pretrain.lr": "fast"}, r"pretrain.lr.*lr must be None or a number > 0, got 'fast'"),
                         ({"pretrain.margin": "abc"}, "margin must be None or a number >= 0"),
                         ({"pretrain.max_steps": -3}, "max_steps must be None or an integer >= 1, got -3")):
        with pytest.raises(ValueError, match=message):
            DemoConfig(overrides=bad)


def test_a_run_marker_from_before_the_evaluation_fields_were_dropped_still_reuses_its_model(monkeypatch, tmp_path):
    """A run directory whose demo_config.json still holds the evaluation fields (written before run_key left them
    out) is reused quietly when everything pre-training reads matches, and retrained when a training setting
    differs, saying which settings differ (its model is replaced, never silently)."""
    import warnings
    from dataclasses import replace

    import qanchor_lab.pipeline as P

    cfg = P.DemoConfig()
    monkeypatch.setattr(P, "ensure_demo_world", lambda c: "world")
    monkeypatch.setattr(P.QAnchorModel, "from_pretrained", classmethod(lambda cls, d: ("loaded", str(d))))
    trained = []
    monkeypatch.setattr(P, "pretrain_world", lambda world, d, c, **k: trained.append(c) or (("trained", str(d)), {}))
    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    (run / "model" / "pretrain_summary.json").write_text("{}")
    old_marker = {**P.run_key(cfg), **{name: getattr(cfg, name) for name in P.EVALUATION_FIELDS}, "n_boot": 17}
    (run / "demo_config.json").write_text(json.dumps(old_marker))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert P.ensure_pretrained(run, cfg, show_progress=False)[0] == ("loaded", str(run / "model")) and not trained
    (run / "adapters").mkdir()
    (run / "adapters" / "churn.safetensors").write_text("tuned on the old model")
    with pytest.warns(UserWarning, match=r"holds a model pre-trained with other settings \(epochs, "
                                         r"pretrain_config.epochs\); pre-training a new one in its place and removing "
                                         r"the prompts tuned for the old one \(adapters/\)"):
        assert P.ensure_pretrained(run, replace(cfg, epochs=1.0), show_progress=False)[0][0] == "trained"
    assert json.loads((run / "demo_config.json").read_text()) == P.run_key(replace(cfg, epochs=1.0))
    assert not (run / "adapters").exists()  # never loaded beside a model they were not tuned on


def test_a_run_that_changes_only_prompt_tuning_copies_the_model_of_a_run_pre_trained_with_its_settings(
        monkeypatch, tmp_path):
    """`demo --set tuning.n_prompt=4` writes a run directory of its own; with reuse_from (the command line's runs/)
    it copies the model of a run whose key it shares instead of pre-training again. A changed pre-training setting,
    no reuse_from, or a `pretrain` command's model (tagged written_by) pre-trains; replacing a run's model says so."""
    from dataclasses import replace

    import qanchor_lab.pipeline as P

    cfg = P.DemoConfig()
    monkeypatch.setattr(P, "ensure_demo_world", lambda c: "world")
    monkeypatch.setattr(P.QAnchorModel, "from_pretrained", classmethod(lambda cls, d: ("loaded", str(d))))
    trained = []

    def fake_pretrain(world, model_dir, c, **kw):
        trained.append(c)
        model_dir.mkdir(parents=True)
        (model_dir / "weights").write_text(f"run {len(trained)}")
        (model_dir / "pretrain_summary.json").write_text(json.dumps({"run": len(trained)}))
        return ("trained", str(model_dir)), {"run": len(trained)}

    monkeypatch.setattr(P, "pretrain_world", fake_pretrain)
    root = tmp_path / "runs"
    P.ensure_pretrained(root / "demo", cfg, show_progress=False, reuse_from=root)
    tuned = replace(cfg, overrides={"tuning.n_prompt": 4})
    model, _, summary = P.ensure_pretrained(root / "demo-tuned", tuned, show_progress=False, reuse_from=root)
    assert len(trained) == 1 and model == ("loaded", str(root / "demo-tuned" / "model")) and summary == {"run": 1}
    assert (root / "demo-tuned" / "model" / "weights").read_text() == "run 1"
    assert json.loads((root / "demo-tuned" / "demo_config.json").read_text()) == P.run_key(tuned)
    assert not (root / "demo-tuned" / "model.partial").exists()
    assert sorted(p.name for p in (root / "demo-tuned").iterdir()) == ["demo_config.json", "model"]  # no copy left over

    P.ensure_pretrained(root / "demo-margin", replace(cfg, overrides={"pretrain.margin": 0.2}), show_progress=False,
                        reuse_from=root)
    P.ensure_pretrained(tmp_path / "alone", tuned, show_progress=False)
    assert len(trained) == 3
    # a `pretrain` command's run with the same settings is not a demo's model/: never copied
    other_root = tmp_path / "other-runs"
    shutil.copytree(root / "demo", other_root / "by-pretrain")
    marker = other_root / "by-pretrain" / "demo_config.json"
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "written_by": "pretrain"}))
    P.ensure_pretrained(other_root / "demo", cfg, show_progress=False, reuse_from=other_root)
    assert len(trained) == 4 and (other_root / "demo" / "model" / "weights").read_text() == "run 4"

    # a run holding another model and its prompts: replaced by the copy, and said
    (root / "demo-margin" / "adapters").mkdir()
    (root / "demo-margin" / "adapters" / "churn.safetensors").write_text("tuned on the old model")
    with pytest.warns(UserWarning, match=r"holds a model pre-trained with other settings \(pretrain_config.margin\); "
                                         r"copying .*runs/demo's model, pre-trained with these, in its place and "
                                         r"removing the prompts tuned for the old one"):
        P.ensure_pretrained(root / "demo-margin", cfg, show_progress=False, reuse_from=root)
    assert len(trained) == 4 and (root / "demo-margin" / "model" / "weights").read_text() == "run 1"
    assert not (root / "demo-margin" / "adapters").exists()


def test_the_demo_refuses_a_run_directory_that_holds_a_pretrain_commands_model(monkeypatch, tmp_path):
    """`pretrain --out RUN` saves its model in RUN itself; a demo training model/ beside it would leave the run's
    readers pairing one model with the other's marker, so the demo names the directory before anything runs."""
    import qanchor_lab.pipeline as P

    monkeypatch.setattr(P, "ensure_demo_world", lambda c: pytest.fail("nothing may run"))
    run = tmp_path / "run"
    run.mkdir()
    (run / P.CONFIG_NAME).write_text("{}")
    with pytest.raises(ValueError, match=r"run holds a model of its own \(qanchor_config.json, from `pretrain --out`\)"):
        P.ensure_pretrained(run, P.DemoConfig(), show_progress=False)
    assert sorted(p.name for p in run.iterdir()) == [P.CONFIG_NAME]


def test_the_demo_text_baseline_reads_its_configured_serialisation(small_world, tmp_path, monkeypatch):
    """DemoConfig's text_max_chars and text_max_events reach the serialisation of the text-embedding baseline."""
    from dataclasses import replace

    from types import SimpleNamespace

    import qanchor_lab.baselines as B
    import qanchor_lab.pipeline as P
    from qanchor_lab.pipeline import DemoConfig, evaluate_run

    class Reached(Exception):
        pass

    def fake(world, users, *, serialize_kw=None, **kw):
        raise Reached(serialize_kw)

    monkeypatch.setattr(B, "text_embedding_vectors", fake)
    # Q-Anchor's own methods stand in as nothing: the text baseline's vectors are read after them
    monkeypatch.setattr(P, "qanchor_scores", lambda *a, **k: (dict.fromkeys(("static", "base", "prompt_tuned",
                                                                              "plus_features")), {}))
    monkeypatch.setattr(P, "query_embeddings", lambda *a, **k: None)
    cfg = replace(DemoConfig.fast(), text_max_chars=300, text_max_events=2)
    with pytest.raises(Reached) as got:
        evaluate_run(SimpleNamespace(eval=lambda: None), small_world, cfg, tmp_path, show_progress=False,
                     skip_methods=["oracle", "gbdt_features", "logreg_features", "tfidf_features", "untrained"])
    assert got.value.args[0] == {"max_chars": 300, "max_events_per_modality": 2}
    # by default: 3 events on the synthetic world (§7.20), the serialiser's own default on any other data
    from qanchor_lab.features import MAX_EVENTS_PER_MODALITY
    from qanchor_lab.pipeline import text_serialization

    assert text_serialization(DemoConfig(), small_world) == {"max_chars": 800, "max_events_per_modality": 3}
    other = replace(small_world, manifest={k: v for k, v in small_world.manifest.items() if k != "generator_version"})
    assert text_serialization(DemoConfig(), other)["max_events_per_modality"] == MAX_EVENTS_PER_MODALITY == 20
    for bad in (0, True, 2.5):
        with pytest.raises(ValueError, match=f"text_max_events must be None or an integer >= 1.*got {bad}"):
            DemoConfig(text_max_events=bad)


def test_demo_config_names_a_bad_few_label_setting():
    from qanchor_lab.pipeline import DemoConfig

    assert DemoConfig(few_labels=None).few_labels is None                 # no few-label read
    for bad in (1, True, 2.5, "100"):
        with pytest.raises(ValueError, match=f"few_labels must be an integer >= 2 or None.*got {bad!r}"):
            DemoConfig(few_labels=bad)
    for bad in (0, None, 1.0):
        with pytest.raises(ValueError, match=f"few_label_draws must be an integer >= 1; got {bad!r}"):
            DemoConfig(few_label_draws=bad)



def test_qanchor_scores_names_embeddings_of_the_wrong_shape(small_world, tiny_model):
    from qanchor_lab.pipeline import qanchor_scores, restrict_tasks

    world = restrict_tasks(small_world, ["dormancy_churn", "travel_coupon"])
    n_users = len(world.users_in("tune")) + len(world.users_in("test"))
    with pytest.raises(ValueError, match=rf"expected \(tune \+ test users, tasks \+ 1, d\) = \({n_users}, 3, d\).*"
                                         rf"got \({n_users}, 2, 4\)"):
        qanchor_scores(tiny_model.eval(), world, tuning=None, show_progress=False, embeddings=np.zeros((n_users, 2, 4)))


def test_a_reference_or_comparison_naming_no_method_is_an_error(toy):
    labels, scores, test = toy
    sub = {"gbdt_features": scores["gbdt_features"], "my_method": scores["my_method"]}
    with pytest.raises(ValueError, match=r"reference names 'gbdt_feature': neither a scored method \('gbdt_features', "
                                         r"'my_method'\) nor a known one"):
        evaluate_methods(sub, labels, TASKS, test, reference="gbdt_feature", n_boot=50)
    typo = (("mine vs gbdt", "my_methd", "gbdt_features"),)
    with pytest.raises(ValueError, match=r"comparison 'mine vs gbdt' names 'my_methd': neither"):
        evaluate_methods(sub, labels, TASKS, test, comparisons=typo, n_boot=50)
    shared = (("same question", "my_methd", "gbdt_features"), ("same question", "my_method", "gbdt_features"))
    with pytest.raises(ValueError, match=r"comparison 'same question' names 'my_methd'"):  # two share a question's text
        evaluate_methods(sub, labels, TASKS, test, comparisons=shared, n_boot=50)
    with pytest.raises(TypeError, match="string triples"):
        evaluate_methods(sub, labels, TASKS, test, comparisons=("mine", "my_method", "gbdt_features"), n_boot=50)
    with pytest.raises(TypeError, match="string triples"):
        evaluate_methods(sub, labels, TASKS, test, comparisons=None, n_boot=50)
    # a known method that was not scored is no error: its differences are absent, the scored pair's are there
    ok = (("mine vs gbdt", "my_method", "gbdt_features"), ("pre-training", "qanchor_base", "untrained"))
    got = evaluate_methods(sub, labels, TASKS, test, reference="qanchor_base", comparisons=ok, n_boot=50)
    assert got["reference"] is None
    assert [c["question"] for c in got["comparisons"]] == ["mine vs gbdt"]
    # comparisons as a generator are read once and still compared
    again = evaluate_methods(sub, labels, TASKS, test, comparisons=(c for c in ok), n_boot=50)
    assert again["comparisons"] == got["comparisons"]
