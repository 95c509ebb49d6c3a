"""The default stage registry: what ``lavise build`` makes, in order.

Each stage is one ``build_stage(ctx) -> dict`` in its method's module, registered here once (its reader is
that method's ``X.from_bundle(bundle)``); :func:`lavise_core.build`, the
CLI and the dashboard's build form all build through :data:`REGISTRY` (see
:mod:`lavise_core.pipeline.stages` for the rules: dependencies, recipes, progress).

==================  ==================  ===========================================================
stage               needs               makes
==================  ==================  ===========================================================
probe               —                   pooled (N, C), logits, top-k maps, quantiles, thresholds, all maps
textual             probe               attributes from captions, p(t | f), class p.d.f.s (Guo et al.)
textual_grounding   textual             eq. 9 weights fitted to part masks / keypoints
dissection          probe               IoU of each filter with each annotated concept (labels, search)
lavise              probe               vocabulary + FAISS index, explainer head, zero-shot labels
evidence            dissection          attribute detectors behind the default sentence; its held-out measures
ood                 probe               the upload check (feature distances to the train images)
fidelity            dissection, …       held-out fidelity of labels, search, abstention, upload check
attribution         probe               faithfulness of the attribution maps (deletion/insertion, pointing)
featurevis          probe               one activation-maximising image per filter (layers ≤ 256 filters)
layers              probe               Network Dissection of several layers in one pass (+ re-initialised)
datamap             probe               2-D openTSNE map of the probe images' pooled activations
oramas              probe               Oramas et al.: layer energies, μ-lasso relevant features per class
oramas_eval         oramas              the an8Flower protocol: heatmap IoU / Pearson vs Grad-CAM, GBP, ...
siam_eval           probe               SIAM bundles only (on request): accuracy, AUC, PCK, decomposition
==================  ==================  ===========================================================
"""

from __future__ import annotations

from lavise_core.evaluate import attribution as attribution_eval
from lavise_core.evaluate import fidelity, sentences
from lavise_core.evaluate import oramas as oramas_eval
from lavise_core.evaluate import siam as siam_eval
from lavise_core.explain import datamap, ood, oramas
from lavise_core.explain.dissection import labels as dissection
from lavise_core.explain.dissection import layers
from lavise_core.explain.featurevis import visualisation as featurevis
from lavise_core.explain.lavise import explainer as lavise
from lavise_core.explain.textual import explainer as textual
from lavise_core.explain.textual import grounding
from lavise_core.pipeline import probe
from lavise_core.pipeline.stages import Stage, StageRegistry

__all__ = ["REGISTRY"]


def _lavise_stale(bundle) -> bool:
    stages = bundle.manifest.get("stages", {})
    return any(p in stages and stages[p].get("recipe", 1) != r for p, r in lavise.RECIPES.items())


REGISTRY = StageRegistry(
    [
        Stage("probe", (), 1, probe.build_stage, "one streaming pass over the probe images"),
        Stage(
            "textual",
            ("probe",),
            1,
            textual.build_stage,
            "attributes from captions and the filter–attribute p.d.f.",
            requires=("text",),
            words=True,
            files=("textual",),
        ),
        Stage(
            "textual_grounding",
            ("textual",),
            1,
            grounding.build_stage,
            "grounding weights fitted to the part annotations",
            requires=("text",),
            words=True,
            files=("textual",),
        ),
        Stage(
            "dissection",
            ("probe",),
            3,  # 2: pixel colours per part (colour path); 3: 64 draws and the search calibration
            dissection.build_stage,
            "Network Dissection labels: IoU of each filter with each annotated concept",
            requires=("masks",),
            words=True,
            files=("dissection",),
        ),
        Stage(
            "lavise",
            ("probe",),
            1,
            lavise.build_stage,
            "concept index, explainer head, zero-shot filter labels",
            parts=lavise.SUBSTAGES,
            stale=_lavise_stale,
            requires=("masks",),
            words=True,
            files=("lavise",),
            prefetch=lavise.prefetch,
        ),
        Stage(
            "evidence",
            ("probe", "dissection"),
            1,
            sentences.build_stage,
            "attribute detectors read off the labelled filters: the default sentence, measured on held-out images",
            requires=("masks", "attributes", "test split"),
            words=True,
            files=("evidence", "eval/sentences.json"),
        ),
        Stage(
            "ood",
            ("probe",),
            1,
            ood.build_stage,
            "the upload check: is an image like the probe images?",
            probe_stats=ood.probe_stats,
        ),
        Stage(
            "fidelity",
            ("dissection", "textual", "lavise", "ood"),
            3,  # 2: search sanity on the re-initialised network; 3: calibrated search, asserted precision first
            fidelity.build_stage,
            "are the words right? labels, search, abstention and the upload check against held-out truth",
            requires=("masks", "test split"),
            words=True,
            files=("eval/fidelity.json",),
        ),
        Stage(
            "attribution",
            ("probe",),
            1,
            attribution_eval.build_stage,
            "where does it look? faithfulness of the attribution maps on held-out images",
            default=False,  # ~1.5 min CPU on the demo CNN: `lavise build --stages attribution`
        ),
        Stage(
            "featurevis",
            ("probe",),
            1,
            featurevis.build_stage,
            "feature visualisation: the image each filter wants (skipped above 256 filters: on demand)",
        ),
        Stage(
            "layers",
            ("probe",),
            2,  # 2: a concept needs 10 images of support to label a unit (MIN_SUPPORT)
            layers.build_stage,
            "Network Dissection across layers: interpretable units per layer, by concept kind",
            requires=("masks",),
            words=True,
            files=("layers",),
        ),
        Stage(
            "datamap",
            ("probe",),
            1,
            datamap.build_stage,
            "a 2-D map of the probe images (openTSNE of pooled activations)",
        ),
        Stage(
            "oramas",
            ("probe",),
            1,
            oramas.build_stage,
            "Oramas et al.: class-relevant features by μ-lasso on layer energies",
            requires=("classes",),
            probe_stats=oramas.probe_stats,
        ),
        Stage(
            "oramas_eval",
            ("oramas",),
            1,
            oramas_eval.build_stage,
            "an8Flower protocol: Oramas heatmaps vs Grad-CAM, guided backprop, activations on part masks",
            requires=("masks", "test split"),
        ),
        Stage(
            "siam_eval",
            ("probe",),
            1,
            siam_eval.build_stage,
            "SIAM bundles: accuracy, attribute AUC, pointing game / PCK, exact decomposition, sentence precision",
            requires=("attributes", "masks"),
            default=False,
        ),
    ]
)
