"""Which adapter reads an exchange: chosen once, from the route the request came by (LLM APIs)
or from what the exchange says it carries (V2 REST or gRPC)."""

from __future__ import annotations

from collections.abc import Mapping

from .base import ProtocolAdapter, TextAdapter, header
from .llm.adapter import GENERATE, OPENAI
from .v2_rest.adapter import ADAPTER as V2_REST
from .v2_rest.routes import RouteKind

_BY_ROUTE: dict[RouteKind, TextAdapter] = {RouteKind.GENERATE: GENERATE, RouteKind.OPENAI: OPENAI}
_BY_NAME: dict[str, TextAdapter] = {GENERATE.name: GENERATE, OPENAI.name: OPENAI}

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


def text_adapter(kind: RouteKind) -> TextAdapter | None:
    """The LLM adapter of a route, None for V2 infer calls."""
    return _BY_ROUTE.get(kind)


def adapter_named(name: str, headers: Mapping[str, str]) -> ProtocolAdapter:
    """The adapter a copy was recorded with (its ``protocol``), else by its answer's headers."""
    adapter: ProtocolAdapter | None = _BY_NAME.get(name)
    return adapter if adapter is not None else adapter_for(headers)
