"""The probe pass on a local 2-worker Ray cluster vs the single-process pass, side by side in one run.

Single process: ``run_probe`` as ``lavise build`` runs it (one decoding worker, torch's default threads).
Ray: ``ray.init(num_cpus=2)`` (started once, timed apart: a real cluster is already up), then the same pass as
Ray Data batch inference with 2 actors of 1 CPU each, their shards merged into the bundle. The Ray time counts
everything from submitting the pass to the written bundle: shipping the model, starting the actors, the merge.
Targets (issue 14): Ray throughput >= 0.8 × single process; merge <= 5 % of the Ray pass. Also checks the two
bundles are equal (top_index and thresholds identical, pooled max abs diff).

    flock /work/notes/heavy.lock nice -n 5 python bench/ray_probe.py [--model synthbirds] [--n 4800]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from lavise_core.data.dataset import ProbeDataset
from lavise_core.models.networks import load_model
from lavise_core.pipeline.executor import ExecutorSettings
from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe, run_probe_sharded


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthbirds")
    ap.add_argument("--data", type=Path, default=Path("data/synthbirds"))
    ap.add_argument("--n", type=int, default=4800, help="first N images of the data set")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="Ray actors (and CPUs of the local cluster)")
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ds = ProbeDataset.open(args.data)
    ds = dataclasses.replace(ds, records=ds.records[: args.n])
    lm = load_model(args.model)
    st = ProbeSettings(batch_size=args.batch_size, num_workers=1, progress=False)
    tmp = Path(tempfile.mkdtemp(prefix="lavise-ray-bench-"))
    try:
        print(
            f"{args.model} on {len(ds)} images of {args.data}, batch {args.batch_size}, {os.cpu_count()} cores"
        )
        single = open_or_create_bundle(tmp / "single", lm, ds)
        t0 = time.perf_counter()
        run_probe(single, lm, ds, st)
        t_single = time.perf_counter() - t0
        print(
            f"single process ({torch.get_num_threads()} threads): {t_single:6.1f} s  {len(ds) / t_single:6.1f} img/s"
        )

        t0 = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        t_start = time.perf_counter() - t0
        try:
            dist = open_or_create_bundle(tmp / "ray", lm, ds)
            ex = ExecutorSettings(kind="ray", workers=args.workers)
            first: list[tuple[float, int]] = []  # (time, rows) when the first shard came back

            def seen(done: int, total: int) -> None:
                if not first:
                    first.append((time.perf_counter(), done))

            t0 = time.perf_counter()
            run_probe_sharded(dist, lm, ds, st, ex, on_progress=seen)
            t_ray = time.perf_counter() - t0
            steady = (len(ds) - first[0][1]) / (t0 + t_ray - first[0][0])
        finally:
            ray.shutdown()
        merge = dist.manifest["stages"]["probe"]["merge_seconds"]
        print(f"Ray, {args.workers} actors:           {t_ray:6.1f} s  {len(ds) / t_ray:6.1f} img/s  "
              f"(cluster start {t_start:.1f} s, not counted)")  # fmt: skip
        print(f"  rows after the first shard / time after it (shards in flight counted: overstated): {steady:6.1f} img/s  "
              f"(first shard back after {first[0][0] - t0:.1f} s)")  # fmt: skip
        ratio = t_single / t_ray
        print(f"throughput Ray / single: {ratio:.2f}  (target >= 0.8)  {'OK' if ratio >= 0.8 else 'MISSED'}")
        print(f"merge: {merge:.2f} s = {100 * merge / t_ray:.1f} % of the Ray pass  (target <= 5 %)  "
              f"{'OK' if merge <= 0.05 * t_ray else 'MISSED'}")  # fmt: skip
        same_top = np.array_equal(single.array("probe/top_index"), dist.array("probe/top_index"))
        same_thr = np.array_equal(single.array("probe/threshold"), dist.array("probe/threshold"))
        diff = float(np.abs(np.asarray(single.array("probe/pooled")) - dist.array("probe/pooled")).max())
        print(f"equal bundles: top_index {same_top}, thresholds {same_thr}, pooled max abs diff {diff:.2e}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
