"""Builds: the fingerprint's GPU reading, the tracker and the ledger on a real Redis against a
small V2 server whose metadata changes (a new version loaded), two replicas, and the CLI."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
import yaml
from aiohttp import web

from proxy.buffer.keys import KeySchema
from proxy.builds.fingerprint import build_id, gpus_from_metrics
from proxy.builds.ledger import BuildLedger
from proxy.builds.tracker import BuildTracker
from proxy.settings import CandidateSettings, UpstreamSettings
from tests.conftest import ADMIN_TOKEN, make_settings, repo_root, send_infers

# Triton's GPU metrics as its docs show them (metrics.md): one series per GPU, labelled by
# gpu_uuid only. No GPU here: the reading is tested on text in that documented format.
TRITON_METRICS = """\
# HELP nv_gpu_utilization GPU utilization rate [0.0 - 1.0)
# TYPE nv_gpu_utilization gauge
nv_gpu_utilization{gpu_uuid="GPU-c06bbf33-c250-ca45-579b-19134b518844"} 0.000000
nv_gpu_utilization{gpu_uuid="GPU-d17ccf44-d361-db56-68ac-2a245c629955"} 0.250000
# HELP nv_gpu_memory_total_bytes GPU total memory, in bytes
# TYPE nv_gpu_memory_total_bytes gauge
nv_gpu_memory_total_bytes{gpu_uuid="GPU-c06bbf33-c250-ca45-579b-19134b518844"} 42949672960.000000
nv_gpu_memory_total_bytes{gpu_uuid="GPU-d17ccf44-d361-db56-68ac-2a245c629955"} 42949672960.000000
# HELP nv_inference_count Number of inferences performed
# TYPE nv_inference_count counter
nv_inference_count{model="m",version="1"} 12.000000
"""
DCGM_METRICS = """\
# TYPE DCGM_FI_DEV_GPU_UTIL gauge
DCGM_FI_DEV_GPU_UTIL{gpu="0",UUID="GPU-1",modelName="NVIDIA L4",Hostname="n1"} 3
"""


def test_gpus_are_read_from_documented_metrics_text() -> None:
    assert gpus_from_metrics(TRITON_METRICS) == {
        "count": 2,
        "names": [],
        "memory_bytes": [42949672960, 42949672960],
    }
    assert gpus_from_metrics(DCGM_METRICS) == {
        "count": 1,
        "names": ["NVIDIA L4"],
        "memory_bytes": [],
    }
    assert gpus_from_metrics("# no GPU series on a CPU server\n")["count"] == 0
    with pytest.raises(ValueError):
        gpus_from_metrics("this is { not the exposition format")


class V2Server:
    """A V2 server's metadata routes, with the loaded versions and config under test control."""

    def __init__(self) -> None:
        self.versions = ["1"]
        self.max_batch = 8
        self.up = True

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v2", self.server)
        app.router.add_get("/v2/models/m", self.model)
        app.router.add_get("/v2/models/m/versions/{v}/config", self.config)
        app.router.add_get("/metrics", self.metrics)
        return app

    async def server(self, request: web.Request) -> web.Response:
        if not self.up:
            raise web.HTTPServiceUnavailable()
        return web.json_response({"name": "triton", "version": "2.50.0", "extensions": ["a"]})

    async def model(self, request: web.Request) -> web.Response:
        return web.json_response({"name": "m", "versions": self.versions, "platform": "onnx"})

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response(
            {"name": "m", "max_batch_size": self.max_batch, "v": request.match_info["v"]}
        )

    async def metrics(self, request: web.Request) -> web.Response:
        return web.Response(text=TRITON_METRICS)


@pytest.fixture
async def v2() -> AsyncIterator[tuple[V2Server, str]]:
    server = V2Server()
    runner = web.AppRunner(server.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    yield server, f"http://127.0.0.1:{port}"
    await runner.cleanup()


async def test_a_version_change_is_recorded_once_across_replicas(
    v2: tuple[V2Server, str], redis_url: str
) -> None:
    server, url = v2
    cand = CandidateSettings(
        name="int8", url=url, hardware="L4 x1, fp8", metrics_url=f"{url}/metrics"
    )
    client = aioredis.Redis.from_url(redis_url)
    ledger = BuildLedger(client, KeySchema())
    async with aiohttp.ClientSession() as s:
        now = [0.0]
        replicas = [BuildTracker(s, ledger, clock=lambda: now[0]) for _ in range(2)]
        first = {await t.build_of(cand, "candidate", "m", "1") for t in replicas}
        assert len(first) == 1
        (v1,) = first
        # Cached: the same answer asks nothing new.
        assert await replicas[0].build_of(cand, "candidate", "m", "1") == v1
        # Version 2 loaded and answering: both replicas notice it, one event is recorded.
        server.versions = ["1", "2"]
        second = {await t.build_of(cand, "candidate", "m", "2") for t in replicas}
        assert len(second) == 1 and v1 not in second
        (v2_build,) = second
        # A server that does not answer its metadata keeps the build known before.
        server.up = False
        now[0] += 3600  # past the cache's lifetime: probed again
        assert await replicas[0].build_of(cand, "candidate", "m", None) == v2_build
        for t in replicas:
            await t.close()
    events = await ledger.events()
    assert [(e["build"], e["previous"]) for e in events] == [(v2_build, v1), (v1, None)]
    # A replay against version 1 (serving=False) records nothing about what serves now.
    v1_facts = (await ledger.get(v1) or {})["facts"]
    assert not await ledger.record(v1, v1_facts, "candidate", serving=False)
    assert len(await ledger.events()) == 2 and (await ledger.current())["int8|m"] == v2_build
    facts = (await ledger.get(v2_build) or {})["facts"]
    assert facts["version"] == "2" and facts["hardware"] == "L4 x1, fp8"
    assert facts["gpus"]["count"] == 2 and facts["server"]["name"] == "triton"
    assert "max_batch_size = 8" in facts["config"]
    assert build_id(facts) == v2_build
    # The same model on other hardware is another build (a sibling), and so is a config change.
    other = cand.model_copy(update={"hardware": "A100 x2, fp16"})
    async with aiohttp.ClientSession() as s:
        server.up = True
        tracker = BuildTracker(s, ledger)
        assert await tracker.build_of(other, "candidate", "m", "2") not in (v1, v2_build)
        await tracker.close()
    await client.aclose()


async def test_builds_cli_lists_shows_and_diffs(
    v2: tuple[V2Server, str], redis_url: str, tmp_path: Path
) -> None:
    server, url = v2
    client = aioredis.Redis.from_url(redis_url)
    ledger = BuildLedger(client, KeySchema())
    ref = UpstreamSettings(name="fp32", url=url, hardware="A100 x1, fp32")
    cand = CandidateSettings(name="int8", url=url, hardware="L4 x1, int8")
    async with aiohttp.ClientSession() as s:
        tracker = BuildTracker(s, ledger)
        await tracker.build_of(ref, "reference", "m", "1")
        a = await tracker.build_of(cand, "candidate", "m", "1")
        server.versions, server.max_batch = ["1", "2"], 16
        b = await tracker.build_of(cand, "candidate", "m", "2")
        await tracker.close()
    await client.aclose()
    config = tmp_path / "c.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "admin": {"token": ADMIN_TOKEN},
                "reference": {"name": "fp32", "url": url},
                "buffer": {"redis_url": redis_url},
            }
        )
    )

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "proxy", "builds", *args, "--config", str(config)],
            cwd=repo_root(),
            capture_output=True,
            text=True,
            timeout=60,
        )

    async def cli(*args: str) -> str:
        done = await asyncio.to_thread(run, *args)
        assert done.returncode == 0, done.stderr
        return done.stdout

    listed = await cli("list")
    assert a in listed and b in listed and "L4 x1, int8" in listed
    assert f"* {b}" in listed and f"* {a}" not in listed  # version 2 serves now
    assert "serves now" in await cli("show", b[:6])
    diff = await cli("diff", a, b)
    assert 'version: "1" -> "2"' in diff
    assert "- config max_batch_size = 8" in diff and "+ config max_batch_size = 16" in diff
    assert "matters: no significant change" in diff  # no copies compared: nothing to test
    bad = await asyncio.to_thread(run, "show", "zzzz")
    assert bad.returncode == 2 and "matches no build" in bad.stderr


async def test_every_verdict_carries_its_builds_and_each_build_its_evidence(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, good, bad = await fake(), await fake(), await fake(drift=0.5)
    settings = make_settings(
        ref.url,
        redis_url,
        reference={"name": "ref", "url": ref.url, "hardware": "CPU x1, fp32"},
        candidates=[
            {"name": "good", "url": good.url, "hardware": "CPU x1, fp32"},
            {"name": "bad", "url": bad.url, "hardware": "CPU x1, int8"},
        ],
    )
    proxy = await proxy_factory(settings)
    await send_infers(proxy, [f"r{i}" for i in range(6)])
    flagged = await proxy.store.list_samples(flagged=True, candidate="bad")
    assert len(flagged) == 6
    assert all(s["build"] == s["candidate_side"]["build"] for s in flagged)
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    base = f"http://127.0.0.1:{proxy.admin_port}"
    async with aiohttp.ClientSession(headers=auth) as s:
        for _ in range(50):  # statistics reach Redis within a second
            async with s.get(f"{base}/api/builds") as r:
                builds = {b["upstream"]: b for b in await r.json()}
            if all(
                (b["evidence"] or {}).get("copies") == 6 for n, b in builds.items() if n != "ref"
            ):
                break
            await asyncio.sleep(0.1)
        assert set(builds) == {"ref", "good", "bad"}
        assert builds["ref"]["role"] == "reference" and builds["ref"]["evidence"] is None
        assert builds["bad"]["evidence"]["flagged"] == 6
        assert builds["good"]["evidence"]["flagged"] == 0
        assert flagged[0]["build"] == builds["bad"]["id"]
        assert flagged[0]["reference"]["build"] == builds["ref"]["id"]
        async with s.get(
            f"{base}/api/builds/diff", params={"a": builds["good"]["id"], "b": builds["bad"]["id"]}
        ) as r:
            diff = await r.json()
        assert diff["fingerprint"]["fields"]["hardware"] == ["CPU x1, fp32", "CPU x1, int8"]
        assert diff["flagged_rate_test"]["p"] < 0.01  # 0/6 against 6/6
        async with s.get(f"{base}/api/builds/nope") as r:
            assert r.status == 404
        async with s.get(f"{base}/api/builds/diff?a=x") as r:
            assert r.status == 400
