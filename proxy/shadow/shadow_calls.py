"""One copy's calls: to its candidate (or, for a canary answer, to the reference), timed.

The mirror scheduler decides when a copy starts; this decides what it sends where, under which
time limit, and turns every failure into a counted outcome rather than an exception. Timing
happens here, in the process that sends: in ``serve``'s default setup the mirror process, at the
live path's own CPU priority.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from multidict import CIMultiDict
from opentelemetry import trace

from ..canary.evidence import EvidenceBuffer
from ..canary.gates import CAND_CALLS, CAND_ERRORS, REF_CALLS, REF_ERRORS
from ..errors import UpstreamError, UpstreamTimeout, UpstreamUnavailable
from ..protocols.llm.openai import with_body_model
from ..protocols.registry import is_grpc
from ..protocols.v2_grpc.wire import with_model_name
from ..protocols.v2_rest.routes import LLM, RouteKind, candidate_path
from ..redact import CREDENTIAL_HEADERS
from ..settings import CandidateSettings, Settings, UpstreamSettings
from ..telemetry import Telemetry
from .analysis import Exchange
from .guards import Breaker
from .shadow_client import ShadowClient

if TYPE_CHECKING:
    from .mirror_api import MirrorRequest


class ShadowCalls:
    def __init__(
        self,
        settings: Settings,
        client: ShadowClient,
        telemetry: Telemetry,
        evidence: EvidenceBuffer | None,
    ) -> None:
        self._settings = settings
        self._client = client
        self._tel = telemetry
        self._evidence = evidence
        self._canary_name = settings.canary.candidate if settings.canary else None
        self.breakers = {
            c.name: Breaker(c.breaker_failures, c.breaker_open_s) for c in settings.candidates
        }

    async def both_answers(
        self, cand: CandidateSettings, req: MirrorRequest, reverse: bool
    ) -> tuple[Exchange, Exchange] | None:
        """(the reference's answer, the candidate's) to one copy, or None with the outcome counted.

        Normally the live answer is the reference's and the copy goes to the candidate; for a
        request the canary answered it is the other way round."""
        live: Exchange | None = None
        if reverse:
            # The canary's own answer first: if it failed (or fell back to the reference, which
            # then answered live) there is nothing to compare and no second reference call.
            live = await self._await_reference(req)
            if live is None:
                self._tel.mirror(cand.name, "live_failed")
                return None
            shadow = await self._call_reference(req)
        else:
            shadow = await self._call_candidate(cand, req)
            self.breakers[cand.name].record(ok=not isinstance(shadow, UpstreamUnavailable))
        self._count_call(cand, req, reverse, shadow)
        if isinstance(shadow, UpstreamError):
            outcome = "timeout" if isinstance(shadow, UpstreamTimeout) else "unavailable"
            if shadow.status == 502:
                outcome = "bad_response"
            outcome = f"reference_{outcome}" if reverse else outcome
            trace.get_current_span().set_attribute("shadowproxy.outcome", outcome)
            self._tel.mirror(cand.name, outcome)
            return None
        side = "reference_shadow" if reverse else "candidate"
        self._tel.latency(side, shadow.upstream, shadow.latency_s)
        if live is None:
            live = await self._await_reference(req)
            if live is None:
                self._tel.mirror(cand.name, "reference_failed")
                return None
        return (shadow, live) if reverse else (live, shadow)

    async def _call_candidate(
        self, cand: CandidateSettings, req: MirrorRequest
    ) -> Exchange | UpstreamError:
        model = req.route.model or ""
        headers = CIMultiDict(req.headers)
        if not cand.forward_credentials:
            for name in CREDENTIAL_HEADERS:
                headers.popall(name, None)
        for name, value in cand.headers.items():
            headers[name] = value.get_secret_value()
        upstream: UpstreamSettings = cand
        timeout = cand.timeout_s
        if req.canary is not None and self._is_canary(cand):
            # Evidence for the canary's error rate: the limit its live answers get, or an
            # answer slower than the shadow timeout would count as an error it is not.
            timeout = self._settings.reference.timeout_s
        served = cand.served_name(model)
        if is_grpc(req.headers):
            body = req.body if served == model else with_model_name(req.body, served)
            return await self._grpc(upstream, body, headers, timeout)
        path = candidate_path(req.route, served)
        if req.route.kind in LLM:
            if req.canary is None or not self._is_canary(cand):
                timeout = cand.llm_timeout_s
            body = req.body
            if req.route.kind is RouteKind.OPENAI and served != model:
                body = with_body_model(req.body, req.headers, served)
                headers.popall("Content-Encoding", None)  # re-encoded as plain JSON
            return await self._post(upstream, path, req, headers, timeout, body=body, timed=True)
        return await self._post(upstream, path, req, headers, timeout)

    async def _call_reference(self, req: MirrorRequest) -> Exchange | UpstreamError:
        """The reverse copy of a request the canary answered: the reference, with the client's
        own headers (it is the upstream they were meant for)."""
        ref = self._settings.reference
        if is_grpc(req.headers):
            return await self._grpc(ref, req.body, CIMultiDict(req.headers), ref.timeout_s)
        path = candidate_path(req.route, req.route.model or "")
        timed = req.route.kind in LLM
        return await self._post(
            ref, path, req, CIMultiDict(req.headers), ref.timeout_s, timed=timed
        )

    async def _post(
        self,
        upstream: UpstreamSettings,
        path: str,
        req: MirrorRequest,
        headers: CIMultiDict[str],
        timeout_s: float,
        *,
        body: bytes | None = None,
        timed: bool = False,
    ) -> Exchange | UpstreamError:
        if self._tel.exporting:
            self._tel.propagator.inject(headers)
        target = path + (f"?{req.query}" if req.query else "")
        data = req.body if body is None else body
        return await self._client.post(upstream, target, headers, data, timeout_s, timed=timed)

    async def _grpc(
        self,
        upstream: UpstreamSettings,
        body: bytes,
        headers: CIMultiDict[str],
        timeout_s: float,
    ) -> Exchange | UpstreamError:
        if upstream.grpc_target is None:
            # Checked before the copy is queued for it (``mirror``); a reload may get here.
            return UpstreamUnavailable(upstream.name, upstream.url, "has no grpc_url")
        if self._tel.exporting:
            self._tel.propagator.inject(headers)
        return await self._client.grpc.infer(upstream, body, headers.items(), timeout_s)

    def _is_canary(self, cand: CandidateSettings) -> bool:
        return cand.name == self._canary_name

    def _count_call(
        self,
        cand: CandidateSettings,
        req: MirrorRequest,
        reverse: bool,
        shadow: Exchange | UpstreamError,
    ) -> None:
        """A shadow call to the canary candidate (or, reversed, to the reference) is evidence of
        its error rate; live calls are counted by the live process."""
        if self._evidence is None or req.canary is None or not self._is_canary(cand):
            return
        failed = isinstance(shadow, UpstreamError) or shadow.status >= 500
        calls, errors = (REF_CALLS, REF_ERRORS) if reverse else (CAND_CALLS, CAND_ERRORS)
        self._evidence.add(req.canary, {calls: 1, errors: int(failed)})

    async def _await_reference(self, req: MirrorRequest) -> Exchange | None:
        if req.reference.done():  # the usual case: the live call ended first
            return req.reference.result()
        timeout = self._settings.reference.timeout_s + 1.0
        try:
            return await asyncio.wait_for(asyncio.shield(req.reference), timeout)
        except TimeoutError:
            return None
