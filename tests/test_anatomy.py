"""The teaching views (anatomy.py) show what the model computes, and the public pre-training / prompt-tuning
helpers the notebooks call are the very path the trainer and tune_task take."""

from __future__ import annotations

import copy

import numpy as np
import pandas as pd
import pytest
import torch

from qanchor_lab import anatomy as A
from qanchor_lab.features import OutsideWindowWarning
from qanchor_lab.losses import contrastive_loss
from qanchor_lab.model import QAnchorModel
from qanchor_lab.pretrain import (PretrainConfig, PretrainStep, count_answer_tokens, epoch_batches, make_optimizer,
                                  make_pairs, make_step_batch, pretrain, training_step)
from qanchor_lab.prompt_tuning import PromptTuningConfig, TaskAdapter, tune_task
from qanchor_lab.schema import TABULAR_MODALITY
from tests.conftest import searchers, tiny_config


def _decoder_inputs(model, batch, query, prompt=None, prompt_after_query=False):
    """What the backbone's decoder really receives when the model embeds one user: (inputs_embeds, mask)."""
    seen = {}

    def grab(_module, _args, kwargs):
        seen["embeds"], seen["mask"] = kwargs["inputs_embeds"].detach(), kwargs["attention_mask"].detach()

    handle = model.decoder.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            model.embed(batch, [query], prompt=prompt, prompt_after_query=prompt_after_query)
    finally:
        handle.remove()
    return seen["embeds"][0], seen["mask"][0].bool()


def _user_with_all_modalities(store, model):
    batch = store.batch(list(range(80)))
    full = torch.stack([batch.masks[m].any(1) for m in model.config.modalities], 1).all(1)
    return store.user_ids[int(torch.nonzero(full)[0])]


QUERY = "is this user likely to repay the credit bill late next month"


@pytest.mark.parametrize("switches", [{}, {"use_user_token": False, "use_modality_tokens": False}])
def test_described_sequence_is_what_the_decoder_reads(switches, tiny_model, small_world):
    w = small_world
    model = tiny_model if not switches else QAnchorModel.from_data(tiny_config(**switches), w.events, w.profiles,
                                                                     w.users_in("pretrain"))
    model.eval()
    store = model.behaviour(w.events, w.profiles, w.users_in("pretrain")[:80])
    uid = _user_with_all_modalities(store, model)
    table = A.describe_sequence(model, store, uid, QUERY, events=w.events)

    embeds, mask = _decoder_inputs(model, store.batch(store.indices([uid])), QUERY)
    fed = embeds[mask]                                                            # (P+S, H) real positions
    assert len(table) == len(fed) and list(table["position"]) == list(range(len(fed)))
    assert np.allclose(table["norm"], fed.norm(dim=-1).numpy(), atol=1e-5)

    # segment boundaries: the prefix is exactly the packed prefix, <user_emb> is where the model pools
    prefix = model.encode_prefix(store.batch(store.indices([uid])))
    suffix = model.make_suffix([QUERY])
    n_prefix = int(prefix.lengths[0])
    assert (table["segment"] == "prefix").sum() == n_prefix and (table["segment"].iloc[:n_prefix] == "prefix").all()
    assert table.loc[table["part"] == "user_emb", "position"].tolist() == [n_prefix + int(suffix.pool_index[0])]
    assert (table["part"] == "user").sum() == int(model.config.use_user_token)
    assert (table["part"] == "modality").sum() == (len(model.config.modalities) if model.config.use_modality_tokens else 0)
    assert (table["part"] == "tabular").sum() == model.config.tabular_slots

    # event rows carry the texts of the events the store kept, in the store's order
    batch = store.batch(store.indices([uid]))
    events = table[table["part"] == "event"]
    for m in model.config.modalities:
        assert (events["modality"] == m).sum() == int(batch.masks[m].sum())
    kept = A.user_events(model, store, uid, w.events)
    assert events["text"].tolist() == kept["text"].tolist()
    # every modality block is opened and closed around its events, the profile last
    specials = table.loc[table["part"].isin(["start", "end"]), "text"].tolist()
    assert specials == [f"<{m}_{e}>" for m in (*model.config.modalities, TABULAR_MODALITY) for e in ("start", "end")]


def test_described_sequence_places_the_soft_prompt_and_answer(tiny_model, small_world, tiny_store):
    model = tiny_model.eval()
    uid = tiny_store.user_ids[5]
    prompt = torch.randn(3, model.llm.get_input_embeddings().weight.shape[1])
    table = A.describe_sequence(model, tiny_store, uid, QUERY, prompt=prompt)
    embeds, mask = _decoder_inputs(model, tiny_store.batch(tiny_store.indices([uid])), QUERY, prompt=prompt)
    assert np.allclose(table["norm"], embeds[mask].norm(dim=-1).numpy(), atol=1e-5)
    suffix = table[table["segment"] == "suffix"]
    assert suffix["part"].tolist()[:3] == ["prompt"] * 3 and suffix["part"].iloc[3] == "query"

    answered = A.describe_sequence(model, tiny_store, uid, QUERY, answer="Yes, late twice.")
    n_answer = count_answer_tokens(model, ["Yes, late twice."])                     # answer tokens + eos
    assert (answered["part"] == "answer").sum() == n_answer
    assert answered["part"].iloc[-1 - n_answer] == "user_emb"


def test_described_sequence_shows_a_tuned_adapters_prompt_where_it_runs(tiny_model, tiny_store):
    """A tuned adapter runs its prompt after the query (PromptTuningConfig's default): passed as `prompt`, the
    table shows that order, as `prompt_position="after_query"` does for a bare tensor."""
    model = tiny_model.eval()
    uid = tiny_store.user_ids[5]
    H = model.llm.get_input_embeddings().weight.shape[1]
    adapter = TaskAdapter(3, H, model.config.embed_dim, 2, 1, QUERY, PromptTuningConfig(n_prompt=3))
    assert adapter.config.prompt_position == "after_query"
    with torch.no_grad():
        adapter.prompt.copy_(torch.randn(adapter.prompt.shape, generator=torch.Generator().manual_seed(0)))
    embeds, mask = _decoder_inputs(model, tiny_store.batch(tiny_store.indices([uid])), QUERY,
                                   prompt=adapter.prompt.detach(), prompt_after_query=True)
    n_query = len(model.tokenizer(QUERY, add_special_tokens=False)["input_ids"])
    for table in (A.describe_sequence(model, tiny_store, uid, QUERY, prompt=adapter),
                  A.describe_sequence(model, tiny_store, uid, QUERY, prompt=adapter.prompt.detach(),
                                      prompt_position="after_query")):
        assert np.allclose(table["norm"], embeds[mask].norm(dim=-1).numpy(), atol=1e-5)
        parts = table.loc[table["segment"] == "suffix", "part"].tolist()
        assert parts == ["query"] * n_query + ["prompt"] * 3 + ["user_emb"]

    with pytest.raises(ValueError, match="prompt_position must be one of"):
        A.describe_sequence(model, tiny_store, uid, QUERY, prompt=adapter.prompt.detach(), prompt_position="after")
    with pytest.raises(ValueError, match="tuned with its prompt 'after_query'"):
        A.describe_sequence(model, tiny_store, uid, QUERY, prompt=adapter, prompt_position="before_query")
    with pytest.raises(ValueError, match="tuned on the query"):
        A.describe_sequence(model, tiny_store, uid, "another question", prompt=adapter)


def test_user_events_reads_the_models_history_window(small_world):
    """A model whose history window ends before the events table does (a log whose last days are the label
    window) reads the events in its window, so the full table is still the one its store was built from."""
    w = small_world
    cut = w.events["timestamp"].max().normalize() - pd.Timedelta(days=10)
    with pytest.warns(OutsideWindowWarning):                                     # the point: later events are left out
        model = QAnchorModel.from_data(tiny_config(), w.events, w.profiles, w.users_in("pretrain")[:200],
                                       window_end=cut).eval()
    start, end = model.feature_spec.window
    users = w.users_in("pretrain")[:60]
    store = model.behaviour(w.events, w.profiles, users)
    late = w.events[w.events["user_id"].isin(users) & (w.events["timestamp"] >= end)
                    & w.events["modality"].isin(model.config.modalities)]
    uid = late["user_id"].iloc[0]                                                 # has events the window leaves out
    table = A.user_events(model, store, uid, w.events)
    assert len(table) and table["timestamp"].max() < end and table["timestamp"].min() >= start
    inside = w.events[(w.events["timestamp"] >= start) & (w.events["timestamp"] < end)]
    pd.testing.assert_frame_equal(table, A.user_events(model, store, uid, inside))
    seq = A.describe_sequence(model, store, uid, QUERY, events=w.events)
    assert seq.loc[seq["part"] == "event", "text"].tolist() == table["text"].tolist()


def test_label_checks_name_the_expected_count_and_the_missing_labels():
    rng = np.random.default_rng(0)
    view = {"features": rng.normal(size=(40, 8)).astype(np.float32), "prototype_class": np.array([0, 0, 1, 1]),
            "prototypes": rng.normal(size=(4, 8)).astype(np.float32)}
    labels = rng.integers(0, 2, 40).astype(float)
    with_nan = labels.copy()
    with_nan[:5] = np.nan                                                          # 5 users without a label
    for call in (lambda y: A.prototype_separation(view, y), lambda y: A.figure_tuning_pca({"before": view}, y)):
        with pytest.raises(ValueError, match="5 of 40 labels are NaN"):
            call(with_nan)
        with pytest.raises(ValueError, match=r"expected 40 labels.*\(30,\)"):
            call(labels[:30])
        with pytest.raises(ValueError, match="0 or 1"):
            call(np.full(40, 2))
    A.figure_tuning_pca({"before": view}, pd.Series(labels, dtype="Int64"))        # nullable ints without NA: fine


def test_describe_sequence_refuses_labels_that_do_not_match_the_packed_prefix(tiny_model, tiny_store, monkeypatch):
    real = A.prefix_parts
    monkeypatch.setattr(A, "prefix_parts", lambda *a: real(*a)[::-1])  # a layout the model does not use
    with pytest.raises(RuntimeError, match="do not reproduce the packed prefix"):
        A.describe_sequence(tiny_model.eval(), tiny_store, tiny_store.user_ids[0], QUERY)


def test_user_events_names_the_user_when_the_events_table_is_not_the_stores(tiny_model, small_world, tiny_store):
    uid = _user_with_all_modalities(tiny_store, tiny_model)
    ev = small_world.events
    other = ev[ev["user_id"] != uid]
    with pytest.raises(ValueError, match=uid):
        A.user_events(tiny_model, tiny_store, uid, other)
    table = A.user_events(tiny_model, tiny_store, uid, ev)
    assert {"text", "timestamp", "log_amount", "token_norm"} <= set(table.columns)
    # the event tokens arrive at the word-embedding scale whatever the raw vector's size
    assert table["token_norm"].std() < 0.05 * table["token_norm"].mean()


def _batch(model, world, store, config, step=0):
    pairs = make_pairs(world.qa, store, false_negatives=config.false_negatives)
    return pairs, make_step_batch(pairs, epoch_batches(pairs, config, 0)[step][0], store)


@pytest.mark.parametrize("false_negatives", ["claim", "text_or_claim"])
def test_negative_codes_are_the_negatives_the_contrastive_loss_keeps(tiny_model, small_world, false_negatives):
    w = small_world
    store = tiny_model.behaviour(w.events, w.profiles, w.users_in("pretrain"))
    cfg = PretrainConfig(batch_size=16, intents_per_batch=2, seed=1, false_negatives=false_negatives)
    _, batch = _batch(tiny_model, w, store, cfg)
    codes = A.negative_codes(batch)
    assert (np.diag(codes) == 1).all() and (codes == 3).any() and (codes == 0).any()
    # InfoNCE by hand over the pairs coded "negative" equals the library loss with the batch's ids
    g = torch.Generator().manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(len(batch), 8, generator=g), dim=-1)
    p = torch.nn.functional.normalize(torch.randn(len(batch), 8, generator=g), dim=-1)
    lib = contrastive_loss(a, p, temperature=0.1, margin=None, user_ids=torch.as_tensor(batch.user_index),
                           answer_ids=torch.as_tensor(batch.answer_ids))
    keep = torch.as_tensor(codes == 0)
    pos = (a * p).sum(-1) / 0.1
    neg = torch.cat([(a @ a.T), (a @ p.T), (p @ a.T)], 1) / 0.1                 # (N, 3N)
    neg = neg.masked_fill(~keep.repeat(1, 3), float("-inf"))
    by_hand = (torch.logsumexp(torch.cat([pos[:, None], neg], 1), 1) - pos).mean()
    assert torch.allclose(lib, by_hand, atol=1e-5)
    fig = A.figure_negative_codes(codes, batch.intent_ids)
    assert fig.data[0].z.shape == codes.shape


@pytest.mark.slow
def test_hand_steps_reproduce_the_trainer(tiny_model, small_world, tmp_path):
    w = small_world
    cfg = PretrainConfig(epochs=1.0, batch_size=8, max_steps=2, seed=3, lr=3e-3)
    trained, by_hand = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    pretrain(trained, w, cfg, tmp_path, show_progress=False)

    store = by_hand.behaviour(w.events, w.profiles, w.users_in("pretrain"))
    from qanchor_lab.pretrain import heldout_queries

    pairs = make_pairs(w.qa, store, heldout_queries(w.qa, cfg.seed), cfg.false_negatives)
    optimizer, scheduler = make_optimizer(by_hand, cfg, total_steps=2)
    module = PretrainStep(by_hand, cfg).train()
    losses = []
    for rows in epoch_batches(pairs, cfg, 0)[:2]:
        batch = make_step_batch(pairs, rows[0], store)
        out = training_step(module, batch, optimizer, scheduler, ntp_normalizer=count_answer_tokens(by_hand, batch.answers),
                            grad_clip=cfg.grad_clip)
        losses.append(float(out[0]))
    changed = 0
    for (name, p), (_, q), (_, p0) in zip(trained.named_parameters(), by_hand.named_parameters(), tiny_model.named_parameters()):
        assert torch.allclose(p, q, atol=1e-6), name
        changed += not torch.equal(p, p0)
    assert changed > 0                                                           # the steps did update weights
    logged = pd.read_json(tmp_path / "log.jsonl", lines=True)
    assert np.isclose(logged["loss"].iloc[-1], losses[-1], atol=1e-5)


def test_on_epoch_sees_every_selection_epoch_and_leaves_the_result_unchanged(tiny_model, tiny_store):
    model = tiny_model.eval()
    cache, labels = searchers(model, tiny_store, 160)
    cfg = PromptTuningConfig(n_prompt=2, epochs=3, patience=3, head_epochs=5, seed=1)
    snaps = A.AdapterSnapshots(epochs=[0])
    watched = tune_task(model, cache, labels, "does this user search", cfg, on_epoch=snaps)
    plain = tune_task(model, cache, labels, "does this user search", cfg)
    assert snaps.records == watched.history and [r["epoch"] for r in snaps.records] == list(range(len(plain.history)))
    assert [h["val_auc"] for h in watched.history] == [h["val_auc"] for h in plain.history]
    assert torch.equal(watched.adapter.prompt, plain.adapter.prompt)
    assert set(snaps.adapters) == {0}
    start = snaps.adapters[0]
    if watched.best_epoch > 0:                                                   # tuning moved the prompt
        assert not torch.equal(start.prompt, watched.adapter.prompt)

    views = {"before": A.adapter_view(start, model, cache), "after": A.adapter_view(watched.adapter, model, cache)}
    assert views["before"]["features"].shape == (len(labels), model.config.embed_dim)
    assert np.allclose(np.linalg.norm(views["after"]["prototypes"], axis=1), 1, atol=1e-5)
    sep = A.prototype_separation(views["after"], labels)
    flipped = A.prototype_separation(views["after"], 1 - labels)
    assert np.isclose(sep["auc"] + flipped["auc"], 1) and np.isclose(sep["own_class_margin"], -flipped["own_class_margin"])
    fig = A.figure_tuning_pca(views, labels)
    assert len(fig.data) == 8 and [t.marker.symbol for t in fig.data[1::2]] == ["star"] * 4
    # one shared basis: identical inputs land on identical coordinates in both panels
    same = A.figure_tuning_pca({"a": views["before"], "b": views["before"]}, labels)
    assert np.allclose(same.data[0].x, same.data[4].x)


def test_step_at_rates_steps_copies_and_a_zero_rate_changes_nothing(tiny_model, small_world):
    w = small_world
    store = tiny_model.behaviour(w.events, w.profiles, w.users_in("pretrain"))
    cfg = PretrainConfig(batch_size=8, seed=1, lr=3e-3)
    _, batch = _batch(tiny_model, w, store, cfg)
    start = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    table = A.step_at_rates(tiny_model, cfg, batch, shares=(0.0, 1.0))
    assert all(torch.equal(v, start[k]) for k, v in tiny_model.state_dict().items())   # the model is untouched
    assert table["loss before"].nunique() == 1 and list(table["learning rate"]) == [0.0, 3e-3]
    zero, full = table.iloc[0], table.iloc[1]
    assert np.isclose(zero["loss after"], zero["loss before"], atol=1e-6)
    assert not np.isclose(full["loss after"], full["loss before"], atol=1e-4)
