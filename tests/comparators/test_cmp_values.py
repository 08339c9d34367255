"""Hand-computed values for every metric; the arithmetic is in the comments."""

from __future__ import annotations

import math
import sys

import numpy as np
import pytest

from comparators import METRICS, MetricSpec, Validity, compare_output

LN = math.log


def spec(metric: str, **params: object) -> MetricSpec:
    return MetricSpec(metric=metric, params=params)


def test_tolerance_polygraphy_and_rule() -> None:
    # ref [1, 2, 0, 4], cand [1, 2.5, 1e-6, 4] -> |d| = [0, 0.5, 1e-6, 0]
    # element 1: 0.5 > atol and 0.5/2 = 0.25 > rtol -> fails
    # element 2: 1e-6 <= atol=1e-5 -> passes although |d|/eps is huge (the AND rule)
    ref = np.array([1.0, 2.0, 0.0, 4.0])
    cand = np.array([1.0, 2.5, 1e-6, 4.0])
    v = compare_output("out", ref, cand, spec("tolerance"))
    s = v.scores
    assert v.validity is Validity.OK and v.flagged and v.headline == "max_abs"
    assert s["fail_fraction"] == 0.25
    assert s["max_abs"] == 0.5 and s["argmax_abs"] == 1.0
    assert s["mean_abs"] == pytest.approx((0.5 + 1e-6) / 4)
    assert s["median_abs"] == pytest.approx(5e-7)  # sorted [0, 0, 1e-6, .5] -> (0 + 1e-6)/2
    assert s["p99_abs"] == pytest.approx(1e-6 + 0.97 * (0.5 - 1e-6))  # linear at 2.97
    assert s["max_rel"] == pytest.approx(1e-6 / np.finfo(np.float64).eps)  # zero ref -> eps
    # sum ref^2 = 21, sum d^2 = 0.25 + 1e-12 -> 10*log10(84) = 19.2428 dB
    assert s["sqnr_db"] == pytest.approx(10 * math.log10(21 / (0.25 + 1e-12)))
    # worst |d| / max(atol, rtol*|ref|) = 0.5 / 2e-5 = 25000
    assert v.severity == pytest.approx(25000.0)
    assert "1 of 4 elements" in v.reason and "flat index 1" in v.reason


def test_tolerance_params_and_fail_fraction() -> None:
    ref = np.array([1.0, 2.0, 0.0, 4.0])
    cand = np.array([1.0, 2.5, 1e-6, 4.0])
    assert not compare_output("o", ref, cand, spec("tolerance", atol=0.5)).flagged
    assert not compare_output("o", ref, cand, spec("tolerance", rtol=0.25)).flagged
    assert not compare_output("o", ref, cand, spec("tolerance", max_fail_fraction=0.25)).flagged
    assert compare_output("o", ref, cand, spec("tolerance", max_fail_fraction=0.2)).flagged


def test_tolerance_narrow_float_defaults() -> None:
    # fp16 spacing at 1 is 2^-10 = 0.000977: within the fp16 default atol=rtol=1e-3,
    # far outside the fp32 default 1e-5.
    ref = np.array([1.0], dtype=np.float32)
    c16 = np.array([1.0009766], dtype=np.float16)
    v16 = compare_output("o", ref, c16, spec("tolerance"))
    v32 = compare_output("o", ref, c16.astype(np.float32), spec("tolerance"))
    assert v16.scores["max_abs"] == 2.0**-10
    assert not v16.flagged and v32.flagged


def test_sqnr() -> None:
    # signal 3^2 + 4^2 = 25, noise 0.5^2 = 0.25 -> 10*log10(100) = 20 dB < 30 -> flagged
    # relative L2 error 0.5 / 5 = 0.1
    v = compare_output("o", np.array([3.0, 4.0]), np.array([3.0, 4.5]), spec("sqnr"))
    assert v.scores["sqnr_db"] == pytest.approx(20.0)
    assert v.scores["max_abs"] == 0.5
    assert v.severity == pytest.approx(0.1)
    assert v.flagged and "20.00 dB" in v.reason
    assert not compare_output(
        "o", np.array([3.0, 4.0]), np.array([3.0, 4.5]), spec("sqnr", min_sqnr_db=15)
    ).flagged


def test_sqnr_zero_reference_is_capped() -> None:
    v = compare_output("o", np.zeros(3), np.ones(3), spec("sqnr"))
    assert v.scores["sqnr_db"] == -300.0 and v.flagged and math.isfinite(v.severity)


def test_cosine_rows() -> None:
    # row 0: [1,0].[0,1] = 0 -> cos 0, norm ratio 1/1
    # row 1: [1,1] vs [2,2]: cos 1, norm ratio sqrt(8)/sqrt(2) = 2
    ref = np.array([[1.0, 0.0], [1.0, 1.0]])
    cand = np.array([[0.0, 1.0], [2.0, 2.0]])
    v = compare_output("o", ref, cand, spec("cosine"))
    s = v.scores
    assert s["min_cosine"] == pytest.approx(0.0)
    assert s["mean_cosine"] == pytest.approx(0.5)
    assert s["min_norm_ratio"] == pytest.approx(1.0)
    assert s["max_norm_ratio"] == pytest.approx(2.0)
    assert s["argmin_cosine"] == 0.0
    assert v.severity == pytest.approx(1.0) and v.flagged and "row 0" in v.reason


def test_cosine_three_four_five() -> None:
    # [3,4].[4,3] = 24, norms 5*5 -> 0.96
    v = compare_output("o", np.array([3.0, 4.0]), np.array([4.0, 3.0]), spec("cosine"))
    assert v.scores["min_cosine"] == pytest.approx(0.96)
    assert v.severity == pytest.approx(0.04)
    assert not compare_output(
        "o", np.array([3.0, 4.0]), np.array([4.0, 3.0]), spec("cosine", min_cosine=0.95)
    ).flagged


def test_cosine_zero_vectors() -> None:
    both = compare_output("o", np.zeros((1, 4)), np.zeros((1, 4)), spec("cosine"))
    assert both.scores["min_cosine"] == 1.0 and not both.flagged and both.severity == 0.0
    one = compare_output("o", np.zeros((1, 4)), np.ones((1, 4)), spec("cosine"))
    assert one.scores["min_cosine"] == 0.0 and one.flagged
    assert "reference vector is all zeros" in one.reason
    assert math.isfinite(one.scores["max_norm_ratio"])


def test_logits_kl_without_flip() -> None:
    # ref logits [0, 0] -> p = [.5, .5]; cand [ln 3, 0] -> q = [.75, .25]
    # KL = .5 ln(.5/.75) + .5 ln(.5/.25) = .5 ln(4/3) = 0.143841 > 0.01 -> flagged
    # reference top class 0 (first of a tie): delta p = .75 - .5 = +.25
    v = compare_output("o", np.array([[0.0, 0.0]]), np.array([[LN(3), 0.0]]), spec("logits"))
    s = v.scores
    assert s["max_kl"] == pytest.approx(0.5 * LN(4 / 3))
    assert s["mean_kl"] == pytest.approx(0.5 * LN(4 / 3))
    assert s["top1_agreement"] == 1.0 and s["non_tie_flips"] == 0.0
    assert s["min_delta_p_top1"] == pytest.approx(0.25)
    assert v.flagged and v.headline == "max_kl" and v.severity == pytest.approx(s["max_kl"])
    assert "KL" in v.reason and "top-1" not in v.reason


def test_logits_flip_beyond_margin() -> None:
    # ref [ln 3, 0] -> [.75, .25] (margin .5); cand [0, ln 3] -> [.25, .75]
    # KL = .75 ln 3 + .25 ln(1/3) = .5 ln 3; delta p of class 0 = .25 - .75 = -.5
    v = compare_output(
        "o", np.array([[LN(3), 0.0]]), np.array([[0.0, LN(3)]]), spec("logits", max_kl=10.0)
    )
    assert v.scores["max_kl"] == pytest.approx(0.5 * LN(3))
    assert v.scores["top1_agreement"] == 0.0 and v.scores["non_tie_flips"] == 1.0
    assert v.scores["min_delta_p_top1"] == pytest.approx(-0.5)
    assert v.flagged and "class 0 -> 1" in v.reason


def test_logits_near_tie_flip_is_not_flagged() -> None:
    # ref [0.01, 0] -> p1 = sigmoid(0.01) = 0.5025, margin 0.005 < 0.05: a tie.
    # KL = (2 p1 - 1) * 0.01 = 5.0e-5 < 0.01
    v = compare_output("o", np.array([[0.01, 0.0]]), np.array([[0.0, 0.01]]), spec("logits"))
    assert v.scores["top1_agreement"] == 0.0 and v.scores["non_tie_flips"] == 0.0
    assert v.scores["max_kl"] == pytest.approx(4.99996e-5, rel=1e-4)
    assert not v.flagged and v.reason == ""


def test_logits_topk_and_batch_worst_row() -> None:
    # k=2 over 3 classes: ref top-2 {0,1}, cand top-2 {1,2} -> overlap 1/2 on row 1; row 0 same.
    ref = np.array([[[3.0, 2.0, 1.0], [3.0, 2.0, 1.0]]])  # (B=1, T=2, V=3)
    cand = np.array([[[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]])
    v = compare_output("o", ref, cand, spec("logits", k=2))
    assert v.scores["min_topk_overlap"] == 0.5
    assert v.scores["argmax_kl"] == 1.0
    assert v.scores["top1_agreement"] == 0.5
    # k larger than the vocabulary is capped at it: every index overlaps.
    assert compare_output("o", ref, cand, spec("logits", k=50)).scores["min_topk_overlap"] == 1.0


def test_probabilities() -> None:
    # p = [.6,.3,.1], q = [.5,.4,.1]: same top class; |delta p| = .1 > .05 -> flagged
    # m = [.55,.35,.1]; KL(p||m) = .6 ln(.6/.55) + .3 ln(.3/.35) = 0.0059616
    #                   KL(q||m) = .5 ln(.5/.55) + .4 ln(.4/.35) = 0.0057575
    # JS = (0.0059616 + 0.0057575)/2 = 0.0058595
    v = compare_output(
        "o", np.array([0.6, 0.3, 0.1]), np.array([0.5, 0.4, 0.1]), spec("probabilities")
    )
    s = v.scores
    assert s["top1_agreement"] == 1.0
    assert s["max_abs_delta_p"] == pytest.approx(0.1)
    assert s["max_js"] == pytest.approx(0.0058595, abs=1e-7)
    assert v.flagged and "delta p" in v.reason and "top-1" not in v.reason
    assert v.severity == pytest.approx(0.1)


def test_probabilities_flip_and_tie() -> None:
    flip = compare_output(
        "o", np.array([[0.7, 0.3]]), np.array([[0.3, 0.7]]), spec("probabilities", max_delta_p=1.0)
    )
    assert flip.flagged and "class 0 -> 1" in flip.reason
    # margin .52 - .48 = .04 <= .05 and |delta p| = .04: a tie, not flagged
    tie = compare_output(
        "o", np.array([[0.52, 0.48]]), np.array([[0.48, 0.52]]), spec("probabilities")
    )
    assert tie.scores["top1_agreement"] == 0.0 and not tie.flagged


def test_probabilities_single_column_sigmoid() -> None:
    # one class: JS of the normalised rows is 0, so severity comes from |delta p| = .3
    v = compare_output("o", np.array([[0.9]]), np.array([[0.6]]), spec("probabilities"))
    assert v.scores["max_js"] == 0.0 and v.severity == pytest.approx(0.3) and v.flagged


def test_argmax() -> None:
    # row 0 flips with margin 1 - .5 = .5 -> flagged; row 1 flips with margin .01 -> tie
    ref = np.array([[1.0, 0.5], [1.0, 0.99]])
    cand = np.array([[0.5, 1.0], [0.99, 1.0]])
    v = compare_output("o", ref, cand, spec("argmax"))
    assert v.scores["top1_agreement"] == 0.0 and v.scores["non_tie_flips"] == 1.0
    assert v.severity == 1.0 and v.flagged and "row 0" in v.reason
    only_tie = compare_output("o", ref[1:], cand[1:], spec("argmax"))
    assert not only_tie.flagged and only_tie.severity == 1.0


def test_exact() -> None:
    # one of four labels differs, at flat index 2
    v = compare_output("labels", np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]))
    assert v.metric == "exact"
    assert v.scores == {"agreement": 0.75, "mismatches": 1.0, "first_mismatch": 2.0}
    assert v.severity == 0.25 and v.flagged and "flat index 2" in v.reason
    assert not compare_output(
        "labels", np.array([1, 2, 3, 4]), np.array([1, 2, 0, 4]), spec("exact", min_agreement=0.75)
    ).flagged
    same = compare_output("mask", np.array([True, False]), np.array([True, False]))
    assert same.scores["first_mismatch"] == -1.0 and not same.flagged


def test_exact_text_levenshtein() -> None:
    # kitten -> sitting: 3 edits over max length 7 -> similarity 4/7; they differ at char 0
    v = compare_output(
        "text", np.array(["kitten"], dtype=object), np.array(["sitting"], dtype=object)
    )
    assert v.metric == "exact_text"
    assert v.scores["min_similarity"] == pytest.approx(4 / 7)
    assert v.scores["exact_match_fraction"] == 0.0
    assert v.scores["first_divergence"] == 0.0 and v.scores["first_mismatch"] == 0.0
    assert v.severity == pytest.approx(3 / 7) and v.flagged


def test_exact_text_normalisation() -> None:
    ref = np.array([" Hi", "b"], dtype=object)
    cand = np.array(["hi", "b"], dtype=object)
    strip = compare_output("t", ref, cand, spec("exact_text"))
    assert strip.scores["exact_match_fraction"] == 0.5 and strip.flagged
    assert strip.scores["first_divergence"] == 0.0
    assert not compare_output(
        "t", ref, cand, spec("exact_text", normalize="casefold_strip")
    ).flagged
    none = compare_output(
        "t", np.array(["a "]), np.array(["a"]), spec("exact_text", normalize="none")
    )
    assert none.flagged and none.scores["first_divergence"] == 1.0
    half = compare_output("t", ref, cand, spec("exact_text", min_exact=0.5))
    assert not half.flagged


def test_comparators_callable_directly_with_defaults() -> None:
    a = np.array([[0.2, 0.8]])
    for name, fn in METRICS.items():
        if name == "exact_text":
            result = fn(np.array(["x"], dtype=object), np.array(["x"], dtype=object), {})
        else:
            result = fn(a, a, {})
        assert result.severity == 0.0 and not result.flagged, name


def test_exact_text_without_rapidfuzz(monkeypatch: pytest.MonkeyPatch) -> None:
    # difflib's ratio for kitten/sitting: 2*M/T with M = 4 matched chars ("itt", "n"), T = 13
    monkeypatch.setitem(sys.modules, "rapidfuzz", None)
    monkeypatch.setitem(sys.modules, "rapidfuzz.distance", None)
    v = compare_output("t", np.array(["kitten"], dtype=object), np.array(["sitting"], dtype=object))
    assert v.scores["min_similarity"] == pytest.approx(8 / 13)
    assert v.flagged
