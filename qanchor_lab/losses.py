"""Training losses of Q-Anchor and the cross-process gathering they need.

Each loss is a pure function of tensors (``contrastive_loss``, ``next_token_loss``,
``prototype_loss``) that tests and notebooks call directly, wrapped by a small ``nn.Module``
(``ContrastiveLoss``, ``NextTokenLoss``, ``PrototypeLoss``) that holds the hyper-parameters
and, for the contrastive loss, gathers in-batch negatives across processes.

- Contrastive (docs/design.md §1.5): InfoNCE on cosine similarity between the anchor embedding (behaviour +
  query) and the semantic embedding of its answer, with anchor-anchor, anchor-answer and
  answer-anchor negatives, a margin rule that drops likely false negatives, and masks for rows of the
  same user and for identical answer texts (docs/design.md §6).
- Generative: next-token cross-entropy on the answer tokens.
- Reconstruction (docs/design.md §7): a linear map from the anchor embedding back to the user's standardised
  tabular vector; an optional pre-training term that keeps the embedding from forgetting its input.
- Answer set (docs/design.md §7.12): each anchor against every answer wording of its own question, the wordings
  of its claim positive; an optional pre-training term that teaches the anchor to tell its question's answers apart.
- Prototype (docs/design.md §1.6): prototype-softmax over learnable class prototypes, used by cluster-based
  soft prompt tuning.
"""

from __future__ import annotations

from typing import Literal, Sequence, get_args

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

NegativeKind = Literal["anchor_anchor", "anchor_answer", "answer_anchor"]
ALL_NEGATIVES: tuple[NegativeKind, ...] = get_args(NegativeKind)

__all__ = [
    "ALL_NEGATIVES",
    "AnswerSetLoss",
    "ContrastiveLoss",
    "NegativeKind",
    "NextTokenLoss",
    "PrototypeLoss",
    "ReconstructionLoss",
    "answer_set_loss",
    "contrastive_loss",
    "gather_with_grad",
    "next_token_loss",
    "prototype_loss",
    "prototype_scores",
    "reconstruction_loss",
]


# --------------------------------------------------------------------------- gathering


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _gather_sizes(n: int, device: torch.device) -> list[int]:
    """Row counts of every rank, in rank order."""
    size = torch.tensor([n], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    return [int(s.item()) for s in sizes]


def _pad_rows(x: Tensor, rows: int) -> Tensor:
    if x.shape[0] == rows:
        return x
    pad = x.new_zeros((rows - x.shape[0], *x.shape[1:]))
    return torch.cat([x, pad], dim=0)


class _AllGatherRows(torch.autograd.Function):
    """All-gather of equal-shaped tensors, (W, rows, ...) out, whose backward returns to each rank
    the sum over all ranks of the gradient flowing into its slice."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        ctx.rank = dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)  # (W, rows, ...)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        # Every rank's loss may use every rank's rows; summing the full gradient over ranks and
        # keeping our slice is a reduce-scatter that works on every backend, gloo included.
        grad = grad.contiguous().clone()  # (W, rows, ...)
        dist.all_reduce(grad)
        return grad[ctx.rank]


def gather_with_grad(x: Tensor, sizes: Sequence[int] | None = None) -> Tensor:
    """Concatenate ``x`` from every process along dim 0, keeping the autograd graph.

    Gradients flow back to every rank: the gradient a rank receives for its own rows is the sum of
    the gradients of all ranks' losses with respect to those rows (the semantics of
    ``torch.distributed.nn.functional.all_gather``, which torch 2.13 deprecates; this is a small
    autograd function of our own over the public collectives). DDP's gradient averaging then
    divides by ``world_size``, so when each rank's loss is the mean over its own rows of
    equal-sized shards, the result equals the gradient of the full-batch mean loss in one process.

    Ranks may hold different row counts (a ragged last batch): rows are padded to the largest
    count for the collective and the padding is cut out again. ``sizes`` (rows per rank) skips the
    extra collective that discovers them. Identity when torch.distributed is not initialised or
    has one process. Every rank must call this, in the same order, and run backward through it.
    """
    if not _is_distributed():
        return x
    if sizes is None:
        sizes = _gather_sizes(x.shape[0], x.device)
    parts = _AllGatherRows.apply(_pad_rows(x, max(sizes)))  # (W, max_rows, ...)
    return torch.cat([parts[r, :n] for r, n in enumerate(sizes)], dim=0)


def _gather_no_grad(x: Tensor, sizes: Sequence[int]) -> Tensor:
    """All-gather without autograd (ids, labels); ragged row counts allowed as in gather_with_grad."""
    padded = _pad_rows(x.contiguous(), max(sizes))
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:n] for p, n in zip(parts, sizes)], dim=0)


# --------------------------------------------------------------------------- contrastive


def _check_ids(name: str, ids: Tensor | None, n: int, *, columns: bool = False) -> None:
    """`ids` is None, (n,), or, with `columns`, (n, k) for k >= 1 (see `shared_ids`)."""
    ok = ids is None or tuple(ids.shape) == (n,) or (
        columns and ids.ndim == 2 and ids.shape[0] == n and ids.shape[1] > 0)
    if not ok:
        shapes = f"({n},) or ({n}, k)" if columns else f"({n},)"
        raise ValueError(f"{name} must have shape {shapes} to match anchors, got {tuple(ids.shape)}")


def shared_ids(ids_i: Tensor, ids_j: Tensor) -> Tensor:
    """(n, N) True where row i and row j share an id. Ids are (rows,) or (rows, k): with k columns (e.g. the
    answer text and the claim, `PretrainConfig.false_negatives="text_or_claim"`) two rows share an id when they
    agree in any column, pair by pair, so sharing is not transitive."""
    if ids_i.ndim == 1:
        return ids_i[:, None] == ids_j[None, :]                       # (n, N)
    return (ids_i[:, None, :] == ids_j[None, :, :]).any(-1)           # (n, N, k) -> (n, N)


def _check_negatives(negatives: Sequence[str]) -> tuple[NegativeKind, ...]:
    if isinstance(negatives, str):
        raise TypeError(f"negatives must be a sequence of kinds, not the string {negatives!r}")
    kinds = tuple(negatives)
    if not kinds:
        raise ValueError(f"negatives must name at least one of {ALL_NEGATIVES}")
    unknown = [k for k in kinds if k not in ALL_NEGATIVES]
    if unknown:
        raise ValueError(f"unknown negative kind(s) {unknown}; choose from {ALL_NEGATIVES}")
    if len(set(kinds)) != len(kinds):
        raise ValueError(f"negatives lists a kind twice: {kinds}")
    return kinds  # type: ignore[return-value]


def _upcast_half(t: Tensor) -> Tensor:
    """float16 / bfloat16 as float32 (losses are computed in at least float32); other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def contrastive_loss(
    anchors: Tensor,
    answers: Tensor,
    *,
    temperature: float = 0.07,
    margin: float | None = 0.1,
    negatives: Sequence[NegativeKind] = ALL_NEGATIVES,
    user_ids: Tensor | None = None,
    answer_ids: Tensor | None = None,
    local_index: Tensor | None = None,
    answer_id_kinds: Sequence[NegativeKind] = ALL_NEGATIVES,
) -> Tensor:
    """InfoNCE of each anchor against its answer, with masked in-batch negatives.

    ``anchors`` and ``answers`` are (N, d); both are L2-normalised here, so similarities are
    cosines whatever the caller passes (half-precision inputs are upcast to float32 first). Row i's
    positive is s(a_i, p_i). Its denominator holds the positive and, for every j != i, the enabled
    negative kinds:

    - ``"anchor_anchor"``: s(a_i, a_j)
    - ``"anchor_answer"``: s(a_i, p_j)
    - ``"answer_anchor"``: s(p_i, a_j)

    A negative is dropped when ``s_neg - s(a_i, p_i) > margin`` (a likely false negative; the
    comparison is on cosines, before the temperature; ``margin=None`` keeps all), when rows i and j
    share a ``user_ids`` entry, or when they share an ``answer_ids`` entry (the same answer text, or
    claim) in one of the ``answer_id_kinds``. ``answer_ids`` is (N,), or (N, k) to mask rows that agree in
    any of k columns (``shared_ids``). Restricting that mask to the answer kinds keeps two users
    with the same claim apart as anchors: they are different people, and the push between their anchors
    (uniformity) is what keeps user detail beyond the claim in the embedding.
    The masks are decisions, not differentiable weights. One term per anchor (not symmetrised):
    ``-log(exp(s_pos/τ) / (exp(s_pos/τ) + Σ kept exp(s_neg/τ)))``, averaged over rows.

    Distributed use: pass the gathered (global) tensors and ``local_index`` (n_local,), the global
    row numbers of this process's anchors; the loss is the mean over those rows only, while
    negatives come from all N rows. ``None`` means all rows.
    """
    if anchors.ndim != 2 or anchors.shape != answers.shape:
        raise ValueError(
            f"anchors and answers must both be (N, d) with the same shape, got "
            f"{tuple(anchors.shape)} and {tuple(answers.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    kinds = _check_negatives(negatives)
    n = anchors.shape[0]
    _check_ids("user_ids", user_ids, n)
    _check_ids("answer_ids", answer_ids, n, columns=True)
    if local_index is None:
        rows = torch.arange(n, device=anchors.device)
    else:
        if local_index.ndim != 1 or local_index.dtype == torch.bool or local_index.dtype.is_floating_point:
            raise ValueError(
                f"local_index must be a 1-D integer tensor of row numbers, got shape "
                f"{tuple(local_index.shape)} dtype {local_index.dtype}"
            )
        if local_index.numel() == 0:
            raise ValueError("local_index selects no rows")
        if int(local_index.min()) < 0 or int(local_index.max()) >= n:
            raise ValueError(f"local_index must lie in [0, {n}), got values {local_index.tolist()}")
        rows = local_index.to(anchors.device)

    # bfloat16 cosines over τ=0.07 would keep a few bits of each logit, and the margin rule would drop
    # negatives by rounding noise: compute in float32 (float64 stays float64, as the reference tests use)
    a = F.normalize(_upcast_half(anchors), dim=-1)  # (N, d)
    p = F.normalize(_upcast_half(answers), dim=-1)  # (N, d)
    a_rows, p_rows = a[rows], p[rows]  # (n, d)
    pos = (a_rows * p_rows).sum(-1)  # (n,)

    # Pairs that are never negatives, whatever their similarity.
    blocked = rows[:, None] == torch.arange(n, device=a.device)[None, :]  # (n, N)
    if user_ids is not None:
        uid = user_ids.to(a.device)
        blocked = blocked | (uid[rows][:, None] == uid[None, :])
    same_answer = None
    if answer_ids is not None:
        aid = answer_ids.to(a.device)
        same_answer = shared_ids(aid[rows], aid)  # (n, N)
    id_kinds = set(_check_negatives(answer_id_kinds))

    sims = {
        "anchor_anchor": a_rows @ a.T,  # (n, N)
        "anchor_answer": a_rows @ p.T,  # (n, N)
        "answer_anchor": p_rows @ a.T,  # (n, N)
    }
    logits = [pos[:, None] / temperature]  # (n, 1)
    for kind in kinds:
        sim = sims[kind]  # (n, N)
        drop = blocked if same_answer is None or kind not in id_kinds else blocked | same_answer
        if margin is not None:
            drop = drop | (sim.detach() - pos.detach()[:, None] > margin)
        logits.append((sim / temperature).masked_fill(drop, float("-inf")))  # (n, N)
    log_denominator = torch.logsumexp(torch.cat(logits, dim=1), dim=1)  # (n,)
    return (log_denominator - pos / temperature).mean()


class ContrastiveLoss(nn.Module):
    """Q-Anchor's contrastive loss; gathers negatives from every process when distributed.

    ``forward(anchors, answers, user_ids=None, answer_ids=None)`` takes this process's rows. When
    torch.distributed is initialised with more than one process it gathers anchors and answers with
    ``gather_with_grad`` (and the ids without grad), and returns the mean loss over this process's
    own anchors, so DDP's gradient averaging yields the full-batch gradient (see
    ``gather_with_grad``). All processes must pass the same set of optional arguments.
    """

    def __init__(
        self,
        temperature: float = 0.07,
        margin: float | None = 0.1,
        negatives: Sequence[NegativeKind] = ALL_NEGATIVES,
        answer_id_kinds: Sequence[NegativeKind] = ALL_NEGATIVES,
    ) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.temperature = temperature
        self.margin = margin
        self.negatives = _check_negatives(negatives)
        self.answer_id_kinds = _check_negatives(answer_id_kinds)

    def forward(
        self,
        anchors: Tensor,
        answers: Tensor,
        user_ids: Tensor | None = None,
        answer_ids: Tensor | None = None,
    ) -> Tensor:
        local_index = None
        if _is_distributed():
            if anchors.shape[0] != answers.shape[0]:
                raise ValueError(
                    f"anchors {tuple(anchors.shape)} and answers {tuple(answers.shape)} differ in rows"
                )
            sizes = _gather_sizes(anchors.shape[0], anchors.device)
            offset = sum(sizes[: dist.get_rank()])
            local_index = torch.arange(offset, offset + anchors.shape[0], device=anchors.device)
            anchors = gather_with_grad(anchors, sizes)
            answers = gather_with_grad(answers, sizes)
            if user_ids is not None:
                user_ids = _gather_no_grad(user_ids.to(anchors.device), sizes)
            if answer_ids is not None:
                answer_ids = _gather_no_grad(answer_ids.to(anchors.device), sizes)
        return contrastive_loss(
            anchors,
            answers,
            temperature=self.temperature,
            margin=self.margin,
            negatives=self.negatives,
            user_ids=user_ids,
            answer_ids=answer_ids,
            local_index=local_index,
            answer_id_kinds=self.answer_id_kinds,
        )

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, margin={self.margin}, negatives={self.negatives}"


# --------------------------------------------------------------------------- next token


def next_token_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    *,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Cross-entropy of ``logits`` against ``targets`` on the tokens ``mask`` selects.

    ``logits`` is (N, V) or (B, T, V), already aligned so that position t predicts ``targets[t]``
    (the caller shifts); ``targets`` and ``mask`` are (N,) or (B, T). Targets under a false mask
    are ignored whatever they hold (e.g. -100 or padding). Returns the mean over masked tokens, or
    ``sum / normalizer`` when ``normalizer`` is given: pass the global masked-token count divided by
    world_size so that DDP's averaging over ranks gives the global per-token mean. Half-precision
    logits are upcast to float32. With no masked token the mean is 0 (still in the graph).
    """
    if logits.ndim not in (2, 3):
        raise ValueError(f"logits must be (N, V) or (B, T, V), got {tuple(logits.shape)}")
    if tuple(targets.shape) != tuple(logits.shape[:-1]) or tuple(mask.shape) != tuple(targets.shape):
        raise ValueError(
            f"targets {tuple(targets.shape)} and mask {tuple(mask.shape)} must both have shape "
            f"{tuple(logits.shape[:-1])} to match logits {tuple(logits.shape)}"
        )
    if normalizer is not None and float(normalizer) <= 0:
        raise ValueError(f"normalizer must be > 0, got {float(normalizer)}")
    logits = _upcast_half(logits)
    keep = mask.bool().reshape(-1)  # (N,)
    flat_targets = targets.reshape(-1).masked_fill(~keep, 0)  # (N,)
    per_token = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), flat_targets, reduction="none")  # (N,)
    total = (per_token * keep.to(per_token.dtype)).sum()
    if normalizer is not None:
        return total / normalizer
    return total / keep.sum().clamp(min=1)


class NextTokenLoss(nn.Module):
    """Module form of ``next_token_loss``: ``forward(logits, targets, mask, normalizer=None)``."""

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        mask: Tensor,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        return next_token_loss(logits, targets, mask, normalizer=normalizer)


# --------------------------------------------------------------------------- reconstruction


def reconstruction_loss(predicted: Tensor, target: Tensor, weights: Tensor | None = None) -> Tensor:
    """Mean squared error between ``predicted`` and ``target`` (both (B, F)), averaged over rows and
    features, each feature's squared error times ``weights`` when given: (F,) for every row alike or (B, F)
    row by row (weights of mean 1 keep the scale). With standardised targets a predictor that knows nothing
    (zeros) scores about 1."""
    if predicted.shape != target.shape or predicted.ndim != 2:
        raise ValueError(f"predicted {tuple(predicted.shape)} and target {tuple(target.shape)} must both be (B, F)")
    error = (predicted.float() - target.float()).pow(2)                       # (B, F)
    if weights is not None:
        if tuple(weights.shape) not in ((target.shape[1],), tuple(target.shape)):
            raise ValueError(f"weights {tuple(weights.shape)} must have one entry per feature ({target.shape[1]},) "
                             f"or per row and feature {tuple(target.shape)}")
        error = error * weights.to(error)                                     # (B, F)
    return error.mean()


def group_weights(groups: Sequence[str]) -> Tensor:
    """Per-feature weights (F,) under which every group of features carries the same total weight:
    1 / (size of the feature's group), rescaled to mean 1."""
    if not len(groups):
        raise ValueError("group_weights needs at least one feature")
    _, inverse, counts = np.unique(np.asarray(list(groups), dtype=object), return_inverse=True, return_counts=True)
    w = 1.0 / counts[inverse]
    return torch.as_tensor(w / w.mean(), dtype=torch.float32)


class ReconstructionLoss(nn.Module):
    """A linear decoder from the embedding (B, d) to the tabular input (B, F), scored by
    ``reconstruction_loss``. The contrastive objective alone lets every user collapse onto the few claims
    of the question asked (docs/design.md §7); asking the same embedding to also give back the user's
    profile keeps what the input knew. The decoder is training-only: it is not part of the saved model.
    ``weights`` (F,): per-feature weights of the squared error (e.g. ``group_weights``); None weighs every
    feature the same."""

    def __init__(self, embed_dim: int, tabular_dim: int, weights: Tensor | None = None):
        super().__init__()
        self.decoder = nn.Linear(embed_dim, tabular_dim)
        if weights is not None and tuple(weights.shape) != (tabular_dim,):
            raise ValueError(f"weights {tuple(weights.shape)} must have one entry per feature ({tabular_dim},)")
        # not persistent: a checkpoint's decoder file holds the decoder alone, and the weights follow from the
        # config and the feature spec
        self.register_buffer("weights", None if weights is None else weights.float(), persistent=False)

    def forward(self, embeddings: Tensor, tabular: Tensor, row_weights: Tensor | None = None) -> Tensor:
        """``row_weights`` (B, F): each row's own feature weights, in place of ``weights``."""
        # unit-norm embeddings to unit RMS: otherwise the decoder needs weights ~sqrt(d) times its
        # initialisation, which AdamW at a pre-training rate of 3e-4 does not reach in a few hundred steps
        predicted = self.decoder(embeddings * embeddings.shape[-1] ** 0.5)    # (B, F)
        return reconstruction_loss(predicted, tabular, self.weights if row_weights is None else row_weights)


# --------------------------------------------------------------------------- answer sets


def answer_set_loss(anchors: Tensor, candidates: Tensor, row_group: Tensor, candidate_group: Tensor,
                    row_claim: Tensor, candidate_claim: Tensor, *, temperature: float = 0.07) -> Tensor:
    """Each anchor against every candidate answer of its own question: multi-positive InfoNCE.

    ``anchors`` (N, d) and ``candidates`` (K, d) are L2-normalised here. Row i competes over the candidates
    j with ``candidate_group[j] == row_group[i]`` (its intent's answer wordings); the positives are those
    that also state its claim (``candidate_claim[j] == row_claim[i]``):
    ``-log(Σ_pos exp(s_ij/τ) / Σ_group exp(s_ij/τ))``, averaged over the rows that have a positive and at
    least one other claim to tell it from (a question with one claim teaches nothing here)."""
    if anchors.ndim != 2 or candidates.ndim != 2 or anchors.shape[1] != candidates.shape[1]:
        raise ValueError(f"anchors (N, d) and candidates (K, d) must share d, got {tuple(anchors.shape)} "
                         f"and {tuple(candidates.shape)}")
    n, k = anchors.shape[0], candidates.shape[0]
    for name, ids, size in (("row_group", row_group, n), ("row_claim", row_claim, n),
                            ("candidate_group", candidate_group, k), ("candidate_claim", candidate_claim, k)):
        if tuple(ids.shape) != (size,):
            raise ValueError(f"{name} must have shape ({size},), got {tuple(ids.shape)}")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sims = F.normalize(anchors, dim=-1) @ F.normalize(candidates, dim=-1).T / temperature  # (N, K)
    in_group = row_group[:, None] == candidate_group[None, :]                                  # (N, K)
    positive = in_group & (row_claim[:, None] == candidate_claim[None, :])                     # (N, K)
    useful = positive.any(1) & (in_group & ~positive).any(1)                                   # (N,)
    if not bool(useful.any()):
        return sims.sum() * 0.0
    neg_inf = torch.finfo(sims.dtype).min
    all_ = torch.logsumexp(sims.masked_fill(~in_group, neg_inf), dim=1)                       # (N,)
    pos = torch.logsumexp(sims.masked_fill(~positive, neg_inf), dim=1)                        # (N,)
    return (all_ - pos)[useful].mean()


class AnswerSetLoss(nn.Module):
    """``answer_set_loss`` at a fixed temperature. In-batch answers rarely include the other claims of an
    anchor's own question (a batch holds a few rows per intent, most stating its common claim), so the
    contrastive loss alone never teaches the anchor to tell them apart (docs/design.md §7.12); this term
    puts every answer wording of the question in the candidate set."""

    def __init__(self, temperature: float = 0.07):
        super().__init__()
        self.temperature = temperature

    def forward(self, anchors: Tensor, candidates: Tensor, row_group: Tensor, candidate_group: Tensor,
                row_claim: Tensor, candidate_claim: Tensor) -> Tensor:
        return answer_set_loss(anchors, candidates, row_group, candidate_group, row_claim, candidate_claim,
                               temperature=self.temperature)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


# --------------------------------------------------------------------------- prototypes


def _num_classes(prototype_class: Tensor, n_prototypes: int) -> int:
    if tuple(prototype_class.shape) != (n_prototypes,):
        raise ValueError(
            f"prototype_class must have shape ({n_prototypes},) to match prototypes, "
            f"got {tuple(prototype_class.shape)}"
        )
    if prototype_class.numel() == 0 or int(prototype_class.min()) < 0:
        raise ValueError(f"prototype_class must hold class indices >= 0, got {prototype_class.tolist()}")
    k = int(prototype_class.max()) + 1
    missing = sorted(set(range(k)) - set(prototype_class.tolist()))
    if missing:
        raise ValueError(f"prototype_class must cover classes 0..{k - 1}; no prototype for class(es) {missing}")
    return k


def _prototype_logits(embeddings: Tensor, prototypes: Tensor, temperature: float) -> Tensor:
    if embeddings.ndim != 2 or prototypes.ndim != 2 or embeddings.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"embeddings (N, d) and prototypes (P, d) must share d, got {tuple(embeddings.shape)} "
            f"and {tuple(prototypes.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return F.normalize(embeddings, dim=-1) @ F.normalize(prototypes, dim=-1).T / temperature  # (N, P)


def prototype_scores(embeddings: Tensor, prototypes: Tensor, prototype_class: Tensor, *, temperature: float) -> Tensor:
    """Class probabilities (N, K): softmax over all prototypes, summed over each class's prototypes."""
    k = _num_classes(prototype_class, prototypes.shape[0])
    probs = _prototype_logits(embeddings, prototypes, temperature).softmax(dim=-1)  # (N, P)
    one_hot = F.one_hot(prototype_class.to(probs.device).long(), k).to(probs.dtype)  # (P, K)
    return probs @ one_hot  # (N, K)


def prototype_loss(
    embeddings: Tensor,
    prototypes: Tensor,
    labels: Tensor,
    *,
    temperature: float = 0.1,
    prototype_class: Tensor,
    class_weights: Tensor | None = None,
) -> Tensor:
    """Prototype-softmax loss of cluster-based soft prompt tuning (docs/design.md §1.6).

    K classes with m prototypes each (any m per class): ``prototypes`` (P, d), ``prototype_class``
    (P,) the class of each prototype, ``labels`` (N,) in [0, K). Embeddings and prototypes are
    L2-normalised here. Per row:
    ``-log( Σ_{p in class y} exp(e·p/τ) / Σ_all p exp(e·p/τ) )``.
    This is the multi-prototype generalisation of the paper's ``-log exp(e·p_y/τ) / Σ_k exp(e·p_k/τ)``;
    with one prototype per class it is exactly the paper's. ``class_weights`` (K,) turns the mean
    into a weighted mean ``Σ w_{y_i} ℓ_i / Σ w_{y_i}`` (as ``F.cross_entropy(weight=...)``), for
    class balancing.
    """
    k = _num_classes(prototype_class, prototypes.shape[0])
    logits = _prototype_logits(embeddings, prototypes, temperature)  # (N, P)
    n = embeddings.shape[0]
    if tuple(labels.shape) != (n,):
        raise ValueError(f"labels must have shape ({n},) to match embeddings, got {tuple(labels.shape)}")
    labels = labels.to(logits.device).long()
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
        raise ValueError(
            f"labels must lie in [0, {k}) (the classes of prototype_class), got {labels.unique().tolist()}"
        )
    in_class = labels[:, None] == prototype_class.to(logits.device)[None, :]  # (N, P)
    log_class = logits.masked_fill(~in_class, float("-inf")).logsumexp(dim=1)  # (N,)
    per_row = logits.logsumexp(dim=1) - log_class  # (N,)
    if class_weights is None:
        return per_row.mean()
    if tuple(class_weights.shape) != (k,):
        raise ValueError(f"class_weights must have shape ({k},), one per class, got {tuple(class_weights.shape)}")
    w = class_weights.to(per_row)[labels]  # (N,)
    return (w * per_row).sum() / w.sum()


class PrototypeLoss(nn.Module):
    """Learnable class prototypes and their prototype-softmax loss.

    Holds ``prototypes`` (K*m, d) as a parameter (m = ``prototypes_per_class``, laid out class by
    class) and ``prototype_class`` (K*m,) as a buffer. ``forward(embeddings, labels)`` returns
    ``prototype_loss``; ``scores(embeddings)`` returns (N, K) class probabilities. Initialise the
    prototypes from data with ``init_from(embeddings, labels)`` before training; until then they
    are random unit vectors drawn from ``generator``.
    """

    def __init__(
        self,
        num_classes: int,
        dim: int,
        *,
        prototypes_per_class: int = 1,
        temperature: float = 0.1,
        class_weights: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if num_classes < 2 or dim < 1 or prototypes_per_class < 1:
            raise ValueError(
                f"need num_classes >= 2, dim >= 1, prototypes_per_class >= 1; got {num_classes}, {dim}, "
                f"{prototypes_per_class}"
            )
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if class_weights is not None and tuple(class_weights.shape) != (num_classes,):
            raise ValueError(f"class_weights must have shape ({num_classes},), got {tuple(class_weights.shape)}")
        self.num_classes = num_classes
        self.prototypes_per_class = prototypes_per_class
        self.temperature = temperature
        init = F.normalize(torch.randn(num_classes * prototypes_per_class, dim, generator=generator), dim=-1)
        self.prototypes = nn.Parameter(init)  # (K*m, d)
        self.register_buffer(
            "prototype_class", torch.arange(num_classes).repeat_interleave(prototypes_per_class)
        )  # (K*m,)
        self.register_buffer("class_weights", None if class_weights is None else class_weights.float())

    @torch.no_grad()
    def init_from(
        self,
        embeddings: Tensor,
        labels: Tensor,
        *,
        iterations: int = 10,
        generator: torch.Generator | None = None,
    ) -> None:
        """Set each class's prototypes from its members (L2-normalised first): their normalised mean when m = 1,
        otherwise the centres of a spherical k-means (``iterations`` steps) over the class's
        embeddings, started from m members drawn with ``generator``. A class with fewer than m
        members reuses members; a class with none keeps its current prototypes."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.prototypes.shape[1]:
            raise ValueError(f"embeddings must be (N, {self.prototypes.shape[1]}), got {tuple(embeddings.shape)}")
        if tuple(labels.shape) != (embeddings.shape[0],):
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        e = F.normalize(embeddings.detach().to(self.prototypes), dim=-1)  # (N, d)
        m = self.prototypes_per_class
        for c in range(self.num_classes):
            members = e[labels.to(e.device) == c]  # (n_c, d)
            if members.shape[0] == 0:
                continue
            if m == 1:
                centres = F.normalize(members.mean(0, keepdim=True), dim=-1)  # (1, d)
            else:
                if members.shape[0] >= m:
                    pick = torch.randperm(members.shape[0], generator=generator)[:m]
                else:
                    pick = torch.randint(members.shape[0], (m,), generator=generator)
                centres = members[pick.to(e.device)].clone()  # (m, d)
                for _ in range(iterations):
                    assign = (members @ centres.T).argmax(dim=1)  # (n_c,)
                    for j in range(m):
                        chosen = members[assign == j]
                        if chosen.shape[0]:
                            centres[j] = F.normalize(chosen.mean(0), dim=-1)
            self.prototypes[c * m : (c + 1) * m] = centres

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        return prototype_loss(
            embeddings,
            self.prototypes,
            labels,
            temperature=self.temperature,
            prototype_class=self.prototype_class,
            class_weights=self.class_weights,
        )

    def scores(self, embeddings: Tensor) -> Tensor:
        """(N, K) class probabilities."""
        return prototype_scores(embeddings, self.prototypes, self.prototype_class, temperature=self.temperature)

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, prototypes_per_class={self.prototypes_per_class}, "
            f"dim={self.prototypes.shape[1]}, temperature={self.temperature}"
        )
