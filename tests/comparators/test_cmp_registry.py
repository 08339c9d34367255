"""The registry: the auto rule, config-table precedence and spec validation messages."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from comparators import (
    METRICS,
    ComparatorsError,
    MetricSpec,
    SpecError,
    choose_metric,
    resolve_spec,
    validate_spec,
)
from tests.conftest import import_or_skip

ALL = {"tolerance", "sqnr", "cosine", "logits", "probabilities", "argmax", "exact", "exact_text"}


def test_metrics_listing_is_read_only() -> None:
    assert set(METRICS) == ALL
    assert all(callable(fn) for fn in METRICS.values())
    with pytest.raises(TypeError):
        METRICS["x"] = METRICS["exact"]  # type: ignore[index]


@pytest.mark.parametrize(
    ("name", "ref", "expected"),
    [
        ("text_output", np.array([b"a"], dtype=object), "exact_text"),
        ("out", np.array(["a"]), "exact_text"),
        ("out", np.array([b"a"]), "exact_text"),
        ("labels", np.array([1, 2], dtype=np.int64), "exact"),
        ("probs", np.array([1, 2], dtype=np.int32), "exact"),  # dtype before name
        ("mask", np.array([True]), "exact"),
        ("logits", np.array([[1.0, 2.0]]), "logits"),
        ("LM_Logits", np.zeros((2, 3, 100), np.float16), "logits"),
        ("output_probs", np.array([[0.5, 0.2]]), "probabilities"),
        ("softmax_out", np.array([[0.5, 0.2]]), "probabilities"),
        ("out", np.array([[0.25, 0.75], [1.0, 0.0]]), "probabilities"),  # rows sum to 1
        ("out", np.array([[0.25, 0.7495]]), "probabilities"),  # within 1e-3
        ("out", np.array([[0.25, 0.74]]), "tolerance"),
        ("out", np.array([1.0]), "tolerance"),  # one value summing to 1 is not a distribution
        ("out", np.array([[-0.5, 1.5]]), "tolerance"),  # negative: not probabilities
        ("embedding", np.array([[0.5, 0.5]]), "cosine"),  # name before value heuristics
        ("sentence_embeddings", np.zeros((2, 8)), "cosine"),
        ("out", np.zeros((2, 384), np.float32), "cosine"),
        ("out", np.zeros((2, 63)), "tolerance"),
        ("boxes", np.zeros((5, 4), np.float32), "tolerance"),
        ("out", np.float32(3.0), "tolerance"),
    ],
)
def test_choose_metric(name: str, ref: Any, expected: str) -> None:
    assert choose_metric(name, np.asarray(ref)) == expected


def test_choose_metric_torch() -> None:
    torch = import_or_skip("torch")
    assert choose_metric("logits", torch.zeros(2, 5)) == "logits"
    assert choose_metric("ids", torch.zeros(2, 5, dtype=torch.int64)) == "exact"


TABLE: dict[str, dict[str, dict[str, Any]]] = {
    "*": {"*": {"metric": "auto"}, "logits": {"metric": "logits", "max_kl": 0.1}},
    "bert": {"*": {"metric": "sqnr"}, "pooled": {"metric": "cosine", "min_cosine": 0.99}},
}


@pytest.mark.parametrize(
    ("model", "output", "metric", "params"),
    [
        ("bert", "pooled", "cosine", {"min_cosine": 0.99}),  # model + output
        ("bert", "logits", "sqnr", {}),  # model + "*" beats "*" + output
        ("gpt", "logits", "logits", {"max_kl": 0.1}),  # "*" + output
        ("gpt", "hidden", "auto", {}),  # "*" + "*"
    ],
)
def test_resolve_spec_precedence(
    model: str, output: str, metric: str, params: dict[str, Any]
) -> None:
    got = resolve_spec(TABLE, model, output)
    assert got.metric == metric and dict(got.params) == params
    validate_spec(got)


def test_resolve_spec_without_a_match_is_auto() -> None:
    assert resolve_spec({"bert": {"pooled": {"metric": "cosine"}}}, "gpt", "x") == MetricSpec()
    assert resolve_spec({}, "m", "o") == MetricSpec()


def test_resolve_spec_metric_defaults_to_auto() -> None:
    got = resolve_spec({"*": {"*": {"atol": 1e-3}}}, "m", "o")
    assert got.metric == "auto" and dict(got.params) == {"atol": 1e-3}


def test_resolve_spec_rejects_a_malformed_entry() -> None:
    with pytest.raises(SpecError, match="must be a mapping"):
        resolve_spec({"*": {"*": "cosine"}}, "m", "o")  # type: ignore[dict-item]


def test_validate_spec_accepts_defaults() -> None:
    validate_spec(MetricSpec())
    for name in METRICS:
        validate_spec(MetricSpec(metric=name))
    validate_spec(MetricSpec("logits", {"k": np.int64(3), "max_kl": 1, "tie_margin": 0.0}))
    validate_spec(MetricSpec("exact_text", {"normalize": "casefold_strip", "min_exact": 0.9}))
    validate_spec(MetricSpec("auto", {"min_cosine": 0.99, "atol": 1e-3}))


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (
            MetricSpec("cosin"),
            "unknown metric 'cosin' (did you mean 'cosine'?); known: argmax, auto",
        ),
        (MetricSpec("zzz"), "unknown metric 'zzz'; known: "),
        (
            MetricSpec("cosine", {"atol": 1e-3}),
            "metric 'cosine' takes no param 'atol'; it takes: min_cosine "
            "('atol' belongs to: tolerance)",
        ),
        (
            MetricSpec("tolerance", {"atoll": 1}),
            "metric 'tolerance' takes no param 'atoll'; it takes: atol, max_fail_fraction, rtol",
        ),
        (MetricSpec("auto", {"bogus": 1}), "no metric takes a param 'bogus'"),
        (
            MetricSpec("tolerance", {"atol": -1}),
            "param 'atol' of metric 'tolerance' must be a non-negative number, got -1",
        ),
        (
            MetricSpec("tolerance", {"rtol": "1e-3"}),
            "param 'rtol' of metric 'tolerance' must be a non-negative number",
        ),
        (
            MetricSpec("cosine", {"min_cosine": 1.5}),
            "param 'min_cosine' of metric 'cosine' must be a number in [-1, 1]",
        ),
        (
            MetricSpec("logits", {"k": 0}),
            "param 'k' of metric 'logits' must be an integer >= 1, got 0",
        ),
        (MetricSpec("logits", {"k": True}), "must be an integer >= 1, got True"),
        (MetricSpec("logits", {"max_kl": float("nan")}), "param 'max_kl'"),
        (MetricSpec("sqnr", {"min_sqnr_db": None}), "must be a finite number, got None"),
        (
            MetricSpec("exact_text", {"normalize": "lower"}),
            "must be one of none, strip, casefold_strip, got 'lower'",
        ),
        (MetricSpec("auto", {"normalize": "lower"}), "param 'normalize' of metric 'auto'"),
    ],
)
def test_validate_spec_messages(spec: MetricSpec, message: str) -> None:
    with pytest.raises(ValueError) as info:
        validate_spec(spec)
    assert message in str(info.value)
    assert isinstance(info.value, SpecError) and isinstance(info.value, ComparatorsError)
