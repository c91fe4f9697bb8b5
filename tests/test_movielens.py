"""The MovieLens-100K source on the real file: tables, windows, tasks, leakage, derived QA, caching.

The data comes from the PyPI wheel recbole==1.2.1 (fetched once into the cache); without it (no PyPI) these
tests are skipped with a message saying so. CI has PyPI, so there they run.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from qanchor_lab.derive_qa import LeakageError, check_no_leakage
from qanchor_lab.sources import movielens as ML


@pytest.fixture(scope="module")
def wheel():
    try:
        return ML.fetch_wheel()
    except ML.SourceUnavailable as exc:
        pytest.skip(f"MovieLens-100K wheel unavailable (no PyPI?): {exc}")


@pytest.fixture(scope="module")
def raw(wheel):
    return ML.read_raw(wheel)


@pytest.fixture(scope="module")
def world(wheel):
    return ML.build_movielens(ML.MovieLensConfig(), wheel=wheel)


def _windows(world) -> pd.DataFrame:
    return world.users.set_index("user_id")[["cutoff", "window_start", "window_end"]]


def test_reads_the_real_files(raw):
    ratings, users, movies = raw
    assert (len(ratings), len(users), len(movies)) == (100_000, 943, 1682)
    assert set(ratings["rating"]) == {1, 2, 3, 4, 5}
    toy = movies.set_index("item_id").loc["1"]
    assert (toy["title"], toy["year"], toy["genres"]) == ("Toy Story", "1995", "Animation Children's Comedy")


def test_events_text_modalities_and_amounts(world, raw):
    ev = world.events
    assert world.modalities == ML.MODALITIES
    toy = ev[ev["text"].str.contains(r": Toy Story \(1995\) — Animation, Children's, Comedy$")]
    assert len(toy) and toy["text"].str.match(r"^rated [1-5]/5: Toy Story").all()
    assert (toy["category"] == "Animation").all()                     # the rarest of its genres
    stars = ev["text"].str.extract(r"^rated ([1-5])/5")[0].astype(float)
    assert (stars == ev["amount"]).all()
    polarity = np.select([ev["amount"] >= 4, ev["amount"] == 3], ["liked", "mixed"], "disliked")
    assert (ev["modality"] == polarity).all()
    assert world.manifest["modalities"][0]["unit"] == "stars"


def test_profile_leaves_out_the_task_attributes(world):
    cols = [c for c in world.profiles.columns if c != "user_id"]
    assert not any(c.startswith(("age", "gender")) for c in cols)
    assert any(c.startswith("occupation_") for c in cols) and any(c.startswith("zip_region_") for c in cols)
    one_hot = world.profiles[[c for c in cols if c.startswith("occupation_")]].to_numpy()
    assert (one_hot.sum(1) == 1).all() and len(world.profiles) == 943


def test_relative_windows_and_no_leakage(world):
    cfg = ML.MovieLensConfig()
    origin = pd.Timestamp(cfg.origin)
    w = _windows(world)
    assert (w["cutoff"] == origin + pd.Timedelta(days=cfg.input_days)).all()
    ev = world.events
    assert ev["timestamp"].min() >= origin and ev["timestamp"].max() < origin + pd.Timedelta(days=cfg.input_days)
    # every user's first rating is on day 0 of their own timeline
    assert (ev.groupby("user_id")["timestamp"].min().dt.normalize() == origin).all()
    report = check_no_leakage(ev, w)
    assert report["input_events"] == len(ev) == world.manifest["counts"]["events_total"]
    down = world.users[world.users["population"] == "downstream"]
    assert down["observed_window"].all() and down["window_start"].notna().all()
    censored = world.users[~world.users["observed_window"]]
    assert len(censored) and (censored["population"] == "pretrain").all() and censored["window_start"].isna().all()
    leak = ev.head(1).assign(timestamp=w["cutoff"].iloc[0] + pd.Timedelta(hours=1))
    with pytest.raises(LeakageError):
        check_no_leakage(pd.concat([ev, leak], ignore_index=True), w)


def test_labels_come_from_each_users_own_later_window(world, raw):
    """Recompute the future labels from the raw epoch timestamps (days since the user's first UTC day)."""
    ratings, users, _ = raw
    cfg = ML.MovieLensConfig()
    ts = pd.to_datetime(ratings["timestamp"], unit="s")
    uid = "u" + ratings["user_id"].str.zfill(4)
    day = (ts - ts.groupby(uid).transform("min").dt.normalize()) / pd.Timedelta(days=1)
    end = cfg.input_days + cfg.label_days
    window = (day >= cfg.input_days) & (day < end)
    returns = (window & (day >= cfg.return_after_days)).groupby(uid).any()
    heavy = window.groupby(uid).sum() >= cfg.heavy_ratings
    lab = world.labels.pivot(index="user_id", columns="task_id", values="label")
    assert set(lab.index) == set(world.users_in("tune", "test"))
    assert (lab["returns_after_30d"] == returns.reindex(lab.index).astype(int)).all()
    assert (lab["heavy_future_use"] == heavy.reindex(lab.index).astype(int)).all()
    age = users.assign(user_id="u" + users["user_id"].str.zfill(4)).set_index("user_id")["age"]
    assert (lab["age_under_30"] == (age.reindex(lab.index) < 30).astype(int)).all()
    assert world.labels["oracle_prob"].isna().all()                  # real data: no oracle


def test_tasks_and_base_rates(world):
    tasks = world.tasks.set_index("task_id")
    assert len(tasks) >= 5 and tasks["query"].str.endswith("?").all()
    assert {"returns_after_30d", "heavy_future_use", "future_genre", "gender_female", "age_under_30"} <= set(tasks.index)
    rates = world.labels.groupby("task_id")["label"].mean()
    assert rates.between(0.08, 0.6).all(), rates.to_dict()
    m = world.manifest["tasks"]
    assert all(m[t]["n_test"] == len(world.users_in("test")) for t in tasks.index)


def test_populations_and_derived_qa(world):
    u = world.users.set_index("user_id")
    counts = u["split"].value_counts()
    assert counts["test"] > 150 and counts["tune"] > 150 and counts["pretrain_val"] > 20
    assert (u.loc[u["population"] == "pretrain", "split"].isin(["pretrain", "pretrain_val"])).all()
    qa = world.qa
    assert set(qa["user_id"]) <= set(world.users_in("pretrain", "pretrain_val"))
    fut_users = set(qa.loc[qa["source"] == "future", "user_id"])
    assert fut_users and fut_users <= set(u.index[u["observed_window"]])  # censored users: D_uqa only
    summary = world.manifest["derived_qa"]["summary"]
    assert summary["none_share"] < 0.3 and len(summary["intents_kept"]) >= 10
    assert not set(qa["query"]) & set(world.tasks["query"])


def test_deterministic_and_cached(world, wheel, tmp_path):
    again = ML.build_movielens(ML.MovieLensConfig(), wheel=wheel)
    for t in ("events", "users", "qa", "labels", "profiles"):
        pd.testing.assert_frame_equal(getattr(again, t), getattr(world, t))
    saved = ML.ensure_movielens(tmp_path / "ml", ML.MovieLensConfig())
    loaded = ML.ensure_movielens(tmp_path / "ml", ML.MovieLensConfig())   # reused: read back and validated
    assert loaded.modalities == ML.MODALITIES and len(loaded.events) == len(saved.events)
    assert loaded.manifest["config"] == ML.MovieLensConfig().to_dict()


def test_the_split_and_the_paraphrases_draw_from_streams_of_their_own(wheel, monkeypatch):
    """One seed gives the population split and derive_qa's paraphrase picks, but never the same bits to both."""
    seeds, real = [], np.random.default_rng
    monkeypatch.setattr(np.random, "default_rng", lambda seed=None: seeds.append(repr(seed)) or real(seed))
    ML.build_movielens(ML.MovieLensConfig(seed=3), wheel=wheel)
    assert len(seeds) >= 2 and len(set(seeds)) == len(seeds), seeds


def test_saved_world_of_another_schema_version_is_rebuilt(world, tmp_path, monkeypatch):
    """ensure_movielens reuses a saved world only under this package's schema version (one rule with the
    synthetic source: sources.common.ensure_saved); an older one is rebuilt, not read (which would fail)."""
    from qanchor_lab.data import save_world
    from qanchor_lab.schema import SCHEMA_VERSION

    builds = []
    monkeypatch.setattr(ML, "build_movielens", lambda cfg: builds.append(cfg) or world)   # the fixture, not a rebuild
    out = save_world(world, tmp_path / "ml")
    ML.ensure_movielens(out, ML.MovieLensConfig())
    assert builds == []                                                    # same config, versions: reused
    manifest = json.loads((out / "manifest.json").read_text())
    (out / "manifest.json").write_text(json.dumps({**manifest, "schema_version": SCHEMA_VERSION - 1}))
    again = ML.ensure_movielens(out, ML.MovieLensConfig())
    assert builds == [ML.MovieLensConfig()] and again.manifest["schema_version"] == SCHEMA_VERSION
    assert json.loads((out / "manifest.json").read_text())["schema_version"] == SCHEMA_VERSION


@pytest.mark.parametrize("shares, empty", [
    ({"downstream_share": 0.002}, r"downstream_share=0\.002, test_share=0\.5, val_share=0\.1 leave split\(s\) test"),
    ({"val_share": 0.999}, r"leave split\(s\) pretrain without users \(pretrain 0,"),
])
def test_shares_that_leave_a_split_empty_are_refused(wheel, shares, empty):
    with pytest.raises(ValueError, match=r"MovieLensConfig: observed_users=\d+, censored_users=\d+, .*" + empty):
        ML.build_movielens(ML.MovieLensConfig(**shares), wheel=wheel)


def test_registered_as_a_source(world, wheel, tmp_path):
    from qanchor_lab.sources import load_source

    got = load_source("movielens", out_dir=tmp_path / "ml")   # same default config as the `world` fixture
    pd.testing.assert_frame_equal(got.labels, world.labels)
    with pytest.raises(TypeError, match="label_dayz"):
        load_source("movielens", out_dir=tmp_path / "x", label_dayz=3)


def test_fetch_failure_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    with pytest.raises(ML.SourceUnavailable, match=r"recbole==1\.2\.1.*is PyPI reachable"):
        ML.fetch_wheel(tmp_path)
    broken = tmp_path / ML.WHEEL_NAME
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("nothing.txt", "")
    with pytest.raises(ML.SourceUnavailable, match="cannot read the ml-100k files"):
        ML.read_raw(broken)


def test_config_validation():
    with pytest.raises(ValueError, match="valid genres"):
        ML.MovieLensConfig(genre="Cowboy")
    with pytest.raises(ValueError, match="must lie in the label window"):
        ML.MovieLensConfig(return_after_days=3)
    assert ML.MovieLensConfig.from_dict(ML.MovieLensConfig(seed=3).to_dict()).seed == 3
    assert os.environ.get("QANCHOR_CACHE") is None or str(ML.cache_dir()) == os.environ["QANCHOR_CACHE"]


def test_demo_option_and_config():
    from qanchor_lab.cli import build_parser
    from qanchor_lab.pipeline import DemoConfig

    args = build_parser().parse_args(["demo", "--dataset", "movielens", "--fast"])
    assert args.dataset == "movielens"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["demo", "--dataset", "netflix"])
    with pytest.raises(ValueError, match="dataset='netflix'; valid choices"):
        DemoConfig(dataset="netflix")
    from qanchor_lab.pipeline import world_dir

    assert world_dir(DemoConfig(dataset="movielens", seed=3)).name == "movielens-100k-seed3"  # where diagnose looks


def test_demo_epochs_option_sets_the_pretraining_length_and_the_run_name(monkeypatch):
    import qanchor_lab.pipeline as P
    from qanchor_lab.cli import build_parser

    seen = {}
    monkeypatch.setattr(P, "run_demo", lambda out, cfg, data_dir=None, n_jobs=None, reuse_from=None: seen.update(
        out=Path(out), cfg=cfg, n_jobs=n_jobs, reuse_from=reuse_from))
    args = build_parser().parse_args(["demo", "--epochs", "12", "--seed", "11"])
    assert args.func(args) == 0
    assert seen["cfg"].epochs == 12 and seen["cfg"].pretrain_config().epochs == 12 and seen["cfg"].seed == 11
    assert seen["out"].name == "demo-epochs12-seed11"
    assert seen["reuse_from"] == P.RUNS_ROOT   # a run there pre-trained with the same settings is copied
    assert seen["n_jobs"] == -1                                    # the fits use every core unless --jobs says
    args = build_parser().parse_args(["demo", "--jobs", "1"])
    assert args.func(args) == 0 and seen["n_jobs"] == 1
    bad = build_parser().parse_args(["demo", "--epochs", "0"])
    with pytest.raises(ValueError, match="--epochs must be > 0, got 0"):
        bad.func(bad)


@pytest.mark.slow
def test_demo_runs_end_to_end_without_an_oracle(wheel, tmp_path):
    """Pre-training on derived QA, prompt tuning and every method but the oracle, on the real data."""
    from qanchor_lab.pipeline import DemoConfig, run_demo

    cfg = DemoConfig.fast()
    cfg.dataset, cfg.text_encoder, cfg.max_steps, cfg.tune_epochs, cfg.n_boot = "movielens", "hashing", 6, 1, 50
    out = run_demo(tmp_path / "run", cfg, show_progress=False)
    m = out["metrics"]
    assert "oracle" not in m["methods"] and "oracle" in m["skipped_methods"]
    assert {"qanchor_prompt_tuned", "qanchor_base", "static_embedding", "untrained", "gbdt_features",
            "logreg_features", "tfidf_features", "text_embedding", "qanchor_plus_features"} <= set(m["methods"])
    assert m["n_tasks"] == 5 and np.isfinite(m["perfect_qa"]["claims_r2"])
    assert (tmp_path / "run" / "report.html").stat().st_size > 10_000
    # where the time went, stage by stage, within the wall time
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(written["stage_seconds"]) == {"world_and_pretraining", "evaluation", "diagnostics"}
    assert 0 < sum(written["stage_seconds"].values()) <= written["wall_seconds"]
    assert sum(written["evaluation_seconds"].values()) <= written["stage_seconds"]["evaluation"]  # n_jobs=None: in turn
    # the diagnostics run on real data too, against the task labels
    diag = json.loads((tmp_path / "run" / "diagnostics.json").read_text())
    assert diag["stage_target"] == "label" and set(diag["summary"]) == {"trained", "untrained"}
    # the quick look asks query selectivity of tune users (every derived D_uqa question), not of pretrain_val rows
    assert diag["selectivity"] == {} and set(diag["tune_selectivity"]) == {"trained", "untrained"}
    top = diag["tune_selectivity"]["trained"][-1]
    assert top["intent"] == "overall" and top["n"] > 0 and np.isfinite(diag["summary"]["trained"]["tune_query_selectivity"])
    report = (tmp_path / "run" / "report.html").read_text()
    assert "Representation diagnostics" in report and "Query selectivity on tune users" in report
    assert "Query selectivity on held-out pre-training users" not in report
