"""KServe V2 / Triton codecs, over copies of the bytes (the live bytes are never touched).

Responses are decoded here rather than by tritonclient's ``InferResult``: its per-output lookups
and its copies of every binary tensor cost more CPU than the comparisons that follow. The JSON
header is parsed with orjson; tensors sent with the binary-data extension become read-only numpy
views over the body (no copy). The results are those of ``InferResult.as_numpy`` for every input
it accepts (dtype, shape and values; ``tests/proxy/test_codec.py`` checks it); inputs it would
misread (sizes that do not add up, unknown datatypes) are refused with ``MalformedMessage``.
tritonclient's own helpers still decode BYTES tensors and map datatypes to numpy (BF16 included).

Requests have no public parser in tritonclient, so the JSON header is split off by the binary-data
extension's rule (``Inference-Header-Content-Length``).
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import orjson
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from ..base import (
    MAX_INFLATED_BYTES,
    MAX_OUTPUTS,
    Array,
    DecodedResponse,
    MalformedMessage,
    TooLarge,
)

HEADER_LENGTH = "Inference-Header-Content-Length"
_GZIP_WBITS = 16 + zlib.MAX_WBITS  # zlib checks the gzip header, CRC and length itself
_ZLIB_WBITS = zlib.MAX_WBITS  # Triton's "deflate" is zlib-wrapped (as tritonclient reads it)
_INFLATE_PIECE = 4 * 1024 * 1024


def inflate(body: bytes, encoding: str | None, cap: int) -> bytes:
    """``body`` decoded per its Content-Encoding, never more than ``cap`` bytes of it.

    Inflated a piece (``_INFLATE_PIECE``) at a time, each bounded by what is left under the cap,
    so a bomb costs about ``cap`` bytes before it is refused (one call with the whole cap as
    ``max_length`` held up to twice that while zlib joined its buffers). gzip bodies may hold
    several members, and zero padding between them, as ``gzip.decompress`` accepts.
    """
    coding = encoding.strip().lower() if encoding else ""
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "deflate"):
        raise MalformedMessage(f"unsupported Content-Encoding {encoding!r}")
    parts: list[bytes] = []
    total = 0
    data = body
    try:
        while True:
            inflater = zlib.decompressobj(_GZIP_WBITS if coding == "gzip" else _ZLIB_WBITS)
            while not inflater.eof:
                # Never 0 here (total <= cap), which zlib would read as "no limit".
                piece = inflater.decompress(data, min(_INFLATE_PIECE, cap - total + 1))
                total += len(piece)
                if total > cap:
                    raise TooLarge(f"body inflates beyond {cap} bytes")
                parts.append(piece)
                data = inflater.unconsumed_tail
                if not piece and not data and not inflater.eof:
                    raise MalformedMessage(f"body is not valid {coding}: the stream is truncated")
            data = inflater.unused_data.lstrip(b"\x00") if coding == "gzip" else b""
            if not data:
                break
    except zlib.error as exc:
        raise MalformedMessage(f"body is not valid {coding}: {exc}") from exc
    return parts[0] if len(parts) == 1 else b"".join(parts)


def _parse_json(raw: bytes, fallback: Any) -> Any:
    """orjson first; what it refuses goes to ``fallback`` (the parser the old code used there),
    so NaN/Infinity literals, which strict JSON lacks but Triton and clients may write, still
    parse as before. Garbage costs two parses, valid JSON one."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        return fallback(raw)


def _rapidjson_loads(raw: bytes) -> Any:
    # tritonclient's own JSON parser: answers orjson refuses parse exactly as InferResult did.
    import rapidjson

    return rapidjson.loads(raw)


# Triton datatype -> numpy dtype, filled from tritonclient's table on first use of each name.
_DTYPES: dict[str, np.dtype[Any]] = {}
_TRITON_DATATYPES = (
    *("BOOL", "BYTES", "BF16", "FP16", "FP32", "FP64"),
    *("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"),
)


def _dtype(datatype: object, name: str) -> np.dtype[Any]:
    if isinstance(datatype, str):
        dt = _DTYPES.get(datatype)
        if dt is not None:
            return dt
        np_type = triton_to_np_dtype(datatype)
        if np_type is not None:
            dt = _DTYPES[datatype] = np.dtype(np_type)
            return dt
    raise MalformedMessage(f"output {name!r} has an unknown datatype {datatype!r}")


def _shape(out: Mapping[str, Any], name: str) -> list[int]:
    shape = out.get("shape")
    if type(shape) is list:
        for d in shape:
            if type(d) is not int or d < 0:
                break
        else:
            return shape
    raise MalformedMessage(f"output {name!r} has no valid shape (got {shape!r})")


def _header_length(value: str | None, body_length: int) -> int | None:
    """The JSON header's length under the binary-data extension, or None without it."""
    if not value:  # absent, or empty as the old decoder read it: the body is all JSON
        return None
    try:
        n = int(value)
    except ValueError as exc:
        raise MalformedMessage(f"{HEADER_LENGTH} is not an integer: {value!r}") from exc
    if not 0 < n <= body_length:
        raise MalformedMessage(f"{HEADER_LENGTH} {n} is outside the body's {body_length} bytes")
    return n


def _json_tensor(out: Mapping[str, Any], name: str, dt: np.dtype[Any], shape: list[int]) -> Array:
    if "data" not in out:
        raise MalformedMessage(f"output {name!r} has neither data nor binary_data_size")
    try:
        # The very call InferResult.as_numpy makes, so values, dtype and BYTES (str objects)
        # come out as they did.
        return np.array(out["data"], dtype=dt).reshape(shape)
    except Exception as exc:  # numpy raises Value/Type/OverflowError, or warns on bad casts
        raise MalformedMessage(
            f"output {name!r}: its data do not make a {out.get('datatype')} tensor of shape "
            f"{shape}: {type(exc).__name__}: {exc}"
        ) from exc


def _binary_tensor(
    raw: bytes, start: int, size: int, name: str, dt: np.dtype[Any], shape: list[int]
) -> Array:
    """Output ``name``'s ``size`` bytes at ``start`` in ``raw`` (bounds already checked)."""
    if size == 0:
        empty: Array = np.empty(0, dtype=dt)
        return _reshaped(empty, shape, name)
    if dt.kind == "O":
        # BYTES: length-prefixed elements, read by tritonclient's own parser (no copy of the
        # slice: struct reads the memoryview).
        try:
            elements = deserialize_bytes_tensor(memoryview(raw)[start : start + size])
        except Exception as exc:  # struct.error on a length prefix that runs past the data
            raise MalformedMessage(f"output {name!r}: BYTES data are truncated: {exc}") from exc
        return _reshaped(elements, shape, name)
    expected = math.prod(shape) * dt.itemsize
    if size != expected:
        raise MalformedMessage(
            f"output {name!r}: binary_data_size {size} does not match shape {shape} of "
            f"{dt} ({expected} bytes)"
        )
    # A read-only view over the body: the body stays alive as long as the array does.
    view: Array = np.frombuffer(raw, dtype=dt, count=size // dt.itemsize, offset=start)
    return view.reshape(shape)


def _reshaped(arr: Array, shape: list[int], name: str) -> Array:
    try:
        return arr.reshape(shape)
    except ValueError as exc:
        raise MalformedMessage(
            f"output {name!r}: {arr.size} element(s) do not fill shape {shape}"
        ) from exc


def _response_json(raw: bytes) -> dict[str, Any]:
    try:
        response = _parse_json(raw, _rapidjson_loads)
    except Exception as exc:  # orjson's and rapidjson's errors are ValueErrors, or Unicode ones
        raise MalformedMessage(f"not a V2 infer response: invalid JSON: {exc}") from exc
    if not isinstance(response, dict):
        raise MalformedMessage("not a V2 infer response: the JSON is not an object")
    if not isinstance(response.get("outputs"), list):
        raise MalformedMessage("not a V2 infer response: no 'outputs' list")
    return response


def _output_entry(out: Any) -> tuple[str, Mapping[str, Any] | None, int | None]:
    """An output's name, parameters and binary_data_size (None: its data are in the JSON)."""
    name = out.get("name") if isinstance(out, dict) else None
    if not isinstance(name, str):
        raise MalformedMessage("not a V2 infer response: an output has no name")
    params = out.get("parameters")
    if params is None:
        return name, None, None
    if not isinstance(params, dict):
        raise MalformedMessage(f"output {name!r}: parameters is not an object")
    size = params.get("binary_data_size")
    if size is not None and (type(size) is not int or size < 0):
        raise MalformedMessage(f"output {name!r} has an invalid binary_data_size {size!r}")
    return name, params, size


def warm_up() -> None:
    """Import what decoding needs that is imported lazily (the fallback JSON parser) and fill the
    datatype table, at start-up rather than in the first comparison."""
    import rapidjson  # noqa: F401

    for datatype in _TRITON_DATATYPES:
        _dtype(datatype, "")


def decode_infer_response(
    body: bytes,
    headers: Mapping[str, str],
    *,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
    max_outputs: int = MAX_OUTPUTS,
) -> DecodedResponse:
    """Named numpy arrays from a 200 V2 infer response; shared-memory outputs are skipped.

    Binary tensors are read-only views over ``body`` (or over its inflated copy). Anything that
    is not a V2 answer raises :class:`MalformedMessage` saying what is wrong, never another error;
    one past a cap raises its subclass :class:`TooLarge`.
    """
    raw = inflate(body, headers.get("Content-Encoding"), max_inflated_bytes)
    header_length = _header_length(headers.get(HEADER_LENGTH), len(raw))
    response = _response_json(raw if header_length is None else raw[:header_length])
    if len(response["outputs"]) > max_outputs:
        raise TooLarge(f"the answer has {len(response['outputs'])} outputs, over {max_outputs}")
    outputs: dict[str, Array] = {}
    # Binary tensors follow the header back to back, in the order of the outputs that have a
    # binary_data_size (shared-memory ones included, as InferResult counts them).
    offset = 0 if header_length is None else header_length
    for out in response["outputs"]:
        name, params, size = _output_entry(out)
        if name in outputs:
            raise MalformedMessage(f"not a V2 infer response: output {name!r} appears twice")
        start = offset
        if size is not None:
            if header_length is None:
                raise MalformedMessage(
                    f"output {name!r} has binary_data_size but the answer has no {HEADER_LENGTH}"
                )
            offset += size
            if offset > len(raw):
                raise MalformedMessage(
                    f"output {name!r}: its binary data end at byte {offset}, beyond the body's "
                    f"{len(raw)} bytes"
                )
        if params is not None and "shared_memory_region" in params:
            continue
        dt = _dtype(out.get("datatype"), name)
        shape = _shape(out, name)
        if size is None:
            outputs[name] = _json_tensor(out, name, dt, shape)
        else:
            outputs[name] = _binary_tensor(raw, start, size, name, dt, shape)
    version = response.get("model_version")
    model = response.get("model_name")
    return DecodedResponse(
        model if model is None or isinstance(model, str) else str(model),
        str(version) if version is not None else None,
        outputs,
    )


def parse_request_header(
    body: bytes, headers: Mapping[str, str], *, max_inflated_bytes: int = MAX_INFLATED_BYTES
) -> dict[str, Any] | None:
    """The JSON part of a V2 infer request, or None for a raw binary request (header length 0).

    Raises :class:`MalformedMessage` (:class:`TooLarge` past ``max_inflated_bytes``)."""
    raw = inflate(body, headers.get("Content-Encoding"), max_inflated_bytes)
    length = headers.get(HEADER_LENGTH)
    try:
        n = int(length) if length is not None else len(raw)
    except ValueError as exc:
        raise MalformedMessage(f"{HEADER_LENGTH} is not an integer: {length!r}") from exc
    if n == 0:
        return None
    if not 0 < n <= len(raw):
        raise MalformedMessage(f"{HEADER_LENGTH} {n} is outside the body's {len(raw)} bytes")
    try:
        # The standard library read requests before orjson did: it stays the fallback, so every
        # request it accepted (NaN literals, UTF-16 bodies) is still accepted.
        parsed = _parse_json(raw if n == len(raw) else raw[:n], json.loads)
    except (ValueError, RecursionError) as exc:  # the standard library recurses per nesting level
        raise MalformedMessage(f"request JSON is invalid: {exc}") from exc
    if not isinstance(parsed, dict):
        raise MalformedMessage("request JSON is not an object")
    return parsed


def unsafe_to_mirror(request: Mapping[str, Any] | None) -> str | None:
    """Why this infer request must not be copied to a shadow, or None if it may be."""
    if request is None:
        return None
    params = request.get("parameters") or {}
    if isinstance(params, dict) and (
        params.get("sequence_id") not in (None, 0, "")
        or params.get("sequence_start")
        or params.get("sequence_end")
    ):
        return "sequence"
    for key in ("inputs", "outputs"):
        tensors = request.get(key)
        if not isinstance(tensors, list):
            continue  # not V2 (the server will say so): nothing in it names a region
        for tensor in tensors:
            tparams = tensor.get("parameters") if isinstance(tensor, dict) else None
            if isinstance(tparams, dict) and "shared_memory_region" in tparams:
                return "shared_memory"
    return None


# str(dtype) costs microseconds in numpy 1.x; a preview asks for it per output.
_DTYPE_NAMES: dict[np.dtype[Any], str] = {}


def _dtype_name(dt: np.dtype[Any]) -> str:
    name = _DTYPE_NAMES.get(dt)
    if name is None:
        name = _DTYPE_NAMES[dt] = str(dt)
    return name


def preview(arr: Array, limit: int = 16) -> dict[str, Any]:
    """A small JSON-able view of a tensor for the review page (shape, dtype, first values)."""
    # tolist() converts each element as .item() does (floats, bf16 included, become Python
    # floats; ints and bools stay ints and bools), in one C call.
    flat: list[Any] = arr.reshape(-1)[:limit].tolist()
    kind = arr.dtype.kind
    values: list[Any]
    if kind == "O":
        values = [v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat]
    elif kind in "biu" or (kind == "f" and all(map(math.isfinite, flat))):
        values = flat  # nothing to replace: no floats, or only finite ones
    else:
        values = [None if isinstance(v, float) and not math.isfinite(v) else v for v in flat]
    return {"shape": list(arr.shape), "dtype": _dtype_name(arr.dtype), "head": values}
