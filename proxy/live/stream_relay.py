"""Relay a streamed answer (LLM routes) to the client as it is read, and tee it for the copy.

Each piece of body is written to the client in the turn of the loop that read it from the
reference: an SSE event is never held for the next one. An answer framed by its length keeps
that length; any other is sent chunked, one chunk per piece read (chunk boundaries are
hop-by-hop: the client reads the same bytes, in the same order, as soon as they came).

When the request is mirrored, the relay also keeps what it sent (up to ``tee_cap`` bytes) and
when each piece came: the shadow side assembles the whole answer from it, off the live path,
with its time to first token. A client that stops reading pauses the reference's connection,
so neither the relay nor the transport holds more than one read beyond the write buffer.
"""

from __future__ import annotations

from collections.abc import Callable

from multidict import CIMultiDict

from ..shadow.analysis import Exchange
from .http1 import reason_phrase, response_head
from .stream_tee import Tee
from .upstream_pool import Pausable


class StreamRelay:
    """An ``AnswerSink`` writing to one client connection."""

    def __init__(
        self, send: Callable[[bytes], None], close: bool, tee_cap: int | None, started: float
    ) -> None:
        """``tee_cap``: keep up to this many bytes for the copy (None keeps nothing);
        ``started``: when the request was sent (``time.perf_counter()``)."""
        self._send = send
        self._close = close
        self._tee = Tee(tee_cap, started) if tee_cap is not None else None
        self._chunked = False
        self.upstream: Pausable | None = None
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.sent_head = False

    def head(
        self, status: int, reason: bytes, headers: list[tuple[bytes, bytes]], upstream: Pausable
    ) -> None:
        self.status, self.headers, self.upstream = status, headers, upstream
        length = next((v for n, v in headers if n.lower() == b"content-length"), None)
        self._chunked = length is None
        self._send(
            response_head(status, reason or reason_phrase(status), headers, length, self._close)
        )
        self.sent_head = True

    def body(self, data: bytes) -> None:
        if not data:
            return
        self._send(b"%x\r\n%b\r\n" % (len(data), data) if self._chunked else data)
        if self._tee is not None:
            self._tee.add(data)

    def exchange(self, upstream: str, *, complete: bool) -> Exchange | None:
        """What was relayed, as the copy's reference answer (``complete``: to its end); None
        when nothing was kept, or more than the tee's cap came."""
        if self._tee is None:
            return None
        headers = CIMultiDict((n.decode("latin-1"), v.decode("latin-1")) for n, v in self.headers)
        return self._tee.exchange(upstream, self.status, headers, complete=complete)

    def finish(self) -> None:
        if self._chunked:
            self._send(b"0\r\n\r\n")

    def pause(self) -> None:
        if self.upstream is not None:
            self.upstream.pause_reading()

    def resume(self) -> None:
        if self.upstream is not None:
            self.upstream.resume_reading()
