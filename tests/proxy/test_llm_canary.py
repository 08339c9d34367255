"""The canary on LLM traffic: streamed chat completions split between the reference and an LLM
candidate, both answers compared, the gates on flagged rate and time to first token."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp

from proxy.canary import gates as g
from tests.canary_config import fast_canary
from tests.conftest import make_settings, wait_rollout
from tests.llm_fakes import llm

__all__ = ["llm"]  # the fixture, used by name


def _settings(ref: str, cand: str, redis_url: str) -> Any:
    candidates = [{"name": "cand", "url": cand, "model_map": {"tiny": "tiny-int8"}}]
    return make_settings(ref, redis_url, candidates=candidates, canary=fast_canary())


async def _stream(port: int, n: int, first: int = 0) -> list[tuple[str, bytes]]:
    out = []
    async with aiohttp.ClientSession() as s:
        for i in range(first, first + n):
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": f"prompt {i}"}],
                "max_tokens": 6,
                "stream": True,
            }
            async with s.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as r:
                assert r.status == 200
                out.append((r.headers["X-Served-By"], await r.read()))
    return out


async def test_a_faithful_llm_candidate_serves_streams_and_is_promoted(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await llm(), await llm()
    proxy = await proxy_factory(_settings(ref.url, cand.url, redis_url))
    answers = await _stream(proxy.data_port, 30)
    served = [who for who, _ in answers]
    assert 0 < served.count("cand") < 30 and served.count("ref") > 0
    # The candidate got the mapped model name; each stream reached the client whole.
    assert {b["model"] for b in cand.behaviour.seen_bodies} == {"tiny-int8"}
    assert all(body.rstrip().endswith(b"data: [DONE]") for _, body in answers)
    assert await proxy.drained(10)
    await proxy.canary.evidence.flush()
    state = await proxy.canary.store.read()
    evidence = await proxy.canary.store.evidence(state.attempt, 0)  # the 50% step
    assert evidence["compared"] >= 10 and evidence["flagged"] == 0
    assert g.latency_quantile(evidence, g.TTFT_CAND, 0.5)[1] == evidence["compared"]
    for batch in range(6):
        await _stream(proxy.data_port, 15, first=100 * (batch + 1))
        assert await proxy.drained(10)
        if (await proxy.canary.store.read()).status == "promoted":
            break
    state = await wait_rollout(proxy, {"promoted"})
    passed = [d for d in await proxy.canary.store.decisions() if d.get("gates")]
    ttft = [gate for d in passed for gate in d["gates"] if gate["gate"] == "ttft"]
    assert ttft and all(gate["status"] == "pass" and gate["value"] > 0 for gate in ttft)


async def test_a_divergent_llm_candidate_is_rolled_back(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await llm(), await llm(diverge_at=0)
    proxy = await proxy_factory(_settings(ref.url, cand.url, redis_url))
    await _stream(proxy.data_port, 20)
    assert await proxy.drained(10)
    state = await wait_rollout(proxy, {"rolled_back"})
    assert "flagged_rate" in state.reason
