"""The review page end to end in headless Chromium: log in, triage with the keyboard, label.

The proxy runs in the test's event loop, so the browser is driven with Playwright's async API.
Screenshots land in /tmp/review_list.png and /tmp/review_sample.png for a human to look at.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ADMIN_TOKEN, IN_CI, make_settings, send_infers

# Found as `make chromium` finds it (`command -v chromium`): the first `chromium` on PATH, so the
# Makefile never reports a browser this test then cannot find, or the reverse.
CHROMIUM = shutil.which("chromium")
# Locally a missing browser skips the test; under CI it fails, so CI never passes without it.


def _browser_missing() -> str | None:
    if importlib.util.find_spec("playwright") is None:
        return "playwright is not installed (pip install playwright)"
    if CHROMIUM is None:
        return "no `chromium` on PATH (apt-get install chromium, or make chromium)"
    return None


MISSING = _browser_missing()
if MISSING is not None and not IN_CI:
    pytest.skip(MISSING, allow_module_level=True)
if MISSING is None:
    playwright_api = pytest.importorskip("playwright.async_api")
    async_playwright = playwright_api.async_playwright
    expect = playwright_api.expect

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
USERS = [
    {"name": "vera", "token": "viewer-token-0123456", "role": "viewer"},
    {"name": "rita", "token": "reviewer-token-0123456", "role": "reviewer"},
]
N_REQUESTS = 5
SHOTS = Path("/tmp")


async def _proxy_with_flagged_samples(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> Any:
    ref, drifted = await fake(), await fake(drift=0.5)
    admin = {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN, "users": USERS}
    proxy = await proxy_factory(
        make_settings(
            ref.url, redis_url, candidates=[{"name": "int8", "url": drifted.url}], admin=admin
        )
    )
    await send_infers(proxy, [f"req-{i}" for i in range(N_REQUESTS)])
    return proxy


async def _login(page: Any, base: str, token: str) -> None:
    """Open /review without a session: the login form (401); sign in; the list loads."""
    resp = await page.goto(f"{base}/review")
    assert resp is not None and resp.status == 401
    await expect(page.locator("#login-form")).to_be_visible()
    await page.fill("#login-token", token)
    await page.click("#login-submit")
    await expect(page.locator("#list-view")).to_be_visible()


async def _sample_shown(page: Any, sample_id: str) -> None:
    view = page.locator(f'#sample-view[data-sample-id="{sample_id}"]:not(.loading)')
    await expect(view).to_be_visible()


async def _label_of(page: Any, base: str, sample_id: str) -> Any:
    """Read through the API with the browser's own session cookie."""
    resp = await page.request.get(f"{base}/api/samples/{sample_id}")
    assert resp.status == 200
    return (await resp.json())["label"]


async def _reviewer_triages(page: Any, base: str) -> str:
    await _login(page, base, "reviewer-token-0123456")
    await expect(page.locator("#who")).to_contain_text("rita")
    await expect(page.locator("#who")).to_contain_text("reviewer")
    rows = page.locator("#samples-body tr")
    await expect(rows).to_have_count(N_REQUESTS)
    await expect(page.locator("#list-count")).to_contain_text(f"of {N_REQUESTS} flagged")
    first, second = [await rows.nth(i).get_attribute("data-id") for i in range(2)]
    assert first and second and first != second

    # Enter opens the selected (first) sample: both sides, the reason, scores and a plot.
    await page.keyboard.press("Enter")
    await _sample_shown(page, first)
    await expect(page.locator("#side-reference")).to_contain_text("Reference")
    await expect(page.locator("#side-reference")).to_contain_text("latency")
    await expect(page.locator("#side-candidate")).to_contain_text("int8")
    await expect(page.locator("#sample-reason")).not_to_be_empty()
    await expect(page.locator("#scores")).to_contain_text("scores")
    await expect(page.locator("#plots svg").first).to_be_visible()
    await expect(page.locator("#request")).to_contain_text('"inputs"')
    await expect(page.locator("#label-panel .lbl").first).to_be_enabled()
    await page.screenshot(path=str(SHOTS / "review_sample.png"), full_page=True)

    # r labels it a regression and moves on to the next sample.
    await page.keyboard.press("r")
    await _sample_shown(page, second)
    label = await _label_of(page, base, first)
    assert label["verdict"] == "regression" and label["by"] == "rita"

    # Typing in the note box is not a shortcut.
    await page.click("#label-note")
    await page.keyboard.type("ran")
    await expect(page.locator("#label-note")).to_have_value("ran")
    assert await _label_of(page, base, second) is None
    await page.keyboard.press("Escape")  # leaves the box
    await page.keyboard.press("k")
    await _sample_shown(page, first)
    await expect(page.locator("#label-current")).to_contain_text("regression")
    await expect(page.locator("#label-current")).to_contain_text("rita")
    return first


async def _still_labelled_after_reload(page: Any, first: str) -> None:
    await page.reload()
    await expect(page.locator("#who")).to_contain_text("rita")  # the session cookie held
    await page.keyboard.press("Escape")
    await expect(page.locator("#list-view")).to_be_visible()
    rows = page.locator("#samples-body tr")
    await expect(rows).to_have_count(N_REQUESTS)
    assert await rows.first.get_attribute("data-id") == first
    await expect(rows.first.locator(".c-label")).to_have_text("regression")
    await page.screenshot(path=str(SHOTS / "review_list.png"))


async def _viewer_is_read_only(page: Any, base: str, first: str) -> None:
    await _login(page, base, "viewer-token-0123456")
    await expect(page.locator("#who")).to_contain_text("viewer")
    await expect(page.locator("#samples-body tr")).to_have_count(N_REQUESTS)
    await page.keyboard.press("Enter")
    await _sample_shown(page, first)
    for button in await page.locator("#label-panel .lbl").all():
        await expect(button).to_be_disabled()
    await expect(page.locator("#label-readonly")).to_be_visible()
    await page.keyboard.press("a")
    await expect(page.locator("#toast")).to_contain_text("Viewers can't label")
    assert (await _label_of(page, base, first))["verdict"] == "regression"
    # and the server agrees, with or without the CSRF header
    script = """async ([id, csrf]) => {
        const post = (headers) => fetch(`/api/samples/${id}/label`, {
            method: "POST", credentials: "same-origin",
            headers: {"Content-Type": "application/json", ...headers},
            body: JSON.stringify({verdict: "acceptable"})}).then((r) => r.status);
        return [await post({}), await post({"X-CSRF-Token": csrf})];
    }"""
    me = await (await page.request.get(f"{base}/api/me")).json()
    assert await page.evaluate(script, [first, me["csrf"]]) == [403, 403]


def _watch(page: Any, base: str, page_errors: list[str], foreign: list[str]) -> None:
    """Collect the page's script errors, and every request that leaves the admin plane."""
    page.on("pageerror", lambda exc: page_errors.append(str(exc)))
    page.on(
        "request",
        lambda req: None if req.url.startswith((base, "data:")) else foreign.append(req.url),
    )


async def test_review_page_login_triage_label_and_viewer(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    if MISSING is not None:
        pytest.fail(f"CI needs the browser test, but {MISSING}")
    proxy = await _proxy_with_flagged_samples(fake, proxy_factory, redis_url)
    base = f"http://127.0.0.1:{proxy.admin_port}"
    page_errors: list[str] = []
    foreign: list[str] = []

    def watch(page: Any) -> None:
        _watch(page, base, page_errors, foreign)

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            reviewer = await browser.new_context(viewport={"width": 1400, "height": 1000})
            page = await reviewer.new_page()
            watch(page)
            first = await _reviewer_triages(page, base)
            await _still_labelled_after_reload(page, first)
            await reviewer.close()

            viewer = await browser.new_context(viewport={"width": 1400, "height": 1000})
            page = await viewer.new_page()
            watch(page)
            await _viewer_is_read_only(page, base, first)
            await viewer.close()
        finally:
            await browser.close()
    assert page_errors == []
    assert foreign == []  # works offline: no CDN, no external URL
