"""The indexed tag rules give every token the POS, morphology and lemma spaCy's own attribute_ruler gives it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lavise_core.explain.textual.attributes import extract_attributes, load_nlp, phrases_from_doc
from lavise_core.explain.textual.tag_rules import IndexedTagRules

ROOT = Path(__file__).resolve().parents[3]
#: sentences written to hit the model's rare rules (multi-token, IN / REGEX tests, spaces) and common caption text
SENTENCES = [
    "I ain't gonna do it, y'all.",
    "Let's go, c'mon!",
    "She was doin' nothin' but goin' home   with 'em.",
    "But it is what it is; you got ta see the ol' bird.",
    "There is a   red bird and there are two.",
    "I'll say somethin' 'nuff.",
    "That which I gave you, it gave me.",
    "Do you have it? He did. They had.",
    "\n\n",
    "It's what I'd do.",
    "this small bird has a bright red crown, black and white striped wings and a short pointed beak.",
    "a plump bird with an unmarked yellow breast, chestnut eyes and an ebony beak.",
    "the bird's wings are grey-blue; its tail is long, forked and orange.",
]


def _tokens(docs) -> list[list[tuple]]:
    return [[(t.text, t.tag_, t.pos_, str(t.morph), t.lemma_) for t in d] for d in docs]


@pytest.fixture(scope="module")
def nlp():
    return load_nlp()


def _captions(n: int) -> list[str]:
    """The first ``n`` captions of the default SynthBirds set when `make assets` made it, else none."""
    manifest = ROOT / "data" / "synthbirds" / "manifest.jsonl"
    if not manifest.is_file():
        return []
    out: list[str] = []
    with manifest.open() as f:
        for line in f:
            out += json.loads(line).get("captions", [])
            if len(out) >= n:
                break
    return out[:n]


def test_default_model_tokens_equal_spacys_ruler(nlp) -> None:
    texts = SENTENCES + _captions(3000)
    rules = IndexedTagRules.from_ruler(nlp.get_pipe("attribute_ruler"))
    assert rules is not None
    expected = _tokens(nlp.pipe(texts))
    lemmatizer = nlp.get_pipe("lemmatizer")
    with nlp.select_pipes(enable=["tok2vec", "tagger"]):
        got = _tokens(lemmatizer(rules(d)) for d in nlp.pipe(texts))
    assert got == expected
    # the rare rules did fire: "gonna" -> go + to, "let's" -> us, "nothin'" -> nothing, a run of spaces -> SPACE
    by_text = {(t[0], t[4]) for d in got for t in d}
    assert {("gon", "go"), ("na", "to"), ("'s", "us"), ("nothin'", "nothing"), ("ol'", "old")} <= by_text
    assert any(t[0] == "  " and t[2] == "SPACE" for d in got for t in d)


def test_extract_attributes_equals_the_full_pipeline(nlp) -> None:
    texts = SENTENCES + _captions(1000)
    table = extract_attributes([[t] for t in texts], nlp)
    with nlp.select_pipes(enable=["tok2vec", "tagger", "attribute_ruler", "lemmatizer"]):
        per_image = [set(phrases_from_doc(d)) for d in nlp.pipe(texts)]
    vocab = sorted({p for s in per_image for p in s})
    assert sorted(table.vocabulary) == vocab
    col = table.index()
    for i, phrases in enumerate(per_image):
        assert {table.vocabulary[j] for j in range(len(vocab)) if table.matrix[i, j]} == phrases
        assert all(table.matrix[i, col[p]] == 1 for p in phrases)


def test_hand_written_rules_with_every_test_kind() -> None:
    """A blank English pipeline with rules of each kind the index handles (exact, IN, NOT_IN, REGEX, IS_SPACE, two
    tokens, a negative index, a later rule overriding an earlier one): the same lemmas as spaCy's ruler."""
    import spacy

    def ruler_nlp():
        nlp = spacy.blank("en")
        ar = nlp.add_pipe("attribute_ruler")
        ar.add([[{"LOWER": "red"}]], {"LEMMA": "colour"})
        ar.add([[{"LOWER": {"IN": ["red", "blue"]}}]], {"LEMMA": "hue"})  # later: overrides "colour"
        ar.add([[{"LOWER": {"REGEX": "^wing"}}]], {"LEMMA": "wing"})
        ar.add([[{"LOWER": {"NOT_IN": ["a", "the", "red", "blue"]}, "IS_SPACE": False}, {"LOWER": "tail"}]],
               {"LEMMA": "tailed"}, index=-1)  # fmt: skip
        ar.add([[{"IS_SPACE": True}]], {"LEMMA": "space"})
        return nlp

    texts = ["a red  wings and long tail", "the blue tail, red", "wingspan red blue", "  "]
    reference = ruler_nlp()
    expected = [[t.lemma_ for t in d] for d in reference.pipe(texts)]
    nlp = ruler_nlp()
    rules = IndexedTagRules.from_ruler(nlp.get_pipe("attribute_ruler"))
    assert rules is not None
    with nlp.select_pipes(disable=["attribute_ruler"]):
        got = [[t.lemma_ for t in rules(d)] for d in nlp.pipe(texts)]
    assert got == expected
    assert expected[0] == ["", "hue", "space", "wing", "", "", "tailed"]  # "blue tail" is excluded by NOT_IN
    assert expected[1] == ["", "hue", "", "", "hue"] and expected[3] == ["space"]


def test_a_rule_with_an_operator_is_left_to_spacy() -> None:
    nlp = load_nlp()  # its own copy: a rule is added to it
    ruler = nlp.get_pipe("attribute_ruler")
    ruler.add([[{"LOWER": "very", "OP": "+"}, {"LOWER": "red"}]], {"LEMMA": "red"}, index=-1)
    assert IndexedTagRules.from_ruler(ruler) is None
    table = extract_attributes([["a very red crown"], ["two red wings"]], nlp)  # spaCy's own ruler runs
    assert table.vocabulary == ["red crown", "red wing"]
