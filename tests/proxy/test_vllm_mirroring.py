"""Real vLLM behind the proxy, mirrored: chat completions from the official openai client, the
bf16 build of the same tiny Llama compared against the fp32 reference, an fp32 twin as the
noise floor. Greedy decoding: the twin answers what the reference does; bf16 picks other tokens
on some prompts (tests/vllm_fixture.py)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from tests.conftest import import_or_skip, make_settings
from tests.vllm_fixture import MODEL_NAME, VLLM_TIMEOUT, VllmServers

openai = import_or_skip("openai")

pytestmark = [pytest.mark.vllm, VLLM_TIMEOUT]

# Greedy answers of the fixture's tiny Llama: bf16 changed the answer to the first five of these
# (found by asking both servers 40 corpus openings) on the machine they were chosen on. How
# many differ depends on the CPU's bf16 kernels, so the test asks both servers itself.
PROMPTS = [
    "The senator visited Kyoto to promote",
    "The paper by astronomers describing a",
    "The supreme court debated whether the",
    "The prime minister said the supreme",
    "Biologists warn that grilled sardines may",
    "The recipe for the curry takes",
    "What is the best time of",
    "The food truck makes the ramen",
]


async def _ask(client: Any, prompt: str, stream: bool) -> str:
    args: dict[str, Any] = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": 12,
        "temperature": 0,
        "logprobs": True,
        "top_logprobs": 3,
    }
    if not stream:
        answer = await client.chat.completions.create(**args)
        return str(answer.choices[0].message.content)
    pieces = []
    async for chunk in await client.chat.completions.create(stream=True, **args):
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces)


async def test_bf16_is_compared_against_fp32_and_the_twin_stays_at_the_noise_floor(
    vllm_servers: VllmServers, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    candidates = [
        {"name": "bf16", "url": vllm_servers.candidate.url},
        {"name": "twin", "url": vllm_servers.twin.url, "noise_floor": True},
    ]
    # Greedy answers: a word changed is a different answer (the default 0.9 would let it pass).
    comparisons = {"*": {"*": {"metric": "auto"}, "text": {"min_similarity": 0.999}}}
    settings = make_settings(
        vllm_servers.reference.url, redis_url, candidates=candidates, comparisons=comparisons
    )
    proxy = await proxy_factory(settings)
    through = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{proxy.data_port}/v1", api_key="unused", max_retries=0
    )
    direct = openai.AsyncOpenAI(
        base_url=f"{vllm_servers.reference.url}/v1", api_key="unused", max_retries=0
    )
    bf16_direct = openai.AsyncOpenAI(
        base_url=f"{vllm_servers.candidate.url}/v1", api_key="unused", max_retries=0
    )
    diverging = 0
    for i, prompt in enumerate(PROMPTS):
        got = await _ask(through, prompt, stream=i % 2 == 0)
        assert got == await _ask(direct, prompt, stream=i % 2 == 1)  # greedy: the same text
        diverging += got != await _ask(bf16_direct, prompt, stream=False)
    assert diverging >= 1, "bf16 answered every prompt as fp32 did: nothing to flag here"
    assert await proxy.drained(60)
    verdicts = await proxy.store.list_samples(flagged=False)
    by_cand: dict[str, list[dict[str, Any]]] = {"bf16": [], "twin": []}
    for v in verdicts:
        by_cand[v["candidate"]].append(v)
    assert len(by_cand["bf16"]) == len(by_cand["twin"]) == len(PROMPTS)
    assert all(v["outcome"] == "compared" and v["protocol"] == "openai" for v in verdicts)
    twin = [{o["output"]: o for o in v["outputs"]} for v in by_cand["twin"]]
    assert all(t["text"]["scores"]["exact"] == 1.0 for t in twin)
    assert not any(v["flagged"] for v in by_cand["twin"])
    bf16 = [{o["output"]: o for o in v["outputs"]} for v in by_cand["bf16"]]
    # Every answer carried logprobs: the token KL is measured on each, both sides timed.
    assert all("logprobs" in b and b["logprobs"]["scores"]["positions"] >= 1 for b in bf16)
    assert all(b["latency"]["scores"]["ttft_cand_s"] > 0 for b in bf16)
    # A precision change moves every token's probabilities a little, the twin's not at all.
    assert all(t["logprobs"]["scores"]["kl_max"] < 1e-9 for t in twin)
    assert all(b["logprobs"]["scores"]["kl_max"] > 0 for b in bf16)
    differing = [b for b in bf16 if b["text"]["scores"]["exact"] == 0.0]
    assert len(differing) == diverging, [b["text"]["scores"] for b in bf16]
    assert all(b["text"]["flagged"] for b in differing)
    assert sum(v["flagged"] for v in by_cand["bf16"]) >= diverging
