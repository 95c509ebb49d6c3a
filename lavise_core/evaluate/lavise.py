"""Evaluation of LaViSE filter labels (METHODS.md §2 reproduction protocol).

For filter k and its top-p images: the map ``A_k`` (``probe/top_maps``) is bilinearly upsampled to the
network-input crop of the region label map (resized, nearest, to ``eval_size``²) and thresholded at
``probe/threshold`` (the 0.995 activation quantile, Network Dissection). For each concept t of the
data set, ``IoU_t = Σ_i |M_t,i ∩ T_i| / Σ_i |M_t,i ∪ T_i|`` over the p images (images without t add
``|T_i|`` to the union). Concepts are the region phrases and one ``"{kind} background"`` phrase per image
(label 0, the pixels outside the object; ``meta["background"]``). ``G_k = {t : IoU_t > 0.04}``; ``W_k`` = the
explainer's top-s phrases; ``recall@s = |G ∩ W| / |G|``, averaged over the filters with non-empty G,
separately for seen and unseen region concepts (``recall``) and for the background concepts
(``recall_backgrounds``; they are always seen); ``top1_in_gt``: share of all filters whose top-1 label is in
``G_k``.

Rows of the table (each with the size of the vocabulary it ranks):

- *LaViSE* — the stored labels, ranked over the whole open vocabulary;
- *no attention* — the head on the plain mean-pooled features of the same top images;
- *random (same vocabulary)* — s phrases drawn uniformly from the vocabulary LaViSE ranks: expected
  recall ``s / |V|`` (every data-set concept is in V), the baseline comparable with LaViSE;
- *LaViSE, oracle vocabulary* — the same attention features and head, ranking only the data set's
  concepts (the comparison fair the other way: no general phrase can crowd the list);
- *random (data-set concepts)* — s phrases drawn from the data set's concepts only: ``s / |D|``,
  the baseline of the oracle row and of any labeller with a data-set prior (``LaviseSettings.dataset_prior``).

Sanity check: the CNN's weights are re-initialised; region features, the head (retrained on the
randomised features, as LaViSE would), top images, thresholds and labels are all recomputed on a subset
of images. Also reported: the trained network's head applied to the randomised features without
retraining. The labels should collapse (recall drops, top-1 labels agree little with the trained
network's, fewer distinct labels).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch

from lavise_core.data.dataset import ProbeDataset, background_phrase
from lavise_core.explain.dissection.labels import IOU_MIN, label_map_crop
from lavise_core.explain.lavise.explainer import LaviseExplainer
from lavise_core.explain.lavise.head import extract_region_features, train_head, training_targets
from lavise_core.explain.lavise.index import ConceptIndex
from lavise_core.explain.lavise.labels import (
    filter_attention_features,
    labels_from_features,
    no_attention_labels,
)
from lavise_core.explain.lavise.settings import LaviseSettings
from lavise_core.models.networks import reinitialised

__all__ = [
    "concept_ground_truth",
    "evaluate_lavise",
    "format_tables",
    "random_recall",
    "random_top1",
    "recall_at",
    "top1_in_gt",
]


def concept_ground_truth(
    dataset: ProbeDataset,
    lm,
    top_index: np.ndarray,
    top_maps: np.ndarray,
    threshold: np.ndarray,
    filters: Sequence[int],
    p: int,
    eval_size: int = 64,
    iou_min: float = IOU_MIN,
    backgrounds: bool = True,
) -> list[dict[str, float]]:
    """For each filter: ``{concept: IoU}`` of the concepts with IoU > ``iou_min`` (see module docstring).

    ``top_index (C, k)``, ``top_maps (C, k, h, w)``, ``threshold (C,)``. ``backgrounds``: label 0 of an image
    is the concept ``"{kind} background"`` of its ``meta["background"]``.
    """
    cache: dict[int, np.ndarray | None] = {}
    region_val = {name: r + 1 for r, name in enumerate(dataset.regions)}
    out = []
    for k in filters:
        inter: dict[str, float] = {}
        union_in: dict[str, float] = {}
        t_in: dict[str, float] = {}
        t_total = 0.0
        for j in range(min(p, top_index.shape[1])):
            i = int(top_index[k, j])
            if i not in cache:
                cache[i] = label_map_crop(dataset, i, lm, eval_size)
            lab = cache[i]
            if lab is None:
                continue
            a = torch.from_numpy(np.asarray(top_maps[k, j], np.float32))[None, None]
            a = torch.nn.functional.interpolate(
                a, size=(eval_size, eval_size), mode="bilinear", align_corners=False
            )
            t = a[0, 0].numpy() > float(threshold[k])
            n_t = float(t.sum())
            t_total += n_t
            masks: dict[str, np.ndarray] = {}
            for name, phrases in dataset.records[i].region_concepts.items():
                v = region_val.get(name)
                if v is None:
                    continue
                m = lab == v
                for ph in phrases:
                    ph = ph.strip().lower()
                    masks[ph] = masks[ph] | m if ph in masks else m
            bg = background_phrase(dataset.records[i].meta.get("background")) if backgrounds else None
            if bg is not None:
                masks[bg] = masks[bg] | (lab == 0) if bg in masks else lab == 0
            for ph, m in masks.items():
                inter[ph] = inter.get(ph, 0.0) + float((m & t).sum())
                union_in[ph] = union_in.get(ph, 0.0) + float((m | t).sum())
                t_in[ph] = t_in.get(ph, 0.0) + n_t
        g = {}
        for ph in inter:
            u = union_in[ph] + (t_total - t_in[ph])
            iou = inter[ph] / u if u > 0 else 0.0
            if iou > iou_min:
                g[ph] = iou
        out.append(g)
    return out


def recall_at(
    gt: list[dict[str, float]], words: list[list[str]], concepts: set[str], s: int
) -> tuple[float, int]:
    """Mean ``|G ∩ W_s| / |G|`` over filters with ``G ∩ concepts`` non-empty -> ``(recall, n_filters)``."""
    vals = []
    for g, w in zip(gt, words, strict=True):
        gs = {t for t in g if t in concepts}
        if gs:
            vals.append(len(gs & set(w[:s])) / len(gs))
    return (float(np.mean(vals)) if vals else float("nan")), len(vals)


def random_recall(gt: list[dict[str, float]], concepts: set[str], pool: set[str] | int, s: int) -> float:
    """Expected recall of s phrases drawn uniformly without replacement from a pool of phrases.

    ``pool``: the phrases drawn from (or their number when every concept is in the pool). For a filter,
    ``E|G ∩ W| / |G| = (s / |pool|) · |G ∩ pool| / |G|``; averaged over the filters with
    ``G ∩ concepts`` non-empty, like :func:`recall_at`.
    """
    n = pool if isinstance(pool, int) else len(pool)
    if not n:
        return float("nan")
    share = min(1.0, s / n)
    vals = []
    for g in gt:
        gs = {t for t in g if t in concepts}
        if gs:
            inside = len(gs) if isinstance(pool, int) else len(gs & pool)
            vals.append(share * inside / len(gs))
    return float(np.mean(vals)) if vals else float("nan")


def top1_in_gt(gt: list[dict[str, float]], words: list[list[str]]) -> float:
    """Share of all filters whose top-1 label is in ``G_k`` (filters with an empty ``G_k`` count as misses)."""
    hits = [bool(w) and w[0] in g for g, w in zip(gt, words, strict=True)]
    return float(np.mean(hits)) if hits else float("nan")


def random_top1(gt: list[dict[str, float]], pool: set[str] | int) -> float:
    """Expected :func:`top1_in_gt` of one phrase drawn uniformly from ``pool`` (phrases, or their number when
    every concept is in it): mean over all filters of ``|G ∩ pool| / |pool|``."""
    n = pool if isinstance(pool, int) else len(pool)
    if not n or not gt:
        return float("nan")
    return float(np.mean([(len(g) if isinstance(pool, int) else len(set(g) & pool)) / n for g in gt]))


def _words(ids: np.ndarray, phrases: list[str]) -> list[list[str]]:
    return [[phrases[int(j)] for j in row if j >= 0] for row in np.asarray(ids)]


def _mini_probe(lm, dataset: ProbeDataset, indices: np.ndarray, layer: str, top_k: int, batch: int):
    """Top images, values, maps and 0.995 thresholds over a subset of images (for the sanity check)."""
    from lavise_core.models.networks import forward_maps
    from lavise_core.pipeline.probe import image_batches

    pooled, maps_all, idx_all = [], [], []
    for b, x, _ in image_batches(dataset, lm, indices, batch):
        maps, _ = forward_maps(lm, x, layer)
        maps = maps.float().cpu()
        pooled.append(maps.mean((2, 3)).numpy())
        maps_all.append(maps.half().numpy())
        idx_all += b
    pooled = np.concatenate(pooled)
    maps = np.concatenate(maps_all)  # (n, C, h, w)
    idx_all = np.array(idx_all)
    order = np.argsort(-pooled, axis=0, kind="stable")[:top_k].T  # (C, k)
    top_index = idx_all[order]
    top_value = np.take_along_axis(pooled.T, order, 1)
    top_maps = maps[order, np.arange(maps.shape[1])[:, None]]  # (C, k, h, w)
    flat = maps.astype(np.float32).transpose(1, 0, 2, 3).reshape(maps.shape[1], -1)
    threshold = np.quantile(flat, 0.995, axis=1)
    return top_index, top_value, top_maps, threshold


def evaluate_lavise(
    bundle,
    dataset: ProbeDataset,
    lm=None,
    s_values: Sequence[int] = (5, 20),
    filters: Sequence[int] | None = None,
    eval_size: int = 64,
    sanity: bool = True,
    sanity_images: int = 300,
    sanity_filters: int = 64,
    seed: int = 0,
    progress: bool = False,
    write: bool = True,
) -> dict:
    """Recall@s of LaViSE labels for seen / unseen concepts vs baselines + the randomised-weights check.

    Stored as ``eval/lavise.json`` when ``write`` (and the bundle is writable).
    """
    t0 = time.perf_counter()
    ex = LaviseExplainer.from_bundle(bundle)
    stored = ex.settings()
    # heads stored before these settings existed: the old recipe (margin loss, no rows of backgrounds, no prior)
    old = {"loss": "margin", "background_rows": False, "dataset_prior": 0.0}
    st = LaviseSettings(
        **{
            k: v
            for k, v in ({**old, **stored} if stored else {}).items()
            if k in LaviseSettings.__dataclass_fields__
        }
    )
    phrases = ex.index.phrases
    top_index = np.asarray(bundle.array("probe/top_index"))
    top_value = np.asarray(bundle.array("probe/top_value"))
    c = top_index.shape[0]
    ks = np.arange(c) if filters is None else np.asarray(filters, np.int64)
    p = min(st.top_p, top_index.shape[1])
    if lm is None:
        lm = bundle.load_model()
    gt = concept_ground_truth(
        dataset,
        lm,
        top_index,
        bundle.array("probe/top_maps"),
        bundle.array("probe/threshold"),
        ks,
        p,
        eval_size,
    )
    split = bundle.read_json("lavise/split")
    bgs = {background_phrase(r.meta.get("background")) for r in dataset.records} - {None}
    bgs |= set(split.get("backgrounds", []))
    # "seen" stays the split's seen *region* concepts (comparable with older results); backgrounds apart
    seen, unseen = set(ex.seen) - bgs, set(ex.unseen)
    words = _words(np.asarray(ex.label_ids)[ks], phrases)
    noatt = no_attention_labels(bundle.array("probe/pooled"), top_index, top_value, ex.head, ex.index, st, ks)
    words_noatt = _words(noatt.ids, phrases)
    n_ds = int(ex.index.meta.get("n_dataset") or 0)
    ds_phrases = list(phrases[:n_ds]) if n_ds else sorted(seen | unseen)
    ds_ids = np.array([ex.index.position(t) for t in ds_phrases], np.int64)
    oracle = ConceptIndex(ex.index.embedder, ex.index.model_id).build(
        ds_phrases, np.asarray(ex.index.embeddings[ds_ids], np.float32)
    )
    v, *_ = filter_attention_features(
        lm,
        dataset,
        top_index,
        p,
        bundle.layer,
        ks,
        st.image_batch,
        st.threads,
        progress,
        object_fraction=False,
    )
    words_oracle = _words(
        labels_from_features(v, top_value[ks], ex.head, oracle, st.top_s, st.labels_per_filter, 0.0).ids,
        ds_phrases,
    )
    res: dict = {
        "filters": len(ks),
        "top_p": p,
        "vocabulary": len(phrases),
        "dataset_vocabulary": len(ds_phrases),
        "seen": len(seen),
        "unseen": len(unseen),
        "backgrounds": len(bgs),
        "dataset_prior": st.dataset_prior,
    }

    def recall_rows(groups) -> dict:
        rows = {}
        for s in s_values:
            for name, cs in groups:
                r, n = recall_at(gt, words, cs, s)
                rows[f"{name}@{s}"] = {
                    "lavise": r,
                    "no_attention": recall_at(gt, words_noatt, cs, s)[0],
                    "random_vocabulary": random_recall(gt, cs, len(phrases), s),
                    "lavise_oracle_vocabulary": recall_at(gt, words_oracle, cs, s)[0],
                    "random_dataset_concepts": random_recall(gt, cs, set(ds_phrases), s),
                    "filters_with_gt": n,
                }
        return rows

    res["recall"] = recall_rows((("seen", seen), ("unseen", unseen)))
    bg_table = recall_rows((("background", bgs), ("seen_with_backgrounds", seen | bgs)))
    res["recall_backgrounds"] = bg_table
    res["top1_in_gt"] = {
        "lavise": top1_in_gt(gt, words),
        "no_attention": top1_in_gt(gt, words_noatt),
        "random_vocabulary": random_top1(gt, len(phrases)),
        "lavise_oracle_vocabulary": top1_in_gt(gt, words_oracle),
        "random_dataset_concepts": random_top1(gt, set(ds_phrases)),
    }
    res["filters_with_any_gt"] = int(sum(bool(g) for g in gt))
    if sanity:
        res["sanity"] = _sanity_check(
            bundle, dataset, lm, ex, st, sanity_images, sanity_filters, eval_size, seed, progress
        )
    res["seconds"] = round(time.perf_counter() - t0, 2)
    if write and getattr(bundle, "writable", False):
        bundle.write_json("eval/lavise", res)
    return res


def _label_stats(gt, words, seen, unseen) -> dict:
    return {
        "seen@20": recall_at(gt, words, seen, 20)[0],
        "unseen@20": recall_at(gt, words, unseen, 20)[0],
        "distinct_top1": len({w[0] for w in words if w}),
        "distinct_top5": len({t for w in words for t in w[:5]}),
        "top1": [w[0] if w else "" for w in words],
    }


def _sanity_check(bundle, dataset, lm, ex, st, n_images, n_filters, eval_size, seed, progress) -> dict:
    """Re-initialise the CNN, redo region features / head / top images / labels on a subset; compare.

    ``trained``: the trained CNN with a head trained on the subset's regions; ``randomised``: the
    re-initialised CNN with a head *retrained* on its own region features (what LaViSE would do);
    ``randomised_head_not_retrained``: the trained CNN's head applied to the randomised features.
    Ground truth, top images and thresholds always come from the network being explained.
    """
    layer = bundle.layer
    rng = np.random.default_rng(seed)
    c = np.asarray(ex.label_ids).shape[0]
    ks = np.sort(rng.choice(c, size=min(n_filters, c), replace=False))
    out = {"filters": len(ks), "images": n_images}
    seen, unseen = set(ex.seen), set(ex.unseen)
    quick = LaviseSettings(
        **{**st.__dict__, "epochs": min(st.epochs, 20), "max_seconds": min(st.max_seconds, 40.0)}
    )
    labelled = [i for i in dataset.indices(None) if dataset.records[i].mask is not None]
    sub = np.sort(rng.permutation(labelled)[:n_images]) if labelled else dataset.indices(None)[:n_images]
    heads = {}
    for name, model in (("trained", lm), ("randomised", reinitialised(lm, seed))):
        rf = extract_region_features(
            model, _Reindexed(dataset, sub), layer, None, st.image_batch, st.min_region_cells,
            background_rows=st.background_rows,
        )  # fmt: skip
        rows, y, used = training_targets(rf.concepts, ex.seen)
        e = np.asarray(ex.index.embeddings[np.array([ex.index.position(u) for u in used])], np.float32)
        heads[name], _ = train_head(rf.features[rows], y, e, quick, groups=rf.image[rows])
        ti, tv, tm, thr = _mini_probe(model, dataset, sub, layer, st.top_p, st.image_batch)
        v, *_ = filter_attention_features(
            model, dataset, ti, st.top_p, layer, ks, st.image_batch, st.threads, object_fraction=False
        )
        gt = concept_ground_truth(dataset, model, ti, tm, thr, ks, st.top_p, eval_size)
        for key, head in ((name, heads[name]),) + (
            (("randomised_head_not_retrained", heads["trained"]),) if name == "randomised" else ()
        ):
            labels = labels_from_features(
                v, tv[ks], head, ex.index, st.top_s, st.labels_per_filter, st.dataset_prior
            )
            out[key] = _label_stats(gt, _words(labels.ids, ex.index.phrases), seen, unseen)
    out["random_phrases@20"] = min(1.0, 20 / len(ex.index))
    a = out["trained"].pop("top1")
    for key in ("randomised", "randomised_head_not_retrained"):
        b = out[key].pop("top1")
        out[key]["top1_agreement"] = float(np.mean([x == y for x, y in zip(a, b, strict=True)]))
    out["top1_agreement"] = out["randomised"]["top1_agreement"]
    return out


class _Reindexed(ProbeDataset):
    """A view of a data set restricted to some records (paths and masks resolved through the parent)."""

    def __init__(self, parent: ProbeDataset, indices: np.ndarray):
        super().__init__(
            parent.root, parent.name, parent.source, parent.classes, parent.regions,
            [parent.records[int(i)] for i in indices], parent.meta,
        )  # fmt: skip


ROWS = (
    ("lavise", "LaViSE (open vocabulary)", "vocabulary"),
    ("no_attention", "LaViSE without attention", "vocabulary"),
    ("random_vocabulary", "random phrases, same vocabulary", "vocabulary"),
    ("lavise_oracle_vocabulary", "LaViSE, oracle vocabulary (data-set concepts)", "dataset_vocabulary"),
    ("random_dataset_concepts", "random phrases, data-set concepts only", "dataset_vocabulary"),
)


def format_tables(res: dict) -> str:
    """Plain-text tables of :func:`evaluate_lavise`'s result."""
    cols = list(res["recall"])
    lines = [
        f"LaViSE recall@s over {res['filters']} filters (top-{res['top_p']} images, "
        f"{res['seen']} seen / {res['unseen']} unseen concepts)",
        f"{'':47s}{'ranks':>7s}" + "".join(f"{c:>10s}" for c in cols),
    ]
    for key, title, vocab in ROWS:
        if key not in res["recall"][cols[0]]:
            continue
        vals = "".join(f"{res['recall'][c][key]:10.3f}" for c in cols)
        lines.append(f"{title:47s}{res.get(vocab, 0):7d}{vals}")
    lines.append(
        f"{'filters with ground truth':54s}"
        + "".join(f"{res['recall'][c]['filters_with_gt']:10d}" for c in cols)
    )
    if "top1_in_gt" in res:
        lines.append(
            f"Top-1 label in G_k (all {res['filters']} filters; data-set prior {res.get('dataset_prior', 0)}):"
        )
        for key, title, vocab in ROWS:
            if key in res["top1_in_gt"]:
                lines.append(f"  {title:45s}{res.get(vocab, 0):7d}{res['top1_in_gt'][key]:10.3f}")
    if res.get("recall_backgrounds"):
        bt = res["recall_backgrounds"]
        lines.append(
            f"Background concepts ({res.get('backgrounds', 0)}, always seen): LaViSE "
            + "  ".join(f"{c} {bt[c]['lavise']:.3f}" for c in bt)
        )
    if "sanity" in res:
        s = res["sanity"]
        lines.append(
            f"Sanity check ({s['filters']} filters, {s['images']} images; heads trained on those images' regions; "
            f"random phrases@20 = {s.get('random_phrases@20', float('nan')):.4f}):"
        )
        names = {
            "trained": "trained CNN",
            "randomised": "randomised CNN, head retrained",
            "randomised_head_not_retrained": "randomised CNN, trained head",
        }
        for key, title in names.items():
            if key not in s:
                continue
            r = s[key]
            agree = (
                f"  top-1 agreement with trained {r['top1_agreement']:.3f}" if "top1_agreement" in r else ""
            )
            lines.append(
                f"  {title:32s} seen@20 {r['seen@20']:.3f}  unseen@20 {r['unseen@20']:.3f}  "
                f"distinct top-1 {r['distinct_top1']:3d}  distinct top-5 {r.get('distinct_top5', 0):3d}{agree}"
            )
    return "\n".join(lines)
