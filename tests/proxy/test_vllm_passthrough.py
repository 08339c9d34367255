"""Real vLLM behind the proxy: what an OpenAI client gets through it is what it gets directly.

The proxy passes these calls through (its LLM mirroring is tested elsewhere); here the upstream
is a real vLLM (tests/vllm_fixture.py), so the answers carry everything a real server sends:
logprobs, usage, its own extra fields, SSE framing. Greedy decoding makes the answers
reproducible. What differs between two identical calls, found by diffing real runs:

- `id` and `created`, set per call (one id for all the events of a stream);
- how a stream is cut into events: vLLM merges the deltas of several tokens into one event when
  its API server falls behind its engine (RequestOutputCollector), which a busy machine makes
  happen at random. So a stream is compared with a direct one as the answer its events add up
  to (every token, logprob, finish reason and usage), and event by event, byte for byte, with
  what vLLM sent for that very call, read off the wire by a recording relay in front of it.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import import_or_skip, make_settings
from tests.vllm_fixture import MODEL_NAME, VLLM_TIMEOUT, VllmServers

openai = import_or_skip("openai")

pytestmark = [pytest.mark.vllm, VLLM_TIMEOUT]

PER_CALL_FIELDS = ("id", "created")
MESSAGES = [{"role": "user", "content": "Did the team win the match?"}]
GREEDY = {"model": MODEL_NAME, "max_tokens": 16, "temperature": 0}
CHAT = {**GREEDY, "messages": MESSAGES, "logprobs": True, "top_logprobs": 3}
COMPLETION = {**GREEDY, "prompt": "Yesterday the bank", "logprobs": 3}
USAGE = {"stream_options": {"include_usage": True}}  # one more event, at the end of a stream


@dataclass
class Tap:
    """A relay in front of vLLM that keeps each response body exactly as vLLM sent it."""

    upstream: str
    url: str = ""
    bodies: list[tuple[str, bytes]] = field(default_factory=list)  # (path, body) per call


async def _relay(tap: Tap, session: aiohttp.ClientSession, request: web.Request) -> Any:
    async with session.request(
        request.method,
        tap.upstream + request.path_qs,
        data=await request.read(),
        headers={"Content-Type": request.headers.get("Content-Type", "application/json")},
    ) as upstream:
        response = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": upstream.headers["Content-Type"]}
        )
        await response.prepare(request)
        body = bytearray()
        async for piece in upstream.content.iter_any():
            body += piece
            await response.write(piece)  # as it comes: a buffering relay would hide nothing
        tap.bodies.append((request.path, bytes(body)))
        await response.write_eof()
        return response


@pytest.fixture
async def tap(vllm_servers: VllmServers) -> AsyncIterator[Tap]:
    found = Tap(upstream=vllm_servers.reference.url)
    session = aiohttp.ClientSession(auto_decompress=False)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", lambda request: _relay(found, session, request))
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    found.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield found
    finally:
        await runner.cleanup()
        await session.close()


@pytest.fixture
async def through(tap: Tap, proxy_factory: Callable[..., Any], redis_url: str) -> str:
    """The URL of a proxy whose reference is the session's float32 vLLM (behind the tap)."""
    proxy = await proxy_factory(make_settings(tap.url, redis_url))
    return f"http://127.0.0.1:{proxy.data_port}"


def _merge(into: dict[str, Any], delta: dict[str, Any]) -> None:
    """Add one event's choice to the choice so far, as vLLM adds deltas up: strings joined,
    lists extended, objects merged, any other value kept once set."""
    for key, value in delta.items():
        if isinstance(value, str | list) and type(into.get(key)) is type(value):
            into[key] += value
        elif isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif value is not None or key not in into:
            into[key] = value


def _answer(events: list[dict[str, Any]]) -> dict[str, Any]:
    """What a stream's events add up to, however vLLM cut it: each choice merged, and each
    other field with its last value (per-call fields left out)."""
    top: dict[str, Any] = {}
    choices: dict[int, dict[str, Any]] = {}
    for event in events:
        for choice in event["choices"]:
            _merge(choices.setdefault(choice["index"], {}), choice)
        for key, value in event.items():
            if key != "choices" and key not in PER_CALL_FIELDS and value is not None:
                top[key] = value
    return {**top, "choices": [choices[i] for i in sorted(choices)]}


async def _openai_call(base_url: str, endpoint: str, stream: bool) -> list[dict[str, Any]]:
    """The answer (one item) or the stream's chunks, as the official client parsed them."""
    # No retries: a failed call must fail the test, not be repeated until it passes.
    client = openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key="unused", max_retries=0)
    try:
        extra = USAGE if stream else {}
        if endpoint == "chat":
            answer = await client.chat.completions.create(stream=stream, **CHAT, **extra)
        else:
            answer = await client.completions.create(stream=stream, **COMPLETION, **extra)
        items = [chunk async for chunk in answer] if stream else [answer]
    finally:
        await client.close()
    return [item.model_dump() for item in items]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
async def test_openai_client_gets_the_same_answer_as_direct(
    vllm_servers: VllmServers, through: str, endpoint: str, stream: bool
) -> None:
    direct = await _openai_call(vllm_servers.reference.url, endpoint, stream)
    proxied = await _openai_call(through, endpoint, stream)
    assert _answer(proxied) == _answer(direct)
    # Each event is what a direct call's is, field for field, and one call has one id.
    assert {frozenset(e) for e in proxied} == {frozenset(e) for e in direct}
    assert len({e["id"] for e in proxied}) == 1 and proxied[0]["id"] != direct[0]["id"]
    # Not vacuous: real text, with its logprobs (and, streamed, several events and the usage).
    (choice,) = _answer(direct)["choices"]
    text = choice.get("text") or (choice.get("message") or choice.get("delta"))["content"]
    assert text.strip() and choice["logprobs"] and choice["finish_reason"] in ("stop", "length")
    if stream:
        assert len(direct) > 3 and direct[-1]["usage"]["completion_tokens"] > 0


async def _raw_events(base_url: str, path: str, body: dict[str, Any]) -> tuple[str, list[bytes]]:
    """Content type and the SSE events as read off the wire, one by one."""
    events: list[bytes] = []
    async with (
        aiohttp.ClientSession(auto_decompress=False) as session,
        session.post(base_url + path, json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        while not resp.content.at_eof():
            event = await resp.content.readuntil(b"\n\n")
            if event:
                events.append(event)
        return resp.headers["Content-Type"], events


def _parsed(events: list[bytes]) -> list[dict[str, Any]]:
    assert events[-1] == b"data: [DONE]\n\n"
    assert all(e.startswith(b"data: {") for e in events[:-1])
    parsed: list[dict[str, Any]] = [json.loads(e.removeprefix(b"data: ")) for e in events[:-1]]
    return parsed


@pytest.mark.parametrize(
    ("path", "body"),
    [("/v1/chat/completions", CHAT), ("/v1/completions", COMPLETION)],
    ids=["chat", "completions"],
)
async def test_raw_sse_events_are_the_ones_vllm_sent(
    vllm_servers: VllmServers, tap: Tap, through: str, path: str, body: dict[str, Any]
) -> None:
    request = {**body, "stream": True, **USAGE}
    content_type, events = await _raw_events(through, path, request)
    assert content_type.startswith("text/event-stream")
    # Event by event, byte for byte, id and created included: what vLLM sent for this call.
    (sent,) = [sent for called, sent in tap.bodies if called == path]
    assert b"".join(events) == sent and len(events) > 3
    direct_type, direct = await _raw_events(vllm_servers.reference.url, path, request)
    assert direct_type == content_type
    assert _answer(_parsed(events)) == _answer(_parsed(direct))


def _chat_answer(base_url: str) -> dict[str, Any]:
    req = urllib.request.Request(
        f"{base_url}/v1/chat/completions",
        json.dumps(CHAT).encode(),
        {"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer["choices"][0]


def test_the_fixture_serves_one_model_in_two_precisions(vllm_servers: VllmServers) -> None:
    # What the mirroring tests rely on: the twin answers exactly as the reference does (same
    # weights, dtype and thread count), the bfloat16 candidate with other numbers.
    reference = _chat_answer(vllm_servers.reference.url)
    assert _chat_answer(vllm_servers.twin.url) == reference
    candidate = _chat_answer(vllm_servers.candidate.url)
    assert candidate["logprobs"] != reference["logprobs"]
    assert vllm_servers.candidate.dtype == "bfloat16" and vllm_servers.reference.dtype == "float32"
