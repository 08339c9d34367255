"""The shadow side's HTTP client: one copy to one upstream, failures returned as values.

Plain ``http://`` upstreams (nearly every model server behind a proxy) go through
``UpstreamPool``, the fast lane's pooled keep-alive client: one ``writelines`` and one llhttp
parse a call, about a fifth of aiohttp's client CPU, which on the shadow side is paid per copy.
``https://`` upstreams use an aiohttp session. Each upstream has its own pool, so a slow candidate
never holds a connection another needs; the caller bounds the calls in flight (``max_in_flight``).
An answer longer than ``max_answer_bytes`` is cut off as it arrives and the call fails (502, a
bad response): a broken or hostile candidate cannot fill the shadow side's memory.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import aiohttp
from multidict import CIMultiDict

from ..errors import UpstreamBadResponse, UpstreamError, translate_upstream_error
from ..live.upstream_pool import UpstreamPool
from ..settings import ProxySettings, UpstreamSettings
from .analysis import Exchange
from .grpc_client import ShadowGrpc

# aiohttp's client adds these when absent; a transparent proxy must not invent them upstream.
SKIP_AUTO_HEADERS = ("Accept", "Accept-Encoding", "User-Agent", "Content-Type")
# The default cap on an answer, as ``proxy.max_answer_bytes`` has it.
MAX_ANSWER_BYTES: int = ProxySettings.model_fields["max_answer_bytes"].default


def _header_line(name: str, value: str) -> bytes:
    line = f"{name}: {value}\r\n"
    try:
        return line.encode("latin-1")  # a header as the proxy reads one: a character per byte
    except UnicodeEncodeError:
        # Text from elsewhere (a decoded header, an injected one): its UTF-8, never a crash.
        return line.encode("utf-8", "surrogateescape")


class ShadowClient:
    """Owned by the shadow stage's cleanup context; ``close`` after the stage has drained."""

    def __init__(self, max_answer_bytes: int = MAX_ANSWER_BYTES) -> None:
        self.max_answer_bytes = max_answer_bytes
        self._pools: dict[str, UpstreamPool] = {}
        self._session: aiohttp.ClientSession | None = None
        self.grpc = ShadowGrpc(max_answer_bytes)
        """Copies of gRPC calls, to upstreams' ``grpc_url``."""

    def session(self) -> aiohttp.ClientSession:
        """The aiohttp session (https upstreams, model config reads), made on first use."""
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0, ttl_dns_cache=300),
                cookie_jar=aiohttp.DummyCookieJar(),
                auto_decompress=False,
                skip_auto_headers=SKIP_AUTO_HEADERS,
            )
        return self._session

    def _pool(self, upstream: UpstreamSettings) -> UpstreamPool:
        pool = self._pools.get(upstream.url)
        if pool is None:
            pool = UpstreamPool(
                upstream.name,
                upstream.url,
                upstream.timeout_s,
                upstream.connect_timeout_s,
                max_answer_bytes=self.max_answer_bytes,
            )
            self._pools[upstream.url] = pool
        return pool

    async def post(
        self,
        upstream: UpstreamSettings,
        target: str,
        headers: Mapping[str, str],
        body: bytes,
        timeout_s: float,
        *,
        timed: bool = False,
    ) -> Exchange | UpstreamError:
        """POST ``body`` to ``target`` (path and query) under ``timeout_s``; the answer whole.
        ``timed``: with when each piece of it came (``Exchange.timeline``: LLM streams)."""
        started = time.perf_counter()
        if upstream.url.startswith("http://"):
            pool = self._pool(upstream)
            head = [f"POST {target} HTTP/1.1\r\n".encode("latin-1")]
            head += [b"Host: ", pool.host_header, b"\r\n"]
            head.extend(_header_line(k, v) for k, v in headers.items())
            head.append(b"Content-Length: %d\r\n\r\n" % len(body))
            try:
                answer = await pool.request([b"".join(head), body], timeout_s, timed=timed)
            except UpstreamError as exc:
                return exc
            latency = time.perf_counter() - started
            answer_headers = CIMultiDict(
                (n.decode("latin-1"), v.decode("latin-1")) for n, v in answer.headers
            )
            timeline = tuple((size, at - started) for size, at in answer.timeline)
            return Exchange(
                upstream.name, answer.status, answer_headers, answer.body, latency, timeline
            )
        timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=upstream.connect_timeout_s)
        try:
            async with self.session().post(
                upstream.url + target,
                data=body,
                headers=headers,
                timeout=timeout,
                allow_redirects=False,
            ) as resp:
                reads: list[tuple[int, float]] = []
                data = await self._read_capped(resp, upstream, reads if timed else None, started)
                latency = time.perf_counter() - started
                return Exchange(
                    upstream.name,
                    resp.status,
                    CIMultiDict(resp.headers),
                    data,
                    latency,
                    tuple(reads),
                )
        except Exception as exc:
            return translate_upstream_error(exc, upstream.name, upstream.url)

    async def _read_capped(
        self,
        resp: aiohttp.ClientResponse,
        upstream: UpstreamSettings,
        timeline: list[tuple[int, float]] | None = None,
        started: float = 0.0,
    ) -> bytes:
        cap = self.max_answer_bytes
        if resp.content_length is not None and resp.content_length > cap:
            raise self._too_large(upstream)
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > cap:
                raise self._too_large(upstream)
            chunks.append(chunk)
            if timeline is not None:
                timeline.append((size, time.perf_counter() - started))
        return b"".join(chunks)

    def _too_large(self, upstream: UpstreamSettings) -> UpstreamBadResponse:
        detail = f"sent an answer larger than {self.max_answer_bytes} bytes (cut off)"
        return UpstreamBadResponse(upstream.name, upstream.url, detail)

    async def close(self) -> None:
        await self.grpc.close()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        if self._session is not None:
            await self._session.close()
            self._session = None
