"""The demo's traffic and report on the real Triton demo models: every fourth request goes over
gRPC, is mirrored to every candidate over its grpc_url and compared, and the report says so;
every upstream is recorded as a build with the hardware the demo declares.

It runs ``proxy.demo.runner``'s own pieces (its config, ``send_traffic``, ``collect_results``,
``print_report``), with a test Redis and the overload guards off, so the counts are exact."""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from proxy.builds.ledger import BuildLedger
from proxy.demo.report import compared_by_protocol, print_report
from proxy.demo.runner import CLASSIFIER, EMBEDDER, collect_results, demo_config, send_traffic
from proxy.settings import settings_from_mapping
from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.triton
N = 24  # requests i = 3, 7, ..., 23 go over gRPC; i % 3 == 0 ask the classifier


async def test_demo_sends_a_share_over_grpc_and_compares_it_like_rest(
    triton_server: Any,
    proxy_factory: Callable[..., Any],
    redis_url: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    grpc_url = f"127.0.0.1:{triton_server.grpc_port}"
    metrics_url = f"http://127.0.0.1:{triton_server.metrics_port}/metrics"
    settings = settings_from_mapping(
        {
            **demo_config(triton_server.url, grpc_url, ADMIN_TOKEN, metrics_url),
            "buffer": {
                "redis_url": redis_url,
                "spool_dir": tempfile.mkdtemp(prefix="shadowproxy-test-spool-"),
            },
            "proxy": {"drain_timeout_s": 2, "shed_lag_ms": 0, "mirror_cpu_budget": 0},
        }
    )
    proxy = await proxy_factory(settings)

    counts = await send_traffic(proxy.data_port, N, grpc_port=proxy.grpc_port)
    assert counts == {"ok": N, "failed": 0, "rest": 18, "json": 9, "binary": 9, "grpc": 6}
    assert await proxy.drained(120)
    verdicts, tally, coverage = await collect_results(proxy, 0.0)

    over_grpc = {i for i in range(N) if i % 4 == 3}
    ids = {
        EMBEDDER: {f"demo-{i:04d}" for i in over_grpc if i % 3},
        CLASSIFIER: {f"demo-{i:04d}" for i in over_grpc if i % 3 == 0},
    }
    by_protocol = compared_by_protocol(verdicts)
    # Every candidate that takes every copy compared each of its model's gRPC requests, and
    # exactly those (the same request ids as over REST: X-Request-Id demo-NNNN).
    for name, model, n_model in (
        ("int8", EMBEDDER, 16),
        ("traced", EMBEDDER, 16),
        ("noise-floor", EMBEDDER, 16),
        ("distilled", CLASSIFIER, 8),
    ):
        grpc_ids = {
            v["request_id"]
            for v in verdicts
            if v["candidate"] == name and v["protocol"] == "v2_grpc" and v["outcome"] == "compared"
        }
        assert grpc_ids == ids[model], (name, grpc_ids)
        assert by_protocol[name] == Counter(
            {"REST": n_model - len(ids[model]), "gRPC": len(ids[model])}
        )
    assert by_protocol["bf16"]["REST"] + by_protocol["bf16"]["gRPC"] > 0
    # Nothing skipped (no_grpc_url above all) or dropped, but bf16's sample_rate 0.5.
    lost = {(c, w) for (c, w), n in tally.items() if n and w.startswith(("skipped", "dropped"))}
    assert lost <= {("bf16", "skipped:not_sampled")}, tally
    for name, cov in coverage.items():
        assert cov["compared"] == cov["sampled"], (name, cov)

    # Flagged as over REST: int8 diverges on every request, traced and the twin on none.
    flagged = Counter((v["candidate"], v["protocol"]) for v in verdicts if v["flagged"])
    assert flagged[("int8", "v2_grpc")] == 4 and flagged[("int8", "v2_rest")] == 12
    assert not any(
        flagged[(c, p)] for c in ("traced", "noise-floor") for p in ("v2_grpc", "v2_rest")
    )

    # Each upstream that answered is a build with the hardware the demo declares for it, read
    # with the server's metrics page (a CPU server: it names no GPU).
    declared = {c.name: c.hardware for c in (settings.reference, *settings.candidates)}
    builds = await BuildLedger(proxy.store.redis, proxy.store.keys).builds()
    assert {(b["upstream"], b["model"]) for b in builds} == {
        ("fp32", EMBEDDER),
        ("fp32", CLASSIFIER),
        *((name, EMBEDDER) for name in ("int8", "bf16", "traced", "noise-floor")),
        ("distilled", CLASSIFIER),
    }
    for b in builds:
        hardware = b["facts"]["hardware"]
        assert hardware == declared[b["upstream"]] and hardware.startswith("CPU x")
        assert b["facts"]["gpus"] == {"count": 0, "names": [], "memory_bytes": []}
        assert b["facts"]["version"] == "1"
    assert {v["build"] for v in verdicts} == {b["id"] for b in builds if b["role"] == "candidate"}

    print_report(settings, verdicts, tally, coverage, traffic=counts)
    report = capsys.readouterr().out
    assert "traffic: 24 requests, 18 REST (9 JSON, 9 binary) + 6 gRPC, 0 failed" in report
    assert "samples compared 16 (12 REST + 4 gRPC), flagged 16 (100%)" in report
    assert "samples compared 8 (6 REST + 2 gRPC)" in report
