"""The fast lane: infer calls and reads served on a bare asyncio protocol, the rest by aiohttp.

Nearly all live traffic is ``POST /v2/models/{m}/infer`` with a sized body of a few KiB, plus
health and metadata reads. Through aiohttp's server and client each request cost about 0.9 ms of
CPU in the live process, which on a 2-core host capped the proxy near 1,200 requests/s. The fast
lane takes exactly those requests (HTTP/1.1; an infer call with one Content-Length up to
``_FAST_BODY``, or a GET of a read route without a body; no Expect, Upgrade or Transfer-Encoding;
not part of a canary split) and forwards them with one parse of each head (llhttp, through
``httptools``) and one write each way, through ``UpstreamPool``. LLM calls (Triton generate,
OpenAI-compatible) come this way too, their answers relayed as they stream (``StreamRelay``).
Connections, and their bounds against hostile clients, are ``fast_lane_server.py``'s.

Anything else on a connection, from the first request that does not qualify on, is handed to
aiohttp's server (the data app, ``LiveProxy``) together with every byte not yet served, so
unusual requests get the full, strict HTTP implementation, and the fast lane never has to be one.
What a client sees is the same either way: the reference's status, reason, end-to-end headers
and body, V2 errors naming the upstream, the same mirroring, metrics and spans.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from multidict import CIMultiDict
from opentelemetry.trace import Span

from ..errors import UpstreamError
from ..protocols.v2_rest.routes import LLM, MIRRORED, RouteKind
from ..settings import Settings
from ..shadow.analysis import Exchange
from ..shadow.mirror_api import Mirror, MirrorRequest
from ..telemetry import Telemetry
from .forwarding import REQUEST_DROP, end_to_end, server_span
from .http1 import Head, error_bytes, render
from .stream_relay import StreamRelay
from .upstream_pool import Answer, UpstreamPool

log = logging.getLogger("shadowproxy.forward")

# Infer bodies up to this size are fast (read whole: a mirrored body is needed whole anyway);
# larger ones stream through aiohttp.
_FAST_BODY = 16 * 1024 * 1024


class CutStream(Exception):
    """A streamed answer failed after its head was sent: the connection must be cut."""


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

    def reload(self, settings: Settings) -> None:
        """Mirror what a reloaded config's candidates shadow (``proxy.*`` keep running values)."""
        self._mirrors = settings.mirrors

    async def answer(
        self,
        head: Head,
        body: bytes,
        send: Callable[[bytes], None],
        relay: Callable[[StreamRelay | None], None] | None = None,
    ) -> None:
        """Forward the request, ``send`` the answer the moment it is here, then account for it.
        An LLM call's answer is relayed as it streams in (``relay`` is told of the relay, so the
        connection can pause it while the client does not read)."""
        loop = asyncio.get_running_loop()
        kind = head.route.kind
        model = head.route.model or ""
        mirror = (
            kind in MIRRORED
            # An OpenAI call names its model in the body (None here), read by the shadow side.
            and self._mirrors(head.route.model)
            and self._scheduler.admit(model, head.headers)
        )
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
            if kind in LLM:
                await self._stream(head, headers, body, send, future, span, relay)
                return
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

    async def _stream(
        self,
        head: Head,
        headers: CIMultiDict[str],
        body: bytes,
        send: Callable[[bytes], None],
        future: asyncio.Future[Exchange | None] | None,
        span: Span,
        on_relay: Callable[[StreamRelay | None], None] | None,
    ) -> None:
        """An LLM call: its answer relayed as it is read, teed for the copy."""
        started = time.perf_counter()
        tee = self.settings.proxy.max_answer_bytes if future is not None else None
        relay = StreamRelay(send, not head.keep_alive, tee, started)
        if on_relay is not None:
            on_relay(relay)
        try:
            await self._pool.request(self._request_bytes(head, headers, body), sink=relay)
        except BaseException as exc:
            if future is not None and not future.done():
                # A cancelled call (the client left) leaves an incomplete answer: recorded as
                # such, never compared. Any other failure leaves nothing to compare.
                cancelled = isinstance(exc, asyncio.CancelledError) and relay.sent_head
                partial = relay.exchange(self._pool.name, complete=False) if cancelled else None
                future.set_result(partial)
            if not isinstance(exc, UpstreamError):
                raise
            if relay.sent_head:
                # The status is sent: a failure now can only cut the connection, as the
                # reference's own would for a direct client.
                head.keep_alive = False
                raise CutStream from exc
            send(error_bytes(exc, not head.keep_alive))
            log.warning("live request %s %s failed: %s", head.method, head.target, exc)
            span.set_attribute("http.response.status_code", exc.status)
            self._tel.request(head.route.kind.value, exc.status)
            return
        finally:
            if on_relay is not None:
                on_relay(None)
        relay.finish()
        latency = time.perf_counter() - started
        self._tel.latency("reference", self._pool.name, latency)
        if future is not None:
            # Past the tee's cap the copy has no whole answer (None): reference_failed.
            future.set_result(relay.exchange(self._pool.name, complete=True))
        span.set_attribute("http.response.status_code", relay.status)
        self._tel.request(head.route.kind.value, relay.status)

    def refused(self, status: int) -> None:
        """A request (or connection) the fast lane answered ``status`` itself."""
        self._tel.request(RouteKind.OTHER.value, status)

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
