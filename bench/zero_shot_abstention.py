"""Measure the zero-shot concept query's abstention (issue 24) on a built bundle, held out, read-only.

The rule (``lavise_core/explain/lavise/abstention.py``) is calibrated in memory on one half of the absent concepts
(``lavise_core/evaluate/probe_sets/absent_concepts.json``) and measured on the other, both ways; every answer goes
through the real query (``LaviseExplainer.query``). Printed beside today's baseline (no abstention: every query
answered):

- absent concepts answered (target ≤ 5 %), and answered firmly (not weak);
- the data set's own concepts answered: seen by the head in training, held out of it, backgrounds; firmly when the
  firm level is cross-fitted on the other half of the data set's phrases (it is calibrated on them);
- paraphrases of its concepts in words the data set never uses (the zero-shot path has no lexicon);
- with ``--ground-truth`` (a forward pass over the test split, ~30 s on the demo CNN): the concepts some filter
  detects on the test split (METHODS.md §6), answered, and how often the top filter shown is right for the firm,
  the weak and the turned-down ones.

Run: ``.venv/bin/python bench/zero_shot_abstention.py [--bundle DIR] [--ground-truth]``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np

from lavise_core.data.probe_sets import absent_phrases, probe_set
from lavise_core.explain.lavise.abstention import abstention_rule, best_filter_scores, calibrate_abstention
from lavise_core.explain.lavise.explainer import LaviseExplainer
from lavise_core.pipeline.bundle import Bundle

DEMO = Path("data/bundles/synthbirds-synthbirds-features-3a8d15e0be5c8184")


def pct(x) -> str:
    return f"{100 * float(np.mean(x)):.1f} %" if len(x) else "–"


def answers(lav: LaviseExplainer, texts) -> list:
    """``[(confident, weak, top filter)]`` through the real query."""
    out = []
    for t in texts:
        r = lav.query(t, n_filters=5, n_images=2)
        out.append((r.confident, r.weak, int(r.filters[0])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", default=str(DEMO))
    p.add_argument("--ground-truth", action="store_true", help="also the concepts detected on the test split")
    args = p.parse_args()
    bundle = Bundle.open(args.bundle)
    base = LaviseExplainer.from_bundle(bundle)
    ix = base.index
    n_ds = int(ix.meta["n_dataset"])
    own = list(ix.phrases[:n_ds])
    split = bundle.read_json("lavise/split")
    bgs = set(split.get("backgrounds", []))
    groups = {
        "seen in head training": [c for c in own if c in split["seen"] and c not in bgs],
        "held out of head training": [c for c in own if c in split["unseen"]],
        "backgrounds": [c for c in own if c in bgs],
    }
    para = probe_set("paraphrases")
    groups["paraphrases, development"] = list(para["development"])
    groups["paraphrases, second set"] = list(para["held_out"])
    meant = {**para["development"], **para["held_out"]}  # paraphrase -> the concept it means
    detected_gt: list[str] = []
    G = concepts = None
    if args.ground_truth:
        from lavise_core.data.dataset import ProbeDataset
        from lavise_core.evaluate.fidelity import test_ground_truth
        from lavise_core.explain.dissection.labels import DissectionTables

        ds = ProbeDataset.open(bundle.manifest["dataset"]["root"])
        d = DissectionTables.from_bundle(bundle)
        concepts = list(d.concepts)
        thr = np.asarray(bundle.array("probe/threshold"), np.float32)
        G, _ = test_ground_truth(bundle.load_model(), ds, bundle.layer, thr, concepts)
        detected_gt = [c for c in own if c in concepts and G[:, concepts.index(c)].any()]
        groups["detected on the test split (ground truth)"] = detected_gt

    # the firm level is fitted on the data set's own phrases: cross-fit it on two seeded halves of them
    rng = np.random.default_rng(0)
    perm = rng.permutation(n_ds)
    own_half = [set(perm[: n_ds // 2].tolist()), set(perm[n_ds // 2 :].tolist())]
    own_scores = best_filter_scores(np.asarray(ix.embeddings[:n_ds], np.float32), base.filter_embeddings)

    print(f"bundle {bundle.root.name}: {len(base.filter_embeddings)} filters, {n_ds} data-set phrases")
    print("baseline (no abstention): every query answered, 100 % of each row")
    for fit, held in (("calibration", "evaluation"), ("evaluation", "calibration")):
        rule, info = calibrate_abstention(ix, base.filter_embeddings, absent_phrases(fit))
        lav = LaviseExplainer.from_bundle(bundle, index=ix, abstention=rule)
        print(f"\ncalibrated on the {fit} half ({info['absent']} phrases): threshold {rule.threshold:.3f}, "
              f"firm {rule.firm:.3f}")  # fmt: skip
        a = answers(lav, absent_phrases(held))
        print(f"  absent concepts ({held} half, {len(a)}): answered {pct([c for c, _, _ in a])}, "
              f"firmly {pct([c and not w for c, w, _ in a])}")  # fmt: skip
        for name, texts in groups.items():
            res = answers(lav, texts)
            conf = [c for c, _, _ in res]
            firm_cf = []  # firm level from the other half of the data set's phrases
            for t, (c, _, _) in zip(texts, res, strict=True):
                j = ix.position(t)
                if j is None or j >= n_ds:
                    continue
                other = own_half[1] if j in own_half[0] else own_half[0]
                r2 = abstention_rule([rule.threshold], own_scores[sorted(other)])
                firm_cf.append(c and float(own_scores[j]) >= r2.firm)
            extra = f", firmly (cross-fitted) {pct(firm_cf)}" if firm_cf else ""
            print(f"  {name} ({len(texts)}): answered {pct(conf)}{extra}")
            if G is not None and (name.startswith("detected") or name.startswith("paraphrases")):
                # among the texts whose concept some filter detects on the test split: is the top filter right?
                rows = [
                    (bool(G[k, concepts.index(meant.get(t, t))]), c, w)
                    for t, (c, w, k) in zip(texts, res, strict=True)
                    if meant.get(t, t) in concepts and G[:, concepts.index(meant.get(t, t))].any()
                ]
                parts = []
                for label, m in (
                    ("firm", [c and not w for _, c, w in rows]),
                    ("weak", [c and w for _, c, w in rows]),
                    ("turned down", [not c for _, c, _ in rows]),
                    ("all: the baseline shows every one", [True] * len(rows)),
                ):
                    sel = [r for (r, _, _), keep in zip(rows, m, strict=True) if keep]
                    parts.append(f"{label} {pct(sel)} of {len(sel)}")
                print(f"    top filter in G_k ({len(rows)} detected on the test split): " + "; ".join(parts))


if __name__ == "__main__":
    main()
