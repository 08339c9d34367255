"""gRPC ModelInfer calls mirrored to candidates over gRPC, compared and stored, on the real
Triton server: the light pair's planted divergences are flagged exactly, and the kinds that are
never mirrored never reach a candidate."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import grpc
import numpy as np
import pytest
import tritonclient.grpc.aio as aiogrpc
from tritonclient.grpc import InferInput, InferRequestedOutput, service_pb2

from tests.conftest import ADMIN_TOKEN, make_settings

pytestmark = pytest.mark.triton
PLANT = 13.0  # deploy/lib/shadowdemo/light.py: light_cand diverges on rows whose x[i, 7] is this
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"


def _settings(triton: Any, redis_url: str, *, mirror_process: bool, **cand: Any) -> Any:
    grpc_url = f"127.0.0.1:{triton.grpc_port}"
    candidate = {
        "name": "light",
        "url": triton.url,
        "grpc_url": grpc_url,
        "model_map": {"light_ref": "light_cand"},
        **cand,
    }
    return make_settings(
        triton.url,
        redis_url,
        listen={"host": "127.0.0.1", "port": 0, "grpc_port": 0},
        reference={"name": "ref", "url": triton.url, "grpc_url": grpc_url, "timeout_s": 10},
        candidates=[candidate],
        proxy={"drain_timeout_s": 2, "shed_lag_ms": 0, "mirror_process": mirror_process},
    )


async def _send_light(port: int, n: int, planted: set[int]) -> None:
    """n ModelInfer calls to light_ref through tritonclient.grpc, one after another."""
    rng = np.random.default_rng(5)
    client = aiogrpc.InferenceServerClient(f"127.0.0.1:{port}")
    try:
        for i in range(n):
            rows = np.clip(rng.normal(size=(1 + i % 3, 8)), -2, 2).astype(np.float32)
            if i in planted:
                rows[-1, 7] = PLANT
            x = InferInput("x", list(rows.shape), "FP32")
            x.set_data_from_numpy(rows)
            outputs = [InferRequestedOutput(name) for name in ("scores", "probs", "label")]
            result = await client.infer("light_ref", [x], outputs=outputs, request_id=f"g-{i}")
            assert result.as_numpy("scores").shape == (len(rows), 4)
    finally:
        await client.close()


@pytest.mark.parametrize("mirror_process", [False, True], ids=["in-process", "mirror-process"])
async def test_grpc_divergences_are_flagged_exactly_and_listed(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str, mirror_process: bool
) -> None:
    proxy = await proxy_factory(_settings(triton_server, redis_url, mirror_process=mirror_process))
    planted = set(random.Random(3).sample(range(30), 6))
    await _send_light(proxy.grpc_port, 30, planted)
    assert await proxy.drained(30)
    summary = await _admin(proxy.admin_port, "/api/summary")
    assert summary["this_process"]["light"]["compared"] == 30, summary["this_process"]
    flagged = await proxy.store.list_samples(flagged=True, candidate="light", limit=100)
    assert {s["request_id"] for s in flagged} == {f"g-{i}" for i in planted}  # recall, precision
    sample = flagged[0]
    assert sample["protocol"] == "v2_grpc"
    assert {o["output"] for o in sample["outputs"] if o["flagged"]} >= {"label"}
    # The review page shows the request readably, not as protobuf bytes.
    shown = (await _admin(proxy.admin_port, f"/api/samples/{sample['id']}"))["payloads"]["request"]
    assert shown["protocol"] == "v2_grpc"
    assert (
        shown["json"]["model_name"] == "light_ref" and shown["json"]["id"] == sample["request_id"]
    )
    assert [i["name"] for i in shown["json"]["inputs"]] == ["x"]


async def _admin(port: int, path: str) -> Any:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession(headers=auth) as s,
        s.get(f"http://127.0.0.1:{port}{path}") as r,
    ):
        assert r.status == 200, await r.text()
        return await r.json()


async def test_each_request_of_a_stream_is_mirrored_once_answered(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await proxy_factory(_settings(triton_server, redis_url, mirror_process=False))

    def inputs(i: int, planted: bool) -> list[InferInput]:
        rows = np.full((1, 8), 0.1 * i, dtype=np.float32)
        if planted:
            rows[0, 7] = PLANT
        x = InferInput("x", [1, 8], "FP32")
        x.set_data_from_numpy(rows)
        return [x]

    async def requests() -> AsyncIterator[dict[str, Any]]:
        for i in range(8):
            yield {
                "model_name": "light_ref",
                "inputs": inputs(i, i in (2, 5)),
                "request_id": f"s-{i}",
            }
        # No id: its answer cannot be told from another's on a stream, so it is not copied.
        yield {"model_name": "light_ref", "inputs": inputs(9, True)}

    client = aiogrpc.InferenceServerClient(f"127.0.0.1:{proxy.grpc_port}")
    try:
        answers = [(r, e) async for r, e in client.stream_infer(requests(), stream_timeout=30)]
    finally:
        await client.close()
    assert len(answers) == 9 and all(r is not None and e is None for r, e in answers)
    assert await proxy.drained(20)
    assert proxy.telemetry.tally[("light", "compared")] == 8
    flagged = await proxy.store.list_samples(flagged=True, candidate="light", limit=50)
    assert {s["request_id"] for s in flagged} == {"s-2", "s-5"}


def _request(params: dict[str, Any] | None = None, *, shm_input: bool = False) -> bytes:
    req = service_pb2.ModelInferRequest(model_name="light_ref", id="never")
    x = req.inputs.add(name="x", datatype="FP32")
    x.shape.extend([1, 8])
    if shm_input:
        x.parameters["shared_memory_region"].string_param = "region-0"
        x.parameters["shared_memory_byte_size"].int64_param = 32
    else:
        req.raw_input_contents.append(np.zeros(8, dtype=np.float32).tobytes())
    for key, value in (params or {}).items():
        if isinstance(value, bool):
            req.parameters[key].bool_param = value
        else:
            req.parameters[key].int64_param = value
    return req.SerializeToString()


async def test_never_mirrored_grpc_kinds_never_reach_a_candidate(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    proxy = await proxy_factory(_settings(triton_server, redis_url, mirror_process=False))
    cases = {
        "sequence": _request({"sequence_id": 7, "sequence_start": True}),
        "shared_memory": _request(shm_input=True),
    }

    async def outcome(target: str, body: bytes) -> tuple[Any, ...]:
        """What a ModelInfer call answers: ("ok", the answer) or (status code, details)."""
        async with grpc.aio.insecure_channel(target) as channel:
            call: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(MODEL_INFER)
            try:
                return ("ok", await call(body, timeout=10))
            except grpc.aio.AioRpcError as exc:
                return (exc.code(), exc.details())

    for kind, body in cases.items():
        # Whatever Triton answers (it runs a sequence id on a model without a sequence
        # batcher, and refuses an unregistered region), the client gets exactly that.
        through = await outcome(f"127.0.0.1:{proxy.grpc_port}", body)
        direct = await outcome(f"127.0.0.1:{triton_server.grpc_port}", body)
        assert through == direct, kind
    async with grpc.aio.insecure_channel(f"127.0.0.1:{proxy.grpc_port}") as channel:
        # Reads are forwarded and answered, never copied; admin methods too, and counted.
        ready: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/inference.GRPCInferenceService/ServerReady"
        )
        answer = await ready(service_pb2.ServerReadyRequest().SerializeToString(), timeout=10)
        assert service_pb2.ServerReadyResponse.FromString(answer).ready
        trace: grpc.aio.UnaryUnaryMultiCallable[bytes, bytes] = channel.unary_unary(
            "/inference.GRPCInferenceService/TraceSetting"
        )
        assert await trace(service_pb2.TraceSettingRequest().SerializeToString(), timeout=10)
    assert await proxy.drained(10)
    tally = proxy.telemetry.tally
    assert tally[("light", "skipped:sequence")] == 1, tally
    assert tally[("light", "skipped:shared_memory")] == 1, tally
    assert tally[("*", "skipped:admin_method")] == 1, tally
    assert not any(outcome in ("compared", "both_failed") for (_, outcome) in tally), tally


async def test_a_candidate_without_grpc_url_is_skipped_by_name(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    settings = _settings(triton_server, redis_url, mirror_process=False, grpc_url=None)
    proxy = await proxy_factory(settings)
    await _send_light(proxy.grpc_port, 2, set())
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("light", "skipped:no_grpc_url")] == 2
