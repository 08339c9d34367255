"""Hostile and broken peers: what they must not be able to do to the proxy.

A client may pipeline requests and never read, send a gzip bomb, drip a head byte by byte, open
connection after connection, send heads of any size or with bare line feeds; a candidate may
answer without end. None of these may take the proxy's memory or connections, and a normal
request must still be answered. Memory is measured as the kernel sees it: the peak resident set
(VmHWM) of a real ``shadowproxy serve`` process and of its shadow processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import subprocess
import sys
import zlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from loadtest.procs import descendants, free_port, is_redis, memory_mb
from proxy.app import ProxyRunner
from proxy.errors import UpstreamBadResponse
from proxy.settings import UpstreamSettings
from proxy.shadow.analysis import Exchange
from proxy.shadow.shadow_client import ShadowClient
from tests.conftest import ADMIN_TOKEN, make_settings, repo_root, wait_http_ok, wait_until
from tests.fakes import v2_answer
from tests.proxy.test_fast_lane import body, infer, read_answer

pytestmark = pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs /proc")

MiB = 1024 * 1024
BIG = 8 * MiB
SMALL_ANSWER = (
    b'{"model_name":"m","outputs":[{"name":"o","datatype":"FP32","shape":[1],"data":[1]}]}'
)


@dataclass
class RawServer:
    """A reference or candidate on a bare socket: it never inflates what it is sent, so a bomb
    costs the process under test only. ``GET /v2/models/big`` answers 8 MiB, anything else a
    small V2 answer; ``endless`` answers with chunks until the connection is cut. It answers one
    request at a time, first come first served, whatever the connection."""

    endless: bool = False
    requests: list[str] = field(default_factory=list)
    url: str = ""
    server: asyncio.Server | None = None
    turn: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def start(self) -> RawServer:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        big = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % BIG + b"x" * BIG
        small = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        with contextlib.suppress(asyncio.IncompleteReadError, ConnectionError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                await reader.readexactly(int(length.group(1)) if length else 0)
                if self.endless:
                    writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
                    while True:
                        writer.write(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
                        await writer.drain()
                async with self.turn:
                    self.requests.append(head.split(b" ", 2)[1].decode())
                    if b" /v2/models/big " in head:
                        writer.write(big)
                    else:
                        writer.write(small % len(SMALL_ANSWER) + SMALL_ANSWER)
                    await writer.drain()
        writer.close()


@dataclass
class ServedProxy:
    proc: asyncio.subprocess.Process
    data_port: int
    admin_port: int

    def processes(self) -> list[int]:
        """The live process and its shadow processes (not the Redis it may have started)."""
        return [self.proc.pid, *(p for p in descendants(self.proc.pid) if not is_redis(p))]

    def reset_peaks(self) -> None:
        for pid in self.processes():
            Path(f"/proc/{pid}/clear_refs").write_text("5")  # VmHWM := VmRSS

    def peaks_mib(self) -> dict[int, float]:
        return {pid: m[1] for pid in self.processes() if (m := memory_mb(pid)) is not None}

    async def metrics(self) -> str:
        async with (
            aiohttp.ClientSession() as s,
            s.get(
                f"http://127.0.0.1:{self.admin_port}/metrics",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            ) as r,
        ):
            return await r.text()


@contextlib.asynccontextmanager
async def serve(tmp_path: Path, redis_url: str, **config: Any) -> AsyncIterator[ServedProxy]:
    """``shadowproxy serve`` in a process of its own, as deployed (mirror process included)."""
    data_port, admin_port = free_port(), free_port()
    path = tmp_path / "config.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "listen": {"host": "127.0.0.1", "port": data_port},
                "admin": {"host": "127.0.0.1", "port": admin_port, "token": ADMIN_TOKEN},
                "buffer": {"redis_url": redis_url},
                **config,
            }
        )
    )
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "proxy", "serve", "--config", str(path)],
        cwd=repo_root(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_http_ok(f"http://127.0.0.1:{admin_port}/healthz", proc=proc)
        yield ServedProxy(proc, data_port, admin_port)
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            except TimeoutError:
                proc.kill()
                await proc.wait()


async def post_ok(port: int, data: bytes = b'{"inputs":[]}') -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/v2/models/m/infer", data=data) as r,
    ):
        assert r.status == 200 and await r.read() == SMALL_ANSWER


def gzip_bomb(total: int) -> bytes:
    """A gzip body of about total/1000 bytes that inflates to ``total`` zero bytes (members of
    64 MiB each, back to back, as gzip allows)."""
    member = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    one = member.compress(bytes(64 * MiB)) + member.flush()
    return one * (total // (64 * MiB))


async def test_a_client_that_pipelines_and_never_reads_cannot_take_the_proxys_memory(
    tmp_path: Path, redis_url: str
) -> None:
    ref = await RawServer().start()
    async with serve(tmp_path, redis_url, reference={"name": "ref", "url": ref.url}) as proxy:
        proxy.reset_peaks()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # reads next to nothing
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", proxy.data_port))
        gets = 32  # 256 MiB of answers
        sock.send(b"GET /v2/models/big HTTP/1.1\r\nHost: p\r\n\r\n" * gets)
        await wait_until(lambda: ref.requests, what="the first GET forwarded")
        # Other clients are served meanwhile. The reference takes requests in turn, so a proxy
        # that went on forwarding the GETs would have had dozens answered by now.
        for _ in range(40):
            await post_ok(proxy.data_port)
        answered_unread = ref.requests.count("/v2/models/big")
        peak_unread = max(proxy.peaks_mib().values())
        # Now the client reads: every answer arrives, whole and in order.
        reader, writer = await asyncio.open_connection(sock=sock)
        for _ in range(gets):
            answer = await asyncio.wait_for(read_answer(reader), 30)
            assert answer.status == 200 and len(answer.body) == BIG
        writer.close()
        peaks = proxy.peaks_mib()
    assert answered_unread <= 3, f"{answered_unread} answers of 8 MiB forwarded, none read"
    assert peak_unread < 250, f"peak while unread: {peak_unread:.0f} MiB"
    assert max(peaks.values()) < 250, f"peaks (MiB) by process: {peaks}"
    ref.server.close()  # type: ignore[union-attr]


async def test_a_gzip_bomb_is_not_inflated_past_the_cap_and_the_live_request_goes_through(
    tmp_path: Path, redis_url: str
) -> None:
    ref, cand = await RawServer().start(), await RawServer().start()
    config = {
        "reference": {"name": "ref", "url": ref.url},
        "candidates": [{"name": "c", "url": cand.url}],
        # No overload shedding: reading a 2 MiB body may lag the loop, and the copy must go.
        "proxy": {"max_inflated_bytes": 32 * MiB, "shed_lag_ms": 0},
    }
    bomb = gzip_bomb(2048 * MiB)  # 2 MiB that inflate to 2 GiB
    async with serve(tmp_path, redis_url, **config) as proxy:
        proxy.reset_peaks()
        async with (
            aiohttp.ClientSession() as s,
            s.post(
                f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer",
                data=bomb,
                headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
            ) as r,
        ):
            assert r.status == 200 and await r.read() == SMALL_ANSWER  # forwarded untouched
        skipped = re.compile(
            r'shadowproxy_mirror_skipped_total\{candidate="c",reason="request_too_large"\} 1'
        )
        await wait_until(
            lambda: _matches(proxy.metrics(), skipped), timeout_s=30, what="the copy skipped"
        )
        assert cand.requests == [], "the bomb's copy reached the candidate"
        await post_ok(proxy.data_port)
        compared = re.compile(r'shadowproxy_mirror_outcomes_total\{[^}]*outcome="compared"')
        await wait_until(
            lambda: _matches(proxy.metrics(), compared), timeout_s=30, what="a normal copy"
        )
        peaks = proxy.peaks_mib()
    assert ref.requests.count("/v2/models/m/infer") == 2  # the bomb forwarded, and the other
    # The live process never inflates it; the mirror process stops at the 32 MiB cap.
    assert peaks[proxy.proc.pid] < 250, f"peaks (MiB) by process: {peaks}"
    assert max(peaks.values()) < 200, f"peaks (MiB) by process: {peaks}"
    ref.server.close()  # type: ignore[union-attr]
    cand.server.close()  # type: ignore[union-attr]


async def _matches(text: Any, pattern: re.Pattern[str]) -> bool:
    return pattern.search(await text) is not None


def hostile_settings(ref_url: str, redis_url: str, **proxy: Any) -> Any:
    limits = {"drain_timeout_s": 2, "shed_lag_ms": 0, "mirror_process": False, **proxy}
    return make_settings(ref_url, redis_url, proxy=limits)


async def closed_by_proxy(reader: asyncio.StreamReader) -> bytes:
    """Everything the proxy sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), 30)


async def test_a_slow_head_is_cut_off_and_others_are_served(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy: ProxyRunner = await proxy_factory(hostile_settings(ref.url, redis_url, head_timeout_s=1))
    drips = []
    for start in (b"POST /v2/models/m/infer HTTP/1.1\r\n", b"PUT /upload HTTP/1.1\r\n"):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
        writer.write(start)

        async def drip(writer: asyncio.StreamWriter = writer) -> None:
            with contextlib.suppress(ConnectionError):
                for i in range(10_000):  # a header line every 50 ms: never idle, never whole
                    writer.write(b"X-%d: y\r\n" % i)
                    await writer.drain()
                    await asyncio.sleep(0.05)

        drips.append((reader, asyncio.create_task(drip())))
    async with aiohttp.ClientSession() as s:
        async with s.post(
            f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer", data=body(1)
        ) as r:
            assert r.status == 200
        for reader, task in drips:
            got = await closed_by_proxy(reader)
            assert got.startswith(b"HTTP/1.1 408 "), got[:100]
            task.cancel()
    assert ref.behaviour.calls == 1


async def test_an_idle_keep_alive_connection_is_closed(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(hostile_settings(ref.url, redis_url, idle_timeout_s=0.5))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    loop = asyncio.get_running_loop()
    # Kept alive after an answer: the next request on it is answered too.
    for i in (1, 2):
        writer.write(infer(body(i)))
        answer = await asyncio.wait_for(read_answer(reader), 10)
        assert answer.status == 200 and answer.body == v2_answer(body(i), "m", 0.0)
    answered = loop.time()
    assert await closed_by_proxy(reader) == b""  # then nothing, and closed...
    # ...once it was idle: not right after the answer (0.5 s, less what a stalled host may have
    # kept this side from reading the answer at once; the sweep runs every 0.125 s).
    assert loop.time() - answered >= 0.3
    writer.close()


async def test_connections_beyond_the_cap_are_refused_until_one_closes(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(hostile_settings(ref.url, redis_url, max_connections=3))
    put = b"PUT /upload HTTP/1.1\r\nHost: p\r\nContent-Length: 3\r\n\r\nabc"
    held = []
    for request in (infer(body(1)), infer(body(2)), put):  # the last one is aiohttp's
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
        writer.write(request)
        assert (await asyncio.wait_for(read_answer(reader), 10)).status == 200
        held.append((reader, writer))
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    refused = await closed_by_proxy(reader)
    assert refused.startswith(b"HTTP/1.1 503 ") and b"too many client connections" in refused
    writer.close()

    async def served() -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
        writer.write(infer(body(3), extra="Connection: close\r\n"))
        answer = await asyncio.wait_for(read_answer(reader), 10)
        writer.close()
        return answer.status == 200

    for _, writer in held:  # each one closed makes room (aiohttp's too)
        writer.close()
    for _ in range(3):
        await wait_until(served, what="room for a new connection")


async def test_a_head_over_the_limit_is_refused_however_it_arrives(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(hostile_settings(ref.url, redis_url))
    long_head = infer(body(1), extra="X-Pad: %s\r\n" % ("a" * 100_000))
    cases = {
        "at once": [long_head],
        "in pieces, never ending": [long_head[i : i + 1000] for i in range(0, 90_000, 1000)],
        "pipelined after a body": [infer(body(2)) + long_head],
        "a byte at a time": [bytes([b]) for b in long_head[:70_000]],
    }
    for name, pieces in cases.items():
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
        with contextlib.suppress(ConnectionError):
            for piece in pieces:
                writer.write(piece)
                await writer.drain()
        got = await closed_by_proxy(reader)
        if name == "pipelined after a body":
            assert got.startswith(b"HTTP/1.1 200 "), name
            got = got[got.index(b"HTTP/1.1 ", 1) :]
        assert got.startswith(b"HTTP/1.1 431 "), (name, got[:100])
        writer.close()
    # A head of normal size, a byte at a time, is served.
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
    for b in infer(body(3)):
        writer.write(bytes([b]))
        await writer.drain()
    assert (await asyncio.wait_for(read_answer(reader), 10)).status == 200
    writer.close()
    assert ref.behaviour.calls == 2


async def test_a_bare_lf_or_cr_anywhere_in_a_head_is_answered_400(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    proxy = await proxy_factory(hostile_settings(ref.url, redis_url))
    good = infer(b"{}")
    for bad in (
        good.replace(b"Host: proxy\r\n", b"Host: proxy\n"),  # one bare LF inside
        good.replace(b"\r\n\r\n", b"\r\n\n"),  # the blank line a bare LF
        good.replace(b"\r\n\r\n", b"\n\r\n"),  # the last header line ended by a bare LF
        good.replace(b"Host: proxy\r\n", b"Host: proxy\rX: y\r\n"),  # a bare CR
        b"GET /v2/health/ready HTTP/1.1\nHost: x\n\n",
    ):
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.data_port)
        writer.write(bad)
        answer = await asyncio.wait_for(read_answer(reader), 10)
        assert answer.status == 400, bad
        writer.close()
    assert ref.behaviour.calls == 0


async def test_a_candidate_answer_past_the_cap_is_cut_off_as_a_failed_call() -> None:
    endless, small = await RawServer(endless=True).start(), await RawServer().start()
    client = ShadowClient(max_answer_bytes=1 * MiB)
    try:
        got = await client.post(UpstreamSettings(name="c", url=endless.url), "/i", {}, b"{}", 30)
        assert isinstance(got, UpstreamBadResponse), got
        assert "an answer larger than 1048576 bytes (cut off)" in str(got)
        # Under the cap, the same client reads whole answers.
        whole = await client.post(UpstreamSettings(name="c", url=small.url), "/i", {}, b"{}", 30)
        assert isinstance(whole, Exchange) and whole.body == SMALL_ANSWER
    finally:
        await client.close()
        endless.server.close()  # type: ignore[union-attr]
        small.server.close()  # type: ignore[union-attr]
