"""Explaining one uploaded image vs a bare forward pass of the same model, side by side in one run.

Both start from the uploaded bytes (JPEG) and decode + preprocess them the same way. The bare path runs
the model; the explain path runs it with the layer hook (``forward_maps``), pools the maps, computes the
image-class attribute p.d.f. and its sentence (eq. 5–6) and grounds the top attribute at the input size
(eq. 9). The textual state (p.d.f. ``(C, T)``, classifier ``(K, C)``) is a synthetic one of realistic
size unless ``--bundle`` gives a built bundle; with a bundle that has the ``ood`` stage the explain path also
records the early layers in the same forward pass and runs the out-of-distribution check (issue 16).
Target (issue 4): explain <= 1.2 × bare + 20 ms.

    python bench/explain_upload.py [--model efficientnet_lite0] [--bundle PATH] [--repeats 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import io
import statistics
import time

import numpy as np
import torch

from lavise_core.data.images import load_image
from lavise_core.data.samples import sample_photo
from lavise_core.explain.textual.explainer import TextualExplainer
from lavise_core.models.networks import forward_maps, load_model


def synthetic_explainer(lm, n_attributes: int, seed: int = 0) -> TextualExplainer:
    """A textual state of the model's real shapes with a random p.d.f. (the cost does not depend on values)."""
    w, _ = lm.classifier_weights()
    k, c = w.shape
    rng = np.random.default_rng(seed)
    pdf = rng.random((c, n_attributes)).astype(np.float32)
    pdf /= pdf.sum(1, keepdims=True)
    prior = np.full(n_attributes, 1 / n_attributes, np.float32)
    vocab = [f"adj{j % 97} noun{j // 97}" for j in range(n_attributes)]
    class_pdf = np.full((k, n_attributes), 1 / n_attributes, np.float32)
    return TextualExplainer(vocab, prior, pdf, class_pdf, w, list(lm.class_names))


def bare(lm, data: bytes) -> float:
    t0 = time.perf_counter()
    x = lm.preprocess(load_image(data)).unsqueeze(0)
    with torch.no_grad(), lm.lock:
        lm.model(x)
    return time.perf_counter() - t0


def explain(lm, ex: TextualExplainer, data: bytes, layer: str, ood=None) -> tuple[float, str]:
    t0 = time.perf_counter()
    x = lm.preprocess(load_image(data)).unsqueeze(0)
    if ood is None:
        maps, logits = forward_maps(lm, x, layer)
        phi = maps[0].float().mean(dim=(1, 2)).cpu().numpy()
    else:
        from lavise_core.explain.ood import forward_with_ood

        maps, logits, early = forward_with_ood(lm, x, layer, ood.early_layers)
        phi = maps[0].float().mean(dim=(1, 2)).cpu().numpy()
        ood.verdict(phi, None if early is None else early[0])
    e = ex.explain(phi, logits[0].cpu().numpy())
    ex.ground(maps[0], e.attributes[0][0], (lm.input_size, lm.input_size))
    return time.perf_counter() - t0, e.sentence


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument(
        "--bundle", default=None, help="a built bundle (textual stage done) instead of synthetic state"
    )
    ap.add_argument("--attributes", type=int, default=2000, help="vocabulary size of the synthetic state")
    ap.add_argument("--photo", default="chelsea")
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ood = None
    if args.bundle:
        from lavise_core.pipeline.bundle import Bundle

        b = Bundle.open(args.bundle)
        lm, ex, layer = b.load_model(), TextualExplainer.from_bundle(b), b.layer
        if b.has("ood/bank"):
            from lavise_core.explain.ood import OODModel

            ood = OODModel.from_bundle(b)
    else:
        lm = load_model(args.model)
        ex, layer = synthetic_explainer(lm, args.attributes), lm.default_layer
    buf = io.BytesIO()
    sample_photo(args.photo).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    for _ in range(3):  # warm-up: allocator, kernels, lazy imports
        bare(lm, data)
        explain(lm, ex, data, layer, ood)
    tb, te = [], []
    sentence = ""
    for r in range(args.repeats):  # interleaved, order alternating, so that machine load hits both alike
        if r % 2:
            tb.append(bare(lm, data))
        t, sentence = explain(lm, ex, data, layer, ood)
        te.append(t)
        if not r % 2:
            tb.append(bare(lm, data))
    # the textual part alone (after the forward pass): pooling, eq. 5-6, sentence, eq. 9 at input size
    x = lm.preprocess(load_image(data)).unsqueeze(0)
    maps, logits = forward_maps(lm, x, layer)
    tt = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        phi = maps[0].float().mean(dim=(1, 2)).cpu().numpy()
        e = ex.explain(phi, logits[0].cpu().numpy())
        ex.ground(maps[0], e.attributes[0][0], (lm.input_size, lm.input_size))
        tt.append(time.perf_counter() - t0)
    b_ms, e_ms = 1000 * statistics.median(tb), 1000 * statistics.median(te)
    target = 1.2 * b_ms + 20
    c, t = ex.pdf.shape
    print(
        f"model {lm.name}, layer {layer}, C={c}, T={t}, K={len(ex.class_names)}, torch threads {torch.get_num_threads()}"
        + (f", OOD check with early layers {ood.early_layers}" if ood is not None else ", no OOD check")
    )
    print(f"bare forward    : median {b_ms:7.1f} ms  (min {1000 * min(tb):.1f})")
    print(f"explain + ground: median {e_ms:7.1f} ms  (min {1000 * min(te):.1f})")
    print(
        f"overhead        : {e_ms - b_ms:+.1f} ms, ratio {e_ms / b_ms:.3f}; target <= {target:.1f} ms: "
        f"{'met' if e_ms <= target else 'NOT met'}"
    )
    print(
        f"textual part    : median {1000 * statistics.median(tt):7.2f} ms (pool + eq. 5-6 + sentence + eq. 9)"
    )
    print(f"sentence        : {sentence[:120]}")


if __name__ == "__main__":
    main()
