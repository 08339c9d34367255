"""Mirroring never changes the live answer; every way a copy ends is counted by its name."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import aiohttp
import pytest

from proxy.app import ProxyRunner
from tests.conftest import make_settings, wait_until

# proxy.max_body_bytes for the body-size test: above the 1 MiB up to which the aiohttp path reads
# an unmirrored body whole (and enforces the limit); larger unmirrored bodies stream through.
LIMIT = 2 * 1024 * 1024


def _body(size: int, k: int = 0) -> bytes:
    """A valid V2 request of exactly ``size`` bytes (a padding parameter)."""
    head = b'{"inputs":[{"name":"x","datatype":"FP32","shape":[1],"data":[%d]}],' % k
    head += b'"parameters":{"pad":"'
    tail = b'"}}'
    return head + b"p" * (size - len(head) - len(tail)) + tail


async def _post(
    port: int, body: bytes, headers: dict[str, str] | None = None, path: str = "m"
) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as s,
        s.post(f"http://127.0.0.1:{port}/v2/models/{path}/infer", data=body, headers=headers) as r,
    ):
        return r.status, await r.read()


def _proxy_settings(**over: Any) -> dict[str, Any]:
    return {"drain_timeout_s": 2, "shed_lag_ms": 0, "mirror_process": False, **over}


@pytest.mark.parametrize("fast_lane", [True, False], ids=["fast_lane", "aiohttp"])
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(0, id="at_limit"),
        pytest.param(1, id="one_over"),
        pytest.param(LIMIT, id="twice"),
    ],
)
async def test_a_body_at_or_over_max_body_bytes_reaches_the_reference_mirrored_or_not(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    fast_lane: bool,
    extra: int,
) -> None:
    ref, cand = await fake(), await fake()
    proxy = _proxy_settings(max_body_bytes=LIMIT, fast_lane=fast_lane)
    plain = await proxy_factory(make_settings(ref.url, redis_url, proxy=proxy))
    mirrored = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}], proxy=proxy)
    )
    body = _body(LIMIT + extra)
    assert len(body) == LIMIT + extra
    direct = await _post(int(ref.url.rsplit(":", 1)[1]), body)
    assert direct[0] == 200
    # Unmirrored, the body reaches the reference (read whole at the limit, streamed over it)...
    assert await _post(plain.data_port, body) == direct
    assert ref.behaviour.calls == 2
    # ... and copied to a candidate, exactly the same: the reference's answer, byte for byte.
    assert await _post(mirrored.data_port, body) == direct
    assert ref.behaviour.calls == 3
    assert await mirrored.drained(10)
    # Over the limit the copy is skipped, and says why; at it, the copy is compared.
    skipped = mirrored.telemetry.tally[("*", "skipped:request_too_large")]
    assert (skipped, cand.behaviour.calls) == ((1, 0) if extra else (0, 1))


def _fates(proxy: ProxyRunner, candidate: str = "c") -> dict[str, int]:
    """How the candidate's copies ended, by outcome (skips and storage counts left out)."""
    return {
        what: n
        for (cand, what), n in proxy.telemetry.tally.items()
        if cand == candidate and n and not what.startswith(("skipped:", "stored", "store_"))
    }


def _metric(proxy: ProxyRunner, outcome: str) -> str:
    return f'shadowproxy_mirror_outcomes_total{{candidate="c",outcome="{outcome}"}} 1.0'


@pytest.mark.parametrize(
    ("ref_mode", "cand_mode", "outcome", "live_status"),
    [
        ("ok", "hold", "timeout", 200),  # the candidate answers after its own timeout_s
        ("error", "error", "both_failed", 500),  # same error on both sides: no divergence
        ("garbage", "ok", "reference_undecodable", 200),  # nothing to compare against
        ("reset", "ok", "reference_failed", 502),  # the live call itself failed
    ],
)
async def test_each_way_a_copy_ends_is_counted_once_by_its_name(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    ref_mode: str,
    cand_mode: str,
    outcome: str,
    live_status: int,
) -> None:
    hold = asyncio.Event()  # never set: a held candidate answers only after its timeout
    ref = await fake(mode=ref_mode)
    cand = await fake(mode="ok", hold=hold) if cand_mode == "hold" else await fake(mode=cand_mode)
    candidates = [{"name": "c", "url": cand.url, "timeout_s": 0.2}]
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=candidates, proxy=_proxy_settings())
    )
    status, _ = await _post(proxy.data_port, _body(200))
    assert status == live_status  # the reference's answer (or the proxy's 502 for its reset)
    assert await proxy.drained(10)
    hold.set()
    assert cand.behaviour.calls == 1
    assert _fates(proxy) == {outcome: 1}
    assert _metric(proxy, outcome) in proxy.telemetry.prometheus_text().decode()


@pytest.mark.parametrize(
    ("model", "body", "reason"),
    [
        ("m", b'{"inputs": [not json', "unparseable_request"),
        ("stateful_lm", _body(200), "sequence_model"),  # the model's config: sequence batching
        ("decoupled_lm", _body(200), "decoupled_model"),  # many answers to one request
    ],
)
async def test_copies_that_must_not_reach_a_candidate_are_skipped_by_reason(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    model: str,
    body: bytes,
    reason: str,
) -> None:
    ref, cand = await fake(), await fake()
    proxy = await proxy_factory(
        make_settings(
            ref.url, redis_url, candidates=[{"name": "c", "url": cand.url}], proxy=_proxy_settings()
        )
    )
    direct = await _post(int(ref.url.rsplit(":", 1)[1]), body, path=model)
    assert await _post(proxy.data_port, body, path=model) == direct
    assert await proxy.drained(10)
    assert cand.behaviour.calls == 0
    assert proxy.telemetry.tally[("c", f"skipped:{reason}")] == 1
    assert _fates(proxy) == {}


async def test_shutdown_drops_queued_copies_and_cancels_calls_past_the_drain_timeout(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str
) -> None:
    hold = asyncio.Event()
    ref, cand = await fake(), await fake(hold=hold)
    candidates = [{"name": "c", "url": cand.url, "max_in_flight": 1, "timeout_s": 30}]
    proxy = await proxy_factory(
        make_settings(
            ref.url, redis_url, candidates=candidates, proxy=_proxy_settings(drain_timeout_s=0.2)
        )
    )
    for k in range(3):
        assert (await _post(proxy.data_port, _body(200, k)))[0] == 200
    # One call at the candidate (held), two copies waiting behind max_in_flight.
    await wait_until(lambda: cand.behaviour.in_flight == 1, what="one call held")
    await proxy.stop()
    hold.set()
    assert _fates(proxy) == {"cancelled": 1, "dropped_shutdown": 2}


@pytest.mark.parametrize("forward", [False, True])
async def test_credentials_reach_a_candidate_only_when_configured(
    fake: Callable[..., Any], proxy_factory: Callable[..., Any], redis_url: str, forward: bool
) -> None:
    ref, cand = await fake(), await fake()
    candidates = [{"name": "c", "url": cand.url, "forward_credentials": forward}]
    proxy = await proxy_factory(
        make_settings(ref.url, redis_url, candidates=candidates, proxy=_proxy_settings())
    )
    secrets = {"Authorization": "Bearer s3cret", "Cookie": "session=abc"}
    assert (await _post(proxy.data_port, _body(200), headers=secrets))[0] == 200
    assert await proxy.drained(10)
    seen = cand.behaviour.seen_headers[0]
    for name, value in secrets.items():
        assert seen.get(name) == (value if forward else None), name
        assert ref.behaviour.seen_headers[0][name] == value
    # Never stored, whatever the candidate got.
    (sample,) = await proxy.store.list_samples(flagged=False)
    stored = [sample, await proxy.store.get_sample(sample["id"])]
    assert "s3cret" not in repr(stored) and "session=abc" not in repr(stored)


@pytest.mark.parametrize(("rate", "stored"), [(0.0, 0), (1.0, 5)])
async def test_unflagged_comparisons_are_stored_at_store_unflagged_rate(
    fake: Callable[..., Any],
    proxy_factory: Callable[..., Any],
    redis_url: str,
    rate: float,
    stored: int,
) -> None:
    ref, cand = await fake(), await fake()  # identical answers: nothing is flagged
    settings = make_settings(
        ref.url,
        redis_url,
        candidates=[{"name": "c", "url": cand.url}],
        proxy=_proxy_settings(),
        buffer={"redis_url": redis_url, "store_unflagged_rate": rate},
    )
    proxy = await proxy_factory(settings)
    for k in range(5):
        assert (await _post(proxy.data_port, _body(200, k)))[0] == 200
    assert await proxy.drained(10)
    assert proxy.telemetry.tally[("c", "compared")] == 5
    assert await proxy.store.list_samples(flagged=True) == []
    verdicts = await proxy.store.list_samples(flagged=False, limit=100)
    assert len(verdicts) == 5  # every verdict is in the stream ...
    kept = [await proxy.store.get_sample(v["id"]) for v in verdicts]
    kept = [sample for sample in kept if sample is not None]
    assert len(kept) == stored  # ... and this share with its full payloads, for context
    assert all(not sample["flagged"] and sample["payloads"] for sample in kept)
