"""Benchmark: LaViSE explainer-head training seconds (torch threads = ``LaviseSettings.threads``: every core).

With a bundle (``--bundle PATH`` whose ``lavise/region_features`` exist) it retrains on the real region
features; otherwise on synthetic features of the given size (default: 20 000 regions, C = 1280 as
EfficientNet-Lite0, 60 seen concepts, d = 384). Early stopping is off (``val_fraction=0``) so that all
epochs run: the worst case. Target: <= 180 s.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from lavise_core.explain.lavise.head import train_head
from lavise_core.explain.lavise.settings import LaviseSettings


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--regions", type=int, default=20_000)
    ap.add_argument("--channels", type=int, default=1280)
    ap.add_argument("--concepts", type=int, default=60)
    ap.add_argument("--epochs", type=int, default=LaviseSettings().epochs)
    args = ap.parse_args()
    st = LaviseSettings(epochs=args.epochs, max_seconds=1e9, val_fraction=0.0)
    if args.bundle:
        from lavise_core.explain.lavise.head import RegionFeatures, training_targets
        from lavise_core.explain.lavise.index import ConceptIndex
        from lavise_core.pipeline.bundle import Bundle

        b = Bundle.open(args.bundle)
        rf = RegionFeatures.load(b)
        rows, y, used = training_targets(rf.concepts, b.read_json("lavise/split")["seen"])
        idx = ConceptIndex.load(b.root / "lavise")
        e = np.asarray(idx.embeddings[[idx.position(u) for u in used]], np.float32)
        x = rf.features[rows]
    else:
        rng = np.random.default_rng(0)
        lab = rng.integers(0, args.concepts, args.regions)
        x = rng.standard_normal((args.regions, args.channels)).astype(np.float32)
        y = np.eye(args.concepts, dtype=bool)[lab]
        e = rng.standard_normal((args.concepts, 384)).astype(np.float32)
    t = time.perf_counter()
    _, log = train_head(x, y, e, st)
    s = time.perf_counter() - t
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"head training: {x.shape[0]} regions × C={x.shape[1]}, {y.shape[1]} concepts, {log['epochs']} epochs: "
          f"{s:.1f} s ({s / log['epochs']:.2f} s/epoch), final loss {log['loss'][-1]:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
