"""The demo's LLM part: generated text on the same Triton, over its generate extension.

The reference is ``lm_fp32`` (a tiny word-level language model trained at load time on the demo
corpus, ``deploy/lib/shadowdemo/lm.py``); its candidates are the same weights quantized to int8,
cast to bf16, and a second fp32 instance as the noise floor. Prompts are the first words of the
corpus's sentences, decoded greedily with the top-3 logprobs per token; half go to ``generate``
(one JSON answer), half to ``generate_stream`` (one SSE event per token), all through the proxy.
Both answers of each copy are embedded by the demo's MiniLM for their semantic similarity.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Iterable, Mapping
from typing import Any

import aiohttp

from .corpus import sentences
from .hardware import cpu

LM = "lm_fp32"

LM_CANDIDATES: list[dict[str, Any]] = [
    {"name": "lm-int8", "model_map": {LM: "lm_int8"}, "models": [LM], "hardware": cpu("int8")},
    {"name": "lm-bf16", "model_map": {LM: "lm_bf16"}, "models": [LM], "hardware": cpu("bf16")},
    {
        "name": "lm-noise-floor",
        "model_map": {LM: "lm_fp32_twin"},
        "models": [LM],
        "noise_floor": True,
        "hardware": cpu("fp32"),
    },
]
LM_MODELS = (LM, *(m for c in LM_CANDIDATES for m in c["model_map"].values()))

# Generated text is judged as a reviewer would: a different word is a different answer. The
# twin (bit-identical on a CPU) shows what "normal" is; int8 changes words on some prompts.
LM_COMPARISONS: dict[str, Any] = {LM: {"text": {"min_similarity": 0.999}}}

MAX_TOKENS = 16


def prompts(n: int, seed: int = 11) -> list[str]:
    """The first three to five words of ``n`` corpus sentences: an open end to continue."""
    out = []
    for i, sentence in enumerate(sentences(n, seed)):
        words = sentence.split()
        out.append(" ".join(words[: 3 + i % 3]))
    return out


async def send_llm_traffic(port: int, n: int, concurrency: int = 2) -> dict[str, int]:
    """``n`` prompts through the proxy, alternately to ``generate`` and ``generate_stream``."""
    counts = {"ok": 0, "failed": 0, "generate": 0, "generate_stream": 0}
    queue = list(enumerate(prompts(n)))
    base = f"http://127.0.0.1:{port}/v2/models/{LM}"

    async def worker(session: aiohttp.ClientSession) -> None:
        while queue:
            i, prompt = queue.pop(0)
            route = "generate_stream" if i % 2 else "generate"
            body = {
                "text_input": prompt,
                "max_tokens": MAX_TOKENS,
                "num_logprobs": 3,
                "stream": route == "generate_stream",
            }
            try:
                async with session.post(f"{base}/{route}", json=body) as r:
                    await r.read()
                    ok = r.status == 200
            except aiohttp.ClientError as exc:
                print(f"  LLM request {i} failed: {exc}")
                ok = False
            counts["ok" if ok else "failed"] += 1
            counts[route] += 1

    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return counts


def llm_lines(compared: Iterable[Mapping[str, Any]]) -> list[str]:
    """The LLM summary of one candidate's compared verdicts: text agreement, semantic
    similarity, token KL where logprobs came back, and time to first token per side."""
    exact: list[float] = []
    similarity: list[float] = []
    cosine: list[float] = []
    kl: list[float] = []
    ttft_ref: list[float] = []
    ttft_cand: list[float] = []
    for verdict in compared:
        for out in verdict["outputs"]:
            scores = out["scores"]
            if out["output"] == "text" and out["validity"] == "ok":
                exact.append(scores["exact"])
                similarity.append(scores["similarity"])
            elif out["output"] == "semantic" and out["validity"] == "ok":
                cosine.append(scores["cosine"])
            elif out["output"] == "logprobs":
                kl.append(scores["kl_mean"])
        if "ttft_ms" in verdict["reference"] and "ttft_ms" in verdict["candidate_side"]:
            ttft_ref.append(verdict["reference"]["ttft_ms"])
            ttft_cand.append(verdict["candidate_side"]["ttft_ms"])
    if not exact:
        return []
    lines = [
        f"  text          same answer {sum(exact) / len(exact):.0%} of {len(exact)},"
        f" similarity p50 {statistics.median(similarity):.3f} min {min(similarity):.3f}"
    ]
    if cosine:
        lines.append(
            f"  semantic      cosine p50 {statistics.median(cosine):.4f} min {min(cosine):.4f}"
        )
    if kl:
        lines.append(
            f"  token KL      mean per answer p50 {statistics.median(kl):.2e} max {max(kl):.2e}"
        )
    if ttft_ref:
        lines.append(
            f"  TTFT          reference p50 {statistics.median(ttft_ref):.1f} ms,"
            f" candidate p50 {statistics.median(ttft_cand):.1f} ms"
        )
    return lines
