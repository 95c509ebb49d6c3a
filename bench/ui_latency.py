"""Server-side time per dashboard interaction on a warm bundle (AppTest runs timed in one process), and the
cold start of the server to the first rendered page in headless Chromium.

Targets: ≤ 150 ms for the filter and concept pages, ≤ 400 ms for explaining an upload (CPU), ≤ 5 s cold start.
``--concepts-first N``: the first concept query on a fresh server, in headless Chromium, typed ``N`` seconds
after the first page was rendered (a visitor who reads the Overview first; 0 = straight to the Concepts page).
Usage: python bench/ui_latency.py [--repeats 15] [--bundles data/bundles] [--cold-start 3] [--concepts-first 20]
[--recompile]
(default bundles: the demo bundle when built, else the small test bundles of tests/app_bundles.py).
Every run prints the load average: on the shared 2-core machine, numbers are only comparable at similar load.
"""

from __future__ import annotations

import argparse
import io
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "tests" / "app")]


def _stats(xs: list[float], unit: float = 1000.0, name: str = "ms") -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return (
        f"median {unit * statistics.median(xs):7.1f} {name}   p95 {unit * p95:7.1f} {name}   "
        f"max {unit * xs[-1]:7.1f} {name}   (n={len(xs)})"
    )


def interactions(repeats: int, channels: int, recompile: bool = False) -> dict[str, list[float]]:
    """Seconds of each of ``repeats`` runs per interaction. AppTest compiles app.py and the page again on every run (a new
    ScriptCache per run); a server compiles them once. Unless ``recompile``, one ScriptCache serves every run,
    as on the server, so the numbers are the server's work and not the test harness's compile."""
    from streamlit.testing.v1 import AppTest, app_test

    if not recompile:
        shared = app_test.ScriptCache()
        app_test.ScriptCache = lambda: shared  # type: ignore[assignment,misc]

    from lavise_core.data.samples import SAMPLE_PHOTOS, sample_photo

    buf = io.BytesIO()
    sample_photo(next(iter(SAMPLE_PHOTOS))).save(buf, "PNG")
    photo = buf.getvalue()

    def fresh(page: str) -> AppTest:
        at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
        at.run()
        at.switch_page(page).run()
        return at

    results: dict[str, list[float]] = {}

    def timed(name: str, fn) -> None:
        fn()  # warm
        xs = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            xs.append(time.perf_counter() - t)
        results[name] = xs

    at = fresh("app_pages/filters.py")
    _wait_for_warm_up()
    ks = iter(range(1, 10_000))
    step = max(1, channels // (repeats + 2))
    timed(
        "filters: open a filter never opened before",
        lambda: (at.query_params.__setitem__("filter", str((next(ks) * step) % channels)), at.run()),
    )
    again = iter(range(10_000))
    timed(
        "filters: reopen a filter (cached overlays)",
        lambda: (at.query_params.__setitem__("filter", str((next(again) % 3) * step)), at.run()),
    )
    at2 = fresh("app_pages/filters.py")
    timed("filters: grid rerun (sort/filter)", lambda: at2.run())
    at3 = fresh("app_pages/concepts.py")
    words = ["red wing", "striped tail", "blue crown", "grass", "water", "hooked beak", "spotted breast"]
    new_words = iter([f"{w} {i}" if i else w for i in range(100) for w in words])
    timed(
        "concepts: type a new concept",
        lambda: at3.text_input(key="concept_text").input(next(new_words)).run(),
    )
    old_words = iter(words * 100)
    timed("concepts: type a concept again (cached)", lambda: at3.text_input(key="concept_text").input(next(old_words)).run())  # fmt: skip
    at4 = fresh("app_pages/explain.py")
    n = iter(range(10_000))
    timed(
        "explain: upload an image (new bytes each time)",
        lambda: at4.file_uploader[0].upload(f"x{next(n)}.png", photo + next(n).to_bytes(4, "big"), "image/png").run(),
    )  # fmt: skip
    timed("explain: rerun on the same upload (cached pass)", lambda: at4.run())
    return results


def _memory() -> str:
    """This process's resident memory now and at its peak, and how many objects the GC has frozen."""
    import gc
    import resource

    now = next(
        (
            ln.split()[1]
            for ln in Path("/proc/self/status").read_text().splitlines()
            if ln.startswith("VmRSS")
        ),
        "0",
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    frozen = gc.get_freeze_count()
    return f"RSS {int(now) / 1024:.0f} MiB (peak {peak / 1024:.0f} MiB) · {frozen} objects frozen (LAVISE_GC_FREEZE)"


def _wait_for_warm_up() -> None:
    """Wait for app.py's background warm-up (the sentence encoder, then ``freeze_warm_heap``) as a server that has
    served its first page for a while has: the interactions are timed on a warm server, not during the load."""
    import threading

    from lavise_core.views.serving import WARM_UP_THREAD

    for thread in threading.enumerate():
        if thread.name == WARM_UP_THREAD:
            thread.join()


def cold_start(reps: int, bundles: str) -> list[tuple[float, float]]:
    """``(server healthy, first page rendered)`` seconds after `streamlit run`, Chromium already running."""
    from playwright.sync_api import sync_playwright
    from test_browser import ARGS, CHROMIUM

    out = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        for _ in range(reps):
            t0 = time.perf_counter()
            proc, url = _serve(bundles)
            try:
                ready = time.perf_counter() - t0
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                page.goto(url)
                page.get_by_text("Filters in this layer").first.wait_for(state="visible", timeout=90_000)
                out.append((ready, time.perf_counter() - t0))
                page.close()
            finally:
                proc.terminate()
                proc.wait(10)
        browser.close()
    return out


def _serve(bundles: str) -> tuple[subprocess.Popen, str]:
    """A fresh ``streamlit run app.py`` on a free port, once healthy: ``(process, url)``."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, LAVISE_BUNDLES=bundles)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "streamlit"), "run", "app.py", "--server.port", str(port),
         "--server.headless", "true", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    while True:
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.05)


def concepts_first_query(bundles: str, delay: float, word: str = "water") -> float:
    """Seconds from submitting the first concept query of a fresh server to its answer's heading.

    The Overview is rendered first, then ``delay`` seconds pass (0: the Concepts page is the first page)."""
    from playwright.sync_api import sync_playwright
    from test_browser import ARGS, CHROMIUM

    proc, url = _serve(bundles)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            if delay > 0:
                page.goto(url)
                page.get_by_text("Filters in this layer").first.wait_for(state="visible", timeout=120_000)
                time.sleep(delay)
            page.goto(f"{url}/concepts")
            box = page.get_by_label("Concept", exact=True)
            box.wait_for(state="visible", timeout=120_000)
            box.fill(word)
            t0 = time.perf_counter()
            box.press("Enter")
            page.locator("h3", has_text=f"“{word}”").first.wait_for(state="visible", timeout=120_000)
            took = time.perf_counter() - t0
            browser.close()
    finally:
        proc.terminate()
        proc.wait(10)
    return took


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument(
        "--bundles", help="LAVISE_BUNDLES folder (default: the demo bundle, else the test bundles)"
    )
    ap.add_argument("--cold-start", type=int, default=0, metavar="N", help="also time N cold starts")
    ap.add_argument(
        "--recompile", action="store_true",
        help="compile app.py and the page on every run, as AppTest does (how the earlier numbers were taken)",
    )  # fmt: skip
    ap.add_argument(
        "--concepts-first", type=float, default=None, metavar="S",
        help="only time the first concept query of a fresh server, typed S s after the Overview rendered",
    )  # fmt: skip
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    from app_bundles import browser_bundles

    bundles = args.bundles or os.environ.get("LAVISE_BUNDLES") or str(browser_bundles().bundles)
    os.environ["LAVISE_BUNDLES"] = bundles
    from lavise_core.pipeline.bundle import find_bundles
    from lavise_core.views.workspace import default_bundle

    b = default_bundle(find_bundles(bundles))
    if args.concepts_first is not None:
        took = [concepts_first_query(bundles, args.concepts_first) for _ in range(max(1, args.cold_start))]
        print(f"first concept query, {args.concepts_first:g} s after the first page: {_stats(took, 1, 's')}")
        print(f"load average after {os.getloadavg()}")
        return 0
    maps = (
        "probe/maps stored"
        if b.has("probe/maps")
        else "no probe/maps: a concept's uncached images need a forward pass"
    )
    print(
        f"bundle {b.summary()} · {b.manifest['channels']} filters · {maps} · load average {os.getloadavg()}"
    )
    print(
        "scripts compiled on every run (AppTest)"
        if args.recompile
        else "scripts compiled once (as the server)"
    )
    for name, xs in interactions(args.repeats, int(b.manifest["channels"]), args.recompile).items():
        print(f"{name:50s} {_stats(xs)}")
    print(f"memory: {_memory()}")
    if args.cold_start:
        runs = cold_start(args.cold_start, bundles)
        print(f"{'cold start: server healthy':50s} {_stats([r for r, _ in runs], 1, 's')}")
        print(f"{'cold start: first page rendered':50s} {_stats([f for _, f in runs], 1, 's')}")
    print(f"load average after {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
