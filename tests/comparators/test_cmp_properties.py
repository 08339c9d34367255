"""Properties that hold for any input: identity, non-negativity, invariances, symmetry."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from comparators import METRICS, MetricSpec, Validity, compare_output
from comparators.distributions import jensen_shannon, top_indices

FLOAT_METRICS = sorted(set(METRICS) - {"exact", "exact_text"})
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=6)

Arr = npt.NDArray[Any]


def float_elements(dtype: type) -> st.SearchStrategy[float]:
    # NaN and +-Inf included: identical non-finite patterns must still be "identical".
    if dtype is np.float16:
        return st.floats(width=16)
    if dtype is np.float32:
        return st.floats(width=32)
    return st.floats()


def any_floats(dtype: type, shape: Any = SHAPES) -> st.SearchStrategy[Arr]:
    return hnp.arrays(dtype, shape, elements=float_elements(dtype))


@settings(max_examples=60, deadline=None)
@given(
    a=st.one_of(any_floats(np.float64), any_floats(np.float32), any_floats(np.float16)),
    metric=st.sampled_from(FLOAT_METRICS),
)
def test_identical_floats_are_never_flagged(a: Arr, metric: str) -> None:
    v = compare_output("out", a, a.copy(), MetricSpec(metric))
    assert v.validity is Validity.OK, v.reason
    assert v.severity == 0.0 and not v.flagged and v.reason == ""


@settings(max_examples=40, deadline=None)
@given(
    a=hnp.arrays(
        st.sampled_from([np.int8, np.int64, np.uint16, np.bool_]),
        SHAPES,
    )
)
def test_identical_integers_are_never_flagged(a: Arr) -> None:
    for metric in ("auto", "exact", "tolerance"):
        v = compare_output("ids", a, a.copy(), MetricSpec(metric))
        assert v.validity is Validity.OK and v.severity == 0.0 and not v.flagged


@settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(st.one_of(st.text(max_size=20), st.binary(max_size=20)), min_size=1, max_size=6),
    normalize=st.sampled_from(["none", "strip", "casefold_strip"]),
)
def test_identical_text_is_never_flagged(texts: list[str | bytes], normalize: str) -> None:
    a = np.empty(len(texts), dtype=object)
    a[:] = texts
    v = compare_output("text", a, a.copy(), MetricSpec("exact_text", {"normalize": normalize}))
    assert v.validity is Validity.OK and v.severity == 0.0 and not v.flagged


@settings(max_examples=40, deadline=None)
@given(
    texts=st.lists(st.text(max_size=20), min_size=1, max_size=6),
)
def test_bytes_and_str_of_the_same_text_match(texts: list[str]) -> None:
    a = np.empty(len(texts), dtype=object)
    b = np.empty(len(texts), dtype=object)
    a[:] = texts
    b[:] = [t.encode("utf-8", errors="surrogatepass") for t in texts]
    v = compare_output("text", a, b)
    if all(
        t.encode("utf-8", errors="surrogatepass").decode("utf-8", "replace") == t for t in texts
    ):
        assert not v.flagged


LOGIT_ROWS = hnp.arrays(
    np.float64,
    st.tuples(st.integers(1, 4), st.integers(1, 12)),
    elements=st.floats(-50, 50),
)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), ref=LOGIT_ROWS)
def test_kl_is_non_negative(data: st.DataObject, ref: Arr) -> None:
    cand = data.draw(hnp.arrays(np.float64, ref.shape, elements=st.floats(-50, 50)))
    v = compare_output("logits", ref, cand, MetricSpec("logits"))
    assert v.scores["max_kl"] >= 0.0 and v.scores["mean_kl"] >= 0.0
    assert v.scores["max_kl"] >= v.scores["mean_kl"] - 1e-12
    assert 0.0 <= v.scores["min_topk_overlap"] <= 1.0


# Multiples of 1/8 are exact in binary, so scaling changes no vector by more than rounding.
VEC_ELEMENTS = st.integers(-1000, 1000).map(lambda i: i / 8)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), scale=st.floats(1e-3, 1e3))
def test_cosine_invariant_to_positive_scaling(data: st.DataObject, scale: float) -> None:
    shape = data.draw(st.tuples(st.integers(1, 4), st.integers(1, 16)))
    ref = data.draw(hnp.arrays(np.float64, shape, elements=VEC_ELEMENTS))
    cand = data.draw(hnp.arrays(np.float64, shape, elements=VEC_ELEMENTS))
    base = compare_output("o", ref, cand, MetricSpec("cosine")).scores
    scaled = compare_output("o", ref, cand * scale, MetricSpec("cosine")).scores
    assert scaled["min_cosine"] == pytest.approx(base["min_cosine"], abs=1e-12)
    assert scaled["mean_cosine"] == pytest.approx(base["mean_cosine"], abs=1e-12)
    if np.all(np.any(ref != 0, axis=1)):
        assert scaled["max_norm_ratio"] == pytest.approx(base["max_norm_ratio"] * scale, rel=1e-9)


PROB_ROWS = hnp.arrays(
    np.float64, st.tuples(st.integers(1, 4), st.integers(1, 8)), elements=st.floats(0, 1)
)


@settings(max_examples=60, deadline=None)
@given(data=st.data(), p=PROB_ROWS)
def test_js_is_symmetric_and_bounded(data: st.DataObject, p: Arr) -> None:
    q = data.draw(hnp.arrays(np.float64, p.shape, elements=st.floats(0, 1)))
    forward, backward = jensen_shannon(p, q), jensen_shannon(q, p)
    assert np.array_equal(forward, backward)
    assert np.all(forward >= 0.0) and np.all(forward <= np.log(2) + 1e-12)
    vf = compare_output("probs", p, q, MetricSpec("probabilities"))
    vb = compare_output("probs", q, p, MetricSpec("probabilities"))
    assert vf.scores["max_js"] == vb.scores["max_js"]


@settings(max_examples=40, deadline=None)
@given(
    ref=hnp.arrays(np.float64, st.integers(1, 50), elements=st.floats(-100, 100)),
    t1=st.floats(0, 1),
    t2=st.floats(0, 1),
)
def test_severity_is_monotone_in_noise(ref: Arr, t1: float, t2: float) -> None:
    lo, hi = sorted((t1, t2))
    noise = np.linspace(-1.0, 1.0, ref.size)
    for metric in ("tolerance", "sqnr"):
        s_lo = compare_output("o", ref, ref + lo * noise, MetricSpec(metric)).severity
        s_hi = compare_output("o", ref, ref + hi * noise, MetricSpec(metric)).severity
        assert 0.0 <= s_lo <= s_hi * (1 + 1e-9) + 1e-300


@settings(max_examples=40, deadline=None)
@given(
    x=hnp.arrays(
        np.float64,
        st.tuples(st.integers(1, 4), st.integers(1, 40)),
        elements=st.integers(-10_000, 10_000).map(float),
        unique=True,
    ),
    k=st.integers(1, 40),
)
def test_top_indices_match_a_full_sort(x: Arr, k: int) -> None:
    # Both code paths (argmax passes for small k, argpartition above 16) on distinct values.
    expected = np.argsort(-x, axis=1, kind="stable")[:, : min(k, x.shape[1])]
    assert np.array_equal(top_indices(x, k), expected)


@settings(max_examples=80, deadline=None)
@given(
    data=st.data(),
    metric=st.sampled_from([*FLOAT_METRICS, "exact", "auto"]),
    dtype=st.sampled_from([np.float16, np.float32, np.float64]),
)
def test_any_floats_give_a_json_safe_verdict(data: st.DataObject, metric: str, dtype: type) -> None:
    ref = data.draw(any_floats(dtype))
    cand = data.draw(any_floats(dtype, ref.shape))
    v = compare_output("out", ref, cand, MetricSpec(metric))
    assert "failed" not in v.reason, v.reason
    assert math.isfinite(v.severity) and v.severity >= 0.0
    json.dumps(v.to_dict(), allow_nan=False)
    assert v.flagged or v.reason == ""
