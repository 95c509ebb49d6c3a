"""Server-side time per dashboard interaction on a warm bundle (AppTest runs timed in one process).

Targets: ≤ 150 ms for the filter and concept pages, ≤ 400 ms for explaining an upload (CPU).
Usage: python bench/ui_latency.py [--repeats 15]  (uses the small test bundles of tests/app_bundles.py,
or LAVISE_BUNDLES if set).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))


def _stats(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return f"median {1000 * statistics.median(xs):7.1f} ms   p95 {1000 * p95:7.1f} ms   (n={len(xs)})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    if "LAVISE_BUNDLES" not in os.environ:
        from app_bundles import build_app_bundles

        b = build_app_bundles()
        os.environ["LAVISE_BUNDLES"] = str(b.bundles)
        probe_png = (b.data / "images").glob("*.png").__next__().read_bytes()
    else:
        import io

        from lavise_core.samples import sample_photo

        buf = io.BytesIO()
        sample_photo("chelsea").save(buf, "PNG")
        probe_png = buf.getvalue()
    from streamlit.testing.v1 import AppTest

    def fresh(page: str) -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.run()
        at.switch_page(page).run()
        return at

    results: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        fn()  # warm
        xs = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t)
        results[name] = xs

    at = fresh("app_pages/filters.py")
    ks = iter(range(10_000))
    timed("filters: open a filter (?filter=K)", lambda: (at.query_params.__setitem__("filter", str(next(ks) % 64)), at.run()))
    at2 = fresh("app_pages/filters.py")
    timed("filters: grid rerun (sort/filter)", lambda: at2.run())
    at3 = fresh("app_pages/concepts.py")
    words = iter(["red wing", "striped tail", "blue crown", "grass", "water", "hooked beak", "spotted breast", "yellow belly"] * 100)
    timed("concepts: type a concept", lambda: at3.text_input(key="concept_text").input(next(words)).run())
    at4 = fresh("app_pages/explain.py")
    n = iter(range(10_000))
    timed("explain: upload an image (new bytes each time)", lambda: at4.file_uploader[0].upload(f"x{next(n)}.png", probe_png + next(n).to_bytes(4, "big"), "image/png").run())
    timed("explain: rerun on the same upload (cached pass)", lambda: at4.run())
    for name, xs in results.items():
        print(f"{name:50s} {_stats(xs)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
