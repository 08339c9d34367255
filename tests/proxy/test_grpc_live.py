"""The gRPC live path: pass-through to the real Triton server, and faults staged by tiny fake
``grpc.aio`` upstreams (slow, echoing, refusing) where Triton cannot stage them."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
import numpy as np
import pytest
import tritonclient.grpc.aio as aiogrpc
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2
from tritonclient.utils import InferenceServerException

from tests.conftest import make_settings, wait_until

MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
MiB = 1024 * 1024
Handler = Callable[[bytes, grpc.aio.ServicerContext[bytes, bytes]], Awaitable[bytes]]


def _settings(
    grpc_url: str, redis_url: str, drain_s: float = 2, relay: bool = True, **reference: Any
) -> Any:
    ref = {"name": "fp32", "url": "http://127.0.0.1:9", "grpc_url": grpc_url, "timeout_s": 10}
    return make_settings(
        ref["url"],
        redis_url,
        listen={"host": "127.0.0.1", "port": 0, "grpc_port": 0},
        reference={**ref, **reference},
        proxy={
            "drain_timeout_s": drain_s,
            "shed_lag_ms": 0,
            "mirror_process": False,
            "grpc_relay": relay,
        },
    )


# Both gRPC listeners: the frame relay (the default) and grpc.aio (canary, grpcs reference).
@pytest.fixture(params=[True, False], ids=["relay", "grpc_aio"])
def relay(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


def _infer_request(model: str, rows: int, *, cols: int = 8, request_id: str = "g-1") -> bytes:
    """A ``ModelInferRequest`` for ``x`` FP32 [rows, cols] carrying rows x 8 values."""
    req = service_pb2.ModelInferRequest(model_name=model, id=request_id)
    x = req.inputs.add(name="x", datatype="FP32")
    x.shape.extend([rows, cols])
    req.raw_input_contents.append(np.arange(rows * 8, dtype=np.float32).tobytes())
    return req.SerializeToString()


@dataclass
class Outcome:
    """Everything a client can observe of a unary call."""

    code: grpc.StatusCode
    details: str
    response: bytes | None
    initial: tuple[tuple[str, str | bytes], ...]
    trailing: tuple[tuple[str, str | bytes], ...]


async def _call(
    port: int, method: str, request: bytes, *, deadline_s: float | None = 10, **kw: Any
) -> Outcome:
    """One raw-bytes unary call, as an untouched client would make it."""
    options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
    options += kw.pop("options", [])
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
        multi: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(method)
        call = multi(request, timeout=deadline_s, **kw)
        try:
            response: bytes | None = await call
        except grpc.aio.AioRpcError:
            response = None
        return Outcome(
            await call.code(),
            await call.details() or "",
            response,
            tuple(await call.initial_metadata() or ()),
            tuple(await call.trailing_metadata() or ()),
        )


# ---------------------------------------------------------------------------------------------
# Against the real Triton server


@pytest.fixture
async def triton_proxy(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str
) -> AsyncIterator[Any]:
    yield await proxy_factory(_settings(f"127.0.0.1:{triton_server.grpc_port}", redis_url))


@pytest.mark.triton
async def test_model_infer_answer_is_byte_identical_to_direct(
    triton_server: Any, triton_proxy: Any
) -> None:
    request = _infer_request("light_ref", 3)
    direct = await _call(triton_server.grpc_port, MODEL_INFER, request)
    proxied = await _call(triton_proxy.grpc_port, MODEL_INFER, request)
    assert direct.code == grpc.StatusCode.OK and direct.response
    # Raw bytes, not re-serialized messages: whatever Triton sent reaches the client as is.
    assert proxied == direct
    # And a real client gets the same decoded answer.
    x = InferInput("x", [3, 8], "FP32")
    x.set_data_from_numpy(np.arange(24, dtype=np.float32).reshape(3, 8))
    outputs = [InferRequestedOutput("scores")]
    results = []
    for port in (triton_server.grpc_port, triton_proxy.grpc_port):
        client = aiogrpc.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            results.append(await client.infer("light_ref", [x], outputs=outputs, request_id="tc-1"))
        finally:
            await client.close()
    via_direct, via_proxy = (r.get_response() for r in results)
    assert via_proxy.SerializeToString() == via_direct.SerializeToString()
    assert (via_proxy.model_name, via_proxy.id) == ("light_ref", "tc-1")
    assert np.array_equal(results[0].as_numpy("scores"), results[1].as_numpy("scores"))


@pytest.mark.triton
@pytest.mark.parametrize(
    "request_bytes",
    [
        _infer_request("no_such_model", 2),
        _infer_request("light_ref", 65),  # the model refuses more than 64 rows
        # A shape that does not match the data sent.
        _infer_request("light_ref", 2, cols=7),
    ],
    ids=["unknown-model", "too-many-rows", "bad-shape"],
)
async def test_triton_errors_pass_through_unchanged(
    triton_server: Any, triton_proxy: Any, request_bytes: bytes
) -> None:
    direct = await _call(triton_server.grpc_port, MODEL_INFER, request_bytes)
    proxied = await _call(triton_proxy.grpc_port, MODEL_INFER, request_bytes)
    assert direct.code != grpc.StatusCode.OK and direct.details
    assert proxied == direct  # code, details, metadata: Triton's own, not the proxy's


@pytest.mark.triton
async def test_triton_metadata_and_health_methods_pass_through(
    triton_server: Any, triton_proxy: Any
) -> None:
    for method, request in [
        ("/inference.GRPCInferenceService/ServerReady", b""),
        ("/inference.GRPCInferenceService/ModelMetadata", b"\n\tlight_ref"),
        ("/inference.GRPCInferenceService/ModelConfig", b"\n\tlight_ref"),
    ]:
        direct = await _call(triton_server.grpc_port, method, request)
        assert direct.code == grpc.StatusCode.OK, method
        assert await _call(triton_proxy.grpc_port, method, request) == direct, method


@pytest.mark.triton
async def test_streaming_infer_through_the_proxy(triton_server: Any, triton_proxy: Any) -> None:
    x = InferInput("x", [2, 8], "FP32")
    x.set_data_from_numpy(np.ones((2, 8), dtype=np.float32))

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for k in range(3):
            yield {"model_name": "light_ref", "inputs": [x], "request_id": f"s-{k}"}
        # A bad one in the middle of a stream comes back as the stream's error message.
        yield {"model_name": "no_such_model", "inputs": [x], "request_id": "s-bad"}

    answers: dict[int, list[tuple[Any, Any]]] = {}
    for port in (triton_server.grpc_port, triton_proxy.grpc_port):
        client = aiogrpc.InferenceServerClient(f"127.0.0.1:{port}")
        try:
            answers[port] = [
                (r.get_response().SerializeToString() if r else None, str(e) if e else None)
                async for r, e in client.stream_infer(requests(), stream_timeout=30)
            ]
        finally:
            await client.close()
    direct, proxied = answers[triton_server.grpc_port], answers[triton_proxy.grpc_port]
    assert len(direct) == 4 and all(r is not None for r, _ in direct[:3])
    assert direct[3][1] is not None and "no_such_model" in direct[3][1]
    assert proxied == direct


@pytest.mark.triton
async def test_message_over_4_mib_reaches_triton(triton_server: Any, triton_proxy: Any) -> None:
    # 6 MiB of rows: far more than gRPC's default 4 MiB. Triton itself refuses that many rows,
    # with its own message: the request got there whole (not RESOURCE_EXHAUSTED at the proxy).
    request = _infer_request("light_ref", 6 * MiB // 32)
    assert len(request) > 6 * MiB
    direct = await _call(triton_server.grpc_port, MODEL_INFER, request)
    proxied = await _call(triton_proxy.grpc_port, MODEL_INFER, request)
    assert "must hold 1..64 rows" in direct.details
    assert proxied == direct


# ---------------------------------------------------------------------------------------------
# Against fake upstreams (faults Triton cannot stage)


@dataclass
class FakeUpstream:
    port: int
    seen: list[dict[str, Any]] = field(default_factory=list)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)


@pytest.fixture
async def fake_grpc() -> AsyncIterator[Callable[..., Awaitable[FakeUpstream]]]:
    """Start a fake gRPC upstream that answers every method with ``handler`` (raw bytes);
    ``tls``: server credentials to listen with instead of plaintext."""
    servers: list[grpc.aio.Server] = []

    async def start(handler: Handler, tls: grpc.ServerCredentials | None = None) -> FakeUpstream:
        class Route(grpc.GenericRpcHandler):
            def service(
                self, details: grpc.HandlerCallDetails
            ) -> grpc.RpcMethodHandler[bytes, bytes]:
                return grpc.unary_unary_rpc_method_handler(handler)

        options = [("grpc.max_send_message_length", -1), ("grpc.max_receive_message_length", -1)]
        server = grpc.aio.server(options=options)
        server.add_generic_rpc_handlers((Route(),))
        if tls is None:
            port = server.add_insecure_port("127.0.0.1:0")
        else:
            port = server.add_secure_port("127.0.0.1:0", tls)
        await server.start()
        servers.append(server)
        return FakeUpstream(port)

    yield start
    for server in servers:
        await server.stop(None)


async def test_client_deadline_becomes_the_upstream_timeout(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    relay: bool,
) -> None:
    fake: FakeUpstream

    async def never_answers(request: bytes, context: Any) -> bytes:
        fake.seen.append({"time_remaining": context.time_remaining()})
        try:
            await asyncio.Event().wait()
        finally:
            fake.cancelled.set()
        raise AssertionError("unreachable")

    fake = await fake_grpc(never_answers)
    proxy = await proxy_factory(_settings(f"127.0.0.1:{fake.port}", redis_url, relay=relay))
    out = await _call(proxy.grpc_port, MODEL_INFER, b"req", deadline_s=0.5)
    assert out.code == grpc.StatusCode.DEADLINE_EXCEEDED
    # The upstream was given what was left of the client's 0.5 s, not the reference's 10 s
    # (a hair over 0.5 can arrive: grpc-timeout travels rounded up to its unit)...
    assert 0 < fake.seen[0]["time_remaining"] <= 0.6
    # ... and its call ended with the deadline.
    await wait_until(fake.cancelled.is_set, what="the upstream call was cancelled")


async def test_reference_timeout_names_the_upstream(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    relay: bool,
) -> None:
    async def never_answers(request: bytes, context: Any) -> bytes:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    fake = await fake_grpc(never_answers)
    settings = _settings(f"127.0.0.1:{fake.port}", redis_url, timeout_s=0.3, relay=relay)
    proxy = await proxy_factory(settings)
    out = await _call(proxy.grpc_port, MODEL_INFER, b"req", deadline_s=30)
    assert out.code == grpc.StatusCode.DEADLINE_EXCEEDED
    assert out.details.startswith(f"upstream 'fp32' at 127.0.0.1:{fake.port}: timed out")


async def test_unreachable_reference_is_unavailable_naming_it(
    proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = await proxy_factory(_settings(f"127.0.0.1:{port}", redis_url))
    out = await _call(proxy.grpc_port, MODEL_INFER, b"req")
    assert out.code == grpc.StatusCode.UNAVAILABLE
    assert out.details.startswith(f"upstream 'fp32' at 127.0.0.1:{port}: cannot connect")
    # And through tritonclient, as a user would see it.
    client = aiogrpc.InferenceServerClient(f"127.0.0.1:{proxy.grpc_port}")
    try:
        with pytest.raises(InferenceServerException) as err:
            await client.is_server_ready()
    finally:
        await client.close()
    assert err.value.status() == "StatusCode.UNAVAILABLE"
    assert "upstream 'fp32'" in str(err.value.message())


async def test_metadata_round_trip_and_status_from_a_connected_upstream(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    relay: bool,
) -> None:
    fake: FakeUpstream

    async def echo(request: bytes, context: Any) -> bytes:
        got = dict(context.invocation_metadata())
        fake.seen.append(got)
        await context.send_initial_metadata((("x-echo-initial", got.get("x-probe", "")),))
        trailing = (("x-echo", got.get("x-probe", "")), ("x-raw-bin", b"\x00\xff"))
        if request == b"refuse":
            # A server that answers UNAVAILABLE itself: its status, not a connection failure.
            await context.abort(grpc.StatusCode.UNAVAILABLE, "warming up", trailing)
        context.set_trailing_metadata(trailing)
        return request[::-1]

    fake = await fake_grpc(echo)
    proxy = await proxy_factory(_settings(f"127.0.0.1:{fake.port}", redis_url, relay=relay))
    metadata = (("x-probe", "abc"), ("authorization", "Bearer t0k"), ("x-data-bin", b"\x01\x02"))
    options = [("grpc.primary_user_agent", "client-ua/1")]
    out = await _call(proxy.grpc_port, MODEL_INFER, b"hello", metadata=metadata, options=options)
    assert out.code == grpc.StatusCode.OK and out.response == b"olleh"
    assert out.initial == (("x-echo-initial", "abc"),)
    assert out.trailing == (("x-echo", "abc"), ("x-raw-bin", b"\x00\xff"))
    seen = fake.seen[0]
    assert seen["x-probe"] == "abc" and seen["authorization"] == "Bearer t0k"
    assert seen["x-data-bin"] == b"\x01\x02"
    # The relay passes the client's headers as they are; grpc.aio's channel sets its own.
    assert seen["user-agent"].startswith("client-ua") == relay

    refused = await _call(proxy.grpc_port, MODEL_INFER, b"refuse", metadata=metadata)
    assert refused == Outcome(
        grpc.StatusCode.UNAVAILABLE,
        "warming up",
        None,
        (("x-echo-initial", "abc"),),
        (("x-echo", "abc"), ("x-raw-bin", b"\x00\xff")),
    )

    # A service the proxy knows nothing about is forwarded too (as a stream of one).
    other = await _call(proxy.grpc_port, "/acme.Vendor/Ping", b"ping", metadata=metadata)
    assert other.code == grpc.StatusCode.OK and other.response == b"gnip"
    assert other.trailing == out.trailing


async def test_messages_over_4_mib_both_ways(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    relay: bool,
) -> None:
    async def echo(request: bytes, context: Any) -> bytes:
        return request

    fake = await fake_grpc(echo)
    proxy = await proxy_factory(_settings(f"127.0.0.1:{fake.port}", redis_url, relay=relay))
    payload = np.random.default_rng(0).bytes(6 * MiB)
    out = await _call(proxy.grpc_port, MODEL_INFER, payload)
    assert out.code == grpc.StatusCode.OK and out.response == payload


async def test_infer_hook_sees_each_unary_model_infer(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
) -> None:
    from proxy.keys import GRPC_UPSTREAM
    from proxy.live.grpc_server import GrpcExchange, GrpcLiveServer

    async def echo(request: bytes, context: Any) -> bytes:
        if request == b"bad":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such model")
        return request + b"!"

    fake = await fake_grpc(echo)
    proxy = await proxy_factory(_settings(f"127.0.0.1:{fake.port}", redis_url))
    seen: list[GrpcExchange] = []
    server = GrpcLiveServer(proxy.data[GRPC_UPSTREAM], max_bytes=MiB, on_infer=seen.append)
    port = await server.start("127.0.0.1", 0)
    try:
        await _call(port, MODEL_INFER, b"x", metadata=(("x-probe", "1"),))
        await _call(port, MODEL_INFER, b"bad")
        await _call(port, "/inference.GRPCInferenceService/ServerReady", b"")
    finally:
        await server.stop(1)
    assert [(e.request, e.response, e.code) for e in seen] == [
        (b"x", b"x!", grpc.StatusCode.OK),
        (b"bad", None, grpc.StatusCode.NOT_FOUND),
    ]
    assert ("x-probe", "1") in seen[0].metadata and seen[0].latency_s > 0
    assert seen[1].details == "no such model" and seen[1].failure is None


async def test_the_relay_hands_each_unary_model_infer_to_the_hook(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
) -> None:
    from proxy.live.grpc_relay import GrpcRelay
    from proxy.live.grpc_server import GrpcExchange

    async def echo(request: bytes, context: Any) -> bytes:
        if request == b"bare":  # a trailers-only answer: no initial metadata, no message
            await context.abort(grpc.StatusCode.NOT_FOUND, "bare", (("x-why", "w"),))
        await context.send_initial_metadata((("x-initial", "i"),))
        if request == b"bad":
            await context.abort(grpc.StatusCode.NOT_FOUND, "no such model: 100%")
        context.set_trailing_metadata((("x-trailing", "t"),))
        return request + b"!"

    fake = await fake_grpc(echo)
    settings = _settings(f"127.0.0.1:{fake.port}", redis_url)
    skipped: list[str] = []
    seen: list[GrpcExchange] = []
    relay = GrpcRelay(
        settings.reference,
        handover_port=9,
        max_bytes=MiB,
        on_infer=seen.append,
        on_skip=skipped.append,
    )
    port = await relay.start("127.0.0.1", 0)
    try:
        metadata = (("x-probe", "1"), ("x-data-bin", b"\x00\x01"))
        await _call(port, MODEL_INFER, b"x", metadata=metadata)
        await _call(port, MODEL_INFER, b"bad")
        await _call(port, MODEL_INFER, b"bare")
        await _call(port, "/inference.GRPCInferenceService/ServerReady", b"")
        await _call(port, "/inference.GRPCInferenceService/RepositoryModelUnload", b"")
        big = await _call(port, MODEL_INFER, b"y" * (MiB + 1))
    finally:
        await relay.stop(1)
    assert big.code == grpc.StatusCode.OK  # too large to copy, answered all the same
    assert [(e.request, e.response, e.code, e.details) for e in seen] == [
        (b"x", b"x!", grpc.StatusCode.OK, ""),
        (b"bad", None, grpc.StatusCode.NOT_FOUND, "no such model: 100%"),
        (b"bare", None, grpc.StatusCode.NOT_FOUND, "bare"),
    ]
    first = seen[0]
    assert ("x-probe", "1") in first.metadata and ("x-data-bin", b"\x00\x01") in first.metadata
    assert first.initial_metadata == (("x-initial", "i"),)
    assert first.trailing_metadata == (("x-trailing", "t"),)
    assert first.latency_s > 0 and first.failure is None
    assert seen[1].initial_metadata == (("x-initial", "i"),)
    # A trailers-only answer: its metadata is trailing, not initial as well.
    assert seen[2].initial_metadata == () and seen[2].trailing_metadata == (("x-why", "w"),)
    assert skipped == ["admin_method", "request_too_large"]


async def test_stop_refuses_new_calls_and_lets_calls_in_flight_finish(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    relay: bool,
) -> None:
    gate = asyncio.Event()
    fake: FakeUpstream

    async def gated(request: bytes, context: Any) -> bytes:
        fake.seen.append({})
        await gate.wait()
        return request

    fake = await fake_grpc(gated)
    # A drain timeout far longer than the test: the call in flight ends because it finished.
    proxy = await proxy_factory(
        _settings(f"127.0.0.1:{fake.port}", redis_url, drain_s=60, relay=relay)
    )
    in_flight = asyncio.create_task(_call(proxy.grpc_port, MODEL_INFER, b"slow"))
    await wait_until(lambda: fake.seen, what="the call reached the upstream")
    stopping = asyncio.create_task(proxy.stop())

    async def refused() -> bool:
        out = await _call(proxy.grpc_port, MODEL_INFER, b"new", deadline_s=2)
        return out.code == grpc.StatusCode.UNAVAILABLE

    await wait_until(refused, what="new calls refused while stopping")
    assert not in_flight.done()
    gate.set()
    out = await in_flight
    assert out.code == grpc.StatusCode.OK and out.response == b"slow"
    await stopping


async def test_an_upstream_that_is_not_grpc_is_internal_naming_it(
    proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    async def http1(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
        await writer.drain()
        writer.close()

    junk = await asyncio.start_server(http1, "127.0.0.1", 0)
    port = junk.sockets[0].getsockname()[1]
    try:
        proxy = await proxy_factory(_settings(f"127.0.0.1:{port}", redis_url))
        out = await _call(proxy.grpc_port, MODEL_INFER, b"req")
    finally:
        junk.close()
        await junk.wait_closed()
    assert out.code == grpc.StatusCode.INTERNAL
    assert out.details.startswith(f"upstream 'fp32' at 127.0.0.1:{port}: sent no valid gRPC")


async def test_grpcs_reference_with_mutual_tls(
    fake_grpc: Callable[..., Awaitable[FakeUpstream]],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    self_signed: tuple[Path, Path],
    relay: bool,
) -> None:
    cert, key = self_signed
    # One self-signed pair plays every part: the server's identity, the client's, both roots.
    pem_cert, pem_key = cert.read_bytes(), key.read_bytes()
    tls = grpc.ssl_server_credentials(
        [(pem_key, pem_cert)], root_certificates=pem_cert, require_client_auth=True
    )

    agents: list[str] = []

    async def echo(request: bytes, context: Any) -> bytes:
        agents.append(dict(context.invocation_metadata())["user-agent"])
        return request + b" over tls"

    fake = await fake_grpc(echo, tls)
    url = f"grpcs://127.0.0.1:{fake.port}"
    files = {"grpc_ca": str(cert), "grpc_cert": str(cert), "grpc_key": str(key)}
    proxy = await proxy_factory(_settings(url, redis_url, relay=relay, **files))
    options = [("grpc.primary_user_agent", "client-ua/1")]
    out = await _call(proxy.grpc_port, MODEL_INFER, b"hi", options=options)
    assert out.code == grpc.StatusCode.OK and out.response == b"hi over tls"
    # Relayed over TLS (the client's own headers reached the upstream), or through grpc.aio.
    assert agents[0].startswith("client-ua/1") == relay
    # Without the client certificate the server refuses the handshake: TLS is really in use.
    bare = await proxy_factory(_settings(url, redis_url, relay=relay, grpc_ca=str(cert)))
    refused = await _call(bare.grpc_port, MODEL_INFER, b"hi")
    assert refused.code == grpc.StatusCode.UNAVAILABLE
    assert refused.details.startswith(f"upstream 'fp32' at 127.0.0.1:{fake.port}:")
