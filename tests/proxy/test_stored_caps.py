"""What clients and upstreams put into a sample is bounded before it reaches Redis: the request id
(``proxy.max_id_chars``) and the number of outputs kept (``proxy.max_outputs``)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import aiohttp

from tests.conftest import make_settings
from tests.fakes import start_raw_upstream


def _answer(outputs: int, offset: float) -> bytes:
    body = json.dumps(
        {
            "model_name": "m",
            "outputs": [
                {"name": f"o{i}", "datatype": "FP32", "shape": [1], "data": [i + offset]}
                for i in range(outputs)
            ],
        }
    ).encode()
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(body)}"
    return head.encode() + b"\r\n\r\n" + body


async def test_long_request_ids_and_many_outputs_are_cut_before_storage(
    proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await start_raw_upstream(_answer(5, 0.0))
    cand = await start_raw_upstream(_answer(5, 1.0))  # every output diverges
    try:
        proxy = await proxy_factory(
            make_settings(
                ref.url,
                redis_url,
                candidates=[{"name": "c", "url": cand.url}],
                proxy={
                    "drain_timeout_s": 2,
                    "shed_lag_ms": 0,
                    "mirror_process": False,
                    "max_id_chars": 16,
                    "max_outputs": 3,
                },
            )
        )
        body = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[1]}]}'
        async with aiohttp.ClientSession() as s:
            for headers in ({"X-Request-Id": "h" * 5000}, {}):
                payload = body if headers else b'{"id":"' + b"b" * 5000 + b'",' + body[1:]
                async with s.post(
                    f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer",
                    data=payload,
                    headers=headers,
                ) as r:
                    assert r.status == 200
        assert await proxy.drained(10)
        items = await proxy.store.list_samples(flagged=True)
        assert sorted(i["request_id"] for i in items) == ["b" * 16, "h" * 16]
        sample = await proxy.store.get_sample(items[0]["id"])
        assert sample is not None
        assert [o["output"] for o in sample["outputs"]] == ["o0", "o1", "o2"]
        assert sample["outputs_dropped"] == 2 and len(sample["previews"]) == 3
        assert sample["reason"].count("o") >= 3 and "o4" not in sample["reason"]
    finally:
        for up in (ref, cand):
            up.server.close()
            await up.server.wait_closed()
