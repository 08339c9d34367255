"""Noise floor and population statistics: hand-checked values and the flagging rules."""

from __future__ import annotations

import math

import numpy as np
import pytest

from comparators import MetricSpec, OutputVerdict, compare_output
from comparators.noise import NoiseFloor, NoisePolicy
from comparators.population import (
    Cell,
    CellStats,
    LogHistogram,
    PairBuffer,
    PopulationStats,
    mcnemar_p,
    rank_test,
    summary_rows,
    two_proportion_p,
    wilcoxon_greater_p,
    wilson_interval,
)


def _v(severity: float, flagged: bool = True, output: str = "y") -> OutputVerdict:
    return OutputVerdict(
        output,
        "cosine",
        severity=severity,
        flagged=flagged,
        headline="min_cosine",
        scores={"min_cosine": 1 - severity},
        reason="below threshold",
    )


def test_wilson_interval_hand_values() -> None:
    # k=0, n=10: upper = z^2/n / (1 + z^2/n) = 0.38415/1.38415 = 0.2775
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.27753, abs=1e-4)
    lo, hi = wilson_interval(5, 10)  # symmetric around 0.5: 0.2366 .. 0.7634
    assert lo == pytest.approx(0.23659, abs=1e-4) and hi == pytest.approx(0.76341, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_mcnemar_hand_values() -> None:
    assert mcnemar_p(0, 0) == 1.0
    # exact: b=0, c=6 -> 2 * 0.5^6 = 0.03125
    assert mcnemar_p(0, 6) == pytest.approx(0.03125)
    # chi-square: b=30, c=10 -> (20-1)^2/40 = 9.025 -> p = erfc(sqrt(4.5125)) = 0.002663
    assert mcnemar_p(30, 10) == pytest.approx(math.erfc(math.sqrt(9.025 / 2)), rel=1e-9)
    assert mcnemar_p(30, 10) == pytest.approx(0.00266, abs=1e-4)


def test_wilcoxon_one_sided() -> None:
    assert wilcoxon_greater_p([1.0] * 5) == (1.0, 5)  # too few pairs: no evidence either way
    p, n = wilcoxon_greater_p([float(i) for i in range(1, 21)])  # all positive: W+ = 210
    # mean 105, var 20*21*41/24 = 717.5 -> z = (210-105-0.5)/26.786 = 3.901 -> p = 4.8e-5
    assert n == 20 and p == pytest.approx(0.5 * math.erfc(3.9013 / math.sqrt(2)), rel=1e-3)
    rng = np.random.default_rng(0)
    p_null, _ = wilcoxon_greater_p(rng.normal(size=200).tolist())
    assert p_null > 0.01
    assert wilcoxon_greater_p([-float(i) for i in range(1, 21)])[0] > 0.99


def test_noise_floor_rules() -> None:
    floor = NoiseFloor(NoisePolicy(min_samples=10, quantile=0.9, margin=2.0))
    key = ("m", "y")
    # No floor yet: the threshold alone decides.
    judged, a = floor.judge(key, _v(0.01))
    assert judged.flagged and a.samples == 0 and a.p_value == 1.0
    for s in np.linspace(0.001, 0.010, 10):
        floor.observe(key, _v(float(s), flagged=False))
    a = floor.assess(key, 0.0095)
    assert a.floor == pytest.approx(0.009, rel=0.01) and not a.beyond  # 0.0095 < 2 x 0.009
    assert a.p_value == pytest.approx((1 + 1) / 11)  # one A/A value (0.010) is >= 0.0095
    judged, _ = floor.judge(key, _v(0.0095))
    assert not judged.flagged and judged.reason == "" and judged.scores["noise_p"] > 0.1
    judged, _ = floor.judge(key, _v(0.05))
    assert judged.flagged and "beyond the noise floor" in judged.reason
    assert judged.scores["noise_p"] == pytest.approx(1 / 11)
    # Below the comparator's threshold stays unflagged even far beyond the floor.
    assert not floor.judge(key, _v(0.05, flagged=False))[0].flagged
    # Invalid verdicts are never excused by noise and never enter the floor.
    bad = OutputVerdict("y", "cosine", validity="non_finite", flagged=True, severity=1e9)  # type: ignore[arg-type]
    floor.observe(key, bad)
    assert floor.samples(key) == 10


def test_noise_only_and_threshold_only_modes() -> None:
    for mode, expect in (("noise_only", True), ("threshold_only", False)):
        floor = NoiseFloor(NoisePolicy(mode=mode, min_samples=1))  # type: ignore[arg-type]
        floor.observe("k", _v(0.001, flagged=False))
        assert floor.judge("k", _v(0.5, flagged=False))[0].flagged is expect


def test_population_sketches_pairs_and_merge() -> None:
    cell = Cell("m", "int8", "y", "cosine", "min_cosine")
    a, b = PopulationStats(), PopulationStats()
    for i in range(100):
        a.record(cell, 7, _v(i / 1000, flagged=i >= 90))
    for i in range(100, 200):
        b.record(cell, 8, _v(i / 1000, flagged=False))
    # Two processes' minutes, summed field by field as Redis's HINCRBY does.
    merged = CellStats()
    for stats in [*a.take().values(), *b.take().values()]:
        merged.add_counters(stats.counters())
    (row,) = summary_rows({cell: merged})
    assert row["samples"] == 200 and row["flagged"] == 10
    assert row["severity"]["p50"] == pytest.approx(0.1, rel=0.02)  # 1% sketch accuracy
    assert row["severity"]["max"] == pytest.approx(0.199, rel=0.01)
    assert row["headline"]["p50"] == pytest.approx(0.9, rel=0.01)
    lo, hi = row["flagged_rate_ci95"]
    assert lo < 0.05 < hi
    assert len(a) == 0  # taken
    pairs = PairBuffer()
    assert pairs.add_candidate(1, "int8", [_v(0.2)]) == []
    matched = pairs.add_twin(1, [_v(0.0, flagged=False)])
    assert [(c, ab.severity, aa.severity) for c, ab, aa in matched] == [("int8", 0.2, 0.0)]
    assert len(pairs.add_candidate(1, "bf16", [_v(0.1)])) == 1  # twin already known


def test_log_histogram_quantiles_ranks_and_fields() -> None:
    h = LogHistogram()
    values = [-2.0, -0.5, 0.0, 0.0, 1e-6, 0.01, 0.5, 3.0, 1e6, float("nan")]
    for x in values:
        h.add(x)
    assert h.count == 9  # NaN is not a value
    assert h.quantile(0.0) == pytest.approx(-2.0, rel=0.01)
    assert h.quantile(0.5) == pytest.approx(1e-6, rel=0.01)
    assert h.max() == pytest.approx(1e6, rel=0.01)
    assert h.at_least(0.5) == 3 and h.at_least(0.0) == 7 and h.at_least(-1.0) == 8
    # Fields round-trip, and adding the same fields twice doubles every count.
    back = LogHistogram()
    for name, n in h.to_fields("s").items():
        assert back.add_field("s", name, 2 * n)
    assert back.count == 18 and back.quantile(0.5) == h.quantile(0.5)
    assert not back.add_field("s", "h:3", 1)  # another histogram's field
    assert LogHistogram().quantile(0.5) is None


def test_the_floor_is_the_merged_window_plus_what_this_process_saw() -> None:
    floor = NoiseFloor(NoisePolicy(min_samples=10, quantile=0.9))
    for s in np.linspace(0.001, 0.010, 10):
        floor.observe("k", _v(float(s), flagged=False))
    taken = floor.take_local()
    assert floor.samples("k") == 10  # handed over to be stored: still counted, once
    floor.set_merged(taken)  # as read back from Redis
    floor.observe("k", _v(0.02, flagged=False))
    assert floor.samples("k") == 11
    failed = floor.take_local()
    floor.put_back_local(failed)  # a failed write keeps them local, counted once
    assert floor.samples("k") == 11
    floor.take_local()
    floor.set_merged({})  # the store's window no longer holds any of it (expired)
    assert floor.samples("k") == 0


def test_cosine_verdicts_feed_the_floor_end_to_end() -> None:
    rng = np.random.default_rng(1)
    floor = NoiseFloor(NoisePolicy(min_samples=50))
    spec = MetricSpec("cosine", {"min_cosine": 0.999999})
    for _ in range(200):
        ref = rng.normal(size=(4, 384))
        floor.observe(
            "e", compare_output("e", ref, ref + rng.normal(scale=1e-3, size=ref.shape), spec)
        )
    noisy, real = 0, 0
    for _ in range(100):
        ref = rng.normal(size=(4, 384))
        same = compare_output("e", ref, ref + rng.normal(scale=1e-3, size=ref.shape), spec)
        worse = compare_output("e", ref, ref + rng.normal(scale=5e-3, size=ref.shape), spec)
        noisy += floor.judge("e", same)[0].flagged
        real += floor.judge("e", worse)[0].flagged
    assert noisy == 0 and real == 100


def test_two_proportion_and_rank_tests_by_hand() -> None:
    # 10/100 against 25/100: pooled 0.175, z = -0.15 / sqrt(0.175 * 0.825 * 0.02) = -2.7915.
    assert two_proportion_p(10, 100, 25, 100) == pytest.approx(
        math.erfc(2.7914526 / math.sqrt(2)), rel=1e-6
    )
    assert two_proportion_p(0, 0, 3, 10) == 1.0
    # Values far apart fall in distinct 1% bins, so the binned U is the exact Mann-Whitney U:
    # b > a in 26 of the 30 pairs; normal approximation without continuity correction
    # (scipy.stats.mannwhitneyu(b, a, method="asymptotic", use_continuity=False): U 26,
    # p 0.044610).
    a, b = LogHistogram(), LogHistogram()
    for x in (0.1, 0.2, 0.3, 0.5, 0.9):
        a.add(x)
    for x in (0.4, 0.6, 0.7, 1.2, 2.0, 3.0):
        b.add(x)
    r = rank_test(a, b)
    assert r["u"] == 26 and r["p"] == pytest.approx(0.044610, rel=1e-4)
    assert r["prob_b_greater"] == pytest.approx(26 / 30)
    # Ties (equal values share a bin) count half, and the tie correction narrows the variance.
    same = LogHistogram()
    same.add(0.5, 4)
    tied = rank_test(same, same)
    assert tied["prob_b_greater"] == 0.5 and tied["p"] == 1.0
    assert rank_test(LogHistogram(), b)["p"] is None
