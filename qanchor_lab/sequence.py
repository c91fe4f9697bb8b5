"""Sequence assembly, in one place (docs/design.md §1.3).

    prefix: [user] [modality tokens] [<m_start> event tokens <m_end>] for each modality [<profile_start> tabular <profile_end>]
    suffix: [soft prompt] query <user_emb> [answer <eos>]      (or query [soft prompt] <user_emb>)

The prefix depends only on behaviour; everything task-dependent sits in the suffix, so a prefix can be
computed once into a KV cache and any number of suffixes run on top of it (prefix equivalence, docs/design.md §2).
Within a row, real prefix tokens are packed to the front and the row is right-padded to the batch's
longest prefix; the suffix follows the padded prefix. Padding is masked out of attention and skipped by
the position ids (`cumsum(mask) - 1`), so a row's embedding does not depend on what it is batched with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from qanchor_lab.encoder import EncodedUser
from qanchor_lab.schema import TABULAR_MODALITY

IGNORE = -100


@dataclass
class Prefix:
    embeds: torch.Tensor  # (B, P, H)
    mask: torch.Tensor    # (B, P) bool
    lengths: torch.Tensor  # (B,) number of real prefix tokens


@dataclass
class Suffix:
    input_ids: torch.Tensor     # (B, S) token ids, pad where masked
    mask: torch.Tensor          # (B, S) bool, over prompt slots + tokens
    pool_index: torch.Tensor    # (B,) index of <user_emb> within the suffix
    targets: torch.Tensor       # (B, S) next-token target for each position, IGNORE where none
    n_prompt: int               # soft-prompt slots per row (their ids are pad; embeddings come from the prompt)
    prompt_index: torch.Tensor  # (B, n_prompt) where each row's prompt slots sit: 0..n-1, or after the query

    def tile(self, n: int) -> "Suffix":
        """The batch repeated n times (row order r0..rQ, r0..rQ, ...): tokenise Q queries once for n users."""
        return Suffix(self.input_ids.repeat(n, 1), self.mask.repeat(n, 1), self.pool_index.repeat(n),
                      self.targets.repeat(n, 1), self.n_prompt, self.prompt_index.repeat(n, 1))

    def rows(self, index: torch.Tensor) -> "Suffix":
        """The rows at `index` (repeats allowed), in that order."""
        return Suffix(self.input_ids[index], self.mask[index], self.pool_index[index], self.targets[index],
                      self.n_prompt, self.prompt_index[index])


def pack_left(embeds: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Move each row's real tokens to the front (stable) and trim to the longest row."""
    order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)          # (B, L) real first
    mask = torch.gather(mask, 1, order)                                         # (B, L)
    embeds = torch.gather(embeds, 1, order.unsqueeze(-1).expand_as(embeds))     # (B, L, H)
    width = int(mask.sum(1).max().item()) if mask.numel() else 0
    return embeds[:, :width], mask[:, :width]


@dataclass
class PrefixPart:
    """One block of the prefix layout before packing: what its tokens are and which are real."""

    kind: str                # "user" | "modality" | "start" | "event" | "end" | "tabular"
    modality: str | None     # the block's modality (None for the user token and the modality tokens)
    embeds: torch.Tensor     # (B, n, H)
    mask: torch.Tensor       # (B, n) bool, True = real token


def prefix_parts(enc: EncodedUser, special: dict[str, torch.Tensor], modalities: Sequence[str]) -> list[PrefixPart]:
    """The prefix blocks in layout order; `special` maps "<m_start>"/"<m_end>" to (H,) embeddings.
    `assemble_prefix` concatenates and packs exactly these (anatomy.py labels tokens by them)."""
    parts: list[PrefixPart] = []
    some = next(iter(enc.events.values()))
    B, device = some.shape[0], some.device
    ones = torch.ones(B, 1, dtype=torch.bool, device=device)

    def add_special(kind: str, m: str) -> None:
        name = f"<{m}_{kind}>"
        parts.append(PrefixPart(kind, m, special[name].view(1, 1, -1).expand(B, 1, -1), ones))

    if enc.user is not None:
        parts.append(PrefixPart("user", None, enc.user, ones))
    if enc.modality is not None:
        parts.append(PrefixPart("modality", None, enc.modality, enc.modality_mask))
    for m in modalities:
        add_special("start", m)
        parts.append(PrefixPart("event", m, enc.events[m], enc.event_masks[m]))
        add_special("end", m)
    if enc.tabular is not None:
        add_special("start", TABULAR_MODALITY)
        parts.append(PrefixPart("tabular", TABULAR_MODALITY, enc.tabular, ones.expand(B, enc.tabular.shape[1])))
        add_special("end", TABULAR_MODALITY)
    return parts


def assemble_prefix(enc: EncodedUser, special: dict[str, torch.Tensor], modalities: Sequence[str]) -> Prefix:
    """Lay out the behaviour tokens; `special` maps "<m_start>"/"<m_end>" to (H,) embeddings."""
    parts = prefix_parts(enc, special, modalities)
    embeds, mask = pack_left(torch.cat([p.embeds for p in parts], 1), torch.cat([p.mask for p in parts], 1))  # (B, P, H), (B, P)
    return Prefix(embeds, mask, mask.sum(1))


def token_ids(tokenizer, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Token ids of queries or answers as the model reads them in a suffix: no special tokens (the suffix lays
    out its own <user_emb> and eos) and at most `max_tokens` each (QAnchorConfig.max_query_tokens or
    max_answer_tokens). Every path that tokenises suffix text goes through here, so the ids a cache extension,
    a prompt initialisation, the answer tower or a loss count see are the ids `build_suffix` lays out."""
    texts = list(texts)
    if not texts:   # a fast tokenizer fails on an empty batch
        return []
    return tokenizer(texts, add_special_tokens=False, truncation=True, max_length=max_tokens)["input_ids"]


def pad_right(ids: Sequence[Sequence[int]], pad: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of token ids right-padded with `pad` to the longest: (tokens (B, L) long, mask (B, L) bool)."""
    width = max((len(i) for i in ids), default=0)
    tokens = torch.tensor([list(i) + [pad] * (width - len(i)) for i in ids], dtype=torch.long,
                          device=device).view(len(ids), width)                   # (B, L)
    mask = torch.tensor([[True] * len(i) + [False] * (width - len(i)) for i in ids], dtype=torch.bool,
                        device=device).view(len(ids), width)                     # (B, L)
    return tokens, mask


def build_suffix(
    tokenizer,
    queries: Sequence[str],
    *,
    user_emb_id: int,
    answers: Sequence[str] | None = None,
    n_prompt: int = 0,
    prompt_after_query: bool = False,
    max_query_tokens: int = 48,
    max_answer_tokens: int = 48,
) -> Suffix:
    """Tokenise queries (and answers for the generative loss) into a right-padded suffix batch."""
    q_ids = token_ids(tokenizer, queries, max_query_tokens)
    a_ids = token_ids(tokenizer, answers, max_answer_tokens) if answers is not None else [[] for _ in q_ids]
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id
    rows, targets, pool, slots = [], [], [], []
    for q, a in zip(q_ids, a_ids):
        answer = a + [eos] if answers is not None else []
        ids = (q + [pad] * n_prompt if prompt_after_query else [pad] * n_prompt + q) + [user_emb_id] + answer
        p = n_prompt + len(q)
        slots.append(list(range(p - n_prompt, p)) if prompt_after_query else list(range(n_prompt)))
        # position t predicts token t+1; only <user_emb> .. last answer token predict answer tokens
        tgt = [IGNORE] * len(ids)
        for k, tok in enumerate(answer):
            tgt[p + k] = tok
        rows.append(ids)
        targets.append(tgt)
        pool.append(p)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    target_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, (r, t) in enumerate(zip(rows, targets)):
        input_ids[i, : len(r)] = torch.tensor(r)
        target_t[i, : len(t)] = torch.tensor(t)
        mask[i, : len(r)] = True
    prompt_index = torch.tensor(slots, dtype=torch.long).view(len(rows), n_prompt)
    return Suffix(input_ids, mask, torch.tensor(pool), target_t, n_prompt, prompt_index)


def position_ids(mask: torch.Tensor, offset: torch.Tensor | None = None) -> torch.Tensor:
    """Positions that skip padding: real token k of a row gets position offset + k."""
    pos = mask.long().cumsum(-1) - 1                                            # (B, L)
    if offset is not None:
        pos = pos + offset.view(-1, 1)
    return pos.clamp(min=0)
