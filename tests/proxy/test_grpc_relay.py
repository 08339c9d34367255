"""The gRPC relay (the default gRPC listener) where a frame relay can go wrong and ``grpc.aio``
cannot: frames of its own on a shared connection, an upstream connection that drops, copies of
compressed messages. The behaviour both listeners share is in ``test_grpc_live.py``."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import grpc.aio
import pytest

from proxy.live.grpc_relay import GrpcRelay
from proxy.live.grpc_server import GrpcExchange
from proxy.live.h2_frames import CONTINUATION, DATA, HEADERS, PREFACE, SETTINGS, frame
from tests.conftest import wait_until
from tests.proxy import test_grpc_live as live
from tests.proxy.test_grpc_live import MODEL_INFER, FakeUpstream, _call, _settings

# The fake upstreams, and both listeners, as test_grpc_live.py has them.
fake_grpc = live.fake_grpc
relay = live.relay


async def _tcp_forwarder(
    port: int, *, after_client_speaks: bool = False
) -> tuple[asyncio.Server, int, list[asyncio.StreamWriter]]:
    """A TCP forwarder to 127.0.0.1:``port``: (server, its port, both ends of each connection,
    to cut them). ``after_client_speaks``: connect upstream only once the client sent bytes,
    so nothing goes down before the client's preface (as NGINX behaves)."""
    ends: list[asyncio.StreamWriter] = []

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        while data := await src.read(65536):
            dst.write(data)
        dst.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        first = await reader.read(65536) if after_client_speaks else b""
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        ends.extend((writer, up_writer))
        up_writer.write(first)
        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    server = await asyncio.start_server(forward, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1], ends


async def test_a_call_the_relay_ends_leaves_the_connection_in_use(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
) -> None:
    """A call past the reference's ``timeout_s`` ends with the relay's own status, after the
    answer headers the upstream already sent, and the client's connection (its HPACK tables,
    its flow-control windows) goes on serving the calls after it."""
    fake: FakeUpstream

    async def slow_then_echo(request: bytes, context: Any) -> bytes:
        if request == b"slow":
            await context.send_initial_metadata((("x-early", "1"),))
            try:
                await asyncio.sleep(30)
            finally:
                fake.cancelled.set()
        return request[::-1] * 20_000

    fake = await fake_grpc(slow_then_echo)
    settings = _settings(f"127.0.0.1:{fake.port}", redis_url, timeout_s=0.3)
    proxy = await proxy_factory(settings)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
        multi: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
        call = multi(b"slow", timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert (err.value.details() or "").startswith(
            f"upstream 'fp32' at 127.0.0.1:{fake.port}: timed out waiting for an answer (0.3 s)"
        )
        assert tuple(await call.initial_metadata()) == (("x-early", "1"),)
        await wait_until(fake.cancelled.is_set, what="the upstream's call was cancelled")
        # 80 KB answers: more than the connection's first flow-control window, several times.
        for i in range(8):
            request = b"%04d" % i
            assert await multi(request, timeout=5) == request[::-1] * 20_000


async def test_an_upstream_connection_that_drops_ends_its_calls_naming_it(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    relay: bool,
) -> None:
    fake: FakeUpstream

    async def hangs(request: bytes, context: Any) -> bytes:
        fake.seen.append({})
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    fake = await fake_grpc(hangs)
    # A TCP forwarder in front of the upstream, so its connection can be cut mid-call.
    forwarder, port, cut = await _tcp_forwarder(fake.port)
    try:
        proxy = await proxy_factory(_settings(f"127.0.0.1:{port}", redis_url, relay=relay))
        pending = asyncio.create_task(_call(proxy.grpc_port, MODEL_INFER, b"req", deadline_s=30))
        await wait_until(lambda: fake.seen, what="the call reached the upstream")
        for writer in cut:
            writer.transport.abort()
        out = await pending
    finally:
        forwarder.close()
    assert out.code == grpc.StatusCode.UNAVAILABLE
    assert out.details.startswith(f"upstream 'fp32' at 127.0.0.1:{port}: "), out.details


async def test_compressed_messages_are_copied_inflated(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]], redis_url: str
) -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        context.set_compression(grpc.Compression.Gzip)
        return request + b"!"

    fake = await fake_grpc(echo)
    seen: list[GrpcExchange] = []
    listener = GrpcRelay(
        _settings(f"127.0.0.1:{fake.port}", redis_url).reference,
        handover_port=9,
        max_bytes=1024 * 1024,
        on_infer=seen.append,
    )
    port = await listener.start("127.0.0.1", 0)
    try:
        body = b"tensor bytes " * 1000
        out = await _call(port, MODEL_INFER, body, compression=grpc.Compression.Gzip)
    finally:
        await listener.stop(1)
    assert out.code == grpc.StatusCode.OK and out.response == body + b"!"
    assert [(e.request, e.response) for e in seen] == [(body, body + b"!")]


async def test_an_upstream_that_waits_for_the_client_preface_is_relayed(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
) -> None:
    """NGINX says nothing until the client's preface: what the client sends meanwhile goes up
    at once, and is read for the calls it opens without being sent twice."""

    agents: list[str] = []

    async def echo(request: bytes, context: Any) -> bytes:
        agents.append(dict(context.invocation_metadata())["user-agent"])
        return request[::-1]

    fake = await fake_grpc(echo)
    silent, port, ends = await _tcp_forwarder(fake.port, after_client_speaks=True)
    try:
        proxy = await proxy_factory(_settings(f"127.0.0.1:{port}", redis_url))
        options = [("grpc.primary_user_agent", "client-ua/1")]
        target = f"127.0.0.1:{proxy.grpc_port}"
        async with grpc.aio.insecure_channel(target, options=options) as channel:
            multi: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
            bodies = [bytes(range(256)) * 400 + b"%d" % i for i in range(3)]
            answers = await asyncio.gather(*(multi(body, timeout=10) for body in bodies))
    finally:
        silent.close()
    assert answers == [body[::-1] for body in bodies]
    assert ends  # the connection went through the forwarder
    # Relayed, not handed over to grpc.aio (whose channel would say its own user-agent).
    assert len(agents) == 3 and all(agent.startswith("client-ua/1") for agent in agents)


async def test_connections_past_max_connections_are_closed(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]], redis_url: str
) -> None:
    """Each relayed client holds a connection to the reference: their number is capped."""

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    fake = await fake_grpc(echo)
    listener = GrpcRelay(
        _settings(f"127.0.0.1:{fake.port}", redis_url).reference,
        handover_port=9,
        max_bytes=1024,
        max_connections=1,
    )
    port = await listener.start("127.0.0.1", 0)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as held:
            first: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = held.unary_unary(MODEL_INFER)
            assert await first(b"one", timeout=5) == b"one"
            refused = await _call(port, MODEL_INFER, b"two", deadline_s=2)
            assert refused.code == grpc.StatusCode.UNAVAILABLE
            assert await first(b"three", timeout=5) == b"three"
        # The held connection gone, a new client gets in.
        await wait_until(lambda: not listener.connections, what="the first connection closed")
        assert (await _call(port, MODEL_INFER, b"four")).response == b"four"
    finally:
        await listener.stop(1)


@pytest.mark.parametrize("attack", ["oversized_frame", "continuation_flood"])
async def test_a_client_cannot_make_the_relay_hold_unbounded_bytes(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    redis_url: str,
    attack: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Frames cross whole, so the relay holds a partial frame, and a header block until its
    last frame: past what the peer agreed to (a frame) or 1 MiB (a block), it closes the
    connection instead of holding more."""

    async def echo(request: bytes, context: Any) -> bytes:
        return request

    fake = await fake_grpc(echo)
    listener = GrpcRelay(
        _settings(f"127.0.0.1:{fake.port}", redis_url).reference, handover_port=9, max_bytes=1024
    )
    port = await listener.start("127.0.0.1", 0)
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(PREFACE + frame(SETTINGS, 0, 0))
        # The upstream's SETTINGS came through: the relay has the connection (not on probation).
        assert (await reader.readexactly(9))[3] == SETTINGS
        if attack == "oversized_frame":
            # A DATA frame declared at 16 MB (over what the upstream agreed to), sent in part.
            head = (16_000_000).to_bytes(3, "big") + bytes([DATA, 0]) + (1).to_bytes(4, "big")
            writer.write(head + b"x" * 100)
        else:
            block = b"\x00\x05x-pad\x7f\x81\x7f" + b"a" * 16_000  # not END_HEADERS
            writer.write(frame(HEADERS, 0, 1, block[:16_000]))
            for _ in range(80):  # 80 x 16 KB of CONTINUATION, none of them the last
                writer.write(frame(CONTINUATION, 0, 1, b"a" * 16_000))
        await writer.drain()
        closed = False
        async with asyncio.timeout(10):
            try:
                while await reader.read(65536):
                    pass  # the upstream's SETTINGS, then nothing
            except ConnectionResetError:
                pass  # the relay aborts the connection
            closed = True
        writer.close()
    finally:
        await listener.stop(1)
    assert closed
    # Closed by the relay, for that reason (not by the upstream).
    why = "a frame of 16000000 bytes" if attack == "oversized_frame" else "a header block over"
    assert why in caplog.text
