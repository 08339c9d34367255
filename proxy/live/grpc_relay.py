"""The gRPC live path's fast way through: each client connection relayed, frame for frame, over a
connection of its own to the reference.

Terminating every call in ``grpc.aio`` (a server call and a client call per request) costs about
half a millisecond of CPU; the relay costs a fraction of that. A client's HTTP/2 connection is
paired with one upstream connection and the frames cross unchanged both ways, so everything the
client and the reference say to each other (settings, flow control, deadlines as
``grpc-timeout``, metadata, status, trailers, pings, GOAWAY) is theirs. The relay reads what it
must: frame heads, every header block (HPACK's tables are per connection and must be followed
in order), and the DATA of the calls it copies (``RelayCalls``).

Where the upstream fails, the relay speaks for it, as the ``grpc.aio`` listener does: a unary
inference call unanswered after the reference's ``timeout_s`` ends with DEADLINE_EXCEEDED, a
connection that drops ends its calls with UNAVAILABLE, each naming the upstream. Until the
upstream has shown it speaks HTTP/2 (its SETTINGS frame), nothing of it has reached the client,
so a connection whose upstream cannot be reached, or is not HTTP/2, is handed whole to the
``grpc.aio`` listener (``handover_port``), which reports that failure per call. Canary splits
and TLS to the reference need a call terminated, so with either the ``grpc.aio`` listener takes
every connection (``ProxyRunner`` decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any, cast

from hpack import HPACKDecodingError

from ..errors import UpstreamTimeout, UpstreamUnavailable
from ..settings import UpstreamSettings
from .grpc_relay_calls import RelayCall, RelayCalls
from .grpc_server import InferHook
from .h2_frames import (
    ACK,
    CANCEL,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    END_HEADERS,
    END_STREAM,
    FRAME_HEAD,
    HEADERS,
    PREFACE,
    PUSH_PROMISE,
    RST_STREAM,
    SETTINGS,
    SETTINGS_HEADER_TABLE_SIZE,
    SETTINGS_MAX_FRAME_SIZE,
    HeaderBlocks,
    block_fragment,
    data_of,
    goaway,
    is_server_settings,
    read_head,
    rst_stream,
    settings_of,
    status_frame,
    window_update,
)
from .h2_hpack import huffman_tables

log = logging.getLogger("shadowproxy")

_UNAVAILABLE, _DEADLINE = 14, 4
# Client bytes held while the upstream connection is made and proves itself (replayed to the
# grpc.aio listener on a hand-over): HTTP/2's initial windows keep a well-behaved client under
# this; past it reading pauses.
_EARLY_CAP = 1024 * 1024
# Streams ended by the relay whose upstream frames are still arriving (dropped on sight).
_DEAD_CAP = 4096
_MAX_HEADER_LIST = 1024 * 1024


class _Side:
    """One direction of a relayed connection: a partial frame held back (frames cross whole, so
    a frame of the relay's own never lands inside one), the header block being read, and the
    frames of the relay's own waiting for that block to end."""

    __slots__ = ("block", "headers", "max_frame", "sent_ahead", "tail", "waiting")

    def __init__(self) -> None:
        self.tail = b""
        self.sent_ahead = 0
        self.block: tuple[int, int, list[bytes]] | None = None
        self.waiting: list[bytes] = []
        self.headers = HeaderBlocks(_MAX_HEADER_LIST)
        self.max_frame = DEFAULT_MAX_FRAME
        """The largest frame the receiving end accepts (its SETTINGS_MAX_FRAME_SIZE)."""


class GrpcRelay:
    """The gRPC listener when calls need not be terminated. Owned by ``ProxyRunner``, which
    starts the ``grpc.aio`` listener it hands connections to first and stops both together."""

    def __init__(
        self,
        reference: UpstreamSettings,
        *,
        handover_port: int,
        max_bytes: int,
        on_infer: InferHook | None = None,
        on_skip: Callable[[str], None] | None = None,
        copying: Callable[[], bool] | None = None,
    ) -> None:
        """``copying``: whether calls are worth reading for ``on_infer`` now (None: always)."""
        target = reference.grpc_target
        assert target is not None and not reference.grpc_tls
        self.name = reference.name
        self.target = target
        host, _, port = target.rpartition(":")
        self.host, self.port = host.strip("[]"), int(port)
        self.timeout_s = reference.timeout_s
        self.connect_timeout_s = reference.connect_timeout_s
        self.handover_port = handover_port
        self.max_bytes = max_bytes
        self.on_infer = on_infer
        self.on_skip = on_skip
        self.copying = copying
        self.connections: set[RelayConnection] = set()
        self._all_closed: asyncio.Event | None = None
        self._server: asyncio.Server | None = None

    def closed(self, conn: RelayConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        huffman_tables()  # built once (~10 ms), before the first call rather than during it
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(
                lambda: RelayConnection(self), host, port, reuse_port=reuse_port or None
            )
        except OSError as exc:
            raise OSError(f"gRPC listener: cannot bind {host}:{port} ({exc})") from None
        self._server = server
        return int(server.sockets[0].getsockname()[1])

    async def stop(self, grace_s: float) -> None:
        """No new connections; every relayed client is told to go away (GOAWAY) and its calls
        in flight get ``grace_s`` to end. Idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for conn in list(self.connections):
            conn.drain()
        if self.connections:
            self._all_closed = asyncio.Event()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), grace_s)
        for conn in list(self.connections):
            conn.abort()


class RelayConnection(asyncio.Protocol):
    """One client connection and the upstream connection paired with it."""

    def __init__(self, relay: GrpcRelay) -> None:
        self._relay = relay
        self._client: asyncio.Transport | None = None
        self._upstream: asyncio.Transport | None = None
        self._early = bytearray()
        self._first = b""
        self._relaying = False
        self._pipe: asyncio.Transport | None = None
        self._handing_over = False
        self._probation: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._up = _Side()  # client -> upstream
        self._down = _Side()  # upstream -> client
        self._calls = RelayCalls(
            cap=relay.max_bytes,
            timeout_s=relay.timeout_s,
            on_infer=relay.on_infer,
            on_skip=relay.on_skip,
            copying=relay.copying,
        )
        self._dead: OrderedDict[int, None] = OrderedDict()
        self._last_stream = 0
        self._preface = len(PREFACE)
        self._draining = False
        self._closed = False

    # -- the client's side ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self._client = cast(asyncio.Transport, transport)
        self._relay.connections.add(self)
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        if self._relaying:
            self._from_client(data)
        elif self._pipe is not None:
            self._pipe.write(data)
        else:
            # Before the upstream has shown it speaks HTTP/2: its copy is kept for a hand-over,
            # and it goes up at once (some servers, NGINX among them, say nothing before the
            # client's preface).
            self._early += data
            if self._upstream is not None:
                self._upstream.write(data)
            if len(self._early) > _EARLY_CAP and self._client is not None:
                self._client.pause_reading()

    def eof_received(self) -> bool | None:
        if self._upstream is not None and self._relaying:
            self._upstream.write_eof()
        return True  # half-open: answers in flight still go out

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._relay.closed(self)
        self._calls.clear()
        if self._connecting is not None:
            self._connecting.cancel()
        if self._probation is not None:
            self._probation.cancel()
        if self._upstream is not None:
            self._upstream.close()
        if self._pipe is not None:
            self._pipe.close()

    def pause_writing(self) -> None:
        # The client reads slower than the upstream sends: the upstream waits (its flow control
        # then holds the rest), as it would for that client directly.
        if self._upstream is not None:
            self._upstream.pause_reading()
        elif self._pipe is not None:
            self._pipe.pause_reading()

    def resume_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.resume_reading()
        elif self._pipe is not None:
            self._pipe.resume_reading()

    # -- making the upstream connection, or handing over ---------------------------------

    async def _connect(self) -> None:
        relay = self._relay
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(relay.connect_timeout_s):
                await loop.create_connection(lambda: _UpstreamEnd(self), relay.host, relay.port)
        except (OSError, TimeoutError) as exc:
            log.debug(
                "gRPC relay: %s:%s not reached (%s), handing over", relay.host, relay.port, exc
            )
            await self._hand_over()
            return
        # Connected: the upstream's SETTINGS must come within the connect timeout.
        self._probation = loop.call_later(relay.connect_timeout_s, self._not_http2)

    def upstream_made(self, transport: asyncio.Transport) -> None:
        self._upstream = transport
        if self._closed:
            transport.close()
        elif self._early:
            transport.write(bytes(self._early))

    def _not_http2(self) -> None:
        if not self._relaying and self._pipe is None and not self._closed:
            asyncio.get_running_loop().create_task(self._hand_over())

    async def _hand_over(self) -> None:
        """The ``grpc.aio`` listener takes the connection: it gets what the client sent so far
        and everything after, and makes each call report the upstream's failure itself."""
        if self._closed or self._handing_over:
            return
        self._handing_over = True
        if self._probation is not None:
            self._probation.cancel()
        upstream, self._upstream = self._upstream, None
        if upstream is not None:
            upstream.abort()
        client = self._client
        assert client is not None
        loop = asyncio.get_running_loop()
        try:
            end, _ = await loop.create_connection(
                lambda: _HandedOver(client), "127.0.0.1", self._relay.handover_port
            )
        except OSError:
            log.exception("gRPC relay: the grpc.aio listener did not take a connection")
            client.abort()
            return
        if self._closed:
            end.close()
            return
        self._pipe = end
        end.write(bytes(self._early))
        self._early.clear()
        client.resume_reading()

    # -- the upstream's side -------------------------------------------------------------

    def from_upstream(self, data: bytes) -> None:
        if self._relaying:
            self._pump(self._down, data, self._upstream_frame, self._client)
            if self._draining and not self._calls.open:
                self._close_both()
            return
        # On probation: only an HTTP/2 server's SETTINGS lets the connection be relayed.
        self._first += data
        if len(self._first) < FRAME_HEAD:
            return
        if not is_server_settings(self._first[:FRAME_HEAD]) or not self._early.startswith(
            PREFACE[: len(self._early)]
        ):
            asyncio.get_running_loop().create_task(self._hand_over())
            return
        if self._probation is not None:
            self._probation.cancel()
        self._relaying = True
        first, self._first = self._first, b""
        early = bytes(self._early)
        self._early.clear()
        self._pump(self._down, first, self._upstream_frame, self._client)
        if early:
            self._from_client(early, forward=False)  # it went up already
        assert self._client is not None
        self._client.resume_reading()

    def upstream_lost(self) -> None:
        if not self._relaying:
            if not self._closed and self._pipe is None:
                asyncio.get_running_loop().create_task(self._hand_over())
            return
        self._upstream = None
        client = self._client
        if client is None or self._closed:
            return
        if self._calls.open and self._down.block is None:
            # Calls the upstream left unanswered end with a status that says so.
            failure = UpstreamUnavailable(
                self._relay.name, self._relay.target, "closed the connection"
            )
            for call in list(self._calls.open.values()):
                client.write(
                    status_frame(
                        call.stream, _UNAVAILABLE, str(failure), headers_sent=call.headers_sent
                    )
                )
            self._calls.clear()
        if self._down.block is None:
            client.write(goaway(self._last_stream))
        client.close()

    def upstream_paused(self, paused: bool) -> None:
        # The upstream reads slower than the client sends.
        if self._client is not None:
            (self._client.pause_reading if paused else self._client.resume_reading)()

    # -- frames ----------------------------------------------------------------------------

    def _from_client(self, data: bytes, *, forward: bool = True) -> None:
        out = self._upstream if forward else None
        if self._preface:
            # The client's preface crosses as it is; frames follow it.
            taken = data[: self._preface]
            self._preface -= len(taken)
            if out is not None:
                out.write(taken)
            data = data[len(taken) :]
            if not data:
                return
        self._pump(self._up, data, self._client_frame, out)
        if self._draining and not self._calls.open:
            self._close_both()

    def _pump(self, side: _Side, data: bytes, on_frame: Any, out: asyncio.Transport | None) -> None:
        """Pass ``data``'s whole frames to ``out`` (less those ``on_frame`` drops); hold a
        partial one back until the rest of it comes. ``out`` None: read only (the bytes went
        out already, as on probation)."""
        # Leading bytes that went out already: the held part of a frame read on probation.
        sent = side.sent_ahead
        if side.tail:
            data = side.tail + data
            side.tail = b""
        at, end = 0, len(data)
        while end - at >= FRAME_HEAD:
            size, kind, flags, stream = read_head(data, at)
            stop = at + FRAME_HEAD + size
            if stop > end:
                if size > side.max_frame:
                    self._broken(f"a frame of {size} bytes, over the {side.max_frame} agreed")
                    return
                break
            if not on_frame(kind, flags, stream, data, at + FRAME_HEAD, stop):
                if out is not None and sent < at:
                    out.write(data[sent:at])
                sent = max(sent, stop)
            at = stop
        if out is not None and sent < at:
            out.write(data[sent:at] if sent or at < end else data)
        if at < end:
            side.tail = data[at:]
        side.sent_ahead = len(side.tail) if out is None else max(0, sent - at)
        if side.block is None and side.waiting and out is not None:
            out.write(b"".join(side.waiting))
            side.waiting.clear()

    def _client_frame(
        self, kind: int, flags: int, stream: int, data: bytes, start: int, stop: int
    ) -> bool:
        if kind == DATA:
            call = self._calls.open.get(stream)
            if call is not None and call.reads:
                self._calls.request_data(call, data_of(flags, data[start:stop]))
        elif kind in (HEADERS, CONTINUATION):
            fields = self._header_block(self._up, kind, flags, stream, data[start:stop])
            if fields is not None:
                stream, flags = fields[0], fields[1]
                if stream > self._last_stream:
                    self._last_stream = stream
                    self._started(stream, fields[2])
        elif kind == RST_STREAM:
            self._calls.forget(stream)
        elif kind == SETTINGS and not flags & ACK:
            for ident, value in settings_of(data[start:stop]):
                # The client's settings bound what the upstream sends it.
                if ident == SETTINGS_HEADER_TABLE_SIZE:
                    self._down.headers.decoder.max_allowed_table_size = value
                elif ident == SETTINGS_MAX_FRAME_SIZE:
                    self._down.max_frame = value
        return True

    def _upstream_frame(
        self, kind: int, flags: int, stream: int, data: bytes, start: int, stop: int
    ) -> bool:
        if stream in self._dead:
            return self._dead_frame(kind, flags, stream, data, start, stop)
        if kind == DATA:
            call = self._calls.open.get(stream)
            if call is not None:
                if call.reads:
                    self._calls.answer_data(
                        call, data_of(flags, data[start:stop]), bool(flags & END_STREAM)
                    )
                elif flags & END_STREAM:
                    self._calls.forget(stream)
        elif kind in (HEADERS, CONTINUATION, PUSH_PROMISE):
            fields = self._header_block(self._down, kind, flags, stream, data[start:stop])
            if fields is not None and kind != PUSH_PROMISE:
                call = self._calls.open.get(fields[0])
                if call is not None:
                    self._calls.answer_headers(call, fields[2], bool(fields[1] & END_STREAM))
        elif kind == RST_STREAM:
            self._calls.forget(stream)
        elif kind == SETTINGS and not flags & ACK:
            for ident, value in settings_of(data[start:stop]):
                if ident == SETTINGS_HEADER_TABLE_SIZE:
                    self._up.headers.decoder.max_allowed_table_size = value
                elif ident == SETTINGS_MAX_FRAME_SIZE:
                    self._up.max_frame = value
        return True

    def _dead_frame(
        self, kind: int, flags: int, stream: int, data: bytes, start: int, stop: int
    ) -> bool:
        """A frame for a call the relay already ended toward the client. Header blocks still
        cross (the client's HPACK table must see every one); the rest is dropped, and DATA is
        given back to the upstream's connection window, since the client never will."""
        if kind in (HEADERS, CONTINUATION):
            fields = self._header_block(self._down, kind, flags, stream, data[start:stop])
            if fields is not None and fields[1] & END_STREAM:
                self._dead.pop(stream, None)
            return True
        if kind == DATA and stop > start:
            self._inject(self._up, self._upstream, window_update(0, stop - start))
        if kind == RST_STREAM or (kind == DATA and flags & END_STREAM):
            self._dead.pop(stream, None)
        return False

    def _header_block(
        self, side: _Side, kind: int, flags: int, stream: int, payload: bytes
    ) -> tuple[int, int, list[tuple[bytes, bytes]]] | None:
        """The decoded header block once its last frame came: (stream, flags of its first frame,
        fields); None while it is incomplete (or for a PUSH_PROMISE's promised stream)."""
        if kind == CONTINUATION:
            if side.block is None:
                return None  # the receiver refuses it; nothing of ours depends on it
            first_stream, first_flags, pieces = side.block
            pieces.append(payload)
        else:
            fragment = block_fragment(flags, payload)
            if kind == PUSH_PROMISE:
                fragment = fragment[4:]
            first_stream, first_flags, pieces = stream, flags, [fragment]
            if not flags & END_HEADERS:
                side.block = (first_stream, first_flags, pieces)
                return None
        if not flags & END_HEADERS:
            return None
        side.block = None
        try:
            fields = side.headers.decode(b"".join(pieces))
        except HPACKDecodingError as exc:
            # The tables can no longer be followed: the receiver will fail the connection.
            self._broken(f"a header block that does not decode ({exc})")
            return None
        return first_stream, first_flags, fields

    # -- calls -----------------------------------------------------------------------------

    def _started(self, stream: int, fields: list[tuple[bytes, bytes]]) -> None:
        call, limit = self._calls.start(stream, fields)
        if limit is not None:
            call.timer = asyncio.get_running_loop().call_later(limit, self._expired, call, limit)

    def _expired(self, call: RelayCall, limit: float) -> None:
        """The reference's ``timeout_s`` ran out on a unary call: the client gets
        DEADLINE_EXCEEDED naming it, the upstream a RST_STREAM, and what it still sends for
        the call is dropped."""
        call.timer = None
        if self._calls.open.get(call.stream) is not call or self._closed:
            return
        self._calls.forget(call.stream)
        self._dead[call.stream] = None
        while len(self._dead) > _DEAD_CAP:
            self._dead.popitem(last=False)
        failure = UpstreamTimeout(
            self._relay.name, self._relay.target, f"timed out waiting for an answer ({limit:.3g} s)"
        )
        log.warning("live gRPC call %s failed: %s", call.method, failure)
        self._inject(
            self._down,
            self._client,
            status_frame(call.stream, _DEADLINE, str(failure), headers_sent=call.headers_sent),
        )
        self._inject(self._up, self._upstream, rst_stream(call.stream, CANCEL))

    def _inject(self, side: _Side, out: asyncio.Transport | None, frame_bytes: bytes) -> None:
        """Write a frame of the relay's own between two whole frames, never inside a header
        block (a header block's frames must follow each other)."""
        if out is None:
            return
        if side.block is None:
            out.write(frame_bytes)
        else:
            side.waiting.append(frame_bytes)

    def _broken(self, why: str) -> None:
        log.warning("gRPC relay: closing a connection: the peer sent %s", why)
        self.abort()

    # -- ending ----------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop new calls (GOAWAY naming the last stream the client opened); the connection
        closes once its calls in flight end."""
        self._draining = True
        if self._pipe is not None:
            return  # the grpc.aio listener drains its own
        if self._relaying:
            self._inject(self._down, self._client, goaway(self._last_stream))
        if not self._calls.open:
            self._close_both()

    def _close_both(self) -> None:
        if self._upstream is not None:
            self._upstream.close()
        if self._client is not None:
            self._client.close()

    def abort(self) -> None:
        if self._upstream is not None:
            self._upstream.abort()
        if self._client is not None:
            self._client.abort()
        if self._pipe is not None:
            self._pipe.close()


class _UpstreamEnd(asyncio.Protocol):
    """The upstream connection's protocol: everything goes to its ``RelayConnection``."""

    def __init__(self, conn: RelayConnection) -> None:
        self._conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._conn.upstream_made(cast(asyncio.Transport, transport))

    def data_received(self, data: bytes) -> None:
        self._conn.from_upstream(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._conn.upstream_lost()

    def pause_writing(self) -> None:
        self._conn.upstream_paused(True)

    def resume_writing(self) -> None:
        self._conn.upstream_paused(False)


class _HandedOver(asyncio.Protocol):
    """The connection to the ``grpc.aio`` listener that took a client over: what it sends goes
    to the client as it is (the client's bytes go the other way in ``data_received``)."""

    def __init__(self, client: asyncio.Transport) -> None:
        self._client = client

    def data_received(self, data: bytes) -> None:
        self._client.write(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._client.close()

    def pause_writing(self) -> None:
        self._client.pause_reading()

    def resume_writing(self) -> None:
        self._client.resume_reading()
