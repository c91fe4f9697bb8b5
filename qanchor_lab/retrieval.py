"""Held-out answer retrieval: does the anchor embedding pick the user's true answer among candidates?

For each held-out (user, query) pair the true answer competes with n-1 distinct other answer texts from
the same split that state another claim: other wordings of the true answer's claim (`world.answer_claims`)
are no wrong answers, pre-training treats them as positives (false-negative masking by claim), so they are
left out; where a QA table carries no claims this leaves out the true text only. n is capped so that every
pair has n-1 such texts (small worlds work); top-1 / top-5 accuracy are reported (chance: 1/n and 5/n),
split by whether the query's wording was seen in training or is a held-out paraphrase. A wrong candidate
scoring as high as the true answer ranks above it (a tie is no hit), so a collapsed tower scores 0, not 1.
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm.auto import tqdm

from qanchor_lab.behaviour import BehaviourStore


@torch.no_grad()
def answer_retrieval(
    model,
    world,
    *,
    split: str = "pretrain_val",
    n_candidates: int = 100,
    max_pairs: int = 600,
    heldout: set[str] | frozenset = frozenset(),
    batch_size: int = 64,
    seed: int = 0,
    store: BehaviourStore | None = None,
    show_progress: bool = False,
) -> dict:
    from qanchor_lab.world import answer_claims

    model.eval()
    users = world.users_in(split)
    split_qa = world.qa[world.qa["user_id"].isin(set(users))].reset_index(drop=True)
    split_claims = answer_claims(split_qa)                                      # (rows,) "intent|claim" of each row
    qa, claims = split_qa, split_claims
    rng = np.random.default_rng(seed)
    if len(qa) > max_pairs:
        keep = np.sort(rng.choice(len(qa), max_pairs, replace=False))
        qa, claims = qa.iloc[keep].reset_index(drop=True), claims[keep]
    pool = np.array(sorted(set(split_qa["answer"])), dtype=object)
    if len(pool) < 2:
        raise ValueError(f"split {split!r} has {len(pool)} distinct answer(s); retrieval needs at least 2")
    pos = {a: i for i, a in enumerate(pool)}
    wrong = _wrong_answers(len(pool), [pos[a] for a in split_qa["answer"]], split_claims, set(claims))
    # A small world has fewer wrong answers than candidates asked for: every pair ranks among as many as the
    # pair with the fewest has (the result's n_candidates and chance_top1 say how many).
    fewest = min(wrong, key=lambda c: len(wrong[c]))
    if len(wrong[fewest]) == 0:
        raise ValueError(f"split {split!r}: every distinct answer states the claim {fewest!r}, so its pairs have "
                         "no wrong candidate; retrieval needs answers of at least 2 claims")
    n_candidates = min(n_candidates, len(wrong[fewest]) + 1)
    store = store or model.behaviour(world.events, world.profiles, users)

    pool_emb = torch.cat([model.embed_answers(list(pool[i:i + batch_size]))
                          for i in range(0, len(pool), batch_size)])                       # (A, d)
    anchors = []
    for i in tqdm(range(0, len(qa), batch_size), desc="retrieval", disable=not show_progress):
        chunk = qa.iloc[i:i + batch_size]
        ub = store.batch(store.indices(chunk["user_id"].tolist()))
        anchors.append(model.embed(ub, chunk["query"].tolist()))
    anchors = torch.cat(anchors)                                                             # (N, d)

    hits1, hits5 = [], []
    for k, (answer, claim) in enumerate(zip(qa["answer"], claims)):
        eligible = wrong[claim]                                # pool indices of texts stating another claim
        others = eligible[rng.choice(len(eligible), n_candidates - 1, replace=False)]
        cand = np.concatenate([[pos[answer]], others])
        scores = pool_emb[cand] @ anchors[k]                   # (n_candidates,)
        rank = int((scores[1:] >= scores[0]).sum())            # a tie counts against the model
        hits1.append(rank < 1)
        hits5.append(rank < 5)
    hits1, hits5 = np.array(hits1), np.array(hits5)
    unseen = qa["query"].isin(heldout).to_numpy()
    out = {"n": len(qa), "n_candidates": n_candidates, "chance_top1": 1 / n_candidates,
           "top1": float(hits1.mean()), "top5": float(hits5.mean())}
    if unseen.any():
        out.update(top1_heldout_paraphrase=float(hits1[unseen].mean()), n_heldout_paraphrase=int(unseen.sum()),
                   top1_seen_wording=float(hits1[~unseen].mean()) if (~unseen).any() else float("nan"))
    return out


def _wrong_answers(n_pool: int, text_index: list[int], row_claims: np.ndarray, claims: set[str]) -> dict[str, np.ndarray]:
    """For each of `claims`, the sorted pool indices of the texts that no QA row (text_index: each row's pool
    index, row_claims: its claim) gives as a wording of it: the wrong candidates of that claim's pairs. Without
    claims in the QA table (answer_claims falls back to the text) that is every text but the true one."""
    stating: dict[str, set[int]] = {}
    for text, claim in zip(text_index, row_claims):
        stating.setdefault(claim, set()).add(text)
    everything = np.arange(n_pool)
    return {c: np.setdiff1d(everything, sorted(stating[c]), assume_unique=True) for c in claims}
