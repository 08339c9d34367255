"""Session fixtures: a real Redis server, a real Triton server, and proxies on free ports."""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import inspect
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml

from proxy.app import ProxyRunner
from proxy.buffer.embedded import EmbeddedRedis
from proxy.settings import Settings, settings_from_mapping
from tests.fakes import FakeBehaviour, FakeUpstream, start_fake
from tests.triton_fixture import READY_TIMEOUT_S, triton_server  # noqa: F401
from tests.vllm_fixture import vllm_servers  # noqa: F401

ADMIN_TOKEN = "test-admin-token"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Give tests that use the Triton server the server's start-up budget on top of the usual
    bound. pytest-timeout's limit also covers fixture setup, so the test that starts the session's
    Triton would otherwise be killed at ``timeout`` while Triton is still within its own
    READY_TIMEOUT_S, and every later Triton test would error on the cached failure."""
    usual = float(config.getoption("timeout", None) or config.getini("timeout") or 0)
    if not usual:
        return  # no bound configured: nothing to widen
    for item in items:
        uses_triton = "triton_server" in getattr(item, "fixturenames", ())
        if uses_triton and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(READY_TIMEOUT_S + usual))


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def redis_url(redis_server: EmbeddedRedis) -> AsyncIterator[str]:
    """A clean database per test."""
    client = aioredis.Redis.from_url(redis_server.url)
    await client.flushdb()
    await client.aclose()
    yield redis_server.url


@pytest.fixture
async def fake() -> AsyncIterator[Callable[..., Any]]:
    """Start fake upstreams: ``await fake(mode=..., delay_s=..., drift=...)``."""
    runners = []

    async def start(**kw: Any) -> FakeUpstream:
        upstream, runner = await start_fake(FakeBehaviour(**kw))
        runners.append(runner)
        return upstream

    yield start
    for runner in runners:
        await runner.cleanup()


def make_settings(reference_url: str, redis_url: str | None, **overrides: Any) -> Settings:
    data: dict[str, Any] = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0, "token": ADMIN_TOKEN},
        "reference": {"name": "ref", "url": reference_url, "timeout_s": 10},
        # A spool of its own per proxy: what one test leaves there must not reach another's.
        "buffer": {
            "redis_url": redis_url,
            "write_timeout_s": 0.5,
            "spool_dir": tempfile.mkdtemp(prefix="shadowproxy-test-spool-"),
        },
        # No overload shedding by default: tests count exact mirror outcomes, and a busy test
        # machine would otherwise shed; test_overload_shedding covers it on purpose.
        "proxy": {"drain_timeout_s": 2, "shed_lag_ms": 0, "mirror_process": False},
    }
    data.update(overrides)
    return settings_from_mapping(data)


@pytest.fixture
async def proxy_factory() -> AsyncIterator[Callable[..., Any]]:
    """Start a proxy for given settings: ``runner = await proxy_factory(settings)``."""
    runners: list[ProxyRunner] = []

    async def start(settings: Settings, **kw: Any) -> ProxyRunner:
        runner = ProxyRunner(settings, **kw)
        await runner.start()
        runners.append(runner)
        return runner

    yield start
    # Not suppressed: an error while stopping is a bug of the proxy (or of the test that
    # stopped it first), and fails the test that caused it. stop() is idempotent, so a test
    # may stop a proxy itself (a restart) and leave the second stop to this fixture.
    for runner in runners:
        await runner.stop()


async def wait_until(
    predicate: Callable[[], Any | Awaitable[Any]],
    timeout_s: float = 10.0,
    interval_s: float = 0.02,
    what: str = "",
) -> Any:
    """Poll ``predicate`` (plain or async) until it is truthy and return that value.

    Instead of a fixed sleep before an assertion: as fast as the machine allows, and on a slow
    machine it waits up to ``timeout_s`` rather than failing at random. On time-out it fails
    with the last value the predicate returned, so the report says what was seen instead.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() >= deadline:
            raise AssertionError(
                f"{what or 'condition'} not met within {timeout_s}s; last value: {value!r}"
            )
        await asyncio.sleep(interval_s)


def repo_root() -> Path:
    return Path(__file__).resolve().parents[1]


async def send_infers(
    proxy: ProxyRunner, request_ids: Sequence[str], *, first: int = 0, drain_each: bool = False
) -> None:
    """POST one small V2 infer request per id (distinct bodies) and wait for the mirrors."""
    async with aiohttp.ClientSession() as s:
        for k, request_id in enumerate(request_ids):
            body = (
                f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{first + k}]}}]}}'
            )
            async with s.post(
                f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer",
                data=body.encode(),
                headers={"X-Request-Id": request_id},
            ) as r:
                assert r.status == 200
            if drain_each:
                assert await proxy.drained(10)
    assert await proxy.drained(10)


async def wait_http_ok(
    url: str, *, proc: asyncio.subprocess.Process | None = None, timeout_s: float = 60.0
) -> None:
    """Poll ``url`` until it answers 200; fail at once if ``proc`` (the server) exits first."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    async with aiohttp.ClientSession() as s:
        while loop.time() < deadline:
            assert proc is None or proc.returncode is None, "the server exited during start-up"
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError(f"no answer from {url} within {timeout_s}s")


@contextlib.asynccontextmanager
async def serve_process(
    config: dict[str, Any], path: Path, *args: str, command: str = "serve"
) -> AsyncIterator[asyncio.subprocess.Process]:
    """``shadowproxy serve`` (plus ``args``) on ``config``, written to ``path``, as a real
    process, once its admin plane answers; killed on the way out if the test left it running.
    The process's output (stdout and stderr together) is what ``finish`` returns."""
    await asyncio.to_thread(path.write_text, yaml.safe_dump(config))
    proc = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "proxy", command, *args, "--config", str(path)],
        cwd=repo_root(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        admin = config["admin"]
        await wait_http_ok(f"http://{admin['host']}:{admin['port']}/healthz", proc=proc)
        yield proc
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.communicate()


async def finish(proc: asyncio.subprocess.Process, sig: int = signal.SIGTERM) -> str:
    """Send ``sig`` and wait for the exit; the process's whole output."""
    proc.send_signal(sig)
    output, _ = await asyncio.wait_for(proc.communicate(), 60)
    return output.decode(errors="replace")


# Under CI (CI=true) an optional test dependency that is missing fails the test instead of
# skipping it: `.[dev]` installs all of them, so a skip there would hide a broken install.
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def import_or_skip(name: str, install: str = "pip install -e '.[dev]'") -> ModuleType:
    """``pytest.importorskip(name)`` locally; under CI a plain import, so a missing module is an
    error (at module level, a collection error), never a silent skip."""
    if IN_CI:
        return importlib.import_module(name)
    module: ModuleType = pytest.importorskip(name, reason=f"{name} is not installed ({install})")
    return module


@pytest.fixture
async def dedicated_redis(tmp_path: Path) -> AsyncIterator[EmbeddedRedis]:
    """A Redis server of the test's own (the embedded one, on a private state directory), which
    the test may stop and start again with its data, as an outage does."""
    server = EmbeddedRedis(tmp_path / "redis")
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.stop)


async def wait_rollout(proxy: ProxyRunner, statuses: set[str], timeout_s: float = 15) -> Any:
    """The proxy's canary rollout once its status is one of ``statuses``."""

    async def reached() -> Any:
        state = await proxy.canary.store.read()
        return state if state is not None and state.status in statuses else None

    return await wait_until(reached, timeout_s, 0.05, what=f"rollout status in {statuses}")


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1 (openssl; skipped without it)."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    args = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    args += ["-keyout", str(key), "-out", str(cert), "-days", "1", "-subj", "/CN=127.0.0.1"]
    subprocess.run(
        [openssl, *args, "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
    )
    return cert, key
