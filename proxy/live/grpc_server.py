"""The gRPC live path: a ``grpc.aio`` server that passes every call through to the reference.

Every method is forwarded as raw bytes. Methods of ``inference.GRPCInferenceService`` are
unary-unary except ``ModelStreamInfer`` (stream-stream); any other service (``grpc.health.v1``,
reflection, a vendor's extension) is forwarded as stream-stream, which is wire-compatible with
every cardinality: the bytes of one request and one answer are a stream of one.

What the client gets is what the reference sent: status code, details, initial and trailing
metadata, message bytes. Only a failure the proxy's own grpc made up (no connection, the deadline,
bytes that were not gRPC) is replaced, by a status that names the upstream.

Each unary ``ModelInfer`` call, answered or failed, and each request of a ``ModelStreamInfer``
stream once its answer came (paired by id: ``grpc_stream_pairs``) passes
``GrpcLiveServer._completed``, which hands a ``GrpcExchange`` to ``on_infer`` (the seam for
mirroring; none by default) and counts admin methods through ``on_skip``. The hook runs on the
live call's task just before the answer goes out, so it must only hand the exchange off (a
non-blocking enqueue that drops when full), never wait.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import grpc
import grpc.aio

from ..canary.evidence import CanaryTag
from ..errors import UpstreamError, UpstreamUnavailable
from ..protocols.v2_grpc import http_status
from .grpc_stream_pairs import StreamPairs
from .grpc_upstream import GrpcUpstream, Metadata, forwardable, server_options

if TYPE_CHECKING:
    from .grpc_canary import GrpcCanary

log = logging.getLogger("shadowproxy")

INFERENCE_SERVICE = "/inference.GRPCInferenceService/"
MODEL_INFER = INFERENCE_SERVICE + "ModelInfer"
MODEL_STREAM_INFER = INFERENCE_SERVICE + "ModelStreamInfer"
# Methods that change the server (or read what others set): forwarded, never mirrored, and
# counted (``admin_method``), as the REST path counts its admin routes.
ADMIN_METHODS = frozenset(
    INFERENCE_SERVICE + name
    for name in (
        "RepositoryModelLoad",
        "RepositoryModelUnload",
        "SystemSharedMemoryRegister",
        "SystemSharedMemoryUnregister",
        "CudaSharedMemoryRegister",
        "CudaSharedMemoryUnregister",
        "TraceSetting",
        "LogSettings",
    )
)

_Context = grpc.aio.ServicerContext[bytes, bytes]
_MAX_HANDLERS = 256


@dataclass(frozen=True, slots=True)
class GrpcExchange:
    """One unary call as the client saw it: what went up, what came back, and how long it took."""

    method: str
    request: bytes
    """The serialized request (for ``ModelInfer``, a ``ModelInferRequest``), as the client sent."""
    metadata: Metadata
    """The client's invocation metadata as forwarded to the reference (credentials included:
    whoever stores an exchange must redact it)."""
    response: bytes | None
    """The serialized answer; None when the call failed."""
    code: grpc.StatusCode
    details: str
    initial_metadata: Metadata
    trailing_metadata: Metadata
    latency_s: float
    failure: UpstreamError | None
    """Set when the upstream could not be reached or answered no valid gRPC (``code`` is then
    the proxy's, not the upstream's)."""
    served_by: str | None = None
    """The canary candidate that answered, when it was not the reference."""
    canary: CanaryTag | None = None
    """The canary step whose evidence this call feeds."""


@dataclass(frozen=True, slots=True)
class _Outcome:
    """One upstream call's end, as the client will see it."""

    response: bytes | None
    code: grpc.StatusCode
    details: str
    initial: Metadata
    trailing: Metadata
    failure: UpstreamError | None


InferHook = Callable[[GrpcExchange], None]


def _timeout(context: _Context, cap_s: float | None) -> float | None:
    """The client's deadline (what is left of it) as the upstream call's timeout, capped."""
    remaining = context.time_remaining()
    if remaining is None:
        return cap_s
    remaining = max(0.0, remaining)
    return remaining if cap_s is None else min(remaining, cap_s)


class _PassThrough(grpc.GenericRpcHandler):
    """Routes every method, known or not, to the live server's forwarding coroutines."""

    def __init__(self, live: GrpcLiveServer) -> None:
        self._live = live
        # One handler per method, made once: building one inspects the coroutine's signature.
        # Method names come from clients, so the cache is bounded (past it, built per call).
        self._handlers: dict[str, grpc.RpcMethodHandler[bytes, bytes]] = {}

    def service(
        self, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler[bytes, bytes]:
        method = handler_call_details.method
        handler = self._handlers.get(method)
        if handler is not None:
            return handler
        # Partials, not closures: grpc picks how to drive a handler by whether it is a
        # coroutine or async generator function, and ``inspect`` sees through a partial.
        if method.startswith(INFERENCE_SERVICE) and method != MODEL_STREAM_INFER:
            handler = grpc.unary_unary_rpc_method_handler(partial(self._live.unary, method))
        else:
            handler = grpc.stream_stream_rpc_method_handler(partial(self._live.stream, method))
        if len(self._handlers) < _MAX_HANDLERS:
            self._handlers[method] = handler
        return handler


class GrpcLiveServer:
    """The gRPC listener. ``ProxyRunner`` starts it after the data app's resources exist and
    stops it (no new calls; calls in flight get the drain timeout) before they unwind; the
    channel it forwards over belongs to the data app."""

    def __init__(
        self,
        upstream: GrpcUpstream,
        *,
        max_bytes: int,
        on_infer: InferHook | None = None,
        on_skip: Callable[[str], None] | None = None,
        canary: GrpcCanary | None = None,
    ) -> None:
        self._upstream = upstream
        self._on_skip = on_skip
        self._canary = canary
        self._max_bytes = max_bytes
        self._on_infer = on_infer
        self._server: grpc.aio.Server | None = None

    async def start(self, host: str, port: int, *, reuse_port: bool = False) -> int:
        """Listen on ``host:port`` (0: any free port); returns the bound port."""
        server = grpc.aio.server(options=server_options(self._max_bytes, reuse_port=reuse_port))
        server.add_generic_rpc_handlers((_PassThrough(self),))
        address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        try:
            bound = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise OSError(f"gRPC listener: cannot bind {address} ({exc})") from None
        if bound == 0:  # older grpc releases report a failed bind this way
            raise OSError(f"gRPC listener: cannot bind {address}")
        await server.start()
        self._server = server
        return bound

    async def stop(self, grace_s: float) -> None:
        """Refuse new calls at once; calls in flight may finish within ``grace_s``, then are
        cancelled. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            await server.stop(grace_s)

    async def unary(self, method: str, request: bytes, context: _Context) -> bytes:
        metadata = forwardable(context.invocation_metadata())
        timeout = _timeout(context, self._upstream.timeout_s)
        canary = self._canary if method == MODEL_INFER else None
        split = canary.split(request, metadata) if canary is not None else None
        by_candidate = fell_back = False
        started = time.perf_counter()
        if canary is not None and split is not None and split.by_candidate:
            # A canary answer is a live answer: the reference's time limit, not the shadow's.
            outcome = await self._call(canary.candidate, method, split.body, metadata, timeout)
            by_candidate = True
            if isinstance(outcome.failure, UpstreamUnavailable):
                # The candidate is not there at all: the reference answers rather than the
                # client failing, and the fallback counts against the candidate.
                log.warning(
                    "canary candidate refused, answered by the reference: %s", outcome.failure
                )
                by_candidate, fell_back = False, True
                outcome = await self._call(self._upstream, method, request, metadata, timeout)
        else:
            outcome = await self._call(self._upstream, method, request, metadata, timeout)
        latency = time.perf_counter() - started
        if canary is not None and split is not None:
            status = http_status(outcome.code)
            canary.count(split.tag, by_candidate, status, latency, fell_back)
        self._completed(
            GrpcExchange(
                method,
                request,
                metadata,
                outcome.response,
                outcome.code,
                outcome.details,
                outcome.initial,
                outcome.trailing,
                latency,
                outcome.failure,
                served_by=canary.candidate.name if canary is not None and by_candidate else None,
                canary=split.tag if split is not None else None,
            )
        )
        if outcome.initial:
            await context.send_initial_metadata(outcome.initial)
        if outcome.response is None:
            await context.abort(outcome.code, outcome.details, outcome.trailing)
        context.set_trailing_metadata(outcome.trailing)
        return outcome.response

    async def _call(
        self,
        upstream: GrpcUpstream,
        method: str,
        request: bytes,
        metadata: Metadata,
        deadline_s: float | None,
    ) -> _Outcome:
        """One unary call to ``upstream``: its answer, or its own error status passed through,
        or a hop failure replaced by a status that names the upstream."""
        started = time.perf_counter()
        call = upstream.unary(method, request, timeout=deadline_s, metadata=metadata)
        try:
            response = await call
            return _Outcome(
                response,
                grpc.StatusCode.OK,
                await call.details() or "",
                forwardable(await call.initial_metadata()),
                forwardable(await call.trailing_metadata()),
                None,
            )
        except asyncio.CancelledError:
            # The client went away (or the server is stopping): end the upstream call too.
            call.cancel()
            raise
        except grpc.aio.AioRpcError as exc:
            elapsed = time.perf_counter() - started
            failure = upstream.transport_failure(exc, timeout=deadline_s, elapsed_s=elapsed)
            if failure is not None:
                return _Outcome(None, _failure_status(failure), str(failure), (), (), failure)
            # The upstream's own answer: passed through as it is.
            return _Outcome(
                None,
                exc.code(),
                exc.details() or "",
                forwardable(exc.initial_metadata()),
                forwardable(exc.trailing_metadata()),
                None,
            )

    async def stream(
        self, method: str, requests: AsyncIterator[bytes], context: _Context
    ) -> AsyncIterator[bytes]:
        upstream = self._upstream
        # Only the client's deadline: a stream is long-lived by design, and the reference's
        # ``timeout_s`` bounds one answer, not a session.
        timeout = _timeout(context, None)
        started = time.perf_counter()
        metadata = forwardable(context.invocation_metadata())
        # Each request of a ModelStreamInfer stream is copied as a ModelInfer, once answered.
        pairs = StreamPairs() if method == MODEL_STREAM_INFER and self._on_infer else None
        source = requests if pairs is None else pairs.requests(requests)
        call = upstream.stream(method, source, timeout=timeout, metadata=metadata)
        sent_initial = False
        try:
            # Initial metadata first, as the reference sent it, before any message.
            initial = forwardable(await call.initial_metadata())
            if initial:
                await context.send_initial_metadata(initial)
                sent_initial = True
            async for message in call:
                yield message
                if pairs is not None and (pair := pairs.answered(message)) is not None:
                    request, answer, latency = pair
                    ok = grpc.StatusCode.OK
                    self._completed(
                        GrpcExchange(
                            MODEL_INFER,
                            request,
                            metadata,
                            answer,
                            ok,
                            "",
                            initial,
                            (),
                            latency,
                            None,
                        )
                    )
            context.set_trailing_metadata(forwardable(await call.trailing_metadata()))
        except grpc.aio.AioRpcError as exc:
            elapsed = time.perf_counter() - started
            failure = upstream.transport_failure(exc, timeout=timeout, elapsed_s=elapsed)
            if failure is not None:
                log.warning("live gRPC call %s failed: %s", method, failure)
                await context.abort(_failure_status(failure), str(failure))
            initial = forwardable(exc.initial_metadata())
            if initial and not sent_initial:
                await context.send_initial_metadata(initial)
            await context.abort(
                exc.code(), exc.details() or "", forwardable(exc.trailing_metadata())
            )
        finally:
            # The client went away (or the server is stopping): end the upstream call too.
            if not call.done():
                call.cancel()

    def _completed(self, exchange: GrpcExchange) -> None:
        """Where every unary call ends, answered or failed, and every answered request of a
        ``ModelStreamInfer`` stream: the one seam for mirroring."""
        if exchange.failure is not None:
            log.warning("live gRPC call %s failed: %s", exchange.method, exchange.failure)
        if exchange.method in ADMIN_METHODS and self._on_skip is not None:
            self._on_skip("admin_method")
        if self._on_infer is None or exchange.method != MODEL_INFER:
            return
        try:
            self._on_infer(exchange)
        except Exception:
            # Shadow work never fails a live call; the client still gets its answer.
            log.exception("on_infer hook failed for a gRPC ModelInfer call")


def _failure_status(failure: UpstreamError) -> grpc.StatusCode:
    return grpc.StatusCode[failure.grpc_code]
