"""SIGHUP: new candidates and users taken on, no connection dropped, no copy lost or counted
twice; keys that need a restart are named, and a broken file changes nothing."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import yaml

from loadtest.procs import free_port
from tests.conftest import ADMIN_TOKEN, finish, serve_process, wait_until

BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[%d]}]}'
NEW_USER_TOKEN = "reloaded-user-token-01"


async def _infer(
    writer: asyncio.StreamWriter, reader: asyncio.StreamReader, k: int, model: bytes = b"m"
) -> int:
    """One request on an open keep-alive connection; its status."""
    body = BODY % k
    writer.write(
        b"POST /v2/models/%s/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (model, len(body), body)
    )
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length")
    )
    await reader.readexactly(length)
    return int(head.split(b" ")[1])


async def test_sighup_adds_a_candidate_and_a_user_on_open_connections(
    fake: Callable[..., Any], redis_url: str, tmp_path: Path
) -> None:
    ref, twin, drifted = await fake(), await fake(), await fake(drift=1.0, delay_s=0.05)
    data_port, admin_port = free_port(), free_port()
    cfg: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": data_port},
        "admin": {"host": "127.0.0.1", "port": admin_port, "token": ADMIN_TOKEN},
        "reference": {"name": "ref", "url": ref.url},
        "candidates": [{"name": "twin", "url": twin.url, "models": ["m"]}],
        "buffer": {"redis_url": redis_url},
        "proxy": {"drain_timeout_s": 5, "shed_lag_ms": 0},
    }
    config = tmp_path / "c.yaml"
    admin = f"http://127.0.0.1:{admin_port}"
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with serve_process(cfg, config) as proc:
        reader, writer = await asyncio.open_connection("127.0.0.1", data_port)
        assert [await _infer(writer, reader, k) for k in range(10)] == [200] * 10

        # A candidate for a model nothing mirrored before: the live side must start copying it.
        cfg["candidates"].append({"name": "drifted", "url": drifted.url, "models": ["m2"]})
        cfg["admin"]["users"] = [{"name": "newbie", "token": NEW_USER_TOKEN, "role": "viewer"}]
        cfg["listen"]["host"] = "0.0.0.0"  # needs a restart: named, not applied
        config.write_text(yaml.safe_dump(cfg))
        proc.send_signal(signal.SIGHUP)
        # Requests keep flowing on the same connection while the mirror process is replaced.
        statuses = [await _infer(writer, reader, k) for k in range(10, 20)]
        async with aiohttp.ClientSession() as s:

            async def summary() -> dict[str, Any]:
                async with s.get(f"{admin}/api/summary", headers=auth) as r:
                    return dict(await r.json())

            await wait_until(
                lambda: _has(summary(), "drifted"), 30, what="the new candidate in the summary"
            )
            statuses += [await _infer(writer, reader, k) for k in range(20, 30)]
            statuses += [await _infer(writer, reader, k, b"m2") for k in range(30, 40)]
            assert statuses == [200] * 30
            await wait_until(lambda: drifted.behaviour.calls == 10, 20, what="copies to drifted")
            async with s.get(
                f"{admin}/api/me", headers={"Authorization": f"Bearer {NEW_USER_TOKEN}"}
            ) as r:
                assert r.status == 200 and (await r.json())["user"] == "newbie"

            # Every copy to the twin, before, during and after the swap, counted once.
            seen: list[Any] = []

            async def twin_settled() -> Any:
                cov = (await summary())["coverage"]["twin"]
                seen.append(cov)
                return cov if cov["compared"] == 30 else None

            try:
                twin_cov = await wait_until(twin_settled, 30, what="30 twin copies compared")
            except AssertionError:
                raise AssertionError(f"{seen[-1]}; twin calls {twin.behaviour.calls}") from None
            assert twin_cov["sampled"] == 30 and twin.behaviour.calls == 30

            # A file that does not load changes nothing.
            config.write_text("reference: {name: ref}\n")
            proc.send_signal(signal.SIGHUP)
            assert await _infer(writer, reader, 99) == 200
        writer.close()
        log = await finish(proc)
    assert proc.returncode == 0, log
    assert "applied admin.users, candidates" in log, log
    assert "changed but kept until a restart: listen" in log, log
    assert "reference.url: required key is missing" in log and "still running" in log, log


async def _has(summary: Any, name: str) -> bool:
    data = await summary
    return any(c["name"] == name for c in data["candidates"]) and name in data["coverage"]
