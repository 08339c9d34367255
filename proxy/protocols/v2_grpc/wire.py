"""A ``ModelInferRequest``'s model name, read from the protobuf wire format without parsing.

The live path routes canaries by model, per request: a full parse would copy every input's raw
contents into Python bytes first. Here the top-level fields are walked (tag, then a varint, a
fixed-size value or a length-delimited one that is skipped, not copied), so the cost is the
number of top-level fields, whatever the tensors weigh.

The walk goes to the end rather than stopping at the first ``model_name``: a parser keeps the
last occurrence of a singular field (concatenated messages merge), and a name in a request the
walk would stop reading could differ from the one the server reads. Nested messages (inputs,
parameters) are not looked into: a request whose inputs are garbage still names its model.
"""

from __future__ import annotations

from ..base import MalformedMessage

_MODEL_NAME = 1  # ModelInferRequest.model_name
_ID = 3  # ModelInferRequest.id and ModelInferResponse.id
_STREAM_ERROR, _STREAM_RESPONSE = 1, 2  # ModelStreamInferResponse.error_message, infer_response
_VARINT, _FIXED64, _LENGTH, _START_GROUP, _END_GROUP, _FIXED32 = 0, 1, 2, 3, 4, 5
_MAX_FIELD = (1 << 29) - 1


def _varint(data: memoryview, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it (at most 10 bytes, as protobuf reads)."""
    value = shift = 0
    for i in range(pos, min(pos + 10, len(data))):
        byte = data[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, i + 1
        shift += 7
    raise MalformedMessage(f"not a ModelInferRequest: truncated or overlong varint at byte {pos}")


def _skip(data: memoryview, pos: int, wire_type: int, field: int) -> int:
    """The position after a value of ``wire_type`` starting at ``pos``."""
    if wire_type == _VARINT:
        return _varint(data, pos)[1]
    if wire_type == _FIXED64:
        end = pos + 8
    elif wire_type == _FIXED32:
        end = pos + 4
    elif wire_type == _LENGTH:
        length, pos = _varint(data, pos)
        end = pos + length
    elif wire_type == _START_GROUP:
        return _skip_group(data, pos, field)
    else:  # an end-group without its start, or wire types 6 and 7 (none exist)
        raise MalformedMessage(f"not a ModelInferRequest: wire type {wire_type} at byte {pos}")
    if end > len(data):
        raise MalformedMessage(f"not a ModelInferRequest: field {field} runs past the end")
    return end


def _skip_group(data: memoryview, pos: int, field: int) -> int:
    # Proto3 has no groups, but parsers skip unknown ones: so does the walk, nested or not.
    while pos < len(data):
        inner, wire_type, pos = _tag(data, pos)
        if wire_type == _END_GROUP:
            if inner != field:
                break
            return pos
        pos = _skip(data, pos, wire_type, inner)
    raise MalformedMessage(f"not a ModelInferRequest: group {field} is not closed")


def _tag(data: memoryview, pos: int) -> tuple[int, int, int]:
    key, after = _varint(data, pos)
    field = key >> 3
    if not 0 < field <= _MAX_FIELD:
        raise MalformedMessage(f"not a ModelInferRequest: invalid field number {field}")
    return field, key & 7, after


def _last_field(data: memoryview, wanted: int) -> memoryview | None:
    """The last length-delimited value of top-level field ``wanted`` (as a parser keeps it)."""
    found = None
    pos = 0
    while pos < len(data):
        field, wire_type, pos = _tag(data, pos)
        if field == wanted and wire_type == _LENGTH:
            length, start = _varint(data, pos)
            pos = start + length
            if pos > len(data):
                raise MalformedMessage(f"not a ModelInferRequest: field {field} runs past the end")
            found = data[start:pos]
        else:  # a field of another wire type is an unknown field to a parser too
            pos = _skip(data, pos, wire_type, field)
    return found


def _text(value: memoryview | None, what: str) -> str:
    try:
        return "" if value is None else value.tobytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise MalformedMessage(f"not a ModelInferRequest: {what} is not UTF-8: {exc}") from exc


def request_model(body: bytes) -> str:
    """The ``model_name`` of a serialized ``ModelInferRequest`` ("" when it names none, as a
    parser reads it); raises :class:`MalformedMessage` for bytes that are not a message."""
    return _text(_last_field(memoryview(body), _MODEL_NAME), "model_name")


def message_id(body: bytes) -> str:
    """The ``id`` of a serialized ``ModelInferRequest`` or ``ModelInferResponse`` (field 3 of
    both; "" when it has none)."""
    return _text(_last_field(memoryview(body), _ID), "id")


def stream_answer(body: bytes) -> bytes | None:
    """The ``infer_response`` of a serialized ``ModelStreamInferResponse``, or None when it
    carries an error (``error_message``) instead."""
    data = memoryview(body)
    if _last_field(data, _STREAM_ERROR):
        return None
    answer = _last_field(data, _STREAM_RESPONSE)
    return None if answer is None else answer.tobytes()


def _encode_varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def with_model_name(body: bytes, name: str) -> bytes:
    """``body`` addressed to model ``name``, for a candidate that serves it under another name.

    A second ``model_name`` field is appended rather than the message parsed and re-serialized:
    a parser keeps the last occurrence of a singular field, so the server reads ``name``, and the
    tensors (most of the bytes) are not copied through protobuf twice."""
    encoded = name.encode("utf-8")
    tag = bytes([_MODEL_NAME << 3 | _LENGTH])
    return body + tag + _encode_varint(len(encoded)) + encoded
