"""Attribution speed, side by side in one run (issue 11 targets).

1. Grad-CAM time / bare forward + backward, against torchcam's GradCAM / the same bare pass, on the same model and
   input (torchvision ResNet-18 without weights at 224 px, batch 1, and the demo CNN at 128 px). Target: our ratio
   no worse than torchcam's. "Bare" = ``model(x)[0, c].backward()`` on the model as torchvision builds it (trainable
   parameters), which is what torchcam runs; ours freezes the parameters for the call and differentiates only from
   the layer up (see lavise_core/explain/attribution/cam.py).
2. SmoothGrad with 25 samples / 25 noisy copies through one batched forward + backward to the input, both on
   the frozen network (parameters without gradients). Target <= 1.2.
3. The Explain page's default method (Grad-CAM, predicted + runner-up class, overlays): the time
   ``views.where_it_looks`` adds per image on the demo bundle, p95 over test images. Target <= 50 ms.

    python bench/attribution.py [--repeats 15] [--threads 2] [--bundle data/bundles/<demo>]

Run it under the shared lock (flock /work/notes/heavy.lock ...); every run prints the load average.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from lavise_core.explain.attribution.cam import GradCAM  # noqa: E402
from lavise_core.explain.attribution.gradient import SmoothGrad  # noqa: E402
from lavise_core.models.networks import load_model  # noqa: E402

DEMO_BUNDLE = "data/bundles/synthbirds-synthbirds-features-3a8d15e0be5c8184"


def timed(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def ms(xs: list[float]) -> str:
    return f"median {1000 * statistics.median(xs):8.1f} ms  p95 {1000 * p95(xs):8.1f} ms"


def gradcam_vs_torchcam(model: torch.nn.Module, layer: str, size: int, repeats: int) -> dict:
    from torchcam.methods import GradCAM as TorchcamGradCAM

    model.eval()
    for p in model.parameters():
        p.requires_grad_(True)  # as torchvision builds it (what torchcam expects)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c = int(model(x).argmax())

    def bare() -> None:
        model.zero_grad(set_to_none=True)
        model(x)[0, c].backward()

    ours = GradCAM(model, layer=layer)
    logging.disable(logging.WARNING)
    extractor = TorchcamGradCAM(model, target_layer=layer)

    def theirs() -> None:
        model.zero_grad(set_to_none=True)
        scores = model(x)
        extractor(c, scores)

    # interleave the three so load drifts hit them alike
    tb, to, tt = [], [], []
    for fn in (bare, lambda: ours.attribute(x, c), theirs):
        fn()
    for _ in range(repeats):
        for fn, acc in ((bare, tb), (lambda: ours.attribute(x, c), to), (theirs, tt)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    extractor.remove_hooks()
    logging.disable(logging.NOTSET)
    b, o, t = statistics.median(tb), statistics.median(to), statistics.median(tt)
    return {"bare": b, "ours": o, "torchcam": t, "ours_ratio": o / b, "torchcam_ratio": t / b}


def smoothgrad_vs_batched(model: torch.nn.Module, size: int, repeats: int, n: int = 25) -> dict:
    model.eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        c = int(model(x).argmax())
    sg = SmoothGrad(model, n_samples=n, batch_size=n)

    def bare() -> None:
        xs = (x.repeat(n, 1, 1, 1) + 0.1 * torch.randn(n, 3, size, size)).requires_grad_(True)
        (g,) = torch.autograd.grad(model(xs)[:, c].sum(), xs)
        g.mean(0)

    tb, ts = [], []
    bare()
    sg.attribute(x, c)
    for _ in range(repeats):
        for fn, acc in ((bare, tb), (lambda: sg.attribute(x, c), ts)):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    b, s = statistics.median(tb), statistics.median(ts)
    return {"bare": b, "smoothgrad": s, "ratio": s / b}


def page_latency(bundle: str, n_images: int) -> list[float]:
    from lavise_core import views
    from lavise_core.pipeline.bundle import Bundle

    b = Bundle.open(bundle)
    ws = views.Workspace(b, model_loader=lambda: b.load_model())
    ds = ws.dataset()
    idx = [int(i) for i in ds.indices("test")[:n_images]]
    analyses = [views.analyse_image(ws, ds.load_image(i)) for i in idx]
    views.where_it_looks(ws, analyses[0], [views.DEFAULT_METHOD])  # warm-up
    out = []
    for a in analyses:
        t0 = time.perf_counter()
        views.where_it_looks(ws, a, [views.DEFAULT_METHOD])
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--bundle", default=DEMO_BUNDLE)
    ap.add_argument("--page-images", type=int, default=60)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    from torchvision.models import resnet18

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, load average {os.getloadavg()}")
    demo = load_model("synthbirds")
    cases = [
        ("ResNet-18 224 px", resnet18(weights=None), "layer4", 224),
        ("demo CNN 128 px", demo.model, "features", 128),
    ]
    for name, model, layer, size in cases:
        r = gradcam_vs_torchcam(model, layer, size, args.repeats)
        print(
            f"Grad-CAM {name:17s}: bare fwd+bwd {1000 * r['bare']:7.1f} ms | ours {1000 * r['ours']:7.1f} ms "
            f"({r['ours_ratio']:.2f}x bare) | torchcam {1000 * r['torchcam']:7.1f} ms ({r['torchcam_ratio']:.2f}x bare)"
        )
    for _, model, _, _ in cases:  # SmoothGrad's baseline: the frozen network, gradients to the input only
        for p in model.parameters():
            p.requires_grad_(False)
    for name, model, size in (("ResNet-18 224 px", cases[0][1], 224), ("demo CNN 128 px", demo.model, 128)):
        r = smoothgrad_vs_batched(model, size, max(5, args.repeats // 2))
        print(
            f"SmoothGrad-25 {name:12s}: 25 batched fwd+bwd {1000 * r['bare']:7.1f} ms | ours "
            f"{1000 * r['smoothgrad']:7.1f} ms ({r['ratio']:.2f}x)"
        )
    if Path(args.bundle).is_dir():
        xs = page_latency(args.bundle, args.page_images)
        print(
            f"Explain page 'Where does it look?' (Grad-CAM, 2 classes, overlays) on the demo bundle: {ms(xs)} (n={len(xs)})"
        )
    else:
        print(f"no bundle at {args.bundle}: page latency skipped")
    print(f"load average after {os.getloadavg()}")


if __name__ == "__main__":
    main()
