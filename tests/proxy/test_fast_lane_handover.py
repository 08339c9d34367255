"""The fast lane hands a connection to aiohttp for what it does not take, keeps order when a
client pipelines far ahead, and answers a client that half-closes.

Raw HTTP/1.1 on the wire, as a client would speak it; a real fake reference and candidate.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.fakes import v2_answer
from tests.proxy.test_fast_lane import body, infer, read_answer

# One request of each kind the fast lane leaves to aiohttp, and the answer it must get.
HANDED_OVER = {
    "expect": (
        infer(body(1), extra="Expect: 100-continue\r\n"),
        [100, 200],
        v2_answer(body(1), "m", 0.0),
    ),
    "chunked": (
        b"POST /v2/models/m/infer HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
        + f"{len(body(1)):x}\r\n".encode()
        + body(1)
        + b"\r\n0\r\n\r\n",
        [200],
        v2_answer(body(1), "m", 0.0),
    ),
    "upgrade": (
        infer(body(1), extra="Connection: Upgrade\r\nUpgrade: websocket\r\n"),
        [200],
        v2_answer(body(1), "m", 0.0),
    ),
    "get_with_body": (
        b"GET /v2/health/ready HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nabc",
        [200],
        b"",
    ),
}


@pytest.mark.parametrize("kind", list(HANDED_OVER))
async def test_a_request_the_fast_lane_leaves_to_aiohttp_is_answered_and_so_is_the_next(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str, kind: str
) -> None:
    ref, cand = await fake(), await fake()
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}])
    )
    request, statuses, expected = HANDED_OVER[kind]
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    try:
        # The odd request and a plain infer call behind it, in one write: the hand-over takes
        # the bytes the fast lane has not served.
        writer.write(request + infer(body(2)))
        answers = [await asyncio.wait_for(read_answer(reader), 10) for _ in statuses]
        assert [a.status for a in answers] == statuses
        assert answers[-1].body == expected
        after = await asyncio.wait_for(read_answer(reader), 10)
        assert after.status == 200 and after.body == v2_answer(body(2), "m", 0.0)
    finally:
        writer.close()
    assert await proxy.drained(10)
    infers = 2 if kind != "get_with_body" else 1
    assert ref.behaviour.calls == infers
    assert proxy.telemetry.tally[("c", "compared")] == infers  # mirrored on both sides of it


async def test_a_client_pipelining_megabytes_ahead_gets_every_answer_in_order(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """Beyond 2 MiB of unanswered requests the fast lane stops reading the client, and reads
    again once the answers are out: nothing is lost or reordered by the pause."""
    ref = await fake()
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    pad = b" " * (256 * 1024)  # JSON allows trailing blanks: each request about 256 KiB
    requests = [body(i) + pad for i in range(16)]  # 4 MiB in all, twice the pipeline limit
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    try:
        writer.write(b"".join(infer(r) for r in requests))
        sent = asyncio.create_task(writer.drain())  # completes only as the proxy reads on
        answers = [await asyncio.wait_for(read_answer(reader), 20) for _ in requests]
        await asyncio.wait_for(sent, 10)
    finally:
        writer.close()
    assert [a.body for a in answers] == [v2_answer(r, "m", 0.0) for r in requests]
    assert ref.behaviour.calls == len(requests)


async def _half_closed_exchange(
    proxy: Any,
) -> tuple[list[bytes], asyncio.StreamReader, asyncio.StreamWriter]:
    """Two pipelined requests, then the client's FIN before any answer: the answers' bodies,
    and the connection (its reader for what follows them)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    writer.write(infer(body(3)) + infer(body(4)))
    await writer.drain()
    writer.get_extra_info("socket").shutdown(socket.SHUT_WR)  # "I have sent everything"
    answers = [(await asyncio.wait_for(read_answer(reader), 10)).body for _ in range(2)]
    return answers, reader, writer


async def test_a_client_that_half_closes_after_its_request_still_gets_the_answer(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake(delay_s=0.05)  # the answers come after the client's FIN
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    answers, _, writer = await _half_closed_exchange(proxy)
    writer.close()
    assert answers == [v2_answer(body(3), "m", 0.0), v2_answer(body(4), "m", 0.0)]


async def test_a_half_closed_connection_is_closed_once_its_answers_are_out(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake(delay_s=0.05)
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    _, reader, writer = await _half_closed_exchange(proxy)
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    finally:
        writer.close()
