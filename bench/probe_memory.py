"""Peak memory of the probe pass at N and at 4N images, each in a fresh process.

The pass keeps the (N, C) pooled matrix and (N, K) logits (memory-mapped) plus fixed-size top-k maps and
histograms, so the peak should grow by about 3·N·(C + K)·4 bytes from N to 4N and by nothing else.

    python bench/probe_memory.py [--model efficientnet_lite0] [--n 300]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(model: str, data: Path) -> None:
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.models.networks import load_model
    from lavise_core.pipeline.probe import ProbeSettings, open_or_create_bundle, run_probe

    ds = ProbeDataset.open(data)
    lm = load_model(model)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with tempfile.TemporaryDirectory() as tmp:
        b = open_or_create_bundle(Path(tmp), lm, ds)
        run_probe(b, lm, ds, ProbeSettings(progress=False, num_workers=0))
        c, k = b.manifest["channels"], len(b.classes)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"n": len(ds), "channels": c, "classes": k, "rss_before_kib": before, "peak_kib": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.child)
        return
    from _common import photo_crops_dataset

    rows = []
    for n in (args.n, 4 * args.n):
        data = Path(f"data/cache/bench-crops-{n}")
        photo_crops_dataset(data, n, size=160)
        out = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--child", str(data)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    a, b = rows
    grow = (b["peak_kib"] - a["peak_kib"]) / 1024
    expected = 3 * args.n * (a["channels"] + a["classes"]) * 4 / 2**20
    for r in rows:
        print(
            f"N = {r['n']:5d}: peak RSS {r['peak_kib'] / 1024:8.1f} MiB (before the pass {r['rss_before_kib'] / 1024:.1f} MiB)"
        )
    print(
        f"growth from N to 4N: {grow:.1f} MiB; the 3N more rows of pooled (N×{a['channels']}) + logits "
        f"(N×{a['classes']}) float32 are {expected:.1f} MiB"
    )


if __name__ == "__main__":
    main()
