"""The command line and the benchmark commands (smoke scale: figures are reported, not asserted on time)."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest

from qanchor_lab.cli import main


def test_data_command_writes_tables_and_manifest(tmp_path, capsys):
    assert main(["data", "--users", "600", "--seed", "4", "--out", str(tmp_path / "w")]) == 0
    out = capsys.readouterr().out
    assert "oracle_auc" in out and "self-reflection" in out
    for table in ("events", "profiles", "users", "qa", "tasks", "labels"):
        assert len(pd.read_parquet(tmp_path / "w" / f"{table}.parquet")) > 0
    manifest = json.loads((tmp_path / "w" / "manifest.json").read_text())
    assert manifest["seed"] == 4 and len(manifest["tasks"]) == 10
    assert manifest["config"]["side_interests"] == 0 and "side_interest_qa" not in manifest["counts"]
    # a richer user: side interests as profile columns and questions; a bad count is named, nothing written
    assert main(["data", "--users", "600", "--seed", "4", "--side-interests", "3", "--out", str(tmp_path / "r")]) == 0
    assert json.loads((tmp_path / "r" / "manifest.json").read_text())["counts"]["side_interest_qa"] > 0
    assert {"interest_fishing_gear", "interest_yoga_gear"} <= set(pd.read_parquet(tmp_path / "r" / "profiles.parquet"))
    capsys.readouterr()
    assert main(["data", "--users", "600", "--side-interests", "500", "--out", str(tmp_path / "bad")]) == 2
    assert "side_interests" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    # the splits' shares: a larger labelled pool; a share outside (0, 1) is named, nothing written
    assert main(["data", "--users", "600", "--seed", "4", "--pretrain-share", "0.2", "--val-share", "0.25",
                 "--test-share", "0.25", "--out", str(tmp_path / "s")]) == 0
    split = pd.read_parquet(tmp_path / "s" / "users.parquet")["split"].value_counts()
    assert split["pretrain"] == 90 and split["pretrain_val"] == 30 and split["test"] == 120 and split["tune"] == 360
    capsys.readouterr()
    assert main(["data", "--users", "600", "--test-share", "1", "--out", str(tmp_path / "bad2")]) == 2
    assert "test_share" in capsys.readouterr().err and not (tmp_path / "bad2").exists()
    # any other WorldConfig field by --set: graded answers change the QA table only; a bad key or a key set twice
    # is named, nothing written
    assert main(["data", "--users", "600", "--seed", "4", "--set", "qa_style=graded", "--set", "events_per_user=40",
                 "--out", str(tmp_path / "g")]) == 0
    assert json.loads((tmp_path / "g" / "manifest.json").read_text())["config"]["qa_style"] == "graded"
    for table in ("events", "users", "labels"):
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "g" / f"{table}.parquet"),
                                      pd.read_parquet(tmp_path / "w" / f"{table}.parquet"))
    assert not pd.read_parquet(tmp_path / "g" / "qa.parquet").equals(pd.read_parquet(tmp_path / "w" / "qa.parquet"))
    capsys.readouterr()
    assert main(["data", "--users", "600", "--set", "qa_styl=graded", "--out", str(tmp_path / "bad3")]) == 2
    err = capsys.readouterr().err
    assert "qa_styl" in err and "qa_style" in err and "Traceback" not in err and not (tmp_path / "bad3").exists()
    assert main(["data", "--users", "600", "--set", "n_users=700", "--out", str(tmp_path / "bad4")]) == 2
    assert "--users and --set n_users" in capsys.readouterr().err and not (tmp_path / "bad4").exists()
    assert main(["data", "--users", "600", "--set", "qa_style", "--out", str(tmp_path / "bad5")]) == 2
    assert "e.g. qa_style=graded" in capsys.readouterr().err and not (tmp_path / "bad5").exists()


def test_bad_arguments_give_a_clean_error(tmp_path, capsys):
    assert main(["pretrain", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "missing" in err and "Traceback" not in err


@pytest.mark.slow
def test_bench_kv_json_contract():
    proc = subprocess.run([sys.executable, "-m", "qanchor_lab", "bench", "kv", "--json", "--fast"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["queries_per_user"] == 10
    assert result["max_abs_diff"] <= 1e-5
    assert result["ideal_speedup"] > 1 and result["speedup"] > 0


@pytest.mark.slow
def test_bench_prompt_reports_both_prompt_positions():
    from qanchor_lab.bench import bench_prompt

    result = bench_prompt(fast=True, batch_size=16)
    assert set(result["layouts"]) == {"before_query", "after_query"}
    for layout in result["layouts"].values():
        assert layout["loss_abs_diff"] <= 1e-4 and layout["speedup"] > 0
    before, after = result["layouts"]["before_query"], result["layouts"]["after_query"]
    assert after["step_tokens"] == 6 + 1 < before["step_tokens"]                 # prompt + <user_emb> only
    assert after["cached_tokens"] > before["cached_tokens"] == result["prefix_tokens"]
    assert before["full_tokens"] == after["full_tokens"]


@pytest.mark.slow
def test_bench_pretrain_counts_the_step_tokens_of_both_vocabularies():
    from qanchor_lab.bench import bench_pretrain

    result = bench_pretrain(fast=True, batch_size=8, steps=1)
    # every row is a user prefix plus its query and answer: dozens of tokens, not a loss value read as a count
    assert result["tokens_per_step"] > 8 * 20
    assert result["answer_vocab_tokens_per_second"] > 0 and result["answer_vocab_speedup"] > 0
    # the step before docs/design.md §7.49, timed beside it: a second answer-tower pass, the per-tensor AdamW
    assert result["shared_answer_pass_speedup"] > 0 and result["fused_adamw_speedup"] > 0
    assert result["ratio_vs_bare_lm"] > 0 and result["ratio_vs_bare_body"] > 0


def test_bench_bootstrap_reports_both_metrics_beside_the_goal():
    """The report's bootstrap speed goal lives here, measured, not in a timed unit test."""
    from qanchor_lab.bench import BOOTSTRAP_GOAL_S

    proc = subprocess.run([sys.executable, "-m", "qanchor_lab", "bench", "bootstrap", "--json", "--fast"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert (result["users"], result["tasks"], result["resamples"]) == (300, 3, 200)
    assert result["auc_seconds"] > 0 and result["ks_seconds"] > 0 and result["auc_speedup"] > 0
    assert result["goal_seconds"] == BOOTSTRAP_GOAL_S
    assert result["meets_goal"] == (max(result["auc_seconds"], result["ks_seconds"]) <= BOOTSTRAP_GOAL_S)


_ALIGNMENT = ("import os; {first}; x = torch.empty(8 << 20, dtype=torch.uint8); "
              "print(os.environ.get('THP_MEM_ALLOC_ENABLE'), x.data_ptr() % 4096 == 0)")


@pytest.mark.parametrize("first, setting, expected", [
    ("import qanchor_lab, torch", None, "1 True"),        # the package turns torch's huge pages on ...
    ("import qanchor_lab, torch", "0", "0 False"),        # ... unless the user turned them off
    ("import torch, qanchor_lab", None, "None False"),    # torch first: too late, so it leaves the variable alone
])
def test_importing_the_package_turns_on_torch_huge_pages_unless_told_otherwise(first, setting, expected):
    """With THP_MEM_ALLOC_ENABLE=1 torch page-aligns its large CPU tensors (and madvises them to huge pages);
    without it they are 64-byte aligned inside glibc's mapping, never on a page boundary."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if setting is not None:
        env["THP_MEM_ALLOC_ENABLE"] = setting
    proc = subprocess.run([sys.executable, "-c", _ALIGNMENT.format(first=first)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == expected


@pytest.mark.slow
def test_bench_hugepages_times_both_settings_on_the_same_bits():
    from qanchor_lab.bench import bench_hugepages

    result = bench_hugepages(fast=True)
    assert (result["pretrain"]["steps"], result["minilm"]["texts"]) == (2, 16)
    for work in ("pretrain", "minilm"):
        row = result[work]
        assert row["identical"] is True                   # huge pages change where tensors live, not what they hold
        assert row["seconds_off"] > 0 and row["seconds_on"] > 0 and row["speedup"] > 0
        assert row["page_faults_off"] > 0 and row["page_faults_on"] > 0
    # the fast pre-training allocates tensors of several MB: huge pages must cut its page faults
    assert result["pretrain"]["page_faults_on"] < result["pretrain"]["page_faults_off"]


def test_data_command_names_a_qa_per_user_max_above_the_styles_intents(tmp_path, capsys):
    """qa_per_user_max above the QA style's intent count (49 for "counts") is a clean error naming the value and
    the largest valid one, nothing written, instead of a world with fewer QA pairs per user than asked."""
    assert main(["data", "--users", "60", "--set", "qa_per_user_max=55", "--out", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "Traceback" not in err and not (tmp_path / "w").exists()
    assert "<= 49" in err and "qa_style='counts'" in err and "got 4/55" in err


def test_pretrain_command_leaves_a_marker_the_run_readers_find_and_the_demo_never_takes(tmp_path, monkeypatch, capsys):
    """`pretrain --data W --out R` writes R/demo_config.json, so that diagnose, tune-splits, label-curve and
    refit-intervals find W without --data: the demo's key for that config and data (pipeline.run_key) tagged
    written_by="pretrain", which ensure_pretrained never takes for its own (a match reuses R/model, while pretrain
    writes its model in R); a demo there is refused. A demo's run directory is refused before any training, its
    marker untouched."""
    from pathlib import Path

    from qanchor_lab import pipeline
    from qanchor_lab.diagnostics import resolve_run, run_demo_config
    from qanchor_lab.model import CONFIG_NAME

    world, run = tmp_path / "w", tmp_path / "r"
    world.mkdir()
    trained = []

    def fake_pretrain_world(world, out_dir, cfg, **kw):   # the files a pre-trained model leaves; no training
        trained.append(cfg)
        Path(out_dir).mkdir(parents=True, exist_ok=True)
        (Path(out_dir) / CONFIG_NAME).write_text("{}")
        return None, {"steps": 0}

    monkeypatch.setattr(pipeline, "load_dataset", lambda data_dir, **kw: "the world")
    monkeypatch.setattr(pipeline, "pretrain_world", fake_pretrain_world)
    assert main(["pretrain", "--data", str(world), "--out", str(run), "--fast", "--seed", "3"]) == 0
    assert resolve_run(run) == (run, world.resolve()) and run_demo_config(run).seed == 3
    marker = json.loads((run / "demo_config.json").read_text())
    assert {**pipeline.run_key(trained[0], world), "written_by": "pretrain"} == marker
    # a demo in that run directory is refused before it loads or trains anything (pipeline.ensure_pretrained)
    (run / "model").mkdir()
    (run / "model" / "pretrain_summary.json").write_text("{}")
    monkeypatch.setattr(pipeline, "load_dataset", lambda *a, **k: pytest.fail("loaded the data"))
    monkeypatch.setattr(pipeline.QAnchorModel, "from_pretrained", lambda *a, **k: pytest.fail("reused the model"))
    monkeypatch.setattr(pipeline, "pretrain_world", lambda *a, **k: pytest.fail("pre-trained beside it"))
    with pytest.raises(ValueError, match="holds a model of its own"):
        pipeline.ensure_pretrained(run, trained[0], data_dir=world)
    # a demo's run directory: its marker would be replaced and its model/ left undescribed
    demo = tmp_path / "demo"
    demo.mkdir()
    (demo / "demo_config.json").write_text(json.dumps(pipeline.run_key(trained[0], world)))
    before = (demo / "demo_config.json").read_text()
    capsys.readouterr()
    assert main(["pretrain", "--data", str(world), "--out", str(demo), "--fast", "--seed", "3"]) == 2
    err = capsys.readouterr().err
    assert "is a demo's run directory" in err and "Traceback" not in err and len(trained) == 1
    assert (demo / "demo_config.json").read_text() == before
    # nor its model/ (with --overwrite the marker would go on describing the model replaced)
    assert main(["pretrain", "--data", str(world), "--out", str(demo / "model"), "--fast", "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "is the model of a demo's run" in err and "Traceback" not in err and len(trained) == 1
    assert not (demo / "model").exists() and (demo / "demo_config.json").read_text() == before
