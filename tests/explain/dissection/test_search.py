"""Concept search: the lexicon grounds words the encoder handles badly, floors decide what is returned, and a
phrase far from every detected concept abstains."""

from __future__ import annotations

import numpy as np
from conftest import HashEmbedder

from lavise_core.explain.dissection.lexicon import build_lexicon, rewrite_query
from lavise_core.explain.dissection.search import (
    abstention_threshold,
    rank_filters_for_query,
    search_index,
)

CONCEPTS = ["red breast", "blue wing", "water background", "striped tail"]


def test_lexicon_grounds_colours_parts_and_scenes() -> None:
    lex = build_lexicon(CONCEPTS)
    assert rewrite_query("ruby bosom", lex)[0] == "red breast"
    assert rewrite_query("navy flight feathers", lex)[0] == "blue wing"
    assert rewrite_query("open ocean", lex)[0] == "water background"
    assert rewrite_query("chocolate", lex)[0] == "chocolate"  # a lone colour name without a part stays
    assert rewrite_query("bicycle", lex)[0] == "bicycle"


def index():
    emb = HashEmbedder(d=32)
    rate = np.zeros((6, len(CONCEPTS)), np.float32)  # (C, T)
    rate[[1, 4], 0] = [1.0, 0.75]  # red breast: filters 1 and 4 pass the 9/16 floor, filter 2 does not
    rate[2, 0] = 0.25
    rate[3, 2] = 0.2  # water background: detected (≥ 3/16) but below its 15/16 floor
    return search_index(CONCEPTS, rate, rate, emb), emb


def test_exact_query_returns_only_filters_above_the_floor() -> None:
    qi, emb = index()
    q = emb.embed(["red breast"])[0]
    a = rank_filters_for_query(q, qi, n=5, q_words=emb.embed(["red", "breast"]))
    assert a.mode == "exact" and a.confident and not a.weak
    assert a.filters.tolist() == [1, 4] and a.ranked[:3].tolist() == [1, 4, 2]
    w = rank_filters_for_query(emb.embed(["water background"])[0], qi, n=5, q_words=None)
    assert w.confident and w.weak and w.filters.tolist() == [3]  # detected, but no filter passes the floor


def test_undetected_and_unrelated_queries_abstain() -> None:
    qi, emb = index()
    a = rank_filters_for_query(emb.embed(["striped tail"])[0], qi, n=5)
    assert not a.confident and len(a.filters) == 0 and len(a.ranked) == 5  # known, but no filter detects it
    b = rank_filters_for_query(emb.embed(["bicycle"])[0], qi, n=5, q_words=emb.embed(["bicycle"]))
    assert not b.confident and len(b.filters) == 0
    assert {c for c, _, _ in b.nearest} <= {"red breast", "water background"}  # detected concepts only


def test_calibration_sets_the_rates_and_the_abstention_threshold() -> None:
    emb = HashEmbedder(d=32)
    rate = np.zeros((6, len(CONCEPTS)), np.float32)
    rate[[1, 4], 0] = [1.0, 0.75]
    cal = {"min_rate": 0.5, "floor_rate_part": 0.8, "floor_rate_background": 1.0}
    qi = search_index(CONCEPTS, rate, rate, emb, calibration=cal)
    assert qi.min_rate == 0.5 and qi.detects.tolist() == [True, False, False, False]
    a = rank_filters_for_query(emb.embed(["red breast"])[0], qi, n=5)
    assert a.filters.tolist() == [1]  # 0.75 no longer passes the floor
    # the abstention threshold: the 95th percentile of absent phrases' cosine to the nearest DETECTED concept;
    # a phrase that is a known concept here ("blue wing") is not absent and is left out
    absent = ["bicycle", "pizza", "bedroom", "blue wing", "cloud", "laptop"]
    qi2 = search_index(CONCEPTS, rate, rate, emb, calibration=cal, absent=absent)
    q = emb.embed(["bicycle", "pizza", "bedroom", "cloud", "laptop"])
    expected = float(np.quantile(q @ emb.embed(["red breast"])[0], 0.95))
    assert np.isclose(qi2.sim_threshold, expected, atol=1e-6)
    assert abstention_threshold(qi2, emb, []) == qi2.sim_threshold  # nothing to calibrate on: unchanged


def test_a_repeated_query_does_not_run_the_sentence_encoder_again():
    from lavise_core.explain.dissection.search import embed_query
    from lavise_core.models.text_encoder import TextEmbedder

    emb = TextEmbedder()
    runs: list[list[str]] = []
    encode = emb._embed_short
    emb._embed_short = lambda texts: runs.append(list(texts)) or encode(texts)  # a spy: counts encoder runs
    q1, w1 = embed_query("striped wing", emb)
    q2, w2 = embed_query("striped wing", emb)
    assert runs == [["striped wing", "striped", "wing"]]
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(w1, w2)
    assert w1.shape == (2, emb.dim)
