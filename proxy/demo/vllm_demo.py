"""``shadowproxy demo --llm``: chat completions, streamed, on real vLLM servers through a proxy.

The three servers of ``vllm_trio`` (fp32 reference, bf16 candidate, fp32 twin as the noise
floor) behind a proxy of their own (one proxy fronts one reference server), an embedded Redis
under the state directory, and the official ``openai`` client streaming greedy chat
completions with the top-3 logprobs per token. Needs vLLM's venv (``make vllm``): it takes
about five minutes to install once, which is why this part is opt-in.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from pathlib import Path
from typing import Any

from ..app import ProxyRunner
from ..settings import settings_from_mapping
from ..vllmserver import VllmError, find_vllm
from .corpus import sentences
from .report import print_report
from .runner import collect_results
from .vllm_trio import MODEL_NAME, start_servers, tiny_llama_dir

COMPARISONS: dict[str, Any] = {
    "*": {"*": {"metric": "auto"}},
    # Greedy answers: a word changed is a different answer.
    MODEL_NAME: {"text": {"min_similarity": 0.999}},
}


async def _chat(client: Any, prompt: str) -> str:
    stream = await client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=16,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        stream=True,
    )
    pieces = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return "".join(pieces)


async def run_vllm_demo(n_requests: int, state_dir: Path) -> int:
    import openai

    # The client logs every request at INFO; the report says what matters.
    for name in ("httpx", "httpx2", "openai"):
        logging.getLogger(name).setLevel(logging.WARNING)
    started = time.monotonic()
    try:
        find_vllm()
    except VllmError as exc:
        print(f"[demo --llm] {exc}\nBuild vLLM's venv once with `make vllm` (about 5 minutes).")
        return 2
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    print("[demo --llm] writing the tiny Llama (cached) and starting three vLLMs ...")
    model_dir = await asyncio.to_thread(tiny_llama_dir)
    servers = await asyncio.to_thread(start_servers, model_dir, state_dir / "vllm")
    try:
        print(f"[demo --llm] vLLM ready ({time.monotonic() - started:.0f}s)")
        settings = settings_from_mapping(
            {
                "listen": {"host": "127.0.0.1", "port": 0},
                "admin": {"host": "127.0.0.1", "port": 0, "token": secrets.token_urlsafe(16)},
                "reference": {"name": "vllm-fp32", "url": servers.reference.url},
                "candidates": [
                    {"name": "vllm-bf16", "url": servers.candidate.url},
                    {"name": "vllm-twin", "url": servers.twin.url, "noise_floor": True},
                ],
                "comparisons": COMPARISONS,
                "buffer": {"state_dir": str(state_dir / "redis")},
            },
            "<demo --llm defaults>",
        )
        runner = ProxyRunner(settings)
        await runner.start()
        try:
            client = openai.AsyncOpenAI(
                base_url=f"http://127.0.0.1:{runner.data_port}/v1", api_key="unused"
            )
            run_started = time.time()
            prompts = [" ".join(s.split()[:6]) for s in sentences(n_requests, seed=5)]
            failed = 0
            for prompt in prompts:
                try:
                    await _chat(client, prompt)
                except openai.OpenAIError as exc:
                    failed += 1
                    print(f"  chat completion failed: {exc}")
            print(
                f"[demo --llm] {len(prompts) - failed} streamed chat completions through the "
                f"proxy on 127.0.0.1:{runner.data_port}, {failed} failed; comparing ..."
            )
            await runner.drained(120.0)
            verdicts, tally, coverage = await collect_results(runner, run_started)
            print_report(settings, verdicts, tally, coverage)
            print(f"[demo --llm] done in {time.monotonic() - started:.0f}s")
            return 0 if failed == 0 else 1
        finally:
            await runner.stop()
    finally:
        await asyncio.to_thread(servers.stop)
