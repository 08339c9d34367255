"""The gRPC side of the reference: one ``grpc.aio`` channel, its options, and what crosses it.

Everything travels as raw bytes (no serializer on either side), so the proxy never parses or
re-encodes a message. What this module decides is which metadata crosses a hop and whether a
failed call is the upstream's own answer (passed through as it is) or a transport failure (named
after the upstream, like the REST path's ``translate_upstream_error``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import grpc
import grpc.aio

from ..errors import UpstreamBadResponse, UpstreamError, UpstreamTimeout, UpstreamUnavailable
from ..settings import UpstreamSettings

Metadata = tuple[tuple[str, str | bytes], ...]

INT32_MAX = 2**31 - 1
_MAX_METHODS = 256

# Keys a gRPC library sets per hop: forwarding the client's would either be refused by grpc
# (``grpc-*`` are reserved) or mislabel the proxy's own connection (``user-agent`` is the
# proxy's, grpc #23644). The deadline travels as the call's timeout, not as ``grpc-timeout``.
_HOP_KEYS = frozenset(
    {"user-agent", "te", "content-type", "host", "connection", "keep-alive", "transfer-encoding"}
)

# Phrases grpc's core puts in a status it made up itself when the bytes on the wire were not
# gRPC (an HTTP/1 server, a proxy's error page, a broken HTTP/2 stream).
_MALFORMED = ("Failed parsing HTTP/2", "http2 header with status", "RST_STREAM", "Bad message")
_LOCAL_CODES = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# ... and when the connection under a call dropped (by then the channel may be connected again).
_DROPPED = ("Socket closed", "Stream removed", "Connection reset")


def forwardable(metadata: Iterable[tuple[str, str | bytes]] | None) -> Metadata:
    """``metadata`` less the per-hop keys; everything else (``authorization`` included, since
    the reference is the server the client meant to call) crosses unchanged."""
    if not metadata:
        return ()
    return tuple(
        (key, value)
        for key, value in metadata
        if key not in _HOP_KEYS and not key.startswith(("grpc-", ":"))
    )


def channel_options(max_bytes: int) -> list[tuple[str, int]]:
    return [
        # gRPC's 4 MiB default would refuse tensors Triton takes (triton server #1776, #4972).
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        # tritonclient's KeepAliveOptions defaults: what Triton's server is set up to tolerate
        # (more frequent pings earn a GOAWAY too_many_pings).
        ("grpc.keepalive_time_ms", INT32_MAX),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 2),
    ]


def server_options(max_bytes: int, *, reuse_port: bool) -> list[tuple[str, int]]:
    return [
        ("grpc.max_send_message_length", max_bytes),
        ("grpc.max_receive_message_length", max_bytes),
        # Triton's own server defaults, so a client tuned against Triton behaves the same here.
        ("grpc.keepalive_time_ms", 7_200_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.keepalive_permit_without_calls", 0),
        ("grpc.http2.max_pings_without_data", 2),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 300_000),
        ("grpc.http2.max_ping_strikes", 2),
        # grpc turns SO_REUSEPORT on by default on Linux: a second proxy would share the port
        # silently instead of failing. Only ``serve --workers`` shares it on purpose.
        ("grpc.so_reuseport", 1 if reuse_port else 0),
    ]


def _credentials(settings: UpstreamSettings) -> grpc.ChannelCredentials:
    def read(path: Path | None) -> bytes | None:
        return path.read_bytes() if path is not None else None

    return grpc.ssl_channel_credentials(
        root_certificates=read(settings.grpc_ca),
        private_key=read(settings.grpc_key),
        certificate_chain=read(settings.grpc_cert),
    )


class GrpcUpstream:
    """The reference's gRPC endpoint: one channel for the process's life, owned by the app's
    cleanup context (``_grpc_upstream_ctx``); every live call multiplexes over it."""

    def __init__(self, settings: UpstreamSettings, channel: grpc.aio.Channel) -> None:
        target = settings.grpc_target
        assert target is not None, "GrpcUpstream needs an upstream with a grpc_url"
        self.name = settings.name
        self.target = target
        self.timeout_s = settings.timeout_s
        self.channel = channel
        self._unary: dict[str, grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]] = {}

    @classmethod
    async def open(cls, settings: UpstreamSettings, max_bytes: int) -> GrpcUpstream:
        target = settings.grpc_target
        if target is None:
            raise ValueError(f"upstream {settings.name!r} has no grpc_url")
        options = channel_options(max_bytes)
        if settings.grpc_tls:
            # PEM files are read once, off the loop; a rotated certificate needs a restart.
            creds = await asyncio.to_thread(_credentials, settings)
            channel = grpc.aio.secure_channel(target, creds, options=options)
        else:
            channel = grpc.aio.insecure_channel(target, options=options)
        return cls(settings, channel)

    async def close(self) -> None:
        await self.channel.close()

    def unary(
        self, method: str, request: bytes, *, timeout: float | None, metadata: Metadata
    ) -> grpc.aio.UnaryUnaryCall[bytes, bytes]:
        multi = self._unary.get(method)
        if multi is None:
            # No serializers: the bytes go out and come back as they are. Kept per method
            # (bounded: names come from clients), not made again for every call.
            multi = self.channel.unary_unary(method)
            if len(self._unary) < _MAX_METHODS:
                self._unary[method] = multi
        return multi(request, timeout=timeout, metadata=metadata)

    def stream(
        self,
        method: str,
        requests: AsyncIterator[bytes],
        *,
        timeout: float | None,
        metadata: Metadata,
    ) -> grpc.aio.StreamStreamCall[bytes, bytes]:
        multi: grpc.aio.StreamStreamMultiCallable[bytes, bytes] = self.channel.stream_stream(method)
        return multi(requests, timeout=timeout, metadata=metadata)

    def transport_failure(
        self, exc: grpc.aio.AioRpcError, *, timeout: float | None, elapsed_s: float
    ) -> UpstreamError | None:
        """The failure of ``exc`` when the proxy's own grpc made it up (no connection, our
        deadline, bytes that were not gRPC); None when the upstream sent that status itself,
        which is then passed through unchanged.

        grpc reports both kinds alike (an ``AioRpcError``), so this decides from what the
        proxy knows: a DEADLINE_EXCEEDED once the timeout we set has run out is ours; an
        UNAVAILABLE while the channel is not connected is a connection that failed (a server
        that answers UNAVAILABLE itself is connected)."""
        code, details = exc.code(), exc.details() or ""
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            # 1 ms of slack: the deadline was set a hair after ``elapsed_s`` started counting.
            if timeout is not None and elapsed_s + 0.001 >= timeout:
                return UpstreamTimeout(
                    self.name, self.target, f"timed out waiting for an answer ({timeout:.3g} s)"
                )
            return None
        if code in _LOCAL_CODES and any(phrase in details for phrase in _MALFORMED):
            return UpstreamBadResponse(self.name, self.target, f"sent no valid gRPC ({details})")
        if code == grpc.StatusCode.UNAVAILABLE and any(p in details for p in _DROPPED):
            return UpstreamUnavailable(self.name, self.target, f"closed the connection ({details})")
        if code == grpc.StatusCode.UNAVAILABLE:
            state = self.channel.get_state(try_to_connect=False)
            if state != grpc.ChannelConnectivity.READY:
                return UpstreamUnavailable(self.name, self.target, f"cannot connect ({details})")
        return None
