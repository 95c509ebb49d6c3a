"""The dashboard in a real headless Chromium (Debian's /usr/bin/chromium driven by playwright; no browser download).

Starts `streamlit run app.py` on a free port against the real demo bundle when `make assets` has built it
(else the small test bundles of tests/app_bundles.py), opens every page, clicks a filter card, types a
concept, uploads an image, checks two sessions on different filters, and saves screenshots under
tests/artifacts/ (git-ignored). Also measures the cold start: server start to the first rendered page, in
a Chromium that is already running (its own start-up is not the dashboard's).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from urllib.parse import urlparse

import pytest
from app_bundles import ROOT, browser_bundles

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ARTIFACTS = ROOT / "tests" / "artifacts"
COLD_START_LIMIT_S = 5.0
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}
#: every page of app.py and a text each shows once rendered, whatever stages the bundle has
EVERY_PAGE = [
    ("", "Filters in this layer"),
    ("filters", "Filters of layer"),
    ("filters?filter=3", "Where it fires"),
    ("concepts", "Search a concept"),
    ("explain", "Explain an image"),
    ("classes", "Confusion matrix"),
    ("dataset", "Bias findings"),
    ("map", "A map of the data set"),
    ("layers", "How is the network organised"),
    ("evaluation", "The papers' numbers"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(browser):
    bundles = browser_bundles()
    port = _free_port()
    env = dict(os.environ, LAVISE_BUNDLES=str(bundles.bundles), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    streamlit = shutil.which("streamlit", path=str(Path(sys.executable).parent)) or "streamlit"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = (ARTIFACTS / "server.log").open("wb")  # closed below; an unread pipe could block the server
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [streamlit, "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            raise RuntimeError("the dashboard server did not start")
        ready = time.perf_counter() - t0
        yield {"url": url, "t0": t0, "bundles": bundles, "ready": ready}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `make browser` installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def _settle(page, text: str, timeout: float = 90_000) -> None:
    """Wait until ``text`` is visible and the script has stopped running."""
    page.get_by_text(text, exact=False).locator("visible=true").first.wait_for(
        state="visible", timeout=timeout
    )
    page.wait_for_function(
        "() => !document.querySelector('[data-testid=\"stStatusWidget\"]')"
        " || !document.querySelector('[data-testid=\"stStatusWidget\"]').innerText.includes('Running')",
        timeout=timeout,
    )
    page.wait_for_function(  # lazy chunks (charts, tables) and images finished loading
        '() => !document.querySelector(\'[data-testid="stSkeleton"], [data-testid="stSpinner"]\')'
        " && [...document.images].every(i => i.complete)",
        timeout=timeout,
    )
    page.wait_for_timeout(800)


def _shot(page, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def _no_exception(page) -> None:
    assert page.locator('[data-testid="stException"]').count() == 0


def test_cold_start(server, browser):
    """Server start to the first rendered page (the Overview), reported in tests/artifacts/cold_start.txt."""
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(server["url"])
    page.get_by_text("Filters in this layer").first.wait_for(state="visible", timeout=90_000)
    cold = time.perf_counter() - server["t0"]
    _settle(page, "Filters in this layer")
    print(f"cold start: server healthy after {server['ready']:.2f} s, first page rendered after {cold:.2f} s")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "cold_start.txt").write_text(
        f"server_ready_s {server['ready']:.3f}\nfirst_page_s {cold:.3f}\n"
        f"demo_bundle {server['bundles'].demo}\nload_average {os.getloadavg()}\n"
    )
    _shot(page, "01_overview")
    _no_exception(page)
    assert cold <= COLD_START_LIMIT_S * 3, (
        f"cold start {cold:.1f} s"
    )  # hard limit; the target (5 s) is reported


def test_click_filter_card(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(f"{server['url']}/filters")
    _settle(page, "Filters of layer")
    page.locator('[data-testid="stButton"] button', has_text="Open").first.click()
    try:
        _settle(page, "Where it fires", timeout=30_000)
    finally:
        _shot(page, "08_filter_detail")
    assert "filter=" in page.url
    assert page.get_by_role("heading", name="Filter").count() >= 1
    _no_exception(page)
    _shot(page, "08_filter_detail")


def test_type_concept(server, browser):
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(f"{server['url']}/concepts")
    _settle(page, "Search a concept")
    box = page.get_by_role("textbox", name="Concept")
    box.fill("crimson chest")  # a paraphrase of "red breast", a concept the demo layer detects
    box.press("Enter")
    _settle(page, "Where those filters fire")
    _no_exception(page)
    _shot(page, "09_concept_query")
    if server["bundles"].demo:  # annotated probe set: a concept absent from the data is answered "none"
        box.fill("bicycle")
        box.press("Enter")
        _settle(page, "No filter of layer")
        _no_exception(page)
        _shot(page, "09b_concept_absent")


def test_upload_image(server, browser):
    from lavise_core.data.dataset import ProbeDataset

    data = server["bundles"].data
    ds = ProbeDataset.open(data)
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(f"{server['url']}/explain")
    _settle(page, "Upload one or more images")
    page.locator('input[type="file"]').set_input_files(str(data / ds.records[0].path))
    _settle(page, "because it has")
    _no_exception(page)
    _shot(page, "10_explain_upload")
    _settle(page, "Where does it look?")  # attribution maps; the method choice is in the URL
    assert "methods=gradcam" in page.url
    page.locator('input[type="file"]').set_input_files(
        files=[{"name": "notes.txt", "mimeType": "text/plain", "buffer": b"not an image"}]
    )
    page.get_by_role("tab", name="notes.txt").click()
    _settle(page, "not an image")
    _no_exception(page)
    _shot(page, "11_explain_bad_upload")
    if server["bundles"].demo:  # the demo bundle has the upload check: a cat photo leads with a warning
        import io

        from lavise_core.data.samples import sample_photo

        buf = io.BytesIO()
        sample_photo("chelsea").save(buf, format="PNG")
        page.locator('input[type="file"]').set_input_files(
            files=[{"name": "cat.png", "mimeType": "image/png", "buffer": buf.getvalue()}]
        )
        page.get_by_role("tab", name="cat.png").click()
        _settle(page, "Unlike the probe images")
        _no_exception(page)
        _shot(page, "11b_explain_out_of_distribution")


def test_two_sessions_on_different_filters(server, browser):
    a = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    b = browser.new_context(viewport={"width": 1200, "height": 800}).new_page()
    a.goto(f"{server['url']}/filters?filter=3")
    b.goto(f"{server['url']}/filters?filter=11")
    _settle(a, "Where it fires")
    _settle(b, "Where it fires")
    a.reload()
    _settle(a, "Where it fires")
    assert a.get_by_role("heading", name="Filter 3").count() == 1
    assert b.get_by_role("heading", name="Filter 11").count() == 1
    _shot(a, "12_session_a_filter3")
    _shot(b, "13_session_b_filter11")


def _click_map_dot(page, i: int = 3) -> None:
    """Click the ``i``-th point of the map's first trace, at the pixel plotly drew it."""
    x, y = page.evaluate(
        """(i) => { const gd = document.querySelector('.js-plotly-plot'); const t = gd._fullData[0];
        const box = gd.querySelector('.nsewdrag').getBoundingClientRect(); const L = gd._fullLayout;
        return [box.left + L.xaxis.l2p(Number(t.x[i])), box.top + L.yaxis.l2p(Number(t.y[i]))]; }""",
        i,
    )
    page.mouse.click(x, y)


def test_click_a_map_dot(server, browser):
    # Streamlit 1.67 returns a plotly-express point's customdata as {"0": i}: int() of it broke the page (issue 25)
    page = browser.new_page(viewport={"width": 1400, "height": 1200})
    if not server["bundles"].demo:
        pytest.skip("the small test bundles have no map (the datamap stage): `make assets` builds the demo's")
    page.goto(f"{server['url']}/map")
    _settle(page, "A map of the data set")
    page.locator(".js-plotly-plot .nsewdrag").first.wait_for(state="visible", timeout=30_000)
    _click_map_dot(page)
    _settle(page, "Its most active filters", timeout=30_000)
    _no_exception(page)
    assert "image=" in page.url
    assert "Unexpected error" not in page.inner_text("body")
    _shot(page, "14_map_dot_opened")


#: text no page may show: a traceback, an exception's name, or a missing value printed as such
BAD_TEXT = re.compile(r"\bTraceback\b|\b[A-Z]\w*Error\b|\bNone\b(?! of)|\bnan\b|\bNaN\b")
#: the widest element of the page's main block, its data frames' scrollable width and any plot's right edge
WIDTHS = """() => {
  const main = document.querySelector('[data-testid="stMainBlockContainer"]') || document.body;
  const right = main.getBoundingClientRect().right;
  const out = [];
  for (const el of main.querySelectorAll('[data-testid="stDataFrame"] .dvn-scroller')) {
    if (el.scrollWidth > el.clientWidth + 2) out.push(`a table ${el.scrollWidth} px wide in ${el.clientWidth} px`);
  }
  for (const el of main.querySelectorAll('.js-plotly-plot, [data-testid="stDataFrame"], img')) {
    const r = el.getBoundingClientRect();
    if (r.width > 0 && r.right > right + 2) out.push(`${el.tagName.toLowerCase()} reaching ${Math.round(r.right)} px of ${Math.round(right)}`);
  }
  if (document.documentElement.scrollWidth > window.innerWidth + 2) out.push('the page scrolls sideways');
  return out;
}"""


def _local_only(page) -> list[str]:
    """Record every request of ``page`` that goes to another host than this machine (the list fills as it loads)."""
    outside: list[str] = []

    def record(request) -> None:
        host = urlparse(request.url).hostname
        if urlparse(request.url).scheme in ("http", "https", "ws", "wss") and host not in LOCAL_HOSTS:
            outside.append(f"{page.url} -> {request.url}")

    page.on("request", record)
    return outside


def test_every_page_reads_clean_fits_and_stays_on_this_machine(server, browser):
    """One visit of every page (and a filter's detail) at a laptop's width, each checked three ways:
    - issue 25: no traceback, error name, 'None' or 'nan', and no table or chart wider than the page (a data frame
      that scrolls sideways counts);
    - the README's "nothing is downloaded at run time": every page, and its main controls (a concept query, an
      upload, a map dot), load only from this server: no font host, no CDN, no favicon from elsewhere;
    - no exception box. Each page is saved as a screenshot (tests/artifacts/page_*.png)."""
    import io

    from lavise_core.data.samples import sample_photo

    page = browser.new_page(viewport={"width": 1280, "height": 1600})
    outside = _local_only(page)
    problems: list[str] = []
    for i, (path, text) in enumerate([*EVERY_PAGE, ("filters?filter=17", "Where it fires")], start=1):
        page.goto(f"{server['url']}/{path}")
        _settle(page, text)
        _no_exception(page)
        main = page.locator('[data-testid="stMain"]').inner_text()
        problems += [f"/{path}: shows {m.group(0)!r}" for m in BAD_TEXT.finditer(main)]
        problems += [f"/{path}: {w}" for w in page.evaluate(WIDTHS)]
        _shot(page, f"page_{i:02d}_{re.sub(r'[^a-z0-9]+', '_', path) or 'overview'}")
    assert not problems, "\n".join(problems)
    page.goto(f"{server['url']}/concepts")
    _settle(page, "Search a concept")
    box = page.get_by_role("textbox", name="Concept")
    box.fill("red breast")
    box.press("Enter")
    _settle(page, "Where those filters fire")
    page.goto(f"{server['url']}/explain")
    _settle(page, "Upload one or more images")
    buf = io.BytesIO()
    sample_photo("chelsea").save(buf, format="PNG")
    page.locator('input[type="file"]').set_input_files(
        files=[{"name": "cat.png", "mimeType": "image/png", "buffer": buf.getvalue()}]
    )
    _settle(page, "Where does it look?")
    page.goto(f"{server['url']}/map")
    _settle(page, "A map of the data set")
    if server["bundles"].demo:
        page.locator(".js-plotly-plot .nsewdrag").first.wait_for(state="visible", timeout=30_000)
        _click_map_dot(page)
        _settle(page, "Its most active filters", timeout=30_000)
    page.wait_for_timeout(1000)
    assert not outside, "requests that left the machine:\n" + "\n".join(sorted(set(outside)))
