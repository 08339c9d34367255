"""The V2 response decoder against tritonclient's own ``InferResult``, and its refusals.

Every valid answer (JSON and binary tensors, every datatype, empty dimensions, gzip and deflate,
several outputs mixing both encodings, shared-memory outputs among them) must decode to what
``InferResult.as_numpy`` gives: the same dtype, shape and values, bit for bit. Garbage raises
``MalformedMessage`` saying what is wrong, and never another exception.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import math
import zlib
from typing import Any, Literal

import ml_dtypes
import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tritonclient.http import InferResult
from tritonclient.utils import serialize_byte_tensor

from comparators import MetricSpec, compare_output
from proxy.protocols.base import MalformedMessage, TooLarge
from proxy.protocols.v2_rest.codec import (
    HEADER_LENGTH,
    decode_infer_response,
    parse_request_header,
    preview,
    unsafe_to_mirror,
    warm_up,
)

Arr = npt.NDArray[Any]
NUMPY_TYPES: dict[str, Any] = {
    "BOOL": np.bool_,
    "INT8": np.int8,
    "INT16": np.int16,
    "INT32": np.int32,
    "INT64": np.int64,
    "UINT8": np.uint8,
    "UINT16": np.uint16,
    "UINT32": np.uint32,
    "UINT64": np.uint64,
    "FP16": np.float16,
    "FP32": np.float32,
    "FP64": np.float64,
    "BF16": ml_dtypes.bfloat16,
}
DATATYPES = [*NUMPY_TYPES, "BYTES"]
# Mostly non-empty tensors, and some with an empty dimension.
SHAPES = st.one_of(
    st.lists(st.integers(1, 4), max_size=3), st.lists(st.integers(0, 4), min_size=1, max_size=3)
)


# --- building answers -------------------------------------------------------------------------


def _values(draw: st.DrawFn, datatype: str, n: int) -> list[Any]:
    """``n`` JSON-able values of ``datatype``, edge values included."""
    if datatype == "BYTES":
        return draw(st.lists(st.text(max_size=6), min_size=n, max_size=n))
    if datatype == "BOOL":
        return draw(st.lists(st.booleans(), min_size=n, max_size=n))
    t = NUMPY_TYPES[datatype]
    if np.dtype(t).kind in "iu":
        info = np.iinfo(t)
        ints = st.one_of(st.integers(int(info.min), int(info.max)), st.sampled_from([0, -1, 1]))
        return draw(
            st.lists(ints.filter(lambda v: info.min <= v <= info.max), min_size=n, max_size=n)
        )
    width: Literal[16, 32, 64] = 16 if datatype == "FP16" else 32 if datatype == "FP32" else 64
    # Values of the type, and float64 values it rounds (short of its largest, so that no cast
    # overflows). NaN and the infinities are written as JSON's NaN/Infinity extension, which
    # tritonclient's parser reads and orjson does not.
    top = 0.99 * float(ml_dtypes.finfo(t).max)  # type: ignore[no-untyped-call]
    floats = st.one_of(
        st.floats(width=width),
        st.floats(-top, top),
        st.sampled_from([0.0, -0.0, 1e-40, math.nan, -math.inf]),
    )
    return draw(st.lists(floats, min_size=n, max_size=n))


def _binary(datatype: str, values: list[Any]) -> bytes:
    if datatype == "BYTES":
        if not values:
            return b""
        raw = serialize_byte_tensor(np.array([v.encode() for v in values], dtype=np.object_))
        if isinstance(raw, np.ndarray):  # a 0-d object array holding the bytes, by version
            raw = raw.item() if raw.ndim == 0 else raw.tobytes()
        return bytes(raw)
    with np.errstate(all="ignore"):
        return np.array(values, dtype=NUMPY_TYPES[datatype]).tobytes()


@st.composite
def answers(draw: st.DrawFn) -> tuple[bytes, dict[str, str], list[str]]:
    """A V2 answer as (body, headers, names of the outputs that carry data)."""
    outputs: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    decoded: list[str] = []
    for i in range(draw(st.integers(1, 4))):
        datatype = draw(st.sampled_from(DATATYPES))
        shape = draw(SHAPES)
        n = math.prod(shape)
        out: dict[str, Any] = {"name": f"out{i}", "datatype": datatype, "shape": shape}
        how = draw(st.sampled_from(["json", "binary", "binary", "shared_memory"]))
        if how == "shared_memory":
            out["parameters"] = {"shared_memory_region": "r", "shared_memory_byte_size": 64}
        else:
            values = _values(draw, datatype, n)
            decoded.append(out["name"])
            if how == "binary":
                blob = _binary(datatype, values)
                out["parameters"] = {"binary_data_size": len(blob)}
                blobs.append(blob)
            else:
                out["data"] = values
        outputs.append(out)
    header: dict[str, Any] = {"outputs": outputs}
    if draw(st.booleans()):
        header["model_name"] = "m"
        header["model_version"] = draw(st.sampled_from(["1", 1, "v2"]))
    text = json.dumps(header).encode()  # NaN/Infinity where the data hold them
    body = text + b"".join(blobs)
    length_anyway: bool = draw(st.booleans())  # the extension's header without binary data
    headers = {HEADER_LENGTH: str(len(text))} if blobs or length_anyway else {}
    encoding = draw(st.sampled_from([None, "gzip", "deflate"]))
    if encoding == "gzip":
        body = gzip.compress(body)
    elif encoding == "deflate":
        body = zlib.compress(body)
    if encoding:
        headers["Content-Encoding"] = encoding
    return body, headers, decoded


def _theirs(body: bytes, headers: dict[str, str], name: str) -> Arr:
    length = headers.get(HEADER_LENGTH)
    result = InferResult.from_response_body(
        body,
        header_length=int(length) if length else None,
        content_encoding=headers.get("Content-Encoding"),
    )
    arr: Arr = result.as_numpy(name)
    return arr


def _same(ours: Arr, theirs: Arr) -> None:
    assert ours.dtype == theirs.dtype
    assert ours.shape == theirs.shape
    if ours.dtype == np.object_:
        mine, other = ours.reshape(-1).tolist(), theirs.reshape(-1).tolist()
        assert [type(v) for v in mine] == [type(v) for v in other]
        assert mine == other
    else:
        assert ours.tobytes() == theirs.tobytes()  # bit for bit: NaN payloads and -0.0 too


# --- the differential test --------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(answer=answers())
def test_decodes_what_tritonclient_decodes(answer: tuple[bytes, dict[str, str], list[str]]) -> None:
    body, headers, names = answer
    decoded = decode_infer_response(body, headers)
    assert list(decoded.outputs) == names  # shared-memory outputs skipped, order kept
    for name in names:
        _same(decoded.outputs[name], _theirs(body, headers, name))


def test_json_nan_infinity_and_null_read_as_tritonclient_reads_them() -> None:
    # Not JSON, but written by servers for non-finite floats: orjson refuses, the fallback reads.
    out = {"name": "o", "datatype": "FP32", "shape": [5], "data": [1.5, None]}
    body = (
        json.dumps({"outputs": [out]}).encode().replace(b"null", b"NaN, Infinity, -Infinity, null")
    )
    ours = decode_infer_response(body, {}).outputs["o"]
    _same(ours, _theirs(body, {}, "o"))
    assert np.isnan(ours[1]) and np.isnan(ours[4]) and ours[2] == np.inf and ours[3] == -np.inf


def test_model_name_and_version() -> None:
    out = {"name": "o", "datatype": "FP32", "shape": [1], "data": [1.5]}
    body = json.dumps({"model_name": "m", "model_version": 3, "outputs": [out]}).encode()
    decoded = decode_infer_response(body, {})
    assert (decoded.model_name, decoded.model_version) == ("m", "3")


def test_binary_tensors_are_views_over_the_body() -> None:
    a = np.arange(12, dtype=np.float32)
    params = {"binary_data_size": a.nbytes}
    body, headers = _with_blob(
        [{"name": "a", "datatype": "FP32", "shape": [3, 4], "parameters": params}], a.tobytes()
    )
    head = body[: int(headers[HEADER_LENGTH])]
    out = decode_infer_response(body, headers).outputs["a"]
    start = np.frombuffer(body, dtype=np.uint8).ctypes.data
    assert out.ctypes.data == start + len(head)  # no copy: the body's own bytes
    assert not out.flags.writeable
    assert out.tolist() == a.reshape(3, 4).tolist()


@pytest.mark.parametrize("pad", [0, 1, 3, 4, 7])
@pytest.mark.parametrize("datatype", ["FP64", "FP32"])
def test_views_at_any_alignment_score_as_aligned_copies(pad: int, datatype: str) -> None:
    # The JSON header's length puts binary data at any offset: a view may be misaligned for its
    # dtype, where InferResult's copy never was. Every metric must score it alike.
    rng = np.random.default_rng(pad)
    t = NUMPY_TYPES[datatype]
    a = rng.standard_normal((2, 9000)).astype(t)
    b = (a + rng.standard_normal((2, 9000)).astype(t) * t(1e-3)).astype(t)
    outputs = [
        {
            "name": n,
            "datatype": datatype,
            "shape": [2, 9000],
            "parameters": {"binary_data_size": x.nbytes},
        }
        for n, x in (("a", a), ("b", b))
    ]
    body, headers = _with_blob(outputs, a.tobytes() + b.tobytes())
    head = body[: int(headers[HEADER_LENGTH])]
    body = head + b" " * pad + body[len(head) :]  # JSON ignores the trailing blanks
    headers = {HEADER_LENGTH: str(len(head) + pad)}
    views = decode_infer_response(body, headers).outputs
    offset = views["a"].ctypes.data - np.frombuffer(body, dtype=np.uint8).ctypes.data
    assert offset == len(head) + pad  # a view, at the offset the header length gives
    for metric in ("auto", "tolerance", "sqnr", "cosine", "probabilities", "logits", "argmax"):
        spec = MetricSpec(metric)
        on_views = compare_output("x", views["a"], views["b"], spec).to_dict()
        on_copies = compare_output("x", views["a"].copy(), views["b"].copy(), spec).to_dict()
        assert repr(on_views) == repr(on_copies), metric


def test_mixed_outputs_take_their_binary_data_in_order() -> None:
    x, y = np.array([1, 2, 3], dtype=np.int64), np.array([0.5, -0.5], dtype=np.float64)
    outputs = [
        {"name": "x", "datatype": "INT64", "shape": [3], "parameters": {"binary_data_size": 24}},
        {"name": "j", "datatype": "BYTES", "shape": [2], "data": ["a", "b"]},
        {
            "name": "s",
            "datatype": "FP32",
            "shape": [2],
            "parameters": {"shared_memory_region": "r"},
        },
        {"name": "y", "datatype": "FP64", "shape": [1, 2], "parameters": {"binary_data_size": 16}},
    ]
    head = json.dumps({"outputs": outputs}).encode()
    decoded = decode_infer_response(
        head + x.tobytes() + y.tobytes(), {HEADER_LENGTH: str(len(head))}
    ).outputs
    assert list(decoded) == ["x", "j", "y"]
    assert decoded["x"].tolist() == [1, 2, 3] and decoded["y"].tolist() == [[0.5, -0.5]]
    assert decoded["j"].tolist() == ["a", "b"]


def test_warm_up_runs() -> None:
    warm_up()


# --- refusals ---------------------------------------------------------------------------------


def _with_blob(outputs: list[dict[str, Any]], blob: bytes) -> tuple[bytes, dict[str, str]]:
    """A binary-data answer: the JSON header, then ``blob``; and its header length."""
    head = json.dumps({"outputs": outputs}).encode()
    return head + blob, {HEADER_LENGTH: str(len(head))}


def _fp32(
    size: int = 16, shape: list[int] | None = None, cut: int = 0
) -> tuple[bytes, dict[str, str]]:
    """Four FP32 values as binary data, their declared size and shape as given, ``cut`` bytes
    short."""
    blob = np.arange(4, dtype=np.float32).tobytes()
    out = {
        "name": "o",
        "datatype": "FP32",
        "shape": shape or [4],
        "parameters": {"binary_data_size": size},
    }
    return _with_blob([out], blob[: len(blob) - cut])


def _json_body(outputs: Any) -> bytes:
    return json.dumps({"outputs": outputs}).encode()


def _one(**fields: Any) -> bytes:
    return _json_body([{"name": "o", "datatype": "FP32", "shape": [2], "data": [1, 2]} | fields])


GARBAGE: dict[str, tuple[bytes, dict[str, str], str]] = {
    "truncated binary": (*_fp32(cut=3), "beyond the body"),
    "header length beyond the body": (b'{"outputs": []}', {HEADER_LENGTH: "400"}, "outside"),
    "header length not a number": (b'{"outputs": []}', {HEADER_LENGTH: "x1"}, "not an integer"),
    "header length zero": (b'{"outputs": []}', {HEADER_LENGTH: "0"}, "outside"),
    "binary size not matching the shape": (*_fp32(shape=[5]), "does not match shape"),
    "binary size larger than the data": (*_fp32(size=20, shape=[5]), "beyond the body"),
    "binary size negative": (*_fp32(size=-4), "invalid binary_data_size"),
    "binary size not an integer": (*_fp32(size="16"), "invalid binary_data_size"),  # type: ignore[arg-type]
    "binary data without a header length": (
        _json_body(
            [{"name": "o", "datatype": "FP32", "shape": [1], "parameters": {"binary_data_size": 4}}]
        ),
        {},
        "has no Inference-Header",
    ),
    "JSON data too short for the shape": (_one(shape=[3]), {}, "do not make a FP32 tensor"),
    "JSON data missing": (
        _json_body([{"name": "o", "datatype": "FP32", "shape": [1]}]),
        {},
        "neither data nor binary_data_size",
    ),
    "JSON data of the wrong kind": (_one(data={"a": 1}), {}, "data do not make"),
    "unknown datatype": (_one(datatype="FP128"), {}, "unknown datatype"),
    "datatype not a string": (_one(datatype=7), {}, "unknown datatype"),
    "shape with a negative dimension": (_one(shape=[-1, 2]), {}, "no valid shape"),
    "shape not a list": (_one(shape="2"), {}, "no valid shape"),
    "output without a name": (_json_body([{"datatype": "FP32", "shape": [1]}]), {}, "no name"),
    "output not an object": (_json_body([3]), {}, "no name"),
    "duplicate output names": (
        _json_body([{"name": "o", "datatype": "FP32", "shape": [1], "data": [1]}] * 2),
        {},
        "appears twice",
    ),
    "parameters not an object": (_one(parameters=[1]), {}, "parameters is not an object"),
    "JSON not an object": (b"[1, 2, 3]", {}, "not an object"),
    "JSON null": (b"null", {}, "not an object"),
    "no outputs list": (b'{"outputs": 3}', {}, "no 'outputs' list"),
    "not JSON": (b"\x00\x01garbage", {}, "invalid JSON"),
    "not UTF-8": (b'{"outputs": ["\xff"]}', {}, "invalid JSON"),
    "empty body": (b"", {}, "invalid JSON"),
    "BYTES length prefix past the data": (
        *_with_blob(
            [
                {
                    "name": "o",
                    "datatype": "BYTES",
                    "shape": [1],
                    "parameters": {"binary_data_size": 6},
                }
            ],
            b"\x09\x00\x00\x00ab",
        ),
        "BYTES data are truncated",
    ),
    "BYTES elements not filling the shape": (
        *_with_blob(
            [
                {
                    "name": "o",
                    "datatype": "BYTES",
                    "shape": [2],
                    "parameters": {"binary_data_size": 6},
                }
            ],
            b"\x02\x00\x00\x00ab",
        ),
        "do not fill shape",
    ),
    "bad gzip": (b"\x1f\x8b not really gzip", {"Content-Encoding": "gzip"}, "not valid gzip"),
    "truncated gzip": (gzip.compress(_one())[:-6], {"Content-Encoding": "gzip"}, "truncated"),
    "gzip with trailing garbage": (
        gzip.compress(_one()) + b"junk",
        {"Content-Encoding": "gzip"},
        "not valid gzip",
    ),
    "bad deflate": (b"x\x9c garbage", {"Content-Encoding": "deflate"}, "not valid deflate"),
    "unsupported encoding": (_one(), {"Content-Encoding": "br"}, "unsupported Content-Encoding"),
}


@pytest.mark.parametrize("case", sorted(GARBAGE))
def test_garbage_is_refused_with_a_reason(case: str) -> None:
    body, headers, words = GARBAGE[case]
    with pytest.raises(MalformedMessage, match=words):
        decode_infer_response(body, headers)


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
def test_inflation_beyond_the_cap_is_refused(encoding: str) -> None:
    plain = _json_body([{"name": "o", "datatype": "BYTES", "shape": [1], "data": ["x" * 50_000]}])
    body = gzip.compress(plain) if encoding == "gzip" else zlib.compress(plain)
    headers = {"Content-Encoding": encoding}
    # TooLarge (a MalformedMessage): callers may count it apart, as a skip for size.
    with pytest.raises(TooLarge, match="inflates beyond 10000 bytes"):
        decode_infer_response(body, headers, max_inflated_bytes=10_000)
    with pytest.raises(TooLarge, match="inflates beyond 10000 bytes"):
        parse_request_header(body, headers, max_inflated_bytes=10_000)
    # Exactly at the cap is fine.
    assert decode_infer_response(body, headers, max_inflated_bytes=len(plain)).outputs


def test_a_multi_member_bomb_stops_at_the_cap_across_members() -> None:
    member = gzip.compress(bytes(1024 * 1024))  # 1 KiB that inflates to 1 MiB
    with pytest.raises(TooLarge, match="inflates beyond 4194304 bytes"):
        parse_request_header(member * 64, {"Content-Encoding": "gzip"}, max_inflated_bytes=4 << 20)


def test_more_outputs_than_the_cap_are_refused() -> None:
    outputs = [{"name": f"o{i}", "datatype": "FP32", "shape": [1], "data": [i]} for i in range(5)]
    body = _json_body(outputs)
    assert len(decode_infer_response(body, {}, max_outputs=5).outputs) == 5
    with pytest.raises(TooLarge, match="5 outputs, over 4"):
        decode_infer_response(body, {}, max_outputs=4)


def test_multi_member_gzip_is_read_as_gzip_decompress_reads_it() -> None:
    plain = _one()
    body = gzip.compress(plain[:10]) + b"\x00\x00" + gzip.compress(plain[10:])
    assert gzip.decompress(body) == plain
    decoded = decode_infer_response(body, {"Content-Encoding": "gzip"})
    assert decoded.outputs["o"].tolist() == [1.0, 2.0]


@settings(max_examples=200, deadline=None)
@given(answer=answers(), data=st.data())
def test_mangled_answers_decode_or_raise_malformed_only(
    answer: tuple[bytes, dict[str, str], list[str]], data: st.DataObject
) -> None:
    body, headers, _ = answer
    raw = bytearray(body)
    for _ in range(data.draw(st.integers(1, 4))):
        how = data.draw(st.sampled_from(["flip", "cut", "insert"]))
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if how == "flip" and raw:
            raw[at] ^= data.draw(st.integers(1, 255))
        elif how == "cut":
            del raw[at:]
        else:
            raw[at:at] = data.draw(st.binary(min_size=1, max_size=8))
    if data.draw(st.booleans()) and HEADER_LENGTH in headers:
        headers = headers | {HEADER_LENGTH: str(data.draw(st.integers(-5, len(raw) + 5)))}
    with contextlib.suppress(MalformedMessage):  # anything else fails the test
        decode_infer_response(bytes(raw), headers)


# --- requests ---------------------------------------------------------------------------------


def test_request_header_parses_json_and_binary_requests() -> None:
    plain = b'{"inputs": [{"name": "x"}], "parameters": {"sequence_id": 0}}'
    assert parse_request_header(plain, {}) == json.loads(plain)
    assert parse_request_header(plain + b"\x00\x01", {HEADER_LENGTH: str(len(plain))}) == (
        json.loads(plain)
    )
    assert parse_request_header(b"\x00\x01", {HEADER_LENGTH: "0"}) is None
    assert parse_request_header(gzip.compress(plain), {"Content-Encoding": "gzip"}) == (
        json.loads(plain)
    )


def test_request_header_still_reads_what_the_standard_library_read() -> None:
    # NaN is not JSON, and orjson refuses it; the standard library, used before, read it.
    parsed = parse_request_header(b'{"inputs": [{"data": [NaN, Infinity]}]}', {})
    assert parsed is not None
    assert math.isnan(parsed["inputs"][0]["data"][0])
    assert parse_request_header('{"a": 1}'.encode("utf-16"), {}) == {"a": 1}


@pytest.mark.parametrize(
    ("body", "headers", "words"),
    [
        (b"[1]", {}, "not an object"),
        (b"{", {}, "invalid"),
        (b"{}", {HEADER_LENGTH: "9"}, "outside"),
        (b"{}", {HEADER_LENGTH: "two"}, "not an integer"),
        (b"[" * 100_000, {}, "invalid"),
        (b"{}", {"Content-Encoding": "gzip"}, "not valid gzip"),
    ],
)
def test_request_header_refusals(body: bytes, headers: dict[str, str], words: str) -> None:
    with pytest.raises(MalformedMessage, match=words):
        parse_request_header(body, headers)


@pytest.mark.parametrize(
    "request_json",
    [{"inputs": 5}, {"inputs": "abc"}, {"outputs": {"a": 1}}, {"inputs": [1, None, "x"]}],
)
def test_unsafe_to_mirror_takes_any_json_object(request_json: dict[str, Any]) -> None:
    # Not V2 (the server answers that), but never a crash in the mirror's check.
    assert unsafe_to_mirror(request_json) is None


# --- previews ---------------------------------------------------------------------------------


def _preview_before(arr: Arr, limit: int = 16) -> dict[str, Any]:
    """The preview as it was computed before (element by element): the reference."""
    flat = arr.reshape(-1)[:limit]
    if arr.dtype == np.object_:
        values: list[Any] = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat
        ]
    else:
        values = [float(v) if np.issubdtype(arr.dtype, np.floating) else v.item() for v in flat]
        values = [None if isinstance(v, float) and not np.isfinite(v) else v for v in values]
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "head": values}


@pytest.mark.parametrize(
    "arr",
    [
        np.array([[1.5, np.nan], [np.inf, -0.0]], dtype=np.float32),
        np.arange(40, dtype=np.float64).reshape(2, 20),
        np.array([1.0, np.nan], dtype=np.float16),
        np.array([1.5, np.inf, -2.0], dtype=ml_dtypes.bfloat16),
        np.array([1, -2, 3], dtype=np.int64),
        np.array([2**64 - 1], dtype=np.uint64),
        np.array([True, False]),
        np.array([b"caf\xc3\xa9", b"\xff", "text"], dtype=np.object_),
        np.zeros((0, 3), dtype=np.float32),
        np.array(7.0),
    ],
    ids=lambda a: f"{a.dtype}{list(a.shape)}",
)
def test_preview_is_what_it_was(arr: Arr) -> None:
    got = preview(arr)
    assert got == _preview_before(arr)
    assert [type(v) for v in got["head"]] == [type(v) for v in _preview_before(arr)["head"]]
