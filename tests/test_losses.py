"""Tests of qanchor_lab.losses: each loss against a plain reference, gradients, and 2-process gathering."""

from __future__ import annotations

import math
import socket
import time

import pytest
import torch
import torch.nn.functional as F

from qanchor_lab.losses import (
    ALL_NEGATIVES,
    ContrastiveLoss,
    NextTokenLoss,
    PrototypeLoss,
    AnswerSetLoss,
    ReconstructionLoss,
    contrastive_loss,
    gather_with_grad,
    group_weights,
    next_token_loss,
    prototype_loss,
    prototype_scores,
    answer_set_loss,
    reconstruction_loss,
    shared_ids,
)

# --------------------------------------------------------------------------- contrastive


def reference_contrastive(
    anchors, answers, *, temperature, margin, negatives, user_ids=None, answer_ids=None, rows=None
):
    """Loop-by-loop InfoNCE with the margin rule and masks; also counts kept and dropped-by-margin negatives."""
    unit = lambda v: [x / math.sqrt(sum(y * y for y in v)) for x in v]  # noqa: E731
    a = [unit(v) for v in anchors.tolist()]
    p = [unit(v) for v in answers.tolist()]
    dot = lambda u, v: sum(x * y for x, y in zip(u, v))  # noqa: E731
    n = len(a)
    rows = range(n) if rows is None else rows
    losses, kept, dropped = [], 0, 0
    for i in rows:
        pos = dot(a[i], p[i])
        denominator = math.exp(pos / temperature)
        for j in range(n):
            if j == i:
                continue
            if user_ids is not None and user_ids[i] == user_ids[j]:
                continue
            if answer_ids is not None:
                # one id per row, or a tuple of ids masked when any column agrees
                same = [x == y for x, y in zip(answer_ids[i], answer_ids[j])] if isinstance(answer_ids[i], (list, tuple)) \
                    else [answer_ids[i] == answer_ids[j]]
                if any(same):
                    continue
            for kind in negatives:
                if kind == "anchor_anchor":
                    s = dot(a[i], a[j])
                elif kind == "anchor_answer":
                    s = dot(a[i], p[j])
                else:
                    s = dot(p[i], a[j])
                if margin is not None and s - pos > margin:
                    dropped += 1
                    continue
                kept += 1
                denominator += math.exp(s / temperature)
        losses.append(-math.log(math.exp(pos / temperature) / denominator))
    return sum(losses) / len(losses), kept, dropped


NEGATIVE_SUBSETS = [
    ALL_NEGATIVES,
    ("anchor_answer",),
    ("anchor_anchor",),
    ("answer_anchor",),
    ("anchor_anchor", "answer_anchor"),
]


@pytest.mark.parametrize("negatives", NEGATIVE_SUBSETS)
@pytest.mark.parametrize("with_ids", [False, True, "columns"])
def test_contrastive_matches_loop_reference(negatives, with_ids):
    g = torch.Generator().manual_seed(7)
    anchors = torch.randn(6, 5, generator=g, dtype=torch.float64)
    answers = torch.randn(6, 5, generator=g, dtype=torch.float64)
    user_ids = torch.tensor([0, 1, 0, 2, 3, 4]) if with_ids else None
    answer_ids = torch.tensor([10, 11, 12, 13, 11, 14]) if with_ids else None
    if with_ids == "columns":
        # (text id, claim id): rows 1 and 3 share a text, 3 and 5 a claim, so 1 and 5 stay negatives (not transitive)
        answer_ids = torch.tensor([[0, 0], [1, 1], [2, 2], [1, 3], [4, 4], [5, 3]])
    for temperature, margin in [(0.07, 0.1), (0.5, 0.1), (0.2, None)]:
        got = contrastive_loss(
            anchors, answers, temperature=temperature, margin=margin, negatives=negatives,
            user_ids=user_ids, answer_ids=answer_ids,
        )
        want, kept, dropped = reference_contrastive(
            anchors, answers, temperature=temperature, margin=margin, negatives=negatives,
            user_ids=None if user_ids is None else user_ids.tolist(),
            answer_ids=None if answer_ids is None else answer_ids.tolist(),
        )
        assert got.item() == pytest.approx(want, rel=1e-10, abs=1e-12)
        # The random case must exercise both branches of the margin rule, or it guards nothing.
        assert kept > 0
        if margin is not None:
            assert dropped > 0


def test_contrastive_ids_change_the_loss():
    g = torch.Generator().manual_seed(3)
    anchors, answers = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    plain = contrastive_loss(anchors, answers, margin=None)
    same_user = contrastive_loss(anchors, answers, margin=None, user_ids=torch.tensor([0, 0, 1, 2, 3, 4]))
    same_answer = contrastive_loss(anchors, answers, margin=None, answer_ids=torch.tensor([0, 1, 2, 3, 4, 4]))
    # Masking removes terms from the denominator, so the loss can only fall.
    assert same_user < plain and same_answer < plain


def test_contrastive_computes_bfloat16_inputs_in_float32():
    """A bfloat16 backbone's towers: the loss is the float32 loss of the same (rounded) vectors, not a bfloat16 one."""
    g = torch.Generator().manual_seed(5)
    anchors, answers = torch.randn(8, 16, generator=g).bfloat16(), torch.randn(8, 16, generator=g).bfloat16()
    ids = dict(user_ids=torch.tensor([0, 0, 1, 2, 3, 4, 5, 6]), answer_ids=torch.tensor([0, 1, 2, 2, 3, 4, 5, 6]))
    got = contrastive_loss(anchors, answers, **ids)
    assert got.dtype == torch.float32
    assert torch.equal(got, contrastive_loss(anchors.float(), answers.float(), **ids))


def _unit(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_margin_drops_far_negatives_and_keeps_near_ones():
    # Row 0: positive cosine cos(60°) = 0.5.
    # anchor_anchor s(a0, a1) = cos(20°) = 0.940: exceeds 0.5 by 0.44 > margin -> dropped.
    # anchor_answer s(a0, p1) = cos(55°) = 0.574: exceeds by 0.074 <= margin -> kept.
    # answer_anchor s(p0, a1) = cos(40°) = 0.766: exceeds by 0.266 > margin -> dropped.
    anchors = torch.tensor([_unit(0), _unit(20)], dtype=torch.float64)
    answers = torch.tensor([_unit(60), _unit(55)], dtype=torch.float64)
    tau = 0.07
    row0 = torch.tensor([0])
    got = contrastive_loss(anchors, answers, temperature=tau, margin=0.1, local_index=row0)
    pos, near = math.cos(math.radians(60)), math.cos(math.radians(55))
    want = -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + math.exp(near / tau)))
    assert got.item() == pytest.approx(want, rel=1e-12)
    # Without the margin the two far negatives come back and the loss is much larger.
    everything = contrastive_loss(anchors, answers, temperature=tau, margin=None, local_index=row0)
    far = math.exp(math.cos(math.radians(20)) / tau) + math.exp(math.cos(math.radians(40)) / tau)
    want_all = -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + math.exp(near / tau) + far))
    assert everything.item() == pytest.approx(want_all, rel=1e-12)
    assert everything.item() > got.item() + 5
    # A wider margin keeps s(p0, a1) (0.266 <= 0.3) but still drops s(a0, a1) (0.44 > 0.3).
    wide = contrastive_loss(anchors, answers, temperature=tau, margin=0.3, local_index=row0)
    mid = math.exp(math.cos(math.radians(40)) / tau)
    want_wide = -math.log(math.exp(pos / tau) / (math.exp(pos / tau) + math.exp(near / tau) + mid))
    assert wide.item() == pytest.approx(want_wide, rel=1e-12)


def test_contrastive_normalises_inside():
    g = torch.Generator().manual_seed(1)
    anchors, answers = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    scaled = contrastive_loss(anchors * 3.0, answers * 0.2)
    assert torch.allclose(scaled, contrastive_loss(anchors, answers), atol=1e-6)


def test_contrastive_local_index_shards_average_to_full():
    g = torch.Generator().manual_seed(11)
    anchors = torch.randn(8, 5, generator=g, dtype=torch.float64)
    answers = torch.randn(8, 5, generator=g, dtype=torch.float64)
    ids = dict(user_ids=torch.tensor([0, 1, 2, 0, 3, 4, 5, 6]), answer_ids=torch.tensor([0, 1, 2, 3, 4, 1, 5, 6]))
    full = contrastive_loss(anchors, answers, **ids)
    first = contrastive_loss(anchors, answers, local_index=torch.arange(0, 4), **ids)
    second = contrastive_loss(anchors, answers, local_index=torch.arange(4, 8), **ids)
    assert ((first + second) / 2).item() == pytest.approx(full.item(), rel=1e-12)
    assert first.item() != pytest.approx(second.item())
    want, _, _ = reference_contrastive(
        anchors, answers, temperature=0.07, margin=0.1, negatives=ALL_NEGATIVES,
        user_ids=ids["user_ids"].tolist(), answer_ids=ids["answer_ids"].tolist(), rows=[4, 5, 6, 7],
    )
    assert second.item() == pytest.approx(want, rel=1e-10)


def test_contrastive_gradcheck():
    g = torch.Generator().manual_seed(5)
    anchors = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    answers = torch.randn(6, 5, generator=g, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([0, 1, 2, 2, 3, 4])
    assert torch.autograd.gradcheck(
        lambda a, p: contrastive_loss(a, p, temperature=0.1, margin=0.1, user_ids=ids), (anchors, answers)
    )
    assert torch.autograd.gradcheck(
        lambda a, p: contrastive_loss(a, p, negatives=("anchor_answer",), local_index=torch.tensor([1, 4])),
        (anchors, answers),
    )


def test_contrastive_all_negatives_masked_gives_zero():
    anchors, answers = torch.randn(3, 4), torch.randn(3, 4)
    loss = contrastive_loss(anchors, answers, user_ids=torch.zeros(3, dtype=torch.long))
    assert loss.item() == 0.0


def test_answer_id_columns_mask_pair_by_pair():
    """(text, claim) id columns mask rows that share either, pair by pair: unlike joined groups, rows 1 and 5 (linked
    only through row 3) stay each other's negatives, and the masks of each column alone are both kept."""
    g = torch.Generator().manual_seed(3)
    anchors, answers = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.randn(6, 4, generator=g, dtype=torch.float64)
    columns = torch.tensor([[0, 0], [1, 1], [2, 2], [1, 3], [4, 4], [5, 3]])
    joined = torch.tensor([0, 1, 2, 1, 4, 1])                      # the connected groups of the same pairs
    loss = lambda ids: contrastive_loss(anchors, answers, margin=None, answer_ids=ids).item()  # noqa: E731
    assert loss(columns) != pytest.approx(loss(joined))
    assert loss(columns) != pytest.approx(loss(columns[:, 0])) and loss(columns) != pytest.approx(loss(columns[:, 1]))
    mask = shared_ids(columns, columns)
    assert mask[1, 3] and mask[3, 5] and not mask[1, 5]


def test_contrastive_bad_arguments():
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match=r"\(4, 3\) and \(5, 3\)"):
        contrastive_loss(a, torch.randn(5, 3))
    with pytest.raises(ValueError, match="user_ids must have shape \\(4,\\)"):
        contrastive_loss(a, a, user_ids=torch.arange(3))
    with pytest.raises(ValueError, match="answer_ids"):
        contrastive_loss(a, a, answer_ids=torch.arange(4).view(2, 2))
    with pytest.raises(ValueError, match=r"answer_ids must have shape \(4,\) or \(4, k\)"):
        contrastive_loss(a, a, answer_ids=torch.zeros(4, 2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"user_ids must have shape \(4,\) to match anchors, got \(4, 2\)"):
        contrastive_loss(a, a, user_ids=torch.zeros(4, 2, dtype=torch.long))  # only answer ids take columns
    with pytest.raises(ValueError, match="unknown negative kind"):
        contrastive_loss(a, a, negatives=("answer_answer",))
    with pytest.raises(ValueError, match="at least one"):
        contrastive_loss(a, a, negatives=())
    with pytest.raises(TypeError, match="sequence"):
        contrastive_loss(a, a, negatives="anchor_answer")
    with pytest.raises(ValueError, match="temperature"):
        contrastive_loss(a, a, temperature=0.0)
    with pytest.raises(ValueError, match=r"local_index must lie in \[0, 4\)"):
        contrastive_loss(a, a, local_index=torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="integer"):
        contrastive_loss(a, a, local_index=torch.tensor([True, False, True, False]))


def test_contrastive_module_matches_function_and_gather_is_identity():
    g = torch.Generator().manual_seed(2)
    anchors, answers = torch.randn(6, 5, generator=g), torch.randn(6, 5, generator=g)
    module = ContrastiveLoss(temperature=0.2, margin=0.05, negatives=("anchor_answer", "anchor_anchor"))
    uid = torch.tensor([0, 1, 1, 2, 3, 4])
    want = contrastive_loss(anchors, answers, temperature=0.2, margin=0.05,
                            negatives=("anchor_answer", "anchor_anchor"), user_ids=uid)
    assert torch.equal(module(anchors, answers, user_ids=uid), want)
    assert gather_with_grad(anchors) is anchors
    assert "margin=0.05" in repr(module)


# --------------------------------------------------------------------------- 2-process gathering


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_process_batch():
    """A fixed batch from a tiny linear layer: model, inputs for anchors and answers, and ids."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3).double()
    g = torch.Generator().manual_seed(1)
    x_anchor = torch.randn(8, 4, generator=g, dtype=torch.float64)
    x_answer = torch.randn(8, 4, generator=g, dtype=torch.float64)
    # Rows 1 and 6 are one user, rows 2 and 5 share an answer text: both pairs straddle the shards.
    user_ids = torch.tensor([0, 1, 2, 3, 4, 5, 1, 6])
    answer_ids = torch.tensor([0, 1, 2, 3, 4, 2, 5, 6])
    return model, x_anchor, x_answer, user_ids, answer_ids


# Rows per rank: an even split, and a ragged one (which exercises the padding in the gather).
_SPLITS = {"even": (4, 4), "ragged": (3, 5)}


def _gather_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        for name, sizes in _SPLITS.items():
            model, x_anchor, x_answer, user_ids, answer_ids = _two_process_batch()
            start = sum(sizes[:rank])
            rows = slice(start, start + sizes[rank])
            loss = ContrastiveLoss()(model(x_anchor[rows]), model(x_answer[rows]), user_ids[rows], answer_ids[rows])
            # Weight by this shard's share so that the rank average is the global row mean even when ragged.
            weighted = loss * sizes[rank] * world / sum(sizes)
            weighted.backward()
            grads = []
            for param in model.parameters():
                dist.all_reduce(param.grad)
                grads.append(param.grad / world)  # DDP averages gradients over ranks
            total = weighted.detach().clone()
            dist.all_reduce(total)
            if rank == 0:
                torch.save({"loss": total / world, "grads": grads}, f"{out_dir}/{name}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_gather_with_grad_two_processes_match_single_process(tmp_path):
    import torch.multiprocessing as mp

    began = time.perf_counter()
    mp.spawn(_gather_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    elapsed = time.perf_counter() - began

    model, x_anchor, x_answer, user_ids, answer_ids = _two_process_batch()
    loss = ContrastiveLoss()(model(x_anchor), model(x_answer), user_ids, answer_ids)
    loss.backward()
    for name in _SPLITS:
        result = torch.load(tmp_path / f"{name}.pt")
        assert abs(result["loss"].item() - loss.item()) < 1e-5, name
        for got, param in zip(result["grads"], model.parameters()):
            assert torch.allclose(got, param.grad, atol=1e-5), (name, got, param.grad)
    print(f"2-process gather test: {elapsed:.1f} s")


# --------------------------------------------------------------------------- next token


def test_next_token_loss_matches_cross_entropy_and_ignores_masked_targets():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.randint(7, (2, 5), generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool)
    want = F.cross_entropy(logits.reshape(-1, 7), targets.masked_fill(~mask, -100).reshape(-1), ignore_index=-100)
    garbage = targets.masked_fill(~mask, -100)  # values outside the vocabulary under the mask are never read
    assert torch.allclose(next_token_loss(logits, garbage, mask), want, atol=1e-6)
    flat = next_token_loss(logits.reshape(-1, 7), targets.reshape(-1), mask.reshape(-1))
    assert torch.allclose(flat, want, atol=1e-6)
    assert torch.allclose(NextTokenLoss()(logits, targets, mask.long()), want, atol=1e-6)
    assert next_token_loss(logits.half(), targets, mask).dtype == torch.float32


def test_next_token_loss_normalizer_gives_global_mean_across_shards():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 6, 5, generator=g)
    targets = torch.randint(5, (4, 6), generator=g)
    mask = torch.rand(4, 6, generator=g) > 0.3
    mask[:2, :] = True  # shards with unequal token counts: a mean of shard means would be wrong
    global_mean = next_token_loss(logits, targets, mask)
    world = 2
    normalizer = mask.sum().item() / world
    halves = (slice(0, 2), slice(2, 4))
    shards = [next_token_loss(logits[s], targets[s], mask[s], normalizer=normalizer) for s in halves]
    assert torch.allclose(sum(shards) / world, global_mean, atol=1e-6)
    naive = sum(next_token_loss(logits[s], targets[s], mask[s]) for s in halves) / world
    assert not torch.allclose(naive, global_mean, atol=1e-4)
    total = next_token_loss(logits, targets, mask, normalizer=torch.tensor(3.0))
    assert torch.allclose(total, global_mean * mask.sum() / 3.0, atol=1e-5)


def test_next_token_loss_empty_mask_and_errors():
    logits = torch.randn(3, 4, requires_grad=True)
    loss = next_token_loss(logits, torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.bool))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(logits.grad, torch.zeros(3, 4))
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3,\)|\(3,\).*\(2, 3\)"):
        next_token_loss(logits, torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="normalizer"):
        next_token_loss(logits, torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.bool), normalizer=0)
    with pytest.raises(ValueError, match="logits"):
        next_token_loss(torch.randn(5), torch.zeros(1, dtype=torch.long), torch.ones(1, dtype=torch.bool))


def test_next_token_loss_gradcheck():
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(4, (2, 3), generator=g)
    mask = torch.tensor([[1, 1, 0], [0, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: next_token_loss(x, targets, mask), (logits,))
    assert torch.autograd.gradcheck(lambda x: next_token_loss(x, targets, mask, normalizer=2.5), (logits,))


# --------------------------------------------------------------------------- prototypes


def _prototype_case(m: int, k: int = 3, n: int = 7, d: int = 4, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(n, d, generator=g, dtype=torch.float64)
    prototypes = torch.randn(k * m, d, generator=g, dtype=torch.float64)
    prototype_class = torch.arange(k).repeat_interleave(m)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])[:n]
    return embeddings, prototypes, prototype_class, labels


def test_prototype_loss_one_prototype_per_class_is_the_papers_formula():
    embeddings, prototypes, prototype_class, labels = _prototype_case(m=1)
    tau = 0.1
    e, p = F.normalize(embeddings, dim=-1), F.normalize(prototypes, dim=-1)
    terms = []
    for i in range(len(labels)):
        numerator = math.exp((e[i] @ p[labels[i]]).item() / tau)
        denominator = sum(math.exp((e[i] @ p[k]).item() / tau) for k in range(p.shape[0]))
        terms.append(-math.log(numerator / denominator))
    got = prototype_loss(embeddings, prototypes, labels, temperature=tau, prototype_class=prototype_class)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)


def test_prototype_loss_several_prototypes_per_class():
    embeddings, prototypes, prototype_class, labels = _prototype_case(m=2)
    tau = 0.3
    e, p = F.normalize(embeddings, dim=-1), F.normalize(prototypes, dim=-1)
    terms = []
    for i in range(len(labels)):
        scores = [math.exp((e[i] @ p[j]).item() / tau) for j in range(p.shape[0])]
        own = sum(s for s, c in zip(scores, prototype_class.tolist()) if c == labels[i])
        terms.append(-math.log(own / sum(scores)))
    got = prototype_loss(embeddings, prototypes, labels, temperature=tau, prototype_class=prototype_class)
    assert got.item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)


def test_prototype_loss_class_weights_are_a_weighted_mean():
    embeddings, prototypes, prototype_class, labels = _prototype_case(m=1)
    weights = torch.tensor([1.0, 4.0, 0.5], dtype=torch.float64)
    logits = F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).T / 0.1
    want = F.cross_entropy(logits, labels, weight=weights)
    got = prototype_loss(embeddings, prototypes, labels, prototype_class=prototype_class, class_weights=weights)
    assert torch.allclose(got, want, atol=1e-12)
    assert not torch.allclose(got, prototype_loss(embeddings, prototypes, labels, prototype_class=prototype_class))


def test_prototype_scores_are_class_probabilities():
    embeddings, prototypes, prototype_class, labels = _prototype_case(m=3)
    scores = prototype_scores(embeddings, prototypes, prototype_class, temperature=0.2)
    assert scores.shape == (7, 3)
    assert torch.allclose(scores.sum(dim=1), torch.ones(7, dtype=torch.float64), atol=1e-12)
    # The loss is the negative log of the score of the true class.
    loss = prototype_loss(embeddings, prototypes, labels, temperature=0.2, prototype_class=prototype_class)
    assert torch.allclose(loss, -scores[torch.arange(7), labels].log().mean(), atol=1e-12)


def test_prototype_loss_gradcheck():
    embeddings, prototypes, prototype_class, labels = _prototype_case(m=2)
    embeddings.requires_grad_(True)
    prototypes.requires_grad_(True)
    weights = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda e, p: prototype_loss(
            e, p, labels, temperature=0.2, prototype_class=prototype_class, class_weights=weights
        ),
        (embeddings, prototypes),
    )


def test_prototype_loss_bad_arguments():
    embeddings, prototypes, prototype_class, labels = _prototype_case(m=1)
    with pytest.raises(ValueError, match=r"\(7, 4\) and \(3, 5\)"):
        prototype_loss(embeddings, torch.randn(3, 5), labels, prototype_class=prototype_class)
    with pytest.raises(ValueError, match=r"prototype_class must have shape \(3,\)"):
        prototype_loss(embeddings, prototypes, labels, prototype_class=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"no prototype for class\(es\) \[1\]"):
        prototype_loss(embeddings, prototypes, labels, prototype_class=torch.tensor([0, 2, 2]))
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 3\)"):
        prototype_loss(embeddings, prototypes, labels + 1, prototype_class=prototype_class)
    with pytest.raises(ValueError, match=r"class_weights must have shape \(3,\)"):
        prototype_loss(embeddings, prototypes, labels, prototype_class=prototype_class, class_weights=torch.ones(2))


def test_prototype_module_init_from_and_training():
    g = torch.Generator().manual_seed(4)
    # Two classes, each made of two tight sub-clusters in different directions.
    centres = F.normalize(torch.randn(4, 8, generator=g), dim=-1)
    sub = torch.arange(4).repeat_interleave(25)
    embeddings = centres[sub] + 0.05 * torch.randn(100, 8, generator=g)
    labels = sub // 2

    single = PrototypeLoss(num_classes=2, dim=8, temperature=0.1, generator=torch.Generator().manual_seed(0))
    single.init_from(embeddings, labels)
    for c in range(2):
        want = F.normalize(F.normalize(embeddings[labels == c], dim=-1).mean(0), dim=-1)
        assert torch.allclose(single.prototypes[c], want, atol=1e-6)

    multi = PrototypeLoss(num_classes=2, dim=8, prototypes_per_class=2, temperature=0.1)
    assert multi.prototype_class.tolist() == [0, 0, 1, 1]
    multi.init_from(embeddings, labels, generator=torch.Generator().manual_seed(0))
    # Spherical k-means inside each class recovers that class's two sub-cluster centres.
    for c in range(2):
        found = multi.prototypes[2 * c : 2 * c + 2].detach()
        cos = found @ centres[2 * c : 2 * c + 2].T  # (2, 2)
        assert cos.max(dim=1).values.min() > 0.98
        assert set(cos.argmax(dim=1).tolist()) == {0, 1}
    assert multi(embeddings, labels) < single(embeddings, labels)
    scores = multi.scores(embeddings)
    assert (scores.argmax(dim=1) == labels).float().mean() == 1.0

    # The prototypes are parameters: a few steps from a random start lower the loss.
    fresh = PrototypeLoss(num_classes=2, dim=8, temperature=0.1, generator=torch.Generator().manual_seed(1))
    optimiser = torch.optim.SGD(fresh.parameters(), lr=0.5)
    before = fresh(embeddings, labels).item()
    for _ in range(20):
        optimiser.zero_grad()
        fresh(embeddings, labels).backward()
        optimiser.step()
    assert fresh(embeddings, labels).item() < before / 10

    weighted = PrototypeLoss(num_classes=2, dim=8, class_weights=torch.tensor([1.0, 3.0]))
    assert weighted.class_weights.tolist() == [1.0, 3.0]
    with pytest.raises(ValueError, match="class_weights"):
        PrototypeLoss(num_classes=2, dim=8, class_weights=torch.ones(3))
    with pytest.raises(ValueError, match=r"embeddings must be \(N, 8\)"):
        single.init_from(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))


def test_reconstruction_loss_is_the_mean_squared_error_and_checks_shapes():
    torch.manual_seed(0)
    target = torch.randn(6, 5)
    assert reconstruction_loss(target, target).item() == 0.0
    pred = torch.randn(6, 5)
    assert torch.isclose(reconstruction_loss(pred, target), ((pred - target) ** 2).mean())
    with pytest.raises(ValueError, match="must both be"):
        reconstruction_loss(pred, target[:, :4])


def test_reconstruction_module_decodes_the_embedding_and_learns():
    torch.manual_seed(0)
    emb = torch.nn.functional.normalize(torch.randn(64, 8), dim=-1)
    tabular = emb @ torch.randn(8, 5)                                   # linearly decodable from emb
    loss = ReconstructionLoss(8, 5)
    assert torch.isclose(loss(emb, tabular), reconstruction_loss(loss.decoder(emb * 8 ** 0.5), tabular))
    opt = torch.optim.Adam(loss.parameters(), lr=0.05)
    first = loss(emb, tabular).item()
    for _ in range(200):
        opt.zero_grad()
        loss(emb, tabular).backward()
        opt.step()
    assert loss(emb, tabular).item() < 0.05 * first


def test_weighted_reconstruction_weighs_each_feature_and_checks_the_weights():
    torch.manual_seed(0)
    target, pred = torch.randn(6, 3), torch.randn(6, 3)
    w = torch.tensor([2.0, 0.5, 0.5])
    assert torch.isclose(reconstruction_loss(pred, target, w), ((pred - target) ** 2 * w).mean())
    assert torch.isclose(reconstruction_loss(pred, target, torch.ones(3)), reconstruction_loss(pred, target))
    with pytest.raises(ValueError, match="one entry per feature"):
        reconstruction_loss(pred, target, torch.ones(4))
    with pytest.raises(ValueError, match="one entry per feature"):
        ReconstructionLoss(8, 3, torch.ones(2))
    module = ReconstructionLoss(8, 3, w)
    emb = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    assert torch.isclose(module(emb, target), reconstruction_loss(module.decoder(emb * 8 ** 0.5), target, w))
    assert set(module.state_dict()) == {"decoder.weight", "decoder.bias"}   # checkpoints hold the decoder alone
    # row-by-row weights (PretrainConfig.reconstruction_target="intent"): each row's own, in place of the module's
    rows = torch.rand(6, 3)
    assert torch.isclose(reconstruction_loss(pred, target, rows), ((pred - target) ** 2 * rows).mean())
    assert torch.isclose(module(emb, target, rows), reconstruction_loss(module.decoder(emb * 8 ** 0.5), target, rows))
    with pytest.raises(ValueError, match="per row and feature"):
        reconstruction_loss(pred, target, torch.ones(5, 3))


def test_group_weights_give_every_group_the_same_total_weight():
    groups = ["bill"] * 6 + ["search"] * 3 + ["profile"]
    w = group_weights(groups)
    assert w.shape == (10,) and torch.isclose(w.mean(), torch.tensor(1.0))
    totals = {g: float(w[[i for i, x in enumerate(groups) if x == g]].sum()) for g in set(groups)}
    assert max(totals.values()) - min(totals.values()) < 1e-5
    assert torch.allclose(group_weights(["a", "a"]), torch.ones(2))
    with pytest.raises(ValueError, match="at least one"):
        group_weights([])


# ----- answer sets ------------------------------------------------------------------------------------


def test_answer_set_loss_by_hand_positives_groups_and_useless_rows():
    torch.manual_seed(0)
    anchors, cands = torch.randn(3, 4), torch.randn(5, 4)
    cand_group = torch.tensor([0, 0, 0, 1, 2])            # intent 0: three wordings; intents 1, 2: one each
    cand_claim = torch.tensor([7, 7, 8, 9, 5])            # intent 0: claim 7 in two wordings, claim 8 in one
    row_group, row_claim = torch.tensor([0, 0, 1]), torch.tensor([7, 8, 9])
    got = answer_set_loss(anchors, cands, row_group, cand_group, row_claim, cand_claim, temperature=0.5)
    s = F.normalize(anchors, dim=-1) @ F.normalize(cands, dim=-1).T / 0.5
    row0 = torch.logsumexp(s[0, :3], 0) - torch.logsumexp(s[0, :2], 0)     # two positive wordings
    row1 = torch.logsumexp(s[1, :3], 0) - s[1, 2]
    # row 2's intent has a single claim: nothing to tell apart, left out of the mean
    assert torch.isclose(got, (row0 + row1) / 2)
    assert torch.isclose(AnswerSetLoss(0.5)(anchors, cands, row_group, cand_group, row_claim, cand_claim), got)
    # pointing each anchor at its own claim's wordings drives the loss toward 0
    aligned = torch.stack([cands[0] + cands[1], cands[2], cands[3]])
    assert answer_set_loss(aligned * 50, cands, row_group, cand_group, row_claim, cand_claim, temperature=0.01) < 1e-3
    only_useless = answer_set_loss(anchors[2:].requires_grad_(), cands, row_group[2:], cand_group, row_claim[2:], cand_claim)
    assert only_useless.item() == 0.0 and only_useless.requires_grad
    with pytest.raises(ValueError, match=r"row_claim must have shape \(3,\)"):
        answer_set_loss(anchors, cands, row_group, cand_group, row_claim[:2], cand_claim)
    with pytest.raises(ValueError, match="share d"):
        answer_set_loss(anchors, cands[:, :3], row_group, cand_group, row_claim, cand_claim)
