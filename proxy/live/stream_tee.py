"""The aiohttp path's relay of a streamed answer (LLM calls it serves: canary splits, TLS
upstreams, ``proxy.fast_lane: false``): written to the client read by read, teed for the copy.

The fast lane's ``StreamRelay`` does the same on its own connections; here aiohttp frames the
answer (chunked, or by the upstream's length) and the reads are ``iter_any``'s.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from ..shadow.analysis import Exchange


class Tee:
    """What a relayed answer's copy keeps: its bytes up to ``cap`` and when each read came
    (seconds since ``started``, ``time.perf_counter()``); past the cap, nothing (``overflow``:
    the copy is not whole, so it cannot be compared)."""

    def __init__(self, cap: int, started: float) -> None:
        self._cap = cap
        self.started = started
        self.kept: list[bytes] = []
        self.size = 0
        self.timeline: list[tuple[int, float]] = []
        self.overflow = False

    def add(self, data: bytes) -> None:
        if self.overflow:
            return
        self.size += len(data)
        if self.size > self._cap:
            self.overflow = True
            self.kept.clear()
            self.timeline.clear()
            return
        self.kept.append(data)
        self.timeline.append((self.size, time.perf_counter() - self.started))

    def exchange(
        self, upstream: str, status: int, headers: Mapping[str, str], *, complete: bool
    ) -> Exchange | None:
        """What was kept, as the copy's reference answer (``complete``: to its end); None past
        the cap."""
        if self.overflow:
            return None
        latency = time.perf_counter() - self.started
        body = b"".join(self.kept)
        return Exchange(upstream, status, headers, body, latency, tuple(self.timeline), complete)


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
    tee = Tee(tee_cap, started)
    outcome: bool | None = None  # True: whole; False: the client left; None: the upstream failed
    try:
        async for chunk in upstream.content.iter_any():
            try:
                await response.write(chunk)
            except ConnectionResetError:
                outcome = False
                break
            if future is not None:
                tee.add(chunk)
        else:
            await response.write_eof()
            outcome = True
    except (aiohttp.ClientError, TimeoutError):
        if request.transport is not None:
            request.transport.close()  # the status is sent: only a cut can say it failed
    finally:
        if future is not None and not future.done():
            exchange = None
            if outcome is not None:
                headers = CIMultiDict(upstream.headers)
                exchange = tee.exchange(upstream_name, upstream.status, headers, complete=outcome)
            future.set_result(exchange)
    return response
