"""The Python-float paths for small outputs give the numpy kernels' numbers to the bit.

Outputs of at most ``comparators.base.SMALL`` elements skip most numpy calls (each costs more
than the whole computation there). Every test here scores the same inputs twice, once as they
are and once with ``SMALL = 0`` (every output through the numpy kernels, as before the fast
paths existed), and requires identical verdicts: every score by its ``repr`` (so ``-0.0`` and
NaN count), the reason, the flag, the severity. Inputs favour what tells paths apart: ties,
zeros of both signs, NaN and infinities, subnormals, huge values, single rows and columns.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from types import MappingProxyType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from comparators import (
    METRICS,
    MetricSpec,
    OutputVerdict,
    base,
    compare_output,
    compare_outputs,
    discrete,
    distributions,
    numeric,
    registry,
    validity,
)

Arr = npt.NDArray[Any]
# Every module that reads SMALL (each holds its own binding of the name).
_SMALL_READERS = (base, discrete, distributions, numeric, registry, validity)
SHAPES = hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=9).filter(
    lambda s: int(np.prod(s)) <= base.SMALL
)
SPECIAL = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-310, -1e-310, 1e300, -1e300, np.inf, -np.inf, np.nan]


@contextlib.contextmanager
def _numpy_kernels_only() -> Iterator[None]:
    """Every output through the numpy kernels, as before the small paths existed."""
    # Through each module's namespace: most hold SMALL as a name imported from base.
    saved = [vars(m)["SMALL"] for m in _SMALL_READERS]
    for m in _SMALL_READERS:
        vars(m)["SMALL"] = 0
    try:
        yield
    finally:
        for m, value in zip(_SMALL_READERS, saved, strict=True):
            vars(m)["SMALL"] = value


def _both_ways(fn: Any) -> tuple[Any, Any]:
    """``fn()`` through the small paths, then through the numpy kernels only."""
    fast = fn()
    with _numpy_kernels_only():
        slow = fn()
    return fast, slow


def _key(v: OutputVerdict) -> dict[str, Any]:
    d = v.to_dict()
    d["scores"] = {k: repr(x) for k, x in d["scores"].items()}
    d["severity"] = repr(d["severity"])
    return d


def _scored_key(s: base.Scored) -> tuple[Any, ...]:
    scores = {k: repr(float(x)) for k, x in s.scores.items()}
    return scores, s.headline, repr(s.severity), s.flagged, s.reason


def _representable(dtype: Any) -> list[float]:
    with np.errstate(all="ignore"):
        return [x for x in SPECIAL if np.isnan(x) or float(dtype(x)) == x]


def _elements(dtype: Any, special: bool) -> st.SearchStrategy[float]:
    width: Literal[16, 32, 64] = 16 if dtype is np.float16 else 32 if dtype is np.float32 else 64
    plain = st.floats(-4.0, 4.0, width=width)
    if not special:
        return plain
    return st.one_of(plain, st.sampled_from(_representable(dtype)), st.floats(width=width))


@st.composite
def _pairs(draw: st.DrawFn, special: bool = True) -> tuple[Arr, Arr]:
    """A reference and a candidate of one shape: unrelated, a perturbed copy, or a copy with
    some positions changed (ties and equal positions are what the index paths must get right)."""
    dtype = draw(st.sampled_from([np.float64, np.float32, np.float16]))
    shape = draw(SHAPES)
    ref = draw(hnp.arrays(dtype, shape, elements=_elements(dtype, special)))
    how = draw(st.sampled_from(["other", "copy", "patched", "scaled"]))
    if how == "other":
        cand = draw(hnp.arrays(dtype, shape, elements=_elements(dtype, special)))
    else:
        cand = ref.copy()
        if how == "patched" and cand.size:
            at = draw(st.integers(0, cand.size - 1))
            cand.reshape(-1)[at] = draw(_elements(dtype, special))
        elif how == "scaled":
            with np.errstate(all="ignore"):
                cand = (cand * dtype(1.001)).astype(dtype)
    return ref, cand


@st.composite
def _probability_pairs(draw: st.DrawFn) -> tuple[Arr, Arr]:
    """Rows that look like distributions (what ``probabilities`` sees in practice), with ties,
    zeros and the odd negative or non-finite value."""
    rows = draw(st.integers(1, 6))
    width = draw(st.integers(1, 9))
    dtype = draw(st.sampled_from([np.float64, np.float32]))
    cells = st.one_of(
        st.sampled_from([0.0, -0.0, 0.25, 0.5, 1.0]),
        st.floats(0.0, 1.0),
        st.sampled_from([-0.1, np.nan, np.inf]),
    )
    ref = np.array(draw(st.lists(cells, min_size=rows * width, max_size=rows * width)))
    ref = ref.reshape(rows, width).astype(dtype)
    cand = ref.copy()
    for _ in range(draw(st.integers(0, 3))):
        cand.reshape(-1)[draw(st.integers(0, cand.size - 1))] = draw(cells)
    return ref, cand


METRIC_SPECS = [
    MetricSpec(),
    *(MetricSpec(m) for m in sorted(set(METRICS) - {"exact_text"})),
    MetricSpec("tolerance", MappingProxyType({"atol": 0.0, "rtol": 0.0})),
    MetricSpec(
        "tolerance", MappingProxyType({"atol": 0.5, "rtol": 0.25, "max_fail_fraction": 0.5})
    ),
    MetricSpec("logits", MappingProxyType({"k": 1, "tie_margin": 0.0})),
    MetricSpec("logits", MappingProxyType({"k": 3})),
    MetricSpec("probabilities", MappingProxyType({"tie_margin": 0.0, "max_delta_p": 0.5})),
    MetricSpec("argmax", MappingProxyType({"tie_margin": 0.0})),
]
NAMES = ["out", "logits", "probs", "embedding"]


@settings(max_examples=300, deadline=None)
@given(pair=_pairs(), spec=st.sampled_from(METRIC_SPECS), name=st.sampled_from(NAMES))
def test_compare_output_is_the_same_either_way(
    pair: tuple[Arr, Arr], spec: MetricSpec, name: str
) -> None:
    ref, cand = pair
    fast, slow = _both_ways(lambda: compare_output(name, ref, cand, spec))
    assert _key(fast) == _key(slow)


@settings(max_examples=200, deadline=None)
@given(pair=_probability_pairs(), spec=st.sampled_from(METRIC_SPECS))
def test_distribution_rows_are_the_same_either_way(pair: tuple[Arr, Arr], spec: MetricSpec) -> None:
    ref, cand = pair
    fast, slow = _both_ways(lambda: compare_output("probs", ref, cand, spec))
    assert _key(fast) == _key(slow)


@settings(max_examples=150, deadline=None)
@given(pair=_pairs(special=True), metric=st.sampled_from(sorted(set(METRICS) - {"exact_text"})))
def test_metric_functions_called_directly_are_the_same_either_way(
    pair: tuple[Arr, Arr], metric: str
) -> None:
    # Without the gate: NaN and Inf reach the kernels, which must still agree.
    ref, cand = pair

    def run() -> Any:
        with np.errstate(all="ignore"):
            try:
                return _scored_key(METRICS[metric](ref, cand, {}))
            except Exception as exc:  # the same failure either way
                return type(exc).__name__, str(exc)

    fast, slow = _both_ways(run)
    assert fast == slow


@settings(max_examples=100, deadline=None)
@given(
    a=hnp.arrays(
        st.sampled_from([np.int8, np.int64, np.uint64, np.bool_, np.float32]),
        SHAPES,
    ),
    flips=st.lists(st.integers(0, 63), max_size=4),
)
def test_exact_is_the_same_either_way(a: Arr, flips: list[int]) -> None:
    b = a.copy()
    for i in flips:
        if i < b.size:
            b.reshape(-1)[i] = b.reshape(-1)[(i + 1) % b.size]
    fast, slow = _both_ways(lambda: compare_output("label", a, b, MetricSpec("exact")))
    assert _key(fast) == _key(slow)


def test_exact_across_integer_dtypes_keeps_numpys_comparison() -> None:
    # numpy compares int64 with uint64 as float64; the small path only takes one dtype.
    a = np.array([2**63 - 1], dtype=np.int64)
    b = np.array([2**63], dtype=np.uint64)
    fast, slow = _both_ways(lambda: compare_output("label", a, b, MetricSpec("exact")))
    assert _key(fast) == _key(slow)


CRAFTED = {
    "disjoint": ([[1.0, 0.0]], [[0.0, 1.0]]),
    "disjoint wide": ([[0.5, 0.5, 0.0, 0.0]], [[0.0, 0.0, 0.5, 0.5]]),
    "identical": ([[0.25, 0.25, 0.5]], [[0.25, 0.25, 0.5]]),
    "ties": ([[0.5, 0.5], [0.3, 0.3]], [[0.5, 0.5], [0.3, 0.3]]),
    "tie broken": ([[0.5, 0.5, 0.0]], [[0.4, 0.6, 0.0]]),
    "zero row": ([[0.0, 0.0], [0.2, 0.8]], [[0.0, 0.0], [0.8, 0.2]]),
    "negative zero": ([[-0.0, 1.0]], [[0.0, 1.0]]),
    "one column": ([[0.7], [0.2]], [[0.1], [0.2]]),
    "nan": ([[np.nan, 1.0]], [[0.5, 0.5]]),
    "inf": ([[np.inf, 1.0]], [[1.0, np.inf]]),
    "negative": ([[-0.1, 1.1]], [[0.5, 0.5]]),
    "subnormal": ([[1e-310, 1.0]], [[0.0, 1.0]]),
    "huge": ([[1e300, -1e300, 3.0]], [[1e300, 1e300, 3.0]]),
    "only -inf": ([[-np.inf, -np.inf, 2.0]], [[-np.inf, 2.0, -np.inf]]),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
@pytest.mark.parametrize("metric", sorted(set(METRICS) - {"exact_text"}))
def test_crafted_rows_are_the_same_either_way(case: str, metric: str) -> None:
    ref, cand = (np.array(x) for x in CRAFTED[case])
    fast, slow = _both_ways(lambda: compare_output("out", ref, cand, MetricSpec(metric)))
    assert _key(fast) == _key(slow)

    def direct() -> Any:
        with np.errstate(all="ignore"):
            return _scored_key(METRICS[metric](ref, cand, {}))

    fast, slow = _both_ways(direct)
    assert fast == slow


@pytest.mark.parametrize("k", [2, 5])
def test_top_indices_repeat_an_index_where_numpy_does(k: int) -> None:
    # A row short of finite values: after the finite pick every pass sees only -inf, and
    # numpy's loop picks index 0 again; so must the Python loop.
    x = np.array([[-np.inf, -np.inf, 3.0], [np.nan, 1.0, np.nan]])
    fast, slow = _both_ways(lambda: distributions.top_indices(x, k))
    assert fast.tolist() == slow.tolist()


def test_analysis_leaves_numpys_error_state_as_it_was() -> None:
    before = np.geterr()
    ref = {"probs": np.array([[0.0, 1.0]]), "x": np.array([np.inf, 1.0])}
    cand = {"probs": np.array([[1.0, 0.0]]), "x": np.array([np.inf, 0.0])}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing warns on the way either
        compare_outputs(ref, cand, lambda _name: MetricSpec())
    assert np.geterr() == before


def test_quiet_nests_and_restores() -> None:
    with np.errstate(divide="raise"):
        with base.Quiet():
            with base.Quiet():
                assert np.geterr()["divide"] == "ignore"
            assert np.geterr()["divide"] == "ignore"
            np.array([1.0]) / 0.0  # no error raised
        assert np.geterr()["divide"] == "raise"


def test_numpy_kernels_only_restores_the_threshold() -> None:
    with _numpy_kernels_only():
        assert all(vars(m)["SMALL"] == 0 for m in _SMALL_READERS)
        v = compare_output("scores", np.array([1.0, 2.0]), np.array([1.0, 2.5]))
        assert v.flagged and v.metric == "tolerance"
    assert all(vars(m)["SMALL"] == base.SMALL > 0 for m in _SMALL_READERS)
