"""The fast lane: plain infer requests on a bare protocol, the rest handed to aiohttp.

These speak raw HTTP/1.1 to the proxy, so pipelining, framing and hand-over are what a client
on the wire would see. Upstreams are real servers on loopback (``tests.fakes``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest

from proxy.app import ProxyRunner
from tests.conftest import ADMIN_TOKEN, make_settings, wait_until
from tests.fakes import start_raw_upstream, v2_answer
from tests.proxy.test_workers import tcp_peers


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


def infer(body: bytes, model: str = "m", extra: str = "") -> bytes:
    return (
        f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: proxy\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    ).encode() + body


def body(i: int) -> bytes:
    return f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{i}]}}]}}'.encode()


async def read_answer(reader: asyncio.StreamReader) -> Answer:
    head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    size = int(headers.get("content-length", "0"))
    return Answer(int(lines[0].split()[1]), headers, await reader.readexactly(size))


async def infer_answers_counted(proxy: ProxyRunner) -> int:
    """Live infer requests the proxy counted as answered 2xx, as its /metrics reports them."""
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"http://127.0.0.1:{proxy.admin_port}/metrics",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r,
    ):
        assert r.status == 200
        text = await r.text()
    found = re.search(r'shadowproxy_requests_total\{route="infer",status_class="2xx"\} (\S+)', text)
    return int(float(found.group(1))) if found else 0


async def test_pipelined_requests_answer_in_order_across_the_hand_over_to_aiohttp(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    c = {"name": "c", "url": cand.url}
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=[c]))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    health = b"GET /v2/health/ready HTTP/1.1\r\nHost: proxy\r\n\r\n"
    put = b"PUT /upload HTTP/1.1\r\nHost: proxy\r\nContent-Length: 3\r\n\r\nabc"
    # Fast ones (infer calls, a read), one the fast lane does not take (a PUT), then an infer
    # again (by aiohttp now): all in one write.
    writer.write(infer(body(1)) + health + infer(body(2)) + put + infer(body(3)))
    answers = [await asyncio.wait_for(read_answer(reader), 10) for _ in range(5)]
    writer.close()
    assert [a.status for a in answers] == [200, 200, 200, 200, 200]
    for answer, i in zip([answers[0], answers[2], answers[4]], (1, 2, 3), strict=True):
        assert answer.body == v2_answer(body(i), "m", 0.0)
    assert answers[1].body == b""
    assert answers[3].body == b'{"received": 3}'
    assert await proxy.drained(10)
    # All three infer calls were mirrored, on either side of the hand-over.
    assert proxy.telemetry.tally[("c", "compared")] == 3
    assert ref.behaviour.calls == 3


async def test_what_the_fast_lane_does_not_take_still_works(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    async with aiohttp.ClientSession() as s:
        # Unsized (chunked) body, then HTTP/1.0, then a malformed head.
        async def chunks() -> Any:
            yield body(7)

        async with s.post(url, data=chunks()) as r:
            assert r.status == 200
            assert await r.read() == v2_answer(body(7), "m", 0.0)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    writer.write(infer(body(8)).replace(b"HTTP/1.1", b"HTTP/1.0"))
    answer = await asyncio.wait_for(read_answer(reader), 10)
    assert answer.status == 200 and answer.body == v2_answer(body(8), "m", 0.0)
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    writer.write(
        b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab"
    )
    answer = await asyncio.wait_for(read_answer(reader), 10)
    assert answer.status == 400  # aiohttp's strict parser refuses a doubled length
    writer.close()
    # Lines ended by bare LFs: not left waiting for a CRLF CRLF that never comes.
    for request in (
        b"GET /v2/health/ready HTTP/1.1\nHost: x\n\n",
        infer(b"{}").replace(b"\r", b""),
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
        writer.write(request)
        answer = await asyncio.wait_for(read_answer(reader), 10)
        assert answer.status == 400 and b"Expected CRLF" in answer.body  # aiohttp's own answer
        writer.close()


async def test_upstream_connections_are_reused_and_a_closed_one_is_not(
    proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    raw = await start_raw_upstream(
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
        idle_close_s=0.3,
    )
    raw_port = int(raw.url.rsplit(":", 1)[1])
    proxy = await proxy_factory(make_settings(raw.url, redis_url))
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"

    def to_upstream() -> int:
        """This process's (the proxy's) connections to the upstream."""
        return sum(remote == raw_port for _, remote in tcp_peers(os.getpid()))

    async with aiohttp.ClientSession() as s:
        for _ in range(5):
            async with s.post(url, data=body(1)) as r:
                assert r.status == 200 and await r.read() == b"{}"
        assert raw.connections == 1 and to_upstream() == 1  # one pooled connection for five
        # The upstream closes it as idle, and the proxy lets go of it.
        await wait_until(lambda: to_upstream() == 0, what="the idle connection closed")
        async with s.post(url, data=body(1)) as r:
            assert r.status == 200 and await r.read() == b"{}"  # not a 502 from the dead one
    assert raw.connections == 2
    raw.server.close()


async def test_upstream_framings_reach_the_client_as_a_sized_answer(
    proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    framings = {
        "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Model: a\r\n\r\n"
        b'3\r\n{"a\r\n5\r\n":1}\n\r\n0\r\n\r\n',
        "until close": b'HTTP/1.1 200 OK\r\nX-Model: a\r\n\r\n{"a":1}\n',
        "interim 100 first": b"HTTP/1.1 100 Continue\r\n\r\n"
        b'HTTP/1.1 200 OK\r\nX-Model: a\r\nContent-Length: 8\r\n\r\n{"a":1}\n',
        "hop-by-hop named in Connection": b"HTTP/1.1 200 OK\r\nConnection: X-Secret\r\n"
        b'X-Secret: 1\r\nX-Model: a\r\nContent-Length: 8\r\n\r\n{"a":1}\n',
    }
    for name, answer in framings.items():
        raw = await start_raw_upstream(answer)
        proxy = await proxy_factory(make_settings(raw.url, redis_url))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
        writer.write(infer(body(1)) + infer(body(2)))
        for _ in range(2):
            got = await asyncio.wait_for(read_answer(reader), 10)
            assert (got.status, got.body, got.headers["x-model"]) == (200, b'{"a":1}\n', "a"), name
            assert "transfer-encoding" not in got.headers and "x-secret" not in got.headers, name
        writer.close()
        raw.server.close()


async def test_garbage_from_the_reference_is_a_502_and_close_is_honoured(
    proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    raw = await start_raw_upstream(b"SPDY/9 banana\r\n\r\n")
    proxy = await proxy_factory(make_settings(raw.url, redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    writer.write(infer(body(1), extra="Connection: close\r\n"))
    got = await asyncio.wait_for(read_answer(reader), 10)
    assert got.status == 502 and b"upstream 'ref'" in got.body and b"malformed" in got.body
    assert got.headers["connection"] == "close"
    assert await asyncio.wait_for(reader.read(), 10) == b""  # and the proxy closed it
    raw.server.close()


async def test_a_client_gone_before_its_answer_leaves_the_proxy_serving(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ref = await fake(mode="slow", delay_s=0.3)
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    writer.write(infer(body(1)))
    await writer.drain()
    writer.close()  # gone before the reference answers
    # The abandoned request runs to its end and is counted like any other; a crash inside the
    # proxy would be logged and swallowed (the client is gone), so both are checked.
    await wait_until(
        lambda: infer_answers_counted(proxy), what="the abandoned request counted as answered"
    )
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    writer.write(infer(body(2)))
    got = await asyncio.wait_for(read_answer(reader), 10)
    assert got.status == 200 and got.body == v2_answer(body(2), "m", 0.0)
    assert re.fullmatch(r"\d+", got.headers["content-length"])
    writer.close()
    assert await infer_answers_counted(proxy) == 2
    assert ref.behaviour.calls == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_multi_mib_body_arriving_in_pieces_is_forwarded_whole_and_mirrored(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}])
    )
    big = body(5) + b" " * (4 * 1024 * 1024)  # JSON with 4 MiB of trailing whitespace
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    data = infer(big) + infer(body(6))
    for i in range(0, len(data), 100_000):  # in pieces, as a slow client sends it
        writer.write(data[i : i + 100_000])
        await writer.drain()
    first, second = [await asyncio.wait_for(read_answer(reader), 10) for _ in range(2)]
    writer.close()
    assert first.body == v2_answer(big, "m", 0.0) and second.body == v2_answer(body(6), "m", 0.0)
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("c", "compared")] == 2


async def test_a_reference_that_sends_more_than_its_answer_gets_a_fresh_connection(
    proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    one = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
    raw = await start_raw_upstream(one + b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nextra")
    proxy = await proxy_factory(make_settings(raw.url, redis_url))
    url = f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer"
    async with aiohttp.ClientSession() as s:
        for _ in range(2):
            async with s.post(url, data=body(1)) as r:
                assert r.status == 200 and await r.read() == b"{}"  # never the stray "extra"
    assert raw.connections == 2  # the out-of-step connection was not reused
    raw.server.close()


@pytest.mark.parametrize(
    "answer",
    [
        # The start of a second status line after the answer, in the same write.
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}HTTP/1.1 2",
        # The upstream says it closes (and, broken, does not): the proxy must not reuse it.
        b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}",
        # HTTP/1.0 without keep-alive.
        b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}",
        # An interim answer, then one with stray bytes behind it.
        b"HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2"
        b"\r\n\r\n{}xyz",
    ],
    ids=["partial status line after", "connection close", "http/1.0", "1xx then stray bytes"],
)
async def test_an_upstream_connection_off_a_clean_message_boundary_is_never_reused(
    answer: bytes, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    raw = await start_raw_upstream(answer)
    proxy = await proxy_factory(make_settings(raw.url, redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    for i in range(3):
        writer.write(infer(body(i)))
        got = await asyncio.wait_for(read_answer(reader), 10)
        assert (got.status, got.body) == (200, b"{}")  # never a 502 from a misread answer
    writer.close()
    assert raw.connections == 3  # each call on a connection of its own
    raw.server.close()


async def test_a_header_that_is_not_ascii_reaches_the_candidate_byte_for_byte(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}])
    )
    value = b"\xc3\xa9 \xff"  # UTF-8, then a byte that is not
    header = b"Host: proxy\r\nX-Name: " + value + b"\r\n"
    for request in (infer(body(1)), infer(body(2)).replace(b"HTTP/1.1", b"HTTP/1.0")):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
        writer.write(request.replace(b"Host: proxy\r\n", header))
        assert (await asyncio.wait_for(read_answer(reader), 10)).status == 200
        writer.close()
    assert await proxy.drained(10)
    # The fast lane's copy and aiohttp's (HTTP/1.0 goes there) both arrived, and compared.
    assert proxy.telemetry.tally[("c", "compared")] == 2
    sent = [h["X-Name"].encode("utf-8", "surrogateescape") for h in cand.behaviour.seen_headers]
    assert sent == [value, value]


async def test_an_absolute_form_target_is_forwarded_as_its_path(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    # RFC 9112 3.2.2: a server accepts the absolute form (aiohttp serves it: not the fast lane).
    writer.write(b"GET http://elsewhere/v2/health/ready HTTP/1.1\r\nHost: elsewhere\r\n\r\n")
    assert (await asyncio.wait_for(read_answer(reader), 10)).status == 200  # not a 502
    writer.close()
