"""Are the dashboard's words right? Fidelity of labels, concept search, abstention and the upload check,
against held-out ground truth (METHODS.md §6), each number beside its baseline; run as the build stage
``fidelity`` so the Evaluation page is populated after ``make demo``.

Ground truth: ``G_k`` = the concepts (part + attribute phrases, background kinds) whose annotated regions have
IoU > 0.04 with filter k's thresholded map over its top-10 **test** images. Everything judged was fitted on
the fit split (train + val) or on other concepts; nothing here is fitted on the test split.

- **Labels**: share of filters whose top-1 label is in ``G_k`` — Network Dissection labels, zero-shot
  (LaViSE) labels, the Guo p.d.f.'s top attribute, and a random concept (expected ``|G_k| / T``).
- **Concept search**: for each query, the precision of the filters it asserts (at most 5: those whose evidence
  passes the floor; a confident answer without one shows its best candidate marked weak, counted apart in
  ``precision_with_weak``) against the test ``G_k`` of the intended concept, for seen
  concepts, held-out concepts (the search index built WITHOUT their annotations), background kinds and
  paraphrases in words the data set never uses; beside a random filter (the share of filters whose ``G_k``
  holds the concept) and the unfloored top-5. Main column: concepts some filter detects on the test split.
- **Abstention**: share of concepts absent from the data (everyday objects, scenes, textures; the evaluation
  half of ``probe_sets/absent_concepts.json``) answered as confident (target ≤ 5 %), and of seen concepts that
  some filter detects (target ≥ 90 %).
- **Upload check**: share of the probe test images flagged (target ≤ 5 %) and of seeded images unlike any
  probe set (:mod:`lavise_core.data.ood_images`: photos, noise, flat colours, text, screenshots; target
  ≥ 95 %), beside the max-softmax baseline at the same false-alarm rate on the test images.
- **Sanity**: the same for a re-initialised network (its own thresholds and ground truth): how many units
  still have a dissection label (IoU ≥ 0.04).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from lavise_core.data.dataset import ProbeDataset, fit_indices
from lavise_core.explain.dissection.labels import (
    IOU_MIN,
    DissectionTables,
    activation_thresholds,
    concept_incidence,
    dissection_iou,
    ground_truth_matrix,
    rank_labels,
    split_overlaps,
)
from lavise_core.explain.dissection.search import probe_set
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "STAGE",
    "build_fidelity_stage",
    "build_stage",
    "label_accuracy",
    "search_rows",
    "test_ground_truth",
]

STAGE = "fidelity"
RESULT_NAME = "eval/fidelity"


def test_ground_truth(
    lm, dataset: ProbeDataset, layer: str, threshold: np.ndarray, concepts: Sequence[str], p: int = 10,
    report: Callable[[int, int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """``G (C, T)`` bool and ``iou (C, T)`` on the test split (METHODS.md §6; top-``p`` test images per filter)."""
    test = [int(i) for i in np.flatnonzero(dataset.splits() == "test") if dataset.records[int(i)].mask]
    rows, inter, act, area, pooled = split_overlaps(lm, dataset, layer, test, threshold, report=report)
    inc = concept_incidence([dataset.records[int(i)] for i in rows], dataset.regions, concepts)
    return ground_truth_matrix(inter, act, area, inc, pooled, p=p)


def label_accuracy(top1: np.ndarray, G: np.ndarray) -> float:
    """Share of filters whose label ``top1 (C,)`` (concept index, -1 = no label) is in ``G (C, T)``."""
    ok = [bool(t >= 0 and G[k, t]) for k, t in enumerate(np.asarray(top1))]
    return float(np.mean(ok)) if ok else float("nan")


def _concept_ids(phrases: Sequence[str], concepts: Sequence[str]) -> np.ndarray:
    pos = {c: j for j, c in enumerate(concepts)}
    return np.array([pos.get(str(p).strip().lower(), -1) for p in phrases], np.int64)


def _labels_section(bundle, dataset: ProbeDataset, d: DissectionTables, G: np.ndarray) -> dict[str, Any]:
    """Top-1 label in the test ``G_k`` for each label source, and the random-concept baseline."""
    labelled = np.asarray(d.label_scores[:, 0]) >= IOU_MIN
    dis_top = np.where(labelled, np.asarray(d.label_ids[:, 0]), -1)
    allowed = ~d.is_part
    rows: dict[str, Any] = {
        "dissection": label_accuracy(dis_top, G),
        "dissection_labelled_filters": int(labelled.sum()),
        "dissection_among_labelled": label_accuracy(dis_top[labelled], G[labelled])
        if labelled.any()
        else None,
        "random_concept": float((G[:, allowed].sum(1) / max(int(allowed.sum()), 1)).mean()),
    }
    if bundle.has("lavise/filter_label_ids"):
        import json

        phrases = json.loads((bundle.root / "lavise" / "phrases.json").read_text())
        ids = np.asarray(bundle.array("lavise/filter_label_ids"))
        top = [phrases[int(j)] if 0 <= j < len(phrases) else "" for j in ids[:, 0]]
        rows["zero_shot"] = label_accuracy(_concept_ids(top, d.concepts), G)
    if bundle.has("textual/pdf"):
        vocab = list(bundle.read_json("textual/vocabulary"))
        top = [vocab[int(j)] for j in np.asarray(bundle.array("textual/pdf")).argmax(1)]
        rows["pdf_top_attribute"] = label_accuracy(_concept_ids(top, d.concepts), G)
    rows["filters"] = int(G.shape[0])
    rows["filters_with_ground_truth"] = int(G[:, allowed].any(1).sum())
    return rows


def _sanity_section(
    lm, dataset: ProbeDataset, layer: str, concepts: Sequence[str], is_part: np.ndarray, n_fit: int, seed: int
) -> dict[str, Any]:
    """A re-initialised copy of the network: its own thresholds, its dissection on ``n_fit`` fit images, its own
    test ground truth; labels should vanish (units with IoU ≥ 0.04) and the concept search, rebuilt on its
    evidence, should fall toward the random-filter rate."""
    from lavise_core.models.networks import reinitialised

    rnd = reinitialised(lm, seed)
    fit = [int(i) for i in fit_indices(dataset) if dataset.records[int(i)].mask]
    fit = sorted(np.random.default_rng(seed).choice(fit, min(n_fit, len(fit)), replace=False).tolist())
    thr = activation_thresholds(rnd, dataset, layer, fit)
    rows, inter, act, area, pooled = split_overlaps(rnd, dataset, layer, fit, thr)
    inc = concept_incidence([dataset.records[int(i)] for i in rows], dataset.regions, concepts)
    iou, _ = dissection_iou(inter, act, area, inc)
    ids, scores, _ = rank_labels(iou, concepts, n=1, allowed=~is_part)
    G, _ = test_ground_truth(rnd, dataset, layer, thr, concepts)
    labelled = scores[:, 0] >= IOU_MIN
    search = {}
    if len(rows):
        from lavise_core.explain.dissection.labels import calibrate_search, subsampled_ground_truth
        from lavise_core.explain.dissection.lexicon import build_lexicon
        from lavise_core.explain.dissection.search import absent_phrases, search_index
        from lavise_core.models.text_encoder import shared_embedder

        n_test = int((dataset.splits() == "test").sum())
        size = min(n_test, len(rows) // 2)
        rate, mean = subsampled_ground_truth(inter, act, area, inc, pooled, size=size, draws=16)
        # the same rules as the trained network's search: its own cross-fitted rates and abstention threshold
        cal = calibrate_search(inter, act, area, inc, pooled, concepts, size, draws=16, is_part=is_part)
        emb = shared_embedder()
        qi = search_index(concepts, rate, mean, emb, calibration=cal, absent=absent_phrases())
        parts = [
            c for c, part in zip(concepts, is_part, strict=True) if not part and not c.endswith(" background")
        ]
        search = search_rows([(c, c) for c in parts], qi, build_lexicon(qi.concepts), {}, emb, G, concepts)
    return {
        "search_part_concepts": search,
        "fit_images": len(rows),
        "labelled_filters": int(labelled.sum()),
        "best_iou_max": round(float(scores[:, 0].max()), 4),
        "best_iou_median": round(float(np.median(scores[:, 0])), 4),
        "dissection": label_accuracy(np.where(labelled, ids[:, 0], -1), G),
        "random_concept": float((G[:, ~is_part].sum(1) / max(int((~is_part).sum()), 1)).mean()),
    }


def _ood_section(bundle, dataset: ProbeDataset, lm, n_per_kind: int = 40, seed: int = 2) -> dict[str, Any]:
    """Flag rates of the upload check on the test split and on seeded out-of-distribution images."""
    import torch

    from lavise_core.data.ood_images import OOD_KINDS, synthetic_ood_images
    from lavise_core.explain.ood import OODModel, forward_with_ood, msp_score

    model = OODModel.from_bundle(bundle)
    test = np.flatnonzero(dataset.splits() == "test")
    valid = (
        np.asarray(bundle.array("probe/valid"), bool)
        if bundle.has("probe/valid")
        else np.ones(len(dataset), bool)
    )
    test = test[valid[test]]
    ref = np.asarray(model.reference) if model.reference is not None else np.zeros(0)
    test_flag = float(np.mean(ref > model.threshold)) if len(ref) else float("nan")
    msp_test = msp_score(np.asarray(bundle.array("probe/logits"))[test])
    msp_thr = float(np.quantile(msp_test, 1 - test_flag)) if len(msp_test) else float("inf")
    kinds: dict[str, Any] = {}
    for kind in OOD_KINDS:
        imgs = synthetic_ood_images(kind, n_per_kind, seed=seed)
        flags, msp = [], []
        for s in range(0, len(imgs), 16):
            x = torch.stack([lm.preprocess(im) for im in imgs[s : s + 16]])
            maps, logits, early = forward_with_ood(lm, x, bundle.layer, model.early_layers)
            phi = maps.float().mean((2, 3)).numpy()
            flags.extend(~model.in_distribution(phi, early))
            msp.extend(msp_score(logits.float().numpy()) > msp_thr)
        kinds[kind] = {
            "flagged": float(np.mean(flags)),
            "max_softmax_flagged": float(np.mean(msp)),
            "n": len(imgs),
        }
    every = [v["flagged"] for v in kinds.values()]
    return {
        "test_flagged": test_flag,
        "test_images": len(ref),
        "kinds": kinds,
        "ood_flagged": float(np.mean(every)),
        "ood_flagged_worst_kind": float(np.min(every)),
        "max_softmax_ood_flagged": float(np.mean([v["max_softmax_flagged"] for v in kinds.values()])),
        "calibration": bundle.manifest.get("stages", {}).get("ood", {}).get("calibration"),
    }


def search_rows(
    queries: Sequence[tuple[str, str]], qi, lex, table, emb, G: np.ndarray, concepts: Sequence[str],
    d: DissectionTables | None = None,
) -> dict[str, Any]:  # fmt: skip
    """Precision of the returned filters for ``queries [(text, intended concept)]`` against ``G (C, T)``."""
    from lavise_core.explain.dissection.search import answer_query

    pos = {c: j for j, c in enumerate(concepts)}
    prec, prec0, p5, rand, n_ret, conf, detectable, asserted = [], [], [], [], [], [], [], []
    for text, concept in queries:
        t = pos.get(concept)
        if t is None:
            continue
        a, _ = answer_query(text, qi, lex, table, emb, d.colour if d else None, d.regions if d else (), n=5)
        g = G[:, t]
        detectable.append(bool(g.any()))
        rand.append(float(g.mean()))
        p5.append(float(g[a.ranked[:5]].mean()) if a.ranked is not None and len(a.ranked) else 0.0)
        n_ret.append(len(a.filters))
        conf.append(bool(a.confident))
        prec.append(float(g[a.filters].mean()) if len(a.filters) else float("nan"))
        prec0.append(prec[-1] if len(a.filters) else 0.0)
        asserted.append(prec[-1] if len(a.filters) and not a.weak else float("nan"))
    det = np.array(detectable, bool)

    def mean(v, mask=None) -> float | None:
        x = np.asarray(v, np.float64)
        x = x[mask] if mask is not None else x
        x = x[~np.isnan(x)]
        return float(x.mean()) if x.size else None

    return {
        "queries": len(det),
        "detectable": int(det.sum()),
        # the filters the page asserts ("Filters that detect it"); weak candidates are shown as weak
        "precision": mean(asserted, det),
        "asserted": mean([not np.isnan(x) for x in asserted], det),
        "precision_with_weak": mean(prec, det),  # weak candidates counted as if asserted
        "precision_empty_as_0": mean(prec0, det),
        "precision_all_concepts": mean(prec0),
        "p_at_5_unfloored": mean(p5, det),
        "random_filter": mean(rand, det),
        "filters_returned": mean(n_ret, det),
        "answered": mean([n > 0 for n in n_ret], det),
        "confident": mean(conf, det),
    }


def _search_section(bundle, d: DissectionTables, G: np.ndarray) -> dict[str, Any]:
    """Concept search and abstention (see the module docstring)."""
    from lavise_core.explain.dissection.lexicon import build_lexicon
    from lavise_core.explain.dissection.search import (
        absent_phrases,
        answer_query,
        search_index,
        word_table,
    )
    from lavise_core.models.text_encoder import shared_embedder

    emb = shared_embedder()
    table: dict = {}
    if (bundle.root / "lavise" / "index.json").is_file():
        from lavise_core.explain.lavise.index import ConceptIndex

        ix = ConceptIndex.load(bundle.root / "lavise", embedder=emb)
        table = word_table(ix.phrases, np.asarray(ix.embeddings))
    has_split = (bundle.root / "lavise" / "split.json").is_file()
    split = bundle.read_json("lavise/split") if has_split else {"seen": [], "unseen": []}
    concepts = list(d.concepts)
    is_bg = np.array([c.endswith(" background") for c in concepts])
    unseen = set(split.get("unseen", []))
    calibrated = {"calibration": d.calibration, "absent": absent_phrases("calibration")}
    deployed = search_index(concepts, d.rate, d.mean_iou, emb, **calibrated)
    held = search_index(
        concepts, d.rate, d.mean_iou, emb, known=np.array([c not in unseen for c in concepts]), **calibrated
    )
    lex_d, lex_h = build_lexicon(deployed.concepts), build_lexicon(held.concepts)
    seen = [
        c
        for c, bg, part in zip(concepts, is_bg, d.is_part, strict=True)
        if not bg and not part and c not in unseen
    ]
    para = probe_set("paraphrases")
    bgs = [(c, c) for c, bg in zip(concepts, is_bg, strict=True) if bg]
    groups = {
        "seen": ([(c, c) for c in seen], deployed, lex_d),
        "held_out": ([(c, c) for c in sorted(unseen)], held, lex_h),  # the index never saw their annotations
        "background": (bgs, deployed, lex_d),
        "paraphrases_development": (list(para["development"].items()), deployed, lex_d),
        "paraphrases_held_out": (list(para["held_out"].items()), deployed, lex_d),
        # every part concept with its own evidence: the row to hold beside the re-initialised network's
        "all_part_concepts": ([(c, c) for c in concepts if c in set(seen) | unseen], deployed, lex_d),
    }
    out: dict[str, Any] = {
        name: search_rows(queries, qi, lex, table, emb, G, concepts, d)
        for name, (queries, qi, lex) in groups.items()
    }
    answers = [
        bool(answer_query(text, deployed, lex_d, table, emb, d.colour, d.regions)[0].confident)
        for text in absent_phrases("evaluation")
    ]
    out["abstention"] = {
        "absent_confident": float(np.mean(answers)),
        "absent_concepts": len(answers),
        "seen_detected_confident": out["seen"]["confident"],
        "seen_detected": out["seen"]["detectable"],
        "rule": f"confident when some filter's estimated chance to hold the concept reaches {deployed.min_rate:.3f} "
        f"(exact match), else when the phrase is within cosine {deployed.sim_threshold:.3f} of a concept the "
        "layer detects",
        "min_rate": deployed.min_rate,
        "sim_threshold": deployed.sim_threshold,
        "calibration": {k: v for k, v in (d.calibration or {}).items() if k != "curves"} or "defaults",
    }
    return out


def build_fidelity_stage(
    bundle,
    dataset: ProbeDataset,
    lm,
    *,
    sanity_images: int = 960,
    seed: int = 0,
    report: Callable[[int, int, str], None] | None = None,
    save: bool = True,
) -> dict:
    """Measure the bundle's fidelity (see the module docstring) -> the results dict, stored as
    ``eval/fidelity.json``. Needs the ``dissection`` stage (a data set with region masks and a test split)."""
    t0 = time.perf_counter()
    if not bundle.stage_done("dissection") or not bundle.has("dissection/iou"):
        return {"skipped": "no Network Dissection ground truth (the data set has no region masks)"}
    if not (dataset.splits() == "test").any():
        return {"skipped": "the data set has no test split to hold out"}
    d = DissectionTables.from_bundle(bundle)
    thr = np.asarray(bundle.array("probe/threshold"), np.float32)
    say = report or (lambda done, total, message: None)
    G, _ = test_ground_truth(
        lm, dataset, bundle.layer, thr, d.concepts,
        report=lambda done, total: say(done, 3 * total, f"ground truth on the test split: {done} / {total}"),
    )  # fmt: skip
    res: dict[str, Any] = {"ground_truth": "G_k on the top-10 test images, IoU > 0.04 (METHODS.md §6)"}
    res["labels"] = _labels_section(bundle, dataset, d, G)
    say(1, 3, "concept search and abstention")
    res["search"] = _search_section(bundle, d, G)
    if bundle.has("ood/bank"):
        say(1, 3, "the upload check on seeded images unlike the probe set")
        res["ood"] = _ood_section(bundle, dataset, lm)
    say(1, 3, "re-initialised network (sanity check)")
    res["sanity"] = _sanity_section(lm, dataset, bundle.layer, d.concepts, d.is_part, sanity_images, seed)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    if save:
        bundle.write_json(RESULT_NAME, res)
    return {"seconds": res["seconds"], "labels_dissection": round(res["labels"]["dissection"], 4)}


def build_stage(ctx: StageContext) -> dict:
    """The ``fidelity`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_fidelity_stage` with the build's settings and
    ``options['fidelity']``."""
    return build_fidelity_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("fidelity")
    )
