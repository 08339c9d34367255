"""A minimal, fast KServe V2 server for load tests, run as its own process.

``python -m loadtest.fake_backend --port P [--delay-ms 200] [--no-model-config]``

- ``POST /v2/models/{model}[/versions/{v}]/infer``: a fixed small V2 answer (one 1x8 FP32
  output), after ``--delay-ms`` when given (the slow candidate).
- ``GET /v2/health/ready``: 200.
- ``GET /v2/models/{model}/config``: a minimal Triton-style config without sequence batching
  (``--no-model-config`` answers 404 instead, as KServe or vLLM servers do).
- ``GET /loadtest/stats``: request counts by route, so a benchmark can check what arrived.

The process exits on its own when its parent dies, so a killed benchmark leaves no server behind.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Sequence

from aiohttp import web

OUTPUT_VALUES = (0.125, -0.5, 1.0, 0.25, -1.75, 2.5, 0.0, 3.0)


def v2_answer(model: str) -> bytes:
    """The fixed V2 infer answer: one FP32 output of shape [1, 8]."""
    out = {
        "model_name": model,
        "model_version": "1",
        "outputs": [
            {"name": "OUTPUT0", "datatype": "FP32", "shape": [1, 8], "data": list(OUTPUT_VALUES)}
        ],
    }
    return json.dumps(out, separators=(",", ":")).encode()


def model_config(model: str) -> bytes:
    """What Triton's ``/v2/models/{model}/config`` says, reduced to what the proxy reads."""
    config = {"name": model, "platform": "python", "max_batch_size": 0, "backend": "python"}
    return json.dumps(config, separators=(",", ":")).encode()


def make_app(delay_s: float, serve_config: bool) -> web.Application:
    counts: Counter[str] = Counter()
    answers: dict[str, bytes] = {}

    async def infer(request: web.Request) -> web.Response:
        counts["infer"] += 1
        await request.read()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        model = request.match_info["model"]
        body = answers.get(model)
        if body is None:
            body = answers[model] = v2_answer(model)
        return web.Response(body=body, content_type="application/json")

    async def ready(request: web.Request) -> web.Response:
        counts["ready"] += 1
        return web.Response(status=200)

    async def config(request: web.Request) -> web.Response:
        counts["config"] += 1
        if not serve_config:
            return web.json_response({"error": "no model config endpoint"}, status=404)
        return web.Response(
            body=model_config(request.match_info["model"]), content_type="application/json"
        )

    async def stats(request: web.Request) -> web.Response:
        return web.json_response(dict(counts))

    # Room for the benchmark's 1 MiB tensors (aiohttp refuses bodies over 1 MiB by default).
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_post("/v2/models/{model}/versions/{v}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{model}/config", config)
    app.router.add_get("/loadtest/stats", stats)
    app.cleanup_ctx.append(_exit_with_parent)
    return app


async def _exit_with_parent(app: web.Application) -> AsyncIterator[None]:
    parent = os.getppid()

    async def watch() -> None:
        while True:
            await asyncio.sleep(1.0)
            if os.getppid() != parent:
                os._exit(0)

    task = asyncio.get_running_loop().create_task(watch())
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m loadtest.fake_backend", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0, help="answer infer after this")
    parser.add_argument(
        "--no-model-config", action="store_true", help="answer 404 to /v2/models/{m}/config"
    )
    args = parser.parse_args(argv)
    loop: asyncio.AbstractEventLoop
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    app = make_app(args.delay_ms / 1000.0, serve_config=not args.no_model_config)
    web.run_app(
        app, host=args.host, port=args.port, access_log=None, print=None, loop=loop, backlog=1024
    )


if __name__ == "__main__":
    main()
