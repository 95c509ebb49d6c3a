"""What does a training trajectory cost per checkpoint? ``lavise trajectory`` on a series, against one probe pass
and against one ``layers`` dissection from disk, side by side in one run on the same machine.

The series is the demo CNN's card repeated ``--copies`` times (the cost of a checkpoint does not depend on its
weights; a real series comes from ``lavise train-demo --save-every N``). Reported:

- one probe pass: ``run_probe`` of the same model over the whole data set into a temporary bundle
  (``num_workers=0``, top-k 16), the pass every bundle starts with;
- one ``layers`` dissection of the same checkpoint (:func:`dissect_layers`: images read from disk, thresholds
  pass + IoU pass, no re-initialised baseline);
- the trajectory: the shared loading once, and the seconds per checkpoint (thresholds, IoU and test passes over
  the cached tensors, every layer recorded at once).

    python bench/trajectory.py [--model models/synthbirds_cnn.json] [--data data/synthbirds] [--copies 3]

Nothing is written under data/ or models/.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/synthbirds_cnn.json")
    ap.add_argument("--data", default="data/synthbirds")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    import torch

    from lavise_core.data.dataset import ProbeDataset, fit_indices
    from lavise_core.explain.dissection.layers import dissect_layers, dissection_layers
    from lavise_core.explain.dissection.trajectory import dissect_series
    from lavise_core.models.networks import load_model
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    torch.set_num_threads(args.threads)
    ds = ProbeDataset.open(Path(args.data))
    lm = load_model(args.model)
    print(f"{args.model} on {args.data} ({len(ds)} images), {args.threads} torch threads")

    with tempfile.TemporaryDirectory() as tmp:
        t = time.perf_counter()
        bundle = open_or_create_bundle(Path(tmp), lm, ds)
        run_probe(bundle, lm, ds, ProbeSettings(batch_size=32, num_workers=0, progress=False))
        probe = time.perf_counter() - t
    print(f"one probe pass ({len(ds)} images):            {probe:7.1f} s")

    fit = np.array([int(i) for i in fit_indices(ds) if ds.records[int(i)].mask])
    pick = np.sort(np.random.default_rng(0).choice(fit, min(640, len(fit)), replace=False))
    t = time.perf_counter()
    dissect_layers(lm, ds, dissection_layers(lm), pick, batch_size=32)
    layers = time.perf_counter() - t
    print(
        f"one layers dissection from disk ({len(pick)} images): {layers:7.1f} s  ({layers / probe:.2f} probe passes)"
    )

    t = time.perf_counter()
    r = dissect_series([args.model] * args.copies, ds)
    total = time.perf_counter() - t
    per = [c["seconds"] for c in r["checkpoints"]]
    mean = sum(per) / len(per)
    print(
        f"trajectory of {args.copies} checkpoints: {total:.1f} s in all; shared loading {r['seconds_shared']:.1f} s "
        f"({r['seconds_shared'] / probe:.2f} probe passes, once); per checkpoint "
        f"{', '.join(f'{s:.1f}' for s in per)} s = {mean / probe:.2f} probe passes each "
        f"({r['images']} dissection images + {r['test_images']} test images, {len(r['layers'])} layers)"
    )
    print(f"amortised over the series: {total / args.copies / probe:.2f} probe passes per checkpoint")


if __name__ == "__main__":
    main()
