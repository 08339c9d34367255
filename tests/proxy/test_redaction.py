"""No secrets at rest: credentials and the values ``redact`` names never reach Redis, the admin
API, an export or a log, and what is stored still reads as a sample."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from proxy.app import ProxyRunner
from proxy.protocols.v2_rest.codec import decode_infer_response
from proxy.redact import HASH_PREFIX, Redactor
from proxy.settings import ProxySettings, RedactSettings
from tests.conftest import ADMIN_TOKEN, make_settings
from tests.llm_fakes import llm, post_json

__all__ = ["llm"]  # the fixture, used by name

TOKEN = "s3cr3t-t0ken-value"
COOKIE = "c00kie-value"
API_KEY = "k3y-value-123"
PROXY_AUTH = "cHJveHk6cGFzcw"
SSN = "SSN-123-45-6789"
EMAIL = "alice@example.com"
SECRETS = [TOKEN, COOKIE, API_KEY, PROXY_AUTH, SSN, EMAIL]
REDACT = {
    "headers": ["X-Api-Key"],
    "inputs": ["ssn"],
    "outputs": ["scores"],
    "json_pointers": ["/parameters/user/email"],
    "secret": "redaction-secret-0123456789",
}
BODY = {
    "id": "req-1",
    "parameters": {"user": {"email": EMAIL}},
    "inputs": [
        {"name": "ssn", "datatype": "BYTES", "shape": [1], "data": [SSN]},
        {"name": "x", "datatype": "FP32", "shape": [1], "data": [1.0]},
    ],
}
HEADERS = {
    "Authorization": f"Bearer {TOKEN}",
    "Proxy-Authorization": f"Basic {PROXY_AUTH}",
    "Cookie": f"session={COOKIE}",
    "x-api-key": API_KEY,
}


async def _everything_in(url: str) -> bytes:
    """Every key and every value in the database, whatever its type (SCAN, never KEYS)."""
    client = aioredis.Redis.from_url(url)
    parts: list[bytes] = []
    try:
        async for key in client.scan_iter(count=500):
            parts.append(key)
            kind = (await client.type(key)).decode()
            if kind == "string":
                parts.append(await client.get(key) or b"")
            elif kind == "hash":
                parts += [k + v for k, v in (await client.hgetall(key)).items()]
            elif kind == "zset":
                parts += await client.zrange(key, 0, -1)
            elif kind == "list":
                parts += await client.lrange(key, 0, -1)
            elif kind == "set":
                parts += list(await client.smembers(key))
            elif kind == "stream":
                for _, fields in await client.xrange(key):
                    parts += [k + v for k, v in fields.items()]
    finally:
        await client.aclose()
    return b"\n".join(parts)


async def _send_secrets(proxy: ProxyRunner) -> None:
    """One infer request carrying every secret, through the proxy; its copy compared."""
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer",
            data=json.dumps(BODY).encode(),
            headers=HEADERS,
        ) as r,
    ):
        assert r.status == 200
    assert await proxy.drained(10)


def _leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [s for s in SECRETS if s.encode() in data]


async def test_a_flagged_requests_credentials_and_named_values_are_nowhere_at_rest(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    ref, drifted = await fake(), await fake(drift=1.0)
    proxy = await proxy_factory(
        make_settings(
            ref.url, redis_url, candidates=[{"name": "int8", "url": drifted.url}], redact=REDACT
        )
    )
    await _send_secrets(proxy)
    assert ref.behaviour.seen_headers[-1]["Authorization"] == f"Bearer {TOKEN}"  # live: as sent

    assert _leaks(await _everything_in(redis_url)) == []

    base = f"http://127.0.0.1:{proxy.admin_port}"
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as s:
        async with s.get(f"{base}/api/samples?flagged=1") as r:
            (item,) = await r.json()
        async with s.get(f"{base}/api/samples/{item['id']}") as r:
            text = await r.text()
        async with s.get(f"{base}/api/samples/{item['id']}/tensors") as r:
            assert r.status == 200  # the review page still plots the sample
            plotted = await r.json()
    assert _leaks(text) == []
    sample = json.loads(text)
    request = sample["payloads"]["request"]["json"]
    ssn, x = request["inputs"]
    assert ssn["data"][0].startswith(HASH_PREFIX) and ssn["parameters"]["redacted"]["shape"] == [1]
    assert x["data"] == [1.0]  # what is not named stays as sent
    assert request["parameters"]["user"]["email"].startswith(HASH_PREFIX)
    assert "content-type" in {k.lower() for k, _ in sample["payloads"]["request_headers"]}
    (scores,) = sample["outputs"]
    assert scores["flagged"] and scores["reason"] == "tolerance flagged (values redacted)"
    assert scores["scores"]  # the scores stay: only values are hidden
    assert sample["previews"]["scores"]["reference"]["head"] == []
    ref_hash = plotted["outputs"]["scores"]["reference"]["values"][0]
    assert ref_hash.startswith(HASH_PREFIX)
    assert ref_hash != plotted["outputs"]["scores"]["candidate"]["values"][0]  # they differ

    config = tmp_path / "c.yaml"
    config.write_text(
        f"reference: {{name: ref, url: '{ref.url}'}}\nbuffer: {{redis_url: '{redis_url}'}}\n"
    )
    out = tmp_path / "golden.jsonl"
    cli = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "proxy", "review", "export", "--out", str(out)),
        *("--config", str(config)),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.DEVNULL,
    )
    _, stderr = await asyncio.wait_for(cli.communicate(), 60)
    assert cli.returncode == 0, stderr
    assert out.stat().st_mode & 0o777 == 0o600
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    raw = b"".join(base64.b64decode(v) for v in row["raw"].values())
    assert _leaks(out.read_text()) == [] and _leaks(raw) == []
    assert _leaks(caplog.text) == []


async def test_store_payloads_false_keeps_scores_and_metadata_only(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, drifted = await fake(), await fake(drift=1.0)
    proxy = await proxy_factory(
        make_settings(
            ref.url,
            redis_url,
            candidates=[{"name": "int8", "url": drifted.url}],
            redact={"store_payloads": False},
        )
    )
    await _send_secrets(proxy)
    (item,) = await proxy.store.list_samples(flagged=True)
    sample = await proxy.store.get_sample(item["id"])
    assert sample is not None
    assert sample["payloads"] == {} and sample["previews"] == {}
    assert sample["outputs"][0]["scores"] and sample["request_id"] == "req-1"
    assert _leaks(await _everything_in(redis_url)) == []


def _redactor(**kw: Any) -> Redactor:
    return Redactor(RedactSettings(secret="redaction-secret-0123456789", **kw), ProxySettings())


def _binary(name: str, datatype: str, n: int, size: int) -> dict[str, Any]:
    return {
        "name": name,
        "datatype": datatype,
        "shape": [n],
        "parameters": {"binary_data_size": size},
    }


def test_a_binary_tensor_is_hashed_out_and_the_answer_still_decodes() -> None:
    """The bytes of a redacted binary output leave the body; the others stay in place, and the
    same values hash alike whether they came as JSON data or as binary bytes."""
    values = struct.pack("<3f", 1.5, 2.5, 3.5)
    kept = struct.pack("<2i", 7, 8)
    head = json.dumps(
        {
            "model_name": "m",
            "outputs": [
                _binary("secret", "FP32", 3, 12),
                _binary("ids", "INT32", 2, 8),
            ],
        }
    ).encode()
    headers = [("Inference-Header-Content-Length", str(len(head))), ("Set-Cookie", f"a={COOKIE}")]
    redactor = _redactor(outputs=["secret"])
    stored = redactor.answer(head + values + kept, headers)
    assert values not in stored.data and _leaks(json.dumps(stored.headers)) == []
    decoded = decode_infer_response(stored.data, dict(stored.headers))
    assert decoded.outputs["ids"].tolist() == [7, 8]
    (digest,) = decoded.outputs["secret"].tolist()
    as_json = json.dumps(
        {"outputs": [{"name": "secret", "datatype": "FP32", "shape": [3], "data": [1.5, 2.5, 3.5]}]}
    ).encode()
    from_json = decode_infer_response(redactor.answer(as_json, []).data, {})
    assert from_json.outputs["secret"].tolist() == [digest]
    other = _redactor(outputs=["secret"]).answer(as_json, [])
    assert other.data == redactor.answer(as_json, []).data  # keyed: the same key, the same hash
    rekeyed = Redactor(
        RedactSettings(secret="another-secret-0123456789", outputs=["secret"]), ProxySettings()
    ).answer(as_json, [])
    assert rekeyed.data != other.data


def test_a_body_that_cannot_be_read_is_withheld_not_stored() -> None:
    stored = _redactor(inputs=["ssn"]).request(f"not json {SSN}".encode(), [])
    note = json.loads(stored.data)
    assert _leaks(stored.data) == [] and note["withheld"] and note["hash"].startswith(HASH_PREFIX)
    untouched = _redactor().request(b"not json", [("Cookie", COOKIE)])
    assert untouched.data == b"not json" and untouched.headers == []


async def test_a_generated_text_named_in_redact_outputs_is_nowhere_at_rest(
    llm: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await llm(), await llm(diverge_at=1)
    settings = make_settings(
        ref.url,
        redis_url,
        candidates=[{"name": "c", "url": cand.url}],
        redact={"outputs": ["text"], "secret": "test-redaction-secret-0123456789"},
        comparisons={"*": {"*": {"metric": "auto"}, "text": {"min_similarity": 0.999}}},
    )
    proxy = await proxy_factory(settings)
    url = f"http://127.0.0.1:{proxy.data_port}"
    answers = []
    for stream in (True, False):
        chat = {
            "model": "tiny",
            "messages": [{"role": "user", "content": "tell me a secret"}],
            "max_tokens": 8,
            "stream": stream,
        }
        status, _, body = await post_json(url, "/v1/chat/completions", chat)
        assert status == 200
        answers.append(body)
    assert await proxy.drained(10)
    flagged = await proxy.store.list_samples(flagged=True)
    assert len(flagged) == 2  # compared and flagged: the samples were stored, redacted
    at_rest = await _everything_in(redis_url)
    # Each answer's generated words (the candidate's differ from the 2nd token) are not there.
    for body in answers:
        text = _generated(body).encode()
        assert len(text) > 20 and text not in at_rest
        assert text[:12] not in at_rest


def _generated(body: bytes) -> str:
    """A chat answer's text, streamed (the deltas joined) or not."""
    if not body.startswith(b"data: "):
        return str(json.loads(body)["choices"][0]["message"]["content"])
    events = [json.loads(e[6:]) for e in body.split(b"\n\n") if e.startswith(b"data: {")]
    return "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
