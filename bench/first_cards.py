"""Time from ``git clone`` to the first filter cards in a browser, as a new user waits for them (issue 27: ≤ 5 min).

Clones this repository into a fresh folder, runs ``make demo`` there (install, SynthBirds, the probe pass, the
server; the other stages build behind it) and opens the Filters page in headless Chromium every few seconds
until a filter card (its "Open" button and top images) is on screen. Prints when each step finished, read from
``make demo``'s own output, and the total. The machine's load average is printed beside it: a loaded machine
waits longer. Nothing outside the clone is touched; the clone is deleted at the end (``--keep`` keeps it).

    python bench/first_cards.py [--port 8599] [--keep]
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
#: a line of ``make demo``'s output -> the step it ends
STEPS = {
    "installing the pinned packages": "install started",
    "pip install --disable-pip-version-check -q --no-deps -e .": "packages installed",
    "wrote 4800 images": "SynthBirds generated",
    "stages in the background": "probe pass done (the other stages build behind the server)",
    "serving on http://localhost": "server starting",
}


def _cards_shown(url: str, timeout_s: float) -> float:
    """Seconds (perf_counter) when the Filters page first shows a filter card."""
    from playwright.sync_api import sync_playwright

    args = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1200})
        end = time.perf_counter() + timeout_s
        while time.perf_counter() < end:
            try:
                page.goto(f"{url}/filters", timeout=10_000)
                page.locator('[data-testid="stButton"] button', has_text="Open").first.wait_for(
                    state="visible", timeout=15_000
                )
                page.wait_for_function(
                    "() => [...document.images].some(i => i.complete && i.naturalWidth > 0)"
                )
                return time.perf_counter()
            except Exception:  # not served yet, or the cards are not there yet
                time.sleep(3)
        raise TimeoutError(f"no filter card within {timeout_s:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, default=8599)
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--keep", action="store_true", help="keep the clone (its .venv, data and bundle)")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="lavise-first-cards-"))
    clone = tmp / "lavise"
    print(f"load average before: {os.getloadavg()[0]:.2f}")
    t0 = time.perf_counter()
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    demo = subprocess.Popen(
        ["make", "demo", f"PORT={args.port}"], cwd=clone, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, start_new_session=True,
    )  # fmt: skip
    seen: dict[str, float] = {}

    def read() -> None:
        for line in demo.stdout:  # type: ignore[union-attr]
            for key, step in STEPS.items():
                if key in line and step not in seen:
                    seen[step] = time.perf_counter() - t0

    threading.Thread(target=read, daemon=True).start()
    try:
        shown = _cards_shown(f"http://127.0.0.1:{args.port}", args.timeout) - t0
    finally:
        os.killpg(demo.pid, signal.SIGINT)
        try:
            demo.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(demo.pid, signal.SIGKILL)
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    for step, s in sorted(seen.items(), key=lambda kv: kv[1]):
        print(f"{s:7.1f} s  {step}")
    print(f"{shown:7.1f} s  first filter cards in Chromium (target ≤ 300 s)")
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
