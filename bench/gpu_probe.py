"""The probe pass on a GPU vs a bare forward pass of the same model, side by side in one run.

GPU path (``--device cuda``): channels-last weights and inputs, the forward pass under autocast (bfloat16 where
supported, else float16), pooled values, top-k and histograms accumulated in float32, a pinned-memory loader
with decoding workers. The bare pass reads the same loader and runs the same autocast forward, nothing else.
Prints images/s of both and their ratio (the probe's bookkeeping overhead on a GPU), plus the float32 CPU pass
on a few images for the mixed-precision error. Exits 0 with a message when no GPU is present.

    python bench/gpu_probe.py [--model efficientnet_lite0] [--n 2048] [--batch-size 128] [--workers 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import photo_crops_dataset

from lavise_core.data.dataset import ProbeDataset
from lavise_core.models.networks import load_model
from lavise_core.pipeline.probe import (
    ProbeImages,
    ProbeSettings,
    autocast_forward,
    collate_batch,
    open_or_create_bundle,
    prepare_device,
    run_probe,
)


def bare_pass(lm, ds: ProbeDataset, st: ProbeSettings) -> float:
    dev = torch.device(st.device)
    loader = DataLoader(ProbeImages(ds, lm, 0), batch_size=st.batch_size, num_workers=st.num_workers,
                        collate_fn=collate_batch, pin_memory=True)  # fmt: skip
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        for _idx, x, _err in loader:
            with autocast_forward(dev, True):
                lm.model(x.to(dev, non_blocking=True, memory_format=torch.channels_last))
    torch.cuda.synchronize()
    return time.perf_counter() - t0


def probe_pass(lm, ds: ProbeDataset, st: ProbeSettings, keep: Path | None = None) -> float:
    tmp = keep or Path(tempfile.mkdtemp(prefix="lavise-gpu-bench-"))
    try:
        bundle = open_or_create_bundle(tmp, lm, ds)
        torch.cuda.synchronize() if st.device.startswith("cuda") else None
        t0 = time.perf_counter()
        run_probe(bundle, lm, ds, st)
        return time.perf_counter() - t0
    finally:
        if keep is None:
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--data", type=Path, default=None, help="probe data set (default: photo crops)")
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--workers", type=int, default=8, help="image-decoding workers of the pinned loader")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("gpu_probe: no CUDA GPU here (torch.cuda.is_available() is False); skipped")
        return 0
    ds = (
        ProbeDataset.open(args.data)
        if args.data
        else photo_crops_dataset(Path("data/cache/bench-crops"), args.n)
    )
    ds = dataclasses.replace(ds, records=ds.records[: args.n])
    lm = load_model(args.model)
    st = ProbeSettings(batch_size=args.batch_size, num_workers=args.workers, device="cuda", progress=False)
    prepare_device(lm, torch.device("cuda"))
    bare_pass(lm, ds, st)  # warm-up: cuDNN autotuning, page cache, allocator
    bare, probe = [], []
    for _ in range(args.repeats):
        bare.append(bare_pass(lm, ds, st))
        probe.append(probe_pass(lm, ds, st))
    b, p = statistics.median(bare), statistics.median(probe)
    print(f"{torch.cuda.get_device_name()}: {args.model}, {len(ds)} images, batch {args.batch_size}, "
          f"{args.workers} loader workers")  # fmt: skip
    print(f"bare forward (autocast) : {len(ds) / b:8.1f} img/s  runs {[round(x, 2) for x in bare]}")
    print(f"probe pass  (GPU path)  : {len(ds) / p:8.1f} img/s  runs {[round(x, 2) for x in probe]}")
    print(f"ratio probe / bare      : {p / b:.3f}")
    # mixed precision error against the float32 CPU pass on the first 64 images
    few = dataclasses.replace(ds, records=ds.records[:64])
    tmp = Path(tempfile.mkdtemp(prefix="lavise-gpu-bench-"))
    try:
        probe_pass(lm, few, dataclasses.replace(st, batch_size=32), tmp / "gpu")
        lm.model.to("cpu", memory_format=torch.contiguous_format)
        probe_pass(lm, few, ProbeSettings(batch_size=32, num_workers=0, progress=False), tmp / "cpu")
        g = open_or_create_bundle(tmp / "gpu", lm, few)
        c = open_or_create_bundle(tmp / "cpu", lm, few)
        pg, pc = np.asarray(g.array("probe/pooled")), np.asarray(c.array("probe/pooled"))
        rel = float(np.abs(pg - pc).max() / max(np.abs(pc).max(), 1e-12))
        agree = float(
            (
                np.asarray(g.array("probe/logits")).argmax(1) == np.asarray(c.array("probe/logits")).argmax(1)
            ).mean()
        )
        print(
            f"autocast vs float32 CPU (64 images): pooled max rel error {rel:.2e}, same top-1 class {agree:.1%}"
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
