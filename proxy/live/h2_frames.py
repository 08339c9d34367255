"""HTTP/2 frames (RFC 9113) and gRPC messages, as far as the gRPC relay reads and writes them.

The relay forwards frames as they came; it only reads their 9-byte heads, the header blocks
(HPACK, ``hpack``'s decoder) and the DATA of the calls it copies. The few frames it writes itself
(an error status for a call the upstream failed, a GOAWAY while stopping, a RST_STREAM or a
WINDOW_UPDATE for bytes it consumed) are built here. Their header blocks use only HPACK's static
table and literals that are never indexed, so the receiver's dynamic table, which the other
endpoint's encoder drives, is left exactly as that encoder expects.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from urllib.parse import quote, unquote

from hpack import Encoder, NeverIndexedHeaderTuple

from ..protocols.base import MalformedMessage
from ..protocols.v2_rest.codec import inflate
from .h2_hpack import Fields, HpackDecoder

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
FRAME_HEAD = 9

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY = range(8)
WINDOW_UPDATE, CONTINUATION = 8, 9

END_STREAM = 0x1
ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIORITY_FLAG = 0x20

SETTINGS_HEADER_TABLE_SIZE = 0x1
SETTINGS_MAX_FRAME_SIZE = 0x5
DEFAULT_MAX_FRAME = 16_384

NO_ERROR = 0x0
CANCEL = 0x8

# Length (24 bits as a byte and a short), type, flags, stream id (its top bit reserved).
_HEAD = struct.Struct(">BHBBI")
_SETTING = struct.Struct(">HI")
_GRPC_PREFIX = struct.Struct(">BI")
_STREAM_MASK = 0x7FFF_FFFF


def read_head(buf: bytes | bytearray, at: int) -> tuple[int, int, int, int]:
    """(payload length, type, flags, stream id) of the frame whose head starts at ``at``."""
    high, low, kind, flags, stream = _HEAD.unpack_from(buf, at)
    return (high << 16) | low, kind, flags, stream & _STREAM_MASK


def read_last_stream(buf: bytes, at: int) -> int:
    """The last stream id a GOAWAY payload starting at ``at`` names."""
    return int.from_bytes(buf[at : at + 4], "big") & _STREAM_MASK


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    size = len(payload)
    return _HEAD.pack(size >> 16, size & 0xFFFF, kind, flags, stream) + payload


def is_server_settings(head: bytes) -> bool:
    """Whether ``head`` (9 bytes) opens an HTTP/2 server's connection: a SETTINGS frame on
    stream 0, not an ACK, whose length is a whole number of settings."""
    size, kind, flags, stream = read_head(head, 0)
    return kind == SETTINGS and stream == 0 and not flags & ACK and size % 6 == 0


def settings_of(payload: bytes) -> Iterator[tuple[int, int]]:
    for at in range(0, len(payload) - len(payload) % 6, 6):
        yield _SETTING.unpack_from(payload, at)


def data_of(flags: int, payload: bytes) -> bytes:
    """A DATA frame's data, its padding taken off."""
    if flags & PADDED and payload:
        return payload[1 : len(payload) - payload[0]]
    return payload


def block_fragment(flags: int, payload: bytes) -> bytes:
    """A HEADERS frame's piece of the header block, less padding and priority fields."""
    start, end = 0, len(payload)
    if flags & PADDED and payload:
        start, end = 1, end - payload[0]
    if flags & PRIORITY_FLAG:
        start += 5
    return payload[start:end]


def rst_stream(stream: int, code: int) -> bytes:
    return frame(RST_STREAM, 0, stream, code.to_bytes(4, "big"))


def window_update(stream: int, increment: int) -> bytes:
    return frame(WINDOW_UPDATE, 0, stream, increment.to_bytes(4, "big"))


def goaway(last_stream: int, code: int = NO_ERROR) -> bytes:
    return frame(
        GOAWAY, 0, 0, (last_stream & _STREAM_MASK).to_bytes(4, "big") + code.to_bytes(4, "big")
    )


def status_frame(stream: int, code: int, message: str, *, headers_sent: bool) -> bytes:
    """The frame that ends ``stream`` with gRPC status ``code``: trailers after the answer's
    headers, or a whole trailers-only answer when none went out yet."""
    fields = [] if headers_sent else [(":status", "200"), ("content-type", "application/grpc")]
    fields += [("grpc-status", str(code)), ("grpc-message", quote(message, safe=" /:'(),.="))]
    # A fresh encoder each time: never-indexed literals leave no state behind in either table.
    block = Encoder().encode([NeverIndexedHeaderTuple(k, v) for k, v in fields], huffman=False)
    return frame(HEADERS, END_STREAM | END_HEADERS, stream, block)


# Decoded header blocks kept per direction: a server's answers (and a client's calls) often
# repeat the same bytes call after call, and then need no decoding at all.
_KEPT_BLOCKS = 256


class HeaderBlocks:
    """One direction's HPACK decoder, and the blocks it decoded since its table last changed.

    A block decodes to the same fields whenever the dynamic table is as it was: a block that
    changed the table (an entry added or evicted, its size updated) is never kept, and every
    change clears what was kept."""

    __slots__ = ("_kept", "decoder")

    def __init__(self, max_header_list_size: int) -> None:
        self.decoder = HpackDecoder(max_header_list_size)
        self._kept: dict[bytes, Fields] = {}

    def decode(self, block: bytes) -> Fields:
        """The block's (name, value) pairs; raises ``hpack.HPACKDecodingError`` when it does
        not decode."""
        kept = self._kept.get(block)
        if kept is not None:
            return kept
        decoder = self.decoder
        version, size = decoder.version, decoder.size
        fields = decoder.decode(block)
        if decoder.version != version or decoder.size != size:
            self._kept.clear()
        elif len(self._kept) < _KEPT_BLOCKS:
            self._kept[block] = fields
        return fields


def grpc_timeout_s(value: str) -> float | None:
    """The seconds in a ``grpc-timeout`` header ("100m", "3S"); None when it is not one."""
    units = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
    if len(value) < 2 or value[-1] not in units or not value[:-1].isdigit():
        return None
    return int(value[:-1]) * units[value[-1]]


def grpc_message(value: str) -> str:
    """A ``grpc-message`` as the application set it (it travels percent-encoded)."""
    return unquote(value, errors="replace")


class GrpcMessages:
    """The messages of one direction of a call, from its DATA as it comes.

    Holds at most one message's bytes, and none of a message declared over ``cap`` (it is not
    kept: ``overflow`` says so), so a large upload costs no more than what the relay copies."""

    def __init__(self, cap: int, encoding: str | None) -> None:
        self._cap = cap
        self._encoding = encoding
        self._buf = bytearray()
        self._skip = 0
        self.overflow = False

    def feed(self, data: bytes) -> list[bytes]:
        """The messages ``data`` completes, inflated when they were sent compressed.

        Raises ``MalformedMessage`` for a compressed message in an encoding the relay cannot
        read, or one that inflates past the cap."""
        if self._skip:
            dropped = min(self._skip, len(data))
            self._skip -= dropped
            data = data[dropped:]
        self._buf += data
        out: list[bytes] = []
        while len(self._buf) >= _GRPC_PREFIX.size:
            compressed, size = _GRPC_PREFIX.unpack_from(self._buf, 0)
            if size > self._cap:
                self.overflow = True
                self._skip = max(0, size - (len(self._buf) - _GRPC_PREFIX.size))
                del self._buf[: _GRPC_PREFIX.size + size]
                continue
            end = _GRPC_PREFIX.size + size
            if len(self._buf) < end:
                break
            message = bytes(self._buf[_GRPC_PREFIX.size : end])
            del self._buf[:end]
            if compressed:
                if not self._encoding:
                    raise MalformedMessage("a compressed gRPC message without grpc-encoding")
                message = inflate(message, self._encoding, self._cap)
            out.append(message)
        return out
