"""A deterministic streaming LLM server: OpenAI-compatible and Triton generate, over SSE.

For the bench's time-to-first-event figures (vLLM's own jitter would hide a millisecond) and
for the tests' byte-exact stream checks and staged faults. Its answer is a function of the
prompt alone: the same request gives the same bytes (``id`` and ``created`` included), so a
stream through the proxy can be compared byte for byte with one read directly. Events are
framed as vLLM frames them (``data: {json}\\n\\n``, a role chunk first for chat, a usage chunk
when asked, ``data: [DONE]``); Triton generate streams one ``data:`` event per token.

Faults (``LlmBehaviour.mode``): ``garbage`` (a 200 event stream of bytes that are not events),
``cut`` (stops mid-event and closes), ``hang`` (the first event, then nothing), ``error`` (an
in-stream error event after the first token); ``diverge_at`` swaps the token at that position
for another (a planted divergence, with logprobs that say so).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

_WORDS = [
    "the",
    "model",
    "answers",
    "every",
    "request",
    "with",
    "a",
    "short",
    "sentence",
    "about",
    "data",
    "shadow",
    "traffic",
    "quality",
    "review",
    "canary",
    "rollout",
    "latency",
    "tokens",
    "stream",
    "event",
    "server",
    "client",
    "proxy",
    "compare",
]
_TOP_K = 3


@dataclass
class LlmBehaviour:
    mode: str = "ok"  # ok | garbage | cut | hang | error
    delay_s: float = 0.0
    """Between two events (the first comes at once)."""
    tokens: int = 8
    diverge_at: int | None = None
    sample_seed: int | None = None
    """Set: with ``temperature`` > 0 in a request, about a third of the tokens are the runner-up
    instead, chosen by this seed and the prompt, so two servers of one model sample apart.
    Unset, the temperature is ignored (every answer is the prompt's)."""
    calls: int = 0
    cancelled: int = 0
    """Streams whose client went away before the end."""
    seen_bodies: list[dict[str, Any]] = field(default_factory=list)


def _prompt_of(body: dict[str, Any]) -> str:
    if "messages" in body:
        return json.dumps(body["messages"], sort_keys=True)
    return str(body.get("prompt", body.get("text_input", "")))


def tokens_for(
    prompt: str, n: int, diverge_at: int | None = None, sampled_by: int | None = None
) -> list[tuple[str, float]]:
    """(token, logprob) for ``n`` tokens, from the prompt alone (and, when sampling, a seed)."""
    seed = hashlib.blake2b(prompt.encode(), digest_size=8).digest()
    rng = random.Random(f"{sampled_by}:{prompt}") if sampled_by is not None else None
    out = []
    for i in range(n):
        h = hashlib.blake2b(seed + i.to_bytes(4, "big"), digest_size=4).digest()
        word = _WORDS[h[0] % len(_WORDS)]
        lp = -0.05 - (h[1] / 255.0)
        if (diverge_at is not None and i == diverge_at) or (rng and rng.random() < 0.3):
            word = _WORDS[(h[0] + 1) % len(_WORDS)]  # the runner-up of _top below
            lp = -1.5
        out.append((" " + word, round(lp, 4)))
    return out


def _top(token: str, lp: float) -> list[tuple[str, float]]:
    word = token.strip()
    i = _WORDS.index(word) if word in _WORDS else 0
    alts = [(" " + _WORDS[(i + j) % len(_WORDS)], round(lp - 1.0 * j, 4)) for j in range(1, _TOP_K)]
    return [(token, lp), *alts]


class LlmBackend:
    def __init__(self, behaviour: LlmBehaviour | None = None, name: str = "fake-llm") -> None:
        self.behaviour = behaviour or LlmBehaviour()
        self.name = name
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self, port: int = 0) -> str:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._openai)
        app.router.add_post("/v1/completions", self._openai)
        app.router.add_post("/v2/models/{model}/generate", self._generate)
        app.router.add_post("/v2/models/{model}/generate_stream", self._generate)
        app.router.add_post("/v1/embeddings", self._embeddings)
        app.router.add_get("/v2/health/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", port)
        await site.start()
        assert site._server is not None
        sock = site._server.sockets[0]  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _embeddings(self, request: web.Request) -> web.Response:
        """One unit vector of 32 per input, from the text; ``diverge_at`` tilts every vector."""
        body = await request.json()
        b = self.behaviour
        b.calls += 1
        b.seen_bodies.append(body)
        texts = body["input"] if isinstance(body["input"], list) else [body["input"]]
        data = []
        for i, text in enumerate(texts):
            seed = hashlib.blake2b(str(text).encode(), digest_size=32).digest()
            vector = [x / 255.0 - 0.5 for x in seed]
            if b.diverge_at is not None:
                vector[b.diverge_at % 32] += 0.5
            norm = sum(x * x for x in vector) ** 0.5
            data.append(
                {"object": "embedding", "index": i, "embedding": [x / norm for x in vector]}
            )
        usage = {"prompt_tokens": len(texts), "total_tokens": len(texts)}
        model = body.get("model", self.name)
        return web.json_response({"object": "list", "data": data, "model": model, "usage": usage})

    def _sampling(self, body: dict[str, Any]) -> int | None:
        params = body.get("parameters") or {}
        temperature = body.get("temperature", params.get("temperature")) or 0
        seed = self.behaviour.sample_seed
        return seed if seed is not None and temperature > 0 else None

    async def _ready(self, request: web.Request) -> web.Response:
        return web.Response(status=200)

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        b = self.behaviour
        b.calls += 1
        b.seen_bodies.append(body)
        chat = request.path.endswith("chat/completions")
        n = int(body.get("max_tokens") or b.tokens)
        toks = tokens_for(_prompt_of(body), n, b.diverge_at, self._sampling(body))
        want_lp = bool(body.get("logprobs"))
        model = body.get("model", self.name)
        base = {"id": "cmpl-fixed", "created": 1700000000, "model": model}
        usage = {"prompt_tokens": len(_prompt_of(body)) // 4 + 1, "completion_tokens": n}
        usage["total_tokens"] = usage["prompt_tokens"] + n
        if not body.get("stream"):
            text = "".join(t for t, _ in toks)
            choice: dict[str, Any] = {"index": 0, "finish_reason": "length"}
            if chat:
                choice["message"] = {"role": "assistant", "content": text}
                if want_lp:
                    choice["logprobs"] = {"content": [_chat_lp(t, lp) for t, lp in toks]}
            else:
                choice["text"] = text
                if want_lp:
                    choice["logprobs"] = _completion_lp(toks)
            obj = "chat.completion" if chat else "text_completion"
            return web.json_response({**base, "object": obj, "choices": [choice], "usage": usage})
        obj = "chat.completion.chunk" if chat else "text_completion"
        events: list[dict[str, Any]] = []
        if chat:
            delta = {"role": "assistant", "content": ""}
            events.append({**base, "object": obj, "choices": [{"index": 0, "delta": delta}]})
        for i, (tok, lp) in enumerate(toks):
            last = i == len(toks) - 1
            c: dict[str, Any] = {"index": 0, "finish_reason": "length" if last else None}
            if chat:
                c["delta"] = {"content": tok}
                if want_lp:
                    c["logprobs"] = {"content": [_chat_lp(tok, lp)]}
            else:
                c["text"] = tok
                if want_lp:
                    c["logprobs"] = _completion_lp([(tok, lp)])
            events.append({**base, "object": obj, "choices": [c]})
        if (body.get("stream_options") or {}).get("include_usage"):
            events.append({**base, "object": obj, "choices": [], "usage": usage})
        return await self._sse(request, [json.dumps(e) for e in events] + ["[DONE]"])

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        b = self.behaviour
        b.calls += 1
        b.seen_bodies.append(body)
        model = request.match_info["model"]
        params = body.get("parameters") or {}
        n = int(params.get("max_tokens") or body.get("max_tokens") or b.tokens)
        toks = tokens_for(_prompt_of(body), n, b.diverge_at, self._sampling(body))
        base = {"model_name": model, "model_version": "1"}
        if not request.path.endswith("_stream"):
            text = "".join(t for t, _ in toks)
            lps = [lp for _, lp in toks]
            return web.json_response(
                {**base, "text_output": text, "logprobs": lps, "finish_reason": "length"}
            )
        events = []
        for i, (tok, lp) in enumerate(toks):
            event = {**base, "text_output": tok, "logprobs": [lp]}
            if i == len(toks) - 1:
                event["finish_reason"] = "length"
            events.append(json.dumps(event))
        return await self._sse(request, events)

    async def _sse(self, request: web.Request, events: list[str]) -> web.StreamResponse:
        b = self.behaviour
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            if b.mode == "garbage":
                await resp.write(b"\x00\xffnot an event stream\r\n\x01\x02")
                await resp.write_eof()
                return resp
            for i, data in enumerate(events):
                if i and b.delay_s:
                    await asyncio.sleep(b.delay_s)
                if b.mode == "cut" and i == len(events) // 2:
                    await resp.write(f"data: {data[: len(data) // 2]}".encode())
                    assert request.transport is not None
                    request.transport.close()
                    return resp
                if b.mode == "error" and i == 1:
                    await resp.write(b'data: {"error": {"message": "engine died"}}\n\n')
                    await resp.write_eof()
                    return resp
                await resp.write(f"data: {data}\n\n".encode())
                if b.mode == "hang":
                    await asyncio.sleep(3600)
            await resp.write_eof()
        except ConnectionResetError:
            b.cancelled += 1  # the client went away: nothing more to send
        except asyncio.CancelledError:
            b.cancelled += 1
            raise
        return resp


def _chat_lp(tok: str, lp: float) -> dict[str, Any]:
    top = [{"token": t, "logprob": v, "bytes": list(t.encode())} for t, v in _top(tok, lp)]
    return {"token": tok, "logprob": lp, "bytes": list(tok.encode()), "top_logprobs": top}


def _completion_lp(toks: list[tuple[str, float]]) -> dict[str, Any]:
    return {
        "tokens": [t for t, _ in toks],
        "token_logprobs": [lp for _, lp in toks],
        "top_logprobs": [dict(_top(t, lp)) for t, lp in toks],
        "text_offset": [0] * len(toks),
    }


def main() -> None:
    """``python -m loadtest.llm_backend --port P [--delay-ms D] [--diverge-at K]``: serve until
    killed (the bench runs it in a process of its own, off its client's loop)."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay-ms", type=float, default=0.0)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--diverge-at", type=int, default=None)
    args = parser.parse_args()
    behaviour = LlmBehaviour(
        delay_s=args.delay_ms / 1000, tokens=args.tokens, diverge_at=args.diverge_at
    )

    async def serve() -> None:
        backend = LlmBackend(behaviour)
        await backend.start(args.port)
        await asyncio.Event().wait()

    try:
        import uvloop

        uvloop.run(serve())
    except ImportError:
        asyncio.run(serve())


if __name__ == "__main__":
    main()
