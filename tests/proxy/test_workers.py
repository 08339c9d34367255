"""``serve --workers N``: N processes on one port, one shared Redis, all stopped by one signal."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from loadtest.procs import descendants, free_port
from proxy.buffer.embedded import running_url
from tests.conftest import ADMIN_TOKEN, finish, serve_process, wait_until

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")

BODY = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}'


def tcp_peers(pid: int, *, listening: bool = False) -> set[tuple[int, int]]:
    """(local port, remote port) of each TCP socket that process ``pid`` holds open: its
    connections, or with ``listening`` its listening sockets."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    found = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[9] in inodes and (fields[3] == "0A") == listening:  # 0A: LISTEN
            found.add((int(fields[1].split(":")[1], 16), int(fields[2].split(":")[1], 16)))
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[int, set[int]]]:
    """A V2 reference that records the source port of every request it answers."""
    seen: set[int] = set()

    async def infer(request: web.Request) -> web.Response:
        await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        if peer:
            seen.add(int(peer[1]))
        return web.json_response({"outputs": []})

    async def ready(request: web.Request) -> web.Response:
        return web.Response()

    app = web.Application()
    app.router.add_post("/v2/models/{model}/infer", infer)
    app.router.add_get("/v2/health/ready", ready)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield port, seen
    await runner.cleanup()


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if Path(f"/proc/{p}").exists()]


async def test_workers_share_the_port_and_one_redis_and_stop_together(
    upstream: tuple[int, set[int]], tmp_path: Path
) -> None:
    ref_port, seen = upstream
    data_port, admin_port = free_port(), free_port()
    config: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": data_port},
        "admin": {"host": "127.0.0.1", "port": admin_port, "token": ADMIN_TOKEN},
        "reference": {"name": "ref", "url": f"http://127.0.0.1:{ref_port}"},
        "buffer": {"state_dir": str(tmp_path / "state")},  # embedded Redis
        "proxy": {"drain_timeout_s": 2},
    }
    async with serve_process(config, tmp_path / "c.yaml", "--workers", "2") as proc:
        tree = descendants(proc.pid)
        workers = [p for p in tree if cmdline(p) == cmdline(proc.pid) and p != proc.pid]
        redis = [p for p in tree if "redis-server" in cmdline(p)]
        assert len(workers) == 2, [cmdline(p) for p in tree]
        assert len(redis) == 1, "the parent starts one embedded Redis for all workers"
        assert tcp_peers(redis[0], listening=True) == set(), "the embedded Redis listens on TCP"
        # One worker answering is not both: wait until each listens on the shared data port.
        await wait_until(
            lambda: all((data_port, 0) in tcp_peers(p, listening=True) for p in workers),
            timeout_s=60,
            interval_s=0.1,
            what="both workers listening on the data port",
        )
        # Each request on its own connection, so the kernel spreads them over both workers.
        for _ in range(60):
            async with (
                aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
                s.post(f"http://127.0.0.1:{data_port}/v2/models/m/infer", data=BODY) as r,
            ):
                assert r.status == 200
        for pid in workers:
            answered = {local for local, remote in tcp_peers(pid) if remote == ref_port}
            assert answered & seen, f"worker {pid} forwarded none of the requests"
        # Both workers hold a connection to the one Redis (its unix socket, with the password).
        url = running_url(tmp_path / "state")
        assert url is not None
        client = aioredis.Redis.from_url(url)
        try:
            others = len(await client.client_list()) - 1
        finally:
            await client.aclose()
        assert others >= len(workers), f"{others} clients on the Redis"

        # SIGHUP to the parent: each worker reloads the file (a new user here), and the Redis
        # the parent started still counts as the one the file means (no restart asked for).
        config["admin"]["users"] = [{"name": "newbie", "token": "reloaded-user-token-01"}]
        await asyncio.to_thread((tmp_path / "c.yaml").write_text, yaml.safe_dump(config))
        proc.send_signal(signal.SIGHUP)
        # Slow polls: each refused try counts against the address's auth failure limit.
        await wait_until(lambda: _all_know(admin_port, "reloaded-user-token-01"), 30, 0.5)
        output = await finish(proc)
    assert proc.returncode == 0, output
    assert output.count("applied admin.users") == len(workers), output
    assert "kept until a restart" not in output, output
    assert not alive(tree), "a worker or Redis outlived the parent"


def test_workers_zero_or_a_free_port_is_a_clear_error(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(
        f"reference: {{name: ref, url: 'http://127.0.0.1:1'}}\nadmin: {{token: {ADMIN_TOKEN}}}\n"
        "listen: {port: 0}\n"
    )
    base = [sys.executable, "-m", "proxy", "serve", "--config", str(config), "--workers"]
    zero = subprocess.run([*base, "0"], capture_output=True, text=True, timeout=60)
    assert zero.returncode == 2 and "--workers: must be at least 1, got 0" in zero.stderr
    shared = subprocess.run([*base, "2"], capture_output=True, text=True, timeout=60)
    assert shared.returncode == 2, shared.stderr
    assert "listen.port: 0 (any free port) cannot be shared by --workers" in shared.stderr


async def _all_know(admin_port: int, token: str) -> bool:
    """Ten new connections in a row (spread over the workers) accept ``token``."""
    for _ in range(10):
        async with (
            aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as s,
            s.get(
                f"http://127.0.0.1:{admin_port}/api/me",
                headers={"Authorization": f"Bearer {token}"},
            ) as r,
        ):
            if r.status != 200:
                return False
    return True
