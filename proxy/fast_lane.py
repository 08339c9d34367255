"""The fast lane: infer calls and reads served on a bare asyncio protocol, the rest by aiohttp.

Nearly all live traffic is ``POST /v2/models/{m}/infer`` with a sized body of a few KiB, plus
health and metadata reads. Through aiohttp's server and client each request cost about 0.9 ms of
CPU in the live process, which on a 2-core host capped the proxy near 1,200 requests/s. The fast
lane takes exactly those requests (HTTP/1.1; an infer call with one Content-Length up to
``_FAST_BODY``, or a GET of a read route without a body; no Expect, Upgrade or Transfer-Encoding;
not part of a canary split) and forwards them with one parse of each head (llhttp, through
``httptools``) and one write each way, through ``UpstreamPool``.

Anything else on a connection, from the first request that does not qualify on, is handed to
aiohttp's server (the data app, ``LiveProxy``) together with every byte not yet served, so
unusual requests get the full, strict HTTP implementation, and the fast lane never has to be one.
What a client sees is the same either way: the reference's status, reason, end-to-end headers
and body, V2 errors naming the upstream, the same mirroring, metrics and spans.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import cast

from multidict import CIMultiDict

from .analysis import Exchange
from .errors import UpstreamError
from .forwarding import REQUEST_DROP, end_to_end, server_span
from .http1 import Head, error_bytes, may_be_fast, parse_head, render
from .mirror_api import Mirror, MirrorRequest
from .routes import RouteKind
from .settings import Settings
from .telemetry import Telemetry
from .upstream_pool import Answer, UpstreamPool

log = logging.getLogger("shadowproxy.forward")

# Request heads beyond this go to aiohttp, which answers them as its limits say.
_MAX_HEAD = 64 * 1024
# Infer bodies up to this size are fast (read whole: a mirrored body is needed whole anyway);
# larger ones stream through aiohttp.
_FAST_BODY = 16 * 1024 * 1024
# A client pipelining this far ahead of its answers is not read from until they are out.
_PIPELINE_LIMIT = 2 * 1024 * 1024
# A client connection idle this long is closed (aiohttp's keep-alive timeout).
_IDLE_TIMEOUT_S = 75.0


class FastLane:
    """What the fast lane does with one request: the same as ``LiveProxy`` for an infer call."""

    def __init__(
        self, settings: Settings, pool: UpstreamPool, scheduler: Mirror, telemetry: Telemetry
    ) -> None:
        self.settings = settings
        self.max_body = min(_FAST_BODY, settings.proxy.max_body_bytes)
        self._mirrors = settings.mirrors
        self._pool = pool
        self._scheduler = scheduler
        self._tel = telemetry

    async def answer(self, head: Head, body: bytes, send: Callable[[bytes], None]) -> None:
        """Forward the request, ``send`` the answer the moment it is here, then account for it."""
        loop = asyncio.get_running_loop()
        infer = head.route.kind is RouteKind.INFER
        model = head.route.model or ""
        mirror = infer and self._mirrors(model) and self._scheduler.admit(model, head.headers)
        headers = end_to_end(head.headers, REQUEST_DROP)
        copy_headers = headers.copy() if mirror else headers
        span_cm, traced = server_span(
            self._tel, f"{head.method} {head.route.kind.value}", head.headers
        )
        with span_cm as span:
            if traced:
                self._tel.propagator.inject(headers)
            future: asyncio.Future[Exchange | None] | None = None
            if mirror:
                future = loop.create_future()
                copy = MirrorRequest(
                    route=head.route,
                    query=head.target.partition("?")[2],
                    headers=copy_headers,
                    body=body,
                    received_at=time.time(),
                    live_span=span.get_span_context() if traced else None,
                    reference=future,
                )
                # Handed over once the live call is on the wire: the client does not wait for it.
                loop.call_soon(self._scheduler.offer, copy)
            started = time.perf_counter()
            try:
                answer = await self._pool.request(self._request_bytes(head, headers, body))
            except BaseException as exc:
                if future is not None:
                    future.set_result(None)  # the copy is dropped: there is nothing to compare
                if not isinstance(exc, UpstreamError):
                    raise
                send(error_bytes(exc, not head.keep_alive))
                log.warning("live request %s %s failed: %s", head.method, head.target, exc)
                span.set_attribute("http.response.status_code", exc.status)
                self._tel.request(head.route.kind.value, exc.status)
                return
            latency = time.perf_counter() - started
            send(
                render(
                    answer.status, answer.reason, answer.headers, answer.body, not head.keep_alive
                )
            )
            self._tel.latency("reference", self._pool.name, latency)
            if future is not None:
                future.set_result(self._exchange(answer, latency))
            span.set_attribute("http.response.status_code", answer.status)
            self._tel.request(head.route.kind.value, answer.status)

    def _request_bytes(self, head: Head, headers: CIMultiDict[str], body: bytes) -> list[bytes]:
        lines = [f"{head.method} {head.target} HTTP/1.1\r\n".encode("latin-1")]
        lines += [b"Host: ", self._pool.host_header, b"\r\n"]
        lines.extend(f"{k}: {v}\r\n".encode("latin-1") for k, v in headers.items())
        if head.method != "GET":
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        return [b"".join(lines), body] if body else [b"".join(lines)]

    def _exchange(self, answer: Answer, latency: float) -> Exchange:
        headers = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in answer.headers)
        return Exchange(self._pool.name, answer.status, headers, answer.body, latency)


class FastLaneProtocol(asyncio.Protocol):
    """One client connection: fast-lane requests in order, then possibly aiohttp for the rest."""

    def __init__(self, server: FastLaneServer) -> None:
        self._server = server
        self._lane = server.lane
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._head: Head | None = None
        self._head_len = 0
        self._busy = False
        self._paused = False
        self.closing = False
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None

    def eof_received(self) -> bool | None:
        # A client that half-closes after its request still gets the answer.
        return self._busy or None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        self.last_active = time.monotonic()
        if not self._busy:
            self._next()
        elif len(self._buf) > _PIPELINE_LIMIT and not self._paused:
            self._paused = True  # a client pipelining far ahead waits for its answers
            assert self._transport is not None
            self._transport.pause_reading()

    def _next(self) -> None:
        """Serve the buffered request if it is whole, or give the connection to aiohttp."""
        if self._head is None:
            if not may_be_fast(self._buf):
                self._hand_over()  # not for the fast lane: no need to wait for the whole head
                return
            end = self._buf.find(b"\r\n\r\n")
            if end < 0:
                if len(self._buf) > _MAX_HEAD or b"\n\n" in self._buf:
                    self._hand_over()  # too long, or lines ended by bare LFs: aiohttp decides
                return
            self._head_len = end + 4
            self._head = parse_head(
                bytes(self._buf[: self._head_len]), self._lane.settings, self._lane.max_body
            )
            if self._head is None:
                self._hand_over()
                return
        total = self._head_len + self._head.content_length
        if len(self._buf) < total:
            return
        head = self._head
        with memoryview(self._buf) as view:
            body = bytes(view[self._head_len : total])  # one copy, even of 16 MiB
        del self._buf[:total]
        self._head = None
        self._busy = True
        task = asyncio.get_running_loop().create_task(self._serve(head, body))
        self._server.tasks.add(task)
        task.add_done_callback(self._server.tasks.discard)

    async def _serve(self, head: Head, body: bytes) -> None:
        sent = False

        def send(data: bytes) -> None:
            nonlocal sent
            sent = True
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(data)

        try:
            await self._lane.answer(head, body, send)
        except Exception:
            log.exception("fast lane: %s %s failed inside the proxy", head.method, head.target)
            if not sent:
                send(render(500, b"", [], b"", True))
            head.keep_alive = False
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        self._busy = False
        self.last_active = time.monotonic()
        if not head.keep_alive or self.closing:
            transport.close()
            return
        if self._paused:
            self._paused = False
            transport.resume_reading()
        if self._buf:
            self._next()

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, starting with the bytes not yet served."""
        transport = self._transport
        if transport is None:
            return
        self._server.connections.discard(self)
        handler = self._server.fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            handler.data_received(data)
        if self._paused:
            transport.resume_reading()
        self._transport = None

    def close_if_idle(self) -> None:
        if not self._busy and self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()


class FastLaneServer:
    """The data port's listener; owned by ``ProxyRunner``, which stops it before the apps."""

    def __init__(self, lane: FastLane, fallback: Callable[[], asyncio.Protocol]) -> None:
        self.lane = lane
        self.fallback = fallback
        self.connections: set[FastLaneProtocol] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        """Requests being served (held here too: the loop keeps only weak references)."""
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FastLaneProtocol(self), host, port, reuse_port=reuse_port or None, backlog=1024
        )
        self._sweeper = loop.create_task(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Close connections idle past the keep-alive timeout (one timer for all of them)."""
        while True:
            await asyncio.sleep(_IDLE_TIMEOUT_S / 10)
            cutoff = time.monotonic() - _IDLE_TIMEOUT_S
            for conn in list(self.connections):
                if conn.last_active < cutoff:
                    conn.close_if_idle()

    async def close(self, timeout_s: float) -> None:
        """Stop accepting, let requests in flight get their answers, then close."""
        if self._server is None:
            return
        self._server.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for conn in list(self.connections):
            conn.closing = True
            conn.close_if_idle()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout_s)
        for conn in list(self.connections):
            conn.abort()
        self._server = None
