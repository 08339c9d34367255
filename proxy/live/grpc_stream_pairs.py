"""Copies of the requests of a ``ModelStreamInfer`` stream, paired with their answers.

On a stream a request and its answer are two messages that need not follow each other: a
server may answer out of order (several model instances, several models on one stream). They
are paired by the ``id`` the client gave the request, which the answer echoes; a request
without an id cannot be paired and is not copied. Decoupled models (any number of answers per
request) are recognised on the shadow side by their config and never mirrored; only the first
answer to an id would be paired here. At most ``MAX_PENDING`` requests per stream wait for their
answer (the rest are not copied), so a stream whose answers never come holds bounded memory.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator

from ..protocols.base import MalformedMessage
from ..protocols.v2_grpc.wire import message_id, stream_answer

MAX_PENDING = 256


class StreamPairs:
    def __init__(self) -> None:
        self._pending: dict[str, tuple[bytes, float]] = {}

    async def requests(self, source: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
        """``source``'s messages, unchanged, each noted on its way up."""
        async for message in source:
            self.sent(message)
            yield message

    def sent(self, message: bytes) -> None:
        """Note ``message`` (a request going up) so its answer can be paired with it."""
        try:
            request_id = message_id(message)
        except MalformedMessage:
            return  # the server says what is wrong with it, in the stream
        if request_id and request_id not in self._pending and len(self._pending) < MAX_PENDING:
            self._pending[request_id] = (message, time.perf_counter())

    def answered(self, message: bytes) -> tuple[bytes, bytes, float] | None:
        """(request, answer, seconds between them) when ``message`` answers a noted request."""
        try:
            answer = stream_answer(message)
            request_id = message_id(answer) if answer is not None else ""
        except MalformedMessage:
            return None
        pending = self._pending.pop(request_id, None) if request_id else None
        if answer is None or pending is None:
            return None
        request, sent_at = pending
        return request, answer, time.perf_counter() - sent_at
