"""Cluster-based soft prompt tuning (DESIGN §1.6): scenario adaptation with the model frozen.

n learnable prompt vectors sit after the behaviour prefix (before the optional task query), and each of
the K=2 classes gets m learnable prototypes, initialised by k-means of the initial embeddings within
the class. The class-balanced prototype-softmax loss pulls each user's embedding toward its class. All
training runs over cached prefixes, so a step costs only the prompt, query and <user_emb> tokens.
Epochs are chosen by early stopping on a held-out part of the tune split (soft prompts overfit a few
hundred positives); the test split is never touched here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans
from sklearn.metrics import roc_auc_score
from torch import nn

from qanchor_lab.embedder import PrefixCache, run_cached
from qanchor_lab.losses import prototype_loss, prototype_scores


@dataclass
class PromptTuningConfig:
    n_prompt: int = 6                 # soft prompt tokens (the paper's gains saturate around 6)
    use_query: bool = True            # put the task's query text after the soft prompt
    prototypes_per_class: int = 2     # m prototypes for each of the K=2 classes
    temperature: float = 0.1          # tau of the prototype softmax
    lr: float = 3e-3
    epochs: int = 30                  # upper bound; early stopping picks the best epoch
    patience: int = 3                 # epochs without validation-AUC gain before stopping
    batch_size: int = 64
    val_share: float = 0.25           # share of the tune split held out for early stopping
    center: bool = True               # subtract the initial mean embedding before the prototype softmax
    seed: int = 0

    def __post_init__(self):
        if self.n_prompt < 0 or (self.n_prompt == 0 and not self.use_query):
            raise ValueError("need n_prompt >= 1, or n_prompt == 0 with use_query=True")
        if self.prototypes_per_class < 1:
            raise ValueError(f"prototypes_per_class must be >= 1, got {self.prototypes_per_class}")
        if not 0 < self.val_share < 1:
            raise ValueError(f"val_share must lie in (0, 1), got {self.val_share}")


class TaskAdapter(nn.Module):
    """A task's soft prompt and prototypes; small enough to keep one file per task."""

    def __init__(self, n_prompt: int, hidden: int, embed_dim: int, n_classes: int, per_class: int, query: str, config: PromptTuningConfig):
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(n_prompt, hidden))                 # (n, H)
        self.prototypes = nn.Parameter(torch.zeros(n_classes * per_class, embed_dim))  # (K*m, d)
        self.register_buffer("prototype_class", torch.arange(n_classes).repeat_interleave(per_class))
        # Embeddings share a dominant direction (they sit in a narrow cone), which swamps the cosine to
        # any prototype; measuring from their mean lets the class structure show.
        self.register_buffer("center", torch.zeros(embed_dim))
        self.query = query
        self.config = config

    def suffix_text(self) -> str:
        return self.query if self.config.use_query else ""

    def embed(self, model, cache: PrefixCache) -> torch.Tensor:
        suffix = model.make_suffix([self.suffix_text()], n_prompt=self.prompt.shape[0]).tile(len(cache))
        return run_cached(model, cache, suffix, self.prompt if self.prompt.shape[0] else None)   # (B, d)

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        """What the prototypes compare against: the (centred) embedding."""
        return emb - self.center                                                  # (B, d)

    def class_probs(self, emb: torch.Tensor) -> torch.Tensor:
        return prototype_scores(self.features(emb), self.prototypes, self.prototype_class, temperature=self.config.temperature)

    @torch.no_grad()
    def score(self, model, cache: PrefixCache, batch_size: int = 256) -> np.ndarray:
        """P(positive) for every cached user."""
        out = []
        for i in range(0, len(cache), batch_size):
            rows = torch.arange(i, min(i + batch_size, len(cache)))
            out.append(self.class_probs(self.embed(model, cache.select(rows)))[:, 1])
        return torch.cat(out).cpu().numpy()

    def save(self, path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        save_file({"prompt": self.prompt.detach().contiguous(), "prototypes": self.prototypes.detach().contiguous(),
                   "prototype_class": self.prototype_class, "center": self.center}, path.with_suffix(".safetensors"))
        path.with_suffix(".json").write_text(json.dumps({"query": self.query, "config": asdict(self.config)}, indent=2))
        return path.with_suffix(".safetensors")

    @classmethod
    def load(cls, path) -> "TaskAdapter":
        path = Path(path)
        meta = json.loads(path.with_suffix(".json").read_text())
        t = load_file(path.with_suffix(".safetensors"))
        cfg = PromptTuningConfig(**meta["config"])
        n_classes = int(t["prototype_class"].max()) + 1
        a = cls(t["prompt"].shape[0], t["prompt"].shape[1], t["prototypes"].shape[1], n_classes,
                t["prototypes"].shape[0] // n_classes, meta["query"], cfg)
        a.load_state_dict(t)
        return a


@dataclass
class TuningResult:
    adapter: TaskAdapter
    best_epoch: int
    val_auc: float
    history: list[dict] = field(default_factory=list)


def _init_prompt(model, n: int, generator: torch.Generator) -> torch.Tensor:
    """Start from randomly chosen word embeddings: the scale the LLM expects."""
    table = model.llm.get_input_embeddings().weight.detach()
    idx = torch.randint(0, table.shape[0], (n,), generator=generator)
    return table[idx].clone()


def tune_task(model, cache: PrefixCache, labels: np.ndarray, query: str, config: PromptTuningConfig | None = None) -> TuningResult:
    """Tune one task's soft prompt + prototypes on cached tune-split prefixes with binary `labels`."""
    config = config or PromptTuningConfig()
    labels = np.asarray(labels).astype(int)
    if len(labels) != len(cache):
        raise ValueError(f"{len(labels)} labels for {len(cache)} cached users")
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError(f"task {query!r}: labels must contain both classes 0 and 1, got {sorted(set(labels))}")
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    rng = np.random.default_rng(config.seed)
    gen = torch.Generator().manual_seed(config.seed)

    # stratified train / validation split of the tune users
    val = np.zeros(len(labels), bool)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        val[rng.choice(idx, max(1, int(round(config.val_share * len(idx)))), replace=False)] = True
    tr_idx, va_idx = np.flatnonzero(~val), np.flatnonzero(val)

    H = model.llm.get_input_embeddings().weight.shape[1]
    adapter = TaskAdapter(config.n_prompt, H, model.config.embed_dim, 2, config.prototypes_per_class, query, config)
    with torch.no_grad():
        adapter.prompt.copy_(_init_prompt(model, config.n_prompt, gen))
        base = _embed_rows(adapter, model, cache, tr_idx)                       # (n_train, d)
        if config.center:
            adapter.center.copy_(base.mean(0))
        base = torch.nn.functional.normalize(adapter.features(base), dim=-1).numpy()
        protos = []
        for c in (0, 1):
            x = base[labels[tr_idx] == c]
            k = min(config.prototypes_per_class, len(x))
            centres = KMeans(k, n_init=4, random_state=config.seed).fit(x).cluster_centers_
            protos.append(np.resize(centres, (config.prototypes_per_class, x.shape[1])))
        adapter.prototypes.copy_(torch.from_numpy(np.concatenate(protos)).float())

    counts = np.bincount(labels[tr_idx], minlength=2)
    class_weights = torch.tensor(len(tr_idx) / (2 * counts), dtype=torch.float32)
    opt = torch.optim.Adam(adapter.parameters(), lr=config.lr)
    def val_auc() -> float:
        with torch.no_grad():
            probs = adapter.class_probs(_embed_rows(adapter, model, cache, va_idx))[:, 1].numpy()
        return float(roc_auc_score(labels[va_idx], probs))

    # epoch 0 (the k-means initialisation) is a candidate too: tuning must earn its keep on validation
    start = val_auc()
    best = (start, 0, {k: v.clone() for k, v in adapter.state_dict().items()})
    history, stale = [{"epoch": 0, "train_loss": float("nan"), "val_auc": start}], 0
    for epoch in range(1, config.epochs + 1):
        order = rng.permutation(tr_idx)
        total = 0.0
        for i in range(0, len(order), config.batch_size):
            rows = order[i:i + config.batch_size]
            emb = adapter.embed(model, cache.select(torch.as_tensor(rows)))
            loss = prototype_loss(adapter.features(emb), adapter.prototypes, torch.as_tensor(labels[rows]), temperature=config.temperature,
                                  prototype_class=adapter.prototype_class, class_weights=class_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(rows)
        auc = val_auc()
        history.append({"epoch": epoch, "train_loss": total / len(order), "val_auc": auc})
        if auc > best[0] + 1e-4:
            best, stale = (auc, epoch, {k: v.clone() for k, v in adapter.state_dict().items()}), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    adapter.load_state_dict(best[2])
    return TuningResult(adapter, best[1], best[0], history)


@torch.no_grad()
def _embed_rows(adapter: TaskAdapter, model, cache: PrefixCache, rows: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    out = [adapter.embed(model, cache.select(torch.as_tensor(rows[i:i + batch_size])))
           for i in range(0, len(rows), batch_size)]
    return torch.cat(out)
