"""Mirror outcomes at the edges: a reverse copy the reference cannot take, and a reference whose
model config is no config. Each copy a candidate asked for ends in exactly one counted fate."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy.app import ProxyRunner
from tests.conftest import make_settings, wait_until
from tests.fakes import FakeBehaviour, make_app, start_fake
from tests.proxy.test_canary import _canary_settings, _infer, _weight_here


def _fates(proxy: ProxyRunner, candidate: str) -> dict[str, int]:
    """How the copies for ``candidate`` ended so far (skips and storage counts left out)."""
    return {
        outcome: n
        for (name, outcome), n in proxy.telemetry.tally.items()
        if name == candidate and n and not outcome.startswith(("skipped:", "stored"))
    }


async def test_a_reverse_copy_the_reference_cannot_take_is_reference_unavailable(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """The canary at 100% answers live; each answer's copy goes to the reference, which is
    down: clients still get the candidate's answers, and every copy is counted
    ``reference_unavailable`` (not the candidate's ``unavailable``)."""
    ref, ref_runner = await start_fake(FakeBehaviour())
    try:
        cand = await fake()
        settings = _canary_settings(ref.url, cand.url, redis_url, steps=[100], min_samples=10_000)
        proxy = await proxy_factory(settings)

        async def served_by_candidate() -> bool:
            return (await _infer(proxy, 1))[0][1] == "cand"

        await wait_until(served_by_candidate, what="the candidate serving at 100%")
        assert await proxy.drained(10)
    finally:
        await ref_runner.cleanup()
    before = _fates(proxy, "cand")

    answers = await _infer(proxy, 6, first=100)
    assert answers == [(200, "cand")] * 6
    assert await proxy.drained(10)
    after = _fates(proxy, "cand")
    assert {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)} == {
        "reference_unavailable": 6
    }
    assert _weight_here(proxy) == 100  # the reference's outage moved no step


def _config_answers(
    configs: dict[str, Any], asked: list[str]
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware: ``GET /v2/models/{model}/config`` answers 200 with ``configs[model]`` (and
    notes the model in ``asked``)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        parts = request.path.split("/")
        if request.method == "GET" and len(parts) == 5 and parts[4] == "config":
            asked.append(parts[3])
            return web.json_response(configs[parts[3]])
        return await handler(request)

    return middleware


@pytest.fixture
async def odd_config_reference() -> AsyncIterator[tuple[str, list[str]]]:
    """A fake reference whose config route answers 200 with JSON that is no model config: a
    list for model ``listed``, a transaction policy that is a string for ``policy``. (Its URL,
    the models whose config was asked for.)"""
    app = make_app(FakeBehaviour())
    configs = {"listed": [], "policy": {"name": "policy", "model_transaction_policy": "yes"}}
    asked: list[str] = []
    app.middlewares.append(_config_answers(configs, asked))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield f"http://127.0.0.1:{port}", asked
    await runner.cleanup()


async def _send_to(proxy: ProxyRunner, model: str, n: int) -> None:
    """n distinct infer requests to ``model``, each answered 200; then the copies' fates."""
    async with aiohttp.ClientSession() as s:
        for k in range(n):
            body = f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{k}]}}]}}'
            url = f"http://127.0.0.1:{proxy.data_port}/v2/models/{model}/infer"
            async with s.post(url, data=body.encode()) as r:
                assert r.status == 200
    assert await proxy.drained(10)


async def test_a_model_config_that_is_no_object_is_unreadable_and_the_copies_compared(
    odd_config_reference: tuple[str, list[str]],
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
) -> None:
    """A config that is not a JSON object says nothing about state, like a server without the
    route: the model is mirrored and every copy compared (never an ``internal_error``)."""
    ref_url, asked = odd_config_reference
    cand = await fake()
    settings = make_settings(ref_url, redis_url, candidates=[{"name": "c", "url": cand.url}])
    proxy = await proxy_factory(settings)
    for model in ("listed", "policy"):
        await _send_to(proxy, model, 3)
    # Asked once each: the answer is remembered (retried after a while, as for no route).
    assert asked == ["listed", "policy"]
    assert cand.behaviour.calls == 6
    assert _fates(proxy, "c") == {"compared": 6}
