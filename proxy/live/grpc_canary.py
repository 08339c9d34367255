"""The canary split for gRPC ``ModelInfer``: which upstream answers a live call.

As over HTTP (``forwarding.LiveProxy``): the rollout's weight picks the candidate for a share of
the requests to the models it serves (sticky by ``canary.sticky_header``, read from the call's
metadata), except requests that must stay with the reference (a sequence or shared-memory
request, a stateful or decoupled model, or one whose config is not known yet). A candidate that
cannot be reached does not fail the client: the reference answers and the fallback counts
against the candidate. Only the model name is read from a message that stays with the
reference (``request_model``, a walk of the wire format); one bound for the candidate is parsed
to check it is safe to send there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from ..canary.controller import CanaryController
from ..canary.evidence import CanaryTag
from ..protocols.base import MalformedMessage
from ..protocols.model_config import ModelConfigs
from ..protocols.v2_grpc.adapter import ADAPTER as V2_GRPC
from ..protocols.v2_grpc.wire import request_model, with_model_name
from ..settings import Settings
from .grpc_upstream import GrpcUpstream, Metadata


@dataclass(frozen=True, slots=True)
class Split:
    by_candidate: bool
    tag: CanaryTag | None
    """The rollout step whose evidence this call feeds (None: no rollout step running)."""
    body: bytes
    """What to send: the candidate's copy names the model as the candidate serves it."""


class GrpcCanary:
    """Owned by the gRPC listener's runner; ``candidate`` is the canary's own channel."""

    def __init__(
        self,
        settings: Settings,
        controller: CanaryController,
        candidate: GrpcUpstream,
        models: ModelConfigs,
    ) -> None:
        self._settings = settings
        self._controller = controller
        self.candidate = candidate
        self._models = models
        self._cap = settings.proxy.max_inflated_bytes

    def reload(self, settings: Settings) -> None:
        self._settings = settings

    async def close(self) -> None:
        """Stop the config lookups in flight (the channel is its owner's to close)."""
        await self._models.close()

    def split(self, request: bytes, metadata: Metadata) -> Split | None:
        """Who answers this call; None when the rollout has no say in it (another model, or a
        message the reference will refuse), which then counts for nothing."""
        try:
            model = request_model(request)
        except MalformedMessage:
            return None  # the reference says what is wrong with it
        if not self._settings.canary_serves(model):
            return None
        headers: Mapping[str, str] = {k: v for k, v in metadata if isinstance(v, str)}
        by_candidate, tag = self._controller.split(headers)
        if not by_candidate or self._unsafe(model, request):
            return Split(False, tag, request)
        served = self._controller.candidate.served_name(model)
        body = request if served == model else with_model_name(request, served)
        return Split(True, tag, body)

    def _unsafe(self, model: str, request: bytes) -> bool:
        stateful = self._models.peek(model)
        if stateful is None or stateful:
            return True  # unknown until the reference's config says (looked up meanwhile)
        try:
            facts = V2_GRPC.inspect_request(request, {}, max_inflated_bytes=self._cap)
        except MalformedMessage:
            return False  # the candidate answers the error, as the reference would
        return facts.unsafe is not None

    def count(
        self, tag: CanaryTag | None, by_candidate: bool, status: int, seconds: float, fallback: bool
    ) -> None:
        self._controller.count(tag, by_candidate, status, seconds, fallback=fallback)
