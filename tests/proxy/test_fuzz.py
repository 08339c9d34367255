"""A short fuzz of the fast lane's head parser and of the V2 codecs (``loadtest.fuzz`` runs the
same checks for minutes): bad input gets a 4xx, or a close, from the proxy or from aiohttp, never
a 5xx, a hang or a crash, and the proxy serves a normal request after each; the codecs raise
nothing but ``MalformedMessage``."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable
from typing import Any

from loadtest.fuzz_codecs import check_codecs, fuzz_codecs
from loadtest.fuzz_heads import ErrorLog, fuzz_heads
from tests.conftest import make_settings


async def test_fuzzed_heads_get_an_answer_below_500_or_a_close_and_the_proxy_serves_on(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    limits = {"drain_timeout_s": 2, "shed_lag_ms": 0, "mirror_process": False}
    settings = make_settings(
        ref.url,
        redis_url,
        candidates=[{"name": "c", "url": cand.url}],
        proxy=limits | {"head_timeout_s": 1.0, "idle_timeout_s": 2.0},
    )
    proxy = await proxy_factory(settings)
    counts: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    with ErrorLog().installed() as errors:
        # Hypothesis drives from a thread; the proxy runs on this loop meanwhile.
        await loop.run_in_executor(
            None, fuzz_heads, loop, proxy.data_port, 150, counts, errors, 10.0
        )
        assert await proxy.drained(10)
    assert sum(counts.values()) >= 150
    # Both sides of the hand-over were reached: answers from the proxy or aiohttp, and closes.
    assert counts["head 4xx"] and counts["head 2xx"], counts


def test_fuzzed_v2_bodies_decode_or_raise_malformed_message_only() -> None:
    counts: Counter[str] = Counter()
    fuzz_codecs(400, counts)
    assert counts["answer malformed"] and counts["request malformed"], counts


def test_the_fuzzers_own_oracle_takes_a_valid_body() -> None:
    body = b'{"outputs":[{"name":"o","datatype":"FP32","shape":[1],"data":[1.5]}]}'
    assert check_codecs(body, {}) == ("ok", "ok")
