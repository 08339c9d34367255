"""Copies of gRPC ``ModelInfer`` calls for the shadow side: the ``on_infer`` hook.

``GrpcLiveServer`` hands every unary ``ModelInfer`` exchange here once the reference answered
(just before the answer goes out). A copy is made, as over HTTP, for a model some candidate
shadows and when the mirror admits it; the reference's answer is known already, so the copy
goes out with it and the candidate is called after the live call, never beside it.

Both sides are recorded as ``Exchange``s the registry reads with the V2 gRPC adapter: headers
``content-type: application/grpc``, ``grpc-status`` and ``grpc-message``, plus the metadata;
the body is the serialized answer (or the details of a failed call); the status is
``http_status(code)`` (200 for OK), so the shadow side's status rules hold for gRPC unchanged.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable

import grpc
from multidict import CIMultiDict

from ..protocols.base import MalformedMessage
from ..protocols.registry import GRPC_CONTENT_TYPE
from ..protocols.v2_grpc import http_status
from ..protocols.v2_grpc.wire import request_model
from ..protocols.v2_rest.routes import Route, RouteKind
from ..settings import Settings
from ..shadow.analysis import Exchange
from ..shadow.mirror_api import Mirror, MirrorRequest
from .grpc_server import GrpcExchange

# Route suffix of a gRPC copy: no candidate path is built from it (candidates are called over
# gRPC), it only says what the copy is in logs and the link's wire format.
GRPC_INFER_SUFFIX = "/grpc/ModelInfer"


def _metadata_headers(*metadata: Iterable[tuple[str, str | bytes]]) -> CIMultiDict[str]:
    """The content type the registry keys on, and the text metadata. Binary (``-bin``) values
    are left out: headers are text on every link and in Redis, and no comparison reads them."""
    headers: CIMultiDict[str] = CIMultiDict()
    headers["content-type"] = GRPC_CONTENT_TYPE
    for pairs in metadata:
        for key, value in pairs:
            if isinstance(value, str) and key.lower() != "content-type":
                headers.add(key, value)
    return headers


def grpc_headers(
    code: grpc.StatusCode, details: str, *metadata: Iterable[tuple[str, str | bytes]]
) -> CIMultiDict[str]:
    """An answer's headers: its metadata's, and its status."""
    headers = _metadata_headers(*metadata)
    headers["grpc-status"] = str(code.value[0])
    headers["grpc-message"] = details
    return headers


def reference_exchange(name: str, exchange: GrpcExchange) -> Exchange:
    """The live answer's side of a copy (the reference's, or the canary's that answered), as
    the shadow side records the other side (``shadow.grpc_client``)."""
    headers = grpc_headers(
        exchange.code, exchange.details, exchange.initial_metadata, exchange.trailing_metadata
    )
    body = exchange.response if exchange.response is not None else exchange.details.encode()
    return Exchange(name, http_status(exchange.code), headers, body, exchange.latency_s)


class GrpcCopier:
    """The ``on_infer`` hook: turns a live ``ModelInfer`` exchange into a mirror copy."""

    def __init__(self, settings: Settings, mirror: Mirror) -> None:
        self._settings = settings
        self._mirror = mirror

    def reload(self, settings: Settings) -> None:
        self._settings = settings

    def copying(self) -> bool:
        """Whether a call could be copied now (some candidate takes some copies); when not,
        the relay does not read calls for copies at all."""
        return self._settings.mirrors(None)

    def __call__(self, exchange: GrpcExchange) -> None:
        if exchange.failure is not None:
            return  # the reference could not answer: nothing to compare a candidate against
        try:
            model = request_model(exchange.request)
        except MalformedMessage:
            # The reference refused it too (its status says why): not worth a candidate call.
            self._mirror.note_skip("unparseable_request")
            return
        headers = _metadata_headers(exchange.metadata)
        tag, served_by = exchange.canary, exchange.served_by
        if served_by is not None:
            # A canary answer is copied back to the reference while the rollout runs (evidence).
            if tag is None:
                return
        elif not self._settings.mirrors(model):
            return
        elif tag is None and not self._mirror.admit(model, headers):
            return  # (canary copies are evidence: the worker accounts for any it must drop)
        answered_by = served_by or self._settings.reference.name
        future: asyncio.Future[Exchange | None] = asyncio.get_running_loop().create_future()
        future.set_result(reference_exchange(answered_by, exchange))
        self._mirror.offer(
            MirrorRequest(
                route=Route(RouteKind.INFER, model, None, GRPC_INFER_SUFFIX),
                query="",
                headers=headers,
                body=exchange.request,
                received_at=time.time() - exchange.latency_s,
                live_span=None,
                reference=future,
                served_by=served_by,
                canary=tag,
            )
        )
