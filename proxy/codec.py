"""KServe V2 / Triton codecs, over copies of the bytes (the live bytes are never touched).

Responses are decoded with tritonclient's own ``InferResult`` (JSON and binary tensors, gzip and
deflate bodies, BYTES and BF16). Requests have no public parser in tritonclient, so the JSON
header is split off by the binary-data extension's rule (``Inference-Header-Content-Length``).
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import ShadowProxyError

Array = np.ndarray[Any, np.dtype[Any]]

HEADER_LENGTH = "Inference-Header-Content-Length"


class MalformedMessage(ShadowProxyError):
    """A body that does not follow the V2 protocol."""


@dataclass(frozen=True, slots=True)
class DecodedResponse:
    model_name: str | None
    model_version: str | None
    outputs: dict[str, Array] = field(default_factory=dict)


def _decompress(body: bytes, encoding: str | None) -> bytes:
    if not encoding or encoding == "identity":
        return body
    try:
        if encoding == "gzip":
            return gzip.decompress(body)
        if encoding == "deflate":
            return zlib.decompress(body)  # Triton's deflate is zlib-wrapped
    except (OSError, zlib.error, EOFError) as exc:
        raise MalformedMessage(f"body is not valid {encoding}: {exc}") from exc
    raise MalformedMessage(f"unsupported Content-Encoding {encoding!r}")


def warm_up() -> None:
    """Import tritonclient's HTTP package (and gevent under it) now, at start-up.

    Imported lazily on the first comparison, it held the GIL for a few hundred milliseconds in a
    worker thread and stalled every live request in flight at that moment.
    """
    import tritonclient.http  # noqa: F401


def decode_infer_response(body: bytes, headers: Mapping[str, str]) -> DecodedResponse:
    """Named numpy arrays from a 200 V2 infer response; shared-memory outputs are skipped."""
    from tritonclient.http import InferResult  # heavy import (gevent); only on the mirror side

    header_length = headers.get(HEADER_LENGTH)
    try:
        result = InferResult.from_response_body(
            body,
            verbose=False,
            header_length=int(header_length) if header_length else None,
            content_encoding=headers.get("Content-Encoding"),
        )
        response = result.get_response()
    except Exception as exc:  # tritonclient raises bare json/Key/Value errors on garbage
        raise MalformedMessage(f"not a V2 infer response: {type(exc).__name__}: {exc}") from exc
    if not isinstance(response, dict) or not isinstance(response.get("outputs"), list):
        raise MalformedMessage("not a V2 infer response: no 'outputs' list")
    outputs: dict[str, Array] = {}
    for out in response["outputs"]:
        name = out.get("name") if isinstance(out, dict) else None
        if not isinstance(name, str):
            raise MalformedMessage("not a V2 infer response: an output has no name")
        params = out.get("parameters") or {}
        if "shared_memory_region" in params:
            continue
        try:
            arr = result.as_numpy(name)
        except Exception as exc:
            raise MalformedMessage(f"output {name!r} cannot be decoded: {exc}") from exc
        if arr is None:
            raise MalformedMessage(f"output {name!r} has no data")
        outputs[name] = arr
    version = response.get("model_version")
    return DecodedResponse(
        model_name=response.get("model_name"),
        model_version=str(version) if version is not None else None,
        outputs=outputs,
    )


def parse_request_header(body: bytes, headers: Mapping[str, str]) -> dict[str, Any] | None:
    """The JSON part of a V2 infer request, or None for a raw binary request (header length 0)."""
    raw = _decompress(body, headers.get("Content-Encoding"))
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
        parsed = json.loads(raw[:n])
    except ValueError as exc:
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
        for tensor in request.get(key) or ():
            tparams = tensor.get("parameters") if isinstance(tensor, dict) else None
            if isinstance(tparams, dict) and "shared_memory_region" in tparams:
                return "shared_memory"
    return None


def preview(arr: Array, limit: int = 16) -> dict[str, Any]:
    """A small JSON-able view of a tensor for the review page (shape, dtype, first values)."""
    flat = arr.reshape(-1)[:limit]
    if arr.dtype == np.object_:
        values: list[Any] = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat
        ]
    else:
        values = [float(v) if np.issubdtype(arr.dtype, np.floating) else v.item() for v in flat]
        values = [None if isinstance(v, float) and not np.isfinite(v) else v for v in values]
    return {"shape": list(arr.shape), "dtype": str(arr.dtype), "head": values}
