"""The Q-Anchor model: sequence layout, towers, persistence, pre-training step, resume, ablations."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qanchor_lab.model import QAnchorModel
from qanchor_lab.pretrain import PretrainConfig, heldout_queries, make_pairs, pretrain
from qanchor_lab.sequence import build_suffix, pack_left
from tests.conftest import tiny_config


def _users(store, n, start=0):
    return store.batch(list(range(start, start + n)))


def test_pack_left_moves_real_tokens_first_and_trims():
    emb = torch.arange(12, dtype=torch.float32).view(2, 3, 2)
    mask = torch.tensor([[False, True, True], [True, False, False]])
    packed, m = pack_left(emb, mask)
    assert m.tolist() == [[True, True], [True, False]]
    assert packed[0].tolist() == [[2, 3], [4, 5]]
    assert packed[1, 0].tolist() == [6, 7]


def test_suffix_targets_predict_answer_from_user_emb(tiny_model):
    tok = tiny_model.tokenizer
    s = build_suffix(tok, ["will they travel"], user_emb_id=tiny_model.special_token_ids["<user_emb>"], answers=["yes soon"])
    ids, tgt = s.input_ids[0], s.targets[0]
    p = int(s.pool_index[0])
    assert ids[p] == tiny_model.special_token_ids["<user_emb>"]
    answer = tok("yes soon", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert tgt[p:p + len(answer)].tolist() == answer          # position t predicts token t+1
    assert (tgt[:p] == -100).all() and ids[p + 1:p + 1 + len(answer)].tolist() == answer


def test_prefix_has_every_real_event_and_drops_missing_modalities(tiny_model, tiny_store):
    ub = _users(tiny_store, 8)
    prefix = tiny_model.encode_prefix(ub)
    n_events = sum(ub.masks[m].sum(1) for m in tiny_model.config.modalities)          # (B,)
    present = torch.stack([ub.masks[m].any(1) for m in tiny_model.config.modalities], 1).sum(1)
    n_mod = len(tiny_model.config.modalities)
    expected = 1 + present + n_events + 2 * (n_mod + 1) + tiny_model.config.tabular_slots
    assert prefix.lengths.tolist() == expected.tolist()
    assert prefix.mask[:, 0].all()  # the first token is never padding


def test_embedding_does_not_depend_on_batch_mates(tiny_model, tiny_store):
    tiny_model.eval()
    ub = _users(tiny_store, 6)
    queries = ["what does this user spend on", "is this user likely to travel abroad"] * 3
    with torch.no_grad():
        together = tiny_model.embed(ub, queries)
        alone = torch.cat([tiny_model.embed(tiny_store.batch([i]), [queries[i]]) for i in range(6)])
    assert torch.allclose(together, alone, atol=1e-5)
    assert torch.allclose(together.norm(dim=-1), torch.ones(6), atol=1e-5)


def test_anchor_ignores_the_answer_that_follows(tiny_model, tiny_store):
    tiny_model.eval()
    ub = _users(tiny_store, 3)
    q = ["how often does the user shop online"] * 3
    with torch.no_grad():
        a = tiny_model(ub, q, ["yes every week", "no", "rarely"])["anchor"]
        b = tiny_model(ub, q, ["something else entirely here", "x", "y z"])["anchor"]
        c = tiny_model.embed(ub, q)
    assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-5)


def test_save_and_from_pretrained_round_trip(tiny_model, tiny_store, tmp_path):
    tiny_model.eval()
    ub = _users(tiny_store, 4)
    q = ["does the user invest"] * 4
    with torch.no_grad():
        before = tiny_model.embed(ub, q)
    tiny_model.save_pretrained(tmp_path / "m")
    assert (tmp_path / "m" / "qanchor_config.json").exists() and (tmp_path / "m" / "qanchor.safetensors").exists()
    assert not list((tmp_path / "m").rglob("*.bin")) and not list((tmp_path / "m").rglob("*.pt"))
    loaded = QAnchorModel.from_pretrained(tmp_path / "m").eval()
    with torch.no_grad():
        after = loaded.embed(ub, q)
    assert torch.allclose(before, after, atol=1e-6)


def test_built_and_loaded_models_are_in_eval_mode_and_embed_deterministically(tiny_model, tiny_store, tmp_path):
    """LoRA's dropout layers start in train mode: a model fresh from from_config or from_pretrained would give two
    different embeddings of one input. Both come back in eval mode (Hugging Face's convention)."""
    from dataclasses import replace

    model = QAnchorModel.from_config(replace(tiny_model.config, finetune="lora", lora_r=4))
    assert not any(m.training for m in model.modules())
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():  # LoRA's B starts at zero, which hides its dropout: make the adapters look trained
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=g))
    model.train()  # saved mid-training: the mode is no part of the checkpoint
    loaded = QAnchorModel.from_pretrained(model.save_pretrained(tmp_path / "m"))
    assert not any(m.training for m in loaded.modules())
    ub, q, a = _users(tiny_store, 3), ["does the user invest"] * 3, ["yes every month", "no", "rarely"]
    with torch.no_grad():
        assert torch.equal(loaded.embed(ub, q), loaded.embed(ub, q))
        assert torch.equal(loaded.embed_answers(a), loaded.embed_answers(a))


def test_a_bfloat16_backbone_embeds_and_runs_both_forward_paths(tiny_model, tiny_store):
    """The encoder and head stay float32 under a bfloat16 LLM (BackboneConfig.dtype): the prefix is cast into the
    LLM's dtype and the pooled states back, instead of a dtype mismatch in the first matmul."""
    from dataclasses import replace

    cfg = tiny_model.config
    model = QAnchorModel.from_config(replace(cfg, backbone=replace(cfg.backbone, dtype="bfloat16")))
    assert model.llm_dtype == torch.bfloat16 and model.head[0].weight.dtype == torch.float32
    ub, q, a = _users(tiny_store, 2), ["does the user invest", "is this user a big spender"], ["yes", "no, not at all"]
    with torch.no_grad():
        full = model(ub, q, a)
        cached = model(ub, q, a, user_rows=torch.tensor([0, 1]))
        embeddings = {"embed": model.embed(ub, q), "answers": model.embed_answers(a), "anchor full": full["anchor"],
                      "anchor cached": cached["anchor"], "answer": full["answer"]}
        encoded = model.encode(tiny_store, q, user_ids=tiny_store.user_ids[:2])          # (2, 2, d) cached path
    for name, e in embeddings.items():
        assert e.shape == (2, cfg.embed_dim) and e.dtype == torch.float32, name
        assert torch.isfinite(e).all() and torch.allclose(e.norm(dim=-1), torch.ones(2), atol=1e-5), name
    assert encoded.shape == (2, 2, cfg.embed_dim) and np.isfinite(encoded).all()
    for out in (full, cached):
        assert out["lm_logits"].shape[0] == out["lm_targets"].shape[0] > 0 and torch.isfinite(out["lm_logits"]).all()


def test_behaviour_names_a_repeated_user_id(tiny_model, small_world):
    u = small_world.users_in("pretrain_val")[:2]
    with pytest.raises(ValueError, match=rf"user_ids repeats 1 value\(s\): \['{u[0]}'\]"):
        tiny_model.behaviour(small_world.events, small_world.profiles, [u[0], u[1], u[0]])


def test_from_pretrained_names_a_wrong_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a saved QAnchorModel"):
        QAnchorModel.from_pretrained(tmp_path)


def test_config_validation_names_valid_choices():
    with pytest.raises(ValueError, match="valid choices"):
        tiny_config(finetune="half")
    # any declared modality names are valid (datasets declare their own); malformed ones are not
    assert tiny_config(modalities=("bill", "telepathy")).modalities == ("bill", "telepathy")
    with pytest.raises(ValueError, match="modalities"):
        tiny_config(modalities=("bill", "bill"))
    with pytest.raises(ValueError, match="modalities"):
        tiny_config(modalities=("bill", "tele pathy"))


def _small_pretrain(model, world, tmp_path, **kw):
    cfg = PretrainConfig(**{"epochs": 1.0, "batch_size": 8, "max_steps": 4, "log_every": 1, "seed": 3, **kw})
    return pretrain(model, world, cfg, tmp_path, show_progress=False)


@pytest.mark.slow
def test_pretraining_reduces_loss_and_writes_logs_and_checkpoint(tiny_model, small_world, tmp_path):
    summary = _small_pretrain(tiny_model, small_world, tmp_path, max_steps=12, lr=3e-3)
    log = [json.loads(l) for l in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert len(log) == 12 and {"loss", "contrastive", "ntp", "lr"} <= set(log[0])
    assert np.mean([r["loss"] for r in log[-3:]]) < np.mean([r["loss"] for r in log[:3]])
    assert summary["tokens_per_second"] > 0
    assert (tmp_path / "optimizer.safetensors").exists() and (tmp_path / "trainer_state.json").exists()


@pytest.mark.slow
@pytest.mark.parametrize("reconstruction", [0.0, 2.0])
def test_resume_continues_exactly(tiny_model, small_world, tmp_path, reconstruction):
    import copy

    straight = copy.deepcopy(tiny_model)
    _small_pretrain(straight, small_world, tmp_path / "a", max_steps=4, save_every=2, reconstruction=reconstruction)
    mid = tmp_path / "a" / "checkpoint-2"
    assert json.loads((mid / "trainer_state.json").read_text())["step"] == 2
    # the training-only reconstruction decoder travels with the checkpoint, not with the model
    assert (mid / "reconstruction.safetensors").exists() == bool(reconstruction)
    resumed = QAnchorModel.from_pretrained(mid)
    cfg = PretrainConfig(epochs=1.0, batch_size=8, max_steps=4, log_every=1, seed=3, reconstruction=reconstruction)
    summary = pretrain(resumed, small_world, cfg, tmp_path / "b", resume_from=mid, show_progress=False)
    assert summary["steps"] == 4
    for (name, p), (_, q) in zip(straight.named_parameters(), resumed.named_parameters()):
        assert torch.allclose(p, q, atol=1e-5), name


@pytest.mark.slow
def test_resume_names_a_changed_config_and_refuses_one_it_cannot_continue(tiny_model, small_world, tmp_path):
    import copy

    from qanchor_lab.pretrain import NOT_RECORDED, resume_changes

    _small_pretrain(copy.deepcopy(tiny_model), small_world, tmp_path / "a", max_steps=2, reconstruction=2.0)
    ckpt = tmp_path / "a"
    cfg = dict(epochs=1.0, batch_size=8, log_every=1, seed=3, reconstruction=2.0)
    # run length is what resuming changes: not reported
    assert resume_changes(ckpt, PretrainConfig(**cfg, max_steps=3)) == {}
    assert resume_changes(ckpt, PretrainConfig(**cfg, max_steps=3, answer_set=0.0)) == {"answer_set": (1.0, 0.0)}
    with pytest.warns(UserWarning, match=r"answer_set: 1\.0 -> 0\.0"):
        summary = pretrain(QAnchorModel.from_pretrained(ckpt), small_world, PretrainConfig(**cfg, max_steps=3, answer_set=0.0),
                           tmp_path / "b", resume_from=ckpt, show_progress=False)
    assert summary["steps"] == 3
    # a checkpoint written before an option existed: the option shows as not recorded
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["config"]["answer_set"]
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert resume_changes(ckpt, PretrainConfig(**cfg)) == {"answer_set": (NOT_RECORDED, 1.0)}
    # other trainable parameters than the checkpoint holds: a clear error, not torch's
    with pytest.raises(ValueError, match="optimizer state does not match.*reconstruction: 2.0 -> 0.0"), pytest.warns(UserWarning):
        pretrain(QAnchorModel.from_pretrained(ckpt), small_world, PretrainConfig(**{**cfg, "reconstruction": 0.0}, max_steps=3),
                 tmp_path / "c", resume_from=ckpt, show_progress=False)
    (ckpt / "reconstruction.safetensors").unlink()
    with pytest.raises(ValueError, match="no reconstruction decoder"), pytest.warns(UserWarning, match="not recorded"):
        pretrain(QAnchorModel.from_pretrained(ckpt), small_world, PretrainConfig(**cfg, max_steps=3), tmp_path / "d",
                 resume_from=ckpt, show_progress=False)
    with pytest.raises(FileNotFoundError, match="no trainer_state.json"):
        resume_changes(tmp_path / "b" / "nothing", PretrainConfig())


@pytest.mark.filterwarnings("ignore::qanchor_lab.features.OutsideWindowWarning")  # the narrow window, on purpose
def test_untrained_start_rebuilds_the_starting_point_with_the_models_own_window(tiny_model, small_world):
    import pandas as pd

    w, users = small_world, small_world.users_in("pretrain")
    start, end = tiny_model.feature_spec.window                      # inferred from the data when it was built
    narrow = QAnchorModel.from_data(tiny_config(), w.events, w.profiles, users,
                                    window_start=start + pd.Timedelta(days=30), window_end=end)
    for model in (tiny_model, narrow):
        again = model.untrained_start(w.events, w.profiles, users)
        assert again.config.feature_spec == model.config.feature_spec
        theirs = model.state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in again.state_dict().items())
    # without the model's window the feature spec would be refitted on all history: a different start
    plain = QAnchorModel.from_data(narrow.config, w.events, w.profiles, users)
    assert plain.config.feature_spec != narrow.config.feature_spec


def test_heldout_paraphrases_are_kept_out_of_training(small_world, tiny_store):
    held = heldout_queries(small_world.qa, seed=0)
    assert len(held) >= 30
    pairs = make_pairs(small_world.qa, tiny_store, held)
    assert not held & set(pairs.queries)
    same_text = np.asarray(pairs.answers, dtype=object)
    first = {a: i for i, a in reversed(list(enumerate(same_text)))}
    assert all(pairs.answer_ids[i] == pairs.answer_ids[first[a]] for i, a in enumerate(same_text))
    assert len(set(pairs.answer_ids.tolist())) < len(first)  # default: paraphrases of one claim share an id
    by_text = make_pairs(small_world.qa, tiny_store, held, false_negatives="answer_text")
    assert len(set(by_text.answer_ids.tolist())) == len(first)  # distinct texts, distinct ids


@pytest.mark.parametrize("overrides", [
    dict(use_user_token=False), dict(use_modality_tokens=False),
    dict(use_user_token=False, use_modality_tokens=False), dict(use_tabular=False),
])
def test_structural_ablations_build_and_shorten_the_prefix(small_world, tiny_store, overrides):
    w = small_world
    model = QAnchorModel.from_data(tiny_config(**overrides), w.events, w.profiles, w.users_in("pretrain"))
    full = QAnchorModel.from_data(tiny_config(), w.events, w.profiles, w.users_in("pretrain"))
    ub = _users(tiny_store, 4)
    assert (model.encode_prefix(ub).lengths < full.encode_prefix(ub).lengths).all()
    assert model.embed(ub, ["q"] * 4).shape == (4, 32)


@pytest.mark.parametrize("loss_off", ["use_contrastive", "use_generative"])
def test_loss_ablations_train(tiny_model, small_world, tmp_path, loss_off):
    summary = _small_pretrain(tiny_model, small_world, tmp_path, max_steps=2, **{loss_off: False})
    assert summary["steps"] == 2
    key = "contrastive" if loss_off == "use_contrastive" else "ntp"
    assert summary["last"][key] == 0.0


def test_a_model_saved_before_the_input_switches_still_loads(tiny_model, tiny_store, tmp_path):
    """Configs without event_norm / tabular_mode (and weights without the numeric statistics) load as the
    earlier behaviour they were saved with, not as today's defaults."""
    from dataclasses import replace

    from safetensors.torch import load_file, save_file

    from qanchor_lab.model import CONFIG_NAME, WEIGHTS_NAME

    old = QAnchorModel.from_config(replace(tiny_model.config, event_norm="none", tabular_mode="repeat", tabular_slots=2))
    old.eval()
    d = old.save_pretrained(tmp_path / "old")
    cfg = json.loads((d / CONFIG_NAME).read_text())
    del cfg["event_norm"], cfg["tabular_mode"]
    (d / CONFIG_NAME).write_text(json.dumps(cfg))
    weights = {k: v for k, v in load_file(d / WEIGHTS_NAME).items() if "numeric_" not in k}
    save_file(weights, d / WEIGHTS_NAME)
    back = QAnchorModel.from_pretrained(d).eval()
    assert (back.config.event_norm, back.config.tabular_mode) == ("none", "repeat")
    batch = tiny_store.batch([0, 1, 2])
    with torch.no_grad():
        assert torch.allclose(old.embed(batch, ["Is this user a big spender?"] * 3),
                              back.embed(batch, ["Is this user a big spender?"] * 3), atol=1e-6)


def test_token_ids_are_the_ids_the_suffix_lays_out_and_pad_right_pads_them(tiny_model):
    from qanchor_lab.sequence import pad_right, token_ids

    tok, cfg = tiny_model.tokenizer, tiny_model.config
    queries = [" ".join(["travel"] * (cfg.max_query_tokens + 5)), "will they travel"]
    ids = token_ids(tok, queries, cfg.max_query_tokens)
    assert len(ids[0]) == cfg.max_query_tokens                                     # truncated, no special tokens
    assert ids[1] == tok("will they travel", add_special_tokens=False)["input_ids"]
    suffix = tiny_model.make_suffix(queries)
    assert [row[:len(i)].tolist() for row, i in zip(suffix.input_ids, ids)] == ids
    tokens, mask = pad_right(ids, tok.pad_token_id)                                # (2, L), (2, L)
    enc = tok(queries, add_special_tokens=False, truncation=True, max_length=cfg.max_query_tokens, padding=True,
              return_tensors="pt")                                                 # the tokenizer's own padding
    assert torch.equal(tokens, enc["input_ids"]) and torch.equal(mask, enc["attention_mask"].bool())
    assert [t.shape for t in pad_right([], tok.pad_token_id)] == [(0, 0), (0, 0)]
    # no texts: no ids (the tokenizer itself fails on an empty batch), and the answer tower returns no rows
    assert token_ids(tok, [], cfg.max_query_tokens) == []
    with torch.no_grad():
        none, one = tiny_model.embed_answers([]), tiny_model.embed_answers(["yes"])
    assert none.shape == (0, cfg.embed_dim) and (none.dtype, none.device) == (one.dtype, one.device)
