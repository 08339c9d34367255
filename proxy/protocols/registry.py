"""Which adapter reads an exchange: chosen once, from what the exchange says it carries."""

from __future__ import annotations

from collections.abc import Mapping

from .base import ProtocolAdapter
from .v2_rest.adapter import ADAPTER as V2_REST

GRPC_CONTENT_TYPE = "application/grpc"
"""What every gRPC exchange's headers say (the gRPC path records its answers with it)."""


def adapter_for(headers: Mapping[str, str]) -> ProtocolAdapter:
    """The adapter for an exchange, by the content type its answer was recorded with; V2 REST
    (whose answers are JSON or binary-data bodies of any content type a V2 server chooses) when
    no other adapter claims it."""
    return V2_REST
