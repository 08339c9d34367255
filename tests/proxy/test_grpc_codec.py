"""The V2 gRPC adapter: answers built as Triton and tritonclient build them decode as
tritonclient's ``InferResult.as_numpy`` reads them; what it would misread is refused."""

from __future__ import annotations

import json
import re
from typing import Any

import grpc
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict
from tritonclient.grpc import InferInput, InferRequestedOutput, InferResult, service_pb2
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import np_to_triton_dtype, serialize_byte_tensor

from proxy.protocols.base import MalformedMessage, TooLarge
from proxy.protocols.registry import adapter_for
from proxy.protocols.v2_grpc import http_status
from proxy.protocols.v2_grpc.adapter import ADAPTER, render_request, request_model
from proxy.protocols.v2_rest.adapter import ADAPTER as V2_REST
from proxy.shadow.analysis import Exchange, analyze

GRPC_OK = {"content-type": "application/grpc", "grpc-status": "0", "grpc-message": ""}

ARRAYS: dict[str, np.ndarray[Any, Any]] = {
    "bool": np.array([[True, False, True]]),
    "int8": np.array([-128, 0, 127], dtype=np.int8),
    "int16": np.array([-32768, 7, 32767], dtype=np.int16),
    "int32": np.arange(-3, 3, dtype=np.int32).reshape(2, 3),
    "int64": np.array([-(2**63), 0, 2**63 - 1], dtype=np.int64),
    "uint8": np.array([0, 255], dtype=np.uint8),
    "uint16": np.array([0, 65535], dtype=np.uint16),
    "uint32": np.array([0, 2**32 - 1], dtype=np.uint32),
    "uint64": np.array([0, 2**64 - 1], dtype=np.uint64),
    "fp16": np.array([0.5, -1.25, np.inf], dtype=np.float16),
    "fp32": np.array([[1.5, np.nan], [-0.0, 3e38]], dtype=np.float32),
    "fp64": np.array([1e-300, -2.5], dtype=np.float64),
    "bf16": np.array([1.0, -2.5, 3.140625], dtype=ml_dtypes.bfloat16),
    "bytes": np.array([[b"ab", b"", b"c\x00"]], dtype=np.object_),
    "empty": np.zeros((0, 4), dtype=np.float32),
    "empty_bytes": np.empty((2, 0), dtype=np.object_),
}
TYPED = [k for k in ARRAYS if k not in ("fp16", "bf16")]  # FP16 and BF16 travel raw only
TYPED_FIELD = {
    "BOOL": "bool_contents",
    **dict.fromkeys(("INT8", "INT16", "INT32"), "int_contents"),
    "INT64": "int64_contents",
    **dict.fromkeys(("UINT8", "UINT16", "UINT32"), "uint_contents"),
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _raw(arr: np.ndarray[Any, Any]) -> bytes:
    if arr.dtype.kind == "O":
        flat = serialize_byte_tensor(arr)
        return flat.item() if flat.size else b""
    return arr.tobytes()


def response(
    arrays: dict[str, np.ndarray[Any, Any]], *, typed: bool = False
) -> Any:  # service_pb2.ModelInferResponse
    """An answer filled as Triton fills it (one raw entry per output, in order) or, ``typed``,
    as servers that use the typed contents fields do."""
    msg = service_pb2.ModelInferResponse(model_name="m", model_version="1", id="req")
    for name, arr in arrays.items():
        out = msg.outputs.add(name=name, datatype=np_to_triton_dtype(arr.dtype), shape=arr.shape)
        if typed:
            field = getattr(out.contents, TYPED_FIELD[out.datatype])
            field.extend(arr.reshape(-1).tolist())
        else:
            msg.raw_output_contents.append(_raw(arr))
    return msg


def decode(msg: Any, **caps: int) -> dict[str, np.ndarray[Any, Any]]:
    return ADAPTER.decode_response(msg.SerializeToString(), GRPC_OK, **caps).outputs


def assert_same(got: np.ndarray[Any, Any], want: np.ndarray[Any, Any]) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if want.dtype.kind == "O":
        assert got.tolist() == want.tolist()
    else:
        assert got.tobytes() == want.tobytes()  # bit for bit: NaN, -0.0 and bf16 included


def test_raw_outputs_decode_as_infer_result_as_numpy_does() -> None:
    msg = response(ARRAYS)
    decoded = ADAPTER.decode_response(msg.SerializeToString(), GRPC_OK)
    assert (decoded.model_name, decoded.model_version) == ("m", "1")
    result = InferResult(msg)
    assert list(decoded.outputs) == list(ARRAYS)
    for name, arr in ARRAYS.items():
        assert_same(decoded.outputs[name], result.as_numpy(name))
        assert_same(decoded.outputs[name], arr)


@pytest.mark.parametrize("name", TYPED)
def test_typed_contents_decode_to_the_tensor_sent(name: str) -> None:
    arr = ARRAYS[name]
    msg = response({name: arr}, typed=True)
    assert not msg.raw_output_contents
    assert_same(decode(msg)[name], arr)


def test_bytes_contents_keep_the_values_as_numpy_gives_without_dropping_nul_bytes() -> None:
    arr = np.array([b"x\x00", b"yz"], dtype=np.object_)
    msg = response({"s": arr}, typed=True)
    got = decode(msg)["s"]
    assert got.dtype == np.object_ and got.tolist() == [b"x\x00", b"yz"]
    # as_numpy's fixed-width array has the same elements but for the trailing NUL it drops.
    assert InferResult(msg).as_numpy("s").tolist() == [b"x", b"yz"]


def test_shared_memory_outputs_are_skipped_but_keep_their_raw_slot() -> None:
    msg = response({"a": ARRAYS["fp32"]})
    shm = msg.outputs.add(name="shm", datatype="FP32", shape=[4])
    shm.parameters["shared_memory_region"].string_param = "region"
    msg.raw_output_contents.append(b"")  # Triton's empty entry for it
    msg.outputs.add(name="b", datatype="INT32", shape=[2])
    msg.raw_output_contents.append(np.array([1, 2], dtype=np.int32).tobytes())
    got = decode(msg)
    assert list(got) == ["a", "b"] and got["b"].tolist() == [1, 2]


def _broken(edit: str) -> Any:
    msg = response({"out": np.arange(4, dtype=np.float32)})
    if edit == "size":
        msg.raw_output_contents[0] = b"\x00" * 15
    elif edit == "twice":
        msg.outputs.add(name="out", datatype="FP32", shape=[0])
        msg.raw_output_contents.append(b"")
    elif edit == "datatype":
        msg.outputs[0].datatype = "FP8"
    elif edit == "dimension":
        msg.outputs[0].shape[0] = -4
    elif edit == "extra raw":
        msg.raw_output_contents.append(b"")
    return msg


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ("size", "output 'out': 15 raw bytes do not match shape [4] of FP32 (16 bytes)"),
        ("twice", "output 'out' appears twice"),
        ("datatype", "output 'out' has an unknown datatype 'FP8'"),
        ("dimension", "output 'out' has a negative dimension"),
        ("extra raw", "2 raw_output_contents for 1 tensor(s)"),
    ],
)
def test_answers_as_numpy_would_misread_are_refused(edit: str, message: str) -> None:
    with pytest.raises(MalformedMessage, match=re.escape(message)):
        decode(_broken(edit))


def test_typed_contents_that_do_not_fit_are_refused() -> None:
    wrong_field = service_pb2.ModelInferResponse()
    out = wrong_field.outputs.add(name="o", datatype="FP32", shape=[1])
    out.contents.fp64_contents.append(1.0)
    with pytest.raises(MalformedMessage, match="output 'o': FP32 data sent in fp64_contents"):
        decode(wrong_field)
    out.contents.Clear()
    out.contents.fp32_contents.extend([1.0, 2.0])
    with pytest.raises(MalformedMessage, match=r"2 value\(s\) in fp32_contents do not fill shape"):
        decode(wrong_field)
    out.datatype, out.shape[0] = "INT8", 1
    out.contents.Clear()
    out.contents.int_contents.append(300)
    with pytest.raises(MalformedMessage, match="int_contents holds values outside INT8's range"):
        decode(wrong_field)
    out.datatype = "FP16"  # no typed field: without raw contents there are no data
    out.contents.Clear()
    with pytest.raises(MalformedMessage, match=r"output 'o': 0 value\(s\) in contents"):
        decode(wrong_field)


def test_truncated_bytes_and_garbage_are_malformed() -> None:
    msg = response({"s": ARRAYS["bytes"]})
    msg.raw_output_contents[0] = msg.raw_output_contents[0][:-2]
    with pytest.raises(MalformedMessage, match="output 's': BYTES contents are truncated"):
        decode(msg)
    with pytest.raises(MalformedMessage, match=r"^not a ModelInferResponse"):
        ADAPTER.decode_response(b"\xff\xff\xff", GRPC_OK)


def test_caps_refuse_before_decoding() -> None:
    msg = response({f"o{i}": ARRAYS["int8"] for i in range(3)})
    body = msg.SerializeToString()
    with pytest.raises(TooLarge, match=f"ModelInferResponse is {len(body)} bytes, over 10"):
        ADAPTER.decode_response(body, GRPC_OK, max_inflated_bytes=10)
    with pytest.raises(TooLarge, match="3 outputs, over 2"):
        ADAPTER.decode_response(body, GRPC_OK, max_outputs=2)
    assert len(decode(msg, max_outputs=3)) == 3


def request(**kwargs: Any) -> bytes:
    inp = InferInput("x", [2], "FP32").set_data_from_numpy(np.array([1, 2], dtype=np.float32))
    defaults: dict[str, Any] = {
        "model_name": "m", "inputs": [inp], "model_version": "", "request_id": "",
        "outputs": None, "sequence_id": 0, "sequence_start": False, "sequence_end": False,
        "priority": 0, "timeout": None, "parameters": None,
    }  # fmt: skip
    return bytes(_get_inference_request(**{**defaults, **kwargs}).SerializeToString())


def unsafe(body: bytes) -> str | None:
    return ADAPTER.inspect_request(body, GRPC_OK, max_inflated_bytes=1 << 20).unsafe


def test_sequences_and_shared_memory_are_never_mirrored() -> None:
    assert unsafe(request()) is None
    assert unsafe(request(sequence_id=7)) == "sequence"
    assert unsafe(request(sequence_id="corr-1")) == "sequence"
    msg = service_pb2.ModelInferRequest(model_name="m")
    msg.parameters["sequence_id"].int64_param = 0
    msg.parameters["sequence_end"].bool_param = False
    assert unsafe(msg.SerializeToString()) is None
    msg.parameters["sequence_start"].bool_param = True
    assert unsafe(msg.SerializeToString()) == "sequence"
    shm_in = InferInput("x", [2], "FP32").set_shared_memory("region", 8)
    assert unsafe(request(inputs=[shm_in])) == "shared_memory"
    shm_out = InferRequestedOutput("y")
    shm_out.set_shared_memory("out_region", 8)
    assert unsafe(request(outputs=[shm_out])) == "shared_memory"
    assert unsafe(request(outputs=[InferRequestedOutput("y")])) is None


def test_unreadable_requests_are_refused() -> None:
    with pytest.raises(MalformedMessage, match=r"^not a ModelInferRequest"):
        unsafe(b"\x0a\xff")
    with pytest.raises(TooLarge):
        ADAPTER.inspect_request(request(), GRPC_OK, max_inflated_bytes=4)


_names = st.text(max_size=40)


@st.composite
def requests(draw: st.DrawFn) -> bytes:
    msg = service_pb2.ModelInferRequest(model_name=draw(_names), id=draw(_names))
    for i in range(draw(st.integers(0, 3))):
        # Big raw contents: the walk must skip them, not read them.
        size = draw(st.sampled_from([0, 1, 127, 128, 16_383, 16_384, 3_000_000]))
        msg.inputs.add(name=f"in{i}", datatype="UINT8", shape=[size])
        msg.raw_input_contents.append(b"\x01" * size)
    if draw(st.booleans()):
        msg.parameters[draw(_names)].int64_param = draw(st.integers(-(2**63), 2**63 - 1))
    body = msg.SerializeToString()
    if draw(st.booleans()):  # concatenated messages merge: the last model_name wins
        body += service_pb2.ModelInferRequest(model_name=draw(_names)).SerializeToString()
    return bytes(body)


@settings(max_examples=150, deadline=None)
@given(requests())
def test_request_model_reads_what_a_full_parse_reads(body: bytes) -> None:
    assert request_model(body) == service_pb2.ModelInferRequest.FromString(body).model_name


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=64))
def test_request_model_on_garbage_agrees_with_the_parser_or_refuses(body: bytes) -> None:
    try:
        parsed = service_pb2.ModelInferRequest.FromString(body)
    except Exception:
        parsed = None
    try:
        name = request_model(body)
    except MalformedMessage:
        # Only a body the parser refuses too: the walk reads no deeper than the top level.
        assert parsed is None
        return
    if parsed is not None:
        assert name == parsed.model_name


def test_request_model_refuses_truncation_and_bad_utf8() -> None:
    body = request(model_name="resnet")
    assert request_model(body) == "resnet"
    with pytest.raises(MalformedMessage, match="runs past the end"):
        request_model(body[:-1])
    with pytest.raises(MalformedMessage, match="model_name is not UTF-8"):
        request_model(b"\x0a\x02\xc3\x28")
    with pytest.raises(MalformedMessage, match="invalid field number 0"):
        request_model(b"\x00\x00")


def test_render_request_is_json_like_a_rest_request() -> None:
    data = np.array([b"hello", b"w"], dtype=np.object_)
    words = InferInput("words", [2], "BYTES").set_data_from_numpy(data)
    shm = InferInput("big", [4], "FP32").set_shared_memory("region", 16)
    rendered = render_request(
        request(inputs=[words, shm], model_version="3", request_id="r1", sequence_id=9,
                outputs=[InferRequestedOutput("y", class_count=2)])
    )  # fmt: skip
    json.dumps(rendered)
    assert rendered["model_name"] == "m" and rendered["model_version"] == "3"
    assert rendered["id"] == "r1" and rendered["parameters"]["sequence_id"] == 9
    assert rendered["inputs"][0] == {
        "name": "words", "datatype": "BYTES", "shape": [2], "data": ["hello", "w"]
    }  # fmt: skip
    assert "data" not in rendered["inputs"][1]
    assert rendered["inputs"][1]["parameters"]["shared_memory_region"] == "region"
    assert rendered["outputs"] == [{"name": "y", "parameters": {"classification": 2}}]
    with pytest.raises(MalformedMessage):
        render_request(b"\x0a\xff")


def test_error_text_names_the_status_and_its_details() -> None:
    details = "Request for unknown model: 'nope' is not found"
    headers = {"content-type": "application/grpc", "grpc-status": "5", "grpc-message": details}
    assert ADAPTER.error_text(404, headers, b"") == f"NOT_FOUND: {details}"
    # Details from the body when the headers lack them; long ones are cut.
    text = ADAPTER.error_text(503, {"Grpc-Status": "14"}, b"x" * 1000)
    assert text.startswith("UNAVAILABLE: xxx") and len(text) == 200 and text.endswith("...")
    assert ADAPTER.error_text(500, {}, b"") == "HTTP 500"
    assert ADAPTER.error_text(500, {"grpc-status": "99"}, b"odd") == "UNKNOWN(99): odd"


def test_http_status_follows_google_rpc_codes_mapping() -> None:
    want = {
        "OK": 200, "CANCELLED": 499, "UNKNOWN": 500, "INVALID_ARGUMENT": 400,
        "DEADLINE_EXCEEDED": 504, "NOT_FOUND": 404, "ALREADY_EXISTS": 409,
        "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429, "FAILED_PRECONDITION": 400,
        "ABORTED": 409, "OUT_OF_RANGE": 400, "UNIMPLEMENTED": 501, "INTERNAL": 500,
        "UNAVAILABLE": 503, "DATA_LOSS": 500, "UNAUTHENTICATED": 401,
    }  # fmt: skip
    assert {code.name: http_status(code) for code in grpc.StatusCode} == want


@pytest.mark.parametrize(
    "headers",
    [
        {"content-type": "application/grpc"},
        {"Content-Type": "application/grpc+proto"},
        CIMultiDict({"CONTENT-TYPE": "Application/gRPC"}),
    ],
)
def test_grpc_exchanges_get_the_grpc_adapter(headers: Any) -> None:
    assert adapter_for(headers) is ADAPTER
    assert (ADAPTER.name, ADAPTER.title) == ("v2_grpc", "V2 gRPC")


def test_other_exchanges_stay_rest() -> None:
    assert adapter_for({"content-type": "application/json"}) is V2_REST
    assert adapter_for({}) is V2_REST


def _exchange(upstream: str, msg: Any) -> Exchange:
    return Exchange(upstream, 200, GRPC_OK, msg.SerializeToString(), 0.01)


def test_analyze_compares_grpc_answers() -> None:
    ref = response({"scores": np.array([0.1, 0.7, 0.2], dtype=np.float32)})
    same = analyze(_exchange("ref", ref), _exchange("cand", ref), "m", {})
    assert (same.outcome, same.flagged) == ("compared", False)
    other = response({"scores": np.array([0.9, 0.05, 0.05], dtype=np.float32)}, typed=True)
    diverged = analyze(_exchange("ref", ref), _exchange("cand", other), "m", {})
    assert (diverged.outcome, diverged.flagged) == ("compared", True)
    assert diverged.reason.startswith("scores:")


def test_analyze_reports_grpc_failures_and_invalid_answers() -> None:
    ref = _exchange("ref", response({"y": ARRAYS["int32"]}))
    failed_headers = {**GRPC_OK, "grpc-status": "14", "grpc-message": "connection refused"}
    failed = Exchange("cand", http_status(grpc.StatusCode.UNAVAILABLE), failed_headers, b"", 0.1)
    mismatch = analyze(ref, failed, "m", {})
    assert mismatch.outcome == "status_mismatch" and mismatch.flagged
    assert "candidate answered 503 (UNAVAILABLE: connection refused)" in mismatch.reason
    invalid = analyze(ref, Exchange("cand", 200, GRPC_OK, b"\xff\xff", 0.1), "m", {})
    assert invalid.outcome == "candidate_invalid"
    assert invalid.reason.startswith("candidate answer is not valid V2 gRPC: not a ModelInfer")
