"""Decode both answers and score them: the decode -> compare stage, run in a worker thread.

Pure and synchronous on purpose: the mirror task hands it copies of both exchanges through an
executor, so decoding and numpy work never block the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from comparators import SEVERITY_CAP, MetricSpec, OutputVerdict, compare_outputs, resolve_spec

from ..protocols.base import MAX_INFLATED_BYTES, MAX_OUTPUTS, DecodedResponse, MalformedMessage
from ..protocols.registry import adapter_for
from ..protocols.v2_rest.codec import preview


@dataclass(frozen=True, slots=True)
class Exchange:
    """One side's answer to the same request, as bytes (never parsed on the live path)."""

    upstream: str
    status: int
    headers: Mapping[str, str]
    body: bytes
    latency_s: float


@dataclass(slots=True)
class Analysis:
    outcome: str
    flagged: bool
    reason: str = ""
    severity: float = 0.0
    verdicts: list[OutputVerdict] = field(default_factory=list)
    reference: DecodedResponse | None = None
    candidate: DecodedResponse | None = None
    previews: dict[str, dict[str, Any]] = field(default_factory=dict)


Table = Mapping[str, Mapping[str, Mapping[str, Any]]]
# Resolved specs of the comparisons table last seen, per (model, output): resolving builds a new
# MetricSpec each time, for the same few answers on every comparison. The table is the settings'
# own object, never changed in place; another table (new settings, a test) starts a new cache.
# Output names come from upstream answers, so the cache is bounded.
_SPEC_CACHE_MAX = 4096
_spec_cache: tuple[Table | None, dict[tuple[str, str], MetricSpec]] = (None, {})


def _spec(table: Table, model: str, output: str) -> MetricSpec:
    global _spec_cache
    cached_table, specs = _spec_cache  # one read: a consistent pair, whichever thread wrote it
    if cached_table is not table or len(specs) >= _SPEC_CACHE_MAX:
        specs = {}
        _spec_cache = (table, specs)
    spec = specs.get((model, output))
    if spec is None:
        spec = specs[(model, output)] = resolve_spec(table, model, output)
    return spec


def _previews(ref: Mapping[str, Any], cand: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    # The reference's outputs in order, then those only the candidate has.
    return {
        name: {
            "reference": preview(ref[name]) if name in ref else None,
            "candidate": preview(cand[name]) if name in cand else None,
        }
        for name in [*ref, *(n for n in cand if n not in ref)]
    }


def analyze(
    ref: Exchange,
    cand: Exchange,
    model: str,
    comparisons: Table,
    *,
    max_inflated_bytes: int = MAX_INFLATED_BYTES,
    max_outputs: int = MAX_OUTPUTS,
) -> Analysis:
    """Compare two answers to one infer request.

    An answer that inflates past ``max_inflated_bytes`` or has more than ``max_outputs`` outputs
    is not decoded (``reference_undecodable`` or ``candidate_invalid``, the reason says which).

    Outcomes: ``compared`` (both decoded; flagged per the comparators), ``status_mismatch``
    (flagged: the candidate errs where the reference answers, or the reverse), ``both_failed``
    (same error status on both sides; not a divergence), ``candidate_invalid`` (flagged: a 200
    that is not a V2 answer), ``reference_undecodable`` (not flagged; nothing to compare against).
    """
    # Both sides answered the same request over the same protocol: the reference's says which.
    adapter = adapter_for(ref.headers)
    if ref.status != 200 or cand.status != 200:
        if ref.status == cand.status:
            return Analysis("both_failed", flagged=False)
        failed = cand if cand.status != 200 else ref
        return Analysis(
            "status_mismatch",
            flagged=True,
            severity=SEVERITY_CAP,
            reason=(
                f"reference answered {ref.status}, candidate answered {cand.status}"
                f" ({adapter.error_text(failed.status, failed.headers, failed.body)})"
            ),
        )
    limits = {"max_inflated_bytes": max_inflated_bytes, "max_outputs": max_outputs}
    try:
        decoded_ref = adapter.decode_response(ref.body, ref.headers, **limits)
    except MalformedMessage as exc:
        return Analysis("reference_undecodable", flagged=False, reason=f"reference: {exc}")
    try:
        decoded_cand = adapter.decode_response(cand.body, cand.headers, **limits)
    except MalformedMessage as exc:
        return Analysis(
            "candidate_invalid",
            flagged=True,
            severity=SEVERITY_CAP,
            reason=f"candidate answer is not valid {adapter.title}: {exc}",
            reference=decoded_ref,
        )

    def spec_for(output: str) -> MetricSpec:
        return _spec(comparisons, model, output)

    verdicts = compare_outputs(decoded_ref.outputs, decoded_cand.outputs, spec_for)
    flagged = [v for v in verdicts if v.flagged]
    return Analysis(
        "compared",
        flagged=bool(flagged),
        reason="; ".join(f"{v.output}: {v.reason}" for v in flagged),
        severity=max((v.severity for v in verdicts), default=0.0),
        verdicts=verdicts,
        reference=decoded_ref,
        candidate=decoded_cand,
        previews=_previews(decoded_ref.outputs, decoded_cand.outputs),
    )
