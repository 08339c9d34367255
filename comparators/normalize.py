"""One severity scale across comparators: how far beyond its own threshold a verdict is.

Each comparator reports severity on its natural axis (a relative error, ``1 - cosine``, a KL
divergence...), so raw severities of different metrics do not sort together. The normalized
severity divides the raw one by the threshold on that same axis, taken from the verdict's own
params (the spec's, else the metric's defaults): 1.0 is exactly at the threshold, 10 is ten times
beyond it, whatever the metric. Ratios are what make a log scale meaningful: a KL ten times its
limit and a cosine gap ten times its limit both read 10. The rule per metric:

========================  ==========================================================
metric                    threshold on the raw severity's axis
========================  ==========================================================
tolerance                 1 (its severity is already the worst element's |diff| over
                          ``atol + rtol |ref|``)
sqnr                      ``10 ** (-min_sqnr_db / 20)`` (the relative L2 error at the
                          SQNR floor; the severity is that relative error)
cosine, semantic          ``1 - min_cosine``
logits                    ``max_kl``
probabilities             ``max_delta_p``
exact                     ``1 - min_agreement``
exact_text                ``1 - min_exact``
text                      ``1 - min_similarity``
tokens                    ``1 - min_prefix_agreement``
logprobs                  ``max_kl_mean``
argmax, finish_reason,    0: any difference fails. Then the count of differing elements
usage, json               (``non_tie_flips``, ``mismatches``) where the scores carry one,
                          else 1 for a difference: one unit beyond an exact threshold
========================  ==========================================================

An invalid verdict (NaN, shape or dtype mismatch, a missing output) is ``SEVERITY_CAP``, like its
raw severity, so it sorts first. Nothing here is tuned to any data: every number comes from the
verdict's threshold.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from .base import SEVERITY_CAP
from .registry import LLM_METRICS, REGISTRY
from .types import OutputVerdict

Threshold = Callable[[Mapping[str, Any]], float]

# metric -> the threshold on its raw severity's axis, from the effective params.
_THRESHOLDS: Mapping[str, Threshold] = {
    "tolerance": lambda p: 1.0,
    "sqnr": lambda p: 10 ** (-float(p["min_sqnr_db"]) / 20),
    "cosine": lambda p: 1.0 - float(p["min_cosine"]),
    "semantic": lambda p: 1.0 - float(p["min_cosine"]),
    "logits": lambda p: float(p["max_kl"]),
    "probabilities": lambda p: float(p["max_delta_p"]),
    "exact": lambda p: 1.0 - float(p["min_agreement"]),
    "exact_text": lambda p: 1.0 - float(p["min_exact"]),
    "text": lambda p: 1.0 - float(p["min_similarity"]),
    "tokens": lambda p: 1.0 - float(p["min_prefix_agreement"]),
    "logprobs": lambda p: float(p["max_kl_mean"]),
}
# Scores that count the differing elements of an exact-match metric.
_COUNTS = ("non_tie_flips", "mismatches")


def _params(metric: str, params: Mapping[str, Any]) -> Mapping[str, Any]:
    info = REGISTRY.get(metric)
    defaults = info.defaults if info is not None else LLM_METRICS.get(metric, {})
    return {**defaults, **params}


def threshold(metric: str, params: Mapping[str, Any]) -> float | None:
    """The threshold on ``metric``'s raw severity axis (0: any difference fails); None for a
    metric without one (``latency``, an unknown name)."""
    rule = _THRESHOLDS.get(metric)
    if rule is None:
        return 0.0 if metric in ("argmax", "finish_reason", "usage", "json") else None
    try:
        return max(0.0, rule(_params(metric, params)))
    except (KeyError, TypeError, ValueError):
        return None


def normalized_severity(verdict: OutputVerdict, params: Mapping[str, Any]) -> float:
    """How far beyond its own threshold ``verdict`` is (see the module docstring)."""
    if not verdict.valid:
        return SEVERITY_CAP
    raw = verdict.severity
    if not raw > 0:
        return 0.0
    t = threshold(verdict.metric, params)
    if t is None:
        return raw
    if t > 0:
        value = raw / t
    else:
        counts = [verdict.scores[k] for k in _COUNTS if k in verdict.scores]
        value = max(1.0, float(counts[0])) if counts else 1.0
    return min(SEVERITY_CAP, value) if math.isfinite(value) else SEVERITY_CAP


def with_normalized(verdict: OutputVerdict, params: Mapping[str, Any]) -> OutputVerdict:
    """``verdict`` with its ``severity_norm`` set."""
    return replace(verdict, severity_norm=normalized_severity(verdict, params))


def spec_key(verdict: OutputVerdict) -> str:
    """What a config table names to give ``verdict`` its params: the aspect for a generated-text
    verdict (``text``, ``tokens``...), else the output."""
    return verdict.metric if verdict.metric in LLM_METRICS else verdict.output
