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

from tests.conftest import make_settings, wait_until
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


def _tcp_queues(local_port: int, remote_port: int) -> tuple[int, int]:
    """(bytes sent but not yet taken by the peer, bytes received but not yet read by the
    application) of the loopback TCP connection from ``local_port`` to ``remote_port``, as the
    kernel reports them (/proc/net/tcp)."""
    with open("/proc/net/tcp") as table:
        for line in table.readlines()[1:]:
            fields = line.split()
            local, remote = (int(f.split(":")[1], 16) for f in fields[1:3])
            if (local, remote) == (local_port, remote_port):
                tx, rx = (int(q, 16) for q in fields[4].split(":"))
                return tx, rx
    return 0, 0


async def test_a_client_pipelining_megabytes_ahead_gets_every_answer_in_order(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """Beyond 2 MiB of unanswered requests the fast lane stops reading the client, and reads
    again once the answers are out: nothing is lost or reordered by the pause."""
    ref = await fake()
    ref.behaviour.hold = asyncio.Event()  # the first answer waits: the pipeline backs up
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    pad = b" " * (256 * 1024)  # JSON allows trailing blanks: each request about 256 KiB
    requests = [body(i) + pad for i in range(16)]  # 4 MiB in all, twice the pipeline limit
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    client_port = writer.get_extra_info("sockname")[1]

    def unread() -> int:
        """What the client wrote that the proxy has not read: still in the client's buffer, in
        its socket, or waiting in the proxy's socket."""
        client_tx, _ = _tcp_queues(client_port, proxy.data_port)
        _, proxy_rx = _tcp_queues(proxy.data_port, client_port)
        return writer.transport.get_write_buffer_size() + client_tx + proxy_rx

    seen: list[int] = []

    def not_reading() -> bool:
        """Over a MiB unread, and none of it read since the last look (a proxy that reads
        takes it all into memory within a loop iteration or two)."""
        seen.append(unread())
        return len(seen) > 1 and seen[-1] == seen[-2] > 1024 * 1024

    try:
        writer.write(b"".join(infer(r) for r in requests))
        sent = asyncio.create_task(writer.drain())  # completes only as the proxy reads on
        await wait_until(lambda: ref.behaviour.in_flight == 1, what="the first call held")
        # About 2 MiB buffered (and one request at the reference): the proxy stops reading.
        await wait_until(not_reading, what="the proxy no longer reading the client")
        assert ref.behaviour.calls == 1
        ref.behaviour.hold.set()
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
