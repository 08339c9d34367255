"""Traces and metrics leave over OTLP/HTTP when ``telemetry.otlp_endpoint`` is set."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from proxy.settings import TelemetrySettings
from proxy.telemetry import Telemetry
from tests.conftest import make_settings
from tests.fakes import v2_answer


async def test_spans_and_metrics_reach_an_otlp_collector(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    received: dict[str, int] = {}

    async def collect(request: web.Request) -> web.Response:
        body = await request.read()
        assert request.headers["Content-Type"] == "application/x-protobuf" and body
        received[request.path] = received.get(request.path, 0) + 1
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    app.router.add_post("/v1/metrics", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        ref, cand = await fake(), await fake()
        tel = Telemetry(TelemetrySettings(otlp_endpoint=f"http://127.0.0.1:{port}"))
        settings = make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}])
        proxy = await proxy_factory(settings, telemetry=tel)
        async with aiohttp.ClientSession() as s:
            body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}'
            async with s.post(
                f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer", data=body
            ) as r:
                assert r.status == 200 and await r.read() == v2_answer(body, "m", 0.0)
        assert await proxy.drained(10)
        await proxy.stop()
        # Shutdown flushes the batch span processor and the periodic metric reader; they post
        # from their own threads, so let the loop serve the collector meanwhile.
        import asyncio

        await asyncio.to_thread(tel.shutdown)
        assert received.get("/v1/traces", 0) >= 1
        assert received.get("/v1/metrics", 0) >= 1
    finally:
        await runner.cleanup()
