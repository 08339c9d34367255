"""Redis Sentinel and Redis Cluster URLs: the sample store, the canary's check-and-set, sessions
and a whole proxy on real deployments (``tests/redis_deployments.py``), the same operations as
on one server; keys of one object in one cluster slot, objects spread over the nodes; malformed
URLs refused with a message that names the fault and hides the password."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis
from redis.asyncio.cluster import RedisCluster

from proxy.buffer.connect import parse_deployment, redacted, redis_client
from proxy.buffer.keys import REPLAY_MARKER_TTL_S, KeySchema
from proxy.buffer.records import RecordWriter, encode
from proxy.buffer.store import SampleStore
from proxy.canary.state import CanaryStore, Change, Decision, RolloutState, add_evidence
from proxy.errors import ConfigError, StoreError
from proxy.settings import BufferSettings
from tests.conftest import ADMIN_TOKEN, make_settings, send_infers, wait_until
from tests.proxy.test_retention import _record
from tests.redis_deployments import (
    MASTER_PASSWORD,
    SENTINEL_DB,
    ClusterDeployment,
    redis_cluster,  # noqa: F401
    redis_sentinel,  # noqa: F401
    start_sentinel,
)


@pytest.fixture(params=["sentinel", "cluster"])
def deployment_url(request: pytest.FixtureRequest) -> str:
    """The URL of a deployment, emptied for this test."""
    deployment = request.getfixturevalue(f"redis_{request.param}")
    deployment.flush()
    return str(deployment.url)


@pytest.fixture
async def store(deployment_url: str) -> AsyncIterator[SampleStore]:
    store = SampleStore.from_url(deployment_url, BufferSettings(flagged_index_max=100), spool=False)
    yield store
    await store.close()


async def test_the_store_records_lists_labels_and_deletes(store: SampleStore) -> None:
    (meta, payloads), (alone, _) = _record(), _record(flagged=False)
    await store.record_many([(meta, payloads), (alone, None)])
    sid = meta["id"]
    assert [i["id"] for i in await store.list_samples(flagged=True)] == [sid]
    assert [v["id"] for v in await store.list_samples(flagged=False)] == [alone["id"], sid]
    assert await store.stats() == {"c|compared": 2}
    sample = await store.get_sample(sid)
    assert sample is not None and sample["payloads"]["request"] == b"{}"
    await store.label(sid, "regression", "looks off", "rita")
    (listed,) = await store.list_samples(flagged=True)
    assert listed["label"]["verdict"] == "regression"
    labelled = await store.get_sample(sid)
    assert labelled is not None and labelled["label"]["note"] == "looks off"
    assert await store.delete(sid)
    assert await store.list_samples(flagged=True) == []
    assert await store.get_sample(sid) is None
    assert not await store.delete(sid)


async def test_a_replayed_or_half_written_batch_is_stored_once(store: SampleStore) -> None:
    settings = BufferSettings()
    batch = [
        encode(*_record(), settings, store.keys),
        encode(_record()[0], None, settings, store.keys),
    ]
    writer = RecordWriter(store.redis, settings, store.keys)
    if isinstance(store.redis, RedisCluster):
        # A failure right after the samples' own step leaves them stored but not listed, not
        # counted: the replay completes them.
        await writer.write_samples([r for r in batch if r.meta is not None])
    for _ in range(2):
        await writer.write(batch, replay=REPLAY_MARKER_TTL_S, extra=Counter())
    assert len(await store.list_samples(flagged=True)) == 1
    assert len(await store.list_samples(flagged=False)) == 2
    assert await store.stats() == {"c|compared": 2}


async def test_trimming_the_index_deletes_the_trimmed_samples_and_spares_labelled_ones(
    store: SampleStore,
) -> None:
    oldest = [_record() for _ in range(3)]
    await store.record_many(oldest)
    await store.label(oldest[0][0]["id"], "acceptable", "", "rita")
    await store.record_many([_record() for _ in range(100)])
    listed = {i["id"] for i in await store.list_samples(flagged=True, limit=200)}
    assert len(listed) == 100
    assert oldest[0][0]["id"] in listed
    for meta, _ in oldest[1:]:
        assert meta["id"] not in listed
        assert await store.get_sample(meta["id"]) is None  # no orphan hash left behind


def _advance(by: str, seen: list[tuple[str, int]]) -> Callable[[RolloutState | None], Change]:
    """A controller's step: from step 0 to 1, once; any later look changes nothing."""

    def change(current: RolloutState | None) -> Change:
        assert current is not None
        seen.append((by, current.step))
        if current.step != 0:
            return None
        return replace(current, step=1, updated_at=time.time()), Decision("advanced", "ok", by)

    return change


def _other_replica(url: str, seen: list[tuple[str, int]]) -> None:
    """Another replica's whole update, on a loop and a client of its own."""

    async def run() -> None:
        client = redis_client(url)
        try:
            await CanaryStore(client, KeySchema(), "roll").update(_advance("b", seen))
        finally:
            await client.aclose()

    asyncio.run(run())


async def test_two_canary_writers_race_and_one_wins(deployment_url: str) -> None:
    client = redis_client(deployment_url)
    store = CanaryStore(client, KeySchema(), "roll")
    now = time.time()
    start = RolloutState("roll", "cand", (10.0, 50.0, 100.0), "running", 0, 1, now, now)
    seen: list[tuple[str, int]] = []
    mine = _advance("a", seen)

    def raced(current: RolloutState | None) -> Change:
        # The other replica writes between this one's read (under WATCH) and its MULTI/EXEC.
        if not seen:
            thread = threading.Thread(target=_other_replica, args=(deployment_url, seen))
            thread.start()
            thread.join()
        return mine(current)

    try:
        await store.update(lambda _: (start, Decision("started", "test")))
        state, decision = await store.update(raced)
        assert decision is None  # its EXEC failed; on the retry there was nothing left to do
        assert state is not None and state.step == 1
        assert seen == [("b", 0), ("a", 0), ("a", 1)]
        assert [(d["outcome"], d["by"]) for d in await store.decisions()] == [
            ("started", "controller"),
            ("advanced", "b"),
        ]
        # Two steps' evidence in one transaction: the rollout's keys share its slot.
        await add_evidence(
            client, KeySchema(), {("roll", 1, 0): {"n": 2}, ("roll", 1, 1): {"n": 3}}, 2
        )
        assert [await store.evidence(1, step) for step in (0, 1)] == [{"n": 2}, {"n": 3}]
    finally:
        await client.aclose()


async def test_a_proxy_mirrors_stores_and_serves_a_browser_session(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], deployment_url: str
) -> None:
    ref, drifted = await fake(), await fake(drift=1.0)
    proxy = await proxy_factory(
        make_settings(ref.url, deployment_url, candidates=[{"name": "c", "url": drifted.url}])
    )
    await send_infers(proxy, ["req-0"])
    flagged = await wait_until(lambda: proxy.store.list_samples(flagged=True), what="the sample")
    assert [i["request_id"] for i in flagged] == ["req-0"]
    sid = flagged[0]["id"]
    base = f"http://127.0.0.1:{proxy.admin_port}"
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        async with s.post(f"{base}/login", json={"token": ADMIN_TOKEN}) as r:
            assert r.status == 200
            csrf = {"X-CSRF-Token": (await r.json())["csrf"]}
        async with s.get(f"{base}/api/samples?flagged=1") as r:
            assert r.status == 200 and [i["id"] for i in await r.json()] == [sid]
        label = {"verdict": "regression"}
        async with s.post(f"{base}/api/samples/{sid}/label", json=label, headers=csrf) as r:
            assert r.status == 200
        async with s.get(f"{base}/api/samples/{sid}") as r:
            assert r.status == 200 and (await r.json())["label"]["verdict"] == "regression"
        async with s.delete(f"{base}/api/samples/{sid}", headers=csrf) as r:
            assert r.status == 200
        async with s.post(f"{base}/logout", headers=csrf) as r:
            assert r.status == 200
        async with s.get(f"{base}/api/samples?flagged=1") as r:
            assert r.status == 401  # the session is gone from Redis


async def test_an_objects_keys_share_a_slot_and_objects_spread_over_the_nodes(
    redis_cluster: ClusterDeployment,  # noqa: F811
) -> None:
    redis_cluster.flush()
    store = SampleStore.from_url(redis_cluster.url, BufferSettings(), spool=False)
    records = [_record() for _ in range(24)]
    try:
        await store.record_many(records)
        await store.label(records[0][0]["id"], "acceptable", "", "rita")
    finally:
        await store.close()
    keys = store.keys
    with redis_cluster.node(redis_cluster.ports[0]) as node:

        def slots(*names: str) -> set[int]:
            return {int(node.execute_command("CLUSTER KEYSLOT", k)) for k in names}

        rollout = [keys.canary("r"), keys.canary_decisions("r"), keys.canary_evidence("r", 2, 1)]
        assert len(slots(*rollout)) == 1
        index = [keys.verdicts, keys.flagged, keys.kept, keys.labels, keys.stats]
        assert len(slots(*index, keys.replayed("x"))) == 1
        for meta, _ in records:
            assert slots(keys.sample(meta["id"])) == slots(meta["id"])  # tagged by its id
        assert len(slots(*(keys.canary(f"r{i}") for i in range(8)))) > 1
        assert len(slots(*(keys.session(f"s{i}") for i in range(8)))) > 1
    held = {}
    for port in redis_cluster.ports:
        with redis_cluster.node(port) as c:
            held[port] = sum(1 for _ in c.scan_iter(match=keys.sample("*"), count=100))
    assert sum(held.values()) == 24
    assert sum(1 for n in held.values() if n) >= 2, held


@pytest.mark.parametrize(
    ("url", "fault"),
    [
        ("redis+sentinel://:hunter2@h1:26379", "the service name"),
        ("redis+sentinel://:hunter2@h1:26379/svc/x", "db a number"),
        ("redis+sentinel://:hunter2@h1:26379/svc/1/2", "db a number"),
        ("redis+sentinel://:hunter2@h1:abc/svc", "port 'abc' of h1"),
        ("redis+sentinel://:hunter2@h1/svc?socket_timeout=soon", "'socket_timeout'"),
        ("redis+sentinel://:hunter2@h1/svc?db=2", "database in the path"),
        ("redis+cluster://:hunter2@h1:7000/2", "database 0 only"),
        ("redis+cluster://:hunter2@/0", "a host is missing"),
        ("redis+cluster://:hunter2@h1,,h2", "a host is missing"),
        ("redis+cluster://:hunter2@h1:70000", "port '70000'"),
        ("redis+cluster://:hunter2@h1?sentinel_password=hunter2", "for redis+sentinel"),
        ("memcached://:hunter2@h1", "unknown scheme 'memcached'"),
        ("h1:6379", "no scheme"),
        ("redis://:hunter2@h1:99999/0", "Port out of range"),
    ],
)
def test_a_malformed_url_says_what_is_wrong_and_hides_the_password(url: str, fault: str) -> None:
    with pytest.raises(ConfigError) as err:
        redis_client(url)
    assert fault in str(err.value)
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match=r"^buffer\.redis_url: invalid Redis URL"):
        SampleStore.from_url(url, BufferSettings(), spool=False)


def test_urls_parse_into_redis_pys_arguments() -> None:
    sentinel = parse_deployment(
        "rediss+sentinel://u:p@[::1]:5000,h2/svc/2"
        "?sentinel_password=sp&socket_timeout=3&ssl_cert_reqs=none"
    )
    assert sentinel.hosts == (("::1", 5000), ("h2", 26379))
    assert sentinel.service == "svc"
    assert sentinel.options == {
        "username": "u",
        "password": "p",
        "db": 2,
        "ssl": True,
        "socket_timeout": 3.0,
        "ssl_cert_reqs": "none",
    }
    assert sentinel.sentinel_options == {"password": "sp", "ssl": True, "ssl_cert_reqs": "none"}
    cluster = parse_deployment("redis+cluster://h1,h2:7001")
    assert cluster.hosts == (("h1", 6379), ("h2", 7001)) and cluster.options == {}
    assert redacted("redis+sentinel://u:p@h/svc?sentinel_password=sp&db=1") == (
        "redis+sentinel://u:***@h/svc?sentinel_password=***&db=1"
    )


async def test_the_store_follows_a_sentinel_failover(tmp_path: Path) -> None:
    deployment = await asyncio.to_thread(start_sentinel, tmp_path)
    store = SampleStore.from_url(deployment.url, BufferSettings(write_timeout_s=1), spool=False)
    try:
        before = _record()
        await store.record(*before)
        key = store.keys.sample(before[0]["id"])

        def replicated() -> bool:
            port = deployment.replica_port
            with redis.Redis(port=port, password=MASTER_PASSWORD, db=SENTINEL_DB) as c:
                return bool(c.exists(key))

        await wait_until(lambda: asyncio.to_thread(replicated), what="the replica's copy")
        assert await asyncio.to_thread(deployment.fail_over) == deployment.replica_port
        after = _record()

        async def written() -> bool:
            try:
                await store.record(*after)
            except StoreError:
                return False  # a connection to the dead master, dropped: the next one asks
            return True

        await wait_until(written, 15, 0.2, what="a write to the new master")
        listed = {i["id"] for i in await store.list_samples(flagged=True)}
        assert listed == {before[0]["id"], after[0]["id"]}
    finally:
        await store.close()
        await asyncio.to_thread(deployment.servers.stop)
