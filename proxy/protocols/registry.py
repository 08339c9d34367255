"""Which adapter reads an exchange: chosen once, from what the exchange says it carries."""

from __future__ import annotations

from collections.abc import Mapping

from .base import ProtocolAdapter, header
from .v2_rest.adapter import ADAPTER as V2_REST

GRPC_CONTENT_TYPE = "application/grpc"
"""What every gRPC exchange's headers say (the gRPC path records its answers with it)."""


def _content_type(headers: Mapping[str, str]) -> str:
    return (header(headers, "content-type") or "").strip().lower()


def adapter_for(headers: Mapping[str, str]) -> ProtocolAdapter:
    """The adapter for an exchange, by the content type its answer was recorded with; V2 REST
    (whose answers are JSON or binary-data bodies of any content type a V2 server chooses) when
    no other adapter claims it."""
    if is_grpc(headers):
        # Imported on the first gRPC exchange only: grpcio and protobuf are heavy for a proxy
        # that carries none.
        from .v2_grpc.adapter import ADAPTER as V2_GRPC

        adapter: ProtocolAdapter = V2_GRPC
        return adapter
    return V2_REST


def is_grpc(headers: Mapping[str, str]) -> bool:
    """Whether an exchange (or a copy of a request) came over gRPC."""
    return _content_type(headers).startswith(GRPC_CONTENT_TYPE)
