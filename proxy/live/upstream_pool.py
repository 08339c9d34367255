"""Keep-alive HTTP/1.1 connections to one upstream, for the fast lane's live calls.

aiohttp's client spends about 0.2 ms of CPU on each call (URL objects, timers, tracing hooks,
payload objects, a response object with its own stream); the fast lane only needs "send these
bytes, give me status, headers and the whole body". Here a call is one ``writelines`` on a pooled
connection and one llhttp parse (``httptools``, the parser uvicorn uses) of the answer.

Failures are translated where they happen into the proxy's exception tree (``errors.py``), with
the same wording as ``translate_upstream_error`` gives for aiohttp's: refused -> 503, no answer in
time -> 504, a reset or a malformed answer -> 502. A request is never retried: a POST the
upstream may have run must not run twice.

A streamed answer (LLM routes) is handed to an ``AnswerSink`` as it is parsed: its head the
moment it is whole, each piece of body as it is read, so an SSE event reaches the client in the
same turn of the loop that read it. After the head, the time limit is between reads (as NGINX's
``proxy_read_timeout``), not on the whole answer: a generation may stream for minutes.

A connection goes back to the pool only at a clean message boundary: the answer whole, framed by
its length or chunks, keep-alive, and not one byte after it. Anything else (a ``Connection:
close``, an answer read until close, bytes nobody asked for, a timeout, a cap) closes it, so
the next request can never read the end of someone else's answer.
"""

from __future__ import annotations

import asyncio
import socket
import time
from dataclasses import dataclass, field
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools

from ..errors import UpstreamBadResponse, UpstreamError, UpstreamTimeout, UpstreamUnavailable

# Idle connections kept per upstream; more are closed when they come back.
MAX_IDLE = 64


class _AnswerTooLarge(Exception):
    """Raised inside llhttp's callbacks to stop the parse at once (never leaves this module)."""


@dataclass(slots=True)
class Answer:
    """One whole answer: what the client gets, less the framing."""

    status: int
    reason: bytes
    headers: list[tuple[bytes, bytes]]
    body: bytes
    timeline: list[tuple[int, float]] = field(default_factory=list)
    """(body bytes read so far, ``time.perf_counter()``) per read, when asked for."""


class AnswerSink(Protocol):
    """Where a streamed answer goes as it is read."""

    def head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], upstream: Pausable
    ) -> None:
        """The answer's head is whole (never an interim 1xx); ``upstream`` can be paused while
        the client is not reading."""

    def body(self, data: bytes) -> None: ...


class Pausable(Protocol):
    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class _Connection(asyncio.Protocol):
    """One connection; at most one request on it at a time."""

    def __init__(self, pool: UpstreamPool) -> None:
        self._pool = pool
        self.transport: asyncio.Transport | None = None
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Answer] | None = None
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._body: list[bytes] = []
        self._size = 0
        """Bytes of the answer so far (status, headers and body), against the pool's cap."""
        self._headers_done = False
        self._until_close = False
        self._sink: AnswerSink | None = None
        self._timeline: list[tuple[int, float]] | None = None
        self._body_size = 0
        self._idle_s: float | None = None
        """Streams: after the head, the most time between two reads."""
        self._last_read = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self.reusable = False
        self._spoiled = False
        self.closed = False

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        if self._waiter is None or self._waiter.done():
            # Bytes nobody asked for: the connection is out of step; never reuse it.
            self.close()
            return
        if self._idle_s is not None:
            self._last_read = asyncio.get_running_loop().time()
        try:
            self._parser.feed_data(data)
        except (httptools.HttpParserError, httptools.HttpParserUpgrade) as exc:
            if isinstance(exc.__context__, _AnswerTooLarge):
                cap = self._pool.max_answer_bytes
                self._fail(self._pool.bad(f"sent an answer larger than {cap} bytes (cut off)"))
            else:
                self._fail(self._pool.bad(f"sent a malformed answer ({exc})"))

    def eof_received(self) -> bool | None:
        return None  # close the transport; connection_lost settles any waiter

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._pool.forget(self)
        if self._waiter is None or self._waiter.done():
            return
        if self._until_close and self._headers_done:
            self._finish()  # an answer without length or chunks ends where the connection does
            return
        self._fail(self._pool.bad("closed the connection without an answer"))

    # httptools callbacks

    def on_message_begin(self) -> None:
        if self._waiter is not None and self._waiter.done():
            # More after the whole answer, in the same read: out of step, even if what follows
            # is only the start of a status line.
            self._spoiled = True
            self.reusable = False
        self._reason, self._headers, self._body = b"", [], []
        self._body_size = 0
        if self._timeline is not None:
            self._timeline.clear()
        self._headers_done = self._until_close = False

    def _count(self, n: int) -> None:
        self._size += n
        cap = self._pool.max_answer_bytes
        if cap is not None and self._size > cap:
            raise _AnswerTooLarge

    def on_status(self, reason: bytes) -> None:
        self._count(len(reason))
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count(len(name) + len(value))
        self._headers.append((name, value))

    def on_headers_complete(self) -> None:
        self._headers_done = True
        names = {n.lower() for n, _ in self._headers}
        self._until_close = b"content-length" not in names and b"transfer-encoding" not in names
        keep = self._parser.should_keep_alive() and not self._until_close
        self.reusable = keep and not self._spoiled
        status = self._parser.get_status_code()
        if self._sink is not None and self.transport is not None and not 100 <= status < 200:
            self._sink.head(status, self._reason, self._headers, self.transport)

    def on_body(self, body: bytes) -> None:
        self._count(len(body))
        if self._timeline is not None:
            self._body_size += len(body)
            self._timeline.append((self._body_size, time.perf_counter()))
        if self._sink is not None:
            self._sink.body(body)
        else:
            self._body.append(body)

    def on_message_complete(self) -> None:
        if 100 <= self._parser.get_status_code() < 200:
            return  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        self._finish()

    # requests

    async def call(
        self,
        data: list[bytes],
        deadline: float,
        *,
        timed: bool = False,
        sink: AnswerSink | None = None,
        idle_s: float | None = None,
    ) -> Answer:
        """Send ``data``; the answer, or an ``UpstreamError`` (a timeout at ``deadline``, or,
        with ``idle_s``, once the head is in, ``idle_s`` without a read)."""
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[Answer] = loop.create_future()
        self._waiter = waiter
        self._size = 0
        self._sink, self._idle_s = sink, idle_s
        self._timeline = [] if timed else None
        # One timer handle, not asyncio.timeout(): this is the live path's only timer.
        self._timer = loop.call_at(deadline, self._time_out)
        self.transport.writelines(data)
        try:
            return await waiter
        except asyncio.CancelledError:
            self.close()  # its answer would arrive for nobody
            raise
        finally:
            self._timer.cancel()
            self._waiter = self._sink = self._timer = None
            self._idle_s = None

    def _finish(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            status = self._parser.get_status_code()
            self._waiter.set_result(
                Answer(
                    status, self._reason, self._headers, b"".join(self._body), self._timeline or []
                )
            )

    def _time_out(self) -> None:
        if self._idle_s is not None and self._headers_done:
            # A stream under way: the limit is between reads, counted from the last one.
            due = self._last_read + self._idle_s
            loop = asyncio.get_running_loop()
            if due > loop.time():
                self._timer = loop.call_at(due, self._time_out)
                return
            detail = f"sent nothing for {self._idle_s:g} s in the middle of its answer"
        else:
            detail = "timed out waiting for an answer"
        self._fail(UpstreamTimeout(self._pool.name, self._pool.url, detail))

    def _fail(self, err: UpstreamError) -> None:
        self.reusable = False
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(err)
        self.close()

    def close(self) -> None:
        self.reusable = False
        if self.transport is not None and not self.closed:
            self.transport.abort()


class UpstreamPool:
    """Pooled connections to one ``http://`` upstream; owned by the data app's cleanup context."""

    def __init__(
        self,
        name: str,
        url: str,
        timeout_s: float,
        connect_timeout_s: float,
        *,
        max_answer_bytes: int | None = None,
    ) -> None:
        """``max_answer_bytes``: an answer longer than this (status line, headers and body, as
        read) fails as a bad response and its connection is closed; None reads any length."""
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"the fast lane needs an http:// upstream, not {url!r}")
        self.name = name
        self.url = url
        self._host = parts.hostname
        self._port = parts.port or 80
        self.host_header = parts.netloc.encode("latin-1")
        self._timeout_s = timeout_s
        self._connect_timeout_s = connect_timeout_s
        self.max_answer_bytes = max_answer_bytes
        self._idle: list[_Connection] = []
        self._all: set[_Connection] = set()

    def bad(self, detail: str) -> UpstreamBadResponse:
        return UpstreamBadResponse(self.name, self.url, detail)

    async def request(
        self,
        data: list[bytes],
        timeout_s: float | None = None,
        *,
        timed: bool = False,
        sink: AnswerSink | None = None,
    ) -> Answer:
        """Send one whole request (its bytes in ``data``) and read the whole answer, within
        ``timeout_s`` (default: the pool's). ``timed``: record when each piece of the body came
        (``Answer.timeline``). ``sink``: hand the answer over as it is read instead of keeping
        its body (``Answer.body`` is then empty); the time limit then runs to the head, and after
        it between reads."""
        timeout = self._timeout_s if timeout_s is None else timeout_s
        deadline = asyncio.get_running_loop().time() + timeout
        conn = self._idle.pop() if self._idle else await self._connect(deadline)
        answer = await conn.call(
            data, deadline, timed=timed, sink=sink, idle_s=timeout if sink is not None else None
        )
        if conn.reusable and not conn.closed and len(self._idle) < MAX_IDLE:
            self._idle.append(conn)
        else:
            conn.close()
        return answer

    async def _connect(self, deadline: float) -> _Connection:
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout_at(min(deadline, loop.time() + self._connect_timeout_s)):
                _, conn = await loop.create_connection(
                    lambda: _Connection(self), self._host, self._port
                )
        except TimeoutError as exc:
            raise UpstreamTimeout(self.name, self.url, "timed out connecting") from exc
        except OSError as exc:
            raise UpstreamUnavailable(self.name, self.url, f"cannot connect ({exc})") from exc
        self._all.add(conn)
        return conn

    def forget(self, conn: _Connection) -> None:
        self._all.discard(conn)
        if conn in self._idle:
            self._idle.remove(conn)

    def close(self) -> None:
        for conn in list(self._all):
            conn.close()
        self._idle.clear()
