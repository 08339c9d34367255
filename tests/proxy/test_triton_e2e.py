"""End to end on the real Triton server: transparency and real divergence on the demo models."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient
import tritonclient.http.aio as aioclient

from tests.conftest import ADMIN_TOKEN, make_settings

pytestmark = pytest.mark.triton
HOP = {"connection", "keep-alive", "transfer-encoding", "date", "server"}
SENTENCES = [b"The striker scored twice in the final.", b"Bond yields rose after the speech."]


def _body(binary: bool, sentences: list[bytes] = SENTENCES) -> tuple[bytes, dict[str, str]]:
    text = httpclient.InferInput("text", [len(sentences)], "BYTES")
    text.set_data_from_numpy(np.array(sentences, dtype=np.object_), binary_data=binary)
    out = httpclient.InferRequestedOutput("embedding", binary_data=binary)
    body, json_size = httpclient.InferenceServerClient.generate_request_body(
        [text], outputs=[out], request_id="e2e-1"
    )
    headers = {"Content-Type": "application/json"}
    if json_size is not None:
        headers = {
            "Inference-Header-Content-Length": str(json_size),
            "Content-Type": "application/octet-stream",
        }
    return body, headers


async def _raw(method: str, url: str, body: bytes | None, headers: dict[str, str]) -> Any:
    async with (
        aiohttp.ClientSession(auto_decompress=False, skip_auto_headers=("Accept-Encoding",)) as s,
        s.request(method, url, data=body, headers=headers) as r,
    ):
        kept = {k.lower(): v for k, v in r.headers.items() if k.lower() not in HOP}
        return r.status, r.reason, kept, await r.read()


# The last two columns: the status Triton itself answers (so each case is the case it claims to
# be), and what the proxy does with the twin's copy: the outcome it counts, or None when the
# request is not mirrored at all (reads, and routes that are not inference).
@pytest.mark.parametrize(
    ("method", "path", "kind", "status", "copy"),
    [
        ("POST", "/v2/models/minilm_fp32/infer", "json", 200, "compared"),
        ("POST", "/v2/models/minilm_fp32/infer", "binary", 200, "compared"),
        # The client's gzip answer reaches it as is; the copy is still compared.
        ("POST", "/v2/models/minilm_fp32/infer", "gzip-accept", 200, "compared"),
        # Both sides fail alike: a verdict that is no divergence.
        ("POST", "/v2/models/no_such_model/infer", "json", 404, "both_failed"),
        # Triton answers malformed JSON with a 500 error body; the copy is not sent at all.
        ("POST", "/v2/models/minilm_fp32/infer", "bad-json", 500, "skipped:unparseable_request"),
        ("GET", "/v2/models/minilm_fp32", "none", 200, None),
        ("GET", "/v2/models/minilm_fp32/config", "none", 200, None),
        ("GET", "/v2/health/ready", "none", 200, None),
        ("GET", "/v2/nothing/here", "none", 404, None),
    ],
)
async def test_responses_are_byte_identical_to_direct_calls(
    triton_server: Any,
    proxy_factory: Callable[..., Any],
    redis_url: str,
    method: str,
    path: str,
    kind: str,
    status: int,
    copy: str | None,
) -> None:
    candidates = [
        {"name": "twin", "url": triton_server.url, "model_map": {"minilm_fp32": "minilm_fp32_twin"}}
    ]
    proxy = await proxy_factory(make_settings(triton_server.url, redis_url, candidates=candidates))
    body: bytes | None = None
    headers: dict[str, str] = {}
    if kind in ("json", "binary", "gzip-accept"):
        body, headers = _body(kind == "binary")
    if kind == "gzip-accept":
        headers["Accept-Encoding"] = "gzip"
    if kind == "bad-json":
        body, headers = b'{"inputs": [', {"Content-Type": "application/json"}
    direct = await _raw(method, triton_server.url + path, body, headers)
    via = await _raw(method, f"http://127.0.0.1:{proxy.data_port}{path}", body, headers)
    assert via == direct
    assert direct[0] == status
    if kind == "gzip-accept":
        assert direct[2].get("content-encoding") == "gzip"  # really compressed, passed as is
    assert await proxy.drained(30)
    tally = dict(proxy.telemetry.tally)
    verdicts = await proxy.store.list_samples(flagged=False, candidate="twin")
    if copy is None:
        assert tally == {} and verdicts == []
    elif copy.startswith("skipped:"):
        assert tally == {("twin", copy): 1} and verdicts == []
    else:
        assert tally == {("twin", copy): 1, ("twin", "stored"): 1}
        assert [(v["outcome"], v["request_id"]) for v in verdicts] == [(copy, "e2e-1")]
    assert await proxy.store.list_samples(flagged=True) == []  # the twin never diverges
    # What /api/summary reports to a user: every copy asked for was compared, or none was asked.
    async with (
        aiohttp.ClientSession() as s,
        s.get(
            f"http://127.0.0.1:{proxy.admin_port}/api/summary",
            headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
        ) as r,
    ):
        assert r.status == 200
        coverage = (await r.json())["coverage"]["twin"]
    asked = 1 if copy is not None and not copy.startswith("skipped:") else 0
    assert (coverage["sampled"], coverage["compared"]) == (asked, asked)


async def test_real_models_quantized_candidate_flagged_twin_not(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    url = triton_server.url
    candidates = [
        {"name": "int8", "url": url, "model_map": {"minilm_fp32": "minilm_int8"}},
        {
            "name": "twin",
            "url": url,
            "model_map": {"minilm_fp32": "minilm_fp32_twin"},
            "noise_floor": True,
        },
    ]
    comparisons = {
        "*": {"*": {"metric": "auto"}},
        "minilm_fp32": {"embedding": {"metric": "cosine", "min_cosine": 0.9999}},
    }
    settings = make_settings(url, redis_url, candidates=candidates, comparisons=comparisons)
    proxy = await proxy_factory(settings)
    # The aio client: a blocking one would stall the event loop the proxy itself runs on.
    client = aioclient.InferenceServerClient(f"127.0.0.1:{proxy.data_port}")
    sentences = [
        f"Sentence number {i} about markets, football and rain.".encode() for i in range(6)
    ]
    try:
        for i, binary in enumerate([True, False, True, False]):
            text = aioclient.InferInput("text", [3], "BYTES")
            text.set_data_from_numpy(
                np.array(sentences[i : i + 3], dtype=np.object_), binary_data=binary
            )
            result = await client.infer("minilm_fp32", [text], headers={"X-Request-Id": f"q-{i}"})
            assert result.as_numpy("embedding").shape == (3, 384)
    finally:
        await client.close()
    assert await proxy.drained(60)
    # Every int8 answer is past min_cosine (its quantization error is far above 1e-4), and
    # nothing else is flagged.
    flagged = await proxy.store.list_samples(flagged=True)
    assert sorted(s["request_id"] for s in flagged) == [f"q-{i}" for i in range(4)]
    assert {s["candidate"] for s in flagged} == {"int8"}
    tally = proxy.telemetry.tally
    assert (tally[("int8", "compared")], tally[("twin", "compared")]) == (4, 4)
    twin = await proxy.store.list_samples(flagged=False, candidate="twin")
    assert len(twin) == 4 and all(v["outcome"] == "compared" for v in twin)
    assert all(v["outputs"][0]["metric"] == "cosine" for v in twin)
    sample = await proxy.store.get_sample(flagged[0]["id"])
    assert sample is not None
    assert sample["candidate_side"]["model"] == "minilm_int8"
    assert sample["reference"]["model"] == "minilm_fp32" and sample["reference"]["version"] == "1"


async def test_golden_set_export_and_replay_on_real_models(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str, tmp_path: Any
) -> None:
    import json
    import subprocess
    import sys

    url = triton_server.url
    candidates = [{"name": "int8", "url": url, "model_map": {"minilm_fp32": "minilm_int8"}}]
    comparisons = {"minilm_fp32": {"embedding": {"metric": "cosine", "min_cosine": 0.9999}}}
    proxy = await proxy_factory(
        make_settings(url, redis_url, candidates=candidates, comparisons=comparisons)
    )
    client = aioclient.InferenceServerClient(f"127.0.0.1:{proxy.data_port}")
    try:
        for i, binary in enumerate([True, False, True]):
            text = aioclient.InferInput("text", [2], "BYTES")
            batch = [f"Replay sentence {i} on rates and rain.".encode(), b"The match was close."]
            text.set_data_from_numpy(np.array(batch, dtype=np.object_), binary_data=binary)
            await client.infer("minilm_fp32", [text], headers={"X-Request-Id": f"g-{i}"})
    finally:
        await client.close()
    assert await proxy.drained(60)
    flagged = await proxy.store.list_samples(flagged=True)
    assert len(flagged) == 3
    await proxy.store.label(flagged[0]["id"], "regression", "int8 drift", "rita")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"reference: {{name: fp32, url: '{url}'}}\nbuffer: {{redis_url: '{redis_url}'}}\n"
        "comparisons: {minilm_fp32: {embedding: {metric: cosine, min_cosine: 0.9999}}}\n"
    )
    golden = tmp_path / "golden.jsonl"

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "proxy", *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=120)

    exported = cli("review", "export", "--out", str(golden), "--config", str(config))
    assert exported.returncode == 0, exported.stderr
    # Replayed against the candidate's model: the same divergences, labels kept.
    again = cli(
        "replay",
        str(golden),
        "--url",
        url,
        "--model-map",
        "minilm_fp32=minilm_int8",
        "--json",
        "--fail-on-regression",
    )
    assert again.returncode == 1, again.stderr
    report = json.loads(again.stdout)
    assert report["by_label"] == {
        "regression": {"still_diverges": 1},
        "unlabelled": {"still_diverges": 2},
    }
    reasons = [d["reason"] for ds in report["still_diverging"].values() for d in ds]
    assert all("embedding" in r and "cosine" in r for r in reasons), reasons
    assert "replaying [" in again.stderr  # the progress bar
    # Against the reference model itself: nothing diverges.
    clean = cli("replay", str(golden), "--url", url, "--json", "--fail-on-regression")
    assert clean.returncode == 0, clean.stdout
    assert json.loads(clean.stdout)["by_label"] == {
        "regression": {"now_matches": 1},
        "unlabelled": {"now_matches": 2},
    }
