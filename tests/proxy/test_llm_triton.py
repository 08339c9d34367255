"""Triton's generate extension through the proxy, on the real Triton of the suite: the tiny
language model of deploy/models (a decoupled Python-backend model) in fp32 as the reference,
its int8 build as the candidate, and a second fp32 instance as the noise floor."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.demo.llm import prompts
from tests.conftest import make_settings

pytestmark = pytest.mark.triton

N = 16


async def _generate(url: str, route: str, prompt: str) -> tuple[int, bytes]:
    body = {"text_input": prompt, "max_tokens": 12, "num_logprobs": 3}
    if route == "generate_stream":
        body["stream"] = True
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"{url}/v2/models/lm_fp32/{route}", json=body) as r,
    ):
        return r.status, await r.read()


async def test_int8_lm_is_flagged_and_the_twin_is_not(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    candidates = [
        {"name": "int8", "url": triton_server.url, "model_map": {"lm_fp32": "lm_int8"}},
        {
            "name": "twin",
            "url": triton_server.url,
            "model_map": {"lm_fp32": "lm_fp32_twin"},
            "noise_floor": True,
        },
    ]
    # Greedy answers: a changed word is a different answer.
    comparisons = {"*": {"*": {"metric": "auto"}, "text": {"min_similarity": 0.999}}}
    proxy = await proxy_factory(
        make_settings(triton_server.url, redis_url, candidates=candidates, comparisons=comparisons)
    )
    url = f"http://127.0.0.1:{proxy.data_port}"
    for i, prompt in enumerate(prompts(N)):
        route = "generate_stream" if i % 2 else "generate"
        through = await _generate(url, route, prompt)
        direct = await _generate(triton_server.url, route, prompt)
        assert through[0] == 200 and through == direct  # greedy: byte for byte the same
    assert await proxy.drained(60)
    verdicts = await proxy.store.list_samples(flagged=False)
    by_cand: dict[str, list[dict[str, Any]]] = {"int8": [], "twin": []}
    for v in verdicts:
        by_cand[v["candidate"]].append(v)
    assert len(by_cand["int8"]) == len(by_cand["twin"]) == N
    assert all(v["outcome"] == "compared" for v in verdicts)
    assert {v["protocol"] for v in verdicts} == {"triton_generate"}
    twin = [{o["output"]: o for o in v["outputs"]} for v in by_cand["twin"]]
    assert all(t["text"]["scores"]["exact"] == 1.0 for t in twin)
    assert all(t["logprobs"]["scores"]["kl_max"] < 1e-9 for t in twin)
    assert not any(v["flagged"] for v in by_cand["twin"])
    int8 = [{o["output"]: o for o in v["outputs"]} for v in by_cand["int8"]]
    differing = [o for o in int8 if o["text"]["scores"]["exact"] == 0.0]
    assert differing, [o["text"]["scores"] for o in int8]
    assert all(o["text"]["flagged"] for o in differing)
    assert all(o["logprobs"]["scores"]["kl_mean"] > 0 for o in int8)
    # Every answer is timed on both sides (a streamed one at its first token, a whole one at
    # its end); streamed ones of two tokens or more also per output token, whole ones never.
    assert all("ttft_ms" in v["candidate_side"] for v in by_cand["int8"])
    assert 0 < sum("tpot_ms" in v["candidate_side"] for v in by_cand["int8"]) <= N // 2
