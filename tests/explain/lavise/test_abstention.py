"""The zero-shot query's abstention (issue 24): the rule on given scores, the query's verdict on a hand-built
index, the stage's record and a bundle without it, and the held-out rate on the demo bundle."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import HashEmbedder
from torch import nn

from lavise_core.data.probe_sets import absent_phrases
from lavise_core.explain.lavise.abstention import (
    AbstentionRule,
    abstention_rule,
    best_filter_scores,
    calibrate_abstention,
    conformal_threshold,
    detected_concepts,
)
from lavise_core.explain.lavise.index import ConceptIndex
from lavise_core.explain.lavise.query import query_concept

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "data" / "bundles" / "synthbirds-synthbirds-features-3a8d15e0be5c8184"


# ============================================================================ the rule on given scores
def test_conformal_threshold_exact():
    rng = np.random.default_rng(0)
    twenty = rng.permutation(np.arange(1, 21) / 100)  # 0.01 … 0.20, shuffled
    # ⌈0.95 · 21⌉ = 20: the largest; no calibration phrase passes it
    assert conformal_threshold(twenty) == pytest.approx(0.20)
    forty = rng.permutation(np.arange(1, 41) / 100)
    # ⌈0.95 · 41⌉ = 39: the 39th smallest, so one of forty (2.5 %) passes it
    assert conformal_threshold(forty) == pytest.approx(0.39)
    assert conformal_threshold(np.arange(1, 41) / 100, share=0.25) == pytest.approx(0.31)  # ⌈0.75 · 41⌉ = 31
    assert conformal_threshold([0.3, 0.1, 0.2]) == pytest.approx(0.3)  # too few phrases for 5 %: the largest
    assert conformal_threshold([]) == -np.inf


def test_abstention_rule_and_verdict_exact():
    absent = np.arange(1, 21) / 100
    rule = abstention_rule(absent, [0.1, 0.3, 0.5, 0.7])
    assert rule == AbstentionRule(pytest.approx(0.20), pytest.approx(0.40))  # firm: the own phrases' median
    assert rule.verdict(0.20) == (False, False)  # not above the threshold: no filter responds
    assert rule.verdict(0.21) == (True, True)  # above it, below the firm level: weak
    assert rule.verdict(0.40) == (True, False)
    assert rule.verdict(-np.inf) == (False, False)
    # the data set's own concepts all below the absent threshold: no weak band
    low = abstention_rule(absent, [0.05, 0.1, 0.15])
    assert low.firm == low.threshold == pytest.approx(0.20)
    assert abstention_rule(absent, []).firm == pytest.approx(0.20)
    assert abstention_rule(absent, [0.1, 0.3, 0.5, 0.7], firm_quantile=0.25).firm == pytest.approx(0.25)


def test_detected_concepts_and_best_filter_scores_exact():
    assert detected_concepts(np.array([[3, 1], [-1, 2], [3, 0], [5, -1]])).tolist() == [3, 5]
    assert detected_concepts(np.zeros((0, 4), np.int64)).tolist() == []
    q = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    fe = np.array([[0.6, 0.8], [1.0, 0.0], [0.0, -1.0]], np.float32)
    assert best_filter_scores(q, fe) == pytest.approx([1.0, 0.8])
    assert best_filter_scores(q, np.zeros((0, 2), np.float32)).tolist() == [-np.inf, -np.inf]


# ============================================================================ the query's verdict
def _hand_built():
    """Three phrases; filter 0 has cosine 0.6 with the query, filter 1 cosine 0.3, filter 2 cosine -1."""
    emb = HashEmbedder()
    phrases = ["red wing", "blue tail", "water"]
    idx = ConceptIndex(emb, model_id="hash").build(phrases, emb.embed(phrases))
    text = "glittering plumage at dusk"
    q = emb.embed([text])[0].astype(np.float64)
    other = emb.embed(["anything else"])[0].astype(np.float64)
    orth = other - (other @ q) * q
    orth /= np.linalg.norm(orth)
    fe = np.stack([0.6 * q + 0.8 * orth, 0.3 * q + np.sqrt(1 - 0.09) * orth, -q]).astype(np.float32)
    top_index = np.array([[0, 1], [2, 3], [4, 5]])
    top_value = np.ones((3, 2), np.float32)
    return idx, emb, text, q, fe, top_index, top_value


def test_query_verdict_on_a_hand_built_index():
    idx, emb, text, q, fe, top_index, top_value = _hand_built()
    best = float(fe[0] @ q.astype(np.float32))
    assert best == pytest.approx(0.6, abs=1e-6)

    def ask(rule, detected=None):
        return query_concept(text, idx, fe, top_index, top_value, n_filters=3, abstention=rule,
                             detected=detected)  # fmt: skip

    free = ask(None)  # no rule (a bundle from before): answered, as always
    assert free.confident and not free.weak and not free.calibrated and free.filters.tolist() == [0, 1, 2]
    firm = ask(AbstentionRule(0.5, 0.55))
    assert (firm.confident, firm.weak, firm.calibrated) == (True, False, True)
    weak = ask(AbstentionRule(0.5, 0.7))
    assert (weak.confident, weak.weak) == (True, True)
    none = ask(AbstentionRule(0.65, 0.7), detected=np.array([2, 0]))
    assert (none.confident, none.weak) == (False, False)
    assert none.filters.tolist() == [0, 1, 2]  # the ranking is still returned; the caller shows none of it
    # the detected concepts nearest the query, nearest first, with their cosines
    e = emb.embed(["red wing", "water"])
    cos = {"red wing": float(e[0] @ q), "water": float(e[1] @ q)}
    order = sorted(cos, key=lambda p: -cos[p])
    assert [p for p, _ in none.nearest] == order
    assert [c for _, c in none.nearest] == pytest.approx([cos[p] for p in order], abs=1e-6)


# ============================================================================ the stage and old bundles
class TinyCNN(nn.Module):
    def __init__(self, k: int = 12):
        super().__init__()
        torch.manual_seed(0)
        conv = [nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, 2, 1), nn.ReLU()]
        self.features = nn.Sequential(*conv)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(16, k)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)).flatten(1))


@pytest.fixture(scope="module")
def calibrated_bundle(tmp_path_factory):
    """A tiny SynthBirds bundle with the LaViSE stage built through the registry (hash embedder)."""
    from conftest import build_stage

    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.explain.lavise.settings import LaviseSettings
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe
    from tests.conftest import wrap

    tmp = tmp_path_factory.mktemp("abstain")
    ds = generate_synthbirds(tmp / "birds", n=48, seed=0, image_size=64, progress=False)
    lm = wrap(TinyCNN(len(ds.classes)), size=64, classes=ds.classes)
    bundle = open_or_create_bundle(tmp / "bundles", lm, ds)
    run_probe(bundle, lm, ds, ProbeSettings(top_k=6, batch_size=16, num_workers=0, progress=False))
    emb = HashEmbedder()
    general = ["water", "sky", "red", "wing", "feather"]
    st = LaviseSettings(epochs=3, top_p=4, top_s=5, labels_per_filter=6, threads=1)
    build_stage(bundle, ds, "lavise", lm, settings=st, vocabulary=(general, emb.embed(general)), embedder=emb)
    return bundle, emb, tmp


def _explainers(bundle, emb):
    from lavise_core.api import Explainer
    from lavise_core.explain.lavise.explainer import LaviseExplainer

    lav = LaviseExplainer.from_bundle(bundle, index=ConceptIndex.load(bundle.root / "lavise", embedder=emb))
    return lav, Explainer(bundle, lavise_loader=lambda: lav)


def test_stage_records_the_rule_and_the_api_follows_it(calibrated_bundle):
    bundle, emb, _ = calibrated_bundle
    rec = bundle.read_json("lavise/abstention")
    assert bundle.stage_done("lavise_abstention")
    assert rec["absent_given"] == len(absent_phrases("calibration"))
    lav, ex = _explainers(bundle, emb)
    assert lav.abstention == AbstentionRule(rec["threshold"], rec["firm"]) and lav.abstention_note is None
    # the stored rule is the calibration of this bundle's own filters on the calibration half
    again, _ = calibrate_abstention(lav.index, lav.filter_embeddings, absent_phrases("calibration"))
    assert again == lav.abstention
    texts = absent_phrases("evaluation")[:30] + list(lav.index.phrases[:10])
    best = best_filter_scores(lav.index.embed_text(texts), lav.filter_embeddings)
    seen = set()
    for text, s in zip(texts, best, strict=True):
        a = ex.query(text, n=5, n_images=3)
        confident, weak = lav.abstention.verdict(float(s))
        assert (a.method, a.confident, a.weak) == ("zero-shot", confident, weak)
        if not confident:
            assert len(a.filters) == 0 and len(a.images) == 0 and a.status == "no filter responds"
            assert a.message.startswith(f"No filter of layer {bundle.layer} responds to “{text}”:")
            assert "Concepts this layer does detect that come closest: “" in a.message
        elif weak:
            assert len(a.filters) == 1 and a.weights.tolist() == [1.0]
            assert a.message.startswith(f"Only weak evidence for “{text}”: no filter fires on it reliably")
        else:
            assert len(a.filters) == 5 and "matched by the zero-shot explainer" in a.message
        seen.add((confident, weak))
    assert (False, False) in seen  # some of the absent phrases are turned down
    with pytest.raises(ValueError, match="unknown query method"):
        ex.query("red wing", method="guess")
    from lavise_core.api import StageMissing

    with pytest.raises(StageMissing, match="no dissection stage"):
        ex.query("red wing", method="evidence")


def test_a_bundle_built_before_the_rule_answers_as_before_with_a_note(calibrated_bundle):
    from lavise_core.pipeline.bundle import Bundle

    bundle, emb, tmp = calibrated_bundle
    old_root = tmp / "before" / bundle.root.name
    shutil.copytree(bundle.root, old_root)
    (old_root / "lavise" / "abstention.json").unlink()
    old = Bundle.open(old_root)
    lav, ex = _explainers(old, emb)
    assert lav.abstention is None and "built before" in lav.abstention_note
    for text in ("bicycle", "red wing", absent_phrases("evaluation")[0]):
        r = lav.query(text, n_filters=5)
        assert r.confident and not r.weak and not r.calibrated and len(r.filters) == 5
        a = ex.query(text, n=5, n_images=3)
        assert a.confident and not a.weak and len(a.filters) == 5 and len(a.images) == 3
        assert "matched by the zero-shot explainer" in a.message
        assert "Not checked against concepts absent from the data" in a.message
        assert "--force lavise" in a.message


# ============================================================================ the demo bundle, held out
@pytest.mark.slow
def test_demo_bundle_held_out_absent_concepts_rarely_answered():
    if not (DEMO / "bundle.json").is_file() or not (DEMO / "lavise" / "filter_embeddings.npy").is_file():
        pytest.skip("the demo bundle is not built (make assets)")
    from lavise_core.explain.lavise.explainer import LaviseExplainer
    from lavise_core.pipeline.bundle import Bundle

    bundle = Bundle.open(DEMO)  # read-only: the rule is calibrated in memory, never written
    base = LaviseExplainer.from_bundle(bundle)
    halves = {h: absent_phrases(h) for h in ("calibration", "evaluation")}
    own = list(base.index.phrases[: base.index.meta["n_dataset"]])
    for fit, held in (("calibration", "evaluation"), ("evaluation", "calibration")):
        rule, info = calibrate_abstention(base.index, base.filter_embeddings, halves[fit])
        assert rule is not None and info["absent"] == len(halves[fit])
        lav = LaviseExplainer.from_bundle(bundle, index=base.index, abstention=rule)
        answered = [lav.query(t, n_filters=5, n_images=2).confident for t in halves[held]]
        assert np.mean(answered) <= 0.05, (fit, np.mean(answered))
        # not by turning everything down: most of the data set's own concepts are still answered
        assert np.mean([lav.query(t, n_filters=5, n_images=2).confident for t in own]) >= 0.6
