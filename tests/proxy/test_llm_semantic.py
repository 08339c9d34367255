"""Semantic similarity of generated answers, embedded by the real Triton's MiniLM."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import make_settings
from tests.llm_fakes import llm, post_json

__all__ = ["llm"]  # the fixture, used by name
pytestmark = pytest.mark.triton

CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "describe a canary rollout"}],
    "max_tokens": 8,
}


async def test_answers_are_embedded_and_their_cosine_judged(
    triton_server: Any, llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, twin, drifted = await llm(), await llm(), await llm(diverge_at=0)
    candidates = [{"name": "twin", "url": twin.url}, {"name": "drifted", "url": drifted.url}]
    semantic = {"embedding_url": triton_server.url, "embedding_model": "minilm_fp32"}
    # One word of eight changed: a cosine below 1, above a loose floor; a strict floor flags it.
    comparisons = {"*": {"*": {"metric": "auto"}, "semantic": {"min_cosine": 0.999999}}}
    proxy = await proxy_factory(
        make_settings(
            ref.url, redis_url, candidates=candidates, semantic=semantic, comparisons=comparisons
        )
    )
    url = f"http://127.0.0.1:{proxy.data_port}"
    assert (await post_json(url, "/v1/chat/completions", CHAT))[0] == 200
    assert await proxy.drained(30)
    verdicts = {
        v["candidate"]: {o["output"]: o for o in v["outputs"]}
        for v in await proxy.store.list_samples(flagged=False)
    }
    twin_cos = verdicts["twin"]["semantic"]["scores"]["cosine"]
    drift_cos = verdicts["drifted"]["semantic"]["scores"]["cosine"]
    assert twin_cos == pytest.approx(1.0, abs=1e-6)
    assert 0.5 < drift_cos < 0.999999
    assert verdicts["drifted"]["semantic"]["flagged"]
    assert not verdicts["twin"]["semantic"]["flagged"]


async def test_an_unreachable_embedding_server_costs_the_verdict_not_the_comparison(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await llm(), await llm(diverge_at=1)
    semantic = {"embedding_url": "http://127.0.0.1:9", "embedding_model": "gone", "timeout_s": 2}
    proxy = await proxy_factory(
        make_settings(
            ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}], semantic=semantic
        )
    )
    assert (await post_json(f"http://127.0.0.1:{proxy.data_port}", "/v1/chat/completions", CHAT))[
        0
    ] == 200
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("c", "compared")] == 1
    assert proxy.telemetry.tally[("c", "skipped:semantic_failed")] == 1
    flagged = await proxy.store.list_samples(flagged=True)
    assert len(flagged) == 1
    assert "semantic" not in {o["output"] for o in flagged[0]["outputs"]}
