"""The relay's HPACK decoder against ``hpack``'s own encoder and decoder: the same fields from
the same blocks, the same dynamic table after a connection's worth of them, and bad blocks
refused."""

from __future__ import annotations

import random

import pytest
from hpack import Decoder, Encoder, HPACKDecodingError, NeverIndexedHeaderTuple
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH

from proxy.live.h2_frames import HeaderBlocks
from proxy.live.h2_hpack import HpackDecoder, huffman_decode


def test_every_byte_value_round_trips_through_huffman() -> None:
    encode = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH).encode
    rng = random.Random(7)
    samples = [bytes(range(256)), b"", b"a", b"application/grpc", b"\xff" * 40]
    samples += [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 64))) for _ in range(300)]
    for data in samples:
        assert huffman_decode(encode(data)) == data


def test_huffman_refuses_eos_and_bad_padding() -> None:
    with pytest.raises(HPACKDecodingError):
        huffman_decode(b"\xff\xff\xff\xff")  # 30 one-bits: EOS itself
    with pytest.raises(HPACKDecodingError):
        huffman_decode(b"\x00")  # '0' (5 bits) padded with zeros, not EOS bits


def _headers(rng: random.Random, call: int) -> list[tuple[str, str] | NeverIndexedHeaderTuple]:
    fields: list[tuple[str, str] | NeverIndexedHeaderTuple] = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", rng.choice(["/inference.GRPCInferenceService/ModelInfer", "/a.B/C"])),
        (":authority", "127.0.0.1:8001"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        ("grpc-timeout", f"{rng.randrange(1, 99999)}m"),
        ("date", f"Wed, 02 Dec 2026 10:{call % 60:02d}:00 GMT"),
    ]
    for i in range(rng.randrange(0, 6)):
        fields.append((f"x-meta-{rng.randrange(40)}", "v" * rng.randrange(0, 300) + str(i)))
    if rng.random() < 0.3:
        fields.append(NeverIndexedHeaderTuple("authorization", f"Bearer {rng.random()}"))
    return fields


@pytest.mark.parametrize("huffman", [True, False])
def test_a_connection_of_blocks_decodes_as_hpack_decodes_it(huffman: bool) -> None:
    rng = random.Random(11)
    encoder, reference, ours = Encoder(), Decoder(), HpackDecoder(1 << 20)
    kept = HeaderBlocks(1 << 20)
    for call in range(400):
        if call == 150:
            # The decoding end lowers its table; the encoder says so at the next block.
            encoder.header_table_size = 256
            reference.max_allowed_table_size = ours.max_allowed_table_size = 256
            kept.decoder.max_allowed_table_size = 256
        block = encoder.encode(_headers(rng, call), huffman=huffman)
        expected = [(bytes(n), bytes(v)) for n, v in reference.decode(block, raw=True)]
        assert ours.decode(block) == expected
        assert kept.decode(block) == expected
        assert list(ours._table) == list(reference.header_table.dynamic_entries)


def test_a_repeated_block_is_decoded_once_while_the_table_stands() -> None:
    encoder = Encoder()
    blocks = HeaderBlocks(1 << 20)
    first = encoder.encode([(":status", "200"), ("x-a", "1")])  # adds x-a to the table
    again = encoder.encode([(":status", "200"), ("x-a", "1")])  # refers to it
    assert blocks.decode(first) == [(b":status", b"200"), (b"x-a", b"1")]
    assert blocks.decode(again) == blocks.decode(again) == [(b":status", b"200"), (b"x-a", b"1")]
    assert blocks.decode(again) is blocks.decode(again)  # kept
    changed = encoder.encode([("x-b", "2")])  # adds x-b: what was kept is forgotten
    assert blocks.decode(changed) == [(b"x-b", b"2")]
    assert not blocks._kept


@pytest.mark.parametrize(
    "block",
    [
        b"\xbe",  # index 62: the dynamic table is empty
        b"\x80",  # index 0
        b"\x00\x05ab",  # a name longer than the block
        b"\x40\x01a",  # a literal with a name and no value
        b"\x82\x3f\xe1\x1f",  # a table size update after a field
        b"\x3f\xe1\xff\xff\x0f",  # a table size over what the settings allow
        b"\xff\xff\xff\xff\xff\xff",  # an integer that never ends
    ],
)
def test_bad_blocks_are_refused(block: bytes) -> None:
    with pytest.raises(HPACKDecodingError):
        HpackDecoder(1 << 20).decode(block)


def test_a_header_list_over_the_limit_is_refused() -> None:
    block = Encoder().encode([("x-big", "v" * 200)])
    with pytest.raises(HPACKDecodingError):
        HpackDecoder(100).decode(block)
