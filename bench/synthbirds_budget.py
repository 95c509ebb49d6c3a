"""Budget check for issue 3: generate the default SynthBirds set and train the demo CNN in one process.

Prints the seconds of each stage, the accuracies and the machine load. Target: generate + train
<= 600 s on the 2-core machine, test accuracy >= 0.95, one-part pairs >= 0.85.

Usage: python bench/synthbirds_budget.py [--work /tmp/sb_budget] [--n N] [--epochs E] [--skip-generate]
       [--models DIR]   (write the checkpoint + card there, e.g. models/, instead of the work dir)
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from lavise_core.data.synthbirds import DEFAULT_N, generate_synthbirds
from lavise_core.models.demo_cnn import DEFAULT_EPOCHS, train_demo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/sb_budget", help="scratch directory")
    ap.add_argument("--n", type=int, default=DEFAULT_N)
    ap.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workers", type=int, default=2, help="generator processes (as `make demo` uses)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--skip-generate", action="store_true", help="reuse the data set in --work")
    ap.add_argument("--models", default=None, help="where to write the checkpoint (default: WORK/models)")
    ap.add_argument("--progress", action="store_true")
    args = ap.parse_args()
    work = Path(args.work)
    data = work / "synthbirds"
    load0 = os.getloadavg()
    t0 = time.perf_counter()
    if not args.skip_generate:
        generate_synthbirds(data, n=args.n, seed=args.seed, progress=args.progress, workers=args.workers)
    t1 = time.perf_counter()
    card = train_demo(
        data,
        Path(args.models) if args.models else work / "models",
        seed=args.seed,
        epochs=args.epochs,
        progress=args.progress,
        threads=args.threads,
    )
    t2 = time.perf_counter()
    report = {
        "n": args.n,
        "epochs": args.epochs,
        "threads": args.threads,
        "generate_seconds": round(t1 - t0, 1),
        "train_seconds": round(t2 - t1, 1),
        "total_seconds": round(t2 - t0, 1),
        "test_accuracy": card["test_accuracy"],
        "one_part_pair_accuracy": card["one_part_pair_accuracy"],
        "pair_accuracy": card["pair_accuracy"],
        "per_class_accuracy": card["per_class_accuracy"],
        "loadavg_start": [round(x, 2) for x in load0],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "cpu_count": os.cpu_count(),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
