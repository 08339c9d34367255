"""A client sending malformed requests gets its 400s; the log does not grow with its rate."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loadtest.procs import free_port
from tests.conftest import ADMIN_TOKEN, finish, serve_process

BAD = 60


async def test_malformed_requests_are_answered_400_and_logged_in_one_line_a_second(
    fake: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    ref = await fake()
    data_port = free_port()
    config = {
        "listen": {"host": "127.0.0.1", "port": data_port},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token": ADMIN_TOKEN},
        "reference": {"name": "ref", "url": ref.url},
        "buffer": {"redis_url": redis_url},
    }
    async with serve_process(config, tmp_path / "c.yaml") as proc:
        for _ in range(BAD):
            # A bare LF inside the head: the fast lane hands it to aiohttp's strict parser.
            reader, writer = await asyncio.open_connection("127.0.0.1", data_port)
            writer.write(b"GET /v2/health/ready HTTP/1.1\r\nHost: x\nX-A: b\r\n\r\n")
            status_line = await reader.readline()
            writer.close()
            assert status_line.split(b" ")[1] == b"400", status_line
        output = await finish(proc)
    assert proc.returncode == 0, output
    lines = [line for line in output.splitlines() if "malformed request answered 400" in line]
    assert 1 <= len(lines) < BAD // 4, output
    assert "Traceback" not in output, output
