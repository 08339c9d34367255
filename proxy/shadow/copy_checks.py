"""What a copy must pass before a candidate gets it, and the pair its two answers make.

Shared by the mirror scheduler and the Redis-stream worker: a copy is read once for all its
candidates (``inspect``: is it safe to send twice, which request id it carries, which LLM
features it asks for), the reference's model config says whether the model is stateful
(``check``), and each candidate may refuse it (``refusal``).
"""

from __future__ import annotations

import uuid

from ..protocols.base import MalformedMessage, ProtocolAdapter, RequestFacts, TooLarge
from ..protocols.model_config import ModelConfigs
from ..protocols.registry import adapter_for, is_grpc, text_adapter
from ..protocols.v2_rest.routes import RouteKind
from ..redact import strip_headers
from ..settings import CandidateSettings, Settings
from .analysis import Exchange
from .compare_stage import Pair
from .shadow_queue import QueuedCopy


class CopyChecks:
    def __init__(self, settings: Settings, models: ModelConfigs) -> None:
        self._settings = settings
        self._models = models

    def inspect(self, copy: QueuedCopy) -> RequestFacts | None:
        """Parse the copy once for all its candidates; note why it must not be mirrored (None:
        it cannot be read)."""
        copy.checked = True
        req = copy.request
        cap = self._settings.proxy.max_inflated_bytes
        adapter: ProtocolAdapter = text_adapter(req.route.kind) or adapter_for(req.headers)
        try:
            facts = adapter.inspect_request(req.body, req.headers, max_inflated_bytes=cap)
        except TooLarge:
            copy.unsafe = "request_too_large"  # a gzip bomb, say: never inflated past the cap
            return None
        except MalformedMessage:
            copy.unsafe = "unparseable_request"
            return None
        copy.unsafe, copy.request_id, copy.needs = facts.unsafe, facts.request_id, facts.needs
        return facts

    async def check(self, copy: QueuedCopy) -> None:
        """``inspect``, then ask the reference's model config whether the model is stateful."""
        req = copy.request
        if self.inspect(copy) is None or req.route.kind is RouteKind.OPENAI:
            return  # unreadable; or not a V2 model: there is no model config to ask
        model = req.route.model or ""
        if copy.unsafe is None and await self._models.is_stateful(model):
            unsafe = self._models.why_unsafe(model)
            # The generate adapter assembles every response of a decoupled model's stream;
            # over V2 infer its many answers cannot be paired, so there it is never mirrored.
            if not (req.route.kind is RouteKind.GENERATE and unsafe == "decoupled_model"):
                copy.unsafe = unsafe


def refusal(copy: QueuedCopy, cand: CandidateSettings) -> str | None:
    """Why ``cand`` must not get this (checked) copy, or None."""
    if copy.unsafe is not None:
        return copy.unsafe
    if cand.grpc_target is None and is_grpc(copy.request.headers):
        return "no_grpc_url"  # a gRPC copy for a candidate configured for HTTP only
    refused = sorted(copy.needs - set(cand.mirror_llm.allow))
    if refused:
        return f"llm_{refused[0]}"  # n, best_of, tools, store: opt-in per candidate
    return None


def make_pair(
    settings: Settings,
    copy: QueuedCopy,
    cand: CandidateSettings,
    ref: Exchange,
    answer: Exchange,
    *,
    sample_id: str | None = None,
) -> Pair:
    """Both answers to one copy for one candidate, as the compare stage takes them."""
    req = copy.request
    request_id = (
        req.headers.get(settings.proxy.request_id_header) or copy.request_id or uuid.uuid4().hex
    )
    span = req.live_span
    adapter = text_adapter(req.route.kind)
    return Pair(
        seq=req.seq,
        candidate=cand.name,
        model=req.route.model or "",
        request_id=request_id,
        received_at=req.received_at,
        # What crosses to the compare stage, and may rest, carries no credentials.
        request_headers=strip_headers(req.headers.items(), settings.redact.headers),
        request_body=req.body,
        ref=ref,
        cand=answer,
        canary=req.canary,
        live_span=(span.trace_id, span.span_id, int(span.trace_flags)) if span else None,
        protocol=adapter.name if adapter is not None else "",
        sample_id=sample_id,
    )
