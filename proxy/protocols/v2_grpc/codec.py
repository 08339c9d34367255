"""ModelInferResponse / ModelInferRequest bytes to the comparable form, over copies of the bytes.

Messages are parsed by protobuf (tritonclient's ``service_pb2``). Tensors sent as
``raw_output_contents`` decode exactly as ``tritonclient.grpc.InferResult.as_numpy`` decodes
them (its own BYTES parser; other types by ``np.frombuffer`` with tritonclient's dtype table, BF16
as ``ml_dtypes.bfloat16``), as read-only views over the parsed bytes. ``as_numpy`` ignores the
typed ``contents`` fields but ``bytes_contents`` (it returns an empty array for the rest), and
servers other than Triton (KServe's, MLServer) answer with them: those are decoded here per
datatype. ``bytes_contents`` become an object array of bytes, as raw BYTES do, where ``as_numpy``
gives a fixed-width ``S`` array that drops trailing NUL bytes and would not compare equal to the
same tensor sent raw. Whatever ``as_numpy`` would misread (sizes that do not match the shape,
unknown datatypes) is refused with ``MalformedMessage`` naming the output.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np

# No stubs for protobuf here (types-protobuf is not a dependency); its messages are Any anyway.
from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from ..base import (
    MAX_INFLATED_BYTES,
    MAX_OUTPUTS,
    Array,
    DecodedResponse,
    MalformedMessage,
    TooLarge,
)

# Triton datatype -> the InferTensorContents field that carries it typed (FP16 and BF16 have
# none: they travel raw only) and that field's own numpy type, so values are read at the width
# they were sent in and range-checked before narrowing (INT8 in int_contents, an int32).
_TYPED: dict[str, tuple[str, type[np.generic]]] = {
    "BOOL": ("bool_contents", np.bool_),
    "INT8": ("int_contents", np.int32),
    "INT16": ("int_contents", np.int32),
    "INT32": ("int_contents", np.int32),
    "INT64": ("int64_contents", np.int64),
    "UINT8": ("uint_contents", np.uint32),
    "UINT16": ("uint_contents", np.uint32),
    "UINT32": ("uint_contents", np.uint32),
    "UINT64": ("uint64_contents", np.uint64),
    "FP32": ("fp32_contents", np.float32),
    "FP64": ("fp64_contents", np.float64),
    "BYTES": ("bytes_contents", np.object_),
}

_DTYPES: dict[str, np.dtype[Any]] = {}


def _dtype(datatype: str, what: str) -> np.dtype[Any]:
    dt = _DTYPES.get(datatype)
    if dt is None:
        np_type = triton_to_np_dtype(datatype)
        if np_type is None:
            raise MalformedMessage(f"{what} has an unknown datatype {datatype!r}")
        dt = _DTYPES[datatype] = np.dtype(np_type)
    return dt


def _shape(dims: Iterable[int], what: str) -> list[int]:
    shape = list(dims)
    if any(d < 0 for d in shape):
        raise MalformedMessage(f"{what} has a negative dimension in shape {shape}")
    return shape


def _raw_tensor(raw: bytes, datatype: str, shape: list[int], what: str) -> Array:
    dt = _dtype(datatype, what)
    count = math.prod(shape)
    if dt.kind == "O":  # BYTES: 4-byte little-endian length, then the element, back to back
        try:
            elements: Array = deserialize_bytes_tensor(raw)
        except Exception as exc:  # struct.error: a length prefix that runs past the data
            raise MalformedMessage(f"{what}: BYTES contents are truncated: {exc}") from exc
        if elements.size != count:
            raise MalformedMessage(
                f"{what}: {elements.size} BYTES element(s) do not fill shape {shape}"
            )
        return elements.reshape(shape)
    if len(raw) != count * dt.itemsize:
        raise MalformedMessage(
            f"{what}: {len(raw)} raw bytes do not match shape {shape} of {datatype} "
            f"({count * dt.itemsize} bytes)"
        )
    # A read-only view: the bytes object stays alive as long as the array does.
    view: Array = np.frombuffer(raw, dtype=dt)
    return view.reshape(shape)


def _typed_tensor(contents: Any, datatype: str, shape: list[int], what: str) -> Array:
    dt = _dtype(datatype, what)
    field, wire_type = _TYPED.get(datatype, ("", np.object_))
    for descriptor, _values in contents.ListFields():  # only the fields that hold values
        if descriptor.name != field:
            raise MalformedMessage(f"{what}: {datatype} data sent in {descriptor.name}")
    values = getattr(contents, field) if field else ()
    count = math.prod(shape)
    if len(values) != count:
        raise MalformedMessage(
            f"{what}: {len(values)} value(s) in {field or 'contents'} do not fill shape {shape}"
        )
    if dt.kind == "O":
        elements = np.empty(count, dtype=object)
        elements[:] = list(values)
        return elements.reshape(shape)
    wide: Array = np.array(values, dtype=wire_type)
    if dt != wide.dtype and wide.size:
        info = np.iinfo(dt)
        if wide.min() < info.min or wide.max() > info.max:
            raise MalformedMessage(f"{what}: {field} holds values outside {datatype}'s range")
    return wide.astype(dt, copy=False).reshape(shape)


def tensor_array(tensor: Any, raw: bytes | None, what: str) -> Array:
    """One input's or output's array: from its raw contents when it has some, else typed."""
    shape = _shape(tensor.shape, what)
    if raw is not None:
        return _raw_tensor(raw, tensor.datatype, shape, what)
    return _typed_tensor(tensor.contents, tensor.datatype, shape, what)


def _parse(message: Any, body: bytes, kind: str, cap: int) -> Any:
    if len(body) > cap:
        raise TooLarge(f"the {kind} is {len(body)} bytes, over {cap}")
    try:
        message.ParseFromString(body)
    except DecodeError as exc:
        raise MalformedMessage(f"not a {kind}: {exc}") from exc
    return message


def raw_contents(raw_list: Any, tensors: Any, kind: str) -> list[bytes | None]:
    """Each tensor's raw contents, by position as ``as_numpy`` pairs them, or None past them.

    Triton sends one entry per output, empty for a shared-memory one; fewer entries than tensors
    leave the rest to their typed contents, as ``as_numpy`` reads them; more name nothing."""
    raw = list(raw_list)  # each element access copies the bytes out of the message: once
    if len(raw) > len(tensors):
        raise MalformedMessage(f"{len(raw)} {kind} for {len(tensors)} tensor(s)")
    return [*raw, *([None] * (len(tensors) - len(raw)))]


def decode_infer_response(
    body: bytes,
    headers: Mapping[str, str],
    *,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
    max_outputs: int = MAX_OUTPUTS,
) -> DecodedResponse:
    """Named numpy arrays from a serialized ``ModelInferResponse``; shared-memory outputs are
    skipped. Raises :class:`MalformedMessage` saying what is wrong (:class:`TooLarge` past a
    cap), never another error."""
    response = _parse(
        service_pb2.ModelInferResponse(), body, "ModelInferResponse", max_inflated_bytes
    )
    if len(response.outputs) > max_outputs:
        raise TooLarge(f"the answer has {len(response.outputs)} outputs, over {max_outputs}")
    raws = raw_contents(response.raw_output_contents, response.outputs, "raw_output_contents")
    outputs: dict[str, Array] = {}
    for out, raw in zip(response.outputs, raws, strict=True):
        name = out.name
        if name in outputs:
            raise MalformedMessage(f"not a V2 infer response: output {name!r} appears twice")
        if "shared_memory_region" in out.parameters:
            continue
        outputs[name] = tensor_array(out, raw, f"output {name!r}")
    return DecodedResponse(response.model_name or None, response.model_version or None, outputs)


def parse_request(body: bytes, *, max_inflated_bytes: int = MAX_INFLATED_BYTES) -> Any:
    """A serialized ``ModelInferRequest``, parsed; raises :class:`MalformedMessage`."""
    return _parse(service_pb2.ModelInferRequest(), body, "ModelInferRequest", max_inflated_bytes)


def parameter_value(param: Any) -> bool | int | float | str | None:
    """An ``InferParameter``'s value, whichever of its kinds is set (None when none is)."""
    kind = param.WhichOneof("parameter_choice")
    value: bool | int | float | str | None = None if kind is None else getattr(param, kind)
    return value


def unsafe_to_mirror(request: Any) -> str | None:
    """Why this parsed infer request must not be copied to a shadow, or None if it may be."""
    params = request.parameters
    # Triton takes sequence_id as int64 or string (0 and "" mean none), and the flags as bools.
    if any(name in params and parameter_value(params[name]) for name in _SEQUENCE_PARAMETERS):
        return "sequence"
    for tensor in (*request.inputs, *request.outputs):
        if "shared_memory_region" in tensor.parameters:
            return "shared_memory"
    return None


_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")
