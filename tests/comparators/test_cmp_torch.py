"""Torch tensors are scored on their device with the numpy path's numbers.

These run on the CPU device (the only one the test machine has); the code path is the same
for CUDA. Without torch they skip locally; under CI (CI=true) they fail, since `.[dev]` installs
torch and a silent skip there would hide a broken install.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest

from comparators import MetricSpec, Validity, compare_output
from comparators import torch_backend as tb
from tests.conftest import import_or_skip

# Under CI a missing torch is a collection error, never a skip.
torch: Any = import_or_skip("torch")

DEVICE_METRICS = ("tolerance", "sqnr", "cosine", "logits", "probabilities", "argmax", "exact")


def _pair(metric: str, seed: int = 0) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((6, 50)) * 3
    cand = ref + 0.05 * rng.standard_normal(ref.shape)
    cand[2, :] = ref[2, :]  # one identical row
    cand[4, 7] += 4.0  # one clear top-1 flip for the class metrics
    if metric == "probabilities":
        ref, cand = (np.exp(x) / np.exp(x).sum(axis=1, keepdims=True) for x in (ref, cand))
    if metric == "exact":
        ref, cand = np.round(ref), np.round(cand)
    return ref, cand


def _same(a: float, b: float) -> bool:
    return a == b or abs(a - b) <= 1e-9 * max(abs(a), abs(b)) or abs(a - b) <= 1e-15


@pytest.mark.parametrize("metric", DEVICE_METRICS)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_torch_matches_numpy(metric: str, dtype: str, monkeypatch: pytest.MonkeyPatch) -> None:
    ref, cand = (x.astype(dtype) for x in _pair(metric))
    called: list[str] = []
    real = tb.score

    def spy(m: str, p: Any, q: Any) -> Any:
        called.append(m)
        return real(m, p, q)

    monkeypatch.setattr(tb, "score", spy)
    vt = compare_output("out", torch.from_numpy(ref), torch.from_numpy(cand), MetricSpec(metric))
    vn = compare_output("out", ref, cand, MetricSpec(metric))
    assert called == [metric]  # the device path ran, not a silent fallback
    assert vt.validity is Validity.OK and vt.metric == metric
    assert set(vt.scores) == set(vn.scores)
    for key in vn.scores:
        assert _same(vt.scores[key], vn.scores[key]), (key, vt.scores[key], vn.scores[key])
    assert _same(vt.severity, vn.severity)
    assert vt.flagged == vn.flagged and vt.headline == vn.headline
    assert vt.reason == vn.reason


def test_torch_bf16_is_widened_and_gets_bf16_tolerances() -> None:
    ref = torch.linspace(-3, 3, 64).reshape(4, 16)
    cand = ref.to(torch.bfloat16)
    v = compare_output("out", ref, cand, MetricSpec("tolerance"))
    assert v.validity is Validity.OK
    # bf16 rounding (8 significant bits) is within the bf16 defaults, far outside fp32's.
    assert not v.flagged and 0 < v.scores["max_abs"] <= 3 * 2.0**-8
    exact_err = float((ref - cand.float()).abs().max())
    assert v.scores["max_abs"] == pytest.approx(exact_err, rel=1e-12)


def test_torch_auto_metric_and_identical_rows() -> None:
    x = torch.softmax(torch.randn(3, 10, dtype=torch.float64), dim=1)
    v = compare_output("scores", x, x.clone())
    assert v.metric == "probabilities" and not v.flagged and v.severity == 0.0
    ids = torch.tensor([1, 2, 3])
    assert compare_output("ids", ids, ids.clone()).metric == "exact"


def test_torch_data_problems_take_the_numpy_path() -> None:
    ref = torch.tensor([1.0, 2.0, float("nan")])
    cand = torch.tensor([1.0, 2.0, 3.0])
    v = compare_output("out", cand, ref, MetricSpec("tolerance"))
    assert v.validity is Validity.NON_FINITE and v.flagged
    v = compare_output("out", ref[:2], cand, MetricSpec("tolerance"))
    assert v.validity is Validity.SHAPE_MISMATCH
    v = compare_output("out", torch.tensor([1, 2]), torch.tensor([1.0, 2.0]), MetricSpec("exact"))
    assert v.validity is Validity.DTYPE_MISMATCH


def test_torch_matched_nan_keeps_numpy_semantics() -> None:
    ref = torch.tensor([[1.0, float("-inf"), 3.0]])
    v = compare_output("out", ref, ref.clone(), MetricSpec("logits"))
    assert v.validity is Validity.OK and not v.flagged and v.scores["ref_inf"] == 1.0


def test_torch_float64_extremes_use_the_rescaled_path() -> None:
    ref = torch.tensor([1e300, -1e300, 3e299], dtype=torch.float64)
    cand = ref * (1 + 1e-3)
    for metric in ("sqnr", "cosine", "tolerance"):
        vt = compare_output("o", ref, cand, MetricSpec(metric))
        vn = compare_output("o", ref.numpy(), cand.numpy(), MetricSpec(metric))
        assert math.isfinite(vt.severity)
        for key in vn.scores:
            assert _same(vt.scores[key], vn.scores[key]), (metric, key)


def test_torch_is_not_imported_by_the_package() -> None:
    import subprocess
    import sys

    code = (
        "import sys, comparators, numpy as np; "
        "comparators.compare_output('o', np.ones(3), np.ones(3)); print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
