"""A ``ModelInferRequest`` as the review page shows a REST request's JSON."""

from __future__ import annotations

from typing import Any

from ..base import MAX_INFLATED_BYTES, MalformedMessage
from ..v2_rest.codec import preview
from .codec import parameter_value, parse_request, raw_contents, tensor_array


def _parameters(params: Any) -> dict[str, Any]:
    return {key: parameter_value(params[key]) for key in sorted(params)}


def render_request(body: bytes, *, max_inflated_bytes: int = MAX_INFLATED_BYTES) -> dict[str, Any]:
    """A JSON-able view of a serialized infer request, shaped like a V2 REST request: model,
    id, parameters, each input's name, datatype, shape and first values (``preview``), and the
    outputs asked for. An input whose data cannot be read shows why instead of its values;
    a body that is not a request raises :class:`MalformedMessage`."""
    request = parse_request(body, max_inflated_bytes=max_inflated_bytes)
    try:
        raws = raw_contents(request.raw_input_contents, request.inputs, "raw_input_contents")
    except MalformedMessage as exc:
        raws, raw_error = [None] * len(request.inputs), str(exc)
    else:
        raw_error = ""
    inputs: list[dict[str, Any]] = []
    for tensor, raw in zip(request.inputs, raws, strict=True):
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if tensor.parameters:
            entry["parameters"] = _parameters(tensor.parameters)
        if raw_error:
            entry["error"] = raw_error
        elif "shared_memory_region" not in tensor.parameters:
            try:
                entry["data"] = preview(tensor_array(tensor, raw, f"input {tensor.name!r}"))["head"]
            except MalformedMessage as exc:
                entry["error"] = str(exc)
        inputs.append(entry)
    rendered: dict[str, Any] = {"model_name": request.model_name}
    if request.model_version:
        rendered["model_version"] = request.model_version
    if request.id:
        rendered["id"] = request.id
    if request.parameters:
        rendered["parameters"] = _parameters(request.parameters)
    rendered["inputs"] = inputs
    rendered["outputs"] = [
        {
            "name": out.name,
            **({"parameters": _parameters(out.parameters)} if out.parameters else {}),
        }
        for out in request.outputs
    ]
    return rendered
