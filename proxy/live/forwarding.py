"""The live path: every request forwarded to the reference, transparently.

What the client gets is what the reference sent: status, reason, body bytes (never decompressed)
and end-to-end headers. Hop-by-hop headers are stripped both ways; headers aiohttp would add on its
own (Date, Server, Content-Type) are removed again when the reference did not send them. Bodies
stream in both directions; only infer requests that some candidate may shadow are buffered, because
they are sent twice. The live path never awaits the mirror: it hands the scheduler a copy and
publishes the reference's answer to a future that the shadow tasks read later.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiMapping
from opentelemetry.trace import INVALID_SPAN, Span, SpanKind

from ..canary.controller import CanaryController
from ..canary.evidence import CanaryTag
from ..errors import UpstreamError, UpstreamUnavailable, translate_upstream_error
from ..protocols.base import MalformedMessage
from ..protocols.llm.openai import body_model, with_body_model
from ..protocols.model_config import ModelConfigs
from ..protocols.v2_rest.codec import parse_request_header, unsafe_to_mirror
from ..protocols.v2_rest.routes import LLM, MIRRORED, Route, RouteKind, candidate_path, classify
from ..settings import Settings, UpstreamSettings
from ..shadow.analysis import Exchange
from ..shadow.mirror_api import Mirror, MirrorRequest
from ..telemetry import Telemetry
from .stream_tee import ProxiedStreamResponse, relay_stream

log = logging.getLogger("shadowproxy.forward")

HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "trailers",
        "transfer-encoding",
        "upgrade",
    }
)
REQUEST_DROP = HOP_BY_HOP | {"host", "content-length", "expect"}
_RESPONSE_DROP = HOP_BY_HOP | {"content-length"}
# Headers aiohttp's server adds by itself when absent; removed again unless the reference sent them.
_SERVER_DEFAULTS = ("Date", "Server", "Content-Type")
# Answers up to this size are read whole and sent with one write: cheaper than streaming.
_SMALL_BODY = 256 * 1024
# Request bodies up to this size are read whole; larger or unsized ones stream to the reference.
_SMALL_REQUEST = 1024 * 1024
Body = bytes | aiohttp.StreamReader | AsyncIterator[bytes] | None
"""A request body as forwarded: held, or streamed as it arrives."""


def end_to_end(headers: MultiMapping[str], drop: frozenset[str]) -> CIMultiDict[str]:
    """Copy headers, less hop-by-hop ones and any named in ``Connection`` (RFC 9110 7.6.1)."""
    if "Connection" in headers:
        named = {t.strip().lower() for v in headers.getall("Connection") for t in v.split(",")}
        drop = drop | named
    # One set for the whole copy (the union used to be rebuilt per header), built from a list:
    # 3 us instead of 7 us a call, and every live request makes two.
    return CIMultiDict([(k, v) for k, v in headers.items() if k.lower() not in drop])


def origin_form(request: web.Request) -> str:
    """The request target as sent, in origin form: an absolute-form one (``GET http://h/v2``,
    which RFC 9112 says a server must accept) is forwarded as its path and query."""
    raw_path = request.raw_path
    return raw_path if raw_path.startswith("/") else request.rel_url.raw_path_qs


def as_sent(headers: CIMultiDict[str]) -> CIMultiDict[str]:
    """A copy of headers aiohttp parsed, each name and value one character per byte sent.

    aiohttp decodes header bytes as UTF-8 (``surrogateescape``); the fast lane and the shadow
    client read and write a header as latin-1, byte for byte. A copy made here reaches the
    candidate with the very bytes the client sent (and ``Wert: é`` does not break the call).
    """
    if all(k.isascii() and v.isascii() for k, v in headers.items()):
        return headers.copy()  # nearly always: nothing to re-decode
    return CIMultiDict(
        (
            k.encode("utf-8", "surrogateescape").decode("latin-1"),
            v.encode("utf-8", "surrogateescape").decode("latin-1"),
        )
        for k, v in headers.items()
    )


class ProxiedResponse(web.Response):
    """A response whose headers came from an upstream; see ``strip_server_defaults``."""

    upstream_headers: frozenset[str] = frozenset()


async def strip_server_defaults(request: web.Request, response: web.StreamResponse) -> None:
    """``on_response_prepare`` hook: keep proxied headers exactly as the reference sent them."""
    if isinstance(response, ProxiedResponse | ProxiedStreamResponse):
        for name in _SERVER_DEFAULTS:
            if name.lower() not in response.upstream_headers:
                response.headers.popall(name, None)


def server_span(
    tel: Telemetry, name: str, headers: Mapping[str, str]
) -> tuple[AbstractContextManager[Span], bool]:
    """The live request's span, and whether there is one.

    With no span exporter and no trace context from the client, a span would be built, never
    recorded, and only tell the reference "not sampled": skip it (4% of the live process's CPU),
    and the reference sees what a direct client sent.
    """
    if not (tel.exporting or "traceparent" in headers):
        return contextlib.nullcontext(INVALID_SPAN), False
    cm = tel.tracer.start_as_current_span(
        name, context=tel.propagator.extract(headers), kind=SpanKind.SERVER
    )
    return cm, True


def v2_error(err: UpstreamError) -> web.Response:
    """The V2 protocol's error shape, naming the upstream that failed."""
    return web.json_response({"error": str(err)}, status=err.status)


@dataclass(frozen=True, slots=True)
class _Target:
    """Who answers a live request: the reference, or the canary candidate."""

    name: str
    url: str
    timeout: aiohttp.ClientTimeout
    side: str  # the latency metric's side label

    @classmethod
    def of(cls, upstream: UpstreamSettings, side: str) -> _Target:
        timeout = aiohttp.ClientTimeout(
            total=upstream.timeout_s, sock_connect=upstream.connect_timeout_s
        )
        return cls(upstream.name, upstream.url, timeout, side)


class LiveProxy:
    def __init__(
        self,
        settings: Settings,
        session: aiohttp.ClientSession,
        scheduler: Mirror,
        telemetry: Telemetry,
        canary: CanaryController | None = None,
    ) -> None:
        self._settings = settings
        self._mirrors = settings.mirrors
        self._session = session
        self._scheduler = scheduler
        self._tel = telemetry
        self._canary = canary
        self._models = ModelConfigs(session, settings.reference.url)
        self._ref = _Target.of(settings.reference, "reference")
        self._cand: _Target | None = None
        self._served_header: str | None = None
        if canary is not None:
            # A canary answer is a live answer: it gets the reference's time limits, not the
            # candidate's shadow timeout (which bounds only what a copy may cost).
            self._cand = _Target(
                canary.candidate.name, canary.candidate.url, self._ref.timeout, "canary"
            )
            self._served_header = canary.config.response_header

    async def handle(self, request: web.Request) -> web.StreamResponse:
        raw_path = origin_form(request)
        route = classify(request.method, raw_path)
        if route.kind is RouteKind.OPENAI and self._canary is not None:
            # The model is in the body, and the split depends on it: read it (the split would).
            route = replace(route, model=body_model(await request.read(), request.headers))
        model = route.model or ""
        canary = (
            self._canary if route.kind in MIRRORED and self._settings.canary_serves(model) else None
        )
        by_candidate, tag, early_body = await self._split(canary, route, request)
        # A canary answer is copied back to the reference while the rollout runs (evidence);
        # after it, that would only double the reference's load, and with no reference answer
        # there is nothing to compare other candidates with.
        if by_candidate:
            mirror = tag is not None
        else:
            # (An OpenAI call's model may be unknown here: None, read by the shadow side.)
            mirror = route.kind in MIRRORED and self._mirrors(route.model)
            # (Canary copies are evidence: the worker accounts for any it has to drop.)
            mirror = mirror and (tag is not None or self._scheduler.admit(model, request.headers))
        if route.kind is RouteKind.ADMIN:
            self._scheduler.note_skip("admin_route")
        headers = end_to_end(request.headers, REQUEST_DROP)
        # The copy keeps the client's own trace context; the live call carries our span's.
        copy_headers = as_sent(headers) if mirror else headers
        span_cm, traced = server_span(
            self._tel, f"{request.method} {route.kind.value}", request.headers
        )
        with span_cm as span:
            if traced:
                self._tel.propagator.inject(headers)
            body: Body = early_body
            if body is None:
                body, mirror = await self._body(request, headers, mirror, tag is not None)
            future: asyncio.Future[Exchange | None] | None = None
            if mirror:
                assert isinstance(body, bytes)
                future = asyncio.get_running_loop().create_future()
                self._scheduler.offer(
                    MirrorRequest(
                        route=route,
                        query=request.query_string,
                        headers=copy_headers,
                        body=body,
                        received_at=time.time(),
                        live_span=span.get_span_context() if traced else None,
                        reference=future,
                        served_by=self._cand.name if by_candidate and self._cand else None,
                        canary=tag,
                    )
                )
            fell_back = False
            streamed = route.kind in LLM
            started = time.perf_counter()
            try:
                if by_candidate and canary is not None and self._cand is not None:
                    served = canary.candidate.served_name(model)
                    path = candidate_path(route, served)
                    path += f"?{request.query_string}" if request.query_string else ""
                    cand_body, cand_headers = body, headers
                    if route.kind is RouteKind.OPENAI and served != model:
                        assert isinstance(body, bytes)  # held for the split
                        cand_body = with_body_model(body, headers, served)
                        cand_headers = headers.copy()
                        cand_headers.popall("Content-Encoding", None)
                    try:
                        response = await self._forward(
                            request,
                            cand_headers,
                            cand_body,
                            future,
                            self._cand,
                            path,
                            refused_raises=True,
                            streamed=streamed,
                            in_canary=True,
                        )
                    except UpstreamUnavailable as err:
                        # The candidate is not there at all: answer from the reference rather
                        # than fail the client, and count it against the candidate.
                        log.warning("canary candidate refused, answered by the reference: %s", err)
                        fell_back, by_candidate = True, False
                        if future is not None and not future.done():
                            future.set_result(None)
                        response = await self._forward(
                            request,
                            headers,
                            body,
                            None,
                            self._ref,
                            raw_path,
                            streamed=streamed,
                            in_canary=True,
                        )
                else:
                    response = await self._forward(
                        request,
                        headers,
                        body,
                        future,
                        self._ref,
                        raw_path,
                        streamed=streamed,
                        in_canary=canary is not None,
                    )
            finally:
                if future is not None and not future.done():
                    future.set_result(None)
            if canary is not None:
                elapsed = time.perf_counter() - started
                canary.count(tag, by_candidate, response.status, elapsed, fallback=fell_back)
                if self._served_header and not response.prepared:
                    response.headers[self._served_header] = (
                        self._cand.name if by_candidate and self._cand else self._ref.name
                    )
            span.set_attribute("http.response.status_code", response.status)
            self._tel.request(route.kind.value, response.status)
            return response

    async def _split(
        self, canary: CanaryController | None, route: Route, request: web.Request
    ) -> tuple[bool, CanaryTag | None, bytes | None]:
        """(the candidate answers?, the canary step's tag, the body when it had to be read)."""
        if canary is None:
            return False, None, None
        by_candidate, tag = canary.split(request.headers)
        if not by_candidate:
            return False, tag, None
        body = await request.read()
        unsafe = self._unsafe_to_split(route, body, request.headers)
        if unsafe is not None:
            # Sequences, shared memory and stateful models stay with the reference.
            self._scheduler.note_skip(f"canary_{unsafe}")
            return False, tag, body
        return True, tag, body

    def _unsafe_to_split(
        self, route: Route, body: bytes, headers: CIMultiDictProxy[str]
    ) -> str | None:
        """Why this request must stay on the reference (the canary cannot take it), or None."""
        if route.kind is RouteKind.OPENAI:
            return None  # no V2 model config to ask; a generation holds no state between calls
        model = route.model or ""
        stateful = self._models.peek(model)
        if stateful is None:
            return "model_unknown"  # until the reference's config says (looked up meanwhile)
        if stateful:
            unsafe = self._models.why_unsafe(model)
            # Triton generate streams a decoupled model's responses whole to one client.
            if route.kind is RouteKind.GENERATE and unsafe == "decoupled_model":
                return None
            return unsafe
        if route.kind is RouteKind.GENERATE:
            return None
        try:
            header = parse_request_header(
                body, headers, max_inflated_bytes=self._settings.proxy.max_inflated_bytes
            )
        except MalformedMessage:  # TooLarge included: forwarded untouched all the same
            return None  # the candidate answers the error, as the reference would
        return unsafe_to_mirror(header)

    def reload(self, settings: Settings) -> None:
        """Mirror what a reloaded config's candidates shadow, with its redaction."""
        self._settings = settings
        self._mirrors = settings.mirrors

    async def close(self) -> None:
        await self._models.close()

    async def _body(
        self, request: web.Request, headers: CIMultiDict[str], mirror: bool, in_canary: bool
    ) -> tuple[Body, bool]:
        """The body to forward, and whether it is still mirrored. A body is held in memory only
        when it is copied or small; one too big to hold for a copy (``proxy.max_body_bytes``) is
        streamed to the reference as if it were not mirrored: mirroring never changes what the
        reference gets (nor answers 413 in its place)."""
        cap = self._settings.proxy.max_body_bytes
        # (A canary split holds the body whatever its size: its fallback sends it again.)
        if mirror and not in_canary and request.body_exists:
            body, whole = await _read_up_to(request, cap)
            if whole:
                return body, True
            self._scheduler.note_skip("request_too_large")
            if request.content_length is not None:
                headers["Content-Length"] = str(request.content_length)
            return body, False
        known = request.content_length
        if mirror or (
            request.body_exists and known is not None and known <= min(_SMALL_REQUEST, cap)
        ):
            return await request.read(), mirror
        if not request.body_exists:
            return None, mirror
        if known is not None:
            headers["Content-Length"] = str(known)
        return request.content, mirror

    async def _forward(
        self,
        request: web.Request,
        headers: CIMultiDict[str],
        body: Body,
        future: asyncio.Future[Exchange | None] | None,
        target: _Target,
        path: str,
        *,
        refused_raises: bool = False,
        streamed: bool = False,
        in_canary: bool = False,
    ) -> web.StreamResponse:
        """``streamed``: an LLM call, relayed read by read (and teed for ``future``), its time
        limit between reads rather than on the whole answer. Its head goes out before this
        returns, so the canary's served-by header (``in_canary``) is set on it here."""
        started = time.perf_counter()
        timeout = target.timeout
        if streamed:
            timeout = aiohttp.ClientTimeout(
                sock_connect=timeout.sock_connect, sock_read=timeout.total
            )
        try:
            upstream = await self._session.request(
                request.method,
                target.url + path,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            )
        except Exception as exc:
            err = translate_upstream_error(exc, target.name, target.url)
            if refused_raises and isinstance(err, UpstreamUnavailable):
                raise err from exc
            log.warning("live request %s %s failed: %s", request.method, request.path, err)
            return v2_error(err)
        try:
            resp_headers = end_to_end(upstream.headers, _RESPONSE_DROP)
            names = frozenset(k.lower() for k in upstream.headers)
            size = upstream.content_length
            if streamed:
                resp = ProxiedStreamResponse(
                    status=upstream.status, reason=upstream.reason, headers=resp_headers
                )
                resp.upstream_headers = names
                if self._served_header and in_canary:
                    resp.headers[self._served_header] = target.name
                cap = self._settings.proxy.max_answer_bytes
                return await relay_stream(
                    request, upstream, resp, started, future, target.name, cap
                )
            if future is not None or (size is not None and size <= _SMALL_BODY):
                return await self._whole(upstream, resp_headers, names, started, future, target)
            return await self._stream(request, upstream, resp_headers, names, size)
        except UpstreamError as err:
            return v2_error(err)
        finally:
            upstream.release()

    async def _whole(
        self,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        names: frozenset[str],
        started: float,
        future: asyncio.Future[Exchange | None] | None,
        target: _Target,
    ) -> web.StreamResponse:
        try:
            data = await upstream.read()
        except Exception as exc:
            raise translate_upstream_error(exc, target.name, target.url) from exc
        latency = time.perf_counter() - started
        self._tel.latency(target.side, target.name, latency)
        if future is not None and not future.done():
            live_headers = CIMultiDict(upstream.headers)
            future.set_result(Exchange(target.name, upstream.status, live_headers, data, latency))
        resp = ProxiedResponse(status=upstream.status, reason=upstream.reason, headers=headers)
        resp.upstream_headers = names
        resp.body = data
        return resp

    async def _stream(
        self,
        request: web.Request,
        upstream: aiohttp.ClientResponse,
        headers: CIMultiDict[str],
        names: frozenset[str],
        size: int | None,
    ) -> web.StreamResponse:
        resp = ProxiedStreamResponse(
            status=upstream.status, reason=upstream.reason, headers=headers
        )
        resp.upstream_headers = names
        if size is not None:
            resp.content_length = size
        await resp.prepare(request)
        # Past this point the status is sent: an upstream failure can only cut the connection,
        # which is what a direct client of the reference would see too.
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


async def _read_up_to(request: web.Request, cap: int) -> tuple[Body, bool]:
    """The body whole if it is at most ``cap`` bytes (and True); else what forwards it all
    without holding it (and False)."""
    if request.content_length is not None:
        if request.content_length > cap:
            return request.content, False
        return await request.read(), True
    # Chunked: read up to the cap; past it, what was read goes first, then the rest as it comes.
    parts: list[bytes] = []
    size = 0
    while size <= cap:
        chunk = await request.content.readany()
        if not chunk:
            return b"".join(parts), True
        parts.append(chunk)
        size += len(chunk)
    return _then_rest(b"".join(parts), request.content), False


async def _then_rest(head: bytes, rest: aiohttp.StreamReader) -> AsyncIterator[bytes]:
    yield head
    while chunk := await rest.readany():
        yield chunk
