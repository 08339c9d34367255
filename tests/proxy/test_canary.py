"""The canary on fake upstreams: split, gates, commands, replicas, and the controller endpoints.

The reference and the candidate are fake V2 servers answering the same deterministic outputs
(drift plants a divergence; error/refused stage failures). Schedules are accelerated: evaluation
every 50 ms, steps held for a few samples and a fraction of a second.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
import yaml

from loadtest.procs import free_port
from proxy.app import ProxyRunner
from tests.canary_config import fast_canary
from tests.conftest import (
    ADMIN_TOKEN,
    make_settings,
    repo_root,
    wait_http_ok,
    wait_rollout,
    wait_until,
)
from tests.fakes import refused_url

AUTH = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


def _canary_settings(ref: str, cand: str, redis_url: str, **canary: Any) -> Any:
    return make_settings(
        ref,
        redis_url,
        candidates=[{"name": "cand", "url": cand, "timeout_s": 5}],
        canary=fast_canary(**canary),
    )


class _Ports(Protocol):
    """What ``_infer`` and ``_admin`` need of a proxy: a ProxyRunner, or one in another process."""

    @property
    def data_port(self) -> int: ...
    @property
    def admin_port(self) -> int: ...


async def _infer(
    proxy: _Ports, n: int, *, user: str | None = None, first: int = 0
) -> list[tuple[int, str]]:
    """Send n distinct small infer requests; (status, who answered) for each."""
    out = []
    async with aiohttp.ClientSession() as s:
        for k in range(n):
            body = (
                f'{{"inputs":[{{"name":"x","datatype":"FP32","shape":[1],"data":[{first + k}]}}]}}'
            )
            headers = {"X-User": user or f"user-{first + k}"}
            async with s.post(
                f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer",
                data=body.encode(),
                headers=headers,
            ) as r:
                await r.read()
                out.append((r.status, r.headers.get("X-Served-By", "")))
    return out


async def _admin(proxy: _Ports, method: str, path: str, **kw: Any) -> tuple[int, Any]:
    headers = kw.pop("headers", AUTH)
    async with (
        aiohttp.ClientSession() as s,
        s.request(method, f"http://127.0.0.1:{proxy.admin_port}{path}", headers=headers, **kw) as r,
    ):
        return r.status, await r.json(content_type=None)


async def test_sticky_split_answers_and_compares_both_ways(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    settings = _canary_settings(
        ref.url, cand.url, redis_url, sticky_header="X-User", min_samples=10_000
    )
    proxy = await proxy_factory(settings)
    results = await _infer(proxy, 200)
    assert all(status == 200 for status, _ in results)
    served = [who for _, who in results]
    assert 60 < served.count("cand") < 140, served.count("cand")  # 50% of 200, by hash
    assert served.count("cand") + served.count("ref") == 200
    # The same user always lands on the same side, request after request.
    for user in ("user-3", "user-7", "user-11"):
        sides = {who for _, who in await _infer(proxy, 8, user=user)}
        assert len(sides) == 1, (user, sides)
    assert await proxy.drained(10)
    await proxy.canary.evidence.flush()
    state = await proxy.canary.store.read()
    evidence = await proxy.canary.store.evidence(state.attempt, state.step)
    # Every request was compared: canary answers against a reverse copy to the reference.
    assert evidence["compared"] == 224
    assert evidence["flagged"] == 0
    assert evidence["served_cand"] + evidence["served_ref"] == 224
    assert ref.behaviour.calls == 224  # each canary answer was still sent to the reference
    assert cand.behaviour.calls == 224
    assert cand.behaviour.seen_paths[0] == "/v2/models/m/infer"


async def test_faithful_candidate_promotes_and_a_step_without_traffic_waits(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    proxy = await proxy_factory(_canary_settings(ref.url, cand.url, redis_url))

    async def waiting_decisions() -> list[dict[str, Any]]:
        return [d for d in await proxy.canary.store.decisions() if d["outcome"] == "waiting"]

    # No traffic at all: once min_duration_s is over the controller says it waits ...
    await wait_until(waiting_decisions, what="a 'waiting' decision")
    # ... and then says nothing more: six more evaluations without a second entry.
    for _ in range(6):
        await proxy.canary.tick()
    state = await proxy.canary.store.read()
    assert (state.status, state.step) == ("running", 0)
    waiting = await waiting_decisions()
    assert len(waiting) == 1  # said once, not every interval
    assert "0/10 compared requests" in waiting[0]["reason"]
    assert "neither advancing nor failing" in waiting[0]["reason"]
    code, body = await _admin(proxy, "POST", "/api/canary/flagger", json={"name": "m"})
    assert code == 425 and body["status"] == "wait"  # no data is not a verdict

    for batch in range(6):
        await _infer(proxy, 15, first=batch * 100)
        assert await proxy.drained(10)
        state = await proxy.canary.store.read()
        if state.status == "promoted":
            break

        async def moved_on_or_short(step: int = state.step) -> bool:
            now = await proxy.canary.store.read()
            if now is None or now.status == "promoted" or now.step > step:
                return True
            # Requests of the batch counted at the step before (it moved mid-batch): this step
            # needs more traffic, which the next batch brings.
            evidence = await proxy.canary.store.evidence(now.attempt, now.step)
            return int(evidence.get("compared", 0)) < 10

        # With its evidence complete, the step passes once it has been held min_duration_s.
        await wait_until(moved_on_or_short, what=f"the rollout past step {state.step}")
    state = await wait_rollout(proxy, {"promoted"})
    assert state.weight == 100
    outcomes = [d["outcome"] for d in await proxy.canary.store.decisions()]
    assert outcomes[0] == "started" and outcomes[-1] == "promoted"
    assert "advanced" in outcomes and "rolled_back" not in outcomes
    advanced = next(d for d in await proxy.canary.store.decisions() if d["outcome"] == "advanced")
    flagged_gate = next(g for g in advanced["gates"] if g["gate"] == "flagged_rate")
    assert flagged_gate["status"] == "pass" and flagged_gate["threshold"] == 0.5
    # promoted: every request is the candidate's, and no longer copied back to the reference
    assert await proxy.drained(10)
    before = ref.behaviour.calls
    assert {who for _, who in await _infer(proxy, 5)} == {"cand"}
    assert await proxy.drained(10)
    assert ref.behaviour.calls == before
    code, body = await _admin(proxy, "GET", "/api/canary/analysis")
    assert code == 200 and body["passed"] is True and body["rollout_status"] == "promoted"


async def test_divergent_candidate_rolls_back_at_once_and_says_why(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake(drift=0.5)
    proxy = await proxy_factory(_canary_settings(ref.url, cand.url, redis_url, min_samples=50))
    await _infer(proxy, 12)
    assert await proxy.drained(10)
    state = await wait_rollout(proxy, {"rolled_back"})
    assert state.weight == 0
    assert "flagged_rate" in state.reason and "above the limit" in state.reason
    last = (await proxy.canary.store.decisions())[-1]
    assert last["outcome"] == "rolled_back"
    gate = next(g for g in last["gates"] if g["gate"] == "flagged_rate")
    assert gate["status"] == "fail" and gate["value"] == 1.0 and gate["threshold"] == 0.5
    # well before min_samples: the evidence already said enough
    samples = next(g for g in last["gates"] if g["gate"] == "samples")
    assert samples["status"] == "wait" and samples["value"] < 50
    # The live path splits by the state this replica adopted, which may trail the store by one
    # evaluation.
    await wait_until(lambda: _weight_here(proxy) == 0, what="the rollback adopted")
    assert {who for _, who in await _infer(proxy, 10, first=50)} == {"ref"}
    code, body = await _admin(proxy, "POST", "/api/canary/flagger", json={"name": "m"})
    assert code == 409 and body["failed"] is True
    async with aiohttp.ClientSession() as s:
        metrics = await (
            await s.get(f"http://127.0.0.1:{proxy.admin_port}/metrics", headers=AUTH)
        ).text()
    assert 'shadowproxy_canary_decisions_total{outcome="rolled_back"' in metrics
    assert 'stat="weight"' in metrics


async def test_slow_candidate_fails_the_latency_gate(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake(delay_s=0.15)
    gates = {"max_flagged_rate": 0.3, "max_latency_p99_ratio": 1.5, "latency_slack_ms": 50}
    proxy = await proxy_factory(_canary_settings(ref.url, cand.url, redis_url, gates=gates))
    await asyncio.gather(*(_infer(proxy, 4, first=100 * k) for k in range(4)))
    assert await proxy.drained(10)
    state = await wait_rollout(proxy, {"rolled_back"})
    assert "latency_p99" in state.reason and "ms" in state.reason
    gate = next(
        g for g in (await proxy.canary.store.decisions())[-1]["gates"] if g["gate"] == "latency_p99"
    )
    # Judged on the same requests: each compared one timed on both sides, and the candidate's
    # 150 ms is over 1.5x the reference's own time on that request + 50 ms every time.
    assert gate["status"] == "fail" and gate["value"] == 1.0 and gate["threshold"] == 0.01
    found = re.search(r"paired: (\d+) of (\d+) requests answered slower than 1.5x", gate["detail"])
    assert found is not None, gate["detail"]
    assert found.group(1) == found.group(2) and int(found.group(2)) >= 10  # min_samples pairs
    assert "the reference's time on the same request + 50 ms" in gate["detail"]


async def test_refusing_candidate_falls_back_to_the_reference_and_rolls_back(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref = await fake()
    dead = refused_url()  # nothing listens there
    proxy = await proxy_factory(_canary_settings(ref.url, dead, redis_url, steps=[100]))
    # Twenty: the error gate (limit 70% in these tests) fails at 17 errors in 17 answers.
    results = await _infer(proxy, 20)
    # The client never sees the candidate's absence: the reference answered.
    assert [status for status, _ in results] == [200] * 20
    assert {who for _, who in results} == {"ref"}
    state = await wait_rollout(proxy, {"rolled_back"})
    assert "error_rate" in state.reason
    evidence = await proxy.canary.store.evidence(state.attempt, 0)
    assert evidence["fallbacks"] >= 17
    assert await proxy.drained(10)
    assert ref.behaviour.calls == 20  # one reference call per request: no reverse copy as well
    # Each fallback's copy had no canary answer to compare: counted as live_failed, once. The
    # count is the served-by-fallback metric's, not the step's evidence: requests that raced the
    # rollback still fell back, and their evidence may be flushed after the decision was read.
    async with aiohttp.ClientSession() as s:
        metrics = await (
            await s.get(f"http://127.0.0.1:{proxy.admin_port}/metrics", headers=AUTH)
        ).text()
    fell_back = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("shadowproxy_canary_served") and 'fallback="true"' in line
    )
    assert fell_back >= evidence["fallbacks"]
    assert proxy.telemetry.tally[("cand", "live_failed")] == fell_back


@pytest.mark.parametrize(
    ("reference", "outcome"),
    [("reset", "reference_bad_response"), ("slow", "reference_timeout")],
)
async def test_a_canary_answer_whose_reference_copy_fails_is_counted_by_why(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    reference: str,
    outcome: str,
) -> None:
    """At 100% the candidate answers live and the reference gets the copy: when that copy
    fails, the candidate's answer goes unchecked and the reason is counted."""
    cand = await fake()
    ref = await fake(mode="reset") if reference == "reset" else await fake(delay_s=2.0)
    settings = _canary_settings(ref.url, cand.url, redis_url, steps=[100])
    settings = settings.model_copy(
        update={"reference": settings.reference.model_copy(update={"timeout_s": 0.3})}
    )
    proxy = await proxy_factory(settings)
    await wait_rollout(proxy, {"running"})  # at its only step, 100%, before any request
    # The first request of a model waits for its config (is it a sequence model?), read from
    # the reference, so it is answered by the reference; the next ones are split.
    await _infer(proxy, 1)
    assert await proxy.drained(10)
    before = proxy.telemetry.tally[("cand", outcome)]
    results = await _infer(proxy, 3, first=1)
    assert results == [(200, "cand")] * 3  # the client never sees the reference's trouble
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("cand", outcome)] - before == 3, dict(proxy.telemetry.tally)


async def test_sequences_stay_on_the_reference_and_a_new_build_starts_a_new_attempt(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    settings = _canary_settings(ref.url, cand.url, redis_url, steps=[100])
    proxy = await proxy_factory(settings)

    async def served_by_candidate() -> bool:
        # Until the reference's config says the model is stateless (looked up in the
        # background) even plain requests stay on the reference.
        return (await _infer(proxy, 1))[0][1] == "cand"

    await wait_until(served_by_candidate, what="plain requests served by the candidate")
    body = json.dumps(
        {
            "parameters": {"sequence_id": 7},
            "inputs": [{"name": "x", "datatype": "FP32", "shape": [1], "data": [1]}],
        }
    ).encode()
    async with aiohttp.ClientSession() as s:
        for _ in range(3):
            async with s.post(
                f"http://127.0.0.1:{proxy.data_port}/v2/models/m/infer", data=body
            ) as r:
                assert r.status == 200 and r.headers["X-Served-By"] == "ref"
    assert {who for _, who in await _infer(proxy, 3, first=10)} == {"cand"}
    code, body_ = await _admin(proxy, "POST", "/api/canary/promote")
    assert code == 200
    code, body_ = await _admin(proxy, "POST", "/api/canary/flagger", json={"name": "m"})
    assert code == 200
    await proxy.stop()

    # The same rollout id with another build (another URL): a new attempt from the first step,
    # not an inherited "promoted".
    other = await fake(drift=0.5)
    again = await proxy_factory(_canary_settings(ref.url, other.url, redis_url, steps=[50, 100]))
    state = await again.canary.store.read()
    assert (state.status, state.attempt, state.step, state.weight) == ("running", 2, 0, 50)
    assert (await again.canary.store.decisions())[-1]["outcome"] == "restarted"
    code, body_ = await _admin(again, "POST", "/api/canary/pause")
    assert code == 200 and body_["state"]["status"] == "paused"
    code, body_ = await _admin(again, "POST", "/api/canary/flagger", json={"name": "m"})
    assert code == 425 and body_["status"] == "wait"  # a person holds it: Flagger must not go on
    code, body_ = await _admin(again, "POST", "/api/canary/abort")
    assert code == 200 and body_["decision"]["outcome"] == "aborted"
    assert body_["state"]["status"] == "aborted" and body_["state"]["weight"] == 0
    code, body_ = await _admin(again, "GET", "/api/canary/analysis")
    assert code == 200 and body_["failed"] is True
    # Aborted means served by the reference, not merely reported so.
    await wait_until(lambda: _weight_here(again) == 0, what="the abort adopted")
    assert {who for _, who in await _infer(again, 10, first=200)} == {"ref"}


async def test_commands_approval_and_resume_after_restart(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    settings = _canary_settings(ref.url, cand.url, redis_url, approve_before=[100])
    proxy = await proxy_factory(settings)
    await _infer(proxy, 15)
    assert await proxy.drained(10)
    state = await wait_rollout(proxy, {"awaiting_approval"})
    assert state.step == 0 and "needs a person's approval" in state.reason
    await _infer(proxy, 15, first=100)  # more evidence does not move it on its own
    assert await proxy.drained(10)

    async def all_evidence_stored() -> bool:
        evidence = await proxy.canary.store.evidence(state.attempt, 0)
        return int(evidence.get("compared", 0)) >= 30

    # All of it in the store (so the controller has seen it), then a few more evaluations.
    await wait_until(all_evidence_stored, what="30 compared at step 0")
    for _ in range(5):  # five more evaluations
        await proxy.canary.tick()
    assert (await proxy.canary.store.read()).status == "awaiting_approval"

    code, body = await _admin(proxy, "POST", "/api/canary/resume", json={"reason": "looks good"})
    assert code == 200 and body["decision"]["outcome"] == "approved"
    assert body["decision"]["by"] == "admin" and body["state"]["weight"] == 100
    code, body = await _admin(proxy, "POST", "/api/canary/pause")
    assert code == 200 and body["state"]["status"] == "paused"
    code, body = await _admin(proxy, "POST", "/api/canary/pause")
    assert code == 409 and "already paused" in body["error"]
    code, body = await _admin(proxy, "POST", "/api/canary/launch")
    assert code == 404 and "pause, resume" in body["error"]

    # A restart of the proxy resumes the rollout where it was.
    await proxy.stop()
    again = await proxy_factory(settings)
    state = again.canary.state
    assert state is not None and (state.status, state.step) == ("paused", 1)
    code, body = await _admin(again, "GET", "/api/canary")
    assert code == 200 and body["state"]["status"] == "paused"
    assert [d["outcome"] for d in body["decisions"]][-2:] == ["approved", "paused"]
    code, body = await _admin(again, "POST", "/api/canary/abort")
    assert code == 200 and body["state"]["weight"] == 0
    assert body["state"]["status"] == "aborted" and body["decision"]["outcome"] == "aborted"
    code, body = await _admin(again, "POST", "/api/canary/resume")
    assert code == 409 and "only `restart`" in body["error"]


async def test_two_proxy_processes_share_one_rollout(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    tmp_path: Path,
) -> None:
    ref, cand = await fake(), await fake()
    settings = _canary_settings(ref.url, cand.url, redis_url, min_samples=40, steps=[20, 100])
    inproc = await proxy_factory(settings)
    # The second replica is a real `shadowproxy serve` process (mirroring in its own worker).
    data = settings.model_dump(mode="json")
    data["admin"]["token"] = ADMIN_TOKEN
    data["buffer"]["redis_url"] = redis_url
    data["listen"]["port"] = 0
    data["proxy"]["mirror_process"] = True
    port = free_port()
    data["listen"]["port"] = port
    data["admin"]["port"] = free_port()
    config = tmp_path / "replica.yaml"
    config.write_text(yaml.safe_dump(data))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "serve",
        "--config",
        str(config),
        cwd=repo_root(),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        await wait_http_ok(f"http://127.0.0.1:{port}/v2/health/ready", proc=proc)
        other = _PortOnly(port, data["admin"]["port"])
        # 25 requests through each: neither alone has min_samples, together they do.
        await _infer(inproc, 25)
        await _infer(other, 25, first=1000)
        assert await inproc.drained(10)
        state = await wait_rollout(inproc, {"running"}, 5)

        async def at_last_step() -> Any:
            state = await inproc.canary.store.read()
            return state if state is not None and state.step == 1 else None

        state = await wait_until(at_last_step, 15, 0.1, what="the rollout at its second step")
        evidence = await inproc.canary.store.evidence(state.attempt, 0)
        assert evidence["compared"] >= 40
        later = await inproc.canary.store.evidence(state.attempt, 1)  # if it moved on mid-batch
        served = [e.get(k, 0) for e in (evidence, later) for k in ("served_ref", "served_cand")]
        assert sum(served) == 50  # both replicas counted every request
        rc, out, err = await _cli("resume", "--config", str(config))
        assert rc == 2 and "not paused" in err  # running: nothing to resume

        # A command through one replica's API holds the other too. With this replica stopped,
        # only the other one serves and evaluates from here on.
        code, body = await _admin(inproc, "POST", "/api/canary/pause")
        assert code == 200 and body["state"]["status"] == "paused"
        await inproc.stop()
        rc, out, err = await _cli("status", "--json", "--config", str(config))
        assert rc == 0, err
        assert json.loads(out)["state"]["status"] == "paused"
        # Enough evidence at the last step to promote, had the rollout not been paused: the other
        # replica keeps serving the step's weight and does not move on.
        assert {who for _, who in await _infer(other, 45, first=2000)} == {"cand"}

        async def other_view() -> Any:
            code, view = await _admin(other, "GET", "/api/canary")
            assert code == 200, view
            return view

        async def step_evidence_complete() -> bool:
            gates = (await other_view())["evaluation"]["gates"]
            samples = next(g for g in gates if g["gate"] == "samples")
            return bool(samples["value"] >= 40)

        await wait_until(step_evidence_complete, what="40 compared at the last step")

        async def held_for() -> float:
            # The duration gate's value is recomputed at each of the replica's evaluations.
            gates = (await other_view())["evaluation"]["gates"]
            return float(next(g for g in gates if g["gate"] == "duration")["value"])

        start = await held_for()

        async def ten_more_evaluations() -> bool:
            return await held_for() >= start + 10 * 0.05

        await wait_until(ten_more_evaluations, what="ten more of its evaluations")
        view = await other_view()
        assert (view["state"]["status"], view["state"]["step"]) == ("paused", 1), view["state"]
        assert view["serving_weight_here"] == 100
        rc, out, err = await _cli("resume", "--config", str(config))
        assert rc == 0, err
        assert "resumed" in out and "cli:" in out
        # The other replica alone applies the resume: it promotes on the evidence it held.
        view = await wait_until(
            lambda: _status_is(other_view(), "promoted"), what="the other replica promotes"
        )
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)


async def _cli(*args: str) -> tuple[int, str, str]:
    """``shadowproxy canary ARGS``: (exit status, stdout, stderr)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "canary",
        *args,
        cwd=repo_root(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_flagger_webhook_and_argo_metric_need_a_token(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    ref, cand = await fake(), await fake()
    proxy = await proxy_factory(_canary_settings(ref.url, cand.url, redis_url))
    code, _ = await _admin(proxy, "POST", "/api/canary/flagger", json={}, headers={})
    assert code == 401
    payload = {"name": "m", "namespace": "ml", "phase": "Progressing", "metadata": {}}
    payload["metadata"] = {"token": ADMIN_TOKEN}
    code, body = await _admin(proxy, "POST", "/api/canary/flagger", json=payload, headers={})
    assert code == 425 and body["flagger"]["phase"] == "Progressing"
    assert body["gates"]["samples"]["threshold"] == 10
    code, _ = await _admin(proxy, "GET", "/api/canary/analysis", headers={})
    assert code == 401
    code, _ = await _admin(proxy, "POST", "/api/canary/pause", headers={})
    assert code == 401


def _weight_here(proxy: ProxyRunner) -> float | None:
    """The weight this replica serves by now (None when its view of the rollout is stale)."""
    state = proxy.canary.state
    return None if state is None else state.weight


async def _status_is(view: Any, status: str) -> Any:
    """The awaited ``/api/canary`` view when the rollout's status is ``status``, else None."""
    got = await view
    return got if got["state"]["status"] == status else None


class _PortOnly:
    """Enough of a ProxyRunner for ``_infer`` and ``_admin``: the ports of a proxy in another
    process."""

    def __init__(self, port: int, admin_port: int) -> None:
        self.data_port = port
        self.admin_port = admin_port
