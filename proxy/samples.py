"""The record of one comparison as stored in Redis: ids, both sides, every score, the reason."""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .analysis import Analysis, Exchange
from .codec import DecodedResponse
from .settings import CandidateSettings

if TYPE_CHECKING:
    from .mirror import MirrorRequest


def _side(x: Exchange, decoded: DecodedResponse | None, model: str) -> dict[str, Any]:
    """One side of a sample: who answered, with which model and version, how fast."""
    return {
        "upstream": x.upstream,
        "status": x.status,
        "model": decoded.model_name if decoded else model,
        "version": decoded.model_version if decoded else None,
        "latency_ms": round(x.latency_s * 1000, 3),
    }


def headers_json(headers: Mapping[str, str]) -> bytes:
    return json.dumps(list(headers.items())).encode()


def sample_meta(
    cand: CandidateSettings,
    req: MirrorRequest,
    request_id: str,
    ref: Exchange,
    exchange: Exchange,
    a: Analysis,
    *,
    stored: bool,
) -> dict[str, Any]:
    """The JSON record of one comparison: ids, both sides, every score, and why it was flagged."""
    model = req.route.model or ""
    return {
        "id": uuid.uuid4().hex,
        "ts": req.received_at,
        "request_id": request_id,
        "candidate": cand.name,
        "noise_floor": cand.noise_floor,
        "model": model,
        "outcome": a.outcome,
        "flagged": a.flagged,
        "severity": a.severity,
        "reason": a.reason,
        "stored": stored,
        "reference": _side(ref, a.reference, model),
        "candidate_side": _side(exchange, a.candidate, cand.served_name(model)),
        "outputs": [v.to_dict() for v in a.verdicts],
        "previews": a.previews,
    }
