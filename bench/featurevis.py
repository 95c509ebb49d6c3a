"""One filter's feature visualisation (256 Adam steps): the demo CNN at 128 px and EfficientNet-Lite0 at 224 px.

Per model: median wall time of ``--repeats`` runs of :func:`lavise_core.explain.featurevis.visualisation` for one
filter of the default layer, beside the cost of the same number of bare forward + backward passes of the
network on a fixed input, and their ratio. The ratio is the stable number on a shared machine: the bare network's
own time moves by half between quiet and busy minutes. ``visualise`` runs a private copy of the network with the
batch norms folded into the convolutions, channels-last weights and only the visualised filter's channel of the
layer's last convolution (about 0.6 of the bare network's time), so the ratio can fall below 1; what it adds is the
prior (FFT, colour, sigmoid: one autograd node), the random warp (row bands, one per thread) and one fused Adam step.
Target (issue 12): demo CNN <= 2 s on 2 cores. Run under the heavy lock:

    flock /work/notes/heavy.lock python bench/featurevis.py [--threads 2] [--repeats 3] [--models synthbirds efficientnet_lite0]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from lavise_core.explain.featurevis.visualisation import VisSettings, visualise
from lavise_core.models.networks import load_model

SIZES = {"synthbirds": 128, "efficientnet_lite0": 224}


def bare_steps(lm, size: int, steps: int) -> float:
    """Seconds for ``steps`` forward + backward passes of the whole network on one fixed input."""
    x = torch.zeros(1, 3, size, size, requires_grad=True)
    t0 = time.perf_counter()
    for _ in range(steps):
        lm.model(x)[0, 0].backward()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="*", default=["synthbirds", "efficientnet_lite0"])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=256)
    ap.add_argument("--filter", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}, {args.steps} steps, one filter, median of {args.repeats}")
    for spec in args.models:
        lm = load_model(spec)
        size = SIZES.get(spec, lm.input_size)
        settings = VisSettings(steps=args.steps, size=size)
        visualise(lm, args.filter, settings=VisSettings(steps=2, size=size))  # warm-up
        times, floors = [], []
        for _ in range(args.repeats):  # interleaved, so both see the same load on a shared machine
            t0 = time.perf_counter()
            v = visualise(lm, args.filter, settings=settings)
            times.append(time.perf_counter() - t0)
            floors.append(bare_steps(lm, size, args.steps))
        vis, bare = statistics.median(times), statistics.median(floors)
        print(
            f"{spec:20s} {size} px  visualise {vis:6.2f} s  "
            f"(bare forward+backward x{args.steps}: {bare:6.2f} s; ratio {vis / bare:.2f})  "
            f"phi_k = {float(v.objective[0]):.3g} (layer {v.layer})"
        )


if __name__ == "__main__":
    main()
