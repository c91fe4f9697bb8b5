"""Prefix equivalence (docs/design.md §2), the encode() API, and prompt tuning over cached prefixes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from qanchor_lab.baselines import probe_scores
from qanchor_lab.embedder import CachedEmbedder, build_prefix_cache, run_cached
from qanchor_lab.losses import prototype_loss
from qanchor_lab.prompt_tuning import PromptTuningConfig, TaskAdapter, tune_task
from tests.conftest import searchers

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


def test_queries_of_equal_length_share_a_batch_and_keep_their_columns(tiny_model, tiny_store):
    model = tiny_model.eval()
    users = _mixed_users(tiny_store, model, n=6)
    queries = ["will the user book a hotel abroad", "short", "will the user open a card today",
               "will the user buy a fund abroad"]
    lengths = model.make_suffix(queries).mask.sum(1).tolist()
    assert len(set(lengths)) < len(lengths)                                           # some share a length
    cached = CachedEmbedder(model, tiny_store).encode(users, queries, batch_size=4)
    batch = tiny_store.batch(tiny_store.indices(users))
    with torch.no_grad():
        full = np.stack([model.embed(batch, [q] * len(users)).numpy() for q in queries], 1)
    assert np.abs(cached - full).max() <= 1e-5


def test_encode_pairs_equals_full_recompute_row_by_row(tiny_model, tiny_store):
    """One query per row, users repeated and interleaved, chunks that split a user's rows from others', and
    two different queries of one token length (they run in one batch)."""
    model = tiny_model.eval()
    users = _mixed_users(tiny_store, model, n=6)
    queries = QUERIES + ["will the user book abroad a hotel"]  # the same word pieces as QUERIES[1], reordered
    assert model.make_suffix(queries[1:2]).mask.sum() == model.make_suffix(queries[3:]).mask.sum()
    row_users = [users[i % 6] for i in range(11)] + [users[0]]
    row_queries = [queries[(i * 3) % 4] for i in range(12)]
    got = CachedEmbedder(model, tiny_store).encode_pairs(row_users, row_queries, batch_size=4)     # (12, d)
    with torch.no_grad():
        full = model.embed(tiny_store.batch(tiny_store.indices(row_users)), row_queries).numpy()
    assert got.shape == (12, model.config.embed_dim) and np.abs(got - full).max() <= 1e-5
    with pytest.raises(ValueError, match="2 user ids for 1 queries"):
        CachedEmbedder(model, tiny_store).encode_pairs(users[:2], QUERIES[:1])


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


def test_prompt_after_a_cached_query_equals_full(tiny_model, tiny_store):
    """Layout prefix, query, prompt, <user_emb>: the query joins the cache once (rows of different
    prefix lengths, so the extended cache is re-packed), then only prompt + <user_emb> run."""
    from qanchor_lab.embedder import extend_cache

    model = tiny_model.eval()
    users = _mixed_users(tiny_store, model, n=6)
    prompt = torch.randn(3, model.llm.get_input_embeddings().weight.shape[1]) * 0.02
    batch = tiny_store.batch(tiny_store.indices(users))
    queries = [QUERIES[i % 2] for i in range(len(users))]                            # two query lengths
    with torch.no_grad():
        full = model.embed(batch, queries, prompt=prompt, prompt_after_query=True)
        cache = extend_cache(model, build_prefix_cache(model, batch), queries)
        assert torch.equal(cache.lengths, build_prefix_cache(model, batch).lengths + model.make_suffix(queries).mask.sum(1) - 1)
        assert cache.mask[:, 0].all() and (cache.mask.sum(1) == cache.lengths).all()  # packed to the front
        cached = run_cached(model, cache.select(torch.arange(len(users) - 1, -1, -1)),
                            model.make_suffix([""] * len(users), n_prompt=3), prompt)
        shortest = int(cache.lengths.argmin())                                         # select() trims to its length
        alone = run_cached(model, cache.select(torch.tensor([shortest])), model.make_suffix([""], n_prompt=3), prompt)
    assert (full - cached.flip(0)).abs().max() <= 1e-5
    assert (full[shortest] - alone[0]).abs().max() <= 1e-5


def test_adapter_after_query_trains_on_the_same_loss_as_full(tiny_model, tiny_store):
    model = tiny_model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    users = _mixed_users(tiny_store, model, n=8)
    batch = tiny_store.batch(tiny_store.indices(users))
    cfg = PromptTuningConfig(n_prompt=3, prompt_position="after_query")
    adapter = _adapter(model, cfg)
    with torch.no_grad():
        adapter.prompt.normal_(0, 0.02)
        adapter.prototypes.normal_()
    labels = torch.as_tensor(np.arange(len(users)) % 2)
    kw = dict(temperature=cfg.temperature, prototype_class=adapter.prototype_class)
    task_cache = adapter.task_cache(model, build_prefix_cache(model, batch))
    assert adapter.suffix_text() == ""                                               # the query is in the cache
    cached = prototype_loss(adapter.embed(model, task_cache, task_cache=True), adapter.prototypes, labels, **kw)
    cached.backward()
    g_cached = adapter.prompt.grad.clone()
    adapter.zero_grad()
    full = prototype_loss(model.embed(batch, [QUERIES[0]] * len(users), prompt=adapter.prompt, prompt_after_query=True),
                          adapter.prototypes, labels, **kw)
    full.backward()
    assert abs(cached.item() - full.item()) <= 1e-4
    assert torch.allclose(g_cached, adapter.prompt.grad, atol=1e-4)


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
    # a lone string is one query or one user, not one per character; no queries is named, not a tokenizer error
    with pytest.raises(TypeError, match="queries must be a list of strings, not a single string"):
        tiny_model.encode(tiny_store, QUERIES[0], user_ids=tiny_store.user_ids[:2])
    with pytest.raises(TypeError, match="user_ids must be a list of strings, not a single string"):
        tiny_model.encode(tiny_store, QUERIES[:1], user_ids=tiny_store.user_ids[0])
    with pytest.raises(ValueError, match="queries is empty"):
        tiny_model.encode(tiny_store, [], user_ids=tiny_store.user_ids[:2])
    assert tiny_model.encode(tiny_store, QUERIES[:1], user_ids=[]).shape == (0, 1, tiny_model.config.embed_dim)
    assert CachedEmbedder(tiny_model, tiny_store).encode_pairs([], []).shape == (0, tiny_model.config.embed_dim)


def test_model_encode_on_a_world_names_users_it_does_not_hold(tiny_model, small_world):
    test = small_world.users_in("test")[:2]
    assert tiny_model.encode(small_world, QUERIES[:1], user_ids=test).shape == (2, 1, tiny_model.config.embed_dim)
    again = tiny_model.encode(small_world, QUERIES[:1], user_ids=[test[0], test[1], test[0]])   # a user asked twice
    np.testing.assert_allclose(again[2], again[0], atol=1e-6)
    # a typo would otherwise be embedded from no behaviour at all
    with pytest.raises(KeyError, match=r"1 user id\(s\) not in the world's users table, e.g. \['u_typo'\]"):
        tiny_model.encode(small_world, QUERIES[:1], user_ids=test + ["u_typo"])


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


def test_tune_task_learns_a_separable_signal_and_round_trips(tiny_model, tiny_store, tmp_path):
    model = tiny_model.eval()
    cache, labels = searchers(model, tiny_store)
    trainable = [p.requires_grad for p in model.parameters()]
    frozen = []   # read while the prompt trains
    result = tune_task(model, cache, labels, "does this user search", PromptTuningConfig(n_prompt=2, epochs=8, patience=3, seed=1),
                       on_epoch=lambda record, adapter: frozen.append(not any(p.requires_grad for p in model.parameters())))
    assert result.val_auc > 0.7
    assert 0 <= result.best_epoch <= 8 and len(result.history) >= result.best_epoch + 1
    assert result.history[0]["epoch"] == 0  # the initialisation is a candidate too
    scores = result.adapter.score(model, cache)
    # the default read-out is the base method's probe, fitted on the tuned embeddings of the tune users
    assert result.adapter.config.readout == "probe"
    with torch.no_grad():
        tuned = result.adapter.embed(model, cache).numpy()
    np.testing.assert_allclose(scores, probe_scores(tuned, labels, tuned), atol=1e-5)
    path = result.adapter.save(tmp_path / "task")
    again = TaskAdapter.load(path).score(model, cache)
    assert np.allclose(scores, again, atol=1e-6)
    assert frozen and all(frozen)                                             # backbone and encoder frozen while it tunes,
    assert [p.requires_grad for p in model.parameters()] == trainable and any(trainable)   # then as they were


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU machine, not CI)")
def test_tune_task_runs_where_the_model_is(tiny_model, tiny_store, tmp_path):
    """Prompt tuning of a model on a GPU: the adapter is made on the model's device, every read-back to numpy
    goes through the CPU, and the saved adapter scores the same users on the CPU as it did on the GPU."""
    import copy

    from sklearn.metrics import roc_auc_score

    cfg = PromptTuningConfig(n_prompt=2, epochs=4, patience=2, normalize="whiten", seed=1)
    cpu = tiny_model.eval()
    cache, labels = searchers(cpu, tiny_store)
    gpu = copy.deepcopy(cpu).to("cuda")
    gpu_cache, _ = searchers(gpu, tiny_store)
    result = tune_task(gpu, gpu_cache, labels, "does this user search", cfg)
    assert {p.device.type for p in result.adapter.parameters()} == {"cuda"}
    scores = result.adapter.score(gpu, gpu_cache)                                 # numpy, from the GPU
    assert result.val_auc > 0.7 and roc_auc_score(labels, scores) > 0.7
    again = TaskAdapter.load(result.adapter.save(tmp_path / "task")).score(cpu, cache)
    np.testing.assert_allclose(again, scores, atol=1e-3)


def test_adapter_readouts_and_an_adapter_saved_before_the_probe_readout(tmp_path):
    import json

    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    emb, labels = torch.randn(60, 4), np.r_[np.ones(30), np.zeros(30)].astype(int)
    emb[labels == 1, 0] += 1.0
    protos = TaskAdapter(2, 8, 4, 2, 1, "q", PromptTuningConfig(readout="prototypes"))
    protos.prototypes.data.normal_()
    assert torch.allclose(protos.class_probs(emb), protos.prototype_probs(emb))
    probe = TaskAdapter(2, 8, 4, 2, 1, "q", PromptTuningConfig())
    probe.prototypes.data.copy_(protos.prototypes.data)
    probe.fit_probe(emb, labels)
    np.testing.assert_allclose(probe.class_probs(emb)[:, 1].numpy(), probe_scores(emb.numpy(), labels, emb.numpy()), atol=1e-5)
    assert not torch.allclose(probe.class_probs(emb), probe.prototype_probs(emb))
    # an adapter saved before the probe read-out existed: no probe tensors, no readout key -> prototypes
    path = protos.save(tmp_path / "old")
    save_file({k: v for k, v in load_file(path).items() if not k.startswith("probe_")}, path)
    meta = json.loads(path.with_suffix(".json").read_text())
    del meta["config"]["readout"]
    path.with_suffix(".json").write_text(json.dumps(meta))
    old = TaskAdapter.load(path)
    assert old.config.readout == "prototypes" and torch.allclose(old.class_probs(emb), protos.class_probs(emb))
    # a probe adapter must carry its probe
    path = probe.save(tmp_path / "new")
    save_file({k: v for k, v in load_file(path).items() if k != "probe_coef"}, path)
    with pytest.raises(ValueError, match="probe_coef"):
        TaskAdapter.load(path)


def test_tune_task_rejects_single_class_labels(tiny_model, tiny_store):
    cache = build_prefix_cache(tiny_model.eval(), tiny_store.batch([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="both classes"):
        tune_task(tiny_model, cache, np.zeros(4), "q")
    # one positive: nothing left to fit its prototypes on once one is held out (k-means of 0 clusters, before)
    with pytest.raises(ValueError, match=r"task 'q': 1 user\(s\) with label 1; prompt tuning needs at least 2 of each"):
        tune_task(tiny_model, cache, np.array([0, 0, 0, 1]), "q")


def test_adapters_of_task_ids_with_dots_are_saved_apart(tmp_path):
    from qanchor_lab.explorer import load_adapters

    for task_id in ("ctr.v1", "ctr.v2"):
        TaskAdapter(2, 8, 4, 2, 1, f"query of {task_id}", PromptTuningConfig(readout="prototypes")).save(
            tmp_path / task_id)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctr.v1.json", "ctr.v1.safetensors", "ctr.v2.json",
                                                          "ctr.v2.safetensors"]
    assert {t: a.query for t, a in load_adapters(tmp_path).items()} == {"ctr.v1": "query of ctr.v1",
                                                                        "ctr.v2": "query of ctr.v2"}
    assert TaskAdapter.load(tmp_path / "ctr.v1").query == "query of ctr.v1"      # with or without the suffix


def _adapter(model, cfg):
    H = model.llm.get_input_embeddings().weight.shape[1]
    return TaskAdapter(cfg.n_prompt, H, model.config.embed_dim, 2, cfg.prototypes_per_class, QUERIES[0], cfg)


@pytest.mark.parametrize("mode", ["none", "center", "whiten"])
def test_fit_normalization_centres_and_whitens(tiny_model, mode):
    cfg = PromptTuningConfig(n_prompt=2, normalize=mode, shrinkage=0.0)
    adapter = _adapter(tiny_model, cfg)
    d = tiny_model.config.embed_dim
    g = torch.Generator().manual_seed(0)
    emb = torch.randn(4 * d, d, generator=g) @ torch.randn(d, d, generator=g) + 3.0   # correlated, off-centre
    adapter.fit_normalization(emb)
    feats = adapter.features(emb).double()
    if mode == "none":
        assert torch.equal(adapter.features(emb), emb)
        return
    assert feats.mean(0).abs().max() < 1e-4
    if mode == "whiten":
        cov = feats.T @ feats / (len(feats) - 1)
        assert (cov - torch.eye(d, dtype=cov.dtype)).abs().max() < 1e-3
    else:
        assert torch.allclose(feats, (emb - emb.mean(0)).double(), atol=1e-5)


def test_whitening_shrinkage_keeps_a_rank_deficient_covariance_invertible(tiny_model):
    adapter = _adapter(tiny_model, PromptTuningConfig(n_prompt=2, shrinkage=0.1))
    emb = torch.randn(8, tiny_model.config.embed_dim)                                  # fewer rows than dims
    adapter.fit_normalization(emb)
    assert torch.isfinite(adapter.whiten).all() and torch.linalg.matrix_rank(adapter.whiten) == emb.shape[1]


def test_query_prompt_init_uses_the_query_token_embeddings(tiny_model):
    from qanchor_lab.prompt_tuning import _init_prompt

    ids = tiny_model.tokenizer(QUERIES[0], add_special_tokens=False)["input_ids"]
    n = len(ids) + 2
    prompt = _init_prompt(tiny_model, n, QUERIES[0], "query", torch.Generator().manual_seed(0))
    table = tiny_model.llm.get_input_embeddings().weight
    assert torch.equal(prompt, table[torch.as_tensor((ids * 2)[:n])])


def test_prototype_kmeans_gives_the_same_centres_whatever_the_callers_thread_limits():
    """k-means at two OpenMP threads sums in another order than at one; the prototypes' k-means keeps to one, so a
    caller's limits (or which OpenMP runtime scikit-learn bound: docs/design.md §7.53) cannot move them."""
    from threadpoolctl import threadpool_limits

    from qanchor_lab.prompt_tuning import _kmeans_centres

    x = np.random.default_rng(0).standard_normal((1000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)                                # unit rows, as the prototypes see
    got = {}
    for threads in (2, 1):
        with threadpool_limits(limits=threads):
            got[threads] = _kmeans_centres(x, 4, seed=7)
    assert got[1].shape == (4, 64) and np.array_equal(got[1], got[2])


def test_head_phase_lowers_the_prototype_loss_on_fixed_embeddings(tiny_model):
    from qanchor_lab.prompt_tuning import _fit_head

    cfg = PromptTuningConfig(n_prompt=2, head_epochs=30)
    adapter = _adapter(tiny_model, cfg)
    g = torch.Generator().manual_seed(0)
    labels = np.arange(200) % 2
    emb = torch.randn(200, tiny_model.config.embed_dim, generator=g)
    emb[:, 0] += torch.as_tensor(labels, dtype=torch.float32)                      # class signal on one axis
    adapter.fit_normalization(emb)
    with torch.no_grad():
        adapter.prototypes.normal_(generator=g)
    kw = dict(temperature=cfg.temperature, prototype_class=adapter.prototype_class)
    before = prototype_loss(adapter.features(emb), adapter.prototypes, torch.as_tensor(labels), **kw).item()
    _fit_head(adapter, emb, labels, torch.ones(2), np.random.default_rng(0))
    after = prototype_loss(adapter.features(emb), adapter.prototypes, torch.as_tensor(labels), **kw).item()
    assert after < before - 0.1


@pytest.mark.parametrize("bad, match", [(dict(normalize="zscore"), "none, center, standardize, whiten|'none', 'center', 'standardize', 'whiten'"),
                                        (dict(prompt_init="vocab"), "random_words"),
                                        (dict(readout="logistic"), "prototypes', 'probe"),
                                        (dict(shrinkage=1.5), "shrinkage"),
                                        (dict(head_epochs=-1), "head_epochs"),
                                        (dict(lr=-0.01), "lr and head_lr must be > 0"),
                                        (dict(head_lr=0.0), "lr and head_lr must be > 0")])
def test_prompt_tuning_config_names_the_valid_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        PromptTuningConfig(**bad)


@pytest.mark.slow
def test_refit_trains_on_every_tune_user_for_the_chosen_epochs(tiny_model, tiny_store):
    model = tiny_model.eval()
    cache, labels = searchers(model, tiny_store)
    cfg = PromptTuningConfig(n_prompt=2, epochs=3, patience=3, seed=1, prompt_position="after_query", refit=False,
                             normalize="center")  # a normalisation fitted on users, to tell which users it saw
    plain = tune_task(model, cache, labels, "does this user search", cfg)
    refit = tune_task(model, cache, labels, "does this user search", replace(cfg, refit=True))
    assert refit.best_epoch == plain.best_epoch                                     # same selection
    assert [h["val_auc"] for h in refit.history] == [h["val_auc"] for h in plain.history]
    # the refitted normalisation comes from every tune user, not only the training share
    assert not torch.equal(refit.adapter.center, plain.adapter.center)
    if refit.best_epoch == 0:                                                         # prompt still at its start
        with torch.no_grad():
            assert torch.allclose(refit.adapter.center, refit.adapter.embed(model, cache).mean(0), atol=1e-5)


def test_a_cache_built_in_chunks_holds_each_users_prefix_and_walks_in_chunks(tiny_model, tiny_store):
    from qanchor_lab.embedder import build_prefix_cache_in_chunks

    model = tiny_model.eval()
    users = _mixed_users(tiny_store, model)
    whole = build_prefix_cache(model, tiny_store.batch(tiny_store.indices(users)))
    chunked = build_prefix_cache_in_chunks(model, tiny_store, users, chunk=3)       # chunks of 3, 3, 2 users
    assert len(chunked) == len(users) and torch.equal(chunked.lengths, whole.lengths)
    assert torch.equal(chunked.mask, whole.mask)
    for k, ref in zip(chunked.keys + chunked.values, whole.keys + whole.values):   # (B, kv, P, hd), real positions
        assert torch.allclose(k.transpose(1, 2)[whole.mask], ref.transpose(1, 2)[whole.mask], atol=1e-5)
    parts = list(chunked.chunks(3))
    assert [len(p) for p in parts] == [3, 3, 2]
    assert torch.equal(torch.cat([p.lengths for p in parts]), chunked.lengths)
    picked = list(chunked.chunks(2, np.array([5, 0, 0])))                          # rows in order, repeats allowed
    assert [p.lengths.tolist() for p in picked] == [chunked.lengths[[5, 0]].tolist(), chunked.lengths[[0]].tolist()]


@pytest.mark.filterwarnings("ignore:for .* copying from a non-meta parameter:UserWarning")   # the test's CPU reader
def test_an_adapter_loads_onto_the_device_asked_for(tmp_path, monkeypatch):
    """Both halves: the tensors are read onto the device and the adapter is built there (load_state_dict copies
    into the module's own tensors, so reading alone would leave a CPU-built adapter on the CPU). safetensors
    cannot read onto "meta", so the test's reader reads on the CPU and records where it was asked to read."""
    import qanchor_lab.prompt_tuning as prompt_tuning

    path = TaskAdapter(2, 8, 4, 2, 1, "q", PromptTuningConfig()).save(tmp_path / "task")
    asked, read = [], prompt_tuning.load_file
    monkeypatch.setattr(prompt_tuning, "load_file", lambda p, device="cpu": asked.append(device) or read(p))
    adapter = TaskAdapter.load(path, device="meta")
    assert asked == ["meta"]
    assert {t.device.type for t in [*adapter.parameters(), *adapter.buffers()]} == {"meta"}
    assert {t.device.type for t in TaskAdapter.load(path).parameters()} == {"cpu"}    # the default


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the GPU machine, not CI)")
def test_an_adapter_loads_onto_the_gpu(tmp_path):
    path = TaskAdapter(2, 8, 4, 2, 1, "q", PromptTuningConfig()).save(tmp_path / "task")
    adapter = TaskAdapter.load(path, device=torch.device("cuda"))
    assert {t.device.type for t in [*adapter.parameters(), *adapter.buffers()]} == {"cuda"}
