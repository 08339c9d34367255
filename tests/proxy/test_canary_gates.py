"""The canary's gates on hand-made evidence: the rules, and the numbers they report."""

from __future__ import annotations

import math

import pytest

from proxy.canary import gates as g
from proxy.settings import CanaryGates


def _evaluate(evidence: dict[str, int], **kw: object) -> dict[str, g.GateResult]:
    args: dict[str, object] = {
        "min_samples": 60,
        "elapsed_s": 10.0,
        "min_duration_s": 5.0,
        "has_twin": False,
    }
    args.update(kw)
    result = g.evaluate(evidence, CanaryGates(), **args)  # type: ignore[arg-type]
    return {r.gate: r for r in result.gates}


def _mixture(k: int, n: int, limit: float, above: bool) -> float:
    """The gate's evidence written out independently: the mean over 24 alternatives, 1% to 99%
    of the way from the limit to 1 (above) or to 0 (below) in geometric steps, of the
    likelihood ratio theta^k (1 - theta)^(n - k) / (L^k (1 - L)^(n - k))."""
    steps = [0.99 * 10 ** (-2 + 2 * (j + 0.5) / 24) for j in range(24)]
    thetas = [limit + (1 - limit) * s if above else limit * (1 - s) for s in steps]
    return sum((t / limit) ** k * ((1 - t) / (1 - limit)) ** (n - k) for t in thetas) / 24


def test_sequential_evidence_is_the_mixture_likelihood_ratio() -> None:
    for k, n, limit in (
        (0, 60, 0.05),
        (3, 60, 0.05),
        (2, 2, 0.05),
        (10, 100, 0.05),
        (5, 100, 0.02),
    ):
        above, below = g.sequential_evidence(k, n, limit)
        assert above == pytest.approx(_mixture(k, n, limit, True), rel=1e-9)
        assert below == pytest.approx(_mixture(k, n, limit, False), rel=1e-9)
    assert g.sequential_evidence(1, 5, 0.0) == (math.inf, 1.0)  # a zero limit: one event fails
    assert g.sequential_evidence(5, 5, 1.0) == (1.0, math.inf)


def test_rate_gate_decides_when_the_evidence_reaches_one_over_alpha() -> None:
    # At 95% confidence a verdict needs evidence 20. No flagged answer in 119: 19.6 (wait);
    # in 120: 20.4, and min_samples (60) is met: pass.
    r = _evaluate({"compared": 119, "flagged": 0})["flagged_rate"]
    assert r.status == "wait" and "inconclusive" in r.detail
    r = _evaluate({"compared": 120, "flagged": 0})["flagged_rate"]
    assert r.status == "pass" and r.value == 0.0 and r.threshold == 0.05
    assert "decides at 20" in r.detail
    # 0 of 60 is not yet evidence (2.86), though a fixed 95% Wilson bound (4.31%) would pass it:
    # looking again and again is what the sequential test pays for.
    assert _evaluate({"compared": 60, "flagged": 0})["flagged_rate"].status == "wait"
    # 10 of 100 (10%): evidence above 2.77, below 0.49: inconclusive, needs more samples.
    r = _evaluate({"compared": 100, "flagged": 10})["flagged_rate"]
    assert r.status == "wait" and "above 2.77" in r.detail
    # 2 of 2 flagged: 47.3 already, long before min_samples.
    r = _evaluate({"compared": 2, "flagged": 2})["flagged_rate"]
    assert r.status == "fail" and "above 47.3" in r.detail


def test_error_rate_is_judged_against_the_references() -> None:
    evidence = {"compared": 100, "cand_calls": 100, "cand_errors": 10}
    assert _evaluate(evidence)["error_rate"].status == "fail"  # 10% against 0% + 2%
    evidence.update({"ref_calls": 100, "ref_errors": 8})  # the reference errs nearly as often
    r = _evaluate(evidence)["error_rate"]
    assert r.status == "wait" and r.threshold == pytest.approx(0.10)


def test_latency_prefers_live_answers_and_falls_back_to_timed_pairs() -> None:
    evidence = {
        g.latency_field(g.LAT_REF, 0.010): 100,
        g.latency_field(g.LAT_CAND, 0.100): 100,
    }
    r = _evaluate(evidence)["latency_p99"]
    assert r.status == "fail" and "timed pairs" in r.detail  # 100 ms > 1.5 x 10 ms + 5 ms
    assert r.value == pytest.approx(100, rel=0.02)
    evidence[g.latency_field(g.LIVE_LAT_REF, 0.010)] = 80
    evidence[g.latency_field(g.LIVE_LAT_CAND, 0.012)] = 80
    r = _evaluate(evidence)["latency_p99"]
    assert r.status == "pass" and "live answers" in r.detail
    assert r.threshold == pytest.approx(20, rel=0.03)


def test_paired_gate_mcnemar() -> None:
    assert g.mcnemar_greater_p(5, 0) == pytest.approx(1 / 32)
    assert g.mcnemar_greater_p(2, 7) == 1.0
    twin = {"pairs": 40, "pairs_cand_only": 8, "pairs_twin_only": 0}
    r = _evaluate(twin, has_twin=True)["paired_vs_noise"]
    assert r.status == "fail" and r.value == pytest.approx(1 / 256)
    r = _evaluate({"pairs": 40, "pairs_cand_only": 2, "pairs_twin_only": 1}, has_twin=True)[
        "paired_vs_noise"
    ]
    assert r.status == "pass"
    assert _evaluate({"pairs": 5}, has_twin=True)["paired_vs_noise"].status == "wait"
    assert _evaluate({}, has_twin=True, weight=100.0)["paired_vs_noise"].status == "skip"
    assert _evaluate({})["paired_vs_noise"].status == "skip"


def test_no_data_waits_and_any_failure_fails_the_step() -> None:
    result = g.evaluate(
        {}, CanaryGates(), min_samples=10, elapsed_s=0, min_duration_s=1, has_twin=False
    )
    assert result.status == "wait" and not result.failed
    assert "0/10 compared requests" in result.summary()
    result = g.evaluate(
        {"compared": 4, "flagged": 4},
        CanaryGates(),
        min_samples=10,
        elapsed_s=0,
        min_duration_s=1,
        has_twin=False,
    )
    assert result.status == "fail" and result.summary().startswith("flagged_rate:")


def test_time_to_first_token_gate_compares_both_sides_and_skips_without_tokens() -> None:
    assert _evaluate({})["ttft"].status == "skip"
    evidence = {g.latency_field(g.TTFT_REF, 0.050): 30, g.latency_field(g.TTFT_CAND, 0.060): 30}
    assert _evaluate(evidence)["ttft"].status == "wait"  # 30 of 60
    evidence = {g.latency_field(g.TTFT_REF, 0.050): 100, g.latency_field(g.TTFT_CAND, 0.080): 100}
    r = _evaluate(evidence)["ttft"]
    # 80 ms against 1.5 x 50 ms + 20 ms = 95 ms
    assert r.status == "pass" and r.threshold == pytest.approx(95, rel=0.03)
    evidence[g.latency_field(g.TTFT_CAND, 0.080)] = 0
    evidence[g.latency_field(g.TTFT_CAND, 0.200)] = 100
    r = _evaluate(evidence)["ttft"]
    assert r.status == "fail" and r.value == pytest.approx(200, rel=0.02)


def test_semantic_gate_reads_a_low_quantile_of_the_cosine() -> None:
    assert _evaluate({})["semantic"].status == "skip"  # no floor set
    gates = CanaryGates(min_semantic_similarity=0.9, semantic_quantile=0.1)

    def semantic(evidence: dict[str, int]) -> g.GateResult:
        result = g.evaluate(
            evidence, gates, min_samples=60, elapsed_s=10, min_duration_s=5, has_twin=False
        )
        return next(r for r in result.gates if r.gate == "semantic")

    # 90 answers at cosine 0.99 and 10 at 0.5: the 10% quantile is 0.5, below 0.9.
    evidence = {g.semantic_field(0.99): 90, g.semantic_field(0.5): 10}
    r = semantic(evidence)
    assert r.status == "fail" and r.value == pytest.approx(0.5, abs=1e-3)
    # 95 at 0.99 and 5 at 0.5: the 10% quantile is 0.99.
    r = semantic({g.semantic_field(0.99): 95, g.semantic_field(0.5): 5})
    assert r.status == "pass" and r.value == pytest.approx(0.99, abs=1e-3)
    assert semantic({g.semantic_field(0.99): 10}).status == "wait"


def test_latency_is_judged_on_the_same_requests_where_there_are_enough() -> None:
    # 300 requests timed on both sides, none over 1.5x its own reference time + 5 ms: pass, and
    # the log says it was the paired data.
    r = _evaluate({"compared": 300, "lat_pairs": 300, "lat_exceed": 0})["latency_p99"]
    assert r.status == "pass" and r.detail.startswith("paired: 0 of 300 requests")
    # 20 of 300 over their bound: evidence far above 20 that more than 1% are: rolled back.
    r = _evaluate({"compared": 300, "lat_pairs": 300, "lat_exceed": 20})["latency_p99"]
    assert r.status == "fail" and "paired: 20 of 300" in r.detail
    # 4 of 300 (1.3%): not evidence of more than 1% yet, and over it: wait for more.
    r = _evaluate({"compared": 300, "lat_pairs": 300, "lat_exceed": 4})["latency_p99"]
    assert r.status == "wait" and "inconclusive" in r.detail
    # Too few pairs (a step at a low weight): the unpaired quantiles decide, and say why.
    evidence = {"compared": 100, "lat_pairs": 5}
    for side in ("live_lat_ref", "live_lat_cand"):
        evidence[g.latency_field(side, 0.010)] = 100
    r = _evaluate(evidence)["latency_p99"]
    assert r.status == "pass" and "only 5/60 requests timed on both sides" in r.detail
