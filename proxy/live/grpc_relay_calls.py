"""The calls of one relayed gRPC connection: what the relay follows of each HTTP/2 stream.

Every stream the client opens is noted (its method, when it started, whether its answer's
headers went out), so that a call the upstream leaves unanswered can still be ended with a
status that names the upstream. ``ModelInfer`` calls, and the requests of a
``ModelStreamInfer`` stream, are also read as they pass: their request and answer messages
become the same ``GrpcExchange`` the ``grpc.aio`` listener hands to ``on_infer`` (mirroring), so
the shadow side cannot tell which listener a copy came from. Admin methods are counted
(``admin_method``) as they start.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import time
from collections.abc import Callable
from typing import Final

import grpc

from ..protocols.base import MalformedMessage
from .grpc_server import (
    ADMIN_METHODS,
    INFERENCE_SERVICE,
    MODEL_INFER,
    MODEL_STREAM_INFER,
    GrpcExchange,
    InferHook,
)
from .grpc_stream_pairs import StreamPairs
from .grpc_upstream import Metadata, forwardable
from .h2_frames import GrpcMessages, grpc_message, grpc_timeout_s

log = logging.getLogger("shadowproxy")

Fields = list[tuple[bytes, bytes]]
_CODES: Final = {code.value[0]: code for code in grpc.StatusCode}

# What a call's messages are read for.
_UNARY, _STREAM = 1, 2


def _text(fields: Fields) -> list[tuple[str, str]]:
    # Header names and values are ASCII in gRPC; latin-1 decodes any byte, never fails.
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in fields]


def _metadata(fields: list[tuple[str, str]]) -> Metadata:
    """Metadata as ``grpc.aio`` hands it over: ``-bin`` values as the bytes they encode."""
    pairs: list[tuple[str, str | bytes]] = []
    for name, value in fields:
        if name.endswith("-bin"):
            if value.startswith("\x00"):
                # grpc's "true binary" metadata (both ends grpc core, agreed in SETTINGS).
                pairs.append((name, value[1:].encode("latin-1")))
                continue
            try:
                pairs.append((name, base64.b64decode(value + "=" * (-len(value) % 4))))
            except (binascii.Error, ValueError):
                continue  # the upstream judges it; a copy goes without it
        else:
            pairs.append((name, value))
    return forwardable(pairs)


class RelayCall:
    """One HTTP/2 stream of the connection, from the client's HEADERS to the upstream's end."""

    __slots__ = (
        "answer",
        "answers",
        "headers_sent",
        "initial",
        "metadata",
        "method",
        "pairs",
        "reads",
        "request",
        "requests",
        "started",
        "stream",
        "timer",
    )

    def __init__(self, stream: int, method: str) -> None:
        self.stream = stream
        self.method = method
        self.started = time.perf_counter()
        self.headers_sent = False
        """Whether the upstream's answer headers reached the client (an error then goes out
        as trailers, else as a whole trailers-only answer)."""
        self.timer: asyncio.TimerHandle | None = None
        self.reads = 0
        self.metadata: Metadata = ()
        self.requests: GrpcMessages | None = None
        self.answers: GrpcMessages | None = None
        self.request: bytes | None = None
        self.answer: bytes | None = None
        self.initial: Metadata = ()
        self.pairs: StreamPairs | None = None


class RelayCalls:
    """One connection's open calls; the relay connection feeds it what it reads."""

    def __init__(
        self,
        *,
        cap: int,
        timeout_s: float | None,
        on_infer: InferHook | None,
        on_skip: Callable[[str], None] | None,
        copying: Callable[[], bool] | None = None,
    ) -> None:
        self.open: dict[int, RelayCall] = {}
        self._copying = copying
        self._cap = cap
        self._timeout_s = timeout_s
        self._on_infer = on_infer
        self._on_skip = on_skip

    def start(self, stream: int, fields: Fields) -> tuple[RelayCall, float | None]:
        """Note a new call; with it, how long the relay gives the upstream to end it (None: the
        client's own deadline, which the upstream got, is shorter, or the call is a stream)."""
        method = next((value for name, value in fields if name == b":path"), b"").decode("latin-1")
        call = RelayCall(stream, method)
        self.open[stream] = call
        limit: float | None = None
        if method.startswith(INFERENCE_SERVICE) and method != MODEL_STREAM_INFER:
            # As the grpc.aio listener: a unary call gets the reference's timeout_s at most.
            asked = next((value for name, value in fields if name == b"grpc-timeout"), None)
            deadline = grpc_timeout_s(asked.decode("latin-1")) if asked is not None else None
            if self._timeout_s is not None and (deadline is None or deadline > self._timeout_s):
                limit = self._timeout_s
        if (
            self._on_infer is not None
            and method in (MODEL_INFER, MODEL_STREAM_INFER)
            and (self._copying is None or self._copying())
        ):
            text = _text(fields)
            encoding = next((value for name, value in text if name == "grpc-encoding"), None)
            call.reads = _UNARY if method == MODEL_INFER else _STREAM
            call.metadata = _metadata([(n, v) for n, v in text if not n.startswith(":")])
            call.requests = GrpcMessages(self._cap, encoding)
            if call.reads == _STREAM:
                call.pairs = StreamPairs()
        elif method in ADMIN_METHODS and self._on_skip is not None:
            self._on_skip("admin_method")
        return call, limit

    def request_data(self, call: RelayCall, data: bytes) -> None:
        if not call.reads or call.requests is None:
            return
        try:
            messages = call.requests.feed(data)
        except MalformedMessage as exc:
            log.info("gRPC call %s is not copied: %s", call.method, exc)
            call.reads = 0
            return
        if call.requests.overflow:
            # Too large to copy; the live call itself goes on untouched.
            call.reads = 0
            if self._on_skip is not None:
                self._on_skip("request_too_large")
            return
        for message in messages:
            if call.pairs is not None:
                call.pairs.sent(message)
            elif call.request is None:
                call.request = message

    def answer_headers(self, call: RelayCall, fields: Fields, end_stream: bool) -> None:
        """The upstream's headers for ``call``: the answer's first, or its trailers."""
        first = not call.headers_sent
        call.headers_sent = True
        if call.reads and first and not end_stream:  # (trailers-only: no initial metadata)
            text = _text(fields)
            call.initial = forwardable(text)
            encoding = next((value for name, value in text if name == "grpc-encoding"), None)
            call.answers = GrpcMessages(self._cap, encoding)
        if end_stream:
            self._ended(call, fields)

    def answer_data(self, call: RelayCall, data: bytes, end_stream: bool) -> None:
        if call.reads and call.answers is not None:
            try:
                messages = call.answers.feed(data)
            except MalformedMessage as exc:
                log.info("gRPC answer to %s is not copied: %s", call.method, exc)
                call.reads = 0
                messages = []
            for message in messages:
                if call.pairs is not None:
                    self._paired(call, message)
                elif call.answer is None:
                    call.answer = message
        if end_stream:
            self._ended(call, [])

    def forget(self, stream: int) -> RelayCall | None:
        """``stream`` ended without a status (reset by either side): no exchange."""
        call = self.open.pop(stream, None)
        if call is not None and call.timer is not None:
            call.timer.cancel()
        return call

    def clear(self) -> None:
        for stream in list(self.open):
            self.forget(stream)

    def _ended(self, call: RelayCall, trailers: Fields) -> None:
        self.forget(call.stream)
        if call.reads != _UNARY or call.request is None or self._on_infer is None:
            return
        text = _text(trailers)
        values = dict(text)
        try:
            code = _CODES.get(int(values.get("grpc-status", "2")), grpc.StatusCode.UNKNOWN)
        except ValueError:
            code = grpc.StatusCode.UNKNOWN
        answer = call.answer if code == grpc.StatusCode.OK else None
        self._hand(
            GrpcExchange(
                MODEL_INFER,
                call.request,
                call.metadata,
                answer,
                code,
                grpc_message(values.get("grpc-message", "")),
                call.initial,
                forwardable(text),
                time.perf_counter() - call.started,
                None,
            )
        )

    def _paired(self, call: RelayCall, message: bytes) -> None:
        assert call.pairs is not None
        pair = call.pairs.answered(message)
        if pair is None:
            return
        request, answer, latency = pair
        ok = grpc.StatusCode.OK
        self._hand(
            GrpcExchange(
                MODEL_INFER, request, call.metadata, answer, ok, "", call.initial, (), latency, None
            )
        )

    def _hand(self, exchange: GrpcExchange) -> None:
        assert self._on_infer is not None
        try:
            self._on_infer(exchange)
        except Exception:
            # Shadow work never fails a live call.
            log.exception("on_infer hook failed for a relayed gRPC ModelInfer call")
