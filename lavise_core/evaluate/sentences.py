"""The ``evidence`` stage: fit the attribute detectors behind the default sentence and measure every sentence.

Fitted on the fit split (train + val), measured on the **test** split's correctly classified images (issue 23):

- **stated attributes true**: share of the attributes a sentence names that the image's annotation has;
- **sentences right in every attribute**, and the mean number of attributes named;
- each beside two baselines: the class's most frequent attributes (fit split) and Guo et al.'s sentence (eq. 5–6,
  when the textual stage is built), both at the same length (five attributes);
- **faithfulness**: for each stated attribute, deleting (setting to the input mean) the pixels where the sentence
  grounds it (the top 1 % of :func:`~lavise_core.explain.textual.evidence.ground_pixels`) must lower the class
  logit more than deleting the same number of bird pixels around a random bird pixel (mean of three draws);
- **contrast** (why a, not b, for the two nearest classes): a pair is right when every attribute it names is at least
  0.5 more (or less) frequent in a than in b on the test split's annotations;
- **class descriptions**: distinct from each other; on SynthBirds, each names the attribute in the class's own name.

Stored: ``evidence/*`` (the detectors, the features of every probe image) and ``eval/sentences.json``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from lavise_core.data.dataset import ProbeDataset, fit_indices
from lavise_core.data.images import crop_label_map
from lavise_core.explain.dissection.labels import IOU_MIN
from lavise_core.explain.textual.evidence import (
    GROUND_AREA,
    PREFIX,
    AttributeDetectors,
    describe_class,
    evidence_contrast,
    evidence_explanation,
    ground_pixels,
    image_features,
    top_region,
)
from lavise_core.models.networks import forward_maps
from lavise_core.pipeline.probe import image_batches, stored_maps
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "RESULT_NAME",
    "STAGE",
    "build_sentences_stage",
    "build_stage",
    "class_statistics",
    "measured_filters",
]

STAGE = "evidence"
RESULT_NAME = "eval/sentences"
#: a network with classes of its own: a class is described when this many fit images are classified as it, and
#: a contrast pair is judged when each class has this many test images
DESCRIBE_MIN_IMAGES = 5
CONTRAST_MIN_IMAGES = 5


def measured_filters(bundle) -> np.ndarray:
    """``(C,)`` bool: filters whose Network Dissection label (a non-part concept) reaches the IoU floor."""
    iou = np.asarray(bundle.array("dissection/iou"), np.float32)
    is_part = np.asarray(bundle.array("dissection/is_part"), bool)
    return (iou[:, ~is_part] >= IOU_MIN).any(1)


def _features(
    lm, dataset: ProbeDataset, layer: str, say: Callable[[int, int, str], None], bundle=None
) -> tuple[np.ndarray, np.ndarray]:
    """``(N, 2C)`` pooled + peak activations of every probe image and ``(N, K)`` logits: read from the probe pass's
    stored maps and logits where ``bundle`` has them (:func:`~lavise_core.pipeline.probe.stored_maps`), else one
    pass. Rows of unreadable images are 0."""
    n = len(dataset)
    stored = None if bundle is None else stored_maps(bundle, n)
    if stored is not None:
        maps, valid = stored
        logits = np.array(bundle.array("probe/logits"), np.float32)  # the probe pass zeroes unreadable rows
        feats = np.zeros((n, 2 * maps.shape[1]), np.float32)
        rows = np.flatnonzero(valid)
        for lo in range(0, len(rows), 256):
            feats[rows[lo : lo + 256]] = image_features(maps[rows[lo : lo + 256]])
        say(n, n, f"attribute evidence: {n} / {n} images (the probe pass's maps)")
        return feats, logits
    feats = logits = None
    with torch.inference_mode():
        for idx, x, _ in image_batches(dataset, lm, range(n), 64):
            maps, z = forward_maps(lm, x, layer)
            f = image_features(maps.float().numpy())
            if feats is None:
                feats = np.zeros((n, f.shape[1]), np.float32)
                logits = np.zeros((n, z.shape[1]), np.float32)
            feats[idx], logits[idx] = f, z.float().numpy()
            say(idx[-1] + 1, n, f"attribute evidence: {idx[-1] + 1} / {n} images")
    assert feats is not None and logits is not None
    return feats, logits


def class_statistics(
    det: AttributeDetectors,
    features: np.ndarray,
    labels: np.ndarray,
    predicted: np.ndarray,
    rows: np.ndarray,
    K: int,
) -> np.ndarray:
    """``(K, A)`` detection rate: share of each class's correctly classified ``rows`` on which each attribute is present."""
    rate = np.zeros((K, len(det.concepts)), np.float64)
    for c in range(K):
        r = rows[(labels[rows] == c) & (predicted[rows] == c)]
        if len(r):
            rate[c] = np.mean([det.present(features[i]) for i in r], 0)
    return rate


def _faithfulness(
    lm, dataset, layer, det, weight, rows, predicted, n_images: int, seed: int
) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    wins = total = 0
    drops_region: list[float] = []
    drops_random: list[float] = []
    size = lm.input_size
    for i in rows[:n_images]:
        img = dataset.load_image(int(i))
        lab = dataset.load_mask(int(i))
        if lab is None:
            continue
        bird = crop_label_map(lab, lm.crop_box(lab.shape[1], lab.shape[0]), size) > 0
        x = lm.preprocess(img)[None]
        maps, z = forward_maps(lm, x, layer)
        maps = maps.float().numpy()[0]
        c = int(predicted[i])
        ex = evidence_explanation(det, image_features(maps), "", weight[c])
        if not ex.attributes:
            continue
        batch, spans = [], []
        by_bird = np.argwhere(bird)
        for a in ex.attributes:
            heat = ground_pixels(lm, x, layer, [k for k, _ in a.filters], weight[c])
            region = top_region(heat)
            area = int(region.sum())
            if len(by_bird) < area:
                continue
            xs = [x[0] * torch.from_numpy(~region)]
            for _ in range(3):
                centre = by_bird[rng.integers(len(by_bird))]
                near = by_bird[np.argsort(((by_bird - centre) ** 2).sum(1), kind="stable")[:area]]
                keep = np.ones((size, size), bool)
                keep[near[:, 0], near[:, 1]] = False
                xs.append(x[0] * torch.from_numpy(keep))
            spans.append(len(batch))
            batch += xs
        if not batch:
            continue
        with torch.inference_mode():
            _, zz = forward_maps(lm, torch.stack(batch), layer)
        zz = zz.float().numpy()[:, c]
        base = float(z[0, c])
        for s in spans:
            d_region = base - zz[s]
            d_random = base - float(zz[s + 1 : s + 4].mean())
            drops_region.append(d_region)
            drops_random.append(d_random)
            wins += d_region > d_random
            total += 1
    return {
        "attributes": total,
        "lower_than_random": wins / total if total else None,
        "mean_drop_region": float(np.mean(drops_region)) if drops_region else None,
        "mean_drop_random": float(np.mean(drops_random)) if drops_random else None,
        "images": int(min(n_images, len(rows))),
        "region_area": GROUND_AREA,
    }


def _truth_rate(named: list[list[str]], truth_sets: list[set[str]]) -> dict[str, Any]:
    n_named = sum(len(a) for a in named)
    right = sum(sum(t in s for t in a) for a, s in zip(named, truth_sets, strict=True))
    full = [all(t in s for t in a) for a, s in zip(named, truth_sets, strict=True) if a]
    return {
        "stated_true": right / n_named if n_named else None,
        "fully_right": float(np.mean(full)) if full else None,
        "mean_attributes": n_named / len(named) if named else None,
        "sentences": len(named),
        "empty": sum(not a for a in named),
    }


def build_sentences_stage(
    bundle,
    dataset: ProbeDataset,
    lm,
    *,
    precision: float = 0.97,
    faithfulness_images: int = 150,
    contrast_images: int = 300,
    seed: int = 0,
    report: Callable[[int, int, str], None] | None = None,
) -> dict:
    """Fit the detectors (``evidence/*``) and measure the sentences (``eval/sentences.json``; module docstring)."""
    t0 = time.perf_counter()
    say = report or (lambda done, total, message: None)
    vocab = dataset.attribute_vocabulary()
    if not bundle.stage_done("dissection") or not bundle.has("dissection/iou"):
        return {
            "skipped": "no Network Dissection labels to read the attributes from (the data set has no region masks)"
        }
    if not vocab:
        return {"skipped": "the data set has no annotated attributes"}
    splits = dataset.splits()
    test = np.flatnonzero(splits == "test")
    fit = fit_indices(dataset)
    if not len(test):
        return {"skipped": "the data set has no test split to hold out"}
    features, logits = _features(lm, dataset, bundle.layer, say, bundle)
    truth = dataset.attribute_matrix(vocab) > 0
    filters = measured_filters(bundle)
    det = AttributeDetectors.fit(features, truth, vocab, filters, fit, precision=precision, seed=seed)
    det.save(bundle)
    bundle.write_array(f"{PREFIX}/features", features)
    labels = dataset.labels()
    predicted = logits.argmax(1)
    classes = list(lm.class_names)
    K = len(classes)
    # a network trained on the data set's classes is judged on its correctly classified images; any other
    # (an ImageNet network on SynthBirds) on every test image, its classes grouped by what it predicts
    own_classes = classes == list(dataset.classes)
    group = labels if own_classes else predicted
    weight = np.asarray(bundle.array("probe/classifier_weight"), np.float32)
    A = [vocab.index(t) for t in det.concepts]
    support = np.bincount(predicted[fit][group[fit] == predicted[fit]], minlength=K)
    overall = truth[fit].mean(0)
    freq_all = np.stack(
        [truth[fit][group[fit] == c].mean(0) if (group[fit] == c).any() else overall for c in range(K)]
    )
    class_frequency = freq_all[:, A]
    rate = class_statistics(det, features, group, predicted, fit, K)
    bundle.write_array(f"{PREFIX}/class_frequency", class_frequency.astype(np.float32))
    bundle.write_array(f"{PREFIX}/detection_rate", rate.astype(np.float32))
    bundle.write_array(f"{PREFIX}/class_support", support.astype(np.int32))

    say(1, 3, "measuring the sentences on the test split")
    right = test[predicted[test] == labels[test]] if own_classes else test
    truth_sets = [{vocab[j] for j in np.flatnonzero(truth[i])} for i in right]
    ours = [
        [a.phrase for a in evidence_explanation(det, features[i], "", weight[predicted[i]]).attributes]
        for i in right
    ]
    frequent = [[vocab[j] for j in np.argsort(-freq_all[predicted[i]], kind="stable")[:5]] for i in right]
    res: dict[str, Any] = {
        "split": "test, correctly classified" if own_classes else "test, every image",
        "network_classes": "the data set's" if own_classes else f"its own ({K}), grouped by prediction",
        "images": len(right),
        "detectors": len(det.concepts),
        "attributes_annotated": len(vocab),
        "measured_filters": int(filters.sum()),
        "precision_target": precision,
        "evidence": _truth_rate(ours, truth_sets),
        "baseline_frequent": _truth_rate(frequent, truth_sets),
    }
    if bundle.stage_done("textual") and bundle.has("textual/pdf"):
        from lavise_core.explain.textual.explainer import TextualExplainer

        tx = TextualExplainer.from_bundle(bundle)
        C = weight.shape[1]
        guo = [
            [t for t, _ in tx.explain(features[i, :C], class_index=int(predicted[i]), top=5).attributes]
            for i in right
        ]
        res["baseline_guo"] = _truth_rate(guo, truth_sets)
    say(2, 3, "faithfulness: deleting where each attribute is grounded")
    rng = np.random.default_rng(seed)
    sample = rng.permutation(right)
    res["faithfulness"] = _faithfulness(
        lm, dataset, bundle.layer, det, weight, sample, predicted, faithfulness_images, seed
    )

    # contrast with the two nearest classes (by detection rate), judged on the test annotations
    test_group = [test[group[test] == c] for c in range(K)]
    test_freq = np.stack([truth[r][:, A].mean(0) if len(r) else np.zeros(len(A)) for r in test_group])
    judged = np.array([len(r) >= (1 if own_classes else CONTRAST_MIN_IMAGES) for r in test_group])
    pairs = named_pairs = good = 0
    for i in sample[:contrast_images]:
        a = int(predicted[i])
        dist = np.abs(rate - rate[a]).sum(1)
        dist[a] = np.inf
        dist[support == 0] = np.inf
        for b in np.argsort(dist, kind="stable")[:2]:
            if not (np.isfinite(dist[b]) and judged[a] and judged[b]):
                continue
            _, pro, con = evidence_contrast(det, features[i], classes, a, int(b), weight, class_frequency)
            pairs += 1
            named = [det.concepts.index(t) for t in pro + con]
            if named:
                named_pairs += 1
                good += all(abs(test_freq[a, t] - test_freq[int(b), t]) >= 0.5 for t in named)
    res["contrast"] = {
        "pairs": pairs,
        "named_something": named_pairs / pairs if pairs else None,
        "differ": good / named_pairs if named_pairs else None,
    }

    described = [c for c in range(K) if own_classes or support[c] >= DESCRIBE_MIN_IMAGES]
    descriptions = [describe_class(det, classes, c, rate, weight, support=support) for c in described]
    res["descriptions"] = {
        "classes": len(described),
        "distinct": len({d.sentence for d in descriptions}),
        "sentences": {d.class_name: d.sentence for d in descriptions},
    }
    if dataset.source == "synthbirds" and own_classes:
        from lavise_core.data.synthbirds import NAME_ATTRIBUTES as name_attributes

        by_name = {d.class_name: d for d in descriptions}
        named = [
            cls
            for cls, attr in name_attributes.items()
            if cls in by_name and attr in by_name[cls].distinct + by_name[cls].shared
        ]
        res["descriptions"]["name_attribute"] = len(named)
    res["seconds"] = round(time.perf_counter() - t0, 2)
    bundle.write_json(RESULT_NAME, res)
    ev = res["evidence"]
    return {"seconds": res["seconds"], "stated_true": ev["stated_true"], "fully_right": ev["fully_right"]}


def build_stage(ctx: StageContext) -> dict:
    """The ``evidence`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_sentences_stage` with the build's
    settings and ``options['evidence']``."""
    return build_sentences_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for(STAGE)
    )
