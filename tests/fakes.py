"""Small fake upstreams that stage faults: slow, 5xx, garbage, reset. Real HTTP on loopback.

A fake answers V2 infer requests with a deterministic output computed from the request body, so
the same request to two fakes gives the same answer unless one is told to drift.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import re
import socket
from dataclasses import dataclass, field
from urllib.parse import quote, unquote, urlsplit

import numpy as np
from aiohttp import web


@dataclass
class FakeBehaviour:
    mode: str = "ok"  # ok | slow | error | garbage | reset
    delay_s: float = 0.0
    drift: float = 0.0  # added to every output value: a planted divergence
    noise: float = 0.0  # fresh Gaussian noise of this scale per answer: non-determinism
    noise_seed: int | None = None
    """Draw the noise from this seed and the request body instead of fresh: each instance still
    differs from the others, but a statistical test on its answers gives the same result on
    every run (fresh noise fails a test at the 1% level once a hundred runs)."""
    size: int = 8  # output elements
    calls: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    """The most infer calls it was answering at once."""
    seen_headers: list[dict[str, str]] = field(default_factory=list)
    seen_paths: list[str] = field(default_factory=list)
    hold: asyncio.Event | None = None
    """When set, infer calls are received and counted (``calls``, ``in_flight``) but answered
    only once the test sets this event: a candidate provably still busy when the test looks."""


def v2_answer(
    body: bytes,
    model: str,
    drift: float,
    noise: float = 0.0,
    size: int = 8,
    noise_seed: int | None = None,
) -> bytes:
    seed = int.from_bytes(hashlib.blake2b(body, digest_size=4).digest(), "little")
    values = np.random.default_rng(seed).normal(size=size) + drift
    if noise:
        rng = np.random.default_rng(None if noise_seed is None else [noise_seed, seed])
        values = values + rng.normal(scale=noise, size=size)
    out = {
        "model_name": model,
        "model_version": "1",
        "outputs": [
            {
                "name": "scores",
                "datatype": "FP32",
                "shape": [1, size],
                "data": [float(np.float32(v)) for v in values],
            }
        ],
    }
    return json.dumps(out).encode()


async def model_config(request: web.Request) -> web.Response:
    """A model whose name starts with ``stateful`` is configured for sequence batching, one that
    starts with ``decoupled`` for a decoupled transaction policy, as Triton says; other models
    have no config here (404), as on a server without the route."""
    model = request.match_info["model"]
    if model.startswith("stateful"):
        return web.json_response({"name": model, "sequence_batching": {"max_sequence_idle": 1}})
    if model.startswith("decoupled"):
        return web.json_response({"name": model, "model_transaction_policy": {"decoupled": True}})
    raise web.HTTPNotFound()


def make_app(behaviour: FakeBehaviour) -> web.Application:
    async def infer(request: web.Request) -> web.StreamResponse:
        behaviour.in_flight += 1
        behaviour.peak_in_flight = max(behaviour.peak_in_flight, behaviour.in_flight)
        try:
            return await answer(request)
        finally:
            behaviour.in_flight -= 1

    async def answer(request: web.Request) -> web.StreamResponse:
        behaviour.calls += 1
        behaviour.seen_headers.append(dict(request.headers))
        behaviour.seen_paths.append(request.path)
        body = await request.read()
        if behaviour.hold is not None:
            await behaviour.hold.wait()
        if behaviour.delay_s:
            await asyncio.sleep(behaviour.delay_s)
        if behaviour.mode == "error":
            return web.json_response({"error": "model exploded"}, status=500)
        if behaviour.mode == "garbage":
            return web.Response(body=b"\x00\xffnot json at all", content_type="application/json")
        if behaviour.mode == "reset":
            assert request.transport is not None
            request.transport.abort()  # connection reset mid-request
            return web.Response()
        model = request.match_info["model"]
        return web.Response(
            body=v2_answer(
                body, model, behaviour.drift, behaviour.noise, behaviour.size, behaviour.noise_seed
            ),
            content_type="application/json",
        )

    async def ready(request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def big(request: web.Request) -> web.StreamResponse:
        """A large answer in many chunks, unsized: it must stream through, not buffer."""
        resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await resp.prepare(request)
        for i in range(int(request.query.get("chunks", "64"))):
            await resp.write(bytes([i % 256]) * 65536)
        await resp.write_eof()
        return resp

    async def echo_size(request: web.Request) -> web.Response:
        n = 0
        async for chunk in request.content.iter_any():
            n += len(chunk)
        return web.json_response({"received": n})

    app = web.Application(client_max_size=128 * 1024 * 1024)
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_post("/v2/models/{model}/versions/{v}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    app.router.add_get("/v2/models/{model}/config", model_config)
    app.router.add_get("/big", big)
    app.router.add_put("/upload", echo_size)
    return app


@dataclass
class FakeUpstream:
    url: str
    behaviour: FakeBehaviour


async def start_fake(behaviour: FakeBehaviour) -> tuple[FakeUpstream, web.AppRunner]:
    runner = web.AppRunner(make_app(behaviour), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return FakeUpstream(f"http://127.0.0.1:{port}", behaviour), runner


def refused_url() -> str:
    """A loopback URL where nothing listens: connections are refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


@dataclass
class RawUpstream:
    """An HTTP server that answers every request with the same bytes, framing and all."""

    url: str
    server: asyncio.Server
    connections: int = 0
    requests: int = 0


async def start_raw_upstream(answer: bytes, *, idle_close_s: float | None = None) -> RawUpstream:
    """Answers ``answer`` verbatim; closes the connection after it if the answer has no length
    (read-until-close framing), or when the client is idle for ``idle_close_s``."""
    until_close = b"content-length" not in answer.lower() and b"chunked" not in answer.lower()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw.connections += 1
        try:
            while True:
                async with asyncio.timeout(idle_close_s):
                    head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                raw.requests += 1
                writer.write(answer)
                await writer.drain()
                if until_close:
                    break
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    raw = RawUpstream(f"http://127.0.0.1:{port}", server)
    return raw


def _unix_target(url: str) -> tuple[str, str | None]:
    """(socket path, password) of a ``unix://:PASSWORD@/PATH?db=0`` Redis URL."""
    parts = urlsplit(url)
    return unquote(parts.path), unquote(parts.password) if parts.password else None


@dataclass
class SilentRedis:
    """A TCP server that accepts connections and reads them, never answering a byte: a hung
    Redis (or a black-holed network path), not a refused one. Set ``relay`` and it becomes a
    plain relay to the real Redis behind it (new connections; held ones are closed then)."""

    url: str
    server: asyncio.Server
    target: str
    connections: int = 0
    held: list[asyncio.StreamWriter] = field(default_factory=list)
    _relay: bool = False

    @property
    def relay(self) -> bool:
        return self._relay

    @relay.setter
    def relay(self, on: bool) -> None:
        self._relay = on
        if on:
            for writer in self.held:
                writer.transport.abort()
            self.held.clear()

    def close(self) -> None:
        self.relay = True  # drops the held connections
        self.server.close()


async def start_silent_redis(real_url: str) -> SilentRedis:
    """A silent Redis on a free loopback port, relaying (once told) to the unix-socket Redis at
    ``real_url``; its ``url`` carries that Redis's password."""
    path, password = _unix_target(real_url)

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        silent.connections += 1
        if not silent.relay:
            silent.held.append(writer)
            with contextlib.suppress(ConnectionError):
                while await reader.read(65536):
                    pass  # taken, never answered
            return
        up_reader, up_writer = await asyncio.open_unix_connection(path)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    auth = f":{quote(password, safe='')}@" if password else ""
    silent = SilentRedis(f"redis://{auth}127.0.0.1:{port}/0", server, path)
    return silent
