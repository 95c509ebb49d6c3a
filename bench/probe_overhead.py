"""Probe pass vs a bare forward pass of the same model on the same images, side by side in one run.

Both read the images through the same loader (decode + preprocess, same batch size and workers);
the probe pass adds the layer hook, the pooled matrix, top-k maps, histograms and its checkpoints.
Target (issue 2): probe / bare <= 1.15.

    python bench/probe_overhead.py [--model efficientnet_lite0] [--n 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photo_crops_dataset

from lavise_core.data.dataset import ProbeDataset
from lavise_core.models.networks import load_model
from lavise_core.pipeline.probe import (
    ProbeImages,
    ProbeSettings,
    collate_batch,
    open_or_create_bundle,
    run_probe,
)


def bare_pass(lm, ds: ProbeDataset, settings: ProbeSettings) -> float:
    loader = DataLoader(
        ProbeImages(ds, lm, 0),
        batch_size=settings.batch_size,
        num_workers=settings.num_workers,
        collate_fn=collate_batch,
    )
    t0 = time.perf_counter()
    with torch.no_grad():
        for _idx, x, _err in loader:
            lm.model(x)
    return time.perf_counter() - t0


def probe_pass(lm, ds: ProbeDataset, settings: ProbeSettings) -> float:
    tmp = Path(tempfile.mkdtemp(prefix="lavise-bench-"))
    try:
        bundle = open_or_create_bundle(tmp, lm, ds)
        t0 = time.perf_counter()
        run_probe(bundle, lm, ds, settings)
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--data", type=Path, default=None, help="probe data set (default: photo crops)")
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    ds = (
        ProbeDataset.open(args.data)
        if args.data
        else photo_crops_dataset(Path("data/cache/bench-crops"), args.n)
    )
    lm = load_model(args.model)
    settings = ProbeSettings(batch_size=args.batch_size, progress=False)
    bare_pass(lm, ds, settings)  # warm-up: page cache, allocator, kernels
    bare, probe = [], []
    for _ in range(args.repeats):  # interleaved so that machine load hits both alike
        bare.append(bare_pass(lm, ds, settings))
        probe.append(probe_pass(lm, ds, settings))
    b, p = statistics.median(bare), statistics.median(probe)
    print(
        f"model {args.model}, {len(ds)} images, batch {args.batch_size}, torch threads {torch.get_num_threads()}"
    )
    print(
        f"bare forward pass : median {b:7.2f} s  ({len(ds) / b:6.1f} img/s)  runs {[round(x, 2) for x in bare]}"
    )
    print(
        f"probe pass        : median {p:7.2f} s  ({len(ds) / p:6.1f} img/s)  runs {[round(x, 2) for x in probe]}"
    )
    print(f"ratio probe/bare  : {p / b:.3f}  (target <= 1.15)")


if __name__ == "__main__":
    main()
