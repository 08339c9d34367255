"""The aiohttp path's relay of a streamed answer (LLM calls it serves: canary splits, TLS
upstreams, ``proxy.fast_lane: false``): written to the client read by read, teed for the copy.

The fast lane's ``StreamRelay`` does the same on its own connections; here aiohttp frames the
answer (chunked, or by the upstream's length) and the reads are ``iter_any``'s.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..shadow.analysis import Exchange


class ProxiedStreamResponse(web.StreamResponse):
    upstream_headers: frozenset[str] = frozenset()


async def relay_stream(
    request: web.Request,
    upstream: aiohttp.ClientResponse,
    response: ProxiedStreamResponse,
    started: float,
    future: asyncio.Future[Exchange | None] | None,
    upstream_name: str,
    tee_cap: int,
) -> ProxiedStreamResponse:
    """Relay ``upstream``'s body through ``response``; resolve ``future`` with what was relayed
    (incomplete if the client left; None if the upstream failed or the answer passed
    ``tee_cap``). An upstream failure after the head cuts the client's connection, as the
    upstream's own would have for a direct client."""
    if upstream.content_length is not None:
        response.content_length = upstream.content_length
    await response.prepare(request)
    kept: list[bytes] = []
    timeline: list[tuple[int, float]] = []
    size = 0
    overflow = False
    outcome: bool | None = None  # True: whole; False: the client left; None: the upstream failed
    try:
        async for chunk in upstream.content.iter_any():
            try:
                await response.write(chunk)
            except ConnectionResetError:
                outcome = False
                break
            if future is not None and not overflow:
                size += len(chunk)
                overflow = size > tee_cap
                kept.append(chunk)
                timeline.append((size, time.perf_counter() - started))
        else:
            await response.write_eof()
            outcome = True
    except (aiohttp.ClientError, TimeoutError):
        if request.transport is not None:
            request.transport.close()  # the status is sent: only a cut can say it failed
    finally:
        if future is not None and not future.done():
            exchange = None
            if outcome is not None and not overflow:
                latency = time.perf_counter() - started
                headers = CIMultiDict(upstream.headers)
                body = b"".join(kept)
                exchange = Exchange(
                    upstream_name, upstream.status, headers, body, latency, tuple(timeline), outcome
                )
            future.set_result(exchange)
    return response
