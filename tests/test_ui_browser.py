"""adaptr ui in a real browser: Playwright driving Debian's Chromium (/usr/bin/chromium).

Skipped only when Chromium or Playwright is missing and ADAPTR_REQUIRE_BROWSER is unset
(CI sets it: there a missing browser fails). Screenshots of every page go to
$ADAPTR_UI_SCREENSHOTS (default: the test's temporary folder) as test artifacts.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from test_ui import PROMPT, build_registry

from helpers import running

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip
WAIT_MS = 120_000  # generous: the machine may be busy


def _browser_missing() -> str | None:
    if not CHROMIUM.exists():
        return f"{CHROMIUM} is missing (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install playwright)"
    return None


missing = _browser_missing()
if missing and not os.environ.get("ADAPTR_REQUIRE_BROWSER"):
    pytest.skip(missing, allow_module_level=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory, tiny_llama):
    assert missing is None, f"ADAPTR_REQUIRE_BROWSER is set but {missing}"
    from adaptr.ui import create_app

    reg = build_registry(tmp_path_factory.mktemp("ui-browser"), tiny_llama)
    with running(create_app(reg)) as url:
        yield reg, url.removesuffix("/v1")


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    out = os.environ.get("ADAPTR_UI_SCREENSHOTS")
    path = Path(out) if out else tmp_path_factory.mktemp("screenshots")
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def page(site):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        context = browser.new_context(viewport={"width": 1200, "height": 760})
        pg = context.new_page()
        pg.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        pg.on("pageerror", lambda e: errors.append(str(e)))
        pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        pg.js_errors = errors
        yield pg
        browser.close()


def until(page, expression: str) -> None:
    """Wait until ``expression`` is true in the page (polled from here: the pages' CSP
    forbids the eval that Playwright's wait_for_function uses)."""
    import time

    deadline = time.monotonic() + WAIT_MS / 1000
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"timed out waiting for {expression}"
        time.sleep(0.05)


def test_list_to_version_to_parent(site, page, shots):
    reg, url = site
    page.goto(f"{url}/adapters")
    page.screenshot(path=str(shots / "adapters.png"))
    page.fill('input[name="q"]', "zh")
    until(page, "document.querySelectorAll('#versions tbody tr[data-ref]').length === 2")
    page.click('#versions a[href="/v/zh@2"] >> nth=0')
    page.wait_for_selector('h1#ref:has-text("zh@2")')
    page.screenshot(path=str(shots / "version.png"), full_page=False)
    page.click('#lineage a[href="/v/zh@1"]')
    page.wait_for_selector('h1#ref:has-text("zh@1")')
    assert page.url.endswith("/v/zh@1") and not page.js_errors


def test_curves_draws_one_series_per_version_and_metric(site, page, shots):
    _, url = site
    page.goto(f"{url}/curves?ref=zh@1&ref=zh@2&ref=blend@1")
    until(page, "window.adaptrChart !== undefined")
    assert page.evaluate("adaptrChart.series.length - 1") == 4
    assert page.locator(".u-legend .u-series").count() == 5  # step + 4
    page.check("#log-scale")
    until(page, "adaptrChart.scales.y.distr === 3")
    assert page.evaluate("adaptrChart.series.length - 1") == 4
    page.screenshot(path=str(shots / "curves.png"))
    assert not page.js_errors


def test_compare_page(site, page, shots):
    _, url = site
    page.goto(f"{url}/compare?ref=zh@1&ref=zh@2")
    assert page.locator("#compare td.best").count() >= 2
    page.screenshot(path=str(shots / "compare.png"))


def test_playground_streams_the_servers_greedy_answers(site, page, shots):
    from adaptr.serving import AdapterServer

    reg, url = site
    page.goto(f"{url}/playground")
    page.fill('textarea[name="prompt"]', PROMPT)
    page.check('input[value="a@1"]')
    page.check('input[value="b@1"]')
    page.fill('input[name="max_tokens"]', "8")
    page.click("#run")
    page.wait_for_selector('#answers[data-done="1"]')
    got = page.locator("#answers .answer pre").all_inner_texts()
    want = AdapterServer(reg, "tiny").generate([PROMPT] * 2, ["a@1", "b@1"], max_new_tokens=8)
    assert [g.strip() for g in got] == [w.strip() for w in want] and got[0] != got[1]
    page.screenshot(path=str(shots / "playground.png"))
    assert not page.js_errors


def test_gated_tag_move_refused_then_allowed(site, page, shots):
    reg, url = site
    loss = {r: reg.evals(r)[-1]["metrics"]["loss"] for r in ("zh@1", "zh@2")}
    better, worse = sorted(loss, key=loss.get)
    reg.tag(better, "silver")
    page.goto(f"{url}/v/{worse}")
    page.fill('#tag-form input[name="tag"]', "silver")
    page.fill('#tag-form input[name="better_than"]', "silver")
    page.click("#check-gate")
    page.wait_for_selector("#tag-result .outcome.refused")
    assert "loss" in page.inner_text("#tag-result")
    page.click("#move-tag")
    page.wait_for_selector('#tag-result .outcome.refused:has-text("the tag was not moved")')
    assert reg.get("zh@silver").ref == better
    page.fill('#tag-form input[name="better_than"]', "")
    page.fill('#tag-form input[name="require"]', "loss<=1000")
    page.click("#check-gate")
    page.wait_for_selector('#tag-result .outcome.ok:has-text("the gate passes")')
    page.click("#move-tag")
    page.wait_for_selector(f'#tag-result .outcome.ok:has-text("zh@silver -> {worse}")')
    assert reg.get("zh@silver").ref == worse
    page.screenshot(path=str(shots / "tag-move.png"))
    assert not page.js_errors
