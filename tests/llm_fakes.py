"""The deterministic streaming LLM servers of ``loadtest.llm_backend`` as a test fixture.

Imported by the test modules that use it (``from tests.llm_fakes import llm``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import pytest

from loadtest.llm_backend import LlmBackend, LlmBehaviour


@pytest.fixture
async def llm() -> AsyncIterator[Callable[..., Any]]:
    """Start servers: ``await llm(diverge_at=2, mode="hang", delay_s=...)``."""
    servers: list[LlmBackend] = []

    async def start(**kw: Any) -> LlmBackend:
        server = LlmBackend(LlmBehaviour(**kw))
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.close()


async def post_json(url: str, path: str, body: dict[str, Any]) -> tuple[int, str, bytes]:
    """(status, content type, body bytes as sent: never decompressed)."""
    async with (
        aiohttp.ClientSession(auto_decompress=False) as s,
        s.post(url + path, json=body) as r,
    ):
        return r.status, r.headers.get("Content-Type", ""), await r.read()
