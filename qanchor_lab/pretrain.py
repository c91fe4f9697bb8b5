"""Joint contrastive-generative pre-training on Hugging Face Accelerate (docs/design.md §1.5).

The same entry point runs in one process or several (`torchrun --nproc_per_node 2 ...`): each process
takes its slice of every global batch, contrastive negatives are gathered across processes with
gradients flowing through the gather, and the next-token loss is normalised by the global token count,
so two processes compute the same loss and gradients as one process on the concatenated batch.
Loss curves go to `log.jsonl`; checkpoints are JSON + safetensors and resume with optimizer and schedule.
"""

from __future__ import annotations

import json
import math
import numbers
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, NamedTuple, Sequence, get_args

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from qanchor_lab.behaviour import BehaviourStore, UserBatch
from qanchor_lab.losses import AnswerSetLoss, ContrastiveLoss, ReconstructionLoss, group_weights, next_token_loss
from qanchor_lab.model import QAnchorModel
from qanchor_lab.sequence import token_ids

NegativeKind = Literal["anchor_anchor", "anchor_answer", "answer_anchor"]
Batching = Literal["random", "intent", "grid"]
FalseNegatives = Literal["answer_text", "claim", "text_or_claim"]
# How the reconstruction weighs the tabular vector's features (PretrainConfig.reconstruction_weighting)
ReconstructionWeighting = Literal["group", "feature"]
# Which features a row's embedding must give back: "all", or "intent" (those that predict its question's answers).
ReconstructionTarget = Literal["all", "intent"]
# Which tokens the next-token loss normalises over (PretrainConfig.lm_vocabulary)
LmVocabulary = Literal["full", "answers"]
TINY_LR = 3e-4  # chosen by sweep_pretrain on held-out retrieval (pretrain_val): 1e-2, 3e-3, 1e-3 and 1e-4 did worse
PRETRAINED_LR = 1e-4  # the authors' LoRA learning rate
RECONSTRUCTION_NAME = "reconstruction.safetensors"  # the training-only decoder of a checkpoint, for resuming
# PretrainConfig fields that set how long a run goes and how often it logs or saves: resuming with other values is
# what resuming is for, so `resume_changes` leaves them out
RUN_LENGTH_FIELDS = frozenset({"epochs", "max_steps", "save_every", "log_every"})
NOT_RECORDED = "not recorded"  # a field the checkpoint's config lacks: it was written before the option existed


@dataclass
class PretrainConfig:
    epochs: float = 3.0                # passes over the training QA pairs (fractions allowed)
    batch_size: int = 32               # pairs per process per step
    lr: float | None = None            # None: TINY_LR for a fully fine-tuned tiny backbone, PRETRAINED_LR with LoRA
    weight_decay: float = 1e-5         # AdamW, the paper's defaults
    beta2: float = 0.98
    eps: float = 1e-6
    warmup_ratio: float = 0.05         # linear warm-up share of the steps, then cosine decay
    grad_clip: float = 1.0
    temperature: float = 0.07          # InfoNCE temperature
    # False-negative margin: the paper's is 0.1. With intent batches it masks nearly every same-question
    # negative at initialisation (anchors start ~0.85 apart, ~0.37 from their answers), so the default
    # is None and claim masking (below) removes the known false negatives instead (docs/design.md §7).
    margin: float | None = None
    negatives: tuple[NegativeKind, ...] = ("anchor_anchor", "anchor_answer", "answer_anchor")
    alpha: float = 1.0                 # weight of the next-token loss: L = L_cl + alpha * L_ntp
    # Which tokens the next-token loss's softmax runs over. "full": the whole vocabulary (the paper's). "answers":
    # only the tokens of the training answers and eos (`answer_vocabulary`), i.e. the loss of the next token given
    # that it is an answer token. On the tiny backbone the full head (192 x 30,533, tied to the input embeddings)
    # is the largest single cost of a CPU step; over the synthetic answers' 462 tokens a step runs 1.3-1.5x faster,
    # at -0.002 probe AUC for the same number of steps (docs/design.md §7.16).
    lm_vocabulary: LmVocabulary = "full"
    # Weight of the input-reconstruction loss (losses.ReconstructionLoss): a linear decoder gives the user's
    # standardised tabular vector back from the anchor embedding, L += reconstruction * L_rec. 0 is the
    # paper's objective, under which every user collapses onto the few claims of the question asked. 5 was
    # chosen on tune users with group weighting (docs/design.md §7.10: 3, 5, 10 and 30 score alike; 5 keeps
    # 0.89 of the input's probe R^2 and lets the contrastive loss fall to 2.5-2.8, where 10 holds it at 3.3-3.4).
    reconstruction: float = 5.0
    # How the reconstruction weighs the tabular features. "group": every feature group (one modality's
    # features, or the profile's) carries the same total weight, so the default world's 12 profile columns
    # (credit limit, bureau score, income) count as much as its 99 bill columns; on tune users it raised the
    # probe AUC by 0.013-0.018 over "feature" at the same weight (docs/design.md §7.10). "feature": every
    # column the same (§7.8).
    reconstruction_weighting: ReconstructionWeighting = "group"
    # What each row's embedding reconstructs. "all": the whole tabular input, whatever the question (§7.8), so
    # every question's embedding holds the whole user and the question cannot choose (§7.39). "intent": each
    # row reconstructs the feature groups that predict its question's answers on the training users
    # (`intent_reconstruction_weights`), and every user in the batch is also asked the generic question, whose
    # embedding reconstructs the whole input: a question keeps its part of the user, the generic one keeps it all
    # (docs/design.md §7.42).
    reconstruction_target: ReconstructionTarget = "all"
    # Weight of the answer-set loss (losses.AnswerSetLoss): each anchor against every answer wording its question
    # has among the training pairs, the wordings of its own claim positive, L += answer_set * L_set. 0 is the
    # paper's objective, under which the anchor points at its question's majority answer or worse. 1 was chosen
    # on pretrain_val and tune users (docs/design.md §7.12): claim accuracy 0.44 / 0.46 -> 0.51 / 0.51 (majority
    # 0.48) at the same probe AUC; 3 costs probe AUC and retention for no further gain. A contrastive term: off
    # with use_contrastive=False
    answer_set: float = 1.0
    use_contrastive: bool = True       # ablation switch
    use_generative: bool = True        # ablation switch
    holdout_paraphrases: bool = True   # keep one paraphrase per D_uqa intent out of training, to test on
    # How rows form a batch. "random": any pairs (the paper's); most negatives then ask another question, so
    # the loss is solvable from the query text alone. "intent": each batch holds `intents_per_batch` intents,
    # its negatives are other users asked the same question, told apart only by reading the behaviour.
    # "grid": batch_size / intents_per_batch users, each asked the same intents_per_batch questions: every
    # question's negatives are the other users, and each user's prefix runs once for all its questions
    # (needs a QA table where users answer many intents; WorldConfig.qa_per_user_*).
    batching: Batching = "intent"
    intents_per_batch: int = 4         # intent/grid batching: distinct intents per batch (best a divisor of batch_size)
    # Which rows are never each other's negatives (besides the same user): "answer_text": identical answer
    # texts; "claim": answers stating the same claim of the same intent, in any wording (world.answer_claims),
    # joined with identical texts into connected groups; "text_or_claim": the same text or the same claim, pair
    # by pair. The two differ only where one text states claims of several intents: short answers shared across
    # intents (WorldConfig.terse_answer_share) chain most claims into a few groups under "claim" and mask many
    # true negatives (docs/design.md §7.14).
    false_negatives: FalseNegatives = "claim"
    # Negative kinds that false-negative mask applies to. All three: two users with the same answer are
    # not pushed apart at all; the answer kinds only: their answers are not negatives, but their anchors
    # still repel (they are different users), which keeps detail beyond the claim in the embedding.
    answer_mask_kinds: tuple[NegativeKind, ...] = ("anchor_anchor", "anchor_answer", "answer_anchor")
    max_steps: int | None = None       # stop early after this many optimizer steps
    seed: int = 0
    log_every: int = 10
    save_every: int | None = None      # checkpoint every N steps (always at the end)

    def __post_init__(self):
        self.negatives = tuple(self.negatives)
        self.answer_mask_kinds = tuple(self.answer_mask_kinds)
        for name, choices in (("batching", get_args(Batching)), ("false_negatives", get_args(FalseNegatives)),
                              ("reconstruction_weighting", get_args(ReconstructionWeighting)),
                              ("reconstruction_target", get_args(ReconstructionTarget)),
                              ("lm_vocabulary", get_args(LmVocabulary))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}; valid choices: {', '.join(map(repr, choices))}")
        # the optional settings: their default None says nothing of their kind, so a word given for a number
        # (`--set pretrain.lr=fast`) would otherwise fail deep inside torch's optimizer
        for name, whole, least in (("lr", False, None), ("margin", False, 0), ("max_steps", True, 1),
                                   ("save_every", True, 1)):
            value = getattr(self, name)
            kind = numbers.Integral if whole else numbers.Real
            if value is not None and (isinstance(value, bool) or not isinstance(value, kind)
                                      or (value <= 0 if least is None else value < least)):
                want = "an integer" if whole else "a number"
                bound = "> 0" if least is None else f">= {least}"
                raise ValueError(f"{name} must be None or {want} {bound}, got {value!r}")
        if self.intents_per_batch < 1:
            raise ValueError(f"intents_per_batch must be >= 1, got {self.intents_per_batch}")
        bad = (set(self.negatives) | set(self.answer_mask_kinds)) - {"anchor_anchor", "anchor_answer", "answer_anchor"}
        if bad:
            raise ValueError(f"negatives or answer_mask_kinds {sorted(bad)} invalid; choose from anchor_anchor, anchor_answer, answer_anchor")
        if not (self.use_contrastive or self.use_generative):
            raise ValueError("at least one of use_contrastive / use_generative must be on")
        if self.reconstruction < 0:
            raise ValueError(f"reconstruction must be >= 0, got {self.reconstruction}")
        if self.answer_set < 0:
            raise ValueError(f"answer_set must be >= 0, got {self.answer_set}")
        if self.epochs <= 0 or self.batch_size < 2:
            raise ValueError(f"epochs must be > 0 and batch_size >= 2 (got {self.epochs}, {self.batch_size})")

    @property
    def uses_answer_set(self) -> bool:
        """Whether the step adds the answer-set term (a contrastive term: off with the contrastive loss)."""
        return self.answer_set > 0 and self.use_contrastive

    def resolved_lr(self, model: QAnchorModel) -> float:
        if self.lr is not None:
            return self.lr
        return TINY_LR if model.config.resolved_finetune == "full" else PRETRAINED_LR


@dataclass
class PairSet:
    """Pre-training (user, query, answer) rows with integer ids for the false-negative masks."""

    user_index: np.ndarray   # (N,) row in the behaviour store
    queries: list[str]
    answers: list[str]
    answer_ids: np.ndarray   # (N,) or (N, k): rows sharing an id (in any column) are never each other's negatives
    intent_ids: np.ndarray   # (N,) question intent (the query text where a dataset gives no intent)
    claim_ids: np.ndarray    # (N,) the claim each answer states (world.answer_claims), one id per (intent, claim)
    # every distinct (intent, answer wording) among the rows: the candidates of the answer-set loss
    candidate_texts: list[str]
    candidate_intent: np.ndarray  # (K,) intent id of each candidate
    candidate_claim: np.ndarray   # (K,) claim id of each candidate

    def __len__(self) -> int:
        return len(self.queries)


def heldout_queries(qa: pd.DataFrame, seed: int) -> set[str]:
    """One paraphrase per D_uqa intent, reserved for evaluation (chosen by seed)."""
    rng = np.random.default_rng(seed)
    uqa = qa[qa["source"] == "uqa"]
    out = set()
    for _, group in uqa.groupby("intent", sort=True):
        texts = sorted(group["query"].unique())
        if len(texts) >= 2:
            out.add(texts[int(rng.integers(len(texts)))])
    return out


def make_pairs(qa: pd.DataFrame, store: BehaviourStore, exclude_queries: set[str] = frozenset(),
               false_negatives: FalseNegatives = "claim") -> PairSet:
    from qanchor_lab.world import answer_claims

    rows = qa[qa["user_id"].isin(store.index) & ~qa["query"].isin(exclude_queries)]
    answers = rows["answer"].astype(str).tolist()
    _, answer_ids = np.unique(np.asarray(answers, dtype=object), return_inverse=True)
    _, claim_ids = np.unique(answer_claims(rows).astype(str), return_inverse=True)
    if false_negatives == "claim":
        answer_ids = _join_ids(answer_ids, claim_ids)
    elif false_negatives == "text_or_claim":
        answer_ids = np.stack([answer_ids, claim_ids], axis=1)                  # (N, 2): masked if either matches
    intent = rows["intent"].astype(str) if "intent" in rows.columns else pd.Series("", index=rows.index)
    intent = np.where(intent.to_numpy() == "", rows["query"].astype(str).to_numpy(), intent.to_numpy())
    _, intent_ids = np.unique(intent.astype(str), return_inverse=True)
    # candidates: one entry per distinct (intent, wording), in order of first appearance
    seen = pd.DataFrame({"intent": intent_ids, "text": answers, "claim": claim_ids}).drop_duplicates(["intent", "text"])
    return PairSet(np.asarray(store.indices(rows["user_id"].tolist())), rows["query"].astype(str).tolist(),
                   answers, answer_ids.astype(np.int64), intent_ids.astype(np.int64), claim_ids.astype(np.int64),
                   seen["text"].tolist(), seen["intent"].to_numpy(np.int64), seen["claim"].to_numpy(np.int64))


def _join_ids(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """One id per connected group of rows that share an `a` id or a `b` id (e.g. the same answer text
    or the same claim: "No spending is recorded." states a claim of two intents, and both are masked)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    if not len(a):
        return a
    n = int(a.max()) + 1 + int(b.max()) + 1                # nodes: a ids, then b ids; an edge per row
    _, comp = connected_components(coo_matrix((np.ones(len(a)), (a, a.max() + 1 + b)), shape=(n, n)), directed=False)
    return np.unique(comp[a], return_inverse=True)[1].astype(np.int64)


def epoch_batches(pairs: PairSet, config: PretrainConfig, epoch: int, world_size: int = 1) -> list[list[np.ndarray]]:
    """One epoch's steps; each step is a list of world_size arrays of pair rows (one per process).

    "random" and "intent" slice `epoch_order` into global batches. "grid" crosses groups of
    batch_size / intents_per_batch users with groups of intents_per_batch intents; pairs a user lacks are
    left out, so a step holds at most batch_size rows per process. Users that do not fill a last group
    wait for the next epoch's shuffle. The number of steps is the same every epoch."""
    global_batch = config.batch_size * world_size
    if config.batching != "grid":
        order = epoch_order(pairs, config, epoch, global_batch)
        return [[order[s * global_batch + r * config.batch_size: s * global_batch + (r + 1) * config.batch_size]
                 for r in range(world_size)] for s in range(len(pairs) // global_batch)]
    rng = np.random.default_rng([config.seed, epoch])
    users, user_pos = np.unique(pairs.user_index, return_inverse=True)
    n_int = int(pairs.intent_ids.max()) + 1
    grid = np.full((len(users), n_int), -1, np.int64)                           # (U, I) pair row or -1
    grid[user_pos, pairs.intent_ids] = np.arange(len(pairs))
    k, u = config.intents_per_batch, max(1, config.batch_size // config.intents_per_batch)
    user_groups = rng.permutation(len(users))[: len(users) // (u * world_size) * u * world_size].reshape(-1, u * world_size)
    steps = []
    for g in user_groups:
        order = rng.permutation(n_int)
        for j in range(0, n_int, k):
            block = grid[np.ix_(g, order[j:j + k])]                              # (u * W, k)
            steps.append([block[r * u:(r + 1) * u].ravel() for r in range(world_size)])
    steps = [[rows[rows >= 0] for rows in steps[i]] for i in rng.permutation(len(steps))]
    return steps


def grid_empty_steps(pairs: PairSet, config: PretrainConfig, total_steps: int, steps_per_epoch: int,
                     world_size: int = 1) -> np.ndarray:
    """Steps (1-based) among the run's first `total_steps`, over every epoch, in which some process gets no pair.
    Only "grid" plans such steps (a block where none of the chosen users answers the chosen intents), and a step
    with nothing to tokenize cannot run. (A single pair can: it has no in-batch negative, only its other losses.)"""
    empty = []
    for epoch in range(math.ceil(total_steps / steps_per_epoch)):
        plan = epoch_batches(pairs, config, epoch, world_size)[: total_steps - epoch * steps_per_epoch]
        least = np.array([min(len(rows) for rows in ranks) for ranks in plan])  # (S,) smallest share of each step
        empty += (epoch * steps_per_epoch + 1 + np.flatnonzero(least == 0)).tolist()
    return np.asarray(empty, dtype=np.int64)


def epoch_order(pairs: PairSet, config: PretrainConfig, epoch: int, global_batch: int) -> np.ndarray:
    """Row order of one epoch; consecutive `global_batch` rows form a step's batch.

    "random": a permutation. "intent": rows of one intent are cut into chunks of
    global_batch / intents_per_batch, chunks are shuffled and laid end to end, so every batch holds that
    many intents; rows left over at each intent's tail are shuffled into mixed chunks (nothing is skipped)."""
    rng = np.random.default_rng([config.seed, epoch])
    if config.batching == "random":
        return rng.permutation(len(pairs))
    per = max(1, global_batch // config.intents_per_batch)  # rows of one intent side by side
    chunks, rest = [], []
    for i in range(int(pairs.intent_ids.max()) + 1 if len(pairs) else 0):
        rows = rng.permutation(np.flatnonzero(pairs.intent_ids == i))
        full = len(rows) // per * per
        chunks += list(rows[:full].reshape(-1, per))
        rest.append(rows[full:])
    rest = rng.permutation(np.concatenate(rest)) if rest else np.zeros(0, np.int64)
    chunks += [rest[j:j + per] for j in range(0, len(rest), per)]
    order = [chunks[j] for j in rng.permutation(len(chunks))]
    order.sort(key=lambda c: len(c) < per)  # stable: a short last chunk goes to the end, batches stay aligned
    return np.concatenate(order) if order else rest


@dataclass
class StepBatch:
    """One process's rows of one optimisation step, gathered as the step module reads them."""

    rows: np.ndarray                 # (N,) rows of the PairSet
    users: UserBatch                 # behaviour of the distinct users (U <= N) if user_rows is set, else of each row
    user_rows: np.ndarray | None     # (N,) each row's user within `users`; None when no user repeats
    queries: list[str]               # (N,)
    answers: list[str]               # (N,)
    user_index: np.ndarray           # (N,) store row of each row's user: same user is never a negative
    answer_ids: np.ndarray           # (N,) or (N, k): a shared id = never each other's negatives (losses.shared_ids)
    intent_ids: np.ndarray           # (N,) question intent of each row
    answer_set: "AnswerSet"          # the rows' claims and every answer wording of their intents

    def __len__(self) -> int:
        return len(self.rows)


class AnswerSet(NamedTuple):
    """What the answer-set loss reads for one batch (losses.answer_set_loss)."""

    row_intent: np.ndarray | torch.Tensor        # (N,) intent id of each row
    row_claim: np.ndarray | torch.Tensor         # (N,) claim id of each row
    texts: list[str]                             # (K,) every answer wording of the batch's intents
    candidate_intent: np.ndarray | torch.Tensor  # (K,)
    candidate_claim: np.ndarray | torch.Tensor   # (K,)
    # (N,) each row's own (intent, wording) among the candidates: the answer tower runs once per step, over
    # the candidates, and the contrastive loss reads each row's answer from there. None: a pass of its own.
    row_candidate: np.ndarray | torch.Tensor | None = None

    def to(self, device) -> "AnswerSet":
        t = lambda x: torch.as_tensor(x, device=device)  # noqa: E731
        return AnswerSet(t(self.row_intent), t(self.row_claim), self.texts, t(self.candidate_intent),
                         t(self.candidate_claim), None if self.row_candidate is None else t(self.row_candidate))


def make_step_batch(pairs: PairSet, rows: np.ndarray, store: BehaviourStore) -> StepBatch:
    """The batch of these pair rows (one entry of `epoch_batches`): a user asked several questions in the
    step gets one prefix, run once and cached for each of its questions."""
    rows = np.asarray(rows)
    user_index = pairs.user_index[rows]
    uniq, user_rows = np.unique(user_index, return_inverse=True)
    repeated = len(uniq) < len(rows)
    intents = pairs.intent_ids[rows]
    answers = [pairs.answers[i] for i in rows]
    cand = np.flatnonzero(np.isin(pairs.candidate_intent, intents))
    texts = [pairs.candidate_texts[i] for i in cand]
    # every row's (intent, wording) is a candidate of its intent (make_pairs), so its answer is among `texts`
    position = {key: k for k, key in enumerate(zip(pairs.candidate_intent[cand].tolist(), texts))}
    row_candidate = np.array([position[key] for key in zip(intents.tolist(), answers)], dtype=np.int64)
    answer_set = AnswerSet(intents, pairs.claim_ids[rows], texts, pairs.candidate_intent[cand],
                           pairs.candidate_claim[cand], row_candidate)
    return StepBatch(rows, store.batch(uniq if repeated else user_index), user_rows if repeated else None,
                     [pairs.queries[i] for i in rows], answers, user_index, pairs.answer_ids[rows], intents, answer_set)


def make_optimizer(model: "QAnchorModel | PretrainStep", config: PretrainConfig, total_steps: int | None):
    """AdamW over the trainable parameters of the model or of the step module (which adds the training-only
    reconstruction decoder), with linear warm-up then cosine decay over `total_steps`: (optimizer,
    scheduler). `total_steps=None`: no schedule (None), the peak rate throughout (a hand step; the
    schedule's warm-up starts at rate 0)."""
    from transformers import get_cosine_schedule_with_warmup

    params = [p for p in model.parameters() if p.requires_grad]
    qanchor = model.model if isinstance(model, PretrainStep) else model
    # the fused kernel updates every tensor in one pass, a tenth of a CPU step less than the per-tensor loop and the
    # same update up to float rounding (docs/design.md §7.49); torch has it for CPU and CUDA tensors
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for p in params) or None
    optimizer = torch.optim.AdamW(params, lr=config.resolved_lr(qanchor), betas=(0.9, config.beta2), eps=config.eps,
                                  weight_decay=config.weight_decay, fused=fused)
    if total_steps is None:
        return optimizer, None
    scheduler = get_cosine_schedule_with_warmup(optimizer, max(1, int(config.warmup_ratio * total_steps)), total_steps)
    return optimizer, scheduler


class StepLosses(NamedTuple):
    """What one pre-training forward gives: the total and its parts (parts detached)."""

    loss: torch.Tensor            # contrastive + alpha * next-token + the weighted reconstruction and answer-set terms
    contrastive: torch.Tensor
    ntp: torch.Tensor             # next-token
    reconstruction: torch.Tensor  # 0 when PretrainConfig.reconstruction is 0
    n_tokens: torch.Tensor        # tokens through the decoder
    answer_set: torch.Tensor | float = 0.0  # 0 when PretrainConfig.answer_set is 0

    def parts(self) -> dict[str, float]:
        """The losses by name, as floats (for logs and tables)."""
        return {"loss": float(self.loss), "contrastive": float(self.contrastive), "ntp": float(self.ntp),
                "reconstruction": float(self.reconstruction), "answer_set": float(self.answer_set)}


def step_forward(module: "PretrainStep", batch: StepBatch, ntp_normalizer: float, device=None) -> StepLosses:
    """The step module's losses on one batch; `ntp_normalizer` is the number of answer tokens the next-token
    loss averages over (`count_answer_tokens` in one process)."""
    device = device if device is not None else next(module.parameters()).device
    return module(batch.users, batch.queries, batch.answers, torch.as_tensor(batch.user_index, device=device),
                  torch.as_tensor(batch.answer_ids, device=device), ntp_normalizer,
                  None if batch.user_rows is None else torch.as_tensor(batch.user_rows, device=device),
                  answer_set=batch.answer_set.to(device), intent_ids=torch.as_tensor(batch.intent_ids, device=device))


def training_step(module: "PretrainStep", batch: StepBatch, optimizer, scheduler=None, *, ntp_normalizer: float,
                  grad_clip: float | None = None, accelerator=None) -> StepLosses:
    """One optimisation step: forward, backward, gradient clipping, AdamW update and schedule step.
    Returns the losses measured before the update. Without an `accelerator` it runs as plain PyTorch in
    one process (the notebooks' hand step). The optimizer should hold the step module's parameters
    (`make_optimizer(module, ...)`), which include the reconstruction decoder."""
    device = accelerator.device if accelerator is not None else None
    out = step_forward(module, batch, ntp_normalizer, device)
    if accelerator is not None:
        accelerator.backward(out.loss)
    else:
        out.loss.backward()
    if grad_clip:
        clip = accelerator.clip_grad_norm_ if accelerator is not None else torch.nn.utils.clip_grad_norm_
        clip(module.parameters(), grad_clip)
    optimizer.step()
    # a plain schedule (pretrain keeps it out of acc.prepare) does not know of a mixed-precision step the
    # accelerated optimizer skipped on overflow; AcceleratedScheduler held still then, and so does this
    if scheduler is not None and not getattr(optimizer, "step_was_skipped", False):
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return out._replace(loss=out.loss.detach())


def answer_vocabulary(model: QAnchorModel, answers: Sequence[str]) -> torch.Tensor:
    """Sorted ids of every token the next-token loss can predict for these answers (as `build_suffix`
    tokenises them, truncation included) and eos: the vocabulary of PretrainConfig.lm_vocabulary="answers"."""
    ids = token_ids(model.tokenizer, sorted(set(answers)), model.config.max_answer_tokens)
    tokens = {t for row in ids for t in row} | {model.tokenizer.eos_token_id}
    return torch.tensor(sorted(tokens), dtype=torch.long)                          # (K,)


def reconstruction_base_weights(model: QAnchorModel, config: PretrainConfig) -> torch.Tensor | None:
    """The reconstruction's per-feature weights (F,) before any question: `group_weights` of the model's feature
    groups under reconstruction_weighting="group", None (every feature 1) under "feature"."""
    return group_weights(model.feature_spec.feature_groups()) if config.reconstruction_weighting == "group" else None


def intent_reconstruction_weights(pairs: PairSet, tabular, groups: Sequence[str], base_weights=None, *,
                                  folds: int = 3, min_share: float = 0.01) -> torch.Tensor:
    """Per-intent feature weights (I, F) of the reconstruction (PretrainConfig.reconstruction_target="intent").

    For each intent, the training users asked it (one answer each) and the claim their answer states: the
    relevance of a feature group is the cross-validated R^2 (`folds`-fold ridge, clipped at 0) with which that
    group's columns of `tabular` (U_store, F) predict the claim (one-hot). A feature's weight is its group's
    relevance times `base_weights` (F,) (e.g. `group_weights`; None = 1), each intent's row rescaled to mean 1
    so that it keeps the reconstruction's scale. An intent whose groups predict almost nothing (relevances
    summing to <= `min_share`) or that has one claim gets `base_weights` itself, as "all" does. Deterministic:
    unshuffled folds over the users in store order."""
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import cross_val_predict

    x = np.asarray(tabular, dtype=np.float64)                                   # (U_store, F)
    groups = np.asarray(list(groups), dtype=object)
    if len(groups) != x.shape[1]:
        raise ValueError(f"{len(groups)} feature groups for {x.shape[1]} tabular columns")
    names, column_group = np.unique(groups.astype(str), return_inverse=True)     # (G,), (F,)
    n_intents = int(pairs.intent_ids.max()) + 1 if len(pairs) else 0
    relevance = np.zeros((n_intents, len(names)))                               # (I, G)
    for i in range(n_intents):
        rows = np.flatnonzero(pairs.intent_ids == i)
        users, first = np.unique(pairs.user_index[rows], return_index=True)
        claims = pairs.claim_ids[rows[first]]
        classes = np.unique(claims)
        if len(classes) < 2 or len(users) < 2 * folds:
            continue
        y = (claims[:, None] == classes[None, :]).astype(np.float64)             # (n, C)
        total = ((y - y.mean(0)) ** 2).sum()
        xu = x[users]                                                            # (n, F)
        for g in range(len(names)):
            fit = cross_val_predict(RidgeCV(alphas=np.logspace(-1, 4, 12)), xu[:, column_group == g], y, cv=folds)
            relevance[i, g] = max(0.0, 1.0 - ((y - fit) ** 2).sum() / total)
    by_group = np.where(relevance.sum(1, keepdims=True) > min_share, relevance, 1.0)  # (I, G)
    base = np.ones(x.shape[1]) if base_weights is None else np.asarray(base_weights, dtype=np.float64)
    weights = by_group[:, column_group] * base[None, :]                         # (I, F)
    return torch.as_tensor(weights / weights.mean(1, keepdims=True), dtype=torch.float32)


class PretrainStep(torch.nn.Module):
    """Model + losses as one module, so DDP sees a single forward; it returns `StepLosses`. With
    `lm_vocabulary="answers"` it needs the training answers (`pairs.answers`) to build that vocabulary; with
    `reconstruction_target="intent"` the per-intent feature weights (`intent_reconstruction_weights`)."""

    def __init__(self, model: QAnchorModel, config: PretrainConfig, answers: Sequence[str] | None = None,
                 intent_weights: torch.Tensor | None = None):
        super().__init__()
        self.model = model
        self.config = config
        if config.lm_vocabulary == "answers":
            if answers is None:
                raise ValueError('lm_vocabulary="answers" needs the training answers: '
                                 'PretrainStep(model, config, answers=pairs.answers)')
            self.register_buffer("lm_vocab", answer_vocabulary(model, answers).to(model.device), persistent=False)
        else:
            self.lm_vocab = None
        self.contrastive = ContrastiveLoss(temperature=config.temperature, margin=config.margin, negatives=config.negatives,
                                           answer_id_kinds=config.answer_mask_kinds)
        self.reconstruction = None
        if config.reconstruction > 0:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.seed)  # the same decoder for the same seed, whatever ran before
                self.reconstruction = ReconstructionLoss(model.config.embed_dim, model.config.tabular_dim,
                                                         reconstruction_base_weights(model, config))
        self.generic_query = None
        if self.reconstruction is not None and config.reconstruction_target == "intent":
            from qanchor_lab.pipeline import GENERIC_QUERY

            if intent_weights is None or intent_weights.ndim != 2 or intent_weights.shape[1] != model.config.tabular_dim:
                raise ValueError('reconstruction_target="intent" needs the per-intent feature weights (I, '
                                 f'{model.config.tabular_dim}): PretrainStep(model, config, '
                                 'intent_weights=intent_reconstruction_weights(pairs, store.tabular, groups, base))')
            self.register_buffer("intent_weights", intent_weights.float().to(model.device), persistent=False)
            self.generic_query = GENERIC_QUERY
        self.answer_set_loss = AnswerSetLoss(config.temperature) if config.uses_answer_set else None

    def forward(self, users, queries, answers, user_ids, answer_ids, ntp_normalizer, user_rows=None,
                answer_set: AnswerSet | None = None, intent_ids: torch.Tensor | None = None):
        c = self.config
        n_users = len(users.tabular)                                                # U (or N: no user repeats)
        with_set = self.answer_set_loss is not None and answer_set is not None and len(answer_set.texts) > 0
        # the batch's answers are among the answer-set candidates: one pass of the answer tower serves both
        # terms (the same embeddings and gradients as two passes, about a seventh of a step less: docs/design.md §7.49)
        shared = with_set and answer_set.row_candidate is not None
        out = self.model(users, queries, answers, user_rows=user_rows, with_answer_tower=c.use_contrastive and not shared,
                         with_lm=c.use_generative, lm_vocab=self.lm_vocab,
                         user_queries=None if self.generic_query is None else [self.generic_query] * n_users)
        if with_set:
            candidates = self.model.embed_answers(answer_set.texts)                 # (K, d)
            if shared:
                out["answer"] = candidates[answer_set.row_candidate]                # (N, d)
        zero = out["anchor"].sum() * 0.0
        cl = self.contrastive(out["anchor"], out["answer"], user_ids=user_ids, answer_ids=answer_ids) if c.use_contrastive else zero
        if c.use_generative:
            logits, targets = out["lm_logits"], out["lm_targets"]
            ntp = next_token_loss(logits, targets, torch.ones_like(targets, dtype=torch.bool), normalizer=ntp_normalizer)
        else:
            ntp = zero
        if self.reconstruction is not None:
            tabular = users.tabular.to(out["anchor"].device)                        # (U or N, F)
            per_row = tabular if user_rows is None else tabular[user_rows]          # (N, F)
            if self.generic_query is None:
                rec = self.reconstruction(out["anchor"], per_row)
            else:
                # each row gives back its question's part of the user, each user's generic anchor all of it
                if intent_ids is None:
                    raise ValueError('reconstruction_target="intent" needs each row\'s intent_ids')
                base = self.reconstruction.weights
                base = torch.ones_like(tabular[0]) if base is None else base                # (F,)
                weights = torch.cat([self.intent_weights[intent_ids], base.expand_as(tabular)])   # (N+U, F)
                rec = self.reconstruction(torch.cat([out["anchor"], out["user_anchor"]]),         # (N+U, d)
                                          torch.cat([per_row, tabular]), weights)
        else:
            rec = zero
        if with_set:
            in_set = self.answer_set_loss(out["anchor"], candidates, answer_set.row_intent, answer_set.candidate_intent,
                                          answer_set.row_claim, answer_set.candidate_claim)
        else:
            in_set = zero
        loss = cl + c.alpha * ntp + c.reconstruction * rec + c.answer_set * in_set
        return StepLosses(loss, cl.detach(), ntp.detach(), rec.detach(), out["n_tokens"], in_set.detach())


def _global_sum(x: float, device) -> float:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([x], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        return float(t.item())
    return x


def count_answer_tokens(model: QAnchorModel, answers: Sequence[str]) -> int:
    """Tokens the next-token loss predicts for these answers (answer tokens + eos)."""
    ids = token_ids(model.tokenizer, answers, model.config.max_answer_tokens)
    return sum(len(i) + 1 for i in ids)


def pretrain(
    model: QAnchorModel,
    world,
    config: PretrainConfig,
    out_dir,
    *,
    accelerator=None,
    resume_from=None,
    show_progress: bool = True,
    store: BehaviourStore | None = None,
) -> dict:
    """Pre-train `model` in place on the world's pre-training QA pairs; returns a summary dict."""
    from accelerate import Accelerator

    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available())
    out_dir = Path(out_dir)
    rank, world_size = acc.process_index, acc.num_processes
    torch.manual_seed(config.seed)

    users = world.users_in("pretrain")
    store = store or model.behaviour(world.events, world.profiles, users)
    exclude = heldout_queries(world.qa, config.seed) if config.holdout_paraphrases else set()
    pairs = make_pairs(world.qa, store, exclude, config.false_negatives)
    global_batch = config.batch_size * world_size
    steps_per_epoch = len(epoch_batches(pairs, config, 0, world_size))
    if steps_per_epoch < 1:
        raise ValueError(f"{len(pairs)} training pairs cannot fill one global batch of {global_batch}")
    total_steps = math.ceil(config.epochs * steps_per_epoch)
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if config.batching == "grid":
        empty = grid_empty_steps(pairs, config, total_steps, steps_per_epoch, world_size)
        if len(empty):
            # the whole plan is known now: fail before training, not deep in the tokenizer at the first such step
            raise ValueError(f'batching="grid" plans {len(empty)} of {total_steps} steps in which a process gets no '
                             f'QA pair (first at step {empty[0]}): none of the chosen users answers the chosen '
                             f'intents. Use batching="intent", or a QA table where each user answers more intents '
                             f'(WorldConfig.qa_per_user_min / qa_per_user_max)')

    lr = config.resolved_lr(model)
    if not config.use_contrastive and not config.reconstruction:
        # the projection head gets no gradient; DDP needs every trainable parameter used
        for p in model.head.parameters():
            p.requires_grad_(False)
    intent_weights = None
    if config.reconstruction > 0 and config.reconstruction_target == "intent":
        intent_weights = intent_reconstruction_weights(pairs, store.tabular, model.feature_spec.feature_groups(),
                                                       reconstruction_base_weights(model, config))
    module = PretrainStep(model, config, answers=pairs.answers, intent_weights=intent_weights)
    optimizer, scheduler = make_optimizer(module, config, total_steps)
    step = 0
    if resume_from is not None:
        step = _resume(resume_from, module, optimizer, scheduler, config)
    # the schedule stays out of acc.prepare: Accelerate's AcceleratedScheduler steps it once per process at each
    # optimizer step (split_batches=False, whatever accelerator the caller passed), so under N processes the warm-up
    # and cosine would run N times too fast; `total_steps` counts optimizer steps, and training_step steps it once
    module, optimizer = acc.prepare(module, optimizer)

    log_path = out_dir / "log.jsonl"
    if acc.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None and log_path.exists():
            log_path.unlink()
    module.train()
    t0 = time.perf_counter()
    tokens_seen = 0
    bar = tqdm(total=total_steps, initial=step, desc="pre-training", disable=not (show_progress and acc.is_main_process))
    last = {}
    batches = None
    while step < total_steps:
        epoch, k = divmod(step, steps_per_epoch)
        if k == 0 or batches is None:
            batches = epoch_batches(pairs, config, epoch, world_size)
        batch = make_step_batch(pairs, batches[k][rank], store)
        n_tok_global = _global_sum(count_answer_tokens(model, batch.answers), acc.device)
        losses = training_step(module, batch, optimizer, scheduler, ntp_normalizer=n_tok_global / world_size,
                               grad_clip=config.grad_clip, accelerator=acc)
        step += 1
        tokens_seen += int(losses.n_tokens)
        bar.update(1)
        last = {"step": step, "epoch": round(step / steps_per_epoch, 4), **losses.parts(),
                "lr": scheduler.get_last_lr()[0], "seconds": round(time.perf_counter() - t0, 3)}
        if acc.is_main_process and (step % config.log_every == 0 or step == total_steps):
            with log_path.open("a") as f:
                f.write(json.dumps(last) + "\n")
            bar.set_postfix(loss=f"{last['loss']:.3f}", cl=f"{last['contrastive']:.3f}", ntp=f"{last['ntp']:.3f}",
                            **({"rec": f"{last['reconstruction']:.3f}"} if config.reconstruction else {}),
                            **({"set": f"{last['answer_set']:.3f}"} if config.uses_answer_set else {}))
        if config.save_every and step % config.save_every == 0 and step < total_steps:
            save_checkpoint(acc.unwrap_model(module), optimizer, scheduler, step, config, out_dir / f"checkpoint-{step}", acc)
    bar.close()
    seconds = time.perf_counter() - t0
    save_checkpoint(acc.unwrap_model(module), optimizer, scheduler, step, config, out_dir, acc)
    module.eval()
    summary = {"steps": step, "pairs": len(pairs), "heldout_queries": len(exclude), "lr": lr, "seconds": seconds,
               "tokens": tokens_seen, "tokens_per_second": tokens_seen / max(seconds, 1e-9), "last": last}
    if acc.is_main_process:
        (out_dir / "pretrain_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def save_checkpoint(model: "QAnchorModel | PretrainStep", optimizer, scheduler, step: int, config: PretrainConfig,
                    directory, acc=None) -> None:
    """Model (JSON + safetensors) plus optimizer tensors (safetensors) and trainer state (JSON); no pickle.
    Given the step module, its training-only reconstruction decoder is saved too, for resuming."""
    if acc is not None and not acc.is_main_process:
        acc.wait_for_everyone()
        return
    directory = Path(directory)
    if isinstance(model, PretrainStep):
        if model.reconstruction is not None:
            directory.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in model.reconstruction.state_dict().items()},
                      directory / RECONSTRUCTION_NAME)
        model = model.model
    model.save_pretrained(directory)
    state = optimizer.state_dict()
    tensors, meta = {}, {}
    for pid, pstate in state["state"].items():
        for k, v in pstate.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                meta[f"{pid}.{k}"] = v
    save_file(tensors, directory / "optimizer.safetensors")
    trainer = {"step": step, "config": asdict(config), "param_groups": state["param_groups"],
               "optimizer_scalars": meta, "scheduler": scheduler.state_dict()}
    (directory / "trainer_state.json").write_text(json.dumps(trainer, indent=2, default=_jsonable))
    if acc is not None:
        acc.wait_for_everyone()


def _jsonable(x):
    if isinstance(x, (np.generic,)):
        return x.item()
    if torch.is_tensor(x):
        return x.item()
    raise TypeError(f"cannot store {type(x).__name__} in trainer_state.json")


def resume_changes(directory, config: PretrainConfig) -> dict[str, tuple]:
    """How `config` differs from the config the checkpoint in `directory` was trained with:
    {field: (checkpoint's value, config's value)}. A field the checkpoint does not record (it predates the
    option, e.g. `answer_set` before docs/design.md §7.12) shows as NOT_RECORDED; RUN_LENGTH_FIELDS are left out."""
    path = Path(directory) / "trainer_state.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a pre-training checkpoint: it has no trainer_state.json")
    saved = json.loads(path.read_text()).get("config", {})
    now = json.loads(json.dumps(asdict(config)))  # tuples as lists, the way the checkpoint stores them
    return {k: (saved.get(k, NOT_RECORDED), v) for k, v in now.items()
            if k not in RUN_LENGTH_FIELDS and saved.get(k, NOT_RECORDED) != v}


def _resume(directory, module: "PretrainStep", optimizer, scheduler, config: PretrainConfig) -> int:
    """Load a checkpoint's optimizer, schedule and reconstruction decoder into this run; returns its step.
    A config that differs from the checkpoint's is said in a warning (the run then continues under the new
    objective); one that trains other parameters than the checkpoint holds is a clear error."""
    changes = resume_changes(directory, config)
    said = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    if changes:
        warnings.warn(f"resuming {directory} with a pre-training config that differs from the one it was trained "
                      f"with ({said}); pass the checkpoint's values to continue it unchanged", UserWarning, stacklevel=3)
    decoder = Path(directory) / RECONSTRUCTION_NAME
    if module.reconstruction is not None and not decoder.exists():
        raise ValueError(f"cannot resume {directory} with reconstruction={config.reconstruction}: the checkpoint has no "
                         f"reconstruction decoder (it was trained with reconstruction=0); resume with reconstruction=0")
    try:
        step = load_trainer_state(directory, optimizer, scheduler)
    except (ValueError, KeyError) as e:
        raise ValueError(f"cannot resume {directory}: its optimizer state does not match the parameters this run trains"
                         f" ({said or 'same config'}); resume with the checkpoint's config") from e
    if module.reconstruction is not None:
        module.reconstruction.load_state_dict(load_file(decoder))
    return step


def load_trainer_state(directory, optimizer, scheduler) -> int:
    directory = Path(directory)
    trainer = json.loads((directory / "trainer_state.json").read_text())
    tensors = load_file(directory / "optimizer.safetensors")
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in trainer["optimizer_scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": trainer["param_groups"]})
    scheduler.load_state_dict(trainer["scheduler"])
    return int(trainer["step"])
