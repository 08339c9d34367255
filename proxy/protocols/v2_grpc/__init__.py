"""Triton's ``inference.GRPCInferenceService`` (KServe V2 over gRPC) as a protocol adapter.

An exchange's body is the serialized protobuf message (``ModelInferRequest`` or
``ModelInferResponse``; for a failed call, the status details as UTF-8) and its headers say
``content-type: application/grpc`` with ``grpc-status`` and ``grpc-message``. ``adapter.ADAPTER``
reads them; ``http_status`` gives the HTTP-like status an exchange is recorded with. Imported
only when a gRPC exchange comes (``registry.adapter_for``): grpcio and protobuf are heavy for a
proxy that carries none.
"""

from .status import http_status

__all__ = ["http_status"]
