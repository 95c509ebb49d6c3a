"""Words for a plain folder of one's own images (issue 24): how right they are, and what the build costs.

The probe set is ``--n`` new SynthBirds images (generator seed ``--seed``, never in the demo data set) imported as a
plain folder: no masks, attributes or captions reach the bundle. The concept set is the annotated demo data set
(``data/synthbirds``), whose bundle `make assets` built; it lends the words. Ground truth comes from the folder
images' own masks, which the bundle never sees: ``G_k`` = the concepts whose annotated regions overlap filter k's
map (top 0.5 %) with IoU > 0.04 over its top-10 folder images (METHODS.md §6).

Printed, each beside its baseline:

- the card label (dissection on the concept set) in ``G_k``, against a random concept;
- the concept search's asserted filters right (concept in ``G_k``), against a random filter;
- concepts absent from SynthBirds answered confidently (held-out half of the absent list), against always answering;
- the build's wall time against the annotated bundle of the same images built side by side.

    python bench/own_data.py [--n 1200] [--out /tmp/lavise-own-data]

Another network, with its concept bundle already built (``lavise build --model M --data CONCEPT_SET``), and no
side-by-side annotated build (the build-time ratio is then not measured)::

    python bench/own_data.py --model efficientnet_lite0 --concepts data/synthbirds_1200 --no-compare
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--out", type=Path, default=Path("/tmp/lavise-own-data"))
    ap.add_argument("--model", default="synthbirds", help="model spec (default: the demo CNN)")
    ap.add_argument(
        "--concepts", type=Path, default=ROOT / "data" / "synthbirds", help="the annotated concept set"
    )
    ap.add_argument("--no-compare", action="store_true", help="skip the side-by-side annotated build")
    ap.add_argument("--reuse", action="store_true", help="measure the bundle a previous run left in --out")
    args = ap.parse_args()

    import lavise_core
    from lavise_core.data.dataset import ProbeDataset, write_dataset
    from lavise_core.data.importers import import_image_folder
    from lavise_core.data.probe_sets import absent_phrases
    from lavise_core.data.synthbirds import generate_synthbirds
    from lavise_core.evaluate.fidelity import label_accuracy, test_ground_truth
    from lavise_core.explain.dissection import IOU_MIN
    from lavise_core.models.networks import load_model
    from lavise_core.pipeline.probe import bundle_dir_for

    lm = load_model(args.model)
    demo, _ = bundle_dir_for(
        ROOT / "data" / "bundles", lm, lm.default_layer, ProbeDataset.open(args.concepts)
    )
    if not (demo / "bundle.json").is_file():
        raise SystemExit(
            f"build the concept set's bundle first: lavise build --model {args.model} --data {args.concepts}"
            + (" (or make assets)" if args.model == "synthbirds" else "")
        )
    out = args.out
    bundles = out / "bundles"
    t_own = t_annotated = None
    if args.reuse:
        annotated = ProbeDataset.open(out / "annotated")
        ex = lavise_core.build(args.model, out / "plain", bundles=bundles, concepts=args.concepts)
    else:
        shutil.rmtree(out, ignore_errors=True)
        annotated = generate_synthbirds(
            out / "annotated", n=args.n, seed=args.seed, image_size=128, progress=False
        )
        folder = out / "folder"
        for i, r in enumerate(annotated.records):
            d = folder / annotated.classes[r.label].replace(" ", "_")
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{r.id}.png").symlink_to(annotated.image_path(i))
        plain = import_image_folder(folder, out / "plain", progress=False)
        bundles.mkdir()
        (bundles / demo.name).symlink_to(demo)  # the concept set's bundle, as `make assets` built it

        t0 = time.perf_counter()
        ex = lavise_core.build(args.model, plain.root, bundles=bundles, concepts=args.concepts)
        t_own = time.perf_counter() - t0
    if not args.no_compare and not args.reuse:
        t0 = time.perf_counter()
        lavise_core.build(args.model, annotated.root, bundles=out / "annotated_bundles")
        t_annotated = time.perf_counter() - t0

    # ground truth from the folder images' own masks: every image counts (a copy whose split is all "test")
    truth_root = out / "truth"
    shutil.rmtree(truth_root, ignore_errors=True)
    truth_root.mkdir()
    for r in annotated.records:
        for rel in (r.path, r.mask):
            if rel:
                (truth_root / rel).parent.mkdir(parents=True, exist_ok=True)
                (truth_root / rel).symlink_to(annotated.root / rel)
    recs = [type(r)(**{**r.__dict__, "split": "test"}) for r in annotated.records]
    truth = write_dataset(
        truth_root, name="truth", source=annotated.source, classes=annotated.classes, records=recs,
        regions=annotated.regions, meta=annotated.meta,
    )  # fmt: skip
    d = ex.dissection()
    thr = np.asarray(ex.bundle.array("probe/threshold"), np.float32)
    G, _ = test_ground_truth(lm, truth, ex.layer, thr, d.concepts)
    labelled = np.asarray(d.label_scores[:, 0]) >= IOU_MIN
    top1 = np.where(labelled, np.asarray(d.label_ids[:, 0]), -1)
    allowed = ~np.asarray(d.is_part)
    res: dict = {
        "images": args.n,
        "label_in_G": label_accuracy(top1, G),
        "label_random_concept": float((G[:, allowed].sum(1) / max(int(allowed.sum()), 1)).mean()),
        # the same among the filters that carry a label (most of an ImageNet network's carry none)
        "label_in_G_labelled": label_accuracy(top1[labelled], G[labelled]) if labelled.any() else None,
        "label_random_concept_labelled": float(
            (G[labelled][:, allowed].sum(1) / max(int(allowed.sum()), 1)).mean()
        )
        if labelled.any()
        else None,
    }
    present = [j for j in np.flatnonzero(allowed) if G[:, j].any()]
    right = asserted = 0
    base: list[float] = []
    for j in present:
        a = ex.query(d.concepts[j], n=5)
        if a.confident and not a.weak:
            right += int(sum(G[int(k), j] for k in a.filters))
            asserted += len(a.filters)
            base.append(float(G[:, j].mean()))
    res["search_asserted_right"] = right / asserted if asserted else None
    res["search_random_filter"] = float(np.mean(base)) if base else None
    res["search_concepts"] = len(present)
    absent = absent_phrases("evaluation")
    res["absent_answered"] = float(np.mean([ex.query(t).confident for t in absent]))
    res["absent_phrases"] = len(absent)
    res["build_seconds_own"] = None if t_own is None else round(t_own, 1)
    res["build_seconds_annotated"] = None if t_annotated is None else round(t_annotated, 1)
    res["build_ratio"] = None if t_annotated is None else round(t_own / t_annotated, 3)
    res["model"] = args.model
    res["labelled_filters"] = int(labelled.sum())
    res["filters"] = len(labelled)
    res["stages"] = ex.built
    print(json.dumps(res, indent=1))
    (out / "result.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
