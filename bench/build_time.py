"""Each stage of the default build as a ratio to a bare forward pass over the same probe images, in one run.

The bare pass decodes and preprocesses every probe image and runs the network once (no hook, nothing kept):
the one pass over the images a build cannot avoid. Then ``lavise build`` makes the default bundle in a fresh
folder, and each stage's seconds (recorded in ``bundle.json``) are printed beside that pass. ``--cold`` also
starts from an empty vocabulary cache, as a fresh machine does (the LaViSE stage then embeds the general
vocabulary; the build starts that in the background at its first stage).
Target (issue 27): the whole default build ≤ 2.5 min on this 2-core machine.

    python bench/build_time.py [--model synthbirds] [--data data/synthbirds] [--cold]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def bare_pass(model: str, data: str, batch_size: int = 64) -> float:
    """Seconds for decode + preprocess + one forward pass over every probe image."""
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.models.networks import load_model
    from lavise_core.pipeline.probe import image_batches

    ds, lm = ProbeDataset.open(data), load_model(model)
    t0 = time.perf_counter()
    with torch.no_grad():
        for _, x, _ in image_batches(ds, lm, range(len(ds)), batch_size):
            lm.model(x)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="synthbirds")
    ap.add_argument("--data", default=str(ROOT / "data" / "synthbirds"))
    ap.add_argument("--cold", action="store_true", help="an empty vocabulary cache, as on a fresh machine")
    args = ap.parse_args()
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    bare = bare_pass(args.model, args.data)
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if args.cold:
            env["LAVISE_CACHE"] = str(Path(tmp) / "cache")
        cmd = [sys.executable, "-m", "lavise_core.cli", "build", "--model", args.model, "--data", args.data,
               "--bundles", str(Path(tmp) / "bundles"), "--quiet"]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        total = time.perf_counter() - t0
        manifest = json.loads(next((Path(tmp) / "bundles").glob("*/bundle.json")).read_text())
    from lavise_core.stages import REGISTRY

    done = manifest["stages"]
    stages = {s.name: done[s.name]["seconds"] for s in REGISTRY if "seconds" in done.get(s.name, {})}
    print(f"bare forward pass over the probe images: {bare:6.1f} s (1.00)")
    for name, sec in stages.items():
        print(f"  {name:18s} {sec:6.1f} s  {sec / bare:5.2f}× the bare pass")
    print(f"whole build (wall, start-up included): {total:6.1f} s  {total / bare:5.2f}×   target 150 s")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
