"""Mirroring: sampling, routing, safety skips, divergence flagged, samples stored with ids."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.settings import TelemetrySettings
from proxy.telemetry import Telemetry
from tests.conftest import make_settings

BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1,2],"data":[1,2]}]}'


async def _send(
    port: int, body: bytes = BODY, path: str = "/v2/models/m/infer", **headers: str
) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}{path}", data=body, headers=headers) as r,
    ):
        await r.read()
        return r.status


async def test_planted_divergence_is_flagged_and_identical_model_is_not(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, same, drifted = await fake(), await fake(), await fake(drift=0.5)
    candidates = [{"name": "same", "url": same.url}, {"name": "drifted", "url": drifted.url}]
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=candidates))
    for i in range(4):
        body = BODY.replace(b"[1,2]", f"[{i},2]".encode())
        assert await _send(proxy.data_port, body, **{"X-Request-Id": f"req-{i}"}) == 200
    assert await proxy.drained(10)
    flagged = await proxy.store.list_samples(flagged=True)
    assert {s["candidate"] for s in flagged} == {"drifted"}
    assert sorted(s["request_id"] for s in flagged) == [f"req-{i}" for i in range(4)]
    sample = await proxy.store.get_sample(flagged[0]["id"])
    assert sample is not None and sample["flagged"] and "scores" in sample["reason"]
    assert sample["reference"]["latency_ms"] > 0 and sample["candidate_side"]["latency_ms"] > 0
    assert sample["reference"]["version"] == "1"
    assert json.loads(sample["payloads"]["reference_body"])["outputs"]
    verdicts = await proxy.store.list_samples(flagged=False, candidate="same")
    assert len(verdicts) == 4 and not any(v["flagged"] for v in verdicts)


async def test_request_id_falls_back_to_the_v2_body_id(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, drifted = await fake(), await fake(drift=1.0)
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "d", "url": drifted.url}])
    )
    assert await _send(proxy.data_port, b'{"id":"body-42",' + BODY[1:]) == 200
    assert await _send(proxy.data_port, BODY) == 200
    assert await proxy.drained(10)
    ids = {s["request_id"] for s in await proxy.store.list_samples(flagged=True)}
    assert "body-42" in ids and len(ids) == 2  # the other one got a generated id


async def test_hash_sampling_keeps_related_requests_together(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    c = {"name": "c", "url": cand.url, "sample_rate": 0.5, "sample_key_header": "X-User"}
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=[c]))
    per_user: dict[str, int] = {}
    for user in range(20):
        before = cand.behaviour.calls
        for _ in range(3):
            assert await _send(proxy.data_port, **{"X-User": f"user-{user}"}) == 200
        assert await proxy.drained(10)
        per_user[f"user-{user}"] = cand.behaviour.calls - before
    assert set(per_user.values()) <= {0, 3}, per_user  # all of a user's requests, or none
    assert 0 < sum(v == 3 for v in per_user.values()) < 20


async def test_random_sampling_follows_the_rate(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    c = {"name": "c", "url": cand.url, "sample_rate": 0.3}
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=[c]))
    for _ in range(200):
        assert await _send(proxy.data_port) == 200
    assert await proxy.drained(10)
    assert 30 <= cand.behaviour.calls <= 90  # 60 expected; p(outside) < 1e-4
    assert proxy.telemetry.tally[("c", "skipped:not_sampled")] == 200 - cand.behaviour.calls


async def test_model_map_and_credentials(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    c = {"name": "c", "url": cand.url, "model_map": {"m": "m_int8"}, "models": ["m"]}
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=[c]))
    status = await _send(
        proxy.data_port,
        path="/v2/models/m/versions/1/infer",
        Authorization="Bearer secret",
        Cookie="a=b",
    )
    assert status == 200
    # Not in the candidate's models: answered by the reference, never mirrored.
    assert await _send(proxy.data_port, path="/v2/models/other/infer") == 200
    assert await proxy.drained(10)
    assert cand.behaviour.seen_paths == ["/v2/models/m_int8/versions/1/infer"]
    assert "Authorization" not in cand.behaviour.seen_headers[0]
    assert "Cookie" not in cand.behaviour.seen_headers[0]
    assert ref.behaviour.seen_headers[0]["Authorization"] == "Bearer secret"


async def test_unsafe_requests_are_never_mirrored_and_counted_by_reason(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}])
    )
    shm = (
        b'{"inputs":[{"name":"x","datatype":"FP32","shape":[2],'
        b'"parameters":{"shared_memory_region":"r0","shared_memory_byte_size":8}}]}'
    )
    seq = b'{"parameters":{"sequence_id":7,"sequence_start":true},' + BODY[1:]
    # Each is answered by the reference as without the proxy (the fake has no repository or
    # shared-memory routes: its own 404 comes back), and none is copied.
    assert await _send(proxy.data_port, shm) == 200
    assert await _send(proxy.data_port, seq) == 200
    assert await _send(proxy.data_port, b"{}", path="/v2/repository/models/m/load") == 404
    region = "/v2/systemsharedmemory/region/r0/register"
    assert await _send(proxy.data_port, b"{}", path=region) == 404
    assert ref.behaviour.calls == 2
    assert await proxy.drained(10)
    assert cand.behaviour.calls == 0
    tally = proxy.telemetry.tally
    assert tally[("c", "skipped:shared_memory")] == 1
    assert tally[("c", "skipped:sequence")] == 1
    assert tally[("*", "skipped:admin_route")] == 2


async def test_trace_context_is_forwarded_and_shadow_spans_link_to_the_live_span(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    exporter = InMemorySpanExporter()
    tel = Telemetry(TelemetrySettings(), span_exporter=exporter)
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}]),
        telemetry=tel,
    )
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    assert await _send(proxy.data_port, traceparent=f"00-{trace_id}-00f067aa0ba902b7-01") == 200
    assert await proxy.drained(10)
    assert ref.behaviour.seen_headers[0]["traceparent"].split("-")[1] == trace_id
    spans = {s.name: s for s in exporter.get_finished_spans()}
    live = spans["POST infer"]
    shadow = spans["shadow c"]
    assert format(live.context.trace_id, "032x") == trace_id
    assert shadow.links and shadow.links[0].context.span_id == live.context.span_id
    # Comparing is a stage of its own (another process by default): linked to the live call.
    compare = spans["compare c"]
    assert compare.links and compare.links[0].context.span_id == live.context.span_id
    assert compare.attributes["shadowproxy.outcome"] == "compared"
    tel.shutdown()
