"""V2 gRPC as a protocol adapter: the codec's functions behind the adapter interface."""

from __future__ import annotations

from collections.abc import Mapping

from ..base import RequestFacts, header
from .codec import decode_infer_response, parse_request, unsafe_to_mirror
from .render import render_request
from .status import status_name
from .wire import request_model

__all__ = ["ADAPTER", "V2GrpcAdapter", "render_request", "request_model"]

_ERROR_TEXT_MAX = 200


class V2GrpcAdapter:
    name = "v2_grpc"
    title = "V2 gRPC"

    # gRPC message compression is undone by the gRPC path: the body is the message itself.
    decode_response = staticmethod(decode_infer_response)

    def inspect_request(
        self, body: bytes, headers: Mapping[str, str], *, max_inflated_bytes: int
    ) -> RequestFacts:
        request = parse_request(body, max_inflated_bytes=max_inflated_bytes)
        return RequestFacts(unsafe_to_mirror(request), request.id or None)

    def error_text(self, status: int, headers: Mapping[str, str], body: bytes) -> str:
        """``NOT_FOUND: <details>``: the status's name from ``grpc-status`` (the HTTP-like
        ``status`` when it is missing) and the details from ``grpc-message``, else the body."""
        code = header(headers, "grpc-status")
        if code is None:
            label = f"HTTP {status}"
        else:
            try:
                label = status_name(int(code))
            except ValueError:
                label = f"grpc-status {code[:20]!r}"
        details = header(headers, "grpc-message")
        if not details:
            details = body[: _ERROR_TEXT_MAX * 4].decode("utf-8", "replace")
        text = f"{label}: {details.strip()}" if details.strip() else label
        return text if len(text) <= _ERROR_TEXT_MAX else text[: _ERROR_TEXT_MAX - 3] + "..."


ADAPTER = V2GrpcAdapter()
