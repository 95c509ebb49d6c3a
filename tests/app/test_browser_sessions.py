"""Four browser sessions doing different things at once, and the Overview's export / compare / build-form
sections, in a real headless Chromium against `streamlit run app.py` (the server of test_browser.py)."""

from __future__ import annotations

import re

import pytest
from test_browser import _no_exception, _settle, _shot, browser, server  # noqa: F401  (fixtures)

pytestmark = pytest.mark.browser


def test_four_sessions_at_once_stay_correct(server, browser):  # noqa: F811
    contexts = [browser.new_context(viewport={"width": 1200, "height": 900}) for _ in range(4)]
    try:
        _four_sessions([ctx.new_page() for ctx in contexts], server)
    finally:  # close the sessions, so that their work does not hold up the next test's server
        for ctx in contexts:
            ctx.close()


def _four_sessions(pages, server) -> None:  # noqa: F811  (the fixture value, passed on)
    from lavise_core.data.dataset import ProbeDataset

    a, b, c, d = pages
    data = server["bundles"].data
    ds = ProbeDataset.open(data)
    # start all four before waiting on any: the server handles them concurrently
    a.goto(f"{server['url']}/filters?filter=5")
    b.goto(f"{server['url']}/concepts")
    c.goto(f"{server['url']}/explain")
    d.goto(f"{server['url']}/filters?filter=9")
    _settle(b, "Search a concept")
    box = b.get_by_role("textbox", name="Concept")
    box.fill("crimson chest")  # a paraphrase of "red breast", which the demo layer detects
    box.press("Enter")
    _settle(c, "Upload one or more images")
    c.locator('input[type="file"]').set_input_files(str(data / ds.records[1].path))
    d.get_by_role("button", name="next ›").first.wait_for(state="visible", timeout=90_000)
    d.get_by_role("button", name="next ›").first.click()  # session d moves on while the others work
    try:
        _settle(a, "Where it fires")
        _settle(b, "Where those filters fire")
        _settle(c, "because it has")
        _settle(d, "Filter 10")
    finally:
        for name, p in zip("abcd", pages, strict=True):
            _shot(p, f"14_session_{name}")
    for p in pages:
        _no_exception(p)
    assert a.get_by_role("heading", name=re.compile(r"^Filter 5\b")).count() == 1
    assert d.get_by_role("heading", name=re.compile(r"^Filter 10\b")).count() == 1
    assert "filter=10" in d.url and "filter=5" in a.url
    assert b.get_by_role("textbox", name="Concept").input_value() == "crimson chest"
    assert c.get_by_text("because it has").count() >= 1
    a.reload()  # a's state is its own: reloading it shows filter 5, not d's filter 10
    _settle(a, "Where it fires")
    assert a.get_by_role("heading", name=re.compile(r"^Filter 5\b")).count() == 1
    for name, p in zip("abcd", pages, strict=True):
        _shot(p, f"14_session_{name}")


def test_overview_export_compare_and_build_form(server, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 2200})
    page.goto(server["url"])
    _settle(page, "Filters in this layer")
    page.get_by_text("Export the filter table and a report").click()
    page.get_by_role("button", name="Prepare the HTML report").click()
    _settle(page, "HTML report (")
    _no_exception(page)
    _shot(page, "15_overview_export")
    page.get_by_text("Compare with another bundle").click()
    page.wait_for_timeout(1000)  # the expander opens
    served = [m.parent for m in server["bundles"].bundles.glob("*/bundle.json")]
    if len(served) < 2:  # a fresh clone builds only the demo bundle: the section says how to get a second one
        _settle(page, "Only one bundle is built")
        _shot(page, "16_overview_compare")
    else:  # (a bundle folder the page cannot open would be listed by neither)
        page.get_by_placeholder("choose a bundle").click()
        page.get_by_role("option").first.click()
        try:  # (the table itself is drawn on a canvas: its words are not in the DOM)
            _settle(page, "Label distribution: how many filters")
        finally:
            _shot(page, "16_overview_compare")
    _no_exception(page)
    page.get_by_text("Build a bundle").first.click()
    page.get_by_text("Set up a new build").click()
    form = page.get_by_text("Stages (what they need is added)").first
    try:
        try:
            form.wait_for(state="visible", timeout=20_000)
        except Exception:  # the click landed while the expander was still opening: once more if still off
            if not page.get_by_role("switch", name="Set up a new build").is_checked():
                page.get_by_text("Set up a new build").click()
        _settle(page, "Stages (what they need is added)")
    except Exception:
        _shot(page, "17_build_form_not_shown")
        raise
    page.get_by_role("button", name="Build").first.wait_for(state="visible", timeout=60_000)
    _no_exception(page)
    assert page.get_by_text("images,").count() >= 1  # the data folder check ran: "N images, K classes"
    page.get_by_role("button", name="Build").first.scroll_into_view_if_needed()
    page.wait_for_timeout(500)
    _shot(page, "17_build_form")
