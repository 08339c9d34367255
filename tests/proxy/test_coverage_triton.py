"""Coverage on a real Triton pair with the proxy's default settings: every planted divergence is
flagged, nothing else is, and every copy asked for is compared."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any

import aiohttp
import numpy as np
import pytest
import tritonclient.http as httpclient

from tests.conftest import ADMIN_TOKEN, make_settings

pytestmark = pytest.mark.triton
PLANT = 13.0  # light_cand diverges on rows whose last feature is exactly this


def _request(
    rows: np.ndarray[Any, np.dtype[np.float32]], binary: bool
) -> tuple[bytes, dict[str, str]]:
    x = httpclient.InferInput("x", list(rows.shape), "FP32")
    x.set_data_from_numpy(rows, binary_data=binary)
    outputs = [
        httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("scores", "probs", "label")
    ]
    body, json_size = httpclient.InferenceServerClient.generate_request_body([x], outputs=outputs)
    headers = {"Content-Type": "application/json"}
    if json_size is not None:
        headers = {"Inference-Header-Content-Length": str(json_size)}
    return body, headers


@pytest.mark.parametrize("noise_floor_twin", [False, True])
async def test_every_planted_divergence_is_flagged_with_default_settings(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str, noise_floor_twin: bool
) -> None:
    url = triton_server.url
    candidates: list[dict[str, Any]] = [
        {"name": "light", "url": url, "model_map": {"light_ref": "light_cand"}}
    ]
    if noise_floor_twin:
        candidates.append(
            {
                "name": "twin",
                "url": url,
                "model_map": {"light_ref": "light_ref"},
                "noise_floor": True,
            }
        )
    # The proxy's defaults: mirror process and compare worker, shedding and CPU budget on.
    settings = make_settings(url, redis_url, candidates=candidates, proxy={})
    assert settings.proxy.mirror_process and settings.proxy.shed_lag_ms > 0
    proxy = await proxy_factory(settings)
    rng = random.Random(11)
    gen = np.random.default_rng(11)
    planted = set(rng.sample(range(100), 10))
    async with aiohttp.ClientSession() as s:
        for i in range(100):  # one after another: tens of requests a second
            rows = np.clip(gen.normal(size=(rng.randint(1, 4), 8)), -2, 2).astype(np.float32)
            if i in planted:
                rows[rng.randrange(len(rows)), 7] = PLANT
            body, headers = _request(rows, binary=i % 2 == 0)
            headers["X-Request-Id"] = f"light-{i}"
            async with s.post(
                f"http://127.0.0.1:{proxy.data_port}/v2/models/light_ref/infer",
                data=body,
                headers=headers,
            ) as r:
                assert r.status == 200, await r.text()
    assert await proxy.drained(60)
    flagged = await proxy.store.list_samples(flagged=True, candidate="light", limit=1000)
    assert {s["request_id"] for s in flagged} == {
        f"light-{i}" for i in planted
    }  # recall, precision
    assert all({o["output"] for o in s["outputs"] if o["flagged"]} for s in flagged)
    if noise_floor_twin:
        assert not await proxy.store.list_samples(flagged=True, candidate="twin")
    summary = await _summary(proxy.admin_port)
    for name in [c["name"] for c in candidates]:
        coverage = summary["coverage"][name]
        assert coverage["sampled"] == coverage["compared"] == 100, coverage
        assert coverage["warning"] is None


async def _summary(port: int) -> Any:
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with (
        aiohttp.ClientSession(headers=auth) as s,
        s.get(f"http://127.0.0.1:{port}/api/summary") as r,
    ):
        assert r.status == 200
        return await r.json()
