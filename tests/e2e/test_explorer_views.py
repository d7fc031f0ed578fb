"""The explorer's width links, interventions, deep links and the cold-start sequence in a real browser.

Same fixture checkpoints tree as test_app_browser.py (a tiny random GPT-Neo with SAEs of two widths).
Screenshots go to `test-output/screenshots/`.
"""

from __future__ import annotations

import re
import time
import urllib.parse
from pathlib import Path

import pytest

from explorer.serve import AppStartError, serve_in_subprocess
from tests.e2e.test_app_browser import CHROMIUM, HOOK, MODEL, SHOTS, WIDTHS, build_fixture

STORY = "The little fox found a blue stone. She showed it to her friend the owl."
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--no-first-run", "--disable-sync"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("ckpts"))


def _serve(root: Path, log_path: Path):
    try:
        return serve_in_subprocess(["--checkpoints", str(root)], env={"HF_HUB_OFFLINE": "1"}, timeout=60,
                                   log_path=log_path)
    except AppStartError as err:
        pytest.fail(str(err))


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"Chromium not found at {CHROMIUM}: install it with `apt-get install -y chromium` "
                    "(or set CHROMIUM_PATH) to run the browser tests.")
    from playwright.sync_api import sync_playwright

    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def app(root, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("log") / "app.log"
    with _serve(root, log_path) as url:
        yield url, log_path


def _page(browser, url: str):
    pg = browser.new_page(viewport={"width": 1400, "height": 1000})
    pg.set_default_timeout(20_000)
    pg.goto(url)
    return pg


def _analyze(page, text: str) -> None:
    page.locator("#story textarea").fill(text)
    page.locator("#analyze-btn").click()


def _analyzed_page(browser, url: str):
    """A fresh page on which STORY has been analysed."""
    from playwright.sync_api import expect

    page = _page(browser, url)
    _analyze(page, STORY)
    expect(page.locator("#status-box")).to_contain_text("Analysed", timeout=30_000)
    expect(page.locator("#tokens-view")).to_contain_text("fox")
    return page


@pytest.mark.e2e
def test_width_links(browser, app):
    from playwright.sync_api import expect

    page = _analyzed_page(browser, app[0])
    latent = page.locator("#latent-num input").input_value()
    page.get_by_role("tab", name="Across widths").click()
    page.locator("#links-btn").click()
    status = page.locator("#links-status")
    expect(status).to_contain_text(f"Latent {latent} of F={WIDTHS[1]}", timeout=20_000)
    other = page.locator(f'#links-view .links-width[data-width="{WIDTHS[0]}"]')
    expect(other).to_be_visible()
    expect(other.locator(".verdict")).to_have_text(re.compile("close match|split|spread|nothing alike"))
    n_tokens = page.locator("#links-view .links-orig .tok").count()
    assert n_tokens == page.locator("#tokens-view .tok").count() > 0
    assert other.locator(".links-match").count() == 3  # one strip per best match, beside the original
    assert other.locator(".links-match").first.locator(".tok").count() == n_tokens
    page.locator("#links-view").screenshot(path=str(SHOTS / "10-links.png"))
    page.screenshot(path=str(SHOTS / "10-links-page.png"), full_page=True)
    page.close()


@pytest.mark.e2e
def test_interventions(browser, app):
    from playwright.sync_api import expect

    page = _analyzed_page(browser, app[0])
    page.get_by_role("tab", name="Intervene").click()
    page.locator("#iv-op").get_by_text("steer", exact=True).click()
    page.locator("#iv-value input").fill("40")
    page.locator("#iv-btn").click()
    expect(page.locator("#iv-status")).to_contain_text("steered by +40", timeout=30_000)
    expect(page.locator("#iv-ce-view")).to_contain_text("fox")
    n_tokens = len(page.locator("#tokens-view .tok").all())
    assert page.locator("#iv-ce-view .tok").count() == n_tokens
    expect(page.locator("#iv-top")).to_contain_text("p after")
    before, after = page.locator("#iv-before textarea").input_value(), page.locator("#iv-after textarea").input_value()
    assert before and after and before != after
    page.screenshot(path=str(SHOTS / "11-intervene.png"), full_page=True)
    # ablation on chosen tokens, and a clear message for a bad position list
    page.locator("#iv-op").get_by_text("ablate", exact=True).click()
    page.locator("#iv-positions input, #iv-positions textarea").first.fill("2, x")
    page.locator("#iv-btn").click()
    expect(page.locator("#iv-status")).to_contain_text("positions must look like", timeout=20_000)
    page.close()


@pytest.mark.e2e
def test_deep_link(browser, app):
    from playwright.sync_api import expect

    text = "Tom had a big dog named Max. Max liked to run."
    query = urllib.parse.urlencode({"text": text, "model": MODEL, "hook": HOOK, "run": "standard",
                                    "F": str(WIDTHS[0]), "latent": "5"})
    page = _page(browser, app[0] + "?" + query)
    expect(page.locator("#status-box")).to_contain_text(f"F={WIDTHS[0]}", timeout=30_000)
    assert page.locator("#story textarea").input_value() == text
    expect(page.locator("#latent-num input")).to_have_value("5")
    expect(page.locator("#latent-header")).to_contain_text("Latent 5")
    # the copy button builds the link of what is on screen; opening it restores the same view
    page.locator("#f-radio").get_by_text(str(WIDTHS[1]), exact=True).click()
    expect(page.locator("#status-box")).to_contain_text(f"F={WIDTHS[1]}", timeout=20_000)
    page.locator("#latent-num input").fill("7")
    page.locator("#latent-num input").press("Enter")
    expect(page.locator("#latent-header")).to_contain_text("Latent 7", timeout=20_000)
    page.locator("#copy-link").click()
    box = page.locator("#link-box textarea, #link-box input").first
    expect(box).to_have_value(re.compile("latent=7"))
    link = box.input_value()
    assert f"F={WIDTHS[1]}" in link and "text=Tom" in link
    page.screenshot(path=str(SHOTS / "12-deep-link.png"), full_page=True)
    again = _page(browser, link)
    expect(again.locator("#status-box")).to_contain_text(f"F={WIDTHS[1]}", timeout=30_000)
    expect(again.locator("#latent-header")).to_contain_text("Latent 7")
    assert again.locator("#story textarea").input_value() == text
    page.close()
    again.close()


@pytest.mark.e2e
def test_cold_start_keeps_the_users_analysis(browser, root, tmp_path):
    """A new user on a freshly started app types a story and presses Analyze while the page-load analysis
    is still on its way: that late result must not replace the user's (it used to, 1 cold start in 3).
    The page-load request is held back in the browser until the user's analysis is on screen."""
    from playwright.sync_api import expect

    log_path = tmp_path / "app.log"
    with _serve(root, log_path) as url:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(20_000)
        held = []

        def hold_page_load(route):
            body = route.request.post_data or ""
            if "Lily" in body and not held:  # the page-load analysis of the default story
                held.append(route)
            else:
                route.continue_()

        page.route(re.compile(r".*/queue/join.*"), hold_page_load)
        page.goto(url)
        for _ in range(200):  # the page is up once it has sent its page-load analysis
            if held:
                break
            page.wait_for_timeout(100)
        assert held, "the page-load analysis was not sent"
        _analyze(page, STORY)
        expect(page.locator("#status-box")).to_contain_text("Analysed", timeout=30_000)
        expect(page.locator("#tokens-view")).to_contain_text("fox")
        held[0].continue_()
        deadline = time.time() + 30  # until the late result is dropped (server log) or shown (the old bug)
        while time.time() < deadline:
            if "stale" in log_path.read_text() or "Lily" in page.locator("#tokens-view").inner_text():
                break
            page.wait_for_timeout(200)
        page.wait_for_timeout(1000)  # let the browser apply whatever came back
        assert "Lily" not in page.locator("#tokens-view").inner_text(), "the page-load analysis replaced the user's"
        assert "stale" in log_path.read_text(), "the held page-load analysis never reached the server"
        expect(page.locator("#tokens-view")).to_contain_text("fox")
        assert "Lily" not in page.locator("#tokens-view").inner_text()
        assert page.locator("#story textarea").input_value() == STORY
        page.screenshot(path=str(SHOTS / "13-cold-start.png"), full_page=True)
        page.close()
