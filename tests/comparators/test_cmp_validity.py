"""The validity gate: every data problem is a verdict with a reason, never an exception."""

from __future__ import annotations

import json
import math
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import ml_dtypes  # a dependency: tritonclient decodes BF16 tensors to its bfloat16
import numpy as np
import numpy.typing as npt
import pytest

from comparators import (
    SEVERITY_CAP,
    MetricSpec,
    OutputVerdict,
    Validity,
    compare_output,
    compare_outputs,
)
from tests.conftest import import_or_skip

ROOT = Path(__file__).resolve().parents[2]

Arr = npt.NDArray[Any]


def spec(metric: str, **params: object) -> MetricSpec:
    return MetricSpec(metric=metric, params=params)


def readonly(values: Any) -> Arr:
    a = np.array(values)
    a.flags.writeable = False  # any in-place write by a comparator would raise
    return a


def assert_json(v: OutputVerdict) -> None:
    json.dumps(v.to_dict(), allow_nan=False)


def test_nan_in_candidate_only() -> None:
    v = compare_output("o", readonly([1.0, 2.0, 3.0]), readonly([1.0, np.nan, 3.0]))
    assert v.validity is Validity.NON_FINITE and v.flagged and not v.valid
    assert v.scores["cand_nan"] == 1.0 and v.scores["ref_nan"] == 0.0
    assert "candidate has 1 NaN/Inf" in v.reason and "flat index 1" in v.reason
    assert v.severity == SEVERITY_CAP
    assert_json(v)


def test_inf_in_candidate_only() -> None:
    v = compare_output("o", np.array([[1.0, 2.0]]), np.array([[np.inf, 2.0]]), spec("cosine"))
    assert v.validity is Validity.NON_FINITE and v.scores["cand_inf"] == 1.0 and v.flagged


def test_nan_in_reference_only() -> None:
    v = compare_output("o", np.array([np.nan, 1.0]), np.array([0.0, 1.0]))
    assert v.validity is Validity.NON_FINITE and v.flagged
    assert v.reason.startswith("reference has 1 NaN/Inf")


def test_same_nan_both_sides_scores_the_finite_elements() -> None:
    ref = readonly([np.nan, 1.0, 2.0])
    cand = readonly([np.nan, 1.0, 3.0])
    v = compare_output("o", ref, cand, spec("tolerance"))
    assert v.validity is Validity.OK
    assert v.scores["ref_nan"] == 1.0 and v.scores["cand_nan"] == 1.0
    assert v.scores["max_abs"] == 1.0
    assert v.scores["argmax_abs"] == 2.0  # an index into the original array, not the subset
    assert v.flagged and "flat index 2" in v.reason
    same = compare_output("o", ref, ref)
    assert same.validity is Validity.OK and not same.flagged and same.severity == 0.0


def test_same_inf_both_sides() -> None:
    v = compare_output("o", np.array([np.inf, -np.inf, 1.0]), np.array([np.inf, -np.inf, 1.0]))
    assert v.validity is Validity.OK and not v.flagged and v.scores["ref_inf"] == 2.0
    assert_json(v)


def test_opposite_infinities_are_non_finite() -> None:
    v = compare_output("o", np.array([np.inf, 1.0]), np.array([-np.inf, 1.0]))
    assert v.validity is Validity.NON_FINITE and "differ" in v.reason


def test_masked_logits_minus_inf_on_both_sides() -> None:
    # -inf logits (masked vocabulary) carry no probability on either side: the two-class case
    # [0, ln 3] vs [0, 0] remains, KL = .5 ln(4/3)
    ref = np.array([[-np.inf, 0.0, 0.0]])
    cand = np.array([[-np.inf, math.log(3), 0.0]])
    v = compare_output("logits", ref, cand)
    assert v.validity is Validity.OK and v.metric == "logits"
    assert v.scores["max_kl"] == pytest.approx(0.5 * math.log(4 / 3))
    nan_rows = compare_output("logits", np.full((2, 3), np.nan), np.full((2, 3), np.nan))
    assert nan_rows.validity is Validity.OK and nan_rows.severity == 0.0 and not nan_rows.flagged


def test_matched_nan_in_cosine_rows() -> None:
    ref = np.array([[np.nan, 3.0, 4.0]])
    cand = np.array([[np.nan, 4.0, 3.0]])
    v = compare_output("o", ref, cand, spec("cosine"))
    assert v.scores["min_cosine"] == pytest.approx(0.96)


def test_empty_both_sides_is_fine() -> None:
    v = compare_output("o", np.zeros((0, 4)), np.zeros((0, 4)))
    assert v.validity is Validity.EMPTY and not v.flagged and v.severity == 0.0
    t = compare_output("t", np.array([], dtype=object), np.array([], dtype=object))
    assert t.validity is Validity.EMPTY and not t.flagged
    assert_json(v)


def test_empty_one_side_is_a_shape_mismatch() -> None:
    v = compare_output("o", np.zeros(0), np.zeros(3))
    assert v.validity is Validity.SHAPE_MISMATCH and v.flagged


def test_shape_mismatch() -> None:
    v = compare_output("o", np.zeros((2, 3)), np.zeros((3, 2)))
    assert v.validity is Validity.SHAPE_MISMATCH and v.flagged
    assert v.reason == "shape (2, 3) in the reference, (3, 2) in the candidate"


@pytest.mark.parametrize(
    ("ref", "cand"),
    [
        (np.array([1, 2]), np.array([1.0, 2.0])),
        (np.array([1.0, 2.0]), np.array(["1", "2"], dtype=object)),
        (np.array([True, False]), np.array([1, 0])),
        (np.array(["a"]), np.array([1])),
    ],
)
def test_dtype_mismatch(ref: Arr, cand: Arr) -> None:
    v = compare_output("o", ref, cand)
    assert v.validity is Validity.DTYPE_MISMATCH and v.flagged
    assert str(ref.dtype) in v.reason and str(cand.dtype) in v.reason


def test_float_widths_are_widened_not_mismatched() -> None:
    ref = np.array([1.0, 2.0], dtype=np.float64)
    for dt in (np.float16, np.float32):
        v = compare_output("o", ref, ref.astype(dt))
        assert v.validity is Validity.OK and not v.flagged
    ints = compare_output("o", np.array([1, 2], np.int32), np.array([1, 2], np.uint8))
    assert ints.validity is Validity.OK and not ints.flagged


def test_bfloat16_via_ml_dtypes() -> None:
    ref = np.array([1.0, 3.0], dtype=np.float32)
    # bf16 keeps 8 significant bits: 3.015625 is the next value above 3 (rel 5.2e-3).
    cand = np.array([1.0, 3.015625], dtype=ml_dtypes.bfloat16)
    v = compare_output("o", ref, cand, spec("tolerance"))
    assert v.validity is Validity.OK and not v.flagged
    assert v.scores["max_abs"] == pytest.approx(0.015625)
    assert compare_output("o", ref, cand.astype(np.float32), spec("tolerance")).flagged


@pytest.mark.parametrize(
    ("ref", "cand"),
    [
        (np.array([b"hi", b"x"], dtype=object), np.array(["hi", "x"], dtype=object)),
        (np.array([b"hi", b"x"]), np.array(["hi", "x"])),  # numpy 'S' vs 'U' dtypes
        (np.array(["h\u00e9"], dtype=object), np.array(["h\u00e9".encode()], dtype=object)),
    ],
)
def test_bytes_vs_str_same_text(ref: Arr, cand: Arr) -> None:
    v = compare_output("text_output", ref, cand)
    assert v.validity is Validity.OK and v.metric == "exact_text"
    assert not v.flagged and v.scores["exact_match_fraction"] == 1.0


def test_invalid_utf8_bytes_do_not_raise() -> None:
    v = compare_output("t", np.array([b"\xff\xfe"], dtype=object), np.array(["x"], dtype=object))
    assert v.validity is Validity.OK and v.flagged


def test_missing_outputs() -> None:
    ref = {"a": np.ones(2), "b": np.array(["x"], dtype=object)}
    cand = {"a": np.ones(2), "c": np.array([1, 2])}
    verdicts = compare_outputs(ref, cand, lambda name: MetricSpec())
    by = {v.output: v for v in verdicts}
    assert [v.output for v in verdicts] == ["a", "b", "c"]
    assert by["a"].validity is Validity.OK and not by["a"].flagged
    assert by["b"].validity is Validity.MISSING_IN_CANDIDATE and by["b"].flagged
    assert by["b"].metric == "exact_text"
    assert by["c"].validity is Validity.MISSING_IN_REFERENCE and by["c"].flagged
    assert by["c"].metric == "exact"
    assert "'b'" in by["b"].reason and "'c'" in by["c"].reason


def test_compare_outputs_uses_spec_per_output() -> None:
    specs = {"a": spec("tolerance", atol=1.0), "b": spec("tolerance")}
    ref = {"a": np.array([1.0]), "b": np.array([1.0])}
    cand = {"a": np.array([1.5]), "b": np.array([1.5])}
    flagged = {v.output: v.flagged for v in compare_outputs(ref, cand, specs.__getitem__)}
    assert flagged == {"a": False, "b": True}


def test_unsupported_dtype_and_metric() -> None:
    c = compare_output("o", np.array([1 + 1j]), np.array([1 + 1j]))
    assert c.validity is Validity.UNSUPPORTED and c.flagged and "complex" in c.reason
    t = compare_output(
        "o", np.array(["a"], dtype=object), np.array(["a"], dtype=object), spec("cosine")
    )
    assert t.validity is Validity.UNSUPPORTED and "cosine" in t.reason
    n = compare_output("o", np.array([1.0]), np.array([1.0]), spec("exact_text"))
    assert n.validity is Validity.UNSUPPORTED


def test_bad_spec_and_bad_data_do_not_raise() -> None:
    bad = compare_output("o", np.ones(2), np.ones(2), spec("cosin"))
    assert bad.validity is Validity.UNSUPPORTED and "unknown metric 'cosin'" in bad.reason
    ragged = compare_output("o", [[1.0], [1.0, 2.0]], np.ones(2))
    assert ragged.validity is Validity.UNSUPPORTED and ragged.flagged


def test_auto_ignores_params_meant_for_other_metrics() -> None:
    table_spec = MetricSpec(params={"min_cosine": 0.5, "atol": 1.0})
    emb = compare_output("embedding", np.array([[3.0, 4.0]]), np.array([[4.0, 3.0]]), table_spec)
    assert emb.metric == "cosine" and not emb.flagged  # 0.96 >= 0.5
    tol = compare_output("score", np.array([1.0]), np.array([1.5]), table_spec)
    assert tol.metric == "tolerance" and not tol.flagged  # 0.5 <= atol 1.0


def test_torch_tensors() -> None:
    torch = import_or_skip("torch")
    ref = torch.tensor([[1.0, 2.0, 3.0]], requires_grad=True)
    v = compare_output("o", ref, ref.detach().clone(), spec("tolerance"))
    assert v.validity is Validity.OK and not v.flagged
    # bf16 candidate: 3.0 rounds exactly and 1.01 -> 1.0078125, within the bf16 defaults
    bf = torch.tensor([1.01, 3.0]).to(torch.bfloat16)
    vb = compare_output("o", torch.tensor([1.01, 3.0]), bf, spec("tolerance"))
    assert vb.validity is Validity.OK and not vb.flagged


def test_verdicts_are_json_and_pickle_safe() -> None:
    cases = [
        compare_output("o", np.ones(3), np.ones(3), spec("tolerance")),  # sqnr +inf -> cap
        compare_output("o", np.zeros(3), np.ones(3), spec("sqnr")),  # sqnr -inf -> cap
        compare_output("o", np.zeros((1, 2)), np.array([[1.0, 0.0]]), spec("cosine")),
        compare_output("o", np.array([[0.0, 1.0]]), np.array([[0.0, 1.0]]), spec("logits")),
        compare_output("o", np.zeros(0), np.zeros(0)),
        compare_output("o", np.zeros(2), np.zeros(3)),
    ]
    for v in cases:
        assert_json(v)
        assert pickle.loads(pickle.dumps(v)) == v


def test_import_is_pure() -> None:
    code = (
        "import comparators, sys; assert not any(m.split('.')[0] in "
        "{'aiohttp','redis','torch','proxy'} for m in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr


def test_large_k_and_batched_auto_logits() -> None:
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 3, 40))
    same = compare_output("logits", ref, ref.copy(), spec("logits", k=20))
    assert same.scores["min_topk_overlap"] == 1.0 and not same.flagged
    auto = compare_output("lm_logits", ref, ref + 1e-9)
    assert auto.metric == "logits" and not auto.flagged


def test_a_failing_comparator_becomes_a_verdict(monkeypatch: pytest.MonkeyPatch) -> None:
    import comparators.compare as compare_module
    from comparators.registry import REGISTRY, MetricInfo

    def broken(ref: Arr, cand: Arr, params: Any) -> Any:
        raise RuntimeError("boom")

    patched = dict(REGISTRY)
    patched["tolerance"] = MetricInfo(broken, REGISTRY["tolerance"].defaults, None)
    monkeypatch.setattr(compare_module, "REGISTRY", patched)
    v = compare_output("o", np.ones(2), np.ones(2), spec("tolerance"))
    assert v.validity is Validity.UNSUPPORTED and v.flagged
    assert v.reason == "comparator 'tolerance' failed: RuntimeError: boom"
