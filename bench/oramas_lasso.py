"""The Oramas stage's μ-lasso on a bundle's energies: every class solved one after another (the method as
written) against :func:`~lavise_core.explain.oramas.class_paths` (classes the network never predicts on these
images skipped, the rest in threads), side by side in one run, with the paths checked equal.

The bundle needs the ``oramas`` stage (its ``oramas/energy``) and ``probe/logits``. On EfficientNet-Lite0 most
of the 1,000 ImageNet classes are never predicted on a probe set, which is where the time went.

    python bench/oramas_lasso.py BUNDLE_DIR [--split fit|train]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    args = ap.parse_args()

    from lavise_core.explain import oramas as O
    from lavise_core.pipeline.bundle import Bundle

    b = Bundle.open(args.bundle)
    X = np.asarray(b.array("oramas/energy"))
    pred = np.asarray(b.array("probe/logits")).argmax(1)
    K = int(np.asarray(b.array("probe/logits")).shape[1])
    n_train = int(b.read_json("oramas/info")["n_train"])
    X, pred = X[:n_train], pred[:n_train]  # about the size of one of the stage's two fits
    print(
        f"load average {os.getloadavg()[0]:.2f}; X {X.shape}, {K} classes, {len(np.unique(pred))} predicted"
    )

    t = time.perf_counter()
    fast = O.class_paths(X, pred, K)
    t_fast = time.perf_counter() - t
    t = time.perf_counter()
    naive = [O.lasso_path_positive(X, (pred == c).astype(np.float64)) for c in range(K)]
    t_naive = time.perf_counter() - t
    equal = all(np.array_equal(a, c) for a, c in zip(fast, naive, strict=True))
    res = {
        "images": int(X.shape[0]), "features": int(X.shape[1]), "classes": K,
        "predicted_classes": len(np.unique(pred)),
        "every_class_in_turn_s": round(t_naive, 1), "class_paths_s": round(t_fast, 1),
        "ratio": round(t_fast / t_naive, 3), "paths_equal": equal,
        "load_average": round(os.getloadavg()[0], 2),
    }  # fmt: skip
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
