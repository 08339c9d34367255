"""The one-pass kernels give the straightforward formulas' numbers, whatever the input layout."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from comparators import MetricSpec, compare_output, numeric

Arr = np.ndarray[Any, Any]
ELEMENTWISE = ("tolerance", "sqnr", "cosine")


def _pair(n: int, seed: int = 0) -> tuple[Arr, Arr]:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal(n).astype(np.float32)
    return ref, (ref + 1e-3 * rng.standard_normal(n)).astype(np.float32)


def _quantiles(ref: Arr, cand: Arr) -> tuple[float, float]:
    v = compare_output("o", ref, cand, MetricSpec("tolerance"))
    return v.scores["median_abs"], v.scores["p99_abs"]


def _expected(ref: Arr, cand: Arr) -> tuple[float, float]:
    d = np.abs(ref.astype(np.float64) - cand.astype(np.float64)).reshape(-1)
    med, p99 = np.quantile(d, [0.5, 0.99])
    return float(med), float(p99)


@pytest.mark.parametrize("layout", ["random", "sorted", "reversed", "periodic", "ties"])
def test_quantiles_are_exact_on_large_inputs(layout: str) -> None:
    # Large enough for the sampled brackets; each layout is one a strided sample could misjudge.
    ref, cand = _pair(200_003)
    if layout in ("sorted", "reversed"):
        order = np.argsort(np.abs(ref.astype(np.float64) - cand))
        order = order if layout == "sorted" else order[::-1]
        ref, cand = ref[order], cand[order]
    elif layout == "periodic":
        cand = ref.copy()
        cand[:: numeric._SAMPLE // 8] += 1.0  # spikes on a stride close to the sample's
    elif layout == "ties":
        cand = ref + np.where(np.arange(ref.size) % 3 == 0, 0.5, 0.0).astype(np.float32)
    assert _quantiles(ref, cand) == _expected(ref, cand)


def test_quantiles_fall_back_when_a_bracket_misses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(numeric, "_Z", 0.0)  # brackets of ~2 sample ranks: they miss
    ref, cand = _pair(150_001, seed=3)
    assert _quantiles(ref, cand) == _expected(ref, cand)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 10, 99, 101, 16_385, 70_000])
def test_quantiles_match_numpy_for_small_and_odd_sizes(n: int) -> None:
    ref, cand = _pair(n, seed=n)
    assert _quantiles(ref, cand) == _expected(ref, cand)


@pytest.mark.parametrize("metric", ELEMENTWISE)
def test_float32_scores_equal_their_float64_widening(metric: str) -> None:
    # Widening is exact, so blockwise widening inside the kernels must give the same numbers.
    ref, cand = _pair(50_000, seed=7)
    ref, cand = ref.reshape(100, 500), cand.reshape(100, 500)
    v32 = compare_output("o", ref, cand, MetricSpec(metric))
    v64 = compare_output("o", ref.astype(np.float64), cand.astype(np.float64), MetricSpec(metric))
    for key, value in v64.scores.items():
        assert v32.scores[key] == pytest.approx(value, rel=1e-12, abs=1e-15), key


@pytest.mark.parametrize("metric", ("tolerance", "sqnr", "cosine", "logits", "argmax"))
def test_inputs_are_read_only_to_the_metrics(metric: str) -> None:
    ref, cand = _pair(4_000, seed=1)
    ref, cand = ref.reshape(40, 100), cand.reshape(40, 100)
    before = ref.copy(), cand.copy()
    ref.flags.writeable = cand.flags.writeable = False
    v = compare_output("o", ref, cand, MetricSpec(metric))
    assert v.valid, v.reason
    assert np.array_equal(ref, before[0]) and np.array_equal(cand, before[1])


@pytest.mark.parametrize("scale", [1e-170, 1e170, 1e300])
def test_extreme_float64_magnitudes_take_the_rescaled_path(scale: float) -> None:
    ref = np.array([[3.0, 4.0], [1.0, -2.0]]) * scale
    cand = np.array([[3.0, 4.5], [1.0, -2.0]]) * scale
    s = compare_output("o", ref, cand, MetricSpec("sqnr")).scores
    # signal 9+16+1+4 = 30, noise 0.25, in units of scale^2 (which alone would over/underflow)
    assert s["sqnr_db"] == pytest.approx(10 * np.log10(30 / 0.25), rel=1e-12)
    c = compare_output("o", ref, cand, MetricSpec("cosine")).scores
    expected = (9 + 18) / (5 * np.sqrt(9 + 20.25))
    assert c["min_cosine"] == pytest.approx(expected, rel=1e-12)
    assert c["max_norm_ratio"] == pytest.approx(np.sqrt(29.25) / 5, rel=1e-12)


def test_tolerance_first_of_equal_maxima_across_blocks() -> None:
    ref = np.zeros(40_000)
    cand = ref.copy()
    cand[[20_000, 30_000]] = 1.0  # equal worst errors in different blocks: the first is reported
    v = compare_output("o", ref, cand, MetricSpec("tolerance"))
    assert v.scores["argmax_abs"] == 20_000.0 and "flat index 20000" in v.reason
