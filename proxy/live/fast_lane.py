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
from opentelemetry.trace import Span

from ..errors import UpstreamError
from ..protocols.v2_rest.routes import LLM, MIRRORED, RouteKind
from ..settings import Settings
from ..shadow.analysis import Exchange
from ..shadow.mirror_api import Mirror, MirrorRequest
from ..telemetry import Telemetry
from .forwarding import REQUEST_DROP, end_to_end, server_span
from .http1 import Head, error_bytes, head_end, may_be_fast, parse_head, refusal, render
from .stream_relay import StreamRelay
from .upstream_pool import Answer, UpstreamPool

log = logging.getLogger("shadowproxy.forward")

# Request heads longer than this are answered 431 (however they arrive: at once, a byte at a
# time, pipelined behind a body). There is no setting for it: no real client comes close.
_MAX_HEAD = 64 * 1024
# What a request line starts with (a method token, upper case in practice). A connection that
# starts otherwise (TLS to a plain port, garbage) goes to aiohttp at once for its 400, rather
# than waiting for a blank line that may never come.
_REQUEST_START = range(ord("A"), ord("Z") + 1)
# Infer bodies up to this size are fast (read whole: a mirrored body is needed whole anyway);
# larger ones stream through aiohttp.
_FAST_BODY = 16 * 1024 * 1024
# After answering a request it refuses (431, 408, 503), the proxy reads and drops what the client
# still sends for this long before it closes: closing with unread bytes would send a reset, which
# can destroy the answer before the client reads it (nginx's lingering close).
_LINGER_S = 2.0
# A client pipelining this far ahead of its answers is not read from until they are out.
_PIPELINE_LIMIT = 2 * 1024 * 1024


class _CutStream(Exception):
    """A streamed answer failed after its head was sent: the connection must be cut."""


class FastLane:
    """What the fast lane does with one request: the same as ``LiveProxy`` for an infer call."""

    def __init__(
        self, settings: Settings, pool: UpstreamPool, scheduler: Mirror, telemetry: Telemetry
    ) -> None:
        self.settings = settings
        self.max_body = min(_FAST_BODY, settings.proxy.max_body_bytes)
        self._mirrors = settings.mirrors
        self._any_mirror = any(c.sample_rate > 0 for c in settings.candidates)
        self._pool = pool
        self._scheduler = scheduler
        self._tel = telemetry

    def reload(self, settings: Settings) -> None:
        """Mirror what a reloaded config's candidates shadow (``proxy.*`` keep running values)."""
        self._mirrors = settings.mirrors
        self._any_mirror = any(c.sample_rate > 0 for c in settings.candidates)

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
            # An OpenAI call names its model in the body, read by the shadow side.
            and (self._mirrors(model) if head.route.model is not None else self._any_mirror)
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
                future.set_result(self._partial(relay, started) if cancelled else None)
            if not isinstance(exc, UpstreamError):
                raise
            if relay.sent_head:
                # The status is sent: a failure now can only cut the connection, as the
                # reference's own would for a direct client.
                head.keep_alive = False
                raise _CutStream from exc
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
            # Past the tee's cap the copy has no whole answer: its fate is reference_failed.
            whole = not relay.overflow
            future.set_result(self._relayed(relay, latency, complete=True) if whole else None)
        span.set_attribute("http.response.status_code", relay.status)
        self._tel.request(head.route.kind.value, relay.status)

    def _relayed(self, relay: StreamRelay, latency: float, *, complete: bool) -> Exchange:
        headers = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in relay.headers)
        body = b"".join(relay.kept)
        return Exchange(
            self._pool.name, relay.status, headers, body, latency, tuple(relay.timeline), complete
        )

    def _partial(self, relay: StreamRelay, started: float) -> Exchange:
        return self._relayed(relay, time.perf_counter() - started, complete=False)

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


class FastLaneProtocol(asyncio.Protocol):
    """One client connection: fast-lane requests in order, then possibly aiohttp for the rest.

    Its memory is bounded whatever the client does: requests are read ahead only up to
    ``_PIPELINE_LIMIT``, a head only up to ``_MAX_HEAD``, and no next request is read or served
    while more than ``proxy.max_unsent_bytes`` of answers wait for the client to read them.
    """

    def __init__(self, server: FastLaneServer) -> None:
        self._server = server
        self._lane = server.lane
        self._transport: asyncio.Transport | None = None
        self._buf = bytearray()
        self._scanned = 0
        """Bytes of ``_buf`` already searched for the end of the head."""
        self._head: Head | None = None
        self._head_len = 0
        self._busy = False
        self._relay: StreamRelay | None = None
        """The streamed answer being relayed (an LLM call), paused while the client lags."""
        self._streaming: asyncio.Task[None] | None = None
        """The LLM call being served: cancelled if the client leaves (it stops the generation)."""
        self._write_paused = False
        self._read_paused = False
        self._refused = False
        self._eof = False
        """The client half-closed: once its last whole request is answered, the connection ends."""
        self.closing = False
        self.last_active = time.monotonic()
        self.head_since: float | None = None
        """When the first byte of a head still incomplete came (the head timeout runs from it)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self._transport = cast(asyncio.Transport, transport)
        if not self._server.admit():
            self._refuse(503, "too many client connections; try again later")
            return
        # pause_writing() comes once this many answer bytes wait for the client.
        self._transport.set_write_buffer_limits(high=self._lane.settings.proxy.max_unsent_bytes)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self._server.connections.discard(self)
        self._transport = None
        if self._streaming is not None and not self._streaming.done():
            # Nobody reads the rest: the reference's connection is closed, which ends the
            # generation there (vLLM and Triton abort a request whose client is gone).
            self._streaming.cancel()

    def eof_received(self) -> bool | None:
        if self._streaming is not None and not self._streaming.done():
            # A client that closes during a stream has left (as NGINX reads it, "client
            # prematurely closed"): waiting to write would let a stalled generation run on.
            self._streaming.cancel()
            return None
        # A client that half-closes after its request still gets the answer (see _serve).
        self._eof = True
        return (self._busy and not self._refused) or None

    def pause_writing(self) -> None:
        self._write_paused = True
        self._sync_reading()
        if self._relay is not None:
            self._relay.pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._relay is not None:
            self._relay.resume()
        self.last_active = time.monotonic()
        self._sync_reading()
        if not self._busy and self._buf:
            self._next()
        if self._eof and not self._busy and self._transport is not None:
            self._transport.close()

    def data_received(self, data: bytes) -> None:
        if self._transport is None or self._refused:
            return  # handed over, or refused: what follows is dropped
        self._buf += data
        self.last_active = time.monotonic()
        if not (self._busy or self._write_paused):
            self._next()
        self._sync_reading()

    def _sync_reading(self) -> None:
        """Read from the client only while answers reach it, and requests are not piling up."""
        transport = self._transport
        if transport is None:
            return
        want_pause = self._write_paused or (self._busy and len(self._buf) > _PIPELINE_LIMIT)
        if want_pause != self._read_paused:
            self._read_paused = want_pause
            if want_pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _next(self) -> None:
        """Serve the buffered request if it is whole, or give the connection to aiohttp."""
        if self._head is None and not self._take_head():
            return
        assert self._head is not None
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
        self._streaming = task if head.route.kind in LLM else None

    def _take_head(self) -> bool:
        """Parse the head at the start of the buffer once it is whole; False if there is none to
        serve yet (incomplete, refused, or the connection handed to aiohttp)."""
        buf = self._buf
        if not buf:
            return False
        end = head_end(buf, self._scanned)
        if end < 0:
            if len(buf) > _MAX_HEAD:
                self._refuse(431, f"the request head is longer than {_MAX_HEAD} bytes")
            elif buf[0] not in _REQUEST_START:
                self._hand_over()  # not an HTTP request line: aiohttp answers at once
            else:
                self._scanned = len(buf)
                if self.head_since is None:
                    self.head_since = time.monotonic()
            return False
        if end > _MAX_HEAD:
            self._refuse(431, f"the request head is longer than {_MAX_HEAD} bytes")
            return False
        self.head_since = None
        self._scanned = 0
        head = None
        if may_be_fast(buf):
            head = parse_head(bytes(buf[:end]), self._lane.settings, self._lane.max_body)
        if head is None:
            self._hand_over()  # not for the fast lane (or malformed): aiohttp decides
            return False
        self._head, self._head_len = head, end
        return True

    async def _serve(self, head: Head, body: bytes) -> None:
        sent = False

        def send(data: bytes) -> None:
            nonlocal sent
            sent = True
            if self._transport is not None and not self._transport.is_closing():
                self._transport.write(data)

        def on_relay(relay: StreamRelay | None) -> None:
            self._relay = relay
            if relay is not None and self._write_paused:
                relay.pause()

        try:
            await self._lane.answer(head, body, send, on_relay)
        except _CutStream as exc:
            log.warning("live stream %s %s cut: %s", head.method, head.target, exc.__cause__)
            head.keep_alive = False
        except asyncio.CancelledError:
            return  # the client left mid-stream: nothing more to send it
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
        self._sync_reading()
        # While the client leaves answers unread, its next request waits (resume_writing).
        if self._buf and not self._write_paused:
            self._next()
        if self._eof and not self._busy and not self._write_paused:
            transport.close()  # nothing more can come; what is written still goes out first

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` from the proxy itself and close: what the client sent cannot be
        served, and nothing after it can be framed."""
        transport = self._transport
        if transport is None or self._refused:
            return
        self._lane.refused(status)
        self._refused = True
        self._buf.clear()
        self.head_since = None
        transport.write(refusal(status, detail))
        if transport.can_write_eof():
            transport.write_eof()
        if self._read_paused:
            transport.resume_reading()
        asyncio.get_running_loop().call_later(_LINGER_S, transport.close)

    def _hand_over(self) -> None:
        """From here on aiohttp serves this connection, starting with the bytes not yet served."""
        transport = self._transport
        if transport is None:
            return
        self._transport = None
        self._server.connections.discard(self)
        self._server.handed_over.add(transport)
        self.head_since = None
        handler = self._server.fallback()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._buf:
            data, self._buf = bytes(self._buf), bytearray()
            handler.data_received(data)
        if self._read_paused:
            transport.resume_reading()

    def sweep(self, head_cutoff: float, idle_cutoff: float) -> None:
        """Cut a head that is too slow (slowloris), or a connection idle too long."""
        transport = self._transport
        if transport is None or self._busy:
            return
        if self.head_since is not None:
            if self.head_since < head_cutoff:
                self._refuse(408, "the request head did not arrive in time")
        elif self.last_active < idle_cutoff:
            if transport.get_write_buffer_size():
                transport.abort()  # it does not read: close() would wait on it forever
            else:
                transport.close()

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
        self.handed_over: set[asyncio.Transport] = set()
        """Connections aiohttp serves now: they count against ``proxy.max_connections`` until
        they close (pruned lazily: aiohttp does not tell us)."""
        self.tasks: set[asyncio.Task[None]] = set()
        """Requests being served (held here too: the loop keeps only weak references)."""
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        proxy = lane.settings.proxy
        self._max_connections = proxy.max_connections
        self._head_timeout_s = proxy.head_timeout_s
        self._idle_timeout_s = proxy.idle_timeout_s

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: FastLaneProtocol(self), host, port, reuse_port=reuse_port or None, backlog=1024
        )
        self._sweeper = loop.create_task(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    def admit(self) -> bool:
        """Whether one more client connection fits under ``proxy.max_connections``."""
        if len(self.connections) + len(self.handed_over) < self._max_connections:
            return True
        self._prune()
        return len(self.connections) + len(self.handed_over) < self._max_connections

    def _prune(self) -> None:
        self.handed_over = {t for t in self.handed_over if not t.is_closing()}

    async def _sweep(self) -> None:
        """Apply the head and idle timeouts (one timer for every connection, not one each)."""
        interval = min(self._head_timeout_s, self._idle_timeout_s) / 4
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            head_cutoff, idle_cutoff = now - self._head_timeout_s, now - self._idle_timeout_s
            for conn in list(self.connections):
                conn.sweep(head_cutoff, idle_cutoff)
            self._prune()

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
