"""LLM traffic on the live path: streams relayed untouched and unbuffered, teed, mirrored.

The upstreams are the bench's deterministic streaming server (``loadtest.llm_backend``): the
same request gives the same bytes, so what the client reads through the proxy is compared byte
for byte with what it reads directly.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.app import ProxyRunner
from proxy.shadow.coverage import is_fate
from tests.conftest import make_settings, wait_until
from tests.llm_fakes import llm, post_json

__all__ = ["llm"]  # the fixture, used by name

CHAT = {
    "model": "tiny",
    "messages": [{"role": "user", "content": "say something about canaries"}],
    "max_tokens": 8,
    "stream": True,
    "logprobs": True,
    "top_logprobs": 3,
}
COMPLETION = {"model": "tiny", "prompt": "once upon a time", "max_tokens": 6, "stream": True}
GENERATE = {"text_input": "shadow traffic is", "parameters": {"max_tokens": 5}}


def _proxy_url(proxy: ProxyRunner) -> str:
    return f"http://127.0.0.1:{proxy.data_port}"


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", CHAT),
        ("/v1/completions", COMPLETION),
        ("/v1/chat/completions", {**CHAT, "stream": False}),
        ("/v2/models/tiny/generate_stream", GENERATE),
        ("/v2/models/tiny/generate", GENERATE),
    ],
)
async def test_answers_are_byte_identical_to_direct(
    llm: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    path: str,
    body: dict[str, Any],
) -> None:
    ref = await llm()
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    direct = await post_json(ref.url, path, body)
    through = await post_json(_proxy_url(proxy), path, body)
    assert direct[0] == 200 and direct[2]
    assert through == direct


async def test_each_event_reaches_the_client_before_the_stream_ends(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    # The reference sends its first event and then nothing: a proxy that buffered the stream
    # (or waited for a second event to fill a read) would show the client nothing at all.
    ref = await llm(mode="hang")
    proxy = await proxy_factory(make_settings(ref.url, redis_url))
    async with (
        aiohttp.ClientSession() as s,
        s.post(_proxy_url(proxy) + "/v1/chat/completions", json=CHAT) as r,
    ):
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
    event = json.loads(first.removeprefix(b"data: "))
    assert event["choices"][0]["delta"]["role"] == "assistant"


async def test_a_divergent_candidate_is_flagged_and_a_twin_is_not(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, twin, drifted = await llm(), await llm(), await llm(diverge_at=2)
    candidates = [{"name": "twin", "url": twin.url}, {"name": "drifted", "url": drifted.url}]
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=candidates))
    for i in range(3):
        chat = {**CHAT, "messages": [{"role": "user", "content": f"prompt {i}"}]}
        assert (await post_json(_proxy_url(proxy), "/v1/chat/completions", chat))[0] == 200
        assert (await post_json(_proxy_url(proxy), "/v2/models/tiny/generate_stream", GENERATE))[
            0
        ] == 200
    assert await proxy.drained(10)
    flagged = await proxy.store.list_samples(flagged=True)
    assert {s["candidate"] for s in flagged} == {"drifted"}
    assert len(flagged) == 6
    assert {s["protocol"] for s in flagged} == {"openai", "triton_generate"}
    twin_verdicts = await proxy.store.list_samples(flagged=False, candidate="twin")
    assert len(twin_verdicts) == 6
    assert all(v["outcome"] == "compared" for v in twin_verdicts)
    sample = await proxy.store.get_sample(
        next(s["id"] for s in flagged if s["protocol"] == "openai")
    )
    assert sample is not None
    text = next(o for o in sample["outputs"] if o["output"] == "text")
    # The swap at token 2 of 8: the first divergence is where token 2 starts.
    assert text["flagged"] and text["scores"]["first_divergence_token"] == 2
    preview = sample["previews"]["text"]
    assert preview["reference"]["text"] != preview["candidate"]["text"]
    assert preview["reference"]["tokens"][0]["top"]
    assert sample["reference"]["ttft_ms"] > 0 and sample["candidate_side"]["ttft_ms"] > 0


@pytest.mark.parametrize(
    ("mode", "outcome"),
    [("garbage", "candidate_invalid"), ("cut", "bad_response"), ("hang", "timeout")],
)
async def test_a_broken_candidate_never_touches_the_live_stream(
    llm: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    mode: str,
    outcome: str,
) -> None:
    ref, broken = await llm(), await llm(mode=mode)
    candidates = [{"name": "broken", "url": broken.url, "llm_timeout_s": 0.5}]
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=candidates))
    direct = await post_json(ref.url, "/v1/chat/completions", CHAT)
    for _ in range(2):
        assert await post_json(_proxy_url(proxy), "/v1/chat/completions", CHAT) == direct
    assert await proxy.drained(10)
    fates = {w: n for (c, w), n in proxy.telemetry.tally.items() if c == "broken"}
    assert fates.get(outcome) == 2, fates


async def test_a_client_leaving_mid_stream_cancels_the_reference_call(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await llm(delay_s=0.05, tokens=200), await llm()
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}])
    )
    body = {**CHAT, "max_tokens": 200}
    async with (
        aiohttp.ClientSession() as s,
        s.post(_proxy_url(proxy) + "/v1/chat/completions", json=body) as r,
    ):
        await r.content.readuntil(b"\n\n")
        await r.content.readuntil(b"\n\n")
        r.close()  # the client goes away after two events of 201
    await wait_until(lambda: ref.behaviour.cancelled == 1, what="the reference call cancelled")
    assert await proxy.drained(10)
    fates = {w: n for (c, w), n in proxy.telemetry.tally.items() if c == "c" and is_fate(w) and n}
    assert fates == {"reference_incomplete": 1}, fates
    assert await proxy.store.list_samples(flagged=True) == []


async def test_tools_and_n_are_mirrored_only_where_allowed(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, strict, open_ = await llm(), await llm(), await llm()
    candidates = [
        {"name": "strict", "url": strict.url},
        {"name": "open", "url": open_.url, "mirror_llm": {"allow": ["tools", "n"]}},
    ]
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=candidates))
    tools = [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]
    bodies = [{**CHAT, "tools": tools}, {**CHAT, "n": 2}, CHAT]
    through = [await post_json(_proxy_url(proxy), "/v1/chat/completions", b) for b in bodies]
    assert await proxy.drained(10)
    # Every request, copied or not, is answered as the reference answers it directly.
    direct = [await post_json(ref.url, "/v1/chat/completions", b) for b in bodies]
    assert [t[0] for t in through] == [200] * 3 and through == direct
    assert strict.behaviour.calls == 1 and open_.behaviour.calls == 3
    tally = proxy.telemetry.tally
    assert tally[("strict", "skipped:llm_tools")] == 1 and tally[("strict", "skipped:llm_n")] == 1


async def test_model_map_renames_the_model_in_an_openai_body(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await llm(), await llm()
    candidates = [{"name": "c", "url": cand.url, "model_map": {"tiny": "tiny-bf16"}}]
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=candidates))
    through = await post_json(_proxy_url(proxy), "/v1/chat/completions", CHAT)
    assert await proxy.drained(10)
    assert [b["model"] for b in cand.behaviour.seen_bodies] == ["tiny-bf16"]
    assert ref.behaviour.seen_bodies[0]["model"] == "tiny"
    assert cand.behaviour.seen_bodies[0]["messages"] == CHAT["messages"]
    # The client's answer is the reference's to the body as sent, the name unmapped.
    assert through[0] == 200 and through == await post_json(ref.url, "/v1/chat/completions", CHAT)


async def test_embeddings_are_compared_as_vectors(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, twin, tilted = await llm(), await llm(), await llm(diverge_at=3)
    candidates = [{"name": "twin", "url": twin.url}, {"name": "tilted", "url": tilted.url}]
    proxy = await proxy_factory(make_settings(ref.url, redis_url, candidates=candidates))
    body = {"model": "embedder", "input": ["a first sentence", "and a second one"]}
    status, _, answer = await post_json(_proxy_url(proxy), "/v1/embeddings", body)
    assert status == 200 and answer == (await post_json(ref.url, "/v1/embeddings", body))[2]
    assert await proxy.drained(10)
    verdicts = {v["candidate"]: v for v in await proxy.store.list_samples(flagged=False)}
    tilted_out = {o["output"]: o for o in verdicts["tilted"]["outputs"]}["embedding"]
    twin_out = {o["output"]: o for o in verdicts["twin"]["outputs"]}["embedding"]
    assert tilted_out["metric"] == "cosine" and tilted_out["flagged"]
    assert twin_out["metric"] == "cosine" and not twin_out["flagged"]
    assert verdicts["tilted"]["protocol"] == "openai"


async def test_sampled_answers_are_judged_against_the_twins_spread(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    # Three servers of one model, sampling apart (temperature 1): the candidate's answers differ
    # from the reference's as much as the twin's do. Judged by the threshold alone most would be
    # flagged; against the twin's spread (the A/A noise floor) few are.
    ref, twin, cand = await llm(sample_seed=1), await llm(sample_seed=2), await llm(sample_seed=3)
    noise = {"min_samples": 10}

    async def flagged(candidates: list[dict[str, Any]]) -> int:
        since = time.time()  # both runs share one Redis
        proxy = await proxy_factory(
            make_settings(ref.url, redis_url, candidates=candidates, noise=noise)
        )
        for i in range(50):
            chat = {
                **CHAT,
                "stream": False,
                "temperature": 1.0,
                "max_tokens": 12,
                "messages": [{"role": "user", "content": f"tell me story {i}"}],
            }
            assert (await post_json(_proxy_url(proxy), "/v1/chat/completions", chat))[0] == 200
            if i == 19:  # the twin's first verdicts are the floor the rest are judged against
                assert await proxy.drained(10)
        assert await proxy.drained(10)
        assert proxy.telemetry.tally[("cand", "compared")] == 50
        flagged = await proxy.store.list_samples(flagged=True, candidate="cand")
        return sum(1 for v in flagged if v["ts"] >= since)

    alone = await flagged([{"name": "cand", "url": cand.url}])
    with_twin = await flagged(
        [{"name": "cand", "url": cand.url}, {"name": "twin", "url": twin.url, "noise_floor": True}]
    )
    assert alone >= 40, alone
    assert with_twin <= 25, with_twin
