"""The review API: flagged samples filtered and sorted for triage, their tensors for plots,
labels, and divergence over time. Reads the store the data plane owns; never touches live traffic.
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

import numpy as np
from aiohttp import web

from ..buffer.store import LABELS, SampleStore
from ..errors import StoreError
from ..protocols.base import MalformedMessage
from ..protocols.registry import adapter_named

# How to draw each comparator's output on the review page.
PLOT_KIND = {
    "logits": "topk",
    "probabilities": "topk",
    "argmax": "topk",
    "cosine": "dense",
    "tolerance": "dense",
    "sqnr": "dense",
    "exact_text": "text",
    "exact": "labels",
}
MAX_PLOT_VALUES = 4096
_SORTS = ("severity", "time")
# ``scale=normalized`` (the default): severity over each verdict's own threshold, one axis for
# every metric (comparators/normalize.py); ``raw``: each comparator's own number.
_SCALES = ("normalized", "raw")


def severity_of(item: Mapping[str, Any], scale: str) -> float:
    """A sample's severity on ``scale`` (a sample stored before normalization: its raw one)."""
    if scale == "normalized" and item.get("severity_norm") is not None:
        return float(item["severity_norm"])
    return float(item.get("severity", 0.0))


def _bad(message: str) -> web.HTTPBadRequest:
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def _num(query: Mapping[str, str], name: str, default: float | None = None) -> float | None:
    raw = query.get(name)
    if raw in (None, ""):
        return default
    try:
        value = float(raw)
    except ValueError:
        raise _bad(f"query parameter {name} must be a number, got {raw!r}") from None
    if not math.isfinite(value):
        raise _bad(f"query parameter {name} must be finite")
    return value


def _matches(
    item: Mapping[str, Any], q: Mapping[str, str], lo: float | None, hi: float | None, scale: str
) -> bool:
    for field in ("candidate", "model"):
        if q.get(field) and item.get(field) != q[field]:
            return False
    outputs = item.get("outputs") or []
    if q.get("output") and not any(o["output"] == q["output"] for o in outputs):
        return False
    if q.get("metric") and not any(o["metric"] == q["metric"] for o in outputs):
        return False
    severity = severity_of(item, scale)
    if (lo is not None and severity < lo) or (hi is not None and severity > hi):
        return False
    label = q.get("label")
    if label:
        verdict = (item.get("label") or {}).get("verdict")
        if (label == "none" and verdict is not None) or (label != "none" and verdict != label):
            return False
    return True


async def list_samples(request: web.Request, store: SampleStore) -> web.Response:
    q = request.query
    flagged = q.get("flagged", "0").lower() in ("1", "true", "yes")
    limit = int(_num(q, "limit", 100) or 100)
    offset = int(_num(q, "offset", 0) or 0)
    if not 1 <= limit <= 10_000 or offset < 0:
        raise _bad("limit must be 1..10000 and offset >= 0")
    sort = q.get("sort", "time")
    if sort not in _SORTS:
        raise _bad(f"sort must be one of {', '.join(_SORTS)}")
    scale = q.get("scale", "normalized")
    if scale not in _SCALES:
        raise _bad(
            f"scale must be one of {', '.join(_SCALES)} (what sort=severity, "
            "min_severity and max_severity use)"
        )
    label = q.get("label")
    if label and label not in (*LABELS, "none"):
        raise _bad(f"label must be one of {', '.join(LABELS)}, none")
    lo, hi = _num(q, "min_severity"), _num(q, "max_severity")
    since, until = _num(q, "since"), _num(q, "until")
    try:
        # Flagged samples come from the index (bounded by buffer.flagged_index_max); plain
        # verdicts from the recent stream.
        items = await store.list_samples(
            flagged=flagged,
            candidate=q.get("candidate") or None,
            limit=1_000_000 if flagged else 10_000,
            since=since,
            until=until,
        )
    except StoreError as exc:
        return web.json_response({"error": f"sample store unavailable: {exc}"}, status=503)
    chosen = [i for i in items if _matches(i, q, lo, hi, scale)]
    if sort == "severity":
        # Worst first on the chosen scale; then the least like the reference's own noise
        # (the A/A p-value, when a twin gives one); then the newest.
        chosen.sort(
            key=lambda i: (
                -severity_of(i, scale),
                float(i.get("noise_p", 1.0)),
                -float(i["ts"]),
            )
        )
    page = chosen[offset : offset + limit]
    resp = web.json_response(page)
    resp.headers["X-Total-Count"] = str(len(chosen))
    resp.headers["X-Severity-Scale"] = scale
    return resp


def _plot_side(arr: np.ndarray[Any, Any] | None) -> dict[str, Any] | None:
    if arr is None:
        return None
    flat = arr.reshape(-1)
    head = flat[:MAX_PLOT_VALUES]
    if arr.dtype == np.object_:
        values: list[Any] = [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in head
        ]
    elif np.issubdtype(arr.dtype, np.floating):
        values = [float(v) if math.isfinite(v) else None for v in head.astype(np.float64)]
    else:
        values = [int(v) for v in head]
    return {
        "shape": list(arr.shape),
        "dtype": str(arr.dtype),
        "values": values,
        "truncated": flat.size > MAX_PLOT_VALUES,
    }


def _headers(raw: bytes | None) -> dict[str, str]:
    return {k: v for k, v in json.loads(raw)} if raw else {}


def sample_tensors(sample: Mapping[str, Any]) -> dict[str, Any]:
    """Both sides' outputs, decoded again from the stored bodies, shaped for plotting."""
    payloads = sample["payloads"]
    sides: dict[str, dict[str, np.ndarray[Any, Any]]] = {}
    errors: dict[str, str] = {}
    for side in ("reference", "candidate"):
        body = payloads.get(f"{side}_body")
        if body is None:
            continue
        try:
            headers = _headers(payloads.get(f"{side}_headers"))
            adapter = adapter_named(str(sample.get("protocol") or ""), headers)
            sides[side] = adapter.decode_response(body, headers).outputs
        except MalformedMessage as exc:
            errors[side] = str(exc)
    metrics = {o["output"]: o["metric"] for o in sample.get("outputs", [])}
    names = sorted(set(sides.get("reference", {})) | set(sides.get("candidate", {})))
    outputs = {
        name: {
            "metric": metrics.get(name),
            "kind": PLOT_KIND.get(metrics.get(name) or "", "dense"),
            "reference": _plot_side(sides.get("reference", {}).get(name)),
            "candidate": _plot_side(sides.get("candidate", {}).get(name)),
        }
        for name in names
    }
    return {"outputs": outputs, "errors": errors}


async def timeseries(
    request: web.Request, store: SampleStore, noise_floor: Mapping[str, bool]
) -> web.Response:
    bucket = _num(request.query, "bucket_s", 60.0) or 60.0
    if bucket < 1:
        raise _bad("bucket_s must be >= 1")
    # Several candidates and metrics on one chart: one scale (normalized unless asked).
    scale = request.query.get("scale", "normalized")
    if scale not in _SCALES:
        raise _bad(f"scale must be one of {', '.join(_SCALES)}")
    try:
        verdicts = await store.recent_verdicts(50_000)
    except StoreError as exc:
        return web.json_response({"error": f"sample store unavailable: {exc}"}, status=503)
    cells: dict[str, dict[float, list[tuple[float, bool]]]] = defaultdict(lambda: defaultdict(list))
    for v in verdicts:
        if v.get("outcome") != "compared":
            continue
        t = math.floor(float(v["ts"]) / bucket) * bucket
        cells[v["candidate"]][t].append((severity_of(v, scale), bool(v["flagged"])))
    series = []
    for candidate, buckets in sorted(cells.items()):
        points = []
        for t, rows in sorted(buckets.items()):
            sev = np.asarray([s for s, _ in rows])
            points.append(
                {
                    "t": t,
                    "n": len(rows),
                    "flagged": sum(f for _, f in rows),
                    "p50": float(np.quantile(sev, 0.5)),
                    "p99": float(np.quantile(sev, 0.99)),
                    "max": float(sev.max()),
                }
            )
        series.append(
            {
                "candidate": candidate,
                "noise_floor": noise_floor.get(candidate, False),
                "points": points,
            }
        )
    return web.json_response({"bucket_s": bucket, "scale": scale, "series": series})


async def delete_sample(request: web.Request, store: SampleStore) -> web.Response:
    """``DELETE /api/samples/{id}`` (admin role, CSRF for browser sessions: the auth middleware
    asks both of every write that is not a label): the sample, its payloads and its label."""
    sample_id = request.match_info["id"]
    try:
        existed = await store.delete(sample_id)
    except StoreError as exc:
        return web.json_response({"error": f"sample store unavailable: {exc}"}, status=503)
    if not existed:
        return web.json_response(
            {"error": f"no sample {sample_id!r} (unknown or expired)"}, status=404
        )
    return web.json_response({"deleted": sample_id})
