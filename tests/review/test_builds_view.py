"""The review page's Builds view in headless Chromium, on builds a real proxy recorded.

Three upstreams speak enough of Triton's V2 metadata (``/v2``, the model's versions, its config)
for the proxy to fingerprint them: the reference, an int8 candidate on an L4 pool and the same
int8 version on an A100 pool (siblings). Mid-test the L4 upstream loads version 2 (another
config, no more drift): the proxy notices the answers' new version and records a new build.
Evidence comes from real copies through real Redis; only the golden-set replay runs are written
to the ledger directly (a replay needs a golden set and its own server run).

Screenshots land in /tmp/review_builds*.png for a human to look at.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from aiohttp import web

from proxy.buffer.keys import KeySchema
from proxy.builds.fingerprint import build_id
from proxy.builds.ledger import BuildLedger
from tests.conftest import ADMIN_TOKEN, make_settings, send_infers, wait_until
from tests.fakes import v2_answer
from tests.review import test_browser as tb

N_PER_PHASE = 12
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
EMPTY = "No builds recorded yet: builds appear when a candidate answers its first copy."


class TritonLike:
    """A V2 server with a model ``m`` whose loaded version, config and drift a test changes."""

    def __init__(self, version: str, drift: float, max_batch_size: int) -> None:
        self.version, self.drift, self.max_batch_size = version, drift, max_batch_size
        self.url = ""
        self._runner: web.AppRunner | None = None

    async def start(self) -> TritonLike:
        app = web.Application()
        app.router.add_get("/v2", self._server)
        app.router.add_get("/v2/models/{model}", self._model)
        app.router.add_get("/v2/models/{model}/versions/{v}/config", self._config)
        app.router.add_post("/v2/models/{model}/infer", self._infer)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _server(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "triton-like", "version": "2.51.0", "extensions": ["model_repository"]}
        )

    async def _model(self, request: web.Request) -> web.Response:
        name = request.match_info["model"]
        return web.json_response({"name": name, "versions": [self.version], "platform": "python"})

    async def _config(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": request.match_info["model"], "max_batch_size": self.max_batch_size}
        )

    async def _infer(self, request: web.Request) -> web.Response:
        body, model = await request.read(), request.match_info["model"]
        answer = json.loads(v2_answer(body, model, self.drift))
        answer["model_version"] = self.version
        return web.json_response(answer)


async def _get(base: str, path: str) -> Any:
    async with aiohttp.ClientSession() as s, s.get(base + path, headers=AUTH) as r:
        assert r.status == 200, (path, r.status)
        return await r.json()


async def _record_version_0(redis_url: str, l4: TritonLike) -> None:
    """The version the L4 pool served an hour before this proxy started (another proxy saw it):
    written to the ledger as the proxy's tracker writes it."""
    facts = {
        "upstream": "int8",
        "url": l4.url,
        "model": "m",
        "served": "m",
        "model_map": {},
        "hardware": "L4 x1, int8",
        "server": {"extensions": ["model_repository"], "name": "triton-like", "version": "2.51.0"},
        "version": "0",
        "platform": "python",
        "config": ["max_batch_size = 4", 'name = "m"'],
    }
    client = aioredis.Redis.from_url(redis_url)
    try:
        await BuildLedger(client, KeySchema()).record(
            build_id(facts), facts, "candidate", now=time.time() - 3600
        )
    finally:
        await client.aclose()


async def _record_traffic(proxy: Any, l4: TritonLike, base: str) -> dict[str, str]:
    """Version 1 answers, then version 2 is loaded on the L4 pool and answers; the build ids
    once every build's copies are in the statistics (flushed about once a second)."""
    await send_infers(proxy, [f"v1-{i}" for i in range(N_PER_PHASE)])
    l4.version, l4.drift, l4.max_batch_size = "2", 0.0, 16
    await send_infers(proxy, [f"v2-{i}" for i in range(N_PER_PHASE)], first=N_PER_PHASE)

    async def settled() -> list[dict[str, Any]] | None:
        builds = await _get(base, "/api/builds")
        copies = sorted((b["evidence"] or {}).get("copies", 0) for b in builds)
        return builds if copies == [0, 0, N_PER_PHASE, N_PER_PHASE, 2 * N_PER_PHASE] else None

    builds = await wait_until(settled, timeout_s=20, what="every build's copies counted")
    by = {(b["upstream"], b["version"]): b["id"] for b in builds}
    return {
        "ref": by[("ref", "1")],
        "v0": by[("int8", "0")],
        "v1": by[("int8", "1")],
        "v2": by[("int8", "2")],
        "a100": by[("int8-a100", "1")],
    }


async def _record_replays(redis_url: str, ids: dict[str, str]) -> None:
    """One golden set replayed against both L4 versions: g-2 stops diverging on version 2."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        ledger = BuildLedger(client, KeySchema())
        for n, (build, g2_diverges) in enumerate(((ids["v1"], True), (ids["v2"], False))):
            samples = [
                {"sample": "g-1", "label": "regression", "diverges": True},
                {"sample": "g-2", "label": "regression", "diverges": g2_diverges},
                {"sample": "g-3", "label": "acceptable", "diverges": False},
            ]
            await ledger.add_replay(
                build,
                {
                    "ts": 1_800_000_000 + n,
                    "build": build,
                    "golden_id": "golden0001",
                    "golden_size": 3,
                    "by_label": {
                        "regression": {
                            "still_diverges": 1 + g2_diverges,
                            "now_matches": 1 - g2_diverges,
                        },
                        "acceptable": {"now_matches": 1},
                    },
                    "still_diverging": 1 + g2_diverges,
                    "samples": samples,
                },
            )
    finally:
        await client.aclose()


def _row(page: Any, build: str) -> Any:
    return page.locator(f'#builds-content tr[data-build="{build}"]')


async def _empty_then_unavailable(page: Any) -> None:
    await page.keyboard.press("b")
    await tb.expect(page.locator("#builds-view")).to_be_visible()
    await tb.expect(page.locator("#tab-builds")).to_have_class("tab active")
    await tb.expect(page.locator("#builds-content")).to_have_text(EMPTY)

    async def unavailable(route: Any) -> None:
        await route.fulfill(status=503, json={"error": "builds unavailable: Redis went away"})

    await page.route("**/api/builds", unavailable)
    await page.click("#builds-refresh")
    error = page.locator("#builds-error")
    await tb.expect(error).to_be_visible()
    await tb.expect(error).to_contain_text("Could not load builds: builds unavailable")
    await page.unroute("**/api/builds", unavailable)


async def _timeline(page: Any, ids: dict[str, str]) -> None:
    await page.click("#builds-refresh")
    await tb.expect(page.locator("#builds-error")).to_be_hidden()
    await tb.expect(page.locator("#builds-content tr[data-build]")).to_have_count(5)
    await tb.expect(page.locator("#builds-info")).to_have_text("5 builds of 1 model")
    # an hour of history: the lanes show when each build was seen
    await tb.expect(page.locator("#builds-content svg.lanes")).to_have_count(1)
    for text in ("L4 x1, int8", "replaced", "no copies compared yet"):
        await tb.expect(_row(page, ids["v0"])).to_contain_text(text)
    ref, v1, v2, a100 = (_row(page, ids[k]) for k in ("ref", "v1", "v2", "a100"))
    for text in ("reference", "A100 x1", "serves now", "compared against, not judged"):
        await tb.expect(ref).to_contain_text(text)
    # version 1 on the L4 pool: replaced by version 2, every copy flagged (drift 0.5)
    for text in ("candidate", "L4 x1, int8", "replaced", str(N_PER_PHASE), "100%"):
        await tb.expect(v1).to_contain_text(text)
    for text in ("L4 x1, int8", "serves now", "0.0%", "p50 0 · p99 0"):
        await tb.expect(v2).to_contain_text(text)
    for text in ("A100 x2, int8", "serves now", str(2 * N_PER_PHASE)):
        await tb.expect(a100).to_contain_text(text)
    # in the order they were first seen: version 0, the reference and two pools, version 2
    order = await page.locator("#builds-content tr[data-build]").evaluate_all(
        "rows => rows.map(r => r.dataset.build)"
    )
    assert order[0] == ids["v0"] and order[4] == ids["v2"], order

    # the same version on the other pool is a sibling; version 2 and the reference are not
    notes = page.locator("#builds-content tr.sibling-note")
    await tb.expect(notes).to_have_count(2)
    await tb.expect(notes.nth(0)).to_contain_text("same version on other hardware")
    texts = await notes.all_text_contents()
    assert sum("int8-a100 v1 (A100 x2, int8)" in x for x in texts) == 1, texts
    assert sum("int8 v1 (L4 x1, int8)" in x for x in texts) == 1, texts
    await tb.expect(page.locator("#builds-content tr.sibling")).to_have_count(2)
    await page.screenshot(path=str(tb.SHOTS / "review_builds.png"), full_page=True)


async def _diff_of_versions(page: Any, ids: dict[str, str]) -> None:
    await tb.expect(page.locator("#builds-compare")).to_be_disabled()
    await _row(page, ids["v2"]).locator("input.pick").check()
    await tb.expect(page.locator("#builds-picked")).to_contain_text("tick one more")
    await _row(page, ids["v1"]).locator("input.pick").check()
    await page.click("#builds-compare")
    diff_url = f"#/builds/diff/{ids['v1']}/{ids['v2']}"
    await tb.expect(page).to_have_url(page.url.split("#")[0] + diff_url)
    # the older build is the baseline, whichever was ticked first
    await tb.expect(page.locator("#diff-title")).to_have_text(
        "m: int8 v1 (L4 x1, int8) → int8 v2 (L4 x1, int8)"
    )
    version = page.locator('tr[data-field="version"]')
    await tb.expect(version.locator("td")).to_have_text(["1", "2"])
    await tb.expect(page.locator('tr[data-field="hardware"]')).to_have_count(0)
    config = page.locator("pre.config-diff")
    await tb.expect(config).to_contain_text("- max_batch_size = 8")
    await tb.expect(config).to_contain_text("+ max_batch_size = 16")
    rate = page.locator("#diff-rate-test")
    await tb.expect(rate).to_contain_text("differs at p < 0.05")
    await tb.expect(rate).to_contain_text("p = ")
    await tb.expect(rate).to_contain_text("B - A: -100%")
    await tb.expect(page.locator("#diff-sev-test")).to_contain_text("differs at p < 0.05")
    await tb.expect(page.locator("#diff-rate-row")).to_contain_text("100%")
    golden = page.locator("table.golden tbody tr")
    await tb.expect(golden).to_have_count(1)
    await tb.expect(golden).to_have_text("g-2regressiondivergesmatches")
    await page.screenshot(path=str(tb.SHOTS / "review_builds_diff.png"), full_page=True)


async def _diff_of_siblings(page: Any, ids: dict[str, str]) -> None:
    await page.keyboard.press("Escape")  # back to every build
    await tb.expect(page.locator("#builds-content tr[data-build]")).to_have_count(5)
    # neither pool of the better builds flags anything: no significant change between them
    for k in ("v1", "v2", "a100"):
        await _row(page, ids[k]).locator("input.pick").set_checked(k != "v1")
    await page.click("#builds-compare")
    await tb.expect(page.locator('tr[data-field="hardware"] td')).to_have_text(
        ["A100 x2, int8", "L4 x1, int8"]
    )
    await tb.expect(page.locator('tr[data-field="version"] td')).to_have_text(["1", "2"])
    await tb.expect(page.locator("#diff-rate-test")).to_contain_text("no significant change")
    # a sibling's "compare" link: the same version on the two pools
    await page.keyboard.press("Escape")
    await page.locator("#builds-content tr.sibling-note").first.get_by_text("compare").click()
    await _siblings_shown(page)
    # a comparison's address opens it again (a link a reviewer shares)
    await page.reload()
    await _siblings_shown(page)


async def _siblings_shown(page: Any) -> None:
    hardware = page.locator('tr[data-field="hardware"] td')
    await tb.expect(hardware).to_have_count(2)
    assert sorted(await hardware.all_text_contents()) == ["A100 x2, int8", "L4 x1, int8"]
    await tb.expect(page.locator('tr[data-field="version"]')).to_have_count(0)
    await tb.expect(page.locator("#diff-rate-test")).to_contain_text("differs at p < 0.05")


async def _detail(page: Any, ids: dict[str, str]) -> None:
    await page.click("#tab-builds")  # within the Builds view: back to every build
    await _row(page, ids["v1"]).locator("a.build-link").click()
    await tb.expect(page.locator("#build-title")).to_have_text("m · int8 v1 (L4 x1, int8)")
    facts = page.locator("#builds-content table.facts")
    for text in ("hardware", "L4 x1, int8", "triton-like", "2.51.0", "platform", "python"):
        await tb.expect(facts).to_contain_text(text)
    await tb.expect(page.locator("details.config summary")).to_have_text("model config (2 lines)")
    content = page.locator("#builds-content")
    await tb.expect(content).to_contain_text(f"{N_PER_PHASE} copies compared")
    await tb.expect(content.locator("table.population").first).to_contain_text("scores")
    await tb.expect(content.locator("p.labels")).to_contain_text(f"unlabelled {N_PER_PHASE}")
    await tb.expect(content).to_contain_text("golden0001")
    replays = "acceptable: 1 now match · regression: 2 still diverge"
    await tb.expect(content).to_contain_text(replays)
    await tb.expect(content).to_contain_text("(this build)")
    events = content.locator("table.population").last.locator("tbody tr")
    await tb.expect(events).to_have_count(3)  # v0 (by hand), then v1 replacing it, then v2
    await tb.expect(events.nth(0)).to_contain_text("int8 v2 (L4 x1, int8)")
    await tb.expect(events.nth(1)).to_contain_text("int8 v0 (L4 x1, int8)")
    await page.screenshot(path=str(tb.SHOTS / "review_builds_detail.png"), full_page=True)
    # the reference's detail: its fingerprint, and no verdict of its own
    await page.keyboard.press("Escape")
    await _row(page, ids["ref"]).locator("a.build-link").click()
    await tb.expect(page.locator("#build-title")).to_have_text("m · ref v1 (A100 x1)")
    await tb.expect(content).to_contain_text("The reference is what candidates are compared")
    await page.keyboard.press("Escape")
    await page.keyboard.press("Escape")
    await tb.expect(page.locator("#list-view")).to_be_visible()


async def test_builds_view_timeline_siblings_diff_and_detail(
    proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    if tb.MISSING is not None:
        pytest.fail(f"CI needs the browser test, but {tb.MISSING}")
    ref = await TritonLike("1", 0.0, 8).start()
    l4 = await TritonLike("1", 0.5, 8).start()
    a100 = await TritonLike("1", 0.0, 8).start()
    try:
        admin = {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN, "users": tb.USERS}
        proxy = await proxy_factory(
            make_settings(
                ref.url,
                redis_url,
                reference={"name": "ref", "url": ref.url, "hardware": "A100 x1"},
                candidates=[
                    {"name": "int8", "url": l4.url, "hardware": "L4 x1, int8"},
                    {"name": "int8-a100", "url": a100.url, "hardware": "A100 x2, int8"},
                ],
                admin=admin,
            )
        )
        base = f"http://127.0.0.1:{proxy.admin_port}"
        page_errors: list[str] = []
        foreign: list[str] = []
        async with tb.async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=tb.CHROMIUM, args=tb.CHROMIUM_ARGS)
            try:
                context = await browser.new_context(viewport={"width": 1400, "height": 1000})
                page = await context.new_page()
                tb._watch(page, base, page_errors, foreign)
                # a viewer: the Builds view only reads
                await tb._login(page, base, "viewer-token-0123456")
                await _empty_then_unavailable(page)
                await _record_version_0(redis_url, l4)
                ids = await _record_traffic(proxy, l4, base)
                await _record_replays(redis_url, ids)
                await _timeline(page, ids)
                await _diff_of_versions(page, ids)
                await _diff_of_siblings(page, ids)
                await _detail(page, ids)
                await context.close()
            finally:
                await browser.close()
    finally:
        for upstream in (ref, l4, a100):
            await upstream.stop()
    assert page_errors == []
    assert foreign == []
