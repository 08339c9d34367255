"""The shadow side's gRPC client: one copied ``ModelInfer`` to one upstream, failures as values.

Each upstream with a ``grpc_url`` gets one channel (``live.grpc_upstream.GrpcUpstream``: the
same options, TLS and failure rules as the live path's), opened on its first copy and closed
with the shadow client. A call's answer is recorded as the live path records the reference's
(``live.grpc_mirror.grpc_headers``), so both sides of a pair read alike.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import grpc
import grpc.aio

from ..errors import UpstreamError
from ..live.grpc_mirror import grpc_headers
from ..live.grpc_server import MODEL_INFER
from ..live.grpc_upstream import GrpcUpstream, forwardable
from ..protocols.v2_grpc import http_status
from ..settings import UpstreamSettings
from .analysis import Exchange


class ShadowGrpc:
    """Owned by ``ShadowClient`` (closed with it)."""

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._upstreams: dict[str, GrpcUpstream] = {}

    async def _upstream(self, settings: UpstreamSettings) -> GrpcUpstream:
        target = settings.grpc_target
        assert target is not None, "only candidates with a grpc_url get gRPC copies"
        upstream = self._upstreams.get(target)
        if upstream is None:
            opened = await GrpcUpstream.open(settings, self._max_bytes)
            # Two first copies may both have opened one (TLS files are read off the loop):
            # the first kept wins, the other is closed rather than leaked.
            upstream = self._upstreams.setdefault(target, opened)
            if upstream is not opened:
                await opened.close()
        return upstream

    async def infer(
        self,
        settings: UpstreamSettings,
        body: bytes,
        metadata: Iterable[tuple[str, str]],
        timeout_s: float,
    ) -> Exchange | UpstreamError:
        upstream = await self._upstream(settings)
        started = time.perf_counter()
        call = upstream.unary(
            MODEL_INFER, body, timeout=timeout_s, metadata=forwardable(tuple(metadata))
        )
        try:
            answer: bytes = await call
        except grpc.aio.AioRpcError as exc:
            elapsed = time.perf_counter() - started
            failure = upstream.transport_failure(exc, timeout=timeout_s, elapsed_s=elapsed)
            if failure is not None:
                return failure
            headers = grpc_headers(
                exc.code(),
                exc.details() or "",
                exc.initial_metadata() or (),
                exc.trailing_metadata() or (),
            )
            return Exchange(
                settings.name,
                http_status(exc.code()),
                headers,
                (exc.details() or "").encode(),
                elapsed,
            )
        latency = time.perf_counter() - started
        headers = grpc_headers(
            grpc.StatusCode.OK,
            await call.details() or "",
            await call.initial_metadata() or (),
            await call.trailing_metadata() or (),
        )
        return Exchange(settings.name, 200, headers, answer, latency)

    async def close(self) -> None:
        for upstream in self._upstreams.values():
            await upstream.close()
        self._upstreams.clear()
