"""Tests of the concept vocabulary, the embedder cache and the FAISS concept index."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import HashEmbedder

from lavise_core.data.dataset import background_phrase, dataset_backgrounds
from lavise_core.explain.lavise.index import (
    COLOUR_ADJECTIVES,
    CONCRETE_NOUNS,
    SHIPPED_WORDS,
    ConceptError,
    ConceptIndex,
    VocabularySettings,
    build_vocabulary,
    dataset_concepts,
    general_vocabulary,
    load_general_vocabulary,
    phrase_pairs,
    tagged_words,
    vocabulary_hash,
    write_shipped_words,
)
from lavise_core.models.text_encoder import TextEmbedder


def unit(n: int, d: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_phrase_pairs_are_adjective_noun_from_lists():
    pairs = phrase_pairs()
    assert len(pairs) > 5000 and len(pairs) == len(set(pairs))
    assert "red wing" in pairs and "green grass" in pairs and "striped wing" in pairs
    assert "wooden fence" in pairs and "hooked beak" in pairs
    assert "wooden eye" not in pairs  # materials only with objects / scenes
    for p in pairs[:500]:
        _adj, noun = p.split(" ")
        assert noun in CONCRETE_NOUNS
    assert all(p.split(" ")[0] in COLOUR_ADJECTIVES for p in pairs[: len(CONCRETE_NOUNS)])


def test_vocabulary_hash_depends_on_order_and_model():
    a = vocabulary_hash(["red wing", "tail"], "m")
    assert a == vocabulary_hash(["red wing", "tail"], "m")
    assert a != vocabulary_hash(["tail", "red wing"], "m")
    assert a != vocabulary_hash(["red wing", "tail"], "other")
    assert a != vocabulary_hash(["red win", "gtail"], "m")  # separator matters


def test_general_vocabulary_keeps_nouns_and_adjectives():
    vocab = general_vocabulary(VocabularySettings(n_words=1500, phrases=False))
    assert "water" in vocab and "green" in vocab  # noun, adjective
    for word in ("the", "and", "quickly", "because"):
        assert word not in vocab
    assert "red" in vocab and "beak" in vocab  # curated lists always present


def test_shipped_words_are_the_tagged_words_of_the_default_recipe():
    """The shipped list (what a fresh machine uses instead of tagging 60,000 words) is what tagging gives today;
    if this fails, the recipe, wordfreq or the spaCy model changed: run
    ``python -m lavise_core.explain.lavise.index --write-words``."""
    import gzip

    with gzip.open(SHIPPED_WORDS, "rt", encoding="utf-8") as f:
        header, *shipped = f.read().splitlines()
    assert header == f"# recipe {VocabularySettings().recipe_hash()}"
    assert shipped == tagged_words()
    vocab = general_vocabulary()
    assert vocab[: len(shipped)] == shipped and len(vocab) == len(set(vocab)) > len(shipped)


def test_shipped_words_of_another_recipe_are_not_used(tmp_path, monkeypatch):
    import lavise_core.explain.lavise.index as index

    path = tmp_path / "words.txt.gz"
    monkeypatch.setattr(index, "SHIPPED_WORDS", path)
    monkeypatch.setattr(index, "tagged_words", lambda s=None: ["zebra", "quartz"])  # tagging is tested above
    assert write_shipped_words(path) == 2
    assert general_vocabulary()[:2] == ["zebra", "quartz"]  # read back under the default recipe
    first = path.read_bytes()
    write_shipped_words(path)
    assert path.read_bytes() == first  # the same bytes each time (gzip without a time stamp)
    monkeypatch.setattr(index, "tagged_words", lambda s=None: ["tagged"])
    # the header names another recipe: tagged again
    assert general_vocabulary(VocabularySettings(n_words=400))[0] == "tagged"
    assert general_vocabulary()[0] == "zebra"
    path.write_bytes(b"not gzip")
    assert general_vocabulary()[0] == "tagged"  # unreadable: tagged again


def test_general_vocabulary_cache_is_built_once(tmp_path):
    s = VocabularySettings(n_words=300)
    emb = HashEmbedder()
    p1, e1 = load_general_vocabulary(s, emb, tmp_path)
    assert emb.calls == 1 and e1.shape == (len(p1), 16)
    assert len(list(tmp_path.glob("vocab-*.npz"))) == 1
    p2, e2 = load_general_vocabulary(s, emb, tmp_path)
    assert emb.calls == 1 and p1 == p2 and np.array_equal(e1, e2)
    load_general_vocabulary(VocabularySettings(n_words=301), emb, tmp_path)  # new recipe -> rebuilt
    assert emb.calls == 2 and len(list(tmp_path.glob("vocab-*.npz"))) == 2


def test_build_vocabulary_puts_dataset_first_without_duplicates():
    emb = HashEmbedder()
    general = ["water", "red wing", "tail"]
    phrases, e, n = build_vocabulary(
        ["Red Wing", "blue crown", "blue crown"], general, emb.embed(general), emb
    )
    assert phrases == ["red wing", "blue crown", "water", "tail"] and n == 2
    assert np.allclose(e[2], emb.embed(["water"])[0]) and e.shape == (4, 16)


def test_dataset_concepts_include_one_background_phrase_per_kind(tmp_path):
    from lavise_core.data.dataset import ImageRecord, ProbeDataset

    recs = [
        ImageRecord("a", "a.png", region_concepts={"wing": ["Red Wing "]}, meta={"background": "Water"}),
        ImageRecord("b", "b.png", attributes=["blue tail"], meta={"background": "sky"}),
        ImageRecord("c", "c.png", meta={"background": "water"}),
        ImageRecord("d", "d.png"),  # no background kind: no phrase
    ]
    ds = ProbeDataset(tmp_path, "t", "custom", ["x"], ["wing"], recs, {})
    assert background_phrase(" Dusk ") == "dusk background" and background_phrase(None) is None
    assert background_phrase("") is None
    assert dataset_backgrounds(ds) == ["sky background", "water background"]
    assert dataset_concepts(ds) == ["blue tail", "red wing", "sky background", "water background"]


def test_query_lru_cache():
    emb = HashEmbedder()
    emb.cache_size = 2
    a = emb.embed_queries(["red wing", "red wing", " red wing "])
    assert emb.calls == 1 and emb.texts == 1 and np.array_equal(a[0], a[2])
    emb.embed_queries(["b"])
    emb.embed_queries(["c"])  # evicts "red wing"
    emb.embed_queries(["red wing"])
    assert emb.texts == 4


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_index_round_trip(tmp_path, kind):
    x = unit(2000, 16)
    phrases = [f"p{i}" for i in range(len(x))]
    idx = ConceptIndex(HashEmbedder(), model_id="hash").build(phrases, x, kind=kind, nlist=16, nprobe=4)
    q = unit(7, 16, seed=1)
    s1, i1 = idx.search(q, 5)
    idx.save(tmp_path)
    back = ConceptIndex.load(tmp_path, embedder=HashEmbedder())
    s2, i2 = back.search(q, 5)
    assert back.kind == kind and back.phrases == phrases and len(back) == 2000
    assert np.array_equal(i1, i2) and np.array_equal(s1, s2)
    assert np.all(np.diff(s1, axis=1) <= 1e-6)  # descending
    if kind == "flat":  # exact: every vector finds itself with cosine 1
        s, i = back.search(x[:50], 1)
        assert np.array_equal(i[:, 0], np.arange(50)) and np.allclose(s, 1, atol=1e-5)


def test_index_kind_chosen_by_size():
    x = unit(800, 8)
    names = [str(i) for i in range(800)]
    assert ConceptIndex().build(names, x, flat_max=1000).kind == "flat"
    assert ConceptIndex().build(names, x, flat_max=500).kind == "ivf"


def test_index_errors(tmp_path):
    with pytest.raises(ConceptError, match="do not match"):
        ConceptIndex().build(["a"], unit(2, 8))
    with pytest.raises(ConceptError, match="empty"):
        ConceptIndex().search(unit(1, 8), 1)
    with pytest.raises(ConceptError, match="missing"):
        ConceptIndex.load(tmp_path)
    idx = ConceptIndex(model_id="m").build(["a", "b"], unit(2, 8))
    idx.save(tmp_path)
    (tmp_path / "phrases.json").write_text('["a", "c"]')
    with pytest.raises(ConceptError, match="stale"):
        ConceptIndex.load(tmp_path)
    with pytest.raises(ConceptError, match="dimension"):
        idx.search(unit(1, 4), 1)


@pytest.fixture(scope="module")
def minilm() -> TextEmbedder:
    return TextEmbedder()


def test_minilm_embeddings_are_semantic(minilm):
    e = minilm.embed(["red wing", "crimson wing", "wooden table"])
    assert e.shape == (3, 384) and e.dtype == np.float32
    assert np.allclose(np.linalg.norm(e, axis=1), 1, atol=1e-5)
    assert e[0] @ e[1] > e[0] @ e[2] + 0.2
    vocab = ["red wing", "blue tail", "wooden table"]
    idx = ConceptIndex(minilm).build(vocab, minilm.embed(vocab))
    # an out-of-vocabulary text is embedded itself and finds its neighbour
    assert idx.search_text("scarlet feathers on the wing", 1)[0][0][0] == "red wing"


def test_flat_index_fast_front_matches_exact_search():
    x = unit(3000, 32, seed=2)
    idx = ConceptIndex(HashEmbedder(), model_id="hash").build([f"p{i}" for i in range(3000)], x, kind="flat")
    assert idx._fast is None  # below FAST_MIN: plain flat search
    q = unit(20, 32, seed=3)
    s_exact, i_exact = idx.search(q, 10)
    idx._build_fast(fast_min=1000)
    assert idx._fast is not None
    s_fast, i_fast = idx.search(q, 10)
    assert np.array_equal(i_fast, i_exact) and np.allclose(s_fast, s_exact, atol=1e-5)  # exact re-scoring
    s_all, _ = idx.search(q[:1], 3000)  # k * refine_factor > n: falls back to the flat index
    assert s_all.shape == (1, 3000)


def test_query_path_equals_encode(minilm):
    texts = ["glittering plumage at dusk", "red wing"]
    assert minilm.fast_path() and not HashEmbedder().fast_path()
    assert np.allclose(minilm._embed_short(texts), minilm.embed(texts), atol=1e-5)


def test_two_processes_wanting_the_vocabulary_build_it_once(tmp_path):
    # the build's background prefetch and the LaViSE stage (or two test workers) meet on the cache's lock:
    # the second waits for the first and reads its file
    import threading

    s = VocabularySettings(n_words=300)
    emb = HashEmbedder()
    out = []
    threads = [
        threading.Thread(target=lambda: out.append(load_general_vocabulary(s, emb, tmp_path)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert emb.calls == 1 and out[0][0] == out[1][0] and np.array_equal(out[0][1], out[1][1])
