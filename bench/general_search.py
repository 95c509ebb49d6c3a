"""Concept search over ConceptShapes on EfficientNet-Lite0 (issue 26, point 4): how many concepts the search asserts
filters for, and how often those filters are right on the held-out test images, by concept kind, beside a random
filter, for a concept set of --n images.

The dissection and fidelity stages' own functions, without a bundle: one forward pass over the set at ``--layer``
(:func:`~lavise_core.explain.dissection.labels.split_overlaps`, thresholds at the 0.995 activation quantile over
every image, as the probe pass), then on the fit split the search evidence (``subsampled_ground_truth``, 64 draws
the size of the test split) and its cross-fitted calibration (``calibrate_search``, the part names of
``part_names``: ConceptShapes' textures and shapes are concepts), the deployed index (``search_index`` with the
abstention threshold from the calibration half of the absent phrases), and on the test split the ground truth
``G_k`` (METHODS.md §6) that judges the returned filters (the fidelity stage's ``search_rows``). Absent phrases:
the evaluation half. Queries "striped", "zigzag" and "red circle" are shown with their filters and whether each is
in its test ``G_k``. The colour path is left out (a known concept takes the exact path).

    python bench/general_search.py [--data /tmp/concepts3k] [--n 3000] [--layer bn2]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=Path("/tmp/concepts3k"))
    ap.add_argument("--n", type=int, default=3000, help="images to generate when --data is absent")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--layer", default="bn2")
    ap.add_argument("--draws", type=int, default=64)
    args = ap.parse_args()

    import torch

    from lavise_core.data.concept_shapes import generate_concept_shapes
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.evaluate.fidelity import search_rows
    from lavise_core.explain.dissection.labels import (
        calibrate_search,
        concept_incidence,
        dissection_concepts,
        ground_truth_matrix,
        part_names,
        split_overlaps,
        subsampled_ground_truth,
    )
    from lavise_core.explain.dissection.lexicon import build_lexicon
    from lavise_core.explain.dissection.search import absent_phrases, answer_query, search_index
    from lavise_core.models.networks import load_model, record_layer
    from lavise_core.models.text_encoder import shared_embedder
    from lavise_core.pipeline.probe import image_batches

    t0 = time.perf_counter()
    if not (args.data / "manifest.jsonl").is_file():
        generate_concept_shapes(args.data, n=args.n, seed=0)
    ds = ProbeDataset.open(args.data)
    lm = load_model(args.model)
    rows_all = [i for i in range(len(ds)) if ds.records[i].mask]
    maps = []
    with torch.no_grad(), lm.lock, record_layer(lm.model, args.layer) as rec:
        for _, x, _ in image_batches(ds, lm, rows_all, 64):
            lm.model(x)
            m = rec.output.float()
            maps.append(m.permute(1, 0, 2, 3).reshape(m.shape[1], -1).half())
    flat = torch.cat(maps, 1)
    thr = np.array([np.quantile(flat[c].float().numpy(), 0.995) for c in range(flat.shape[0])], np.float32)
    del maps, flat
    rows, inter, act, area, pooled = split_overlaps(lm, ds, args.layer, rows_all, thr)
    print(f"two passes over {len(rows)} images: {time.perf_counter() - t0:.0f} s", flush=True)
    recs = [ds.records[int(i)] for i in rows]
    split = ds.splits()[rows]
    fit, test = np.flatnonzero(split != "test"), np.flatnonzero(split == "test")
    concepts = dissection_concepts([recs[i] for i in fit], regions=ds.regions)
    inc = concept_incidence(recs, ds.regions, concepts)
    named = ds.meta.get("concept_kinds") or {}
    is_part = part_names(concepts, ds.regions, named)
    f = [a[fit] for a in (inter, act, area, inc, pooled)]
    rate, mean = subsampled_ground_truth(*f, size=len(test), draws=args.draws)
    cal = calibrate_search(*f, concepts, len(test), draws=args.draws, is_part=is_part)
    G, _ = ground_truth_matrix(*(a[test] for a in (inter, act, area, inc, pooled)))
    emb = shared_embedder()
    qi = search_index(concepts, rate, mean, emb, calibration=cal, absent=absent_phrases("calibration"))
    lex = build_lexicon(qi.concepts)
    print(
        f"{len(fit)} fit / {len(test)} test images, {len(concepts)} concepts, part names {int(is_part.sum())}; "
        f"min_rate {qi.min_rate:.3f}, floors {cal['floor_rate_part']:.3f} / {cal['floor_rate_background']:.3f}, "
        f"abstention cosine {qi.sim_threshold:.3f}"
    )

    def kind(c: str) -> str:
        k = named.get(c, "part" if c in ds.regions else "?")
        return "colour + shape" if k == "shape" and len(c.split()) == 2 else k

    groups = {"every concept": concepts}
    for k in ("colour", "texture", "shape", "colour + shape"):
        groups[k] = [c for c in concepts if kind(c) == k]
    print("| concepts | judged (in some test G_k) | asserted | precision | random filter | with weak |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, cs in groups.items():
        r = search_rows([(c, c) for c in cs], qi, lex, {}, emb, G, concepts)
        prec = "–" if r["precision"] is None else f"{r['precision']:.1%}"
        print(
            f"| {name} | {r['detectable']} | {r['asserted']:.1%} | {prec} | {r['random_filter']:.1%} | "
            f"{r['precision_with_weak']:.1%} |"
        )
    absent = [bool(answer_query(t, qi, lex, {}, emb)[0].confident) for t in absent_phrases("evaluation")]
    print(f"absent concepts answered confidently: {np.mean(absent):.1%} of {len(absent)}")
    for q in ("striped", "zigzag", "red circle"):
        a, read = answer_query(q, qi, lex, {}, emb)
        t = concepts.index(read) if read in concepts else None
        right = [bool(G[k, t]) for k in a.filters] if t is not None else []
        state = "weak" if a.weak else ("asserted" if a.confident else "abstains")
        print(f"'{q}': filters {a.filters.tolist()} ({state}), in their test G_k: {right}")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
