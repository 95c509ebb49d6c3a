"""Load test of a read-only `lavise serve` on 127.0.0.1 (issue 29): N concurrent browser sessions, each
uploading U probe test images and typing Q concepts, in one headless Chromium.

Checks every response (the page names the class the network predicts for that image, computed here
beforehand; a concept query shows its heading) and reports p95 latency per kind and the server's resident
memory after 10 uploads and after all of them (10 + N × U + 10).
Usage: python bench/serve_load.py [--sessions 8] [--uploads 10] [--queries 3] [--limit-s 900]
"""

from __future__ import annotations

import argparse
import asyncio
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

CHROMIUM = "/usr/bin/chromium"
RESENT: list[str] = []  # uploads whose file had to be sent again
CONCEPTS = ["red wing", "striped tail", "grass", "blue crown", "yellow throat", "water"]
SETTLED = (
    "() => { const w = document.querySelector('[data-testid=\"stStatusWidget\"]');"
    " return !w || !w.innerText.includes('Running'); }"
)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _p95(xs: list[float]) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]


def _images(n: int):
    """``n`` probe test images as PNG bytes with the class the bundle's network predicts for each."""
    from app_bundles import browser_bundles

    from lavise_core.api import Explainer
    from lavise_core.data.dataset import ProbeDataset
    from lavise_core.pipeline.bundle import Bundle, find_bundles
    from lavise_core.views.workspace import default_bundle

    b = browser_bundles()
    bundle: Bundle = default_bundle(find_bundles(b.bundles))
    ex = Explainer(bundle)
    ds = ProbeDataset.open(b.data)
    test = [i for i, r in enumerate(ds.records) if getattr(r, "split", "test") == "test"] or list(
        range(len(ds))
    )
    out = []
    for i in test[:n]:
        img = ds.load_image(i)
        a = ex.analyse(img)
        buf = io.BytesIO()
        img.save(buf, "PNG")
        out.append((buf.getvalue(), ex.model().class_names[int(a.probs.argmax())]))
    return b.bundles, out


async def _upload(page, name: str, data: bytes, expected: str) -> float:
    old = page.locator('[data-testid="stFileChipDeleteBtn"]')
    while await old.count():  # a visitor replaces the image: the uploader keeps one file at a time
        await old.first.click()
        await page.wait_for_timeout(300)
        await page.wait_for_function(SETTLED, timeout=300_000)
    main = page.locator('[data-testid="stMain"]')
    t0 = time.perf_counter()
    for attempt in range(3):  # under load a re-render can swallow the file input's change: send it again
        await page.locator('input[type="file"]').set_input_files(
            files=[{"name": name, "mimeType": "image/png", "buffer": data}]
        )
        try:
            await main.get_by_text(name, exact=False).first.wait_for(state="visible", timeout=60_000)
            break
        except Exception:
            RESENT.append(name)
            if attempt == 2:
                raise
    sentence = main.locator("h4").or_(main.locator("p", has_text="guess,"))
    await sentence.first.wait_for(state="visible", timeout=120_000)
    text = ""
    for _ in range(1200):  # the previous image's sentence stays on screen until this run replaces it
        await page.wait_for_function(SETTLED, timeout=120_000)
        text = await sentence.first.inner_text()
        if expected in text:
            return time.perf_counter() - t0
        await asyncio.sleep(0.05)
    raise AssertionError(f"{name}: expected {expected!r} in {text!r}")


async def _query(page, text: str) -> float:
    t0 = time.perf_counter()
    box = page.get_by_role("textbox", name="Concept")
    await box.fill(text)
    await box.press("Enter")
    await page.locator("h3", has_text=text).first.wait_for(state="visible", timeout=120_000)
    await page.wait_for_function(SETTLED, timeout=120_000)
    return time.perf_counter() - t0


async def _session(browser, url: str, sid: int, images, uploads: int, queries: int, times: dict) -> None:
    ctx = await browser.new_context(viewport={"width": 1300, "height": 1200})
    page = await ctx.new_page()
    dialogs: list[str] = []
    page.on("dialog", lambda d: dialogs.append(d.message))
    await page.goto(f"{url}/explain")
    await page.get_by_text("Upload one or more images").first.wait_for(timeout=120_000)
    for u in range(uploads):
        data, expected = images[(sid * uploads + u) % len(images)]
        times["upload"].append(await _upload(page, f"s{sid}-u{u}.png", data, expected))
    await page.goto(f"{url}/concepts")
    await page.get_by_text("Search a concept").first.wait_for(timeout=120_000)
    for q in range(queries):
        times["query"].append(await _query(page, CONCEPTS[(sid + q) % len(CONCEPTS)]))
    assert not dialogs, dialogs
    await ctx.close()


async def run(args) -> None:
    from playwright.async_api import async_playwright

    bundles, images = _images(max(20, args.uploads))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAVISE_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "lavise_core.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--bundles", str(bundles)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1):
                    break
            except OSError:
                await asyncio.sleep(0.1)
        async with async_playwright() as p:
            browser = await p.chromium.launch(executable_path=CHROMIUM, headless=True,
                                              args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])  # fmt: skip
            warm: dict[str, list[float]] = {"upload": [], "query": []}
            await _session(
                browser, url, 99, images, 10, 1, warm
            )  # 10 uploads (+ the concept index): baseline
            rss10 = _rss_mb(proc.pid)
            times: dict[str, list[float]] = {"upload": [], "query": []}
            t0 = time.perf_counter()
            await asyncio.wait_for(
                asyncio.gather(*(_session(browser, url, s, images, args.uploads, args.queries, times)
                                 for s in range(args.sessions))),
                timeout=args.limit_s,
            )  # fmt: skip
            wall = time.perf_counter() - t0
            await _session(browser, url, 98, images, 10, 0, warm)
            n = 20 + args.sessions * args.uploads
            rss = _rss_mb(proc.pid)
            await browser.close()
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
    print(f"{args.sessions} sessions × ({args.uploads} uploads + {args.queries} concept queries), "
          f"{wall:.0f} s wall, every response correct, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    for kind, xs in times.items():
        if xs:
            print(
                f"  {kind:6s}: median {statistics.median(xs):5.2f} s   p95 {_p95(xs):5.2f} s   (n={len(xs)})"
            )
    print(f"  uploads sent again after 60 s without a response: {len(RESENT)}")
    print(f"  server resident memory: {rss10:.0f} MB after 10 uploads, {rss:.0f} MB after {n}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=8)
    ap.add_argument("--uploads", type=int, default=10)
    ap.add_argument("--queries", type=int, default=3)
    ap.add_argument("--limit-s", type=float, default=900)
    asyncio.run(run(ap.parse_args()))


if __name__ == "__main__":
    main()
