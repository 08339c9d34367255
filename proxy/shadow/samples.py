"""The record of one comparison as it may be stored: its metadata (``sample_meta``) and its
payloads (``sample_payloads``), both through the ``Redactor`` and the size caps, before anything
(the spool, Redis, the admin API, exports) sees them."""

from __future__ import annotations

import itertools
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from comparators import OutputVerdict

from ..protocols.base import DecodedResponse
from ..protocols.registry import adapter_named
from ..redact import Redactor
from ..settings import CandidateSettings, ProxySettings
from .analysis import Analysis, Exchange


def side_record(x: Exchange, decoded: DecodedResponse | None, model: str) -> dict[str, Any]:
    """One side of a sample: who answered, with which model and version, how fast."""
    record = {
        "upstream": x.upstream,
        "status": x.status,
        "model": decoded.model_name if decoded else model,
        "version": decoded.model_version if decoded else None,
        "latency_ms": round(x.latency_s * 1000, 3),
    }
    first = decoded.texts.get("") if decoded else None
    if first is not None:
        # Generated text: time to first token and per output token, the LLM latency pair.
        if first.ttft_s is not None:
            record["ttft_ms"] = round(first.ttft_s * 1000, 3)
        if first.tpot_s is not None:
            record["tpot_ms"] = round(first.tpot_s * 1000, 3)
    return record


def headers_json(headers: Iterable[tuple[str, str]]) -> bytes:
    return json.dumps(list(headers)).encode()


def sample_meta(
    redactor: Redactor,
    caps: ProxySettings,
    cand: CandidateSettings,
    *,
    request_id: str,
    model: str,
    received_at: float,
    ref: Exchange,
    answer: Exchange,
    a: Analysis,
    stored: bool,
    protocol: str = "",
    sample_id: str | None = None,
) -> dict[str, Any]:
    """The JSON record of one comparison: ids, both sides, every score, and why it was flagged.

    At most ``proxy.max_outputs`` outputs (and previews) and ``proxy.max_id_chars`` of the
    request id are kept: both come from clients and upstreams, and Redis is not theirs to fill.
    """
    verdicts: Sequence[OutputVerdict] = a.verdicts[: caps.max_outputs]
    previews = dict(itertools.islice(a.previews.items(), caps.max_outputs))
    outputs, previews = redactor.outputs([v.to_dict() for v in verdicts], previews)
    reason = a.reason
    if a.verdicts:
        reason = "; ".join(f"{o['output']}: {o['reason']}" for o in outputs if o["flagged"])
    meta = {
        "id": sample_id or uuid.uuid4().hex,
        "ts": received_at,
        "request_id": request_id[: caps.max_id_chars],
        "candidate": cand.name,
        "noise_floor": cand.noise_floor,
        "model": model,
        "protocol": adapter_named(protocol, ref.headers).name,
        "outcome": a.outcome,
        "flagged": a.flagged,
        "severity": a.severity,
        # The same on one scale for every metric: the worst output over its own threshold.
        "severity_norm": a.severity if a.severity_norm is None else a.severity_norm,
        "reason": redactor.reason(a.outcome, reason),
        "stored": stored,
        "reference": side_record(ref, a.reference, model),
        "candidate_side": side_record(answer, a.candidate, cand.served_name(model)),
        "outputs": outputs,
        "previews": previews,
    }
    noise = [v.scores["noise_p"] for v in verdicts if v.flagged and "noise_p" in v.scores]
    if noise:
        # How unlike the reference's own noise the worst output is: breaks ties in review.
        meta["noise_p"] = min(noise)
    if len(a.verdicts) > caps.max_outputs:
        meta["outputs_dropped"] = len(a.verdicts) - caps.max_outputs
    snippet = text_snippet(previews)
    if snippet is not None:
        meta["snippet"] = snippet
    return meta


# A list row of an LLM sample shows this much of each answer, from a little before they part.
_SNIPPET_CHARS = 160
_SNIPPET_LEAD = 40


def text_snippet(previews: Mapping[str, Any]) -> dict[str, Any] | None:
    """Both answers' texts around where they first differ, for the review list (taken from the
    previews as stored: redacted texts stay redacted)."""
    pv = previews.get("text")
    if not isinstance(pv, Mapping):
        return None
    ref, cand = pv.get("reference"), pv.get("candidate")
    if not (isinstance(ref, Mapping) and isinstance(cand, Mapping)):
        return None
    if ref.get("redacted") or cand.get("redacted"):
        return None
    rt, ct = ref.get("text"), cand.get("text")
    if not (isinstance(rt, str) and isinstance(ct, str)):
        return None
    common = next((i for i, (x, y) in enumerate(zip(rt, ct, strict=False)) if x != y), None)
    if common is None:
        common = min(len(rt), len(ct))
    start = max(0, common - _SNIPPET_LEAD) if common > _SNIPPET_CHARS - _SNIPPET_LEAD else 0
    end = start + _SNIPPET_CHARS
    return {"reference": rt[start:end], "candidate": ct[start:end], "offset": start}


def sample_payloads(
    redactor: Redactor,
    request_body: bytes,
    request_headers: Iterable[tuple[str, str]],
    ref: Exchange,
    answer: Exchange,
) -> dict[str, bytes]:
    """The bodies and headers to store, redacted (none at all with ``store_payloads: false``)."""
    if not redactor.store_payloads:
        return {}
    request = redactor.request(request_body, request_headers)
    reference = redactor.answer(ref.body, ref.headers.items())
    candidate = redactor.answer(answer.body, answer.headers.items())
    return {
        "request": request.data,
        "request_headers": headers_json(request.headers),
        "reference_body": reference.data,
        "reference_headers": headers_json(reference.headers),
        "candidate_body": candidate.data,
        "candidate_headers": headers_json(candidate.headers),
    }
