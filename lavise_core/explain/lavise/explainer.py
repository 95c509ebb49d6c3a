"""LaViSE (Yang, Kim & Joo, CVPR 2022; METHODS.md §2): the explainer stored in a bundle and the stage
that builds it (vocabulary + index, region features, head, filter attention).
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lavise_core.data.dataset import ProbeDataset
from lavise_core.explain.lavise.abstention import (
    AbstentionRule,
    build_abstention,
    detected_concepts,
    load_abstention,
)
from lavise_core.explain.lavise.bias import dataset_insight
from lavise_core.explain.lavise.head import (
    RegionFeatures,
    concept_split,
    extract_region_features,
    load_head,
    save_head,
    train_head,
    training_targets,
)
from lavise_core.explain.lavise.index import ConceptIndex
from lavise_core.explain.lavise.labels import compute_filter_labels
from lavise_core.explain.lavise.query import QueryResult, query_concept
from lavise_core.explain.lavise.settings import LaviseError, LaviseSettings
from lavise_core.models.threads import one_blas_thread
from lavise_core.pipeline.stages import StageContext

__all__ = [
    "RECIPES",
    "SUBSTAGES",
    "LaviseExplainer",
    "build_lavise_stage",
    "build_stage",
    "insight_for_bundle",
    "prefetch",
    "settings_dict",
]


# ============================================================================ the explainer as a whole
class LaviseExplainer:
    """Everything LaViSE stored in a bundle, loaded once: index, head, labels, embeddings, split, and the
    query's abstention rule (``abstention``; ``None`` with ``abstention_note`` saying why: a bundle built
    before it answers every query, as before)."""

    def __init__(self, bundle, index: ConceptIndex | None = None, abstention: AbstentionRule | None = None):
        self.bundle = bundle
        lav = Path(bundle.root) / "lavise"
        self.index = index or ConceptIndex.load(lav)
        self.head, self.head_info = load_head(lav)
        split = bundle.read_json("lavise/split")
        self.seen, self.unseen = list(split["seen"]), list(split["unseen"])
        self.label_ids = bundle.array("lavise/filter_label_ids")
        self.label_scores = bundle.array("lavise/filter_label_scores")
        # (C, d) unit rows, loaded once as contiguous float32: the query path multiplies by it directly
        self.filter_embeddings = np.ascontiguousarray(bundle.array("lavise/filter_embeddings"), np.float32)
        self.inside = bundle.array("lavise/filter_inside") if bundle.has("lavise/filter_inside") else None
        self.object_area = (
            bundle.array("lavise/filter_object_area") if bundle.has("lavise/filter_object_area") else None
        )
        self._query_arrays: dict | None = None
        # the concepts the layer detects (each filter's top label) and the query's abstention rule (issue 24)
        self.detected = detected_concepts(self.label_ids)
        if abstention is not None:
            self.abstention, self.abstention_note = abstention, None
        else:
            self.abstention, self.abstention_note = load_abstention(bundle)

    @classmethod
    def from_bundle(
        cls, bundle, index: ConceptIndex | None = None, abstention: AbstentionRule | None = None
    ) -> LaviseExplainer:
        """The LaViSE stage of ``bundle`` (``index``: an already loaded concept index to share; ``abstention``: a
        rule to use instead of the stored ``lavise/abstention.json``)."""
        return cls(bundle, index=index, abstention=abstention)

    def filter_labels(self, k: int, n: int = 10) -> list[tuple[str, float]]:
        """Filter ``k``'s top-``n`` zero-shot labels ``[(phrase, score)]``."""
        return [
            (self.index.phrases[int(j)], float(s))
            for j, s in zip(self.label_ids[k][:n], self.label_scores[k][:n], strict=True)
            if j >= 0
        ]

    def concept_status(self, phrase: str) -> str:
        p = phrase.strip().lower()
        if p in self.seen:
            return "seen"
        if p in self.unseen:
            return "unseen"
        return "vocabulary" if self.index.position(p) is not None else "not in vocabulary"

    @one_blas_thread
    def query(self, text: str, **kw) -> QueryResult:
        """:func:`query_concept` against this bundle, with its detected concepts and abstention rule."""
        if self._query_arrays is None:  # memory-mapped once, not per query
            b = self.bundle
            self._query_arrays = {
                "top_index": b.array("probe/top_index"),
                "top_value": b.array("probe/top_value"),
                "pooled": b.array("probe/pooled"),
                "valid": b.array("probe/valid") if b.has("probe/valid") else None,
                "seen": frozenset(self.seen),
                "unseen": frozenset(self.unseen),
            }
        a = self._query_arrays
        return query_concept(
            text, self.index, self.filter_embeddings, a["top_index"], a["top_value"], pooled=a["pooled"],
            label_ids=self.label_ids, label_scores=self.label_scores, seen=a["seen"], unseen=a["unseen"],
            valid=a["valid"], detected=self.detected, abstention=self.abstention, **kw,
        )  # fmt: skip

    def explain_feature(self, v: np.ndarray, k: int = 10) -> list[list[tuple[str, float]]]:
        """Nearest phrases of the head output of pooled features ``v (B, C)``."""
        sc, ids = self.index.search(self.head.embed(np.atleast_2d(v)), k)
        return [
            [(self.index.phrases[j], float(s)) for s, j in zip(sr, ir, strict=True)]
            for sr, ir in zip(sc, ids, strict=True)
        ]

    def settings(self) -> dict:
        return dict(self.head_info.get("settings", {}))


def settings_dict(s: LaviseSettings) -> dict:
    return asdict(s)


# ============================================================================ the stage
SUBSTAGES = ("lavise_index", "lavise_regions", "lavise_head", "lavise_filters", "lavise_abstention")


def _region_concept_phrases(dataset: ProbeDataset) -> list[str]:
    return sorted(
        {p.strip().lower() for r in dataset.records for cs in r.region_concepts.values() for p in cs}
    )


#: Recipe version of the LaViSE sub-stages whose outputs changed; a bundle with an older one redoes them.
#: 2: background features from painted-out images; the objects' area share per filter.
#: Zero-shot recipe (index 2, regions 3, head 2, filters 3): "{kind} background" phrases among the data set's
#: phrases and always seen; one background row per image; multi-label softmax head; labels with the data-set prior.
#: ``lavise_abstention`` (issue 24): the query's abstention rule; a bundle from before has no record of it and
#: keeps answering every query (its stage is not stale: ``lavise build --force lavise`` adds it).
RECIPES = {
    "lavise_index": 2,
    "lavise_regions": 3,
    "lavise_head": 2,
    "lavise_filters": 3,
    "lavise_abstention": 1,
}


def build_lavise_stage(
    bundle,
    dataset: ProbeDataset,
    lm=None,
    settings: LaviseSettings = LaviseSettings(),
    vocabulary=None,
    embedder=None,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = False,
    executor=None,
) -> dict:
    """Vocabulary + index, region features, head training, filter attention; finished parts are skipped.

    Writes under ``lavise/``: ``index.faiss``, ``phrases.json``, ``embeddings.npy``, ``index.json``,
    ``split.json``, ``region_features``, ``region_image``, ``regions.json``, ``background_features``,
    ``background_image``, ``head.safetensors``, ``head.json``, ``filter_label_ids (C, L)``,
    ``filter_label_scores (C, L)``, ``filter_embeddings (C, d)``, ``filter_inside (C,)``,
    ``filter_object_area (C,)``, ``abstention.json`` (the query's abstention rule,
    :func:`~lavise_core.explain.lavise.abstention.build_abstention`).
    ``vocabulary``: a :class:`~lavise_core.explain.lavise.index.VocabularySettings` (default recipe), or a tuple
    ``(phrases, embeddings (T, d))`` used as the general vocabulary as is. ``executor``: where the region-feature
    pass over the images runs (:class:`~lavise_core.pipeline.executor.ExecutorSettings`; default this process).
    """
    from lavise_core.data.dataset import dataset_backgrounds
    from lavise_core.explain.lavise.index import (
        build_vocabulary,
        dataset_concepts,
        load_general_vocabulary,
    )
    from lavise_core.models.text_encoder import shared_embedder

    for stage, recipe in RECIPES.items():  # written by an older recipe: redo that part (and finish again)
        if bundle.stage_done(stage) and bundle.manifest["stages"][stage].get("recipe", 1) != recipe:
            bundle.clear_stage(stage)
            bundle.clear_stage("lavise")
    if bundle.stage_done("lavise") and bundle.stage_done("lavise_abstention"):
        return bundle.manifest["stages"]["lavise"]
    lav = Path(bundle.root) / "lavise"
    layer = bundle.layer
    timings: dict[str, float] = {}
    emb_model = embedder or shared_embedder()

    t = time.perf_counter()
    if not bundle.stage_done("lavise_index"):
        if isinstance(vocabulary, tuple):  # (phrases, embeddings) given directly (tests, benchmarks)
            general, gemb = list(vocabulary[0]), np.asarray(vocabulary[1], np.float32)
        else:
            general, gemb = load_general_vocabulary(vocabulary, emb_model, cache_dir, progress)
        phrases, emb, n_ds = build_vocabulary(dataset_concepts(dataset), general, gemb, emb_model)
        index = ConceptIndex(emb_model)
        index.meta["n_dataset"] = n_ds
        index.build(phrases, emb)
        index.save(lav)
        seen, unseen = concept_split(
            _region_concept_phrases(dataset), settings.seen_fraction, settings.split_seed
        )
        # background kinds are not split: all seen (trained on; SynthBirds has 7)
        backgrounds = [b for b in dataset_backgrounds(dataset) if b not in unseen]
        bundle.write_json(
            "lavise/split",
            {
                "seen": sorted(set(seen) | set(backgrounds)),
                "unseen": unseen,
                "backgrounds": backgrounds,
                "seed": settings.split_seed,
                "seen_fraction": settings.seen_fraction,
            },
        )
        bundle.mark_stage(
            "lavise_index",
            {
                "phrases": len(phrases),
                "dataset_phrases": n_ds,
                "kind": index.kind,
                "recipe": RECIPES["lavise_index"],
            },
        )
    index = ConceptIndex.load(lav, embedder=emb_model)
    split = bundle.read_json("lavise/split")
    timings["index"] = time.perf_counter() - t

    t = time.perf_counter()
    if lm is None and not (bundle.stage_done("lavise_regions") and bundle.stage_done("lavise_filters")):
        lm = bundle.load_model()
    if not bundle.stage_done("lavise_regions"):
        from lavise_core.pipeline.probe import stored_maps

        has_train = any(r.split == "train" and r.mask for r in dataset.records)
        kept = stored_maps(bundle, len(dataset))
        rf = extract_region_features(
            lm, dataset, layer, "train" if has_train else None, settings.image_batch,
            settings.min_region_cells, progress=progress, background_rows=settings.background_rows,
            executor=executor, resume_dir=bundle.root / "lavise" / "_regions_partial",
            stored_maps=None if kept is None else kept[0],
        )  # fmt: skip
        rf.save(bundle)
        bundle.mark_stage(
            "lavise_regions",
            {
                "regions": len(rf.region),
                "backgrounds": len(rf.background_image),
                "seconds": round(time.perf_counter() - t, 2),
                "recipe": RECIPES["lavise_regions"],
            },
        )
    timings["regions"] = time.perf_counter() - t

    t = time.perf_counter()
    if not bundle.stage_done("lavise_head"):
        rf = RegionFeatures.load(bundle)
        rows, y, used = training_targets(rf.concepts, split["seen"])
        pos = [index.position(p) for p in used]
        if any(p is None for p in pos):
            raise LaviseError(
                "a seen concept is missing from the index; rebuild the lavise stage with --force lavise"
            )
        e = np.asarray(index.embeddings[np.array(pos)], np.float32)
        head, log = train_head(rf.features[rows], y, e, settings, progress, groups=rf.image[rows])
        save_head(
            head, lav, {"settings": asdict(settings), "log": log, "trained_concepts": used, "layer": layer}
        )
        bundle.mark_stage(
            "lavise_head",
            {k: v for k, v in log.items() if k != "loss"}
            | {"final_loss": log["loss"][-1], "recipe": RECIPES["lavise_head"]},
        )
    head, _ = load_head(lav)
    timings["head"] = time.perf_counter() - t

    t = time.perf_counter()
    if not bundle.stage_done("lavise_filters"):
        labels, inside, area = compute_filter_labels(
            lm, dataset, bundle.array("probe/top_index"), bundle.array("probe/top_value"), head, index,
            settings, layer, progress=progress,
        )  # fmt: skip
        bundle.write_array("lavise/filter_label_ids", labels.ids)
        bundle.write_array("lavise/filter_label_scores", labels.scores)
        bundle.write_array("lavise/filter_embeddings", labels.embeddings)
        bundle.write_array("lavise/filter_inside", inside)
        bundle.write_array("lavise/filter_object_area", area)
        bundle.mark_stage(
            "lavise_filters",
            {"seconds": round(time.perf_counter() - t, 2), "recipe": RECIPES["lavise_filters"]},
        )
    timings["filters"] = time.perf_counter() - t

    t = time.perf_counter()
    if not bundle.stage_done("lavise_abstention"):
        rec = build_abstention(bundle, index)
        bundle.mark_stage("lavise_abstention", rec | {"recipe": RECIPES["lavise_abstention"]})
    timings["abstention"] = time.perf_counter() - t
    info = {
        "seconds": round(sum(timings.values()), 2),
        "timings": {k: round(v, 2) for k, v in timings.items()},
        "phrases": len(index),
        "seen": len(split["seen"]),
        "unseen": len(split["unseen"]),
    }
    bundle.mark_stage("lavise", info)
    return bundle.manifest["stages"]["lavise"]


def insight_for_bundle(
    bundle, dataset: ProbeDataset, explainer: LaviseExplainer | None = None, **kw
) -> list[dict]:
    """:func:`dataset_insight` with the bundle's arrays (probe pooled / classifier, LaViSE labels, backgrounds).

    Classes are the data set's; the classifier weights are used only when the network's classes are the same.
    """
    ex = explainer or LaviseExplainer.from_bundle(bundle)
    labels = dataset.labels()
    valid = (
        np.asarray(bundle.array("probe/valid")) if bundle.has("probe/valid") else np.ones(len(labels), bool)
    )
    bg_img = (
        np.asarray(bundle.array("lavise/background_image")) if bundle.has("lavise/background_image") else None
    )
    bg = names = bg_labels = None
    if bg_img is not None and len(bg_img):
        bg = np.asarray(bundle.array("lavise/background_features"), np.float32)
        bg_labels = labels[bg_img]
        names = [dataset.records[i].meta.get("background") for i in bg_img]
    same = list(bundle.classes) == list(dataset.classes)
    return dataset_insight(
        dataset.classes, bundle.array("probe/classifier_weight") if same else None,
        np.where(valid[:, None], bundle.array("probe/pooled"), 0), np.where(valid, labels, -1),
        ex.label_ids, ex.label_scores, ex.index.phrases, ex.inside,
        bg, bg_labels, names, ex.object_area, bg_img, **kw,
    )  # fmt: skip


def prefetch(ctx: StageContext):
    """The ``lavise`` stage's background start: embed the default general vocabulary in another process while
    the stages before LaViSE's run (on a fresh machine, about a minute) -> the process or ``None``."""
    from lavise_core.explain.lavise.index import prefetch_general_vocabulary

    options = ctx.options_for("lavise")
    if options.get("vocabulary") is not None or options.get("embedder") is not None:
        return None
    if ctx.bundle.stage_done("lavise_index"):
        return None
    return prefetch_general_vocabulary(options.get("cache_dir"))


def build_stage(ctx: StageContext) -> dict:
    """The ``lavise`` stage (:data:`lavise_core.stages.REGISTRY`): :func:`build_lavise_stage` with the build's settings and
    ``options['lavise']``."""
    options = {"executor": ctx.settings.executor_settings(), **ctx.options_for("lavise")}
    return build_lavise_stage(ctx.bundle, ctx.dataset, ctx.model, progress=ctx.settings.bars, **options)
