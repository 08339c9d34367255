"""Decode both answers and score them: the decode -> compare stage, run in a worker thread.

Pure and synchronous on purpose: the mirror task hands it copies of both exchanges through an
executor, so decoding and numpy work never block the event loop.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from comparators import (
    SEVERITY_CAP,
    MetricSpec,
    OutputVerdict,
    Validity,
    compare_outputs,
    compare_text_answers,
    resolve_spec,
)
from comparators.llm_types import TextAnswer
from comparators.normalize import spec_key, with_normalized

from ..protocols.base import (
    MAX_INFLATED_BYTES,
    MAX_OUTPUTS,
    DecodedResponse,
    MalformedMessage,
    ProtocolAdapter,
)
from ..protocols.registry import adapter_named
from ..protocols.v2_rest.codec import preview


@dataclass(frozen=True, slots=True)
class Exchange:
    """One side's answer to the same request, as bytes (never parsed on the live path)."""

    upstream: str
    status: int
    headers: Mapping[str, str]
    body: bytes
    latency_s: float
    timeline: tuple[tuple[int, float], ...] = ()
    """(bytes of the body received so far, seconds since the request was sent) per read, for
    streamed answers (LLM routes): when the first token came, and how fast the rest followed."""
    complete: bool = True
    """False when the live stream ended early (the client left): recorded, never compared."""


@dataclass(slots=True)
class Analysis:
    outcome: str
    flagged: bool
    reason: str = ""
    severity: float = 0.0
    severity_norm: float | None = None
    """The worst verdict's normalized severity; None: the raw one (the outcomes without
    verdicts: ``SEVERITY_CAP`` or 0 on either scale)."""
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


# A stored sample keeps this much of each side's generated text, and of its tokens.
_TEXT_PREVIEW_CHARS = 16 * 1024
_TOKENS_PREVIEW = 512


def _text_preview(answer: TextAnswer | None) -> dict[str, Any] | None:
    if answer is None:
        return None
    record = answer.to_dict()
    record["text"] = answer.text[:_TEXT_PREVIEW_CHARS]
    if record["tokens"] is not None:
        record["tokens"] = record["tokens"][:_TOKENS_PREVIEW]
    if record["token_ids"] is not None:
        record["token_ids"] = record["token_ids"][:_TOKENS_PREVIEW]
    record["kind"] = "text"
    return record


def _decode(
    adapter: ProtocolAdapter,
    x: Exchange,
    request: bytes,
    request_headers: Mapping[str, str],
    limits: Mapping[str, int],
) -> DecodedResponse:
    decode_answer = getattr(adapter, "decode_answer", None)
    if decode_answer is None:
        return adapter.decode_response(x.body, x.headers, **limits)
    # An answer read whole still has a time: all of it came at its latency.
    timeline = x.timeline or ((len(x.body), x.latency_s),)
    decoded: DecodedResponse = decode_answer(
        x.body,
        x.headers,
        request=request,
        request_headers=request_headers,
        timeline=timeline,
        max_inflated_bytes=limits["max_inflated_bytes"],
    )
    return decoded


def _text_verdicts(
    ref: Mapping[str, TextAnswer], cand: Mapping[str, TextAnswer], spec_for: Any
) -> list[OutputVerdict]:
    verdicts: list[OutputVerdict] = []
    for key in [*ref, *(k for k in cand if k not in ref)]:
        if key in ref and key in cand:
            verdicts += compare_text_answers(ref[key], cand[key], spec_for, prefix=key)
            continue
        missing = key not in cand
        verdicts.append(
            OutputVerdict(
                f"{key}text",
                "text",
                Validity.MISSING_IN_CANDIDATE if missing else Validity.MISSING_IN_REFERENCE,
                severity=SEVERITY_CAP,
                flagged=True,
                reason=f"the {'candidate' if missing else 'reference'} has no such choice",
            )
        )
    return verdicts


def analyze(
    ref: Exchange,
    cand: Exchange,
    model: str,
    comparisons: Table,
    *,
    protocol: str = "",
    request: bytes = b"",
    request_headers: Mapping[str, str] | None = None,
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
    # Both sides answered the same request over the same protocol: the route it came by says
    # which (LLM APIs), else the reference's answer does.
    adapter = adapter_named(protocol, ref.headers)
    if not ref.complete:
        # The client left mid-stream: the live call was cancelled, there is no whole answer.
        return Analysis("reference_incomplete", flagged=False, reason="the client left mid-stream")
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
    req_headers = request_headers if request_headers is not None else {}
    try:
        decoded_ref = _decode(adapter, ref, request, req_headers, limits)
    except MalformedMessage as exc:
        return Analysis("reference_undecodable", flagged=False, reason=f"reference: {exc}")
    try:
        decoded_cand = _decode(adapter, cand, request, req_headers, limits)
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
    previews = _previews(decoded_ref.outputs, decoded_cand.outputs)
    if decoded_ref.texts or decoded_cand.texts:
        verdicts += _text_verdicts(decoded_ref.texts, decoded_cand.texts, spec_for)
        for key in [
            *decoded_ref.texts,
            *(k for k in decoded_cand.texts if k not in decoded_ref.texts),
        ]:
            previews[f"{key}text"] = {
                "reference": _text_preview(decoded_ref.texts.get(key)),
                "candidate": _text_preview(decoded_cand.texts.get(key)),
            }
    # One severity scale: each verdict over its own threshold (comparators/normalize.py).
    verdicts = [with_normalized(v, spec_for(spec_key(v)).params) for v in verdicts]
    flagged = [v for v in verdicts if v.flagged]
    return Analysis(
        "compared",
        flagged=bool(flagged),
        reason="; ".join(f"{v.output}: {v.reason}" for v in flagged),
        severity=max((v.severity for v in verdicts), default=0.0),
        severity_norm=max((v.severity_norm for v in verdicts), default=0.0),
        verdicts=verdicts,
        reference=decoded_ref,
        candidate=decoded_cand,
        previews=previews,
    )
