"""The experiments layer: dotted overrides, cache keys and reuse, ablation switches, a tiny experiment."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from qanchor_lab.experiments import RunConfig, get_config
from qanchor_lab.experiments import runner as R
from qanchor_lab.experiments.core import verdict
from qanchor_lab.world import WorldConfig
from tests.conftest import tiny_config


def _tiny_run_config(**over) -> RunConfig:
    """The session world (1200 users, seed 11), the conftest tiny model, 2 pre-training steps, 1 task."""
    cfg = RunConfig(world=WorldConfig(n_users=1200, seed=11), model=tiny_config())
    return cfg.override({"pretrain.max_steps": 2, "pretrain.batch_size": 16, "tuning.epochs": 1,
                         "tuning.head_epochs": 2, "tuning.n_prompt": 2, "eval.task_ids": ["dormancy_churn"],
                         "eval.n_boot": 100, **over})


# ----- configuration -----

def test_override_by_dotted_key_changes_only_that_leaf():
    cfg = get_config(fast=True)
    new = cfg.override({"pretrain.lr": 1e-3, "model.use_user_token": False, "model.backbone.tiny_size": "s"})
    assert new.pretrain.lr == 1e-3 and new.model.use_user_token is False and new.model.backbone.tiny_size == "s"
    assert cfg.pretrain.lr is None and cfg.model.use_user_token is True  # the original is untouched
    assert set(new.diff(cfg)) == {"pretrain.lr", "model.use_user_token", "model.backbone.tiny_size"}


def test_a_section_given_as_a_mapping_changes_only_the_keys_it_names():
    cfg = get_config(fast=True)
    new = cfg.override({"world": {"n_users": 2000}})
    assert new.world.n_users == 2000 and set(new.diff(cfg)) == {"world.n_users"}      # the world's seed stays
    assert new.key() == cfg.override({"world.n_users": 2000}).key()
    # one task id alone is one task
    assert cfg.override({"eval.task_ids": "dormancy_churn"}).eval.task_ids == ("dormancy_churn",)


def test_unknown_key_error_names_the_valid_keys():
    cfg = get_config(fast=True)
    with pytest.raises(ValueError, match=r"unknown config key 'pretrain\.lrr'.*valid keys there:.*\blr\b"):
        cfg.override({"pretrain.lrr": 1e-3})
    with pytest.raises(ValueError, match=r"'modle'.*valid keys there:.*model.*pretrain"):
        cfg.override({"modle.use_user_token": False})
    with pytest.raises(ValueError, match="is a section"):
        cfg.override({"pretrain": 3})


def test_override_values_are_validated_by_the_stage_config():
    cfg = get_config(fast=True)
    with pytest.raises(ValueError, match="prompt_init"):
        cfg.override({"tuning.prompt_init": "zeros"})
    with pytest.raises(ValueError, match="use_contrastive / use_generative"):
        cfg.override({"pretrain.use_contrastive": False, "pretrain.use_generative": False})
    with pytest.raises(ValueError, match="pretrain_users"):
        cfg.override({"pretrain_users": 0.0})


def test_dict_round_trip_and_hash_stability(monkeypatch):
    cfg = get_config(fast=True)
    again = RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict() and again.key() == cfg.key() and again.model_key() == cfg.model_key()
    assert cfg.override({"pretrain.lr": 1e-3}).key() != cfg.key()
    # bootstrap settings do not change the scores, so they do not change the cache key
    assert cfg.override({"eval.n_boot": 17}).key() == cfg.key()
    # prompt-tuning settings shape only the prompt-tuned method's scores: a run without it is keyed without them
    assert cfg.override({"tuning.n_prompt": 2}).key() != cfg.key()
    base_only = cfg.override({"eval.methods": ["qanchor_base"]})
    assert base_only.override({"tuning.n_prompt": 2}).key() == base_only.key() != cfg.key()
    # a prompt-tuning change reuses the pre-trained model, a pre-training change does not
    assert cfg.override({"tuning.n_prompt": 2}).model_key() == cfg.model_key()
    assert cfg.override({"pretrain.alpha": 0.5}).model_key() != cfg.model_key()
    seeded = cfg.with_seed(3)
    assert (seeded.seed, seeded.pretrain.seed, seeded.model.backbone.seed, seeded.tuning.seed) == (3, 3, 3, 3)
    # a new generator version rebuilds the world: no run or model of the old one is served from the cache
    import qanchor_lab.experiments.config as C

    key, model_key = cfg.key(), cfg.model_key()
    monkeypatch.setattr(C, "GENERATOR_VERSION", C.GENERATOR_VERSION + 1)
    assert cfg.key() != key and cfg.model_key() != model_key


def test_full_config_is_the_demo_run():
    from qanchor_lab.experiments.config import from_demo
    from qanchor_lab.pipeline import DemoConfig

    demo = DemoConfig()
    cfg = get_config()
    assert cfg.world.to_dict() == demo.world_config().to_dict()
    assert cfg.model.to_dict() == demo.model_config().to_dict() | {"backbone": cfg.model.backbone.to_dict()}
    assert (cfg.pretrain.epochs, cfg.tuning.n_prompt, cfg.seed) == (demo.epochs, demo.n_prompt, 0)
    assert from_demo(demo).seed == demo.seed == from_demo(demo).pretrain.seed


def test_from_dict_rejects_unknown_nested_keys():
    d = get_config(fast=True).to_dict()
    d["model"]["backbone"]["tiny_sise"] = "s"
    with pytest.raises(ValueError, match=r"model\.backbone\.tiny_sise"):
        RunConfig.from_dict(d)


# ----- ablation switches reach the model's input and the loss -----

def test_token_switches_change_the_input_sequence(small_world):
    from qanchor_lab.model import QAnchorModel

    w = small_world
    users = w.users_in("pretrain")[:4]
    base = _tiny_run_config()
    lengths = {}
    for name, over in {"full": {}, "no_user": {"model.use_user_token": False},
                       "no_modality": {"model.use_modality_tokens": False}}.items():
        cfg = base.override(over)
        model = QAnchorModel.from_data(cfg.model, w.events, w.profiles, w.users_in("pretrain"))
        store = model.behaviour(w.events, w.profiles, users)
        lengths[name] = model.encode_prefix(store.batch(store.indices(users))).lengths
    n_mod = len(base.model.modalities)
    assert torch.equal(lengths["no_user"], lengths["full"] - 1)            # one user token fewer per user
    dropped = lengths["full"] - lengths["no_modality"]                      # one token per modality the user has
    assert ((dropped >= 1) & (dropped <= n_mod)).all()


def test_loss_switches_change_the_pretraining_loss(small_world, tiny_model):
    from qanchor_lab.pretrain import PretrainStep, make_pairs

    w = small_world
    users = w.users_in("pretrain")[:8]
    store = tiny_model.behaviour(w.events, w.profiles, users)
    pairs = make_pairs(w.qa, store)
    rows = np.arange(min(8, len(pairs)))
    args = (store.batch(pairs.user_index[rows]), [pairs.queries[i] for i in rows], [pairs.answers[i] for i in rows],
            torch.as_tensor(pairs.user_index[rows]), torch.as_tensor(pairs.answer_ids[rows]), 10.0)
    out = {}
    for name, over in {"full": {}, "no_cl": {"pretrain.use_contrastive": False},
                       "no_ntp": {"pretrain.use_generative": False}, "no_rec": {"pretrain.reconstruction": 0.0}}.items():
        with torch.no_grad():
            out[name] = PretrainStep(tiny_model, _tiny_run_config(**over).pretrain)(*args)
    full, no_cl, no_ntp, no_rec = out["full"], out["no_cl"], out["no_ntp"], out["no_rec"]
    beta = _tiny_run_config().pretrain.reconstruction
    assert beta > 0 and full.contrastive > 0 and full.ntp > 0 and full.reconstruction > 0
    assert torch.isclose(full.loss, full.contrastive + full.ntp + beta * full.reconstruction)
    assert no_cl.contrastive == 0 and torch.isclose(no_cl.loss, no_cl.ntp + beta * no_cl.reconstruction)
    assert no_ntp.ntp == 0 and torch.isclose(no_ntp.loss, no_ntp.contrastive + beta * no_ntp.reconstruction)
    assert no_rec.reconstruction == 0 and torch.isclose(no_rec.loss, full.contrastive + full.ntp)
    # the decoder starts from the same seed in every variant: the same reconstruction without the other terms
    assert torch.isclose(no_cl.reconstruction, full.reconstruction) and torch.isclose(no_ntp.reconstruction, full.reconstruction)
    # the weighting switch: "group" weighs each feature group alike, "feature" each column alike
    from qanchor_lab.losses import group_weights
    step = PretrainStep(tiny_model, _tiny_run_config().pretrain)
    assert _tiny_run_config().pretrain.reconstruction_weighting == "group"
    assert torch.equal(step.reconstruction.weights, group_weights(tiny_model.feature_spec.feature_groups()))
    assert not torch.allclose(step.reconstruction.weights, torch.ones_like(step.reconstruction.weights))
    flat = PretrainStep(tiny_model, _tiny_run_config(**{"pretrain.reconstruction_weighting": "feature"}).pretrain)
    assert flat.reconstruction.weights is None
    with torch.no_grad():
        assert not torch.isclose(flat(*args).reconstruction, full.reconstruction)
    with pytest.raises(ValueError, match="reconstruction_weighting.*valid choices"):
        _tiny_run_config(**{"pretrain.reconstruction_weighting": "column"})


# ----- cache -----

@pytest.mark.slow
def test_second_run_loads_from_cache_without_training(small_world, tmp_path, monkeypatch):
    cfg = _tiny_run_config(**{"eval.methods": ["qanchor_base"]})
    first = R.run(cfg, root=tmp_path, world=small_world)
    assert not first.cached and (tmp_path / cfg.key() / "config.json").exists()
    assert json.loads((tmp_path / cfg.key() / "config.json").read_text()) == cfg.to_dict()
    stamp = (tmp_path / cfg.key() / "run.json").stat().st_mtime_ns

    def boom(*a, **k):
        raise AssertionError("a cached run must not train or score again")

    real_scores = R.qanchor_scores
    monkeypatch.setattr(R, "pretrain", boom)
    monkeypatch.setattr(R, "qanchor_scores", boom)
    second = R.run(cfg, root=tmp_path, world=small_world)
    assert second.cached and (tmp_path / cfg.key() / "run.json").stat().st_mtime_ns == stamp
    pd.testing.assert_frame_equal(second.scores, first.scores)
    # without the prompt-tuned method a run never reads its tuning settings: a change there is the same run
    assert R.run(cfg.override({"tuning.n_prompt": 1}), root=tmp_path, world=small_world).cached
    # a change in what is scored re-scores but reuses the pre-trained model (pretrain still patched to fail)
    monkeypatch.setattr(R, "qanchor_scores", real_scores)
    other = R.run(cfg.override({"eval.task_ids": ["travel_coupon"]}), root=tmp_path, world=small_world)
    assert not other.cached and other.record["model_key"] == first.record["model_key"]


def test_fast_scaling_and_sweeps_reuse_the_fast_ablation_reference():
    """Notebook 08's fast grid reads its reference cell from notebook 06's cache (the same run key), and notebook
    07's fast sweeps tune prompts on 06's fast reference model (the same model key)."""
    from qanchor_lab.experiments import ablations, scaling, sweeps

    reference = ablations.variants(ablations.base_config(True))[ablations.REFERENCE]
    vs, ref, _ = scaling.grid_variants(scaling.base_config(True), scaling.FAST_GRID)
    assert vs[ref].key() == reference.key()
    assert sweeps.base_config(True).model_key() == reference.model_key()



def test_experiment_cli_set_changes_the_reference_of_every_variant(monkeypatch, tmp_path, capsys):
    """`experiment NAME --set KEY=VALUE`: the setting reaches the reference and every variant built on it (a
    variant's own setting still wins), the tables go beside the plain experiment's, and a bad key or value is
    named before anything runs."""
    import qanchor_lab.experiments as E
    from qanchor_lab.cli import main
    from qanchor_lab.experiments import ablations, sweeps

    seen = {}

    def fake_run_named(name, **kw):  # stands in for the runs; the variants are built from `base` below
        seen.update(kw, name=name)
        raise ValueError("stopped before running")

    monkeypatch.setattr(E, "run_named", fake_run_named)
    assert main(["experiment", "prompt_tokens", "--fast", "--set", "pretrain.reconstruction=1",
                 "--set", "tuning.lr=0.01"]) == 2
    assert "stopped before running" in capsys.readouterr().err
    base = seen["base"]
    assert base.pretrain.reconstruction == 1 and base.tuning.lr == 0.01
    # a whole number given for a number is stored as a float: one setting, one cache key, and later overrides
    # (an ablation's 0.0 below) still take floats
    assert isinstance(base.pretrain.reconstruction, float)
    assert base.key() == sweeps.base_config(True).override({"pretrain.reconstruction": 1.0, "tuning.lr": 0.01}).key()
    assert set(base.diff(sweeps.base_config(True))) == {"pretrain.reconstruction", "tuning.lr"}
    assert str(seen["out"]).endswith("tables/prompt_tokens-fast-pretrain.reconstruction1-tuning.lr0.01")
    vs, _, _ = sweeps.sweep_variants("prompt_tokens", base, fast=True)
    assert {v.pretrain.reconstruction for v in vs.values()} == {1}
    assert len({v.tuning.n_prompt for v in vs.values()}) == len(vs)  # the swept setting is the variant's own
    abl = ablations.variants(E.base_config_for("ablations", True).override({"pretrain.reconstruction": 1}))
    assert abl["no_reconstruction"].pretrain.reconstruction == 0 and abl[ablations.REFERENCE].pretrain.reconstruction == 1
    # every ablation is set beside a claim in the paper check (ours marked as ours), none left out of it
    assert [v for v, _, _ in ablations.PAPER_CLAIMS] == [v for v in ablations.ABLATIONS if v != ablations.REFERENCE]
    # without --set: the family's own reference and default tables
    seen.clear()
    assert main(["experiment", "ablations", "--fast", "--out", str(tmp_path / "t")]) == 2
    assert seen["base"] is None and seen["out"] == str(tmp_path / "t")
    for bad in ("pretrain.reconstruction", "pretrain.reconstructio=1", "model.embed_dim=abc", "tuning.lr=-1"):
        seen.clear()
        assert main(["experiment", "prompt_tokens", "--fast", "--set", bad]) == 2
        assert not seen  # named before any run
    # the seeds come from --seeds: a seed set here would be overwritten for every run, and its tables mislabelled
    for seeded in ("pretrain.seed=5", "seed=5", 'tuning={"seed": 5}'):
        seen.clear()
        assert main(["experiment", "prompt_tokens", "--fast", "--set", seeded]) == 2
        assert "sets these from them" in capsys.readouterr().err and not seen
# ----- a tiny experiment end to end -----

@pytest.mark.slow
def test_tiny_ablation_experiment_writes_tidy_table_with_cis(small_world, tmp_path):
    from qanchor_lab.experiments.ablations import paper_check, run_ablations

    base = _tiny_run_config(**{"eval.methods": ["qanchor_base"]})
    exp = run_ablations(base=base, names=["full", "no_user_token"], seeds=2, root=tmp_path, out=tmp_path / "t",
                        show_progress=False, world=small_world)
    t = exp.table
    assert len(t) == 2 * 2 * 1  # variants x seeds x tasks (one method)
    assert {"variant", "seed", "method", "task_id", "auc", "ks", "model.use_user_token"} <= set(t.columns)
    assert t.groupby("variant")["model.use_user_token"].first().to_dict() == {"full": True, "no_user_token": False}
    s = exp.summary.set_index("variant")
    for col in ("auc", "auc_low", "auc_high", "auc_diff", "auc_diff_low", "auc_diff_high", "verdict", "sentence"):
        assert s[col].notna().all(), col
    assert (s["auc_low"] <= s["auc"]).all() and (s["auc"] <= s["auc_high"]).all()
    assert s.loc["full", "verdict"] == "reference" and s.loc["full", "auc_diff"] == 0
    assert s.loc["no_user_token", "n_seeds"] == 2
    # the summary's AUC is the mean over seeds of each run's average over tasks
    mean = t[t["variant"] == "no_user_token"].groupby("seed")["auc"].mean().mean()
    assert s.loc["no_user_token", "auc"] == pytest.approx(mean)
    assert (tmp_path / "t" / "results.parquet").exists() and (tmp_path / "t" / "summary.csv").exists()
    check = paper_check(exp.summary)
    assert list(check["variant"]) == ["no_user_token"] and check["reproduces"].iloc[0]
    # rerunning the same experiment loads every run from the cache
    again = run_ablations(base=base, names=["full", "no_user_token"], seeds=2, root=tmp_path, out=tmp_path / "t",
                          show_progress=False, world=small_world)
    assert all(r.cached for r in again.runs.values())
    pd.testing.assert_frame_equal(again.summary, exp.summary)
    # the figures' default titles name the level the summary's intervals were drawn at, read back from Parquet too
    from qanchor_lab.experiments.figures import bar_with_ci, line_with_band

    assert "(95% CI)" in bar_with_ci(exp.summary).layout.title.text
    at80 = run_ablations(base=_tiny_run_config(**{"eval.methods": ["qanchor_base"], "eval.ci": 0.8}),
                         names=["full", "no_user_token"], seeds=2, root=tmp_path, out=tmp_path / "t80",
                         show_progress=False, world=small_world)
    assert all(r.cached for r in at80.runs.values())  # the level is not part of a run's key
    assert "(80% CI)" in bar_with_ci(at80.summary).layout.title.text
    back = pd.read_parquet(tmp_path / "t80" / "summary.parquet")
    assert "(80% CI band)" in line_with_band(back.assign(step=range(len(back))), "step").layout.title.text
    assert "(90% CI)" in bar_with_ci(back, ci=0.9).layout.title.text


@pytest.mark.slow
def test_parallel_runs_match_serial_runs_and_load_the_world_from_disk(small_world, tmp_path, monkeypatch):
    """jobs=2: the parent saves the in-memory world once where the workers load it, and the workers (one torch
    thread each) reproduce a serial run with one thread exactly."""
    from qanchor_lab.experiments.ablations import run_ablations

    monkeypatch.setattr(R, "DATA_ROOT", tmp_path / "data")
    base = _tiny_run_config(**{"eval.methods": ["qanchor_base"]})
    kw = dict(base=base, names=["full", "no_user_token"], seeds=1, show_progress=False, world=small_world)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        serial = run_ablations(root=tmp_path / "serial", out=tmp_path / "t1", jobs=1, **kw)
    finally:
        torch.set_num_threads(threads)
    assert not (tmp_path / "data").exists()  # one process: the world stays in memory
    parallel = run_ablations(root=tmp_path / "parallel", out=tmp_path / "t2", jobs=2, **kw)
    saved = R.world_dir(base.world)
    assert saved.parent == tmp_path / "data" and R.world_is_saved(saved, base.world)
    # every run was computed by a worker: the parent only loaded what they wrote
    assert all(r.cached for r in parallel.runs.values())
    assert len(list((tmp_path / "parallel" / "models").iterdir())) == 2
    timing = ["run_seconds"]
    pd.testing.assert_frame_equal(parallel.table.drop(columns=timing), serial.table.drop(columns=timing))
    pd.testing.assert_frame_equal(parallel.summary, serial.summary)


def test_verdict_words():
    assert verdict(-0.01, -0.02, 0.005) == "within noise (CI includes 0)"
    assert verdict(-0.01, -0.02, -0.001, seed_sd=0.02) == "within seed noise (|diff| <= seed sd)"
    assert verdict(-0.01, -0.02, -0.001, seed_sd=0.001) == "worse than reference"
    assert verdict(0.01, 0.001, 0.02) == "better than reference"


def test_paper_check_ranks_contrastive_among_the_ablations_it_could_lose_to():
    """"Removing contrastive learning costs the most": judged against the other ablations, not against
    no_pretraining, which removes contrastive learning along with everything else."""
    from qanchor_lab.experiments.ablations import paper_check

    def row(v, d):
        return {"variant": v, "method": "qanchor_base", "auc_diff": d, "auc_diff_low": d - 0.01,
                "auc_diff_high": d + 0.01, "verdict": "worse than reference"}

    summary = pd.DataFrame([row("full", 0.0), row("no_user_token", -0.02), row("no_contrastive", -0.05),
                            row("no_pretraining", -0.09)])
    check = paper_check(summary).set_index("variant")["reproduces"]
    assert check["no_contrastive"] == "yes" and check["no_pretraining"] == "yes"
    worse = pd.concat([summary, pd.DataFrame([row("no_modality_tokens", -0.07)])], ignore_index=True)
    assert paper_check(worse).set_index("variant").loc["no_contrastive", "reproduces"] == \
        "partly (a drop, but no_modality_tokens costs more)"
