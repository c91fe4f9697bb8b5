"""QAnchorModel: hierarchical encoder + decoder LLM + projection head (the anchor and semantic towers).

The anchor tower reads `[behaviour prefix] query <user_emb>` and pools the hidden state at <user_emb>;
the semantic tower reads an answer alone and pools its last token; both go through the same MLP head
and are L2-normalised (docs/design.md §1.3-1.4). Saved as a directory of JSON config + safetensors.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal, Sequence, get_args

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from qanchor_lab.backbone import Backbone, BackboneConfig, load_backbone, load_saved_backbone, save_backbone, word_embedding_scale
from qanchor_lab.behaviour import NUMERIC_EVENT_FEATURES, BehaviourStore, UserBatch, event_numeric_fields, sorted_events
from qanchor_lab.event_encoder import get_text_encoder
from qanchor_lab.features import FeatureSpec
from qanchor_lab.encoder import EventNorm, HierarchicalEncoder, TabularMode
from qanchor_lab.schema import SEQUENCE_MODALITIES, TABULAR_MODALITY, modality_specs
from qanchor_lab.sequence import Prefix, Suffix, assemble_prefix, build_suffix, pad_right, position_ids, token_ids

CONFIG_NAME = "qanchor_config.json"
WEIGHTS_NAME = "qanchor.safetensors"
FineTune = Literal["auto", "full", "lora"]
LEGACY_INPUTS = {"event_norm": "none", "tabular_mode": "repeat"}  # what a config without these keys meant
# Buffers a checkpoint from before event_norm may lack; identity statistics, unused with event_norm="none".
_OPTIONAL_BUFFERS = ("encoder.numeric_mean", "encoder.numeric_std")


@dataclass
class QAnchorConfig:
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    modalities: tuple[str, ...] = SEQUENCE_MODALITIES  # sequence modalities, in prefix order: the dataset's declared ones (World.modalities); default the synthetic world's
    text_encoder: Literal["minilm", "hashing"] = "minilm"  # event text encoder (hashing: cheap, for tests)
    max_events: int = 16          # most recent events kept per modality
    adapter_hidden: int = 512     # hidden width of every adapter MLP
    tabular_slots: int = 8        # token slots of the tabular aggregate vector (docs/design.md §7)
    head_hidden: int = 512        # projection head: H -> head_hidden -> embed_dim (ReLU), as the authors'
    embed_dim: int = 128          # final embedding size
    use_user_token: bool = True   # ablation switch: the user token
    use_modality_tokens: bool = True  # ablation switch: the modality tokens
    use_tabular: bool = True      # ablation switch: the tabular aggregate tokens
    event_norm: EventNorm = "split"  # "split": text to unit RMS, numeric fields standardised (encoder.py); "none": raw
    tabular_mode: TabularMode = "split"  # "split": tabular_slots distinct tokens; "repeat": one token repeated (as before)
    finetune: FineTune = "auto"   # auto: full fine-tuning for tiny, LoRA for pretrained backbones
    lora_r: int = 64              # LoRA settings of the authors
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    max_query_tokens: int = 48
    max_answer_tokens: int = 48
    event_dim: int = 0            # filled when built from data (text dim + numeric event features)
    tabular_dim: int = 0          # filled when built from data (number of aggregate features)
    feature_spec: dict | None = None  # the fitted FeatureSpec (features.py), so new data is featurised the same way

    def __post_init__(self):
        if isinstance(self.backbone, dict):
            self.backbone = BackboneConfig.from_dict(self.backbone)
        self.modalities = tuple(self.modalities)
        if self.text_encoder not in ("minilm", "hashing"):
            raise ValueError(f"text_encoder={self.text_encoder!r}; valid choices: 'minilm', 'hashing'")
        for name, choices in (("event_norm", get_args(EventNorm)), ("tabular_mode", get_args(TabularMode))):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r}; valid choices: {', '.join(map(repr, choices))}")
        if self.finetune not in ("auto", "full", "lora"):
            raise ValueError(f"finetune={self.finetune!r}; valid choices: 'auto', 'full', 'lora'")
        for name in ("max_events", "adapter_hidden", "tabular_slots", "head_hidden", "embed_dim", "lora_r"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        try:  # any declared names; each becomes the special tokens <name_start>/<name_end>
            self.modalities = tuple(s.name for s in modality_specs(list(self.modalities)))
        except ValueError as exc:
            raise ValueError(f"modalities: {exc}") from None

    @property
    def resolved_finetune(self) -> Literal["full", "lora"]:
        if self.finetune != "auto":
            return self.finetune
        return "full" if self.backbone.name == "tiny" else "lora"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["backbone"] = self.backbone.to_dict()
        d["modalities"] = list(self.modalities)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "QAnchorConfig":
        known = {f.name for f in fields(cls)}
        # configs saved before these switches existed meant their earlier behaviour, not today's defaults
        d = {**LEGACY_INPUTS, **d}
        return cls(**{k: v for k, v in d.items() if k in known})


def _apply_lora(model: nn.Module, config: QAnchorConfig, new_token_ids: list[int]):
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        # the added special tokens start random: let their embedding rows train
        trainable_token_indices={"embed_tokens": new_token_ids},
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, lora)


class QAnchorModel(nn.Module):
    def __init__(self, config: QAnchorConfig, backbone: Backbone):
        super().__init__()
        if config.event_dim < 1 or config.tabular_dim < 1:
            raise ValueError("config.event_dim and config.tabular_dim must be set; build the model with "
                             "QAnchorModel.from_data(...) or load it with QAnchorModel.from_pretrained(dir)")
        self.config = config
        self.tokenizer = backbone.tokenizer
        self.special_token_ids = dict(backbone.special_token_ids)
        self.backbone_info = backbone
        self.llm = backbone.model
        H = backbone.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(config.backbone.seed)  # same seed, same initial adapters and head
            self._build_own_modules(config, backbone, H)
        if config.resolved_finetune == "lora" and not _is_peft(self.llm):
            self.llm = _apply_lora(self.llm, config, sorted(self.special_token_ids.values()))

    def _build_own_modules(self, config: QAnchorConfig, backbone: Backbone, H: int) -> None:
        self.encoder = HierarchicalEncoder(
            list(config.modalities), config.event_dim, config.tabular_dim, H,
            adapter_hidden=config.adapter_hidden, tabular_slots=config.tabular_slots,
            use_user_token=config.use_user_token, use_modality_tokens=config.use_modality_tokens,
            use_tabular=config.use_tabular, embed_scale=word_embedding_scale(backbone.model),
            event_norm=config.event_norm, tabular_mode=config.tabular_mode,
        )
        self.head = nn.Sequential(nn.Linear(H, config.head_hidden), nn.ReLU(), nn.Linear(config.head_hidden, config.embed_dim))

    # ----- pieces of the backbone -----
    @property
    def decoder(self) -> nn.Module:
        base = self.llm.get_base_model() if _is_peft(self.llm) else self.llm
        return base.get_decoder()

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.llm.get_input_embeddings()(ids)

    def lm_logits(self, hidden: torch.Tensor, vocab: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits over the whole vocabulary, or over the token ids in `vocab` (sorted, (K,)) only:
        column k is token vocab[k]. A restricted head skips the (n, V) product, a tiny model's largest single cost."""
        head = self.llm.get_output_embeddings()
        if vocab is None:
            return head(hidden)                                                  # (n, V)
        bias = None if getattr(head, "bias", None) is None else head.bias[vocab]
        return F.linear(hidden, head.weight[vocab], bias)                        # (n, K)

    @property
    def device(self) -> torch.device:
        return self.head[0].weight.device

    @property
    def llm_dtype(self) -> torch.dtype:
        """The dtype the decoder reads (its token embeddings'): float32, or bfloat16 with BackboneConfig.dtype."""
        return self.llm.get_input_embeddings().weight.dtype

    def project(self, hidden: torch.Tensor) -> torch.Tensor:
        """Pooled hidden states (B, H) through the head, L2-normalised (B, d). The encoder and head stay float32
        whatever the backbone's dtype, so a bfloat16 backbone's states are upcast here (a no-op in float32)."""
        return F.normalize(self.head(hidden.to(self.head[0].weight.dtype)), dim=-1)   # (B, d)

    def special_embeddings(self) -> dict[str, torch.Tensor]:
        names = [f"<{m}_{e}>" for m in (*self.config.modalities, TABULAR_MODALITY) for e in ("start", "end")]
        ids = torch.tensor([self.special_token_ids[n] for n in names], device=self.device)
        vecs = self.embed_tokens(ids)                                              # (2M+2, H)
        return dict(zip(names, vecs))

    # ----- the anchor tower -----
    def encode_prefix(self, users: UserBatch) -> Prefix:
        prefix = assemble_prefix(self.encoder(users), self.special_embeddings(), self.config.modalities)
        # the float32 encoder's tokens enter the decoder in its dtype (a no-op in float32; bfloat16 backbones)
        return replace(prefix, embeds=prefix.embeds.to(self.llm_dtype))          # (B, P, H)

    def make_suffix(self, queries: Sequence[str], answers: Sequence[str] | None = None, n_prompt: int = 0,
                    prompt_after_query: bool = False) -> Suffix:
        return build_suffix(
            self.tokenizer, queries, user_emb_id=self.special_token_ids["<user_emb>"], answers=answers,
            n_prompt=n_prompt, prompt_after_query=prompt_after_query, max_query_tokens=self.config.max_query_tokens,
            max_answer_tokens=self.config.max_answer_tokens,
        )

    def suffix_embeddings(self, suffix: Suffix, prompt: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings of the suffix; its n_prompt slots take the soft prompt (n, H) or (B, n, H)."""
        emb = self.embed_tokens(suffix.input_ids.to(self.device))                  # (B, S, H)
        if suffix.n_prompt:
            if prompt is None:
                raise ValueError(f"suffix has {suffix.n_prompt} prompt slots but no prompt was given")
            prompt = prompt.expand(emb.shape[0], -1, -1) if prompt.dim() == 2 or prompt.shape[0] == 1 else prompt
            index = suffix.prompt_index.to(self.device).unsqueeze(-1).expand(-1, -1, emb.shape[-1])  # (B, n, H)
            emb = emb.scatter(1, index, prompt.to(emb.dtype))                      # (B, S, H)
        return emb

    def run_full(self, prefix: Prefix, suffix_embeds: torch.Tensor, suffix_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states of the suffix positions, computed over the whole sequence."""
        mask = torch.cat([prefix.mask, suffix_mask.to(self.device)], 1)           # (B, P+S)
        embeds = torch.cat([prefix.embeds, suffix_embeds], 1)                    # (B, P+S, H)
        out = self.decoder(inputs_embeds=embeds, attention_mask=mask.long(), position_ids=position_ids(mask))
        return out.last_hidden_state[:, prefix.embeds.shape[1]:]                 # (B, S, H)

    def pool(self, suffix_hidden: torch.Tensor, suffix: Suffix) -> torch.Tensor:
        rows = torch.arange(suffix_hidden.shape[0], device=suffix_hidden.device)
        h = suffix_hidden[rows, suffix.pool_index.to(suffix_hidden.device)]      # (B, H)
        return self.project(h)                                                   # (B, d)

    def embed(self, users: UserBatch, queries: Sequence[str], prompt: torch.Tensor | None = None,
              prompt_after_query: bool = False) -> torch.Tensor:
        """Query-conditioned embeddings (B, d) by full recomputation (one query per user row)."""
        n_prompt = 0 if prompt is None else prompt.shape[-2]
        prefix = self.encode_prefix(users.to(self.device))
        suffix = self.make_suffix(queries, n_prompt=n_prompt, prompt_after_query=prompt_after_query)
        hidden = self.run_full(prefix, self.suffix_embeddings(suffix, prompt), suffix.mask)
        return self.pool(hidden, suffix)

    def encode(self, users, queries: Sequence[str], *, user_ids: Sequence[str] | None = None, batch_size: int = 64,
               prompt: torch.Tensor | None = None, show_progress_bar: bool = False) -> "np.ndarray":
        """Embeddings of shape (users, queries, dim), each user's behaviour prefix computed once.

        `users` is a BehaviourStore (from `model.behaviour(events, profiles, ids)`) or a World; `user_ids`
        picks users from it (default: all of the store, or the world's test split). `batch_size` users
        share one prefix batch, and every query runs on top of it. `prompt`: soft prompt vectors placed
        before the query; an adapter tuned with its prompt after the query (`PromptTuningConfig.prompt_position`,
        the default) embeds as tuned through `TaskAdapter.embed`.
        """
        from qanchor_lab.embedder import CachedEmbedder
        from qanchor_lab.schema import World, string_list

        if isinstance(users, World):
            ids = string_list(user_ids, "user_ids") if user_ids is not None else users.users_in("test")
            known = set(users.users["user_id"])
            unknown = [u for u in ids if u not in known]
            if unknown:   # a typo would otherwise get an embedding of no behaviour at all
                raise KeyError(f"{len(unknown)} user id(s) not in the world's users table, e.g. {unknown[:5]}")
            store = self.behaviour(users.events, users.profiles, list(dict.fromkeys(ids)))  # a repeat reads the row once
        elif isinstance(users, BehaviourStore):
            store, ids = users, users.user_ids if user_ids is None else user_ids
        else:
            raise TypeError(f"users must be a BehaviourStore or a World, not {type(users).__name__}")
        # CachedEmbedder.encode checks the ids (a list of strings, every one in the store)
        return CachedEmbedder(self, store).encode(ids, queries, batch_size=batch_size, prompt=prompt,
                                                  show_progress_bar=show_progress_bar)

    # ----- the semantic tower -----
    def embed_answers(self, answers: Sequence[str]) -> torch.Tensor:
        if len(answers) == 0:   # no rows to run the decoder over
            weight = self.head[0].weight        # the head's dtype, as `project` returns it
            return torch.empty(0, self.config.embed_dim, device=weight.device, dtype=weight.dtype)   # (0, d)
        # right-padded whatever the tokenizer's padding side: the pooled state is each row's last real token
        ids, mask = pad_right(token_ids(self.tokenizer, answers, self.config.max_answer_tokens),
                              self.tokenizer.pad_token_id, self.device)          # (B, A), (B, A)
        out = self.decoder(inputs_embeds=self.embed_tokens(ids), attention_mask=mask.long(),
                           position_ids=position_ids(mask))
        last = mask.long().sum(1).clamp(min=1) - 1
        h = out.last_hidden_state[torch.arange(ids.shape[0], device=self.device), last]   # (B, H)
        return self.project(h)                                                   # (B, d)

    # ----- pre-training forward: both towers and the next-token logits in one call -----
    def forward(self, users: UserBatch, queries: Sequence[str], answers: Sequence[str],
                *, user_rows: torch.Tensor | None = None, with_answer_tower: bool = True,
                with_lm: bool = True, lm_vocab: torch.Tensor | None = None,
                user_queries: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Both towers and the next-token logits for one (user, query, answer) row per query.

        `user_rows` (N,) maps each row to a user of `users` (U distinct users, U <= N): each user's prefix
        is then computed once into a KV cache and all of that user's queries run on top of it (the same
        numbers as full recomputation, docs/design.md §2), so a batch of u users x k questions costs u prefixes.
        `lm_vocab` (sorted token ids) restricts the next-token logits to those tokens; `lm_targets` then index
        into it (PretrainConfig.lm_vocabulary, docs/design.md §7.16).
        `user_queries` (U,): one more query per distinct user (per row when `user_rows` is None), run over the
        same prefixes without an answer; their anchors come back as `user_anchor` (U, d)
        (PretrainConfig.reconstruction_target="intent" asks every user the generic question this way)."""
        suffix = self.make_suffix(queries, answers=answers if with_lm else None)
        if user_queries is not None and user_rows is None:
            user_rows = torch.arange(len(queries), device=self.device)  # the cache path: each prefix serves two suffixes
        if user_rows is None:
            prefix = self.encode_prefix(users.to(self.device))
            hidden = self.run_full(prefix, self.suffix_embeddings(suffix), suffix.mask)   # (N, S, H)
            n_prefix = prefix.mask.sum()
        else:
            from qanchor_lab.embedder import prefix_cache, run_suffix

            cache = prefix_cache(self, users)                                          # U prefixes, with grad
            n_prefix = cache.mask.sum()
            hidden = run_suffix(self, cache.select(torch.as_tensor(user_rows, device=self.device)),
                                self.suffix_embeddings(suffix), suffix.mask)          # (N, S, H)
        out = {"anchor": self.pool(hidden, suffix), "n_tokens": n_prefix + suffix.mask.sum()}
        if user_queries is not None:
            if len(user_queries) != cache.lengths.shape[0]:
                raise ValueError(f"user_queries has {len(user_queries)} queries for {cache.lengths.shape[0]} users: "
                                 "one per distinct user (per row when user_rows is None)")
            extra = self.make_suffix(user_queries)
            extra_hidden = run_suffix(self, cache, self.suffix_embeddings(extra), extra.mask)  # (U, S', H)
            out["user_anchor"] = self.pool(extra_hidden, extra)                       # (U, d)
        if with_lm:
            targets = suffix.targets.to(self.device)
            sel = targets != -100
            out["lm_logits"] = self.lm_logits(hidden[sel], lm_vocab)                  # (n_answer_tokens, V or K)
            out["lm_targets"] = targets[sel] if lm_vocab is None else vocab_positions(lm_vocab, targets[sel])
        if with_answer_tower:
            out["answer"] = self.embed_answers(answers)
        return out

    # ----- data -----
    @property
    def feature_spec(self) -> FeatureSpec:
        return FeatureSpec.from_dict(self.config.feature_spec)

    def behaviour(self, events, profiles, user_ids: Sequence[str], *, max_events: int | None = None) -> BehaviourStore:
        """Pack these users' behaviour the way this model was built to read it (`max_events` overrides the
        config's events kept per modality, e.g. to study cost against prefix length)."""
        return BehaviourStore.build(
            events, profiles, user_ids, text_encoder=get_text_encoder(self.config.text_encoder),
            feature_spec=self.feature_spec, modalities=self.config.modalities,
            max_events=max_events or self.config.max_events,
        )

    # ----- construction and persistence -----
    @classmethod
    def from_config(cls, config: QAnchorConfig) -> "QAnchorModel":
        """The model built untrained, in eval mode (as from_pretrained): LoRA's dropout layers start in train
        mode, so embeddings would vary call to call; training loops call `.train()` themselves."""
        backbone = load_backbone(config.backbone, list(config.modalities) + [TABULAR_MODALITY])
        return cls(config, backbone).eval()

    @classmethod
    def from_data(cls, config: QAnchorConfig, events, profiles, reference_users: Sequence[str], *,
                  window_start=None, window_end=None) -> "QAnchorModel":
        """Fit the tabular feature spec on `reference_users` (pre-training users) and build the model.
        The feature window is [window_start, window_end) (the dataset's declared window, World.history_window);
        unset ends come from the data (all history), see FeatureSpec.fit."""
        spec = FeatureSpec.fit(events, profiles, user_ids=list(reference_users), modalities=config.modalities,
                               window_start=window_start, window_end=window_end)
        text_dim = get_text_encoder(config.text_encoder).dim
        config = replace(config, event_dim=text_dim + len(NUMERIC_EVENT_FEATURES),
                         tabular_dim=len(spec.feature_names), feature_spec=spec.to_dict())
        model = cls.from_config(config)
        numeric = event_numeric_fields(sorted_events(events, reference_users, config.modalities, spec.window), spec)  # (E, 3)
        if len(numeric):
            model.encoder.set_numeric_stats(numeric.mean(0), numeric.std(0))
        return model

    def untrained_start(self, events, profiles, reference_users: Sequence[str]) -> "QAnchorModel":
        """This model's starting point before pre-training: its config (seeds included) rebuilt untrained by
        `from_data` on the same reference users and the feature window this model was fitted with. What the
        diagnostics and the label curve set a trained model against."""
        start, end = self.feature_spec.window
        return type(self).from_data(self.config, events, profiles, reference_users, window_start=start, window_end=end)

    def save_pretrained(self, directory) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        own = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("llm.")}
        save_file(own, directory / WEIGHTS_NAME)
        if _is_peft(self.llm):
            # the resized embedding rows are rebuilt deterministically on load; trained special-token rows
            # are saved by peft as trainable tokens, so the full embedding table need not be copied
            self.llm.save_pretrained(directory / "lora", save_embedding_layers=False)
        else:
            save_backbone(self.backbone_info, directory / "backbone")
        return directory

    @classmethod
    def from_pretrained(cls, directory) -> "QAnchorModel":
        directory = Path(directory)
        if not (directory / CONFIG_NAME).exists():
            raise FileNotFoundError(f"{directory} is not a saved QAnchorModel (no {CONFIG_NAME})")
        config = QAnchorConfig.from_dict(json.loads((directory / CONFIG_NAME).read_text()))
        if (directory / "lora").exists():
            from peft import PeftModel

            backbone = load_backbone(config.backbone, list(config.modalities) + [TABULAR_MODALITY])
            backbone.model = PeftModel.from_pretrained(backbone.model, directory / "lora", is_trainable=True)
        else:
            backbone = load_saved_backbone(directory / "backbone")
        model = cls(config, backbone)
        missing, unexpected = model.load_state_dict(load_file(directory / WEIGHTS_NAME), strict=False)
        missing = [k for k in missing if not k.startswith("llm.")
                   and not (k in _OPTIONAL_BUFFERS and config.event_norm == "none")]
        if missing or unexpected:
            raise ValueError(f"checkpoint {directory} does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        # eval mode, the Hugging Face convention: a LoRA backbone's dropout would otherwise make two embeddings of
        # one input differ; pre-training calls `.train()` itself
        return model.eval()


def vocab_positions(vocab: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Column of each token in a sorted restricted vocabulary; a token outside it is a clear error."""
    pos = torch.searchsorted(vocab, tokens).clamp(max=len(vocab) - 1)             # (n,)
    missing = tokens[vocab[pos] != tokens]
    if len(missing):
        raise ValueError(f"next-token targets {sorted(set(missing.tolist()))[:10]} are not in the restricted "
                         f"vocabulary of {len(vocab)} tokens; build it from every answer the loss will see")
    return pos


def _is_peft(model: nn.Module) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)
