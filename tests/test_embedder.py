"""Prefix equivalence (DESIGN §2), the encode() API, and prompt tuning over cached prefixes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qanchor_lab.embedder import CachedEmbedder, build_prefix_cache, run_cached
from qanchor_lab.losses import prototype_loss
from qanchor_lab.prompt_tuning import PromptTuningConfig, TaskAdapter, tune_task

QUERIES = ["is this user likely to repay the credit bill late next month",
           "will the user book a hotel abroad",
           "short"]


def _mixed_users(store, model, n=8):
    """Users whose prefixes differ in length (padding in the batch), some with missing modalities."""
    lengths = model.encode_prefix(store.batch(list(range(60)))).lengths
    order = torch.argsort(lengths)
    pick = torch.cat([order[: n // 2], order[-(n // 2):]])
    assert lengths[pick].min() < lengths[pick].max()
    return [store.user_ids[i] for i in pick.tolist()]


def test_cached_prefix_equals_full_recompute(tiny_model, tiny_store):
    model = tiny_model.eval()
    users = _mixed_users(tiny_store, model)
    cached = CachedEmbedder(model, tiny_store).encode(users, QUERIES, batch_size=9)     # (U, Q, d)
    assert cached.shape == (len(users), len(QUERIES), model.config.embed_dim)
    batch = tiny_store.batch(tiny_store.indices(users))
    with torch.no_grad():
        full = np.stack([model.embed(batch, [q] * len(users)).numpy() for q in QUERIES], 1)
    assert np.abs(cached - full).max() <= 1e-5


def test_cached_prefix_with_soft_prompt_equals_full(tiny_model, tiny_store):
    model = tiny_model.eval()
    users = _mixed_users(tiny_store, model, n=6)
    prompt = torch.randn(4, model.llm.get_input_embeddings().weight.shape[1]) * 0.02
    batch = tiny_store.batch(tiny_store.indices(users))
    with torch.no_grad():
        full = model.embed(batch, [QUERIES[0]] * len(users), prompt=prompt)
        cache = build_prefix_cache(model, batch)
        cached = run_cached(model, cache, model.make_suffix([QUERIES[0]] * len(users), n_prompt=4), prompt)
    assert (full - cached).abs().max() <= 1e-5


def test_kept_cache_gives_the_same_embeddings(tiny_model, tiny_store):
    model = tiny_model.eval()
    users = tiny_store.user_ids[:5]
    plain = CachedEmbedder(model, tiny_store).encode(users, QUERIES[:2])
    keeper = CachedEmbedder(model, tiny_store, keep_cache=True)
    keeper.encode(users[2:], QUERIES[:1])  # warm part of the cache, in another order
    assert np.abs(keeper.encode(users, QUERIES[:2]) - plain).max() <= 1e-5


def test_model_encode_api(tiny_model, tiny_store):
    out = tiny_model.encode(tiny_store, QUERIES[:2], user_ids=tiny_store.user_ids[:3])
    assert out.shape == (3, 2, tiny_model.config.embed_dim)
    assert np.allclose(np.linalg.norm(out, axis=-1), 1, atol=1e-5)
    with pytest.raises(KeyError, match="not in this behaviour store"):
        tiny_model.encode(tiny_store, QUERIES[:1], user_ids=["nobody"])


def test_prompt_loss_over_cache_equals_full_sequence_loss(tiny_model, tiny_store):
    model = tiny_model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    users = _mixed_users(tiny_store, model)
    batch = tiny_store.batch(tiny_store.indices(users))
    cfg = PromptTuningConfig(n_prompt=3)
    H = model.llm.get_input_embeddings().weight.shape[1]
    adapter = TaskAdapter(3, H, model.config.embed_dim, 2, cfg.prototypes_per_class, QUERIES[0], cfg)
    with torch.no_grad():
        adapter.prompt.normal_(0, 0.02)
        adapter.prototypes.normal_()
    labels = torch.tensor([0, 1] * (len(users) // 2))
    suffix = model.make_suffix([QUERIES[0]] * len(users), n_prompt=3)
    kw = dict(temperature=cfg.temperature, prototype_class=adapter.prototype_class)
    cached = prototype_loss(run_cached(model, build_prefix_cache(model, batch), suffix, adapter.prompt), adapter.prototypes, labels, **kw)
    cached.backward()
    g_cached = adapter.prompt.grad.clone()
    adapter.zero_grad()
    full_emb = model.pool(model.run_full(model.encode_prefix(batch), model.suffix_embeddings(suffix, adapter.prompt), suffix.mask), suffix)
    full = prototype_loss(full_emb, adapter.prototypes, labels, **kw)
    full.backward()
    assert abs(cached.item() - full.item()) <= 1e-4
    assert torch.allclose(g_cached, adapter.prompt.grad, atol=1e-4)


@pytest.mark.slow
def test_tune_task_learns_a_separable_signal_and_round_trips(tiny_model, tiny_store, tmp_path):
    model = tiny_model.eval()
    users = tiny_store.user_ids[:120]
    batch = tiny_store.batch(tiny_store.indices(users))
    # a label the behaviour determines: whether the user has any search events
    labels = batch.masks["search"].any(1).numpy().astype(int)
    if labels.min() == labels.max():
        pytest.skip("fixture world has no users without search")
    cache = build_prefix_cache(model, batch)
    result = tune_task(model, cache, labels, "does this user search", PromptTuningConfig(n_prompt=2, epochs=8, patience=3, seed=1))
    assert result.val_auc > 0.7
    assert 0 <= result.best_epoch <= 8 and len(result.history) >= result.best_epoch + 1
    assert result.history[0]["epoch"] == 0  # the initialisation is a candidate too
    scores = result.adapter.score(model, cache)
    path = result.adapter.save(tmp_path / "task")
    again = TaskAdapter.load(path).score(model, cache)
    assert np.allclose(scores, again, atol=1e-6)
    assert not any(p.requires_grad for p in model.parameters())  # backbone and encoder stay frozen


def test_tune_task_rejects_single_class_labels(tiny_model, tiny_store):
    cache = build_prefix_cache(tiny_model.eval(), tiny_store.batch([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="both classes"):
        tune_task(tiny_model, cache, np.zeros(4), "q")
