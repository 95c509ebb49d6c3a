"""Issue 29 in a real headless Chromium: `lavise serve` (read-only) on 127.0.0.1 shows no build form and no path
input, and an upload named like markup shows its name literally with no script run."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
import urllib.request

import pytest
from app_bundles import ROOT, browser_bundles
from PIL import Image
from test_browser import ARTIFACTS, _free_port, _no_exception, _settle, _shot, browser  # noqa: F401

pytestmark = pytest.mark.browser

EVIL = "<img src=x onerror=alert(1)>.png"


@pytest.fixture(scope="module")
def read_only_server(browser):  # noqa: F811
    bundles = browser_bundles()
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LAVISE_")}
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    log = (ARTIFACTS / "server_read_only.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "lavise_core.cli", "serve", "--host", "127.0.0.1", "--port", str(port),
         "--bundles", str(bundles.bundles)],
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
            raise RuntimeError("lavise serve did not start")
        yield {"url": url, "bundles": bundles}
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_read_only_server_has_no_build_form_and_no_path_input(read_only_server, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    page.goto(read_only_server["url"])
    _settle(page, "Filters in this layer")
    _no_exception(page)
    _shot(page, "20_read_only_overview")
    assert page.get_by_text("Build a bundle").count() == 0
    assert page.get_by_role("button", name="Build").count() == 0
    for label in ("Model spec", "Probe data set folder", "Build token"):
        assert page.get_by_label(label).count() == 0, label
    main = page.locator('[data-testid="stMain"]')
    assert (
        main.locator('[data-testid="stTextInput"], [data-testid="stTextArea"]').count() == 0
    )  # no text inputs
    assert page.get_by_text("Export the filter table").count() == 1  # exports stay: downloads


def test_upload_named_like_markup_shows_its_name_and_runs_nothing(read_only_server, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1800})
    dialogs: list[str] = []
    page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
    page.goto(f"{read_only_server['url']}/explain")
    _settle(page, "Upload one or more images")
    buf = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 40, 40)).save(buf, "PNG")
    page.locator('input[type="file"]').set_input_files(
        files=[{"name": EVIL, "mimeType": "image/png", "buffer": buf.getvalue()}]
    )
    _settle(page, "Where does it look?")
    _no_exception(page)
    _shot(page, "21_upload_named_like_markup")
    main = page.locator('[data-testid="stMain"]')
    # the caption above the result, literally (the uploader's own list shortens long names)
    assert main.get_by_text(EVIL, exact=False).count() >= 1
    assert page.locator("img[src='x']").count() == 0  # nothing injected into the page
    page.wait_for_timeout(500)
    assert dialogs == []
