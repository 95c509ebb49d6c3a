"""Attribute extraction from captions (spaCy) and from ground-truth labels; the TF-IDF prior."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pytest

from lavise_core.data.dataset import ImageRecord, write_dataset
from lavise_core.explain.textual.attributes import (
    AttributeExtractionError,
    attributes_from_labels,
    extract_attributes,
    load_nlp,
    phrases_from_doc,
    synonym_canonicalizer,
    tfidf_prior,
)


@pytest.fixture(scope="module")
def nlp():
    return load_nlp()


@dataclass
class Tok:
    text: str
    pos_: str
    tag_: str = ""
    lemma_: str = ""


def test_phrase_rule_on_hand_tagged_tokens() -> None:
    toks = [
        Tok("a", "DET"),
        Tok("Red", "ADJ"),
        Tok(",", "PUNCT"),
        Tok("black", "ADJ"),
        Tok("and", "CCONJ"),
        Tok("white", "ADJ"),
        Tok("wings", "NOUN", "NNS", "wing"),
        Tok("very", "ADV"),
        Tok("small", "ADJ"),
        Tok("is", "AUX"),
        Tok("pointed", "VERB", "VBN"),
        Tok("beak", "NOUN", "NN", "beak"),
    ]
    assert phrases_from_doc(toks) == ["red wing", "black wing", "white wing", "pointed beak"]


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        ("this bird has a bright red crown and black wings", ["bright crown", "red crown", "black wing"]),
        (
            "A small bird with red and black wings, a white belly and a long pointed beak.",
            ["small bird", "red wing", "black wing", "white belly", "long beak", "pointed beak"],
        ),
        (
            "the bird has a grey breast, white wing bars and yellow feet",
            ["grey breast", "white wing", "yellow foot"],
        ),
        ("The bird is flying over the water.", []),
    ],
)
def test_caption_parser_fixed_sentences(nlp, sentence: str, expected: list[str]) -> None:
    assert phrases_from_doc(nlp(sentence)) == expected


def test_tfidf_prior_by_hand() -> None:
    # N = 4 files; t0 in 1 file twice, t1 in 2 files once each, t2 in all 4 files
    p = tfidf_prior(np.array([2, 2, 4]), np.array([1, 2, 4]), 4)
    w = np.array([2 * math.log(4), 2 * math.log(2), 0.0])
    np.testing.assert_allclose(p, w / w.sum())
    np.testing.assert_allclose(tfidf_prior(np.array([3, 1]), np.array([1, 1]), 1), [0.75, 0.25])  # N = 1: TF
    with pytest.raises(ValueError, match="doc_counts"):
        tfidf_prior(np.array([1]), np.array([3]), 2)


def test_extract_attributes_tiny_corpus(nlp) -> None:
    caps = [
        ["a bird with a red crown", "this bird has a red crown and black wings"],
        ["the bird has black wings", "it has a long tail"],
        ["a bird with a red crown"],
        [],
    ]
    table = extract_attributes(caps, nlp, batch_size=2)
    # D: red crown 2, black wing 2, long tail 1; sorted by D then name
    assert table.vocabulary == ["black wing", "red crown", "long tail"]
    np.testing.assert_array_equal(table.doc_counts, [2, 2, 1])
    np.testing.assert_array_equal(table.term_counts, [2, 3, 1])
    np.testing.assert_array_equal(table.matrix, [[1, 1, 0], [1, 0, 1], [0, 1, 0], [0, 0, 0]])
    w = np.array([2 * math.log(2), 3 * math.log(2), math.log(4)])
    np.testing.assert_allclose(table.prior, w / w.sum())
    assert table.phrases[0] == ["black wing", "red crown"]
    assert table.source == "captions" and table.stats["captions"] == 5
    assert table.stats["images_without_attributes"] == 1
    assert table.top(1) == ["black wing"] and table.index()["long tail"] == 2

    filtered = extract_attributes(caps, nlp, min_images=2)
    assert filtered.vocabulary == ["black wing", "red crown"]
    with pytest.raises(AttributeExtractionError, match="min_images"):
        extract_attributes(caps, nlp, min_images=3)
    with pytest.raises(TypeError):
        extract_attributes(["not a list of lists"], nlp)  # type: ignore[list-item]


def test_attributes_from_labels(tmp_path) -> None:
    recs = [
        ImageRecord("a", "a.png", attributes=["red crown", "black wing"]),
        ImageRecord("b", "b.png", attributes=["red crown"]),
        ImageRecord("c", "c.png", attributes=["long tail", "red crown"]),
    ]
    ds = write_dataset(tmp_path, name="t", source="test", classes=["x"], records=recs)
    table = attributes_from_labels(ds)
    assert table.vocabulary == ["red crown", "black wing", "long tail"]
    np.testing.assert_array_equal(table.matrix, [[1, 1, 0], [1, 0, 0], [1, 0, 1]])
    assert table.matrix.dtype == np.float32
    # TF = 1 per image: p ∝ D log(N / D) -> red crown (in all 3) gets 0
    np.testing.assert_allclose(table.prior, [0.0, 0.5, 0.5])
    empty = write_dataset(
        tmp_path / "e", name="e", source="test", classes=["x"], records=[ImageRecord("a", "a")]
    )
    with pytest.raises(AttributeExtractionError, match="no ground-truth"):
        attributes_from_labels(empty)


def test_synonym_canonicalizer_and_extract(nlp) -> None:
    syn = {
        "colour": {"red": ["red", "scarlet"], "yellow": ["yellow", "golden"]},
        "part": {"breast": ["breast", "chest"], "leg": ["leg", "legs", "feet"]},
    }
    canon = synonym_canonicalizer(syn)
    assert canon("scarlet chest") == "red breast"
    assert canon("golden foot") == "yellow leg"  # the parser lemmatises "feet" to "foot"
    assert canon("plump bird") == "plump bird"
    table = extract_attributes([["a bird with a scarlet chest and golden feet"]], nlp, canonical=canon)
    assert sorted(table.vocabulary) == ["red breast", "yellow leg"]
