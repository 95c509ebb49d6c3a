"""The default stage registry: what ``lavise build`` makes, in order.

Each stage is one function in its method's module, registered here once; :func:`lavise_core.build`, the
CLI and the dashboard's build form all build through :data:`REGISTRY` (see
:mod:`lavise_core.pipeline.stages` for the rules: dependencies, recipes, progress).

==================  ==================  ===========================================================
stage               needs               makes
==================  ==================  ===========================================================
probe               —                   pooled (N, C), logits, top-k maps, quantiles, thresholds
textual             probe               attributes from captions, p(t | f), class p.d.f.s (Guo et al.)
textual_grounding   textual             eq. 9 weights fitted to part masks / keypoints
dissection          probe               IoU of each filter with each annotated concept (labels, search)
lavise              probe               vocabulary + FAISS index, explainer head, zero-shot labels
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

import dataclasses

from lavise_core.evaluate.attribution import build_attribution_stage
from lavise_core.evaluate.fidelity import build_fidelity_stage
from lavise_core.evaluate.oramas import build_oramas_eval_stage
from lavise_core.evaluate.siam import build_siam_eval_stage
from lavise_core.explain.datamap import build_datamap_stage
from lavise_core.explain.dissection.labels import build_dissection_stage
from lavise_core.explain.dissection.layers import build_layers_stage
from lavise_core.explain.featurevis.visualise import build_featurevis_stage
from lavise_core.explain.lavise.explainer import RECIPES, SUBSTAGES, build_lavise_stage
from lavise_core.explain.ood import build_ood_stage
from lavise_core.explain.oramas import build_oramas_stage
from lavise_core.explain.textual.explainer import build_textual_stage
from lavise_core.explain.textual.grounding import build_grounding_stage
from lavise_core.pipeline.probe import ProbeSettings, run_probe
from lavise_core.pipeline.stages import Stage, StageContext, StageRegistry

__all__ = ["REGISTRY"]


def _probe(ctx: StageContext) -> dict:
    s = ctx.settings
    settings = ProbeSettings(
        top_k=s.top_k, batch_size=s.batch_size, num_workers=s.workers, device=s.device, progress=s.bars
    )
    settings = dataclasses.replace(settings, **ctx.options_for("probe"))  # e.g. {"histogram_bins": 512}
    run_probe(
        ctx.bundle, ctx.model, ctx.dataset, settings,
        on_progress=lambda done, total: ctx.report(done, total, f"probe pass: {done} / {total} images"),
        executor=s.executor_settings(),
    )  # fmt: skip
    return {}


def _textual(ctx: StageContext) -> dict:
    build_textual_stage(ctx.bundle, ctx.dataset, progress=ctx.settings.bars, **ctx.options_for("textual"))
    return {}


def _textual_grounding(ctx: StageContext) -> dict:
    return build_grounding_stage(
        ctx.bundle, ctx.dataset, ctx.model, progress=ctx.settings.bars, **ctx.options_for("textual_grounding")
    )


def _lavise(ctx: StageContext) -> dict:
    options = {"executor": ctx.settings.executor_settings(), **ctx.options_for("lavise")}
    return build_lavise_stage(ctx.bundle, ctx.dataset, ctx.model, progress=ctx.settings.bars, **options)


def _dissection(ctx: StageContext) -> dict:
    return build_dissection_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, progress=ctx.settings.bars,
        **ctx.options_for("dissection"),
    )  # fmt: skip


def _ood(ctx: StageContext) -> dict:
    return build_ood_stage(ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("ood"))


def _fidelity(ctx: StageContext) -> dict:
    return build_fidelity_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("fidelity")
    )


def _attribution(ctx: StageContext) -> dict:
    return build_attribution_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("attribution")
    )


def _featurevis(ctx: StageContext) -> dict:
    return build_featurevis_stage(ctx.bundle, ctx.model, report=ctx.report, **ctx.options_for("featurevis"))


def _layers(ctx: StageContext) -> dict:
    return build_layers_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("layers")
    )  # fmt: skip


def _datamap(ctx: StageContext) -> dict:
    return build_datamap_stage(ctx.bundle, ctx.dataset, report=ctx.report, **ctx.options_for("datamap"))


def _oramas(ctx: StageContext) -> dict:
    return build_oramas_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("oramas")
    )


def _oramas_eval(ctx: StageContext) -> dict:
    return build_oramas_eval_stage(
        ctx.bundle, ctx.dataset, ctx.model, report=ctx.report, **ctx.options_for("oramas_eval")
    )


def _siam_eval(ctx: StageContext) -> dict:
    return build_siam_eval_stage(ctx.bundle, ctx.dataset, ctx.model, report=ctx.report)


def _lavise_stale(bundle) -> bool:
    stages = bundle.manifest.get("stages", {})
    return any(p in stages and stages[p].get("recipe", 1) != r for p, r in RECIPES.items())


REGISTRY = StageRegistry(
    [
        Stage("probe", (), 1, _probe, "one streaming pass over the probe images"),
        Stage("textual", ("probe",), 1, _textual, "attributes from captions and the filter–attribute p.d.f."),
        Stage(
            "textual_grounding",
            ("textual",),
            1,
            _textual_grounding,
            "grounding weights fitted to the part annotations",
        ),
        Stage(
            "dissection",
            ("probe",),
            3,  # 2: pixel colours per part (colour path); 3: 64 draws and the search calibration
            _dissection,
            "Network Dissection labels: IoU of each filter with each annotated concept",
        ),
        Stage(
            "lavise",
            ("probe",),
            1,
            _lavise,
            "concept index, explainer head, zero-shot filter labels",
            parts=SUBSTAGES,
            stale=_lavise_stale,
        ),
        Stage("ood", ("probe",), 1, _ood, "the upload check: is an image like the probe images?"),
        Stage(
            "fidelity",
            ("dissection", "textual", "lavise", "ood"),
            3,  # 2: search sanity on the re-initialised network; 3: calibrated search, asserted precision first
            _fidelity,
            "are the words right? labels, search, abstention and the upload check against held-out truth",
        ),
        Stage(
            "attribution",
            ("probe",),
            1,
            _attribution,
            "where does it look? faithfulness of the attribution maps on held-out images",
            default=False,  # ~1.5 min CPU on the demo CNN: `lavise build --stages attribution`
        ),
        Stage(
            "featurevis",
            ("probe",),
            1,
            _featurevis,
            "feature visualisation: the image each filter wants (skipped above 256 filters: on demand)",
        ),
        Stage(
            "layers",
            ("probe",),
            1,
            _layers,
            "Network Dissection across layers: interpretable units per layer, by concept kind",
        ),
        Stage(
            "datamap",
            ("probe",),
            1,
            _datamap,
            "a 2-D map of the probe images (openTSNE of pooled activations)",
        ),
        Stage(
            "oramas",
            ("probe",),
            1,
            _oramas,
            "Oramas et al.: class-relevant features by μ-lasso on layer energies",
        ),
        Stage(
            "oramas_eval",
            ("oramas",),
            1,
            _oramas_eval,
            "an8Flower protocol: Oramas heatmaps vs Grad-CAM, guided backprop, activations on part masks",
        ),
        Stage(
            "siam_eval",
            ("probe",),
            1,
            _siam_eval,
            "SIAM bundles: accuracy, attribute AUC, pointing game / PCK, exact decomposition, sentence precision",
            default=False,
        ),
    ]
)
