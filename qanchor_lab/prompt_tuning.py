"""Cluster-based soft prompt tuning (docs/design.md §1.6): scenario adaptation with the model frozen.

n learnable prompt vectors sit after the behaviour prefix, after the task query by default (or before
it, or with no query), and each of the K=2 classes gets m learnable prototypes, initialised by k-means
of the initial embeddings within the class. The class-balanced prototype-softmax loss pulls each
user's embedding toward its class. All training runs over cached prefixes. With the prompt after the
query, the query's keys and values join each user's cache once per task, so a step runs only the
prompt and <user_emb> tokens; with the prompt first, a step also runs the query.

Choices of ours (the paper publishes no code for this stage), each measured on a held-out part of the
tune split of the default world, never on the test split:
- what the prototypes compare against (`normalize`): the embeddings as they are by default. Whitening
  (mean and shrunk covariance of the initial embeddings, frozen as buffers) suited the nearly
  one-dimensional embeddings of the earlier pre-training; on today's it amplifies noise directions and
  costs 0.01-0.04 AUC (docs/design.md §7.4);
- the prototypes are first fitted alone on the initial embeddings (cheap: no LLM call) before prompt
  and prototypes train together, so the prompt is never steered by a k-means head still far from a
  decision boundary (linear probe, then fine-tune);
- the number of joint epochs is chosen by early stopping on a held-out share of the tune users (soft
  prompts overfit a few hundred positives), then the adapter is trained again on all of them;
- what scores a user (`readout`): by default the base method's probe (StandardScaler + CV-tuned logistic
  regression) fitted on the tuned embeddings of all tune users, so that prompt-tuned and base differ only by
  the soft prompt; the prototype softmax stays available (the paper's) and is what tuning and early
  stopping use either way.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sklearn.cluster import KMeans
from sklearn.metrics import roc_auc_score
from threadpoolctl import threadpool_limits
from torch import nn

from qanchor_lab.embedder import PrefixCache, extend_cache, run_cached
from qanchor_lab.losses import prototype_loss, prototype_scores
from qanchor_lab.sequence import token_ids


Normalize = Literal["none", "center", "standardize", "whiten"]
NORMALIZE: tuple[str, ...] = ("none", "center", "standardize", "whiten")
# "random_words": rows of the word-embedding table drawn at random; "query": the embeddings of the task
# query's own tokens, repeated to n_prompt (text initialisation, Lester et al. 2021)
PromptInit = Literal["random_words", "query"]
PROMPT_INIT: tuple[str, ...] = ("random_words", "query")
# "before_query": prefix, prompt, query, <user_emb>; "after_query": prefix, query, prompt, <user_emb>. After the
# query, the query's keys and values are computed once per task (extend_cache) and a step runs only the
# prompt and <user_emb> tokens.
PromptPosition = Literal["before_query", "after_query"]
PROMPT_POSITION: tuple[str, ...] = ("before_query", "after_query")
# How a tuned adapter scores a user: "prototypes": the prototype softmax the prompt was tuned with (the paper's);
# "probe": the same probe as the base method (StandardScaler + CV-tuned logistic regression) fitted on the
# tuned embeddings of the tune users, so prompt-tuned and base differ only by the soft prompt.
Readout = Literal["prototypes", "probe"]
READOUT: tuple[str, ...] = ("prototypes", "probe")


@dataclass
class PromptTuningConfig:
    n_prompt: int = 6                 # soft prompt tokens (the paper's gains saturate around 6)
    use_query: bool = True            # put the task's query text in the suffix too
    prompt_position: PromptPosition = "after_query"
    prototypes_per_class: int = 1     # m prototypes for each of the K=2 classes (1: the paper's loss exactly)
    temperature: float = 0.1          # tau of the prototype softmax
    lr: float = 3e-3
    epochs: int = 30                  # upper bound; early stopping picks the best epoch
    patience: int = 3                 # epochs without validation-AUC gain before stopping
    batch_size: int = 64
    val_share: float = 0.25           # share of the tune split held out for early stopping
    refit: bool = True                # after early stopping, train again on all tune users for the chosen epochs
    # what the prototypes compare against: the raw embedding, the embedding minus the initial mean, its
    # per-dimension z-scores, or the whitened embedding (initial mean and covariance, shrunk toward its
    # average variance)
    # "none" since the pre-training of docs/design.md §7: on its less collapsed embeddings whitening amplifies
    # noise directions (tune-split study, prototypes alone: none 0.668, center 0.658, whiten 0.629)
    normalize: Normalize = "none"
    shrinkage: float = 0.1            # whiten only: covariance shrinkage in [0, 1] (1 = centre and rescale only)
    head_epochs: int = 20             # prototype-only epochs on the initial embeddings before the joint phase
    head_lr: float = 1e-2             # Adam lr of that prototype-only phase
    prompt_init: PromptInit = "random_words"
    # "probe" since the reconstruction pre-training (docs/design.md §7.8): on tune users (70% fit, 30% scored) the
    # prototype head read 0.004-0.008 AUC less than a probe on the same tuned embeddings (two pre-training
    # seeds; 0.011 on the model before); "prototypes" is the paper's
    readout: Readout = "probe"
    seed: int = 0

    def __post_init__(self):
        if self.normalize not in NORMALIZE:
            raise ValueError(f"normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if self.prompt_position not in PROMPT_POSITION:
            raise ValueError(f"prompt_position must be one of {PROMPT_POSITION}, got {self.prompt_position!r}")
        if self.prompt_init not in PROMPT_INIT:
            raise ValueError(f"prompt_init must be one of {PROMPT_INIT}, got {self.prompt_init!r}")
        if self.readout not in READOUT:
            raise ValueError(f"readout must be one of {READOUT}, got {self.readout!r}")
        if not 0 <= self.shrinkage <= 1:
            raise ValueError(f"shrinkage must lie in [0, 1], got {self.shrinkage}")
        if self.head_epochs < 0 or self.epochs < 0:
            raise ValueError(f"epochs and head_epochs must be >= 0, got {self.epochs} and {self.head_epochs}")
        if self.n_prompt < 0 or (self.n_prompt == 0 and not self.use_query):
            raise ValueError("need n_prompt >= 1, or n_prompt == 0 with use_query=True")
        if self.prototypes_per_class < 1:
            raise ValueError(f"prototypes_per_class must be >= 1, got {self.prototypes_per_class}")
        if not 0 < self.val_share < 1:
            raise ValueError(f"val_share must lie in (0, 1), got {self.val_share}")
        if not (self.lr > 0 and self.head_lr > 0):  # Adam would take a negative rate and climb the loss without a word
            raise ValueError(f"lr and head_lr must be > 0, got {self.lr} and {self.head_lr}")


class TaskAdapter(nn.Module):
    """A task's soft prompt and prototypes; small enough to keep one file per task."""

    def __init__(self, n_prompt: int, hidden: int, embed_dim: int, n_classes: int, per_class: int, query: str, config: PromptTuningConfig):
        super().__init__()
        self.prompt = nn.Parameter(torch.zeros(n_prompt, hidden))                 # (n, H)
        self.prototypes = nn.Parameter(torch.zeros(n_classes * per_class, embed_dim))  # (K*m, d)
        self.register_buffer("prototype_class", torch.arange(n_classes).repeat_interleave(per_class))
        # Embeddings sit in a narrow cone whose few dominant directions swamp the cosine to any prototype;
        # measuring from their mean (and in whitened coordinates) lets the class structure show.
        self.register_buffer("center", torch.zeros(embed_dim))
        self.register_buffer("whiten", torch.eye(embed_dim))
        # the probe read-out (config.readout="probe"), fitted by `fit_probe` after tuning
        self.register_buffer("probe_mean", torch.zeros(embed_dim))
        self.register_buffer("probe_scale", torch.ones(embed_dim))
        self.register_buffer("probe_coef", torch.zeros(embed_dim))
        self.register_buffer("probe_intercept", torch.zeros(1))
        self.query = query
        self.config = config
        self._suffix = None  # the step's suffix, tokenised on first use

    def suffix_text(self) -> str:
        """The text that runs with the prompt in every step (the query, unless it is in the task cache)."""
        return self.query if self.config.use_query and not _query_in_cache(self.config) else ""

    def task_cache(self, model, cache: PrefixCache) -> PrefixCache:
        return task_cache(model, cache, self.query, self.config)

    def embed(self, model, cache: PrefixCache, *, task_cache: bool = False) -> torch.Tensor:
        """Embeddings (B, d) of cached users; `task_cache=True` when `cache` came from `task_cache()`."""
        if not task_cache:
            cache = self.task_cache(model, cache)
        if self._suffix is None:
            self._suffix = model.make_suffix([self.suffix_text()], n_prompt=self.prompt.shape[0])
        return run_cached(model, cache, self._suffix.tile(len(cache)), self.prompt if self.prompt.shape[0] else None)

    def features(self, emb: torch.Tensor) -> torch.Tensor:
        """What the prototypes compare against: the centred, whitened embedding."""
        return (emb - self.center) @ self.whiten                                  # (B, d)

    @torch.no_grad()
    def fit_normalization(self, emb: torch.Tensor) -> None:
        """Freeze centre and whitening from initial embeddings (N, d), per `config.normalize`."""
        mode, d = self.config.normalize, emb.shape[1]
        self.center.zero_()
        self.whiten.copy_(torch.eye(d))
        if mode == "none":
            return
        self.center.copy_(emb.mean(0))
        if mode == "standardize":  # per-dimension z-scores, the probe's StandardScaler
            self.whiten.copy_(torch.diag(emb.std(0).clamp_min(1e-6).reciprocal()))
        if mode == "whiten":
            x = (emb - self.center).double()
            cov = x.T @ x / max(len(x) - 1, 1)                                    # (d, d)
            a = self.config.shrinkage
            cov = (1 - a) * cov + a * cov.diagonal().mean() * torch.eye(d, dtype=cov.dtype, device=cov.device)
            evals, evecs = torch.linalg.eigh(cov)
            inv_sqrt = evals.clamp_min(1e-12 * evals.max()).rsqrt()
            self.whiten.copy_((evecs * inv_sqrt) @ evecs.T)                       # (d, d) symmetric

    def prototype_probs(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, 2) class probabilities of the prototype softmax (what tuning optimises)."""
        return prototype_scores(self.features(emb), self.prototypes, self.prototype_class, temperature=self.config.temperature)

    def class_probs(self, emb: torch.Tensor) -> torch.Tensor:
        """(B, 2) class probabilities of the adapter's read-out (`config.readout`)."""
        if self.config.readout == "prototypes":
            return self.prototype_probs(emb)
        z = (emb - self.probe_mean) / self.probe_scale                             # (B, d)
        p = torch.sigmoid(z @ self.probe_coef + self.probe_intercept)              # (B,)
        return torch.stack([1 - p, p], 1)                                          # (B, 2)

    @torch.no_grad()
    def fit_probe(self, emb: torch.Tensor, labels: np.ndarray) -> None:
        """Fit the probe read-out on tuned embeddings (N, d) of labelled users (baselines.fit_linear_probe)."""
        from qanchor_lab.baselines import fit_linear_probe

        fitted = fit_linear_probe(emb.cpu().numpy(), labels)
        for name in ("mean", "scale", "coef", "intercept"):
            getattr(self, f"probe_{name}").copy_(torch.from_numpy(fitted[name]))

    @torch.no_grad()
    def score(self, model, cache: PrefixCache, batch_size: int = 256) -> np.ndarray:
        """P(positive) for every cached user."""
        out = [self.class_probs(self.embed(model, rows))[:, 1] for rows in cache.chunks(batch_size)]   # (b,) each
        return torch.cat(out).cpu().numpy()

    def save(self, path) -> Path:
        """Tensors to `<path>.safetensors`, query and config to `<path>.json` (a task id may hold dots)."""
        tensors, meta = _adapter_files(path)
        tensors.parent.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}, tensors)
        meta.write_text(json.dumps({"query": self.query, "config": asdict(self.config)}, indent=2))
        return tensors

    @classmethod
    def load(cls, path, device: str | torch.device = "cpu") -> "TaskAdapter":
        """An adapter saved by `save`, on `device`: pass the model's (`model.device`), since the prompt runs through
        its layers and the prototypes meet its embeddings. The tensors are read straight onto that device."""
        path, meta_path = _adapter_files(path)
        meta = json.loads(meta_path.read_text())
        t = load_file(path, device=str(device))   # safetensors takes a device string ("cpu", "cuda:0"), not a torch.device
        cfg = PromptTuningConfig(**{"readout": "prototypes", **meta["config"]})  # saved before readout existed: prototypes
        n_classes = int(t["prototype_class"].max()) + 1
        # built where the tensors are, as _start builds a fresh one where the model is: load_state_dict copies
        # into the module's own tensors, so loading alone would leave a CPU-built adapter on the CPU
        a = cls(t["prompt"].shape[0], t["prompt"].shape[1], t["prototypes"].shape[1], n_classes,
                t["prototypes"].shape[0] // n_classes, meta["query"], cfg).to(device)
        # adapters saved before the probe read-out existed hold no probe tensors (and read out by prototypes)
        missing, unexpected = a.load_state_dict(t, strict=False)
        if unexpected or any(not (k.startswith("probe_") and cfg.readout == "prototypes") for k in missing):
            raise ValueError(f"{path}: adapter tensors do not match (missing {missing}, unexpected {unexpected})")
        return a


def _query_in_cache(config: PromptTuningConfig) -> bool:
    return config.use_query and config.prompt_position == "after_query"


def task_cache(model, cache: PrefixCache, query: str, config: PromptTuningConfig) -> PrefixCache:
    """Behaviour prefixes plus whatever the prompt cannot change: the query, when it comes first."""
    return extend_cache(model, cache, [query] * len(cache)) if _query_in_cache(config) else cache


@dataclass
class TuningResult:
    adapter: TaskAdapter
    best_epoch: int
    val_auc: float
    history: list[dict] = field(default_factory=list)


def _init_prompt(model, n: int, query: str, how: str, generator: torch.Generator) -> torch.Tensor:
    """(n, H) initial prompt at the scale the LLM expects: word embeddings (random rows, or
    those of the query's tokens as its suffix reads them)."""
    table = model.llm.get_input_embeddings().weight.detach()
    if how == "query" and query:
        ids = torch.as_tensor(token_ids(model.tokenizer, [query], model.config.max_query_tokens)[0])   # (q,)
        return table[ids[torch.arange(n) % len(ids)]].clone()
    idx = torch.randint(0, table.shape[0], (n,), generator=generator)
    return table[idx].clone()


def _fit_head(adapter: TaskAdapter, base: torch.Tensor, labels: np.ndarray, class_weights: torch.Tensor,
              rng: np.random.Generator) -> None:
    """Prototype-only epochs on fixed initial embeddings (N, d): no LLM call, so nearly free."""
    config = adapter.config
    feats = adapter.features(base).detach()                                     # (N, d)
    y = torch.as_tensor(labels)
    opt = torch.optim.Adam([adapter.prototypes], lr=config.head_lr)
    for _ in range(config.head_epochs):
        order = torch.as_tensor(rng.permutation(len(y)))
        for i in range(0, len(order), config.batch_size):
            rows = order[i:i + config.batch_size]
            loss = prototype_loss(feats[rows], adapter.prototypes, y[rows], temperature=config.temperature,
                                  prototype_class=adapter.prototype_class, class_weights=class_weights)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()


def _balanced_weights(labels: np.ndarray) -> torch.Tensor:
    counts = np.bincount(labels, minlength=2)
    return torch.tensor(len(labels) / (2 * counts), dtype=torch.float32)


def _kmeans_centres(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The (k, d) k-means centres of the rows of `x`, on one thread whatever the caller's settings: at two OpenMP
    threads k-means sums in another order (2e-8 apart on unit rows), and which count it takes depends on the OpenMP
    runtime it bound, scikit-learn's own or torch's, so on which was imported first (docs/design.md §7.53). A class's
    rows (about a thousand in the demo) take milliseconds on one thread."""
    with threadpool_limits(limits=1):
        return KMeans(k, n_init=4, random_state=seed).fit(x).cluster_centers_


def _start(model, cache: PrefixCache, labels: np.ndarray, rows: np.ndarray, query: str,
           config: PromptTuningConfig, rng: np.random.Generator) -> TaskAdapter:
    """A fresh adapter fitted on `rows` of a task cache: prompt init, normalisation, k-means, head phase."""
    H = model.llm.get_input_embeddings().weight.shape[1]
    adapter = TaskAdapter(config.n_prompt, H, model.config.embed_dim, 2, config.prototypes_per_class, query,
                          config).to(model.device)  # where the model is: the prompt runs through its layers
    gen = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        adapter.prompt.copy_(_init_prompt(model, config.n_prompt, query, config.prompt_init, gen))
        base = _embed_rows(adapter, model, cache, rows)                         # (n, d)
        adapter.fit_normalization(base)
        unit = torch.nn.functional.normalize(adapter.features(base), dim=-1).cpu().numpy()
        protos = []
        for c in (0, 1):
            x = unit[labels[rows] == c]
            k = min(config.prototypes_per_class, len(x))
            centres = _kmeans_centres(x, k, config.seed)
            protos.append(np.resize(centres, (config.prototypes_per_class, x.shape[1])))
        adapter.prototypes.copy_(torch.from_numpy(np.concatenate(protos)).float())
    _fit_head(adapter, base, labels[rows], _balanced_weights(labels[rows]), rng)
    return adapter


def _epoch(adapter: TaskAdapter, opt: torch.optim.Optimizer, model, cache: PrefixCache, labels: np.ndarray,
           rows: np.ndarray, rng: np.random.Generator) -> float:
    """One joint epoch (prompt + prototypes) over `rows` of a task cache; the mean training loss."""
    config, weights = adapter.config, _balanced_weights(labels[rows])
    order, total = rng.permutation(rows), 0.0
    for i in range(0, len(order), config.batch_size):
        batch = order[i:i + config.batch_size]
        emb = adapter.embed(model, cache.select(torch.as_tensor(batch)), task_cache=True)   # (b, d)
        loss = prototype_loss(adapter.features(emb), adapter.prototypes, torch.as_tensor(labels[batch]),
                              temperature=config.temperature, prototype_class=adapter.prototype_class,
                              class_weights=weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total += loss.item() * len(batch)
    return total / len(order)


def tune_task(model, cache: PrefixCache, labels: np.ndarray, query: str, config: PromptTuningConfig | None = None,
              *, on_epoch: Callable[[dict, TaskAdapter], None] | None = None) -> TuningResult:
    """Tune one task's soft prompt + prototypes on cached tune-split prefixes with binary `labels`.

    The number of joint epochs is chosen on a stratified held-out share of these users; with
    `config.refit` the adapter is then trained again from the same start on all of them for that many
    epochs (as LogisticRegressionCV refits on all folds).

    `on_epoch(record, adapter)` is called with each history record of that selection phase (epoch 0 is
    the starting adapter: initial prompt, fitted prototypes) and the live adapter, e.g. to snapshot it
    (`copy.deepcopy(adapter)`) or embed users with it; it must not modify the adapter.

    The model is only read: it is left in eval mode, its parameters trainable as they were."""
    config = config or PromptTuningConfig()
    labels = np.asarray(labels).astype(int)
    if len(labels) != len(cache):
        raise ValueError(f"{len(labels)} labels for {len(cache)} cached users")
    if set(np.unique(labels)) != {0, 1}:
        raise ValueError(f"task {query!r}: labels must contain both classes 0 and 1, got {sorted(set(labels))}")
    counts = np.bincount(labels, minlength=2)
    if counts.min() < 2:   # one user of a class to fit its prototypes on, one to choose the epochs on
        raise ValueError(f"task {query!r}: {counts.min()} user(s) with label {int(counts.argmin())}; prompt tuning "
                         "needs at least 2 of each class (one to fit on, one held out to choose the epochs)")
    trainable = [p for p in model.parameters() if p.requires_grad]
    for p in trainable:
        p.requires_grad_(False)
    model.eval()
    try:
        return _tune(model, cache, labels, query, config, on_epoch)
    finally:   # the model is only read here: whatever trains it next (pre-training) finds its parameters as they were
        for p in trainable:
            p.requires_grad_(True)


def _tune(model, cache: PrefixCache, labels: np.ndarray, query: str, config: PromptTuningConfig,
          on_epoch: Callable[[dict, TaskAdapter], None] | None) -> TuningResult:
    """`tune_task` on a frozen model."""
    rng = np.random.default_rng(config.seed)

    # stratified train / validation split of the tune users
    val = np.zeros(len(labels), bool)
    for c in (0, 1):
        idx = np.flatnonzero(labels == c)
        n_val = min(max(1, int(round(config.val_share * len(idx)))), len(idx) - 1)   # leave one to fit on
        val[rng.choice(idx, n_val, replace=False)] = True
    tr_idx, va_idx = np.flatnonzero(~val), np.flatnonzero(val)

    cache = task_cache(model, cache, query, config)
    adapter = _start(model, cache, labels, tr_idx, query, config, rng)
    opt = torch.optim.Adam(adapter.parameters(), lr=config.lr)

    def val_auc() -> float:
        with torch.no_grad():
            probs = adapter.prototype_probs(_embed_rows(adapter, model, cache, va_idx))[:, 1].cpu().numpy()
        return float(roc_auc_score(labels[va_idx], probs))

    # epoch 0 (initial prompt, fitted prototypes) is a candidate too: tuning must earn its keep on validation
    start = val_auc()
    best = (start, 0, {k: v.clone() for k, v in adapter.state_dict().items()})
    history, stale = [{"epoch": 0, "train_loss": float("nan"), "val_auc": start}], 0
    if on_epoch is not None:
        on_epoch(history[-1], adapter)
    for epoch in range(1, config.epochs + 1):
        train_loss = _epoch(adapter, opt, model, cache, labels, tr_idx, rng)
        auc = val_auc()
        history.append({"epoch": epoch, "train_loss": train_loss, "val_auc": auc})
        if on_epoch is not None:
            on_epoch(history[-1], adapter)
        if auc > best[0] + 1e-4:
            best, stale = (auc, epoch, {k: v.clone() for k, v in adapter.state_dict().items()}), 0
        else:
            stale += 1
            if stale >= config.patience:
                break
    every = np.arange(len(labels))
    if not config.refit:
        adapter.load_state_dict(best[2])
    else:
        adapter = _start(model, cache, labels, every, query, config, np.random.default_rng(config.seed))
        opt = torch.optim.Adam(adapter.parameters(), lr=config.lr)
        for _ in range(best[1]):
            _epoch(adapter, opt, model, cache, labels, every, rng)
    if config.readout == "probe":
        adapter.fit_probe(_embed_rows(adapter, model, cache, every), labels)
    return TuningResult(adapter, best[1], best[0], history)


def _adapter_files(path) -> tuple[Path, Path]:
    """(tensors, meta) files of an adapter saved at `path`, given with or without either suffix. The suffix is
    appended, not swapped in: `with_suffix` would read a task id's last dot ("ctr.v1") as a suffix, and two such
    tasks would overwrite one file."""
    path = Path(path)
    stem = path.name[: -len(path.suffix)] if path.suffix in (".safetensors", ".json") else path.name
    return path.parent / f"{stem}.safetensors", path.parent / f"{stem}.json"


@torch.no_grad()
def _embed_rows(adapter: TaskAdapter, model, cache: PrefixCache, rows: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    return torch.cat([adapter.embed(model, part, task_cache=True) for part in cache.chunks(batch_size, rows)])   # (n, d)
