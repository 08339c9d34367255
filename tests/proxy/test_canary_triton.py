"""Canary rollouts on the real Triton demo models, with an accelerated schedule.

The faithful candidate (MiniLM traced: the same weights through TorchScript) must promote through
every step; int8 under a tight cosine gate must roll back at the first gate with enough evidence.
Both go through ``proxy.demo.canary.run_rollout``, the code ``shadowproxy demo --canary`` runs.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.demo.canary import canary_settings, run_rollout, warm_up
from tests.conftest import ADMIN_TOKEN

pytestmark = pytest.mark.triton


async def test_traced_promotes_through_every_step(triton_server: Any, redis_url: str) -> None:
    await warm_up(triton_server.url)
    settings = canary_settings(
        triton_server.url,
        "traced",
        "minilm_traced",
        {"redis_url": redis_url},
        ADMIN_TOKEN,
        min_duration_s=1.0,
    )
    state, decisions, failed = await run_rollout(settings, max_requests=2000)
    assert failed == 0
    assert state is not None and state.status == "promoted", decisions[-1]
    outcomes = [d["outcome"] for d in decisions if d["outcome"] != "waiting"]
    assert outcomes == ["started", "advanced", "advanced", "advanced", "advanced", "promoted"]
    for d in decisions[1:]:
        if d["outcome"] == "waiting":
            continue
        gates = {g["gate"]: g for g in d["gates"]}
        assert gates["samples"]["value"] >= 60
        assert gates["flagged_rate"]["status"] == "pass"
        assert gates["flagged_rate"]["value"] == 0.0
        # the twin answered the same requests below 100%: the paired test ran and passed
        if d["measured_at_weight"] < 100:
            assert gates["paired_vs_noise"]["status"] == "pass"


async def test_int8_rolls_back_at_the_first_gate(triton_server: Any, redis_url: str) -> None:
    settings = canary_settings(
        triton_server.url, "int8", "minilm_int8", {"redis_url": redis_url}, ADMIN_TOKEN
    )
    state, decisions, failed = await run_rollout(settings, max_requests=500)
    assert failed == 0
    assert state is not None and state.status == "rolled_back"
    assert state.step == 0 and state.weight == 0
    last = decisions[-1]
    assert last["outcome"] == "rolled_back" and last["measured_at_weight"] == 1
    gate = next(g for g in last["gates"] if g["gate"] == "flagged_rate")
    assert gate["status"] == "fail" and gate["value"] > 0.5 and gate["threshold"] == 0.05
