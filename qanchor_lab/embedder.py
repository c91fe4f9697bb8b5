"""Cached-prefix inference: encode each user's behaviour prefix once, run any number of queries on top.

The prefix (behaviour tokens) goes through the LLM once into per-layer key/value tensors. A query (or a
soft prompt plus query) then costs only its own tokens: for each (user, query) pair a fresh DynamicCache
is built from that user's rows of the stored tensors, the suffix is run with an attention mask covering
the padded prefix and the suffix, and positions continue from the user's real prefix length. The result
equals full recomputation (prefix equivalence, docs/design.md §2).

Building and walking caches has one path each, so every caller batches the same way: `CachedEmbedder.caches`
builds the caches of many users `chunk` users at a time (`build_prefix_cache_in_chunks` stacks them into one),
and `PrefixCache.chunks` walks a built cache in runs of at most `size` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from qanchor_lab.behaviour import BehaviourStore, UserBatch
from qanchor_lab.schema import string_list
from qanchor_lab.sequence import Suffix, pack_left, pad_right, position_ids, token_ids


@dataclass
class PrefixCache:
    """Key/value tensors of B users' behaviour prefixes."""

    keys: list[torch.Tensor]    # per layer (B, kv_heads, P, head_dim)
    values: list[torch.Tensor]  # per layer (B, kv_heads, P, head_dim)
    mask: torch.Tensor          # (B, P) bool
    lengths: torch.Tensor       # (B,) real prefix tokens

    def __len__(self) -> int:
        return self.mask.shape[0]

    def select(self, rows: torch.Tensor) -> "PrefixCache":
        """Rows (possibly repeated: one per query) as a new cache; trims padding no selected row needs."""
        width = int(self.lengths[rows].max().item())
        return PrefixCache([k[rows, :, :width] for k in self.keys], [v[rows, :, :width] for v in self.values],
                           self.mask[rows, :width], self.lengths[rows])

    def chunks(self, size: int, rows: Sequence[int] | None = None) -> Iterator["PrefixCache"]:
        """`rows` (default: every row, in order) as consecutive caches of at most `size` rows each, so no
        suffix run holds more than `size` users however many the cache has."""
        index = torch.arange(len(self)) if rows is None else torch.as_tensor(rows)   # (N,)
        for start in range(0, len(index), size):
            yield self.select(index[start:start + size])

    def dynamic_cache(self) -> DynamicCache:
        # A forward call grows a DynamicCache in place, so every call gets a fresh one.
        return DynamicCache(list(zip(self.keys, self.values)))


def prefix_cache(model, users: UserBatch) -> PrefixCache:
    """Run the behaviour prefixes once and keep their keys and values (differentiable: pre-training uses it)."""
    prefix = model.encode_prefix(users.to(model.device))
    cache = DynamicCache()
    model.decoder(inputs_embeds=prefix.embeds, attention_mask=prefix.mask.long(),
                  position_ids=position_ids(prefix.mask), past_key_values=cache, use_cache=True)
    keys = [layer.keys for layer in cache.layers]
    values = [layer.values for layer in cache.layers]
    return PrefixCache(keys, values, prefix.mask, prefix.lengths)


# Inference and prompt tuning never need gradients into the frozen prefix.
build_prefix_cache = torch.no_grad()(prefix_cache)


def _run_on(model, cache: PrefixCache, embeds: torch.Tensor, smask: torch.Tensor):
    """Run suffix embeddings (B, S, H) on top of the cache; (decoder output, the grown DynamicCache)."""
    smask = smask.to(model.device)
    mask = torch.cat([cache.mask, smask], 1)                                     # (B, P+S)
    pos = position_ids(smask, offset=cache.lengths)                              # (B, S)
    grown = cache.dynamic_cache()
    out = model.decoder(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=pos,
                        past_key_values=grown, use_cache=True)
    return out, grown


def run_suffix(model, cache: PrefixCache, embeds: torch.Tensor, smask: torch.Tensor) -> torch.Tensor:
    """Last hidden states (B, S, H) of suffix embeddings run over a prefix cache (pre-training's path when
    one user answers several questions in a batch)."""
    return _run_on(model, cache, embeds, smask)[0].last_hidden_state


def run_cached(model, cache: PrefixCache, suffix: Suffix, prompt: torch.Tensor | None = None) -> torch.Tensor:
    """Pooled embeddings (B, d) for one suffix row per cache row. Differentiable w.r.t. `prompt`."""
    out, _ = _run_on(model, cache, model.suffix_embeddings(suffix, prompt), suffix.mask)   # embeds (B, S, H)
    return model.pool(out.last_hidden_state, suffix)                             # (B, d)


@torch.no_grad()
def extend_cache(model, cache: PrefixCache, texts: Sequence[str]) -> PrefixCache:
    """The cache with each row's text (e.g. its task query) appended, real tokens packed to the front.

    Text that no soft prompt can change (it comes before the prompt) is then computed once, and a
    prompt-tuning step runs only the prompt and <user_emb> tokens. Keys already carry their rotary
    positions, so moving them within a row changes nothing."""
    if len(texts) != len(cache):
        raise ValueError(f"extend_cache: {len(texts)} texts for {len(cache)} cached rows")
    tokens, smask = pad_right(token_ids(model.tokenizer, texts, model.config.max_query_tokens),
                              model.tokenizer.pad_token_id, model.device)         # (B, Q), (B, Q)
    if smask.shape[1] == 0:
        return cache
    _, grown = _run_on(model, cache, model.embed_tokens(tokens), smask)
    mask = torch.cat([cache.mask, smask], 1)                                     # (B, P+Q)

    def pack(t: torch.Tensor) -> torch.Tensor:                                   # (B, kv, P+Q, hd) -> (B, kv, L, hd)
        B, kv, _, hd = t.shape
        packed, _ = pack_left(t.transpose(1, 2).reshape(B, -1, kv * hd), mask)    # (B, L, kv*hd)
        return packed.view(B, -1, kv, hd).transpose(1, 2)

    keys = [pack(layer.keys) for layer in grown.layers]
    values = [pack(layer.values) for layer in grown.layers]
    return PrefixCache(keys, values, pack_left(mask.unsqueeze(-1), mask)[1], mask.sum(1))


class CachedEmbedder:
    """`encode(users, queries)` -> (users, queries, dim) array, computing each prefix once.

    Prefix caches are kept in memory (per user id) when `keep_cache=True`, for interactive use.
    """

    def __init__(self, model, store: BehaviourStore, *, keep_cache: bool = False):
        self.model = model
        self.store = store
        self.keep_cache = keep_cache
        self._cache: dict[str, PrefixCache] = {}

    def _build(self, user_ids: Sequence[str]) -> PrefixCache:
        return build_prefix_cache(self.model, self.store.batch(self.store.indices(user_ids)))

    def prefix_cache(self, user_ids: Sequence[str]) -> PrefixCache:
        """The cache of `user_ids` (one row each, in order), built in one batch."""
        if not self.keep_cache:
            return self._build(user_ids)
        todo = [u for u in user_ids if u not in self._cache]
        if todo:
            built = self._build(todo)
            for i, u in enumerate(todo):
                self._cache[u] = built.select(torch.tensor([i]))
        parts = [self._cache[u] for u in user_ids]
        return concat_caches(parts)

    def caches(self, user_ids: Sequence[str], chunk: int, *, show_progress_bar: bool = False,
               desc: str = "encode") -> Iterator[tuple[int, PrefixCache]]:
        """(start, cache of user_ids[start:start + chunk]) for consecutive chunks: the one loop that builds the
        caches of many users, so a forward pass holds at most `chunk` prefixes."""
        for start in tqdm(range(0, len(user_ids), chunk), desc=desc, disable=not show_progress_bar):
            yield start, self.prefix_cache(user_ids[start:start + chunk])

    def _length_groups(self, queries: Sequence[str], n_prompt: int = 0) -> list[tuple[list[int], Suffix]]:
        """The queries grouped by token length, each group tokenised once into an unpadded suffix batch:
        [(indices into `queries`, Suffix of those queries in that order)]."""
        by_length: dict[int, list[int]] = {}
        for j, n in enumerate(self.model.make_suffix(queries, n_prompt=n_prompt).mask.sum(1).tolist()):
            by_length.setdefault(n, []).append(j)
        return [(idx, self.model.make_suffix([queries[j] for j in idx], n_prompt=n_prompt)) for idx in by_length.values()]

    @torch.no_grad()
    def encode(self, user_ids: Sequence[str], queries: Sequence[str], *, batch_size: int = 64,
               prompt: torch.Tensor | None = None, show_progress_bar: bool = False) -> np.ndarray:
        """(users, queries, dim) embeddings; `batch_size` users share one prefix batch.

        Queries of the same token length run together, so no query is padded; a query alone in its
        length runs on the cached rows as they are, without copying them."""
        self.model.eval()
        user_ids, queries = string_list(user_ids, "user_ids"), string_list(queries, "queries", allow_empty=False)
        self.store.indices(user_ids)  # fail before any work, naming unknown users
        out = np.zeros((len(user_ids), len(queries), self.model.config.embed_dim), np.float32)
        groups = self._length_groups(queries, n_prompt=0 if prompt is None else prompt.shape[-2])
        for start, cache in self.caches(user_ids, batch_size, show_progress_bar=show_progress_bar):
            b = len(cache)
            for idx, suffix in groups:
                rows = cache if len(idx) == 1 else cache.select(torch.arange(b).repeat_interleave(len(idx)))
                emb = run_cached(self.model, rows, suffix.tile(b), prompt)     # (b*k, d) user-major
                out[start:start + b, idx] = emb.view(b, len(idx), -1).cpu().numpy()
        return out

    @torch.no_grad()
    def encode_pairs(self, user_ids: Sequence[str], queries: Sequence[str], *, batch_size: int = 64,
                     show_progress_bar: bool = False) -> np.ndarray:
        """(rows, dim) embeddings of one query per row, e.g. the QA rows of many users.

        Rows are taken user by user, `batch_size` distinct users at a time: each user's prefix is computed
        once however many rows it has, and each distinct query is tokenised once. Within a batch, rows whose
        queries have the same token length run together (none is padded), so a batch of users asking many
        different questions costs a few suffix runs rather than one per question."""
        self.model.eval()
        user_ids, queries = string_list(user_ids, "user_ids"), string_list(queries, "queries")
        if len(user_ids) != len(queries):
            raise ValueError(f"encode_pairs: {len(user_ids)} user ids for {len(queries)} queries")
        out = np.zeros((len(user_ids), self.model.config.embed_dim), np.float32)
        if not user_ids:   # no rows: (0, dim), as encode gives (0, Q, dim), not an empty batch in the tokenizer
            return out
        distinct = list(dict.fromkeys(queries))
        groups = self._length_groups(distinct)
        where = {distinct[j]: (g, k) for g, (idx, _) in enumerate(groups) for k, j in enumerate(idx)}  # query -> (group, row)
        rows_of: dict[str, list[int]] = {}
        for i, u in enumerate(user_ids):
            rows_of.setdefault(u, []).append(i)
        users = list(rows_of)
        for start, cache in self.caches(users, batch_size, show_progress_bar=show_progress_bar):
            chunk = users[start:start + len(cache)]
            runs: dict[int, tuple[list[int], list[int], list[int]]] = {}  # group -> (cache rows, suffix rows, out rows)
            for j, u in enumerate(chunk):
                for i in rows_of[u]:
                    g, k = where[queries[i]]
                    slot = runs.setdefault(g, ([], [], []))
                    slot[0].append(j)
                    slot[1].append(k)
                    slot[2].append(i)
            for g, (cache_rows, suffix_rows, rows) in runs.items():
                suffix = groups[g][1].rows(torch.tensor(suffix_rows))
                emb = run_cached(self.model, cache.select(torch.tensor(cache_rows)), suffix)   # (m, d)
                out[rows] = emb.cpu().numpy()
        return out


def build_prefix_cache_in_chunks(model, store: BehaviourStore, user_ids: Sequence[str], chunk: int = 256, *,
                                 show_progress: bool = False) -> PrefixCache:
    """One cache of many users (row i: user_ids[i]), built `chunk` users at a time and stacked (each chunk padded
    to the longest prefix of all): peak activation memory is one chunk's forward pass, not the population's."""
    parts = [cache for _, cache in CachedEmbedder(model, store).caches(
        user_ids, chunk, show_progress_bar=show_progress, desc="prefix cache")]
    return concat_caches(parts)                                                  # keys (N, kv, P, hd)


def concat_caches(parts: list[PrefixCache]) -> PrefixCache:
    """Stack caches of different users (padding each to the longest prefix)."""
    width = max(p.mask.shape[1] for p in parts)

    def pad(t: torch.Tensor, dim: int) -> torch.Tensor:
        extra = width - t.shape[dim]
        if extra == 0:
            return t
        shape = list(t.shape)
        shape[dim] = extra
        return torch.cat([t, t.new_zeros(shape)], dim)

    n_layers = len(parts[0].keys)
    keys = [torch.cat([pad(p.keys[i], 2) for p in parts]) for i in range(n_layers)]
    values = [torch.cat([pad(p.values[i], 2) for p in parts]) for i in range(n_layers)]
    return PrefixCache(keys, values, torch.cat([pad(p.mask, 1) for p in parts]), torch.cat([p.lengths for p in parts]))
