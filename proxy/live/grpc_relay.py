"""The gRPC live path's fast way through: each client connection relayed, frame for frame, over a
connection of its own to the reference.

Terminating every call in ``grpc.aio`` (a server call and a client call per request) costs about
half a millisecond of CPU. Relayed, at saturation on the bench host, the proxy carried 1.5x
NGINX ``grpc_pass``'s calls, where ``grpc.aio`` had carried a fifth of them. A client's HTTP/2
connection is paired with one upstream connection and the frames cross unchanged both ways, so
everything the client and the reference say to each other (settings, flow control, deadlines as
``grpc-timeout``, metadata, status, trailers, pings, GOAWAY) is theirs. The relay reads what it
must: frame heads, every header block (HPACK's tables are per connection and must be followed
in order), and the DATA of the calls it copies (``RelayCalls``).

Where the upstream fails, the relay speaks for it, as the ``grpc.aio`` listener does: a unary
inference call unanswered after the reference's ``timeout_s`` ends with DEADLINE_EXCEEDED, a
connection that drops ends its calls with UNAVAILABLE, each naming the upstream. Until the
upstream has shown it speaks HTTP/2 (its SETTINGS frame), nothing of it has reached the client,
so a connection whose upstream cannot be reached, or is not HTTP/2, is handed whole to the
``grpc.aio`` listener (``handover_port``), which reports that failure per call. A ``grpcs://``
reference is relayed to over TLS (ALPN ``h2``). A canary split needs each call terminated, so
with a canary the ``grpc.aio`` listener takes every connection (``ProxyRunner`` decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Callable
from typing import cast

from ..errors import UpstreamUnavailable
from ..settings import UpstreamSettings
from .grpc_relay_calls import RelayCalls
from .grpc_relay_frames import FrameRelay
from .grpc_server import InferHook
from .h2_frames import (
    FRAME_HEAD,
    PREFACE,
    goaway,
    is_server_settings,
    status_frame,
)
from .h2_hpack import huffman_tables

log = logging.getLogger("shadowproxy")

_UNAVAILABLE = 14
# Client bytes held while the upstream connection is made and proves itself (replayed to the
# grpc.aio listener on a hand-over): HTTP/2's initial windows keep a well-behaved client under
# this; past it reading pauses.
_EARLY_CAP = 1024 * 1024


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
        max_connections: int = 10_000,
    ) -> None:
        """``copying``: whether calls are worth reading for ``on_infer`` now (None: always);
        ``max_connections``: client connections held at once (each holds one to the
        reference), beyond which new ones are closed."""
        target = reference.grpc_target
        assert target is not None
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
        self.max_connections = max_connections
        self._reference = reference
        self.tls: ssl.SSLContext | None = None
        """For a ``grpcs://`` reference: TLS with ALPN ``h2``, verified against ``grpc_ca`` (the
        system's roots without one), presenting ``grpc_cert``/``grpc_key`` when given."""
        self.connections: set[RelayConnection] = set()
        self._all_closed: asyncio.Event | None = None
        self._server: asyncio.Server | None = None

    def closed(self, conn: RelayConnection) -> None:
        self.connections.discard(conn)
        if not self.connections and self._all_closed is not None:
            self._all_closed.set()

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        huffman_tables()  # built once (~10 ms), before the first call rather than during it
        if self._reference.grpc_tls:
            # PEM files are read once, off the loop; a rotated certificate needs a restart.
            self.tls = await asyncio.to_thread(_tls_context, self._reference)
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


def _tls_context(reference: UpstreamSettings) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cafile=str(reference.grpc_ca) if reference.grpc_ca is not None else None
    )
    if reference.grpc_cert is not None and reference.grpc_key is not None:
        context.load_cert_chain(reference.grpc_cert, reference.grpc_key)
    context.set_alpn_protocols(["h2"])
    return context


class RelayConnection(FrameRelay, asyncio.Protocol):
    """One client connection and the upstream connection paired with it: how they are made,
    handed over, drained and closed (the frames that cross are ``FrameRelay``'s)."""

    def __init__(self, relay: GrpcRelay) -> None:
        super().__init__(
            relay.name,
            relay.target,
            RelayCalls(
                cap=relay.max_bytes,
                timeout_s=relay.timeout_s,
                on_infer=relay.on_infer,
                on_skip=relay.on_skip,
                copying=relay.copying,
            ),
        )
        self._relay = relay
        self._early = bytearray()
        self._first = b""
        self._relaying = False
        self._pipe: asyncio.Transport | None = None
        self._handing_over = False
        self._probation: asyncio.TimerHandle | None = None
        self._connecting: asyncio.Task[None] | None = None
        self._draining = False

    # -- the client's side ---------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not registered as asyncio.Transport subclasses.
        self._client = cast(asyncio.Transport, transport)
        if len(self._relay.connections) >= self._relay.max_connections:
            log.warning(
                "gRPC relay: %d client connections, closing a new one", len(self._relay.connections)
            )
            self._closed = True
            self._client.abort()
            return
        self._relay.connections.add(self)
        self._connecting = asyncio.get_running_loop().create_task(self._connect())

    def data_received(self, data: bytes) -> None:
        if self._relaying:
            self._from_client(data)
            if self._draining and not self._calls.open:
                self._close_both()
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
                await loop.create_connection(
                    lambda: _UpstreamEnd(self),
                    relay.host,
                    relay.port,
                    ssl=relay.tls,
                    server_hostname=relay.host if relay.tls is not None else None,
                )
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
            failure = UpstreamUnavailable(self._name, self._target, "closed the connection")
            for call in list(self._calls.open.values()):
                client.write(
                    status_frame(
                        call.stream, _UNAVAILABLE, str(failure), headers_sent=call.headers_sent
                    )
                )
            self._calls.clear()
        if self._down.block is None and self._goaway_told is None:
            client.write(goaway(self._last_stream))
        client.close()

    def upstream_paused(self, paused: bool) -> None:
        # The upstream reads slower than the client sends.
        if self._client is not None:
            (self._client.pause_reading if paused else self._client.resume_reading)()

    # -- ending ----------------------------------------------------------------------------

    def drain(self) -> None:
        """Stop new calls (GOAWAY naming the last stream the client opened); the connection
        closes once its calls in flight end."""
        self._draining = True
        if self._pipe is not None:
            return  # the grpc.aio listener drains its own
        if self._relaying and self._goaway_told is None:
            self._goaway_told = self._last_stream
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
