"""The canary split on gRPC ModelInfer, on the real Triton server: the candidate answers its
share, its evidence is counted as over REST, and a candidate that cannot be reached never fails
a client (the reference answers; the rollout rolls back on its error rate)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc.aio as aiogrpc
from tritonclient.grpc import InferInput

from proxy.keys import GRPC_CANARY
from tests.conftest import make_settings, wait_rollout, wait_until
from tests.fakes import refused_url

pytestmark = pytest.mark.triton
PLANT = 13.0  # deploy/lib/shadowdemo/light.py: light_cand diverges on rows whose x[i, 7] is this


def _settings(triton: Any, redis_url: str, cand_grpc_url: str, **canary: Any) -> Any:
    grpc_url = f"127.0.0.1:{triton.grpc_port}"
    config: dict[str, Any] = {
        "candidate": "light",
        "steps": [100],
        "min_samples": 1000,  # the step holds: the tests read its evidence, not its end
        "min_duration_s": 0.2,
        "interval_s": 0.05,
        "gates": {"max_flagged_rate": 1.0, "max_error_rate_increase": 0.3, "latency_slack_ms": 1e4},
        **canary,
    }
    return make_settings(
        triton.url,
        redis_url,
        listen={"host": "127.0.0.1", "port": 0, "grpc_port": 0},
        reference={"name": "ref", "url": triton.url, "grpc_url": grpc_url, "timeout_s": 10},
        candidates=[
            {
                "name": "light",
                "url": triton.url,
                "grpc_url": cand_grpc_url,
                "model_map": {"light_ref": "light_cand"},
            }
        ],
        canary=config,
    )


async def _infer(port: int, n: int, planted: frozenset[int] = frozenset()) -> list[str]:
    """n calls to light_ref over gRPC; the model that answered each (its response says)."""
    client = aiogrpc.InferenceServerClient(f"127.0.0.1:{port}")
    answered: list[str] = []
    try:
        for i in range(n):
            rows = np.full((1, 8), 0.1 * i, dtype=np.float32)
            if i in planted:
                rows[0, 7] = PLANT
            x = InferInput("x", [1, 8], "FP32")
            x.set_data_from_numpy(rows)
            result = await client.infer("light_ref", [x], request_id=f"c-{i}")
            answered.append(result.get_response().model_name)
    finally:
        await client.close()
    return answered


async def test_the_canary_answers_its_share_over_grpc_and_is_compared_back(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    settings = _settings(triton_server, redis_url, f"127.0.0.1:{triton_server.grpc_port}")
    proxy = await proxy_factory(settings)
    state = await wait_rollout(proxy, {"running"})
    # The split needs the model's config (stateful or not) before it sends anything away.
    await wait_until(
        lambda: proxy.data[GRPC_CANARY]._models.peek("light_ref") is False,
        what="the model's config known",
    )
    answered = await _infer(proxy.grpc_port, 12, planted=frozenset({3, 7}))
    assert set(answered) == {"light_cand"}, answered  # weight 100: the candidate answers
    assert await proxy.drained(20)
    await proxy.canary.evidence.flush()
    evidence = await proxy.canary.store.evidence(state.attempt, 0)
    assert evidence["served_cand"] == 12 and evidence.get("served_ref", 0) == 0, evidence
    # Each canary answer was copied back to the reference and compared: the planted rows differ.
    flagged = await proxy.store.list_samples(flagged=True, candidate="light", limit=50)
    assert {s["request_id"] for s in flagged} == {"c-3", "c-7"}
    assert all(s["protocol"] == "v2_grpc" for s in flagged)


async def test_an_unreachable_grpc_canary_falls_back_and_rolls_back(
    triton_server: Any, proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    dead = refused_url().removeprefix("http://")
    proxy = await proxy_factory(_settings(triton_server, redis_url, dead, min_samples=5))
    await wait_rollout(proxy, {"running"})
    await wait_until(
        lambda: proxy.data[GRPC_CANARY]._models.peek("light_ref") is False,
        what="the model's config known",
    )
    answered = await _infer(proxy.grpc_port, 8)
    assert set(answered) == {"light_ref"}  # the client never sees the candidate's absence
    state = await wait_rollout(proxy, {"rolled_back"})
    assert "error_rate" in state.reason
    evidence = await proxy.canary.store.evidence(state.attempt, 0)
    # Every fallback is a candidate error; how many came before the rollback depends on when
    # the controller looked (three errors of any kind fail the gate early).
    assert evidence["fallbacks"] >= 1, evidence
    assert evidence["cand_errors"] >= max(3, evidence["fallbacks"]), evidence
