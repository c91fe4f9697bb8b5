"""Representation-quality switches: intent batches, claim-level false negatives, input scaling, tabular tokens,
question-conditioned reconstruction, and pre-training on a world too small for the default retrieval check."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from qanchor_lab.pretrain import PretrainConfig, epoch_order, make_pairs
from qanchor_lab.world import INTENTS, answer_claims
from tests.conftest import tiny_config


def test_answer_claims_group_paraphrased_answers_and_fall_back_to_text():
    it = INTENTS["late_fees"]
    none_a, none_b = it.answers["none"][:2]
    qa = pd.DataFrame({"intent": ["late_fees", "late_fees", "late_fees", "custom"],
                       "answer": [none_a, none_b, it.answers["many"][0], "my own words"]})
    claims = answer_claims(qa)
    assert claims[0] == claims[1] == "late_fees|none"
    assert claims[2] == "late_fees|many"
    assert claims[3] == "custom|my own words"


def test_claim_false_negatives_share_ids_across_wordings(small_world, tiny_store):
    qa = small_world.qa
    text = make_pairs(qa, tiny_store, false_negatives="answer_text")
    claim = make_pairs(qa, tiny_store, false_negatives="claim")
    assert len(np.unique(claim.answer_ids)) < len(np.unique(text.answer_ids))
    # same answer text -> same claim id, and every claim id is one (intent, claim)
    keys = answer_claims(qa[qa["user_id"].isin(tiny_store.index)])
    for k in np.unique(claim.answer_ids)[:50]:
        assert len(set(keys[claim.answer_ids == k])) == 1


def test_text_or_claim_masks_pair_by_pair_where_claim_joins_groups(tiny_store):
    """A short text shared across intents ("No." for late fees and for groceries) links claims: "claim" joins all
    three rows into one group, "text_or_claim" masks only the pairs that share a text or a claim."""
    from qanchor_lab.losses import shared_ids

    users = tiny_store.user_ids[:3]
    qa = pd.DataFrame({"user_id": users, "intent": ["late_fees", "late_fees", "groceries"],
                       "answer": [INTENTS["late_fees"].answers["none"][0], "No.", "No."],
                       "query": ["Has this user paid any late fees?"] * 2 + ["Does this user buy groceries?"],
                       "source": ["future"] * 3})
    joined = make_pairs(qa, tiny_store, false_negatives="claim").answer_ids
    assert len(set(joined.tolist())) == 1
    pairwise = make_pairs(qa, tiny_store, false_negatives="text_or_claim").answer_ids
    assert pairwise.shape == (3, 2)
    mask = shared_ids(torch.as_tensor(pairwise), torch.as_tensor(pairwise)).numpy()
    assert mask[0, 1] and mask[1, 2] and not mask[0, 2]   # same claim; same text; neither


def test_intent_batches_hold_few_intents_and_cover_every_row(small_world, tiny_store):
    cfg = PretrainConfig(batch_size=16, batching="intent", intents_per_batch=4, seed=3)
    pairs = make_pairs(small_world.qa, tiny_store)
    order = epoch_order(pairs, cfg, epoch=0, global_batch=16)
    assert sorted(order.tolist()) == list(range(len(pairs)))  # a permutation: nothing skipped or repeated
    steps = len(pairs) // 16
    n_intents = [len(np.unique(pairs.intent_ids[order[k * 16:(k + 1) * 16]])) for k in range(steps)]
    # all but the batches made of intents' leftover rows hold exactly 4 intents
    assert np.mean(np.array(n_intents) <= 4) > 0.8
    rand = epoch_order(pairs, replace(cfg, batching="random"), epoch=0, global_batch=16)
    n_rand = [len(np.unique(pairs.intent_ids[rand[k * 16:(k + 1) * 16]])) for k in range(steps)]
    assert np.mean(n_rand) > np.mean(n_intents) + 4
    assert np.array_equal(order, epoch_order(pairs, cfg, epoch=0, global_batch=16))   # deterministic
    assert not np.array_equal(order, epoch_order(pairs, cfg, epoch=1, global_batch=16))


def test_answer_set_candidates_cover_every_wording_of_the_batch_intents(small_world, tiny_store):
    from qanchor_lab.pretrain import make_step_batch

    qa = small_world.qa[small_world.qa["user_id"].isin(tiny_store.index)]
    pairs = make_pairs(qa, tiny_store)
    keys = answer_claims(qa)
    # one candidate per distinct (intent, wording), its claim id the rows' claim id
    distinct = {(i, a) for i, a in zip(pairs.intent_ids.tolist(), pairs.answers)}
    assert len(pairs.candidate_texts) == len(distinct)
    assert set(zip(pairs.candidate_intent.tolist(), pairs.candidate_texts)) == distinct
    claim_of_row = {(i, a): c for i, a, c in zip(pairs.intent_ids.tolist(), pairs.answers, pairs.claim_ids.tolist())}
    assert all(claim_of_row[(i, t)] == c for i, t, c in
               zip(pairs.candidate_intent.tolist(), pairs.candidate_texts, pairs.candidate_claim.tolist()))
    for c in np.unique(pairs.claim_ids)[:50]:                  # a claim id is one (intent, claim) of the world
        assert len(set(keys[pairs.claim_ids == c])) == 1
    rows = np.arange(0, len(pairs), max(1, len(pairs) // 12))[:12]
    batch = make_step_batch(pairs, rows, tiny_store)
    aset = batch.answer_set
    assert np.array_equal(aset.row_intent, pairs.intent_ids[rows]) and np.array_equal(aset.row_claim, pairs.claim_ids[rows])
    wanted = {(i, t) for i, t in zip(pairs.candidate_intent.tolist(), pairs.candidate_texts) if i in set(aset.row_intent.tolist())}
    assert set(zip(aset.candidate_intent.tolist(), aset.texts)) == wanted and len(aset.texts) == len(wanted)
    # each row's own candidate: its answer's wording under its intent
    assert [aset.texts[k] for k in aset.row_candidate] == batch.answers
    assert np.array_equal(aset.candidate_intent[aset.row_candidate], aset.row_intent)


def test_one_answer_tower_pass_serves_the_contrastive_and_answer_set_terms(small_world, tiny_model, monkeypatch):
    from dataclasses import replace as dc_replace

    from qanchor_lab.pretrain import PretrainStep, make_step_batch, step_forward

    store = tiny_model.behaviour(small_world.events, small_world.profiles, small_world.users_in("pretrain")[:16])
    pairs = make_pairs(small_world.qa, store)
    batch = make_step_batch(pairs, np.arange(min(16, len(pairs))), store)
    two_passes = dc_replace(batch, answer_set=batch.answer_set._replace(row_candidate=None))
    module = PretrainStep(tiny_model, PretrainConfig(reconstruction=0.0, seed=3))
    calls, embed = [], tiny_model.embed_answers
    monkeypatch.setattr(tiny_model, "embed_answers", lambda texts: calls.append(len(texts)) or embed(texts))
    with torch.no_grad():
        one = step_forward(module, batch, 10.0)
        assert calls == [len(batch.answer_set.texts)]           # the candidates only: the rows' answers are among them
        two = step_forward(module, two_passes, 10.0)
    assert calls[1:] == [len(batch), len(batch.answer_set.texts)]
    for name in ("loss", "contrastive", "answer_set"):
        assert torch.allclose(getattr(one, name), getattr(two, name), atol=1e-5), name


def test_answer_set_term_adds_to_the_loss_and_trains_the_answer_tower(small_world, tiny_model):
    from qanchor_lab.pretrain import PretrainStep, make_step_batch, step_forward

    users = small_world.users_in("pretrain")[:16]
    store = tiny_model.behaviour(small_world.events, small_world.profiles, users)
    pairs = make_pairs(small_world.qa, store)
    batch = make_step_batch(pairs, np.arange(min(16, len(pairs))), store)
    off = PretrainConfig(reconstruction=0.0, answer_set=0.0, seed=3)
    on = replace(off, answer_set=2.0)
    with torch.no_grad():
        base = step_forward(PretrainStep(tiny_model, off), batch, 10.0)
        full = step_forward(PretrainStep(tiny_model, on), batch, 10.0)
    assert float(base.answer_set) == 0.0 and full.answer_set > 0
    assert torch.isclose(full.loss, base.loss + 2.0 * full.answer_set)
    assert torch.isclose(full.contrastive, base.contrastive) and full.parts()["answer_set"] == float(full.answer_set)
    # the term's gradient reaches the model: the total's gradient changes when it is switched on
    grads = {}
    for name, cfg in (("off", off), ("on", on)):
        tiny_model.zero_grad(set_to_none=True)
        step_forward(PretrainStep(tiny_model, cfg), batch, 10.0).loss.backward()
        grads[name] = torch.cat([p.grad.flatten() for p in tiny_model.head.parameters()])
    assert not torch.allclose(grads["on"], grads["off"])
    tiny_model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="answer_set must be >= 0"):
        PretrainConfig(answer_set=-1.0)
    # a contrastive term: switched off with the contrastive loss
    with torch.no_grad():
        no_cl = step_forward(PretrainStep(tiny_model, replace(on, use_contrastive=False)), batch, 10.0)
    assert float(no_cl.answer_set) == 0.0 and float(no_cl.contrastive) == 0.0


def test_pretrain_config_names_valid_choices():
    with pytest.raises(ValueError, match="'random', 'intent'"):
        PretrainConfig(batching="grouped")
    with pytest.raises(ValueError, match="'answer_text', 'claim', 'text_or_claim'"):
        PretrainConfig(false_negatives="text")
    with pytest.raises(ValueError, match="intents_per_batch must be >= 1"):
        PretrainConfig(batching="intent", intents_per_batch=0)
    PretrainConfig(batch_size=2)  # fewer rows than intents per batch: rows of one intent just stop sitting together
    # the optional settings (default None) take a number of their kind, named when not
    for bad, message in ((dict(lr="fast"), "lr must be None or a number > 0, got 'fast'"), (dict(lr=0), "lr must be"),
                         (dict(margin=-0.1), "margin must be None or a number >= 0"),
                         (dict(max_steps=0), "max_steps must be None or an integer >= 1, got 0"),
                         (dict(max_steps=2.5), "max_steps must be None or an integer"),
                         (dict(save_every=True), "save_every must be None or an integer >= 1, got True")):
        with pytest.raises(ValueError, match=message):
            PretrainConfig(**bad)
    assert PretrainConfig(lr=1e-3, margin=0.0, max_steps=np.int64(5), save_every=10).max_steps == 5


def test_split_event_norm_rescales_text_and_numbers_and_zeroes_padding(small_world, tiny_store):
    from qanchor_lab.model import QAnchorModel

    w = small_world
    model = QAnchorModel.from_data(tiny_config(event_norm="split"), w.events, w.profiles, w.users_in("pretrain"))
    enc = model.encoder
    assert torch.all(enc.numeric_std != 1.0)                        # fitted on the reference users' events
    batch = tiny_store.batch(list(range(64)))
    m = model.config.modalities[0]
    x, mask = batch.events[m], batch.masks[m]
    y = enc.normalize_events(x, mask)
    text = y[..., : enc.text_dim][mask]
    assert torch.allclose(text.pow(2).mean(-1), torch.ones(len(text)), atol=1e-4)     # unit RMS text
    num = y[..., enc.text_dim:][mask]
    assert num.std(0).min() > 0.3 and num.abs().mean() < 3          # standardised, not log-amounts of ~5
    assert torch.all(y[~mask] == 0)
    raw = QAnchorModel.from_data(tiny_config(event_norm="none"), w.events, w.profiles, w.users_in("pretrain")).encoder
    assert torch.equal(raw.normalize_events(x, mask), x)


def test_split_tabular_tokens_differ_and_prefix_cache_stays_exact(small_world, tiny_store):
    from qanchor_lab.embedder import CachedEmbedder
    from qanchor_lab.model import QAnchorModel

    w = small_world
    model = QAnchorModel.from_data(tiny_config(event_norm="split", tabular_mode="split", tabular_slots=4),
                                   w.events, w.profiles, w.users_in("pretrain")).eval()
    batch = tiny_store.batch(list(range(8)))
    with torch.no_grad():
        tab = model.encoder(batch).tabular                           # (B, 4, H)
        assert tab.shape[1] == 4
        # distinct projections, not one token plus slot offsets
        base = tab - model.encoder.tabular_slot * model.encoder.embed_scale
        assert (base[:, 0] - base[:, 1]).abs().max() > 1e-3
        users = tiny_store.user_ids[:8]
        queries = ["Will this user borrow money next month?", "Is this user a big spender?"]
        cached = CachedEmbedder(model, tiny_store).encode(users, queries)          # (8, 2, d)
        full = torch.stack([model.embed(batch, [q] * 8) for q in queries], 1).numpy()
    assert np.abs(cached - full).max() <= 1e-5


@pytest.mark.slow
def test_a_400_user_world_pretrains_and_runs_retrieval(tmp_path):
    """Pre-training and the retrieval check at any world size (fewer candidates, said in the result)."""
    from qanchor_lab.model import QAnchorModel
    from qanchor_lab.pretrain import pretrain
    from qanchor_lab.retrieval import answer_retrieval
    from qanchor_lab.world import WorldConfig, generate_world

    w = generate_world(WorldConfig(n_users=400, seed=3))
    model = QAnchorModel.from_data(tiny_config(), w.events, w.profiles, w.users_in("pretrain"))
    cfg = PretrainConfig(epochs=1.0, batch_size=16, max_steps=3, batching="intent", intents_per_batch=4,
                         false_negatives="claim", margin=None)
    summary = pretrain(model, w, cfg, tmp_path / "run", show_progress=False)
    assert summary["steps"] == 3
    r = answer_retrieval(model, w, max_pairs=50)
    val = w.qa[w.qa["user_id"].isin(w.users_in("pretrain_val"))]
    n_answers = val["answer"].nunique()
    claims = pd.DataFrame({"text": val["answer"].to_numpy(), "claim": answer_claims(val)}).drop_duplicates()
    most_wordings = claims.groupby("claim").size().max()
    # every text but the wordings of the pair's own claim, as many for every pair
    assert n_answers < 100 and n_answers + 1 - most_wordings <= r["n_candidates"] <= n_answers
    assert r["chance_top1"] == pytest.approx(1 / r["n_candidates"])
    assert 0.0 <= r["top1"] <= 1.0


class _Rows:
    """A behaviour store stand-in for answer_retrieval: a user batch is the user ids themselves."""

    def indices(self, user_ids):
        return list(user_ids)

    def batch(self, user_ids):
        return user_ids


class _Scorer:
    """A model stand-in for answer_retrieval: fixed vectors per (user, query) anchor and per answer text."""

    def __init__(self, anchor, answer):
        self.anchor, self.answer = anchor, answer

    def eval(self):
        return self

    def embed(self, users, queries):
        return torch.stack([self.anchor(u, q) for u, q in zip(users, queries)])       # (B, d)

    def embed_answers(self, answers):
        return torch.stack([self.answer(a) for a in answers])                          # (B, d)


def _claim_oracle(world, split="pretrain_val"):
    """(scorer, texts per claim) where every anchor is its claim's one-hot vector and every answer text the
    normalised sum of the claims it states, plus small noise: an embedding that knows each user's claim and
    nothing of the wording, what claim masking trains for."""
    qa = world.qa[world.qa["user_id"].isin(set(world.users_in(split)))]
    rows = pd.DataFrame({"text": qa["answer"].to_numpy(), "claim": answer_claims(qa)})
    ids = {c: i for i, c in enumerate(sorted(set(rows["claim"])))}
    g = torch.Generator().manual_seed(0)

    def vector(claims):                                                                # (C,)
        v = F.one_hot(torch.tensor([ids[c] for c in claims]), len(ids)).float().sum(0)
        return v / v.norm() + 0.01 * torch.randn(len(ids), generator=g)

    anchors = {pair: vector([c]) for pair, c in zip(zip(qa["user_id"], qa["query"]), rows["claim"])}
    answers = {text: vector(sorted(set(group))) for text, group in rows.groupby("text")["claim"]}
    return _Scorer(lambda u, q: anchors[u, q], answers.__getitem__), rows.drop_duplicates().groupby("claim").size()


def test_retrieval_leaves_other_wordings_of_the_true_claim_out_of_the_candidates(small_world):
    """Pre-training treats every wording of a claim as the positive: as a candidate, another wording of the true
    answer's claim is no wrong answer, and a claim-perfect embedding must score top-1 = 1 (the earlier sampling
    gave it about 0.8). A QA table without claims leaves out the true text only, as before."""
    from types import SimpleNamespace

    from qanchor_lab.retrieval import answer_retrieval

    oracle, wordings = _claim_oracle(small_world)                                      # texts per claim
    n_texts = small_world.qa.loc[small_world.qa["user_id"].isin(small_world.users_in("pretrain_val")), "answer"].nunique()
    assert wordings.max() > 1                                                          # the case this guards
    r = answer_retrieval(oracle, small_world, store=_Rows())
    assert r["n_candidates"] == 100 and r["top1"] == 1.0
    assert r == answer_retrieval(oracle, small_world, store=_Rows())                  # deterministic for a seed
    # as many candidates as the pair with the fewest wrong answers has (every split row is a pair here)
    everything = answer_retrieval(oracle, small_world, store=_Rows(), n_candidates=10_000, max_pairs=10**6)
    assert everything["n_candidates"] == n_texts + 1 - wordings.max()
    assert everything["chance_top1"] == pytest.approx(1 / everything["n_candidates"])
    no_claims = SimpleNamespace(users_in=small_world.users_in, qa=small_world.qa.drop(columns="intent"))
    assert answer_retrieval(oracle, no_claims, store=_Rows(), n_candidates=10_000)["n_candidates"] == n_texts


def test_retrieval_counts_a_tie_against_the_model(small_world):
    """A collapsed tower gives every candidate the same score: that is no hit, not a perfect one."""
    from qanchor_lab.retrieval import answer_retrieval

    flat = _Scorer(lambda u, q: torch.ones(4), lambda a: torch.ones(4))
    r = answer_retrieval(flat, small_world, store=_Rows(), max_pairs=100)
    assert r["top1"] == 0.0 and r["top5"] == 0.0


def test_grid_batches_ask_every_user_the_same_questions(small_world, tiny_store):
    from qanchor_lab.pretrain import epoch_batches
    from qanchor_lab.world import WorldConfig, generate_world

    w = generate_world(WorldConfig(n_users=300, seed=5, qa_per_user_min=20, qa_per_user_max=20))
    store_users = w.users_in("pretrain")
    from qanchor_lab.model import QAnchorModel
    model = QAnchorModel.from_data(tiny_config(), w.events, w.profiles, store_users)
    store = model.behaviour(w.events, w.profiles, store_users)
    pairs = make_pairs(w.qa, store)
    cfg = PretrainConfig(batch_size=12, batching="grid", intents_per_batch=3, seed=1)
    steps = epoch_batches(pairs, cfg, epoch=0, world_size=2)
    assert len(steps) == len(epoch_batches(pairs, cfg, epoch=1, world_size=2))   # same count every epoch
    seen = np.concatenate([r for s in steps for r in s])
    assert len(seen) == len(np.unique(seen))                                      # no pair twice in an epoch
    for ranks in steps[:40]:
        assert len(ranks) == 2
        rows = np.concatenate(ranks)
        assert 0 < len(rows) <= 24
        assert len(np.unique(pairs.intent_ids[rows])) <= 3                        # the same few questions
        for r in ranks:                                                           # <= 4 users per process
            assert len(np.unique(pairs.user_index[r])) <= 4
        assert not set(pairs.user_index[ranks[0]]) & set(pairs.user_index[ranks[1]])


def test_grid_batching_that_leaves_a_process_without_pairs_fails_before_the_first_step(tmp_path, monkeypatch):
    """A grid block where none of the chosen users answers the chosen intents gives a process no pair (the tokenizer
    then failed, mid-run): pretrain counts such steps over the whole plan, every epoch and every process, and
    refuses to start."""
    import qanchor_lab.pretrain as pt
    from qanchor_lab.model import QAnchorModel
    from qanchor_lab.world import WorldConfig, generate_world

    w = generate_world(WorldConfig(n_users=300, seed=5))                       # 4-8 QA pairs per user of 49 intents
    users = w.users_in("pretrain")
    model = QAnchorModel.from_data(tiny_config(), w.events, w.profiles, users)
    cfg = PretrainConfig(epochs=2.0, batch_size=8, batching="grid", intents_per_batch=4, seed=1)
    pairs = make_pairs(w.qa, model.behaviour(w.events, w.profiles, users), pt.heldout_queries(w.qa, cfg.seed))
    plans = [pt.epoch_batches(pairs, cfg, e) for e in (0, 1)]
    empty = [sum(min(map(len, ranks)) == 0 for ranks in plan) for plan in plans]  # per epoch
    assert empty[0] > 0 and empty[1] > 0

    def no_step(*args, **kwargs):
        raise AssertionError("a training step ran before the grid plan was checked")

    monkeypatch.setattr(pt, "training_step", no_step)
    with pytest.raises(ValueError, match=rf'plans {sum(empty)} of {2 * len(plans[0])} steps .* no QA pair .*'
                                         r'batching="intent"'):
        pt.pretrain(model, w, cfg, tmp_path / "run", show_progress=False)
    # under two processes a step is flagged when either process's share is empty, whatever the other holds
    plan = pt.epoch_batches(pairs, cfg, 0, world_size=2)
    flagged = set(pt.grid_empty_steps(pairs, cfg, len(plan), len(plan), world_size=2).tolist())
    assert flagged == {s + 1 for s, ranks in enumerate(plan) if min(map(len, ranks)) == 0}
    assert any(sum(map(len, plan[s - 1])) >= 2 for s in flagged)


def test_forward_with_shared_prefixes_equals_full_recompute(tiny_model, tiny_store):
    """A user asked several questions runs its prefix once (cached); same anchors, logits and gradients."""
    model = tiny_model.eval()
    users = torch.tensor([0, 0, 0, 3, 3, 7])
    queries = ["Is this user a big spender?", "Does this user invest in funds?", "How active is this user in the app?"] * 2
    answers = ["High: over 5,000 a month.", "No fund purchases are recorded.", "Barely uses the app."] * 2
    full = model(tiny_store.batch(users), queries, answers)
    uniq, rows = torch.unique(users, return_inverse=True)
    shared = model(tiny_store.batch(uniq), queries, answers, user_rows=rows)
    for key in ("anchor", "answer", "lm_logits"):
        assert (full[key] - shared[key]).abs().max() < 1e-5, key
    assert torch.equal(full["lm_targets"], shared["lm_targets"])
    g_full = torch.autograd.grad(full["anchor"].sum(), model.encoder.tabular_mlp[1].weight)[0]
    g_shared = torch.autograd.grad(shared["anchor"].sum(), model.encoder.tabular_mlp[1].weight)[0]
    assert (g_full - g_shared).abs().max() < 1e-5


def test_answer_vocabulary_next_token_loss_is_the_full_loss_renormalised_over_answer_tokens(small_world, tiny_model):
    """lm_vocabulary="answers": the softmax runs over the training answers' tokens and eos only. The loss equals
    the full head's logits restricted to those columns, differs from the full-vocabulary loss, and leaves every
    other term alone."""
    import torch.nn.functional as F

    from qanchor_lab.pretrain import PretrainStep, answer_vocabulary, make_step_batch, step_forward

    users = small_world.users_in("pretrain")[:16]
    store = tiny_model.behaviour(small_world.events, small_world.profiles, users)
    pairs = make_pairs(small_world.qa, store)
    batch = make_step_batch(pairs, np.arange(min(16, len(pairs))), store)
    vocab = answer_vocabulary(tiny_model, pairs.answers)
    tok = tiny_model.tokenizer
    assert torch.equal(vocab, torch.unique(vocab)) and tok.eos_token_id in vocab.tolist()
    used = {t for a in pairs.answers for t in tok(a, add_special_tokens=False)["input_ids"]}
    assert set(vocab.tolist()) == used | {tok.eos_token_id} and len(vocab) < len(tok) // 10

    full_cfg = PretrainConfig(seed=3)
    ans_cfg = replace(full_cfg, lm_vocabulary="answers")
    with torch.no_grad():
        full = step_forward(PretrainStep(tiny_model, full_cfg), batch, 10.0)
        ans = step_forward(PretrainStep(tiny_model, ans_cfg, answers=pairs.answers), batch, 10.0)
        rows = None if batch.user_rows is None else torch.as_tensor(batch.user_rows)
        out = tiny_model(batch.users, batch.queries, batch.answers, user_rows=rows, with_answer_tower=False)
        restricted = out["lm_logits"][:, vocab]                                   # (n, K)
        target_cols = torch.searchsorted(vocab, out["lm_targets"])
        expected = F.cross_entropy(restricted, target_cols, reduction="sum") / 10.0
    assert torch.isclose(ans.ntp, expected, rtol=1e-5)
    assert ans.ntp < full.ntp - 1.0   # a 30k-way softmax is not a few-hundred-way one
    for part in ("contrastive", "reconstruction", "answer_set"):
        assert torch.isclose(getattr(ans, part), getattr(full, part))
    # the restricted head trains the tied embedding rows of answer tokens only
    tiny_model.zero_grad(set_to_none=True)
    cfg = replace(ans_cfg, use_contrastive=False, reconstruction=0.0)
    step_forward(PretrainStep(tiny_model, cfg, answers=pairs.answers), batch, 10.0).loss.backward()
    grad = tiny_model.llm.get_output_embeddings().weight.grad
    tiny_model.zero_grad(set_to_none=True)
    outside = torch.ones(len(grad), dtype=torch.bool)
    outside[vocab] = False
    inputs = torch.unique(torch.cat([tok(list(batch.queries) + list(batch.answers), add_special_tokens=False,
                                         padding=True, return_tensors="pt")["input_ids"].flatten(),
                                     torch.tensor(list(tiny_model.special_token_ids.values()))]))
    outside[inputs] = False    # rows the step reads as inputs get gradient through the input side
    assert grad[vocab].abs().sum() > 0 and grad[outside].abs().sum() == 0


def test_answer_vocabulary_errors_are_clear(small_world, tiny_model):
    from qanchor_lab.model import vocab_positions
    from qanchor_lab.pretrain import PretrainStep

    with pytest.raises(ValueError, match="lm_vocabulary='words'; valid choices: 'full', 'answers'"):
        PretrainConfig(lm_vocabulary="words")
    with pytest.raises(ValueError, match="needs the training answers"):
        PretrainStep(tiny_model, PretrainConfig(lm_vocabulary="answers"))
    with pytest.raises(ValueError, match=r"targets \[7\] are not in the restricted vocabulary of 3 tokens"):
        vocab_positions(torch.tensor([2, 5, 9]), torch.tensor([5, 7, 9]))
    assert vocab_positions(torch.tensor([2, 5, 9]), torch.tensor([9, 2, 5])).tolist() == [2, 0, 1]


def test_intent_reconstruction_weights_follow_the_groups_that_predict_each_answer():
    from qanchor_lab.pretrain import PairSet, intent_reconstruction_weights

    rng = np.random.default_rng(0)
    n = 240
    x = rng.normal(size=(n, 6)).astype(np.float32)                        # (U, F)
    groups = ["a", "a", "a", "b", "b", "c"]
    # intent 0 is answered from group a, intent 1 from group b, intent 2 has one claim, intent 3 is noise
    claims = [(x[:, 0] > 0).astype(int), (x[:, 3] + x[:, 4] > 0).astype(int), np.zeros(n, int), rng.integers(0, 2, n)]
    user_index = np.tile(np.arange(n), 4)
    intent_ids = np.repeat(np.arange(4), n)
    claim_ids = np.concatenate([c + 2 * i for i, c in enumerate(claims)])
    pairs = PairSet(user_index, [""] * len(user_index), [""] * len(user_index), claim_ids, intent_ids, claim_ids,
                    [], np.zeros(0, np.int64), np.zeros(0, np.int64))
    w = intent_reconstruction_weights(pairs, x, groups)                       # (I, F)
    assert w.shape == (4, 6) and torch.allclose(w.mean(1), torch.ones(4))  # every row keeps the scale
    by_group = lambda i, g: float(w[i, [j for j, name in enumerate(groups) if name == g]].mean())  # noqa: E731
    assert by_group(0, "a") > 1.8 and by_group(0, "b") < 0.1 and by_group(0, "c") < 0.1
    assert by_group(1, "b") > 2.5 and by_group(1, "a") < 0.1
    assert torch.equal(w[2], torch.ones(6)) and torch.equal(w[3], torch.ones(6))  # nothing to choose: all of it
    base = torch.tensor([0.5, 0.5, 0.5, 1.0, 1.0, 2.5])                     # mean 1, as group_weights
    on_base = intent_reconstruction_weights(pairs, x, groups, base)
    assert torch.allclose(on_base[2:], base.expand(2, -1)) and torch.allclose(on_base.mean(1), torch.ones(4))
    assert torch.allclose(on_base[:2], w[:2] * base / (w[:2] * base).mean(1, keepdim=True))
    assert torch.equal(intent_reconstruction_weights(pairs, x, groups), w)   # deterministic
    with pytest.raises(ValueError, match="5 feature groups for 6 tabular columns"):
        intent_reconstruction_weights(pairs, x, groups[:5])


def test_intent_reconstruction_asks_every_user_the_generic_question(small_world, tiny_model):
    from qanchor_lab.losses import group_weights
    from qanchor_lab.pipeline import GENERIC_QUERY
    from qanchor_lab.pretrain import PretrainStep, intent_reconstruction_weights, make_step_batch, step_forward

    users = small_world.users_in("pretrain")[:400]
    store = tiny_model.behaviour(small_world.events, small_world.profiles, users)
    pairs = make_pairs(small_world.qa, store)
    batch = make_step_batch(pairs, np.arange(16), store)
    groups = tiny_model.feature_spec.feature_groups()
    base = group_weights(groups)
    intent_cfg = PretrainConfig(reconstruction_target="intent", answer_set=0.0, seed=3)
    all_cfg = replace(intent_cfg, reconstruction_target="all")
    with pytest.raises(ValueError, match="reconstruction_target='gen'; valid choices: 'all', 'intent'"):
        PretrainConfig(reconstruction_target="gen")
    with pytest.raises(ValueError, match="needs the per-intent feature weights"):
        PretrainStep(tiny_model, intent_cfg)
    tiny_model.eval()
    with torch.no_grad():
        # with every intent weighing the features as "all" does, the term is the rows' and the users' generic
        # anchors' reconstruction, averaged over both: the generic anchors are each user's embedding under it
        flat = base.expand(int(pairs.intent_ids.max()) + 1, -1)
        step = PretrainStep(tiny_model, intent_cfg, intent_weights=flat)
        out = step_forward(step, batch, 10.0)
        reference = PretrainStep(tiny_model, all_cfg)
        rows = step_forward(reference, batch, 10.0)
        u = store.batch(np.unique(batch.user_index))
        generic = reference.reconstruction(tiny_model.embed(u, [GENERIC_QUERY] * len(u.tabular)), u.tabular)
        n, n_users = len(batch), len(u.tabular)
        assert torch.isclose(out.reconstruction, (n * rows.reconstruction + n_users * generic) / (n + n_users), atol=1e-5)
        assert torch.isclose(out.contrastive, rows.contrastive, atol=1e-5)       # the other terms read the rows alone
        # the weights a row gets are its intent's: other weights, another term
        learned = intent_reconstruction_weights(pairs, store.tabular, groups, base)
        assert not torch.allclose(learned, flat)
        chosen = step_forward(PretrainStep(tiny_model, intent_cfg, intent_weights=learned), batch, 10.0)
        assert not torch.isclose(chosen.reconstruction, out.reconstruction)
        with pytest.raises(ValueError, match="user_queries has 2 queries for 3 users"):
            tiny_model(store.batch([0, 1, 2]), ["a", "b", "c"], ["x", "y", "z"], user_queries=["q", "q"])


def test_pretraining_updates_with_the_fused_adamw(tiny_model):
    from qanchor_lab.pretrain import make_optimizer

    optimizer, _ = make_optimizer(tiny_model, PretrainConfig(), None)
    assert all(group["fused"] for group in optimizer.param_groups)  # one kernel over every tensor (docs/design.md §7.49)
