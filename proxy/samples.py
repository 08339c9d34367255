"""Pieces of the record of one comparison as stored in Redis (``compare_stage.sample_meta``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .analysis import Exchange
from .codec import DecodedResponse


def side_record(x: Exchange, decoded: DecodedResponse | None, model: str) -> dict[str, Any]:
    """One side of a sample: who answered, with which model and version, how fast."""
    return {
        "upstream": x.upstream,
        "status": x.status,
        "model": decoded.model_name if decoded else model,
        "version": decoded.model_version if decoded else None,
        "latency_ms": round(x.latency_s * 1000, 3),
    }


def headers_json(headers: Iterable[tuple[str, str]]) -> bytes:
    return json.dumps(list(headers)).encode()
