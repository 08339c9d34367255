"""One severity scale: each comparator's raw severity over its own threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from comparators import SEVERITY_CAP, MetricSpec, OutputVerdict, compare_output
from comparators.normalize import normalized_severity, spec_key, threshold


def _norm(metric: str, ref: object, cand: object, **params: object) -> tuple[float, float]:
    v = compare_output("y", ref, cand, MetricSpec(metric, dict(params)))
    return v.severity, normalized_severity(v, params)


def test_each_metric_over_its_own_threshold() -> None:
    # cosine: 1 - cos over 1 - min_cosine. cos(a, b) = 0.995 gives 0.005 / 0.001 = 5.
    a = np.array([[1.0, 0.0]])
    b = np.array([[0.995, math.sqrt(1 - 0.995**2)]])
    raw, norm = _norm("cosine", a, b, min_cosine=0.999)
    assert raw == pytest.approx(0.005, rel=1e-6) and norm == pytest.approx(5.0, rel=1e-6)
    # The same divergence under a looser threshold is less far beyond it.
    assert _norm("cosine", a, b, min_cosine=0.99)[1] == pytest.approx(0.5, rel=1e-6)
    # tolerance: its severity is already the worst element over atol + rtol |ref|.
    raw, norm = _norm("tolerance", np.array([1.0, 2.0]), np.array([1.0, 2.1]), atol=0.01, rtol=0.0)
    assert norm == raw == pytest.approx(10.0, rel=1e-6)
    # sqnr: relative L2 error over the error at the floor, 10^(-30/20) = 0.0316.
    raw, norm = _norm("sqnr", np.array([1.0, 0.0]), np.array([1.1, 0.0]), min_sqnr_db=30.0)
    assert raw == pytest.approx(0.1, rel=1e-6)
    assert norm == pytest.approx(0.1 / 10 ** (-1.5), rel=1e-6)
    # exact: a zero threshold counts the differing elements.
    raw, norm = _norm("exact", np.array([1, 2, 3, 4]), np.array([1, 9, 9, 4]))
    assert raw == pytest.approx(0.5) and norm == 2.0
    assert threshold("exact", {"min_agreement": 0.9}) == pytest.approx(0.1)
    assert _norm("exact", np.array([1, 2, 3, 4]), np.array([1, 9, 9, 4]), min_agreement=0.9)[
        1
    ] == pytest.approx(5.0)


def test_identical_invalid_and_unknown() -> None:
    assert _norm("cosine", np.array([[1.0, 2.0]]), np.array([[1.0, 2.0]]))[1] == 0.0
    bad = OutputVerdict("y", "cosine", validity="non_finite", severity=1e9)  # type: ignore[arg-type]
    assert normalized_severity(bad, {}) == SEVERITY_CAP
    assert normalized_severity(OutputVerdict("y", "latency", severity=0.0), {}) == 0.0
    assert normalized_severity(OutputVerdict("y", "mystery", severity=0.3), {}) == 0.3
    # A generated-text verdict takes its params under its aspect's name.
    assert spec_key(OutputVerdict("choice0.text", "text")) == "text"
    assert spec_key(OutputVerdict("scores", "tolerance")) == "scores"
    text = OutputVerdict("choice0.text", "text", severity=0.3)
    assert normalized_severity(text, {"min_similarity": 0.9}) == pytest.approx(3.0)
