"""The comparators' data types: what goes in (a spec) and what comes out (a verdict).

Everything here is frozen and cheap to pass between threads; the proxy stores verdicts as JSON
via :meth:`OutputVerdict.to_dict`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Any

_EMPTY: Mapping[str, float] = MappingProxyType({})


class Validity(StrEnum):
    """Why a pair of outputs could not be scored, or ``OK``."""

    OK = "ok"
    MISSING_IN_CANDIDATE = "missing_in_candidate"
    MISSING_IN_REFERENCE = "missing_in_reference"
    SHAPE_MISMATCH = "shape_mismatch"
    DTYPE_MISMATCH = "dtype_mismatch"
    NON_FINITE = "non_finite"  # NaN/Inf in the candidate only
    EMPTY = "empty"
    UNSUPPORTED = "unsupported"


@dataclass(frozen=True, slots=True)
class MetricSpec:
    """Which comparator scores an output, and its thresholds.

    ``metric`` is a registered comparator name or ``"auto"``; ``params`` holds thresholds and
    options (``atol``, ``rtol``, ``min_cosine``, ``max_kl``, ``k`` ...). Unknown params are an error
    raised by :func:`comparators.validate_spec`, so config mistakes surface at start-up.
    """

    metric: str = "auto"
    params: Mapping[str, Any] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class OutputVerdict:
    """The score of one output of one request.

    ``scores`` are raw numbers (float64 math, the reference as denominator). ``headline`` names the
    score that summarises the divergence in reports; ``severity`` is >= 0, 0 for identical, and
    sorts samples for review (larger is worse). ``reason`` says why it was flagged or invalid in a
    sentence a QA reviewer can read; it is empty when the output is fine.
    """

    output: str
    metric: str
    validity: Validity = Validity.OK
    # A factory: dataclasses reject a mappingproxy as a plain default (it is unhashable).
    scores: Mapping[str, float] = field(default_factory=lambda: _EMPTY)
    headline: str = ""
    severity: float = 0.0
    flagged: bool = False
    reason: str = ""
    severity_norm: float = 0.0
    """``severity`` over this verdict's own threshold on the same axis (``normalize.py``): one
    scale for every metric. Set by whoever knows the params (``with_normalized``)."""

    @property
    def valid(self) -> bool:
        return self.validity is Validity.OK

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "metric": self.metric,
            "validity": self.validity.value,
            "scores": dict(self.scores),
            "headline": self.headline,
            "severity": self.severity,
            "severity_norm": self.severity_norm,
            "flagged": self.flagged,
            "reason": self.reason,
        }
