"""The embedded Redis keeps its data under the state directory across restarts, and nobody but
its user can reach it: a unix socket only, a password, private files."""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import AuthenticationError, ResponseError

from proxy.buffer.embedded import PASSWORD_FILE, EmbeddedRedis, running_url
from tests.conftest import make_settings, send_infers, wait_until

pytestmark = pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")


def listening_tcp_ports(pid: int) -> set[int]:
    """Local ports of the TCP sockets process ``pid`` listens on (IPv4 and IPv6)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        target = os.readlink(fd)
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[9] in inodes and fields[3] == "0A":  # 0A: LISTEN
                ports.add(int(fields[1].rsplit(":", 1)[1], 16))
    return ports


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path / "state")
    server.start()
    yield server
    server.stop()


def test_data_survives_a_restart_and_the_address_is_published(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    first.start()
    assert running_url(tmp_path) == first.url  # how `shadowproxy review` finds it
    client = redis.Redis.from_url(first.url)
    client.set("sample", b"kept")
    client.close()
    first.stop()
    assert running_url(tmp_path) is None
    second = EmbeddedRedis(tmp_path)  # the same password, the same data
    second.start()
    try:
        assert second.url == first.url
        client = redis.Redis.from_url(second.url)
        assert client.get("sample") == b"kept"
        client.close()
    finally:
        second.stop()


async def test_the_asyncio_client_takes_its_url(embedded: EmbeddedRedis) -> None:
    # The URL the proxy, its mirror and compare workers and the CLI use, through their client.
    client = aioredis.Redis.from_url(embedded.url)
    assert await client.ping()  # type: ignore[misc]  # redis-py types it sync-or-async
    await client.aclose()


def test_only_a_unix_socket_with_the_password_reaches_it(embedded: EmbeddedRedis) -> None:
    assert embedded.pid is not None and embedded.socket_path is not None
    assert stat.S_ISSOCK(embedded.socket_path.stat().st_mode)
    assert listening_tcp_ports(embedded.pid) == set()
    stranger = redis.Redis(unix_socket_path=str(embedded.socket_path))
    with pytest.raises(AuthenticationError):
        stranger.ping()
    with pytest.raises((AuthenticationError, ResponseError)):
        stranger.get("anything")
    stranger.close()
    password = (embedded.state_dir / PASSWORD_FILE).read_text().strip()
    assert len(password) >= 32
    # Not on its command line (any local user may read that), not in its log, not in a repr.
    cmdline = Path(f"/proc/{embedded.pid}/cmdline").read_bytes()
    assert password.encode() not in cmdline
    assert password not in (embedded.state_dir / "redis.log").read_text()
    assert password not in repr(embedded)


def test_its_files_are_private(embedded: EmbeddedRedis) -> None:
    client = redis.Redis.from_url(embedded.url)
    client.set("sample", b"x")
    client.save()  # the snapshot file exists now, beside the append-only file
    client.close()
    state = embedded.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    names = {p.name for p in state.iterdir()}
    assert {"dump.rdb", "appendonly.aof", "redis.log", "redis.json", PASSWORD_FILE} <= names
    assert embedded.socket_path is not None
    for path in [*state.iterdir(), embedded.socket_path]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name


def test_files_from_before_are_made_private_on_start(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o755)
    state.chmod(0o755)
    (state / "redis.log").write_text("an old log\n")
    (state / "redis.log").chmod(0o644)
    server = EmbeddedRedis(state)
    server.start()
    try:
        assert stat.S_IMODE(state.stat().st_mode) == 0o700
        assert stat.S_IMODE((state / "redis.log").stat().st_mode) == 0o600
    finally:
        server.stop()


def test_a_state_dir_too_deep_for_a_socket_path_still_works(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    server = EmbeddedRedis(deep)
    server.start()
    try:
        assert server.socket_path is not None and len(str(server.socket_path)) < 108
        assert stat.S_IMODE(server.socket_path.parent.stat().st_mode) == 0o700
        assert running_url(deep) == server.url
        assert redis.Redis.from_url(server.url).ping()
    finally:
        server.stop()
    assert not server.socket_path.parent.exists()


async def test_the_proxy_and_its_compare_workers_store_through_the_socket(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], tmp_path: Path
) -> None:
    """No ``buffer.redis_url``: the proxy starts the embedded Redis and hands its URL (password
    included) to the mirror process and its compare worker, which store the flagged samples."""
    ref, drifted = await fake(), await fake(drift=0.5)
    settings = make_settings(
        ref.url,
        None,
        candidates=[{"name": "int8", "url": drifted.url}],
        buffer={"state_dir": str(tmp_path / "state"), "write_timeout_s": 3},
        proxy={"drain_timeout_s": 2, "shed_lag_ms": 0, "mirror_process": True},
    )
    proxy = await proxy_factory(settings)
    await send_infers(proxy, ["s0", "s1"])
    flagged = await wait_until(
        lambda: proxy.store.list_samples(flagged=True, candidate="int8"), what="samples stored"
    )
    assert sorted(s["request_id"] for s in flagged) == ["s0", "s1"]
    # What `shadowproxy review` would connect to while the proxy runs.
    url = running_url(tmp_path / "state")
    assert url is not None and url.startswith("unix://")
    client = aioredis.Redis.from_url(url)
    assert await client.exists(proxy.store.keys.sample(flagged[0]["id"]))
    await client.aclose()
