"""HPACK header block decoding (RFC 7541) for the gRPC relay, at the speed the live path needs.

The relay must decode every header block of both directions of every connection (HPACK's
dynamic tables are per connection and only stay in step if no block is skipped). ``hpack``'s
``Decoder`` walks Huffman strings a nibble at a time in Python, with a logging call per step:
measured at saturation it was ~60% of the relay's CPU, most of it on the literal headers
servers such as NGINX send with every answer. This decoder keeps ``hpack``'s tables (the
static table, the Huffman code) and its error type, and decodes Huffman strings a byte at a
time through a table built once from that code (256 tree states x 256 bytes: the emitted
symbols and the next state). ``tests/proxy/test_h2_hpack.py`` checks it against ``hpack``'s own
encoder and decoder.
"""

from __future__ import annotations

from collections import deque
from functools import cache

from hpack import HPACKDecodingError
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.table import HeaderTable

Fields = list[tuple[bytes, bytes]]

_STATIC: tuple[tuple[bytes, bytes], ...] = HeaderTable.STATIC_TABLE
_ENTRY_OVERHEAD = 32  # RFC 7541 4.1: an entry's size is its name, its value and 32 octets
_LEAF = 1 << 16
_EOS = 256


def _huffman_tree() -> tuple[list[int], list[int]]:
    """Children of each internal node (0 the root) for a 0 bit and a 1 bit; a leaf is its
    symbol with ``_LEAF`` set."""
    zero, one = [-1], [-1]
    for symbol, (code, length) in enumerate(zip(REQUEST_CODES, REQUEST_CODES_LENGTH, strict=True)):
        node = 0
        for shift in range(length - 1, -1, -1):
            kids = one if (code >> shift) & 1 else zero
            if shift == 0:
                kids[node] = _LEAF | symbol
            else:
                if kids[node] == -1:
                    zero.append(-1)
                    one.append(-1)
                    kids[node] = len(zero) - 1
                node = kids[node]
    return zero, one


def _walk(zero: list[int], one: list[int], state: int, nibble: int) -> tuple[bytes, int]:
    """The symbols four bits complete from ``state``, and the state they end in (-1: EOS)."""
    node, out = state, bytearray()
    for shift in (3, 2, 1, 0):
        child = one[node] if (nibble >> shift) & 1 else zero[node]
        if not child & _LEAF:
            node = child
        elif child & 0xFFFF == _EOS:
            return bytes(out), -1
        else:
            out.append(child & 0xFFFF)
            node = 0
    return bytes(out), node


@cache
def huffman_tables() -> tuple[list[bytes], list[int], list[bool]]:
    """(emitted, next state, may end here) per state x byte, state 0 being the tree's root;
    next state -1 where the byte completes the EOS symbol, which a string must not contain."""
    zero, one = _huffman_tree()
    states = len(zero)
    nibbles = [_walk(zero, one, state, nibble) for state in range(states) for nibble in range(16)]
    emitted: list[bytes] = [b""] * (states * 256)
    following = [-1] * (states * 256)
    for state in range(states):
        for high in range(16):
            head, middle = nibbles[state * 16 + high]
            if middle < 0:
                continue
            for low in range(16):
                tail, end = nibbles[middle * 16 + low]
                emitted[(state << 8) | (high << 4) | low] = head + tail
                following[(state << 8) | (high << 4) | low] = end
    # A string ends on the root, or padded with up to 7 one-bits (the start of EOS).
    may_end = [False] * states
    node = 0
    for _ in range(8):
        may_end[node] = True
        node = one[node]
    return emitted, following, may_end


def huffman_decode(data: bytes | memoryview) -> bytes:
    emitted, following, may_end = huffman_tables()
    state, out = 0, []
    for byte in data:
        at = (state << 8) | byte
        out.append(emitted[at])
        state = following[at]
        if state < 0:
            raise HPACKDecodingError("EOS inside a Huffman-coded string")
    if not may_end[state]:
        raise HPACKDecodingError("a Huffman-coded string padded with other than EOS bits")
    return b"".join(out)


def _integer(data: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
    """The integer whose prefix is the low ``prefix_bits`` of ``data[at]``, and where it ends."""
    mask = (1 << prefix_bits) - 1
    value = data[at] & mask
    at += 1
    if value < mask:
        return value, at
    shift = 0
    while True:
        if at >= len(data) or shift > 28:
            raise HPACKDecodingError("a truncated or oversized integer")
        byte = data[at]
        at += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, at


def _string(data: bytes, at: int) -> tuple[bytes, int]:
    huffman = data[at] & 0x80
    length, at = _integer(data, at, 7)
    end = at + length
    if end > len(data):
        raise HPACKDecodingError("a string past the end of its header block")
    raw = data[at:end]
    return (huffman_decode(raw) if huffman else raw), end


class HpackDecoder:
    """One direction's decoding context: its dynamic table, and its limits."""

    __slots__ = (
        "_table",
        "_used",
        "max_allowed_table_size",
        "max_header_list_size",
        "size",
        "version",
    )

    def __init__(self, max_header_list_size: int) -> None:
        self._table: deque[tuple[bytes, bytes]] = deque()
        self._used = 0
        self.size = 4096
        """The table's size now (the encoder may lower it, up to ``max_allowed_table_size``)."""
        self.max_allowed_table_size = 4096
        """What the decoding end's SETTINGS_HEADER_TABLE_SIZE allows."""
        self.max_header_list_size = max_header_list_size
        self.version = 0
        """Counts changes to the dynamic table: equal versions, equal tables."""

    def decode(self, data: bytes) -> Fields:
        fields: Fields = []
        listed, at, end = 0, 0, len(data)
        while at < end:
            first = data[at]
            if first & 0x80:  # indexed field
                index, at = _integer(data, at, 7)
                field = self._entry(index)
            elif first & 0x40:  # literal, added to the table
                field, at = self._literal(data, at, 6)
                self._add(field)
            elif first & 0x20:  # table size update, only before the first field
                if fields:
                    raise HPACKDecodingError("a table size update after a field")
                size, at = _integer(data, at, 5)
                if size > self.max_allowed_table_size:
                    raise HPACKDecodingError(f"a table size of {size}, over the settings' limit")
                self.size = size
                self._evict(0)
                continue
            else:  # literal, not added (without indexing, or never indexed)
                field, at = self._literal(data, at, 4)
            fields.append(field)
            listed += len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
            if listed > self.max_header_list_size:
                raise HPACKDecodingError(f"a header list over {self.max_header_list_size} bytes")
        return fields

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= len(_STATIC):
            return _STATIC[index - 1]
        dynamic = index - len(_STATIC) - 1
        if index == 0 or dynamic >= len(self._table):
            raise HPACKDecodingError(f"index {index} is in neither table")
        return self._table[dynamic]

    def _literal(self, data: bytes, at: int, prefix_bits: int) -> tuple[tuple[bytes, bytes], int]:
        index, at = _integer(data, at, prefix_bits)
        if index:
            name = self._entry(index)[0]
        else:
            if at >= len(data):
                raise HPACKDecodingError("a literal field without its name")
            name, at = _string(data, at)
        if at >= len(data):
            raise HPACKDecodingError("a literal field without its value")
        value, at = _string(data, at)
        return (name, value), at

    def _add(self, field: tuple[bytes, bytes]) -> None:
        size = len(field[0]) + len(field[1]) + _ENTRY_OVERHEAD
        self._evict(size)
        if size <= self.size:
            self._table.appendleft(field)
            self._used += size
        self.version += 1

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until ``room`` more octets fit (all of them if it never
        can: an entry larger than the table empties it, RFC 7541 4.4)."""
        while self._table and self._used + room > self.size:
            name, value = self._table.pop()
            self._used -= len(name) + len(value) + _ENTRY_OVERHEAD
            self.version += 1
