"""The fast lane's connections: one ``FastLaneProtocol`` per client, and the listener that owns
them (``FastLaneServer``), with every bound a hostile or broken client meets: head size and
time, pipelining, unsent answers, idle time, connections. What each request gets is
``FastLane``'s (``fast_lane.py``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import cast

from ..protocols.v2_rest.routes import LLM
from .fast_lane import CutStream, FastLane
from .http1 import Head, head_end, may_be_fast, parse_head, refusal, render
from .stream_relay import StreamRelay

log = logging.getLogger("shadowproxy.forward")

# Request heads longer than this are answered 431 (however they arrive: at once, a byte at a
# time, pipelined behind a body). There is no setting for it: no real client comes close.
_MAX_HEAD = 64 * 1024
# What a request line starts with (a method token, upper case in practice). A connection that
# starts otherwise (TLS to a plain port, garbage) goes to aiohttp at once for its 400, rather
# than waiting for a blank line that may never come.
_REQUEST_START = range(ord("A"), ord("Z") + 1)
# After answering a request it refuses (431, 408, 503), the proxy reads and drops what the client
# still sends for this long before it closes: closing with unread bytes would send a reset, which
# can destroy the answer before the client reads it (nginx's lingering close).
_LINGER_S = 2.0
# A client pipelining this far ahead of its answers is not read from until they are out.
_PIPELINE_LIMIT = 2 * 1024 * 1024


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
        except CutStream as exc:
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
