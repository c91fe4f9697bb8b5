"""Step-by-step views of the model for the teaching notebooks: what one user's sequence is made of, what a
pre-training batch holds, and how prompt tuning moves embeddings and prototypes.

Every view reads the tensors the model itself computes (`model.encoder`, `encode_prefix`, `make_suffix`,
`suffix_embeddings`, pretrain.py's `StepBatch`, prompt_tuning.py's `TaskAdapter`); the labels of prefix tokens
come from sequence.py's `prefix_parts`, the same blocks `assemble_prefix` packs, so a table can never show a
layout the backbone does not receive (`describe_sequence` checks it token by token).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import torch

from qanchor_lab.behaviour import NUMERIC_EVENT_FEATURES, BehaviourStore, sorted_events
from qanchor_lab.losses import shared_ids
from qanchor_lab.sequence import prefix_parts

# What a prefix token stands for, per part kind of sequence.prefix_parts.
_PART_TEXT = {
    "user": "user token: adapter of the mean over the user's modalities",
    "modality": "modality token: adapter of the mean of its events",
}


def _one_user(store: BehaviourStore, user_id: str):
    return store.batch(store.indices([user_id]))


def user_events(model, store: BehaviourStore, user_id: str, events: pd.DataFrame | None = None) -> pd.DataFrame:
    """The events of one user the model reads (per modality the store's most recent ones, oldest first), one
    row each: modality, slot, the numeric fields and the norms of the raw event vector, of what reaches the
    modality adapter (after `event_norm`) and of the event token it becomes (hidden size H).

    With the `events` table (world.events) the rows also carry timestamp and text; the texts are checked
    against the store's vectors so that a table never pairs a text with another event's vector."""
    batch = _one_user(store, user_id)
    enc = model.encoder
    rows = []
    with torch.no_grad():
        tokens = enc(batch.to(model.device)).events                               # modality -> (1, N, H)
        for m in model.config.modalities:
            x, mask = batch.events[m], batch.masks[m]                             # (1, N, D), (1, N)
            normed = enc.normalize_events(x.to(model.device), mask.to(model.device))  # (1, N, D)
            for slot in np.flatnonzero(mask[0].numpy()):
                num = x[0, slot, enc.text_dim:].tolist()
                rows.append({"modality": m, "slot": int(slot), **dict(zip(NUMERIC_EVENT_FEATURES, num)),
                             "raw_norm": float(x[0, slot].norm()), "adapter_input_norm": float(normed[0, slot].norm()),
                             "token_norm": float(tokens[m][0, slot].norm())})
    table = pd.DataFrame(rows)
    if events is None or table.empty:
        return table
    # the store keeps the last N events of each modality inside the model's history window, in time order
    # (behaviour.BehaviourStore.build): the same window here, or a model whose window ends before the table's
    # last day would pair its slots with events the store never read
    n_slots = batch.masks[model.config.modalities[0]].shape[1]
    kept = sorted_events(events, [user_id], model.config.modalities, model.feature_spec.window)
    kept = kept.groupby("modality", sort=False).tail(n_slots)
    kept = pd.concat([kept[kept["modality"] == m] for m in model.config.modalities], ignore_index=True)
    if len(kept) != len(table) or list(kept["modality"]) != list(table["modality"]):
        raise ValueError(f"user {user_id!r}: the events table gives {len(kept)} kept events, the behaviour store "
                         f"{len(table)}; pass the events table the store was built from")
    text_enc = store_text_encoder(model)
    vecs = torch.from_numpy(text_enc.encode(kept["text"].astype(str).tolist()))  # (E, D_text)
    stored = torch.cat([batch.events[m][0, batch.masks[m][0], :model.encoder.text_dim] for m in model.config.modalities])
    if not torch.allclose(vecs, stored, atol=1e-5):
        raise ValueError(f"user {user_id!r}: event texts do not match the behaviour store's vectors; pass the "
                         "events table the store was built from")
    table.insert(2, "timestamp", kept["timestamp"].to_numpy())
    table.insert(3, "text", kept["text"].to_numpy())
    return table


def store_text_encoder(model):
    """The (disk-cached) event text encoder this model's stores are built with."""
    from qanchor_lab.event_encoder import get_text_encoder

    return get_text_encoder(model.config.text_encoder)


def _soft_prompt(prompt, prompt_position: str | None, query: str) -> tuple[torch.Tensor | None, bool, str]:
    """(prompt vectors, whether they follow the query, the suffix's query text) for `describe_sequence`.

    A TaskAdapter carries its own order (`PromptTuningConfig.prompt_position`, "after_query" by default) and
    query; a bare tensor has none, so it is placed as `model.embed` places it unless told otherwise."""
    from qanchor_lab.prompt_tuning import PROMPT_POSITION, TaskAdapter

    if prompt_position is not None and prompt_position not in PROMPT_POSITION:
        raise ValueError(f"prompt_position must be one of {PROMPT_POSITION}, got {prompt_position!r}")
    if isinstance(prompt, TaskAdapter):
        config = prompt.config
        if prompt_position is not None and prompt_position != config.prompt_position:
            raise ValueError(f"prompt_position={prompt_position!r}, but the adapter was tuned with its prompt "
                             f"{config.prompt_position!r}; leave prompt_position out to show the adapter's order")
        if query != prompt.query:
            raise ValueError(f"the adapter was tuned on the query {prompt.query!r}, got {query!r}: its prompt "
                             "never runs with another query")
        # an adapter tuned without the query text (use_query=False) reads only its prompt
        text = query if config.use_query else ""
        vectors = prompt.prompt.detach() if prompt.prompt.shape[0] else None
        return vectors, config.prompt_position == "after_query", text
    if prompt is not None and not isinstance(prompt, torch.Tensor):
        raise ValueError(f"prompt must be an (n, H) tensor or a TaskAdapter, got {type(prompt).__name__}")
    return prompt, prompt_position == "after_query", query


def describe_sequence(model, store: BehaviourStore, user_id: str, query: str, *, events: pd.DataFrame | None = None,
                      answer: str | None = None, prompt=None, prompt_position: str | None = None) -> pd.DataFrame:
    """The `[behaviour] query <user_emb> [answer]` sequence of one user as the backbone receives it, one row
    per input position: position (= its position id), segment (prefix / suffix), part (user, modality, start,
    event, end, tabular | prompt, query, user_emb, answer), modality, text (event text with `events`, else the
    token string) and the norm of the input vector.

    `prompt` puts soft-prompt slots in the suffix: a TaskAdapter shows its prompt where it was tuned to run
    (its config's `prompt_position`; "after_query", the default of PromptTuningConfig and so of every tuned
    adapter of the demo) and needs `query` to be its own; a bare (n, H) tensor goes where `prompt_position`
    says, "before_query" (as `model.embed(prompt=...)`) when it is left out. Raises when the labelled blocks of
    `sequence.prefix_parts` do not reproduce the packed prefix exactly."""
    prompt, after_query, query = _soft_prompt(prompt, prompt_position, query)
    batch = _one_user(store, user_id).to(model.device)
    with torch.no_grad():
        prefix = model.encode_prefix(batch)                                       # embeds (1, P, H)
        parts = prefix_parts(model.encoder(batch), model.special_embeddings(), model.config.modalities)
        n_prompt = 0 if prompt is None else prompt.shape[-2]
        suffix = model.make_suffix([query], answers=None if answer is None else [answer], n_prompt=n_prompt,
                                   prompt_after_query=after_query)
        suffix_embeds = model.suffix_embeddings(suffix, prompt)                   # (1, S, H)

    texts = {}
    if events is not None:
        ev = user_events(model, store, user_id, events)
        texts = {(r.modality, r.slot): r.text for r in ev.itertuples()}
    rows, labelled = [], []
    for part in parts:
        for j in np.flatnonzero(part.mask[0].cpu().numpy()):
            labelled.append(part.embeds[0, j])
            if part.kind == "modality":
                modality = model.config.modalities[j]
                text = _PART_TEXT["modality"]
            elif part.kind == "user":
                modality, text = None, _PART_TEXT["user"]
            elif part.kind in ("start", "end"):
                modality, text = part.modality, f"<{part.modality}_{part.kind}>"
            elif part.kind == "tabular":
                modality, text = part.modality, f"profile slot {j}: projection of the aggregate features"
            else:
                modality, text = part.modality, texts.get((part.modality, int(j)), f"event in slot {j}")
            rows.append({"segment": "prefix", "part": part.kind, "modality": modality, "text": text})
    labelled = torch.stack(labelled) if labelled else prefix.embeds.new_zeros((0, prefix.embeds.shape[-1]))
    n_prefix = int(prefix.lengths[0])
    if len(labelled) != n_prefix or not torch.equal(labelled, prefix.embeds[0, :n_prefix]):
        raise RuntimeError(f"the labelled prefix blocks ({len(labelled)} tokens) do not reproduce the packed prefix "
                           f"({n_prefix} tokens): sequence.prefix_parts and assemble_prefix disagree")

    ids = suffix.input_ids[0].tolist()
    n_real = int(suffix.mask[0].sum())
    pool, slots = int(suffix.pool_index[0]), set(suffix.prompt_index[0].tolist())
    tokens = model.tokenizer.convert_ids_to_tokens(ids[:n_real])
    for k in range(n_real):
        kind = "prompt" if k in slots else "user_emb" if k == pool else "query" if k < pool else "answer"
        text = f"soft prompt {sorted(slots).index(k)}" if kind == "prompt" else tokens[k]
        rows.append({"segment": "suffix", "part": kind, "modality": None, "text": text})
    embeds = torch.cat([prefix.embeds[0, :n_prefix], suffix_embeds[0, :n_real]])  # (P+S, H) what the decoder reads
    table = pd.DataFrame(rows)
    table.insert(0, "position", np.arange(len(table)))
    table["norm"] = embeds.norm(dim=-1).cpu().numpy()
    return table


def sequence_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Tokens per segment and part of a `describe_sequence` table, in sequence order."""
    key = table["segment"] + " · " + table["part"] + table["modality"].map(lambda m: f" ({m})" if isinstance(m, str) else "")
    out = table.groupby(key, sort=False).agg(first=("position", "min"), tokens=("position", "size"),
                                             mean_norm=("norm", "mean"))
    return out.rename_axis("block").reset_index()


# ----- pre-training batch -----

NEGATIVE_CODES = {0: "negative", 1: "self", 2: "same user", 3: "same answer/claim"}


def batch_table(batch, store: BehaviourStore) -> pd.DataFrame:
    """One row per (user, query, answer) of a pretrain.StepBatch, with its intent and false-negative id."""
    ids = np.asarray(batch.answer_ids)
    answer_id = ids if ids.ndim == 1 else [tuple(r) for r in ids.tolist()]      # (text id, claim id) pairs
    return pd.DataFrame({"user_id": [store.user_ids[i] for i in batch.user_index], "intent_id": batch.intent_ids,
                         "answer_id": answer_id, "query": batch.queries, "answer": batch.answers})


def negative_codes(batch) -> np.ndarray:
    """(N, N) why row j is or is not a contrastive negative of row i, by the ids the loss masks with
    (losses.contrastive_loss): 1 self, 2 same user, 3 same answer id (text or claim), 0 a negative."""
    users, answers = np.asarray(batch.user_index), torch.as_tensor(np.asarray(batch.answer_ids))
    codes = np.where(shared_ids(answers, answers).numpy(), 3, 0)
    codes = np.where(users[:, None] == users[None, :], 2, codes)
    np.fill_diagonal(codes, 1)
    return codes


def figure_negative_codes(codes: np.ndarray, intents: Sequence[int] | None = None) -> go.Figure:
    """Heat map of `negative_codes`, rows sorted as given; `intents` labels the axes by question intent."""
    colours = ["#f0f0f0", "#252525", "#3182bd", "#e6550d"]
    # one flat colour band per code: code k spans [k/4, (k+1)/4] of the colour axis
    scale = [[edge / 4, colours[k]] for k in range(4) for edge in (k, k + 1)]
    labels = [f"{i}:{k}" for i, k in enumerate(intents)] if intents is not None else None
    fig = go.Figure(go.Heatmap(z=codes, x=labels, y=labels, zmin=-0.5, zmax=3.5, colorscale=scale,
                               colorbar=dict(tickvals=list(NEGATIVE_CODES), ticktext=list(NEGATIVE_CODES.values())),
                               hovertemplate="row %{y}, column %{x}: %{z}<extra></extra>"))
    fig.update_layout(title="Which rows are each other's contrastive negatives (row:intent)", height=520, width=620,
                      yaxis_autorange="reversed", template="plotly_white")
    return fig


# ----- prompt tuning -----

@dataclass
class AdapterSnapshots:
    """An `on_epoch` callback for prompt_tuning.tune_task keeping a copy of the adapter at chosen epochs
    (default: every epoch) and the history records it was called with."""

    epochs: Sequence[int] | None = None
    adapters: dict[int, object] = field(default_factory=dict)
    records: list[dict] = field(default_factory=list)

    def __call__(self, record: dict, adapter) -> None:
        self.records.append(dict(record))
        if self.epochs is None or record["epoch"] in self.epochs:
            self.adapters[record["epoch"]] = copy.deepcopy(adapter)


def adapter_view(adapter, model, cache) -> dict[str, np.ndarray]:
    """What the prototypes compare for cached users: unit features (N, d), unit prototypes (P, d), their class."""
    with torch.no_grad():
        feats = torch.cat([adapter.features(adapter.embed(model, rows)) for rows in cache.chunks(256)])   # (N, d)
        feats = torch.nn.functional.normalize(feats, dim=-1)
        protos = torch.nn.functional.normalize(adapter.prototypes.detach(), dim=-1)  # (P, d)
    return {"features": feats.cpu().numpy(), "prototypes": protos.cpu().numpy(),
            "prototype_class": adapter.prototype_class.cpu().numpy()}


def _check_labels(labels, n: int, where: str) -> np.ndarray:
    """`labels` as an (n,) int array of 0/1, or a ValueError naming what is wrong: the views hold one row per
    user, so a label list of other users (another length) or with users left unlabelled (NaN) would pair points
    with the wrong labels, or drop them, without a word."""
    values = np.asarray(labels)
    if values.ndim != 1 or len(values) != n:
        raise ValueError(f"{where}: expected {n} labels (one per user of the view), got shape {values.shape}")
    try:   # via pandas, so nullable columns (pd.NA) count as missing like NaN
        values = pd.to_numeric(pd.Series(values)).to_numpy(dtype=float, na_value=np.nan)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: labels must be 0/1 numbers, got e.g. {values[:3].tolist()}") from None
    n_nan = int(np.isnan(values).sum())
    if n_nan:
        raise ValueError(f"{where}: {n_nan} of {n} labels are NaN (users without a label); keep only the "
                         "labelled users in both the view and the labels")
    bad = sorted(set(np.unique(values).tolist()) - {0.0, 1.0})
    if bad:
        raise ValueError(f"{where}: labels must be 0 or 1, got also {bad[:5]}")
    return values.astype(int)


def figure_tuning_pca(views: dict[str, dict[str, np.ndarray]], labels: np.ndarray, title: str = "") -> go.Figure:
    """Side-by-side 2-D PCA scatters of `adapter_view`s (e.g. before / after tuning) in one shared basis, fitted
    on all panels' features, so that movement between panels is real; prototypes drawn as large stars."""
    from plotly.subplots import make_subplots
    from sklearn.decomposition import PCA

    if not views:
        raise ValueError("figure_tuning_pca: no views to draw")
    for name, v in views.items():   # the same users in every panel, so one label array serves all
        checked = _check_labels(labels, len(v["features"]), f"figure_tuning_pca (view {name!r})")
    labels = checked
    pca = PCA(2, random_state=0).fit(np.concatenate([v["features"] for v in views.values()]))
    fig = make_subplots(1, len(views), subplot_titles=list(views), shared_xaxes=True, shared_yaxes=True)
    colours = {0: "#9ecae1", 1: "#e6550d"}
    for col, (name, v) in enumerate(views.items(), start=1):
        xy, pxy = pca.transform(v["features"]), pca.transform(v["prototypes"])
        for c in (0, 1):
            sel = labels == c
            fig.add_trace(go.Scatter(x=xy[sel, 0], y=xy[sel, 1], mode="markers", name=f"label {c}",
                                     legendgroup=f"label {c}", showlegend=col == 1,
                                     marker=dict(size=5, color=colours[c], opacity=0.6)), 1, col)
            ps = v["prototype_class"] == c
            fig.add_trace(go.Scatter(x=pxy[ps, 0], y=pxy[ps, 1], mode="markers", name=f"prototype {c}",
                                     legendgroup=f"prototype {c}", showlegend=col == 1,
                                     marker=dict(size=18, symbol="star", color=colours[c],
                                                 line=dict(width=1.5, color="black"))), 1, col)
    ev = pca.explained_variance_ratio_
    fig.update_xaxes(title_text=f"PC1 ({ev[0]:.0%})")
    fig.update_yaxes(title_text=f"PC2 ({ev[1]:.0%})", col=1)
    fig.update_layout(title=title or "Users and class prototypes, shared PCA basis", height=430, template="plotly_white")
    return fig


def prototype_separation(view: dict[str, np.ndarray], labels: np.ndarray) -> dict[str, float]:
    """How well an `adapter_view`'s prototypes separate these users: the AUC of (best cosine to a class-1
    prototype - best cosine to a class-0 one) and the mean margin of each user's own class over the other."""
    from sklearn.metrics import roc_auc_score

    labels = _check_labels(labels, len(view["features"]), "prototype_separation")
    cos = view["features"] @ view["prototypes"].T                                  # (N, P)
    best = np.stack([cos[:, view["prototype_class"] == c].max(1) for c in (0, 1)], 1)  # (N, 2)
    diff = best[:, 1] - best[:, 0]
    return {"auc": float(roc_auc_score(labels, diff)), "own_class_margin": float(np.where(labels == 1, diff, -diff).mean())}


def step_at_rates(model, config, batch, shares: Sequence[float] = (1.0, 0.1, 0.01), *,
                  answers: Sequence[str] | None = None) -> pd.DataFrame:
    """One optimisation step (pretrain.training_step) on `batch` from the same start at several learning rates
    (shares of the config's peak rate, no schedule), on copies of `model`: the losses of the batch before and
    after each step. The model itself is left as it is. `answers`: the training answers, which
    `lm_vocabulary="answers"` builds its vocabulary from (`pairs.answers`)."""
    from qanchor_lab.pretrain import PretrainStep, count_answer_tokens, make_optimizer, step_forward, training_step

    n_tok = count_answer_tokens(model, batch.answers)
    rows = []
    for share in shares:
        copy_ = copy.deepcopy(model)
        module = PretrainStep(copy_, config, answers=answers).train()
        optimizer, _ = make_optimizer(module, config, total_steps=None)
        for group in optimizer.param_groups:
            group["lr"] *= share
        before = training_step(module, batch, optimizer, ntp_normalizer=n_tok, grad_clip=config.grad_clip)
        with torch.no_grad():
            after = step_forward(module, batch, n_tok)
        row = {"share of peak rate": share, "learning rate": optimizer.param_groups[0]["lr"]}
        names = ("loss", "contrastive", "next-token") + (("reconstruction",) if config.reconstruction else ())
        for name, b, a in zip(names, before, after):
            row |= {f"{name} before": float(b), f"{name} after": float(a)}
        rows.append(row)
        del copy_, module, optimizer
    return pd.DataFrame(rows)
