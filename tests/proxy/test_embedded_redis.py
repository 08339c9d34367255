"""The embedded Redis keeps its data under the state directory across restarts."""

from __future__ import annotations

from pathlib import Path

import redis

from proxy.buffer.embedded import EmbeddedRedis, running_url


def test_data_survives_a_restart_and_the_address_is_published(tmp_path: Path) -> None:
    first = EmbeddedRedis(tmp_path)
    first.start()
    assert running_url(tmp_path) == first.url  # how `shadowproxy review` finds it
    client = redis.Redis.from_url(first.url)
    client.set("sample", b"kept")
    client.close()
    first.stop()
    assert running_url(tmp_path) is None
    second = EmbeddedRedis(tmp_path)  # a new port, the same data
    second.start()
    try:
        client = redis.Redis.from_url(second.url)
        assert client.get("sample") == b"kept"
        client.close()
    finally:
        second.stop()
