"""The frames of a relayed gRPC connection: read as they cross, and the few the relay writes.

``FrameRelay`` is what a ``RelayConnection`` (``grpc_relay``) does with bytes once its upstream
speaks HTTP/2: whole frames are passed on as they came (a partial one is held back, so a frame
of the relay's own never lands inside one, nor inside a header block), every header block is
decoded (HPACK's tables must be followed in order), calls are noted as they open and end
(``RelayCalls``), and a unary call past the reference's ``timeout_s`` is ended by the relay:
DEADLINE_EXCEEDED to the client naming the upstream, RST_STREAM to the upstream, and whatever
the upstream still sends for it dropped (header blocks excepted: the client's HPACK table must
see every one).
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from typing import Any

from hpack import HPACKDecodingError

from ..errors import UpstreamTimeout
from .grpc_relay_calls import RelayCall, RelayCalls
from .h2_frames import (
    ACK,
    CANCEL,
    CONTINUATION,
    DATA,
    DEFAULT_MAX_FRAME,
    END_HEADERS,
    END_STREAM,
    FRAME_HEAD,
    GOAWAY,
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
    read_head,
    read_last_stream,
    rst_stream,
    settings_of,
    status_frame,
    window_update,
)

log = logging.getLogger("shadowproxy")

_DEADLINE = 4
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

    def receiver_settings(self, payload: bytes) -> None:
        """Take on what the receiving end's SETTINGS say about this direction: the HPACK table
        its decoder allows the sender, and the largest frame it accepts."""
        for ident, value in settings_of(payload):
            if ident == SETTINGS_HEADER_TABLE_SIZE:
                self.headers.decoder.max_allowed_table_size = value
            elif ident == SETTINGS_MAX_FRAME_SIZE:
                self.max_frame = value


class FrameRelay:
    """The frame-level half of a relayed connection; its owner sets ``_client`` and
    ``_upstream`` (the transports), ``_closed``, and provides ``abort``."""

    def __init__(self, name: str, target: str, calls: RelayCalls) -> None:
        self._name = name
        self._target = target
        self._calls = calls
        self._client: asyncio.Transport | None = None
        self._upstream: asyncio.Transport | None = None
        self._closed = False
        self._up = _Side()  # client -> upstream
        self._down = _Side()  # upstream -> client
        self._dead: OrderedDict[int, None] = OrderedDict()
        self._last_stream = 0
        self._preface = len(PREFACE)
        self._goaway_told: int | None = None
        """The last stream a GOAWAY (the upstream's or ours) named to the client: a later one
        may name an earlier stream, never a later one."""

    def abort(self) -> None:
        raise NotImplementedError

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
        while end - at >= FRAME_HEAD and not self._closed:
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
        if self._closed:
            return  # broken off mid-way: nothing more crosses
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
            self._down.receiver_settings(data[start:stop])  # they bound what the upstream sends
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
        elif kind in (GOAWAY, SETTINGS):
            return self._upstream_control(kind, flags, data, start, stop)
        return True

    def _upstream_control(self, kind: int, flags: int, data: bytes, start: int, stop: int) -> bool:
        if kind == GOAWAY and stop - start >= 4:
            last = read_last_stream(data, start)
            if self._goaway_told is not None and last > self._goaway_told:
                return False
            self._goaway_told = last
        elif kind == SETTINGS and not flags & ACK:
            self._up.receiver_settings(data[start:stop])  # they bound what the client sends
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
            if sum(map(len, pieces)) > _MAX_HEADER_LIST:
                # A CONTINUATION flood: the block would be held whole to be decoded.
                self._broken(f"a header block over {_MAX_HEADER_LIST} bytes")
                return None
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
            self._name, self._target, f"timed out waiting for an answer ({limit:.3g} s)"
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
        self._closed = True
        self.abort()
