"""The HTTP-like status a gRPC exchange is recorded with, and the name of a status code."""

from __future__ import annotations

import grpc

# google.rpc.Code's documented HTTP mapping (googleapis google/rpc/code.proto, as grpc-gateway's
# HTTPStatusFromCode applies it). grpc's http-grpc-status-mapping.md maps the other way (HTTP to
# gRPC) and loses too much to invert: 404 there means UNIMPLEMENTED, and four statuses become
# UNAVAILABLE. Distinct codes that share a status (INVALID_ARGUMENT, FAILED_PRECONDITION,
# OUT_OF_RANGE: 400) compare as the same failure, as their HTTP equivalents would.
_HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,  # "Client Closed Request" (nginx's), as code.proto says
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
    grpc.StatusCode.UNAUTHENTICATED: 401,
}

_BY_NUMBER: dict[int, grpc.StatusCode] = {code.value[0]: code for code in grpc.StatusCode}


def http_status(code: grpc.StatusCode) -> int:
    """The status an exchange answered with ``code`` is recorded with: 200 for OK, else the
    HTTP status google.rpc.Code documents for it (500 for any code it does not name)."""
    return _HTTP_STATUS.get(code, 500)


def status_name(number: int) -> str:
    """``NOT_FOUND`` for 5; codes outside the 17 of the spec read ``UNKNOWN(n)``."""
    code = _BY_NUMBER.get(number)
    return code.name if code is not None else f"UNKNOWN({number})"
