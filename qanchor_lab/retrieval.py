"""Held-out answer retrieval: does the anchor embedding pick the user's true answer among candidates?

For each held-out (user, query) pair the true answer competes with n-1 distinct other answer texts from
the same split (n is capped by the split's distinct answers, so small worlds work); top-1 / top-5 accuracy are reported (chance: 1/n and 5/n), split by whether the query's
wording was seen in training or is a held-out paraphrase.
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
    model.eval()
    users = world.users_in(split)
    qa = world.qa[world.qa["user_id"].isin(set(users))].reset_index(drop=True)
    rng = np.random.default_rng(seed)
    if len(qa) > max_pairs:
        qa = qa.iloc[np.sort(rng.choice(len(qa), max_pairs, replace=False))].reset_index(drop=True)
    pool = np.array(sorted(set(world.qa.loc[world.qa["user_id"].isin(set(users)), "answer"])), dtype=object)
    if len(pool) < 2:
        raise ValueError(f"split {split!r} has {len(pool)} distinct answer(s); retrieval needs at least 2")
    # A small world has fewer distinct answers than candidates asked for: rank among all of them instead
    # (the result's n_candidates and chance_top1 say how many).
    n_candidates = min(n_candidates, len(pool))
    store = store or model.behaviour(world.events, world.profiles, users)

    pool_emb = torch.cat([model.embed_answers(list(pool[i:i + batch_size]))
                          for i in range(0, len(pool), batch_size)])                       # (A, d)
    pos = {a: i for i, a in enumerate(pool)}
    anchors = []
    for i in tqdm(range(0, len(qa), batch_size), desc="retrieval", disable=not show_progress):
        chunk = qa.iloc[i:i + batch_size]
        ub = store.batch(store.indices(chunk["user_id"].tolist()))
        anchors.append(model.embed(ub, chunk["query"].tolist()))
    anchors = torch.cat(anchors)                                                             # (N, d)

    hits1, hits5 = [], []
    for k, answer in enumerate(qa["answer"]):
        true = pos[answer]
        others = rng.choice(len(pool) - 1, n_candidates - 1, replace=False)
        others = others + (others >= true)                     # skip the true answer's index
        cand = np.concatenate([[true], others])
        scores = pool_emb[cand] @ anchors[k]                   # (n_candidates,)
        rank = int((scores > scores[0]).sum())                 # ties count in the model's favour
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
