"""The metric registry: names, params and defaults, the ``metric: auto`` rule, and the
config-table lookup (``model -> output -> {metric, **params}``, ``"*"`` the default)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from numbers import Real
from types import MappingProxyType
from typing import Any

import numpy as np

from comparators import (
    discrete,
    distributions,
    llm_meta,
    llm_text,
    llm_tokens,
    numeric,
    torch_backend,
)
from comparators.base import SMALL, Array, Comparator, Scored, SpecError, as_rows_last_axis
from comparators.types import MetricSpec
from comparators.validity import group_of, to_numpy

AUTO = "auto"
WILDCARD = "*"
# Rows count as a probability distribution when their sums are within this of 1.
_PROB_SUM_TOL = 1e-3
# A float output at least this wide on its last axis is treated as an embedding.
_EMBEDDING_MIN_DIM = 64

Check = Callable[[Any], str | None]


def _real(lo: float | None = None, hi: float | None = None) -> Check:
    if lo is not None and hi is not None:
        what = f"a number in [{lo:g}, {hi:g}]"
    elif lo is not None:
        what = "a non-negative number" if lo == 0 else f"a number >= {lo:g}"
    else:
        what = "a finite number"

    def check(v: Any) -> str | None:
        ok = isinstance(v, Real) and not isinstance(v, bool) and math.isfinite(float(v))
        ok = ok and (lo is None or float(v) >= lo) and (hi is None or float(v) <= hi)
        return None if ok else what

    return check


def _positive_int(v: Any) -> str | None:
    ok = isinstance(v, int | np.integer) and not isinstance(v, bool) and int(v) >= 1
    return None if ok else "an integer >= 1"


def _bool(v: Any) -> str | None:
    return None if isinstance(v, bool | np.bool_) else "true or false"


def _normalize(v: Any) -> str | None:
    return None if v in discrete.NORMALIZERS else "one of " + ", ".join(discrete.NORMALIZERS)


# One check per param name, shared by every metric that takes it, so `metric: auto` can
# validate a param without knowing which metric the data will pick.
PARAM_CHECKS: Mapping[str, Check] = MappingProxyType(
    {
        "atol": _real(0.0),
        "rtol": _real(0.0),
        "max_fail_fraction": _real(0.0, 1.0),
        "min_sqnr_db": _real(),
        "min_cosine": _real(-1.0, 1.0),
        "max_kl": _real(0.0),
        "k": _positive_int,
        "tie_margin": _real(0.0),
        "max_delta_p": _real(0.0, 1.0),
        "min_agreement": _real(0.0, 1.0),
        "normalize": _normalize,
        "min_exact": _real(0.0, 1.0),
        "min_similarity": _real(0.0, 1.0),
        "compare_normalized": _bool,
        "min_prefix_agreement": _real(0.0, 1.0),
        "max_kl_mean": _real(0.0),
        "enabled": _bool,
    }
)


@dataclass(frozen=True, slots=True)
class MetricInfo:
    """A registered metric. ``fill`` says what to do with positions that are non-finite on both
    sides: ``None`` scores only the other elements (flattened); a number replaces them on both
    sides with a value that keeps rows intact and contributes nothing (-inf logit, 0 weight)."""

    fn: Comparator
    defaults: Mapping[str, Any]
    fill: float | None


_ARRAY_METRICS: dict[str, MetricInfo] = {
    "tolerance": MetricInfo(numeric.tolerance, numeric.TOLERANCE_DEFAULTS, None),
    "sqnr": MetricInfo(numeric.sqnr, numeric.SQNR_DEFAULTS, None),
    "cosine": MetricInfo(numeric.cosine, numeric.COSINE_DEFAULTS, 0.0),
    "logits": MetricInfo(distributions.logits, distributions.LOGITS_DEFAULTS, -math.inf),
    "probabilities": MetricInfo(
        distributions.probabilities, distributions.PROBABILITIES_DEFAULTS, 0.0
    ),
    "argmax": MetricInfo(distributions.argmax, distributions.ARGMAX_DEFAULTS, -math.inf),
    "exact": MetricInfo(discrete.exact, discrete.EXACT_DEFAULTS, None),
    "exact_text": MetricInfo(discrete.exact_text, discrete.EXACT_TEXT_DEFAULTS, None),
}
# The generated-answer metrics (comparators.compare_text_answers, compare_semantic), one per
# aspect of an answer, with their defaults; a config table names them like the array metrics.
LLM_METRICS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {
        "text": llm_text.TEXT_DEFAULTS,
        "tokens": llm_tokens.TOKENS_DEFAULTS,
        "logprobs": llm_tokens.LOGPROBS_DEFAULTS,
        "finish_reason": llm_meta.FINISH_REASON_DEFAULTS,
        "usage": llm_meta.USAGE_DEFAULTS,
        "json": llm_text.JSON_DEFAULTS,
        "latency": llm_meta.LATENCY_DEFAULTS,
        "semantic": llm_meta.SEMANTIC_DEFAULTS,
    }
)


def _answers_only(name: str) -> Comparator:
    def refuse(ref: Array, cand: Array, params: Mapping[str, Any]) -> Scored:
        raise SpecError(
            f"metric '{name}' scores generated-text answers (comparators.compare_text_answers, "
            "compare_semantic), not arrays"
        )

    return refuse


# Every metric a spec may name. The generated-answer ones are listed with a comparator that
# refuses arrays: a table may name them for any output, and compare_output must then answer
# with a verdict saying why, not fail on an unknown name.
REGISTRY: Mapping[str, MetricInfo] = MappingProxyType(
    {
        **_ARRAY_METRICS,
        **{k: MetricInfo(_answers_only(k), v, None) for k, v in LLM_METRICS.items()},
    }
)
# The array comparators.
METRICS: Mapping[str, Comparator] = MappingProxyType({k: v.fn for k, v in _ARRAY_METRICS.items()})


def _looks_like_probabilities(a: Array) -> bool:
    if a.ndim == 0 or a.size == 0 or a.shape[-1] < 2:
        return False
    if a.size <= SMALL:
        # Checked on the values as they are (widening to float64 is exact): usually a negative
        # score ends it before the float64 copy below is made.
        if not all(math.isfinite(v) and v >= 0.0 for v in a.ravel().tolist()):
            return False
        rows = as_rows_last_axis(a)
    else:
        rows = as_rows_last_axis(a)
        # min and max propagate NaN: both finite and min >= 0 is "all finite, none negative".
        lo, hi = float(rows.min()), float(rows.max())
        if not (math.isfinite(lo) and math.isfinite(hi) and lo >= 0.0):
            return False
    # The row sums are numpy's, as before; the comparison of each is exact in Python floats.
    return all(abs(s - 1.0) <= _PROB_SUM_TOL for s in rows.sum(axis=1).tolist())


def choose_metric(name: str, ref: Any) -> str:
    """The ``metric: auto`` rule, from the reference's dtype and shape and the output name.
    Name hints are checked before value heuristics, so an output called ``*embed*`` stays cosine
    even if its values happen to look like a distribution."""
    on_device = torch_backend.is_tensor(ref)
    # A tensor is judged where it lives: its dtype and shape, and values only if needed.
    a = ref if on_device else to_numpy(ref)
    group = torch_backend.group_of(a) if on_device else group_of(a.dtype)
    if group == "text":
        return "exact_text"
    if group in ("int", "bool"):
        return "exact"
    if group != "float":
        return "tolerance"
    lowered = name.casefold()
    if "logit" in lowered:
        return "logits"
    if "prob" in lowered or "softmax" in lowered:
        return "probabilities"
    if "embed" in lowered:
        return "cosine"
    probs = torch_backend.looks_like_probabilities if on_device else _looks_like_probabilities
    if probs(a):
        return "probabilities"
    if a.ndim >= 1 and a.shape[-1] >= _EMBEDDING_MIN_DIM:
        return "cosine"
    return "tolerance"


def _spec_from_entry(entry: Any, where: str) -> MetricSpec:
    if not isinstance(entry, Mapping):
        raise SpecError(f"comparison entry {where} must be a mapping, got {type(entry).__name__}")
    metric = entry.get("metric", AUTO)
    if not isinstance(metric, str):
        raise SpecError(f"comparison entry {where}: metric must be a string, got {metric!r}")
    params = {str(k): v for k, v in entry.items() if k != "metric"}
    return MetricSpec(metric=metric, params=MappingProxyType(params))


def resolve_spec(
    table: Mapping[str, Mapping[str, Mapping[str, Any]]], model: str, output: str
) -> MetricSpec:
    """The most specific entry wins whole (its params are not merged with broader entries):
    ``model/output``, ``model/*``, ``*/output``, ``*/*``; no entry means ``metric: auto``."""
    for m, o in ((model, output), (model, WILDCARD), (WILDCARD, output), (WILDCARD, WILDCARD)):
        outputs = table.get(m)
        if outputs is not None and o in outputs:
            return _spec_from_entry(outputs[o], f"{m!r}/{o!r}")
    return MetricSpec()


def _takers(key: str) -> list[str]:
    return [name for name, info in REGISTRY.items() if key in info.defaults]


def validate_spec(spec: MetricSpec) -> None:
    """Raise :class:`~comparators.SpecError` (a ``ValueError``) naming the bad metric or param."""
    if spec.metric != AUTO and spec.metric not in REGISTRY:
        known = sorted([AUTO, *REGISTRY])
        close = difflib.get_close_matches(spec.metric, known, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise SpecError(f"unknown metric '{spec.metric}'{hint}; known: {', '.join(known)}")
    allowed = PARAM_CHECKS if spec.metric == AUTO else REGISTRY[spec.metric].defaults
    for key, value in spec.params.items():
        if key not in allowed:
            if spec.metric == AUTO:
                raise SpecError(
                    f"no metric takes a param '{key}'; metric 'auto' accepts: "
                    + ", ".join(sorted(PARAM_CHECKS))
                )
            raise SpecError(
                f"metric '{spec.metric}' takes no param '{key}'; it takes: "
                + ", ".join(sorted(allowed))
                + (f" ('{key}' belongs to: {', '.join(_takers(key))})" if _takers(key) else "")
            )
        problem = PARAM_CHECKS[key](value)
        if problem is not None:
            raise SpecError(
                f"param '{key}' of metric '{spec.metric}' must be {problem}, got {value!r}"
            )


# (metric, precision) -> its defaults with the dtype-aware tolerances applied: every comparison
# asks, and there are only a few dozen pairs.
_BASE_PARAMS: dict[tuple[str, str], dict[str, Any]] = {}


def effective_params(metric: str, given: Mapping[str, Any], precision: str) -> dict[str, Any]:
    """Defaults, then dtype-aware tolerances, then the spec's own params that ``metric`` takes
    (under ``metric: auto`` a table may carry params meant for other metrics)."""
    defaults = REGISTRY[metric].defaults
    base = _BASE_PARAMS.get((metric, precision))
    if base is None:
        base = dict(defaults)
        if metric == "tolerance":
            base.update(numeric.default_tolerances(precision))
        _BASE_PARAMS[(metric, precision)] = base
    out = dict(base)  # a copy: the caller may keep or change its params
    if given:
        out.update({k: v for k, v in given.items() if k in defaults})
    return out
