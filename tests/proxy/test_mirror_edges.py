"""Mirror outcomes at the edges: a reverse copy the reference cannot take. Each copy a candidate
asked for ends in exactly one counted fate."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from proxy.app import ProxyRunner
from tests.conftest import wait_until
from tests.fakes import FakeBehaviour, start_fake
from tests.proxy.test_canary import _canary_settings, _infer, _weight_here


def _fates(proxy: ProxyRunner, candidate: str) -> dict[str, int]:
    """How the copies for ``candidate`` ended so far (skips and storage counts left out)."""
    return {
        outcome: n
        for (name, outcome), n in proxy.telemetry.tally.items()
        if name == candidate and n and not outcome.startswith(("skipped:", "stored"))
    }


async def test_a_reverse_copy_the_reference_cannot_take_is_reference_unavailable(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    """The canary at 100% answers live; each answer's copy goes to the reference, which is
    down: clients still get the candidate's answers, and every copy is counted
    ``reference_unavailable`` (not the candidate's ``unavailable``)."""
    ref, ref_runner = await start_fake(FakeBehaviour())
    try:
        cand = await fake()
        settings = _canary_settings(ref.url, cand.url, redis_url, steps=[100], min_samples=10_000)
        proxy = await proxy_factory(settings)

        async def served_by_candidate() -> bool:
            return (await _infer(proxy, 1))[0][1] == "cand"

        await wait_until(served_by_candidate, what="the candidate serving at 100%")
        assert await proxy.drained(10)
    finally:
        await ref_runner.cleanup()
    before = _fates(proxy, "cand")

    answers = await _infer(proxy, 6, first=100)
    assert answers == [(200, "cand")] * 6
    assert await proxy.drained(10)
    after = _fates(proxy, "cand")
    assert {k: n - before.get(k, 0) for k, n in after.items() if n != before.get(k, 0)} == {
        "reference_unavailable": 6
    }
    assert _weight_here(proxy) == 100  # the reference's outage moved no step
